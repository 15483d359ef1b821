"""`edgekif train`: the library's continual loop from the command line, on the tiny model."""

from __future__ import annotations

import json

import pytest

from edgekif.cli import main

WORDS = ["alpha", "beta", "gamma", "delta"]


def _task(path, name, n=12):
    path.write_text("".join(json.dumps({"prompt": f"{name} item {i}: which word?", "completion": WORDS[i % 4]}) + "\n" for i in range(n)))
    return str(path)


@pytest.mark.parametrize("strategy,rows", [("replay", ["a", "b"]), ("mtl", ["a+b"])])
def test_train_runs_the_stream_and_writes_results(tiny_dir, tmp_path, capsys, strategy, rows):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [_task(tmp_path / "a" / "a.jsonl", "a"), _task(tmp_path / "b" / "b.jsonl", "b")]
    tests = [_task(tmp_path / "a" / "a_test.jsonl", "a", 4), _task(tmp_path / "b" / "b_test.jsonl", "b", 4)]
    out = tmp_path / "out"
    rc = main(["train", *files, "--test", *tests, "--strategy", strategy, "--out", str(out), "--quiet",
               "--data-dir", str(tmp_path / "data"), "--set", f"model.base={tiny_dir}", "--set", "model.precision=fp32",
               "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.max_length=48", "--set", "eval.label_scoring=false"])
    assert rc == 0
    res = json.loads((out / "train_results.json").read_text())
    assert res["strategy"] == strategy and [r["task_id"] for r in res["tasks"]] == rows
    # joint: the replay strategies' budget on both tasks (2, then 2 + M=1 replay step: one
    # round of the default Q=2, M=1)
    assert res["tasks"][-1]["task_steps"] == (2 + (2 + 1) if strategy == "mtl" else 2)
    matrix = res["accuracy_matrix"]
    assert matrix["tasks"] == ["a", "b"] and all(v is not None for v in matrix["a"][-1])
    assert (out / "learner" / "adapter" / "adapter_config.json").is_file()
    assert "adapter:" in capsys.readouterr().out


def test_train_rejects_a_bad_sidecar_before_loading_the_base(tmp_path, capsys):
    """A sidecar stating an unknown kind fails the command at once, naming the sidecar, its
    line and key, before the base is looked for (here it does not exist: had the base loaded
    first, the error would be about the base)."""
    (tmp_path / "a").mkdir()
    task = _task(tmp_path / "a" / "a.jsonl", "a")
    (tmp_path / "a" / "a.task.toml").write_text('# what judges a\nkind = "poem"\n')
    out = tmp_path / "out"
    rc = main(["train", task, "--out", str(out), "--quiet", "--data-dir", str(tmp_path / "data"),
               "--set", f"model.base={tmp_path / 'no-such-base'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "a.task.toml:line 2 (field 'kind')" in err and "'poem'" in err
    assert "no-such-base" not in err and not out.exists()
