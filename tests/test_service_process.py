"""The daemon as a real process: signals, sd_notify, exit codes, no torch when idle.

`DaemonProcess` is the reusable harness (start/stop/kill a `python -m service` subprocess on
a data dir, read its JSON logs); import it from here for crash tests:

    from test_service_process import DaemonProcess
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from service.jobs import JobStore
from service.fake_stages import FakeStages

REPO = Path(__file__).resolve().parents[1]


class DaemonProcess:
    """`python -m service.fake_stages --data-dir DIR` (FakeStages) or, with fake_stages=False,
    `python -m service --data-dir DIR` (the real stages) in a subprocess.

    fake_options go to DIR/fake_stages.json (FakeStages kwargs); overrides are `--set k=v`.
    stdout+stderr (JSON log lines) go to DIR/daemon-<n>.out.
    """

    _count = 0

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        fake_stages: bool = True,
        fake_options: dict[str, Any] | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        config: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.fake_stages = fake_stages
        self.fake_options = fake_options
        self.overrides = list(overrides)
        self.config = config
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        DaemonProcess._count += 1
        self.out_path = self.data_dir / f"daemon-{DaemonProcess._count}.out"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        module = "service.fake_stages" if self.fake_stages else "service"
        cmd = [sys.executable, "-m", module, "--data-dir", str(self.data_dir)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        for ov in self.overrides:
            cmd += ["--set", ov]
        return cmd

    def start(self, *, wait_running: bool = True, timeout: float = 60.0) -> "DaemonProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.fake_options is not None:
            (self.data_dir / "fake_stages.json").write_text(json.dumps(self.fake_options))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # ours if pytest runs under systemd
            env.pop(var, None)
        env.update(self.env)
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        if wait_running:
            ok = self.wait_for(lambda: (self.runtime() or {}).get("pid") == self.pid and self.runtime()["state"] == "running", timeout)
            if not ok:
                self.kill()
                raise AssertionError(f"daemon did not start:\n{self.output()}")
        return self

    def runtime(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.data_dir / "daemon.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_for(self, cond: Callable[[], bool], timeout: float = 60.0, interval: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return bool(cond())
            time.sleep(interval)
        return False

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (raises if it does not exit in `timeout`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> int:
        """SIGKILL (a crash at an arbitrary point) and reap."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(30)
        self._out.close()
        return rc

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """Every output line parsed as JSON (fails the test on a non-JSON line)."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def __enter__(self) -> "DaemonProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def jobs(data_dir: Path):
    with JobStore(data_dir / "state.db") as store:
        return store.jobs()


def drop(data_dir: Path, name: str, text: str = '{"x": 1}\n') -> None:
    tmp = data_dir / "inbox" / f".{name}"
    tmp.write_text(text)
    os.rename(tmp, data_dir / "inbox" / name)


def test_sigterm_mid_training_exits_0_and_the_job_resumes(tmp_path):
    stop_timeout = 20
    opts = {"train_steps": 100, "step_seconds": 0.05}
    overrides = ["service.quiet_seconds=0.2", "service.scan_interval=0.5", f"service.stop_timeout={stop_timeout}"]
    daemon = DaemonProcess(tmp_path, fake_options=opts, overrides=overrides)
    with daemon:
        drop(tmp_path, "a.jsonl")
        progress = tmp_path / "jobs" / "1" / "progress.json"
        assert daemon.wait_for(lambda: progress.exists() and json.loads(progress.read_text()).get("step", 0) >= 3), daemon.output()
        daemon.send(signal.SIGTERM)
        assert daemon.wait(timeout=stop_timeout) == 0
    logs = daemon.logs()  # every line is a JSON object
    assert {"ts", "level", "logger", "msg"} <= set(logs[0])
    assert any(r["msg"] == "stopping" and r.get("reason") == "SIGTERM" for r in logs)
    assert any(r["msg"] == "stage stopped at a checkpoint" and r["job_id"] == 1 for r in logs)
    (job,) = jobs(tmp_path)
    assert job.state == "buffered" and job.attempts == 0
    stopped_at = json.loads((tmp_path / "jobs" / "1" / "checkpoint.json").read_text())["step"]
    assert 3 <= stopped_at < 100
    assert json.loads((tmp_path / "daemon.json").read_text())["state"] == "stopped"
    assert (tmp_path / "logs" / "edgekif.log").read_text().count("\n") >= len(logs) - 1

    again = DaemonProcess(tmp_path, fake_options={"train_steps": 100, "step_seconds": 0}, overrides=overrides)
    with again:
        assert again.wait_for(lambda: jobs(tmp_path)[0].state == "published"), again.output()
        assert again.stop() == 0
    trains = [(c["start_step"], c["end_step"]) for c in FakeStages.read_calls(tmp_path) if c["stage"] == "train"]
    assert trains == [(0, stopped_at), (stopped_at, 100)]
    assert [c["stage"] for c in FakeStages.read_calls(tmp_path)].count("buffer") == 1


def test_sd_notify_ready_watchdog_and_stopping(tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    try:
        env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
        daemon = DaemonProcess(tmp_path / "data", fake_options={}, env=env)
        with daemon:
            messages = []
            while not any(m == "WATCHDOG=1" for m in messages):
                messages.append(sock.recv(4096).decode())
            assert messages[0].startswith("READY=1\nSTATUS=idle")
            assert daemon.stop() == 0
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()


def test_idle_daemon_with_real_stages_never_imports_torch(tmp_path):
    cfg = tmp_path / "edgekif.toml"
    cfg.write_text("[service]\nscan_interval = 0.5\n")
    daemon = DaemonProcess(tmp_path / "data", fake_stages=False, config=cfg)
    with daemon:
        cfg.write_text("[service]\nscan_interval = 0.3\n")
        daemon.send(signal.SIGHUP)  # exercise the reload path too
        assert daemon.wait_for(lambda: any(r["msg"] == "config reloaded" for r in daemon.logs()), 30), daemon.output()
        time.sleep(1.0)  # a few idle ticks
        assert daemon.runtime()["torch_loaded"] is False
        maps = Path(f"/proc/{daemon.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert daemon.stop() == 0


def test_second_daemon_on_the_same_data_dir_exits_1(tmp_path):
    with DaemonProcess(tmp_path, fake_options={}) as first:
        second = DaemonProcess(tmp_path, fake_options={}).start(wait_running=False)
        assert second.wait(timeout=60) == 1
        assert "another edgekif daemon is running" in second.output()
        assert first.proc.poll() is None
        assert first.stop() == 0


def test_bad_config_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--data-dir", str(tmp_path), "--set", "service.no_such=1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "unknown option service.no_such" in proc.stderr


@pytest.fixture(autouse=True)
def _no_leftover_daemons(tmp_path):
    yield
    # Every DaemonProcess is reaped by its context manager; fail loudly if one was not.
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"-m\0service\0" in cmd and str(tmp_path).encode() in cmd:
                os.kill(int(p.name), signal.SIGKILL)
                pytest.fail(f"daemon process {p.name} was still running")
