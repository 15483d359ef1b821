"""Continual-learning strategies behind one interface (see base.Strategy)."""

from __future__ import annotations

from ..config import KIFConfig, TrainConfig
from .base import REPLAY, TASK, Strategy
from .baselines import ExperienceReplay, MultiTask, SeqLoRA
from .recurrent_kif import RecurrentKIF

STRATEGIES: dict[str, type[Strategy]] = {
    "recurrent_kif": RecurrentKIF,
    "seq_lora": SeqLoRA,
    "replay": ExperienceReplay,
    "mtl": MultiTask,
}


def make_strategy(name: str, train: TrainConfig, kif: KIFConfig) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
    return cls(train, kif)


__all__ = ["STRATEGIES", "make_strategy", "Strategy", "TASK", "REPLAY", "RecurrentKIF", "SeqLoRA", "ExperienceReplay", "MultiTask"]
