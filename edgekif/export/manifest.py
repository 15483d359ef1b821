"""manifest.json: what an export folder holds (every file's SHA-256) and what it was measured at.

The only code that knows the file's keys. Everyone else reads a `Manifest`'s fields:

  write_manifest(folder, target=..., accuracies=..., parity=..., ...)   # hashes every file, atomically
  read_manifest(folder)      -> Manifest   # IntegrityError when missing, not JSON or without files
  verify_manifest(folder)    -> Manifest   # and every listed file matches its SHA-256

Keys this version does not know (a benchmark's `note`, a newer version's additions) are kept
in `Manifest.other` and written back as they were; manifests written before a key existed read
with that field empty.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_write_json, sha256_file
from ..errors import ExportError, IntegrityError
from .files import MANIFEST, read_export_info, runtime_versions

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1

# Written only when set (older manifests and fake exports lack them).
_OPTIONAL = ("adapter", "accuracies_measured_by", "evaluation", "reference", "parity", "parity_rejected", "parity_skipped", "job_id", "task_specs",
             "scores", "general_ability", "gate", "published")


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]  # path relative to the folder -> sha256
    format: int = MANIFEST_FORMAT
    created: str | None = None  # UTC ISO
    base_model: dict[str, Any] = field(default_factory=dict)  # {"id", "sha256"}
    adapter_sha256: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)  # learned tasks, in learning order
    accuracies: dict[str, float] = field(default_factory=dict)  # the export's own exact match per task
    # {"target", "precision", "execution_provider"}, and for genai exports "session_options"
    # (the decoder's threads, as in its genai_config.json) and "logits" (which positions the
    # graph returns: edgekif.export.lm_head); both absent in older manifests
    export: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # onnxruntime(-genai) versions at build time
    adapter: dict[str, Any] | None = None  # the published peft adapter (path, LoRA shape, base)
    accuracies_measured_by: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None  # per task: n, exact_match, the first answers
    reference: dict[str, Any] | None = None  # the fp32 PyTorch model's figures
    parity: dict[str, Any] | None = None  # the answer check of the published variant
    parity_rejected: list[dict[str, Any]] | None = None  # variants tried before it and why they failed
    parity_skipped: list[dict[str, Any]] | None = None  # variants not tried: rejected on recent jobs (edgekif.export.history)
    job_id: int | None = None  # the daemon job that made it
    # per task: {"kind", "metric", "max_new_tokens" (the budget it was answered with), "source"}
    # (edgekif.tasks.TaskSpec); None in manifests written before task specs, or without them
    task_specs: dict[str, dict[str, Any]] | None = None
    scores: dict[str, float] | None = None  # per task: its headline metric (task_specs' metric) on this export
    # how far this export's answers to the general prompts drifted from the base's own
    # (edgekif.general_ability.DriftFigures.to_dict, plus the bound and the verdict)
    general_ability: dict[str, Any] | None = None
    # the daemon's gate: each decision's figures (paired test, interval, n) and its verdict
    gate: dict[str, Any] | None = None
    # UTC ISO: when ModelStore.publish made the export a version (None: not published, or a
    # version published before this was recorded)
    published: str | None = None
    other: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def target(self) -> str | None:
        return (self.export or {}).get("target")

    @property
    def precision(self) -> str | None:
        return (self.export or {}).get("precision")

    @property
    def execution_provider(self) -> str | None:
        return (self.export or {}).get("execution_provider")

    @property
    def published_at(self) -> str | None:
        """A version's publish time, the one every listing shows (`models list`, `status`):
        `published`, else `created` (the export's time) for versions published before it was recorded."""
        return self.published or self.created

    @property
    def session_options(self) -> dict[str, Any]:
        """The decoder session options its genai_config.json carries ({} for older manifests)."""
        return dict((self.export or {}).get("session_options") or {})

    @property
    def threads(self) -> int | None:
        """The decoder's intra-op CPU threads; None when not recorded (older manifests, onnx target)."""
        n = self.session_options.get("intra_op_num_threads")
        return int(n) if isinstance(n, int) else None

    @property
    def builder_options(self) -> dict[str, str]:
        """The builder --extra_options of the published variant ({} for older manifests)."""
        return dict((self.parity or {}).get("builder_options") or {})

    @property
    def export_settings(self) -> dict[str, Any]:
        """How this export was built (target, precision, execution provider, builder options):
        what an export of the untrained base must share to be compared like for like."""
        return {"target": self.target, "precision": self.precision, "execution_provider": self.execution_provider,
                "builder_options": self.builder_options}

    @property
    def base_model_id(self) -> str | None:
        return (self.base_model or {}).get("id")

    @property
    def base_model_sha256(self) -> str | None:
        return (self.base_model or {}).get("sha256")

    def record_scores(self, task: str) -> tuple[str, list[float], str] | None:
        """(metric, per-record headline scores, the records' SHA-256) of a task on this export,
        for paired comparisons; None when not recorded (older manifests)."""
        ev = (self.evaluation or {}).get(task) or {}
        if ev.get("metric") and isinstance(ev.get("scores"), list) and ev.get("records_sha256"):
            return ev["metric"], [float(x) for x in ev["scores"]], ev["records_sha256"]
        return None

    @property
    def rejected_variants(self) -> list[str]:
        """Each variant built, checked and not shipped, in the order tried: `variant (the check's reasons)`."""
        return [f"{r.get('variant') or r.get('precision')} ({'; '.join(r.get('reasons') or []) or 'failed the answer check'})"
                for r in self.parity_rejected or []]

    @property
    def skipped_variants(self) -> list[str]:
        """Each variant not built for this version: `variant (why)` (older manifests have no reason: the history's)."""
        return [f"{x.get('variant')} ({x.get('reason', 'rejected on recent jobs of this base')})" for x in self.parity_skipped or []]

    @property
    def task_names(self) -> list[str]:
        return [t.get("name") or t.get("id") for t in self.tasks or []]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in d.items() if k in known}, other={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object on disk."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        d = {k: v for k, v in d.items() if not (k in _OPTIONAL and v is None)}
        return {**d, **self.other}

    def summary(self) -> dict[str, Any]:
        """What a version listing shows (`edgekif models list --json`, ModelStore.list)."""
        return {"base_model": self.base_model or None, "adapter_sha256": self.adapter_sha256, "adapter": self.adapter,
                "tasks": self.tasks, "accuracies": self.accuracies, "export": self.export,
                **({"scores": self.scores, "task_specs": self.task_specs} if self.task_specs is not None else {})}


def _list_files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return out


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    base_model_sha256: str | None = None,
    adapter_sha256: str | None = None,
    tasks: Iterable[dict[str, Any]] = (),
    accuracies: dict[str, float] | None = None,
    target: str | None = None,
    precision: str | None = None,
    execution_provider: str | None = None,
    **extra: Any,
) -> Manifest:
    """Write manifest.json (atomically) describing and hashing every file of an export folder.

    target/precision/execution_provider default to the folder's export_info.json. Extra keyword
    arguments (JSON-serialisable, e.g. parity=...) are stored under their own keys.
    """
    out_dir = Path(out_dir)
    try:
        info = read_export_info(out_dir)
    except ExportError:
        info = {}
    manifest = Manifest.from_dict({
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"id": base_model_id, "sha256": base_model_sha256},
        "adapter_sha256": adapter_sha256,
        "tasks": [dict(t) for t in tasks],
        "accuracies": dict(accuracies or {}),
        "export": {
            "target": target or info.get("target"),
            "precision": precision or info.get("precision"),
            "execution_provider": execution_provider or info.get("execution_provider"),
            **({"session_options": info["session_options"]} if info.get("session_options") else {}),
            **({"logits": info["logits"]} if info.get("logits") else {}),
        },
        "runtime": runtime_versions(),
        **extra,
        "files": {rel: sha256_file(out_dir / rel) for rel in _list_files(out_dir)},
    })
    atomic_write_json(out_dir / MANIFEST, manifest.to_dict())
    return manifest


def record_gate(folder: str | os.PathLike, gate: dict[str, Any]) -> Manifest:
    """Add the gate's decisions to an export's manifest (atomically; the manifest does not
    hash itself, so its file hashes stay valid)."""
    return _record(folder, "gate", gate)


def record_general_ability(folder: str | os.PathLike, figures: dict[str, Any]) -> Manifest:
    """Add the general-ability figures to an export's manifest (as record_gate)."""
    return _record(folder, "general_ability", figures)


def record_published(folder: str | os.PathLike, when: str | None = None) -> Manifest:
    """Add the publish time (UTC ISO, default now) to a version's manifest (as record_gate)."""
    return _record(folder, "published", when or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _record(folder: str | os.PathLike, key: str, value: Any) -> Manifest:
    manifest = read_manifest(folder)
    updated = Manifest.from_dict({**manifest.to_dict(), key: value})
    atomic_write_json(Path(folder) / MANIFEST, updated.to_dict())
    return updated


def read_manifest(folder: str | os.PathLike) -> Manifest:
    p = Path(folder) / MANIFEST
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{p}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(d, dict) or not isinstance(d.get("files"), dict) or not d["files"]:
        raise IntegrityError(f"{p}: no 'files' table")
    try:
        return Manifest.from_dict(d)
    except TypeError as e:  # cannot happen for a dict of JSON keys, but say which file if it does
        raise IntegrityError(f"{p}: unreadable: {e}") from e


def verify_manifest(folder: str | os.PathLike) -> Manifest:
    """Check every file listed in manifest.json against its sha256; return the manifest.

    Raises IntegrityError naming the first missing or mismatching file. Files present but not
    listed are allowed (logged as a warning): clients only rely on listed files.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, expected in manifest.files.items():
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(f"{folder / MANIFEST}: file entry {rel!r} points outside the folder")
        if not p.is_file():
            raise IntegrityError(f"{p}: listed in manifest but missing")
        actual = sha256_file(p)
        if actual != expected:
            raise IntegrityError(f"{p}: sha256 {actual[:12]}… does not match manifest {str(expected)[:12]}… (corrupt or modified)")
    extra = sorted(set(_list_files(folder)) - set(manifest.files))
    if extra:
        log.warning("files not listed in manifest", extra={"folder": str(folder), "files": extra})
    return manifest

