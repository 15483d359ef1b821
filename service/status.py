"""`edgekif status`: what the daemon is doing, read from state.db, daemon.json and the job
folders. Read-only; works whether or not the daemon runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edgekif.children import pid_alive
from edgekif.config import Config
from edgekif.errors import ConfigError, IntegrityError
from edgekif.export.manifest import read_manifest
from edgekif.metrics import headline_figures
from edgekif.layout import SIDECAR_SUFFIX, DataLayout

from .jobs import Job, JobStore
from .metrics import read_json
from .resources import rss_mb
from .watcher import ignored_inbox_entries, is_ignored


def _buffer_stats(path: Path) -> dict[str, Any] | None:
    """Per-task example counts from replay.db, read-only (the library owns its schema)."""
    if not path.exists():
        return None
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        return {"error": str(e)}
    try:
        try:
            rows = conn.execute("SELECT task_id, stored FROM tasks").fetchall()
            tasks = {str(t): int(n) for t, n in rows}
            return {"total": sum(tasks.values()), "tasks": tasks}
        except sqlite3.Error:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            return {"tables": {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}}
    except sqlite3.Error as e:
        return {"error": str(e)}
    finally:
        conn.close()


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "file": job.file_name,
        "state": job.state,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "version": job.version,
        "error": error_text(job.error),
        "hint": (job.error or {}).get("hint"),  # what to do about a permanent failure
    }


def error_text(error: dict[str, Any] | None) -> str | None:
    """A job's error in one line: a rejected file's with its line (the sidecar's name when the
    line is in it; a JSON array's record number is in the message already) and field, and how
    many more problems its report (rejected/NAME.error.json) lists."""
    if not error:
        return None
    text = error.get("message")
    where = []
    if str(error.get("file") or "").endswith(SIDECAR_SUFFIX):
        where.append(Path(error["file"]).name)
    if error.get("line") is not None and "record" not in (error.get("details") or {}):
        where.append(f"line {error['line']}")
    if where:
        text = ":".join(where) + (f" (field {error['field']!r})" if error.get("field") else "") + f": {text}"
    if error.get("more"):
        text += f" (+{error['more']} more)"
    return text


def progress_view(prog: dict[str, Any] | None, stage: str | None, now: float) -> dict[str, Any] | None:
    """The stage's progress record with what status derives from its timestamps: elapsed_s
    (since the stage started), and during training steps_per_s and eta_s (from the first step
    reported by this run, so model loading does not count). Derived only while the record is the
    running stage's own; a record left by another stage is dropped."""
    if not prog:
        return prog
    out = dict(prog)
    if stage is None or prog.get("stage") != stage:  # daemon not running: the last record as it is
        return out if stage is None else None
    if isinstance(prog.get("started"), (int, float)):
        out["elapsed_s"] = round(max(0.0, now - prog["started"]), 1)
    step, total = prog.get("step"), prog.get("steps") or prog.get("total_steps")
    first_step, first_ts, ts = prog.get("first_step"), prog.get("first_ts"), prog.get("ts")
    if all(isinstance(v, (int, float)) for v in (step, first_step, first_ts, ts)) and step > first_step and ts > first_ts:
        rate = (step - first_step) / (ts - first_ts)
        out["steps_per_s"] = round(rate, 4)
        if total:
            # as of the last report, less the time since it
            out["eta_s"] = round(max(0.0, (total - step) / rate - max(0.0, now - ts)), 1)
    return out


def require_data_dir(layout: DataLayout) -> None:
    """A data dir that does not exist is a mistyped --data-dir or a daemon never started: say
    so (ConfigError, exit 2) instead of showing it as an empty queue."""
    if not layout.root.is_dir():
        raise ConfigError(f"data dir {layout.root} does not exist (a typo in --data-dir / EDGEKIF_DATA_DIR, or `edgekif serve` never ran there)")


def _published_at(layout: DataLayout, version: str | None) -> str | None:
    """A version's publish time from its manifest (Manifest.published_at), the one source
    `edgekif models list` reads too; None when the folder is gone or unreadable."""
    if not version:
        return None
    try:
        return read_manifest(layout.models / version).published_at
    except IntegrityError:
        return None


def _jobless_live(layout: DataLayout) -> dict[str, Any] | None:
    """The live version when no job made it (`edgekif export --publish`), from its manifest."""
    from edgekif.publish import ModelStore  # torch-free

    version = ModelStore(layout.root).current()
    if version is None:
        return None
    try:
        manifest = read_manifest(layout.models / version)
    except IntegrityError:
        return {"version": version, "job_id": None, "file": None, "published_at": None, "accuracies": {}, "headline": {}}
    return {"version": version, "job_id": None, "file": None, "published_at": manifest.published_at, "accuracies": manifest.accuracies,
            "headline": _headline(manifest.accuracies, manifest.scores, manifest.task_specs)}


def _headline(accuracies: dict, scores: dict | None, task_specs: dict | None) -> dict[str, dict[str, Any]]:
    """Each task's headline figure and its metric's name where not exact match (ROUGE-L for free text)."""
    return {t: {"value": v, "metric": m} for t, (v, m) in headline_figures(accuracies, scores, task_specs).items()}


def status(config: Config) -> dict[str, Any]:
    """Everything `edgekif status` shows, as plain data (also fine for `--json`).
    ConfigError when the data dir does not exist."""
    layout = DataLayout(config.data_path)
    require_data_dir(layout)
    runtime = read_json(layout.runtime_file)
    running = bool(runtime and runtime.get("state") in ("running", "stopping") and pid_alive(int(runtime.get("pid", 0))))
    out: dict[str, Any] = {
        "data_dir": str(layout.root),
        "daemon": {
            "running": running,
            "pid": runtime.get("pid") if running else None,
            "state": runtime.get("state") if runtime else None,
            "started_at": runtime.get("started_at") if running else None,
            "torch_loaded": runtime.get("torch_loaded") if running else None,
            "preparing_base": runtime.get("preparing_base") if running else None,  # service.preparer, while idle
        },
        "waiting": (runtime or {}).get("waiting") or {} if running else {},  # job id -> why (disk, memory)
        "initialized": layout.state_db.exists(),
        "inbox_waiting": 0,
        "inbox_ignored": [],  # in-progress names (dot-files, .tmp, ...): taken once renamed
        "queue": [],
        "current": None,
        "published": None,
        "counts": {},
        "problems": [],
        "buffer": _buffer_stats(layout.replay_db),
    }
    if layout.inbox.is_dir():
        out["inbox_waiting"] = sum(1 for n in os.listdir(os.fsencode(layout.inbox)) if not is_ignored(n))
        out["inbox_ignored"] = ignored_inbox_entries(layout)
    if not layout.state_db.exists():
        out["published"] = _jobless_live(layout)
        return out
    with JobStore.reader(layout.state_db) as store:
        queue = store.queue()
        out["queue"] = [_job_summary(j) for j in queue]
        cur = (runtime or {}).get("current") if running else None
        if cur is None and queue:
            cur = {"job_id": queue[0].id, "file": queue[0].file_name, "state": queue[0].state, "stage": None}
        if cur is not None:
            cur = dict(cur)
            cur["progress"] = progress_view(read_json(layout.job(cur["job_id"]).progress), cur.get("stage"), time.time())
            if cur.get("child_pid"):
                cur["child_rss_mb"] = rss_mb(int(cur["child_pid"]))
        out["current"] = cur
        pub = store.live()  # models/current, which a rollback moves
        if pub is not None:
            evaluated = pub.metrics.get("evaluate", {})
            details = evaluated.get("details", {})
            out["published"] = {
                "version": pub.version,
                "job_id": pub.id,
                "file": pub.file_name,
                # the manifest's (as `models list`), not the job row's last change
                "published_at": _published_at(layout, pub.version) or pub.updated_at,
                "accuracies": evaluated.get("accuracies", {}),
                "headline": _headline(evaluated.get("accuracies", {}), details.get("scores"), details.get("task_specs")),
            }
        else:
            out["published"] = _jobless_live(layout)
        out["counts"] = store.state_counts()
        out["problems"] = [_job_summary(j) for j in store.jobs(("failed", "held", "rejected", "duplicate"), limit=10, newest_first=True)]
    return out


def list_jobs(config: Config, limit: int | None = None) -> list[dict[str, Any]]:
    """`edgekif jobs`: every job, newest first (a summary each). A job's version that is no
    longer under models/ (`models rm`, gc) has `version_removed` True. ConfigError when the
    data dir does not exist."""
    layout = DataLayout(config.data_path)
    require_data_dir(layout)
    if not layout.state_db.exists():
        return []
    with JobStore.reader(layout.state_db) as store:
        out = []
        for j in store.jobs(limit=limit, newest_first=True):
            row = _job_summary(j)
            row["task"] = (store.task(j.task_id) or {}).get("name") if j.task_id is not None else None
            if j.version:
                row["version_removed"] = not (layout.models / j.version).is_dir()
            out.append(row)
        return out


def format_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs yet"
    def version(r: dict[str, Any]) -> str:
        return (r.get("version") or "-") + (" (removed)" if r.get("version_removed") else "")

    width = max([8] + [len(version(r)) for r in rows])
    lines = [f"{'ID':>5}  {'FILE':<28} {'TASK':<20} {'STATE':<10} {'TRIES':>5} {'VERSION':<{width}} UPDATED / ERROR"]
    for r in rows:
        tail = r["updated_at"] + (f"  {_clip(r['error'], 60)}" if r.get("error") else "")
        lines.append(f"{r['id']:>5}  {_clip(r['file'], 28):<28} {_clip(r.get('task') or '-', 20):<20} {r['state']:<10} {r['attempts']:>5} {version(r):<{width}} {tail}")
    return "\n".join(lines)


def format_status(st: dict[str, Any]) -> str:
    """`status()` as a human-readable table."""
    lines = [f"edgekif  data dir: {st['data_dir']}"]
    d = st["daemon"]
    lines.append(f"daemon:   {'running (pid %s)' % d['pid'] if d['running'] else 'not running'}")
    prep = d.get("preparing_base")
    if prep:
        lines.append(f"          preparing the base while idle (pid {prep['pid']}, since {prep['started_at']}): "
                     "its conversion, export and general answers, so the first job does not pay them")
    pub = st.get("published")
    if pub:
        made_by = f"job {pub['job_id']}, {pub['file']}" if pub.get("job_id") is not None else "published by hand, no job"
        lines.append(f"live:     {pub['version']} ({made_by}, {pub['published_at']})")
        for task, fig in sorted((pub.get("headline") or {t: {"value": a, "metric": None} for t, a in pub["accuracies"].items()}).items()):
            lines.append(f"            {task:<24} {100 * float(fig['value']):6.1f}" + (f"  {fig['metric']}" if fig.get("metric") else ""))
    else:
        lines.append("live:     no model published yet")
    cur = st.get("current")
    if cur:
        stage = f" / {cur['stage']}" if cur.get("stage") else ""
        lines.append(f"current:  job {cur['job_id']} {cur['file']}  {cur['state']}{stage}{progress_text(cur.get('progress') or {})}")
        if cur.get("child_rss_mb") is not None:
            lines.append(f"          stage process pid {cur['child_pid']}, {cur['child_rss_mb']:.0f} MB resident")
    for job_id, w in (st.get("waiting") or {}).items():
        lines.append(f"waiting:  job {job_id} before {w['stage']}: {w['reason']} (retried every {w['retry_in_s']:g} s, no attempt used)")
    q = st.get("queue") or []
    ignored = st.get("inbox_ignored") or []
    lines.append(f"queue:    {len(q)} unfinished job(s), {st.get('inbox_waiting', 0)} file(s) waiting in inbox/"
                 + (f", {len(ignored)} ignored, waiting for rename ({', '.join(_clip(n, 40) for n in ignored[:5])})" if ignored else ""))
    if q:
        lines.append(f"  {'ID':>5}  {'FILE':<32} {'STATE':<10} {'TRIES':>5}  SINCE")
        for j in q:
            lines.append(f"  {j['id']:>5}  {_clip(j['file'], 32):<32} {j['state']:<10} {j['attempts']:>5}  {j['updated_at']}")
    buf = st.get("buffer")
    if buf and "total" in buf:
        per = ", ".join(f"{t} {n}" for t, n in buf["tasks"].items())
        lines.append(f"buffer:   {buf['total']} examples" + (f" ({per})" if per else ""))
    counts = st.get("counts") or {}
    if counts:
        lines.append("jobs:     " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    probs = st.get("problems") or []
    if probs:
        lines.append("recent problems:")
        for j in probs:
            lines.append(f"  {j['id']:>5}  {_clip(j['file'], 32):<32} {j['state']:<10} {_clip(j['error'] or '', 80)}")
            if j.get("hint"):
                lines.append(f"  {'':>5}  what to do: {j['hint']}")
    return "\n".join(lines)


def progress_text(prog: dict[str, Any]) -> str:
    """`  step 40/120 (33%)  loss 0.412  2.50 s/step  ETA 3m20s`, or `  for 1m05s` outside training."""
    parts = []
    if "step" in prog:
        total = prog.get("steps") or prog.get("total_steps")
        parts.append(f"step {prog['step']}/{total or '?'}" + (f" ({100 * prog['step'] / total:.0f}%)" if total else ""))
        if isinstance(prog.get("loss"), (int, float)):
            parts.append(f"loss {prog['loss']:.3f}")
        rate = prog.get("steps_per_s")
        if rate:
            parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
        if prog.get("eta_s") is not None:
            parts.append(f"ETA {_duration(prog['eta_s'])}")
    elif prog.get("elapsed_s") is not None:
        parts.append(f"for {_duration(prog['elapsed_s'])}")
    return "".join(f"  {p}" for p in parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
