"""Development trial (issue 21, export + evaluate time): the LM head on one position a row.

An int8 export's logits were [batch, prompt length, 49152] in the prefill: the LM head (28 M
multiply-adds a position, a quarter of SmolLM2's body) ran on every prompt position, and a
batch of 16 prompts of 150 tokens wrote ~0.5 GB of logits. Since session 34 a CPU build
computes it on each row's last real position only (edgekif.export.lm_head: the builder's
`prune_lm_head=true`, its Gather(-1) rewritten per row; the builder's own took the batch's last
position, a pad for every right-padded row: 6 of 96 batched answers right, session 33). This
builds the same model folder as int8 twice, with every position (`prune_lm_head=false`) and
with the default, times the answers to the same records (edgekif.infer.answer_all, as the
export check answers them) in batches and one at a time, and counts the answers that differ
from the every-position export's in batches.

    python tools/trial_prune_lm_head.py MODEL_DIR --out /tmp/prune   # the base's source folder, say

Not part of the product; the figures and the command are in docs/benchmarks.md
("The LM head on each row's last position").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# (test file, records, answer budget): a label task with long prompts, a free-text task
TASKS = {"dbpedia": (DATA / "cl-benchmark" / "dbpedia" / "test.jsonl", 96, 5),
         "headlines": (DATA / "gen-benchmark" / "headlines" / "test.jsonl", 96, 24)}
RUNS = (("every", 16), ("last", 16), ("last", 1), ("every", 1))  # (export, batch size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="a Hugging Face model folder (a fused model, or the base's source)")
    ap.add_argument("--out", type=Path, required=True, help="where the two exports are built (reused when there)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    from edgekif.config import DataConfig
    from edgekif.export.build import ExportVariant, build_variant
    from edgekif.infer import answer_all, open_model
    from edgekif.taskfile import read_task

    prompts = {name: [r.chat() for r in read_task(path, DataConfig()).records[:n]] for name, (path, n, _) in TASKS.items()}
    builds = {"every": ExportVariant("int8", (("prune_lm_head", "false"),)), "last": ExportVariant("int8")}
    for label, variant in builds.items():
        dest = args.out / label
        if not (dest / "genai_config.json").is_file():
            build_variant(args.model_dir, dest, "genai", variant, "cpu")
    answers: dict[tuple[str, int, str], list[str]] = {}
    rows = []
    for label, batch in RUNS:
        runner = open_model(args.out / label)
        for name, (_, _, budget) in TASKS.items():
            answer_all(runner, prompts[name][:4], budget, batch_size=batch)  # warm-up
            t0 = time.perf_counter()
            got = answer_all(runner, prompts[name], budget, batch_size=batch)
            seconds = time.perf_counter() - t0
            answers[(label, batch, name)] = got
            same = sum(a == b for a, b in zip(got, answers[("every", 16, name)]))
            rows.append({"export": label, "batch": batch, "task": name, "records": len(got), "seconds": round(seconds, 2),
                         "same_as_every_position_batched": same})
            print(f"{label:6} batch {batch:2} {name:9} {seconds:6.2f} s  answers as the every-position export's in batches: {same}/{len(got)}", flush=True)
        del runner
    if args.json:
        args.json.write_text(json.dumps({"model_dir": str(args.model_dir), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
