"""`edgekif check`: what the daemon would do with a task file, changing nothing, and the same
as the daemon then does: its spec, holdout/train split and answer budget, or every problem that
would reject it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekif.config import load_config
from edgekif.layout import DataLayout

from test_service_stages import _alpaca, _headlines, _run_library_daemon
from tiny_models import save_tiny_llama


@pytest.fixture
def setup(tmp_path):
    base = save_tiny_llama(tmp_path / "base")
    data = tmp_path / "data"
    config = load_config(None, [f"data_dir={data}", f"model.base={base}", "service.quiet_seconds=0"])
    files = tmp_path / "mine"
    files.mkdir()
    (files / "heads.jsonl").write_text(_headlines(30))
    (files / "yesno.jsonl").write_text(_alpaca(40))
    (files / "yesno.task.toml").write_text('metric = "exact_match"\n')
    return config, files


def test_check_says_what_the_daemon_then_does(setup):
    from service.preflight import describe_task_file, format_description
    from service.stages import JobContext

    config, files = setup
    checked = {name: describe_task_file(config, files / name) for name in ("heads.jsonl", "yesno.jsonl")}
    layout = DataLayout(config.data_path)
    assert not config.data_path.exists()  # a check changes nothing, not even the data dir
    heads, yesno = checked["heads.jsonl"], checked["yesno.jsonl"]
    assert (heads["records"], heads["holdout"], heads["train"], heads["labels"], heads["sidecar"]) == (30, 15, 15, None, None)
    assert (yesno["holdout"], yesno["train"], yesno["labels"]) == (10, 30, {"no": 20, "yes": 20})
    assert yesno["spec"]["metric"] == "exact_match" and yesno["sidecar"] == str(files / "yesno.task.toml")
    assert heads["warnings"] and "15 records are held out" in heads["warnings"][0]

    # The daemon, given the same files: the same spec, split and budget.
    layout.create()
    for p in files.iterdir():
        (layout.inbox / p.name).write_bytes(p.read_bytes())
    stages, jobs = _run_library_daemon(config)
    for name, c in checked.items():
        job = jobs[name]
        ctx = JobContext(job_id=job.id, file_name=job.file_name, file_path=Path(job.file_path), sha256=job.sha256,
                         work_dir=layout.job_dir(job.id), layout=layout, config=config)
        spec = stages._decide_budget(ctx, None)["spec"]  # the train stage's budget, with the base's tokenizer
        assert spec == c["spec"], name
        held = layout.holdout_file(Path(name).stem).read_text().splitlines()
        assert len(held) == c["holdout"] and job.sha256 == c["sha256"]
    assert isinstance(heads["spec"]["max_new_tokens"], int) and heads["budget_from"] == "from the training split's answers, in base's tokens"
    assert (heads["task"], heads["duplicate_of"]) == ("heads", None)

    # Against the data dir the daemon has filled: the same bytes are a duplicate, other bytes
    # under a taken name a new task NAME~2, as the daemon names them.
    db = layout.state_db.read_bytes()
    again = describe_task_file(config, files / "heads.jsonl")
    assert again == {"file": str(files / "heads.jsonl"), "task": None,
                     "duplicate_of": {"file": "heads.jsonl", "job": jobs["heads.jsonl"].id, "state": "published"}}
    assert "would be set aside as a duplicate: the same bytes were dropped before as 'heads.jsonl'" in format_description(again)
    (files / "heads.jsonl").write_text(_headlines(31))
    assert describe_task_file(config, files / "heads.jsonl")["task"] == "heads~2"
    assert layout.state_db.read_bytes() == db  # read-only


def test_check_without_a_converted_base_leaves_the_budget_to_training(tmp_path):
    from service.preflight import describe_task_file, format_description

    gguf = tmp_path / "never.gguf"
    gguf.write_bytes(b"GGUF not converted")
    config = load_config(None, [f"data_dir={tmp_path / 'data'}", f"model.base={gguf}"])
    (tmp_path / "heads.jsonl").write_text(_headlines(4))
    d = describe_task_file(config, tmp_path / "heads.jsonl")
    assert d["spec"]["max_new_tokens"] is None and "not converted yet" in d["budget_from"]
    assert not (tmp_path / "data").exists()
    assert "budget:  not decided yet (decided when its job trains" in format_description(d)


def test_check_command_lists_every_problem_and_exits_2(setup, capsys):
    from service.cli import main

    config, files = setup
    (files / "bad.jsonl").write_text(_alpaca(2) + '{"instruction": "q"}\nnot json\n')
    rc = main(["--data-dir", str(config.data_path), "-s", f"model.base={config.model.base}", "check", str(files / "yesno.jsonl"), str(files / "bad.jsonl")])
    out = capsys.readouterr().out
    assert rc == 1  # a file would be refused (2 is for the command's own errors)
    assert f"{files / 'yesno.jsonl'}: valid, 40 records (jsonl), task 'yesno'" in out
    assert "kind:    classification (detected from the answers); judged by exact_match" in out
    assert f"{files / 'bad.jsonl'}: would be rejected" in out
    assert "line 3 (field 'output'): missing required field 'output'" in out and "    line 4: invalid JSON" in out
    assert main(["--data-dir", str(config.data_path), "-s", f"model.base={config.model.base}", "check", "--json", str(files / "bad.jsonl")]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report["rejected"]["line"] == 3 and report["rejected"]["more"] == 1
    assert main(["--data-dir", str(config.data_path), "check", str(files / "missing.jsonl")]) == 1
    assert "missing.jsonl: would be rejected" in capsys.readouterr().out


def test_check_rejects_what_json_reads_but_cannot_store(tmp_path, capsys):
    """A lone surrogate (JSON's "\\ud800" escape; no UTF-8 or SQLite write can hold it) and an
    integer longer than Python reads (a plain ValueError, not a JSONDecodeError) would be
    rejected: `check` says so, naming line and field, instead of "valid" or a traceback."""
    from service.cli import main

    sur, big = tmp_path / "sur.jsonl", tmp_path / "big.json"
    sur.write_text(_alpaca(3) + '{"instruction": "q\\ud800", "output": "a"}\n{"ans\\udc00wer": "x"}\n')
    big.write_text('[{"prompt": "a", "completion": "b", "n": %s}]' % ("9" * 5000))
    argv = ["--data-dir", str(tmp_path / "data"), "check"]
    assert main([*argv, str(sur), str(big)]) == 1
    out = capsys.readouterr().out
    out.encode("utf-8")  # no raw surrogate
    assert f"{sur}: would be rejected" in out and f"{big}: would be rejected" in out
    assert "line 4 (field 'instruction'): 'instruction' holds a lone UTF-16 surrogate '\\ud800'" in out
    assert "line 5 (field 'ans\\\\udc00wer'): key 'ans\\udc00wer' holds a lone UTF-16 surrogate" in out
    assert "line 1: invalid JSON at line 1 column 42: Exceeds the limit (4300 digits)" in out
    assert main([*argv, "--json", str(sur), str(big)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [(r["rejected"]["kind"], r["rejected"]["line"], r["rejected"]["field"]) for r in reports] == [
        ("encoding", 4, "instruction"), ("bad_json", 1, None)]
    assert reports[0]["rejected"]["also"][0]["field"] == "ans\\udc00wer"
