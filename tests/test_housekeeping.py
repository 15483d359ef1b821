"""Nothing outlives its job: the genai builder's process dies with the daemon
(edgekif.children.run_child), and start-up removes temp files crashed runs left behind
(service.housekeeping.cleanup_stale_temp)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgekif.atomic import atomic_dir, atomic_write_text
from edgekif.children import run_child
from edgekif.errors import ExportError
from edgekif.export import build as export
from edgekif.export.build import GENAI_CACHE_PREFIX
from service.housekeeping import LEGACY_CACHE_MAX_AGE, cleanup_stale_temp
from edgekif.layout import DataLayout

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


def gone(pid: int) -> bool:
    """Exited (a zombie counts: in a container nobody may reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def read_pid(path: Path, timeout: float = 30.0) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().strip() != "", timeout), f"{path} never written"
    return int(path.read_text())


def test_run_child_returns_like_subprocess_run():
    res = run_child(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")


@linux_only
def test_child_dies_when_its_parent_is_killed(tmp_path):
    """The parent (standing in for the daemon) is SIGKILLed mid-export: no cleanup code runs
    in it, yet its child (standing in for the builder) is killed by the kernel."""
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from edgekif.children import run_child
        run_child(["/bin/sh", "-c", "echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 60"])
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        child = read_pid(pidfile)
        assert not gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert wait_until(lambda: gone(child), 20), f"child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pidfile.exists() and not gone(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_child(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"], timeout=2)
    grandchild = read_pid(pidfile, 5)
    assert wait_until(lambda: gone(grandchild), 20), "a grandchild in the builder's group survived the timeout"


def test_genai_cache_is_named_with_our_pid(tmp_path, monkeypatch):
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text("{}")
    seen = {}

    def fake_run_child(cmd, **kw):
        seen["cache"] = cmd[cmd.index("-c") + 1]
        seen["exists"] = os.path.isdir(seen["cache"])
        return subprocess.CompletedProcess(cmd, 1, "", "boom")

    monkeypatch.setattr(export, "run_child", fake_run_child)
    with pytest.raises(ExportError, match="builder failed"):
        export._build_genai(fused, tmp_path / "out", "int4", "cpu")
    assert Path(seen["cache"]).name.startswith(f"{GENAI_CACHE_PREFIX}{os.getpid()}-") and seen["exists"]
    assert not os.path.exists(seen["cache"])


def _dead_pid() -> int:
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    return p.pid  # reaped: no such process (pid reuse within the test is negligible)


def test_cleanup_stale_temp_removes_only_leftovers(tmp_path):
    layout = DataLayout(tmp_path / "data")
    layout.create()
    tmp_root = tmp_path / "systmp"
    tmp_root.mkdir()
    job = layout.jobs / "7"
    job.mkdir()

    def mk(path: Path, *, folder: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            path.mkdir()
            (path / "model.onnx.data").write_bytes(b"x" * 10)
        else:
            path.write_text("x")
        return path

    dead = _dead_pid()
    stale = [
        mk(job / ".export.k2j4h_9a.tmp", folder=True),
        mk(job / ".checkpoint.abcd1234.tmp", folder=True),
        mk(job / "work" / ".adapter.zzzzzzzz.tmp", folder=True),
        mk(job / ".progress.json.q1w2e3r4.tmp"),
        mk(job / f".export.old-{dead}", folder=True),
        mk(layout.root / ".metrics.prom.a1b2c3d4.tmp"),
        mk(layout.root / ".daemon.json.x_y_z_w_.tmp"),
        mk(layout.accepted / ".take.0a9b8c7d.tmp"),
        mk(layout.rejected / ".bad.jsonl.error.json.qqqqqqqq.tmp"),
        mk(tmp_root / f"{GENAI_CACHE_PREFIX}{dead}-abcdefgh", folder=True),
    ]
    legacy_old = mk(tmp_root / f"{GENAI_CACHE_PREFIX}oldstyle", folder=True)
    os.utime(legacy_old, (time.time() - LEGACY_CACHE_MAX_AGE - 60,) * 2)
    stale.append(legacy_old)
    kept = [
        mk(job / "checkpoint", folder=True),
        mk(job / "export", folder=True),
        mk(job / "progress.json"),
        mk(layout.inbox / ".user-writing.jsonl.abcdefgh.tmp"),  # the inbox is the users'
        mk(layout.inbox / ".half.jsonl"),
        mk(layout.models / ".v0003.tmp", folder=True),  # ModelStore's, under its lock
        mk(layout.models / ".manifest.json.abcdefgh.tmp"),
        mk(layout.rejected / "dropped-dir.jsonl" / ".inner.abcdefgh.tmp"),  # a rejected dir stays as dropped
        mk(layout.accepted / "0123456789ab_t.jsonl"),
        mk(layout.root / "metrics.prom"),
        mk(tmp_root / f"{GENAI_CACHE_PREFIX}{os.getpid()}-abcdefgh", folder=True),  # a live export
        mk(tmp_root / f"{GENAI_CACHE_PREFIX}newstyle", folder=True),  # legacy name, recent
        mk(tmp_root / "unrelated.abcdefgh.tmp"),
        mk(job / f".export.old-{os.getpid()}", folder=True),
    ]
    removed = cleanup_stale_temp(layout, tmp_dir=tmp_root)
    assert sorted(removed) == sorted(stale)
    for p in stale:
        assert not os.path.lexists(p), p
    for p in kept:
        assert p.exists(), p
    assert cleanup_stale_temp(layout, tmp_dir=tmp_root) == []  # idempotent


def test_cleanup_finds_what_a_crashed_atomic_write_leaves(tmp_path, monkeypatch):
    """The names the cleanup matches are the ones edgekif.atomic really produces."""
    layout = DataLayout(tmp_path / "data")
    layout.create()
    job = layout.jobs / "1"

    def crash(*a, **k):
        raise KeyboardInterrupt  # like a kill at the worst moment: no cleanup of the temp

    monkeypatch.setattr(os, "replace", crash)
    # the writers' own cleanup on error "never ran" (the process was killed)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(job / "progress.json", "{}")
    with pytest.raises(KeyboardInterrupt), atomic_dir(job / "export") as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
    monkeypatch.undo()
    left = sorted(p.name for p in job.iterdir())
    assert len(left) == 2 and all(n.startswith((".progress.json.", ".export.")) and n.endswith(".tmp") for n in left)
    assert len(cleanup_stale_temp(layout, tmp_dir=tmp_path / "none")) == 2
    assert list(job.iterdir()) == []


def test_a_build_killed_inside_atomic_dir_is_cleared_from_a_shared_cache(tmp_path):
    """A process SIGKILLed while building a folder (the idle preparation, stopped when a job
    comes, converting the base into the user's shared cache) leaves its temp named with its
    pid; remove_dead_temps clears it before the next build, and leaves a live process's."""
    from edgekif.atomic import STALE_AFTER, remove_dead_temps

    cache = tmp_path / "models"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from edgekif.atomic import atomic_dir
        with atomic_dir({str(cache / 'abc123')!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            print(tmp.name, flush=True)
            time.sleep(60)
    """)
    killed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", script.replace("abc123", "def456")], stdout=subprocess.PIPE, text=True)
    try:
        half_built = killed.stdout.readline().strip()
        building = live.stdout.readline().strip()
        assert half_built == f".abc123.{killed.pid}.{half_built.split('.')[3]}.tmp"  # the pid in the name
        killed.kill()
        killed.wait(30)
        now = time.time()
        ours = cache / f".ghi789.{os.getpid()}.abcdefgh.tmp"  # this process is not building: stale
        parked = cache / f".abc123.old-{_dead_pid()}"  # a swap interrupted between its renames
        legacy_new, legacy_old = cache / ".jkl.k2j4h_9a.tmp", cache / ".mno.q1w2e3r4.tmp"  # named before the pid
        for p in (ours, parked, legacy_new, legacy_old):
            p.mkdir()
        os.utime(legacy_old, (now - STALE_AFTER - 60,) * 2)
        (cache / "abc999").mkdir()  # a finished folder
        removed = remove_dead_temps(cache, now=now)
        assert sorted(p.name for p in removed) == sorted([half_built, ours.name, parked.name, legacy_old.name])
        assert sorted(p.name for p in cache.iterdir()) == sorted([building, legacy_new.name, "abc999"])
        assert remove_dead_temps(tmp_path / "no-such-folder") == []
    finally:
        for p in (killed, live):
            if p.poll() is None:
                p.kill()
            p.wait()
