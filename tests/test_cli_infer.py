"""`edgekif infer --file` prompt parsing (errors name file, line, field) and `edgekif models list` lines."""

from __future__ import annotations

import pytest

from edgekif.cli import _read_prompts
from edgekif.errors import ValidationError


def test_prompt_file_accepts_strings_and_objects(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"plain"\n\n{"prompt": "p"}\n{"messages": [{"role": "user", "content": "m"}]}\n{"input": "i"}\n')
    assert _read_prompts(str(f)) == ["plain", "p", [{"role": "user", "content": "m"}], "i"]


@pytest.mark.parametrize(
    "text, line, field, kind",
    [('"ok"\n{oops\n', 2, None, "bad_json"), ('"ok"\n"ok"\n{"text": "x"}\n', 3, "prompt", "missing_field"), ("[1]\n", 1, "prompt", "missing_field")],
)
def test_bad_prompt_file_names_the_line(tmp_path, text, line, field, kind):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(ValidationError) as ei:
        _read_prompts(str(f))
    e = ei.value
    assert (e.file, e.line, e.field, e.kind) == (str(f), line, field, kind)
    assert str(f) in str(e)


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
