"""`edgekif status` during a job: loss, rate and ETA while training; the running stage (never a
stale "train step 9/9") while evaluating or exporting."""

from __future__ import annotations

import json
from pathlib import Path

from edgekif.config import load_config
from service.daemon import Daemon
from service.status import format_status, progress_view, status
from service.fake_stages import FakeStages

T0 = 1_700_000_000.0


def _current(stage: str, prog: dict | None, now: float, state: str = "buffered") -> str:
    st = {"data_dir": "/d", "daemon": {"running": True, "pid": 7},
          "current": {"job_id": 3, "file": "agnews.jsonl", "state": state, "stage": stage, "progress": progress_view(prog, stage, now)}}
    (line,) = [ln for ln in format_status(st).splitlines() if ln.startswith("current:")]
    return line


def test_training_shows_step_loss_rate_and_eta():
    # first report at step 2 (t0+10, after loading the model), now at step 42 forty seconds later
    prog = {"stage": "train", "started": T0, "ts": T0 + 50, "step": 42, "steps": 122, "loss": 0.41234, "kind": "task",
            "first_step": 2, "first_ts": T0 + 10}
    view = progress_view(prog, "train", now=T0 + 52)
    assert view["steps_per_s"] == 1.0 and view["elapsed_s"] == 52.0
    assert view["eta_s"] == 78.0  # 80 steps left at 1 step/s, 2 s of them gone since the report
    assert _current("train", prog, T0 + 52) == "current:  job 3 agnews.jsonl  buffered / train  step 42/122 (34%)  loss 0.412  1.0 steps/s  ETA 1m18s"


def test_slow_training_shows_seconds_per_step():
    prog = {"stage": "train", "started": T0, "ts": T0 + 130, "step": 12, "steps": 1200, "loss": 2.0,
            "first_step": 2, "first_ts": T0 + 30}  # 10 steps in 100 s
    assert _current("train", prog, T0 + 130) == "current:  job 3 agnews.jsonl  buffered / train  step 12/1200 (1%)  loss 2.000  10.00 s/step  ETA 3h18m"


def test_first_report_has_no_rate_yet():
    prog = {"stage": "train", "started": T0, "ts": T0 + 9, "step": 2, "steps": 100, "loss": 3.5, "first_step": 2, "first_ts": T0 + 9}
    assert _current("train", prog, T0 + 9) == "current:  job 3 agnews.jsonl  buffered / train  step 2/100 (2%)  loss 3.500"


def test_export_shows_its_stage_and_time_not_the_last_train_step():
    fresh = {"stage": "export", "started": T0, "ts": T0}
    assert _current("export", fresh, T0 + 65, state="approved") == "current:  job 3 agnews.jsonl  approved / export  for 1m05s"
    stale = {"stage": "train", "started": T0, "ts": T0 + 9, "step": 9, "steps": 9, "loss": 0.1, "first_step": 2, "first_ts": T0 + 2}
    assert _current("export", stale, T0 + 65, state="approved") == "current:  job 3 agnews.jsonl  approved / export"
    assert _current("evaluate", {"stage": "evaluate", "started": T0, "ts": T0}, T0 + 4, state="trained") == \
        "current:  job 3 agnews.jsonl  trained / evaluate  for 4s"


class _Spy(FakeStages):
    """FakeStages that remember what progress.json held when each stage began its work."""

    seen: dict[str, dict] = {}

    def _peek(self, stage, ctx):
        _Spy.seen[stage] = json.loads(Path(ctx.progress_path).read_text())

    def evaluate(self, ctx):
        self._peek("evaluate", ctx)
        return super().evaluate(ctx)

    def export(self, ctx):
        self._peek("export", ctx)
        return super().export(ctx)

    def publish(self, ctx, export_path):
        self._peek("publish", ctx)
        return super().publish(ctx, export_path)


def test_pipeline_writes_a_fresh_progress_record_at_each_stage(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text('{"x": 1}\n')
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    d = Daemon(config, _Spy(tmp_path, train_steps=9, step_seconds=0), retry_base_seconds=0)
    d.run_until_idle()
    d.close()
    for stage in ("evaluate", "export", "publish"):
        rec = _Spy.seen[stage]
        assert rec["stage"] == stage and "step" not in rec, rec  # the train record is gone
        assert rec["ts"] - rec["started"] < 5
    st = status(config)  # idle again: the job is published, nothing current
    assert st["current"] is None and st["published"]["version"] == "v0001"


def test_a_jobs_error_in_one_line_names_line_field_and_the_other_problems():
    from edgekif.errors import ValidationError
    from service.status import error_text

    assert error_text(None) is None
    assert error_text({"kind": "held", "message": "headlines: not a significant gain"}) == "headlines: not a significant gain"
    one = ValidationError("missing required field 'output'", file="f.jsonl", line=2, field="output", kind="missing_field")
    assert error_text(one.to_dict()) == "line 2 (field 'output'): missing required field 'output'"
    three = ValidationError("invalid JSON", file="f.jsonl", line=4, kind="bad_json", also=(one, one), more=2)
    assert error_text(three.to_dict()) == "line 4: invalid JSON (+2 more)"
    side = ValidationError("unknown key 'metrik'", file="/d/accepted/ab12_heads.task.toml", line=2, field="metrik")
    assert error_text(side.to_dict()) == "ab12_heads.task.toml:line 2 (field 'metrik'): unknown key 'metrik'"
    record = ValidationError("record 3: missing required field 'output'", file="t.json", line=3, field="output", details={"record": 3})
    assert error_text(record.to_dict()) == "record 3: missing required field 'output'"
