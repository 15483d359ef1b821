"""Strategy configurations, torch-free so the idle daemon can read its config without torch.

Each strategy's options are one dataclass here, tied to the strategy in the registry
(`edgekif.strategies.STRATEGIES`). The TOML file keeps its sections: `[kif]` holds the
interleaved schedule (shared by `replay` and `recurrent_kif`, so the comparison isolates the
fusion rule) and Recurrent-KIF's own options.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StrategyConfig:
    """A strategy with no options of its own (seq_lora, mtl)."""


@dataclass
class ReplayScheduleConfig(StrategyConfig):
    """Rounds of `inner_steps` task steps followed by `outer_steps` replay steps."""

    inner_steps: int = 8  # Q
    outer_steps: int = 4  # M
    replay_batch_size: int = 8


@dataclass
class KIFConfig(ReplayScheduleConfig):
    """Recurrent-KIF (paper + authors' code; README "Recurrent-KIF, as implemented")."""

    outer_lr: float = 1e-3
    beta1: float = 0.85  # EMA of sensitivity (authors' code; paper 0.55)
    beta2: float = 0.85  # EMA of uncertainty
    mask_quantile: float = 0.8  # keep the top 20% by score
    w_both_in: float = 0.4  # element set in both masks: 0.4*tau_in + 0.6*tau_out
    w_both_out: float = 0.6
    w_neither_in: float = 0.5  # element set in neither mask: 0.5*tau_in + 0.5*tau_out
    w_neither_out: float = 0.5
    reset_importance: bool = False  # reset EMAs at each new task
