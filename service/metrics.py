"""Prometheus textfile metrics (for node_exporter's textfile collector).

Counters are computed from state.db's event log rather than kept in memory, so they stay
monotonic across daemon restarts, which is what Prometheus expects of a `_total`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from edgekif.atomic import mkstemp_public

from .jobs import JobStore


def replace_text(path: str | Path, text: str) -> None:
    """Atomic (a reader sees the old or the new content) but not fsynced: for files that are
    rewritten often and are worthless after a power cut anyway (metrics, progress,
    daemon.json). Skipping fsync spares the flash storage of small boxes. The file gets the
    umask-derived mode (0640 under UMask=0027), not mkstemp's 0600: node_exporter and
    `edgekif status` run as other users."""
    path = Path(path)
    fd, tmp = mkstemp_public(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def json_text(obj: Any) -> str:
    """The text of the small JSON files the daemon rewrites (replace_json)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def replace_json(path: str | Path, obj: Any) -> None:
    replace_text(path, json_text(obj))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A file written by replace_json, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

# name -> (help, event kinds counted)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "files_received_total": ("Files taken from the inbox (accepted, duplicate or rejected).", ("received", "duplicate", "inbox_rejected")),
    "files_rejected_total": ("Files moved to rejected/ (bad input, unsafe file type, duplicate).", ("rejected", "duplicate", "inbox_rejected")),
    "files_duplicate_total": ("Files whose bytes had been received before.", ("duplicate",)),
    "jobs_published_total": ("Jobs whose model was published.", ("published",)),
    "jobs_failed_total": ("Jobs that failed after retries.", ("failed",)),
    "jobs_held_total": ("Jobs held back by the forgetting gate.", ("held",)),
}


def version_number(version: str | None) -> float | None:
    """'v12' / '12' / '2025-...-v12' -> 12.0 (the last number in the string)."""
    if not version:
        return None
    nums = re.findall(r"\d+", version)
    return float(nums[-1]) if nums else None


def render(store: JobStore, *, training: bool = False, prefix: str = "edgekif_") -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.append(f"# HELP {prefix}{name} {help_}")
        lines.append(f"# TYPE {prefix}{name} {kind}")
        lines.append(f"{prefix}{name} {value:g}")

    for name, (help_, kinds) in COUNTERS.items():
        metric(name, "counter", help_, store.count_events(*kinds))
    metric("training_seconds_total", "counter", "Wall-clock seconds spent in the train stage.", round(store.sum_event_field("train_run", "seconds"), 3))
    metric("queue_length", "gauge", "Jobs not yet in a terminal state.", len(store.queue()))
    published = store.live()
    current = version_number(published.version) if published else None
    metric("current_version", "gauge", "Number of the published model version (0 = none).", current or 0)
    metric("training", "gauge", "1 while the train stage runs.", 1 if training else 0)
    return "\n".join(lines) + "\n"


class MetricsWriter:
    """Writes the textfile atomically, and only when its content changed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last: str | None = None

    def write(self, store: JobStore, *, training: bool = False) -> bool:
        text = render(store, training=training)
        if text == self._last:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(self.path, text)
        self._last = text
        return True
