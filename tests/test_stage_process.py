"""Model stages in a child process (service.stage_process): results and typed errors cross the
process boundary, an OOM-killed stage fails its job with `out of memory` while the daemon
goes on, a stop reaches the child, and the daemon never imports what the child loads."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from edgekif.config import load_config
from service.daemon import Daemon
from service.jobs import JobStore
from service.stage_process import OOM_HINTS, ChildStages, _no_result, error_from_dict, error_to_dict
from service.fake_stages import FAKE_CHILD_COMMAND, FakeStages


def make(tmp_path: Path, **fake):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "fake_stages.json").write_text(json.dumps(fake))
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    stages = ChildStages(config, inner=FakeStages.from_data_dir(tmp_path), child_command=FAKE_CHILD_COMMAND)
    return Daemon(config, stages, retry_base_seconds=0, resource_retry_seconds=0)


def drop(tmp_path: Path, name: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text(json.dumps({"x": name}) + "\n")


def jobs(tmp_path: Path):
    with JobStore(tmp_path / "state.db") as store:
        return store.jobs()


def test_model_stages_run_in_children_and_the_job_publishes(tmp_path):
    d = make(tmp_path)
    drop(tmp_path, "a.jsonl")
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "published" and job.metrics["train"]["steps"] == 3
    pids = {c["stage"]: c["pid"] for c in FakeStages.read_calls(tmp_path)}
    for stage in ("train", "export", "evaluate"):
        assert pids[stage] != os.getpid(), stage
    for stage in ("validate", "buffer", "publish"):
        assert pids[stage] == os.getpid(), stage
    assert not (tmp_path / "jobs" / "1" / "stage-request.json").exists()  # nothing left behind


def test_a_library_s_progress_bar_in_a_child_stays_out_of_the_daemon_log(tmp_path, caplog):
    """The fake training draws a tqdm bar, as transformers' GGUF conversion does in the real one."""
    d = make(tmp_path)
    drop(tmp_path, "a.jsonl")
    with caplog.at_level(logging.INFO):
        d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path)
    relayed = [r for r in caplog.records if r.getMessage() and getattr(r, "child_pid", None)]
    assert job.state == "published" and relayed  # the children's records do reach the log
    assert not [r.getMessage() for r in relayed if "progress bar" in r.getMessage() or "it/s]" in r.getMessage()]


def test_an_oom_killed_stage_fails_its_job_and_the_next_job_is_published(tmp_path):
    d = make(tmp_path, inject={"export": ["sigkill", "before", 1]})  # every try: each child reads it anew
    drop(tmp_path, "a.jsonl")
    d.run_until_idle()
    (tmp_path / "fake_stages.json").write_text("{}")  # memory is back
    drop(tmp_path, "b.jsonl")
    d.run_until_idle()
    d.close()
    a, b = sorted(jobs(tmp_path), key=lambda j: j.id)
    assert a.state == "failed" and a.error["message"].startswith("out of memory: the export stage's process was killed by SIGKILL")
    assert a.error["hint"] == f"{OOM_HINTS['export']}; then `edgekif retry JOB`"
    assert b.state == "published"


def test_an_oom_killed_stage_says_what_lowers_that_stage_s_memory():
    train = _no_result("train", -signal.SIGKILL, 6681.0)
    assert str(train).endswith("at 6681 MB resident")
    assert "train.gradient_checkpointing = true" in train.hint and 'lora.target_modules = ["q_proj", "v_proj"]' in train.hint
    assert _no_result("evaluate", -signal.SIGKILL, 300.0).hint != train.hint
    # another signal is not taken for memory, and a crash has no hint
    assert _no_result("train", -signal.SIGTERM, 900.0).hint == "" and _no_result("train", 1, 900.0).hint == ""


def test_typed_errors_cross_the_boundary(tmp_path):
    """An injection lives in each child anew (fake_stages.json), so it fires on every try."""
    d = make(tmp_path / "disk", inject={"train": ["enospc", "before", 1]})
    drop(tmp_path / "disk", "a.jsonl")
    d.run_until_idle(max_steps=4)
    d.close()
    (job,) = jobs(tmp_path / "disk")
    assert job.state == "buffered" and job.attempts == 0 and "ENOSPC" in d.runner.waiting[job.id]["reason"]
    d = make(tmp_path / "bad", inject={"evaluate": ["validation", "before", 1]})
    drop(tmp_path / "bad", "a.jsonl")
    d.run_until_idle()
    d.close()
    (job,) = jobs(tmp_path / "bad")
    # a ValidationError after export cannot reject the file: it fails like any error, by name
    assert job.state == "failed" and job.error["error"] == "ValidationError" and "injected validation error in evaluate" in job.error["message"]


def test_error_round_trip_keeps_the_fields():
    from edgekif.errors import DamagedFileError

    e = error_from_dict(json.loads(json.dumps(error_to_dict(DamagedFileError("bad", file="h.jsonl", line=3, field="messages", kind="damaged_holdout")))))
    assert isinstance(e, DamagedFileError) and (e.file, e.line, e.field, e.kind) == ("h.jsonl", 3, "messages", "damaged_holdout")
    crash = error_from_dict(error_to_dict(KeyError("rope_type")))
    assert type(crash).__name__ == "StageCrashed" and not crash.permanent and crash.hint == ""


def test_a_package_missing_in_the_child_fails_the_job_once_with_a_hint():
    missing = error_from_dict(json.loads(json.dumps(error_to_dict(ModuleNotFoundError("No module named 'torch'")))))
    assert missing.permanent and "No module named 'torch'" in str(missing)
    assert sys.executable in missing.hint and "`edgekif retry JOB`" in missing.hint


def test_a_stop_reaches_the_training_child_which_checkpoints(tmp_path):
    d = make(tmp_path, train_steps=50, step_seconds=0.1)
    drop(tmp_path, "a.jsonl")
    d.run_until_idle(max_steps=2)
    stop_after = {"polls": 0}

    def should_stop():
        stop_after["polls"] += 1
        return stop_after["polls"] > 10  # ~2 s into training

    d.stages.should_stop = should_stop
    (job,) = jobs(tmp_path)
    store = JobStore(tmp_path / "state.db")
    d.runner.should_stop = should_stop
    d.step(store, job)
    store.close()
    d.close()
    (job,) = jobs(tmp_path)
    assert job.state == "buffered" and job.attempts == 0  # Interrupted: stays, no attempt used
    ckpt = json.loads((tmp_path / "jobs" / "1" / "checkpoint.json").read_text())
    assert 0 < ckpt["step"] < 50


def test_the_daemon_does_not_import_torch_for_model_stages(tmp_path):
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from tests.test_stage_process import make, drop, jobs\n"
        f"p = Path({str(tmp_path)!r})\n"
        "d = make(p); drop(p, 'a.jsonl'); d.run_until_idle(); d.close()\n"
        "print(json.dumps({'state': jobs(p)[0].state, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"state": "published", "torch": False, "transformers": False}


def test_a_stop_that_a_stage_rewraps_still_reads_as_a_stop(tmp_path, monkeypatch):
    """SIGTERM raises Interrupted wherever the export or evaluate child is; a broad `except`
    there (a runner that fails to open is a permanent ExportError) must not turn a daemon
    restart into a failed job: the child reports a stop, which gives the attempt back."""
    import time

    import service.stage_process as sp
    from edgekif.errors import ExportError, Interrupted

    monkeypatch.setattr(sp, "context_from_dict", lambda d, config: None)
    monkeypatch.setattr(sp, "log_json_to_stdout", lambda: None)

    class Stages:
        def __init__(self, config):
            pass

        def export(self, ctx):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception as e:  # as edgekif.infer's runner open does
                err = ExportError(f"the export cannot be opened: {e}")
                err.permanent = True
                raise err from e
            raise AssertionError("SIGTERM did not reach the stage")

    request, result = tmp_path / "request.json", tmp_path / "result.json"
    config = load_config(None, [f"data_dir={tmp_path}"])
    request.write_text(json.dumps({"stage": "export", "config": config.to_dict(), "ctx": {}, "result": str(result)}))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert sp.main([str(request)], stages_factory=Stages) == 3
    finally:
        signal.signal(signal.SIGTERM, previous)
    error = error_from_dict(json.loads(result.read_text())["error"])
    assert isinstance(error, Interrupted) and not error.permanent
    assert "ExportError: the export cannot be opened" in str(error)
