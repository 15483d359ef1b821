"""Task files: reading and validation (turning records into model inputs is edgekif.inputs).

A task is one file. It is read and validated as a whole and trained all-or-nothing: a
problem rejects the file with a `ValidationError` naming the file, the line (or record) and
the field, plus a machine-readable `kind`. Bad records (a JSONL line that is not JSON, a
missing or mistyped field, a duplicate id, a CSV row of the wrong width, a key or string
holding a lone UTF-16 surrogate such as JSON's "\\ud800" (`encoding`)) are all found in one
read: the error is the first, and its `more` / `also` count and list (the first
MAX_LISTED_PROBLEMS) the others, so one report says what to fix. A problem that stops the
reading (size, encoding, a CSV header or quote, a line too long, too many records) is listed
after the bad records read before it; a `.json` document that is not JSON is reported alone.

File formats (chosen by extension; other extensions such as `.txt` are sniffed: a
document starting with `[` is a JSON array, one starting with `{` is JSONL):

- JSONL (`.jsonl`, `.ndjson`): one JSON object per line; blank lines are allowed.
- JSON (`.json`): a top-level array of objects, or an object holding that array under
  `"data"`, `"records"` or `"examples"` (a single record object is also accepted).
  A top-level array is parsed one element at a time (memory: the file's text plus the
  records kept, not a tree of the whole document); a wrapper object is parsed whole.
- CSV (`.csv`): a header row, then one record per row. Columns `instruction`, `output`
  and optional `input`, or `prompt`, `completion`; optional `system` and `id` columns.
  Chat `messages` cannot be written in CSV (use JSONL).

Files must be UTF-8 (a UTF-8 byte-order mark is accepted).

Record shapes (each becomes an `edgekif.records.Record`):

- Alpaca: `{"instruction": str, "input": str (optional, may be empty), "output": str}`.
  The user message is `instruction`, plus `"\\n" + input` when input is non-empty.
- Prompt/completion: `{"prompt": str, "completion": str}`.
- Chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
  The last message must be the assistant's (it is the target output) and the one before
  it the user's; everything before the last message is the prompt. A system message
  may only come first.

Every shape also accepts `"system": str` (a system message put first) and `"id"` (string
or integer; default `"<file stem>_<record index>"`, ids must be unique within a file).
Other keys are ignored.

Error kinds: `too_large`, `unreadable`, `empty`, `binary`, `encoding`, `unknown_format`,
`bad_json`, `bad_csv`, `not_object`, `unknown_shape`, `missing_field`, `bad_type`,
`empty_field`, `field_too_long`, `line_too_long`, `too_many_records`, `duplicate_id`.
`line` is the 1-based physical line for JSONL and CSV (a CSV record's first line) and
the 1-based record index for JSON arrays (then the message says "record" and
`details["record"]` is set); a JSON syntax error in a `.json` file reports its
physical line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import ValidationError
from .records import Record

MAX_LISTED_PROBLEMS = 20  # further bad records named in one error (all are counted)
_SNIFF_BYTES = 8192
_BINARY_FRACTION = 0.30  # share of control/undecodable characters above which a file is "binary"
_WRAPPER_KEYS = ("data", "records", "examples")
_ROLES = ("system", "user", "assistant")
ACCEPTED_SHAPES = (
    '{"instruction", "input"?, "output"} (Alpaca); {"prompt", "completion"}; '
    '{"messages": [{"role", "content"}, ...] ending with a user then an assistant message}; '
    'each optionally with "system" and "id"'
)
_MAX_LABELS = 50
# A lone UTF-16 surrogate: JSON's "\ud800" escape decodes to one. It is not text: every UTF-8
# or SQLite write of it (the records, the rejection report) raises UnicodeEncodeError.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how one gets into decoded UTF-8 text


# --------------------------------------------------------------------------- task files


@dataclass
class TaskFile:
    name: str  # file stem
    path: Path
    sha256: str  # of the file's raw bytes
    format: str  # "jsonl" | "json" | "csv"
    records: list[Record]
    labels: list[str] | None = None  # sorted distinct labels when the task looks like classification

    def __len__(self) -> int:
        return len(self.records)


def infer_labels(records: list[Record]) -> list[str] | None:
    """Distinct labels when the task looks like classification (few labels, each repeated)."""
    labels = {r.label for r in records}
    if labels and len(labels) <= _MAX_LABELS and len(labels) <= len(records) / 2:
        return sorted(labels)
    return None


# --------------------------------------------------------------------------- reading


def read_task(path: str | os.PathLike, cfg: DataConfig | None = None) -> TaskFile:
    """Read and validate one task file; raises ValidationError naming its problems."""
    cfg = cfg or DataConfig()
    path = Path(path)
    file = str(path)
    try:
        size = os.stat(path).st_size
        if size > cfg.max_file_bytes:
            raise _too_large(file, size, cfg)
        # Read at most one byte past the limit: the file may grow between stat and read.
        with open(path, "rb") as f:
            raw = f.read(cfg.max_file_bytes + 1)
    except OSError as e:
        raise ValidationError(f"cannot read file: {e.strerror or e}", file=file, kind="unreadable") from e
    if len(raw) > cfg.max_file_bytes:
        raise _too_large(file, len(raw), cfg)

    fmt, records = _parse(raw, path, cfg)
    return TaskFile(
        name=path.stem,
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        format=fmt,
        records=records,
        labels=infer_labels(records),
    )


def _too_large(file: str, size: int, cfg: DataConfig) -> ValidationError:
    return ValidationError(
        f"file is {size} bytes, more than the limit of {cfg.max_file_bytes} (data.max_file_bytes)",
        file=file,
        kind="too_large",
        details={"bytes": size, "limit": cfg.max_file_bytes},
    )


def _parse(raw: bytes, path: Path, cfg: DataConfig) -> tuple[str, list[Record]]:
    file = str(path)
    if not raw.strip():
        raise ValidationError("file is empty", file=file, kind="empty")
    text = _decode(raw, file)
    if not text.strip():
        raise ValidationError("file is empty", file=file, kind="empty")

    builder = _RecordBuilder(file=file, stem=path.stem, cfg=cfg, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    fmt = _detect_format(path, text)
    try:
        if fmt == "jsonl":
            _parse_jsonl(text, builder)
        elif fmt == "json":
            fmt = _parse_json(text, builder)
        else:
            _parse_csv(text, builder)
    except ValidationError as e:
        if e.kind == "bad_json":  # a JSON document that is not JSON: its records are not judged
            raise
        builder.note(e)  # what stopped the reading comes after the bad records read before it
    builder.raise_problems()
    if not builder.records:
        raise ValidationError("file holds no records", file=file, kind="empty")
    return fmt, builder.records


def _decode(raw: bytes, file: str) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValidationError(
            "file looks UTF-16 encoded; save it as UTF-8", file=file, line=1, kind="encoding", details={"byte_offset": 0}
        )
    head = raw[:_SNIFF_BYTES]
    if b"\x00" in head:
        raise ValidationError("file looks binary (contains NUL bytes), not a text task file", file=file, kind="binary")
    sample = head.decode("utf-8", errors="replace")
    odd = sum(1 for ch in sample if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\v\b") or ord(ch) == 127)
    if odd > _BINARY_FRACTION * len(sample):
        raise ValidationError("file looks binary (mostly non-text bytes), not a text task file", file=file, kind="binary")

    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ValidationError(
            f"invalid UTF-8 byte 0x{raw[offset]:02x} at byte offset {offset}; save the file as UTF-8",
            file=file,
            line=line,
            kind="encoding",
            details={"byte_offset": offset},
        ) from None


def _detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    first = text.lstrip()[:1]
    if first == "[":
        return "json"
    if first == "{":
        # One object spanning the whole document (e.g. a pretty-printed {"data": [...]})
        # is JSON; otherwise it is JSONL. A JSONL file fails this parse at its second
        # object, so the check is cheap.
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return "jsonl"
        return "json" if isinstance(doc, dict) and any(k in doc for k in _WRAPPER_KEYS) else "jsonl"
    raise ValidationError(
        f"cannot tell the format of {path.name!r}: use a .jsonl, .json or .csv extension, "
        "or start the file with '{' (JSONL) or '[' (JSON array)",
        file=str(path),
        line=1,
        kind="unknown_format",
    )


def physical_lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        yield lineno, line.removesuffix("\r")


def _check_line_length(builder: "_RecordBuilder", lineno: int, line: str) -> None:
    limit = builder.cfg.max_line_bytes
    # A str of n chars is at most 4n UTF-8 bytes: skip the encode for ordinary lines.
    if len(line) * 4 > limit and (n := len(line.encode("utf-8"))) > limit:
        raise ValidationError(
            f"line is {n} bytes, more than the limit of {limit} (data.max_line_bytes)",
            file=builder.file,
            line=lineno,
            kind="line_too_long",
            details={"bytes": n, "limit": limit},
        )


def _parse_jsonl(text: str, builder: "_RecordBuilder") -> None:
    for lineno, line in physical_lines(text):
        _check_line_length(builder, lineno, line)
        if not line.strip():
            continue
        builder.check_count(lineno, "line")
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            builder.note(ValidationError(f"invalid JSON: {_json_reason(e)}", file=builder.file, line=lineno, kind="bad_json"))
            continue
        builder.add(obj, lineno, "line")


_DECODER = json.JSONDecoder()
_JSON_WS = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]  # JSON's own " \t\n\r"


def _iter_json_array(text: str, start: int) -> Iterator[Any]:
    """The elements of the JSON array opening at text[start] ('['), one at a time.

    Equivalent to json.loads(text) on the whole document (this array plus only whitespace
    after it), including the JSONDecodeError message and position of a syntax error, but only
    one element exists as Python objects at a time: json.loads' tree of a 39 MB array took
    ~600 MB. raw_decode works on `text` at an index, so nothing is copied.
    """
    n = len(text)
    idx = _JSON_WS(text, start + 1).end()
    if idx < n and text[idx] == "]":
        idx += 1
    else:
        while True:
            try:
                obj, idx = _DECODER.raw_decode(text, idx)  # "Expecting value" etc. as json.loads
            except json.JSONDecodeError:
                raise
            except ValueError as e:  # an integer too long for int(): not a JSONDecodeError
                raise _long_number(e, text, idx) from None
            yield obj
            idx = _JSON_WS(text, idx).end()
            if idx < n and text[idx] == "]":
                idx += 1
                break
            if idx >= n or text[idx] != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, idx)
            idx = _JSON_WS(text, idx + 1).end()
    idx = _JSON_WS(text, idx).end()
    if idx != n:
        raise json.JSONDecodeError("Extra data", text, idx)


def _bad_json(e: json.JSONDecodeError, builder: "_RecordBuilder") -> ValidationError:
    return ValidationError(
        f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
        file=builder.file,
        line=e.lineno,
        kind="bad_json",
        details={"column": e.colno},
    )


def _long_number(e: ValueError, text: str, start: int) -> json.JSONDecodeError:
    """The plain ValueError (not a JSONDecodeError) json raises for an integer of more than
    sys.get_int_max_str_digits() digits, as a syntax error (bad_json, as JSONL reports it) at the
    first such run of digits from `start`."""
    limit = sys.get_int_max_str_digits()
    m = re.compile("[0-9]{%d,}" % (limit + 1)).search(text, start) if limit else None
    return json.JSONDecodeError(_json_reason(e), text, m.start() if m else start)


def _parse_json_array(text: str, start: int, builder: "_RecordBuilder") -> None:
    """A top-level array, element by element (peak memory: the records kept, not the tree).

    Reports the same error as parsing the whole document first: a syntax error anywhere wins
    over bad records and too many of them (the file is not JSON at all), so it is raised alone,
    and the rest of the array is read (and dropped) after too many records to look for one."""
    too_many: ValidationError | None = None
    try:
        for index, obj in enumerate(_iter_json_array(text, start), start=1):
            if too_many is None:
                try:
                    builder.check_count(index, "record")
                except ValidationError as e:
                    too_many = e
                    continue
                builder.add(obj, index, "record")
    except json.JSONDecodeError as e:
        raise _bad_json(e, builder) from None
    except RecursionError:
        raise ValidationError("invalid JSON: nested too deeply", file=builder.file, line=1, kind="bad_json") from None
    if too_many is not None:
        raise too_many


def _parse_json(text: str, builder: "_RecordBuilder") -> str:
    start = _JSON_WS(text, 0).end()
    if text.startswith("[", start):
        _parse_json_array(text, start, builder)
        return "json"
    # An object (wrapper or single record) or something invalid: parsed whole.
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # Several objects one after another: a JSONL file with a .json name.
            _parse_jsonl(text, builder)
            return "jsonl"
        raise _bad_json(e, builder) from None
    except ValueError as e:
        raise _bad_json(_long_number(e, text, start), builder) from None
    except RecursionError:
        raise ValidationError("invalid JSON: nested too deeply", file=builder.file, line=1, kind="bad_json") from None

    items: Any = doc
    if isinstance(doc, dict):
        wrapped = [k for k in _WRAPPER_KEYS if k in doc]
        if wrapped:
            items = doc[wrapped[0]]
            if not isinstance(items, list):
                raise ValidationError(
                    f"{wrapped[0]!r} must be an array of records, not {_type_name(items)}",
                    file=builder.file,
                    line=1,
                    field=wrapped[0],
                    kind="bad_type",
                )
        else:
            items = [doc]  # a single record
    elif not isinstance(doc, list):
        raise ValidationError(
            f"top-level JSON must be an array of records (or an object with a {'/'.join(_WRAPPER_KEYS)} array), "
            f"not {_type_name(doc)}",
            file=builder.file,
            line=1,
            kind="not_object",
        )
    for index, obj in enumerate(items, start=1):
        builder.check_count(index, "record")
        builder.add(obj, index, "record")
    return "json"


_CSV_COLUMNS = ("instruction", "input", "output", "prompt", "completion", "system", "id")


def _parse_csv(text: str, builder: "_RecordBuilder") -> None:
    file = builder.file
    for lineno, line in physical_lines(text):
        _check_line_length(builder, lineno, line)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)  # leading blank lines
        if header is None:
            raise ValidationError("CSV file has no header row", file=file, kind="empty")
        header_line = reader.line_num
        columns = [c.strip().lower() for c in header]
        dupes = sorted({c for c in columns if c and columns.count(c) > 1})
        if dupes:
            raise ValidationError(
                f"duplicate CSV column(s): {', '.join(dupes)}", file=file, line=header_line, field=dupes[0], kind="bad_csv"
            )
        if "messages" in columns:
            raise ValidationError(
                "chat 'messages' are not supported in CSV; write the task as JSONL",
                file=file,
                line=header_line,
                field="messages",
                kind="unknown_shape",
            )
        if not any(c in columns for c in ("instruction", "output", "prompt", "completion")):
            raise ValidationError(
                f"CSV header has none of the expected columns; accepted: instruction,input,output or "
                f"prompt,completion (optional system,id); found: {', '.join(columns)}",
                file=file,
                line=header_line,
                kind="unknown_shape",
            )
        for wanted in (("instruction", "output") if "instruction" in columns or "output" in columns else ("prompt", "completion")):
            if wanted not in columns:
                raise ValidationError(
                    f"CSV header lacks the {wanted!r} column", file=file, line=header_line, field=wanted, kind="missing_field"
                )

        end_line = reader.line_num
        for row in reader:
            start_line, end_line = end_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                builder.note(ValidationError(f"row has {len(row)} cells but the header has {len(columns)}", file=file,
                                             line=start_line, kind="bad_csv"))
                continue
            builder.check_count(start_line, "line")
            # CSV has no null: an empty optional cell means "absent".
            obj = {c: v for c, v in zip(columns, row) if c in _CSV_COLUMNS and not (c in ("id", "system") and v == "")}
            builder.add(obj, start_line, "line")
    except csv.Error as e:
        line = reader.line_num or 1
        if "field larger than field limit" in str(e):
            raise ValidationError(
                f"a CSV field is longer than {csv.field_size_limit()} characters",
                file=file,
                line=line,
                kind="field_too_long",
            ) from None
        raise ValidationError(f"malformed CSV: {e}", file=file, line=line, kind="bad_csv") from None


def _json_reason(e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    # A too-long integer: json's message ends with advice for programmers, not for the file's author.
    return str(e).partition("; use sys.set_int_max_str_digits()")[0]


def _is_bad_str(v: Any) -> bool:
    return isinstance(v, str) and not v.isascii() and _SURROGATE.search(v) is not None


def _find_surrogate(obj: Any) -> tuple[str, str, bool] | None:
    """(field, the key or string, whether it is a key) of the first (in document order) key or
    string in `obj`, at any depth, that holds a lone surrogate, or None. A stack, not
    recursion: json nests deeper than Python recursion allows."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            children = []
            for k, child in v.items():
                name = f"{where}.{k}" if where else str(k)
                if _is_bad_str(k):
                    return name, k, True
                children.append((name, child))
            stack.extend(reversed(children))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", v[i]) for i in reversed(range(len(v))))
        elif _is_bad_str(v):
            return where, v, False
    return None


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


# --------------------------------------------------------------------------- record normalisation


@dataclass
class _RecordBuilder:
    """Turns raw objects into Records; an invalid one is noted (raise_problems raises them
    together once the file is read) and skipped."""

    file: str
    stem: str
    cfg: DataConfig
    records: list[Record] = field(default_factory=list)
    _ids: dict[str, str] = field(default_factory=dict)  # id -> where it was first used ("line 3")
    _problems: list[ValidationError] = field(default_factory=list)
    _problem_count: int = 0
    # False when the file's text has no JSON escape of a surrogate (_SURROGATE_ESCAPE): then no
    # object can hold one and the records are not walked for them.
    surrogates: bool = True

    def note(self, e: ValidationError) -> None:
        self._problem_count += 1
        if len(self._problems) <= MAX_LISTED_PROBLEMS:  # the first, plus the ones listed with it
            self._problems.append(e)

    def raise_problems(self) -> None:
        if self._problems:
            first, *rest = self._problems
            raise replace(first, also=tuple(rest), more=self._problem_count - 1)

    def error(self, message: str, loc: int, unit: str, kind: str, field: str | None = None) -> ValidationError:
        if unit == "record":
            return ValidationError(f"record {loc}: {message}", file=self.file, line=loc, field=field, kind=kind, details={"record": loc})
        return ValidationError(message, file=self.file, line=loc, field=field, kind=kind)

    def check_count(self, loc: int, unit: str) -> None:
        if len(self.records) >= self.cfg.max_records:
            raise self.error(
                f"more than {self.cfg.max_records} records (data.max_records); split the task", loc, unit, "too_many_records"
            )

    def add(self, obj: Any, loc: int, unit: str) -> None:
        try:
            if not isinstance(obj, dict):
                raise self.error(f"expected a JSON object, got {_type_name(obj)}", loc, unit, "not_object")
            index = len(self.records)
            record = self._normalise(obj, loc, unit, index)
            if record.id in self._ids:
                raise self.error(
                    f"id {record.id!r} already used by {self._ids[record.id]}", loc, unit, "duplicate_id", "id"
                )
        except ValidationError as e:
            self.note(e)
            return
        self._ids[record.id] = f"{unit} {loc}"
        self.records.append(record)

    # -- field helpers

    def _string(self, obj: dict, key: str, loc: int, unit: str, *, name: str | None = None, required: bool = True) -> str | None:
        name = name or key
        if key not in obj or (obj[key] is None and not required):
            if required:
                raise self.error(f"missing required field {name!r}", loc, unit, "missing_field", name)
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise self.error(f"{name!r} must be a string, not {_type_name(value)}", loc, unit, "bad_type", name)
        if len(value) > self.cfg.max_field_chars:
            raise self.error(
                f"{name!r} is {len(value)} characters, more than the limit of {self.cfg.max_field_chars} (data.max_field_chars)",
                loc,
                unit,
                "field_too_long",
                name,
            )
        return value

    def _check_text(self, obj: dict, loc: int, unit: str) -> None:
        """No key or string in `obj`, at any depth, holds a lone surrogate (see _SURROGATE):
        checked before anything quotes a key."""
        found = _find_surrogate(obj) if self.surrogates else None
        if found is None:
            return
        where, text, is_key = found
        char = _SURROGATE.search(text).group()  # type: ignore[union-attr]  # _find_surrogate found one
        raise self.error(
            f"{f'key {text!r}' if is_key else repr(where)} holds a lone UTF-16 surrogate {char!r}, which is not text "
            "(a \\uXXXX escape of D800-DFFF must pair a high with a low one)",
            loc,
            unit,
            "encoding",
            # a key's surrogate escaped: the field is stored (UTF-8, SQLite) and printed
            where.encode("utf-8", "backslashreplace").decode("utf-8"),
        )

    def _non_empty(self, value: str, name: str, loc: int, unit: str) -> str:
        if not value.strip():
            raise self.error(f"{name!r} is empty", loc, unit, "empty_field", name)
        return value

    def _normalise(self, obj: dict, loc: int, unit: str, index: int) -> Record:
        messages, output, instruction_chars = self.shape(obj, loc, unit, answer=True)
        return Record(messages=messages, output=output or "", id=self._id(obj, loc, unit, index), instruction_chars=instruction_chars)

    def shape(self, obj: dict, loc: int, unit: str, *, answer: bool) -> tuple[tuple[tuple[str, str], ...], str | None, int]:
        """(prompt messages, answer, instruction_chars) of one object of any accepted shape.

        The one place where Alpaca / prompt-completion / chat objects become chat messages:
        training and evaluation records (answer=True: the answer is required) and prompts
        (answer=False: `output`/`completion` are ignored, a final assistant message is dropped).
        """
        self._check_text(obj, loc, unit)
        system = self._string(obj, "system", loc, unit, required=False)
        instruction_chars = 0
        output: str | None = None
        if "messages" in obj:
            messages, output = self._chat(obj, loc, unit, answer)
            if system:
                if messages[0][0] == "system":
                    raise self.error("both 'system' and a system message in 'messages'", loc, unit, "bad_type", "system")
                messages = (("system", system),) + messages
        elif any(k in obj for k in ("instruction", "input", "output")):
            instruction = self._non_empty(self._string(obj, "instruction", loc, unit), "instruction", loc, unit)
            extra = self._string(obj, "input", loc, unit, required=False)
            if answer:
                output = self._non_empty(self._string(obj, "output", loc, unit), "output", loc, unit)
            user = instruction + ("\n" + extra if extra else "")
            messages = ((("system", system),) if system else ()) + (("user", user),)
            if extra:  # remember where the input starts: prompt fitting cuts the input, not the instruction
                instruction_chars = len(instruction)
        elif any(k in obj for k in ("prompt", "completion")):
            prompt = self._non_empty(self._string(obj, "prompt", loc, unit), "prompt", loc, unit)
            if answer:
                output = self._non_empty(self._string(obj, "completion", loc, unit), "completion", loc, unit)
            messages = ((("system", system),) if system else ()) + (("user", prompt),)
        else:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise self.error(f"unrecognised record (keys: {keys}); accepted shapes: {ACCEPTED_SHAPES}", loc, unit, "unknown_shape")
        return messages, output, instruction_chars

    def _chat(self, obj: dict, loc: int, unit: str, answer: bool = True) -> tuple[tuple[tuple[str, str], ...], str | None]:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise self.error(f"'messages' must be an array, not {_type_name(msgs)}", loc, unit, "bad_type", "messages")
        if len(msgs) < (2 if answer else 1):
            need = "at least a user and an assistant message" if answer else "at least a user message"
            raise self.error(f"'messages' needs {need}", loc, unit, "bad_type", "messages")
        pairs: list[tuple[str, str]] = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise self.error(f"{where} must be an object, not {_type_name(m)}", loc, unit, "bad_type", where)
            role = m.get("role")
            if role not in _ROLES:
                raise self.error(
                    f"{where}.role must be one of {', '.join(_ROLES)}, not {role!r}", loc, unit, "bad_type", f"{where}.role"
                )
            if role == "system" and i != 0:
                raise self.error("a system message may only come first", loc, unit, "bad_type", f"{where}.role")
            content = self._string(m, "content", loc, unit, name=f"{where}.content")
            pairs.append((role, content))
        last = len(pairs) - 1
        if answer and pairs[last][0] != "assistant":
            raise self.error(
                f"the last message must be the assistant's answer, not {pairs[last][0]!r}",
                loc,
                unit,
                "bad_type",
                f"messages[{last}].role",
            )
        output = None
        if pairs[last][0] == "assistant":  # the answer (a task file's target); a prompt ends before it
            self._non_empty(pairs[last][1], f"messages[{last}].content", loc, unit)
            output = pairs[last][1]
            last -= 1
        if last < 0 or pairs[last][0] != "user":
            role = pairs[last][0] if last >= 0 else "nothing"
            what = "the message before the answer" if output is not None else "the last message"
            raise self.error(
                f"{what} must be the user's, not {role!r}",
                loc,
                unit,
                "bad_type",
                f"messages[{max(last, 0)}].role",
            )
        self._non_empty(pairs[last][1], f"messages[{last}].content", loc, unit)
        return tuple(pairs[: last + 1]), output

    def _id(self, obj: dict, loc: int, unit: str, index: int) -> str:
        value = obj.get("id")
        if value is None:
            return f"{self.stem}_{index}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(f"'id' must be a string or an integer, not {_type_name(value)}", loc, unit, "bad_type", "id")
        value = str(value)
        if not value.strip():
            raise self.error("'id' is empty", loc, unit, "empty_field", "id")
        if len(value) > self.cfg.max_field_chars:
            raise self.error("'id' is too long", loc, unit, "field_too_long", "id")
        return value


def prompt_messages(obj: Any, *, file: str | None = None, line: int | None = None, max_field_chars: int = DataConfig.max_field_chars) -> list[dict[str, str]]:
    """The chat messages a model is prompted with for one input object of any accepted shape.

    The same rule that makes training and evaluation records (`Record.chat()`), for prompts:
    `infer --file` and the API use it, so a model is asked exactly as it was trained.

    - a string: one user turn;
    - Alpaca `{"instruction", "input"?}`: one user turn, `instruction`, plus `"\\n" + input`
      when input is non-empty (`output` is ignored);
    - `{"prompt"}`: one user turn (`completion` is ignored);
    - `{"messages": [...]}`: the messages as given; a final assistant message is the answer
      of a task file and is dropped, so the prompt ends with a user turn;
    - `"system"` (any object shape): a system message put first.
    No default system prompt is added (edgekif.model.load_tokenizer drops SmolLM2's).
    Raises ValidationError naming file, line and field (`kind` as for task files).
    """
    builder = _RecordBuilder(file=file or "<input>", stem="", cfg=DataConfig(max_field_chars=max_field_chars))
    loc = line if line is not None else 1
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise ValidationError(f"expected a string or a JSON object, got {_type_name(obj)}", file=file, line=line, kind="not_object")
    try:
        messages, _output, _ = builder.shape(obj, loc, "line", answer=False)
    except ValidationError as e:
        if line is None or file is None:  # no place to name: report only what was given
            e = ValidationError(e.message, file=file, line=line, field=e.field, kind=e.kind, details=e.details)
        raise e from None
    return [{"role": r, "content": c} for r, c in messages]
