"""The model stages (train, export, evaluate) in a child process, one per stage call.

Why: a stage loads torch and a model (1.5 GB peak for SmolLM2); run in the daemon, glibc keeps
much of that heap after the job (572 MB idle after one job, measured), and an out-of-memory
kill takes the daemon with it. In a child, the daemon never imports torch, returns to its
idle size after every job, and an OOM-killed stage is a job that fails with `out of memory`
while the daemon goes on with the next one.

    ChildStages(config)        the Stages the daemon runs: validate, buffer, gate and publish
                               in the daemon (torch-free); train, export and evaluate each in a
                               `python -m service.stage_process REQUEST` child
    main([REQUEST])            the child: rebuild the job's context, run the stage with the
                               library's stages (or the factory given: the tests' fakes), write
                               the result (or the error, typed) as JSON next to the request

The stages' own outputs on disk (checkpoints, learner, export) are the restart points, so a
child needs nothing from the daemon but its request file. The child's log records come back
on its stdout as JSON lines and are logged by the daemon (one log, one writer). A daemon stop
sends the child SIGTERM: training checkpoints and stops (Interrupted), export and evaluate stop
at once (they re-run from their start). The child cannot outlive the daemon (its own process
group and, on Linux, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import edgekif.errors as errors
from edgekif.atomic import atomic_write_json
from edgekif.children import kill_group, start_child
from edgekif.config import Config, config_from_dict
from edgekif.errors import EdgekifError, Interrupted, ResourceError
from edgekif.layout import DataLayout


from .logs import _STANDARD, JsonFormatter
from .resources import rss_mb
from .stages import BufferResult, EvalResult, JobContext, Published, ShouldStop, Stages, ValidatedTask, TrainResult

log = logging.getLogger(__name__)

CHILD_COMMAND = (sys.executable, "-m", "service.stage_process")  # + REQUEST


class StageKilled(EdgekifError):
    """The stage's process was killed by a signal (SIGKILL: the kernel's OOM killer, mostly)."""


class StageCrashed(EdgekifError):
    """The stage raised something outside edgekif's errors; the message keeps its type and text."""


# ---------------------------------------------------------------- the daemon's side


class ChildStages:
    """Stages whose model work runs in a child process per call (module docstring).

    `inner` runs the daemon's own stages (default: the library's); `child_command` + REQUEST
    starts a child (the tests' fakes have their own); `on_child(pid | None)` is told when a
    child starts and ends (status shows its memory); `should_stop()` is polled while a child runs."""

    def __init__(self, config: Config, *, inner: Stages | None = None, child_command: tuple[str, ...] = CHILD_COMMAND,
                 should_stop: ShouldStop = lambda: False, on_child: Callable[[int | None], None] = lambda _pid: None) -> None:
        from .edgekif_stages import LibraryStages

        self.config = config
        self.child_command = tuple(child_command)
        self.inner = inner if inner is not None else LibraryStages(config)
        self.should_stop = should_stop
        self.on_child = on_child
        self.peak_rss_mb: float | None = None  # of the last child

    # torch-free stages: in the daemon
    def validate(self, ctx: JobContext) -> ValidatedTask:
        return self.inner.validate(ctx)

    def buffer(self, ctx: JobContext) -> BufferResult | None:
        return self.inner.buffer(ctx)

    def gate(self, ctx: JobContext, result: EvalResult) -> tuple:
        return self.inner.gate(ctx, result)

    def publish(self, ctx: JobContext, export_path: Path) -> str:
        return self.inner.publish(ctx, export_path)

    # model stages: in a child
    def train(self, ctx: JobContext, should_stop: ShouldStop) -> TrainResult:
        return TrainResult(**self._run("train", ctx, should_stop))

    def export(self, ctx: JobContext) -> Path:
        return Path(self._run("export", ctx, self.should_stop)["path"])

    def evaluate(self, ctx: JobContext) -> EvalResult:
        return EvalResult.from_dict(self._run("evaluate", ctx, self.should_stop))

    def _run(self, stage: str, ctx: JobContext, should_stop: ShouldStop) -> dict[str, Any]:
        request, result = ctx.job_files.stage_request, ctx.job_files.stage_result
        result.unlink(missing_ok=True)
        atomic_write_json(request, {"stage": stage, "config": self.config.to_dict(),
                                    "ctx": context_to_dict(ctx), "result": str(result)})
        proc, relay = start_logged_child([*self.child_command, str(request)], stage)
        self.on_child(proc.pid)
        peak, stopping = 0.0, False
        try:
            while proc.poll() is None:
                peak = max(peak, rss_mb(proc.pid) or 0.0)
                if not stopping and should_stop():
                    proc.send_signal(signal.SIGTERM)  # training checkpoints first; see main()
                    stopping = True
                time.sleep(0.2)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            relay.join(5)
            self.on_child(None)
            self.peak_rss_mb = peak or None
        log.info("stage process ended", extra={"stage": stage, "job_id": ctx.job_id, "returncode": proc.returncode, "peak_rss_mb": peak})
        try:
            outcome = json.loads(result.read_text())
        except (OSError, ValueError):
            outcome = None
        finally:
            request.unlink(missing_ok=True)
            result.unlink(missing_ok=True)
        if outcome is None:
            raise _no_result(stage, proc.returncode, peak)
        if not outcome.get("ok"):
            raise error_from_dict(outcome["error"])
        return outcome["result"]


# What lowers each stage's peak, for the hint of an OOM-killed stage. Training's peak is its
# activations: SmolLM2 at batch 8 x 256 tokens, LoRA on every linear layer, 6.7 GB; checkpointed
# 3.5 GB; q,v alone 4.9 GB (docs/benchmarks.md, "LoRA on every linear layer becomes the default").
OOM_HINTS = {
    "train": "train.gradient_checkpointing = true (about half the peak, 1.6x the step time), or "
             "lora.target_modules = [\"q_proj\", \"v_proj\"], or a smaller data.max_length or train.batch_size",
    "export": "free memory for the fused fp32 copy of the base and its reference answers (about 2 GB for SmolLM2), "
              "or a smaller eval.batch_size",
    "evaluate": "free memory for one exported model and its answers, or a smaller eval.batch_size",
}


def _no_result(stage: str, returncode: int, peak: float) -> EdgekifError:
    if returncode == -signal.SIGKILL:
        killed = StageKilled(f"out of memory: the {stage} stage's process was killed by SIGKILL (the kernel's OOM killer, most likely) "
                             f"at {peak:.0f} MB resident")
        if stage in OOM_HINTS:
            killed.hint = f"{OOM_HINTS[stage]}; then `edgekif retry JOB`"
        return killed
    if returncode < 0:
        return StageKilled(f"the {stage} stage's process was killed by signal {signal.Signals(-returncode).name}")
    return StageCrashed(f"the {stage} stage's process exited with {returncode} and no result")


def start_logged_child(cmd: list[str], stage: str) -> tuple[subprocess.Popen, threading.Thread]:
    """A child (edgekif.children.start_child) whose output is relayed into the daemon's log by
    the returned, started thread (the child logs with log_json_to_stdout). tqdm reads
    TQDM_DISABLE when it is imported: libraries' own bars (transformers' GGUF conversion) stay
    out of the daemon's log, which relays every line the child writes."""
    proc = start_child(cmd, stdout=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"},
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    relay = threading.Thread(target=_relay_logs, args=(proc.stdout, proc.pid, stage), name=f"edgekif-{stage}-log", daemon=True)
    relay.start()
    return proc, relay


def log_json_to_stdout() -> None:
    """The child's side of start_logged_child: its log records as JSON lines on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def _relay_logs(stream: Any, pid: int, stage: str) -> None:
    """Each line of the child's output into the daemon's log: its JSON records as they were
    logged (level, logger, fields), anything else (a native library's print) as a line of text."""
    for line in stream:
        line = line.rstrip("\n")
        if not line:
            continue
        try:
            rec = json.loads(line)
            level = logging.getLevelName(rec.pop("level"))
            name, msg = rec.pop("logger"), rec.pop("msg")
            rec.pop("ts", None)
        except (ValueError, KeyError, AttributeError, TypeError):
            logging.getLogger("service.stage_process.output").info(line[:2000], extra={"stage": stage, "child_pid": pid})
            continue
        extra = {k: v for k, v in rec.items() if k not in _STANDARD}
        logging.getLogger(name).log(level if isinstance(level, int) else logging.INFO, msg, extra={**extra, "child_pid": pid})
    stream.close()


# ---------------------------------------------------------------- what crosses the process boundary


def context_to_dict(ctx: JobContext) -> dict[str, Any]:
    return {
        "job_id": ctx.job_id, "file_name": ctx.file_name, "file_path": str(ctx.file_path), "sha256": ctx.sha256,
        "work_dir": str(ctx.work_dir), "data_dir": str(ctx.layout.root), "metrics": ctx.metrics, "past_tasks": ctx.past_tasks,
        "task": dataclasses.asdict(ctx.task) if ctx.task else None,
        "published": dataclasses.asdict(ctx.published) if ctx.published else None,
    }


def context_from_dict(d: dict[str, Any], config: Config) -> JobContext:
    return JobContext(
        job_id=d["job_id"], file_name=d["file_name"], file_path=Path(d["file_path"]), sha256=d["sha256"],
        work_dir=Path(d["work_dir"]), layout=DataLayout(Path(d["data_dir"])), config=config,
        task=ValidatedTask(**d["task"]) if d.get("task") else None, metrics=d.get("metrics") or {},
        published=Published(**d["published"]) if d.get("published") else None, past_tasks=list(d.get("past_tasks") or []),
    )


def error_to_dict(e: BaseException) -> dict[str, Any]:
    """What the daemon needs to handle the error as if the stage had raised it in-process: its
    type (edgekif's errors by name), fields, and whether it is the disk's or memory's doing."""
    from .job_runner import permanence, transient_cause  # the child has the whole cause chain; the daemon does not

    permanent, hint = permanence(e)
    d: dict[str, Any] = {"type": type(e).__name__, "message": str(e), "transient": transient_cause(e),
                         "permanent": permanent, "hint": hint}
    if isinstance(e, errors.ValidationError):
        d["fields"] = e.to_fields()
    return d


def error_from_dict(d: dict[str, Any]) -> BaseException:
    if d.get("transient"):
        return ResourceError(d["transient"])
    cls = getattr(errors, d.get("type", ""), None)
    if isinstance(cls, type) and issubclass(cls, errors.ValidationError):
        return cls.from_fields(d["fields"])
    if isinstance(cls, type) and issubclass(cls, EdgekifError):
        e = cls(d["message"])
        e.permanent, e.hint = bool(d.get("permanent")), d.get("hint") or ""
        return e
    if d.get("type") == "MemoryError":
        return MemoryError(d["message"])
    crashed = StageCrashed(f"{d.get('type')}: {d.get('message')}")
    crashed.permanent, crashed.hint = bool(d.get("permanent")), d.get("hint") or ""
    return crashed


# ---------------------------------------------------------------- the child's side


def main(argv: list[str] | None = None, *, stages_factory: Callable[[Config], Any] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    log_json_to_stdout()
    stage, result_path = request["stage"], Path(request["result"])
    config = config_from_dict(request["config"])
    ctx = context_from_dict(request["ctx"], config)
    stop = threading.Event()
    terminated = threading.Event()

    def on_term(_sig: int, _frame: Any) -> None:
        terminated.set()
        if stage == "train":
            stop.set()  # the trainer checkpoints at its next step and raises Interrupted
        else:
            raise Interrupted(f"{stage} stopped by the daemon")

    signal.signal(signal.SIGTERM, on_term)
    try:
        if stages_factory is None:
            from .edgekif_stages import LibraryStages as stages_factory
        stages = stages_factory(config)
        if stage == "train":
            out: dict[str, Any] = stages.train(ctx, stop.is_set).to_dict()
        elif stage == "export":
            out = {"path": str(stages.export(ctx))}
        elif stage == "evaluate":
            out = stages.evaluate(ctx).to_dict()
        else:
            raise EdgekifError(f"no model stage {stage!r}")
        atomic_write_json(result_path, {"ok": True, "result": out})
        return 0
    except (Exception, MemoryError) as e:
        logging.getLogger(__name__).info("stage raised", extra={"stage": stage, "error": f"{type(e).__name__}: {e}"})
        if terminated.is_set() and not isinstance(e, Interrupted):
            # The Interrupted raised by on_term can come out rewrapped by whatever caught it
            # (a runner that failed to open is a permanent ExportError): a stop is still a stop,
            # which gives the attempt back and reruns the stage at the next start.
            e = Interrupted(f"{stage} stopped by the daemon ({type(e).__name__}: {e})")
        atomic_write_json(result_path, {"ok": False, "error": error_to_dict(e)})
        return 3


def exit_now(code: int) -> None:
    """End the child without the interpreter's teardown, which took 1.85 s after the export
    stage (its last log line to the daemon seeing it end; 0.29 s with os._exit): its result is
    written (atomic_write_json: fsynced, renamed) and every file it wrote was closed by the
    `with` blocks that opened it; only the log stream is left to flush."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
