#!/usr/bin/env python
"""What a CPU box cannot measure, measured on a host with an NVIDIA GPU in under 8 minutes.

    python tools/gpu_check.py --out docs/benchmarks/gpu        # or: make gpu-check

1. The install (any host): nvidia-smi, the Makefile's plan for this host (`make -n -B setup`:
   HAS_GPU, TORCH_SPEC, the extras), what is installed (CUDA torch? exactly one ONNX runtime
   flavour?), onnxruntime's providers.
2. Training on CUDA (GPU only): SmolLM2 + LoRA + Recurrent-KIF, a short job of two tasks through
   edgekif.continual.learn_task, once with nf4 base weights and once bf16: s/step, load time,
   peak `torch.cuda.max_memory_allocated`.
3. Export on CUDA (GPU only): the last adapter fused and exported for onnxruntime-genai with
   execution_provider="cuda" (export_model, with its answer check), then greedy tokens/s.

Writes OUT/gpu_check.json and OUT/gpu_check.md (a section for docs/benchmarks.md).
Exit codes: 0 = all checks passed, or no NVIDIA GPU on this host (it says so: "no NVIDIA GPU
found: GPU figures not measured"); 1 = a check failed (e.g. nvidia-smi sees a GPU but torch has
no CUDA, or both ONNX runtime flavours are installed) or a GPU measurement raised; 2 = usage.
Benchmark data: ../shared/data/cl-benchmark when present (--data), else synthetic tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tools import benchlib  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cl-benchmark"
NO_GPU = "no NVIDIA GPU found: GPU figures not measured"
CPU_RUNTIMES = ("onnxruntime", "onnxruntime-genai")
GPU_RUNTIMES = ("onnxruntime-gpu", "onnxruntime-genai-cuda")


# --------------------------------------------------------------------------- 1. the install


def nvidia_gpus() -> list[str]:
    """`nvidia-smi -L` lines ("GPU 0: NVIDIA H200 (UUID: ...)"); [] without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU")] if out.returncode == 0 else []


def make_plan() -> dict[str, Any]:
    """What `make setup` would install on this host: `make -n -B` prints, runs nothing."""
    if shutil.which("make") is None:
        return {"error": "make not installed"}
    proc = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    torch_line = next((line for line in proc.stdout.splitlines() if "pip install" in line and "torch" in line), "")
    extras = re.findall(r'pip install -q -e "\.\[([^\]]*)\]"', proc.stdout)
    spec = re.search(r'install -q (?:--retries 1 )?"([^"]+)"', torch_line)
    return {
        "torch_spec": spec.group(1) if spec else None,
        "torch_index": "cpu" if "download.pytorch.org/whl/cpu" in torch_line else "pypi",
        "extras": extras[0].split(",") if extras else [],
    }


def installed() -> dict[str, str]:
    return benchlib.package_versions(("torch", *CPU_RUNTIMES, *GPU_RUNTIMES, "bitsandbytes"))


def torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"error": str(e)}
    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def ort_providers() -> list[str] | str:
    try:
        import onnxruntime as ort

        return list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001 - a broken mix of flavours fails in many ways
        return f"error: {e}"


def environment_checks(gpus: list[str], plan: dict, dists: dict, tinfo: dict, providers) -> list[dict[str, Any]]:
    """[{name, ok, detail}]: does the install match this host?"""
    gpu = bool(gpus)
    checks = []

    def check(name: str, ok: bool, detail: Any) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    if "error" not in plan:
        want = "gpu" if gpu else "cpu"
        check(f"make setup installs the {want} extra only", want in plan["extras"] and ({"cpu", "gpu"} - {want}).isdisjoint(plan["extras"]), plan["extras"])
        check("make setup picks " + ("the default (CUDA) torch" if gpu else "the CPU torch"), (plan["torch_index"] == "pypi") == gpu, plan)
    else:
        check("make setup plan", False, plan["error"])
    clash = [(c, g) for c, g in zip(CPU_RUNTIMES, GPU_RUNTIMES) if c in dists and g in dists]
    check("one ONNX runtime flavour installed", not clash, {d: dists.get(d) for d in (*CPU_RUNTIMES, *GPU_RUNTIMES)})
    if not gpu:
        check("CPU runtimes installed", all(d in dists for d in CPU_RUNTIMES), [d for d in CPU_RUNTIMES if d not in dists])
    if gpu:
        check("torch is a CUDA build and sees the GPU", tinfo.get("cuda_available") is True, tinfo)
        check("GPU runtimes installed", all(d in dists for d in GPU_RUNTIMES), [d for d in GPU_RUNTIMES if d not in dists])
        check("onnxruntime offers CUDAExecutionProvider", isinstance(providers, list) and "CUDAExecutionProvider" in providers, providers)
    return checks


# --------------------------------------------------------------------------- 2. training on CUDA


def task_records(name: str, n: int, seed: int, data: Path | None):
    """n training records of a benchmark task, or a synthetic keyword task without the data."""
    from edgekif.records import Record

    if data is not None and (data / name / "train.jsonl").is_file():
        from edgekif.taskfile import read_task

        recs = list(read_task(data / name / "train.jsonl").records)
        return random.Random(seed).sample(recs, min(n, len(recs)))
    rng = random.Random(seed)
    labels = {"agnews": ["World", "Sports", "Business", "Technology"], "dbpedia": ["Company", "Artist", "Athlete", "Building"]}.get(name, ["yes", "no"])
    out = []
    for i in range(n):
        label = rng.choice(labels)
        words = " ".join(rng.choice(["market", "team", "city", "river", "album", "stock", "match", "museum"]) for _ in range(12))
        out.append(Record(messages=(("user", f"Classify the text as one of {', '.join(labels)}.\n{words} {label.lower()}"),), output=label, id=f"{name}-{i}"))
    return out


def train_job(precision: str, steps: int, data: Path | None, adapter_out: Path | None, device: str = "cuda") -> dict[str, Any]:
    """A short Recurrent-KIF job (two tasks, replay between them) on CUDA in `precision`.
    (device="cpu" runs the same code without the CUDA figures: a smoke test of this tool.)"""
    import torch

    from edgekif.config import Config
    from edgekif.continual import StreamTask, learn_task
    from edgekif.model import resolve_base
    from edgekif.replay import ReplayBuffer
    from edgekif.workflow import open_learner

    cfg = Config()
    cfg.model.device, cfg.model.precision = device, precision
    cuda = device == "cuda"
    cfg.train.strategy, cfg.train.max_steps, cfg.train.checkpoint_every = "recurrent_kif", steps, 0
    cfg.data.max_length = 256
    base = resolve_base(cfg.model, benchlib.cache_dir())
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    learner, _ = open_learner(cfg, base=base)
    load_s = time.perf_counter() - t0
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    buffer = ReplayBuffer(":memory:", cfg.replay)
    stamps: list[float] = []
    tasks = []
    for i, name in enumerate(("agnews", "dbpedia")):
        recs = task_records(name, steps * cfg.train.batch_size, seed=i, data=data)
        t1 = time.perf_counter()
        stamps.clear()
        res = learn_task(learner, buffer, StreamTask(name, recs), progress=lambda ev: stamps.append(time.perf_counter()))
        if cuda:
            torch.cuda.synchronize()
        step_s = [b - a for a, b in zip([t1, *stamps[:-1]], stamps)]
        tasks.append({"task": name, "steps": res.steps, "fusions": res.fusions, "seconds": res.seconds, "mean_loss": res.mean_loss,
                      "last_loss": res.last_loss, "sec_per_step": statistics.median(step_s[1:] or step_s)})
    out = {
        "precision": precision, "base": base.name, "load_s": load_s, "loaded_cuda_mb": loaded_mb,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "tasks": tasks,
        "sec_per_step": statistics.median(t["sec_per_step"] for t in tasks), "device": str(learner.model.device),
    }
    if adapter_out is not None:
        learner.save(adapter_out)
        out["learner_dir"] = str(adapter_out)
    del learner
    if cuda:
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- 3. export on CUDA


def export_and_speed(learner_dir: Path, work: Path, data: Path | None, new_tokens: int = 64, execution_provider: str = "cuda") -> dict[str, Any]:
    """Fuse, export for onnxruntime-genai on CUDA (fp16, checked on 24 records against the fp32 model's answers), then greedy tokens/s."""
    from edgekif.config import ModelConfig
    from edgekif.export.exporter import export_model
    from edgekif.export.fuse import fuse_adapter
    from edgekif.export.manifest import read_manifest
    from edgekif.infer import GenaiRunner
    from edgekif.model import resolve_base

    base = resolve_base(ModelConfig(), benchlib.cache_dir())
    records = task_records("agnews", 24, seed=7, data=data)  # the daemon's answer check runs on these
    prompts = [r.messages[-1][1] for r in records[:4]]
    t0 = time.perf_counter()
    fused = fuse_adapter(base.path, learner_dir / "adapter", work / "fused")
    t1 = time.perf_counter()
    folder = export_model(fused, work / "export", target="genai", precision="auto", execution_provider=execution_provider, holdout={"agnews": records})
    t2 = time.perf_counter()
    manifest = read_manifest(folder)
    runner = GenaiRunner(folder)
    og = runner._og
    speeds = []
    for i, prompt in enumerate(prompts[:3]):
        ids = runner.tokenizer.encode(runner.chat_text(prompt))
        params = og.GeneratorParams(runner.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens)
        gen = og.Generator(runner.model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        n = 0
        while not gen.is_done() and n < new_tokens:
            gen.generate_next_token()
            n += 1
        if i > 0:  # the first run warms up the CUDA kernels
            speeds.append(n / (time.perf_counter() - start))
    return {
        "fuse_s": t1 - t0, "export_s": t2 - t1, "precision": manifest.precision, "execution_provider": manifest.execution_provider,
        "runtime": manifest.runtime, "parity_rejected": manifest.parity_rejected,
        "parity": manifest.parity, "tokens_per_s": statistics.median(speeds) if speeds else None, "new_tokens": new_tokens,
    }


# --------------------------------------------------------------------------- report


def _num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["## GPU check (tools/gpu_check.py)", ""]
    gpus = result["environment"]["gpus"]
    lines.append(f"Host: {', '.join(gpus) if gpus else 'no NVIDIA GPU'}; torch {result['environment']['torch'].get('version')}"
                 f" (CUDA {result['environment']['torch'].get('cuda_build')}); {result['date']}.")
    lines += ["", "| check | ok | detail |", "|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['name']} | {'yes' if c['ok'] else '**no**'} | `{json.dumps(c['detail'], default=str)[:120]}` |")
    lines.append("")
    if result["status"] == "no_gpu":
        lines.append(f"**{NO_GPU}.**")
        return "\n".join(lines) + "\n"
    train = result.get("train", {})
    if train:
        lines += ["| base weights | s/step (median) | load s | CUDA MiB after load | peak CUDA MiB | fusions | last loss (task 2) |", "|---|---|---|---|---|---|---|"]
        for prec, row in train.items():
            if "error" in row:
                lines.append(f"| {prec} | error: {row['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {prec} | {row['sec_per_step']:.3f} | {row['load_s']:.1f} | {_num(row['loaded_cuda_mb'], '.0f')} | {_num(row['peak_cuda_mb'], '.0f')} | "
                         f"{sum(t['fusions'] for t in row['tasks'])} | {row['tasks'][-1]['last_loss']:.3f} |")
        lines.append("")
    exp = result.get("export")
    if exp and "error" not in exp:
        parity = exp.get("parity") or {}
        lines.append(f"Export (onnxruntime-genai, {exp['execution_provider']}, {exp['precision']}): {exp['export_s']:.0f} s, parity agreement "
                     f"{parity.get('agreement')} of answers identical to fp32 (passed: {parity.get('passed')}); greedy decode {_num(exp['tokens_per_s'], '.0f')} tokens/s "
                     f"({exp['new_tokens']} new tokens, median of 2 after a warm-up).")
    elif exp:
        lines.append(f"Export on CUDA failed: {exp['error'][:300]}")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"- {name} not measured: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gpu", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per task (Recurrent-KIF: 8 inner + 4 outer per round)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would start after this many seconds")
    ap.add_argument("--data", type=Path, default=DATA if DATA.is_dir() else None, help="cl-benchmark folder (default: synthetic tasks)")
    ap.add_argument("--skip-export", metavar="WHY", help="do not export; WHY goes into the report (e.g. the GPU runtimes cannot be installed there)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    start = time.perf_counter()
    gpus = nvidia_gpus()
    plan = make_plan()
    dists = installed()
    tinfo = torch_info()
    providers = ort_providers()
    checks = environment_checks(gpus, plan, dists, tinfo, providers)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": benchlib.machine_info(),
        "environment": {"gpus": gpus, "make_plan": plan, "installed": dists, "torch": tinfo, "ort_providers": providers},
        "checks": checks, "skipped": {},
    }
    for c in checks:
        print(f"[{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {json.dumps(c['detail'], default=str)[:200]}")
    failed = not all(c["ok"] for c in checks)
    if not gpus:
        result["status"] = "no_gpu"
        print(NO_GPU)
    elif not tinfo.get("cuda_available"):
        result["status"] = "cuda_unavailable"
        print("nvidia-smi sees a GPU but torch cannot use it: GPU figures not measured")
    else:
        result["status"] = "measured"
        result["train"] = {}
        with tempfile.TemporaryDirectory(prefix="edgekif-gpu-check-") as tmp:
            work = Path(tmp)
            for precision in ("nf4", "bf16"):
                if time.perf_counter() - start > args.budget_s:
                    result["skipped"][f"train {precision}"] = "time budget spent"
                    continue
                print(f"training on CUDA, {precision} base, {args.steps} steps x 2 tasks ...", flush=True)
                try:
                    result["train"][precision] = train_job(precision, args.steps, args.data, work / f"learner-{precision}")
                except Exception as e:  # noqa: BLE001 - record and go on: the other figures still count
                    result["train"][precision] = {"error": f"{type(e).__name__}: {e}"}
                    failed = True
            learner_dir = next((Path(r["learner_dir"]) for r in result["train"].values() if "learner_dir" in r), None)
            if args.skip_export:
                result["skipped"]["export"] = args.skip_export
            elif learner_dir is None:
                result["skipped"]["export"] = "no trained adapter"
            elif time.perf_counter() - start > args.budget_s:
                result["skipped"]["export"] = "time budget spent"
            else:
                print("exporting for onnxruntime-genai on CUDA ...", flush=True)
                try:
                    result["export"] = export_and_speed(learner_dir, work, args.data)
                except Exception as e:  # noqa: BLE001
                    result["export"] = {"error": f"{type(e).__name__}: {e}"}
                    failed = True
        failed = failed or result["status"] != "measured"
    result["total_s"] = time.perf_counter() - start
    md = to_markdown(result)
    print(md)
    if result["status"] != "measured" and benchlib.gpu_figures_measured(args.out / "gpu_check.json"):
        # A CPU box must not overwrite figures measured on a GPU (docs/benchmarks/gpu is committed).
        print(f"{args.out} holds figures measured on a GPU: left as they are")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        from edgekif.atomic import atomic_write_text

        atomic_write_text(args.out / "gpu_check.json", json.dumps(result, indent=2, default=str) + "\n")
        atomic_write_text(args.out / "gpu_check.md", md)
        print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md in {result['total_s']:.0f} s")
    if result["status"] == "no_gpu":
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
