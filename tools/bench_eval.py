#!/usr/bin/env python
"""How long PyTorch evaluation takes at several batch sizes, and whether the answers change.

The export check's fp32 reference, the daemon's zero-shot and the benchmark's every cell run
`edgekif.evaluate.generate_answers` (greedy, KV cache, left-padded batches of similar prompt
length) and, for label tasks, `label_scores`. This times both on a task file's first N records
at each batch size, in interleaved rounds, and counts answers that differ from the first
batch size's (padding changes the sums a little: a greedy tie can flip). On a label task it
also times both from one pass over the prompts (`generate_and_pick`, what evaluate_task and
the export check run) and counts where that pass differs from the two separate calls.

    python tools/bench_eval.py ../shared/data/cl-benchmark/dbpedia \
        ../shared/data/gen-benchmark/headlines --records 100 --batch-sizes 16 32 64

Each task folder holds train.jsonl (its spec: kind, metric and answer budget, as the benchmark
decides it) and test.jsonl (the records timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="+", type=Path, help="task folders with train.jsonl and test.jsonl")
    ap.add_argument("--records", type=int, default=100, help="the first N records of each file")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    ap.add_argument("--no-label-scoring", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    from edgekif.config import Config
    from edgekif.evaluate import generate_and_pick, generate_answers, label_scores
    from edgekif.metrics import score
    from edgekif.taskfile import read_task
    from edgekif.tasks import CLASSIFICATION, read_task_spec
    from edgekif.workflow import open_learner

    cfg = Config()
    learner, base = open_learner(cfg)
    model, tok = learner.model, learner.tokenizer
    out: dict = {"command": "python tools/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "base": base.name, "precision": cfg.model.precision, "tasks": {}}
    for folder in args.tasks:
        train = read_task(folder / "train.jsonl").records
        spec = read_task_spec(folder / "train.jsonl", train, tok)
        recs = read_task(folder / "test.jsonl").records[: args.records]
        labels = sorted({r.label for r in train}) if spec.kind == CLASSIFICATION else None
        times: dict[int, dict[str, list[float]]] = {b: {"generate": [], "label_scoring": [], "one_pass": []} for b in args.batch_sizes}
        answers: dict[int, list[str]] = {}
        picks: dict[int, list[str]] = {}
        one: dict[int, tuple[list[str], list[str] | None]] = {}
        for _ in tqdm(range(args.rounds), desc=folder.name):
            for b in args.batch_sizes:
                t0 = time.perf_counter()
                answers[b] = generate_answers(model, tok, recs, max_new_tokens=spec.max_new_tokens, batch_size=b)
                times[b]["generate"].append(time.perf_counter() - t0)
                if labels and not args.no_label_scoring:
                    t0 = time.perf_counter()
                    picks[b] = label_scores(model, tok, recs, labels, batch_size=b)
                    times[b]["label_scoring"].append(time.perf_counter() - t0)
                    # both from one pass over the prompts, as evaluate_task and the export check run them
                    t0 = time.perf_counter()
                    one[b] = generate_and_pick(model, tok, recs, labels, max_new_tokens=spec.max_new_tokens, batch_size=b)
                    times[b]["one_pass"].append(time.perf_counter() - t0)
        first = args.batch_sizes[0]
        refs = [r.label for r in recs]
        rows = {}
        for b in args.batch_sizes:
            rows[b] = {
                "generate_s": statistics.median(times[b]["generate"]),
                "label_scoring_s": statistics.median(times[b]["label_scoring"]) if times[b]["label_scoring"] else None,
                "answers_differing": sum(x != y for x, y in zip(answers[b], answers[first])),
                "labels_differing": sum(x != y for x, y in zip(picks[b], picks[first])) if b in picks else None,
                "one_pass_s": statistics.median(times[b]["one_pass"]) if times[b]["one_pass"] else None,
                # the one pass against the two separate calls at the same batch size
                "one_pass_differing": (sum(x != y for x, y in zip(one[b][0], answers[b])) + sum(x != y for x, y in zip(one[b][1], picks[b]))
                                       if b in one else None),
                "score": score(spec.metric, answers[b], refs).mean,
            }
        name = folder.name
        out["tasks"][name] = {"records": len(recs), "kind": spec.kind, "metric": spec.metric,
                              "max_new_tokens": spec.max_new_tokens, "by_batch_size": rows}
        print(f"\n{name}: {len(recs)} records, {spec.kind}, {spec.max_new_tokens} new tokens ({spec.metric})")
        print("| batch | generate (s) | label scoring (s) | both in one pass (s) | answers differing from batch "
              f"{first} | labels differing | one pass differing | score |\n|---|---|---|---|---|---|---|---|")
        for b, r in rows.items():
            def cell(v, fmt="{:.1f}"):
                return "—" if v is None else fmt.format(v)
            print(f"| {b} | {r['generate_s']:.1f} | {cell(r['label_scoring_s'])} | {cell(r['one_pass_s'])} | {r['answers_differing']} | "
                  f"{cell(r['labels_differing'], '{}')} | {cell(r['one_pass_differing'], '{}')} | {100 * r['score']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
