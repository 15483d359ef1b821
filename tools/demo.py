#!/usr/bin/env python
"""`make demo`: the daemon end to end on the default base model.

Prepares the base (`edgekif model prepare`: its one-time work, timed apart), then starts
`edgekif serve` on a fresh data dir (.edgekif-demo/), drops small slices of three benchmark
tasks into its inbox (two label tasks, dbpedia and agnews, and a free-text one,
headlines), waits until each is published or held, prints the status table, each version's
tasks judged by their own metric as measured on its ONNX export with the base's figure on
the same records beside it, how far its answers to general prompts drifted from the base's,
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

from edgekif.config import overrides_toml  # noqa: E402
from edgekif.errors import ConfigError  # noqa: E402
from edgekif.layout import DataLayout  # noqa: E402  (import-free)

# The benchmark data beside the checkout when it is there; otherwise the slices shipped in
# tools/demo_data (the 192 train + 3 test examples of each task the demo uses: the first 192
# of the same seeded shuffle, in its order, so both sources give the same files: task_lines).
SHARED_DATA = [REPO.parent / "shared" / "data" / "cl-benchmark", REPO.parent / "shared" / "data" / "gen-benchmark"]
SHIPPED_DATA = REPO / "tools" / "demo_data"
PY = sys.executable


def task_dir(name: str) -> Path:
    """Where a task's train.jsonl and test.jsonl are: $EDGEKIF_DEMO_DATA/NAME, else the shared
    benchmarks beside the checkout, else the slices shipped in tools/demo_data."""
    if os.environ.get("EDGEKIF_DEMO_DATA"):
        return Path(os.environ["EDGEKIF_DEMO_DATA"]) / name
    return next((d / name for d in SHARED_DATA if (d / name / "train.jsonl").is_file()), SHIPPED_DATA / name)


def task_lines(name: str, examples: int) -> list[str]:
    """The lines of the file the demo drops for task `name`: the first `examples` of its
    train.jsonl after a shuffle seeded 0. The shipped slices are that shuffle's first 192 lines
    of the shared file already, in that order: shuffling them again would drop other bytes, so
    another train/holdout split and other figures than a checkout beside ../shared gets."""
    source = task_dir(name)
    lines = (source / "train.jsonl").read_text().splitlines()
    if source.parent != SHIPPED_DATA:
        random.Random(0).shuffle(lines)
    return lines[:examples]


def edgekif(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "service.cli", *args], env=env, capture_output=True, text=True, check=check)


def print_measured(data_dir: Path) -> None:
    """Each version's tasks by their own headline metric, measured on its export by the runtime
    clients use, with the untrained base's figure on the same holdout records and the gate's
    paired test beside it (manifest.json), and its general-ability drift."""
    from edgekif.errors import IntegrityError
    from edgekif.export.manifest import read_manifest
    from edgekif.general_ability import gate_note

    for folder in sorted(DataLayout(data_dir).models.glob("v*")):
        try:
            m = read_manifest(folder)
        except IntegrityError:
            continue
        by = m.accuracies_measured_by or {}
        decisions = (m.gate or {}).get("decisions") or {}
        print(f"{folder.name}: [{by.get('runtime')}, {m.precision}, whole holdout records, greedy]")
        for task, spec in (m.task_specs or {}).items():
            score = (m.scores or {}).get(task)
            line = f"  {task:<10} {spec['metric']} {_pct(score)} ({spec['kind']}, {spec['max_new_tokens']} new tokens)"
            base = decisions.get(f"{task} vs base")
            if base:
                line += f"; base {_pct(base.get('reference_mean'))}, gain {100 * base['mean_diff']:+.1f} [{100 * base['interval'][0]:+.1f}, {100 * base['interval'][1]:+.1f}] p={base['p_value']:.2g}"
            live = decisions.get(f"{task} vs live")
            if live:
                line += f"; vs the version before {100 * live['mean_diff']:+.1f} [{100 * live['interval'][0]:+.1f}, {100 * live['interval'][1]:+.1f}]"
            print(line)
        general = m.general_ability or {}
        if general:
            drop = general.get("loglik_drop")
            verdict, bounds = gate_note(general)
            print(f"  general ability: answers ROUGE-L {general.get('rouge_l', 0):.2f} to the base's own over {general.get('n')} prompts"
                  + (f", log-likelihood drop of the base's answers {drop:.2f} nats/token" if drop is not None else "")
                  + (f" ({bounds})" if verdict != "not gated" else f" (not gated: {bounds})"))
        skipped = ", ".join(m.skipped_variants)
        rejected = ", ".join(m.rejected_variants)
        if rejected or skipped:
            print("  export: " + "; ".join(x for x in (f"rejected {rejected}" if rejected else "", f"skipped {skipped}" if skipped else "") if x))
    print()


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["dbpedia", "agnews", "headlines"])
    ap.add_argument("--examples", type=int, default=192, help="examples per dropped task file (held out by default: a quarter, at most 48, of a label task; half, at most 96, of a free-text one)")
    ap.add_argument("--data-dir", default=str(REPO / ".edgekif-demo"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for every file to be published or held")
    ap.add_argument("--base", default="", help="model.base (a name from `edgekif model list`, a .gguf or a folder); default: the config's")
    ap.add_argument("--max-length", type=int, default=128, help="data.max_length (0: the config's default, 256)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other option, written into the data dir's edgekif.toml (repeatable), e.g. --set lora.dropout=0.05")
    args = ap.parse_args()

    # Small, fast settings for a demo; everything else is the default config.
    overrides = ["service.quiet_seconds=1", "service.scan_interval=2"]
    if args.max_length:
        overrides.insert(0, f"data.max_length={args.max_length}")
    if args.base:
        overrides.insert(0, f"model.base={args.base}")
    overrides += args.set
    try:
        config_text = overrides_toml(overrides)  # a bad --set stops here, before the data dir is wiped
    except ConfigError as e:
        ap.error(str(e))

    data_dir = Path(args.data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("EDGEKIF_CACHE_DIR", str(Path.home() / ".cache" / "edgekif"))  # convert the GGUF once, reuse
    env["TRANSFORMERS_VERBOSITY"] = "error"
    (data_dir / "edgekif.toml").write_text(config_text)
    print(f"data dir: {data_dir}\nconfig:   {data_dir / 'edgekif.toml'} ({', '.join(overrides)})")

    # The base's one-time work (conversion, its export, its answers to the general prompts), as
    # `edgekif model install` does it: set-up, timed apart from the jobs; seconds when done before.
    t_prep = time.time()
    prep = edgekif("model", "prepare", "--data-dir", str(data_dir), env=env, check=False)
    if prep.returncode != 0:
        print(prep.stdout + prep.stderr)
        return 1
    print(f"base prepared in {time.time() - t_prep:.0f}s (`edgekif model prepare`: once per base and export setting)")

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
            part = inbox / f"{name}.jsonl.part"  # write under a temp name, then rename: the daemon never sees half a file
            part.write_text("\n".join(task_lines(name, args.examples)) + "\n")
            os.rename(part, inbox / f"{name}.jsonl")
            tests[name] = [json.loads(l) for l in (task_dir(name) / "test.jsonl").read_text().splitlines()[:3]]
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
        res = edgekif("infer", "--file", str(prompts), "--max-new-tokens", "24", "--data-dir", str(data_dir), env=env, check=False)
        if res.returncode == 0:
            answers = [json.loads(l)["answer"] for l in res.stdout.splitlines() if l.strip()]
            expected = [r["output"] for recs in tests.values() for r in recs]
            print("answers of the published ONNX model (models/current) to test prompts:")
            for (name, exp, ans) in zip([n for n, recs in tests.items() for _ in recs], expected, answers):
                print(f"  {name:<9} expected {exp!r:<40} got {ans!r}")
        else:
            print("infer:", res.stderr.strip()[-500:])
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(timeout=90)
        except subprocess.TimeoutExpired:
            daemon.kill()
            rc = -9
        print(f"\ndaemon stopped (exit code {rc}); demo took {time.time() - t0:.0f}s after the base's preparation; logs in {data_dir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
