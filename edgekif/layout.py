"""Where everything lives under a data dir: the one module that knows its folder and file names.

    DATA_DIR/
      inbox/  accepted/  rejected/       files dropped, taken, refused (with a report)
      inbox/NAME.task.toml               a task file's sidecar (its kind, metric, budget: edgekif.tasks)
      holdout/TASK.jsonl                 records kept back from training, per task
                                         (+ TASK.labels.json, TASK.spec.json)
      jobs/ID/                           one job's work: train.jsonl, learner/, export/, progress.json
      models/vNNNN/  models/current      published versions and the live one (edgekif.publish)
      logs/  state.db  replay.db         the daemon's log, its job database, the replay buffer
      daemon.lock  daemon.json           the running daemon's lock and its runtime record
      export-history.json                past export checks per variant (which to skip)

The library, the daemon, the API and the tools all take paths from `DataLayout`; nothing else
joins these names by hand. Torch-free and import-free, so anything may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CURRENT = "current"  # models/current -> vNNNN
SIDECAR_SUFFIX = ".task.toml"  # NAME.task.toml states what NAME.jsonl (any extension) asks for


def sidecar_of(task_file: str | os.PathLike) -> Path:
    """The sidecar that belongs to a task file: `inbox/NAME.jsonl` -> `inbox/NAME.task.toml`,
    and so `accepted/<sha12>_NAME.jsonl` -> `accepted/<sha12>_NAME.task.toml` (the watcher
    copies a sidecar in under the name of the task file it came with)."""
    path = Path(task_file)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def is_sidecar_name(name: str | bytes) -> bool:
    return (os.fsencode(name) if isinstance(name, str) else name).endswith(SIDECAR_SUFFIX.encode())


@dataclass(frozen=True)
class JobLayout:
    """One job's folder, jobs/ID/: the stages' outputs, each a restart point."""

    root: Path

    @property
    def train_file(self) -> Path:
        """The task's training split (Record JSON lines), written by the buffer stage."""
        return self.root / "train.jsonl"

    @property
    def learner(self) -> Path:
        """The learner after this job's task (adapter + strategy state), written by train."""
        return self.root / "learner"

    @property
    def checkpoint(self) -> Path:
        """The trainer's mid-task checkpoint: only for a resume."""
        return self.root / "checkpoint"

    @property
    def export(self) -> Path:
        """The checked export with its manifest, until publish moves a copy into models/."""
        return self.root / "export"

    @property
    def scratch(self) -> Path:
        """The export stage's scratch (fused fp32 copy, portable adapter): removed when it ends."""
        return self.root / "export-work"

    @property
    def stage_request(self) -> Path:
        """What a model stage's child process is asked to do (service.stage_process)."""
        return self.root / "stage-request.json"

    @property
    def stage_result(self) -> Path:
        """What it answered: the stage's result, or its error."""
        return self.root / "stage-result.json"

    @property
    def progress(self) -> Path:
        """What the running stage is doing now, for `edgekif status`."""
        return self.root / "progress.json"


@dataclass(frozen=True)
class DataLayout:
    """The paths of one data dir (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def accepted(self) -> Path:
        return self.root / "accepted"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout"

    def holdout_file(self, task: str) -> Path:
        return self.holdout / f"{task}.jsonl"

    def labels_file(self, task: str) -> Path:
        """The task's label set as read from its file ({"labels": [...] | null})."""
        return self.holdout / f"{task}.labels.json"

    def spec_file(self, task: str) -> Path:
        """The task's spec as decided once (edgekif.tasks.TaskSpec: kind, metric, answer budget)."""
        return self.holdout / f"{task}.spec.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def current(self) -> Path:
        """The link to the live version (models/current -> vNNNN)."""
        return self.models / CURRENT

    def version(self, name: str) -> Path:
        return self.models / name

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, job_id: int) -> JobLayout:
        return JobLayout(self.jobs / str(job_id))

    def job_dir(self, job_id: int) -> Path:
        return self.job(job_id).root

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "edgekif.log"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def replay_db(self) -> Path:
        return self.root / "replay.db"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def export_history(self) -> Path:
        """Past export checks' outcomes per variant (edgekif.export.history): which to skip."""
        return self.root / "export-history.json"

    @property
    def runtime_file(self) -> Path:
        """Small JSON the running daemon keeps current (pid, what it is doing) for `status`."""
        return self.root / "daemon.json"

    @property
    def legacy_cache(self) -> Path:
        """DATA_DIR/cache: where versions before the XDG rule kept converted bases."""
        return self.root / "cache"

    def create(self) -> None:
        for d in (self.root, self.inbox, self.accepted, self.rejected, self.models, self.jobs, self.logs):
            d.mkdir(parents=True, exist_ok=True)
