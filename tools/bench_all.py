#!/usr/bin/env python
"""Run every benchmark in one go and regenerate docs/benchmarks.md (and the README's headline
figures) from that run alone.

    python tools/bench_all.py --quick                # make bench-quick: minutes on 2 cores
    python tools/bench_all.py --profile standard     # make bench-standard: about 80 min
    python tools/bench_all.py                        # make bench: the full profile (hours on 2 cores)
    python tools/bench_all.py --resume    # continue an interrupted run: finished sections are kept

Each section is one of the benchmark tools run as a subprocess, with its log in
OUT/<section>.log and its results in OUT/<section>/:
  cl       tools/bench_cl.py      continual-learning quality + per-strategy training cost
  train    tools/bench_train.py   peak memory per precision, Recurrent-KIF overhead, scaling
  serving  tools/bench_serving.py tokens/s, first-token latency, sizes, `edgekif infer` latency
  daemon   tools/bench_daemon.py  drop-to-published, idle cost, replay buffer rates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekif.strategies import strategy_names  # noqa: E402  (torch-free registry)
from tools import benchlib  # noqa: E402

SECTIONS = ("cl", "train", "serving", "daemon")
HEADLINE_BEGIN = "<!-- bench:headline:begin -->"
HEADLINE_END = "<!-- bench:headline:end -->"
TRIALS_MARKER = "<!-- bench:trials: one-off development trials below, kept when the report is regenerated -->"


# every continual-learning run also merges its summary here (one entry per profile and order)
RESULTS = ["--results-json", "docs/benchmarks/results.json"]

PROFILES = {
    # profile: {section: [(run name, tool argv)]}; a run writes its results into OUT/<run name>/
    # quick: every tool at smoke size (under 15 min on 2 cores)
    "quick": {
        "cl": [("cl-order1", ["tools/bench_cl.py", "--quick", "--order", "1", "--seeds", "0", *RESULTS])],
        "train": [("train", ["tools/bench_train.py", "--quick"])],
        "serving": [("serving", ["tools/bench_serving.py", "--quick"])],
        "daemon": [("daemon", ["tools/bench_daemon.py", "--quick"])],
    },
    # standard: mid-size continual-learning runs on order 1 (3 seeds) and every measurement the
    # report names (100 infer prompts, 100- and 1000-example drops, 60 s idle) at reduced
    # training budgets: about 80 min on 2 cores
    "standard": {
        "cl": [("cl-order1", ["tools/bench_cl.py", "--profile", "standard", "--order", "1", "--seeds", "0", "1", "2", *RESULTS])],
        "train": [("train", ["tools/bench_train.py"])],
        "serving": [("serving", ["tools/bench_serving.py", "--profile", "standard"])],
        "daemon": [("daemon", ["tools/bench_daemon.py", "--profile", "standard"])],
    },
    # full: orders 1-3 at bench_cl's default size, 3 seeds each, every export target,
    # the daemon's default training (hours on 2 cores; --resume continues an interrupted run)
    "full": {
        "cl": [
            ("cl-order1", ["tools/bench_cl.py", "--order", "1", "--seeds", "0", "1", "2", *RESULTS]),
            ("cl-order2", ["tools/bench_cl.py", "--order", "2", "--seeds", "0", "1", "2", *RESULTS]),
            ("cl-order3", ["tools/bench_cl.py", "--order", "3", "--seeds", "0", "1", "2", *RESULTS]),
        ],
        "train": [("train", ["tools/bench_train.py"])],
        "serving": [("serving", ["tools/bench_serving.py"])],
        "daemon": [("daemon", ["tools/bench_daemon.py"])],
    },
}
MAKE_TARGET = {"quick": "make bench-quick", "standard": "make bench-standard", "full": "make bench"}


# --------------------------------------------------------------------------- running


def run_all(out: Path, profile: str, sections: list[str], resume: bool, run_started: str, commit: str) -> dict:
    # one converted base model for every tool and the daemon, shared with `make demo`
    env = {**os.environ, "EDGEKIF_CACHE_DIR": str(benchlib.cache_dir())}
    runs = {}
    for section in sections:
        for name, argv in PROFILES[profile][section]:
            done = out / name / ".done.json"
            if resume and done.is_file():
                runs[name] = json.loads(done.read_text())
                print(f"[bench_all] {name}: kept from an earlier run ({runs[name]['finished']})", flush=True)
                continue
            cmd = [sys.executable, *argv, "--out", str(out / name)]
            print(f"[bench_all] {name}: {' '.join(argv)}", flush=True)
            t0 = time.perf_counter()
            with open(out / f"{name}.log", "wb") as log:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            info = {"command": "python " + " ".join(argv), "rc": rc, "seconds": time.perf_counter() - t0,
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_started": run_started, "commit": commit}
            runs[name] = info
            if rc == 0:
                (out / name).mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(info))
            status = "ok" if rc == 0 else f"FAILED (exit {rc}), see {out / name}.log"
            print(f"[bench_all] {name}: {status} in {info['seconds']:.0f} s", flush=True)
    return runs


# --------------------------------------------------------------------------- the report


def machine_stamp() -> dict:
    gpu = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = r.stdout.strip() or None
    return {**benchlib.machine_info(), "gpu": gpu, "os": platform.platform()}


def git_commit() -> str:
    """HEAD, '+dirty' when tracked files differ from it (the report's own outputs do not count)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!README.md", ":!docs/benchmarks.md", ":!docs/benchmarks"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    return commit + ("+dirty" if dirty else "")


def _load(out: Path, name: str) -> dict | None:
    p = out / name / "result.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _section_md(out: Path, name: str, img_dir: Path, img_prefix: str) -> str | None:
    """A tool's result.md with its PNGs copied next to the report and the links rewritten."""
    p = out / name / "result.md"
    if not p.is_file():
        return None
    md = p.read_text()
    for png in sorted((out / name).glob("*.png")):
        dest = f"{name}-{png.name}"
        shutil.copyfile(png, img_dir / dest)
        md = md.replace(f"]({png.name})", f"]({img_prefix}/{dest})")
    return md.strip()


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def headline(out: Path) -> dict:
    h: dict = {}
    cl = _load(out, "cl-order1")
    if cl:
        st = cl["strategies"]
        for s in strategy_names():
            if s in st:
                h[s] = {"op": st[s]["op_mean"], "bwt": st[s]["bwt_mean"], "op_std": st[s].get("op_std"), "bwt_std": st[s].get("bwt_std")}
        h["cl_profile"] = cl.get("profile")
        h["cl_seeds"] = len(cl["settings"]["seeds"])
        h["cl_test"] = cl["settings"]["test_per_task"]
    serving = _load(out, "serving")
    if serving:
        h["serving"] = serving.get("headline", {})
    daemon = _load(out, "daemon")
    if daemon:
        h["daemon"] = daemon.get("headline", {})
    return h


def headline_md(h: dict, report_link: str) -> str:
    lines = []
    if "recurrent_kif" in h and "seq_lora" in h:
        k, s = h["recurrent_kif"], h["seq_lora"]
        many = (h.get("cl_seeds") or 1) > 1

        def op_bwt(x: dict) -> str:
            if many and x.get("op_std") is not None and x.get("bwt_std") is not None:
                return f"OP {_pct(x['op'])} ± {100 * x['op_std']:.1f} / BWT {_pct(x['bwt'])} ± {100 * x['bwt_std']:.1f}"
            return f"OP {_pct(x['op'])} / BWT {_pct(x['bwt'])}"

        lines.append(
            f"* **Continual learning** (SmolLM2-135M, 4-task benchmark, order 1, `{h.get('cl_profile')}` profile"
            + (f", mean ± std over {h['cl_seeds']} seeds" if many else "") + "): "
            f"Recurrent-KIF {op_bwt(k)} vs sequential LoRA {op_bwt(s)}"
            + (f" (replay {_pct(h['replay']['op'])} / {_pct(h['replay']['bwt'])}; multi-task upper bound OP {_pct(h['mtl']['op'])})" if "replay" in h and "mtl" in h else "")
            + "."
            + (f" One seed and {h['cl_test']} test examples per task: differences of a few points are within noise." if h.get("cl_seeds") == 1 and h.get("cl_test") else "")
        )
    sv = h.get("serving") or {}
    if sv.get("genai_int4_vs_eager_fp32_tokens_per_s_ratio"):
        lines.append(
            f"* **Serving**: onnxruntime-genai int4 generates {sv['genai_int4_vs_eager_fp32_tokens_per_s_ratio']:.1f}× the tokens/s of PyTorch eager fp32 "
            f"({sv.get('genai_int4_tokens_per_s', 0):.0f} vs {sv.get('eager_fp32_tokens_per_s', 0):.0f} tokens/s, batch 1)"
            + (f"; int8, which the daemon publishes for this base because no int4 keeps its answers, {sv['genai_int8_vs_eager_fp32_tokens_per_s_ratio']:.1f}× "
               f"({sv['genai_int8_tokens_per_s']:.0f} tokens/s)" if sv.get("genai_int8_vs_eager_fp32_tokens_per_s_ratio") else "")
            + (f"; against llama.cpp on the same base at the same bits: int8 {sv['vs_llamacpp_int8']:.2f}× Q8_0's decode speed"
               + (f", int4 {sv['vs_llamacpp_int4']:.2f}× Q4_1's" if sv.get("vs_llamacpp_int4") else "") if sv.get("vs_llamacpp_int8") else "")
            + "."
        )
    dm = h.get("daemon") or {}
    if dm.get("drop_to_published_s_100") is not None:
        big = (f", a 1000-example task in {dm['drop_to_published_s_1000']:.0f} s (same training-step budget)"
               if dm.get("drop_to_published_s_1000") is not None else "")
        lines.append(f"* **Daemon**: a 100-example task goes from file drop to a published version in {dm['drop_to_published_s_100']:.0f} s{big} "
                     f"(real stages; the benchmark's training settings are in the report).")
    if lines and h.get("machine"):
        m = h["machine"]
        lines.insert(0, f"Measured on {m['cpu']}, {m['cores']} cores, {m.get('gpu') or 'no GPU'}:")
    if not lines:
        return f"No benchmark figures yet: run `make bench-quick`. Report: [{report_link}]({report_link})."
    return "\n".join(lines) + f"\n\nEvery figure, with the command and machine: [{report_link}]({report_link})."


def cl_cost_md(out: Path, names: list[str]) -> str | None:
    """Per-strategy training cost from the continual-learning runs (same run, same data)."""
    rows = []
    for name in names:
        r = _load(out, name)
        if not r:
            continue
        st = r["strategies"]
        base = st.get("seq_lora", {}).get("sec_per_step")
        for s, v in st.items():
            runs = v["runs"]
            eps = statistics.mean(x["examples_per_sec"] for x in runs)
            spw = v["sec_per_step"]
            rows.append(f"| {name} | {s} | {spw:.2f} | {eps:.2f} | {spw / base:.2f}× |" if base else f"| {name} | {s} | {spw:.2f} | {eps:.2f} | — |")
    if not rows:
        return None
    return "\n".join([
        "Seconds per gradient step and examples per second of training, per strategy, from the continual-learning runs above "
        "(same base, data, batch size and machine; wall time of `train_task` divided by its gradient steps, "
        "so fusions and replay batches are included):",
        "",
        "| run | strategy | s / step | examples / s | s / step vs seq_lora |",
        "|---|---|---|---|---|",
        *rows,
    ])


def write_report(out: Path, runs: dict, profile: str, wall: float, docs: Path, readme: Path | None) -> Path:
    from edgekif.atomic import atomic_write_text

    img_dir = docs / "benchmarks"
    if img_dir.exists():
        shutil.rmtree(img_dir)  # images of an earlier run must not linger
    img_dir.mkdir(parents=True)
    m = machine_stamp()
    h = headline(out)
    h["machine"] = m
    cmd = MAKE_TARGET[profile]
    last = max((datetime.fromisoformat(r["finished"]) for r in runs.values()), default=datetime.now(timezone.utc))
    finished = last.strftime("%Y-%m-%d %H:%M UTC")  # when the last section ended, also for --report-only
    # the code that ran: HEAD when each section started (a section without the stamp predates it)
    commits = sorted({r["commit"] for r in runs.values() if r.get("commit")}) or [git_commit() + " (HEAD when the report was written)"]
    m["commit"] = commits[0] if len(commits) == 1 else ", ".join(commits)
    # a section without run_started predates this stamp: count it as a run of its own
    started = sorted({r.get("run_started") or f"unknown ({r['finished']})" for r in runs.values()})
    if len(started) == 1:
        provenance = (f"Every number below comes from that one run (started {started[0]}, all {len(runs)} sections); "
                      "each section names the tool and command that produced it.")
    else:
        provenance = (f"**The sections come from {len(started)} different runs** (see *run started* in the table below: "
                      "`--resume` or `--sections` kept earlier results); run the command again without them for a single-run report.")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{cmd}` (`python tools/bench_all.py --profile {profile}`), profile **{profile}**, "
        f"finished {finished}, wall time {wall / 60:.1f} min, commit `{m['commit']}`. "
        + provenance + " The file is overwritten by the next run.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| RAM | {m['ram_gb']} GiB |",
        f"| GPU | {m['gpu'] or 'none'} |",
        f"| OS / Python | {m['os']} / {m['python']} |",
        f"| packages | {', '.join(f'{k} {v}' for k, v in m['versions'].items())} |",
        "",
        "## Headline",
        "",
        headline_md(h, "benchmarks.md").replace("\n\nEvery figure, with the command and machine: [benchmarks.md](benchmarks.md).", ""),
        "",
        "| section | command | exit | wall (s) | run started (UTC) | finished (UTC) |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | `{r['command']}` | {r['rc']} | {r['seconds']:.0f} | {r.get('run_started', '?')} | {r['finished']} |" for n, r in runs.items()],
        "",
    ]

    cl_names = [n for n, _ in PROFILES[profile]["cl"]]
    lines += ["## 1. Continual-learning quality", ""]
    for name in cl_names:
        md = _section_md(out, name, img_dir, "benchmarks")
        if md is None:
            lines += [f"`{name}`: no result (see the section table above).", ""]
            continue
        lines += [md, ""]
        # first seed's heatmaps inline; the other seeds' are kept beside them
        heat = sorted(p for p in img_dir.glob(f"{name}-heatmap_*.png") if not re.search(r"_s\d+$", p.stem))
        if heat:
            lines += [" ".join(f"![{p.stem}](benchmarks/{p.name})" for p in heat), ""]
    lines += [
        "OP = mean accuracy over all tasks after the last one; BWT = mean change of each earlier task's accuracy "
        "from just after learning it to the end (negative = forgetting); FWT = mean over tasks 2..T of the accuracy on a task "
        "just before learning it minus the base model's zero-shot accuracy on it (computed where the profile measures zero-shot accuracy). Paper (T5-large, full data): Recurrent-KIF OP 78.4 / BWT −2.8, "
        "sequential LoRA 43.7 / −50.4, multi-task 80.3.",
        "",
        "## 2. Training cost",
        "",
    ]
    cost = cl_cost_md(out, cl_names)
    if cost:
        lines += [cost, ""]
    md = _section_md(out, "train", img_dir, "benchmarks")
    lines += [md or "`train`: no result.", ""]
    lines += ["## 3. Serving", ""]
    md = _section_md(out, "serving", img_dir, "benchmarks")
    lines += [md or "`serving`: no result.", ""]
    lines += ["## 4. Daemon and replay buffer", ""]
    md = _section_md(out, "daemon", img_dir, "benchmarks")
    lines += [md or "`daemon`: no result.", ""]
    lines += ["## 5. Scaling", "", "Step time and peak memory as sequence length and LoRA rank double: the *Scaling* table and plot in section 2.", ""]
    lines += ["## GPU", ""]
    if m["gpu"]:
        lines += [f"This run had a GPU ({m['gpu']}); the tools above used it where their device option selected it."]
    elif benchlib.gpu_figures_measured(docs / "benchmarks" / "gpu" / "gpu_check.json"):
        lines += ["This run had no GPU. What was measured on a lent GPU machine (`tools/device_run.sh`: `tools/gpu_check.py` and the "
                  "`large` profile) is in \"GPU: a lent H200\" below, from docs/benchmarks/gpu and docs/benchmarks/cl-large-order1-gpu."]
    else:
        lines += ["**Pending.** This machine has no GPU and no GPU machine was lent to the session that produced this report; "
                  "on a CUDA host `make bench` runs the same tools (nf4 through bitsandbytes CUDA, onnxruntime-genai-cuda)."]
    report = docs / "benchmarks.md"
    # one-off development trials (sweeps, format trials) live below the marker and are kept
    old = report.read_text() if report.is_file() else ""
    trials = old[old.index(TRIALS_MARKER):] if TRIALS_MARKER in old else ""
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n" + ("\n" + trials.rstrip() + "\n" if trials else ""))
    if readme is not None and readme.is_file():
        text = readme.read_text()
        if HEADLINE_BEGIN in text and HEADLINE_END in text:
            block = f"{HEADLINE_BEGIN}\n{headline_md(h, 'docs/benchmarks.md')}\n{HEADLINE_END}"
            text = re.sub(re.escape(HEADLINE_BEGIN) + ".*?" + re.escape(HEADLINE_END), lambda _m: block, text, flags=re.S)
            atomic_write_text(readme, text)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --profile quick")
    ap.add_argument("--out", help="work folder (default bench_out/all-<profile>)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--resume", action="store_true", help="keep sections an earlier run of this profile finished")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from OUT without running anything")
    ap.add_argument("--docs", default=str(REPO / "docs"))
    ap.add_argument("--no-readme", action="store_true", help="do not update the README's headline block")
    args = ap.parse_args(argv)
    if args.quick:
        args.profile = "quick"
    out = Path(args.out or REPO / f"bench_out/all-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = {} if args.report_only else run_all(out, args.profile, args.sections, args.resume, run_started, git_commit())
    # the report covers every section of the profile: those not run now come from their last run in OUT
    for section in SECTIONS:
        for name, _ in PROFILES[args.profile][section]:
            done = out / name / ".done.json"
            if name not in runs and done.is_file():
                runs[name] = json.loads(done.read_text())
    # one run: its wall clock; results gathered from several runs: the sum of their sections
    fresh = not args.report_only and not args.resume and set(args.sections) == set(SECTIONS)
    wall = time.perf_counter() - t0 if fresh else sum(r["seconds"] for r in runs.values())
    report = write_report(out, runs, args.profile, wall, Path(args.docs), None if args.no_readme else REPO / "README.md")
    print(f"[bench_all] wrote {report} ({wall / 60:.1f} min of benchmarks)")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
