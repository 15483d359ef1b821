"""Continual-learning strategies behind one interface (see base.Strategy), peft-style:
one registry ties each strategy's name to its class and its config dataclass, and
`make_strategy` is the one entry point.

The registry is torch-free (strategy classes are imported on first use), so the config
loader, the CLI's choices and the idle daemon can read it without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import KIFConfig, ReplayScheduleConfig, StrategyConfig

if TYPE_CHECKING:
    from ..config import Config
    from .base import Strategy

TASK = "task"
REPLAY = "replay"


@dataclass(frozen=True)
class StrategySpec:
    target: str  # "module:Class", relative to this package
    config_cls: type[StrategyConfig]
    section: str | None  # the Config section holding its options ([kif]), None = no options
    summary: str

    def load(self) -> "type[Strategy]":
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module, __name__), cls)


STRATEGIES: dict[str, StrategySpec] = {
    "recurrent_kif": StrategySpec(".recurrent_kif:RecurrentKIF", KIFConfig, "kif", "Recurrent-KIF: inner/outer loops, importance-masked fusion"),
    "seq_lora": StrategySpec(".baselines:SeqLoRA", StrategyConfig, None, "sequential LoRA fine-tuning, no replay (lower bound)"),
    "replay": StrategySpec(".baselines:ExperienceReplay", ReplayScheduleConfig, "kif", "experience replay on KIF's schedule, no fusion"),
    "mtl": StrategySpec(".baselines:MultiTask", StrategyConfig, None, "joint training on all tasks at once (upper bound)"),
}


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def strategy_config(name: str, cfg: "Config") -> StrategyConfig:
    """The options the named strategy runs with, taken from the loaded configuration."""
    spec = _spec(name)
    return getattr(cfg, spec.section) if spec.section else spec.config_cls()


def make_strategy(name: str, cfg: "Config") -> "Strategy":
    spec = _spec(name)
    return spec.load()(cfg.train, strategy_config(name, cfg))


def _spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "StrategySpec", "make_strategy", "strategy_config", "strategy_names", "TASK", "REPLAY", "KIFConfig", "ReplayScheduleConfig", "StrategyConfig"]
