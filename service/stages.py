"""The pipeline stages the daemon runs for a job, behind one interface.

The daemon owns the order, the commits and the retries; a stage owns the work. Every stage
must be idempotent when re-run after a crash, because a crash can land after its side
effects and before the daemon commits its result (see docs/daemon.md for each stage).

The real stages (`service.edgekif_stages.LibraryStages`) import the ML library lazily inside
each call, so an idle daemon never loads torch. The daemon's tests inject
`service.fake_stages.FakeStages` (tiny file writes and sleeps) instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .metrics import replace_json

if TYPE_CHECKING:
    from edgekif.config import Config
    from edgekif.layout import DataLayout, JobLayout

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]


# ---- results: each is committed into the job's metrics JSON under the stage's name ------


@dataclass
class ValidatedTask:
    name: str
    examples: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BufferResult:
    holdout_path: str | None = None  # JSON(L) of held-out examples, recorded in tasks.holdout
    holdout_examples: int = 0
    replay_inserted: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    seconds: float = 0.0
    adapter_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1] keyed by task name; the gate compares them in
    points (100 x fraction) against service.forgetting_threshold."""

    accuracies: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(accuracies={k: float(v) for k, v in d.get("accuracies", {}).items()}, details=d.get("details", {}))


@dataclass
class Published:
    """What is live now (from state.db): the base the gate compares against."""

    version: str
    job_id: int
    accuracies: dict[str, float]


@dataclass
class JobContext:
    """Everything a stage may use about its job. Built fresh by the daemon for each call."""

    job_id: int
    file_name: str  # as dropped into inbox/
    file_path: Path  # where it is now (accepted/<sha12>_<name>)
    sha256: str
    work_dir: Path  # jobs/<id>/: checkpoints, adapter, export
    layout: "DataLayout"
    config: "Config"
    task: ValidatedTask | None = None  # after validate
    metrics: dict[str, Any] = field(default_factory=dict)  # committed results of earlier stages
    published: Published | None = None
    past_tasks: list[str] = field(default_factory=list)  # tasks the live model has learned, oldest first

    @property
    def task_name(self) -> str:
        return self.task.name if self.task else Path(self.file_name).stem

    @property
    def job_files(self) -> "JobLayout":
        """This job's folder and the stages' outputs in it (edgekif.layout)."""
        return self.layout.job(self.job_id)

    @property
    def progress_path(self) -> Path:
        return self.job_files.progress

    def write_progress(self, **fields: Any) -> None:
        """The train stage reports here; `status` shows it. Atomic so readers never see half;
        not fsynced (rewritten every few steps, worthless after a power cut)."""
        replace_json(self.progress_path, {"ts": time.time(), **fields})


class Stages(Protocol):
    def validate(self, ctx: JobContext) -> ValidatedTask:
        """Read and validate ctx.file_path; raise ValidationError for bad input."""

    def buffer(self, ctx: JobContext) -> BufferResult | None:
        """Split the holdout and insert the task's share into the replay buffer. Idempotent."""

    def train(self, ctx: JobContext, should_stop: ShouldStop) -> TrainResult:
        """Train (resuming from the job's latest checkpoint). Poll should_stop(); when it
        returns True, checkpoint and raise Interrupted."""

    def export(self, ctx: JobContext) -> Path:
        """Fuse and export the model into ctx.work_dir; return the export folder."""

    def evaluate(self, ctx: JobContext) -> EvalResult:
        """Accuracy of the export (ctx.metrics["export"]["path"]) on the new task's holdout and
        on every past task's holdout, measured as a client runs it; details["zero_shot"]: the
        untrained base's accuracy on the new task, measured the same way."""

    def gate(self, ctx: JobContext, result: EvalResult) -> tuple[bool, list[str]] | tuple[bool, list[str], dict]:
        """May this job be published? (ok, human-readable reasons when not[, each decision's
        figures]). A step of its own: its decision is committed before anything is published."""

    def publish(self, ctx: JobContext, export_path: Path) -> str:
        """Make the export the live version; return the version name."""
