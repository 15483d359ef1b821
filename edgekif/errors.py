"""Typed errors. Every error edgekif raises on purpose derives from EdgekifError.

Errors about user input carry *where* (file, line/record, field) so the daemon can
write a precise rejection report and a CLI user can fix the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class EdgekifError(Exception):
    """Base class of all edgekif errors.

    `permanent`: the same inputs fail the same way every time (a setting, a check that measured
    the model, a damaged file), so the daemon fails the job at once instead of retrying it;
    `hint` says what to do about it."""

    permanent = False
    hint = ""

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": str(self)}


class ConfigError(EdgekifError):
    """A configuration file or override is invalid."""

    permanent = True
    hint = "fix the setting, then `edgekif retry JOB`"


@dataclass
class ValidationError(EdgekifError):
    """A task file is malformed. `line` is 1-based (JSONL/CSV line or JSON array record)."""

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None
    kind: str = "invalid"  # machine-readable: bad_json, missing_field, empty, binary, too_large, encoding, ...
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        prefix = ":".join(where[:2]) + (f" ({where[2]})" if len(where) > 2 else "")
        return f"{prefix}: {self.message}" if prefix else self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "field": self.field,
            **({"details": self.details} if self.details else {}),
        }


class DamagedFileError(ValidationError):
    """A file edgekif wrote itself (a job's holdout or training records) is damaged or was
    edited by hand. Named like a ValidationError (file, line, field), but it is not the user's
    input: the daemon fails the job with it instead of rejecting the user's file."""

    permanent = True
    hint = "restore or delete the named file, then `edgekif retry JOB`"


class TaskSpecError(ValidationError):
    """The sidecar `NAME.task.toml` beside a task file (it states the task's kind, metric or
    answer budget, edgekif.tasks) is invalid. The user's input like the task file itself, so
    the file is rejected the same way; `file` is the sidecar, `line` its line, `field` the key."""


class ModelError(EdgekifError):
    """The base model cannot be found, converted or loaded."""


class ReplayError(EdgekifError):
    """The replay buffer cannot complete an operation."""


class TrainingError(EdgekifError):
    """Training cannot start or continue (bad state, resume mismatch, ...)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, corrupt or does not match the current run."""


class ExportError(EdgekifError):
    """Fusing or exporting a model failed. A builder that failed with its own error (not
    killed, not out of space) is `permanent`: it fails the same way on the same model."""

    def __init__(self, *args: object, permanent: bool = False) -> None:
        super().__init__(*args)
        self.permanent = permanent
        if permanent:
            self.hint = "the exporter cannot build this model with these settings: change export.target/precision or the base, then `edgekif retry JOB`"


class ParityError(ExportError):
    """The exported model does not reproduce the PyTorch model's outputs (the answer check
    measured it: the same model gives the same figures again)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args, permanent=True)
        self.hint = "set export.precision = \"fp32\" (or a precision the check passes), then `edgekif retry JOB`"


class PublishError(EdgekifError):
    """A model version cannot be published, rolled back or verified."""


class IntegrityError(PublishError):
    """A published version's files do not match its manifest."""


class ResourceError(EdgekifError):
    """Not enough memory/disk to run a job safely."""


class Interrupted(TrainingError):
    """Training stopped on request (SIGTERM, shutdown) after writing a checkpoint."""
