"""The job steps: one state, one stage, one commit.

    received  --validate-->  validated  --buffer-->    buffered  --train-->  trained
    trained   --export-->    exported   --evaluate-->  evaluated --gate-->   approved | held
    approved  --publish-->   published

The gate judges the exported model, measured through the runtime clients use.

`JobRunner.step(store, job)` runs the one stage after the job's state and commits its result
(or its failure). Attempts are counted before a stage runs, so a stage that kills the process
still uses one up; every stage is idempotent, so a crash between its side effects and the
commit only makes it run again. The runner knows nothing of threads or signals: the daemon
(service.daemon) calls it from its worker thread, tests call it directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import shutil
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from edgekif.config import Config
from edgekif.errors import DamagedFileError, EdgekifError, Interrupted, ResourceError, ValidationError
from edgekif.atomic import fsync_dir
from edgekif.layout import DataLayout, sidecar_of

from .housekeeping import remove_path
from .jobs import TRANSITIONS, Job, JobStore, utc_now
from .resources import check_memory
from .stages import EvalResult, JobContext, Published, Stages, ValidatedTask
from .watcher import move_to_rejected, safe_name, unique_rejected_dest

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
NEXT_STAGE = {"received": "validate", "validated": "buffer", "buffered": "train", "trained": "export",
              "exported": "evaluate", "evaluated": "gate", "approved": "publish"}
# Stages that load the model: check service.memory_ceiling_mb before each.
MODEL_STAGES = frozenset({"train", "export", "evaluate"})


# Out of disk or memory: nobody's fault, so it uses up no attempt; the job waits and retries
# until the resource is back (a full disk fails the same way every try, then recovers).
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM})


SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"
# Libraries that lose the errno on the way (safetensors' Rust writer, onnx, the genai builder)
# still print the OS's own words for it.
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# Below this much free space after a failure, the failure is taken as the full disk's doing.
LOW_DISK_BYTES = 64 * 1024 * 1024


def transient_cause(e: BaseException, data_dir: str | os.PathLike | None = None) -> str | None:
    """Why `e` is a transient resource shortage (following raise-from chains), or None.

    By errno where the chain has one (OSError, SQLite's SQLITE_FULL); else by the OS's words for
    ENOSPC/EDQUOT in a message; else, when `data_dir` is given, by a free-space check of its
    filesystem after the failure (a writer that dropped both errno and text)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ResourceError):
            return str(cur)
        if isinstance(cur, MemoryError):
            return "out of memory"
        if isinstance(cur, OSError) and cur.errno in TRANSIENT_ERRNOS:
            return f"{errno.errorcode.get(cur.errno, cur.errno)}: {cur.strerror or cur}" + (f" ({cur.filename})" if cur.filename else "")
        if isinstance(cur, sqlite3.Error) and getattr(cur, "sqlite_errorcode", None) == SQLITE_FULL:
            return f"ENOSPC: {cur} (SQLite)"
        if any(t in str(cur) for t in _NO_SPACE_TEXT):
            return f"ENOSPC: {type(cur).__name__}: {str(cur)[:200]}"
        cur = cur.__cause__ or cur.__context__
    if data_dir is not None:
        try:
            free = shutil.disk_usage(data_dir).free
        except OSError:
            return None
        if free < LOW_DISK_BYTES:
            return f"ENOSPC: {free // 2**20} MB free on {data_dir}'s filesystem after {type(e).__name__}: {str(e)[:200]}"
    return None


class _Handled(Exception):
    """A stage ended without a result and the job's fate was already recorded."""


def permanence(e: BaseException) -> tuple[bool, str]:
    """(whether `e` fails the same way on every try, what to do about it). edgekif's errors say
    so themselves; a package missing from the Python that runs the stage (ImportError) fails
    every try too, in the daemon's process or a stage's child."""
    if isinstance(e, ImportError):
        return True, (f"the daemon's Python ({sys.executable}) lacks a package: run the daemon from the "
                      "environment `make setup` built, then `edgekif retry JOB`")
    return bool(getattr(e, "permanent", False)), getattr(e, "hint", "") or ""


def error_dict(e: BaseException, stage: str) -> dict[str, Any]:
    d = e.to_dict() if isinstance(e, EdgekifError) else {"error": type(e).__name__, "message": str(e)}
    d.setdefault("kind", type(e).__name__)
    d["stage"] = stage
    permanent, hint = permanence(e)
    d["class"] = "permanent" if permanent else "unknown"  # unknown: a bounded number of tries
    if hint:
        d["hint"] = hint
    d["traceback"] = traceback.format_exception(e)[-3:]
    return d


def release_memory() -> None:
    """After a model stage: collect the model's reference cycles and hand the freed heap back to
    the OS. Without this an idle daemon kept ~3 GB RSS after one SmolLM2 job (measured with
    tools/bench_daemon.py: ~1 GB of unreachable cycles, the rest freed but kept by glibc's
    per-thread arenas); with it, ~0.5 GB."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; a no-op elsewhere
    except (OSError, AttributeError):
        pass


class JobRunner:
    """Runs jobs one stage at a time through `stages`, committing to state.db.

    on_current(info | None) is told which stage runs now (the daemon shows it in status);
    should_stop() is polled by training; `not_before` holds retry back-off per job id.
    """

    def __init__(
        self,
        layout: DataLayout,
        config: Config,
        stages: Stages,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_current: Callable[[dict[str, Any] | None], None] = lambda _c: None,
        retry_base_seconds: float = 5.0,
        resource_retry_seconds: float = 60.0,
    ) -> None:
        self.layout = layout
        self.config = config
        self.stages = stages
        self.should_stop = should_stop
        self.on_current = on_current
        self.retry_base_seconds = retry_base_seconds
        self.resource_retry_seconds = resource_retry_seconds
        self.not_before: dict[int, float] = {}  # job id -> monotonic time of the next try
        self.waiting: dict[int, dict[str, Any]] = {}  # job id -> why it waits (disk, memory); status shows it

    def wait_for_resources(self, job: Job, stage: str, why: str) -> None:
        """Hold `job` back for resource_retry_seconds; no attempt is used, no limit while it lasts."""
        self.waiting[job.id] = {"stage": stage, "reason": why, "since": utc_now(), "retry_in_s": self.resource_retry_seconds}
        self.not_before[job.id] = time.monotonic() + self.resource_retry_seconds
        log.warning("not enough resources; job stays queued", extra={"job_id": job.id, "stage": stage, "error": why, "retry_in_s": self.resource_retry_seconds})

    def drop_scratch(self, job_id: int) -> None:
        """A job that ended without publishing keeps what a retry or `publish --force` needs
        (learner, checkpoint, export) and loses its scratch: the fused fp32 copy is ~0.5 GB."""
        shutil.rmtree(self.layout.job(job_id).scratch, ignore_errors=True)

    def runnable(self, job: Job) -> bool:
        return self.not_before.get(job.id, 0.0) <= time.monotonic()

    # ---- context --------------------------------------------------------------------------

    def context(self, store: JobStore, job: Job) -> JobContext:
        work = self.layout.job_dir(job.id)
        work.mkdir(parents=True, exist_ok=True)
        task = None
        if job.task_id is not None:
            row = store.task(job.task_id)
            if row is not None:
                task = ValidatedTask(row["name"], row["examples"], job.metrics.get("validate", {}).get("details", {}))
        pub = store.live()  # models/current: after a rollback, the version rolled back to
        published = None
        past: list[str] = []
        if pub is not None:
            accs = pub.metrics.get("evaluate", {}).get("accuracies", {})
            published = Published(version=pub.version or "", job_id=pub.id, accuracies={k: float(v) for k, v in accs.items()})
            for j in store.lineage(pub):  # the tasks the live model has learned, in order
                if j.task_id is not None and (t := store.task(j.task_id)) is not None and t["name"] not in past:
                    past.append(t["name"])
        return JobContext(
            job_id=job.id, file_name=job.file_name, file_path=Path(job.file_path), sha256=job.sha256, work_dir=work,
            layout=self.layout, config=self.config, task=task, metrics=dict(job.metrics), published=published, past_tasks=past,
        )

    # ---- one step ---------------------------------------------------------------------------

    def step(self, store: JobStore, job: Job) -> None:
        """Run the next stage of `job` and commit its result (or its failure)."""
        handler = getattr(self, f"_from_{job.state}", None)
        if handler is None:
            raise EdgekifError(f"job {job.id}: no step from state {job.state!r}")
        self._finish_rejections(store)
        try:
            handler(store, job, self.context(store, job))
            self.waiting.pop(job.id, None)  # the stage went through: the resource is back
        except _Handled:
            pass
        except Exception as e:
            # The daemon's own bookkeeping hit the full disk (state.db, the progress record)
            # outside a stage: the job waits like any stage would; the daemon stays up.
            why = transient_cause(e, self.layout.root)
            if why is None:
                raise
            self.wait_for_resources(job, NEXT_STAGE.get(job.state, job.state), why)
        finally:
            self.on_current(None)

    def _guarded(self, store: JobStore, job: Job, stage: str, fn: Callable[[], Any], ctx: JobContext) -> Any:
        """Run one stage call with attempt counting and error handling.

        A fresh progress record (stage, start time) is written first, so `status` never shows
        the last stage's progress (a finished "train step 9/9" while exporting).

        ValidationError -> job rejected; ResourceError / Interrupted -> stays queued, attempt
        refunded; other exceptions -> retried with backoff, `failed` after MAX_ATTEMPTS.
        BaseExceptions (KeyboardInterrupt, a simulated crash) are not caught: like a crash.
        """
        attempts = store.begin_attempt(job.id, job.state, stage)
        if attempts > MAX_ATTEMPTS:
            store.fail(job.id, job.state, {
                "kind": "crashed", "stage": stage,
                "message": f"{stage} was started {MAX_ATTEMPTS} times without finishing (process killed or crashed)",
            })
            self.drop_scratch(job.id)
            log.error("job failed: stage never finished", extra={"job_id": job.id, "stage": stage})
            raise _Handled
        self.on_current({"job_id": job.id, "file": job.file_name, "state": job.state, "stage": stage, "since": utc_now(), "attempt": attempts})
        try:
            ctx.write_progress(stage=stage, started=time.time())
            if stage in MODEL_STAGES:
                check_memory(self.config.service.memory_ceiling_mb)
            return fn()
        except (Exception, MemoryError) as e:
            self._stage_failed(store, job, stage, attempts, e)
            raise _Handled from None
        finally:
            if stage in MODEL_STAGES:
                release_memory()

    def _stage_failed(self, store: JobStore, job: Job, stage: str, attempts: int, e: BaseException) -> None:
        if isinstance(e, ValidationError) and not isinstance(e, DamagedFileError) and "rejected" in TRANSITIONS[job.state]:
            self._reject_job(store, job, e, stage)
        elif (why := transient_cause(e, self.layout.root)) is not None:
            self.wait_for_resources(job, stage, why)
            # the records of the wait may not fit on a full disk: the wait itself is in memory
            with contextlib.suppress(sqlite3.Error, OSError):
                store.refund_attempt(job.id, job.state)
                store.log_event(job.id, "waiting", stage=stage, reason=why)
        elif isinstance(e, Interrupted):
            store.refund_attempt(job.id, job.state)
            log.info("stage stopped at a checkpoint", extra={"job_id": job.id, "stage": stage, "detail": str(e)})
        elif permanence(e)[0] or attempts >= MAX_ATTEMPTS:
            store.fail(job.id, job.state, error_dict(e, stage))
            self.drop_scratch(job.id)
            log.error("job failed", extra={"job_id": job.id, "stage": stage, "attempts": attempts, "error": str(e)}, exc_info=e)
        else:
            store.record_error(job.id, job.state, error_dict(e, stage))
            delay = self.retry_base_seconds * 2 ** (attempts - 1)
            self.not_before[job.id] = time.monotonic() + delay
            log.warning("stage failed; will retry", extra={"job_id": job.id, "stage": stage, "attempt": attempts, "retry_in_s": delay, "error": str(e)}, exc_info=e)

    # ---- one method per state: run the stage after it, commit, done ---------------------------

    def _from_received(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        info = self._guarded(store, job, "validate", lambda: self.stages.validate(ctx), ctx)
        store.advance(job.id, "received", "validated", metrics={"validate": info.to_dict()},
                      task={"name": info.name, "examples": info.examples})
        log.info("validated", extra={"job_id": job.id, "task": info.name, "examples": info.examples})

    def _from_validated(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        result = self._guarded(store, job, "buffer", lambda: self.stages.buffer(ctx), ctx)
        d = result.to_dict() if result is not None else {}
        store.advance(job.id, "validated", "buffered", metrics={"buffer": d}, holdout=d.get("holdout_path"))
        log.info("buffered", extra={"job_id": job.id, **{k: v for k, v in d.items() if k != "details"}})

    def _train(self, store: JobStore, job: Job, ctx: JobContext) -> Any:
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = self.stages.train(ctx, self.should_stop)
            outcome = "done"
            return result
        except Interrupted:
            outcome = "interrupted"
            raise
        finally:
            # Counted even when interrupted: training_seconds_total is time spent, not time kept.
            store.log_event(job.id, "train_run", seconds=round(time.monotonic() - t0, 3), outcome=outcome)

    def _from_buffered(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        result = self._guarded(store, job, "train", lambda: self._train(store, job, ctx), ctx)
        # the live job this model was trained on top of: its lineage (JobStore.lineage)
        started_from = ctx.published.job_id if ctx.published else None
        store.advance(job.id, "buffered", "trained", metrics={"train": {**result.to_dict(), "started_from": started_from}}, steps=result.steps)
        log.info("trained", extra={"job_id": job.id, "steps": result.steps})

    def _from_trained(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        path = Path(self._guarded(store, job, "export", lambda: self.stages.export(ctx), ctx))
        store.advance(job.id, "trained", "exported", metrics={"export": {"path": str(path)}})
        log.info("exported", extra={"job_id": job.id, "path": str(path)})

    def _from_exported(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        result = self._guarded(store, job, "evaluate", lambda: self.stages.evaluate(ctx), ctx)
        store.advance(job.id, "exported", "evaluated", metrics={"evaluate": result.to_dict()})
        log.info("evaluated", extra={"job_id": job.id, "accuracies": result.accuracies})

    def _from_evaluated(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        """The gate: approved, or held with the reasons (publish --force overrides)."""
        result = EvalResult.from_dict(job.metrics.get("evaluate", {}))
        ok, reasons, *decisions = self._guarded(store, job, "gate", lambda: self.stages.gate(ctx, result), ctx)
        info = {
            "ok": bool(ok),
            "reasons": list(reasons),
            "decisions": decisions[0] if decisions else {},  # the paired tests' figures, where the stages ran them
            "threshold_points": self.config.service.forgetting_threshold,
            "min_gain_over_base_points": self.config.service.min_gain_over_base,
            "accuracies": result.accuracies,
            "zero_shot": result.details.get("zero_shot", {}),
            "measured_by": result.details.get("measured_by"),
            "published_version": ctx.published.version if ctx.published else None,
            "published_accuracies": ctx.published.accuracies if ctx.published else {},
        }
        # the event carries the figures the decision used (and the runtime that measured them)
        decided_on = {k: info[k] for k in ("accuracies", "zero_shot", "published_accuracies", "reasons", "decisions")}
        decided_on["measured_by"] = (info["measured_by"] or {}).get("runtime")
        if ok:
            store.advance(job.id, "evaluated", "approved", metrics={"gate": info}, **decided_on)
            log.info("approved by the gate", extra={"job_id": job.id})
            return
        store.advance(job.id, "evaluated", "held", metrics={"gate": info},
                      error={"kind": "gate", "message": "; ".join(info["reasons"]), "reasons": info["reasons"],
                             # `edgekif status` prints it under the reasons ("what to do:")
                             "hint": self._held_hint(job.id, info["decisions"])}, **decided_on)
        self.drop_scratch(job.id)  # the export stays: `publish --force` publishes it
        log.warning("held by the gate (edgekif publish --force %d overrides)", job.id,
                    extra={"job_id": job.id, "reasons": info["reasons"]})

    def _held_hint(self, job_id: int, decisions: dict) -> str:
        hint = (f"`edgekif publish --force {job_id}` publishes it anyway; a file with more records "
                "gives the gate's paired test more to decide on")
        general = decisions.get("general ability") or {}
        if general.get("passed") is False and self.config.replay.general_share == 0:
            # the drift builds up over the jobs: without rehearsal every later job starts from it
            hint += ("; the base's general answers drifted: `replay.general_share = 0.125` in the config makes later jobs rehearse "
                     "them (general rehearsal, docs/daemon.md \"General ability\")")
        return hint

    def _from_approved(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        path = Path(job.metrics["export"]["path"])
        forced = bool((job.metrics.get("gate") or {}).get("forced"))
        reason = store.replaced_unseen(job)
        if reason is not None:
            # `publish --force` or `retry` brought back a job whose model did not start from what
            # is live now: publishing it would drop a task from what clients serve (or undo a
            # rollback), with no gate to notice. The CLI refuses this too, but its check races
            # with the daemon's publish; this one is in the only writer.
            live = store.live()
            store.advance(job.id, "approved", "held", error={
                "kind": "superseded", "message": reason, "reasons": [reason], "live_job": live.id if live is not None else None,
                "hint": f"drop {job.file_name} again (with a change: the same bytes are a duplicate) to train it on top of the live model"})
            log.warning("held: the live model changed since this job trained", extra={"job_id": job.id, "reason": reason})
            self.drop_dead_job_files(store)
            return
        version = str(self._guarded(store, job, "publish", lambda: self.stages.publish(ctx, path), ctx))
        store.advance(job.id, "approved", "published", version=version, metrics={"publish": {"version": version}})
        log.info("published", extra={"job_id": job.id, "version": version, "forced": forced})
        self.drop_dead_job_files(store)

    def drop_dead_job_files(self, store: JobStore) -> dict[int, list[str]]:
        """Remove what no command can use any more, which an unattended daemon would otherwise
        pile up job after job ({job id: the folders removed}):
          - a held job's export (0.2-1 GB) and learner (~47 MB) once a later job is published:
            service.control.force_publish refuses it from then on (publishing it would
            replace a newer model), and only a forced job's learner is trained on further;
          - a published job's learner once its version is gone from models/ (export.keep_versions):
            a job trains on from the live version's learner, and only a kept version can be
            rolled back to.
        Figures, reasons and events stay in state.db; the published adapter stays in each kept
        version (models/vNNNN/adapter). Never raises: housekeeping must not fail a published job
        or a daemon's start (what it could not read is left for the next time)."""
        import sqlite3

        from edgekif.publish import ModelStore  # torch-free

        try:
            published = store.jobs(("published",))
            kept = set(ModelStore(self.layout.root).versions())
            live = store.live()
            held = store.jobs(("held",))
        except (OSError, sqlite3.Error) as e:
            log.warning("could not look for job files to remove", extra={"error": f"{type(e).__name__}: {e}"})
            return {}
        if not published:
            return {}
        last = max(j.id for j in published)
        doomed: dict[int, list[Path]] = {}
        for job in held:
            if job.id < last:
                doomed[job.id] = [self.layout.job(job.id).export, self.layout.job(job.id).learner]
        for job in published:
            # no versions at all is not "all gone": a models/ folder moved away by hand, say
            if kept and job.version and job.version not in kept and (live is None or job.id != live.id):
                doomed[job.id] = [self.layout.job(job.id).learner]
        removed: dict[int, list[str]] = {}
        for job_id, paths in sorted(doomed.items()):
            for path in paths:
                if remove_path(path):  # what it cannot remove is logged and left, not counted
                    removed.setdefault(job_id, []).append(path.name)
        if removed:
            log.info("removed job files no command can use any more (held jobs published over, versions gone)",
                     extra={"removed": {str(k): v for k, v in removed.items()}})
        return removed

    # ---- rejections of accepted files -------------------------------------------------------

    def _reject_job(self, store: JobStore, job: Job, e: ValidationError, stage: str) -> None:
        """Job -> rejected and its file -> rejected/NAME with NAME.error.json.

        Crash-safe order: commit (job rejected, file 'rejecting', destination in the error),
        move, then mark the file 'rejected'; reconcile_rejections() redoes the move.
        """
        dest = unique_rejected_dest(self.layout.rejected, safe_name(job.file_name), job.file_name)
        error = {**e.to_dict(), "stage": stage, "rejected_path": str(dest)}
        store.advance(job.id, job.state, "rejected", error=error, file_status="rejecting")
        self._move_rejected(store, job.file_id, dest, e.to_dict(), job.id)
        log.warning("rejected %s: %s", job.file_name, e, extra={"job_id": job.id, "stage": stage, "rejected_path": str(dest)})

    def _move_rejected(self, store: JobStore, file_id: int, dest: Path, error: dict[str, Any], job_id: int) -> None:
        f = store.file(file_id)
        side = sidecar_of(f.path)
        if error.get("file") is not None and os.fsdecode(error["file"]) == str(side):
            error = {**error, "file": str(sidecar_of(dest))}  # a bad sidecar: the report names where it goes
        if os.path.lexists(f.path):
            move_to_rejected(self.layout, f.path, name=f.name, error=error, sha256=f.sha256,
                             received_at=f.received_at, dest=dest, extra={"job_id": job_id})
        # the sidecar taken with the file goes with it (after it: a crash in between is redone by
        # reconcile_rejections), so rejected/ holds everything the user dropped, e.g. to fix it
        if os.path.lexists(side):
            os.rename(side, sidecar_of(dest))
            fsync_dir(self.layout.rejected)
        store.set_file(file_id, status="rejected", path=str(dest))

    def _finish_rejections(self, store: JobStore) -> None:
        """Before each step: a rejection whose move failed after its commit (a full disk) is
        finished now, not only at the next start (only a step writes 'rejecting' rows, so any
        found between steps are left over)."""
        try:
            self.reconcile_rejections(store)
        except (OSError, sqlite3.Error) as e:
            log.warning("could not finish moving a rejected file; trying again before the next step",
                        extra={"error": f"{type(e).__name__}: {e}"})

    def reconcile_rejections(self, store: JobStore) -> None:
        for f in store.files("rejecting"):
            jobs = [j for j in store.jobs(("rejected",)) if j.file_id == f.id]
            if not jobs:
                continue
            job = jobs[-1]
            error = {k: v for k, v in (job.error or {}).items() if k not in ("rejected_path", "stage")}
            self._move_rejected(store, f.id, Path(job.error["rejected_path"]), error, job.id)
            log.info("finished an interrupted rejection", extra={"job_id": job.id, "file": f.name})
