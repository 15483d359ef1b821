"""Child processes that cannot outlive the daemon (the genai model builder runs as one).

run_child is subprocess.run(capture_output=True, text=True) whose child gets its own process
group and, on Linux, PR_SET_PDEATHSIG=SIGKILL: a daemon killed with SIGKILL takes the child
(and its group) with it, and a timeout or interrupt kills the whole group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any, Callable, Sequence

_PR_SET_PDEATHSIG = 1
_prctl: Any = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _resolve_prctl() -> Any:
    """libc's prctl, looked up once in the parent: the preexec hook after fork() then makes
    one foreign call and no lookups or imports (a forked child of a threaded process must
    not take locks other threads may have held)."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            fn = ctypes.CDLL(None, use_errno=True).prctl
            fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            fn.restype = ctypes.c_int
            _prctl = fn
        except (OSError, AttributeError):
            _prctl = False
    return _prctl or None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (Linux
    PR_SET_PDEATHSIG); None elsewhere. If the parent already died before the prctl took
    effect, the signal would never come, so the child kills itself."""
    prctl = _resolve_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child started by start_child and everything in its group; wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own group: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def start_child(cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
    """subprocess.Popen(cmd, **popen) in its own process group, dying with the thread that
    started it (Linux): for a caller that polls the child itself (service.stage_process)."""
    return subprocess.Popen(list(cmd), process_group=0, preexec_fn=_die_with_parent_hook(), **popen)


def run_child(
    cmd: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), but the child cannot outlive us.

    The child gets its own process group, and on Linux PR_SET_PDEATHSIG=SIGKILL, so a daemon
    killed with SIGKILL (OOM killer, watchdog, kill -9) takes the child with it. On a timeout
    (subprocess.TimeoutExpired) or any exception here (an interrupt), the whole group is
    killed, grandchildren included, before the exception propagates. Caveat: the death signal
    follows the *thread* that started the child, so call this from a thread that waits for it
    (as here). Grandchildren that leave the group are not covered.
    """
    proc = start_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
