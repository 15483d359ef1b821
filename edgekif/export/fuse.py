"""Fuse a LoRA adapter into an fp32 copy of its base, and copy the adapter for publishing.

  fuse_adapter(base, adapter_dir, fused_dir)        # a peft adapter folder
  fuse_model(peft_model, base, fused_dir)           # an in-memory PeftModel (its base may be NF4)
  portable_adapter(adapter_dir, out_dir, base_model_id=...)   # the adapter/ a version carries

Fusing always happens in fp32: merging LoRA deltas into NF4 weights would re-quantise them and
lose the adapter's effect.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, atomic_write_json, sha256_file
from ..errors import ExportError
from .files import ADAPTER_DIR, ADAPTER_FILES

log = logging.getLogger(__name__)


def adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of a peft adapter's weights file (what the manifest records as the adapter hash)."""
    p = Path(adapter_dir) / "adapter_model.safetensors"
    if not p.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors (not a peft adapter folder saved with safetensors)")
    return sha256_file(p)


def portable_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model_id: str) -> dict[str, Any]:
    """Copy a peft adapter for publishing: its weights as they are, its config with
    `base_model_name_or_path` set to the base's id instead of this machine's cache path.

    Only adapter_config.json and adapter_model.safetensors are copied (peft's README.md names the
    local path too). Returns the manifest's `adapter` entry (path, peft version, LoRA shape).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        config = json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{adapter_dir}: no readable {ADAPTER_FILES[0]} (not a peft adapter folder): {e}") from e
    if not (adapter_dir / ADAPTER_FILES[1]).is_file():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_FILES[1]} (not a peft adapter folder saved with safetensors)")
    config["base_model_name_or_path"] = base_model_id
    config["revision"] = None
    with atomic_dir(out_dir, overwrite=True) as tmp:
        shutil.copyfile(adapter_dir / ADAPTER_FILES[1], tmp / ADAPTER_FILES[1])
        atomic_write_json(tmp / ADAPTER_FILES[0], config)
    return {
        "path": ADAPTER_DIR + "/",
        "format": "peft",
        "peft_version": config.get("peft_version") or dist_version("peft"),
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
        "base_model_name_or_path": base_model_id,
    }


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fuse_adapter(
    base_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    chat_template: str = "",
) -> Path:
    """Merge a peft LoRA adapter (saved with save_pretrained) into an fp32 copy of the base.
    `chat_template`: the model.chat_template setting (edgekif.model.load_tokenizer)."""
    from peft import PeftModel

    from ..model import load_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a peft adapter folder)")
    model = load_model(base_path, "fp32")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as e:  # peft raises several types for shape/key mismatches
        raise ExportError(f"{adapter_dir}: cannot load LoRA adapter onto {base_path}: {e}") from e
    merged = peft_model.merge_and_unload()
    return _save_fused(merged, tokenizer_path or base_path, out_dir, chat_template)


def fuse_model(
    peft_model: Any,
    base_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    chat_template: str = "",
) -> Path:
    """Merge an in-memory PeftModel (its base may be NF4) into a fresh fp32 base and save it.

    Only the LoRA tensors are taken from `peft_model`; the base weights are re-read in fp32 so
    the merge is exact and the NF4 quantisation error never reaches the exported model.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from ..model import load_model

    adapter_name = getattr(peft_model, "active_adapter", "default")
    if isinstance(adapter_name, (list, tuple)):
        adapter_name = adapter_name[0]
    try:
        lora_cfg = copy.deepcopy(peft_model.peft_config[adapter_name])
    except (AttributeError, KeyError) as e:
        raise ExportError(f"fuse_model: not a PeftModel with adapter {adapter_name!r}") from e
    state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    if not state:
        raise ExportError("fuse_model: the PeftModel has no LoRA weights")
    lora_cfg.inference_mode = True
    fresh = get_peft_model(load_model(base_path, "fp32"), lora_cfg)
    result = set_peft_model_state_dict(fresh, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing_lora:
        raise ExportError(f"fuse_model: LoRA state does not fit the fp32 base: unexpected={unexpected[:5]} missing={missing_lora[:5]}")
    merged = fresh.merge_and_unload()
    return _save_fused(merged, tokenizer_path or base_path, out_dir, chat_template)


def _save_fused(merged: Any, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike, chat_template: str = "") -> Path:
    from ..model import load_tokenizer

    tok = load_tokenizer(tokenizer_path, chat_template=chat_template)
    if not getattr(tok, "chat_template", None):
        log.warning("tokenizer has no chat template; clients will have to format prompts themselves", extra={"path": str(tokenizer_path)})
    merged.eval()
    # The training loader turns the cache off; inference (and the genai builder) want it on.
    merged.config.use_cache = True
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (tmp / "generation_config.json").is_file() and getattr(merged, "generation_config", None) is not None:
            merged.generation_config.save_pretrained(tmp)
    log.info("fused model saved", extra={"path": str(out_dir)})
    return out_dir
