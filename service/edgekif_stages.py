"""The real pipeline stages: the edgekif library behind the `Stages` interface.

Every ML import happens inside a method, so an idle daemon never imports torch.

What each stage does:
  validate   reads the dropped file (edgekif.taskfile.read_task) and decides the task's spec
             (edgekif.tasks.read_task_spec: kind and metric, stated by a sidecar the watcher
             took with the file or detected from the records; recorded in the job's details)
  buffer     splits off the holdout (edgekif.holdouts) and stores the training share for
             replay; writes the spec beside the holdout (holdout/TASK.spec.json)
  train      one task of continual learning from the live version's learner state; an answer
             budget the sidecar did not state is decided here, from the training split's
             answers with the base's tokenizer (edgekif.tasks.answer_budget), and written into
             the spec file: the daemon (validate, buffer) never imports torch, and transformers'
             tokenizers do
  export     fuses the adapter, builds the export and runs the export check on the holdouts of
             every learned task, each answered with its spec's budget and scored by its metric (edgekif.workflow.export_adapter -> edgekif.export.exporter):
             the export's answers against the fp32 model's, variant by variant; the one that
             passes is written with its manifest, whose accuracies are that export's own exact
             match, measured in the same pass (answering the holdouts again would give the same)
  evaluate   the figures the gate judges: the export's accuracies, per-record scores and check
             from its manifest, and the base's zero-shot per-record scores on the new task (its
             spec's budget and metric), measured through the same export check
             (edgekif.workflow.zero_shot_scores -> edgekif.export.check)
  publish    the export becomes the next version (edgekif.publish.ModelStore)

Idempotency (a stage may be re-run after a crash that landed before the daemon committed):
  validate   pure read
  buffer     holdout/train split is a deterministic function of the file's SHA-256 and is
             written atomically; the replay insert is a no-op for a SHA-256 already stored
  train      resumes from jobs/<id>/checkpoint; skipped if jobs/<id>/learner already has the task
  export     skipped if jobs/<id>/export exists and its manifest verifies
  evaluate   the base's zero-shot score is cached per base and holdout
  publish    skipped if `current` already holds this export (same adapter hash)

Model continuity: a job starts from the learner state of the *live* job (the version
`models/current` points at: adapter and importance EMAs) and replays only the tasks that
version learned, so neither a held job nor a version rolled back over leaks into the next one.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

from edgekif.holdouts import read_holdout, read_holdouts, read_specs, write_holdout, write_records, write_spec

from .gates import paired_publish_gate
from .stages import BufferResult, EvalResult, JobContext, ShouldStop, TrainResult, ValidatedTask

log = logging.getLogger(__name__)


def holdout_share(service_cfg, kind: str) -> tuple[float, int]:
    """(fraction, cap) of a file's records kept out of training to judge a task of `kind`:
    service.holdout_fraction / holdout_max, or the generation_ ones for free text."""
    from edgekif.metrics import GENERATION

    if kind == GENERATION:
        return service_cfg.generation_holdout_fraction, service_cfg.generation_holdout_max
    return service_cfg.holdout_fraction, service_cfg.holdout_max


def holdout_size(service_cfg, kind: str, n_records: int) -> int:
    """How many of a file's n_records are kept out of training to judge it: the kind's share
    (holdout_share), at most its cap, always leaving at least one record to train on."""
    fraction, cap = holdout_share(service_cfg, kind)
    n = min(cap, int(round(fraction * n_records)))
    return min(n, n_records - 1) if n_records > 1 else 0


def split_holdout(records, sha256: str, n_holdout: int) -> tuple[list, list]:
    """(holdout, train) of a file's records: shuffled by the file's SHA-256, so the same file
    is always split the same way (the buffer stage may run again after a crash).

    Records that ask the same thing (the same messages, whitespace aside: a file made of two
    exports, a record repeated) stay on one side, so the gate never scores an answer to a
    prompt the model was trained on. Taken in shuffled order, a group goes to the holdout while
    it fits in `n_holdout`; without repeats this is the plain shuffled split. A file whose
    repeats leave nothing to hold out is split plainly."""
    records = list(records)
    random.Random(sha256).shuffle(records)
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault(tuple((role, " ".join(text.split())) for role, text in r.messages), []).append(r)
    holdout: list = []
    train: list = []
    for group in groups.values():
        (holdout if len(holdout) + len(group) <= n_holdout else train).extend(group)
    if n_holdout and not holdout:
        return records[:n_holdout], records[n_holdout:]
    return holdout, train


def manifest_tasks(layout, config, names: list[str]) -> list[dict]:
    """The manifest's record of the tasks a model has learned, in learning order."""
    from edgekif.replay import ReplayBuffer

    with ReplayBuffer(layout.replay_db, config.replay) as buf:
        per_task = buf.stats()["tasks"]
    out = []
    for name in names:
        st = per_task.get(name, {})
        hold = layout.holdout_file(name)
        out.append({
            "id": name,
            "name": name,
            "train_examples": st.get("records"),  # the training split the buffer was offered
            "holdout_examples": len(read_holdout(hold)) if hold.is_file() else None,  # kept for the gate
            "replay_stored": st.get("stored"),
            "source_file": st.get("source_file"),
        })
    return out


# Deprecations transformers 5.25 announces: peft reads `is_gradient_checkpointing` (removed in
# v6), edgekif.evaluate passes `past_key_values` (removed in 5.40); the pinned range (>=5.0,<5.40)
# removes neither. Train and export stages printed them (2-4 lines each) into the daemon's log; nothing to act on.
_KNOWN_DEPRECATIONS = r"`(is_gradient_checkpointing|past_key_values)` is deprecated"


def _quiet_transformers() -> None:
    """No progress bars in the daemon's log (they are for terminals), and no known deprecation
    notices that a user cannot act on; any other warning still reaches the log."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=_KNOWN_DEPRECATIONS, category=FutureWarning)


class LibraryStages:
    def __init__(self, config) -> None:
        self.config = config

    # -- validate ---------------------------------------------------------------------------
    def validate(self, ctx: JobContext) -> ValidatedTask:
        from edgekif.taskfile import read_task

        data = read_task(ctx.file_path, ctx.config.data)
        spec = self._spec(ctx, data.records)
        # read_task names the task after accepted/<sha12>_<name>; the user's name is what they dropped.
        return ValidatedTask(name=Path(ctx.file_name).stem, examples=len(data.records),
                             details={"format": data.format, "labels": data.labels, "spec": spec.to_dict()})

    @staticmethod
    def _spec(ctx: JobContext, records):
        """The task's spec without a tokenizer (the budget, unless stated, comes in train). The
        watcher copied a sidecar dropped with the file to accepted/<sha12>_NAME.task.toml,
        beside ctx.file_path under its stem: read_task_spec finds it there (TaskSpecError, a
        ValidationError naming the sidecar, line and key, when it is invalid)."""
        from edgekif.tasks import read_task_spec

        return read_task_spec(ctx.file_path, records)

    # -- buffer: holdout split + replay insert ------------------------------------------------
    def buffer(self, ctx: JobContext) -> BufferResult:
        from edgekif.taskfile import read_task
        from edgekif.replay import ReplayBuffer

        cfg = ctx.config
        data = read_task(ctx.file_path, cfg.data)
        spec = self._spec(ctx, data.records)  # as validate decided it (a pure function of the files)
        holdout, train = split_holdout(data.records, ctx.sha256, holdout_size(cfg.service, spec.kind, len(data.records)))
        holdout_path = write_holdout(ctx.layout.root, ctx.task_name, holdout, data.labels)
        write_spec(ctx.layout.root, ctx.task_name, spec)
        write_records(ctx.job_files.train_file, train)
        with ReplayBuffer(ctx.layout.replay_db, cfg.replay) as buf:
            res = buf.add_task(ctx.task_name, train, source_file=ctx.file_name, source_sha256=ctx.sha256)
        return BufferResult(
            holdout_path=str(holdout_path),
            holdout_examples=len(holdout),
            replay_inserted=0 if res.duplicate else res.stored,
            details={"train_examples": len(train), "duplicate": res.duplicate, "spec": spec.to_dict()},
        )

    # -- train ----------------------------------------------------------------------------------
    def train(self, ctx: JobContext, should_stop: ShouldStop) -> TrainResult:
        from edgekif.continual import StreamTask, learn_task
        from edgekif.replay import ReplayBuffer
        from edgekif.trainer import has_learner, learner_adapter, read_learner_meta
        from edgekif.workflow import open_learner

        _quiet_transformers()
        out = ctx.job_files.learner
        if has_learner(out) and ctx.task_name in read_learner_meta(out).tasks_seen:
            spec = self._decide_budget(ctx, None)
            return TrainResult(steps=0, adapter_path=str(learner_adapter(out)), metrics={"skipped": "already trained", **spec})
        start = ctx.layout.job(ctx.published.job_id).learner if ctx.published else None
        learner, base = open_learner(ctx.config, state_dir=start)
        spec = self._decide_budget(ctx, learner.tokenizer)
        task = StreamTask(ctx.task_name, read_holdout(ctx.job_files.train_file), source_file=ctx.file_name, source_sha256=ctx.sha256,
                          kind=spec.get("spec", {}).get("kind"))
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
            res = learn_task(learner, buf, task, past_tasks=ctx.past_tasks, remember=False, ckpt_dir=ctx.job_files.checkpoint,
                             should_stop=should_stop, progress=progress)
        learner.save(out)
        # the mid-task checkpoint only serves a resume; the learner folder now holds the result
        # (a re-run after a crash here sees the task in learner.json and skips training)
        shutil.rmtree(ctx.job_files.checkpoint, ignore_errors=True)
        return TrainResult(steps=res.steps, seconds=res.seconds, adapter_path=str(learner_adapter(out)), metrics={**res.to_dict(), **spec})

    @staticmethod
    def _decide_budget(ctx: JobContext, tokenizer) -> dict:
        """Complete the task's spec file with its answer budget, once: from the training split's
        answers, tokenized by the base's tokenizer (the one training encodes them with). Returns
        {"spec": ...} for the job's train metrics ({} for a task buffered before specs)."""
        from edgekif.tasks import answer_budget

        spec = read_specs(ctx.layout.root, [ctx.task_name]).get(ctx.task_name)
        if spec is None:
            return {}
        if spec.max_new_tokens is None:
            if tokenizer is None:
                from edgekif.model import load_tokenizer, resolve_base
                from edgekif.workflow import cache_root

                tokenizer = load_tokenizer(resolve_base(ctx.config.model, cache_root(ctx.config)).path, chat_template=ctx.config.model.chat_template)
            spec = spec.with_budget(answer_budget(tokenizer, read_holdout(ctx.job_files.train_file), spec.kind))
            write_spec(ctx.layout.root, ctx.task_name, spec)
        return {"spec": spec.to_dict()}

    # -- export: fused, built, and checked against the fp32 model on the holdouts -------------------
    def _holdouts(self, ctx: JobContext, names: list[str]) -> tuple[dict, dict]:
        return read_holdouts(ctx.layout.root, names, max_examples=ctx.config.eval.max_examples)

    def export(self, ctx: JobContext) -> Path:
        from edgekif.errors import IntegrityError
        from edgekif.export.files import MANIFEST
        from edgekif.export.manifest import record_general_ability, verify_manifest
        from edgekif.model import resolve_base
        from edgekif.records import Record
        from edgekif.trainer import learner_adapter, read_learner_meta
        from edgekif.workflow import cache_root, export_adapter, general_ability

        _quiet_transformers()
        out = ctx.job_files.export
        if (out / MANIFEST).is_file():
            try:
                done = verify_manifest(out)
            except IntegrityError:
                log.warning("re-exporting: existing export does not verify", extra={"job": ctx.job_id})
            else:
                if done.general_ability is None and ctx.config.general_ability.enabled:
                    # a stop between the export and its general figures: measure them now (the
                    # fused weights may be gone with the scratch: then without the log-likelihood)
                    fused = ctx.job_files.scratch / "fused"
                    record_general_ability(out, general_ability(ctx.config, resolve_base(ctx.config.model, cache_root(ctx.config)), out,
                                                                fused if (fused / "config.json").is_file() else None))
                return out
        base = resolve_base(ctx.config.model, cache_root(ctx.config))
        learner_dir = ctx.job_files.learner
        tasks_seen = read_learner_meta(learner_dir).tasks_seen
        # Every task the model has learned, the new one last: the export is checked against the
        # fp32 model and scored on all of them, and these scores are what the gate judges.
        holdout, labels = self._holdouts(ctx, tasks_seen)
        specs = read_specs(ctx.layout.root, list(holdout))  # tasks learned before specs have none
        if not holdout:  # a file too small for a holdout: checked on a prompt, agreement only
            holdout = {"prompts": [Record.from_prompt("Hello! What can you do?", "")]}
        t0 = time.perf_counter()
        result = export_adapter(
            ctx.config, base, learner_adapter(learner_dir), ctx.job_files.scratch, out, holdout=holdout, labels=labels, specs=specs,
            manifest_info={"tasks": manifest_tasks(ctx.layout, ctx.config, tasks_seen), "job_id": ctx.job_id},
            history_file=ctx.layout.export_history,
        )
        if ctx.config.general_ability.enabled:
            # measured here, while the fused fp32 weights are still on disk (the log-likelihood needs them)
            record_general_ability(out, general_ability(ctx.config, base, out, ctx.job_files.scratch / "fused"))
        log.info("export stage done", extra={"job_id": ctx.job_id, "seconds": round(time.perf_counter() - t0, 1)})
        # the fused fp32 copy (~0.5 GB for SmolLM2) is scratch: a re-run starts from the export
        shutil.rmtree(ctx.job_files.scratch, ignore_errors=True)
        return result

    # -- evaluate: the export's own figures + the base's zero-shot on the new task ----------------
    def evaluate(self, ctx: JobContext) -> EvalResult:
        from edgekif.export.manifest import read_manifest
        from edgekif.model import resolve_base
        from edgekif.holdouts import read_specs
        from edgekif.workflow import cache_root, zero_shot_scores

        manifest = read_manifest(ctx.metrics["export"]["path"])
        accuracies = {k: float(v) for k, v in manifest.accuracies.items()}
        base_scores: dict = {}
        new, _ = self._holdouts(ctx, [ctx.task_name])
        if new and ctx.task_name in accuracies:
            _quiet_transformers()
            base = resolve_base(ctx.config.model, cache_root(ctx.config))
            base_scores = zero_shot_scores(ctx.config, base, manifest.export_settings, new, read_specs(ctx.layout.root, [ctx.task_name]))
        return EvalResult(
            accuracies=accuracies,
            details={
                "measured_by": manifest.accuracies_measured_by,
                "zero_shot": {k: float(v["exact_match"]) for k, v in base_scores.items()},
                # the base's headline metric per record on the new task: the gate's paired test
                "zero_shot_scores": base_scores,
                # a new task none of whose records was held out (a file of 1-2 records): nothing to judge it by
                **({} if new.get(ctx.task_name) else {"unjudged": [ctx.task_name]}),
                "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in (manifest.evaluation or {}).items()},
                "reference": manifest.reference,
                # each task's kind, metric and budget, and its headline score on the export (None: no specs)
                "task_specs": manifest.task_specs,
                "scores": manifest.scores,
                "parity": {k: v for k, v in (manifest.parity or {}).items() if k != "per_task"},
            },
        )

    def gate(self, ctx: JobContext, result: EvalResult) -> tuple[bool, list[str], dict]:
        """Paired tests where per-record scores exist on both sides (service.gates); the
        decisions' figures go into the export's manifest before anything is published."""
        from edgekif.errors import IntegrityError
        from edgekif.export.manifest import read_manifest, record_gate

        export = Path(ctx.metrics["export"]["path"])
        live = None
        if ctx.published is not None:
            try:
                live = read_manifest(ctx.layout.version(ctx.published.version))
            except (IntegrityError, OSError):
                live = None  # a removed or damaged live version: the margin rules decide
        ok, reasons, decisions = paired_publish_gate(result, ctx.published, ctx.config, read_manifest(export), live)
        record_gate(export, {"passed": ok, "reasons": reasons, "confidence": ctx.config.service.gate_confidence,
                             "tolerance_points": ctx.config.service.forgetting_threshold,
                             "min_gain_over_base_points": ctx.config.service.min_gain_over_base, "decisions": decisions})
        return ok, reasons, decisions

    # -- publish ----------------------------------------------------------------------------------
    def publish(self, ctx: JobContext, export_path: Path) -> str:
        from edgekif.export.manifest import read_manifest
        from edgekif.publish import ModelStore

        store = ModelStore(ctx.layout.root)
        cur = store.current()
        if cur is not None:
            try:
                if read_manifest(store.path(cur)).job_id == ctx.job_id:
                    return cur  # a crash after the switch, before the daemon's commit
            except Exception:  # an unreadable current manifest: publish anew
                pass
        version = store.publish(export_path, keep=ctx.config.export.keep_versions)
        # models/<version> holds a verified copy now; the job's own copy would only fill the disk
        shutil.rmtree(export_path, ignore_errors=True)
        return version
