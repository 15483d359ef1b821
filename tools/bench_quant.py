#!/usr/bin/env python
"""Which onnxruntime-genai export keeps the accuracy of the fp32 model, and how fast is it?

Takes the model a daemon published (DATA_DIR/models/current: its job's LoRA adapter fused into
the base) and the holdouts of the tasks it learned, then for each builder variant (int4 block
size, accuracy level, RTN / k-quant, int8 for the LM head and sensitive layers, int8, fp32):

  build      seconds and size on disk
  accuracy   each task's own metric on its holdout through the export (one record at a time,
             the folder's chat template, greedy, the task's answer budget: its spec in
             DATA_DIR/holdout), the share of answers identical to the fp32 PyTorch model's, for
             free text the share beginning with fp32's first words and the paired drop, and
             whether the daemon's check (export.parity_*) passes it; result.json keeps the
             per-record scores (paired comparisons between two runs)
  speed      batch 1, greedy, --new-tokens tokens forced (EOS masked), median decode tokens/s
             and first-token latency over --prompts prompts, variants interleaved prompt by prompt

    python tools/bench_quant.py --data-dir .edgekif-demo --out docs/benchmarks/quant
    python tools/bench_quant.py --data-dir D --job 1 --tasks headlines   # a held job's adapter
    python tools/bench_quant.py --data-dir D --job 1 --tasks headlines --no-adapter   # the base itself

"int8" here is the builder's default (symmetric, blocks of 32); the daemon's int8 on the CPU is
"int8-asym-bs16" (edgekif.export.build.INT8_CPU).

Writes OUT/result.json and OUT/result.md (the table docs/serving.md quotes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "int4": ("int4", {}),
    "int4-bs128": ("int4", {"block_size": "128"}),
    "int4-acc1": ("int4", {"accuracy_level": "1"}),
    "int4-asym": ("int4", {"is_symmetric": "false"}),
    "int4-rtn-last8": ("int4", {"algo_config": "rtn_last"}),
    "int4-kquant": ("int4", {"algo_config": "k_quant"}),
    "int4-kquant-mixed": ("int4", {"algo_config": "k_quant_mixed"}),
    "int8": ("int8", {}),
    "int8-acc1": ("int8", {"accuracy_level": "1"}),
    "int8-bs16": ("int8", {"block_size": "16"}),
    "int8-asym": ("int8", {"is_symmetric": "false"}),
    "int8-asym-bs16": ("int8", {"is_symmetric": "false", "block_size": "16"}),
    "fp32": ("fp32", {}),
}


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path, help="a daemon's data dir with a published version")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts timed per variant")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = runtime default)")
    ap.add_argument("--max-examples", type=int, default=0, help="holdout records per task (0 = all)")
    ap.add_argument("--job", type=int, help="take this job's adapter instead of the current version's (a held job has no version)")
    ap.add_argument("--tasks", nargs="+", help="the holdouts to answer (default: the current version's tasks; needed with --job)")
    ap.add_argument("--no-adapter", action="store_true", help="quantise the base itself (how far each variant moves the untrained base's answers)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/quant"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/work, removed at the end)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from bench_serving import genai_speed
    from edgekif.config import load_config
    from edgekif.errors import ModelError
    from edgekif.export.build import ExportVariant
    from edgekif.export.check import GenerationRule, check_candidate, reference_answers
    from edgekif.export.fuse import fuse_adapter
    from edgekif.export.manifest import read_manifest
    from edgekif.holdouts import read_holdouts, read_specs
    from edgekif.layout import DataLayout
    from edgekif.model import resolve_base
    from edgekif.publish import resolve_current
    from edgekif.trainer import learner_adapter
    from edgekif.workflow import base_source, cache_root

    data = args.data_dir.resolve()
    cfg_file = data / "edgekif.toml"
    cfg = load_config(cfg_file if cfg_file.is_file() else None, [f"data_dir={data}"])
    if args.job is None:
        current = resolve_current(data)
        manifest = read_manifest(current)
        version, job, tasks = current.name, manifest.job_id, manifest.task_names
    else:
        if not args.tasks:
            ap.error("--job needs --tasks")
        version, job, tasks = f"job {args.job}", args.job, None
    tasks = args.tasks or tasks
    adapter = learner_adapter(DataLayout(data).job(job).learner)
    holdout, labels = read_holdouts(data, tasks, max_examples=args.max_examples)
    specs = read_specs(data, tasks)  # each task's kind, metric and answer budget, as the daemon checks them
    rule = GenerationRule(cfg.export.parity_max_score_drop, cfg.export.parity_min_prefix_agreement, cfg.export.parity_prefix_words)
    work = (args.work or args.out / "work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = resolve_base(cfg.model, cache_root(cfg))
    # --no-adapter: the base with the training chat template, as the daemon exports it for zero-shot
    fused = base_source(work, base, cfg.model.chat_template) if args.no_adapter else fuse_adapter(base.path, adapter, work / "fused")
    if args.no_adapter:
        version = "none (the base itself)"
    t0 = time.perf_counter()
    reference = reference_answers(fused, holdout, max_new_tokens=cfg.eval.max_new_tokens, labels=labels, specs=specs)
    ref_s = time.perf_counter() - t0
    speed_prompts = [r.chat() for recs in holdout.values() for r in recs][: args.prompts]

    rows: dict[str, dict] = {}
    bar = tqdm(total=len(args.variants) * 2, desc="variants", unit="step")
    for name in args.variants:
        precision, options = VARIANTS[name]
        variant = ExportVariant(precision, tuple(sorted(options.items())))
        folder = work / name
        bar.set_postfix_str(f"build + check {name}")
        try:
            result = check_candidate(fused, folder, target="genai", variant=variant, execution_provider="cpu", holdout=holdout, reference=reference,
                                     max_new_tokens=cfg.eval.max_new_tokens, min_agreement=cfg.export.parity_min_agreement,
                                     max_accuracy_drop=cfg.export.parity_max_accuracy_drop, specs=specs, generation=rule)
        except ModelError as e:  # built, but the runtime refuses the graph
            rows[name] = {"precision": precision, "options": options, "error": f"does not load: {str(e)[-300:]}"}
            bar.update(2)
            continue
        except Exception as e:  # a builder option this base does not support
            rows[name] = {"precision": precision, "options": options, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
            bar.update(2)
            continue
        check = result.check
        rows[name] = {
            "precision": precision, "options": options, "build_s": round(result.build_seconds, 1), "size_mb": round(folder_mb(folder), 1),
            "holdout_s": round(result.seconds, 1), "exact_match": check.accuracy, "agreement": check.agreement,
            "accuracy_drop_points": check.accuracy_drop, "passes": check.passed, "reasons": check.reasons,
            "per_task": {k: v.exact_match for k, v in result.answers.items()},
            "per_task_check": check.per_task,
            "scores": {k: v.scores for k, v in result.answers.items() if v.scores is not None},  # per record: paired comparisons
        }
        bar.update(2)
    bar.close()

    # Speed: every built variant loaded at once, interleaved prompt by prompt (load changes hit all alike).
    runs = {}
    for name, row in rows.items():
        if "error" not in row:
            run, handle = genai_speed(work / name, args.threads)
            run(speed_prompts[0], 4)  # warm-up
            runs[name] = (run, handle)
            row["timed"] = []
    for i, p in enumerate(tqdm(speed_prompts, desc="speed", unit="prompt")):
        names = list(runs)
        for name in names[i % len(names):] + names[: i % len(names)]:
            rows[name]["timed"].append(runs[name][0](p, args.new_tokens).to_dict())
    for name in runs:
        timed = rows[name].pop("timed")
        rows[name]["decode_tokens_per_s"] = median([t["decode_tokens_per_s"] for t in timed])
        rows[name]["first_token_ms"] = median([t["first_token_ms"] for t in timed])
        rows[name]["prompt_tokens"] = median([t["prompt_tokens"] for t in timed])
    del runs

    from benchlib import machine_info

    result = {
        "command": "python tools/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "model": {"base": base.name, "version": version, "job": job, "tasks": tasks, "holdout": {k: len(v) for k, v in holdout.items()}},
        "reference": {"runtime": "pytorch fp32 (fused)", "exact_match": {k: v.exact_match for k, v in reference.items()},
                      "score": {k: v.score for k, v in reference.items()}, "metric": {k: v.metric for k, v in reference.items()},
                      "label_accuracy": {k: v.label_accuracy for k, v in reference.items()}, "seconds": round(ref_s, 1)},
        "check": {"min_agreement": cfg.export.parity_min_agreement, "max_accuracy_drop": cfg.export.parity_max_accuracy_drop},
        "new_tokens": args.new_tokens, "prompts": len(speed_prompts), "threads": args.threads,
        "variants": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "result.md").write_text(to_markdown(result))
    print(to_markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def to_markdown(r: dict) -> str:
    def f(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    ref = r["reference"]
    metric = ref.get("metric") or {}
    ref_score = {k: (ref.get("score") or {}).get(k) if metric.get(k) else ref["exact_match"][k] for k in ref["exact_match"]}
    n = sum(r["model"]["holdout"].values())
    tasks = list(ref["exact_match"])
    lines = [
        f"Model: {r['model']['base']} + the LoRA of {r['model']['version']} (tasks {', '.join(tasks)}; {n} holdout records). "
        "fp32 PyTorch: " + ", ".join(f"{k} {f(100 * v) if v is not None else '—'} {metric.get(k) or 'exact_match'}" for k, v in ref_score.items()) + ".",
        f"Check: label tasks' answers identical to fp32 on >= {100 * r['check']['min_agreement']:.0f}% of records and exact match at most "
        f"{r['check']['max_accuracy_drop']:g} point below; free-text tasks by the daemon's GenerationRule (mean paired drop, first words). "
        f"Speed: batch 1, greedy, {r['new_tokens']} new tokens, median of {r['prompts']} prompts, threads {r['threads'] or 'default'}.",
        "",
        "| variant | builder options | " + " | ".join(f"{t}: score / identical / first words / paired drop" for t in tasks)
        + " | passes | decode tok/s | first token ms | size MB | build s |",
        "|---|---|" + "---:|" * len(tasks) + ":---:|---:|---:|---:|---:|",
    ]
    for name, row in r["variants"].items():
        opts = ", ".join(f"{k}={v}" for k, v in row.get("options", {}).items()) or "defaults"
        if "error" in row:
            lines.append(f"| {name} | {opts} | build failed: {row['error'][:120]} |" + " |" * (len(tasks) + 4))
            continue
        cells = []
        for t in tasks:
            c = (row.get("per_task_check") or {}).get(t, {})
            score = c.get("score") if c.get("metric") else c.get("exact_match", row["per_task"].get(t))
            prefix = f"{100 * c['prefix_agreement']:.0f}%" if "prefix_agreement" in c else "—"
            drop = f"{c['score_drop_points']:+.1f}" if "score_drop_points" in c else "—"
            cells.append(f"{f(100 * score if score is not None else None)} / {f(100 * c.get('agreement', row['agreement']), '.0f')}% / {prefix} / {drop}")
        lines.append(
            f"| {name} | {opts} | " + " | ".join(cells) + f" | {'yes' if row['passes'] else 'no'} | {f(row.get('decode_tokens_per_s'))} | "
            f"{f(row.get('first_token_ms'), '.0f')} | {f(row['size_mb'], '.0f')} | {f(row['build_s'])} |"
        )
    lines += ["", f"Command: `{r['command']}` ({r['finished']}; {r['machine'].get('cpu', '')})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
