"""The base's one-time work while the daemon has nothing else to do.

A base's first job pays for work that is the same for every job: the GGUF conversion, the
base's own export (the gates' like-for-like baseline) and its answers to the general prompts
(edgekif.workflow.prepare_base, `edgekif model prepare`): about 80 s on 2 cores for SmolLM2.
A daemon usually starts long before the first file arrives, so it does that work then, in a
child process of its own (the daemon never imports torch):

    BasePreparer(config, layout)   started by the worker when no job is queued (again a day
                                   after it ended: a check, and the cache's stale base
                                   exports removed); stopped
                                   (SIGKILL to its group) when one arrives or the daemon
                                   stops: everything it writes goes through atomic folders
                                   and a cache lock (edgekif.workflow), so the job finds
                                   either finished work or none, and does what is left
    main([REQUEST])                the child: prepare_base with the daemon's config

Off with `service.prepare_base_when_idle = false`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from edgekif.atomic import atomic_write_json
from edgekif.children import kill_group
from edgekif.config import Config, config_from_dict
from edgekif.layout import DataLayout

from .housekeeping import remove_dead_genai_caches
from .jobs import utc_now
from .stage_process import log_json_to_stdout, start_logged_child

log = logging.getLogger(__name__)

PREPARE_COMMAND = (sys.executable, "-m", "service.preparer")  # + REQUEST
MAX_STARTS = 3  # a preparation stopped by jobs is started again when idle, this many times a run
# An ended preparation runs again when idle after this long: on a prepared base it only checks
# (seconds), and it removes the cache's stale base exports (edgekif.workflow.prune_base_exports)
# on a daemon that runs for weeks without a restart.
RECHECK_SECONDS = 24 * 3600


class BasePreparer:
    """Runs `command REQUEST` while idle (module docstring), once, and again RECHECK_SECONDS
    after it ended. `state`: idle (not started yet, or stopped by a job and to be started
    again), running, done, failed (exited non-zero: the jobs do the work, as without it),
    given-up (stopped by jobs MAX_STARTS times)."""

    def __init__(self, config: Config, layout: DataLayout, command: Sequence[str] = PREPARE_COMMAND) -> None:
        self.config, self.layout, self.command = config, layout, tuple(command)
        self.state = "idle"
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._relay: threading.Thread | None = None
        self._reloaded: Config | None = None
        self._started_at = ""
        self._clock = time.time  # wall time: a device that sleeps still rechecks a calendar day on
        self._ended_at = 0.0

    @property
    def running(self) -> dict[str, Any] | None:
        """{pid, base, started_at} while the child runs (daemon.json, `edgekif status`), else None."""
        proc = self._proc
        if proc is None:
            return None
        return {"pid": proc.pid, "base": self.config.model.base or "default", "started_at": self._started_at}

    @property
    def request_path(self) -> Path:
        return self.layout.root / "prepare-request.json"

    def when_idle(self) -> None:
        """Called by the worker when no job is queued: start the child once, or notice its end."""
        if self._reloaded is not None and self.state != "running":
            self.config, self._reloaded = self._reloaded, None
            self.state, self.starts = "idle", 0
        if self.state in ("done", "failed", "given-up") and self._clock() - self._ended_at >= RECHECK_SECONDS:
            self.state, self.starts = "idle", 0
        if self.state == "running":
            self._poll()
        elif self.state == "idle":
            if self.starts >= MAX_STARTS:
                self.state, self._ended_at = "given-up", self._clock()
                log.info("base preparation left to the jobs: stopped by jobs too often", extra={"starts": self.starts})
                return
            try:
                self._start()
            except (OSError, ValueError, subprocess.SubprocessError) as e:  # a full disk, a missing interpreter: the jobs do the work, as without it
                self._proc = self._relay = None
                self.state, self._ended_at = "failed", self._clock()
                log.warning("base preparation could not start", extra={"error": f"{type(e).__name__}: {e}"})

    def before_job(self) -> None:
        """Called by the worker before a job's stage: the job must have the cores."""
        if self.state == "running" and not self._poll():
            self.stop("a job is ready: it does what is left of the preparation")  # back to idle

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (SIGHUP, the main thread) may name another base or export: the
        worker prepares again with it when idle (a base already prepared costs a check)."""
        self._reloaded = config

    def stop(self, reason: str) -> None:
        """Stop a running child (the daemon stops, or a job comes)."""
        if self._proc is None:
            return
        kill_group(self._proc)
        if self._relay is not None:
            self._relay.join(5)
        self._proc = self._relay = None
        self.state = "idle"
        # The child's half-built folders in the cache go when the next build there starts
        # (edgekif.atomic.remove_dead_temps); the genai builder's scratch in the system temp
        # dir would wait for the next daemon start.
        scratch = remove_dead_genai_caches()
        log.info("base preparation stopped", extra={"reason": reason, "removed": [str(p) for p in scratch]})

    def _start(self) -> None:
        atomic_write_json(self.request_path, {"config": self.config.to_dict()})
        self._proc, self._relay = start_logged_child([*self.command, str(self.request_path)], "prepare")
        self.starts += 1
        self._started_at = utc_now()
        self.state = "running"
        log.info("base preparation started while idle", extra={"child_pid": self._proc.pid, "base": self.config.model.base or "default"})

    def _poll(self) -> bool:
        """True when the child has ended (its outcome logged)."""
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is None:
            return False
        if self._relay is not None:
            self._relay.join(5)
        self._proc = self._relay = None
        self.state = "done" if rc == 0 else "failed"
        self._ended_at = self._clock()
        (log.info if rc == 0 else log.warning)("base preparation ended", extra={"returncode": rc, "state": self.state})
        return True


def main(argv: list[str] | None = None) -> int:
    """The child: prepare the base with the daemon's config; 0 when done, 2 on an edgekif error
    (logged: the jobs will meet it again and report it against a file)."""
    from edgekif.errors import EdgekifError

    argv = sys.argv[1:] if argv is None else argv
    log_json_to_stdout()
    try:
        config = config_from_dict(json.loads(Path(argv[0]).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, EdgekifError) as e:  # the daemon writes it atomically: a damaged disk, a hand edit
        log.warning("base preparation not started: its request cannot be read", extra={"request": argv[0], "error": f"{type(e).__name__}: {e}"})
        return 2
    try:
        from edgekif.workflow import prepare_base

        done = prepare_base(config)
    except EdgekifError as e:
        log.warning("base preparation failed", extra={"error": f"{type(e).__name__}: {e}"})
        return 2
    log.info("base prepared", extra={"settings": [d["variant"] for d in done], "seconds": sum(d["seconds"] for d in done)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
