#!/usr/bin/env python
"""Time one daemon job's model stages alone: train, export and evaluate, each in its own
`python -m service.stage_process` child exactly as the daemon runs them, one after the other,
with nothing else in the way (no watcher, no status polling, no other job).

Why: `make demo` times the same stages inside a running daemon, where run-to-run timing moved
by 20-30% between sessions on one machine. Replaying a finished demo job's stages on a copy of
its data directory gives the ratio issue 21 asks about (export + evaluate against training) on
a quiet machine, and the same answers as the demo (training is seeded).

    python tools/time_job_stages.py .edgekif-demo --job 1 --task dbpedia
    python tools/time_job_stages.py .edgekif-demo --job 3 --task headlines --published v0002:2 --past dbpedia agnews

The data directory is copied to --work (what a job reads: config, holdouts, replay buffer,
state; the job's train.jsonl; the published job's learner to start from), so the demo's own
files stay as they are. The base's zero-shot scores are measured again: the cache is a scratch
folder that links the real one's converted base, general answers and base exports, with empty
zero-shot scores. Each stage's child log lands in --work as STAGE.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def copy_job(src: Path, work: Path, job: int, published_job: int | None) -> None:
    """What the job's stages read, copied from the data directory `src` into `work` (replaced)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "jobs" / str(job)).mkdir(parents=True)
    for name in ("edgekif.toml", "replay.db", "replay.db-wal", "replay.db-shm", "state.db", "state.db-wal", "state.db-shm"):
        if (src / name).exists():
            shutil.copy2(src / name, work / name)
    shutil.copytree(src / "holdout", work / "holdout")
    shutil.copy2(src / "jobs" / str(job) / "train.jsonl", work / "jobs" / str(job) / "train.jsonl")
    if published_job is not None:
        shutil.copytree(src / "jobs" / str(published_job) / "learner", work / "jobs" / str(published_job) / "learner")


def scratch_cache(real: Path, scratch: Path) -> None:
    """A cache whose zero-shot scores are empty and everything else is the real cache's (linked)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "zero-shot":
            (scratch / entry.name).symlink_to(entry.resolve())
    for root in (real / "zero-shot").glob("*/*"):  # zero-shot/BASE/SETTING/{export,source,scores.json}
        mine = scratch / "zero-shot" / root.relative_to(real / "zero-shot")
        mine.mkdir(parents=True)
        for part in ("export", "source"):
            if (root / part).is_dir():
                (mine / part).symlink_to((root / part).resolve())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, help="a data directory whose job ran (e.g. .edgekif-demo)")
    ap.add_argument("--job", type=int, required=True)
    ap.add_argument("--task", required=True, help="the job's task name")
    ap.add_argument("--published", default="", help="VERSION:JOB the job started from (empty: the base)")
    ap.add_argument("--past", nargs="*", default=[], help="the published tasks it replays")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekif-job-stages"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    from edgekif.config import load_config
    from edgekif.workflow import cache_root

    src, work = args.data_dir.resolve(), args.work.resolve()
    published = None
    if args.published:
        version, job = args.published.split(":")
        published = {"version": version, "job_id": int(job), "accuracies": {}}
    copy_job(src, work / "data", args.job, published and published["job_id"])
    cfg = load_config(src / "edgekif.toml")
    cfg.data_dir = str(work / "data")
    scratch_cache(cache_root(cfg), work / "cache")
    jobs = work / "data" / "jobs" / str(args.job)
    ctx = {"job_id": args.job, "file_name": f"{args.task}.jsonl", "file_path": str(jobs / "train.jsonl"), "sha256": "-",
           "work_dir": str(jobs), "data_dir": str(work / "data"), "metrics": {"export": {"path": str(jobs / "export")}},
           "past_tasks": list(args.past), "task": {"name": args.task, "examples": 0, "details": {}}, "published": published}
    env = {**os.environ, "TQDM_DISABLE": "1", "EDGEKIF_CACHE_DIR": str(work / "cache")}
    seconds: dict[str, float] = {}
    for stage in ("train", "export", "evaluate"):
        request, result = work / f"{stage}.request.json", work / f"{stage}.result.json"
        request.write_text(json.dumps({"stage": stage, "config": cfg.to_dict(), "ctx": ctx, "result": str(result)}))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "service.stage_process", str(request)], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        seconds[stage] = round(time.perf_counter() - t0, 1)
        (work / f"{stage}.log").write_text(proc.stdout)
        outcome = json.loads(result.read_text()) if result.is_file() else {"ok": False, "error": proc.stdout[-2000:]}
        if not outcome.get("ok"):
            print(f"{stage} failed: {json.dumps(outcome.get('error'))[:2000]}", file=sys.stderr)
            return 1
        print(f"{stage}: {seconds[stage]} s", flush=True)
    ratio = (seconds["export"] + seconds["evaluate"]) / seconds["train"]
    manifest = json.loads((jobs / "export" / "manifest.json").read_text())
    out = {"command": "python tools/time_job_stages.py " + " ".join(sys.argv[1:] if argv is None else argv), "seconds": seconds,
           "export_and_evaluate_over_train": round(ratio, 2), "scores": manifest.get("scores"), "precision": (manifest.get("export") or {}).get("precision"),
           "reference_seconds": (manifest.get("reference") or {}).get("seconds"),
           "build_seconds": (manifest.get("parity") or {}).get("build_seconds"),
           "answers_seconds": round((manifest.get("parity") or {}).get("seconds") or 0.0, 1)}
    print(f"export + evaluate = {seconds['export'] + seconds['evaluate']:.1f} s against training {seconds['train']:.1f} s: {ratio:.2f}x "
          f"(reference {out['reference_seconds']} s, build {out['build_seconds']} s, the export's answers {out['answers_seconds']} s); "
          f"scores {out['scores']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
