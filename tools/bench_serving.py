#!/usr/bin/env python
"""Serving benchmark on the real base model (SmolLM2-135M-Instruct): export cost and size per
target, generation speed per runtime, and `edgekif infer` latency.

The "published model" is the base itself, fused with a zero LoRA adapter exactly as the daemon
fuses a trained one (edgekif.export.fuse.fuse_model), then:

1. exports: for each target, build time and check time (the daemon's export check,
   edgekif.export.check.check_candidate: the export's greedy answers to the first
   CHECK_RECORDS test records, one at a time through its chat template, against the fp32
   PyTorch model's) and manifest time (write_manifest); folder size on disk; share of identical
   answers and exact match vs fp32. Every export is measured; the table says whether it would
   pass the daemon's bars (export.parity_min_agreement 0.95, export.parity_max_accuracy_drop 1 point).
2. generation speed, batch 1, greedy, the same chat-templated prompts for every runner, a fixed
   number of new tokens (EOS suppressed: genai `min_length`, HF `min_new_tokens`, OnnxRunner with
   its session's EOS logits masked): first-token latency (model call start -> first generated token id,
   i.e. prefill + one sampling step; tokenisation excluded) and decode speed
   ((new tokens - 1) / (last token time - first token time)). One untimed warm-up per runner.
   All runners are loaded at once and interleaved prompt by prompt (order rotated each round), so
   a change in background load on a shared machine hits them alike.
   Runners: edgekif.infer.GenaiRunner (model/tokenizer of the runner, timed token loop),
   edgekif.infer.OnnxRunner (its greedy loop, timed through its stream callback, EOS logit masked),
   PyTorch eager (edgekif.model.load_model fp32 / nf4, HF generate with KV cache, timed with a streamer).
3. `edgekif infer` against a published `current` (the genai int4 export, published with
   edgekif.publish.ModelStore into a temp data dir):
   a. per prompt, warm, in-process: open_current(DATA_DIR).generate_ids(prompt, 64, stream_callback)
      -- the library call `edgekif infer "PROMPT"` makes (`infer --file` reports no per-prompt
      timing); p50/p95 over N prompts, natural EOS stop.
   b. `python -m edgekif.cli infer --file prompts.jsonl` as a subprocess (one prompt per generate
      call, its default): process wall time and the total time the command prints on stderr.
   c. cold `python -m edgekif.cli infer "PROMPT"` processes, start to exit, with peak RSS.
   b and c run under a small timer process (wall time and the child's ru_maxrss).
4. `edgekif api` (the OpenAI-compatible endpoint, service/api.py) against the same published
   export, started as its own process (`python -m service.cli api --port P`, default settings:
   2 generations at once, 16 queued), next to direct onnxruntime-genai calls in this process
   (one GenaiRunner, GenaiRunner.generate_ids from 1 or 4 threads): 1 and 4 concurrent clients,
   each sending non-streaming chat completions (http.client, max_tokens 64, stops at EOS) over the
   benchmark prompts; requests/s (requests / wall time of the level) and p50/p95 latency per
   request, and whether the API's answers equal the direct ones.

    EDGEKIF_CACHE_DIR=/tmp/smolcache python tools/bench_serving.py --quick   # ~3.5 min on 2 cores (6 at load 4)
    EDGEKIF_CACHE_DIR=/tmp/smolcache python tools/bench_serving.py --profile standard  # quick targets, 8 x 64 tokens, 100 infer prompts
    EDGEKIF_CACHE_DIR=/tmp/smolcache python tools/bench_serving.py           # all targets, 8 prompts x 64 tokens, 100 infer prompts
    EDGEKIF_CACHE_DIR=/tmp/smolcache python tools/bench_serving.py --api-only --exports genai-int8 --api-requests 8  # the API part alone
                                                                        # (~20+ min on 2 cores; --speed-budget-s caps the speed part)

The base comes from resolve_base(ModelConfig(), $EDGEKIF_CACHE_DIR or ~/.cache/edgekif).
On a shared machine, compare ratios rather than absolutes, and consider --threads 1: with two
threads on two busy cores, PyTorch (and bitsandbytes nf4 even more) slows down far more than
onnxruntime does, which inflates the ratios.

Writes OUT/result.json, OUT/result.md (a `### Serving` section) and OUT/*.png.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tools.benchlib import cache_dir, cpu_model, profile_settings, ram_gb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cl-benchmark"

# name -> (target, precision)
EXPORTS = {
    "genai-int4": ("genai", "int4"),
    "genai-int8": ("genai", "int8"),
    "genai-fp32": ("genai", "fp32"),
    "onnx-fp32": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
}
PROFILES = {
    # speed_budget_s: stop the interleaved speed rounds (>= 2 of them) once this many seconds are spent; 0 = no limit
    "quick": dict(exports=["genai-int4", "genai-int8", "onnx-fp32"], eager=["fp32", "nf4"], prompts=4, new_tokens=32, infer_prompts=20, cold_runs=1, speed_budget_s=90, api_requests=8),
    # the quick targets at the full profile's prompt counts: 100 `edgekif infer` prompts, as the report asks
    "standard": dict(exports=["genai-int4", "genai-int8", "onnx-fp32"], eager=["fp32", "nf4"], prompts=8, new_tokens=64, infer_prompts=100, cold_runs=3, speed_budget_s=240, api_requests=24),
    "full": dict(exports=list(EXPORTS), eager=["fp32", "nf4"], prompts=8, new_tokens=64, infer_prompts=100, cold_runs=3, speed_budget_s=0, api_requests=40),
}
CHECK_RECORDS = 48  # test records the answer check runs on (the demo's holdout size)
PARITY_TOKENS = 8  # export_model's default max_new_tokens
INFER_MAX_NEW_TOKENS = 64  # `edgekif infer`'s default --max-new-tokens
API_CLIENTS = (1, 4)  # concurrent clients of the API section
MB = 1e6


# --------------------------------------------------------------------------- helpers


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import torch

    ram = ram_gb()
    cpu = cpu_model()

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "onnxruntime": version("onnxruntime"),
        "onnxruntime_genai": version("onnxruntime-genai"),
        "bitsandbytes": version("bitsandbytes"),
        "loadavg_start": list(os.getloadavg()),
    }


def fmt(x: float | None, spec: str = ".1f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


# --------------------------------------------------------------------------- 1. exports


def make_exports(fused: Path, work: Path, names: list[str], check_records: list, labels, base, cfg, progress) -> dict[str, dict]:
    """Build each export and run the daemon's export check on it (edgekif.export.check): its
    answers to `check_records` against the fp32 PyTorch model's, with the daemon's bars. Every
    export is measured; the table says whether it would pass."""
    from edgekif.errors import EdgekifError
    from edgekif.export.build import ExportVariant
    from edgekif.export.check import check_candidate, reference_answers
    from edgekif.export.manifest import write_manifest

    holdout = {"check": check_records}
    t0 = time.perf_counter()
    reference = reference_answers(fused, holdout, max_new_tokens=cfg.eval.max_new_tokens, labels={"check": labels})
    reference_s = time.perf_counter() - t0
    out: dict[str, dict] = {"_reference": {"seconds": reference_s, "exact_match": reference["check"].exact_match,
                                           "label_accuracy": reference["check"].label_accuracy, "n": len(check_records)}}
    for name in names:
        target, precision = EXPORTS[name]
        folder = work / "exports" / name
        row: dict[str, Any] = {"target": target, "precision": precision, "folder": str(folder)}
        progress.set_postfix_str(f"export {name}")
        try:
            result = check_candidate(fused, folder, target=target, variant=ExportVariant(precision), execution_provider="cpu", holdout=holdout,
                                     reference=reference, max_new_tokens=cfg.eval.max_new_tokens,
                                     min_agreement=cfg.export.parity_min_agreement, max_accuracy_drop=cfg.export.parity_max_accuracy_drop)
        except EdgekifError as e:
            row["error"] = str(e)[-2000:]
            out[name] = row
            progress.update(1)
            continue
        parity = {k: v for k, v in result.check.to_dict().items() if k != "per_task"}
        t2 = time.perf_counter()
        write_manifest(
            folder, base_model_id=base.name, base_model_sha256=base.source_sha256, adapter_sha256=None,
            tasks=[], parity=parity, note="bench_serving: zero LoRA (base model)",
        )
        t3 = time.perf_counter()
        row.update(
            build_s=result.build_seconds, parity_s=result.seconds, manifest_s=t3 - t2, total_s=result.build_seconds + result.seconds + t3 - t2,
            bytes=folder_bytes(folder), parity=parity,
            files={p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        )
        out[name] = row
        progress.update(1)
    return out


class Timed:
    """One timed generation: token ids and the perf_counter time each became available."""

    def __init__(self, prompt_tokens: int, t0: float, times: list[float], tokens: list[int]) -> None:
        self.prompt_tokens, self.t0, self.times, self.tokens = prompt_tokens, t0, times, tokens

    def to_dict(self) -> dict[str, Any]:
        n = len(self.tokens)
        ttft = self.times[0] - self.t0 if n else None
        decode = (n - 1) / (self.times[-1] - self.times[0]) if n > 1 and self.times[-1] > self.times[0] else None
        total = self.times[-1] - self.t0 if n else None
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": n, "first_token_ms": None if ttft is None else 1000 * ttft,
                "decode_tokens_per_s": decode, "total_s": total, "e2e_tokens_per_s": n / total if total else None, "tokens": self.tokens}


def _genai_threads(runner, threads: int) -> None:
    """Reload the runner's model with intra_op_num_threads (the export's genai_config.json is hashed, so overlay it)."""
    if not threads:
        return
    og = runner._og
    config = og.Config(str(runner.model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    runner.model = og.Model(config)
    runner.tokenizer = og.Tokenizer(runner.model)


def genai_speed(folder: Path, threads: int) -> tuple[Callable[[list[dict], int], Timed], Any]:
    from edgekif.infer import GenaiRunner

    runner = GenaiRunner(folder)
    _genai_threads(runner, threads)
    og = runner._og

    def run(messages: list[dict], n: int) -> Timed:
        ids = runner.tokenizer.encode(runner.chat_text(messages))
        t0 = time.perf_counter()
        params = og.GeneratorParams(runner.model)
        # min_length = max_length: EOS is masked until the fixed token count is reached.
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        gen = og.Generator(runner.model, params)
        gen.append_tokens(ids)
        times, tokens = [], []
        while not gen.is_done() and len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter())
        return Timed(len(ids), t0, times, tokens)

    return run, runner


class _NoEosSession:
    """Wraps an onnxruntime session: EOS logits of the last position set to -inf, as HF
    `min_new_tokens` and genai `min_length` do, so OnnxRunner's greedy loop runs to n tokens."""

    def __init__(self, session: Any, eos_ids: set[int]) -> None:
        self.session, self.eos = session, sorted(eos_ids)

    def run(self, names: list[str], feeds: dict) -> list[Any]:
        out = self.session.run(names, feeds)
        out[0][:, -1, self.eos] = float("-inf")
        return out


def onnx_speed(folder: Path, threads: int) -> tuple[Callable[[list[dict], int], Timed], Any]:
    from edgekif.infer import OnnxRunner

    runner = OnnxRunner(folder)
    if threads:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        runner.session = ort.InferenceSession(str(folder / "model.onnx"), sess_options=so, providers=["CPUExecutionProvider"])
    runner.session = _NoEosSession(runner.session, runner.eos_ids)  # EOS never wins: every prompt gets exactly n tokens


    def run(messages: list[dict], n: int) -> Timed:
        ids = runner.chat_ids(messages)
        times: list[float] = []
        t0 = time.perf_counter()
        tokens = runner._greedy([ids], n, lambda _piece: times.append(time.perf_counter()))[0]
        return Timed(len(ids), t0, times, tokens)

    return run, runner


def eager_speed(base_path: Path, precision: str) -> tuple[Callable[[list[dict], int], Timed], Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from edgekif.model import load_model, load_tokenizer

    model = load_model(base_path, precision).eval()
    tok = load_tokenizer(base_path)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(messages: list[dict], n: int) -> Timed:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                use_cache=True, streamer=clock, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
            )
        return Timed(ids.shape[1], t0, clock.times, [int(t) for t in out[0, ids.shape[1]:]])

    return run, model


def speed_runner(name: str, exports: dict, base_path: Path, threads: int):
    if name.startswith("eager-"):
        return eager_speed(base_path, name.split("-", 1)[1])
    folder = Path(exports[name]["folder"])
    return (genai_speed if EXPORTS[name][0] == "genai" else onnx_speed)(folder, threads)


def measure_speed(names: list[str], exports: dict, base_path: Path, prompts: list[list[dict]], n: int, threads: int, budget_s: float, progress) -> dict[str, Any]:
    """All runners loaded at once and interleaved prompt by prompt (order rotated each round), so a
    change in background load hits every runner alike; ratios are more robust than absolutes."""
    out: dict[str, dict] = {}
    runs: dict[str, Callable[[list[dict], int], Timed]] = {}
    handles = []
    for name in names:
        progress.set_postfix_str(f"load {name}")
        t_load = time.perf_counter()
        try:
            run, handle = speed_runner(name, exports, base_path, threads)
        except Exception as e:  # e.g. nf4 without a working bitsandbytes
            out[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            progress.update(1)
            continue
        load_s = time.perf_counter() - t_load
        run(prompts[0], min(4, n))  # warm-up (untimed)
        out[name] = {"load_s": load_s, "per_prompt": []}
        runs[name] = run
        handles.append(handle)
        progress.update(1)
    active = list(runs)
    t_start = time.perf_counter()
    rounds = 0
    for i, p in enumerate(prompts):
        order = active[i % len(active):] + active[: i % len(active)] if active else []
        for name in order:
            progress.set_postfix_str(f"prompt {i + 1} {name}")
            c0 = time.process_time()
            row = runs[name](p, n).to_dict()
            row["cpu_s"] = time.process_time() - c0
            out[name]["per_prompt"].append(row)
            progress.update(1)
        rounds += 1
        if budget_s and rounds >= 2 and rounds < len(prompts) and time.perf_counter() - t_start > budget_s:
            progress.update(len(active) * (len(prompts) - rounds))
            break
    speed_s = time.perf_counter() - t_start
    del runs, handles
    gc.collect()
    for name in active:
        row = out[name]
        rows = row["per_prompt"]
        row.update(
            median_first_token_ms=median([r["first_token_ms"] for r in rows if r["first_token_ms"] is not None]),
            median_decode_tokens_per_s=median([r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"] is not None]),
            median_e2e_tokens_per_s=median([r["e2e_tokens_per_s"] for r in rows if r["e2e_tokens_per_s"] is not None]),
            median_prompt_tokens=median([r["prompt_tokens"] for r in rows]),
            new_tokens=sorted({r["new_tokens"] for r in rows}),
            cpu_cores_busy=sum(r["cpu_s"] for r in rows) / max(1e-9, sum(r["total_s"] or 0 for r in rows)),
        )
    ref = out.get("eager-fp32", {})
    for name in active:
        row = out[name]
        for key in ("median_first_token_ms", "median_decode_tokens_per_s", "median_e2e_tokens_per_s"):
            r, v = ref.get(key), row.get(key)
            row[key.replace("median_", "ratio_vs_eager_fp32_")] = (v / r) if r and v else None
        if ref.get("per_prompt"):  # how often the runner's greedy tokens equal eager fp32's
            same, prefix = 0, []
            for a, b in zip(row["per_prompt"], ref["per_prompt"]):
                k = 0
                while k < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][k] == b["tokens"][k]:
                    k += 1
                prefix.append(k)
                same += a["tokens"] == b["tokens"]
            row["same_tokens_as_eager_fp32"] = same
            row["median_common_prefix_with_eager_fp32"] = median(prefix)
    return {"runners": out, "prompts_measured": rounds, "seconds": speed_s}


# --------------------------------------------------------------------------- 3. edgekif infer


# Runs the command from a small process: a child forked from this (multi-GB) benchmark process
# would report the parent's RSS as its own peak (Linux counts the pre-exec address space).
_TIMER = (
    "import os, resource, sys, time\n"
    "t = time.perf_counter(); pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0); wall = time.perf_counter() - t\n"
    "print('#TIMER', wall, ru.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)\n"
)


def _run_timed(cmd: list[str], env: dict) -> dict[str, Any]:
    """Run a process; wall time start to exit and its peak RSS (measured by a small timer process)."""
    res = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    m = re.search(r"#TIMER (\S+) (\d+) (-?\d+)\s*$", res.stderr)
    if not m:
        return {"wall_s": None, "returncode": res.returncode or -1, "peak_rss_mb": None, "stdout": res.stdout, "stderr": res.stderr}
    stderr = res.stderr[: m.start()]
    return {"wall_s": float(m.group(1)), "returncode": int(m.group(3)), "peak_rss_mb": int(m.group(2)) * 1024 / MB, "stdout": res.stdout, "stderr": stderr}


def measure_infer(export_folder: Path, work: Path, prompts: list[list[dict]], cold_runs: int, progress) -> dict[str, Any]:
    from edgekif.publish import open_current
    from edgekif.publish import ModelStore

    data_dir = work / "data"
    progress.set_postfix_str("infer: publish")
    t0 = time.perf_counter()
    published = ModelStore(data_dir).publish(export_folder)
    publish_s = time.perf_counter() - t0
    res: dict[str, Any] = {"data_dir": str(data_dir), "published": published, "publish_s": publish_s, "max_new_tokens": INFER_MAX_NEW_TOKENS,
                           "prompts": len(prompts)}

    # a. warm, in-process, one prompt at a time: what `edgekif infer "PROMPT"` calls after loading
    progress.set_postfix_str("infer: library per prompt")
    t0 = time.perf_counter()
    runner = open_current(data_dir)
    open_s = time.perf_counter() - t0
    pieces: list[str] = []
    runner.generate_ids(prompts[0], INFER_MAX_NEW_TOKENS, pieces.append)  # warm-up
    lat, ntok, texts = [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        ids = runner.generate_ids(p, INFER_MAX_NEW_TOKENS, pieces.append)
        lat.append(time.perf_counter() - t0)
        ntok.append(len(ids))
        texts.append(runner.tokenizer.decode(ids))
        progress.update(1)
    del runner
    gc.collect()
    res["library_per_prompt"] = {
        "what": "open_current(DATA_DIR).generate_ids(prompt, 64, stream_callback) per prompt, warm (model loaded once, one untimed warm-up), "
                "batch 1, stops at EOS or 64 tokens; chat template + tokenisation included",
        "open_current_s": open_s, "latency_s": lat, "new_tokens": ntok,
        "p50_ms": 1000 * percentile(lat, 50), "p95_ms": 1000 * percentile(lat, 95), "mean_ms": 1000 * statistics.mean(lat),
        "max_ms": 1000 * max(lat), "median_new_tokens": median(ntok),
    }

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EDGEKIF_DATA_DIR", None)
    base_cmd = [sys.executable, "-m", "edgekif.cli", "infer", "--data-dir", str(data_dir)]

    # b. `edgekif infer --file`: one process, one prompt per generate call (its default)
    progress.set_postfix_str("infer --file")
    pfile = work / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"messages": p}, ensure_ascii=False) + "\n" for p in prompts))
    cmd = base_cmd + ["--file", str(pfile)]
    r = _run_timed(cmd, env)
    m = re.search(r"# (\d+) prompts in ([0-9.]+)s", r["stderr"])
    answers = []
    for line in r["stdout"].splitlines():
        try:
            answers.append(json.loads(line)["answer"])
        except (ValueError, KeyError, TypeError):
            continue
    same = sum(a == b for a, b in zip(answers, texts))
    res["infer_file"] = {
        "what": "`python -m edgekif.cli infer --data-dir D --file prompts.jsonl` (default --max-new-tokens 64): process start to exit; "
                "batch_s is the time the command prints itself (all prompts, one generate call each, answers printed as they come)",
        "cmd": shlex.join(cmd), "returncode": r["returncode"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
        "batch_s": float(m.group(2)) if m else None, "answers": len(answers), "answers_equal_to_per_prompt": same,
        "per_prompt_amortised_ms": 1000 * float(m.group(2)) / len(prompts) if m else None,
        "stderr_tail": r["stderr"][-1500:] if r["returncode"] else r["stderr"][-300:],
    }
    progress.update(1)

    # c. cold single-prompt processes
    text = prompts[0][-1]["content"]
    cmd = base_cmd + [text]
    runs = []
    for i in range(cold_runs):
        progress.set_postfix_str(f"infer cold {i + 1}/{cold_runs}")
        r = _run_timed(cmd, env)
        runs.append({"wall_s": r["wall_s"], "returncode": r["returncode"], "peak_rss_mb": r["peak_rss_mb"],
                     **({"stderr_tail": r["stderr"][-1500:]} if r["returncode"] else {})})
        progress.update(1)
    res["cold_single"] = {
        "what": '`python -m edgekif.cli infer --data-dir D "PROMPT"` (first benchmark prompt, default --max-new-tokens 64, streamed to a pipe): '
                "process start to exit, including interpreter start, imports, resolving current and loading the model",
        "cmd": shlex.join(base_cmd + ["<PROMPT>"]), "runs": runs,
        "median_wall_s": median([x["wall_s"] for x in runs if x["returncode"] == 0 and x["wall_s"] is not None]),
        "peak_rss_mb": max((x["peak_rss_mb"] for x in runs if x["peak_rss_mb"] is not None), default=None),
    }
    return res


# --------------------------------------------------------------------------- 4. edgekif api


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_chat(port: int, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """One non-streaming chat completion: (latency s, answer, completion tokens)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "edgekif", "messages": messages, "max_tokens": max_tokens})
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        lat = time.perf_counter() - t0
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
    obj = json.loads(data)
    return lat, obj["choices"][0]["message"]["content"], obj["usage"]["completion_tokens"]


def _load_level(clients: int, jobs: list[list[dict]], call: Callable[[list[dict]], tuple[float, str, int]]) -> dict[str, Any]:
    """`clients` threads take the next request from one list until it is empty (closed loop)."""
    import threading

    lock = threading.Lock()
    todo = iter(range(len(jobs)))
    lat: list[float | None] = [None] * len(jobs)
    texts: list[str | None] = [None] * len(jobs)
    ntok: list[int | None] = [None] * len(jobs)
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                lat[i], texts[i], ntok[i] = call(jobs[i])
            except Exception as e:  # report, do not hang the level
                errors.append(f"{type(e).__name__}: {e}"[:500])
                return

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [x for x in lat if x is not None]
    return {
        "clients": clients, "requests": len(done), "wall_s": wall, "requests_per_s": len(done) / wall if wall else None,
        "p50_ms": 1000 * percentile(done, 50) if done else None, "p95_ms": 1000 * percentile(done, 95) if done else None,
        "mean_new_tokens": statistics.mean([n for n in ntok if n is not None]) if done else None,
        "errors": errors[:5], "texts": texts,
    }


def measure_api(export_folder: Path, work: Path, prompts: list[list[dict]], n_requests: int, progress) -> dict[str, Any]:
    from edgekif.publish import open_current
    from edgekif.publish import ModelStore
    from service.api import ApiSettings

    data_dir = work / "api-data"
    published = ModelStore(data_dir).publish(export_folder)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "service.cli", "api", "--data-dir", str(data_dir), "--port", str(port)]
    log_path = work / "api.log"
    progress.set_postfix_str("api: start server")
    jobs = [prompts[i % len(prompts)] for i in range(n_requests)]
    res: dict[str, Any] = {"published": published, "server_cmd": "python -m service.cli api --data-dir D --port P",
                           "server_settings": vars(ApiSettings()), "max_tokens": INFER_MAX_NEW_TOKENS, "requests_per_level": n_requests,
                           "api": [], "direct": []}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            t0 = time.perf_counter()
            while True:  # ready when the model answers (the first request opens models/current)
                if server.poll() is not None:
                    raise RuntimeError(f"edgekif api exited with {server.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    _api_chat(port, jobs[0], 4)
                    break
                except (ConnectionError, OSError):
                    if time.perf_counter() - t0 > 180:
                        raise
                    time.sleep(0.2)
            res["server_ready_s"] = time.perf_counter() - t0
            runner = open_current(data_dir)
            direct = lambda m: _direct_chat(runner, m)  # noqa: E731
            api = lambda m: _api_chat(port, m, INFER_MAX_NEW_TOKENS)  # noqa: E731
            direct(jobs[0]), api(jobs[0])  # warm-up, untimed
            for clients in API_CLIENTS:  # direct then API at each level: background load hits both alike
                for name, call in (("direct", direct), ("api", api)):
                    progress.set_postfix_str(f"api: {name} x{clients}")
                    res[name].append(_load_level(clients, jobs, call))
                    progress.update(1)
            try:
                import psutil

                res["server_rss_mb"] = psutil.Process(server.pid).memory_info().rss / MB
            except Exception:
                res["server_rss_mb"] = None
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    single_api, single_direct = res["api"][0]["texts"], res["direct"][0]["texts"]
    res["answers_equal"] = sum(a == b and a is not None for a, b in zip(single_api, single_direct))
    for row in res["api"] + res["direct"]:
        row.pop("texts")
    return res


def _direct_chat(runner, messages: list[dict]) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    ids = runner.generate_ids(messages, INFER_MAX_NEW_TOKENS)
    text = runner.tokenizer.decode(ids)
    return time.perf_counter() - t0, text, len(ids)


# --------------------------------------------------------------------------- report


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    speed = {k: v for k, v in result["speed"]["runners"].items() if "error" not in v}
    if speed:
        names = list(speed)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].barh(names, [speed[n]["median_decode_tokens_per_s"] or 0 for n in names], color="tab:blue")
        axes[0].set_xlabel("decode tokens/s (median, batch 1)")
        axes[1].barh(names, [speed[n]["median_first_token_ms"] or 0 for n in names], color="tab:orange")
        axes[1].set_xlabel("first-token latency, ms (median)")
        for ax in axes:
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
        axes[1].set_yticklabels([])
        threads = result["settings"]["threads"] or "default"
        fig.suptitle(f"SmolLM2-135M, batch 1, {result['speed']['prompts_measured']} prompts x {result['settings']['new_tokens']} tokens, "
                     f"{result['machine']['cores']} cores, threads: {threads}")
        fig.tight_layout()
        fig.savefig(out / "serving_speed.png", dpi=110)
        plt.close(fig)
        files.append("serving_speed.png")
    exports = {k: v for k, v in result["exports"].items() if "bytes" in v}
    if exports:
        names = list(exports)
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
        ax.barh(names, [exports[n]["bytes"] / MB for n in names], color="tab:green")
        for i, n in enumerate(names):
            ax.text(exports[n]["bytes"] / MB, i, f" {exports[n]['bytes'] / MB:.0f} MB, {exports[n]['total_s']:.0f} s", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("export folder size, MB")
        ax.set_xlim(0, max(exports[n]["bytes"] / MB for n in names) * 1.45)
        fig.tight_layout()
        fig.savefig(out / "export_size.png", dpi=110)
        plt.close(fig)
        files.append("export_size.png")
    return files


def measure_llamacpp(work: Path, threads: int, new_tokens: int, progress) -> dict[str, Any]:
    """llama.cpp (the bench extra's llama-cpp-python) vs genai exports of the same base."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"error": "llama-cpp-python is not installed (it is in the bench extra: `make setup-bench`)"}
    from bench_llamacpp import compare

    progress.set_postfix_str("llama.cpp")
    t0 = time.perf_counter()
    res = compare(work / "llamacpp", threads=threads, new_tokens=new_tokens, rounds=1, progress=progress)
    res["seconds"] = time.perf_counter() - t0
    return res


def to_markdown(result: dict, plots: list[str]) -> str:
    s, m, sp = result["settings"], result["machine"], result["speed"]
    measured = f"{sp['prompts_measured']} prompts"
    if sp["prompts_measured"] < s["prompts"]:
        measured += f" (of {s['prompts']}: the {s['speed_budget_s']:.0f} s time budget was reached)"
    fused_mb = result["fused_bytes"] / MB
    lines = [
        f"### Serving (profile `{result['profile']}`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}, onnxruntime-genai {m['onnxruntime_genai']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; "
        f"1-min load average at start / before the speed runs / end {m['loadavg_start'][0]:.2f} / {result['loadavg_before_speed'][0]:.2f} / {m['loadavg_end'][0]:.2f}"
        f"{' (more runnable threads than cores: other jobs were running, absolute times are pessimistic and noisy; the speed ratios come from interleaved runs)' if max(m['loadavg_start'][0], m['loadavg_end'][0]) > m['cores'] else ''}. "
        f"Wall time {result['wall_s'] / 60:.1f} min.  ",
        f"Model: SmolLM2-135M-Instruct fused with a zero LoRA adapter (= the base; fp32 safetensors folder {fused_mb:.0f} MB). "
        + (f"Prompts: the first {s['prompts']} records of `{s['task']}/test.jsonl`, chat template applied "
         f"(median {fmt(result['prompt_tokens_median'], '.0f')} tokens)." if s["prompts"] else
         f"Prompts: the first {s['infer_prompts']} records of `{s['task']}/test.jsonl` as chat messages."),
        "",
        "**Export** (build = `export_genai` or the plain ONNX graph (export.target onnx); check = the daemon's answer check: the export's greedy answers "
        f"({PARITY_TOKENS} tokens) to {s.get('check_records')} test records against the fp32 PyTorch model's; total = build + check + manifest; "
        f"MB = 10^6 bytes; passes = identical answers >= {100 * s['parity_bar']:.0f}% and exact match at most {s.get('parity_max_drop', 1.0):g} point below fp32"
        + (f"; fp32 PyTorch exact match {100 * ref['exact_match']:.1f}" if (ref := result['exports'].get('_reference', {})).get('exact_match') is not None else "")
        + "):",
        "",
        "| export | build s | check s | total s | size MB | size vs fp32 PyTorch | same answers as fp32 | exact match | passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["exports"].items():
        if name.startswith("_"):
            continue
        if "error" in e:
            lines.append(f"| {name} | failed: {e['error'][:120]} | | | | | | | |")
            continue
        p = e["parity"]
        lines.append(
            f"| {name} | {e['build_s']:.1f} | {e['parity_s']:.1f} | {e['total_s']:.1f} | {e['bytes'] / MB:.0f} | {e['bytes'] / result['fused_bytes']:.2f}x "
            f"| {100 * p['agreement']:.0f}% of {p['n']} | {fmt(100 * p['accuracy'] if p.get('accuracy') is not None else None)} | {'yes' if p.get('passed') else 'no'} |"
        )
    n_before_speed = len(lines)
    lines += [
        "",
        f"**Generation speed** (batch 1, greedy, {s['new_tokens']} new tokens per prompt with EOS suppressed, median over "
        f"{measured}, "
        "all runners loaded together and interleaved prompt by prompt after one warm-up each; "
        "first token = model call start to first generated token (prefill), tokenisation excluded; "
        "decode = (tokens - 1) / (last - first token time); ratios vs PyTorch eager fp32, >1 = more tokens/s or longer latency; "
        "CPU = process CPU time / wall time while generating, in cores):",
        "",
        "| runner | first token ms | decode tok/s | end-to-end tok/s | first token vs eager fp32 | decode vs eager fp32 | same tokens as eager fp32 | CPU | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["speed"]["runners"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        same = f"{r['same_tokens_as_eager_fp32']}/{len(r['per_prompt'])} (prefix {fmt(r['median_common_prefix_with_eager_fp32'], '.0f')})" if "same_tokens_as_eager_fp32" in r else "—"
        lines.append(
            f"| {name} | {fmt(r['median_first_token_ms'], '.0f')} | {fmt(r['median_decode_tokens_per_s'])} | {fmt(r['median_e2e_tokens_per_s'])} "
            f"| {fmt(r.get('ratio_vs_eager_fp32_first_token_ms'), '.2f')}x | {fmt(r.get('ratio_vs_eager_fp32_decode_tokens_per_s'), '.2f')}x | {same} | {r['cpu_cores_busy']:.2f} | {r['load_s']:.1f} |"
        )
    lines += [
        "",
        "Runners: `genai-*` = `edgekif.infer.GenaiRunner`'s model and tokenizer in a timed token loop (`min_length` set so EOS cannot end it); "
        "`onnx-*` = `edgekif.infer.OnnxRunner`'s greedy loop (no KV cache: each token re-runs the whole sequence; EOS logit masked); `eager-*` = `edgekif.model.load_model` "
        "+ HF `generate` with KV cache (`min_new_tokens`), timed with a streamer; nf4 = bitsandbytes 4-bit on CPU. "
        "\"same tokens\" counts prompts whose forced continuation equals eager fp32's token for token (median common prefix in tokens).",
    ]
    if not result["speed"]["runners"]:  # --api-only: no speed runs
        del lines[n_before_speed:]
    inf = result.get("infer")
    if inf:
        lp, fl, cs = inf["library_per_prompt"], inf["infer_file"], inf["cold_single"]
        lines += [
            "",
            f"**`edgekif infer`** against a published `current` ({inf['export']}, published with `ModelStore.publish` in {inf['publish_s']:.1f} s), "
            f"{inf['prompts']} prompts (the first {inf['prompts']} of `{s['task']}/test.jsonl`), default --max-new-tokens {inf['max_new_tokens']}, stops at EOS:",
            "",
            "| what was timed | n | p50 | p95 | mean / other |",
            "|---|---|---|---|---|",
            f"| per prompt, warm, in-process: `open_current(D).generate_ids(prompt, 64, stream_callback)` (the call `edgekif infer \"PROMPT\"` makes; "
            f"median {fmt(lp['median_new_tokens'], '.0f')} tokens generated) | {len(lp['latency_s'])} | {lp['p50_ms']:.0f} ms | {lp['p95_ms']:.0f} ms | "
            f"mean {lp['mean_ms']:.0f} ms, max {lp['max_ms']:.0f} ms; open_current {lp['open_current_s']:.2f} s |",
            f"| `edgekif infer --file` (one prompt per call, the default `--batch-size 1`) | 1 process | — | — | "
            f"batch {fmt(fl['batch_s'], '.2f')} s ({fmt(fl['per_prompt_amortised_ms'], '.0f')} ms/prompt amortised), process {fmt(fl['wall_s'], '.2f')} s, "
            f"peak RSS {fmt(fl['peak_rss_mb'], '.0f')} MB, {fl['answers']} answers ({fl['answers_equal_to_per_prompt']} identical to the per-prompt answers)"
            f"{'' if fl['returncode'] == 0 else ', exit ' + str(fl['returncode'])} |",
            f"| cold `edgekif infer \"PROMPT\"` process, start to exit | {len(cs['runs'])} | {fmt(cs['median_wall_s'], '.2f')} s (median) | — | "
            f"peak RSS {fmt(cs['peak_rss_mb'], '.0f')} MB |",
            "",
            "`edgekif infer --file` prints only its total time, hence the in-process per-prompt row.",
        ]
    api = result.get("api")
    if api:
        lines += [
            "",
            f"**`edgekif api`** (OpenAI-compatible, service/api.py) against a published `current` ({api['export']}), its own process "
            f"(`{api['server_cmd']}`, default bounds: {api['server_settings']['concurrency']} generations at once, {api['server_settings']['queue']} queued), "
            f"next to direct onnxruntime-genai calls in the benchmark process (one `GenaiRunner`, `generate_ids` from as many threads as clients). "
            f"Closed loop: each client sends its next request when the previous answer arrives, {api['requests_per_level']} non-streaming chat completions "
            f"per row (the benchmark prompts), max_tokens {api['max_tokens']}, stops at EOS; latency = request sent to full answer read. "
            f"{api['answers_equal']}/{api['requests_per_level']} API answers equal the direct ones (1 client); server RSS {fmt(api.get('server_rss_mb'), '.0f')} MB.",
            "",
            "| clients | API req/s | API p50 ms | API p95 ms | direct req/s | direct p50 ms | direct p95 ms | API / direct req/s | mean new tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for a, d in zip(api["api"], api["direct"]):
            ratio = a["requests_per_s"] / d["requests_per_s"] if a["requests_per_s"] and d["requests_per_s"] else None
            err = f" ({len(a['errors'])} errors: {a['errors'][0][:80]})" if a["errors"] else ""
            lines.append(
                f"| {a['clients']} | {fmt(a['requests_per_s'], '.2f')}{err} | {fmt(a['p50_ms'], '.0f')} | {fmt(a['p95_ms'], '.0f')} | {fmt(d['requests_per_s'], '.2f')} "
                f"| {fmt(d['p50_ms'], '.0f')} | {fmt(d['p95_ms'], '.0f')} | {fmt(ratio, '.2f')}x | {fmt(a['mean_new_tokens'], '.0f')} |"
            )
    lc = result.get("llamacpp")
    if lc:
        lines += ["", "**Against llama.cpp** (tools/bench_llamacpp.py, same run): the base as llama.cpp users run it (its GGUF) vs "
                  "edgekif's onnxruntime-genai exports of the same base. "]
        if "error" in lc:
            lines[-1] += f"Not measured: {lc['error']}"
        else:
            from bench_llamacpp import to_markdown as llamacpp_markdown

            lines += [llamacpp_markdown({**lc, "command": "(this run)", "finished": "", "machine": {}}).split("\n\nCommand:")[0]]
    h = result["headline"]
    lines += [] if not result["speed"]["runners"] else [
        "",
        f"Headline: genai int4 {fmt(h.get('genai_int4_tokens_per_s'))} tok/s vs PyTorch eager fp32 {fmt(h.get('eager_fp32_tokens_per_s'))} tok/s "
        f"= {fmt(h.get('genai_int4_vs_eager_fp32_tokens_per_s_ratio'), '.2f')}x decode speed; first token {fmt(h.get('genai_int4_first_token_ms'), '.0f')} ms vs "
        f"{fmt(h.get('eager_fp32_first_token_ms'), '.0f')} ms.",
    ]
    for f in plots:
        lines += ["", f"![{Path(f).stem.replace('_', ' ')}]({f})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="genai int4/int8 + onnx fp32 + eager fp32/nf4, 4 prompts x 32 tokens (90 s speed budget), 20 infer prompts")
    ap.add_argument("--profile", choices=list(PROFILES), default="full")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp comparison (tools/bench_llamacpp.py)")
    ap.add_argument("--out", default=None, help="output folder (default bench_out/serving-<profile>)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for torch, onnxruntime and onnxruntime-genai (0 = their defaults; "
                    "the `edgekif infer` subprocesses always use the defaults)")
    ap.add_argument("--exports", nargs="+", choices=list(EXPORTS), help="export targets (default: the profile's)")
    ap.add_argument("--eager", nargs="*", choices=["fp32", "nf4", "bf16"], help="PyTorch eager precisions (default: fp32 nf4)")
    ap.add_argument("--task", default="agnews", help="benchmark task whose test prompts are used (default agnews: ~120-token prompts)")
    ap.add_argument("--prompts", type=int, help="prompts for the speed runs")
    ap.add_argument("--new-tokens", type=int, help="new tokens per prompt in the speed runs")
    ap.add_argument("--infer-prompts", type=int, help="prompts for the `edgekif infer` latency")
    ap.add_argument("--speed-budget-s", type=float, help="stop the interleaved speed rounds (at least 2) after this many seconds "
                    "(default: 90 quick, 240 standard, 0 = none full)")
    ap.add_argument("--api-requests", type=int, help="chat completions per row of the `edgekif api` section (default: 8 quick, 24 standard, 40 full; 0 = skip it)")
    ap.add_argument("--api-only", action="store_true", help="only the `edgekif api` section (one genai export, no speed or `edgekif infer` runs)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (fused model, exports, data dir) as OUT/bench_serving_*")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from edgekif.atomic import atomic_write_json, atomic_write_text
    from edgekif.config import Config, LoRAConfig, ModelConfig
    from edgekif.export.fuse import fuse_model
    from edgekif.taskfile import read_task
    from edgekif.model import add_lora, load_model, resolve_base

    t_all = time.perf_counter()
    profile = "quick" if args.quick else args.profile
    prof = profile_settings(PROFILES, profile, args, ("exports", "eager", "prompts", "new_tokens", "infer_prompts", "speed_budget_s", "api_requests"))
    if args.api_only:  # one genai export (the profile's first unless --exports), nothing else before the API runs
        prof.update(exports=(args.exports or [next(e for e in prof["exports"] if e.startswith("genai"))])[:1], eager=[], prompts=0)
    out = Path(args.out or f"bench_out/serving-{profile}")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = Config()
    base = resolve_base(ModelConfig(), cache_dir())
    records = read_task(Path(args.data) / args.task / "test.jsonl").records
    n_needed = max(prof["prompts"], prof["infer_prompts"])
    if len(records) < n_needed:
        raise SystemExit(f"{args.task}/test.jsonl has {len(records)} records, {n_needed} needed")
    speed_prompts = [r.chat() for r in records[: prof["prompts"]]]
    infer_prompts = [r.chat() for r in records[: prof["infer_prompts"]]]
    check_records = records[:CHECK_RECORDS]
    labels = read_task(Path(args.data) / args.task / "train.jsonl").labels

    speed_names = [] if args.api_only else [e for e in prof["exports"]] + [f"eager-{p}" for p in prof["eager"]]
    if "eager-fp32" in speed_names:  # the reference first: ratios and token comparisons need it
        speed_names.remove("eager-fp32")
        speed_names.insert(0, "eager-fp32")
    infer_export = "genai-int4" if "genai-int4" in prof["exports"] else next((e for e in prof["exports"] if e.startswith("genai")), None)
    steps = len(prof["exports"]) + len(speed_names) * (prof["prompts"] + 1)
    if infer_export and not args.api_only:
        steps += prof["infer_prompts"] + 1 + prof["cold_runs"]
    if infer_export and prof["api_requests"]:
        steps += 2 * len(API_CLIENTS)

    result: dict[str, Any] = {
        "profile": profile,
        "command": shlex.join(["python", "tools/bench_serving.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {**prof, "task": args.task, "threads": args.threads, "check_records": CHECK_RECORDS, "parity_tokens": PARITY_TOKENS,
                     "parity_bar": cfg.export.parity_min_agreement, "parity_max_drop": cfg.export.parity_max_accuracy_drop, "infer_max_new_tokens": INFER_MAX_NEW_TOKENS, "base": {"name": base.name, "path": str(base.path), "sha256": base.source_sha256}},
        "machine": machine_info(),
    }

    work_parent = out if args.keep else None
    work = Path(tempfile.mkdtemp(prefix="bench_serving_", dir=work_parent))
    try:
        with tqdm(total=steps, desc="bench_serving", unit="step", file=sys.stderr) as progress:
            progress.set_postfix_str("fuse")
            t0 = time.perf_counter()
            peft_model = add_lora(load_model(base.path, "fp32"), LoRAConfig())  # zero LoRA (B = 0): fused == base
            fused = fuse_model(peft_model, base.path, work / "fused")
            del peft_model
            gc.collect()
            result["fuse_s"] = time.perf_counter() - t0
            result["fused_bytes"] = sum(p.stat().st_size for p in fused.glob("*.safetensors"))
            result["exports"] = make_exports(fused, work, prof["exports"], check_records, labels, base, cfg, progress)
            atomic_write_json(out / "result.json", result)

            result["loadavg_before_speed"] = list(os.getloadavg())
            result["speed"] = measure_speed(speed_names, result["exports"], fused, speed_prompts, prof["new_tokens"], args.threads, prof["speed_budget_s"], progress)
            speed = result["speed"]["runners"]
            first = next((r for r in speed.values() if r.get("per_prompt")), None)
            result["prompt_tokens_median"] = first["median_prompt_tokens"] if first else None
            atomic_write_json(out / "result.json", result)

            export_ok = infer_export and "error" not in result["exports"].get(infer_export, {"error": 1})
            if export_ok and not args.api_only:
                result["infer"] = {"export": infer_export, **measure_infer(Path(result["exports"][infer_export]["folder"]), work, infer_prompts, prof["cold_runs"], progress)}
                atomic_write_json(out / "result.json", result)
            if export_ok and prof["api_requests"]:
                result["api"] = {"export": infer_export, **measure_api(Path(result["exports"][infer_export]["folder"]), work, infer_prompts, prof["api_requests"], progress)}
                atomic_write_json(out / "result.json", result)
            if not args.api_only and not args.no_llamacpp:
                result["llamacpp"] = measure_llamacpp(work, args.threads or (os.cpu_count() or 2), prof["new_tokens"], progress)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    g4, g8, e32 = speed.get("genai-int4", {}), speed.get("genai-int8", {}), speed.get("eager-fp32", {})
    result["headline"] = {
        # int8: what the daemon publishes on CPU when int4 fails the parity bar (SmolLM2-135M does)
        "genai_int8_tokens_per_s": g8.get("median_decode_tokens_per_s"),
        "genai_int8_vs_eager_fp32_tokens_per_s_ratio": g8.get("ratio_vs_eager_fp32_decode_tokens_per_s"),
        "genai_int4_tokens_per_s": g4.get("median_decode_tokens_per_s"),
        "eager_fp32_tokens_per_s": e32.get("median_decode_tokens_per_s"),
        "genai_int4_vs_eager_fp32_tokens_per_s_ratio": g4.get("ratio_vs_eager_fp32_decode_tokens_per_s"),
        "genai_int4_first_token_ms": g4.get("median_first_token_ms"),
        "eager_fp32_first_token_ms": e32.get("median_first_token_ms"),
        "genai_int4_size_mb": result["exports"].get("genai-int4", {}).get("bytes", 0) / MB or None,
        "infer_p50_ms": result.get("infer", {}).get("library_per_prompt", {}).get("p50_ms"),
        "infer_p95_ms": result.get("infer", {}).get("library_per_prompt", {}).get("p95_ms"),
        "infer_cold_process_s": result.get("infer", {}).get("cold_single", {}).get("median_wall_s"),
        **{f"api_{k}_clients{row['clients']}": row[k] for row in result.get("api", {}).get("api", []) for k in ("requests_per_s", "p50_ms", "p95_ms")},
        **{f"vs_llamacpp_{name.split()[1]}": row.get("decode_ratio_vs_llamacpp") for name, row in (result.get("llamacpp") or {}).get("runners", {}).items()
           if row.get("decode_ratio_vs_llamacpp")},
    }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_all
    plots = plot(result, out)
    atomic_write_json(out / "result.json", result)
    md = to_markdown(result, plots)
    atomic_write_text(out / "result.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
