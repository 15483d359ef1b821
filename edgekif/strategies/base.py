"""The one interface every continual-learning strategy implements.

The training loop (edgekif.trainer.train_task) is the same for all strategies. A strategy
decides three things only:
  * the step schedule: which steps draw a batch of the new task ("task") and which draw
    from the replay buffer ("replay");
  * which optimizer takes each step;
  * hooks around a step (Recurrent-KIF tracks importance and fuses there).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import KIFConfig, TrainConfig

TASK = "task"
REPLAY = "replay"


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # foreach=False keeps the update order fixed, so resumed runs match bit for bit on CPU.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


class Strategy:
    """Base class: plain sequential fine-tuning of the LoRA parameters (no replay)."""

    name = "base"
    uses_replay = False

    def __init__(self, train: TrainConfig, kif: KIFConfig):
        self.train_cfg = train
        self.kif_cfg = kif
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # -- set-up -------------------------------------------------------------------------
    def setup(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Called once with the trainable LoRA parameters (name -> Parameter)."""
        self.params = dict(params)
        self.optimizers = {"main": make_optimizer(list(self.params.values()), self.train_cfg.lr, self.train_cfg.weight_decay)}

    def begin_task(self, task_index: int) -> None:
        """Called before the first step of each task (also after a resume)."""

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

    # -- state (for checkpoint/resume) ----------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        pass

    def state_nbytes(self) -> dict[str, int]:
        """Extra bytes this strategy holds beyond the LoRA weights and their gradients."""
        out = {"optimizers": _optimizer_nbytes(self.optimizers.values())}
        out["strategy_state"] = sum(t.numel() * t.element_size() for t in self.state_tensors().values() if t.dim() > 0)
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
