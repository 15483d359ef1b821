#!/usr/bin/env python
"""Continual-learning benchmark: every strategy on the standard 4-task benchmark, same base,
data subset, step budget and seeds, through the same Learner loop.

    python tools/bench_cl.py --quick            # smoke profile (minutes)
    python tools/bench_cl.py --profile standard # about half an hour on 2 cores
    python tools/bench_cl.py                    # default profile (the one in docs/benchmarks.md)
    python tools/bench_cl.py --order 2 --seeds 0 1 2

Writes OUT/result.json, OUT/result.md and OUT/heatmap_<strategy>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tools.benchlib import profile_settings  # noqa: E402

ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
}
PROFILES = {
    # train examples offered per task, gradient steps on the task, test examples per task
    # (a step at batch 8 x ~200 tokens costs ~20 s on 2 cores; long prompts are fitted by
    # edgekif.data.fit_prompt: the input's middle is cut, the options and answer cue kept)
    "quick": dict(train_per_task=32, task_steps=4, batch_size=4, test_per_task=12, max_length=96, label_scoring=False, zero_shot=False),
    # about half an hour on 2 cores: enough steps for the tasks to be learned and forgotten
    "standard": dict(train_per_task=128, task_steps=16, batch_size=8, test_per_task=24, max_length=128, label_scoring=False, zero_shot=False),
    "default": dict(train_per_task=192, task_steps=24, batch_size=8, test_per_task=40, max_length=128, label_scoring=False, zero_shot=True),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl-benchmark"


def _subset(records, n, seed):
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    return [records[i] for i in idx[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="same as --profile quick")
    ap.add_argument("--profile", choices=list(PROFILES), default="default")
    ap.add_argument("--order", type=int, default=1, choices=[1, 2, 3])
    ap.add_argument("--strategies", nargs="+", default=["seq_lora", "replay", "recurrent_kif", "mtl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=None)
    ap.add_argument("--precision", default="fp32", help="base precision (fp32|nf4|bf16); fp32 is fastest on CPU")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--task-steps", type=int)
    ap.add_argument("--train-per-task", type=int)
    ap.add_argument("--test-per-task", type=int)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from edgekif.config import Config, ModelConfig
    from edgekif.data import read_task
    from edgekif.evaluate import AccuracyMatrix, evaluate_task, plot_heatmap
    from edgekif.model import resolve_base
    from edgekif.replay import ReplayBuffer
    from edgekif.workflow import open_learner
    from edgekif.atomic import atomic_write_json, atomic_write_text

    profile_name = "quick" if args.quick else args.profile
    prof = profile_settings(PROFILES, profile_name, args, ("task_steps", "train_per_task", "test_per_task"))
    out = Path(args.out or f"bench_out/cl-{profile_name}-order{args.order}")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    order = ORDERS[args.order]
    data = Path(args.data)
    train = {t: read_task(data / t / "train.jsonl") for t in order}
    test = {t: read_task(data / t / "test.jsonl") for t in order}
    labels = {t: train[t].labels for t in order}

    cache = Path(os.environ.get("EDGEKIF_CACHE") or (Path.home() / ".cache" / "edgekif"))
    base = resolve_base(ModelConfig(), cache)

    def make_cfg(strategy: str, seed: int) -> Config:
        cfg = Config()
        cfg.model.precision = args.precision
        cfg.train.strategy = strategy
        cfg.train.lr = args.lr
        cfg.kif.outer_lr = args.lr
        cfg.train.seed = seed
        cfg.train.max_steps = prof["task_steps"]
        cfg.train.batch_size = prof["batch_size"]
        cfg.kif.replay_batch_size = prof["batch_size"]
        cfg.train.checkpoint_every = 0
        cfg.data.max_length = prof["max_length"]
        cfg.replay.seed = seed
        cfg.eval.label_scoring = prof["label_scoring"]
        return cfg

    # test prompts are fitted like the training examples (room left for an 8-token
    # answer): the model is scored on what it was trained to see, and long yahoo prompts
    # (up to ~1000 tokens) no longer dominate the benchmark's wall time
    answer_tokens = 8
    eval_prompt_tokens = prof["max_length"] - answer_tokens

    def evaluate(learner, task, seed):
        recs = _subset(test[task].records, prof["test_per_task"], 1000 + seed)
        ev = evaluate_task(learner.model, learner.tokenizer, recs, labels=labels[task], max_new_tokens=answer_tokens, batch_size=16,
                           label_scoring=prof["label_scoring"], max_prompt_tokens=eval_prompt_tokens)
        return ev.score, ev

    result = {
        "profile": profile_name,
        "command": "python tools/bench_cl.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": {**prof, "order": order, "seeds": args.seeds, "precision": args.precision, "lr": args.lr,
                     "kif": {"inner_steps": 8, "outer_steps": 4, "beta": 0.85, "mask_quantile": 0.8}, "replay_fraction": 0.02, "replay_min_per_task": 16,
                     "metric": "label accuracy" if prof["label_scoring"] else "exact match of the greedy answer",
                     "eval_prompt_tokens": eval_prompt_tokens},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "strategies": {},
    }
    t_all = time.perf_counter()

    if prof["zero_shot"]:
        learner, _ = open_learner(make_cfg("seq_lora", 0), base=base)
        result["zero_shot"] = {t: evaluate(learner, t, 0)[0] for t in tqdm(order, desc="zero-shot")}
        del learner

    for strategy in args.strategies:
        runs = []
        for seed in args.seeds:
            cfg = make_cfg(strategy, seed)
            torch.manual_seed(seed)
            learner, _ = open_learner(cfg, base=base)
            matrix = AccuracyMatrix(order)
            step_times, steps_total, examples_total, train_seconds = [], 0, 0, 0.0
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, ReplayBuffer(Path(tmp) / "replay.db", cfg.replay) as buf:
                if strategy == "mtl":  # all tasks at once, same total task steps
                    union = [r for t in order for r in _subset(train[t].records, prof["train_per_task"], seed)]
                    cfg.train.max_steps = prof["task_steps"] * len(order)
                    res = learner.train_task("all", union)
                    step_times.append(res.seconds / res.steps)
                    steps_total += res.steps
                    examples_total += res.examples
                    train_seconds += res.seconds
                    for i, t in enumerate(tqdm(order, desc=f"{strategy} s{seed} eval", leave=False)):
                        matrix.set(len(order) - 1, i, evaluate(learner, t, seed)[0])
                else:
                    for j, task in enumerate(order):
                        if j > 0 and "zero_shot" in result:  # FWT needs each task's accuracy just before it is learned
                            matrix.set(j - 1, j, evaluate(learner, task, seed)[0])
                        recs = _subset(train[task].records, prof["train_per_task"], seed)
                        past = buf.tasks()
                        sampler = (lambda n, s, past=past: buf.sample(n, s, task_ids=past)) if past else None
                        bar = tqdm(total=None, desc=f"{strategy} s{seed} {task}", unit="step", leave=False)
                        res = learner.train_task(task, recs, replay=sampler, progress=lambda ev: (setattr(bar, "total", ev["steps"]), bar.update(1)))
                        bar.close()
                        buf.add_task(task, recs)
                        step_times.append(res.seconds / res.steps)
                        steps_total += res.steps
                        examples_total += res.examples
                        train_seconds += res.seconds
                        for i in range(j + 1):
                            matrix.set(j, i, evaluate(learner, order[i], seed)[0])
                        tqdm.write(f"{strategy} seed {seed} after {task}: " + ", ".join(f"{order[i]} {matrix.get(j, i):.2f}" for i in range(j + 1)))
            wall = time.perf_counter() - t0
            runs.append({
                "seed": seed, "matrix": matrix.to_dict(), "op": matrix.op(), "bwt": matrix.bwt(),
                "fwt": matrix.fwt([result["zero_shot"][t] for t in order]) if "zero_shot" in result and strategy != "mtl" else None,
                "seconds": wall, "grad_steps": steps_total, "examples": examples_total,
                "sec_per_step": statistics.mean(step_times), "train_seconds": train_seconds, "examples_per_sec": examples_total / max(1e-9, train_seconds),
                "state_bytes": res.state_bytes,
            })
            plot_heatmap(matrix, out / f"heatmap_{strategy}{'' if seed == args.seeds[0] else f'_s{seed}'}.png", title=f"{strategy} (order {args.order}, seed {seed})")
            del learner
        ops = [r["op"] for r in runs if r["op"] is not None]
        bwts = [r["bwt"] for r in runs if r["bwt"] is not None]
        result["strategies"][strategy] = {
            "runs": runs,
            "op_mean": statistics.mean(ops) if ops else None, "op_std": statistics.pstdev(ops) if len(ops) > 1 else 0.0,
            "bwt_mean": statistics.mean(bwts) if bwts else None, "bwt_std": statistics.pstdev(bwts) if len(bwts) > 1 else 0.0,
            "sec_per_step": statistics.mean(r["sec_per_step"] for r in runs),
        }
        atomic_write_json(out / "result.json", result)  # partial results survive an interrupted run

    result["wall_seconds"] = time.perf_counter() - t_all
    atomic_write_json(out / "result.json", result)
    md = to_markdown(result, args)
    atomic_write_text(out / "result.md", md)
    print(md)
    return 0


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def to_markdown(result: dict, args) -> str:
    s = result["settings"]
    lines = [
        f"### Continual learning, order {args.order} ({' → '.join(s['order'])}), profile `{result['profile']}`",
        "",
        f"Command: `{result['command']}`  ",
        f"SmolLM2-135M-Instruct ({s['precision']}), LoRA r=8/α=32 on q,v, lr {s['lr']}, batch {s['batch_size']}, {s['task_steps']} task steps per task "
        f"on {s['train_per_task']} train examples (max_length {s['max_length']}), {s['test_per_task']} test examples per task "
        f"(prompts cut to their last {s.get('eval_prompt_tokens', '—')} tokens, as training cuts them), metric: {s['metric']}; "
        f"replay 2% of each task (min 16); Recurrent-KIF Q=8, M=4, β=0.85, top 20%. Wall time {result.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        "| strategy | OP | BWT | FWT | grad steps | s / step | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, st in result["strategies"].items():
        fwts = [r["fwt"] for r in st["runs"] if r.get("fwt") is not None]
        op = _pct(st["op_mean"]) + (f" ± {100 * st['op_std']:.1f}" if len(st["runs"]) > 1 else "")
        bwt = _pct(st["bwt_mean"]) + (f" ± {100 * st['bwt_std']:.1f}" if len(st["runs"]) > 1 and st["bwt_mean"] is not None else "")
        lines.append(
            f"| {name} | {op} | {bwt} | {_pct(statistics.mean(fwts)) if fwts else '—'} | {st['runs'][0]['grad_steps']} | {st['sec_per_step']:.2f} | {statistics.mean(r['seconds'] for r in st['runs']):.0f} |"
        )
    seeds = s["seeds"]
    if len(seeds) > 1:  # the spread behind the ± (population std over seeds)
        lines += ["", "Per seed (OP / BWT):", "", "| strategy | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for name, st in result["strategies"].items():
            lines.append(f"| {name} | " + " | ".join(f"{_pct(r['op'])} / {_pct(r['bwt'])}" for r in st["runs"]) + " |")
    if "zero_shot" in result:
        lines += ["", "Zero-shot (base model): " + ", ".join(f"{t} {_pct(v)}" for t, v in result["zero_shot"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
