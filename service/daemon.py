"""The edgekif daemon process: lifecycle, signals, threads and what it tells systemd.

Threads:
  main     signals (SIGTERM/SIGINT stop, SIGHUP reload), sd_notify READY/STATUS/WATCHDOG,
           metrics textfile, daemon.json for `status`
  watcher  scans inbox/, takes complete files into accepted/ and queues a job for each
  worker   runs the oldest unfinished job one stage at a time (service.job_runner.JobRunner)

The job steps live in service.job_runner, status queries in service.status, operator actions
(publish --force, retry) in service.control. `python -m service` and `edgekif serve` call
run_daemon().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgekif.config import Config, load_config
from edgekif.errors import ConfigError, EdgekifError
from edgekif.strategies import one_task_at_a_time
from edgekif.layout import DataLayout

from .jobs import Job, JobStore, utc_now
from .logs import setup_logging
from .housekeeping import cleanup_stale_temp
from .metrics import MetricsWriter, json_text, read_json, replace_json
from .job_runner import TRANSIENT_ERRNOS, JobRunner, transient_cause
from .sdnotify import Notifier
from .stages import Stages
from .watcher import InboxWatcher, reconcile_takes

if TYPE_CHECKING:
    from .preparer import BasePreparer

log = logging.getLogger(__name__)


class DaemonError(EdgekifError):
    """The daemon cannot start (another one holds the data dir) or its worker died."""


def default_stages(config: Config) -> Stages:
    """The real pipeline: the edgekif library behind the Stages interface; its model stages in
    a child process each (service.stage_process), unless service.model_stages_in_child is off
    (then in the daemon: it imports torch and keeps much of a job's memory afterwards)."""
    if config.service.model_stages_in_child:
        from .stage_process import ChildStages

        return ChildStages(config)
    from .edgekif_stages import LibraryStages

    return LibraryStages(config)


def default_preparer(config: Config, layout: DataLayout) -> BasePreparer | None:
    """service.preparer.BasePreparer unless service.prepare_base_when_idle is off."""
    if not config.service.prepare_base_when_idle:
        return None
    from .preparer import BasePreparer

    return BasePreparer(config, layout)


def health_problem(watcher: threading.Thread, worker: threading.Thread, last_scan: float | None, scan_interval: float) -> str | None:
    """Why the daemon is unhealthy (then it stops pinging systemd's watchdog), or None."""
    if not worker.is_alive():
        return "worker thread died"
    if not watcher.is_alive():
        return "watcher thread died"
    limit = max(3 * scan_interval, 60.0)
    if last_scan is not None and time.monotonic() - last_scan > limit:
        return f"inbox not scanned for {time.monotonic() - last_scan:.0f} s"
    return None


def status_line(store: JobStore, layout: DataLayout, current: dict[str, Any] | None, waiting: dict[int, dict[str, Any]] | None = None,
                preparing: bool = False) -> str:
    """The one line systemd shows (sd_notify STATUS)."""
    queued = len(store.queue())
    if not current and waiting:
        job_id, w = next(iter(waiting.items()))
        return f"job {job_id} waiting for resources before {w['stage']}: {w['reason']}; {queued} unfinished"
    if current:
        progress = read_json(layout.job(current["job_id"]).progress) or {}
        total = progress.get("total_steps") or progress.get("steps") or "?"
        step = f" step {progress['step']}/{total}" if current["stage"] == "train" and "step" in progress else ""
        return f"job {current['job_id']} ({current['file']}): {current['stage']}{step}; {queued} unfinished"
    pub = store.live()
    return f"idle; {queued} unfinished; live {pub.version if pub else 'none'}" + ("; preparing the base" if preparing else "")


class RuntimeFile:
    """daemon.json, for `status`: who runs, in which state, doing what. Rewritten (atomically)
    only when something changed; the main loop and the worker both update it."""

    def __init__(self, layout: DataLayout) -> None:
        self.layout = layout
        self.state = "stopped"
        self.started_at = utc_now()
        self._last: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def publish(self, current: dict[str, Any] | None, state: str | None = None, *, write: bool = True,
                waiting: dict[int, dict[str, Any]] | None = None, preparing: dict[str, Any] | None = None) -> None:
        with self._lock:
            if state is not None:
                self.state = state
            if not write:
                return
            info = {
                "pid": os.getpid(),
                "state": self.state,
                "started_at": self.started_at,
                "data_dir": str(self.layout.root),
                "current": current,
                "waiting": {str(k): v for k, v in (waiting or {}).items()},  # jobs held back by disk/memory
                "preparing_base": preparing,  # the idle-time base preparation's child, while it runs
                # `status` shows it; the idle daemon must not have paid for importing torch.
                "torch_loaded": "torch" in sys.modules,
            }
            if info != self._last:
                try:
                    replace_json(self.layout.runtime_file, info)
                except OSError as e:  # a full disk must not stop the daemon
                    if e.errno not in TRANSIENT_ERRNOS:
                        raise
                    if not _rewrite_in_place(self.layout.runtime_file, info):
                        log.warning("could not write daemon.json", extra={"error": str(e)})
                        return
                self._last = info


def _rewrite_in_place(path: Path, info: dict[str, Any]) -> bool:
    """On a full disk the atomic write's temp file has no room, but truncating the old file
    frees its blocks for the new text (a few hundred bytes): `status` can still say why the
    job waits. Not atomic: a reader may catch it empty for a moment and retries."""
    text = json_text(info).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError:
        return False
    try:
        os.write(fd, text)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Daemon:
    """One daemon on one data dir (an exclusive flock on daemon.lock enforces that)."""

    def __init__(
        self,
        config: Config,
        stages: Stages | None = None,
        *,
        config_path: str | os.PathLike | None = None,
        overrides: list[str] | None = None,
        notifier: Notifier | None = None,
        retry_base_seconds: float = 5.0,
        resource_retry_seconds: float = 60.0,
        install_signals: bool = True,
        preparer: BasePreparer | None = None,
    ) -> None:
        one_task_at_a_time(config.train.strategy)
        self.config = config
        self.layout = DataLayout(config.data_path)
        self.stages: Stages = stages if stages is not None else default_stages(config)
        # the base's one-time work while idle: with the real stages (tests inject their own)
        self.preparer = preparer if preparer is not None or stages is not None else default_preparer(config, self.layout)
        self.config_path = config_path
        self.overrides = overrides or []
        self.notifier = notifier if notifier is not None else Notifier()
        self.install_signals = install_signals
        self.reload_hooks: list[Callable[[Config], None]] = []

        self._stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._reload = threading.Event()
        self._work = threading.Event()  # wakes the worker: new job, forced publish, stop
        self._lock_fd: int | None = None
        self._store: JobStore | None = None  # the calling thread's (run_until_idle / main loop)
        self._worker_error: BaseException | None = None
        self.current: dict[str, Any] | None = None  # what the worker runs now (read by main)
        self.stuck = False  # a stage ignored the stop request past service.stop_timeout
        self._refresh_failed: dict[str, str] = {}  # what _refresh_outputs could not write -> the error logged
        self.runner = JobRunner(self.layout, config, self.stages, should_stop=self._stop.is_set, on_current=self._set_current,
                                retry_base_seconds=retry_base_seconds, resource_retry_seconds=resource_retry_seconds)
        self.watcher = InboxWatcher(self.layout, config, on_new_job=lambda _job_id: self._work.set())
        self.metrics = MetricsWriter(self._metrics_path(config))
        self.runtime = RuntimeFile(self.layout)
        if hasattr(self.stages, "on_child"):  # service.stage_process.ChildStages
            self.stages.should_stop = self._stop.is_set  # type: ignore[attr-defined]
            self.stages.on_child = self._on_child  # type: ignore[attr-defined]

    @property
    def _not_before(self) -> dict[int, float]:
        return self.runner.not_before

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
        with contextlib.suppress(OSError):  # the flock is the lock; the pid in it is for people (a full disk)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        cleanup_stale_temp(self.layout)  # what a killed daemon's jobs left half-written (frees disk first)
        from edgekif.publish import ModelStore  # torch-free

        ModelStore(self.layout.root).cleanup()  # a killed publish's staging and current.tmp-* links
        self._store = self._until_space("open state.db", lambda: JobStore(self.layout.state_db))
        self._until_space("finish interrupted file moves", lambda: (reconcile_takes(self.layout, self._store),
                                                                    self.runner.reconcile_rejections(self._store)))
        self.runner.drop_dead_job_files(self._store)  # what daemons before this rule kept

    def _until_space(self, what: str, fn: Callable[[], Any]) -> Any:
        """Start-up on a full disk starts and waits: retry `fn` while its failure is the disk's."""
        while True:
            try:
                return fn()
            except (OSError, sqlite3.Error) as e:
                why = transient_cause(e, self.layout.root)
                if why is None:
                    raise
                log.warning("waiting for disk space", extra={"action": what, "error": why})
                self.notifier.status(f"waiting: cannot {what}: {why}")
                wait = max(1.0, self.runner.resource_retry_seconds)
                self.notifier.extend_start(2 * wait + 30)  # until the next try, with room for it
                if self._stop.wait(wait):
                    raise DaemonError(f"stopped while waiting for disk space to {what}") from e

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
            one_task_at_a_time(new.train.strategy)
        except ConfigError as e:
            log.error("config reload failed; keeping the running config", extra={"error": str(e)})
            return
        if new.data_path.resolve() != self.layout.root.resolve():
            log.warning("data_dir changes need a restart; keeping %s", self.layout.root)
        new.data_dir = str(self.layout.root)
        self.config = new
        self.watcher.config = new
        self.runner.config = new
        if hasattr(self.stages, "config"):
            self.stages.config = new  # type: ignore[attr-defined]
        self.metrics = MetricsWriter(self._metrics_path(new))
        if self.preparer is not None:
            self.preparer.reconfigure(new)
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
                problem = health_problem(watcher, worker, self.watcher.last_scan, self.config.service.scan_interval)
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

    def _refresh_outputs(self) -> None:
        """Metrics textfile, sd_notify STATUS and daemon.json; each written only on change."""
        assert self._store is not None
        # Apart, so that a metrics file the daemon may not write (a node_exporter folder outside
        # what systemd lets it write) leaves systemd's status line and daemon.json up to date;
        # each failure is logged once until it changes, not on every tick.
        training = bool(self.current and self.current.get("stage") == "train")
        for what, refresh in (("metrics file", lambda: self.metrics.write(self._store, training=training)),
                              ("status", lambda: (self.notifier.status(self._status_line()), self._publish_runtime()))):
            try:
                refresh()
                self._refresh_failed.pop(what, None)
            except Exception as e:
                if self._refresh_failed.get(what) != str(e):
                    self._refresh_failed[what] = str(e)
                    log.exception("could not refresh the %s; logged again only if the error changes", what)

    def _status_line(self) -> str:
        assert self._store is not None
        return status_line(self._store, self.layout, self.current, self.runner.waiting,
                           preparing=self.preparer is not None and self.preparer.running is not None)

    def _publish_runtime(self, state: str | None = None) -> None:
        # not running (run_until_idle without run()): no daemon.json
        self.runtime.publish(self.current, state, write=self._lock_fd is not None, waiting=self.runner.waiting,
                             preparing=self.preparer.running if self.preparer is not None else None)

    def _on_child(self, pid: int | None) -> None:
        """A model stage's process started (pid) or ended (None): status shows its memory."""
        if self.current is not None:
            self._set_current({**{k: v for k, v in self.current.items() if k != "child_pid"}, **({"child_pid": pid} if pid else {})})

    def _set_current(self, current: dict[str, Any] | None) -> None:
        self.current = current
        if self.runtime.state != "stopped":
            self._publish_runtime()

    # ---- the worker ---------------------------------------------------------------------

    def _worker_loop(self) -> None:
        store = JobStore(self.layout.state_db)
        try:
            while not self._stop.is_set():
                self._work.clear()
                job = store.next_job()
                if job is None:
                    if self.preparer is not None:
                        self.preparer.when_idle()
                    self._work.wait(self.config.service.scan_interval)
                    continue
                if self.preparer is not None:
                    self.preparer.before_job()
                wait = self.runner.not_before.get(job.id, 0.0) - time.monotonic()
                if wait > 0:
                    self._work.wait(min(wait, self.config.service.scan_interval))
                    continue
                self.step(store, job)
        except BaseException as e:  # noqa: BLE001 - report and let the main loop exit non-zero
            self._worker_error = e
            log.critical("worker died", exc_info=True)
            self._stop.set()
        finally:
            if self.preparer is not None:
                self.preparer.stop("the daemon stops")
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
            if job is None or not self.runner.runnable(job):
                break
            self.step(self._store, job)
            steps += 1
        return steps

    def step(self, store: JobStore, job: Job) -> None:
        """Run the next stage of `job` (service.job_runner) and commit it."""
        self.runner.step(store, job)


# ---- process-level settings -------------------------------------------------------------------


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
    stages: Stages | None = None,
    config_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; returns the exit code.

    stages: the pipeline (default: the library's). Pass config_path/overrides so SIGHUP can
    re-read the same file with the same overrides.
    """
    layout = DataLayout(config.data_path)
    layout.create()
    svc = config.service
    setup_logging(layout.log_file, max_bytes=svc.log_max_bytes, backups=svc.log_backups)
    apply_niceness(svc.nice)
    apply_thread_limits(config.model.threads)
    # no progress bars in the daemon's log, from the stages it runs in this process or in
    # children (tqdm reads this when first imported; the daemon itself never imports it)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        daemon = Daemon(config, stages, config_path=config_path, overrides=overrides)
    except EdgekifError as e:
        log.error("cannot start: %s", e)
        return 1

    def on_reload(cfg: Config) -> None:
        setup_logging(layout.log_file, max_bytes=cfg.service.log_max_bytes, backups=cfg.service.log_backups)
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


