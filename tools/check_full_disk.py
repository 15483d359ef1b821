"""A real full filesystem under a running daemon: it stays up, waits, and publishes once space is back.

    python tools/check_full_disk.py [--size-mb 48] [--keep]

Needs root (it mounts a tmpfs of --size-mb as the data dir) and Linux; elsewhere it says why
and exits 0 having checked nothing. The daemon is `python -m service.fake_stages` (the fake
stages: they write real files, state.db rows and checkpoints, fast) with its model stages in
child processes as the real daemon runs them. Scenarios, each on a really full disk (a filler
file written until ENOSPC):

  1. the disk fills during training: the daemon stays up, logs that the job waits and
     `edgekif status` says so; the filler is removed; the job is published by itself
  2. the disk fills during export: the same
  3. the daemon is stopped, the disk filled, the daemon started: it starts and stays up; the
     filler is removed; a file dropped then is published

Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekif.layout import DataLayout  # noqa: E402


def can_mount() -> str | None:
    """Why this machine cannot run the check, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (mounting a tmpfs needs it)"
    probe = Path(tempfile.mkdtemp(prefix="edgekif-fullcheck-probe-"))
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs here: {r.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
    finally:
        probe.rmdir()
    return None


class Daemon:
    def __init__(self, data: Path, out: Path) -> None:
        self.data, self.out = data, out
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(var, None)
        cmd = [sys.executable, "-m", "service.fake_stages", "--data-dir", str(self.data),
               "--set", "service.quiet_seconds=0.2", "--set", "service.scan_interval=0.3"]
        # the log goes to a file outside the full filesystem: what journald would keep
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.out, "ab"), stderr=subprocess.STDOUT, cwd=REPO)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            self.proc.wait(60)  # type: ignore[union-attr]

    def log_has(self, text: str) -> bool:
        return text in self.out.read_text(errors="replace")


def wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def job_states(layout: DataLayout) -> dict[str, str]:
    try:
        con = sqlite3.connect(f"file:{layout.state_db}?mode=ro", uri=True, timeout=5)
        rows = con.execute("SELECT files.name, jobs.state FROM jobs JOIN files ON files.id = jobs.file_id").fetchall()
        con.close()
        return dict(rows)
    except sqlite3.Error:
        return {}


def stage_now(layout: DataLayout) -> str | None:
    try:
        return (json.loads(layout.runtime_file.read_text()).get("current") or {}).get("stage")
    except (OSError, ValueError):
        return None


def status_text(data: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "service.cli", "status", "--data-dir", str(data)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return r.stdout


def fill(mount: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC."""
    filler = mount / "FILLER"
    with open(filler, "ab") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def drop(layout: DataLayout, name: str) -> None:
    part = layout.inbox / f".{name}.part"
    part.write_text(json.dumps({"x": name}) + "\n")
    os.rename(part, layout.inbox / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=48)
    ap.add_argument("--keep", action="store_true", help="leave the log folder")
    args = ap.parse_args()
    why = can_mount()
    if why:
        print(f"SKIPPED: {why}; nothing was checked")
        return 0
    work = Path(tempfile.mkdtemp(prefix="edgekif-fullcheck-"))
    mount = work / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mb}m", "tmpfs", str(mount)], check=True)
    layout = DataLayout(mount)
    results: list[tuple[str, bool]] = []

    def check(name: str, ok: bool) -> None:
        results.append((name, ok))
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)

    daemon = Daemon(mount, work / "daemon.log")
    try:
        # train_steps x step_seconds: long enough to fill the disk mid-training; stage_seconds: mid-export
        (mount / "fake_stages.json").write_text(json.dumps({"in_child": True, "train_steps": 30, "step_seconds": 0.2, "stage_seconds": 2}))
        daemon.start()
        check("daemon started", wait_for(lambda: layout.runtime_file.is_file(), 60))
        for n, stage in enumerate(("train", "export"), 1):
            name = f"task{n}.jsonl"
            drop(layout, name)
            check(f"[{stage}] job reached {stage}", wait_for(lambda: stage_now(layout) == stage, 120))
            filler = fill(mount)
            check(f"[{stage}] disk full: the job waits", wait_for(lambda: daemon.log_has("not enough resources; job stays queued"), 120))
            check(f"[{stage}] `edgekif status` says waiting", wait_for(lambda: "waiting:  job" in status_text(mount), 30))
            time.sleep(3)
            check(f"[{stage}] daemon still running on a full disk", daemon.alive())
            filler.unlink()
            check(f"[{stage}] space back: published by itself", wait_for(lambda: job_states(layout).get(name) == "published", 240))
            daemon.out.write_text("")  # the next scenario reads its own lines
        daemon.stop()
        filler = fill(mount)
        daemon.start()
        time.sleep(8)
        check("[start-up] daemon starts on a full disk and stays up", daemon.alive())
        filler.unlink()
        drop(layout, "task3.jsonl")
        check("[start-up] space back: a new file is published", wait_for(lambda: job_states(layout).get("task3.jsonl") == "published", 240))
        versions = sorted(p.name for p in layout.models.iterdir() if p.name.startswith("v"))
        check(f"one version per job ({', '.join(versions)})", len(versions) == 3)
    finally:
        daemon.stop()
        subprocess.run(["umount", str(mount)])
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"log: {work / 'daemon.log'}")
    failed = [n for n, ok in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
