"""The edgekif daemon: watch the inbox, run one job at a time through the stages, commit each
step, keep systemd informed.

Threads:
  main     signals (SIGTERM/SIGINT stop, SIGHUP reload), sd_notify READY/STATUS/WATCHDOG,
           metrics textfile, daemon.json for `status`
  watcher  scans inbox/, takes complete files into accepted/ and queues a job for each
  worker   runs the oldest unfinished job one stage at a time (service.stages)

Entry points for the CLI: run_daemon(), status(), format_status(), force_publish(),
retry_job(); `python -m service` runs the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from edgekif.config import Config, load_config
from edgekif.errors import ConfigError, EdgekifError, PublishError, ResourceError, ValidationError

from .jobs import TERMINAL, TRANSITIONS, DataLayout, Job, JobStore, utc_now
from .logs import setup_logging
from .metrics import MetricsWriter, replace_json
from .sdnotify import Notifier
from .stages import (
    EvalResult,
    Interrupted,
    JobContext,
    Published,
    Stages,
    TaskInfo,
    check_memory,
    make_stages,
)
from .watcher import InboxWatcher, move_to_rejected, reconcile_takes, safe_name, unique_rejected_dest

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Stages that load the model: check service.memory_ceiling_mb before each.
MODEL_STAGES = frozenset({"train", "evaluate", "export"})


class DaemonError(EdgekifError):
    """The daemon cannot start (another one holds the data dir) or its worker died."""


class _Handled(Exception):
    """A stage ended without a result and the job's fate was already recorded."""


def _error_dict(e: BaseException, stage: str) -> dict[str, Any]:
    d = e.to_dict() if isinstance(e, EdgekifError) else {"error": type(e).__name__, "message": str(e)}
    d.setdefault("kind", type(e).__name__)
    d["stage"] = stage
    d["traceback"] = traceback.format_exception(e)[-3:]
    return d


class Daemon:
    """One daemon on one data dir (an exclusive flock on daemon.lock enforces that)."""

    def __init__(
        self,
        config: Config,
        stages: Stages | None = None,
        *,
        fake_stages: bool = False,
        config_path: str | os.PathLike | None = None,
        overrides: list[str] | None = None,
        notifier: Notifier | None = None,
        retry_base_seconds: float = 5.0,
        resource_retry_seconds: float = 60.0,
        install_signals: bool = True,
    ) -> None:
        self.config = config
        self.layout = DataLayout(config.data_path)
        self.stages: Stages = stages if stages is not None else make_stages(config, fake=fake_stages)
        self.config_path = config_path
        self.overrides = overrides or []
        self.notifier = notifier if notifier is not None else Notifier()
        self.retry_base_seconds = retry_base_seconds
        self.resource_retry_seconds = resource_retry_seconds
        self.install_signals = install_signals
        self.reload_hooks: list[Callable[[Config], None]] = []

        self._stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._reload = threading.Event()
        self._work = threading.Event()  # wakes the worker: new job, forced publish, stop
        self._not_before: dict[int, float] = {}  # job id -> monotonic time of the next try
        self._lock_fd: int | None = None
        self._store: JobStore | None = None  # the calling thread's (run_until_idle / main loop)
        self._worker_error: BaseException | None = None
        self.current: dict[str, Any] | None = None  # what the worker runs now (read by main)
        self.stuck = False  # a stage ignored the stop request past service.stop_timeout
        self.watcher = InboxWatcher(self.layout, config, on_new_job=lambda _job_id: self._work.set())
        self.metrics = MetricsWriter(self._metrics_path(config))
        self._runtime_last: dict[str, Any] | None = None
        self._runtime_lock = threading.Lock()  # main loop and worker both update daemon.json
        self._runtime_state = "stopped"
        self._started_at = utc_now()

    def _metrics_path(self, config: Config) -> Path:
        p = Path(config.service.metrics_file)
        return p if p.is_absolute() else self.layout.root / p

    # ---- start / stop -------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout, take the data-dir lock, and repair what a crash left half done."""
        if self._store is not None:
            return
        self.layout.create()
        fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DaemonError(f"another edgekif daemon is running on {self.layout.root}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self._store = JobStore(self.layout.state_db)
        reconcile_takes(self.layout, self._store)
        self._reconcile_rejections(self._store)

    def close(self, *, release_lock: bool = True) -> None:
        self.watcher.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        if release_lock and self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def request_stop(self, reason: str = "") -> None:
        if not self._stop.is_set():
            self._stop_requested_at = time.monotonic()
            log.info("stopping", extra={"reason": reason})
        self._stop.set()
        self._work.set()
        self.watcher.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if not self.install_signals or threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def on_stop(signum: int, _frame: Any) -> None:
            self.request_stop(signal.Signals(signum).name)

        def on_hup(_signum: int, _frame: Any) -> None:
            self._reload.set()

        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
            old[sig] = signal.signal(sig, handler)
        return old

    def reload(self) -> None:
        """SIGHUP: re-read the config file. The data dir cannot change without a restart."""
        if self.config_path is None:
            log.info("SIGHUP: started without a config file; nothing to reload")
            return
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as e:
            log.error("config reload failed; keeping the running config", extra={"error": str(e)})
            return
        if new.data_path.resolve() != self.layout.root.resolve():
            log.warning("data_dir changes need a restart; keeping %s", self.layout.root)
        new.data_dir = str(self.layout.root)
        self.config = new
        self.watcher.config = new
        if hasattr(self.stages, "config"):
            self.stages.config = new  # type: ignore[attr-defined]
        self.metrics = MetricsWriter(self._metrics_path(new))
        for hook in self.reload_hooks:
            hook(new)
        log.info("config reloaded", extra={"config": str(self.config_path)})

    # ---- the main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or request_stop()). Returns the exit code."""
        self.open()
        assert self._store is not None
        old_handlers = self._install_signal_handlers()
        watcher = threading.Thread(target=self.watcher.run, args=(self._stop,), name="edgekif-watcher", daemon=True)
        worker = threading.Thread(target=self._worker_loop, name="edgekif-worker", daemon=True)
        rc = 0
        try:
            watcher.start()
            worker.start()
            log.info("daemon started", extra={"data_dir": str(self.layout.root), "pid": os.getpid()})
            self.notifier.ready(self._status_line())
            self._publish_runtime("running")
            tick = min(1.0, self.notifier.interval or 1.0)
            unhealthy_logged = False
            while not self._stop.wait(tick):
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                problem = self._health_problem(watcher, worker)
                if problem is None:
                    self.notifier.ping()
                    unhealthy_logged = False
                elif not unhealthy_logged:
                    # No pings: systemd's watchdog restarts us (WatchdogSec).
                    log.error("unhealthy, no watchdog pings", extra={"problem": problem})
                    unhealthy_logged = True
                if not worker.is_alive() and self._worker_error is not None:
                    rc = 1
                    break
                self._refresh_outputs()
            self.notifier.stopping()
            self.notifier.status("stopping")
            self._publish_runtime("stopping")
            self.request_stop("shutdown")
            deadline = (self._stop_requested_at or time.monotonic()) + self.config.service.stop_timeout
            worker.join(max(0.0, deadline - time.monotonic()))
            watcher.join(max(0.1, min(5.0, deadline - time.monotonic())))
            if worker.is_alive():
                self.stuck = True
                cur = self.current or {}
                log.error(
                    "a stage did not stop within service.stop_timeout; exiting anyway (it re-runs on restart)",
                    extra={"job_id": cur.get("job_id"), "stage": cur.get("stage"), "stop_timeout": self.config.service.stop_timeout},
                )
                if cur.get("job_id") is not None:
                    # Being stopped is not the stage's fault: don't count it as a crash.
                    with contextlib.suppress(Exception):
                        self._store.refund_attempt(cur["job_id"], cur["state"])
            if self._worker_error is not None:
                rc = 1
            self._refresh_outputs()
            self._publish_runtime("stopped")
            log.info("daemon stopped", extra={"exit_code": rc})
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            # A stuck worker still runs a stage for this data dir: keep the lock until exit.
            self.close(release_lock=not self.stuck)
        return rc

    def _health_problem(self, watcher: threading.Thread, worker: threading.Thread) -> str | None:
        if not worker.is_alive():
            return "worker thread died"
        if not watcher.is_alive():
            return "watcher thread died"
        last = self.watcher.last_scan
        limit = max(3 * self.config.service.scan_interval, 60.0)
        if last is not None and time.monotonic() - last > limit:
            return f"inbox not scanned for {time.monotonic() - last:.0f} s"
        return None

    def _refresh_outputs(self) -> None:
        """Metrics textfile, sd_notify STATUS and daemon.json; each written only on change."""
        assert self._store is not None
        try:
            training = bool(self.current and self.current.get("stage") == "train")
            self.metrics.write(self._store, training=training)
            self.notifier.status(self._status_line())
            self._publish_runtime()
        except Exception:
            log.exception("could not refresh metrics/status")

    def _status_line(self) -> str:
        assert self._store is not None
        queued = len(self._store.queue())
        cur = self.current
        if cur:
            progress = _read_json(self.layout.job_dir(cur["job_id"]) / "progress.json") or {}
            total = progress.get("total_steps") or progress.get("steps") or "?"
            step = f" step {progress['step']}/{total}" if cur["stage"] == "train" and "step" in progress else ""
            return f"job {cur['job_id']} ({cur['file']}): {cur['stage']}{step}; {queued} unfinished"
        pub = self._store.last_published()
        return f"idle; {queued} unfinished; live {pub.version if pub else 'none'}"

    def _publish_runtime(self, state: str | None = None) -> None:
        """daemon.json, for `status`: rewritten (atomically) only when something changed."""
        with self._runtime_lock:
            if state is not None:
                self._runtime_state = state
            if self._lock_fd is None:  # not running (run_until_idle without run())
                return
            info = {
                "pid": os.getpid(),
                "state": self._runtime_state,
                "started_at": self._started_at,
                "data_dir": str(self.layout.root),
                "current": self.current,
                # `status` shows it; the idle daemon must not have paid for importing torch.
                "torch_loaded": "torch" in sys.modules,
            }
            if info != self._runtime_last:
                replace_json(self.layout.runtime_file, info)
                self._runtime_last = info

    def _set_current(self, current: dict[str, Any] | None) -> None:
        self.current = current
        if self._runtime_state != "stopped":
            self._publish_runtime()

    # ---- the worker ---------------------------------------------------------------------

    def _worker_loop(self) -> None:
        store = JobStore(self.layout.state_db)
        try:
            while not self._stop.is_set():
                self._work.clear()
                job = store.next_job()
                if job is None:
                    self._work.wait(self.config.service.scan_interval)
                    continue
                wait = self._not_before.get(job.id, 0.0) - time.monotonic()
                if wait > 0:
                    self._work.wait(min(wait, self.config.service.scan_interval))
                    continue
                self.step(store, job)
        except BaseException as e:  # noqa: BLE001 - report and let the main loop exit non-zero
            self._worker_error = e
            log.critical("worker died", exc_info=True)
            self._stop.set()
        finally:
            self.current = None
            store.close()

    def run_until_idle(self, *, scan: bool = True, max_steps: int = 100_000) -> int:
        """Synchronous: scan the inbox once and run jobs until none is runnable. For tests and
        one-shot use. Returns the number of stage steps run."""
        self.open()
        assert self._store is not None
        if scan:
            self.watcher.scan_once()
        steps = 0
        while steps < max_steps and not self._stop.is_set():
            job = self._store.next_job()
            if job is None or self._not_before.get(job.id, 0.0) > time.monotonic():
                break
            self.step(self._store, job)
            steps += 1
        return steps

    def context(self, store: JobStore, job: Job) -> JobContext:
        work = self.layout.job_dir(job.id)
        work.mkdir(parents=True, exist_ok=True)
        task = None
        if job.task_id is not None:
            row = store.task(job.task_id)
            if row is not None:
                task = TaskInfo(row["name"], row["examples"], job.metrics.get("validate", {}).get("details", {}))
        pub = store.last_published()
        published = None
        if pub is not None:
            accs = pub.metrics.get("evaluate", {}).get("accuracies", {})
            published = Published(version=pub.version or "", job_id=pub.id, accuracies={k: float(v) for k, v in accs.items()})
        past = []
        for j in store.jobs(("published",)):
            if j.task_id is not None and (t := store.task(j.task_id)) is not None and t["name"] not in past:
                past.append(t["name"])
        return JobContext(
            job_id=job.id,
            file_name=job.file_name,
            file_path=Path(job.file_path),
            sha256=job.sha256,
            work_dir=work,
            layout=self.layout,
            config=self.config,
            task=task,
            metrics=dict(job.metrics),
            published=published,
            past_tasks=past,
        )

    def step(self, store: JobStore, job: Job) -> None:
        """Run the next stage of `job` and commit its result (or its failure)."""
        ctx = self.context(store, job)
        try:
            handler = getattr(self, f"_from_{job.state}")
        except AttributeError:
            raise DaemonError(f"job {job.id}: no step from state {job.state!r}") from None
        try:
            handler(store, job, ctx)
        except _Handled:
            pass
        finally:
            self._set_current(None)

    def _guarded(self, store: JobStore, job: Job, stage: str, fn: Callable[[], Any]) -> Any:
        """Run one stage call with attempt counting and error handling.

        ValidationError -> job rejected; ResourceError / Interrupted -> stays queued, attempt
        refunded; other exceptions -> retried with backoff, `failed` after MAX_ATTEMPTS.
        BaseExceptions (KeyboardInterrupt, SimulatedCrash) are not caught: like a crash.
        """
        attempts = store.begin_attempt(job.id, job.state, stage)
        if attempts > MAX_ATTEMPTS:
            store.fail(job.id, job.state, {
                "kind": "crashed", "stage": stage,
                "message": f"{stage} was started {MAX_ATTEMPTS} times without finishing (process killed or crashed)",
            })
            log.error("job failed: stage never finished", extra={"job_id": job.id, "stage": stage})
            raise _Handled
        self._set_current({"job_id": job.id, "file": job.file_name, "state": job.state, "stage": stage, "since": utc_now(), "attempt": attempts})
        try:
            if stage in MODEL_STAGES:
                check_memory(self.config.service.memory_ceiling_mb)
            return fn()
        except Exception as e:
            self._stage_failed(store, job, stage, attempts, e)
            raise _Handled from None
        finally:
            if stage in MODEL_STAGES:
                release_memory()

    def _stage_failed(self, store: JobStore, job: Job, stage: str, attempts: int, e: Exception) -> None:
        if isinstance(e, ValidationError) and "rejected" in TRANSITIONS[job.state]:
            self._reject_job(store, job, e, stage)
        elif isinstance(e, ResourceError):
            store.refund_attempt(job.id, job.state)
            self._not_before[job.id] = time.monotonic() + self.resource_retry_seconds
            log.warning("not enough resources; job stays queued", extra={"job_id": job.id, "stage": stage, "error": str(e), "retry_in_s": self.resource_retry_seconds})
        elif isinstance(e, Interrupted):
            store.refund_attempt(job.id, job.state)
            log.info("stage stopped at a checkpoint", extra={"job_id": job.id, "stage": stage, "detail": str(e)})
        elif attempts >= MAX_ATTEMPTS:
            store.fail(job.id, job.state, _error_dict(e, stage))
            log.error("job failed", extra={"job_id": job.id, "stage": stage, "attempts": attempts, "error": str(e)}, exc_info=e)
        else:
            store.record_error(job.id, job.state, _error_dict(e, stage))
            delay = self.retry_base_seconds * 2 ** (attempts - 1)
            self._not_before[job.id] = time.monotonic() + delay
            log.warning("stage failed; will retry", extra={"job_id": job.id, "stage": stage, "attempt": attempts, "retry_in_s": delay, "error": str(e)}, exc_info=e)

    # One method per state: run what comes after it, commit, done.

    def _from_received(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        info = self._guarded(store, job, "validate", lambda: self.stages.validate(ctx))
        store.advance(job.id, "received", "validated", metrics={"validate": info.to_dict()},
                      task={"name": info.name, "examples": info.examples})
        log.info("validated", extra={"job_id": job.id, "task": info.name, "examples": info.examples})

    def _from_validated(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        result = self._guarded(store, job, "buffer", lambda: self.stages.buffer(ctx))
        d = result.to_dict() if result is not None else {}
        store.advance(job.id, "validated", "buffered", metrics={"buffer": d}, holdout=d.get("holdout_path"))
        log.info("buffered", extra={"job_id": job.id, **{k: v for k, v in d.items() if k != "details"}})

    def _from_buffered(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        store.advance(job.id, "buffered", "training")

    def _train(self, store: JobStore, job: Job, ctx: JobContext) -> Any:
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = self.stages.train(ctx, self._stop.is_set)
            outcome = "done"
            return result
        except Interrupted:
            outcome = "interrupted"
            raise
        finally:
            # Counted even when interrupted: training_seconds_total is time spent, not time kept.
            store.log_event(job.id, "train_run", seconds=round(time.monotonic() - t0, 3), outcome=outcome)

    def _from_training(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        if "train" not in job.metrics:
            result = self._guarded(store, job, "train", lambda: self._train(store, job, ctx))
            job = store.record(job.id, "training", metrics={"train": result.to_dict()}, kind="trained", steps=result.steps)
            log.info("trained", extra={"job_id": job.id, "steps": result.steps})
            if self._stop.is_set():
                return
            ctx = self.context(store, job)
        result = self._guarded(store, job, "evaluate", lambda: self.stages.evaluate(ctx))
        store.advance(job.id, "training", "evaluated", metrics={"evaluate": result.to_dict()})
        log.info("evaluated", extra={"job_id": job.id, "accuracies": result.accuracies})

    def _from_evaluated(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        gate = dict(job.metrics.get("gate") or {})
        forced = bool(gate.get("forced"))

        def gate_then_export() -> tuple[dict[str, Any], Path | None]:
            info = gate
            if not forced:
                result = EvalResult.from_dict(job.metrics.get("evaluate", {}))
                ok, reasons = self.stages.gate(ctx, result)
                info = {
                    "ok": bool(ok),
                    "reasons": list(reasons),
                    "threshold_points": self.config.service.forgetting_threshold,
                    "accuracies": result.accuracies,
                    "published_version": ctx.published.version if ctx.published else None,
                    "published_accuracies": ctx.published.accuracies if ctx.published else {},
                }
                if not ok:
                    return info, None
            return info, Path(self.stages.export(ctx))

        info, path = self._guarded(store, job, "export", gate_then_export)
        if path is None:
            store.advance(job.id, "evaluated", "held", metrics={"gate": info},
                          error={"kind": "forgetting", "message": "; ".join(info["reasons"]), "reasons": info["reasons"]})
            log.warning("held by the forgetting gate (edgekif publish --force %d overrides)", job.id,
                        extra={"job_id": job.id, "reasons": info["reasons"]})
            return
        store.advance(job.id, "evaluated", "exported", metrics={"gate": info, "export": {"path": str(path)}})
        log.info("exported", extra={"job_id": job.id, "path": str(path), "forced": forced})

    def _from_exported(self, store: JobStore, job: Job, ctx: JobContext) -> None:
        path = Path(job.metrics["export"]["path"])
        version = str(self._guarded(store, job, "publish", lambda: self.stages.publish(ctx, path)))
        store.advance(job.id, "exported", "published", version=version, metrics={"publish": {"version": version}})
        log.info("published", extra={"job_id": job.id, "version": version})

    # ---- rejections of accepted files ---------------------------------------------------

    def _reject_job(self, store: JobStore, job: Job, e: ValidationError, stage: str) -> None:
        """Job -> rejected and its file -> rejected/NAME with NAME.error.json.

        Crash-safe order: commit (job rejected, file 'rejecting', destination in the error),
        move, then mark the file 'rejected'; _reconcile_rejections() redoes the move.
        """
        dest = unique_rejected_dest(self.layout.rejected, safe_name(job.file_name), job.file_name)
        error = {**e.to_dict(), "stage": stage, "rejected_path": str(dest)}
        store.advance(job.id, job.state, "rejected", error=error, file_status="rejecting")
        self._move_rejected(store, job.file_id, dest, e.to_dict(), job.id)
        log.warning("rejected %s: %s", job.file_name, e, extra={"job_id": job.id, "stage": stage, "rejected_path": str(dest)})

    def _move_rejected(self, store: JobStore, file_id: int, dest: Path, error: dict[str, Any], job_id: int) -> None:
        f = store.file(file_id)
        if os.path.lexists(f.path):
            move_to_rejected(self.layout, f.path, name=f.name, error=error, sha256=f.sha256,
                             received_at=f.received_at, dest=dest, extra={"job_id": job_id})
        store.set_file(file_id, status="rejected", path=str(dest))

    def _reconcile_rejections(self, store: JobStore) -> None:
        for f in store.files("rejecting"):
            jobs = [j for j in store.jobs(("rejected",)) if j.file_id == f.id]
            if not jobs:
                continue
            job = jobs[-1]
            error = {k: v for k, v in (job.error or {}).items() if k not in ("rejected_path", "stage")}
            self._move_rejected(store, f.id, Path(job.error["rejected_path"]), error, job.id)
            log.info("finished an interrupted rejection", extra={"job_id": job.id, "file": f.name})


# ---- process-level settings -------------------------------------------------------------------


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


def apply_niceness(target: int) -> None:
    """Raise our nice value to `target` (never lower it: that needs privileges, and systemd's
    Nice= may already have set it)."""
    current = os.nice(0)
    if target > current:
        os.nice(target - current)
    elif target < current:
        log.info("nice %d requested, already at %d; leaving it", target, current)


def apply_thread_limits(threads: int) -> None:
    """model.threads for the BLAS/OpenMP pools torch creates on import (the library stages
    also call torch.set_num_threads)."""
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))


def run_daemon(
    config: Config,
    *,
    fake_stages: bool = False,
    config_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; returns the exit code.

    Pass config_path/overrides so SIGHUP can re-read the same file with the same overrides.
    """
    layout = DataLayout(config.data_path)
    layout.create()
    svc = config.service
    setup_logging(layout.logs, max_bytes=svc.log_max_bytes, backups=svc.log_backups)
    apply_niceness(svc.nice)
    apply_thread_limits(config.model.threads)
    try:
        daemon = Daemon(config, fake_stages=fake_stages, config_path=config_path, overrides=overrides)
    except EdgekifError as e:
        log.error("cannot start: %s", e)
        return 1

    def on_reload(cfg: Config) -> None:
        setup_logging(layout.logs, max_bytes=cfg.service.log_max_bytes, backups=cfg.service.log_backups)
        apply_niceness(cfg.service.nice)

    daemon.reload_hooks.append(on_reload)
    try:
        rc = daemon.run()
    except DaemonError as e:
        log.error("cannot start: %s", e)
        return 1
    if daemon.stuck:
        # The worker thread is still inside a stage; state.db is consistent and every stage
        # is idempotent, so leave without waiting for it.
        logging.shutdown()
        os._exit(rc)
    return rc


# ---- status / CLI helpers ---------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        "error": (job.error or {}).get("message"),
    }


def status(config: Config) -> dict[str, Any]:
    """Everything `edgekif status` shows, as plain data (also fine for `--json`)."""
    layout = DataLayout(config.data_path)
    runtime = _read_json(layout.runtime_file)
    running = bool(runtime and runtime.get("state") in ("running", "stopping") and _pid_alive(int(runtime.get("pid", 0))))
    out: dict[str, Any] = {
        "data_dir": str(layout.root),
        "daemon": {
            "running": running,
            "pid": runtime.get("pid") if running else None,
            "state": runtime.get("state") if runtime else None,
            "started_at": runtime.get("started_at") if running else None,
            "torch_loaded": runtime.get("torch_loaded") if running else None,
        },
        "initialized": layout.state_db.exists(),
        "inbox_waiting": 0,
        "queue": [],
        "current": None,
        "published": None,
        "counts": {},
        "problems": [],
        "buffer": _buffer_stats(layout.replay_db),
    }
    if layout.inbox.is_dir():
        out["inbox_waiting"] = sum(1 for n in os.listdir(os.fsencode(layout.inbox)) if not n.startswith(b"."))
    if not layout.state_db.exists():
        return out
    with JobStore(layout.state_db) as store:
        queue = store.queue()
        out["queue"] = [_job_summary(j) for j in queue]
        cur = (runtime or {}).get("current") if running else None
        if cur is None and queue:
            cur = {"job_id": queue[0].id, "file": queue[0].file_name, "state": queue[0].state, "stage": None}
        if cur is not None:
            cur = dict(cur)
            cur["progress"] = _read_json(layout.job_dir(cur["job_id"]) / "progress.json")
        out["current"] = cur
        pub = store.last_published()
        if pub is not None:
            out["published"] = {
                "version": pub.version,
                "job_id": pub.id,
                "file": pub.file_name,
                "published_at": pub.updated_at,
                "accuracies": pub.metrics.get("evaluate", {}).get("accuracies", {}),
            }
        out["counts"] = store.state_counts()
        out["problems"] = [_job_summary(j) for j in store.jobs(("failed", "held", "rejected", "duplicate"), limit=10, newest_first=True)]
    return out


def format_status(st: dict[str, Any]) -> str:
    """`status()` as a human-readable table."""
    lines = [f"edgekif  data dir: {st['data_dir']}"]
    d = st["daemon"]
    lines.append(f"daemon:   {'running (pid %s)' % d['pid'] if d['running'] else 'not running'}")
    pub = st.get("published")
    if pub:
        lines.append(f"live:     {pub['version']} (job {pub['job_id']}, {pub['file']}, {pub['published_at']})")
        for task, acc in sorted(pub["accuracies"].items()):
            lines.append(f"            {task:<24} {100 * float(acc):6.1f}")
    else:
        lines.append("live:     no model published yet")
    cur = st.get("current")
    if cur:
        prog = cur.get("progress") or {}
        extra = ""
        if "step" in prog:
            total = prog.get("total_steps") or prog.get("steps")
            extra = f"  step {prog['step']}/{total}" + (f" ({100 * prog['step'] / total:.0f}%)" if total else "")
        lines.append(f"current:  job {cur['job_id']} {cur['file']}  {cur['state']}{' / ' + cur['stage'] if cur.get('stage') else ''}{extra}")
    q = st.get("queue") or []
    lines.append(f"queue:    {len(q)} unfinished job(s), {st.get('inbox_waiting', 0)} file(s) waiting in inbox/")
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
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def force_publish(config: Config, job_id: int) -> str:
    """`edgekif publish --force JOB`: send a job the forgetting gate held on to export and
    publish (the daemon does the work). Refused if a later job was published since, because
    forcing this one would replace that newer model."""
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
        later = [j.id for j in store.jobs(("published",)) if j.id > job_id]
        if later:
            raise PublishError(f"job {job_id} was held before job {later[-1]} was published; forcing it would replace that newer model")
        reasons = gate.get("reasons") or []
        gate.update(forced=True, forced_at=utc_now())
        store.advance(job_id, "held", "evaluated", metrics={"gate": gate}, forced=True)
    return (f"job {job_id} ({job.file_name}) will be exported and published by the daemon despite the forgetting gate"
            + (f": {'; '.join(reasons)}" if reasons else ""))


def retry_job(config: Config, job_id: int) -> str:
    """Put a failed job back to the state it failed in (attempts reset)."""
    layout = DataLayout(config.data_path)
    with JobStore(layout.state_db) as store:
        job = store.retry(job_id)
    return f"job {job_id} ({job.file_name}) queued again from {job.state!r}"


__all__ = [
    "Daemon",
    "DaemonError",
    "run_daemon",
    "status",
    "format_status",
    "force_publish",
    "retry_job",
]
