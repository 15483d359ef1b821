"""`edgekif infer --file`: prompt file parsing (errors name file, line, field)."""

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
