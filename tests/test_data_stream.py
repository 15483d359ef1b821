"""A top-level JSON array is validated element by element (edgekif.taskfile._parse_json_array):
same records and the same errors as parsing the whole document first, without its tree."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from edgekif import taskfile
from edgekif.config import DataConfig
from edgekif.taskfile import read_task
from edgekif.errors import ValidationError


def whole_document(path: Path, cfg: DataConfig | None = None):
    """What _parse_json did for an array before streaming: json.loads, then each record."""
    cfg = cfg or DataConfig()
    text = path.read_bytes().decode("utf-8")
    builder = taskfile._RecordBuilder(file=str(path), stem=path.stem, cfg=cfg)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValidationError(
            f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", file=str(path), line=e.lineno, kind="bad_json", details={"column": e.colno}
        ) from None
    except RecursionError:
        raise ValidationError("invalid JSON: nested too deeply", file=str(path), line=1, kind="bad_json") from None
    assert isinstance(doc, list)
    for index, obj in enumerate(doc, start=1):
        builder.check_count(index, "record")
        builder.add(obj, index, "record")
    builder.raise_problems()
    if not builder.records:
        raise ValidationError("file holds no records", file=str(path), kind="empty")
    return builder.records


def outcome(fn, *args):
    try:
        result = fn(*args)
        return ("ok", getattr(result, "records", result))
    except ValidationError as e:
        return ("error", e.to_dict())


def records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        label = rnd.choice(["World", "Sports", "Business", "Sci/Tech"])
        shape = i % 3
        if shape == 0:
            out.append({"instruction": f"Classify news item {i}: " + "word " * rnd.randint(1, 30), "input": "" if i % 2 else "ctx é ✓", "output": label})
        elif shape == 1:
            out.append({"prompt": f"p{i} \u2028 line sep", "completion": label, "id": i})
        else:
            out.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": label}]})
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "big.json"
    text = json.dumps(records(20_000), indent=2, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path, text


def test_large_array_gives_the_same_records_as_the_whole_document(big):
    path, _ = big
    task = read_task(path)
    assert task.format == "json" and len(task) == 20_000
    assert task.records == whole_document(path)
    assert task.labels == ["Business", "Sci/Tech", "Sports", "World"]


def test_large_array_keeps_only_the_records(big):
    """Peak memory beyond the records kept (and the text, which exists before) is one
    element, not json.loads' tree (~10 MB for these 20k records)."""
    path, text = big
    cfg = DataConfig()

    def transient(parse) -> tuple[int, int]:
        builder = taskfile._RecordBuilder(file=str(path), stem=path.stem, cfg=cfg)
        tracemalloc.start()
        try:
            parse(builder)
            kept, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(builder.records) == 20_000
        return peak - kept, kept

    def old(builder):
        for index, obj in enumerate(json.loads(text), start=1):
            builder.check_count(index, "record")
            builder.add(obj, index, "record")

    extra_new, kept = transient(lambda b: taskfile._parse_json(text, b))
    extra_old, _ = transient(old)
    assert extra_old > 5_000_000  # the tree the old path built (sanity of the measurement)
    assert extra_new < 1_000_000 and extra_new < extra_old / 10, (extra_new, extra_old, kept)


def test_malformed_element_deep_in_a_large_array_names_its_physical_line(big, tmp_path):
    _, text = big
    # Break record 15 000 (a missing ':' after its first key).
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == "  {"]
    bad_line = starts[15_000 - 1] + 2  # 1-based number of the line after "  {"
    key_line = lines[bad_line - 1]
    assert key_line.startswith('    "') and '": ' in key_line
    lines[bad_line - 1] = key_line.replace('": ', '" ', 1)
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        read_task(path)
    err = info.value
    assert (err.kind, err.line, err.file) == ("bad_json", bad_line, str(path))
    assert err.message.startswith(f"invalid JSON at line {bad_line} column ") and "Expecting ':' delimiter" in err.message
    assert outcome(read_task, path)[1] == outcome(whole_document, path)[1]


def test_bad_record_deep_in_a_large_array_names_the_record(big, tmp_path):
    _, text = big
    doc = json.loads(text)
    del doc[17_321]["messages" if "messages" in doc[17_321] else "output" if "output" in doc[17_321] else "completion"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    err = outcome(read_task, path)[1]
    assert err == outcome(whole_document, path)[1]
    assert err["line"] == 17_322 and err["details"] == {"record": 17_322} and err["kind"] in ("missing_field", "unknown_shape")


MALFORMED = [
    "[",
    "[ ",
    "[{\"prompt\": \"a\", \"completion\": \"b\"}",
    "[{\"prompt\": \"a\", \"completion\": \"b\"},",
    "[{\"prompt\": \"a\", \"completion\": \"b\"},]",
    "[{\"prompt\": \"a\", \"completion\": \"b\"} {\"prompt\": \"c\", \"completion\": \"d\"}]",
    "[{\"prompt\": \"a\", \"completion\": \"b\"}]]",
    "[{\"prompt\": \"a\", \"completion\": \"b\"}] x",
    "[{\"prompt\": \"a\", \"completion\": \"b\"}]\n\n  \n",
    "  \n[\n]\n",
    "[]",
    "[,]",
    "[{\"prompt\": \"a\"\n, \"completion\": \"b\",}]",
    "[1, {\"prompt\": \"a\", \"completion\": \"b\"}]",
    "[{\"prompt\": \"a\", \"completion\": 5}, {\"prompt\": ]",  # bad record, then a syntax error: the syntax error wins
    "[{\"prompt\": \"a\", \"completion\": \"b\"}, {\"prompt\": \"a\", \"completion\": \"b\", \"id\": \"x\"}, {\"id\": \"x\", \"prompt\": \"q\", \"completion\": \"r\"}]",
    "[\"\\ud800\", tru]",
    "[" + "[" * 100_000 + "]" * 100_000 + "]",
    "[{\"prompt\": \"a\", \"completion\": \"b\"}\r\n,\t{\"prompt\": \"c\", \"completion\": NaN}]",
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_same_outcome_as_the_whole_document(tmp_path, text):
    path = tmp_path / "t.json"
    path.write_text(text, encoding="utf-8")
    assert outcome(read_task, path) == outcome(whole_document, path)


def test_too_many_records_in_a_streamed_array(tmp_path):
    path = tmp_path / "many.json"
    path.write_text(json.dumps(records(30)), encoding="utf-8")
    cfg = DataConfig(max_records=25)
    got = outcome(read_task, path, cfg)
    assert got == outcome(whole_document, path, cfg)
    assert got[1]["kind"] == "too_many_records" and got[1]["line"] == 26
