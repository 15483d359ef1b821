"""`edgekif check FILE...`: what the daemon would do with a task file, changing nothing.

The same reading, spec and split as the validate and buffer stages (edgekif.taskfile,
edgekif.tasks.read_task_spec with the sidecar beside the file, split_holdout on the file's
SHA-256), and the answer budget the train stage would decide from the training split, with the
base's tokenizer when the base is converted (a check never converts it). So a user learns
before dropping a file whether it is valid (every bad record at once), which kind, metric and
budget judge it, and how many records train and judge it, and, against the data dir's state.db
when there is one (read-only), whether its bytes were dropped before (the daemon sets such a
file aside before reading it) and which task name it would get.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from edgekif.config import Config
from edgekif.layout import DataLayout

from .jobs import known_file, unique_task_name

log = logging.getLogger(__name__)


def _state(cfg: Config, sha256: str, stem: str) -> tuple[dict[str, Any] | None, str]:
    """(the earlier file with these bytes, or None; the task name a new file NAME would get),
    read from state.db without writing (a data dir the user may only read, a running daemon)."""
    import sqlite3

    path = DataLayout(cfg.data_path).state_db
    if not path.is_file():
        return None, stem
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            conn.row_factory = sqlite3.Row
            known = known_file(conn, sha256)
            duplicate_of = None if known is None else {"file": known.name, "job": known.job.id if known.job else None,
                                                       "state": known.job.state if known.job else None}
            return duplicate_of, unique_task_name(conn, stem)
        finally:
            conn.close()
    except sqlite3.Error as e:  # e.g. a WAL database in a folder this user cannot write
        log.warning("cannot read %s: duplicates and task names not checked (%s)", path, e)
        return None, stem


def describe_task_file(cfg: Config, path: Path) -> dict[str, Any]:
    """The daemon's view of one task file: a duplicate (set aside before it is read), else its
    spec, budget and split (ValidationError, as the daemon would reject it)."""
    from edgekif.atomic import sha256_file
    from edgekif.metrics import GENERATION
    from edgekif.tasks import read_task_spec, sidecar_path
    from edgekif.taskfile import read_task

    from .edgekif_stages import holdout_share, holdout_size, split_holdout

    try:
        duplicate_of, task = _state(cfg, sha256_file(path), path.stem)
    except OSError:  # unreadable: read_task says so, as the daemon would (ValidationError)
        duplicate_of, task = None, path.stem
    if duplicate_of is not None:
        return {"file": str(path), "task": None, "duplicate_of": duplicate_of}
    data = read_task(path, cfg.data)
    spec = read_task_spec(path, data.records)
    n_hold = holdout_size(cfg.service, spec.kind, len(data.records))
    holdout, train = split_holdout(data.records, data.sha256, n_hold)
    budget, budget_from = spec.max_new_tokens, "stated in the sidecar"
    if budget is None:
        budget, budget_from = _budget(cfg, train, spec.kind)
    fraction, cap = holdout_share(cfg.service, spec.kind)
    warnings = []
    if n_hold < cap and fraction > 0:
        warnings.append(f"only {n_hold} records are held out to judge it ({cap} from a file of {round(cap / fraction)} or more): "
                        "the gate's paired test has less to decide on"
                        + (" (free text: a gain of a few ROUGE-L points needs ~100)" if spec.kind == GENERATION else ""))
    return {
        "file": str(path),
        "task": task,
        "duplicate_of": None,
        "format": data.format,
        "records": len(data.records),
        "sha256": data.sha256,
        "sidecar": str(sidecar_path(path)) if sidecar_path(path).is_file() else None,
        "spec": {**spec.to_dict(), "max_new_tokens": budget},
        "budget_from": budget_from,
        "labels": dict(Counter(r.label for r in data.records).most_common()) if data.labels else None,
        "holdout": len(holdout),
        "train": len(train),
        "warnings": warnings,
    }


def _budget(cfg: Config, train, kind: str) -> tuple[int | None, str]:
    """(the answer budget the train stage would decide, where it comes from)."""
    from edgekif.model import converted_base, known_base_of, load_tokenizer
    from edgekif.tasks import answer_budget
    from edgekif.workflow import cache_root

    folder = converted_base(cfg.model, cache_root(cfg))
    if folder is None:
        return None, "decided when its job trains: the base is not converted yet (`edgekif model prepare`)"
    tokenizer = load_tokenizer(folder, chat_template=cfg.model.chat_template)
    known = known_base_of(cfg.model.base)
    name = known.name if known is not None else Path(cfg.model.base).expanduser().name
    return answer_budget(tokenizer, train, kind), f"from the training split's answers, in {name}'s tokens"


def format_description(d: dict[str, Any]) -> str:
    if (dup := d.get("duplicate_of")) is not None:
        return (f"{d['file']}: would be set aside as a duplicate: the same bytes were dropped before as {dup['file']!r}"
                + (f" (job {dup['job']}, {dup['state']})" if dup["job"] is not None else ""))
    spec = d["spec"]
    source = f"stated in {Path(d['sidecar']).name}" if spec["source"] == "sidecar" else "detected from the answers"
    budget = f"{spec['max_new_tokens']} new tokens" if spec["max_new_tokens"] is not None else "not decided yet"
    lines = [
        f"{d['file']}: valid, {d['records']} records ({d['format']}), task {d['task']!r}",
        f"  kind:    {spec['kind']} ({source}); judged by {spec['metric']}"
        + (f" (stated in {Path(d['sidecar']).name})" if "metric" in spec["stated"] and d["sidecar"] else ""),
        f"  budget:  {budget} ({d['budget_from']})",
        f"  split:   {d['holdout']} held out to judge it, {d['train']} to train on",
    ]
    if d["labels"]:
        shown = list(d["labels"].items())[:8]
        more = len(d["labels"]) - len(shown)
        lines.append(f"  labels:  {len(d['labels'])}: " + ", ".join(f"{k!r} {n}" for k, n in shown) + (f", ... {more} more" if more else ""))
    lines += [f"  warning: {w}" for w in d["warnings"]]
    return "\n".join(lines)
