"""sd_notify protocol (service/sdnotify.py) against sockets bound by the test."""

from __future__ import annotations

import os
import socket

import pytest

from service.sdnotify import Notifier, notify, watchdog_interval


@pytest.fixture()
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_notify_sends_datagram_to_path_socket(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_abstract_namespace():
    name = f"edgekif-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert notify("STATUS=hello", socket_path="@" + name) is True
        assert sock.recv(4096) == b"STATUS=hello"
    finally:
        sock.close()


def test_no_socket_is_a_noop(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert Notifier().ping() is False
    # a socket path that is gone: reported as False, never raised
    assert notify("READY=1", socket_path=str(tmp_path / "gone.sock")) is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 60.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_notifier_ready_status_and_rate_limited_pings(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier(path)
    assert n.interval == 1.0
    n.ready("idle")
    assert sock.recv(4096) == b"READY=1\nSTATUS=idle"
    n.status("idle")  # unchanged status: not re-sent
    n.status("busy")
    assert sock.recv(4096) == b"STATUS=busy"
    assert n.ping(now=100.0) is True
    assert n.ping(now=100.5) is False  # within half the watchdog period
    assert n.ping(now=101.0) is True
    assert [sock.recv(4096), sock.recv(4096)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_a_start_that_waits_for_disk_space_extends_systemd_s_start_timeout(notify_socket, tmp_path, monkeypatch):
    """Under Type=notify a start-up that waits (state.db on a full disk) has not sent READY:
    without EXTEND_TIMEOUT_USEC systemd would kill it at TimeoutStartSec and start it again."""
    import errno

    import service.daemon as daemon_mod
    from edgekif.config import load_config
    from service.fake_stages import FakeStages

    path, sock = notify_socket
    real, calls = daemon_mod.JobStore, []

    def full_twice(p):
        calls.append(p)
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(p)

    monkeypatch.setattr(daemon_mod, "JobStore", full_twice)
    d = daemon_mod.Daemon(load_config(None, [f"data_dir={tmp_path}"]), FakeStages(tmp_path), notifier=Notifier(path),
                          resource_retry_seconds=0, install_signals=False)
    d.open()
    d.close()
    sent = []
    sock.setblocking(False)
    while True:
        try:
            sent.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    extends = [m for m in sent if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert len(calls) == 3 and len(extends) == 2 and int(extends[0].split("=")[1]) >= 30_000_000
