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
    "jobs_held_total": ("Jobs held back by the gate (or superseded by a newer model before publishing).", ("held",)),
}


def version_number(version: str | None) -> float | None:
    """'v12' / '12' / '2025-...-v12' -> 12.0 (the last number in the string)."""
    if not version:
        return None
    nums = re.findall(r"\d+", version)
    return float(nums[-1]) if nums else None


def render(store: JobStore, *, training: bool = False, prefix: str = "edgekif_") -> str:
    """The textfile, in Prometheus' exposition format as its reference library writes it (full
    float precision: a `:g` format had rounded 1,000,004.5 training seconds to 1e+06)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: list[Any] = []
    for name, (help_, kinds) in COUNTERS.items():
        families.append(CounterMetricFamily(prefix + name.removesuffix("_total"), help_, value=store.count_events(*kinds)))
    families.append(CounterMetricFamily(prefix + "training_seconds", "Wall-clock seconds spent in the train stage.",
                                        value=round(store.sum_event_field("train_run", "seconds"), 3)))
    families.append(GaugeMetricFamily(prefix + "queue_length", "Jobs not yet in a terminal state.", value=len(store.queue())))
    from edgekif.publish import ModelStore  # torch-free

    current = version_number(ModelStore(store.path.parent).current())  # models/current, a job's or not (state.db is in the data dir)
    families.append(GaugeMetricFamily(prefix + "current_version", "Number of the published model version (0 = none).", value=current or 0))
    families.append(GaugeMetricFamily(prefix + "training", "1 while the train stage runs.", value=1 if training else 0))

    class _Collected:
        def collect(self) -> Any:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry).decode("utf-8")


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
