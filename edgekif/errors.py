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
    # Further problems in the same file (its other bad records), so one report lists what to
    # fix; `more` counts them all, `also` holds the first few.
    also: tuple["ValidationError", ...] = ()
    more: int = 0

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def _where(self, *, with_file: bool = True) -> str:
        where = [str(self.file)] if with_file and self.file is not None else []
        if self.line is not None:
            where.append(f"line {self.line}")
        head = ":".join(where)
        if self.field is not None:
            head += f" (field {self.field!r})" if head else f"field {self.field!r}"
        return head

    def __str__(self) -> str:
        prefix = self._where()
        text = f"{prefix}: {self.message}" if prefix else self.message
        if self.more:
            text += f"\n{self.more} more problem{'s' if self.more > 1 else ''} in this file:"
            text += "".join(f"\n  {e._where(with_file=False)}: {e.message}" for e in self.also)
            if self.more > len(self.also):
                text += f"\n  ... and {self.more - len(self.also)} more"
        return text

    def to_fields(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-safe (`also` as their own fields): what
        from_fields rebuilds the error from in another process."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["also"] = [e.to_fields() for e in self.also]
        return d

    @classmethod
    def from_fields(cls, d: dict[str, Any]) -> "ValidationError":
        return cls(**{**d, "also": tuple(ValidationError.from_fields(a) for a in d.get("also", ()))})

    def to_dict(self) -> dict[str, Any]:
        d = {
            "error": type(self).__name__,
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "field": self.field,
            **({"details": self.details} if self.details else {}),
        }
        if self.more:  # the same file: its name is not repeated
            d["more"] = self.more
            d["also"] = [{k: v for k, v in e.to_dict().items() if k not in ("error", "file")} for e in self.also]
        return d


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
