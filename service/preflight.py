"""`edgekif check FILE...`: what the daemon would do with a task file, changing nothing.

The same reading, spec and split as the validate and buffer stages (edgekif.taskfile,
edgekif.tasks.read_task_spec with the sidecar beside the file, split_holdout on the file's
SHA-256), and the answer budget the train stage would decide from the training split, with the
base's tokenizer when the base is converted (a check never converts it). So a user learns
before dropping a file whether it is valid (every bad record at once), which kind, metric and
budget judge it, and how many records train and judge it, and, against the data dir's state.db
when there is one, which task name the file would get and whether its bytes were dropped before.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgekif.config import Config
from edgekif.layout import DataLayout

from .jobs import JobStore


def describe_task_file(cfg: Config, path: Path) -> dict[str, Any]:
    """The daemon's view of one task file (ValidationError, as the daemon would reject it)."""
    from edgekif.metrics import GENERATION
    from edgekif.tasks import read_task_spec, sidecar_path
    from edgekif.taskfile import read_task

    from .edgekif_stages import holdout_size, split_holdout

    data = read_task(path, cfg.data)
    spec = read_task_spec(path, data.records)
    n_hold = holdout_size(cfg.service, spec.kind, len(data.records))
    holdout, train = split_holdout(data.records, data.sha256, n_hold)
    budget, budget_from = spec.max_new_tokens, "stated in the sidecar"
    if budget is None:
        budget, budget_from = _budget(cfg, train, spec.kind)
    generation = spec.kind == GENERATION
    cap = cfg.service.generation_holdout_max if generation else cfg.service.holdout_max
    fraction = cfg.service.generation_holdout_fraction if generation else cfg.service.holdout_fraction
    warnings = []
    if n_hold < cap and fraction > 0:
        warnings.append(f"only {n_hold} records are held out to judge it ({cap} from a file of {round(cap / fraction)} or more): "
                        "the gate's paired test has less to decide on"
                        + (" (free text: a gain of a few ROUGE-L points needs ~100)" if generation else ""))
    task, duplicate_of = path.stem, None
    layout = DataLayout(cfg.data_path)
    if layout.state_db.is_file():
        with JobStore(layout.state_db) as store:
            task = store.task_name_for(path.stem)
            if (known := store.known_file(data.sha256)) is not None:
                task = None  # set aside, not a task
                duplicate_of = {"file": known.name, "job": known.job.id if known.job else None, "state": known.job.state if known.job else None}
                warnings.insert(0, f"the same bytes were dropped before as {known.name!r}"
                                + (f" (job {known.job.id}, {known.job.state})" if known.job else "")
                                + ": the daemon would set this file aside as a duplicate")
    return {
        "file": str(path),
        "task": task,
        "duplicate_of": duplicate_of,
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
    from edgekif.errors import ModelError
    from edgekif.model import load_tokenizer, resolve_base
    from edgekif.tasks import answer_budget
    from edgekif.workflow import cache_root

    try:
        base = resolve_base(cfg.model, cache_root(cfg), convert=False)
    except ModelError as e:
        return None, f"decided when its job trains ({e})"
    tokenizer = load_tokenizer(base.path, chat_template=cfg.model.chat_template)
    return answer_budget(tokenizer, train, kind), f"from the training split's answers, {base.name} tokens"


def format_description(d: dict[str, Any]) -> str:
    spec = d["spec"]
    source = f"stated in {Path(d['sidecar']).name}" if spec["source"] == "sidecar" else "detected from the answers"
    budget = f"{spec['max_new_tokens']} new tokens" if spec["max_new_tokens"] is not None else "not decided yet"
    lines = [
        f"{d['file']}: valid, {d['records']} records ({d['format']}), " + (f"task {d['task']!r}" if d["task"] else "a duplicate"),
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
