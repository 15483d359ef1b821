"""Continual-learning strategies behind one interface (see base.Strategy), peft-style:
each strategy registers its name, class and config dataclass with `register_strategy` (as
peft's `register_peft_method`), which also gives its options a section of the config file
(edgekif.config does not import the strategies: `import edgekif` imports this package).
`make_strategy` is the one entry point.

The registry is torch-free (strategy classes are imported on first use), so the config
loader, the CLI's choices and the idle daemon can read it without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import register_strategy_config
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
    section: str | None  # the config section holding its options ([kif]), None = no options
    summary: str
    joint: bool = False  # trains once on every task's data (Strategy.joint): it cannot learn one task at a time

    def load(self) -> "type[Strategy]":
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module, __name__), cls)


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(name: str, target: str, config_cls: type[StrategyConfig] = StrategyConfig, section: str | None = None, summary: str = "",
                      joint: bool = False) -> None:
    """Add a strategy: `target` is "module:Class" (relative to this package), its options
    `config_cls` are read from `[section]` of the config file; `joint` as its class's."""
    register_strategy_config(name, section, config_cls)
    STRATEGIES[name] = StrategySpec(target, config_cls, section, summary, joint)


register_strategy("recurrent_kif", ".recurrent_kif:RecurrentKIF", KIFConfig, "kif", "Recurrent-KIF: inner/outer loops, importance-masked fusion")
register_strategy("seq_lora", ".baselines:SeqLoRA", summary="sequential LoRA fine-tuning, no replay (lower bound)")
# its own section, with the same defaults as [kif]'s schedule: the comparison isolates the fusion rule
register_strategy("replay", ".baselines:ExperienceReplay", ReplayScheduleConfig, "experience_replay", "experience replay on KIF's schedule, no fusion")
register_strategy("mtl", ".baselines:MultiTask", summary="joint training on all tasks at once (upper bound)", joint=True)


def one_task_at_a_time(name: str) -> None:
    """ConfigError unless the strategy can learn a stream one task at a time, as the daemon
    does (a joint strategy given one file would be sequential LoRA in silence; run_stream gives
    it the union of the stream's tasks)."""
    from ..errors import ConfigError

    if _spec(name).joint:
        raise ConfigError(f"train.strategy = {name!r} trains once on every task's data together (the multi-task upper bound); "
                          "the daemon learns one file at a time: use recurrent_kif, replay or seq_lora there, "
                          f"and {name!r} with `edgekif train` or tools/bench_cl.py")


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


__all__ = ["STRATEGIES", "StrategySpec", "make_strategy", "register_strategy", "strategy_config", "strategy_names", "TASK", "REPLAY", "KIFConfig", "ReplayScheduleConfig", "StrategyConfig"]
