#!/usr/bin/env python
"""Benchmark the real daemon: drop-to-published time, per-stage breakdown, idle cost, replay rates.

Starts `python -m service --data-dir DIR` (real library stages, base SmolLM2 from the converted
cache: $EDGEKIF_CACHE_DIR, else ~/.cache/edgekif, as tools/demo.py does),
then:

1. drops a 100-example task (full profile: then a 1000-example task) built from the
   cl-benchmark train.jsonl into inbox/ (written as NAME.part, then renamed) and times the
   rename -> `models/current` pointing at a new version (polled every 0.25 s); the per-stage
   breakdown comes from state.db (JobStore events: each stage's `attempt` event to the event
   that commits it), the export sub-steps from the daemon's JSON log;
2. samples the daemon's CPU % and RSS (psutil, children included) every second: right after
   start (no job yet, torch not imported), during each job, and idle after the work (60 s;
   quick 20 s);
3. runs tools/bench_replay.py (replay buffer insert/sample rates at 100k stored examples).

    python tools/bench_daemon.py --quick      # 100-example task, reduced training (minutes)
    python tools/bench_daemon.py --profile standard  # 100 + 1000-example tasks, reduced training
    python tools/bench_daemon.py              # 100 + 1000-example tasks, daemon defaults (hours on 2 cores)

Writes OUT/result.json (headline: drop_to_published_s_100 ...), OUT/result.md and
OUT/timeline_<task>.png. Training settings: the daemon's defaults, except in the quick profile
(see QUICK_OVERRIDES; `--defaults` drops them, `--set` adds more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekif.atomic import atomic_write_json, atomic_write_text  # noqa: E402  (light: no torch)
from edgekif.config import load_config  # noqa: E402
from edgekif.errors import IntegrityError  # noqa: E402
from edgekif.export.manifest import read_manifest  # noqa: E402  (light: no torch)
from edgekif.layout import DataLayout  # noqa: E402
from tools.benchlib import cache_dir, cpu_model, package_versions, ram_gb  # noqa: E402

PY = sys.executable
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cl-benchmark"

# Applied in every profile. The forgetting gate still runs (its cost is measured); a high
# threshold only keeps a second task from being *held*, so drop-to-published is defined.
COMMON_OVERRIDES = ["service.forgetting_threshold=100"]
# Quick profile: the defaults (1 epoch = 12 steps of batch 8 at max_length 256 for a 90-example
# train split) cost ~20-40 s per step on 2 shared cores, i.e. 4-8 min of training alone. The
# quick profile trains 4 steps at max_length 128 (bench_cl's quick step budget, the demo's length).
QUICK_OVERRIDES = ["train.max_steps=4", "data.max_length=128"]
PROFILES = {
    "quick": dict(tasks=[("dbpedia", 100)], idle_s=20, startup_idle_s=5, overrides=QUICK_OVERRIDES, task_timeout=1200, replay_args=[]),
    # both task sizes and the full idle window, at the quick training budget: what grows with a
    # task's size besides training (validation, buffering, holdout evaluation), in minutes
    "standard": dict(tasks=[("dbpedia", 100), ("agnews", 1000)], idle_s=60, startup_idle_s=10, overrides=QUICK_OVERRIDES, task_timeout=1800, replay_args=[]),
    "full": dict(tasks=[("dbpedia", 100), ("agnews", 1000)], idle_s=60, startup_idle_s=10, overrides=[], task_timeout=4 * 3600, replay_args=[]),
}
STAGES = ("validate", "buffer", "train", "evaluate", "gate", "export", "publish")
# event kind that commits each stage's result (service/daemon.py)
STAGE_END = {"validate": "validated", "buffer": "buffered", "train": "trained", "evaluate": "evaluated", "export": "exported", "publish": "published"}
FINAL = {"published", "held", "failed", "rejected", "duplicate"}
MB = 1024 * 1024


def ts_epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ---- machine --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    versions = package_versions(("torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai", "psutil"))
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": ram_gb(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "loadavg_start": list(os.getloadavg())}


# ---- the daemon process --------------------------------------------------------------------------


class Sampler:
    """CPU % (of one core, like top) and RSS of the daemon plus its children (the export's
    onnxruntime-genai builder runs as a child process)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid)
        self.t0 = time.time()
        self.last = (time.monotonic(), self._cpu_seconds())
        self.samples: list[dict[str, Any]] = []

    def _cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system  # reaped children included
        for c in self._children():
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except self.psutil.Error:
                pass
        return total

    def _children(self):
        try:
            return self.proc.children(recursive=True)
        except self.psutil.Error:
            return []

    def sample(self, phase: str) -> dict[str, Any] | None:
        try:
            now, cpu = time.monotonic(), self._cpu_seconds()
            rss = self.proc.memory_info().rss
            child_rss = 0
            for c in self._children():
                try:
                    child_rss += c.memory_info().rss
                except self.psutil.Error:
                    pass
        except self.psutil.Error:
            return None
        t_prev, cpu_prev = self.last
        self.last = (now, cpu)
        s = {"t": round(time.time() - self.t0, 3), "phase": phase, "cpu_pct": round(100 * max(0.0, cpu - cpu_prev) / max(1e-6, now - t_prev), 1),
             "rss_mb": round(rss / MB, 1), "rss_children_mb": round(child_rss / MB, 1)}
        self.samples.append(s)
        return s

    def window(self, seconds: float, phase: str, interval: float = 1.0) -> list[dict[str, Any]]:
        """Sample every `interval` s for `seconds` s (the first delta starts now)."""
        self.last = (time.monotonic(), self._cpu_seconds())
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end - 1e-3:
            time.sleep(min(interval, max(0.0, end - time.monotonic())))
            s = self.sample(phase)
            if s is not None:
                out.append(s)
        return out


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        return {}
    cpu = [s["cpu_pct"] for s in samples]
    rss = [s["rss_mb"] for s in samples]
    tot = [s["rss_mb"] + s["rss_children_mb"] for s in samples]
    return {"samples": len(samples), "cpu_pct_mean": round(statistics.mean(cpu), 2), "cpu_pct_max": max(cpu),
            "rss_mb_mean": round(statistics.mean(rss), 1), "rss_mb_max": max(rss), "rss_with_children_mb_max": max(tot)}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stop_daemon(proc: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    t0 = time.monotonic()
    if proc.poll() is not None:
        return {"exit_code": proc.returncode, "stop_s": 0.0, "killed": False, "already_exited": True}
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        killed = True
    return {"exit_code": rc, "stop_s": round(time.monotonic() - t0, 2), "killed": killed}


def job_rows(state_db: Path) -> list[dict[str, Any]]:
    """Read-only look at the jobs table (polling must not take the daemon's write lock)."""
    if not state_db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute("SELECT jobs.id, jobs.state, files.name FROM jobs JOIN files ON files.id = jobs.file_id ORDER BY jobs.id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    return [{"id": r[0], "state": r[1], "file": r[2]} for r in rows]


def current_version(layout: DataLayout) -> str | None:
    try:
        return os.path.basename(os.readlink(layout.current).rstrip("/"))
    except OSError:
        return None


# ---- per-job breakdown -----------------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(path.parent.glob(path.name + "*"), reverse=True):  # rotated files first
        try:
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "ts" in obj:
                    obj["_t"] = ts_epoch(obj["ts"])
                    out.append(obj)
        except OSError:
            pass
    out.sort(key=lambda o: o["_t"])
    return out


def breakdown(data_dir: Path, job_id: int, t_drop: float, logs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage windows from state.db's event log: `attempt` (stage starts) -> committing event."""
    from service.jobs import JobStore

    with JobStore(DataLayout(data_dir).state_db) as store:
        job = store.get(job_id)
        events = store.events(job_id)
    ev = [{"kind": e.kind, "t": ts_epoch(e.ts), "data": e.data} for e in events]
    starts: dict[str, float] = {}
    attempts: dict[str, int] = {}
    stages: dict[str, dict[str, Any]] = {}
    for e in ev:
        if e["kind"] == "attempt":
            st = e["data"].get("stage")
            starts[st] = e["t"]  # a retry restarts the window
            attempts[st] = attempts.get(st, 0) + 1
    for stage, end_kind in STAGE_END.items():
        ends = [e["t"] for e in ev if e["kind"] == end_kind]
        if stage in starts and ends:
            stages[stage] = {"start": starts[stage] - t_drop, "end": ends[-1] - t_drop, "seconds": round(ends[-1] - starts[stage], 3), "attempts": attempts.get(stage, 1)}
    received = next((e["t"] for e in ev if e["kind"] == "received"), None)
    out: dict[str, Any] = {
        "job_id": job_id, "state": job.state, "version": job.version, "error": job.error,
        "pickup_s": round(received - t_drop, 3) if received else None,
        "stages": stages,
        "events": [{"kind": e["kind"], "t_since_drop": round(e["t"] - t_drop, 3), **({"data": e["data"]} if e["kind"] in ("attempt", "train_run", "trained", "error") else {})} for e in ev],
    }
    m = job.metrics
    tr = (m.get("train") or {}).get("metrics") or {}
    run = [e["data"] for e in ev if e["kind"] == "train_run"]
    out["train"] = {
        "steps": tr.get("steps"), "task_steps": tr.get("task_steps"), "replay_steps": tr.get("replay_steps"), "examples": tr.get("examples"),
        "loop_s": tr.get("seconds"), "s_per_step": round(tr["seconds"] / tr["steps"], 2) if tr.get("seconds") and tr.get("steps") else None,
        "stage_wall_s": run[-1].get("seconds") if run else None, "mean_loss": tr.get("mean_loss"), "last_loss": tr.get("last_loss"),
        "fusions": tr.get("fusions"), "strategy": tr.get("strategy"),
    }
    if out["train"]["stage_wall_s"] and out["train"]["loop_s"]:
        out["train"]["load_and_save_s"] = round(out["train"]["stage_wall_s"] - out["train"]["loop_s"], 2)
    out["validate"] = (m.get("validate") or {})
    out["buffer"] = (m.get("buffer") or {})
    out["evaluate"] = (m.get("evaluate") or {})
    out["gate"] = {k: v for k, v in (m.get("gate") or {}).items() if k in ("ok", "reasons", "threshold_points", "forced")}
    # The gate runs inside the export stage's guarded call (gate, then export): not timed apart.
    if "export" in stages:
        stages["gate"] = {"start": stages["export"]["start"], "end": stages["export"]["start"], "seconds": None, "included_in": "export"}
    # Learner precision and export sub-steps, from the daemon's JSON log.
    lo = min((s["start"] for s in stages.values()), default=0.0) + t_drop
    hi = max((s["end"] for s in stages.values()), default=0.0) + t_drop
    mine = [r for r in logs if lo - 0.01 <= r["_t"] <= hi + 0.01]
    ready = [r for r in mine if r.get("msg") == "learner ready"]
    if ready:
        out["model_precision"] = ready[0].get("precision")
        out["device"] = ready[0].get("device")
    for st in ("train", "evaluate"):  # model load (start -> "learner ready"), evaluate_task's own timings
        if st in stages:
            w0, w1 = stages[st]["start"] + t_drop, stages[st]["end"] + t_drop
            win = [r for r in mine if w0 - 0.01 <= r["_t"] <= w1 + 0.01]
            rd = next((r for r in win if r.get("msg") == "learner ready"), None)
            stages[st]["model_load_s"] = round(rd["_t"] - w0, 2) if rd else None
            if st == "evaluate":
                evs = [m for m in (re.match(r"evaluated (\d+) records: .*\(([\d.]+)s\)$", r.get("msg", "")) for r in win) if m]
                stages[st]["eval_records"] = sum(int(m.group(1)) for m in evs) if evs else None
                stages[st]["eval_s"] = round(sum(float(m.group(2)) for m in evs), 1) if evs else None
    if "export" in stages:
        ex0, ex1 = stages["export"]["start"] + t_drop, stages["export"]["end"] + t_drop
        exl = [r for r in mine if ex0 - 0.01 <= r["_t"] <= ex1 + 0.01]
        sub: list[dict[str, Any]] = []
        fused = next((r for r in exl if r.get("msg") == "fused model saved"), None)
        if fused:
            sub.append({"step": "gate + fuse adapter (fp32)", "seconds": round(fused["_t"] - ex0, 2)})
        t = fused["_t"] if fused else ex0
        for r in exl:
            if r.get("msg") == "running onnxruntime-genai model builder":
                t = r["_t"]
                prec = next((p for p in ("int4", "int8", "fp16", "fp32") if f"-p {p} " in r.get("cmd", "")), "?")
            elif r.get("msg") == "export checked on the holdout":
                sub.append({"step": f"build {r.get('variant', prec)} + answer check on the holdout", "seconds": round(r["_t"] - t, 2),
                            "agreement": r.get("agreement"), "passed": r.get("passed")})
                t = r["_t"]
            elif r.get("msg") == "export ready":
                sub.append({"step": "manifest + finish", "seconds": round(r["_t"] - t, 2)})
        out["export_steps"] = sub
    ver = job.version
    try:
        man = read_manifest(DataLayout(data_dir).version(ver)) if ver else None
    except IntegrityError:
        man = None
    if man:
        out["export"] = {"target": man.target, "precision": man.precision, "execution_provider": man.execution_provider,
                         "parity": man.parity, "parity_rejected": [r.get("precision") for r in man.parity_rejected or []],
                         "size_mb": round(sum(p.stat().st_size for p in DataLayout(data_dir).version(ver).rglob("*") if p.is_file()) / MB, 1)}
    return out


# ---- one dropped task ---------------------------------------------------------------------------


def drop_task(data_dir: Path, src: Path, name: str, n: int) -> tuple[str, float]:
    lines = [l for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
    if len(lines) < n:
        raise SystemExit(f"{src} has only {len(lines)} examples, {n} needed")
    random.Random(0).shuffle(lines)
    fname = f"{name}-{n}.jsonl"
    inbox = DataLayout(data_dir).inbox
    part = inbox / f"{fname}.part"  # ignored by the watcher until renamed
    part.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.rename(part, inbox / fname)
    return fname, time.time()


def run_task(daemon: subprocess.Popen, sampler: Sampler, data_dir: Path, src: Path, name: str, n: int, timeout: float) -> dict[str, Any]:
    layout = DataLayout(data_dir)
    before = current_version(layout)
    fname, t_drop = drop_task(data_dir, src, name, n)
    t_mono = time.monotonic()
    print(f"dropped {fname} ({n} examples); waiting for a new models/current (was {before})", flush=True)
    seen_at = None
    job = None
    next_sample = time.monotonic()
    samples = []
    last_line = ""
    while True:
        now = time.monotonic()
        if now >= next_sample:
            s = sampler.sample(f"job:{fname}")
            if s is not None:
                s["t_since_drop"] = round(now - t_mono, 2)
                samples.append(s)
            next_sample += 1.0
            rows = [r for r in job_rows(layout.state_db) if r["file"] == fname]
            job = rows[-1] if rows else None
            rt = read_json(layout.runtime_file) or {}
            cur = rt.get("current") or {}
            prog = read_json(layout.job(job["id"]).progress) if job else None
            line = f"job {job['id']} {job['state']}" if job else "waiting for pickup"
            if cur.get("stage"):
                line += f" / {cur['stage']}"
            if prog and prog.get("step") is not None and cur.get("stage") == "train":
                line += f" step {prog.get('step')}/{prog.get('steps')}"
            if line != last_line:
                print(f"  {now - t_mono:7.1f}s  {line}", flush=True)
                last_line = line
        cur_v = current_version(layout)
        if seen_at is None and cur_v is not None and cur_v != before:
            seen_at = time.time()
            print(f"  {time.monotonic() - t_mono:7.1f}s  models/current -> {cur_v}", flush=True)
        if job is not None and job["state"] in FINAL and (seen_at is not None or job["state"] != "published"):
            break
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode}; see {data_dir / 'daemon.stdout.log'}")
        if now - t_mono > timeout:
            raise TimeoutError(f"{fname}: not published within {timeout:.0f} s (job: {job})")
        time.sleep(0.25)
    res = {"task": name, "examples": n, "file": fname, "drop_epoch": t_drop, "outcome": job["state"],
           "drop_to_published_s": round(seen_at - t_drop, 2) if seen_at else None,
           "drop_to_final_s": round(time.time() - t_drop, 2), "version": current_version(layout),
           "resources": {**summarize(samples), "timeline": samples}}
    res.update(breakdown(data_dir, job["id"], t_drop, read_log(layout.log_file)))
    if seen_at and "publish" in res["stages"]:
        # the symlink swap happens inside the publish stage, before the daemon commits `published`
        res["published_commit_after_visible_s"] = round(res["stages"]["publish"]["end"] - (seen_at - t_drop), 3)
    return res


# ---- replay ----------------------------------------------------------------------------------------


def run_replay(out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [PY, str(REPO / "tools" / "bench_replay.py"), "--out", str(out / "replay.json"), *extra]
    print("replay buffer:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        return {"error": f"bench_replay exited {res.returncode}", "stderr_tail": res.stderr[-2000:], "command": cmd}
    data = read_json(out / "replay.json") or {}
    cfg = data.get("config", {})
    samp = {f"n{s['n']}": s for s in data.get("sampling", [])}
    return {
        "command": "python tools/bench_replay.py" + ("" if not extra else " " + " ".join(extra)),
        "wall_s": round(wall, 1), "config": cfg, "stored_examples": data.get("filled_total"),
        "insert_rate_first_task": data.get("insert_rate_first_task"), "insert_rate_last_task": data.get("insert_rate_last_task"),
        "insert_rate_first_quarter_median": data.get("insert_rate_first_quarter_median"),
        "insert_rate_last_quarter_median": data.get("insert_rate_last_quarter_median"),
        "arrival_with_eviction": data.get("arrival_with_eviction"),
        "sample_8_batches_per_s": samp.get("n8", {}).get("batches_per_s"), "sample_256_batches_per_s": samp.get("n256", {}).get("batches_per_s"),
        "sample_8_samples_per_s": samp.get("n8", {}).get("samples_per_s"), "sample_256_samples_per_s": samp.get("n256", {}).get("samples_per_s"),
        "db_mib_filled_with_wal": round(data.get("db_bytes_filled_with_wal", 0) / MB, 1),
        "raw": "replay.json",
    }


# ---- output ----------------------------------------------------------------------------------------


def plot_timeline(task: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]})
    colors = {"pickup": "#bbbbbb", "validate": "#8dd3c7", "buffer": "#80b1d3", "train": "#fb8072", "evaluate": "#fdb462", "export": "#b3de69", "publish": "#bc80bd"}
    bars = []
    if task.get("pickup_s") is not None:
        bars.append(("pickup", 0.0, task["pickup_s"]))
    for st in ("validate", "buffer", "train", "evaluate", "export", "publish"):
        s = task["stages"].get(st)
        if s:
            bars.append((st, s["start"], s["end"] - s["start"]))
    for i, (name, start, width) in enumerate(bars):
        ax1.barh(0, width, left=start, color=colors[name], edgecolor="black", linewidth=0.5)
        if width > 0.04 * max(1.0, task.get("drop_to_final_s") or 1.0):
            ax1.text(start + width / 2, 0, f"{name}\n{width:.1f}s", ha="center", va="center", fontsize=8)
    ax1.set_yticks([])
    if task.get("drop_to_published_s"):
        for ax in (ax1, ax2):
            ax.axvline(task["drop_to_published_s"], color="black", linestyle="--", linewidth=1)
    ax1.set_title(f"{task['file']}: drop -> published {task.get('drop_to_published_s')} s (stages from state.db events)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n, _, _ in bars]
    ax1.legend(handles, [n for n, _, _ in bars], ncol=len(bars), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.05), frameon=False)
    tl = task["resources"].get("timeline") or []
    x = [s["t_since_drop"] for s in tl]
    ax2.plot(x, [s["cpu_pct"] for s in tl], color="tab:red", linewidth=1, label="CPU % (daemon + children)")
    ax2.set_ylabel("CPU % (100 = 1 core)")
    ax2.set_xlabel("seconds since the rename into inbox/")
    ax3 = ax2.twinx()
    ax3.plot(x, [s["rss_mb"] + s["rss_children_mb"] for s in tl], color="tab:blue", linewidth=1, label="RSS MB (daemon + children)")
    ax3.plot(x, [s["rss_mb"] for s in tl], color="tab:blue", linewidth=1, linestyle=":", label="RSS MB (daemon)")
    ax3.set_ylabel("RSS (MB)")
    h1, l1 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h3, l1 + l3, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def to_markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        f"### Daemon: drop-to-published, idle cost, replay buffer (profile `{r['profile']}`)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; load average at start {m['loadavg_start'][0]:.2f}"
        f", at the end {r.get('loadavg_end', [0])[0]:.2f} (1-min averages, which lag: the start still shows whatever ran just before, "
        f"the end the daemon's own work). Wall time {r['wall_s'] / 60:.1f} min.  ",
        f"Daemon: `{('python -m service --data-dir DIR ' + ' '.join('--set ' + o for o in s['overrides'])).rstrip()}` (real library stages"
        f", base {s['model_base']} from the converted cache{' (cold: converted during the run)' if s.get('cache_was_cold') else ''}).  ",
        f"Settings: strategy {s['strategy']}, {s['train_steps_rule']}, batch {s['batch_size']}, max_length {s['max_length']}, lr {s['lr']}, "
        f"LoRA r={s['lora_r']} on {','.join(s['lora_targets'])}, model precision {s['model_precision']}, holdout {s['holdout']}, "
        f"eval label_scoring={s['label_scoring']}, export target {s['export_target']} (precision {s['export_precision_setting']} → "
        f"{s.get('export_precision_published') or '—'}), service quiet_seconds {s['quiet_seconds']} / scan_interval {s['scan_interval']}, "
        f"nice {s.get('nice')} (the daemon yields to other work on a shared box), model.threads {s.get('threads')} (0 = torch default), "
        f"forgetting_threshold {s['forgetting_threshold']}.",
        "",
        "| task file | examples (train/holdout) | train steps | drop → published (s) | pickup | validate | buffer | train | evaluate | gate | export | publish | peak RSS MB (daemon / +children) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["tasks"]:
        st = t["stages"]
        buf = (t.get("buffer") or {})
        tr_ex = (buf.get("details") or {}).get("train_examples")
        cells = [_f((st.get(k) or {}).get("seconds")) for k in ("validate", "buffer", "train", "evaluate")]
        gate = "in export" if "gate" in st else "—"
        res = t["resources"]
        lines.append(
            f"| {t['file']} | {t['examples']} ({_f(tr_ex, '{}')}/{_f(buf.get('holdout_examples'), '{}')}) | {_f(t['train'].get('steps'), '{}')} "
            f"| **{_f(t['drop_to_published_s'])}**{'' if t['outcome'] == 'published' else ' (' + t['outcome'] + ')'} | {_f(t.get('pickup_s'))} | "
            + " | ".join(cells) + f" | {gate} | {_f((st.get('export') or {}).get('seconds'))} | {_f((st.get('publish') or {}).get('seconds'))} "
            f"| {_f(res.get('rss_mb_max'), '{:.0f}')} / {_f(res.get('rss_with_children_mb_max'), '{:.0f}')} |"
        )
    lines += ["", "Stage seconds: from the stage's `attempt` event to the event committing its result (state.db). pickup: rename → job `received` "
              "(includes the watcher's `quiet_seconds` stability wait). The forgetting gate runs inside the export stage's call and is not timed "
              "apart (a comparison of a few accuracies)."]
    for t in r["tasks"]:
        tr, st = t["train"], t["stages"]
        lines += ["", f"`{t['file']}` details: train {tr.get('steps')} steps ({tr.get('task_steps')} task + {tr.get('replay_steps')} replay), "
                  f"loop {_f(tr.get('loop_s'))} s = {_f(tr.get('s_per_step'), '{:.2f}')} s/step, model load + save {_f(tr.get('load_and_save_s'))} s, "
                  f"model precision {t.get('model_precision', '—')}; evaluate: model load {_f(st.get('evaluate', {}).get('model_load_s'))} s, "
                  f"{_f(st.get('evaluate', {}).get('eval_records'), '{}')} holdout records in {_f(st.get('evaluate', {}).get('eval_s'))} s "
                  f"(greedy answers + label scoring), accuracies "
                  + ", ".join(f"{k} {100 * v:.1f}" for k, v in ((t.get('evaluate') or {}).get('accuracies') or {}).items())
                  + f"; export {((t.get('export') or {}).get('target'))} {((t.get('export') or {}).get('precision'))}"
                  + (f" (parity rejected: {', '.join(t['export']['parity_rejected'])})" if (t.get('export') or {}).get('parity_rejected') else "")
                  + f", {_f((t.get('export') or {}).get('size_mb'))} MB."]
        if t.get("export_steps"):
            lines += ["", "| export step | s | next-token agreement |", "|---|---|---|"]
            for e in t["export_steps"]:
                lines.append(f"| {e['step']} | {_f(e['seconds'])} | {_f(e.get('agreement'), '{:.3f}')} |")
        if t.get("plot"):
            lines += ["", f"![{t['file']} stage timeline with CPU and RSS]({t['plot']})"]
    a, idle = r["after_start"], r["idle"]
    lines += [
        "",
        "| daemon idle cost | window | mean CPU % | max RSS MB | torch imported |",
        "|---|---|---|---|---|",
        f"| right after start, no job yet | {a.get('samples')} s | {_f(a.get('cpu_pct_mean'), '{:.2f}')} | {_f(a.get('rss_mb_max'), '{:.0f}')} | {a.get('torch_loaded')} |",
        f"| idle after the work | {idle.get('samples')} s | {_f(idle.get('cpu_pct_mean'), '{:.2f}')} | {_f(idle.get('rss_mb_max'), '{:.0f}')} | {idle.get('torch_loaded')} |",
        "",
        f"CPU % of one core (psutil, 1 s samples, daemon + children). Start → `daemon.json` running: {_f(r['startup_s'], '{:.2f}')} s; "
        f"SIGTERM → exit: {_f(r['stop'].get('stop_s'), '{:.2f}')} s (exit code {r['stop'].get('exit_code')}).",
    ]
    rp = r.get("replay") or {}
    if "error" in rp:
        lines += ["", f"Replay buffer: {rp['error']}"]
    elif rp:
        c = rp.get("config", {})
        arr = rp.get("arrival_with_eviction") or {}
        lines += [
            "",
            f"| replay buffer (`{rp['command']}`: {c.get('tasks')} tasks × {c.get('per_task')} records, capacity {c.get('capacity')}) | value |",
            "|---|---|",
            f"| insert rate, first task (empty buffer) | {_f(rp.get('insert_rate_first_task'), '{:,.0f}')} records/s |",
            f"| insert rate, last task (buffer at {rp.get('stored_examples'):,}) | {_f(rp.get('insert_rate_last_task'), '{:,.0f}')} records/s |",
            f"| median insert rate, first / last quarter of tasks | {_f(rp.get('insert_rate_first_quarter_median'), '{:,.0f}')} / {_f(rp.get('insert_rate_last_quarter_median'), '{:,.0f}')} records/s |",
            f"| one more task arriving ({arr.get('evicted_from_older', 0):,} evictions) | {_f(arr.get('seconds'), '{:.2f}')} s |",
            f"| `sample(8)` at {rp.get('stored_examples'):,} stored | {_f(rp.get('sample_8_batches_per_s'), '{:,.0f}')} batches/s ({_f(rp.get('sample_8_samples_per_s'), '{:,.0f}')} samples/s) |",
            f"| `sample(256)` | {_f(rp.get('sample_256_batches_per_s'), '{:,.0f}')} batches/s ({_f(rp.get('sample_256_samples_per_s'), '{:,.0f}')} samples/s) |",
            f"| database size (db + WAL) | {_f(rp.get('db_mib_filled_with_wal'))} MiB |",
        ]
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100-example task only, reduced training, 20 s idle sampling")
    ap.add_argument("--profile", choices=list(PROFILES), default="full",
                    help="quick: 100-example task; standard: 100 + 1000-example tasks, quick training; full: both, daemon defaults")
    ap.add_argument("--out", type=Path, default=None, help="default bench_out/daemon-<profile>")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's data dir")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cl-benchmark folder (<task>/train.jsonl)")
    ap.add_argument("--data-dir", type=Path, default=None, help="daemon data dir (default: a fresh temp dir; must not exist or be empty)")
    ap.add_argument("--defaults", action="store_true", help="quick profile with the daemon's default training settings")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra daemon --set override (repeatable)")
    ap.add_argument("--idle", type=float, default=None, help="seconds of idle sampling after the work")
    ap.add_argument("--replay-args", default=None, help="arguments for tools/bench_replay.py (default: its defaults: 100k stored)")
    ap.add_argument("--fake-stages", action="store_true", help=argparse.SUPPRESS)  # plumbing test: the daemon's test stages
    args = ap.parse_args(argv)

    try:
        import psutil  # noqa: F401
    except ImportError:
        print("bench_daemon needs psutil (pip install psutil)", file=sys.stderr)
        return 2

    profile = "quick" if args.quick else args.profile
    prof = PROFILES[profile]
    out = args.out or Path("bench_out") / f"daemon-{profile}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = COMMON_OVERRIDES + ([] if args.defaults else list(prof["overrides"])) + list(args.overrides)
    idle_s = args.idle if args.idle is not None else prof["idle_s"]
    replay_args = shlex.split(args.replay_args) if args.replay_args is not None else list(prof["replay_args"])

    env = dict(os.environ)
    env.setdefault("EDGEKIF_CACHE_DIR", str(cache_dir()))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("NOTIFY_SOCKET", None)
    cache = Path(env["EDGEKIF_CACHE_DIR"])
    cache_cold = not any((cache / "models").glob("*/config.json"))

    if args.data_dir is not None:
        data_dir = args.data_dir.resolve()
        if data_dir.exists() and any(data_dir.iterdir()):
            print(f"{data_dir} is not empty; give a fresh --data-dir", file=sys.stderr)
            return 2
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="bench_daemon_"))
    cfg = load_config(None, overrides + [f"data_dir={data_dir}"])  # the daemon's effective settings

    command = "python tools/bench_daemon.py" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    if "EDGEKIF_CACHE_DIR" in os.environ:
        command = f"EDGEKIF_CACHE_DIR={os.environ['EDGEKIF_CACHE_DIR']} " + command
    result: dict[str, Any] = {
        "profile": profile, "command": command, "machine": machine_info(), "data_dir": str(data_dir) if args.keep else None,
        "settings": {
            "overrides": overrides, "model_base": cfg.model.base, "model_precision_setting": cfg.model.precision,
            "strategy": cfg.train.strategy, "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs,
            "train_steps_rule": (f"{cfg.train.max_steps} task steps" if cfg.train.max_steps else f"{cfg.train.epochs:g} epoch (ceil(epochs × train examples / batch) task steps)")
            + (f" + Recurrent-KIF outer steps (Q={cfg.kif.inner_steps}, M={cfg.kif.outer_steps}) once a past task is buffered" if cfg.train.strategy == "recurrent_kif" else ""),
            "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length, "lr": cfg.train.lr,
            "lora_r": cfg.lora.r, "lora_targets": cfg.lora.target_modules,
            "holdout": f"{cfg.service.holdout_fraction:g} of the file, at most {cfg.service.holdout_max}",
            "label_scoring": cfg.eval.label_scoring, "export_target": cfg.export.target, "export_precision_setting": cfg.export.precision,
            "quiet_seconds": cfg.service.quiet_seconds, "scan_interval": cfg.service.scan_interval, "nice": cfg.service.nice, "threads": cfg.model.threads,
            "forgetting_threshold": cfg.service.forgetting_threshold, "cache_dir": str(cache), "cache_was_cold": cache_cold,
            "tasks": [{"task": t, "examples": n} for t, n in prof["tasks"]], "idle_s": idle_s,
        },
        "tasks": [],
    }
    print(f"data dir: {data_dir}\noverrides: {' '.join(overrides)}\ncache: {cache}{' (cold!)' if cache_cold else ''}", flush=True)

    if args.fake_stages:
        atomic_write_json(data_dir / "fake_stages.json", {"train_steps": 3, "step_seconds": 0.5, "stage_seconds": 0.3})
    t_all = time.monotonic()
    log_f = open(data_dir / "daemon.stdout.log", "w") if data_dir.exists() else None
    module = "service.fake_stages" if args.fake_stages else "service"  # the testing entry point runs the daemon with FakeStages
    cmd = [PY, "-m", module, "--data-dir", str(data_dir), *[x for o in overrides for x in ("--set", o)]]
    t_start = time.monotonic()
    daemon = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_f, stderr=subprocess.STDOUT)
    rc = 0
    try:
        sampler = Sampler(daemon.pid)
        while True:  # ready: daemon.json says running
            rt = read_json(DataLayout(data_dir).runtime_file)
            if rt and rt.get("state") == "running" and rt.get("pid") == daemon.pid:
                break
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.returncode} at start; see {data_dir / 'daemon.stdout.log'}")
            if time.monotonic() - t_start > 120:
                raise TimeoutError("daemon not running after 120 s")
            time.sleep(0.05)
        result["startup_s"] = round(time.monotonic() - t_start, 3)
        print(f"daemon running after {result['startup_s']:.2f} s (pid {daemon.pid}); sampling {prof['startup_idle_s']} s before any job", flush=True)
        pre = sampler.window(prof["startup_idle_s"], "after_start")
        result["after_start"] = {**summarize(pre), "torch_loaded": (read_json(DataLayout(data_dir).runtime_file) or {}).get("torch_loaded")}

        for task, n in prof["tasks"]:
            t = run_task(daemon, sampler, data_dir, args.data / task / "train.jsonl", task, n, prof["task_timeout"])
            png = f"timeline_{task}_{n}.png"
            if plot_timeline(t, out / png):
                t["plot"] = png
            result["tasks"].append(t)
            atomic_write_json(out / "result.json", result)  # partial results survive an interrupted run
            print(f"{t['file']}: {t['outcome']}, drop -> published {t['drop_to_published_s']} s", flush=True)

        print(f"sampling the idle daemon for {idle_s:.0f} s", flush=True)
        idle = sampler.window(idle_s, "idle")
        result["idle"] = {**summarize(idle), "torch_loaded": (read_json(DataLayout(data_dir).runtime_file) or {}).get("torch_loaded")}
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        rc = 1
        if isinstance(e, KeyboardInterrupt):
            rc = 130
        print(f"error: {result['error']}", file=sys.stderr, flush=True)
    finally:
        result["stop"] = stop_daemon(daemon)
        if log_f is not None:
            log_f.close()
        result["resource_timeline"] = getattr(locals().get("sampler"), "samples", [])
    result.setdefault("after_start", {})
    result.setdefault("idle", {})

    if rc == 0:
        result["replay"] = run_replay(out, replay_args)
    pubs = [t for t in result["tasks"] if t.get("export")]
    result["settings"]["export_precision_published"] = pubs[-1]["export"]["precision"] if pubs else None
    precs = [t.get("model_precision") for t in result["tasks"] if t.get("model_precision")]
    result["settings"]["model_precision"] = precs[0] if precs else cfg.model.precision
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.monotonic() - t_all, 1)
    by_n = {t["examples"]: t for t in result["tasks"]}
    rp = result.get("replay") or {}
    result["headline"] = {
        **{f"drop_to_published_s_{n}": t.get("drop_to_published_s") for n, t in by_n.items()},
        **{f"train_s_per_step_{n}": t["train"].get("s_per_step") for n, t in by_n.items()},
        "idle_cpu_pct_mean": result["idle"].get("cpu_pct_mean"),
        "idle_rss_mb_max": result["idle"].get("rss_mb_max"),
        "after_start_rss_mb_max": result["after_start"].get("rss_mb_max"),
        "peak_rss_mb_with_children": max((t["resources"].get("rss_with_children_mb_max") or 0 for t in result["tasks"]), default=None),
        "replay_insert_records_per_s_at_100k": rp.get("insert_rate_last_task"),
        "replay_sample8_batches_per_s_at_100k": rp.get("sample_8_batches_per_s"),
    }
    result["headline"].setdefault("drop_to_published_s_100", None)
    atomic_write_json(out / "result.json", result)
    if rc == 0:
        md = to_markdown(result)
        atomic_write_text(out / "result.md", md)
        print("\n" + md)
    if args.keep:
        print(f"data dir kept: {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"wrote {out / 'result.json'}" + (f" and {out / 'result.md'}" if rc == 0 else "") + f"; wall {result['wall_s']:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
