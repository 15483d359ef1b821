"""Recurrent-KIF (Feng et al., ACL 2025, arXiv 2502.17510) as a strategy.

Per round b (all tensors are LoRA tensors):
  theta_b                       snapshot at the round's start
  Q inner steps on the new task   -> theta_in;   tau_in  = theta_in - theta_b
  M outer steps on replay batches -> theta_out;  tau_out = theta_out - theta_in
  masks m_in, m_out = top (1 - quantile) share of sensitivity*uncertainty, globally
  theta_{b+1} = theta_b + w_in(m) * tau_in + w_out(m) * tau_out
with (w_in, w_out) = (0.4, 0.6) where both masks are set, (1, 0) only inner, (0, 1) only
outer, (0.5, 0.5) neither (the authors' code). The outer loop starts from the inner-updated
weights and has its own optimizer (lr = kif.outer_lr), or with kif.shared_optimizer steps the
inner loop's one, as the authors' code does. Without replay data (the first task)
training is plain LoRA; importance is still tracked.

Memory: two snapshots (theta_b, theta_in), two trackers x 2 EMAs, masks built per tensor at
fusion time; tau_in/tau_out are never stored (computed from the snapshots and the live weights).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..importance import FusionWeights, ImportanceTracker, fuse, top_share_masks
from . import REPLAY, TASK
from .base import Strategy, interleaved_schedule, make_optimizer
from .config import KIFConfig

_MID_TASK = ("theta_b.", "theta_in.")  # snapshot keys: checkpoint-only state


class RecurrentKIF(Strategy):
    name = "recurrent_kif"
    uses_replay = True
    config: KIFConfig

    def setup(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        super().setup(params)
        k = self.config
        # importance lives as long as the learner: it carries across tasks unless reset_importance
        self.inner = ImportanceTracker(self.params, k.beta1, k.beta2)
        self.outer = ImportanceTracker(self.params, k.beta1, k.beta2)
        self.weights = FusionWeights(k.w_both_in, k.w_both_out, k.w_neither_in, k.w_neither_out)
        self.theta_b: dict[str, torch.Tensor] | None = None
        self.theta_in: dict[str, torch.Tensor] | None = None
        self.last_fusion: dict[str, float] = {}

    def begin_task(self, task_index: int) -> None:
        plist = list(self.params.values())
        if self.config.shared_optimizer:
            self.optimizers = {"main": make_optimizer(plist, self.train_cfg.lr, self.train_cfg.weight_decay)}
        else:
            self.optimizers = {
                "inner": make_optimizer(plist, self.train_cfg.lr, self.train_cfg.weight_decay),
                "outer": make_optimizer(plist, self.config.outer_lr, self.train_cfg.weight_decay),
            }
        self.fusions = 0
        self.theta_b = self.theta_in = None
        if self.config.reset_importance:
            self.inner.reset()
            self.outer.reset()

    def schedule(self, task_steps: int, replay_available: bool) -> list[str]:
        return interleaved_schedule(task_steps, self.config.inner_steps, self.config.outer_steps, replay_available)

    def optimizer(self, kind: str) -> torch.optim.Optimizer:
        if "main" in self.optimizers:  # kif.shared_optimizer
            return self.optimizers["main"]
        return self.optimizers["outer" if kind == REPLAY else "inner"]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def before_step(self, kind: str, prev_kind: str | None) -> None:
        if kind == TASK and prev_kind != TASK and self.theta_b is None:
            self.theta_b = self._snapshot()  # round start
        elif kind == REPLAY and prev_kind == TASK:
            self.theta_in = self._snapshot()  # inner loop done

    def after_backward(self, kind: str) -> None:
        (self.outer if kind == REPLAY else self.inner).update(self.params)

    def after_step(self, kind: str, next_kind: str | None) -> bool:
        if kind == REPLAY and next_kind != REPLAY:
            self._fuse()
            return True
        if kind == TASK and next_kind is None:
            self.theta_b = None  # task ended without replay (first task): plain LoRA, nothing to fuse
        return False

    @torch.no_grad()
    def _fuse(self) -> None:
        assert self.theta_b is not None and self.theta_in is not None
        q = self.config.mask_quantile
        m_in = top_share_masks(self.inner.scores(), q)
        m_out = top_share_masks(self.outer.scores(), q)
        counts, total = [], 0  # mask overlap, summed on the device: one host sync a fusion
        for n, p in self.params.items():
            tb, ti = self.theta_b[n], self.theta_in[n]
            p.copy_(fuse(tb, ti - tb, p.detach() - ti, m_in[n], m_out[n], self.weights))
            mi, mo = m_in[n], m_out[n]
            counts.append(torch.stack([(mi & mo).sum(), (mi & ~mo).sum(), (mo & ~mi).sum()]))
            total += mi.numel()
        both, only_in, only_out = torch.stack(counts).sum(0).tolist() if counts else (0, 0, 0)
        self.fusions += 1
        self.last_fusion = {"both": both / max(1, total), "only_in": only_in / max(1, total), "only_out": only_out / max(1, total)}
        self.theta_b = None  # the next round snapshots the fused weights
        self.theta_in = None

    # -- state -----------------------------------------------------------------------------
    def persistent_state(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict("inner."), **self.outer.state_dict("outer.")}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        out = self.persistent_state()
        if self.theta_b is not None:
            out.update({f"theta_b.{n}": t for n, t in self.theta_b.items()})
        if self.theta_in is not None:
            out.update({f"theta_in.{n}": t for n, t in self.theta_in.items()})
        out["fusions"] = torch.tensor(self.fusions)
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state, "inner.")
        self.outer.load_state_dict(state, "outer.")
        if any(k.startswith(_MID_TASK) or k == "fusions" for k in state):  # a mid-task checkpoint
            names = list(self.params)
            self.theta_b = {n: state[f"theta_b.{n}"].clone() for n in names} if f"theta_b.{names[0]}" in state else None
            self.theta_in = {n: state[f"theta_in.{n}"].clone() for n in names} if f"theta_in.{names[0]}" in state else None
            self.fusions = int(state["fusions"]) if "fusions" in state else self.fusions

    def state_nbytes(self) -> dict[str, int]:
        out = super().state_nbytes()
        out["importance"] = self.inner.nbytes() + self.outer.nbytes()
        lora = sum(p.numel() * p.element_size() for p in self.params.values())
        out["snapshots_peak"] = 2 * lora
        return out
