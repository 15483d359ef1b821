"""The daemon's pipeline with fake stages, in-process (service/daemon.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgekif.config import load_config
from edgekif.errors import PublishError
from edgekif.publish import ModelStore
from service.control import force_publish, retry_job
from service.daemon import Daemon, DaemonError
from service.status import format_status, status
from service.jobs import JobStore
from service.fake_stages import FakeStages, SimulatedCrash

STAGES = ("validate", "buffer", "train", "export", "evaluate", "publish")


def config_for(tmp_path: Path, **service):
    overrides = [f"data_dir={tmp_path}", "service.quiet_seconds=0"] + [f"service.{k}={v}" for k, v in service.items()]
    return load_config(None, overrides)


def make_daemon(tmp_path: Path, stages: FakeStages | None = None, **service) -> Daemon:
    config = config_for(tmp_path, **service)
    return Daemon(config, stages if stages is not None else FakeStages(tmp_path), retry_base_seconds=0)


def drop(tmp_path: Path, name: str, text: str = '{"x": 1}\n') -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text(text)


def calls(tmp_path: Path) -> list[dict]:
    return FakeStages.read_calls(tmp_path)


def jobs(tmp_path: Path):
    with JobStore(tmp_path / "state.db") as store:
        return store.jobs()


def wait_for(cond, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


@contextlib.contextmanager
def running(daemon: Daemon):
    """Daemon.run() in a thread (no signal handlers off the main thread); stopped on exit."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", daemon.run()))
    thread.start()
    try:
        assert wait_for(lambda: (daemon.layout.runtime_file).exists(), timeout=30)
        yield thread
    finally:
        daemon.request_stop("test")
        thread.join(30)
        assert not thread.is_alive()
        assert result.get("rc") == 0


def test_one_file_goes_through_every_committed_step(tmp_path):
    drop(tmp_path, "sentiment.jsonl", '{"a": 1}\n{"a": 2}\n')
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "published" and job.version == "v0001" and job.attempts == 0
    assert set(job.metrics) == {"validate", "buffer", "train", "evaluate", "gate", "export", "publish"}
    assert job.metrics["validate"]["examples"] == 2 and job.metrics["evaluate"]["accuracies"] == {"sentiment": 0.9}
    assert job.metrics["gate"]["ok"] is True
    with JobStore(tmp_path / "state.db") as store:
        kinds = [e.kind for e in store.events(job.id) if e.kind != "attempt"]
        task = store.task(job.task_id)
    assert kinds == ["received", "validated", "buffered", "train_run", "trained", "exported", "evaluated", "approved", "published"]
    assert task["name"] == "sentiment" and task["holdout"] == str(tmp_path / "jobs" / str(job.id) / "holdout.json")
    assert [c["stage"] for c in calls(tmp_path)] == list(STAGES)
    assert (tmp_path / "models" / "v0001" / "model.json").exists()
    assert Path(job.file_path).read_text() == '{"a": 1}\n{"a": 2}\n' and Path(job.file_path).parent.name == "accepted"


def test_fifty_files_dropped_at_once_are_each_processed_exactly_once(tmp_path):
    d = make_daemon(tmp_path, FakeStages(tmp_path, train_steps=1), quiet_seconds=0.2, scan_interval=0.5)
    with running(d):
        for i in range(50):
            drop(tmp_path, f"task{i:02d}.jsonl", f'{{"i": {i}}}\n')
        assert wait_for(lambda: sum(j.state == "published" for j in jobs(tmp_path)) == 50, timeout=180)  # a loaded 2-core box
        time.sleep(0.5)  # nothing more happens afterwards
        assert (tmp_path / "metrics.prom").exists()
    all_jobs = jobs(tmp_path)
    assert len(all_jobs) == 50 and {j.state for j in all_jobs} == {"published"}
    assert sorted(j.file_name for j in all_jobs) == [f"task{i:02d}.jsonl" for i in range(50)]
    assert sorted(int(j.version[1:]) for j in all_jobs) == list(range(1, 51))
    # one job at a time, in arrival (job id) order: publish order == id order
    assert [int(j.version[1:]) for j in sorted(all_jobs, key=lambda j: j.id)] == list(range(1, 51))
    per_job = Counter((c["stage"], c["job_id"]) for c in calls(tmp_path))
    assert set(per_job.values()) == {1} and len(per_job) == 50 * len(STAGES)
    assert not os.listdir(tmp_path / "inbox") and len(os.listdir(tmp_path / "accepted")) == 50
    metrics = (tmp_path / "metrics.prom").read_text()
    assert "edgekif_jobs_published_total 50" in metrics and "edgekif_current_version 50" in metrics


def test_live_daemon_rejects_unsafe_entries_and_keeps_working(tmp_path):
    d = make_daemon(tmp_path, max_file_bytes=1000, scan_interval=0.5)
    with running(d) as thread:
        inbox = tmp_path / "inbox"
        os.symlink("/etc/hostname", inbox / "link.jsonl")
        os.mkfifo(inbox / "fifo.jsonl")
        (inbox / "adir").mkdir()
        (inbox / "big.jsonl").write_bytes(b"{}\n" * 1000)
        (inbox / "ctl\x01.jsonl").write_text("{}\n")
        drop(tmp_path, "bad.jsonl", '{"a": 1}\nINVALID\n')
        assert wait_for(lambda: len(list((tmp_path / "rejected").glob("*.error.json"))) == 6)
        drop(tmp_path, "good.jsonl")
        assert wait_for(lambda: any(j.state == "published" for j in jobs(tmp_path)))
        assert thread.is_alive()
    rejected = {p.name[: -len(".error.json")]: json.loads(p.read_text()) for p in (tmp_path / "rejected").glob("*.error.json")}
    assert {k: v["error"]["kind"] for k, v in rejected.items()} == {
        "link.jsonl": "symlink", "fifo.jsonl": "fifo", "adir": "directory", "big.jsonl": "too_large",
        "ctl_.jsonl": "bad_name", "bad.jsonl": "bad_json",
    }
    assert rejected["bad.jsonl"]["error"]["line"] == 2 and rejected["bad.jsonl"]["job_id"] == 1
    assert (tmp_path / "rejected" / "bad.jsonl").read_text() == '{"a": 1}\nINVALID\n'
    assert [(j.file_name, j.state, j.file_status) for j in jobs(tmp_path)] == [
        ("bad.jsonl", "rejected", "rejected"), ("good.jsonl", "published", "taken"),
    ]
    assert not any((tmp_path / "accepted").glob("*bad.jsonl"))


@pytest.mark.parametrize(
    "stage,when",
    [("buffer", "after"), ("train", "before"), ("train", "after"), ("evaluate", "before"), ("export", "after"), ("publish", "after")],
)
def test_crash_then_restart_resumes_from_the_committed_state(tmp_path, stage, when):
    drop(tmp_path, "a.jsonl")
    d = make_daemon(tmp_path, FakeStages(tmp_path, train_steps=4, inject={stage: ["crash", when]}))
    with pytest.raises(SimulatedCrash):
        d.run_until_idle()
    d.close()  # the process is gone; its lock goes with it
    crashed_in = jobs(tmp_path)[0].state
    assert crashed_in != "published"

    d2 = make_daemon(tmp_path, FakeStages(tmp_path, train_steps=4))  # a new process: nothing injected
    d2.run_until_idle()
    d2.close()
    (job,) = jobs(tmp_path)
    assert job.state == "published" and job.version == "v0001"
    log = calls(tmp_path)
    by_stage = Counter(c["stage"] for c in log)
    # validate is never repeated once committed; the replay insert is applied exactly once
    assert by_stage["validate"] == 1
    assert [c["applied"] for c in log if c["stage"] == "buffer"] == ([True, False] if stage == "buffer" else [True])
    assert json.loads((tmp_path / "fake_replay.json").read_text()) == {"1": {"task": "a", "examples": 1}}
    # training resumed from its checkpoint and the total number of steps is the configured 4
    trains = [c for c in log if c["stage"] == "train"]
    assert trains[-1]["end_step"] == 4 and all(c["start_step"] <= c["end_step"] for c in trains)
    if (stage, when) == ("train", "after"):
        assert trains[-1]["start_step"] == 4  # the checkpoint said 4: no step trained twice
    assert sorted(p.name for p in (tmp_path / "models").glob("v*")) == ["v0001"]  # one version only
    if crashed_in in ("buffered", "trained"):
        assert by_stage["validate"] == 1 and [c["stage"] for c in log].count("buffer") == 1


def test_validation_error_moves_the_accepted_file_to_rejected(tmp_path):
    drop(tmp_path, "bad.jsonl", "INVALID\n")
    drop(tmp_path, "empty.jsonl", "\n")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.close()
    states = {j.file_name: (j.state, j.error["kind"]) for j in jobs(tmp_path)}
    assert states == {"bad.jsonl": ("rejected", "bad_json"), "empty.jsonl": ("rejected", "empty")}
    assert not os.listdir(tmp_path / "accepted")
    report = json.loads((tmp_path / "rejected" / "bad.jsonl.error.json").read_text())
    assert report["error"]["line"] == 1 and report["error"]["error"] == "ValidationError"
    assert report["sha256"] == jobs(tmp_path)[0].sha256
    assert [c["stage"] for c in calls(tmp_path)] == ["validate", "validate"]


def test_a_damaged_file_of_the_daemons_own_fails_the_job_and_never_rejects_the_users_file(tmp_path):
    """A hand-damaged holdout (DamagedFileError, a ValidationError by shape) at a state that may
    reject: the user's file was fine, so the job fails with file/line/field and is retryable."""
    from edgekif.errors import DamagedFileError

    class DamagedHoldout(FakeStages):
        def export(self, ctx):
            raise DamagedFileError("missing", file=str(ctx.work_dir / "holdout.jsonl"), line=3, field="output", kind="damaged_holdout")

    drop(tmp_path, "fine.jsonl")
    d = make_daemon(tmp_path, DamagedHoldout(tmp_path))
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "failed" and job.error["failed_from"] == "trained"
    assert (job.error["error"], job.error["kind"], job.error["line"], job.error["field"]) == ("DamagedFileError", "damaged_holdout", 3, "output")
    assert os.listdir(tmp_path / "accepted") and not (tmp_path / "rejected" / "fine.jsonl").exists()


def test_interrupted_rejection_is_finished_on_restart(tmp_path):
    drop(tmp_path, "bad.jsonl", "INVALID\n")
    d = make_daemon(tmp_path)
    d.open()
    d.watcher.scan_once()
    with JobStore(tmp_path / "state.db") as store:  # crash after the commit, before the move
        job = store.next_job()
        dest = tmp_path / "rejected" / "bad.jsonl"
        store.advance(job.id, "received", "rejected", file_status="rejecting",
                      error={"kind": "bad_json", "message": "x", "rejected_path": str(dest)})
    d.close()
    d2 = make_daemon(tmp_path)
    d2.open()
    d2.close()
    (job,) = jobs(tmp_path)
    assert (job.state, job.file_status, job.file_path) == ("rejected", "rejected", str(dest))
    assert dest.read_text() == "INVALID\n" and (tmp_path / "rejected" / "bad.jsonl.error.json").exists()


def test_a_rejection_whose_move_failed_is_finished_before_the_next_step(tmp_path, monkeypatch):
    """The move into rejected/ hit a full disk after the job was committed as rejected: the
    file is moved, with its report, before the next job's step, without a restart."""
    import errno

    import service.job_runner as job_runner

    real_move, failures = job_runner.move_to_rejected, []

    def full_once(*a, **k):
        if not failures:
            failures.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_move(*a, **k)

    monkeypatch.setattr(job_runner, "move_to_rejected", full_once)
    drop(tmp_path, "bad.jsonl", "INVALID\n")
    d = Daemon(config_for(tmp_path), FakeStages(tmp_path), retry_base_seconds=0, resource_retry_seconds=0)
    d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert (job.state, job.file_status) == ("rejected", "rejecting") and failures
    drop(tmp_path, "good.jsonl")
    d.run_until_idle()
    d.close()
    bad, good = jobs(tmp_path)
    assert (bad.file_status, good.state) == ("rejected", "published")
    assert (tmp_path / "rejected" / "bad.jsonl").read_text() == "INVALID\n"
    assert (tmp_path / "rejected" / "bad.jsonl.error.json").exists()


def test_unexpected_errors_are_retried_then_fail(tmp_path):
    drop(tmp_path, "flaky.jsonl")
    drop(tmp_path, "broken.jsonl", '{"y": 2}\n')
    stages = FakeStages(tmp_path, inject={"evaluate": ["error", "before", 2]})
    d = make_daemon(tmp_path, stages)
    d.run_until_idle()
    flaky, broken = jobs(tmp_path)
    assert flaky.state == "published"  # 2 errors, third attempt succeeded
    assert broken.state == "published"
    stages.inject = {"export": ["error", "before", 3]}
    drop(tmp_path, "doomed.jsonl", '{"z": 3}\n')
    d.run_until_idle()
    d.close()
    doomed = jobs(tmp_path)[-1]
    assert doomed.state == "failed"
    assert doomed.error["failed_from"] == "trained" and doomed.error["stage"] == "export"
    assert doomed.error["kind"] == "RuntimeError" and "injected error" in doomed.error["message"]
    with JobStore(tmp_path / "state.db") as store:
        assert len(store.events(doomed.id, ("error",))) == 2 and len(store.events(doomed.id, ("failed",))) == 1
    # retry_job() puts it back where it failed; it then goes through
    assert "queued again" in retry_job(d.config, doomed.id)
    d3 = make_daemon(tmp_path)
    d3.run_until_idle()
    d3.close()
    assert jobs(tmp_path)[-1].state == "published"


def test_stage_that_keeps_crashing_the_process_fails_after_max_attempts(tmp_path):
    drop(tmp_path, "oom.jsonl")
    for _ in range(3):
        d = make_daemon(tmp_path, FakeStages(tmp_path, inject={"train": ["crash", "before"]}))
        with pytest.raises(SimulatedCrash):
            d.run_until_idle()
        d.close()
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "failed" and job.error["kind"] == "crashed" and job.error["stage"] == "train"


def test_low_memory_keeps_the_job_queued(tmp_path, caplog):
    drop(tmp_path, "a.jsonl")
    d = make_daemon(tmp_path, memory_ceiling_mb=10**9)  # a petabyte: never available
    with caplog.at_level(logging.WARNING, logger="service.daemon"):
        d.run_until_idle()
    (job,) = jobs(tmp_path)
    assert job.state == "buffered" and job.attempts == 0 and job.error is None
    assert "train" not in [c["stage"] for c in calls(tmp_path)]
    assert any(r.getMessage() == "not enough resources; job stays queued" and r.job_id == job.id for r in caplog.records)
    d.config.service.memory_ceiling_mb = 0
    d._not_before.clear()  # the retry time has come
    d.run_until_idle()
    d.close()
    assert jobs(tmp_path)[0].state == "published"


@pytest.mark.parametrize("share", [0.0, 0.125])
def test_a_version_held_for_general_drift_says_how_to_keep_the_base_s_answers(tmp_path, share):
    """Drift builds up over jobs; without general rehearsal the hint names the setting that
    rehearses the base's answers, and says nothing of it where rehearsal is already on."""
    drop(tmp_path, "first.jsonl")
    d = make_daemon(tmp_path)
    d.config.replay.general_share = share
    reason = "general ability: answers ROUGE-L 0.08 vs the base's own (needs >= 0.20) over 63 prompts"
    d.stages.gate = lambda ctx, result: (False, [reason], {"general ability": {"rouge_l": 0.08, "passed": False, "reason": reason}})
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "held" and job.error["reasons"] == [reason]
    assert job.error["hint"].startswith(f"`edgekif publish --force {job.id}` publishes it anyway")
    assert ("`replay.general_share = 0.125` in the config makes later jobs rehearse" in job.error["hint"]) is (share == 0)


def test_forgetting_gate_holds_and_force_publish_overrides(tmp_path):
    drop(tmp_path, "first.jsonl")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.stages.drop = 10.0  # every past task loses 10 points > the 5 allowed
    drop(tmp_path, "second.jsonl", '{"b": 1}\n')
    d.run_until_idle()
    first, second = jobs(tmp_path)
    assert (first.state, second.state) == ("published", "held")
    gate = second.metrics["gate"]
    assert gate["ok"] is False and gate["published_version"] == "v0001"
    assert gate["accuracies"]["first"] == pytest.approx(0.8) and gate["published_accuracies"] == {"first": 0.9}
    assert second.error["kind"] == "gate" and "first: 90.0 -> 80.0 (-10.0 points > 5 allowed)" in second.error["message"]
    # status says what to do about it
    from service.status import format_status, status

    assert f"what to do: `edgekif publish --force {second.id}` publishes it anyway" in format_status(status(d.config))
    assert "publish" not in [c["stage"] for c in calls(tmp_path) if c["job_id"] == second.id]

    with pytest.raises(PublishError, match="only a held job"):
        force_publish(d.config, first.id)
    message = force_publish(d.config, second.id)
    assert "despite the gate" in message and "first: 90.0 -> 80.0" in message
    d.run_until_idle()
    d.close()
    second = jobs(tmp_path)[1]
    assert second.state == "published" and second.version == "v0002" and second.metrics["gate"]["forced"] is True


def test_a_job_held_by_schema_2_is_exported_evaluated_and_gated_anew(tmp_path):
    """Schema 2 held a job before exporting it. Opened by this version, that job goes back to
    `trained`, and the pipeline exports, evaluates and gates it like any job."""
    import shutil
    import sqlite3

    drop(tmp_path, "first.jsonl")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.stages.drop = 10.0
    drop(tmp_path, "second.jsonl", '{"b": 1}\n')
    d.run_until_idle()
    d.close()
    first, second = jobs(tmp_path)
    assert (first.state, second.state) == ("published", "held")
    # what schema 2 left: held by a gate that ran before the export, so no export
    metrics = {k: v for k, v in second.metrics.items() if k not in ("export", "evaluate")}
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("UPDATE jobs SET metrics = ? WHERE id = ?", (json.dumps(metrics), second.id))
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    shutil.rmtree(tmp_path / "jobs" / str(second.id) / "export")

    d = make_daemon(tmp_path)  # the past task keeps its accuracy now: the new gate lets it through
    d.run_until_idle()
    d.close()
    second = jobs(tmp_path)[1]
    assert second.state == "published" and second.version == "v0002" and second.metrics["gate"]["ok"] is True
    assert "forced" not in second.metrics["gate"]
    with JobStore(tmp_path / "state.db") as store:
        kinds = [e.kind for e in store.events(second.id) if e.kind != "attempt"]
    assert kinds[-5:] == ["migrated", "exported", "evaluated", "approved", "published"]
    assert [c["built"] for c in calls(tmp_path) if c["stage"] == "export" and c["job_id"] == second.id] == [True, True]


def test_force_publish_refuses_to_replace_a_newer_model(tmp_path):
    drop(tmp_path, "a.jsonl")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.stages.drop = 50.0
    drop(tmp_path, "b.jsonl", '{"b": 1}\n')
    d.run_until_idle()
    d.stages.drop = 0.0
    drop(tmp_path, "c.jsonl", '{"c": 1}\n')
    d.run_until_idle()
    d.close()
    assert [j.state for j in jobs(tmp_path)] == ["published", "held", "published"]
    with pytest.raises(PublishError, match="replace that newer model"):
        force_publish(d.config, 2)


class _ForceDuringPublish(FakeStages):
    """The operator forces held job 2 while the daemon copies job 3's export into models/:
    the CLI's check runs before job 3 is recorded as published, so it passes."""

    def gate(self, ctx, result):
        return (ctx.job_id != 2), ([] if ctx.job_id != 2 else ["held for the test"])

    def publish(self, ctx, export_path):
        if ctx.job_id == 3:
            self.forced = force_publish(self.config, 2)
        return super().publish(ctx, export_path)


def test_a_job_forced_while_a_newer_one_publishes_is_held_not_published_over_it(tmp_path):
    stages = _ForceDuringPublish(tmp_path)
    d = make_daemon(tmp_path, stages)
    stages.config = d.config
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        drop(tmp_path, name, json.dumps({"name": name}) + "\n")
        d.run_until_idle()
    d.close()
    assert "will be published by the daemon" in stages.forced  # the CLI's check passed
    one, two, three = jobs(tmp_path)
    assert (one.state, two.state, three.state) == ("published", "held", "published")
    assert two.error["kind"] == "superseded" and two.error["live_job"] == 3
    assert "job 3 (c.jsonl) was published as v0002" in two.error["message"]
    assert ModelStore(tmp_path).current() == three.version == "v0002"
    assert not (tmp_path / "jobs" / "2" / "export").exists()  # nothing can publish it now


class _PublishFailsForJob2(FakeStages):
    broken = True
    fail_job = 2

    def publish(self, ctx, export_path):
        if ctx.job_id == self.fail_job and self.broken:
            raise OSError(5, "Input/output error")
        return super().publish(ctx, export_path)


def test_retrying_a_job_that_failed_to_publish_never_replaces_a_newer_model(tmp_path):
    stages = _PublishFailsForJob2(tmp_path)
    d = make_daemon(tmp_path, stages)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        drop(tmp_path, name, json.dumps({"name": name}) + "\n")
        d.run_until_idle()
    assert [(j.state, (j.error or {}).get("failed_from")) for j in jobs(tmp_path)] == [
        ("published", None), ("failed", "approved"), ("published", None)]
    stages.broken = False
    retry_job(d.config, 2)
    d.run_until_idle()
    d.close()
    two = jobs(tmp_path)[1]
    assert two.state == "held" and two.error["live_job"] == 3
    assert ModelStore(tmp_path).current() == "v0002"  # job 3's


def test_a_job_retried_from_training_publishes_on_top_of_the_newer_model(tmp_path):
    """Its model is trained anew from the live one, so the check lets it through."""
    stages = FakeStages(tmp_path)
    d = make_daemon(tmp_path, stages)
    drop(tmp_path, "a.jsonl", '{"a": 1}\n')
    d.run_until_idle()
    stages.inject = {"train": ["parity", "before", 1]}  # a permanent error: failed at once
    drop(tmp_path, "b.jsonl", '{"b": 1}\n')
    d.run_until_idle()
    drop(tmp_path, "c.jsonl", '{"c": 1}\n')
    d.run_until_idle()
    assert [j.state for j in jobs(tmp_path)] == ["published", "failed", "published"]
    retry_job(d.config, 2)
    d.run_until_idle()
    d.close()
    two = jobs(tmp_path)[1]
    assert two.state == "published" and two.metrics["train"]["started_from"] == 3


def test_job_files_no_command_can_use_are_removed(tmp_path):
    """A held job's export (0.2-1 GB) and learner are kept for `publish --force` until a later
    job is published; from then on forcing is refused, so both go (the figures stay in
    state.db). A published job's learner goes once its version is gone from models/. A held
    job newer than the last publish keeps both, the live version's job its learner; a daemon
    start removes what older daemons kept."""
    job = lambda job_id: tmp_path / "jobs" / str(job_id)  # noqa: E731
    cfg = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0", "export.keep_versions=1"])

    def run(name: str, drop_points: float) -> None:
        d.stages.drop = drop_points
        drop(tmp_path, name, json.dumps({name: 1}) + "\n")
        d.run_until_idle()
        (job(len(jobs(tmp_path))) / "learner").mkdir()  # what the real train stage leaves (~47 MB)

    d = Daemon(cfg, FakeStages(tmp_path), retry_base_seconds=0)
    run("a.jsonl", 0.0)
    run("b.jsonl", 50.0)
    assert [j.state for j in jobs(tmp_path)] == ["published", "held"] and (job(2) / "export" / "manifest.json").is_file()  # forceable
    run("c.jsonl", 0.0)
    assert not (job(2) / "export").exists()  # removed at c's publish
    run("d.jsonl", 50.0)
    d.close()
    held_b = jobs(tmp_path)[1]
    assert [j.state for j in jobs(tmp_path)] == ["published", "held", "published", "held"]
    assert held_b.error["kind"] == "gate" and held_b.metrics["gate"]["ok"] is False  # what it was, still told
    # a start removes what is left (here: learners the fake train stage does not remove itself,
    # an export an older daemon kept)
    (job(2) / "export").mkdir()
    d = Daemon(cfg, FakeStages(tmp_path), retry_base_seconds=0)
    d.run_until_idle()  # opens the data dir as `serve` does
    d.close()
    assert sorted(p.name for p in (tmp_path / "models").glob("v0*")) == ["v0002"]  # keep_versions = 1
    assert not (job(1) / "learner").exists()  # v0001 is gone: nothing trains on from it, no rollback to it
    assert not (job(2) / "learner").exists() and not (job(2) / "export").exists()  # held, then published over
    assert (job(3) / "learner").is_dir()  # the live version's: the next job trains on from it
    assert (job(4) / "learner").is_dir() and (job(4) / "export" / "manifest.json").is_file()  # still forceable
    # without models/ (moved away by hand) no version counts as gone, the live one's learner least
    os.rename(tmp_path / "models", tmp_path / "models.moved")
    with JobStore(tmp_path / "state.db") as store:
        assert d.runner.drop_dead_job_files(store) == {}
    assert (job(3) / "learner").is_dir()


def test_stop_during_training_checkpoints_and_resumes(tmp_path):
    d = make_daemon(tmp_path, FakeStages(tmp_path, train_steps=60, step_seconds=0.05), scan_interval=0.5)
    progress = tmp_path / "jobs" / "1" / "progress.json"
    with running(d):
        drop(tmp_path, "long.jsonl")
        assert wait_for(lambda: progress.exists() and json.loads(progress.read_text()).get("step", 0) >= 3)
        st = status(d.config)  # while it trains
        assert st["daemon"]["running"] and st["current"]["stage"] == "train"
        assert st["current"]["progress"]["total_steps"] == 60
        assert "long.jsonl" in format_status(st) and "step " in format_status(st)
    (job,) = jobs(tmp_path)
    assert job.state == "buffered" and job.attempts == 0  # a stop is not a failed attempt
    stopped_at = json.loads((tmp_path / "jobs" / "1" / "checkpoint.json").read_text())["step"]
    assert 3 <= stopped_at < 60
    assert json.loads((tmp_path / "daemon.json").read_text())["state"] == "stopped"

    d2 = make_daemon(tmp_path, FakeStages(tmp_path, train_steps=60, step_seconds=0))
    d2.run_until_idle()
    d2.close()
    trains = [c for c in calls(tmp_path) if c["stage"] == "train"]
    assert [(c["start_step"], c["end_step"]) for c in trains] == [(0, stopped_at), (stopped_at, 60)]
    assert jobs(tmp_path)[0].state == "published"
    with JobStore(tmp_path / "state.db") as store:
        outcomes = [e.data["outcome"] for e in store.events(1, ("train_run",))]
    assert outcomes == ["interrupted", "done"]


def test_status_reports_queue_live_version_problems_and_buffer(tmp_path):
    drop(tmp_path, "a.jsonl")
    drop(tmp_path, "bad.jsonl", "INVALID\n")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    drop(tmp_path, "queued.jsonl", '{"q": 1}\n')
    d.watcher.scan_once()  # taken, not yet processed
    d.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "replay.db") as conn:  # the library's table, as far as status cares
        conn.execute("CREATE TABLE tasks (task_id TEXT, stored INTEGER)")
        conn.execute("INSERT INTO tasks VALUES ('a', 16)")
    st = status(d.config)
    assert st["daemon"]["running"] is False
    assert st["published"]["version"] == "v0001" and st["published"]["accuracies"] == {"a": 0.9}
    assert [(q["file"], q["state"]) for q in st["queue"]] == [("queued.jsonl", "received")]
    assert st["current"]["file"] == "queued.jsonl"
    assert st["counts"] == {"published": 1, "rejected": 1, "received": 1}
    assert [(p["file"], p["state"]) for p in st["problems"]] == [("bad.jsonl", "rejected")]
    assert st["buffer"] == {"total": 16, "tasks": {"a": 16}}
    text = format_status(st)
    for needle in ("not running", "live:     v0001", "a  ", "90.0", "queued.jsonl", "bad.jsonl", "buffer:   16 examples (a 16)"):
        assert needle in text, needle
    (tmp_path / "nothing").mkdir()
    empty = status(config_for(tmp_path / "nothing"))
    assert empty["initialized"] is False and "no model published yet" in format_status(empty)


def test_second_daemon_on_the_same_data_dir_is_refused(tmp_path):
    d = make_daemon(tmp_path)
    d.open()
    try:
        with pytest.raises(DaemonError, match="another edgekif daemon"):
            make_daemon(tmp_path).open()
    finally:
        d.close()
    make_daemon(tmp_path).open()  # free again once the first is gone


def test_reload_rereads_the_config_file(tmp_path):
    cfg_file = tmp_path / "edgekif.toml"
    cfg_file.write_text("[service]\nscan_interval = 5.0\n")
    overrides = [f"data_dir={tmp_path / 'data'}"]
    config = load_config(cfg_file, overrides)
    seen = []
    d = Daemon(config, FakeStages(tmp_path / "data"), config_path=cfg_file, overrides=overrides)
    d.reload_hooks.append(seen.append)
    cfg_file.write_text("[service]\nscan_interval = 1.5\nforgetting_threshold = 2.0\n")
    d.reload()
    assert d.config.service.scan_interval == 1.5 and d.watcher.config is d.config
    assert d.config.service.forgetting_threshold == 2.0 and seen == [d.config]
    cfg_file.write_text("[service]\nno_such_option = 1\n")
    d.reload()  # a broken file keeps the running config
    assert d.config.service.scan_interval == 1.5 and len(seen) == 1


def test_stage_ignoring_stop_is_abandoned_at_stop_timeout(tmp_path):
    # validate takes 1.5 s and cannot be interrupted; the daemon may only wait 0.2 s
    d = make_daemon(tmp_path, FakeStages(tmp_path, stage_seconds=1.5), stop_timeout=0.2, scan_interval=0.5)
    rc: dict = {}
    thread = threading.Thread(target=lambda: rc.setdefault("rc", d.run()))
    thread.start()
    drop(tmp_path, "a.jsonl")
    assert wait_for(lambda: (d.current or {}).get("stage") == "validate")
    d.request_stop("test")
    thread.join(30)
    assert rc["rc"] == 0 and d.stuck is True
    job = jobs(tmp_path)[0]
    assert (job.state, job.attempts) == ("received", 0)  # abandoned, and not counted as a crash
    assert json.loads(d.layout.runtime_file.read_text())["state"] == "stopped"
    assert wait_for(lambda: d.current is None)  # let the abandoned stage finish before cleanup
    d.close()


def test_start_up_removes_a_crashed_publish_switch(tmp_path):
    """A daemon killed inside ModelStore._switch leaves models/current.tmp-PID; the next start
    removes it (and a half-copied staging folder), keeping the live version."""
    d = make_daemon(tmp_path)
    models = d.layout.models
    models.mkdir(parents=True, exist_ok=True)
    (models / "v0001").mkdir()
    os.symlink("v0001", models / "current")
    os.symlink("v0001", models / "current.tmp-4242")
    (models / ".v0002.tmp").mkdir()
    d.open()
    try:
        assert sorted(p.name for p in models.iterdir() if p.name != ".publish.lock") == ["current", "v0001"]
    finally:
        d.close()


def test_removing_dead_job_files_never_fails_a_job(tmp_path, monkeypatch, caplog):
    """The cleanup after a publish cannot fail the published job (nor a start): a state.db it
    cannot read is logged and left for the next time."""
    import sqlite3

    drop(tmp_path, "a.jsonl")
    d = make_daemon(tmp_path)
    d.run_until_idle()
    d.close()

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    with JobStore(tmp_path / "state.db") as store:
        monkeypatch.setattr(store, "jobs", locked)
        with caplog.at_level(logging.WARNING, logger="service.job_runner"):
            assert d.runner.drop_dead_job_files(store) == {}
    (rec,) = [r for r in caplog.records if r.getMessage() == "could not look for job files to remove"]
    assert "database is locked" in rec.error
    assert [j.state for j in jobs(tmp_path)] == ["published"]

    # a folder it cannot remove (another user's files, a read-only mount) is logged, left and
    # not reported as removed; the rest still goes
    learner = d.runner.layout.job(1).learner
    learner.mkdir(parents=True)
    (learner / "adapter.safetensors").write_bytes(b"x")
    stuck = d.runner.layout.job(9).export  # a held job's, published over: due to go
    stuck.mkdir(parents=True)
    import service.housekeeping as housekeeping

    real_rmtree = housekeeping.shutil.rmtree

    def refuse(path, *a, **k):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(housekeeping.shutil, "rmtree", refuse)
    with JobStore(tmp_path / "state.db") as store:
        # held job 9 published over by job 10; job 1's version no longer kept
        monkeypatch.setattr(store, "jobs", lambda states: [SimpleNamespace(id=9, version=None)] if states == ("held",)
                            else [SimpleNamespace(id=10, version="v0001"), SimpleNamespace(id=1, version="v0000")])
        monkeypatch.setattr(store, "live", lambda: None)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.housekeeping"):
            assert d.runner.drop_dead_job_files(store) == {1: ["learner"]}
    assert stuck.is_dir() and not learner.exists()
    assert any("Permission denied" in r.getMessage() for r in caplog.records)


def test_a_joint_strategy_is_refused_by_the_daemon_at_start_and_at_reload(tmp_path, caplog):
    """Joint training (mtl) needs every task's data at once: given one file it would be
    sequential LoRA, in silence."""
    from edgekif.errors import ConfigError

    with pytest.raises(ConfigError, match="the daemon learns one file at a time"):
        Daemon(load_config(None, [f"data_dir={tmp_path}", "train.strategy=mtl"]), FakeStages(tmp_path))
    cfg_file = tmp_path / "edgekif.toml"
    cfg_file.write_text('[train]\nstrategy = "replay"\n')
    d = Daemon(load_config(cfg_file, [f"data_dir={tmp_path}"]), FakeStages(tmp_path), config_path=cfg_file,
               overrides=[f"data_dir={tmp_path}"], install_signals=False)
    cfg_file.write_text('[train]\nstrategy = "mtl"\n')
    d.reload()
    assert d.config.train.strategy == "replay" and "config reload failed" in caplog.text


def test_a_metrics_file_the_daemon_cannot_write_is_logged_once_and_status_stays_current(tmp_path, caplog):
    d = make_daemon(tmp_path, metrics_file="/proc/edgekif-test/metrics.prom", scan_interval=0.2)
    drop(tmp_path, "a.jsonl")
    t = threading.Thread(target=d.run)
    with caplog.at_level(logging.ERROR, logger="service.daemon"):
        t.start()
        assert wait_for(lambda: [j.state for j in jobs(tmp_path)] == ["published"], timeout=30)
        time.sleep(2.5)  # more ticks: each would log again
        d.request_stop("test")
        t.join(30)
    failures = [r for r in caplog.records if "could not refresh the metrics file" in r.getMessage()]
    assert len(failures) == 1
    runtime = json.loads((tmp_path / "daemon.json").read_text())
    assert runtime["state"] == "stopped" and not any("could not refresh the status" in r.getMessage() for r in caplog.records)


def test_a_retried_job_publishes_when_the_live_model_was_rolled_back_to_its_start(tmp_path):
    """Job 2 failed while publishing, job 3 published, then the operator rolled back to job 1's
    version, the one job 2 trained on: retrying job 2 publishes it. A rollback away from a job's
    start, on the other hand, holds it (publishing would undo the rollback)."""
    stages = _PublishFailsForJob2(tmp_path)
    d = make_daemon(tmp_path, stages)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        drop(tmp_path, name, json.dumps({"name": name}) + "\n")
        d.run_until_idle()
    ModelStore(tmp_path).rollback("v0001")
    stages.broken = False
    retry_job(d.config, 2)
    d.run_until_idle()
    assert [j.state for j in jobs(tmp_path)] == ["published", "published", "published"]
    assert ModelStore(tmp_path).current() == "v0003" and jobs(tmp_path)[1].version == "v0003"

    stages.broken, stages.fail_job = True, 4  # job 4 trains on v0003, fails to publish; roll back
    drop(tmp_path, "d.jsonl", '{"d": 1}\n')
    d.run_until_idle()
    ModelStore(tmp_path).rollback("v0002")
    stages.broken = False
    retry_job(d.config, 4)
    d.run_until_idle()
    d.close()
    four = jobs(tmp_path)[3]
    assert four.state == "held" and "the live version changed since this job started training on top of job 2's model" in four.error["message"]
