"""`edgekif infer --file` prompt parsing (every task-file shape, through edgekif.taskfile.prompt_messages;
errors name file, line, field) and `edgekif models list` lines."""

from __future__ import annotations

import json

import pytest

from edgekif.cli import _read_prompts
from edgekif.taskfile import prompt_messages, read_task
from edgekif.errors import ValidationError


def _prompts(tmp_path, *objs) -> list:
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return [m for _, _, m in _read_prompts(str(f))]


def test_prompt_file_strings_are_one_user_turn(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"plain"\n\n"second"\n')
    assert _read_prompts(str(f)) == [(1, None, [{"role": "user", "content": "plain"}]), (3, None, [{"role": "user", "content": "second"}])]


def test_prompt_file_alpaca_joins_instruction_and_input(tmp_path):
    got = _prompts(
        tmp_path,
        {"id": "a1", "instruction": "Topic? Options: A, B.", "input": "Text: x", "output": "A"},
        {"instruction": "Say hi.", "input": ""},  # empty input: the instruction alone
        {"instruction": "Topic?", "input": "Text: y", "system": "Be brief."},
    )
    assert got == [
        [{"role": "user", "content": "Topic? Options: A, B.\nText: x"}],
        [{"role": "user", "content": "Say hi."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Topic?\nText: y"}],
    ]


def test_prompt_file_prompt_completion(tmp_path):
    got = _prompts(tmp_path, {"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?"}, {"prompt": "p", "system": "S"})
    assert got == [
        [{"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "3+3?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "p"}],
    ]


def test_prompt_file_chat_messages_drop_the_answer(tmp_path):
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    got = _prompts(tmp_path, {"messages": turns}, {"messages": turns + [{"role": "assistant", "content": "the answer"}]})
    assert got == [turns, turns]  # a task file's final assistant message is its answer, not prompt


def test_prompt_messages_is_the_rule_training_records_use(tmp_path):
    """infer's prompts equal the records' chat() the trainer and evaluators see, for every shape."""
    objs = [
        {"instruction": "Topic?", "input": "Text: x", "output": "A", "system": "S"},
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(o) + "\n" for o in objs))
    assert [prompt_messages(o) for o in objs] == [r.chat() for r in read_task(task).records]
    assert _prompts(tmp_path, *objs) == [r.chat() for r in read_task(task).records]


def test_agnews_prompt_holds_the_instruction_and_the_input(benchmark_data):
    path = benchmark_data / "agnews" / "test.jsonl"
    first = json.loads(path.open().readline())
    lineno, rid, messages = _read_prompts(str(path))[0]
    assert (lineno, rid) == (1, first["id"])
    assert messages == [{"role": "user", "content": first["instruction"] + "\n" + first["input"]}]
    assert messages[0]["content"].startswith("What is the topic of the following paragraph?")
    assert "Title: Shoppers return in September" in messages[0]["content"]


@pytest.mark.parametrize(
    "text, line, field, kind",
    [
        ('"ok"\n{oops\n', 2, None, "bad_json"),
        ('"ok"\n"ok"\n{"text": "x"}\n', 3, None, "unknown_shape"),
        ("[1]\n", 1, None, "not_object"),
        ('{"input": "only input"}\n', 1, "instruction", "missing_field"),
        ('"ok"\n{"instruction": "   ", "input": "x"}\n', 2, "instruction", "empty_field"),
        ('{"prompt": 3}\n', 1, "prompt", "bad_type"),
        ('{"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "b"}]}\n', 1, "messages[1].role", "bad_type"),
        ('{"messages": [{"role": "system", "content": "s"}]}\n', 1, "messages[0].role", "bad_type"),
    ],
)
def test_bad_prompt_file_names_the_line(tmp_path, text, line, field, kind):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(ValidationError) as ei:
        _read_prompts(str(f))
    e = ei.value
    assert (e.file, e.line, e.field, e.kind) == (str(f), line, field, kind)
    assert str(f) in str(e)


def test_infer_file_sends_each_prompts_messages_in_batches(tmp_path, monkeypatch, capsys):
    import edgekif.infer
    from edgekif.cli import main

    calls = []

    class Spy:
        def generate_batch(self, prompts, max_new_tokens):
            calls.append((prompts, max_new_tokens))
            return [f"answer to {p[-1]['content']}" for p in prompts]

    monkeypatch.setattr(edgekif.infer, "open_model", lambda folder: Spy())
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": 7, "instruction": "I", "input": "X", "output": "O"}) + "\n\n" + json.dumps({"prompt": "P"}) + "\n" + '"S"\n')
    assert main(["infer", "--model", str(tmp_path), "--file", str(f), "--batch-size", "2", "--max-new-tokens", "5", "--data-dir", str(tmp_path)]) == 0
    assert calls == [([[{"role": "user", "content": "I\nX"}], [{"role": "user", "content": "P"}]], 5), ([[{"role": "user", "content": "S"}]], 5)]
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [
        {"line": 1, "id": 7, "messages": [{"role": "user", "content": "I\nX"}], "answer": "answer to I\nX"},
        {"line": 3, "messages": [{"role": "user", "content": "P"}], "answer": "answer to P"},
        {"line": 4, "messages": [{"role": "user", "content": "S"}], "answer": "answer to S"},
    ]


def test_missing_prompt_file_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError) as ei:
        _read_prompts(str(tmp_path / "nope.jsonl"))
    assert ei.value.kind == "unreadable"


def test_models_list_line_shows_export_and_accuracies_in_learning_order():
    from edgekif.cli import _version_line

    row = {"name": "v0002", "created": "2026-11-23T03:29:30+00:00", "is_current": True,
           "export": {"target": "genai", "precision": "int8"},
           "tasks": [{"name": "dbpedia"}, {"name": "agnews"}], "accuracies": {"agnews": 0.6667, "dbpedia": 1 / 3}}
    assert _version_line(row) == "* v0002  2026-11-23T03:29:30+00:00  genai/int8  dbpedia 33.3, agnews 66.7"
    assert _version_line({"name": "v0001", "error": "bad manifest"}) == "  v0001  unreadable: bad manifest"


def test_models_list_line_shows_a_free_text_task_by_its_own_metric():
    """v0003 of the demo listed `headlines 0.0` (its strict exact match); its headline figure is ROUGE-L 20.6."""
    from edgekif.cli import _version_line

    specs = {"dbpedia": {"kind": "classification", "metric": "normalized_exact_match", "max_new_tokens": 5},
             "headlines": {"kind": "generation", "metric": "rouge_l", "max_new_tokens": 23}}
    row = {"name": "v0003", "published": "2026-12-04T19:20:09+00:00", "export": {"target": "genai", "precision": "fp32"},
           "tasks": [{"name": "dbpedia"}, {"name": "headlines"}], "accuracies": {"dbpedia": 0.75, "headlines": 0.0},
           "scores": {"dbpedia": 0.8333, "headlines": 0.20566}, "task_specs": specs}
    assert _version_line(row) == "  v0003  2026-12-04T19:20:09+00:00  genai/fp32  dbpedia 83.3, headlines 20.6 rouge_l"


def test_status_live_lines_show_each_tasks_headline_metric():
    from service.status import format_status

    st = {"data_dir": "/d", "daemon": {"running": False},
          "published": {"version": "v0003", "job_id": 3, "file": "headlines.jsonl", "published_at": "t",
                        "accuracies": {"agnews": 0.75, "headlines": 0.0},
                        "headline": {"agnews": {"value": 0.7916, "metric": None}, "headlines": {"value": 0.2057, "metric": "rouge_l"}}}}
    lines = format_status(st).splitlines()
    assert "            " + f"{'agnews':<24}" + "   79.2" in lines
    assert "            " + f"{'headlines':<24}" + "   20.6  rouge_l" in lines
    # a status dict from before `headline` existed still prints its accuracies
    del st["published"]["headline"]
    assert "            " + f"{'headlines':<24}" + "    0.0" in format_status(st).splitlines()


def test_headline_figures_use_scores_only_where_specs_name_the_metric():
    from edgekif.metrics import headline_figures

    assert headline_figures({"a": 0.5}) == {"a": (0.5, None)}
    specs = {"a": {"metric": "normalized_exact_match"}, "b": {"metric": "rouge_l"}, "c": {"metric": "chrf"}}
    got = headline_figures({"a": 0.5, "b": 0.0, "c": 0.0, "old": 0.25}, {"a": 0.6, "b": 0.21}, specs)
    # c has a spec but no score (kept as measured); old has no spec (an older task: accuracies)
    assert got == {"a": (0.6, None), "b": (0.21, "rouge_l"), "c": (0.0, None), "old": (0.25, None)}
