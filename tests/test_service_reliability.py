"""Unattended and safe: task identity for same-named files, transient resource errors,
`jobs`/`retry`, ignored inbox names in status, rollback as the one source of "live", and
no child process or temp file outliving a killed daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from edgekif.config import load_config
from edgekif.replay import ReplayBuffer
from service.cli import main as edgekif_main
from service.daemon import Daemon
from service.jobs import JobStore
from service.edgekif_stages import LibraryStages
from service.status import format_status, list_jobs, status
from service.fake_stages import FakeStages
from test_service_process import DaemonProcess, _no_leftover_daemons  # noqa: F401 (autouse fixture)


def make(tmp_path: Path, stages=None, **service):
    overrides = [f"data_dir={tmp_path}", "service.quiet_seconds=0", "service.holdout_fraction=0.5"]
    overrides += [f"service.{k}={v}" for k, v in service.items()]
    config = load_config(None, overrides)
    return Daemon(config, stages if stages is not None else FakeStages(tmp_path), retry_base_seconds=0, resource_retry_seconds=0)


def drop(tmp_path: Path, name: str, records: list[dict]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.part"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(inbox / name)


def jobs(tmp_path: Path):
    with JobStore(tmp_path / "state.db") as store:
        return store.jobs()


class LibraryInput(FakeStages):
    """The real validate and buffer stages (holdout split + replay insert; no torch), fake
    training and evaluation: what same-named files do to the task's files on disk."""

    def __init__(self, data_dir, **kw):
        super().__init__(data_dir, **kw)
        self.lib = LibraryStages(None)

    def validate(self, ctx):
        return self.lib.validate(ctx)

    def buffer(self, ctx):
        return self.lib.buffer(ctx)


def _recs(prefix: str, n: int) -> list[dict]:
    return [{"prompt": f"{prefix} question {i}?", "completion": f"{prefix}{i % 2}"} for i in range(n)]


def test_a_file_named_like_an_earlier_task_is_a_new_task_and_overwrites_nothing(tmp_path):
    d = make(tmp_path, LibraryInput(tmp_path))
    drop(tmp_path, "a.jsonl", _recs("first", 8))
    d.run_until_idle()
    holdout_a = (tmp_path / "holdout" / "a.jsonl").read_text()
    assert holdout_a.count("\n") == 4  # holdout_fraction 0.5
    drop(tmp_path, "a.jsonl", _recs("second", 1))  # other bytes, same name
    d.run_until_idle()
    drop(tmp_path, "a.jsonl", _recs("third", 4))
    d.run_until_idle()
    d.close()
    first, second, third = jobs(tmp_path)
    assert [j.state for j in (first, second, third)] == ["published"] * 3  # no job held for "a: not evaluated"
    with JobStore(tmp_path / "state.db") as store:
        names = [store.task(j.task_id)["name"] for j in (first, second, third)]
    assert names == ["a", "a~2", "a~3"]
    assert (tmp_path / "holdout" / "a.jsonl").read_text() == holdout_a  # untouched
    assert (tmp_path / "holdout" / "a~3.jsonl").read_text().count("\n") == 2
    with ReplayBuffer(tmp_path / "replay.db", d.config.replay) as buf:
        assert buf.tasks() == ["a", "a~2", "a~3"]  # three tasks, never merged
        assert buf.stats()["tasks"]["a"]["records"] == 4


def test_out_of_disk_uses_no_attempt_waits_and_resumes(tmp_path):
    """ENOSPC five times in a row (more than the 3 attempts a failure gets): the job waits,
    status says why, and once space is back it is published."""
    stages = FakeStages(tmp_path, inject={"export": ["enospc", "before", 5]})
    d = make(tmp_path, stages)
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle(max_steps=3)  # validate, buffer, train
    for _ in range(5):
        d.run_until_idle(max_steps=1)
        (job,) = jobs(tmp_path)
        assert job.state == "trained" and job.attempts == 0 and job.error is None
        assert "ENOSPC" in d.runner.waiting[job.id]["reason"]
        assert "waiting for resources before export: ENOSPC" in d._status_line()
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "published" and d.runner.waiting == {}
    with JobStore(tmp_path / "state.db") as store:
        assert len(store.events(job.id, ("waiting",))) == 5 and store.events(job.id, ("failed",)) == []
    d.close()


def test_memory_error_is_transient_too(tmp_path):
    d = make(tmp_path, FakeStages(tmp_path, inject={"train": ["memory", "before", 4]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "published"


def test_a_running_daemon_shows_why_a_job_waits(tmp_path):
    opts = {"inject": {"export": ["enospc", "before", 1000]}}
    daemon = DaemonProcess(tmp_path, fake_options=opts, overrides=["service.quiet_seconds=0.1", "service.scan_interval=0.2"]).start()
    try:
        drop(tmp_path, "a.jsonl", _recs("a", 2))
        config = load_config(None, [f"data_dir={tmp_path}"])
        assert daemon.wait_for(lambda: status(config)["waiting"], 30)
        text = format_status(status(config))
        assert "waiting:  job 1 before export: ENOSPC" in text
        (job,) = jobs(tmp_path)
        assert job.state == "trained" and job.attempts == 0
    finally:
        daemon.stop()


def test_jobs_and_retry_commands(tmp_path, capsys):
    stages = FakeStages(tmp_path, inject={"evaluate": ["error", "before", 3]})
    d = make(tmp_path, stages)
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "failed"
    rows = list_jobs(d.config)
    assert [(r["id"], r["state"], r["task"]) for r in rows] == [(1, "failed", "a")]
    assert edgekif_main(["jobs", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "failed"
    assert edgekif_main(["retry", "--data-dir", str(tmp_path), "1"]) == 0
    assert "queued again from 'exported'" in capsys.readouterr().out
    d.run_until_idle()
    d.close()
    assert jobs(tmp_path)[0].state == "published"
    assert edgekif_main(["retry", "--data-dir", str(tmp_path), "1"]) == 2  # not failed: a clear error


def test_status_lists_dot_files_waiting_for_a_rename(tmp_path):
    d = make(tmp_path)
    d.open()
    (tmp_path / "inbox" / "..%2Fescape.jsonl").write_text("{}\n")
    (tmp_path / "inbox" / "half.jsonl.part").write_text("{}\n")
    d.run_until_idle()
    d.close()
    st = status(d.config)
    assert st["inbox_ignored"] == ["..%2Fescape.jsonl", "half.jsonl.part"] and st["inbox_waiting"] == 0
    assert "2 ignored, waiting for rename (..%2Fescape.jsonl, half.jsonl.part)" in format_status(st)
    assert jobs(tmp_path) == []


def test_rollback_moves_live_for_status_gate_and_the_next_job(tmp_path):
    from edgekif.publish import ModelStore

    stages = FakeStages(tmp_path)
    d = make(tmp_path, stages)
    for name in ("a", "b"):
        drop(tmp_path, f"{name}.jsonl", _recs(name, 2))
        d.run_until_idle()
    assert [j.version for j in jobs(tmp_path)] == ["v0001", "v0002"]
    ModelStore(tmp_path).rollback("v0001")
    st = status(d.config)
    assert st["published"]["version"] == "v0001" and st["published"]["job_id"] == 1
    assert "live:     v0001 (job 1" in format_status(st)
    drop(tmp_path, "c.jsonl", _recs("c", 2))
    d.run_until_idle(max_steps=3)  # validate, buffer, train: the context the train stage saw
    job_c = jobs(tmp_path)[-1]
    ctx = d.runner.context(d._store, job_c)
    assert ctx.published.version == "v0001" and ctx.published.job_id == 1  # starts from v0001's learner
    assert ctx.past_tasks == ["a"]  # b was rolled back: not replayed, not gated
    d.run_until_idle()
    d.close()
    job_c = jobs(tmp_path)[-1]
    assert job_c.metrics["train"]["started_from"] == 1 and job_c.metrics["gate"]["published_version"] == "v0001"
    assert set(job_c.metrics["gate"]["published_accuracies"]) == {"a"}
    with JobStore(tmp_path / "state.db") as store:
        assert [j.id for j in store.lineage(store.live())] == [1, 3]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_kill_9_during_export_leaves_no_child_and_restart_removes_temp_files(tmp_path):
    daemon = DaemonProcess(tmp_path, fake_options={"export_child_seconds": 120},
                           overrides=["service.quiet_seconds=0.1", "service.scan_interval=0.2"]).start()
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    assert daemon.wait_for(lambda: any(c["stage"] == "export_child" for c in FakeStages.read_calls(tmp_path)), 60)
    assert daemon.wait_for(lambda: bool(_children(daemon.pid)), 20)
    (child,) = _children(daemon.pid)
    # what a crash mid-write leaves behind (an atomic write's temp name, a checkpoint's)
    stale = [tmp_path / "jobs" / "1" / ".export.abcd1234.tmp", tmp_path / "jobs" / "1" / ".checkpoint.efgh5678.tmp"]
    for p in stale:
        p.mkdir(parents=True)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the builder-like child outlived the killed daemon"
    restarted = DaemonProcess(tmp_path, fake_options={}, overrides=["service.quiet_seconds=0.1", "service.scan_interval=0.2"]).start()
    try:
        assert restarted.wait_for(lambda: jobs(tmp_path)[0].state == "published", 60)
        assert not any(p.exists() for p in stale)
        assert not list((tmp_path / "jobs").rglob("*.tmp"))
    finally:
        restarted.stop()


# ---- a full disk: recognised whatever library hits it, and it never stops the daemon --------------


def test_a_full_disk_without_an_errno_is_transient_and_the_job_resumes(tmp_path):
    """safetensors reports ENOSPC as a plain exception with the OS's words and no errno."""
    d = make(tmp_path, FakeStages(tmp_path, inject={"export": ["safetensors_full", "before", 4]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle(max_steps=4)
    (job,) = jobs(tmp_path)
    assert job.state == "trained" and job.attempts == 0 and "No space left" in d.runner.waiting[job.id]["reason"]
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "published"
    d.close()


def test_any_failure_on_a_nearly_full_disk_is_taken_as_the_disk(tmp_path, monkeypatch):
    """A writer that lost both errno and text: the free-space check after the failure decides."""
    import shutil as shutil_mod

    from service import job_runner as pipeline

    real = shutil_mod.disk_usage
    free = {"bytes": 2 * 2**20}
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    d = make(tmp_path, FakeStages(tmp_path, inject={"export": ["error", "before", 1]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle(max_steps=4)
    (job,) = jobs(tmp_path)
    assert job.state == "trained" and job.attempts == 0
    assert "2 MB free" in d.runner.waiting[job.id]["reason"] and "injected error in export" in d.runner.waiting[job.id]["reason"]
    free["bytes"] = 10 * 2**30  # space is back; the same error would now be an ordinary failure
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "published"
    d.close()


def test_a_full_state_db_and_daemon_json_do_not_stop_the_daemon(tmp_path, monkeypatch):
    """The bookkeeping around a failed stage hits the full disk too (SQLite's 'database or disk
    is full', daemon.json's ENOSPC): the job waits, nothing escapes to kill the worker."""
    import errno
    import sqlite3

    from service import daemon as daemon_mod
    from service.jobs import JobStore as Store

    d = make(tmp_path, FakeStages(tmp_path, inject={"export": ["enospc", "before", 2]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle(max_steps=3)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13

    def no_space(*a, **k):
        raise full

    def no_space_json(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "daemon.json")

    (tmp_path / "daemon.json").write_text("{}")  # a running daemon wrote it before the disk filled
    with monkeypatch.context() as m:
        m.setattr(Store, "log_event", no_space)
        m.setattr(Store, "begin_attempt", no_space)
        m.setattr(daemon_mod, "replace_json", no_space_json)
        d.runtime.publish({"job_id": 1}, "running")  # does not raise: rewritten in place
        assert json.loads((tmp_path / "daemon.json").read_text())["current"] == {"job_id": 1}
        d.run_until_idle(max_steps=1)  # begin_attempt fails outside the stage: the job waits
        (job,) = jobs(tmp_path)
        assert job.state == "trained" and "SQLite" in d.runner.waiting[job.id]["reason"]
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "published"
    d.close()


def test_start_up_on_a_full_disk_waits_instead_of_exiting(tmp_path, monkeypatch):
    import sqlite3

    from service import daemon as daemon_mod
    from service.jobs import JobStore as Store

    d = make(tmp_path)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    tries = {"n": 0}

    def opening(path):
        tries["n"] += 1
        if tries["n"] <= 2:
            raise full
        return Store(path)

    monkeypatch.setattr(daemon_mod, "JobStore", opening)
    monkeypatch.setattr(d._stop, "wait", lambda timeout=None: False)  # no real sleeping
    d.open()
    assert tries["n"] == 3 and d._store is not None
    d.close()


def test_a_rejection_report_names_the_file_where_it_is_now(tmp_path):
    """The reader names the accepted/ copy it read; after the move the report must name the file
    in rejected/ (which exists) and the name it was dropped with."""
    d = make(tmp_path, LibraryInput(tmp_path))
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n{"output": "y"}\n')
    d.run_until_idle()
    d.close()
    report = json.loads((tmp_path / "rejected" / "bad.jsonl.error.json").read_text())
    assert report["file"] == "bad.jsonl" and report["path"] == str(tmp_path / "rejected" / "bad.jsonl")
    assert report["error"]["file"] == report["path"] and Path(report["error"]["file"]).is_file()
    assert report["error"]["line"] == 2 and report["error"]["field"] == "output"
    assert report["error"]["more"] == 1 and [(a["line"], a["field"]) for a in report["error"]["also"]] == [(3, "instruction")]


class ScratchStages(FakeStages):
    """Fakes whose export writes a fused-model-sized scratch first, as the real one does."""

    def export(self, ctx):
        scratch = ctx.job_files.scratch
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "model.safetensors").write_bytes(b"\0" * (4 << 20))
        return super().export(ctx)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_failed_or_held_job_leaves_no_scratch(tmp_path):
    failed = make(tmp_path / "f", ScratchStages(tmp_path / "f", inject={"export": ["error", "after", 3]}))
    drop(tmp_path / "f", "a.jsonl", _recs("a", 2))
    failed.run_until_idle()
    failed.close()
    (job,) = jobs(tmp_path / "f")
    assert job.state == "failed"
    assert not (tmp_path / "f" / "jobs" / str(job.id) / "export-work").exists()
    assert _size(tmp_path / "f" / "jobs" / str(job.id)) < 64 * 1024

    held = make(tmp_path / "h", ScratchStages(tmp_path / "h", drop=50.0))  # every past task loses 50 points
    drop(tmp_path / "h", "a.jsonl", _recs("a", 2))
    held.run_until_idle()
    drop(tmp_path / "h", "b.jsonl", _recs("b", 2))
    held.run_until_idle()
    held.close()
    a, b = sorted(jobs(tmp_path / "h"), key=lambda j: j.id)
    assert a.state == "published" and b.state == "held"
    assert not (tmp_path / "h" / "jobs" / str(b.id) / "export-work").exists()
    assert (tmp_path / "h" / "jobs" / str(b.id) / "export").is_dir()  # what publish --force needs
    assert _size(tmp_path / "h" / "jobs" / str(b.id)) < 64 * 1024


def test_a_package_missing_in_the_daemon_s_own_process_fails_the_job_once_with_a_hint(tmp_path):
    """Model stages in the daemon's process (service.model_stages_in_child off): an ImportError
    is classed as in a stage's child (tests/test_stage_process.py), not retried."""
    d = make(tmp_path, FakeStages(tmp_path, inject={"train": ["import", "before", 5]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "failed" and job.error["error"] == "ModuleNotFoundError"
    assert job.error["class"] == "permanent" and sys.executable in job.error["hint"] and "make setup" in job.error["hint"]
    with JobStore(tmp_path / "state.db") as store:
        assert [e.data["stage"] for e in store.events(job.id, ("attempt",))].count("train") == 1


def test_a_permanent_failure_fails_at_once_with_what_to_do(tmp_path):
    """A failed answer check gives the same figures on every try: one attempt, no retries,
    and status says what to do."""
    d = make(tmp_path, FakeStages(tmp_path, inject={"export": ["parity", "before", 5]}))
    drop(tmp_path, "a.jsonl", _recs("a", 2))
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "failed"
    assert job.error["class"] == "permanent" and 'export.precision = "fp32"' in job.error["hint"]
    config = load_config(None, [f"data_dir={tmp_path}"])
    assert "what to do: set export.precision" in format_status(status(config))
    with JobStore(tmp_path / "state.db") as store:
        assert [e.data["stage"] for e in store.events(job.id, ("attempt",))].count("export") == 1
