"""The few lines of systemd's sd_notify protocol the daemon needs (no libsystemd dependency).

A datagram "KEY=VALUE\\n..." sent to the AF_UNIX socket named by $NOTIFY_SOCKET; a name
starting with '@' is in the abstract namespace. Without $NOTIFY_SOCKET (not started by
systemd, or Type=simple) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def notify(state: str, *, socket_path: str | None = None) -> bool:
    """Send one notification ("READY=1", "STATUS=...", "WATCHDOG=1", "STOPPING=1").

    Returns False (and never raises) when there is no socket or sending failed: the daemon
    must keep working when systemd is absent or gone.
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(path))
            sock.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError as e:
        log.debug("sd_notify failed", extra={"socket": path, "error": str(e)})
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if not enabled.

    $WATCHDOG_PID, when set, must be our pid (systemd sets it so children don't ping).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """READY/STATUS/STOPPING plus rate-limited watchdog pings for the daemon's main loop."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self.interval = watchdog_interval()
        self._last_ping = 0.0
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def send(self, state: str) -> bool:
        if not self.socket_path:
            return False
        return notify(state, socket_path=self.socket_path)

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_status = status

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def extend_start(self, seconds: float) -> None:
        """Before READY: tell systemd (>= 236) the start goes on for another `seconds`, and ping
        the watchdog, so a start-up that waits (for disk space) is not killed by
        TimeoutStartSec and restarted over and over."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
        self.ping()

    def ping(self, *, now: float | None = None) -> bool:
        """WATCHDOG=1 if half the watchdog period passed since the last ping."""
        if not self.interval or not self.socket_path:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")
