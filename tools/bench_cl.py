#!/usr/bin/env python
"""Continual-learning benchmark: every strategy on a stream of tasks, same base, data subset,
step budget and seeds, through the library's continual loop (edgekif.continual.run_stream).

    python tools/bench_cl.py --quick                 # smoke profile (minutes)
    python tools/bench_cl.py --profile standard      # 100 test examples a task, label scoring too
    python tools/bench_cl.py --order 2 --seeds 0 1 2
    python tools/bench_cl.py --tasks DIR DIR ...     # any suite: DIR/train.jsonl + DIR/test.jsonl
    python tools/bench_cl.py --set train.deterministic=true --set kif.mask_quantile=0.9
    python tools/bench_cl.py --validation 60         # tune on the last 60 train records a task; test.jsonl unread
    python tools/bench_cl.py --profile standard --seeds 1 --out A   # seeds in parallel processes,
    python tools/bench_cl.py --profile standard --seeds 2 --out B   # ... then one report of them all:
    python tools/bench_cl.py --profile standard --zero-shot-only --seeds 1 2 --out Z   # (FWT's baseline)
    python tools/bench_cl.py --merge A B Z --out OUT --results-json docs/benchmarks/results.json

Each task is judged by its own spec (edgekif.tasks.read_task_spec on its train.jsonl: kind
detected from the answers, the kind's headline metric, the answer budget from the answers'
lengths): normalised exact match for label tasks (strict exact match and label scoring
beside it), ROUGE-L F1 for free text. OP, BWT, FWT (with zero-shot) and plasticity (a_ii:
the score just after learning each task) are on each task's headline metric. After each
run the model answers the shipped general prompts (edgekif.general_ability) and its drift
from the base's own answers is reported (ROUGE-L to them, log-likelihood drop).
Writes OUT/result.json, OUT/result.md and OUT/heatmap_<strategy>.png; --results-json merges the
summary into docs/benchmarks/results.json (one entry per profile and order).
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
from dataclasses import asdict
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from edgekif.strategies import STRATEGIES, strategy_names  # noqa: E402  (torch-free registry)
from tools.benchlib import cache_dir, profile_settings  # noqa: E402

ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
}
PROFILES = {
    # train examples offered per task, gradient steps on the task, test examples per task
    # (a step at batch 8 x ~200 tokens costs ~20 s on 2 cores; long prompts are fitted by
    # edgekif.inputs.fit_prompt: the input's middle is cut, the options and answer cue kept)
    "quick": dict(train_per_task=32, task_steps=4, batch_size=4, test_per_task=12, max_length=96, label_scoring=False, zero_shot=False, full_matrix=True, eval_dtype="fp32"),
    # enough steps for the tasks to be learned and forgotten, and >= 100 test examples a task
    # so that one example is 1 point (at 24 the strategies were not separable)
    # full_matrix=False: after each task only that task is scored, and after the last every
    # task: the cells OP, BWT and plasticity read (7 of 10 cells for 4 tasks). The middle cells
    # (how a task fades along the way) cost a third of the evaluation; --full-matrix adds them
    "standard": dict(train_per_task=128, task_steps=16, batch_size=8, test_per_task=100, max_length=128, label_scoring=True, zero_shot=True, full_matrix=False, eval_dtype="auto"),
    "default": dict(train_per_task=192, task_steps=24, batch_size=8, test_per_task=100, max_length=128, label_scoring=True, zero_shot=True, full_matrix=False, eval_dtype="auto"),
    # every training record the shared files hold (1000 a task: one epoch at batch 8) and 200
    # test records a task, for a GPU (model.device auto picks CUDA; add --tf32 there). On an H200
    # shared by eight runs: 3-4 min a run (docs/benchmarks.md, "GPU: a lent H200")
    "large": dict(train_per_task=1000, task_steps=125, batch_size=8, test_per_task=200, max_length=128, label_scoring=True, zero_shot=True, full_matrix=False, eval_dtype="auto"),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl-benchmark"


def _subset(records, n, seed):
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    return [records[i] for i in idx[:n]]


def _general_record(prompt):
    """A general prompt as a record (edgekif.records.Record), so it is encoded as tasks are."""
    from edgekif.records import Record

    return Record(messages=prompt.messages, output="", id=prompt.id)


def validation_split(records, n):
    """(train part, validation slice): the validation slice is the LAST n records of a task's
    train file, fixed (the same for every seed and configuration); training draws only from
    the records before it. For choosing settings without ever reading the test split."""
    if n <= 0 or n >= len(records):
        raise SystemExit(f"--validation {n}: needs 0 < N < {len(records)} (the task's train records)")
    return list(records[:-n]), list(records[-n:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="same as --profile quick")
    ap.add_argument("--profile", choices=list(PROFILES), default="default")
    ap.add_argument("--order", type=int, default=1, choices=[1, 2, 3])
    ap.add_argument("--strategies", nargs="+", default=strategy_names(), choices=strategy_names())
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--tasks", nargs="+", metavar="DIR", help="task folders (each with train.jsonl and test.jsonl), in learning order; overrides --order")
    ap.add_argument("--results-json", type=Path, help="also merge this run's summary into this file (docs/benchmarks/results.json)")
    ap.add_argument("--name", help="the results.json key of a --tasks suite (e.g. gen-order1); default PROFILE-orderN / PROFILE-custom")
    ap.add_argument("--fwt", action=argparse.BooleanOptionalAction, default=None,
                    help="score each task just before learning it, for FWT, where zero-shot is measured (T-1 evaluations a run; "
                         "default: with the full matrix)")
    ap.add_argument("--drift", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the general-ability drift of each run's final model (default: on)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--precision", default="fp32", help="base precision (fp32|nf4|bf16); fp32 is fastest on CPU")
    ap.add_argument("--tf32", action="store_true",
                    help="on CUDA, fp32 matrix products in TF32 (tensor cores; 10-bit mantissa inputs): the GPU runs of the large "
                         "profile. No effect on CPU")
    ap.add_argument("--lr", type=float, default=1e-3, help="train.lr and kif.outer_lr (free-text tasks train at this times train.generation_lr_scale)")
    ap.add_argument("--task-steps", type=int)
    ap.add_argument("--train-per-task", type=int)
    ap.add_argument("--test-per-task", type=int)
    ap.add_argument("--validation", type=int, metavar="N",
                    help="evaluate on a validation slice of train (the last N records of each train.jsonl; training draws "
                         "from the records before them); test.jsonl is not read. For tuning (issue 11)")
    ap.add_argument("--label-scoring", action=argparse.BooleanOptionalAction, default=None,
                    help="score by label likelihood beside exact match (default: the profile's setting)")
    ap.add_argument("--full-matrix", action=argparse.BooleanOptionalAction, default=None,
                    help="score every task seen so far after each task (the whole accuracy matrix), not only the cells OP, BWT "
                         "and plasticity read (default: the profile's setting)")
    ap.add_argument("--eval-dtype", choices=["auto", "fp32", "bf16"],
                    help="PyTorch evaluation's compute dtype (eval.compute_dtype): bf16 autocasts the matmuls, ~1.5x as fast on "
                         "a CPU with AVX512-BF16, with 0-5 answers in 100 changed; auto = bf16 where the machine computes bf16 "
                         "natively (edgekif.compute.fast_bf16), else fp32 (default: the profile's setting)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any config option, applied last (e.g. train.deterministic=true, kif.mask_quantile=0.9)")
    ap.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=None,
                    help="score the untrained base on each seed's test subset (FWT's baseline); default: the profile's setting")
    ap.add_argument("--zero-shot-only", action="store_true", help="only score the base (no strategy runs); for --merge")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RUN_DIR",
                    help="combine the result.json of runs made with the same settings (e.g. one process per seed) into one report")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_runs(args, sys.argv[1:] if argv is None else argv)
    if args.validation and args.results_json:
        ap.error("--validation is for tuning: its numbers do not go into the benchmark's results.json (--results-json)")

    import torch
    from tqdm import tqdm

    from edgekif.atomic import atomic_write_json
    from edgekif.config import Config, apply_overrides
    from edgekif.continual import StreamTask, run_stream
    from edgekif.taskfile import read_task
    from edgekif.compute import compute_dtype, fast_bf16
    from edgekif.accuracy_matrix import AccuracyMatrix, plot_heatmap
    from edgekif.evaluate import EVAL_BATCH_SIZE, generate_and_pick, generate_answers
    from edgekif.general_ability import GeneralAbilityConfig, base_answer_loglik, drift, load_prompts
    from edgekif.metrics import CLASSIFICATION, GENERATION, score as metric_score
    from edgekif.model import load_tokenizer, resolve_base, resolve_device
    from edgekif.tasks import read_task_spec
    from edgekif.replay import ReplayBuffer
    from edgekif.workflow import open_learner

    profile_name = "quick" if args.quick else args.profile
    prof = profile_settings(PROFILES, profile_name, args, ("task_steps", "train_per_task", "test_per_task", "label_scoring", "zero_shot", "full_matrix", "eval_dtype"))
    if args.fwt is None:
        args.fwt = prof["full_matrix"]
    if args.zero_shot_only:
        prof["zero_shot"] = True
    out = Path(args.out or f"bench_out/cl-{profile_name}-order{args.order}")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # any task suite in the same layout (DIR/train.jsonl, DIR/test.jsonl), else a standard order
    folders = [Path(d) for d in args.tasks] if args.tasks else [Path(args.data) / t for t in ORDERS[args.order]]
    order = [f.name for f in folders]
    if len(set(order)) != len(order):
        raise SystemExit(f"--tasks: folder names must differ (they name the tasks): {order}")
    train_tasks = {f.name: read_task(f / "train.jsonl") for f in folders}
    labels = {t: train_tasks[t].labels for t in order}
    if args.validation:
        # tuning: evaluate on a fixed slice of train, never on the test split (not even read)
        split = {t: validation_split(train_tasks[t].records, args.validation) for t in order}
        train = {t: split[t][0] for t in order}
        evalset = {t: split[t][1] for t in order}
        prof["test_per_task"] = args.validation
    else:
        train = {t: train_tasks[t].records for t in order}
        evalset = {f.name: read_task(f / "test.jsonl").records for f in folders}
    eval_split = f"validation slice of train ({args.validation} per task)" if args.validation else "test"
    for t in order:  # each record names its task: joint training's union mixes them (answer budgets)
        for r in train[t]:
            r.meta["task_id"] = t

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
        cfg.experience_replay.replay_batch_size = prof["batch_size"]  # replay's own section, as KIF's
        cfg.train.checkpoint_every = 0
        cfg.data.max_length = prof["max_length"]
        cfg.replay.seed = seed
        cfg.eval.label_scoring = prof["label_scoring"]
        cfg.eval.compute_dtype = prof["eval_dtype"]
        return apply_overrides(cfg, args.set)

    if prof["eval_dtype"] == "auto":  # resolved here, so the figures record what ran
        device = resolve_device(apply_overrides(Config(), args.set).model.device)
        prof["eval_dtype"] = "bf16" if fast_bf16(device.split(":")[0]) else "fp32"

    # the base is the configured one (`--set model.base=gemma3-270m`), its template the one training uses
    first = make_cfg("seq_lora", 0)
    model_cfg = first.model
    prof["eval_dtype"] = first.eval.compute_dtype  # --set eval.compute_dtype=... too
    base = resolve_base(model_cfg, cache_dir())
    # each task's spec from its own training answers, as the daemon decides it at buffer time
    tokenizer = load_tokenizer(base.path, chat_template=model_cfg.chat_template)
    specs = {f.name: read_task_spec(f / "train.jsonl", train_tasks[f.name].records, tokenizer) for f in folders}
    del tokenizer

    # test prompts are fitted like the training examples, leaving room for the task's answer
    # budget: the model is scored on what it was trained to see, and long prompts (yahoo: up
    # to ~1000 tokens) do not dominate the benchmark's wall time
    def prompt_tokens(task: str) -> int:
        return max(16, prof["max_length"] - specs[task].max_new_tokens)

    budgets = {t: specs[t].max_new_tokens for t in order}

    def evaluate(learner, task, seed, label_scoring=None):
        """(the task's headline score, its label-scoring accuracy or None)."""
        spec = specs[task]
        recs = _subset(evalset[task], prof["test_per_task"], 1000 + seed)
        want_labels = spec.kind == CLASSIFICATION and labels[task] and (prof["label_scoring"] if label_scoring is None else label_scoring)
        with compute_dtype(learner.model, prof["eval_dtype"]):
            answers, picked = generate_and_pick(learner.model, learner.tokenizer, recs, labels[task] if want_labels else None,
                                                max_new_tokens=spec.max_new_tokens, batch_size=EVAL_BATCH_SIZE, max_prompt_tokens=prompt_tokens(task))
        label_acc = None if picked is None else sum(p == r.label for p, r in zip(picked, recs)) / len(recs)
        return metric_score(spec.metric, answers, [r.label for r in recs]).mean, label_acc

    general = load_prompts() if args.drift else []
    general_cfg = GeneralAbilityConfig()

    def general_answers(learner) -> list[str]:
        with compute_dtype(learner.model, prof["eval_dtype"]):
            return generate_answers(learner.model, learner.tokenizer, [_general_record(p) for p in general],
                                    max_new_tokens=general_cfg.max_new_tokens, batch_size=EVAL_BATCH_SIZE)

    def general_loglik(learner, answers) -> list[float]:
        with compute_dtype(learner.model, prof["eval_dtype"]):
            return base_answer_loglik(learner.model, learner.tokenizer, general, answers)

    ran = make_cfg("recurrent_kif", args.seeds[0])  # what every run is configured with (strategy and seed aside)
    result = {
        "profile": profile_name, "name": args.name,
        "command": "python tools/bench_cl.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": {**prof, "base": base.name, "fwt": args.fwt, "zero_shot_only": args.zero_shot_only, "eval_split": eval_split, "validation": args.validation, "order": order, "seeds": args.seeds, "precision": args.precision, **({"tf32": True} if args.tf32 else {}), "lr": args.lr,
                     **{section: asdict(getattr(ran, section)) for section in strategy_sections()}, "lora": asdict(ran.lora), "replay_fraction": ran.replay.fraction, "replay_min_per_task": ran.replay.min_per_task,
                     "replay_general_share": ran.replay.general_share,
                     # free-text tasks train at lr times this (edgekif.trainer.lr_scale_for); recorded where it applies
                     **({"generation_lr_scale": ran.train.generation_lr_scale} if any(specs[t].kind == GENERATION for t in order) else {}),
                     "metric": "each task's headline metric (normalized exact match for labels, ROUGE-L F1 for free text)" + (" (label scoring beside it)" if prof["label_scoring"] and any(specs[t].kind == CLASSIFICATION for t in order) else ""),
                     "eval_prompt_tokens": {t: prompt_tokens(t) for t in order}, "task_specs": {t: specs[t].to_dict() for t in order},
                     "general_prompts": len(general), "general_max_new_tokens": general_cfg.max_new_tokens,
                     **({"overrides": ov} if (ov := recorded_overrides(args.set)) else {})},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "strategies": {},
    }
    t_all = time.perf_counter()

    seconds: dict[str, float] = {}  # where the time outside the runs' training goes (the report's breakdown)
    result["seconds"] = seconds
    if prof["zero_shot"]:
        # the untrained base on each seed's own test subset (the one that seed's runs are scored on)
        t0 = time.perf_counter()
        learner, _ = open_learner(make_cfg("seq_lora", 0), base=base)
        # exact match only: FWT is on exact match, and label scoring would double the cost
        result["zero_shot_by_seed"] = {str(seed): {t: evaluate(learner, t, seed, label_scoring=False)[0] for t in order}
                                       for seed in tqdm(args.seeds, desc="zero-shot")}
        result["zero_shot"] = _zero_shot_mean(result["zero_shot_by_seed"], order)
        del learner
        seconds["zero_shot"] = time.perf_counter() - t0
    base_general = None
    if general and not args.zero_shot_only:
        # the base's own answers to the general prompts and how likely it finds them: the
        # reference every run's final model is compared with
        t0 = time.perf_counter()
        learner, _ = open_learner(make_cfg("seq_lora", 0), base=base)
        answers = general_answers(learner)
        base_general = {"answers": answers, "loglik": general_loglik(learner, answers)}
        result["general_base_answers"] = answers
        del learner
        seconds["general_base"] = time.perf_counter() - t0

    for strategy in [] if args.zero_shot_only else args.strategies:
        runs = []
        for seed in args.seeds:
            cfg = make_cfg(strategy, seed)
            torch.manual_seed(seed)
            learner, _ = open_learner(cfg, base=base)
            learner.answer_budgets = budgets  # training reserves what evaluation reserves (prompt_tokens)
            stream = [StreamTask(t, _subset(train[t], prof["train_per_task"], seed), kind=specs[t].kind) for t in order]

            def progress(name, strategy=strategy, seed=seed):
                bar = tqdm(total=None, desc=f"{strategy} s{seed} {name}", unit="step", leave=False)

                def step(ev):
                    bar.total = ev["steps"]
                    bar.update(1)
                    if ev["step"] == ev["steps"]:
                        bar.close()

                return step

            def on_task(j, res, matrix, strategy=strategy, seed=seed):
                row = [(order[i], matrix.get(j, i)) for i in range(j + 1) if matrix.get(j, i) is not None]
                tqdm.write(f"{strategy} seed {seed} after {res.task_id}: " + ", ".join(f"{t} {a:.2f}" for t, a in row))

            label_matrix = AccuracyMatrix(order)  # the same cells, scored by label likelihood

            def score(lrn, name, seed=seed, label_matrix=label_matrix):
                # the row run_stream fills: after the joint run, the last; else one per task learned
                row = len(order) - 1 if lrn.strategy.joint else len(lrn.tasks_seen) - 1
                # label scoring only where it is reported (label OP: the final row); in the
                # earlier rows it would cost up to a third of each label cell for nothing
                last = row == len(order) - 1
                headline, label_acc = evaluate(lrn, name, seed, label_scoring=prof["label_scoring"] and last)
                cell = (row, order.index(name))
                if label_acc is not None:
                    label_matrix.set(*cell, label_acc)
                return headline

            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, ReplayBuffer(Path(tmp) / "replay.db", cfg.replay) as buf:
                stream_result = run_stream(learner, buf, stream, evaluate=score, cells="all" if prof["full_matrix"] else "metrics",
                                           score_before="zero_shot" in result and args.fwt, progress=progress, on_task=on_task)
            wall = time.perf_counter() - t0
            general_drift = None
            t0 = time.perf_counter()
            if base_general is not None:
                final = general_answers(learner)
                general_drift = drift(final, base_general["answers"], general, loglik_base=base_general["loglik"],
                                      loglik_candidate=general_loglik(learner, base_general["answers"])).to_dict()
            matrix, done = stream_result.matrix, stream_result.results
            train_seconds = sum(r.seconds for r in done)
            examples_total = sum(r.examples for r in done)
            runs.append({
                "seed": seed, "matrix": matrix.to_dict(), "op": matrix.op(), "bwt": matrix.bwt(), "plasticity": matrix.plasticity(),
                "label_matrix": label_matrix.to_dict() if prof["label_scoring"] else None,
                "label_op": _label_op(label_matrix.to_dict()) if prof["label_scoring"] else None,
                "fwt": _fwt(matrix, result, seed, order) if not learner.strategy.joint else None,
                "seconds": wall, "grad_steps": sum(r.steps for r in done), "examples": examples_total,
                "sec_per_step": statistics.mean(r.seconds / r.steps for r in done), "train_seconds": train_seconds, "examples_per_sec": examples_total / max(1e-9, train_seconds),
                "state_bytes": done[-1].state_bytes, "general_drift": general_drift, "general_seconds": time.perf_counter() - t0,
            })
            plot_heatmap(matrix, out / f"heatmap_{strategy}{'' if seed == args.seeds[0] else f'_s{seed}'}.png", title=f"{strategy} (order {args.order}, seed {seed})")
            del learner
        result["strategies"][strategy] = aggregate(runs)
        atomic_write_json(out / "result.json", result)  # partial results survive an interrupted run

    result["wall_seconds"] = time.perf_counter() - t_all
    return write_report(result, out, args.results_json)


def write_report(result: dict, out: Path, results_json: Path | None) -> int:
    """OUT/result.json and OUT/result.md, and the summary merged into results_json if given."""
    from edgekif.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "result.json", result)
    if results_json:
        merge_results(results_json, entry_key(result), summary(result))
    md = to_markdown(result)
    atomic_write_text(out / "result.md", md)
    print(md)
    return 0


def aggregate(runs: list[dict]) -> dict:
    """One strategy's figures over its seeds (population std, the spread behind the ±)."""
    ops = [r["op"] for r in runs if r["op"] is not None]
    bwts = [r["bwt"] for r in runs if r["bwt"] is not None]
    return {
        "runs": runs,
        "plasticity_mean": _mean(r["plasticity"] for r in runs), "fwt_mean": _mean(r.get("fwt") for r in runs),
        "label_op_mean": _mean(_label_op(r["label_matrix"]) if r.get("label_matrix") else r.get("label_op") for r in runs),
        "op_mean": statistics.mean(ops) if ops else None, "op_std": statistics.pstdev(ops) if len(ops) > 1 else 0.0,
        "bwt_mean": statistics.mean(bwts) if bwts else None, "bwt_std": statistics.pstdev(bwts) if len(bwts) > 1 else 0.0,
        "sec_per_step": statistics.mean(r["sec_per_step"] for r in runs),
        "drift_rouge_l_mean": _mean((r.get("general_drift") or {}).get("rouge_l") for r in runs),
        "drift_loglik_drop_mean": _mean((r.get("general_drift") or {}).get("loglik_drop") for r in runs),
    }


def _zero_shot_mean(by_seed: dict, order: list[str]) -> dict:
    return {t: statistics.mean(z[t] for z in by_seed.values()) for t in order}


def _fwt(matrix, result: dict, seed: int, order: list[str]):
    """FWT against the base's zero-shot on the same seed's test subset, where it was measured."""
    z = result.get("zero_shot_by_seed", {}).get(str(seed))
    return matrix.fwt([z[t] for t in order]) if z else None


def _free_text_rate(settings: dict) -> str:
    """The report's note on the rate free-text tasks trained at (recorded where it applies)."""
    scale = settings.get("generation_lr_scale")
    return f" (free-text tasks × {scale:g}, also the outer lr)" if scale not in (None, 1, 1.0) else ""


# what may differ between runs that --merge combines into one report
# (full_matrix: the metrics read the same cells either way)
# "metric" is a sentence derived from task_specs and label_scoring, which are compared; its
# wording changed (2026-12-05), and runs from before and after must still merge
_MERGE_FREE = {"seeds", "command", "zero_shot", "zero_shot_only", "full_matrix", "metric"}
# what a --zero-shot-only part must share with the runs: the examples and how they are scored
_ZERO_SHOT_KEYS = ("order", "test_per_task", "eval_split", "validation", "eval_prompt_tokens", "precision")


def strategy_sections() -> dict[str, set[str]]:
    """Each strategy config section ([kif], [experience_replay]) and the strategies that read it,
    from the registry: the settings record each section whole."""
    sections: dict[str, set[str]] = {}
    for name, spec in STRATEGIES.items():
        if spec.section:
            sections.setdefault(spec.section, set()).add(name)
    return sections


def recorded_overrides(sets: list[str]) -> list[str]:
    """The --set entries the settings do not already hold (the strategy sections, [lora] and the
    base are recorded whole), e.g. train.loss_average=example: runs that differ in one must not
    merge. Absent when empty, so runs from before this was recorded still merge."""
    held = tuple(f"{section}." for section in strategy_sections()) + ("lora.", "model.base=")
    entries = ("=".join(part.strip() for part in o.split("=", 1)) for o in sets)  # as apply_overrides reads them
    return sorted(o for o in entries if not o.startswith(held))


def merge_runs(args, argv: list[str]) -> int:
    """Combine runs of the same settings (one process per seed, a --zero-shot-only run) into one
    result: strategies' runs concatenated in seed order, FWT filled from the zero-shot of the
    run's own seed, aggregates recomputed. Refuses runs whose settings differ in anything else."""
    from edgekif.accuracy_matrix import AccuracyMatrix

    parts = []
    for d in args.merge:
        path = d / "result.json"
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {path}: {e}")
        if "wall_seconds" not in part:
            # a run stopped between strategies (result.json is rewritten after each one): its
            # finished strategies' runs are whole and count; its wall time is theirs
            finished = [r for st in part.get("strategies", {}).values() for r in st.get("runs", [])]
            if not finished or part.get("settings", {}).get("zero_shot_only"):
                raise SystemExit(f"--merge: {path} is from a run that did not finish any strategy")
            part = {**part, "wall_seconds": sum(r.get("seconds", 0.0) for r in finished),
                    "command": part["command"] + f" (stopped; its finished strategies: {', '.join(part['strategies'])})"}
        # runs from before the base was recorded all ran on the default base
        part["settings"].setdefault("base", _EARLIER_BASE)
        # and evaluated in fp32: eval_dtype was recorded from 2026-12-05 on (bf16 became possible)
        part["settings"].setdefault("eval_dtype", "fp32")
        # and the general rehearsal share from 2026-12-06 (8a900d8) on: earlier runs had it in
        # their --set overrides or not at all
        part["settings"]["replay_general_share"] = _general_share(part["settings"])
        parts.append(part)
    runs_first = sorted(range(len(parts)), key=lambda i: bool(parts[i]["settings"].get("zero_shot_only")))
    parts, dirs = [parts[i] for i in runs_first], [args.merge[i] for i in runs_first]
    # A strategy's own section ([kif], [experience_replay]) matters only in the parts that ran
    # that strategy: Recurrent-KIF run alone merges with replay run alone at another schedule.
    # Each section is compared among those parts, and the report states the first one's.
    sections = strategy_sections()
    ref = {k: v for k, v in parts[0]["settings"].items() if k not in _MERGE_FREE and k not in sections}
    ref_dir = {k: dirs[0] for k in ref}
    for section, users in sections.items():
        first = next((i for i, p in enumerate(parts) if users & set(p["strategies"])), 0)
        if section in parts[first]["settings"]:
            ref[section], ref_dir[section] = parts[first]["settings"][section], dirs[first]
    for d, part in zip(dirs, parts):
        mine = {k: v for k, v in part["settings"].items() if k not in _MERGE_FREE}
        if part["settings"].get("zero_shot_only"):
            keys = set(_ZERO_SHOT_KEYS)
        else:
            ran = set(part["strategies"])
            keys = {k for k in ref.keys() | mine.keys() if k not in sections or sections[k] & ran}
        diff = sorted(k for k in keys if ref.get(k) != mine.get(k))
        if diff:
            than = sorted({str(ref_dir.get(k, dirs[0])) for k in diff})
            raise SystemExit(f"--merge: {d} was run with other settings than {', '.join(than)}: {', '.join(diff)}")
    order = ref["order"]
    zero = {}
    for part in parts:
        zero.update(part.get("zero_shot_by_seed", {}))
    runs: dict[str, list[dict]] = {}
    for part in parts:
        for name, st in part["strategies"].items():
            runs.setdefault(name, []).extend(st["runs"])
    result = {"profile": parts[0]["profile"], "name": args.name or parts[0].get("name"), "command": "python tools/bench_cl.py " + shlex.join(argv),
              "merged": [{"dir": str(d), "command": p["command"], "wall_seconds": p["wall_seconds"]} for d, p in zip(dirs, parts)],
              "settings": {**parts[0]["settings"], **{k: ref[k] for k in sections if k in ref},
                           "seeds": sorted({r["seed"] for rs in runs.values() for r in rs})},
              "machine": parts[0].get("machine", {}), "strategies": {}}
    if zero:
        result["zero_shot_by_seed"] = zero
        result["zero_shot"] = _zero_shot_mean(zero, order)
    for name in [n for n in STRATEGIES if n in runs] + sorted(set(runs) - set(STRATEGIES)):
        rs = sorted(runs[name], key=lambda r: r["seed"])
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"--merge: {name} has seed {max(seeds, key=seeds.count)} more than once")
        joint = _joint(name)
        for r in rs:
            if not joint and r.get("fwt") is None:
                r["fwt"] = _fwt(AccuracyMatrix.from_dict(r["matrix"]), result, r["seed"], order)
        result["strategies"][name] = aggregate(rs)
    result["wall_seconds"] = sum(p["wall_seconds"] for p in parts)  # a sum of wall times, not the elapsed time
    result["seconds"] = {k: sum(p.get("seconds", {}).get(k, 0.0) for p in parts) for k in ("zero_shot", "general_base")}
    out = Path(args.out or "bench_out/cl-merged")
    out.mkdir(parents=True, exist_ok=True)
    return write_report(result, out, args.results_json)


def _joint(name: str) -> bool:
    """Whether the named strategy trains on all tasks at once (no BWT, FWT or plasticity)."""
    return name in STRATEGIES and STRATEGIES[name].load().joint


def _order_name(order: list[str]) -> str:
    """'order1'..'order3' for a standard order, else 'custom' (a --tasks suite)."""
    return next((f"order{k}" for k, o in ORDERS.items() if o == order), "custom")


def entry_key(result: dict) -> str:
    """The results.json key: --name where given, else one entry per profile and order."""
    return result.get("name") or f"{result['profile']}-{_order_name(result['settings']['order'])}"


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def _mean(values):
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def _eval_set(s: dict) -> str:
    """What the accuracies were measured on, in words (older result.json: the test split)."""
    if s.get("validation"):
        return f"the validation slice of train ({s['validation']} per task: the last {s['validation']} records of each train.jsonl; the test split is not read)"
    return f"{s['test_per_task']} test examples per task"


def _p(x):  # percent, rounded, for results.json
    return None if x is None else round(100 * x, 2)


# what a result.json without settings["base"] ran on: the default base, before it was configurable here
_EARLIER_BASE = "smollm2-135m-instruct"


def summary(result: dict) -> dict:
    """One entry of docs/benchmarks/results.json (percent values)."""
    s = result["settings"]
    strategies = {}
    for name, st in result["strategies"].items():
        entry = {"op": _p(st["op_mean"]), "op_std": _p(st["op_std"])}
        if not _joint(name):
            entry.update(bwt=_p(st["bwt_mean"]), plasticity=_p(st.get("plasticity_mean")), fwt=_p(st.get("fwt_mean")))
        if st.get("label_op_mean") is not None:
            entry["label_op"] = _p(st["label_op_mean"])
        if st.get("drift_rouge_l_mean") is not None:
            entry["general_drift"] = {"rouge_l": round(st["drift_rouge_l_mean"], 4), "loglik_drop": _round(st.get("drift_loglik_drop_mean"))}
        strategies[name] = entry
    specs = s.get("task_specs")
    metric = {t: v["metric"] for t, v in specs.items()} if specs else "exact_match"
    out = {"profile": result["profile"], "base": s.get("base", _EARLIER_BASE), "order": s["order"], "seeds": s["seeds"], "train_per_task": s["train_per_task"],
           "test_per_task": s["test_per_task"], "eval_split": s.get("eval_split", "test"), "metric": metric, "command": result["command"], "strategies": strategies}
    if specs:
        out["max_new_tokens"] = {t: v["max_new_tokens"] for t, v in specs.items()}
    if (share := _train_and_wall_seconds(result)) is not None:
        out["train_share_of_wall"] = round(share[0] / share[1], 3)
    if result.get("zero_shot"):
        out["zero_shot"] = {t: _p(v) for t, v in result["zero_shot"].items()}
    return out


def _train_and_wall_seconds(result: dict) -> tuple[float, float] | None:
    """(seconds of training steps, wall seconds) of the whole run, or None without a wall time."""
    wall = result.get("wall_seconds")
    train = sum(r.get("train_seconds", 0.0) for st in result["strategies"].values() for r in st["runs"])
    return (train, wall) if wall and train else None


def _time_breakdown(result: dict) -> dict[str, float] | None:
    """Wall seconds by part (runs from this version on record them; None for older ones):
    training steps, the runs' cells (their wall time less training), zero-shot, the general
    prompts (the base's answers once, each run's final model), and the rest (loading models,
    the replay buffer, reports)."""
    runs = [r for st in result["strategies"].values() for r in st["runs"]]
    wall = result.get("wall_seconds")
    if not wall or not runs or any("general_seconds" not in r for r in runs):
        return None
    secs = result.get("seconds", {})
    parts = {"training": sum(r["train_seconds"] for r in runs), "cells": sum(r["seconds"] - r["train_seconds"] for r in runs),
             "zero-shot": secs.get("zero_shot", 0.0), "general prompts": secs.get("general_base", 0.0) + sum(r["general_seconds"] for r in runs)}
    parts["rest"] = wall - sum(parts.values())
    return parts


def _label_op(label_matrix: dict) -> float | None:
    """OP by label scoring: the final row's mean over the tasks that have labels (a stream that
    mixes in free-text tasks has no label score for those; runs before this took the whole row
    and so had none for a mixed stream)."""
    final = [v for v in label_matrix["a"][-1] if v is not None]
    return sum(final) / len(final) if final else None


def _round(x, digits=4):
    return None if x is None else round(x, digits)


def merge_results(path: Path, key: str, entry: dict) -> None:
    """results.json holds one entry per profile and order that ran: {"cl": {key: entry}}."""
    from edgekif.atomic import atomic_write_json

    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("cl", {})[key] = entry
    atomic_write_json(path, data)


def _num(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def _spec_lines(s: dict) -> list[str]:
    """One line per task: its kind, metric and answer budget (older result.json: none)."""
    specs = s.get("task_specs")
    if not specs:
        return []
    # in the stream's order: result.json is written with sorted keys
    names = [t for t in s.get("order", []) if t in specs] + sorted(set(specs) - set(s.get("order", [])))
    return ["Tasks: " + "; ".join(f"{t}: {specs[t]['kind']}, {specs[t]['metric']}, {specs[t]['max_new_tokens']} new tokens, prompt fitted into "
                                  f"{(s.get('eval_prompt_tokens') or {}).get(t, '—') if isinstance(s.get('eval_prompt_tokens'), dict) else s.get('eval_prompt_tokens')}"
                                  for t in names) + ".", ""]


def _general_share(settings: dict) -> float:
    """The replay.general_share a run trained with (edgekif.rehearsal)."""
    share = settings.get("replay_general_share")
    if share is None:  # reports written before the setting was recorded: their --set overrides
        share = next((float(o.split("=", 1)[1]) for o in settings.get("overrides") or () if o.startswith("replay.general_share=")), 0.0)
    return float(share)


def _general_rehearsal(settings: dict) -> str:
    """Where replay batches carried the base's general answers (edgekif.rehearsal)."""
    share = _general_share(settings)
    return f", {share:g} of each replay batch the base's own answers to general prompts (general rehearsal)" if share else ""


def _replay_schedule(result: dict) -> str:
    """The replay strategy's own Q/M where it ran: it need not be Recurrent-KIF's."""
    e = result["settings"].get("experience_replay")
    return f", the replay strategy at Q={e['inner_steps']}, M={e['outer_steps']}" if e and "replay" in result["strategies"] else ""


def to_markdown(result: dict) -> str:
    s = result["settings"]
    k = s["kif"]
    # one report of several processes (--merge): say which, and their times
    merged = [("Merged from " + "; ".join(f"`{m['command']}` ({m['wall_seconds'] / 60:.1f} min)" for m in result["merged"])
               + ". The wall time above is the sum of theirs: processes that ran side by side shared the cores, so it is neither the elapsed time nor the cost of one run."),
              ""] if result.get("merged") else []
    lines = [
        f"### Continual learning, {_order_name(s['order']).replace('order', 'order ')} ({' → '.join(s['order'])}), profile `{result['profile']}`",
        "",
        f"Command: `{result['command']}`  ",
        f"{s.get('base', _EARLIER_BASE)} ({s['precision']}), LoRA r={s['lora']['r']}/α={s['lora']['alpha']} on {','.join(s['lora']['target_modules'])}, lr {s['lr']}{_free_text_rate(s)}, batch {s['batch_size']}, {s['task_steps']} task steps per task "
        f"on {s['train_per_task']} train examples (max_length {s['max_length']}), evaluated on {_eval_set(s)} "
        f"(prompts fitted as training fits them: the input's middle is cut), metric: {s['metric']}; "
        f"replay {100 * s['replay_fraction']:g}% of each task (min {s['replay_min_per_task']}){_general_rehearsal(s)}{_replay_schedule(result)}; Recurrent-KIF Q={k['inner_steps']}, M={k['outer_steps']}, "
        f"outer lr {k['outer_lr']}, β={k['beta1']}/{k['beta2']}, top {100 * (1 - k['mask_quantile']):.0f}%, fusion weights both {k['w_both_in']}/{k['w_both_out']}, "
        f"neither {k['w_neither_in']}/{k['w_neither_out']}, reset importance per task: {k['reset_importance']}. Wall time {result.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        *merged,
        *_spec_lines(s),
        "Each task's headline metric (percent); plasticity = mean score on each task just after learning it (a_ii); label OP = OP by label scoring (label tasks); "
        "FWT = score on each later task just before learning it minus the base's zero-shot on the same examples; "
        "general drift = ROUGE-L F1 of the final model's answers to the general prompts against the base's own answers (1 = unchanged), "
        "and how much less likely (nats per token) the final model finds the base's answers.",
        "",
        "| strategy | OP | BWT | plasticity | FWT | label OP | general ROUGE-L to base | log-lik drop | grad steps | s / step | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in result["strategies"].items():
        fwts = [r["fwt"] for r in st["runs"] if r.get("fwt") is not None]
        op = _pct(st["op_mean"]) + (f" ± {100 * st['op_std']:.1f}" if len(st["runs"]) > 1 else "")
        bwt = _pct(st["bwt_mean"]) + (f" ± {100 * st['bwt_std']:.1f}" if len(st["runs"]) > 1 and st["bwt_mean"] is not None else "")
        lines.append(
            f"| {name} | {op} | {bwt} | {_pct(st.get('plasticity_mean'))} | {_pct(statistics.mean(fwts)) if fwts else '—'} | {_pct(st.get('label_op_mean'))} "
            f"| {_num(st.get('drift_rouge_l_mean'))} | {_num(st.get('drift_loglik_drop_mean'))} "
            f"| {st['runs'][0]['grad_steps']} | {st['sec_per_step']:.2f} | {statistics.mean(r['seconds'] for r in st['runs']):.0f} |"
        )
    share = _train_and_wall_seconds(result)
    if share is not None:
        lines += ["", f"Training steps: {share[0] / 60:.1f} of the {share[1] / 60:.1f} min; evaluation and the rest (the cells, zero-shot, "
                      f"the general prompts, loading models): **{100 * (1 - share[0] / share[1]):.0f}%** of the wall time"
                      + ("" if s.get("full_matrix", True) else " (the cells the metrics read: each task after learning it, every task after the last)") + "."]
        if (parts := _time_breakdown(result)) is not None:
            lines += ["", "Where the wall time went (s): " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
                      + f"; evaluation ({s.get('eval_dtype', 'fp32')}) = cells + zero-shot + general prompts."]
    seeds = s["seeds"]
    if len(seeds) > 1:  # the spread behind the ± (population std over seeds)
        lines += ["", "Per seed (OP / BWT):", "", "| strategy | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for name, st in result["strategies"].items():
            by_seed = {r.get("seed"): f"{_pct(r['op'])} / {_pct(r['bwt'])}" for r in st["runs"]}
            lines.append(f"| {name} | " + " | ".join(by_seed.get(x, "not run") for x in seeds) + " |")  # a strategy some seeds lack
    if "zero_shot" in result:
        lines += ["", "Zero-shot (base model): " + ", ".join(f"{t} {_pct(v)}" for t, v in result["zero_shot"].items())]
    drifts = {name: [r.get("general_drift") for r in st["runs"]] for name, st in result["strategies"].items()}
    if any(d for ds in drifts.values() for d in ds):
        lines += ["", "General-ability drift per seed (ROUGE-L to the base's answers / log-likelihood drop, nats per token):", ""]
        for name, ds in drifts.items():
            lines.append(f"- {name}: " + ", ".join(f"{_num(d.get('rouge_l'))} / {_num(d.get('loglik_drop'))}" if d else "—" for d in ds))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
