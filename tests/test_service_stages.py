"""The stage interface: the forgetting gate, and the daemon driving the library-backed stages
(service/edgekif_stages.py) with stand-ins for the torch-heavy ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekif.config import load_config
from service.daemon import Daemon
from service.status import status
from edgekif.layout import DataLayout
from service.jobs import JobStore
from service.gates import forgetting_gate
from service.stages import EvalResult, Published, TrainResult


def test_forgetting_gate_compares_points_against_the_live_version():
    live = Published("v3", 3, {"a": 0.90, "b": 0.50})
    assert forgetting_gate({"a": 0.86, "b": 0.46, "c": 0.1}, live, 5.0) == (True, [])
    ok, reasons = forgetting_gate({"a": 0.84, "b": 0.50}, live, 5.0)
    assert not ok and reasons == ["a: 90.0 -> 84.0 (-6.0 points > 5 allowed)"]
    ok, reasons = forgetting_gate({"a": 0.95}, live, 5.0)
    assert not ok and reasons == ["b: not evaluated (was 50.0)"]
    assert forgetting_gate({"a": 0.0}, None, 5.0) == (True, [])  # nothing live yet


def _alpaca(n: int) -> str:
    return "".join(json.dumps({"instruction": f"question {i}?", "input": "", "output": "yes" if i % 2 else "no"}) + "\n" for i in range(n))


def _run_library_daemon(config) -> tuple:
    """(the stages, {file name: job}) after a daemon with _library_with_fake_training's stages
    has taken everything in the inbox."""
    stages = _library_with_fake_training(config)
    d = Daemon(config, stages)
    d.run_until_idle()
    d.close()
    with JobStore(DataLayout(config.data_path).state_db) as store:
        return stages, {j.file_name: j for j in store.jobs()}


def _export(folder: Path, content: str, job_id: int | None = None) -> Path:
    import hashlib

    from edgekif.export.manifest import write_manifest

    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text(content)
    write_manifest(folder, target="onnx", precision="fp32", execution_provider="cpu",
                   adapter_sha256=hashlib.sha256(content.encode()).hexdigest(), job_id=job_id)
    return folder


def _library_with_fake_training(config):
    """Real validate/buffer/publish; train/evaluate/export stand-ins that need no torch."""
    library_stages = pytest.importorskip("service.edgekif_stages")

    class Stages(library_stages.LibraryStages):
        def train(self, ctx, should_stop):
            return TrainResult(steps=1)

        def evaluate(self, ctx):
            return EvalResult({t: 0.75 for t in [*ctx.past_tasks, ctx.task_name]})

        def export(self, ctx):
            final = ctx.work_dir / "export"
            if not final.exists():
                _export(final, f"weights of job {ctx.job_id}", ctx.job_id)
            return final

    return Stages(config)


def test_daemon_with_library_stages_publishes_versions_and_reports_the_buffer(tmp_path):
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    layout = DataLayout(tmp_path)
    layout.create()
    (layout.inbox / "first.jsonl").write_text(_alpaca(40))
    (layout.inbox / "second.csv").write_text("instruction,output\n" + "".join(f"q{i},a{i % 2}\n" for i in range(20)))
    (layout.inbox / "bad.json").write_text("[1, 2]")
    d = Daemon(config, _library_with_fake_training(config))
    d.run_until_idle()
    d.close()
    with JobStore(layout.state_db) as store:
        jobs = {j.file_name: j for j in store.jobs()}
        holdouts = [store.task(j.task_id)["holdout"] for j in store.jobs(("published",))]
    assert {n: j.state for n, j in jobs.items()} == {"first.jsonl": "published", "second.csv": "published", "bad.json": "rejected"}
    assert jobs["first.jsonl"].version == "v0001" and jobs["second.csv"].version == "v0002"
    assert jobs["bad.json"].error["kind"] == "not_object"
    assert len(holdouts) == 2 and all(h and Path(h).exists() for h in holdouts)
    st = status(config)
    assert st["published"]["version"] == "v0002" and st["published"]["accuracies"] == {"first": 0.75, "second": 0.75}
    assert set(st["buffer"]["tasks"]) == {"first", "second"} and st["buffer"]["total"] > 0
    assert (layout.models / "current").resolve().name == "v0002"


def test_manifest_lists_each_learned_task_with_its_example_counts(tmp_path):
    library_stages = pytest.importorskip("service.edgekif_stages")
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    layout = DataLayout(tmp_path)
    layout.create()
    (layout.inbox / "first.jsonl").write_text(_alpaca(40))
    (layout.inbox / "second.csv").write_text("instruction,output\n" + "".join(f"q{i},a{i % 2}\n" for i in range(20)))
    d = Daemon(config, _library_with_fake_training(config))
    d.run_until_idle()
    d.close()
    tasks = library_stages.manifest_tasks(layout, config, ["first", "second"])
    assert [t["name"] for t in tasks] == ["first", "second"]
    for t, total in zip(tasks, (40, 20)):
        assert t["holdout_examples"] >= 1 and t["train_examples"] + t["holdout_examples"] == total
        assert 0 < t["replay_stored"] <= t["train_examples"]
    assert tasks[1]["source_file"] == "second.csv"


def test_published_jobs_leave_no_export_copy_and_a_rerun_publish_needs_none(tmp_path):
    """Each version lives once on disk (models/vN); a publish re-run after a crash that came
    after the switch (and after the job's copy was removed) returns the live version."""
    from service.stages import JobContext

    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    layout = DataLayout(tmp_path)
    layout.create()
    (layout.inbox / "first.jsonl").write_text(_alpaca(20))
    stages, jobs = _run_library_daemon(config)
    (job,) = jobs.values()
    assert job.state == "published" and job.version == "v0001"
    work = layout.jobs / str(job.id)
    assert not (work / "export").exists() and not (work / "export-work").exists()
    assert (layout.models / "v0001" / "model.onnx").read_text() == f"weights of job {job.id}"
    ctx = JobContext(job_id=job.id, file_name=job.file_name, file_path=Path(job.file_path), sha256=job.sha256,
                     work_dir=work, layout=layout, config=config)
    assert stages.publish(ctx, work / "export") == "v0001"
    assert sorted(p.name for p in layout.models.iterdir() if p.name.startswith("v")) == ["v0001"]


def _headlines(n: int) -> str:
    return "".join(json.dumps({"instruction": f"Write a headline for story {i}.", "input": "", "output": f"Story number {i} makes the news today"}) + "\n"
                   for i in range(n))


def test_a_generation_task_gets_its_spec_recorded_and_its_budget_from_its_answers(tmp_path):
    from service.stages import JobContext
    from tiny_models import tiny_tokenizer

    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    layout = DataLayout(tmp_path)
    layout.create()
    (layout.inbox / "heads.jsonl").write_text(_headlines(30))
    (layout.inbox / "yesno.jsonl").write_text(_alpaca(40))
    (layout.inbox / "yesno.task.toml").write_text('metric = "exact_match"\nmax_new_tokens = 3\n')
    stages, jobs = _run_library_daemon(config)
    assert {n: j.state for n, j in jobs.items()} == {"heads.jsonl": "published", "yesno.jsonl": "published"}
    heads = jobs["heads.jsonl"].metrics["validate"]["details"]["spec"]
    assert heads == {"kind": "generation", "metric": "rouge_l", "max_new_tokens": None, "source": "detected", "stated": []}
    assert jobs["yesno.jsonl"].metrics["validate"]["details"]["spec"] == {
        "kind": "classification", "metric": "exact_match", "max_new_tokens": 3, "source": "detected", "stated": ["metric", "max_new_tokens"]}
    assert json.loads(layout.spec_file("heads").read_text()) == heads
    assert json.loads(layout.spec_file("yesno").read_text())["max_new_tokens"] == 3
    # free text keeps half back (its per-record scores are noisier), labels a quarter
    assert [layout.holdout_file(t).read_text().count("\n") for t in ("heads", "yesno")] == [15, 10]
    # the budget the sidecar left open is decided by train, from the training answers (in the child; here directly)
    job = jobs["heads.jsonl"]
    ctx = JobContext(job_id=job.id, file_name=job.file_name, file_path=Path(job.file_path), sha256=job.sha256,
                     work_dir=layout.job_dir(job.id), layout=layout, config=config)
    tok = tiny_tokenizer()
    longest = max(len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in map(json.loads, _headlines(30).splitlines()))
    decided = stages._decide_budget(ctx, tok)["spec"]
    assert decided["kind"] == "generation" and longest < decided["max_new_tokens"] <= longest + 4
    assert json.loads(layout.spec_file("heads").read_text()) == decided
    assert stages._decide_budget(ctx, None)["spec"] == decided  # once: not decided again


@pytest.mark.parametrize("sidecar, line, field", [('kind = "generation"\nmetrik = "rouge_l"\n', 2, "metrik"),
                                                  ('max_new_tokens = "many"\n', 1, "max_new_tokens")])
def test_a_bad_sidecar_rejects_its_file_naming_file_line_and_field(tmp_path, sidecar, line, field):
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    layout = DataLayout(tmp_path)
    layout.create()
    (layout.inbox / "heads.jsonl").write_text(_headlines(10))
    (layout.inbox / "heads.task.toml").write_text(sidecar)
    d = Daemon(config, _library_with_fake_training(config))
    d.run_until_idle()
    d.close()
    with JobStore(layout.state_db) as store:
        (job,) = store.jobs()
    assert job.state == "rejected"
    assert job.error["file"].endswith("_heads.task.toml") and job.error["line"] == line and job.error["field"] == field
    assert not layout.spec_file("heads").exists()
    # the file and its sidecar are both in rejected/, beside the report; nothing stays in accepted/
    assert sorted(p.name for p in layout.rejected.iterdir()) == ["heads.jsonl", "heads.jsonl.error.json", "heads.task.toml"]
    assert (layout.rejected / "heads.task.toml").read_text() == sidecar and list(layout.accepted.iterdir()) == []
    report = json.loads((layout.rejected / "heads.jsonl.error.json").read_text())
    assert report["error"]["file"] == str(layout.rejected / "heads.task.toml") and report["error"]["line"] == line


def test_holdout_size_is_the_kinds_share_capped_and_leaves_a_record_to_train_on():
    from service.edgekif_stages import holdout_size

    svc = load_config(None, []).service
    assert (svc.holdout_fraction, svc.holdout_max, svc.generation_holdout_fraction, svc.generation_holdout_max) == (0.25, 48, 0.5, 96)
    assert [holdout_size(svc, "classification", n) for n in (0, 1, 2, 10, 192, 1000)] == [0, 0, 0, 2, 48, 48]
    assert [holdout_size(svc, "generation", n) for n in (1, 2, 10, 192, 1000)] == [0, 1, 5, 96, 96]
    with pytest.raises(Exception, match="generation_holdout_fraction"):
        load_config(None, ["service.generation_holdout_fraction=1.0"])


def test_stage_processes_drop_only_the_known_transformers_deprecations():
    """The daemon's log got two to four lines of FutureWarning a stage, about names the pinned
    transformers range does not remove; those go, any other warning still reaches the log."""
    import warnings

    library_stages = pytest.importorskip("service.edgekif_stages")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        library_stages._quiet_transformers()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        warnings.warn("`max_length` is deprecated", FutureWarning)
        warnings.warn("`past_key_values` is deprecated", UserWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (FutureWarning, "`max_length` is deprecated"), (UserWarning, "`past_key_values` is deprecated")]


def test_a_repeated_prompt_stays_on_one_side_of_the_holdout_split():
    """A file made of two copies of the same records: no held-out prompt is also trained on
    (the gate would score answers the model learned by heart). Without repeats the split is
    the plain shuffle it always was, so files split before keep their split."""
    import random

    from edgekif.records import Record
    from service.edgekif_stages import split_holdout

    unique = [Record.from_prompt(f"Classify text number {i}.", "yes" if i % 2 else "no") for i in range(100)]
    plain = list(unique)
    random.Random("sha").shuffle(plain)
    assert split_holdout(unique, "sha", 24) == (plain[:24], plain[24:])

    twice = unique + [Record.from_prompt(f"Classify  text number {i}. ", r.output) for i, r in enumerate(unique)]
    holdout, train = split_holdout(twice, "sha", 48)
    key = lambda r: " ".join(r.messages[-1][1].split())  # noqa: E731
    assert len(holdout) == 48 and len(train) == 152
    assert not {key(r) for r in holdout} & {key(r) for r in train}
    assert split_holdout(twice, "sha", 48) == (holdout, train)  # the same file, the same split

    same = [Record.from_prompt("Say something.", f"answer {i}") for i in range(10)]  # one prompt only
    holdout, train = split_holdout(same, "sha", 3)
    assert (len(holdout), len(train)) == (3, 7)  # nothing else to hold out: split plainly
