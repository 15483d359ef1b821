"""The real pipeline stages: the edgekif library behind the `Stages` interface.

Every ML import happens inside a method, so an idle daemon never imports torch.
Idempotency (a stage may be re-run after a crash that landed before the daemon committed):
  validate   pure read
  buffer     holdout/train split is a deterministic function of the file's SHA-256 and is
             written atomically; the replay insert is a no-op for a SHA-256 already stored
  train      resumes from jobs/<id>/checkpoint; skipped if jobs/<id>/learner already has the task
  export     skipped if jobs/<id>/export exists and its manifest verifies; the export is checked
             against the fp32 model's answers and scored on the holdouts (edgekif.export.export_model)
  evaluate   reads the export's manifest; the base's zero-shot score is cached per base and holdout
  publish    skipped if `current` already holds this export (same adapter hash)

Model continuity: a job starts from the learner state of the *live* job (the version
`models/current` points at: adapter and importance EMAs) and replays only the tasks that
version learned, so neither a held job nor a version rolled back over leaks into the next one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

from edgekif.atomic import atomic_write_json, atomic_write_text
from edgekif.quality import read_holdout

from .stages import BufferResult, EvalResult, JobContext, ShouldStop, TaskInfo, TrainResult, publish_gate

log = logging.getLogger(__name__)


def _holdout_root(layout) -> Path:
    return layout.root / "holdout"


def _holdout_dir(ctx: JobContext) -> Path:
    return _holdout_root(ctx.layout)


def _learner_dir(layout, job_id: int) -> Path:
    return layout.jobs / str(job_id) / "learner"


def _write_records(path: Path, records) -> None:
    atomic_write_text(path, "".join(r.to_json() + "\n" for r in records))


def manifest_tasks(layout, config, names: list[str]) -> list[dict]:
    """The manifest's record of the tasks a model has learned, in learning order."""
    from edgekif.replay import ReplayBuffer

    with ReplayBuffer(layout.replay_db, config.replay) as buf:
        per_task = buf.stats()["tasks"]
    out = []
    for name in names:
        st = per_task.get(name, {})
        hold = _holdout_root(layout) / f"{name}.jsonl"
        out.append({
            "id": name,
            "name": name,
            "train_examples": st.get("records"),  # the training split the buffer was offered
            "holdout_examples": len(read_holdout(hold)) if hold.is_file() else None,  # kept for the gate
            "replay_stored": st.get("stored"),
            "source_file": st.get("source_file"),
        })
    return out


def _quiet_transformers() -> None:
    """No progress bars in the daemon's log (they are for terminals)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class LibraryStages:
    def __init__(self, config) -> None:
        self.config = config

    # -- validate ---------------------------------------------------------------------------
    def validate(self, ctx: JobContext) -> TaskInfo:
        from edgekif.taskfile import read_task

        data = read_task(ctx.file_path, ctx.config.data)
        # read_task names the task after accepted/<sha12>_<name>; the user's name is what they dropped.
        return TaskInfo(name=Path(ctx.file_name).stem, examples=len(data.records), details={"format": data.format, "labels": data.labels})

    # -- buffer: holdout split + replay insert ------------------------------------------------
    def buffer(self, ctx: JobContext) -> BufferResult:
        from edgekif.taskfile import read_task
        from edgekif.replay import ReplayBuffer

        cfg = ctx.config
        data = read_task(ctx.file_path, cfg.data)
        records = list(data.records)
        random.Random(ctx.sha256).shuffle(records)  # deterministic in the file's content
        n_hold = min(cfg.service.holdout_max, int(round(cfg.service.holdout_fraction * len(records))))
        n_hold = min(n_hold, len(records) - 1) if len(records) > 1 else 0
        holdout, train = records[:n_hold], records[n_hold:]
        hd = _holdout_dir(ctx)
        _write_records(hd / f"{ctx.task_name}.jsonl", holdout)
        atomic_write_json(hd / f"{ctx.task_name}.labels.json", {"labels": data.labels})
        _write_records(ctx.work_dir / "train.jsonl", train)
        with ReplayBuffer(ctx.layout.replay_db, cfg.replay) as buf:
            res = buf.add_task(ctx.task_name, train, source_file=ctx.file_name, source_sha256=ctx.sha256)
        return BufferResult(
            holdout_path=str(hd / f"{ctx.task_name}.jsonl"),
            holdout_examples=len(holdout),
            replay_inserted=0 if res.duplicate else res.stored,
            details={"train_examples": len(train), "duplicate": res.duplicate},
        )

    # -- train ----------------------------------------------------------------------------------
    def train(self, ctx: JobContext, should_stop: ShouldStop) -> TrainResult:
        from edgekif.continual import StreamTask, learn_task
        from edgekif.replay import ReplayBuffer
        from edgekif.trainer import has_learner, read_learner_meta
        from edgekif.workflow import open_learner

        _quiet_transformers()
        out = _learner_dir(ctx.layout, ctx.job_id)
        if has_learner(out) and ctx.task_name in read_learner_meta(out).tasks_seen:
            return TrainResult(steps=0, adapter_path=str(out / "adapter"), metrics={"skipped": "already trained"})
        start = _learner_dir(ctx.layout, ctx.published.job_id) if ctx.published else None
        learner, base = open_learner(ctx.config, state_dir=start)
        task = StreamTask(ctx.task_name, read_holdout(ctx.work_dir / "train.jsonl"), source_file=ctx.file_name, source_sha256=ctx.sha256)
        started = time.time()
        ctx.write_progress(stage="train", started=started, step=0, steps=None)
        first: dict = {}  # step and time of this run's first report: status's rate and ETA start there (after loading)

        def progress(ev: dict) -> None:
            if ev["step"] % 2 == 0 or ev["step"] == ev["steps"]:
                first.setdefault("first_step", ev["step"])
                first.setdefault("first_ts", time.time())
                ctx.write_progress(stage="train", started=started, step=ev["step"], steps=ev["steps"], loss=ev["loss"], kind=ev["kind"], **first)

        with ReplayBuffer(ctx.layout.replay_db, ctx.config.replay) as buf:
            # Replay only published tasks: the buffer also holds the examples of jobs the
            # forgetting gate held (or that failed after buffering). The buffer step stored this
            # task's share already (remember=False).
            res = learn_task(learner, buf, task, past_tasks=ctx.past_tasks, remember=False, ckpt_dir=ctx.work_dir,
                             should_stop=should_stop, progress=progress)
        learner.save(out)
        # the mid-task checkpoint only serves a resume; the learner folder now holds the result
        # (a re-run after a crash here sees the task in learner.json and skips training)
        shutil.rmtree(ctx.work_dir / "checkpoint", ignore_errors=True)
        return TrainResult(steps=res.steps, seconds=res.seconds, adapter_path=str(out / "adapter"), metrics=res.to_dict())

    # -- export: fused, built, and scored on the holdouts as a client runs it --------------------
    def _holdouts(self, ctx: JobContext, names: list[str]) -> tuple[dict, dict]:
        hd = _holdout_dir(ctx)
        tasks, labels = {}, {}
        for name in names:
            path = hd / f"{name}.jsonl"
            if path.is_file() and (recs := read_holdout(path)):
                tasks[name] = recs[: ctx.config.eval.max_examples or None]
                lab = hd / f"{name}.labels.json"
                labels[name] = json.loads(lab.read_text()).get("labels") if lab.is_file() else None
        return tasks, labels

    def export(self, ctx: JobContext) -> Path:
        from edgekif.errors import IntegrityError
        from edgekif.export import verify_manifest
        from edgekif.model import resolve_base
        from edgekif.records import Record
        from edgekif.trainer import read_learner_meta
        from edgekif.workflow import cache_root, export_adapter

        _quiet_transformers()
        out = ctx.work_dir / "export"
        if (out / "manifest.json").is_file():
            try:
                verify_manifest(out)
                return out
            except IntegrityError:
                log.warning("re-exporting: existing export does not verify", extra={"job": ctx.job_id})
        base = resolve_base(ctx.config.model, cache_root(ctx.config))
        learner_dir = _learner_dir(ctx.layout, ctx.job_id)
        tasks_seen = read_learner_meta(learner_dir).tasks_seen
        # Every task the model has learned, the new one last: the export is checked against the
        # fp32 model and scored on all of them, and these scores are what the gate judges.
        holdout, labels = self._holdouts(ctx, tasks_seen)
        if not holdout:  # a file too small for a holdout: checked on a prompt, agreement only
            holdout = {"prompts": [Record.from_prompt("Hello! What can you do?", "")]}
        t0 = time.perf_counter()
        result = export_adapter(
            ctx.config, base, learner_dir / "adapter", ctx.work_dir / "export-work", out, holdout=holdout, labels=labels,
            manifest_info={"tasks": manifest_tasks(ctx.layout, ctx.config, tasks_seen), "job_id": ctx.job_id},
        )
        log.info("export stage done", extra={"job_id": ctx.job_id, "seconds": round(time.perf_counter() - t0, 1)})
        # the fused fp32 copy (~0.5 GB for SmolLM2) is scratch: a re-run starts from the export
        shutil.rmtree(ctx.work_dir / "export-work", ignore_errors=True)
        return result

    # -- evaluate: the export's own figures + the base's zero-shot on the new task ----------------
    def evaluate(self, ctx: JobContext) -> EvalResult:
        from edgekif.export import read_manifest
        from edgekif.model import resolve_base
        from edgekif.workflow import cache_root, zero_shot_accuracy

        manifest = read_manifest(ctx.metrics["export"]["path"])
        accuracies = {k: float(v) for k, v in (manifest.get("accuracies") or {}).items()}
        zero_shot = {}
        new, _ = self._holdouts(ctx, [ctx.task_name])
        if new and ctx.task_name in accuracies:
            _quiet_transformers()
            base = resolve_base(ctx.config.model, cache_root(ctx.config))
            settings = {**manifest.get("export", {}), "builder_options": (manifest.get("parity") or {}).get("builder_options") or {}}
            zero_shot = zero_shot_accuracy(ctx.config, base, settings, new)
        return EvalResult(
            accuracies=accuracies,
            details={
                "measured_by": manifest.get("accuracies_measured_by"),
                "zero_shot": zero_shot,
                "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in (manifest.get("evaluation") or {}).items()},
                "reference": manifest.get("reference"),
                "parity": {k: v for k, v in (manifest.get("parity") or {}).items() if k != "per_task"},
            },
        )

    def gate(self, ctx: JobContext, result: EvalResult) -> tuple[bool, list[str]]:
        return publish_gate(result, ctx.published, ctx.config)

    # -- publish ----------------------------------------------------------------------------------
    def publish(self, ctx: JobContext, export_path: Path) -> str:
        from edgekif.export import read_manifest
        from edgekif.publish import ModelStore

        store = ModelStore(ctx.layout.root)
        cur = store.current()
        if cur is not None:
            try:
                if read_manifest(store.path(cur)).get("job_id") == ctx.job_id:
                    return cur  # a crash after the switch, before the daemon's commit
            except Exception:  # an unreadable current manifest: publish anew
                pass
        version = store.publish(export_path, keep=ctx.config.export.keep_versions)
        # models/<version> holds a verified copy now; the job's own copy would only fill the disk
        shutil.rmtree(export_path, ignore_errors=True)
        return version
