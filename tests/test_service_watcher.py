"""Inbox watching (service/watcher.py): complete files only, unsafe entries rejected, crash-safe takes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from edgekif.config import load_config
from edgekif.layout import DataLayout
from service.jobs import JobStore
import service.watcher as watcher_mod
from service.watcher import InboxWatcher, accepted_name, ignored_inbox_entries, name_problem, open_writers, reconcile_takes, safe_name
from test_service_daemon import wait_for as _wait_for


def make(tmp_path, **service):
    overrides = [f"data_dir={tmp_path}"] + [f"service.{k}={v}" for k, v in service.items()]
    config = load_config(None, overrides)
    layout = DataLayout(tmp_path)
    layout.create()
    return config, layout


def wait_for(cond, timeout=15.0, interval=0.05):
    return _wait_for(cond, timeout, interval)


def reports(layout: DataLayout) -> dict[str, dict]:
    return {p.name[: -len(".error.json")]: json.loads(p.read_text()) for p in layout.rejected.glob("*.error.json")}


def test_slowly_written_file_is_taken_once_and_complete(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=1, scan_interval=0.5)
    watcher = InboxWatcher(layout, config)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    chunks = [f'{{"i": {i}, "pad": "{"x" * 200}"}}\n'.encode() for i in range(12)]
    try:
        with open(layout.inbox / "slow.jsonl", "wb") as f:
            for chunk in chunks:  # one append every 0.2 s: never quiet for 1 s until done
                f.write(chunk)
                f.flush()
                time.sleep(0.2)
        with JobStore(layout.state_db) as store:
            assert wait_for(lambda: store.files("taken"))
            time.sleep(1.5)  # nothing else shows up later either
            files = store.files()
            jobs = store.jobs()
    finally:
        stop.set()
        watcher.wake()
        thread.join(10)
    content = b"".join(chunks)
    assert len(files) == 1 and len(jobs) == 1
    assert files[0].sha256 == hashlib.sha256(content).hexdigest()
    assert files[0].size == len(content)
    taken = layout.accepted / accepted_name(files[0].sha256, "slow.jsonl")
    assert files[0].path == str(taken) and taken.read_bytes() == content
    assert not (layout.inbox / "slow.jsonl").exists()


def _run_slow_writer(tmp_path, *, keep_open: bool, quiet: float, lines: int, every: float = 0.3):
    """A writer thread appends one line every `every` s while the watcher runs; returns
    (files, jobs, content, layout) once the file is taken and nothing else showed up."""
    config, layout = make(tmp_path, quiet_seconds=quiet, scan_interval=0.1)
    watcher = InboxWatcher(layout, config)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    chunks = [f'{{"i": {i}, "pad": "{"y" * 100}"}}\n'.encode() for i in range(lines)]
    path = layout.inbox / "slow.jsonl"
    thread.start()
    try:
        if keep_open:
            with open(path, "ab") as f:
                for chunk in chunks:
                    f.write(chunk)
                    f.flush()
                    time.sleep(every)
        else:
            for chunk in chunks:
                with open(path, "ab") as f:
                    f.write(chunk)
                time.sleep(every)
        with JobStore(layout.state_db) as store:
            assert wait_for(lambda: store.files("taken"), timeout=60)
            time.sleep(quiet * 3 + 1.0)  # nothing else shows up later either
            files, jobs = store.files(), store.jobs()
    finally:
        stop.set()
        watcher.wake()
        thread.join(30)
    return files, jobs, b"".join(chunks), layout


def test_quiet_file_still_open_for_writing_is_not_taken(tmp_path):
    """Pauses between writes (0.3 s) longer than quiet_seconds (0.2 s): the size/mtime check
    alone would take the file mid-write; the open writer keeps it in the inbox until closed."""
    files, jobs, content, layout = _run_slow_writer(tmp_path, keep_open=True, quiet=0.2, lines=10)
    assert len(files) == 1 and len(jobs) == 1
    assert files[0].sha256 == hashlib.sha256(content).hexdigest() and files[0].size == len(content)
    taken = layout.accepted / accepted_name(files[0].sha256, "slow.jsonl")
    assert taken.read_bytes() == content  # all 10 lines, and exactly the recorded bytes
    assert sorted(os.listdir(layout.accepted)) == [taken.name]  # no temp copy left
    assert not any(layout.inbox.iterdir())


def test_writer_opening_the_file_per_line_is_taken_once_with_a_long_enough_quiet_period(tmp_path):
    """A closed file is indistinguishable from a finished one: only quiet_seconds longer than
    the writer's pauses (here 3 s vs 0.3 s) keeps it whole."""
    files, jobs, content, layout = _run_slow_writer(tmp_path, keep_open=False, quiet=3.0, lines=8)
    assert len(files) == 1 and len(jobs) == 1
    assert files[0].sha256 == hashlib.sha256(content).hexdigest() == hashlib.sha256(layout.accepted.joinpath(accepted_name(files[0].sha256, "slow.jsonl")).read_bytes()).hexdigest()


def test_write_landing_after_the_copy_undoes_the_take(tmp_path, monkeypatch):
    """A writer we cannot see (another user's process) appends between the copy and the
    removal from the inbox: the copy is dropped and the whole file is taken later."""
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    path = layout.inbox / "late.jsonl"
    path.write_bytes(b'{"i": 1}\n')
    monkeypatch.setattr(watcher_mod, "open_writers", lambda st, name, **kw: None)
    real_fsync_dir = watcher_mod.fsync_dir
    appended = []

    def fsync_dir_then_append(d):
        real_fsync_dir(d)
        if os.fspath(d) == os.fspath(layout.accepted) and not appended:
            appended.append(True)
            with open(path, "ab") as f:
                f.write(b'{"i": 2}\n')

    monkeypatch.setattr(watcher_mod, "fsync_dir", fsync_dir_then_append)
    watcher.scan_once()
    assert appended and path.read_bytes() == b'{"i": 1}\n{"i": 2}\n'
    assert os.listdir(layout.accepted) == []  # the half copy is gone
    with JobStore(layout.state_db) as store:
        assert store.files() == [] and store.jobs() == []
        watcher.scan_once()  # observed again (changed), then taken whole
        watcher.scan_once()
        files = store.files("taken")
        assert len(files) == 1 and len(store.jobs()) == 1
        assert files[0].sha256 == hashlib.sha256(b'{"i": 1}\n{"i": 2}\n').hexdigest()
        assert hashlib.sha256(open(files[0].path, "rb").read()).hexdigest() == files[0].sha256
    watcher.close()


def test_open_writers_sees_write_fds_only(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text("x")
    st = os.stat(p)
    if open_writers(st, b"f.jsonl") is None:
        pytest.skip("no /proc")
    assert open_writers(st, b"f.jsonl") == []
    with open(p, "rb"):
        assert open_writers(st, b"f.jsonl") == []
    with open(p, "ab"):
        assert open_writers(st, b"f.jsonl") == [os.getpid()]
    with open(p, "r+b"):
        assert open_writers(st, b"f.jsonl") == [os.getpid()]
    assert open_writers(st, b"f.jsonl") == []


def test_change_during_quiet_period_restarts_the_wait(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0.5)
    watcher = InboxWatcher(layout, config)
    path = layout.inbox / "a.jsonl"
    path.write_text("{}\n")
    assert watcher.scan_once() == pytest.approx(0.5)  # seen; due again in quiet_seconds
    with open(path, "a") as f:
        f.write("{}\n")
    time.sleep(0.6)
    watcher.scan_once()  # quiet time has passed since the first look, but the file changed
    assert not any(layout.accepted.iterdir())
    assert path.exists()
    time.sleep(0.6)
    watcher.scan_once()
    assert not path.exists() and len(list(layout.accepted.iterdir())) == 1
    watcher.close()


@pytest.mark.parametrize("name", [".hidden.jsonl", "x.jsonl.tmp", "x.part", "x.partial", "x.swp", "x.jsonl~"])
def test_in_progress_names_are_ignored_until_renamed(tmp_path, name):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    (layout.inbox / name).write_text('{"a": 1}\n')
    for _ in range(3):
        watcher.scan_once()
    assert (layout.inbox / name).exists()
    assert not any(layout.accepted.iterdir()) and not any(layout.rejected.iterdir())
    os.rename(layout.inbox / name, layout.inbox / "done.jsonl")
    watcher.scan_once()
    with JobStore(layout.state_db) as store:
        assert [f.name for f in store.files("taken")] == ["done.jsonl"]
        assert len(store.jobs(("received",))) == 1
    watcher.close()


def test_ignored_entries_are_listed_for_status(tmp_path, caplog):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    assert ignored_inbox_entries(layout) == []
    for name in (".rsync.abc123", ".hidden.jsonl", "x.jsonl.part", "ok.jsonl"):
        (layout.inbox / name).write_text(json.dumps({"name": name}) + "\n")
    with open(os.fsencode(layout.inbox) + b"/.bell\x07", "wb") as f:
        f.write(b"{}\n")
    with caplog.at_level("INFO", logger="service.watcher"):
        for _ in range(3):
            watcher.scan_once()
    # still there, untouched, and listed (escaped) so status can say "N ignored, waiting for rename"
    assert ignored_inbox_entries(layout) == [".bell\\x07", ".hidden.jsonl", ".rsync.abc123", "x.jsonl.part"]
    assert not any(layout.rejected.iterdir())
    # logged once per name, not once per scan
    assert sum("ignoring .hidden.jsonl until it is renamed" in r.getMessage() for r in caplog.records) == 1
    os.rename(layout.inbox / ".hidden.jsonl", layout.inbox / "hidden.jsonl")
    watcher.scan_once()
    assert ".hidden.jsonl" not in ignored_inbox_entries(layout)
    with JobStore(layout.state_db) as store:
        assert sorted(f.name for f in store.files("taken")) == ["hidden.jsonl", "ok.jsonl"]
    watcher.close()
    assert ignored_inbox_entries(DataLayout(tmp_path / "nowhere")) == []


def test_hard_link_is_rejected_without_reading(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    outside = tmp_path / "outside.jsonl"  # e.g. a file of another user, linked into the inbox
    outside.write_text('{"prompt": "secret", "completion": "x"}\n')
    os.link(outside, layout.inbox / "linked.jsonl")
    watcher.scan_once()
    rep = reports(layout)["linked.jsonl"]
    assert rep["error"]["kind"] == "hard_link"
    assert "linked.jsonl" in rep["error"]["message"] and "hard link" in rep["error"]["message"]
    assert rep["sha256"] is None  # never read
    assert (layout.rejected / "linked.jsonl").exists() and outside.read_text().startswith('{"prompt"')
    assert not any(layout.inbox.iterdir())
    with JobStore(layout.state_db) as store:
        assert store.files() == [] and store.jobs() == []
        assert store.count_events("inbox_rejected") == 1
    watcher.close()


def test_unsafe_entries_are_rejected_without_following(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0, max_file_bytes=100)
    watcher = InboxWatcher(layout, config)
    inbox = layout.inbox
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    os.symlink(secret, inbox / "link.jsonl")
    os.mkfifo(inbox / "pipe.jsonl")  # opening it without O_NONBLOCK would hang the scan
    (inbox / "dir.jsonl").mkdir()
    (inbox / "dir.jsonl" / "inner.jsonl").write_text("{}\n")
    (inbox / "big.jsonl").write_bytes(b"x" * 101)
    (inbox / "bell\x07.jsonl").write_text("{}\n")
    (inbox / "a..b.jsonl").write_text("{}\n")
    (inbox / "back\\slash.jsonl").write_text("{}\n")
    with open(os.fsencode(inbox) + b"/caf\xe9.jsonl", "wb") as f:  # Latin-1 byte: not UTF-8
        f.write(b"{}\n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = inbox / "sock.jsonl"
    if len(os.fsencode(sock_path)) < 100:  # AF_UNIX path length limit
        sock.bind(str(sock_path))
    (inbox / "good.jsonl").write_text("{}\n")
    try:
        watcher.scan_once()
    finally:
        sock.close()

    rep = reports(layout)
    kinds = {name: r["error"]["kind"] for name, r in rep.items()}
    expected = {
        "link.jsonl": "symlink",
        "pipe.jsonl": "fifo",
        "dir.jsonl": "directory",
        "big.jsonl": "too_large",
        "bell_.jsonl": "bad_name",
        "a..b.jsonl": "bad_name",
        "back_slash.jsonl": "bad_name",
        "caf\ufffd.jsonl": "bad_name",
    }
    if sock_path.exists() or (layout.rejected / "sock.jsonl").exists():
        expected["sock.jsonl"] = "socket"
    assert kinds == expected
    assert rep["bell_.jsonl"]["file"] == "bell\\x07.jsonl"  # the report names the real name, escaped
    assert rep["caf\ufffd.jsonl"]["file"] == "caf\\xe9.jsonl"
    assert rep["bell_.jsonl"]["error"]["message"] == "file name contains control characters"
    for r in rep.values():
        assert set(r) >= {"file", "sha256", "received_at", "error"}
    # moved as they are: the link is still a link to the untouched target, the dir keeps its file
    assert os.readlink(layout.rejected / "link.jsonl") == str(secret) and secret.read_text() == "do not read"
    assert (layout.rejected / "dir.jsonl" / "inner.jsonl").exists()
    assert sorted(os.listdir(inbox)) == []
    with JobStore(layout.state_db) as store:
        assert [f.name for f in store.files()] == ["good.jsonl"]  # the one good file was taken
        assert store.count_events("inbox_rejected") == len(expected)
    watcher.close()


def test_device_node_is_rejected(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    try:
        os.mknod(layout.inbox / "null.jsonl", 0o600 | 0o020000, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    watcher = InboxWatcher(layout, config)
    watcher.scan_once()
    assert reports(layout)["null.jsonl"]["error"]["kind"] == "device"
    watcher.close()


def test_rejected_names_are_made_unique(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    for _ in range(3):
        (layout.inbox / "d.jsonl").mkdir()
        watcher.scan_once()
    assert sorted(p.name for p in layout.rejected.iterdir()) == [
        "d-1.jsonl", "d-1.jsonl.error.json", "d-2.jsonl", "d-2.jsonl.error.json", "d.jsonl", "d.jsonl.error.json",
    ]
    watcher.close()


def test_duplicate_content_goes_to_rejected_and_is_never_queued(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    (layout.inbox / "a.jsonl").write_text('{"x": 1}\n')
    watcher.scan_once()
    (layout.inbox / "copy.jsonl").write_text('{"x": 1}\n')
    watcher.scan_once()
    with JobStore(layout.state_db) as store:
        jobs = store.jobs()
        assert [j.state for j in jobs] == ["received", "duplicate"]
        assert jobs[1].error["duplicate_of_job"] == jobs[0].id
        assert [j.id for j in store.queue()] == [jobs[0].id]
    rep = reports(layout)["copy.jsonl"]
    assert rep["error"]["kind"] == "duplicate" and "a.jsonl" in rep["error"]["message"]
    assert rep["sha256"] == hashlib.sha256(b'{"x": 1}\n').hexdigest()
    watcher.close()


def test_reconcile_finishes_or_forgets_interrupted_takes(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    with JobStore(layout.state_db) as store:
        # crash after the rename: the file is in accepted/, the row still says 'taking'
        sha1 = "1" * 64
        dest1 = layout.accepted / accepted_name(sha1, "one.jsonl")
        dest1.write_text("{}\n")
        store.begin_take("one.jsonl", sha1, 3, "t", str(dest1))
        # crash before the rename: the file is still in the inbox
        (layout.inbox / "two.jsonl").write_text('{"b": 2}\n')
        sha2 = hashlib.sha256(b'{"b": 2}\n').hexdigest()
        store.begin_take("two.jsonl", sha2, 9, "t", str(layout.accepted / accepted_name(sha2, "two.jsonl")))

        reconcile_takes(layout, store)
        assert [(f.name, f.status) for f in store.files()] == [("one.jsonl", "taken")]
        assert [j.file_name for j in store.jobs()] == ["one.jsonl"]

        watcher = InboxWatcher(layout, config)
        watcher.scan_once()  # two.jsonl is taken normally, once
        assert [(f.name, f.status) for f in store.files()] == [("one.jsonl", "taken"), ("two.jsonl", "taken")]
        assert [j.file_name for j in store.jobs()] == ["one.jsonl", "two.jsonl"]
        watcher.close()


def test_reconcile_removes_the_inbox_copy_of_a_finished_take(tmp_path):
    """Crash after the copy was renamed into accepted/, before the inbox file was removed."""
    config, layout = make(tmp_path, quiet_seconds=0)
    with JobStore(layout.state_db) as store:
        data = b'{"c": 3}\n'
        sha = hashlib.sha256(data).hexdigest()
        (layout.inbox / "three.jsonl").write_bytes(data)
        dest = layout.accepted / accepted_name(sha, "three.jsonl")
        dest.write_bytes(data)
        store.begin_take("three.jsonl", sha, len(data), "t", str(dest))
        (layout.inbox / "other.jsonl").write_bytes(b'{"d": 4}\n')  # same size, other bytes: kept
        sha_other = "0" * 64
        dest_other = layout.accepted / accepted_name(sha_other, "other.jsonl")
        dest_other.write_bytes(b'{"d": 5}\n')
        store.begin_take("other.jsonl", sha_other, len(data), "t", str(dest_other))
        reconcile_takes(layout, store)
        assert not (layout.inbox / "three.jsonl").exists()  # else it would come back as a duplicate
        assert (layout.inbox / "other.jsonl").exists()
        assert [(f.name, f.status) for f in store.files()] == [("three.jsonl", "taken"), ("other.jsonl", "taken")]
        watcher = InboxWatcher(layout, config)
        watcher.scan_once()
        assert [j.state for j in store.jobs()] == ["received", "received", "received"]
        watcher.close()


def test_name_rules():
    assert name_problem(b"ok name (1).jsonl") is None
    assert name_problem("données.jsonl".encode()) is None
    assert name_problem(b"a..jsonl") == "file name contains '..'"
    assert name_problem(b"tab\there.jsonl") == "file name contains control characters"
    assert name_problem(b"\xff.jsonl") == "file name is not valid UTF-8"
    assert safe_name(b"..\x1b[31mred") == "_[31mred"
    long = "x" * 300 + ".jsonl"
    assert len(accepted_name("a" * 64, long).encode()) <= 255 and accepted_name("a" * 64, long).endswith(".jsonl")


def test_sidecar_is_taken_with_its_task_file(tmp_path):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    (layout.inbox / "heads.task.toml").write_text('kind = "generation"\n')
    (layout.inbox / "heads.jsonl").write_text('{"input": "a", "output": "b"}\n')
    watcher.scan_once()
    with JobStore(layout.state_db) as store:
        files, jobs = store.files("taken"), store.jobs()
    assert [f.name for f in files] == ["heads.jsonl"] and len(jobs) == 1  # one job: the sidecar is no task
    taken = layout.accepted / accepted_name(files[0].sha256, "heads.jsonl")
    side = layout.accepted / (files[0].sha256[:12] + "_heads.task.toml")
    assert side.read_text() == 'kind = "generation"\n' and taken.is_file()
    assert not any(layout.inbox.iterdir()) and not any(layout.rejected.iterdir())
    watcher.close()


def test_sidecar_alone_is_ignored_until_its_file_comes_and_after_it_was_taken(tmp_path, caplog):
    config, layout = make(tmp_path, quiet_seconds=0)
    watcher = InboxWatcher(layout, config)
    (layout.inbox / "late.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (layout.inbox / "alone.task.toml").write_text('kind = "generation"\n')
    with caplog.at_level("INFO", logger="service.watcher"):
        for _ in range(2):
            watcher.scan_once()
    assert sum("alone.task.toml: a task's sidecar" in r.getMessage() for r in caplog.records) == 1
    # the file was taken without a sidecar; one dropped now stays in the inbox, ignored
    (layout.inbox / "late.task.toml").write_text('kind = "generation"\n')
    watcher.scan_once()
    assert ignored_inbox_entries(layout) == ["alone.task.toml", "late.task.toml"]
    assert not any(layout.rejected.iterdir())
    assert [p.name for p in layout.accepted.iterdir() if p.name.endswith(".task.toml")] == []
    with JobStore(layout.state_db) as store:
        assert [f.name for f in store.files()] == ["late.jsonl"] and len(store.jobs()) == 1
    # its file comes: both are taken, as one job
    (layout.inbox / "alone.jsonl").write_text('{"input": "c", "output": "d"}\n')
    watcher.scan_once()
    assert ignored_inbox_entries(layout) == ["late.task.toml"]
    assert len(list(layout.accepted.glob("*_alone.task.toml"))) == 1
    with JobStore(layout.state_db) as store:
        assert sorted(f.name for f in store.files()) == ["alone.jsonl", "late.jsonl"] and len(store.jobs()) == 2
    watcher.close()


def _open_failing_for(monkeypatch, name: bytes, err: int):
    """os.open raising `err` for one inbox name: root reads any file, so a permission error
    cannot be made with chmod here."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if os.fsencode(path).endswith(b"/" + name):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_a_file_the_daemon_may_not_read_is_rejected_and_the_files_after_it_are_taken(tmp_path, monkeypatch):
    import errno

    config, layout = make(tmp_path, quiet_seconds=0)
    (layout.inbox / "a-private.jsonl").write_text('{"a": 1}\n')
    (layout.inbox / "b-later.jsonl").write_text('{"b": 1}\n')
    _open_failing_for(monkeypatch, b"a-private.jsonl", errno.EACCES)
    watcher = InboxWatcher(layout, config)
    watcher.scan_once()
    watcher.close()
    report = reports(layout)["a-private.jsonl"]
    assert report["error"]["kind"] == "unreadable" and "may not read a-private.jsonl" in report["error"]["message"]
    assert "chmod a+r" in report["error"]["message"]
    with JobStore(layout.state_db) as store:
        assert [j.file_name for j in store.jobs()] == ["b-later.jsonl"]
    assert not any(layout.inbox.iterdir())


def test_an_entry_whose_take_fails_does_not_stop_the_scan_and_is_tried_again(tmp_path, monkeypatch, caplog):
    import errno

    config, layout = make(tmp_path, quiet_seconds=0)
    (layout.inbox / "a-bad-disk.jsonl").write_text('{"a": 1}\n')
    (layout.inbox / "b-fine.jsonl").write_text('{"b": 1}\n')
    with monkeypatch.context() as m:
        _open_failing_for(m, b"a-bad-disk.jsonl", errno.EIO)
        watcher = InboxWatcher(layout, config)
        watcher.scan_once()
        watcher.scan_once()  # within the retry delay: not tried, not logged again
    with JobStore(layout.state_db) as store:
        assert [j.file_name for j in store.jobs()] == ["b-fine.jsonl"]
    warnings = [r for r in caplog.records if "could not take or reject a-bad-disk.jsonl" in r.getMessage()]
    assert len(warnings) == 1
    monkeypatch.setattr(watcher_mod, "FAILED_ENTRY_RETRY_SECONDS", 0)
    watcher._failing = {n: 0.0 for n in watcher._failing}  # the delay has passed
    watcher.scan_once()
    watcher.close()
    with JobStore(layout.state_db) as store:
        assert [j.file_name for j in store.jobs()] == ["b-fine.jsonl", "a-bad-disk.jsonl"]


def test_a_take_cut_short_after_its_row_is_finished_by_the_next_scan_with_its_sidecar(tmp_path, monkeypatch):
    """finish_take failing (state.db on a full disk) or a crash before the inbox file went:
    the next scan queues the job and removes the file and its sidecar, without a restart; a
    sidecar left behind would be applied to the next file dropped under that name."""
    import sqlite3

    config, layout = make(tmp_path, quiet_seconds=0)
    (layout.inbox / "colors.task.toml").write_text('kind = "generation"\n')
    (layout.inbox / "colors.jsonl").write_text('{"input": "a", "output": "b"}\n')
    queued: list[int] = []
    watcher = InboxWatcher(layout, config, on_new_job=queued.append)
    real_unlink = os.unlink

    def crash_before_removing(path, *a, **k):  # the take is recorded, the copy renamed in
        if os.fsencode(path).endswith(b"/inbox/colors.jsonl"):
            raise sqlite3.OperationalError("database or disk is full")
        return real_unlink(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", crash_before_removing)
        watcher.scan_once()
    with JobStore(layout.state_db) as store:
        assert [(f.name, f.status) for f in store.files()] == [("colors.jsonl", "taking")] and queued == []
    watcher._failing.clear()
    watcher.scan_once()
    watcher.close()
    with JobStore(layout.state_db) as store:
        assert [(f.name, f.status) for f in store.files()] == [("colors.jsonl", "taken")]
        assert [j.id for j in store.jobs()] == queued == [1]
    assert sorted(p.name for p in layout.inbox.iterdir()) == []  # task file and sidecar gone
    assert not any(layout.rejected.iterdir())


def test_a_rewritten_file_keeps_its_sidecar_when_its_interrupted_take_is_finished(tmp_path):
    """The inbox file changed after the copy (it stays, to be taken anew): its sidecar stays
    with it, though it has the bytes of the one copied."""
    config, layout = make(tmp_path, quiet_seconds=0)
    old = b'{"input": "a", "output": "b"}\n'
    sha = hashlib.sha256(old).hexdigest()
    dest = layout.accepted / accepted_name(sha, "colors.jsonl")
    dest.write_bytes(old)
    (layout.accepted / (sha[:12] + "_colors.task.toml")).write_text('kind = "generation"\n')
    (layout.inbox / "colors.jsonl").write_bytes(b'{"input": "c", "output": "d"}\n')  # written after the copy
    (layout.inbox / "colors.task.toml").write_text('kind = "generation"\n')
    with JobStore(layout.state_db) as store:
        store.begin_take("colors.jsonl", sha, len(old), "t", str(dest))
        assert len(reconcile_takes(layout, store)) == 1
    assert sorted(p.name for p in layout.inbox.iterdir()) == ["colors.jsonl", "colors.task.toml"]
