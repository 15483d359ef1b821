"""The run across tasks: the one place that learns a stream of tasks with a replay buffer.

    learn_task(learner, buffer, task)                   # past tasks -> replay sampler -> train -> remember
    evaluate_tasks(cfg, model, tok, {name: records})    # one row of accuracies (cfg.eval settings)
    run_stream(learner, buffer, tasks, evaluate=...)    # every task in order, accuracy matrix

`edgekif train`, `tools/bench_cl.py` and the daemon's train stage go through here (the daemon's
evaluate stage does not: it scores the export), so the rules are written once:
  * replay draws only from *past* tasks (never the task being learned), and only from the
    tasks the caller allows (the daemon: tasks of published versions);
  * a strategy that does not replay never gets a sampler;
  * a joint strategy (the multi-task upper bound) trains once on the union of all tasks, with
    at least the gradient steps the replay strategies take on the same stream (joint_steps:
    each task's steps plus the replay rounds of Recurrent-KIF's schedule on every later task),
    and is scored after that one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .accuracy_matrix import AccuracyMatrix
from .config import Config
from .compute import compute_dtype
from .evaluate import EvalScores, evaluate_task
from .records import Record
from .rehearsal import mix_general
from .replay import ReplayBuffer
from .trainer import Learner, ProgressFn, ReplaySampler, TrainStats


def joint_steps(cfg: Config, task_sizes: Sequence[int]) -> int:
    """Gradient steps of joint training on a stream of tasks of these sizes: as many as the
    replay strategies take on it, so the upper bound is not an upper bound for want of steps
    (16 steps a task, four tasks: 16 x 4 = 64 task steps, but replay and Recurrent-KIF also take
    8 replay steps on each later task, at Q=8/M=4 as at Q=2/M=1: 88 in all). Counted on [kif]'s
    schedule, Recurrent-KIF's: where a task's steps are not a multiple of both schedules' Q, the
    replay strategy's own Q/M can give it a few replay steps more or fewer."""
    from .schedule import task_steps
    from .strategies.base import interleaved_schedule

    t = cfg.train
    per_task = [t.max_steps or task_steps(n, t.batch_size, t.epochs, t.min_steps, t.steps_cap) for n in task_sizes]
    kif = getattr(cfg, "kif", None)  # the schedule the replay strategies are compared under
    inner, outer = (kif.inner_steps, kif.outer_steps) if kif is not None else (1, 0)
    return sum(len(interleaved_schedule(steps, inner, outer, j > 0)) for j, steps in enumerate(per_task))


@dataclass
class StreamTask:
    """One task of a stream: its name, its training records, where they came from, and its
    kind (edgekif.tasks: "classification" or "generation"; None = not known), which picks
    the rates it trains at (edgekif.trainer.lr_scale_for)."""

    name: str
    records: Sequence[Record]
    source_file: str = ""
    source_sha256: str = ""
    kind: str | None = None


def replay_sampler(buffer: ReplayBuffer, task_ids: Sequence[str]) -> ReplaySampler | None:
    """(n, seed) -> up to n stored examples of `task_ids`; None when there is nothing to replay."""
    ids = list(task_ids)
    if not ids:
        return None
    return lambda n, seed: buffer.sample(n, seed, task_ids=ids)


def learn_task(
    learner: Learner,
    buffer: ReplayBuffer,
    task: StreamTask,
    *,
    past_tasks: Sequence[str] | None = None,
    remember: bool = True,
    max_steps: int | None = None,
    ckpt_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
) -> TrainStats:
    """Train `task` with replay of past tasks, then offer its records to the buffer.

    past_tasks: the tasks replay may draw from (default: every task in the buffer). The task
    itself is always excluded. remember=False leaves the buffer alone (the daemon stores a
    task's share at its own buffer step, committed before training starts).
    """
    stored = buffer.tasks()
    allowed = set(stored if past_tasks is None else past_tasks)
    past = [t for t in stored if t != task.name and t in allowed]
    sampler = replay_sampler(buffer, past) if learner.strategy.uses_replay else None
    if sampler is not None and learner.rehearsal_source is not None and learner.cfg.replay.general_share > 0:
        # the base's general answers beside the past tasks (edgekif.rehearsal)
        sampler = mix_general(sampler, learner.rehearsal_source(), learner.cfg.replay.general_share)
    result = learner.train_task(task.name, task.records, replay=sampler, ckpt_dir=ckpt_dir, should_stop=should_stop, progress=progress, max_steps=max_steps,
                                 task_kind=task.kind)
    if remember:
        buffer.add_task(task.name, task.records, source_file=task.source_file, source_sha256=task.source_sha256)
    return result


def evaluate_tasks(cfg: Config, model, tokenizer, tasks: Mapping[str, Sequence[Record]], labels: Mapping[str, list[str] | None] | None = None) -> dict[str, EvalScores]:
    """Score each task (in the given order) on its test or holdout records, with cfg.eval."""
    out = {}
    for name, recs in tasks.items():
        with compute_dtype(model, cfg.eval.compute_dtype):
            out[name] = evaluate_task(
                model,
                tokenizer,
                list(recs),
                labels=(labels or {}).get(name),
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                max_examples=cfg.eval.max_examples,
                label_scoring=cfg.eval.label_scoring,
                max_prompt_tokens=cfg.eval.max_prompt_tokens,
            )
    return out


EvaluateFn = Callable[[Learner, str], float]  # (learner, task name) -> accuracy in [0, 1]


@dataclass
class StreamResult:
    order: list[str]
    matrix: AccuracyMatrix
    results: list[TrainStats] = field(default_factory=list)


def run_stream(
    learner: Learner,
    buffer: ReplayBuffer,
    tasks: Sequence[StreamTask],
    *,
    evaluate: EvaluateFn | None = None,
    score_before: bool = False,
    cells: str = "all",
    ckpt_root: Path | None = None,
    progress: Callable[[str], ProgressFn | None] | None = None,
    on_task: Callable[[int, TrainStats, AccuracyMatrix], None] | None = None,
) -> StreamResult:
    """Learn `tasks` in order and fill the accuracy matrix a[j][i] (after task j, on task i).

    evaluate: scores one task (None: no matrix entries). score_before: also score each task
    just before it is learned (row j-1, column j: what FWT needs). cells: "all" scores every
    task seen so far after each task (the whole lower triangle); "metrics" only the cells OP,
    BWT and plasticity read: the task just learned, and every task after the last one (2T-1
    evaluations instead of T(T+1)/2). progress(name) returns the per-step callback for that
    task; on_task(j, result, matrix) runs after each task's row.
    """
    if cells not in ("all", "metrics"):
        raise ValueError(f"cells must be 'all' or 'metrics', not {cells!r}")
    order = [t.name for t in tasks]
    matrix = AccuracyMatrix(order)
    out = StreamResult(order=order, matrix=matrix)
    if learner.strategy.joint:
        kinds = {t.kind for t in tasks}
        union = StreamTask("+".join(order), [r for t in tasks for r in t.records], kind=kinds.pop() if len(kinds) == 1 else None)
        res = learn_task(learner, buffer, union, remember=False, max_steps=joint_steps(learner.cfg, [len(t.records) for t in tasks]),
                         ckpt_dir=ckpt_root / union.name if ckpt_root else None, progress=progress(union.name) if progress else None)
        out.results.append(res)
        last = len(order) - 1
        if evaluate is not None:
            for i, name in enumerate(order):
                matrix.set(last, i, evaluate(learner, name))
        if on_task is not None:
            on_task(last, res, matrix)
        return out
    for j, task in enumerate(tasks):
        if evaluate is not None and score_before and j > 0:
            matrix.set(j - 1, j, evaluate(learner, task.name))
        res = learn_task(learner, buffer, task, ckpt_dir=ckpt_root / task.name if ckpt_root else None,
                         progress=progress(task.name) if progress else None)
        out.results.append(res)
        if evaluate is not None:
            last = j == len(tasks) - 1
            for i in range(j + 1) if cells == "all" or last else (j,):
                matrix.set(j, i, evaluate(learner, order[i]))
        if on_task is not None:
            on_task(j, res, matrix)
    return out
