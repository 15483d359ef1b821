#!/usr/bin/env python
"""`make demo`: the daemon end to end on the default base model.

Starts `edgekif serve` on a fresh data dir (.edgekif-demo/), drops small slices of two
benchmark tasks into its inbox, waits until each is published (or held by the forgetting
gate), prints the status table, each version's accuracies as measured on its ONNX export,
and the published model's answers to a few test prompts, then stops the daemon with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekif.layout import DataLayout  # noqa: E402  (import-free)

# The benchmark data beside the checkout when it is there; otherwise the slices shipped in
# tools/demo_data (the 192 train + 3 test examples of dbpedia and agnews the demo uses: the
# first 192 of the same seeded shuffle, so both sources give the same files).
SHARED_DATA = REPO.parent / "shared" / "data" / "cl-benchmark"
DATA = Path(os.environ["EDGEKIF_DEMO_DATA"]) if os.environ.get("EDGEKIF_DEMO_DATA") else SHARED_DATA if SHARED_DATA.is_dir() else REPO / "tools" / "demo_data"
PY = sys.executable


def edgekif(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "service.cli", *args], env=env, capture_output=True, text=True, check=check)


def print_measured(data_dir: Path) -> None:
    """What each published version's accuracies are: exact match of its export, measured by the
    runtime clients use, beside the fp32 PyTorch reference (manifest.json)."""
    from edgekif.errors import IntegrityError
    from edgekif.export.manifest import read_manifest

    for folder in sorted(DataLayout(data_dir).models.glob("v*")):
        try:
            m = read_manifest(folder)
        except IntegrityError:
            continue
        by = m.accuracies_measured_by or {}
        parity = m.parity or {}
        ref = (m.reference or {}).get("tasks") or {}
        accs = ", ".join(f"{t} {100 * v:.1f}" for t, v in m.accuracies.items())
        refs = ", ".join(f"{t} {100 * (v.get('exact_match') or 0):.1f}" for t, v in ref.items())
        rejected = ", ".join(f"{r.get('variant')} ({100 * (r.get('agreement') or 0):.0f}% same answers)" for r in m.parity_rejected or [])
        print(f"{folder.name}: exact match {accs}  [{by.get('runtime')}, {by.get('precision')}, whole holdout records, greedy]")
        print(f"       fp32 PyTorch reference {refs}; export answers = fp32's on {100 * (parity.get('agreement') or 0):.0f}%"
              + (f"; rejected: {rejected}" if rejected else ""))
    print()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["dbpedia", "agnews"])
    ap.add_argument("--examples", type=int, default=192, help="examples per dropped task file (a quarter is held out, at most 48)")
    ap.add_argument("--data-dir", default=str(REPO / ".edgekif-demo"))
    ap.add_argument("--timeout", type=float, default=1500)
    args = ap.parse_args()

    data_dir = Path(args.data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("EDGEKIF_CACHE_DIR", str(Path.home() / ".cache" / "edgekif"))  # convert the GGUF once, reuse
    env["TRANSFORMERS_VERBOSITY"] = "error"
    # Small, fast settings for a demo; everything else is the default config.
    overrides = ["data.max_length=128", "service.quiet_seconds=1", "service.scan_interval=2", "service.holdout_max=48", "service.holdout_fraction=0.25"]
    (data_dir / "edgekif.toml").write_text("\n".join(["[data]", "max_length = 128", "[service]", "quiet_seconds = 1.0", "scan_interval = 2.0", "holdout_max = 48", "holdout_fraction = 0.25"]) + "\n")
    print(f"data dir: {data_dir}\nconfig:   {data_dir / 'edgekif.toml'} ({', '.join(overrides)})")

    t0 = time.time()
    daemon = subprocess.Popen(
        [PY, "-m", "service.cli", "serve", "--data-dir", str(data_dir)],
        env=env, stdout=open(data_dir / "daemon.stdout.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        inbox = DataLayout(data_dir).inbox
        for _ in range(100):
            if inbox.is_dir():
                break
            time.sleep(0.2)
        tests = {}
        for name in args.tasks:
            lines = (DATA / name / "train.jsonl").read_text().splitlines()
            random.Random(0).shuffle(lines)
            part = inbox / f"{name}.jsonl.part"  # write under a temp name, then rename: the daemon never sees half a file
            part.write_text("\n".join(lines[: args.examples]) + "\n")
            os.rename(part, inbox / f"{name}.jsonl")
            tests[name] = [json.loads(l) for l in (DATA / name / "test.jsonl").read_text().splitlines()[:3]]
            print(f"dropped {name}.jsonl ({args.examples} examples)")

        final = {"published", "held", "failed", "rejected", "duplicate"}
        last = ""
        while True:
            st = json.loads(edgekif("status", "--json", "--data-dir", str(data_dir), env=env).stdout)
            counts = st.get("counts") or {}
            done = sum(v for k, v in counts.items() if k in final)
            cur = st.get("current") or {}
            prog = cur.get("progress") or {}
            line = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            if cur:
                line += f"  current: job {cur.get('job_id')} {cur.get('file')} {cur.get('state')}"
            if prog.get("steps"):
                line += f" (train step {prog.get('step')}/{prog.get('steps')})"
            if line != last:
                print(f"  {time.time() - t0:5.0f}s  {line}")
                last = line
            if done >= len(args.tasks):
                break
            if daemon.poll() is not None:
                print("daemon exited unexpectedly; see", data_dir / "daemon.stdout.log")
                return 1
            if time.time() - t0 > args.timeout:
                print("timed out")
                return 1
            time.sleep(3)

        print()
        print(edgekif("status", "--data-dir", str(data_dir), env=env).stdout)
        print(edgekif("models", "list", "--data-dir", str(data_dir), env=env).stdout)
        print_measured(data_dir)
        prompts = data_dir / "prompts.jsonl"
        with prompts.open("w") as f:  # the test records as they are (Alpaca): infer reads every task-file shape
            for name, recs in tests.items():
                for r in recs:
                    f.write(json.dumps({k: v for k, v in r.items() if k != "output"}) + "\n")
        res = edgekif("infer", "--file", str(prompts), "--max-new-tokens", "8", "--data-dir", str(data_dir), env=env, check=False)
        if res.returncode == 0:
            answers = [json.loads(l)["answer"] for l in res.stdout.splitlines() if l.strip()]
            expected = [r["output"] for recs in tests.values() for r in recs]
            print("answers of the published ONNX model (models/current) to test prompts:")
            for (name, exp, ans) in zip([n for n, recs in tests.items() for _ in recs], expected, answers):
                print(f"  {name:<8} expected {exp!r:<26} got {ans!r}")
        else:
            print("infer:", res.stderr.strip()[-500:])
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(timeout=90)
        except subprocess.TimeoutExpired:
            daemon.kill()
            rc = -9
        print(f"\ndaemon stopped (exit code {rc}); demo took {time.time() - t0:.0f}s; logs in {data_dir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
