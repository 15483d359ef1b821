"""The one interface every continual-learning strategy implements.

The training loop (edgekif.trainer.Learner.train_task) is the same for all strategies. A
strategy decides only:
  * the step schedule: which steps draw a batch of the new task ("task") and which draw
    from the replay buffer ("replay");
  * which optimizer takes each step;
  * hooks around a step (Recurrent-KIF tracks importance and fuses there);
  * whether it trains on all tasks jointly (`joint`: the continual loop then concatenates
    the tasks' data itself, callers never test a strategy's name).

Lifecycle, called by the Learner and the trainer:
  setup(params)          once, with the trainable LoRA parameters
  begin_task(index)      before each task (and before a resume): fresh optimizers
  ... steps ...
State has two lifetimes: `persistent_state()` survives across tasks (saved with the learner,
e.g. Recurrent-KIF's importance EMAs); `checkpoint_state()` is everything needed to resume
mid-task (persistent state + mid-task snapshots). `load_state()` takes either.
"""

from __future__ import annotations

from typing import Mapping

import torch

from . import REPLAY, TASK
from .config import StrategyConfig
from ..config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # foreach=False keeps the update order fixed, so resumed runs match bit for bit on CPU.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


class Strategy:
    """Base class: plain sequential fine-tuning of the LoRA parameters (no replay)."""

    name = "base"
    uses_replay = False
    joint = False  # trains once on the union of all tasks (the multi-task upper bound)

    def __init__(self, train: TrainConfig, config: StrategyConfig | None = None):
        self.train_cfg = train
        self.config = config if config is not None else StrategyConfig()
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.fusions = 0  # per task; only Recurrent-KIF fuses

    # -- lifecycle ----------------------------------------------------------------------
    def setup(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Called once with the trainable LoRA parameters (name -> Parameter)."""
        self.params = dict(params)

    def begin_task(self, task_index: int) -> None:
        """Called before the first step of each task (also before a resume loads its
        checkpoint): fresh optimizers per task, as the authors' per-task runs."""
        self.optimizers = {"main": make_optimizer(list(self.params.values()), self.train_cfg.lr, self.train_cfg.weight_decay)}
        self.fusions = 0

    # -- schedule -----------------------------------------------------------------------
    def schedule(self, task_steps: int, replay_available: bool) -> list[str]:
        return [TASK] * task_steps

    def optimizer(self, kind: str) -> torch.optim.Optimizer:
        return self.optimizers["main"]

    # -- hooks --------------------------------------------------------------------------
    def before_step(self, kind: str, prev_kind: str | None) -> None:
        pass

    def after_backward(self, kind: str) -> None:
        pass

    def after_step(self, kind: str, next_kind: str | None) -> bool:
        """Return True at a boundary worth checkpointing (e.g. right after a fusion)."""
        return False

    # -- state ----------------------------------------------------------------------------
    def persistent_state(self) -> dict[str, torch.Tensor]:
        """Tensors that carry over to the next task (saved with the learner)."""
        return {}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume in the middle of a task."""
        return self.persistent_state()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what persistent_state() or checkpoint_state() returned."""

    def state_nbytes(self) -> dict[str, int]:
        """Extra bytes this strategy holds beyond the LoRA weights and their gradients."""
        out = {"optimizers": _optimizer_nbytes(self.optimizers.values())}
        out["strategy_state"] = sum(t.numel() * t.element_size() for t in self.checkpoint_state().values() if t.dim() > 0)
        return out


def _optimizer_nbytes(opts) -> int:
    total = 0
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += v.numel() * v.element_size()
    return total


def interleaved_schedule(task_steps: int, inner: int, outer: int, replay_available: bool) -> list[str]:
    """Rounds of `inner` task steps followed by `outer` replay steps (the last round may be short)."""
    if not replay_available or outer == 0:
        return [TASK] * task_steps
    kinds: list[str] = []
    done = 0
    while done < task_steps:
        q = min(inner, task_steps - done)
        kinds += [TASK] * q + [REPLAY] * outer
        done += q
    return kinds
