"""Test doubles for the daemon: stages that write small files and sleep instead of training.

Not used by the daemon itself: tests inject `FakeStages` into `Daemon(config, stages)`, and
subprocess tests (and `tools/bench_daemon.py --fake-stages`) run the daemon with them through
this module's own entry point:

    python -m service.fake_stages --data-dir DIR [--config F] [--set k=v ...]

FakeStages options come from DIR/fake_stages.json. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgekif.errors import Interrupted, ParityError, ResourceError, ValidationError

from .metrics import replace_json
from .gates import forgetting_gate
from .stages import BufferResult, EvalResult, JobContext, ShouldStop, TrainResult, ValidatedTask




class SimulatedCrash(BaseException):
    """Raised by FakeStages to stand in for the process dying: it is not an Exception, so
    the daemon does not catch it, commits nothing, and it escapes like a kill would."""


_INJECTED = {
    "crash": lambda stage: SimulatedCrash(f"simulated crash in {stage}"),
    "error": lambda stage: RuntimeError(f"injected error in {stage}"),
    "resource": lambda stage: ResourceError(f"injected resource shortage in {stage}"),
    "validation": lambda stage: ValidationError(f"injected validation error in {stage}", kind="injected"),
    "enospc": lambda stage: OSError(errno.ENOSPC, "No space left on device", f"<injected in {stage}>"),
    "memory": lambda stage: MemoryError(f"injected in {stage}"),
    # a package missing from the Python that runs the stage (permanent)
    "import": lambda stage: ModuleNotFoundError(f"No module named 'torch' (injected in {stage})"),
    # the answer check measured the model: the same figures every try (permanent)
    "parity": lambda stage: ParityError(f"injected: answers agree with the fp32 model on 54.0% in {stage}"),
    # the kernel's OOM killer (only ever injected into a stage's child process)
    "sigkill": lambda stage: os.kill(os.getpid(), signal.SIGKILL),
    # safetensors' writer (Rust) reports a full disk with no OSError and no errno in the chain
    "safetensors_full": lambda stage: Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
}


class FakeStages:
    """Stages that write small files and sleep a little. They keep the same idempotency
    contracts as the real ones and record every call, in memory and as JSON lines in
    `<data>/fake_calls.jsonl` (so a test can count calls across daemon restarts/processes).

    Options (kwargs, or `<data>/fake_stages.json` for `python -m service.fake_stages`):
      train_steps, step_seconds  -- fake training length; one checkpoint per step
      stage_seconds              -- sleep in every other stage
      new_accuracy               -- accuracy reported for the job's own task
      drop                       -- points every past task loses (to trip the gate)
      inject                     -- {"stage": [kind, "before"|"after", times]}, kind one of
                                    crash, error, resource, validation, enospc, memory,
                                    safetensors_full, parity, sigkill (child processes only)
      export_child_seconds       -- export runs a child process that sleeps this long (like
                                    the genai builder, through edgekif.children.run_child)
    The export is a folder with one small file and a manifest.json; publish puts it through
    edgekif.publish.ModelStore, as the real stages do (models/vNNNN, the models/current link).
    A file whose content contains the line `INVALID` fails validation (line number reported).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        train_steps: int = 3,
        step_seconds: float = 0.0,
        stage_seconds: float = 0.0,
        new_accuracy: float = 0.9,
        drop: float = 0.0,
        inject: dict[str, list[Any]] | None = None,
        export_child_seconds: float = 0.0,
    ) -> None:
        self.export_child_seconds = export_child_seconds
        self.data_dir = Path(data_dir)
        self.train_steps = train_steps
        self.step_seconds = step_seconds
        self.stage_seconds = stage_seconds
        self.new_accuracy = new_accuracy
        self.drop = drop
        self.inject = {k: list(v) for k, v in (inject or {}).items()}
        self.calls: list[dict[str, Any]] = []
        self.calls_file = self.data_dir / "fake_calls.jsonl"
        self.replay_file = self.data_dir / "fake_replay.json"

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike) -> "FakeStages":
        opts_file = Path(data_dir) / "fake_stages.json"
        opts = json.loads(opts_file.read_text()) if opts_file.exists() else {}
        opts.pop("in_child", None)  # fake_daemon_stages' switch, not a FakeStages option
        return cls(data_dir, **opts)

    @staticmethod
    def read_calls(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
        path = Path(data_dir) / "fake_calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _record(self, stage: str, ctx: JobContext, **data: Any) -> None:
        entry = {"stage": stage, "job_id": ctx.job_id, "file": ctx.file_name, "pid": os.getpid(), **data}
        self.calls.append(entry)
        # O_APPEND + one write per line: lines from successive processes never interleave.
        # (No fsync: the fakes only need to survive a process crash, not a power cut.)
        fd = os.open(self.calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)

    def _maybe_inject(self, stage: str, when: str) -> None:
        spec = self.inject.get(stage)
        if not spec:
            return
        kind, at = spec[0], spec[1]
        times = spec[2] if len(spec) > 2 else 1
        if at != when or times <= 0:
            return
        spec[2:] = [times - 1]
        raise _INJECTED[kind](stage)

    def _sleep(self) -> None:
        if self.stage_seconds:
            time.sleep(self.stage_seconds)

    def validate(self, ctx: JobContext) -> ValidatedTask:
        self._maybe_inject("validate", "before")
        self._record("validate", ctx)
        self._sleep()
        lines = ctx.file_path.read_bytes().decode("utf-8", "replace").splitlines()
        for n, line in enumerate(lines, 1):
            if line.strip() == "INVALID":
                raise ValidationError("line is not a record", file=ctx.file_name, line=n, kind="bad_json")
        if not any(line.strip() for line in lines):
            raise ValidationError("file has no records", file=ctx.file_name, kind="empty")
        self._maybe_inject("validate", "after")
        return ValidatedTask(name=Path(ctx.file_name).stem, examples=sum(1 for line in lines if line.strip()))

    def buffer(self, ctx: JobContext) -> BufferResult:
        self._maybe_inject("buffer", "before")
        self._sleep()
        holdout = ctx.work_dir / "holdout.json"
        if not holdout.exists():  # deterministic content, so rewriting would be harmless too
            replace_json(holdout, {"task": ctx.task_name, "examples": [0]})
        # The fake replay buffer: job id -> examples. Applying a job twice is a no-op.
        replay = json.loads(self.replay_file.read_text()) if self.replay_file.exists() else {}
        applied = str(ctx.job_id) not in replay
        if applied:
            replay[str(ctx.job_id)] = {"task": ctx.task_name, "examples": ctx.task.examples if ctx.task else 0}
            replace_json(self.replay_file, replay)
        self._record("buffer", ctx, applied=applied)
        self._maybe_inject("buffer", "after")
        return BufferResult(holdout_path=str(holdout), holdout_examples=1, replay_inserted=1 if applied else 0)

    def train(self, ctx: JobContext, should_stop: ShouldStop) -> TrainResult:
        self._maybe_inject("train", "before")
        from tqdm import tqdm  # imported here, as a library the real stage loads would import it

        for _ in tqdm(range(2), desc="a library's progress bar"):  # as transformers' GGUF conversion draws one
            pass
        logging.getLogger(__name__).info("fake training started", extra={"job_id": ctx.job_id})
        adapter = ctx.work_dir / "adapter.json"
        ckpt = ctx.work_dir / "checkpoint.json"
        if adapter.exists():  # finished before a crash: same result again, no training
            done = json.loads(adapter.read_text())
            self._record("train", ctx, start_step=done["steps"], end_step=done["steps"], resumed_done=True)
            return TrainResult(steps=done["steps"], adapter_path=str(adapter))
        start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        step = start
        t0 = time.monotonic()
        try:
            while step < self.train_steps:
                if should_stop():
                    raise Interrupted(f"stopped at step {step}")
                time.sleep(self.step_seconds)
                step += 1
                replace_json(ckpt, {"step": step})
                ctx.write_progress(stage="train", step=step, total_steps=self.train_steps)
        finally:
            self._record("train", ctx, start_step=start, end_step=step)
        self._maybe_inject("train", "after")
        replace_json(adapter, {"steps": step, "task": ctx.task_name})
        return TrainResult(steps=step, seconds=time.monotonic() - t0, adapter_path=str(adapter))

    def evaluate(self, ctx: JobContext) -> EvalResult:
        self._maybe_inject("evaluate", "before")
        self._record("evaluate", ctx)
        self._sleep()
        acc = {t: max(0.0, a - self.drop / 100) for t, a in (ctx.published.accuracies if ctx.published else {}).items()}
        acc[ctx.task_name] = self.new_accuracy
        return EvalResult(accuracies=acc)

    def gate(self, ctx: JobContext, result: EvalResult) -> tuple[bool, list[str]]:
        return forgetting_gate(result.accuracies, ctx.published, ctx.config.service.forgetting_threshold)

    def export(self, ctx: JobContext) -> Path:
        self._maybe_inject("export", "before")
        final = ctx.work_dir / "export"
        built = not final.exists()
        if built:
            if self.export_child_seconds:
                from edgekif.children import run_child  # torch-free

                self._record("export_child", ctx)
                # the work dir in its command line lets a test find it (and any orphan)
                run_child([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", str(self.export_child_seconds), str(ctx.work_dir)])
            _build_export(final, {"model.json": json.dumps({"job_id": ctx.job_id, "sha256": ctx.sha256})},
                          accuracies={ctx.task_name: self.new_accuracy}, job_id=ctx.job_id)
        self._record("export", ctx, built=built)
        self._sleep()
        self._maybe_inject("export", "after")
        return final

    def publish(self, ctx: JobContext, export_path: Path) -> str:
        from edgekif.export.manifest import read_manifest
        from edgekif.publish import ModelStore  # torch-free

        self._maybe_inject("publish", "before")
        store = ModelStore(ctx.layout.root)
        # Idempotent: a version already made from this job is returned, not made again.
        for v in store.versions():
            if read_manifest(store.path(v)).job_id == ctx.job_id:
                if store.current() != v:  # a crash after the folder was made, before the link moved
                    store.rollback(v)
                self._record("publish", ctx, version=v, made=False)
                return v
        version = store.publish(export_path, keep=ctx.config.export.keep_versions)  # as the real stage
        self._record("publish", ctx, version=version, made=True)
        self._maybe_inject("publish", "after")
        return version


def _build_export(final: Path, files: dict[str, str], **manifest: Any) -> None:
    """Fill a temp sibling with `files` and their manifest.json, then rename it into place
    (the fakes' cheap atomic_dir: no fsync of the files). The temp is named as edgekif.atomic
    names its own, so start-up cleanup knows it."""
    from edgekif.export.manifest import write_manifest  # torch-free

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    for name, text in files.items():
        (tmp / name).write_text(text)
    write_manifest(tmp, **manifest)
    os.rename(tmp, final)


def fake_stages_for(config: Any) -> FakeStages:
    """FakeStages from the data dir's fake_stages.json: the factory tests give
    service.stage_process.ChildStages, so the child runs the fakes."""
    return FakeStages.from_data_dir(config.data_path)


# `python -m service.fake_stages --stage-child REQUEST`: a stage's child process running the fakes
FAKE_CHILD_COMMAND = (sys.executable, "-m", "service.fake_stages", "--stage-child")


def fake_daemon_stages(config: Any) -> Any:
    """The fake daemon's stages: FakeStages, with the model stages in child processes as the
    real daemon runs them when fake_stages.json says `"in_child": true`."""
    opts_file = Path(config.data_path) / "fake_stages.json"
    if opts_file.exists() and json.loads(opts_file.read_text()).get("in_child"):
        from .stage_process import ChildStages

        return ChildStages(config, inner=fake_stages_for(config), child_command=FAKE_CHILD_COMMAND)
    return fake_stages_for(config)


def main(argv: list[str] | None = None) -> int:
    """`python -m service.fake_stages`: the daemon in the foreground, with FakeStages."""
    from .__main__ import main as service_main

    return service_main(argv, stages_factory=fake_daemon_stages)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stage-child"]:
        from .stage_process import exit_now, main as stage_child

        exit_now(stage_child(sys.argv[2:], stages_factory=fake_stages_for))  # as the real child ends
    sys.exit(main())
