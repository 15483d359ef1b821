#!/usr/bin/env python
"""Time one daemon job's model stages alone: train, export and evaluate, each run by the daemon's
own service.stage_process.ChildStages (a `python -m service.stage_process` child per stage), one after the other,
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
zero-shot scores. The children's log records land in --work/stages.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
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
    from edgekif.layout import DataLayout
    from edgekif.workflow import cache_root
    from service.logs import JsonFormatter
    from service.stage_process import ChildStages
    from service.stages import JobContext, Published, ValidatedTask

    src, work = args.data_dir.resolve(), args.work.resolve()
    published = None
    if args.published:
        version, job = args.published.split(":")
        published = Published(version=version, job_id=int(job), accuracies={})
    copy_job(src, work / "data", args.job, published and published.job_id)
    cfg = load_config(src / "edgekif.toml")
    cfg.data_dir = str(work / "data")
    scratch_cache(cache_root(cfg), work / "cache")
    os.environ["EDGEKIF_CACHE_DIR"] = str(work / "cache")  # the children inherit it
    # the children's log records, relayed by ChildStages as the daemon relays them
    handler = logging.FileHandler(work / "stages.log")
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    layout = DataLayout(work / "data")
    jobs = layout.job(args.job).root
    ctx = JobContext(job_id=args.job, file_name=f"{args.task}.jsonl", file_path=jobs / "train.jsonl", sha256="-", work_dir=jobs,
                     layout=layout, config=cfg, task=ValidatedTask(name=args.task, examples=0), published=published,
                     past_tasks=list(args.past))
    stages = ChildStages(cfg)  # the daemon's own: a `python -m service.stage_process` child per stage
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    stages.train(ctx, lambda: False)
    seconds["train"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ctx.metrics["export"] = {"path": str(stages.export(ctx))}  # what the daemon commits for evaluate
    seconds["export"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    stages.evaluate(ctx)
    seconds["evaluate"] = round(time.perf_counter() - t0, 1)
    print(f"train {seconds['train']} s, export {seconds['export']} s, evaluate {seconds['evaluate']} s", flush=True)
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
