#!/usr/bin/env python
"""How long each task's training examples are in tokens, as training encodes them (the base's
chat template, prompt + answer + end of turn), and how many fit uncut in each `data.max_length`.

For choosing `data.max_length`: a step's cost grows with the batch's longest example
(docs/benchmarks.md, "Training cost"), and an example longer than max_length has its input's
middle cut (edgekif.inputs.fit_prompt). "padded" is what a step costs in tokens: batches of
--batch-size shuffled records (seed 0) are padded to their longest example, cut at max_length;
the step time grows about linearly with it (3.56 s at 128, 7.26 s at 256 in bench_train).

    python tools/task_lengths.py ../shared/data/cl-benchmark/* ../shared/data/gen-benchmark/* --lengths 128 256
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekif.config import Config, apply_overrides  # noqa: E402
from edgekif.inputs import encode_prompt, encode_target  # noqa: E402
from edgekif.model import load_tokenizer, resolve_base  # noqa: E402
from edgekif.taskfile import read_task  # noqa: E402
from edgekif.workflow import cache_root  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", nargs="+", type=Path, help="task folders (train.jsonl inside) or task files")
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--limit", type=int, default=300, help="first N training records of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.base=gemma3-270m")
    args = ap.parse_args(argv)

    cfg = apply_overrides(Config(), args.set)
    base = resolve_base(cfg.model, cache_root(cfg))
    tok = load_tokenizer(base.path, chat_template=cfg.model.chat_template)
    head = ("| task | records | median tokens | p95 | " + " | ".join(f"uncut in {n}" for n in args.lengths) + " | "
            + " | ".join(f"padded at {n}" for n in args.lengths) + " |")
    print(f"base {base.name}; first {args.limit} training records of each task\n")
    print(head + "\n|---|" + "---:|" * (3 + 2 * len(args.lengths)))
    for task in args.tasks:
        path = task / "train.jsonl" if task.is_dir() else task
        records = read_task(path).records[: args.limit]
        n = sorted(len(encode_prompt(tok, r)) + len(encode_target(tok, r)) for r in records)
        p95 = statistics.quantiles(n, n=20)[18] if len(n) > 1 else n[0]
        fits = " | ".join(f"{100 * sum(x <= m for x in n) / len(n):.0f}%" for m in args.lengths)
        shuffled = random.Random(0).sample(n, len(n))
        batches = [shuffled[i : i + args.batch_size] for i in range(0, len(shuffled), args.batch_size)]
        padded = " | ".join(f"{statistics.mean(min(max(b), m) for b in batches):.0f}" for m in args.lengths)
        print(f"| {task.name if task.is_dir() else task.stem} | {len(n)} | {statistics.median(n):.0f} | {p95:.0f} | {fits} | {padded} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
