"""Task-file reading and validation (edgekif.taskfile) and records into model inputs (edgekif.inputs)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgekif.config import DataConfig
from edgekif.inputs import (
    CUT_MARK,
    IGNORE_INDEX,
    Encoded,
    collate,
    encode_example,
    encode_prompt,
    encode_target,
    encode_task,
    fit_messages,
    fit_prompt,
    render_prompt,
)
from edgekif.errors import ValidationError
from edgekif.records import Record
from edgekif.taskfile import read_task


@pytest.fixture(scope="module")
def tok():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    p.write_bytes(content)
    return p


def jsonl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def reject(path: Path, cfg: DataConfig | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        read_task(path, cfg)
    err = info.value
    assert err.file == str(path)
    return err


ALPACA = {"instruction": "Classify the text.", "input": "A great film.", "output": "positive"}


# --------------------------------------------------------------------------- accepted shapes and formats


def test_jsonl_alpaca_with_blank_lines_and_default_ids(tmp_path):
    text = jsonl(ALPACA) + "\n   \n" + jsonl({"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Q", "output": "A"})
    task = read_task(write(tmp_path, "sentiment.jsonl", text))
    assert task.name == "sentiment" and task.format == "jsonl" and len(task) == 3
    r0, r1, r2 = task.records
    assert r0.messages == (("user", "Classify the text.\nA great film."),)
    assert r0.output == "positive"
    assert r1.messages == (("user", "Say hi."),)  # empty input adds nothing
    assert r2.messages == (("user", "Q"),)  # input is optional
    assert [r.id for r in task.records] == ["sentiment_0", "sentiment_1", "sentiment_2"]


def test_alpaca_keeps_exact_text_and_system(tmp_path):
    rec = {"instruction": "Topic?\n", "input": "  Title: X ", "output": " Film ", "system": "Be brief.", "id": 7}
    task = read_task(write(tmp_path, "t.jsonl", jsonl(rec)))
    r = task.records[0]
    assert r.messages == (("system", "Be brief."), ("user", "Topic?\n\n  Title: X "))
    assert r.output == " Film " and r.label == "Film"
    assert r.id == "7"


def test_prompt_completion(tmp_path):
    task = read_task(write(tmp_path, "pc.jsonl", jsonl({"prompt": "2+2=", "completion": "4", "id": "a"})))
    assert task.records == [Record(messages=(("user", "2+2="),), output="4", id="a")]


def test_chat_messages(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    r = read_task(write(tmp_path, "chat.jsonl", jsonl(rec))).records[0]
    assert r.messages == (("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    assert r.output == "a2"


def test_top_level_system_with_messages(tmp_path):
    rec = {"system": "S", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    r = read_task(write(tmp_path, "chat.jsonl", jsonl(rec))).records[0]
    assert r.messages == (("system", "S"), ("user", "u"))


def test_json_array_and_wrapper_object(tmp_path):
    records = [ALPACA, {"prompt": "p", "completion": "c"}]
    a = read_task(write(tmp_path, "arr.json", json.dumps(records, indent=2)))
    b = read_task(write(tmp_path, "wrapped.json", json.dumps({"data": records})))
    c = read_task(write(tmp_path, "ex.json", json.dumps({"examples": records})))
    assert a.format == b.format == c.format == "json"
    assert [r.output for r in a.records] == [r.output for r in b.records] == [r.output for r in c.records] == ["positive", "c"]
    assert [r.id for r in b.records] == ["wrapped_0", "wrapped_1"]


def test_jsonl_content_with_json_extension_is_read_as_jsonl(tmp_path):
    task = read_task(write(tmp_path, "mislabelled.json", jsonl(ALPACA, ALPACA | {"id": "x"})))
    assert task.format == "jsonl" and len(task) == 2


def test_csv_alpaca_and_prompt_completion(tmp_path):
    text = 'Instruction,input,output,id\r\n"Classify, please.","multi\nline",positive,\r\nQ2,,negative,b\r\n'
    task = read_task(write(tmp_path, "t.csv", text))
    assert task.format == "csv"
    assert task.records[0].messages == (("user", "Classify, please.\nmulti\nline"),)
    assert [r.output for r in task.records] == ["positive", "negative"]
    assert [r.id for r in task.records] == ["t_0", "b"]  # empty id cell -> default

    pc = read_task(write(tmp_path, "pc.csv", "prompt,completion,system\nhello,world,Be nice\n"))
    assert pc.records[0].messages == (("system", "Be nice"), ("user", "hello"))
    assert pc.records[0].output == "world"


@pytest.mark.parametrize(("content", "fmt"), [(jsonl(ALPACA, ALPACA | {"id": "z"}), "jsonl"), (json.dumps([ALPACA]), "json")])
def test_unknown_extension_is_sniffed(tmp_path, content, fmt):
    task = read_task(write(tmp_path, "task.txt", "  \n" + content))
    assert task.format == fmt


def test_pretty_printed_wrapper_with_unknown_extension(tmp_path):
    task = read_task(write(tmp_path, "task.txt", json.dumps({"records": [ALPACA]}, indent=2)))
    assert task.format == "json" and len(task) == 1


def test_utf8_bom_is_accepted(tmp_path):
    for name, body in [("b.jsonl", jsonl(ALPACA)), ("b.csv", "instruction,output\nQ,A\n"), ("b.json", json.dumps([ALPACA]))]:
        task = read_task(write(tmp_path, name, b"\xef\xbb\xbf" + body.encode()))
        assert len(task) == 1, name


def test_sha256_and_unicode(tmp_path):
    import hashlib

    body = jsonl({"prompt": "Übersetze: \u2028 naïve 日本", "completion": "ok"})
    p = write(tmp_path, "u.jsonl", body)
    task = read_task(p)
    assert task.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert task.records[0].messages[0][1] == "Übersetze: \u2028 naïve 日本"


def test_labels_inferred_only_for_classification(tmp_path):
    cls = [{"prompt": f"q{i}", "completion": "yes" if i % 2 else " no "} for i in range(10)]
    assert read_task(write(tmp_path, "cls.jsonl", jsonl(*cls))).labels == ["no", "yes"]
    gen = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(10)]
    assert read_task(write(tmp_path, "gen.jsonl", jsonl(*gen))).labels is None


def test_real_benchmark_file(benchmark_data):
    task = read_task(benchmark_data / "dbpedia" / "train.jsonl")
    assert len(task) == 1000 and task.format == "jsonl"
    assert task.labels is not None and len(task.labels) == 14
    assert "Educational Institution" in task.labels
    assert len({r.id for r in task.records}) == 1000


# --------------------------------------------------------------------------- malformed input


def test_bad_json_line(tmp_path):
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA, ALPACA | {"id": "b"}) + '{"instruction": "x", "output": \n' + jsonl(ALPACA))
    err = reject(p)
    assert (err.kind, err.line) == ("bad_json", 3)
    assert "line 3" in str(err)


def test_missing_output(tmp_path):
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA, {"instruction": "x", "input": "y"}))
    err = reject(p)
    assert (err.kind, err.line, err.field) == ("missing_field", 2, "output")


def test_missing_completion_and_instruction(tmp_path):
    err = reject(write(tmp_path, "a.jsonl", jsonl({"prompt": "p"})))
    assert (err.kind, err.line, err.field) == ("missing_field", 1, "completion")
    err = reject(write(tmp_path, "b.jsonl", jsonl({"input": "i", "output": "o"})))
    assert (err.kind, err.field) == ("missing_field", "instruction")


@pytest.mark.parametrize("content", ["", "  \n\n\t\n", "[]", '{"data": []}'])
def test_empty_files(tmp_path, content):
    name = "t.json" if content.startswith(("[", "{")) else "t.jsonl"
    err = reject(write(tmp_path, name, content))
    assert err.kind == "empty"


def test_csv_header_only_is_empty(tmp_path):
    assert reject(write(tmp_path, "t.csv", "instruction,output\n")).kind == "empty"


def test_binary_garbage(tmp_path):
    assert reject(write(tmp_path, "nul.jsonl", bytes(range(256)) * 8)).kind == "binary"
    rng = random.Random(0)
    garbage = bytes(rng.randrange(1, 256) for _ in range(4096))  # no NUL bytes at all
    assert reject(write(tmp_path, "noise.jsonl", garbage)).kind == "binary"


def test_invalid_utf8_reports_line_and_offset(tmp_path):
    first = jsonl(ALPACA).encode()
    second = '{"instruction": "caf'.encode() + "é".encode("latin-1") + b'", "output": "x"}\n'
    p = write(tmp_path, "t.jsonl", first + second)
    err = reject(p)
    assert (err.kind, err.line) == ("encoding", 2)
    assert err.details["byte_offset"] == len(first) + len('{"instruction": "caf')


def test_utf16_is_an_encoding_error(tmp_path):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA).encode("utf-16")))
    assert err.kind == "encoding" and "UTF-8" in err.message


def test_lone_surrogates_are_bad_records(tmp_path):
    """JSON's "\ud800" escape decodes to a lone surrogate, which no UTF-8 or SQLite write can store
    (the records, the rejection report): each such record is an `encoding` problem naming its line
    and field, collected with the others, and nothing quotes the raw surrogate. A pair is text."""
    lines = [
        jsonl(ALPACA),
        r'{"prompt": "x\ud800", "completion": "c"}' + "\n",
        r'{"qu\ud800estion": "q", "answer": "a"}' + "\n",  # a key: no shape, but named as a key
        r'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a\udfff"}]}' + "\n",
        r'{"prompt": "p", "completion": "c", "id": "i\udc00"}' + "\n",
        r'{"prompt": "p", "completion": "c", "extra": {"n\ude00": 1}}' + "\n",  # ignored keys too
        r'{"prompt": "p \ud83d\ude00", "completion": "c"}' + "\n",  # a pair: an emoji, accepted
        jsonl({"instruction": "q"}),
    ]
    err = reject(write(tmp_path, "s.jsonl", "".join(lines)))
    got = [(e.kind, e.line, e.field) for e in (err, *err.also)]
    assert got == [("encoding", 2, "prompt"), ("encoding", 3, "qu\\ud800estion"), ("encoding", 4, "messages[1].content"),
                   ("encoding", 5, "id"), ("encoding", 6, "extra.n\\ude00"), ("missing_field", 8, "output")]
    assert "'prompt' holds a lone UTF-16 surrogate '\\ud800'" in err.message
    assert "key 'qu\\ud800estion' holds a lone UTF-16 surrogate" in err.also[0].message
    report = str(err) + json.dumps(err.to_dict(), ensure_ascii=False) + json.dumps(err.to_fields(), ensure_ascii=False)
    report.encode("utf-8")  # what the daemon stores and prints: no raw surrogate
    # JSON arrays and wrapper objects name the record; the same rule for prompts.
    for name, doc in [("a.json", "[%s, %s]"), ("w.json", '{"data": [%s, %s]}')]:
        err = reject(write(tmp_path, name, doc % (json.dumps(ALPACA), r'{"prompt": "p", "completion": "c\ud800"}')))
        assert (err.kind, err.line, err.field, err.details["record"], err.more) == ("encoding", 2, "completion", 2, 0)
    from edgekif.taskfile import prompt_messages

    with pytest.raises(ValidationError) as info:
        prompt_messages({"prompt": "p\ud800"}, file="in.jsonl", line=3)
    assert (info.value.kind, info.value.line, info.value.field) == ("encoding", 3, "prompt")
    assert read_task(write(tmp_path, "ok.jsonl", lines[-2])).records[0].messages[0][1] == "p \U0001f600"


def test_too_long_integer_in_a_json_document_is_bad_json(tmp_path):
    """json raises a plain ValueError (not a JSONDecodeError) for an integer of more than 4300
    digits: a .json document (array or wrapper, or a .txt sniffed as one) is rejected as bad_json
    at the number's line, as JSONL is."""
    big = "9" * 5000
    row = '{"prompt": "a", "completion": "b", "score": %s}' % big
    for name, text in [("a.json", f"[\n{json.dumps(ALPACA)},\n{row}]"), ("w.json", f'{{"data": [\n{json.dumps(ALPACA)},\n{row}]}}'),
                       ("a.txt", f"[\n{json.dumps(ALPACA)},\n{row}]")]:
        err = reject(write(tmp_path, name, text))
        assert (err.kind, err.line, err.more) == ("bad_json", 3, 0), name
        assert err.message == f"invalid JSON at line 3 column {row.index(big) + 1}: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits", name
    err = reject(write(tmp_path, "l.jsonl", jsonl(ALPACA) + row + "\n"))
    assert (err.kind, err.line) == ("bad_json", 2) and "set_int_max_str_digits" not in err.message


def test_too_large_checked_before_reading(tmp_path):
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA) * 10)
    err = reject(p, DataConfig(max_file_bytes=100))
    assert err.kind == "too_large" and err.details["bytes"] == p.stat().st_size


def test_too_many_records(tmp_path):
    p = write(tmp_path, "t.jsonl", "".join(jsonl(ALPACA | {"id": i}) for i in range(5)))
    err = reject(p, DataConfig(max_records=3))
    assert (err.kind, err.line) == ("too_many_records", 4)
    assert len(read_task(p, DataConfig(max_records=5))) == 5
    arr = write(tmp_path, "t.json", json.dumps([ALPACA | {"id": i} for i in range(5)]))
    err = reject(arr, DataConfig(max_records=3))
    assert (err.kind, err.line) == ("too_many_records", 4) and "record 4" in err.message


def test_line_too_long(tmp_path):
    long = {"instruction": "x" * 500, "output": "y"}
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA, long))
    err = reject(p, DataConfig(max_line_bytes=200))
    assert (err.kind, err.line) == ("line_too_long", 2)
    err = reject(write(tmp_path, "t.csv", f"instruction,output\nq,a\n{'x' * 300},y\n"), DataConfig(max_line_bytes=200))
    assert (err.kind, err.line) == ("line_too_long", 3)


def test_field_too_long(tmp_path):
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA, {"instruction": "q", "input": "z" * 101, "output": "y"}))
    err = reject(p, DataConfig(max_field_chars=100))
    assert (err.kind, err.line, err.field) == ("field_too_long", 2, "input")


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"instruction": "q", "output": "  \n"}, "output"),
        ({"instruction": " ", "output": "a"}, "instruction"),
        ({"prompt": "", "completion": "a"}, "prompt"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}, "messages[1].content"),
    ],
)
def test_empty_fields(tmp_path, record, field):
    err = reject(write(tmp_path, "t.jsonl", jsonl(record)))
    assert (err.kind, err.line, err.field) == ("empty_field", 1, field)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"instruction": "q", "output": 5}, "output"),
        ({"instruction": ["q"], "output": "a"}, "instruction"),
        ({"instruction": "q", "input": 3, "output": "a"}, "input"),
        ({"prompt": "p", "completion": "c", "id": 1.5}, "id"),
        ({"prompt": "p", "completion": "c", "system": {"x": 1}}, "system"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "u"}, "oops"]}, "messages[1]"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}, "messages[0].content"),
    ],
)
def test_bad_types(tmp_path, record, field):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA, record)))
    assert (err.kind, err.line, err.field) == ("bad_type", 2, field)


def test_messages_must_end_with_user_then_assistant(tmp_path):
    last_user = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}
    err = reject(write(tmp_path, "a.jsonl", jsonl(last_user)))
    assert (err.kind, err.line, err.field) == ("bad_type", 1, "messages[1].role")
    assert "assistant" in err.message
    two_assistants = {
        "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    }
    err = reject(write(tmp_path, "b.jsonl", jsonl(two_assistants)))
    assert (err.kind, err.field) == ("bad_type", "messages[1].role")
    late_system = {
        "messages": [
            {"role": "user", "content": "u"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert reject(write(tmp_path, "c.jsonl", jsonl(late_system))).field == "messages[1].role"


def test_json_array_with_non_object_element(tmp_path):
    err = reject(write(tmp_path, "t.json", json.dumps([ALPACA, ALPACA, "just text"])))
    assert (err.kind, err.line) == ("not_object", 3)
    assert "record 3" in err.message and err.details["record"] == 3


def test_json_array_errors_name_the_record(tmp_path):
    err = reject(write(tmp_path, "t.json", json.dumps([ALPACA, {"instruction": "q"}], indent=2)))
    assert (err.kind, err.line, err.field) == ("missing_field", 2, "output")
    assert "record 2" in err.message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA) + "[1, 2]\n"))
    assert (err.kind, err.line) == ("not_object", 2)


def test_bad_json_document(tmp_path):
    err = reject(write(tmp_path, "t.json", '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": \n]'))
    assert err.kind == "bad_json" and err.line == 4
    err = reject(write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000))
    assert err.kind == "bad_json"


def test_unknown_shape_lists_accepted_shapes(tmp_path):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA, {"question": "q", "answer": "a"})))
    assert (err.kind, err.line) == ("unknown_shape", 2)
    assert "instruction" in err.message and "prompt" in err.message and "messages" in err.message


def test_unknown_format(tmp_path):
    assert reject(write(tmp_path, "t.txt", "hello world\n")).kind == "unknown_format"


def test_duplicate_ids(tmp_path):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA | {"id": "a"}, ALPACA | {"id": "b"}, ALPACA | {"id": "a"})))
    assert (err.kind, err.line, err.field) == ("duplicate_id", 3, "id")


def test_every_bad_record_is_named_in_one_error(tmp_path):
    """One read finds every bad record: the error is the first, `more` counts the others and
    `also` lists them (line, field, kind), so a user fixes the file once."""
    p = write(tmp_path, "t.jsonl", jsonl(ALPACA | {"id": "a"}, {"instruction": "x"}) + "not json\n"
              + jsonl(ALPACA | {"id": "a"}, ALPACA | {"instruction": 5}, ALPACA))
    err = reject(p)
    assert (err.kind, err.line, err.field, err.more) == ("missing_field", 2, "output", 3)
    assert [(e.kind, e.line, e.field) for e in err.also] == [("bad_json", 3, None), ("duplicate_id", 4, "id"), ("bad_type", 5, "instruction")]
    assert "already used by line 1" in err.also[1].message
    text = str(err)
    assert text.splitlines()[0] == f"{p}:line 2 (field 'output'): missing required field 'output'"
    assert text.splitlines()[1:] == ["3 more problems in this file:", "  line 3: invalid JSON: Expecting value (column 1)",
                                     "  line 4 (field 'id'): id 'a' already used by line 1", "  line 5 (field 'instruction'): 'instruction' must be a string, not a number"]
    d = json.loads(json.dumps(err.to_dict()))  # what rejected/NAME.error.json holds
    assert d["more"] == 3 and [(a["line"], a["kind"]) for a in d["also"]] == [(3, "bad_json"), (4, "duplicate_id"), (5, "bad_type")]
    assert "file" not in d["also"][0]  # the report's own file name (moved to rejected/) is not repeated
    # A rebuilt error (how a stage's child hands it to the daemon) is the same.
    again = ValidationError.from_fields(json.loads(json.dumps(err.to_fields())))
    assert str(again) == text and again.to_dict() == err.to_dict()


def test_many_bad_records_are_counted_and_the_first_listed(tmp_path):
    from edgekif.taskfile import MAX_LISTED_PROBLEMS

    p = write(tmp_path, "t.jsonl", jsonl(ALPACA, *[{"instruction": f"q{i}"} for i in range(50)]))
    err = reject(p)
    assert (err.line, err.more, len(err.also)) == (2, 49, MAX_LISTED_PROBLEMS)
    assert [e.line for e in err.also] == list(range(3, 3 + MAX_LISTED_PROBLEMS))
    assert str(err).endswith(f"... and {49 - MAX_LISTED_PROBLEMS} more")
    # A single problem reads as before.
    one = reject(write(tmp_path, "one.jsonl", jsonl(ALPACA, {"instruction": "q"})))
    assert (one.more, one.also) == (0, ()) and "\n" not in str(one) and "more" not in one.to_dict()


def test_bad_records_in_json_arrays_and_csv_are_collected_but_a_syntax_error_wins(tmp_path):
    err = reject(write(tmp_path, "t.json", json.dumps([ALPACA, "text", {"instruction": "q"}, ALPACA])))
    assert (err.kind, err.line, err.more, [(e.kind, e.line) for e in err.also]) == ("not_object", 2, 1, [("missing_field", 3)])
    err = reject(write(tmp_path, "s.json", json.dumps([ALPACA, "text", {"instruction": "q"}])[:-1] + ",]"))
    assert (err.kind, err.more) == ("bad_json", 0)  # not JSON at all: its records are not judged
    err = reject(write(tmp_path, "r.csv", "instruction,output\nq,a\nq,a,extra\nq2,\n"))
    assert [(e.kind, e.line) for e in (err, *err.also)] == [("bad_csv", 3), ("empty_field", 4)]


def test_what_stops_the_reading_is_listed_after_the_bad_records_before_it(tmp_path):
    cfg = DataConfig(max_line_bytes=200)
    p = write(tmp_path, "l.jsonl", jsonl({"instruction": "q"}, ALPACA, {"instruction": "q" * 300, "output": "a"}, {"instruction": "q"}))
    err = reject(p, cfg)
    assert [(e.kind, e.line) for e in (err, *err.also)] == [("missing_field", 1), ("line_too_long", 3)]  # line 4 is not read
    err = reject(write(tmp_path, "c.csv", 'instruction,output\nq,\nq,a\nq,"unterminated\n'))
    assert [(e.kind, e.line) for e in (err, *err.also)] == [("empty_field", 2), ("bad_csv", 4)]
    # a JSON array: too many records waits for the rest of the array, where a syntax error wins alone
    many = [ALPACA | {"id": i} for i in range(3)]
    err = reject(write(tmp_path, "m.json", json.dumps(many)[:-1] + ",]"), DataConfig(max_records=2))
    assert (err.kind, err.more) == ("bad_json", 0)
    err = reject(write(tmp_path, "n.json", json.dumps([{"instruction": "q"}, *many])), DataConfig(max_records=2))
    assert [(e.kind, e.line) for e in (err, *err.also)] == [("missing_field", 1), ("too_many_records", 4)]


def test_csv_errors(tmp_path):
    err = reject(write(tmp_path, "m.csv", "messages,id\n[],1\n"))
    assert (err.kind, err.field) == ("unknown_shape", "messages") and "JSONL" in err.message
    err = reject(write(tmp_path, "h.csv", "question,answer\nq,a\n"))
    assert (err.kind, err.line) == ("unknown_shape", 1)
    err = reject(write(tmp_path, "o.csv", "instruction,input\nq,a\n"))
    assert (err.kind, err.line, err.field) == ("missing_field", 1, "output")
    err = reject(write(tmp_path, "r.csv", 'instruction,output\nq,a\n"multi\nline",b\nq,a,extra\n'))
    assert (err.kind, err.line) == ("bad_csv", 5)
    err = reject(write(tmp_path, "e.csv", "instruction,output\nq,a\nq2,\n"))
    assert (err.kind, err.line, err.field) == ("empty_field", 3, "output")
    err = reject(write(tmp_path, "q.csv", 'instruction,output\nq,"unterminated\n'))
    assert err.kind == "bad_csv"


def test_missing_file(tmp_path):
    err = reject(tmp_path / "nope.jsonl")
    assert err.kind == "unreadable"


def test_error_is_serialisable(tmp_path):
    err = reject(write(tmp_path, "t.jsonl", jsonl(ALPACA, {"instruction": "x"})))
    d = json.loads(json.dumps(err.to_dict()))
    assert d["kind"] == "missing_field" and d["line"] == 2 and d["field"] == "output" and d["file"].endswith("t.jsonl")


# --------------------------------------------------------------------------- tokenisation


def test_prompt_uses_chat_template(tok):
    r = Record.from_prompt("hi", "yo", system="S")
    ids = encode_prompt(tok, r)
    assert tok.decode(ids) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_without_chat_template_is_plain_text(tok):
    from tiny_models import tiny_tokenizer

    plain = tiny_tokenizer()
    plain.chat_template = None
    r = Record(messages=(("system", "S"), ("user", "hi")), output="yo")
    assert plain.decode(encode_prompt(plain, r)) == "S\nhi\n"


def test_target_is_output_then_eos(tok):
    ids = encode_target(tok, Record.from_prompt("q", "Film"))
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "Film"


def test_labels_mask_exactly_the_prompt(tok):
    r = Record.from_prompt("What is 2+2?", "four")
    enc = encode_example(tok, r, max_length=256)
    prompt = encode_prompt(tok, r)
    assert not enc.truncated
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = enc.labels[len(prompt) :]
    assert IGNORE_INDEX not in answer and answer == enc.input_ids[len(prompt) :]
    assert tok.decode(answer) == "four<|im_end|>"


def test_truncation_keeps_target_and_both_ends_of_prompt(tok):
    # Issue 11 changed the rule here: the prompt's middle is cut (it was cut from the left,
    # which dropped the template's start and the instruction).
    r = Record.from_prompt("A" * 100 + "QUESTION?", "yes")
    full = encode_prompt(tok, r)
    target = encode_target(tok, r)
    enc = encode_example(tok, r, max_length=60)
    assert enc.truncated and len(enc.input_ids) == 60
    n_prompt = 60 - len(target)
    text = tok.decode(enc.input_ids[:n_prompt])
    assert enc.input_ids[:n_prompt] == fit_prompt(tok, r, 60, len(target))
    assert text.startswith("<|im_start|>user\nAAAA") and CUT_MARK in text
    assert text.endswith("QUESTION?<|im_end|>\n<|im_start|>assistant\n")
    assert enc.input_ids[:6] == full[:6] and enc.input_ids[n_prompt - 20 : n_prompt] == full[-20:]
    assert enc.input_ids[n_prompt:] == target == enc.labels[n_prompt:]
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt


def test_overlong_target_keeps_one_prompt_token(tok):
    r = Record.from_prompt("q", "z" * 50)
    full = encode_prompt(tok, r)
    enc = encode_example(tok, r, max_length=10)
    assert len(enc.input_ids) == 10 and enc.truncated
    assert enc.input_ids[0] == full[-1] and enc.labels[0] == IGNORE_INDEX
    assert tok.decode(enc.labels[1:]) == "z" * 9


def test_collate_pads_both_sides():
    a = Encoded(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = Encoded(input_ids=[8], labels=[8])
    right = collate([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = collate([a, b], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    with pytest.raises(ValueError):
        collate([a], pad_id=0, padding_side="middle")


def test_task_encode_feeds_the_model(tmp_path, tok):
    import torch
    from tiny_models import tiny_llama

    task = read_task(write(tmp_path, "t.jsonl", jsonl(ALPACA, {"prompt": "p", "completion": "longer answer here"})))
    encoded = encode_task(tok, task, max_length=64)
    assert len(encoded) == 2
    batch = collate(encoded, pad_id=tok.pad_token_id)
    model, _ = tiny_llama()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


# --------------------------------------------------------------------------- prompt fitting (issue 11)

OPTIONS = "Option: Company, Artist, Athlete, Village, Animal, Plant, Album, Film."
DBPEDIA_LIKE = {
    "instruction": f"What is the topic of the following paragraph? Choose one from the option. {OPTIONS}\n",
    "input": "Title: Seagraves High School\nText: " + "It is a school in Texas. " * 20 + "It was rated well.\n\nAnswer:",
    "output": "Educational Institution",
}


def _alpaca(tmp_path, **over) -> Record:
    return read_task(write(tmp_path, "t.jsonl", jsonl(DBPEDIA_LIKE | over))).records[0]


def _check_fitted(tok, r: Record, max_length: int) -> tuple[Encoded, str]:
    """Common promises: within max_length, the answer whole and learned, prompt = fit_prompt."""
    enc = encode_example(tok, r, max_length)
    target = encode_target(tok, r)
    n_prompt = len(enc.input_ids) - len(target)
    assert len(enc.input_ids) <= max_length
    assert enc.input_ids[n_prompt:] == target == enc.labels[n_prompt:], "the answer must never be cut"
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.input_ids[:n_prompt] == fit_prompt(tok, r, max_length, len(target)) == render_prompt(tok, fit_messages(tok, r, max_length, len(target)))
    return enc, tok.decode(enc.input_ids[:n_prompt])


def test_alpaca_fitting_cuts_the_input_middle_and_keeps_instruction_and_cue(tok, tmp_path):
    r = _alpaca(tmp_path, system="Be brief.")
    assert r.instruction_chars == len(DBPEDIA_LIKE["instruction"])
    full = encode_prompt(tok, r)
    max_length = len(full) - 200  # byte-level tokenizer: 200 characters too long
    enc, text = _check_fitted(tok, r, max_length)
    assert enc.truncated and len(enc.input_ids) == max_length  # the cut uses the whole budget
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + DBPEDIA_LIKE["instruction"])
    assert OPTIONS in text
    assert "\nTitle: Seagraves High School\nText: It is a school" in text  # the input's start
    assert CUT_MARK in text and text.endswith("It was rated well.\n\nAnswer:<|im_end|>\n<|im_start|>assistant\n")


def test_fitting_leaves_prompts_that_fit_alone(tok, tmp_path):
    r = _alpaca(tmp_path)
    full = encode_prompt(tok, r)
    target = encode_target(tok, r)
    enc = encode_example(tok, r, len(full) + len(target))
    assert not enc.truncated and enc.input_ids == full + target
    assert fit_messages(tok, r, len(full), 0) == r.chat()
    assert fit_prompt(tok, r, 4096) == full


def test_training_reserves_the_answer_budget_evaluation_reserves(tok, tmp_path):
    """With an answer budget larger than the answer, training cuts a long prompt where
    evaluation (fit_prompt with answer_tokens = the budget) cuts it: the model is trained on
    the prompt it is scored on."""
    r = _alpaca(tmp_path)
    target = encode_target(tok, r)
    max_length = len(encode_prompt(tok, r)) - 150
    budget = len(target) + 20
    enc = encode_example(tok, r, max_length, answer_budget=budget)
    n_prompt = len(enc.input_ids) - len(target)
    assert enc.input_ids[:n_prompt] == fit_prompt(tok, r, max_length, budget)  # evaluation's prompt
    assert enc.input_ids[n_prompt:] == target and enc.labels[n_prompt:] == target
    assert len(enc.input_ids) <= max_length - 20  # the budget's spare room stays free
    # a budget smaller than the answer changes nothing: the answer is never cut for the prompt
    assert encode_example(tok, r, max_length, answer_budget=1).input_ids == encode_example(tok, r, max_length).input_ids


def test_alpaca_instruction_is_cut_only_when_nothing_else_is_left(tok, tmp_path):
    r = _alpaca(tmp_path)
    enc, text = _check_fitted(tok, r, 100)  # the instruction alone is longer than 100 bytes
    assert enc.truncated and len(enc.input_ids) >= 98  # whitespace at the cut may be dropped
    assert text.startswith("<|im_start|>user\nWhat is the topic") and CUT_MARK in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_completion_fitting_keeps_start_and_end(tok):
    prompt = "Classify the sentiment. Options: good, bad.\nReview: " + "so so. " * 60 + "\nAnswer:"
    r = Record.from_prompt(prompt, "good")
    enc, text = _check_fitted(tok, r, 160)
    assert enc.truncated and len(enc.input_ids) == 160
    assert text.startswith("<|im_start|>user\nClassify the sentiment. Options: good, bad.\nReview: so so.")
    assert CUT_MARK in text and text.endswith("so so. \nAnswer:<|im_end|>\n<|im_start|>assistant\n")


def test_chat_fitting_cuts_the_longest_user_turn(tok, tmp_path):
    long_turn = "Context: " + "blah " * 80 + "Which option, a or b?"
    rec = {
        "messages": [
            {"role": "system", "content": "You answer a or b."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": long_turn},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": "a"},
        ]
    }
    r = read_task(write(tmp_path, "chat.jsonl", jsonl(rec))).records[0]
    enc, _ = _check_fitted(tok, r, 250)
    assert enc.truncated and len(enc.input_ids) == 250
    fitted = fit_messages(tok, r, 250, len(encode_target(tok, r)))
    original = r.chat()
    assert [m["role"] for m in fitted] == [m["role"] for m in original]
    cut = [i for i, (a, b) in enumerate(zip(fitted, original)) if a != b]
    assert cut == [3], "only the longest user turn is cut"
    assert fitted[3]["content"].startswith("Context: blah") and fitted[3]["content"].endswith("Which option, a or b?")
    assert CUT_MARK in fitted[3]["content"]


def test_fitting_cuts_other_turns_when_the_main_one_is_not_enough(tok):
    r = Record(messages=(("system", "S" * 300), ("user", "Q" + "U" * 50 + "?")), output="x")
    enc, text = _check_fitted(tok, r, 120)
    assert enc.truncated and len(enc.input_ids) >= 118
    system, user = fit_messages(tok, r, 120, len(encode_target(tok, r)))
    assert system["content"].startswith("SSS") and CUT_MARK in system["content"]
    assert user["content"].startswith("QUUU") and user["content"].endswith("UUU?")  # kept its ends
    assert len(user["content"]) >= 16  # MIN_KEEP_TOKENS of it (plus the mark)


def test_fitting_without_room_for_the_template_keeps_the_prompt_end(tok):
    r = Record(messages=(("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "question?")), output="ok")
    ids = fit_prompt(tok, r, 12)
    assert len(ids) == 12
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_fitting_without_chat_template(tok, tmp_path):
    from tiny_models import tiny_tokenizer

    plain = tiny_tokenizer()
    plain.chat_template = None
    r = _alpaca(tmp_path)
    enc, text = _check_fitted(plain, r, 200)
    assert enc.truncated and text.startswith(DBPEDIA_LIKE["instruction"]) and text.endswith("Answer:\n")


def test_fitted_prompts_never_split_characters(tok):
    r = Record.from_prompt("Frage: " + "Größenänderung ü日本 " * 30 + "Antwort:", "ja")
    for max_length in range(60, 90):
        _enc, text = _check_fitted(tok, r, max_length)
        assert "\ufffd" not in text and text.endswith("Antwort:<|im_end|>\n<|im_start|>assistant\n")


def test_record_json_keeps_the_instruction_boundary(tmp_path):
    r = _alpaca(tmp_path)
    back = Record.from_json(r.to_json())
    assert back.instruction_chars == r.instruction_chars > 0 and back == r
    old = Record.from_dict({"id": "x", "messages": [["user", "q"]], "output": "a"})  # stored before the field existed
    assert old.instruction_chars == 0 and "instruction_chars" not in old.to_dict()
    no_input = read_task(write(tmp_path, "n.jsonl", jsonl({"instruction": "Say hi.", "output": "hi"}))).records[0]
    assert no_input.instruction_chars == 0


def test_holdout_files_keep_records_with_unicode_line_breaks(tmp_path):
    """Record.to_json writes U+2028, U+2029 and U+0085 raw; str.splitlines() breaks on them, so
    the daemon's holdout and train files must be split on "\n" only to read back."""
    from edgekif.holdouts import read_holdout, read_holdouts, write_holdout, write_records

    texts = ["line\u2028sep", "para\u2029sep", "next\x85line", "ok"]
    records = read_task(write(tmp_path, "u.jsonl", jsonl(*({"prompt": f"p {t}", "completion": f"a {t}"} for t in texts)))).records
    path = tmp_path / "train.jsonl"
    write_records(path, records)
    assert read_holdout(path) == records
    assert [r.output for r in read_holdout(path)] == [f"a {t}" for t in texts]
    write_holdout(tmp_path / "data", "u", records, None)
    assert read_holdouts(tmp_path / "data", ["u"])[0] == {"u": records}


def test_real_dbpedia_prompts_keep_their_options(tok, benchmark_data):
    """Every dbpedia training example keeps its instruction, option list and answer cue."""
    records = read_task(benchmark_data / "dbpedia" / "train.jsonl").records
    max_length = 384  # bytes for this tokenizer: most inputs must be cut
    cut = 0
    for r in records:
        enc, text = _check_fitted(tok, r, max_length)
        cut += enc.truncated
        instruction = r.messages[-1][1][: r.instruction_chars]
        assert "Option: Company, Educational Institution" in instruction and instruction in text
        assert text.endswith("\n\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert cut > len(records) // 2


# --------------------------------------------------------------------------- chat template (issue 11)


def test_default_system_prompt_is_removed_by_rendering_check(smollm2_template):
    from edgekif.inputs import CHATML_TEMPLATE, without_default_system
    from tiny_models import tiny_tokenizer

    smol = tiny_tokenizer()
    smol.chat_template = smollm2_template
    plain = without_default_system(smol)
    assert plain == CHATML_TEMPLATE
    user = [{"role": "user", "content": "hi"}]
    shipped = smol.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert shipped.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert smol.apply_chat_template(user, chat_template=plain, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    assert smol.apply_chat_template(with_system, chat_template=plain, tokenize=False) == smol.apply_chat_template(with_system, tokenize=False)

    assert without_default_system(tiny_tokenizer()) is None  # no default system prompt: nothing to change
    other = tiny_tokenizer()
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"  # not ChatML
    assert without_default_system(other) is None
    broken = tiny_tokenizer()
    broken.chat_template = "{{ raise_exception('no') }}"
    assert without_default_system(broken) is None


@pytest.mark.integration
def test_real_smollm2_trains_without_its_default_system_prompt(smollm2, benchmark_data):
    from edgekif.model import load_tokenizer

    tok = load_tokenizer(smollm2.path)
    shipped = load_tokenizer(smollm2.path, keep_default_system=True)
    user = [{"role": "user", "content": "hi"}]
    assert "You are a helpful AI assistant named SmolLM" in shipped.decode(render_prompt(shipped, user))
    assert tok.decode(render_prompt(tok, user)) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    saved = len(render_prompt(shipped, user)) - len(render_prompt(tok, user))
    assert 15 <= saved <= 30  # the tokens the task's text gets back
    records = read_task(benchmark_data / "dbpedia" / "train.jsonl").records[:128]
    for r in records:
        enc = encode_example(tok, r, 128)
        text = tok.decode(enc.input_ids)
        assert len(enc.input_ids) <= 128 and r.messages[-1][1][: r.instruction_chars] in text and "Answer:<|im_end|>" in text
