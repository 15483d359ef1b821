#!/usr/bin/env python
"""How much faster PyTorch evaluation is in bf16 (eval.compute_dtype), and what it changes.

Trains one LoRA on the given tasks in order, as the benchmark's `standard` profile trains
(sequential LoRA, its steps, batch and max_length; answers budgeted as the benchmark budgets
them), so the answers compared are a trained model's, not the untrained base's. Then times
`edgekif.evaluate.generate_and_pick` (what every benchmark cell and evaluate_task run) on each
task's first N test records in fp32 and in bf16, in interleaved rounds, and counts the
answers and label picks that differ between the two, with each dtype's score.

    python tools/bench_eval_dtype.py ../shared/data/cl-benchmark/dbpedia \
        ../shared/data/cl-benchmark/agnews --records 100 --json docs/benchmarks/eval-dtype.json

Each task folder holds train.jsonl and test.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="+", type=Path, help="task folders with train.jsonl and test.jsonl, in training order")
    ap.add_argument("--records", type=int, default=100, help="the first N test records of each task")
    ap.add_argument("--train-per-task", type=int, default=128)
    ap.add_argument("--task-steps", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from edgekif.config import Config
    from edgekif.compute import compute_dtype
    from edgekif.evaluate import EVAL_BATCH_SIZE, generate_and_pick
    from edgekif.metrics import CLASSIFICATION, score
    from edgekif.taskfile import read_task
    from edgekif.tasks import read_task_spec
    from edgekif.workflow import open_learner

    cfg = Config()
    cfg.train.strategy = "seq_lora"
    cfg.train.seed = args.seed
    cfg.train.max_steps = args.task_steps
    cfg.train.checkpoint_every = 0
    cfg.data.max_length = args.max_length
    torch.manual_seed(args.seed)
    learner, base = open_learner(cfg)
    model, tok = learner.model, learner.tokenizer
    tasks = {}
    for folder in args.tasks:
        train = read_task(folder / "train.jsonl").records
        spec = read_task_spec(folder / "train.jsonl", train, tok)
        tasks[folder.name] = (train, spec, read_task(folder / "test.jsonl").records[: args.records])

    t_train = time.perf_counter()
    for name, (train, spec, _) in tasks.items():
        learner.answer_budgets[name] = spec.max_new_tokens  # as the benchmark: prompts leave room for the answer
        picked = random.Random(args.seed).sample(train, min(args.train_per_task, len(train)))
        for r in picked:
            r.meta["task_id"] = name
        learner.train_task(name, picked)
    out: dict = {"command": "python tools/bench_eval_dtype.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "base": base.name, "threads": torch.get_num_threads(), "train_seconds": time.perf_counter() - t_train, "tasks": {}}

    dtypes = ("fp32", "bf16")
    for name, (train, spec, recs) in tasks.items():
        labels = sorted({r.label for r in train}) if spec.kind == CLASSIFICATION else None
        prompt_tokens = max(16, args.max_length - spec.max_new_tokens)  # as tools/bench_cl.py fits test prompts
        times: dict[str, list[float]] = {d: [] for d in dtypes}
        got: dict[str, tuple] = {}
        for _ in tqdm(range(args.rounds), desc=name):
            for d in dtypes:
                t0 = time.perf_counter()
                with compute_dtype(model, d):
                    got[d] = generate_and_pick(model, tok, recs, labels, max_new_tokens=spec.max_new_tokens,
                                               batch_size=EVAL_BATCH_SIZE, max_prompt_tokens=prompt_tokens)
                times[d].append(time.perf_counter() - t0)
        refs = [r.label for r in recs]
        row = {d: {"seconds": statistics.median(times[d]), "score": score(spec.metric, got[d][0], refs).mean,
                   "label_accuracy": None if got[d][1] is None else sum(p == y for p, y in zip(got[d][1], refs)) / len(refs)}
               for d in dtypes}
        row["answers_differing"] = sum(a != b for a, b in zip(got["fp32"][0], got["bf16"][0]))
        row["labels_differing"] = None if labels is None else sum(a != b for a, b in zip(got["fp32"][1], got["bf16"][1]))
        row["speedup"] = row["fp32"]["seconds"] / row["bf16"]["seconds"]
        out["tasks"][name] = {"records": len(recs), "metric": spec.metric, "max_new_tokens": spec.max_new_tokens, **row}
        print(f"{name} ({len(recs)} records, {spec.metric}): fp32 {row['fp32']['seconds']:.1f} s score {100 * row['fp32']['score']:.1f} | "
              f"bf16 {row['bf16']['seconds']:.1f} s score {100 * row['bf16']['score']:.1f} | x{row['speedup']:.2f} | "
              f"answers differing {row['answers_differing']}, labels differing {row['labels_differing']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
