"""Compositions of the library used by the CLI, the benchmarks and the daemon's stages.

Each function is one step a user thinks in: open a learner (base + LoRA + strategy state),
fuse-export-publish a trained adapter. The run across tasks is edgekif.continual.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from .config import Config, xdg_dir
from .model import BaseModel, add_lora, load_model, load_tokenizer, resolve_base, resolve_device, resolve_precision
from .trainer import Learner

log = logging.getLogger(__name__)


def cache_root(cfg: Config) -> Path:
    """Where converted base models live: $EDGEKIF_CACHE_DIR; else DATA_DIR/cache if it exists
    (made by versions before the XDG rule: reused rather than converted again); else
    $XDG_CACHE_HOME/edgekif (~/.cache/edgekif), shared by every data dir of the user.
    The system unit sets EDGEKIF_CACHE_DIR, so it never depends on the service user's HOME."""
    if env := os.environ.get("EDGEKIF_CACHE_DIR"):
        return Path(env)
    legacy = cfg.data_path / "cache"
    if legacy.is_dir():
        return legacy
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "edgekif"


def set_threads(cfg: Config) -> None:
    if cfg.model.threads > 0:
        import torch

        torch.set_num_threads(cfg.model.threads)


def open_learner(cfg: Config, *, strategy: str | None = None, state_dir: Path | None = None, base: BaseModel | None = None) -> tuple[Learner, BaseModel]:
    """Base model in the configured precision + a LoRA adapter + the strategy; optionally
    restore adapter and importance state saved by `Learner.save`."""
    set_threads(cfg)
    base = base or resolve_base(cfg.model, cache_root(cfg))
    device = resolve_device(cfg.model.device)
    precision = resolve_precision(cfg.model.precision, device)
    model = load_model(base.path, precision, device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA's initial weights: the same run gives the same adapter
    model = add_lora(model, cfg.lora)
    tok = load_tokenizer(base.path)
    learner = Learner.create(cfg, model, tok, strategy)
    if state_dir is not None and (Path(state_dir) / "learner.json").is_file():
        learner.load_state(Path(state_dir))
    log.info("learner ready", extra={"base": base.name, "precision": precision, "device": device, "strategy": learner.strategy.name})
    return learner, base


def export_adapter(cfg: Config, base: BaseModel, adapter_dir: Path, work_dir: Path, out_dir: Path, *, parity_prompts: Sequence[str], manifest_info: dict[str, Any]) -> Path:
    """Fuse the adapter into an fp32 copy of the base and export it (parity-checked, with manifest)."""
    from .export import adapter_sha256, export_model, fuse_adapter

    fused = fuse_adapter(base.path, adapter_dir, Path(work_dir) / "fused")
    info = {
        "base_model_id": base.name,
        "base_model_sha256": base.source_sha256,
        "adapter_sha256": adapter_sha256(adapter_dir),
        **manifest_info,
    }
    return export_model(
        fused,
        out_dir,
        target=cfg.export.target,
        precision=cfg.export.precision,
        execution_provider=cfg.export.execution_provider,
        parity_prompts=list(parity_prompts)[: max(1, cfg.export.parity_prompts)],
        manifest_info=info,
        min_agreement=cfg.export.parity_min_agreement,
        max_prompt_tokens=cfg.eval.max_prompt_tokens,  # parity prompts are fitted like evaluation prompts
    )
