"""The step policy of a training job: how many steps, at what learning rate, for how long.

  task_steps(n_examples, batch_size, epochs, min_steps, max_steps)   # steps follow the data
  lr_multiplier(step, total, warmup_ratio, min_lr_ratio, decay)      # warmup, then decay
  Deadline(max_minutes)                                              # wall-time budget per job
  can_stop_before(kinds, step)                                       # where a budget stop is clean

Pure functions (no torch): the trainer applies them. Config: train.epochs, train.min_steps,
train.steps_cap, train.max_steps (exact override), train.warmup_ratio, train.min_lr_ratio,
train.lr_decay, train.max_minutes.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from .errors import ConfigError
from .strategies import REPLAY  # torch-free: the replay step kind

DECAYS = ("cosine", "linear", "constant")


def task_steps(n_examples: int, batch_size: int, epochs: float = 1.0, min_steps: int = 0, max_steps: int = 0) -> int:
    """Gradient steps on a task: `epochs` passes over the data, at least `min_steps` and at
    most `max_steps` (0 = no cap), and never fewer than one.

    The floor is for small files: 48 examples at batch 8 are 6 steps per epoch, too few to
    learn a task; with min_steps=16 they are seen ~2.7 times. The cap bounds big files.
    """
    if n_examples < 1:
        raise ConfigError(f"a task needs at least one example, got {n_examples}")
    if batch_size < 1:
        raise ConfigError(f"train.batch_size must be positive, got {batch_size}")
    if epochs <= 0 or not math.isfinite(epochs):
        raise ConfigError(f"train.epochs must be a positive number, got {epochs}")
    if min_steps < 0 or max_steps < 0:
        raise ConfigError(f"train.min_steps and the step cap must be >= 0 (0 = none), got {min_steps} and {max_steps}")
    if max_steps and min_steps > max_steps:
        raise ConfigError(f"train.min_steps ({min_steps}) is above the step cap ({max_steps})")
    # round() first: 0.1 * 30 / 1 is 3.0000000000000004 in floats, which ceil makes 4
    steps = math.ceil(round(epochs * n_examples / batch_size, 9))
    steps = max(1, min_steps, steps)
    return min(steps, max_steps) if max_steps else steps


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warmup steps for a schedule of `total` steps (0 when the ratio is 0)."""
    return min(total, math.ceil(round(warmup_ratio * total, 9))) if warmup_ratio > 0 else 0


def lr_multiplier(step: int, total: int, warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0, decay: str = "cosine") -> float:
    """Factor on the base learning rate for 0-based `step` of `total` steps.

    Linear warmup over the first ceil(warmup_ratio * total) steps, reaching 1 at its last step
    (step 0 gets 1/warmup, not 0: a step at lr 0 would be wasted), then a decay from there to
    `min_lr_ratio` at the last step: half a cosine, a straight line, or none ("constant").
    """
    if total < 1 or not 0 <= step < total:
        raise ValueError(f"step {step} is outside a schedule of {total} steps")
    if not 0 <= warmup_ratio < 1 or not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1], got {warmup_ratio} and {min_lr_ratio}")
    if decay not in DECAYS:
        raise ConfigError(f"train.lr_decay: {decay!r} not in {'|'.join(DECAYS)}")
    warm = warmup_steps(total, warmup_ratio)
    if step < warm:
        return (step + 1) / warm
    if decay == "constant":
        return 1.0
    peak = max(0, warm - 1)  # the step at the full rate: warmup's last, or the first
    span = total - 1 - peak  # steps after the peak; the last one reaches min_lr_ratio
    if span <= 0:
        return 1.0
    progress = (step - peak) / span
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


class Deadline:
    """A job's wall-time budget. `max_minutes` <= 0 means no limit.

    `expired(next_step_seconds)` is True once the budget is spent, or when a step expected to
    take `next_step_seconds` would end past it (so a job can stop before overrunning).
    """

    def __init__(self, max_minutes: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_minutes < 0 or not math.isfinite(max_minutes):
            raise ConfigError(f"train.max_minutes must be >= 0 (0 = no limit), got {max_minutes}")
        self.clock = clock
        self.start = clock()
        self.seconds = max_minutes * 60.0
        self.end = self.start + self.seconds if max_minutes > 0 else math.inf

    @property
    def limited(self) -> bool:
        return self.end != math.inf

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left (inf without a limit; never negative)."""
        return max(0.0, self.end - self.clock()) if self.limited else math.inf

    def expired(self, next_step_seconds: float = 0.0) -> bool:
        return self.limited and self.clock() + max(0.0, next_step_seconds) >= self.end


def can_stop_before(kinds: Sequence[str], step: int) -> bool:
    """Whether training may stop cleanly before `kinds[step]` (the strategy's step schedule).

    Strategies that interleave task and replay steps (Recurrent-KIF) fuse at the end of each
    round's replay steps; stopping inside a round would skip that fusion. So with replay steps
    in the schedule a stop is clean only at the start or right after a replay step; without
    them, before any step. The schedule's end is always clean.
    """
    if not 0 <= step <= len(kinds):
        raise ValueError(f"step {step} is outside a schedule of {len(kinds)} steps")
    if step == 0 or step == len(kinds) or REPLAY not in kinds:
        return True
    return kinds[step - 1] == REPLAY and kinds[step] != REPLAY  # the fusion follows a round's last replay step
