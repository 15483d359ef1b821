"""Operator actions on the daemon's jobs (`edgekif publish --force`, `edgekif retry`). They
change state.db only; the running daemon does the work on its next step."""

from __future__ import annotations

from edgekif.config import Config
from edgekif.errors import PublishError
from edgekif.layout import DataLayout

from .jobs import TERMINAL, JobStore, utc_now


def force_publish(config: Config, job_id: int) -> str:
    """`edgekif publish --force JOB`: send a job the gate held on to publish (the daemon does the work). Refused when the live model
    is no longer the one this job trained on top of (JobStore.replaced_unseen): forcing it would replace a newer model or undo a rollback."""
    layout = DataLayout(config.data_path)
    if not layout.state_db.exists():
        raise PublishError(f"{layout.root}: no state.db (the daemon has not run here)")
    with JobStore(layout.state_db) as store:
        job = store.get(job_id)
        gate = dict(job.metrics.get("gate") or {})
        if job.state not in TERMINAL and gate.get("forced"):
            return f"job {job_id} ({job.file_name}) is already forced; the daemon will publish it"
        if job.state != "held":
            raise PublishError(f"job {job_id} ({job.file_name}) is {job.state!r}; only a held job can be forced")
        replaced = store.replaced_unseen(job)
        if replaced is not None:
            raise PublishError(f"job {job_id} cannot be forced: {replaced}")
        reasons = gate.get("reasons") or []
        gate.update(forced=True, forced_at=utc_now())
        store.advance(job_id, "held", "approved", metrics={"gate": gate}, forced=True)
    return (f"job {job_id} ({job.file_name}) will be published by the daemon despite the gate"
            + (f": {'; '.join(reasons)}" if reasons else ""))


def retry_job(config: Config, job_id: int) -> str:
    """`edgekif retry JOB`: put a failed job back to the state it failed in (attempts reset)."""
    layout = DataLayout(config.data_path)
    if not layout.state_db.exists():
        raise PublishError(f"{layout.root}: no state.db (the daemon has not run here)")
    with JobStore(layout.state_db) as store:
        job = store.retry(job_id)
    return f"job {job_id} ({job.file_name}) queued again from {job.state!r}"
