"""The holdout files a data dir keeps per learned task: DATA_DIR/holdout/<task>.jsonl (Record
JSON lines) and <task>.labels.json (the task's label set, or null).

The daemon's buffer stage writes them with write_holdout; the export and evaluate stages and
tools/bench_quant.py read them with read_holdouts; their paths come from edgekif.layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .atomic import atomic_write_json, atomic_write_text
from .errors import DamagedFileError
from .layout import DataLayout
from .records import Record


def write_records(path: Path, records: Sequence[Record]) -> None:
    atomic_write_text(path, "".join(r.to_json() + "\n" for r in records))


def write_holdout(data_dir: str | os.PathLike, task: str, records: Sequence[Record], labels: Sequence[str] | None) -> Path:
    """Write one task's holdout and label set (atomically); returns the holdout file."""
    layout = DataLayout(Path(data_dir))
    path = layout.holdout_file(task)
    write_records(path, records)
    atomic_write_json(layout.labels_file(task), {"labels": labels})
    return path


def read_holdouts(data_dir: str | os.PathLike, tasks: Sequence[str], *, max_examples: int = 0) -> tuple[dict[str, list[Record]], dict[str, list[str] | None]]:
    """The holdout records (the first `max_examples`, 0 = all) and label set of each task that
    has a non-empty holdout file; tasks without one are left out of both."""
    records: dict[str, list[Record]] = {}
    labels: dict[str, list[str] | None] = {}
    layout = DataLayout(Path(data_dir))
    for task in tasks:
        path = layout.holdout_file(task)
        if path.is_file() and (recs := read_holdout(path)):
            records[task] = recs[: max_examples or None]
            lab = layout.labels_file(task)
            labels[task] = json.loads(lab.read_text()).get("labels") if lab.is_file() else None
    return records, labels


def read_holdout(path: str | os.PathLike) -> list[Record]:
    """A holdout file as the daemon writes it (Record JSON lines). The daemon's own file, but
    it lives on disk for weeks: a damaged or hand-edited one is a ValidationError naming the
    file, line and field (DamagedFileError), not a bare JSON or KeyError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"not UTF-8 text ({e.reason})", file=str(path), kind="damaged_holdout") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise DamagedFileError(f"not a JSON record ({e})", file=str(path), line=n, kind="damaged_holdout") from e
        if not isinstance(d, dict):
            raise DamagedFileError(f"a record must be a JSON object, got {type(d).__name__}", file=str(path), line=n, kind="damaged_holdout")
        for field in ("messages", "output"):
            if field not in d:
                raise DamagedFileError("missing", file=str(path), line=n, field=field, kind="damaged_holdout")
        try:
            out.append(Record.from_dict(d))
        except (TypeError, ValueError) as e:
            raise DamagedFileError(f"malformed record ({e})", file=str(path), line=n, field="messages", kind="damaged_holdout") from e
    return out
