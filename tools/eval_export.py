#!/usr/bin/env python
"""Exact match of an exported model on task files, as a client sees it: onnxruntime-genai (or
plain ONNX) through edgekif.infer, the export's own chat template, whole prompts (the record's
chat messages as `Record.chat()` gives them), greedy, `--max-new-tokens` answer tokens.

    python tools/eval_export.py DATA_DIR/models/current DATA_DIR/holdout/dbpedia.jsonl ...

Task files may be any shape the inbox accepts, or the daemon's holdout JSONL (Record JSON).
Prints one line per file and, with --json, the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _records(path: Path):
    from edgekif.taskfile import read_task
    from edgekif.errors import ValidationError
    from edgekif.holdouts import read_holdout

    try:
        return read_task(path).records
    except ValidationError as e:  # the daemon's holdout files are Record JSON lines
        try:
            return read_holdout(path)
        except ValidationError:
            raise SystemExit(f"eval_export: {e}") from None  # neither shape: the reader's error names file, line, field


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an export folder (or DATA_DIR/models/current)")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from edgekif.export.check import client_answers, exact_match
    from edgekif.infer import open_model

    runner = open_model(Path(args.model).resolve())
    out = {}
    for path in args.files:
        recs = _records(path)
        t0 = time.perf_counter()
        answers = client_answers(runner, recs, args.max_new_tokens)
        em = exact_match(answers, recs)
        out[str(path)] = {"n": len(recs), "exact_match": em, "seconds": round(time.perf_counter() - t0, 1),
                          "answers": [{"expected": r.label, "got": a} for r, a in zip(recs, answers)]}
        print(f"{path}: exact match {100 * em:.1f} on {len(recs)} ({out[str(path)]['seconds']} s)")
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
