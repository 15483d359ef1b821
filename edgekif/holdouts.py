"""The holdout files a data dir keeps per learned task: DATA_DIR/holdout/<task>.jsonl (Record
JSON lines), <task>.labels.json (the task's label set, or null) and <task>.spec.json (its
edgekif.tasks.TaskSpec: kind, metric, answer budget, decided once).

The daemon's buffer stage writes them with write_holdout (and write_spec); the export and
evaluate stages and tools/bench_quant.py read them with read_holdouts (and read_specs); their
paths come from edgekif.layout. Tasks learned before specs existed have no spec file: they
are answered and scored as before (the global budget, exact match).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .atomic import atomic_write_json, atomic_write_text
from .errors import DamagedFileError
from .layout import DataLayout
from .records import Record
from .taskfile import physical_lines

if TYPE_CHECKING:
    from .tasks import TaskSpec


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


def write_spec(data_dir: str | os.PathLike, task: str, spec: "TaskSpec") -> Path:
    """Write one task's spec beside its holdout (atomically); returns the file."""
    path = DataLayout(Path(data_dir)).spec_file(task)
    atomic_write_json(path, spec.to_dict())
    return path


def read_specs(data_dir: str | os.PathLike, tasks: Sequence[str]) -> dict[str, "TaskSpec"]:
    """The spec of each task that has a spec file (tasks learned before specs have none). A
    damaged one is a DamagedFileError naming it."""
    from .tasks import TaskSpec

    layout = DataLayout(Path(data_dir))
    out: dict[str, TaskSpec] = {}
    for task in tasks:
        path = layout.spec_file(task)
        if not path.is_file():
            continue
        try:
            out[task] = TaskSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFileError(f"not a task spec ({e!r})", file=str(path), kind="damaged_spec") from e
    return out


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
    for n, line in physical_lines(text):  # not splitlines(): records hold U+2028, U+0085 etc. raw
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
