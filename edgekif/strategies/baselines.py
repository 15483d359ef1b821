"""Baselines that run through the same loop as Recurrent-KIF."""

from __future__ import annotations

from .base import Strategy, interleaved_schedule
from .config import ReplayScheduleConfig


class SeqLoRA(Strategy):
    """Sequential LoRA fine-tuning: each task trains the same adapter, no replay."""

    name = "seq_lora"


class ExperienceReplay(Strategy):
    """Plain experience replay: the same interleaved schedule and replay batches as
    Recurrent-KIF (Q task steps, then M buffer steps), one optimizer, no knowledge
    identification or fusion. The only difference to recurrent_kif is the fusion rule, so the
    comparison isolates it."""

    name = "replay"
    uses_replay = True
    config: ReplayScheduleConfig

    def schedule(self, task_steps: int, replay_available: bool) -> list[str]:
        return interleaved_schedule(task_steps, self.config.inner_steps, self.config.outer_steps, replay_available)


class MultiTask(Strategy):
    """Multi-task upper bound: trained once on all tasks' data shuffled together. The
    continual loop (edgekif.continual) sees `joint` and concatenates the tasks itself."""

    name = "mtl"
    joint = True
