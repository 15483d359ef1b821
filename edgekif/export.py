"""Fuse a LoRA adapter into its base, export the fused model to ONNX, check parity, write a manifest.

Pipeline (each step builds its output in a temp sibling and renames it into place):

  fuse_adapter(base, adapter_dir, fused_dir)      # or fuse_model(peft_model, base, fused_dir)
  export_model(fused_dir, export_dir, target=..., precision=..., holdout={task: records}, manifest_info={...})
      = reference answers (fp32 PyTorch) -> for each candidate precision: export_genai | export_onnx
        -> the export's own answers on the holdout -> compare -> write_manifest

Two export targets:
  genai  onnxruntime-genai's model builder (GQA attention + KV cache, int4/int8/fp16/fp32); the
         folder loads with `onnxruntime_genai.Model(folder)`. This is what clients should use.
  onnx   a plain ONNX causal-LM graph from torch.onnx.export: inputs input_ids + attention_mask,
         output logits, no KV cache (each step re-reads the whole sequence). For runtimes without
         onnxruntime-genai; optional int8 dynamic quantisation.

Fusing always happens in fp32: merging LoRA deltas into NF4 weights would re-quantise them and
lose the adapter's effect.
"""

from __future__ import annotations

import copy
import ctypes
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .atomic import atomic_dir, atomic_write_json, sha256_file
from .errors import ConfigError, ExportError, IntegrityError, ParityError
from .folders import EXPORT_INFO, GENAI_CONFIG, MANIFEST, MANIFEST_FORMAT, ONNX_MODEL_FILE  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Files copied next to a plain ONNX export so a client can tokenize and apply the chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "config.json",
)

# Builder --extra_options per (precision, ep) when none are given; none needed so far. Measured
# on SmolLM2-135M (docs/benchmarks/quant): accuracy_level=1 (fp32 activations) makes int8 ~15x
# slower on CPU for +1% identical answers; asymmetric int4 builds a graph onnxruntime refuses.
DEFAULT_BUILDER_OPTIONS: dict[tuple[str, str], dict[str, str]] = {}

AUTO_PRECISION = {("genai", "cpu"): "int4", ("genai", "cuda"): "fp16", ("onnx", "cpu"): "fp32", ("onnx", "cuda"): "fp32"}

GENAI_PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16", "bf16", "fp32")}
ONNX_PRECISIONS = ("fp32", "int8")


# --------------------------------------------------------------------------- fuse


def adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of a peft adapter's weights file (what the manifest records as the adapter hash)."""
    p = Path(adapter_dir) / "adapter_model.safetensors"
    if not p.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors (not a peft adapter folder saved with safetensors)")
    return sha256_file(p)


ADAPTER_DIR = "adapter"  # the peft adapter inside an export / version folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
        "peft_version": config.get("peft_version") or _dist_version("peft"),
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
        "base_model_name_or_path": base_model_id,
    }


def _dist_version(dist: str) -> str | None:
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
) -> Path:
    """Merge a peft LoRA adapter (saved with save_pretrained) into an fp32 copy of the base."""
    from peft import PeftModel

    from .model import load_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a peft adapter folder)")
    model = load_model(base_path, "fp32")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as e:  # peft raises several types for shape/key mismatches
        raise ExportError(f"{adapter_dir}: cannot load LoRA adapter onto {base_path}: {e}") from e
    merged = peft_model.merge_and_unload()
    return _save_fused(merged, tokenizer_path or base_path, out_dir)


def fuse_model(
    peft_model: Any,
    base_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
) -> Path:
    """Merge an in-memory PeftModel (its base may be NF4) into a fresh fp32 base and save it.

    Only the LoRA tensors are taken from `peft_model`; the base weights are re-read in fp32 so
    the merge is exact and the NF4 quantisation error never reaches the exported model.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from .model import load_model

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
    return _save_fused(merged, tokenizer_path or base_path, out_dir)


def _save_fused(merged: Any, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    from .model import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
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


# --------------------------------------------------------------------------- settings


def _installed(*dists: str) -> bool:
    """True if any of these distributions is installed (checked via metadata: no import)."""
    for dist in dists:
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def _genai_cuda_installed() -> bool:
    return _installed("onnxruntime-genai-cuda", "onnxruntime_genai_cuda")


def _ort_cuda_installed() -> bool:
    return _installed("onnxruntime-gpu", "onnxruntime_gpu")


def _cuda_usable(target: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    return _genai_cuda_installed() if target == "genai" else _ort_cuda_installed()


def resolve_export_settings(target: str, precision: str = "auto", execution_provider: str = "auto") -> tuple[str, str, str]:
    """Turn config values (possibly "auto") into a concrete (target, precision, execution_provider).

    auto EP: cuda when torch sees a GPU *and* the matching CUDA runtime package is installed, else cpu.
    auto precision: genai -> int4 on cpu, fp16 on cuda; onnx -> fp32 (exact; int8 is opt-in).
    export_model falls back from an "auto" int4 that fails parity to int8, then fp32.
    """
    if target not in ("genai", "onnx"):
        raise ConfigError(f"export.target: {target!r} not in genai|onnx")
    ep = execution_provider
    if ep == "auto":
        ep = "cuda" if _cuda_usable(target) else "cpu"
    if ep not in ("cpu", "cuda"):
        raise ConfigError(f"export.execution_provider: {execution_provider!r} not in auto|cpu|cuda")
    prec = precision
    if prec == "auto":
        prec = AUTO_PRECISION[(target, ep)]
    allowed = GENAI_PRECISIONS[ep] if target == "genai" else ONNX_PRECISIONS
    if prec not in allowed:
        raise ConfigError(f"export.precision: {prec!r} is not supported for target {target} on {ep} (use one of {', '.join(allowed)})")
    return target, prec, ep


# --------------------------------------------------------------------------- export: genai


def export_genai(
    fused_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precision: str = "int4",
    execution_provider: str = "cpu",
    builder_options: dict[str, str] | None = None,
) -> Path:
    """Build an onnxruntime-genai model folder from a fused HF folder (atomically into out_dir).

    builder_options are the builder's `--extra_options` (key=value), on top of
    default_builder_options(precision, ep).
    """
    _, precision, execution_provider = resolve_export_settings("genai", precision, execution_provider)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _build_genai(Path(fused_dir), tmp, precision, execution_provider, builder_options)
    return out_dir


def default_builder_options(precision: str, ep: str) -> dict[str, str]:
    """Builder --extra_options edgekif uses unless told otherwise (see docs/serving.md)."""
    return dict(DEFAULT_BUILDER_OPTIONS.get((precision, ep), {}))


# ---------------------------------------------------------------- children that die with us

GENAI_CACHE_PREFIX = "edgekif-genai-cache-"  # + "<pid>-": start-up cleanup skips live pids
_PR_SET_PDEATHSIG = 1
_prctl: Any = None


def _resolve_prctl() -> Any:
    """libc's prctl, looked up once in the parent: the preexec hook after fork() then makes
    one foreign call and no lookups or imports (a forked child of a threaded process must
    not take locks other threads may have held)."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            fn = ctypes.CDLL(None, use_errno=True).prctl
            fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            fn.restype = ctypes.c_int
            _prctl = fn
        except (OSError, AttributeError):
            _prctl = False
    return _prctl or None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (Linux
    PR_SET_PDEATHSIG); None elsewhere. If the parent already died before the prctl took
    effect, the signal would never come, so the child kills itself."""
    prctl = _resolve_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own group: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def run_child(
    cmd: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), but the child cannot outlive us.

    The child gets its own process group, and on Linux PR_SET_PDEATHSIG=SIGKILL, so a daemon
    killed with SIGKILL (OOM killer, watchdog, kill -9) takes the child with it. On a timeout
    (subprocess.TimeoutExpired) or any exception here (an interrupt), the whole group is
    killed, grandchildren included, before the exception propagates. Caveat: the death signal
    follows the *thread* that started the child, so call this from a thread that waits for it
    (as here). Grandchildren that leave the group are not covered.
    """
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
        process_group=0, preexec_fn=_die_with_parent_hook(),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _build_genai(fused_dir: Path, dest: Path, precision: str, ep: str, builder_options: dict[str, str] | None = None) -> None:
    if not (fused_dir / "config.json").is_file():
        raise ExportError(f"{fused_dir}: not a Hugging Face model folder (no config.json)")
    # The pid in the name lets the daemon's start-up cleanup remove caches of dead processes
    # (service.housekeeping.cleanup_stale_temp) without touching a running export's.
    with tempfile.TemporaryDirectory(prefix=f"{GENAI_CACHE_PREFIX}{os.getpid()}-") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(fused_dir.resolve()), "-o", str(dest.resolve()), "-p", precision, "-e", ep, "-c", cache]
        options = {**default_builder_options(precision, ep), **(builder_options or {})}
        if options:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        log.info("running onnxruntime-genai model builder", extra={"cmd": " ".join(cmd)})
        res = run_child(cmd, env=env, cwd=cache)
    output = (res.stdout or "") + (res.stderr or "")
    if res.returncode != 0:
        raise ExportError(f"onnxruntime-genai builder failed (exit {res.returncode}) for {fused_dir}:\n{output[-3000:]}")
    for required in (GENAI_CONFIG, ONNX_MODEL_FILE):
        if not (dest / required).is_file():
            raise ExportError(f"onnxruntime-genai builder wrote no {required} into {dest}:\n{output[-3000:]}")
    _ensure_chat_template(fused_dir, dest)
    atomic_write_json(dest / EXPORT_INFO, {**_export_info("genai", precision, ep), "builder_options": options})


def _chat_template(folder: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (FileNotFoundError, ValueError):
        return None
    return template if isinstance(template, str) and template else None


def _ensure_chat_template(fused_dir: Path, dest: Path) -> None:
    """Publish the fused model's chat template, which is the format training used.

    The fused folder's tokenizer was saved by edgekif.model.load_tokenizer, whose template
    renders exactly the training prompts (SmolLM2's default system prompt removed, see
    edgekif.inputs.without_default_system). Whatever the builder wrote is replaced by it, in
    chat_template.jinja and in tokenizer_config.json, so a client that sends only a user
    message gets the very tokens the model was trained on.
    """
    template = _chat_template(fused_dir)
    if template is None:
        log.warning("fused model has no chat template; the export has none either", extra={"path": str(fused_dir)})
        return
    jinja = dest / "chat_template.jinja"
    if not jinja.is_file() or jinja.read_text(encoding="utf-8") != template:
        jinja.write_text(template, encoding="utf-8")
    cfg_path = dest / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return
    if isinstance(cfg, dict) and "chat_template" in cfg and cfg["chat_template"] != template:
        cfg["chat_template"] = template
        atomic_write_json(cfg_path, cfg)


def _export_info(target: str, precision: str, ep: str) -> dict[str, Any]:
    return {"target": target, "precision": precision, "execution_provider": ep, "runtime": runtime_versions()}


def runtime_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("onnxruntime_genai", ("onnxruntime-genai", "onnxruntime-genai-cuda"))):
        out[key] = None
        for d in dists:
            try:
                out[key] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


# --------------------------------------------------------------------------- export: plain onnx


def export_onnx(fused_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quantize_int8: bool = False) -> Path:
    """Export a plain ONNX causal-LM graph (input_ids, attention_mask -> logits; no KV cache)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _build_onnx(Path(fused_dir), tmp, quantize_int8)
    return out_dir


class _LogitsOnly:
    """Wraps a causal LM so the traced graph has exactly (input_ids, attention_mask) -> logits.

    position_ids come from the attention mask inside the graph, so left-padded batches get the
    same positions as unpadded single sequences (as in transformers' generate()).
    """

    @staticmethod
    def build(model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, lm: Any) -> None:
                super().__init__()
                self.lm = lm

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
                return out.logits

        return Wrapper(model).eval()


def _build_onnx(fused_dir: Path, dest: Path, quantize_int8: bool, ep: str = "cpu") -> None:
    import warnings

    import torch

    from .model import load_model

    model = load_model(fused_dir, "fp32")
    wrapper = _LogitsOnly.build(model)
    ids = torch.full((2, 8), 3, dtype=torch.long)
    mask = torch.ones_like(ids)
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {v: k for k, v in axes.items()} for name in ("input_ids", "attention_mask", "logits")}
    with tempfile.TemporaryDirectory(prefix="edgekif-onnx-", dir=dest.parent) as scratch:
        raw = Path(scratch) / ONNX_MODEL_FILE if quantize_int8 else dest / ONNX_MODEL_FILE
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes are expected
                torch.onnx.export(
                    wrapper,
                    (ids, mask),
                    str(raw),
                    input_names=["input_ids", "attention_mask"],
                    output_names=["logits"],
                    dynamic_axes=dynamic,
                    opset_version=17,
                    dynamo=False,
                )
        except Exception as e:  # the exporter raises many types
            raise ExportError(f"torch.onnx.export failed for {fused_dir}: {e}") from e
        if quantize_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            try:
                quantize_dynamic(str(raw), str(dest / ONNX_MODEL_FILE), weight_type=QuantType.QInt8)
            except Exception as e:
                raise ExportError(f"int8 dynamic quantisation failed for {raw}: {e}") from e
    for name in TOKENIZER_FILES:
        if (fused_dir / name).is_file():
            shutil.copy2(fused_dir / name, dest / name)
    _ensure_chat_template(fused_dir, dest)
    atomic_write_json(dest / EXPORT_INFO, _export_info("onnx", "int8" if quantize_int8 else "fp32", ep))
    _check_onnx_loads(dest)


def _check_onnx_loads(folder: Path) -> None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(folder / ONNX_MODEL_FILE), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{folder / ONNX_MODEL_FILE}: exported graph does not load in onnxruntime: {e}") from e
    names = {i.name for i in sess.get_inputs()}
    if names != {"input_ids", "attention_mask"}:
        raise ExportError(f"{folder / ONNX_MODEL_FILE}: unexpected inputs {sorted(names)}")


# --------------------------------------------------------------------------- manifest


def read_export_info(folder: str | os.PathLike) -> dict[str, Any]:
    p = Path(folder) / EXPORT_INFO
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {EXPORT_INFO} (not an edgekif export folder)") from None
    except ValueError as e:
        raise ExportError(f"{p}: not valid JSON: {e}") from e


def _list_files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return out


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    base_model_sha256: str | None = None,
    adapter_sha256: str | None = None,
    tasks: Iterable[dict[str, Any]] = (),
    accuracies: dict[str, float] | None = None,
    target: str | None = None,
    precision: str | None = None,
    execution_provider: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write manifest.json (atomically) describing and hashing every file of an export folder.

    target/precision/execution_provider default to the folder's export_info.json. Extra keyword
    arguments (JSON-serialisable, e.g. parity=...) are stored under their own keys.
    """
    out_dir = Path(out_dir)
    try:
        info = read_export_info(out_dir)
    except ExportError:
        info = {}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"id": base_model_id, "sha256": base_model_sha256},
        "adapter_sha256": adapter_sha256,
        "tasks": [dict(t) for t in tasks],
        "accuracies": dict(accuracies or {}),
        "export": {
            "target": target or info.get("target"),
            "precision": precision or info.get("precision"),
            "execution_provider": execution_provider or info.get("execution_provider"),
        },
        "runtime": runtime_versions(),
        **extra,
    }
    manifest["files"] = {rel: sha256_file(out_dir / rel) for rel in _list_files(out_dir)}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    p = Path(folder) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{p}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise IntegrityError(f"{p}: no 'files' table")
    return manifest


def verify_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file listed in manifest.json against its sha256; return the manifest.

    Raises IntegrityError naming the first missing or mismatching file. Files present but not
    listed are allowed (logged as a warning): clients only rely on listed files.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, expected in manifest["files"].items():
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(f"{folder / MANIFEST}: file entry {rel!r} points outside the folder")
        if not p.is_file():
            raise IntegrityError(f"{p}: listed in manifest but missing")
        actual = sha256_file(p)
        if actual != expected:
            raise IntegrityError(f"{p}: sha256 {actual[:12]}… does not match manifest {str(expected)[:12]}… (corrupt or modified)")
    extra = sorted(set(_list_files(folder)) - set(manifest["files"]))
    if extra:
        log.warning("files not listed in manifest", extra={"folder": str(folder), "files": extra})
    return manifest


# --------------------------------------------------------------------------- parity at the answer level


@dataclass(frozen=True)
class ExportVariant:
    """One way to build an export: a precision plus the builder's --extra_options."""

    precision: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.precision + "".join(f"/{k}={v}" for k, v in self.options)

    def builder_options(self) -> dict[str, str]:
        return dict(self.options)


# What `precision = auto` tries on the CPU genai target, fastest first; the first whose holdout
# answers pass the check (edgekif.quality.compare_answers) is published. Measured on SmolLM2-135M
# with the demo's adapter (tools/bench_quant.py, docs/benchmarks/quant): no int4 variant keeps the
# fp32 answers (k-quant with int8 LM head and sensitive layers is the closest: 80% identical,
# -3 points; builder-default int4 54%, -21 points), int8 does (97%, +3). One int4 try stays first
# because a larger base may pass it; each failed try costs a build and one holdout pass.
AUTO_VARIANTS_GENAI_CPU: tuple[ExportVariant, ...] = (
    ExportVariant("int4", (("algo_config", "k_quant_mixed"),)),
    ExportVariant("int8"),
    ExportVariant("fp32"),
)


def export_candidates(target: str, precision: str, ep: str, requested: str, builder_options: dict[str, str] | None = None) -> list[ExportVariant]:
    if requested == "auto" and target == "genai" and ep == "cpu" and not builder_options:
        return list(AUTO_VARIANTS_GENAI_CPU)
    return [ExportVariant(precision, tuple(sorted((builder_options or {}).items())))]


def build_variant(fused_dir: Path, dest: Path, target: str, variant: ExportVariant, ep: str) -> None:
    """Build one export variant into `dest` (no check, no manifest; the caller makes it atomic)."""
    if target == "genai":
        _build_genai(fused_dir, dest, variant.precision, ep, variant.builder_options())
    else:
        _build_onnx(fused_dir, dest, quantize_int8=variant.precision == "int8", ep=ep)


def _runtime_name(target: str) -> str:
    versions = runtime_versions()
    if target == "genai":
        return f"onnxruntime-genai {versions.get('onnxruntime_genai')}"
    return f"onnxruntime {versions.get('onnxruntime')}"


def _pytorch_name() -> str:
    version = _dist_version("torch")
    return f"pytorch {version} fp32 (fused model, eager)" if version else "pytorch fp32 (fused model, eager)"


def export_model(
    fused_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target: str = "genai",
    precision: str = "auto",
    execution_provider: str = "auto",
    holdout: Mapping[str, Sequence[Any]],
    labels: Mapping[str, Sequence[str] | None] | None = None,
    manifest_info: dict[str, Any] | None = None,
    min_agreement: float = 0.95,
    max_accuracy_drop: float = 1.0,
    max_new_tokens: int = 8,
    builder_options: dict[str, str] | None = None,
    extra_dirs: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Export, score it on `holdout` as a client would, write the manifest; out_dir appears
    only when an export passes.

    The fp32 PyTorch model in `fused_dir` answers every holdout record first (the reference).
    Each candidate export then answers the same records through its own runtime (one request at
    a time, its chat template, greedy, `max_new_tokens`). A candidate passes when it answers
    exactly as the reference on >= `min_agreement` of the records and its pooled exact match is
    at most `max_accuracy_drop` points below the reference's (edgekif.quality.compare_answers).
    With precision "auto" on the CPU genai target the candidates are AUTO_VARIANTS_GENAI_CPU,
    fastest first; rejected ones are recorded in the manifest with their figures.

    The manifest's `accuracies` are the published export's own exact match per task (named by
    `accuracies_measured_by`); the PyTorch figures are kept under `reference`.
    Records without labels (prompts only) count for agreement, not accuracy.
    `extra_dirs` ({name: folder}) are copied in as subfolders before the manifest is written, so
    its hashes cover them (the published peft adapter).
    """
    from .infer import open_model
    from .quality import compare_answers, reference_answers, runner_answers

    requested = precision
    target, precision, ep = resolve_export_settings(target, precision, execution_provider)
    candidates = export_candidates(target, precision, ep, requested, builder_options)
    fused_dir, out_dir = Path(fused_dir), Path(out_dir)
    holdout = {k: list(v) for k, v in holdout.items() if v}
    if not holdout:
        raise ExportError("export_model needs holdout records (or prompts) to check the export with")
    t0 = _time.perf_counter()
    reference = reference_answers(fused_dir, holdout, max_new_tokens=max_new_tokens, labels=labels)
    reference_seconds = _time.perf_counter() - t0
    rejected: list[dict[str, Any]] = []
    for i, variant in enumerate(candidates):
        t0 = _time.perf_counter()
        try:
            with atomic_dir(out_dir, overwrite=True) as tmp:
                build_variant(fused_dir, tmp, target, variant, ep)
                build_seconds = _time.perf_counter() - t0
                t1 = _time.perf_counter()
                runner = open_model(tmp)
                answers = runner_answers(runner, holdout, max_new_tokens)
                del runner
                check = compare_answers(reference, answers, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)
                check.seconds = _time.perf_counter() - t1
                figures = {"variant": variant.name, "precision": variant.precision, "builder_options": variant.builder_options(),
                           "build_seconds": round(build_seconds, 1), **{k: v for k, v in check.to_dict().items() if k != "per_task"}}
                log.info("export checked on the holdout", extra={k: figures[k] for k in ("variant", "agreement", "accuracy", "reference_accuracy", "passed")})
                if not check.passed:
                    raise ParityError(f"{variant.name} export: " + "; ".join(check.reasons))
                info = {k: v for k, v in (manifest_info or {}).items() if k not in ("target", "precision", "execution_provider", "accuracies")}
                measured = {name: a.exact_match for name, a in answers.items() if a.exact_match is not None}
                for name, src in (extra_dirs or {}).items():  # e.g. the peft adapter: in before the manifest hashes the folder
                    shutil.copytree(src, tmp / name)
                write_manifest(
                    tmp, target=target, precision=variant.precision, execution_provider=ep, accuracies=measured,
                    accuracies_measured_by={
                        "runtime": _runtime_name(target), "target": target, "precision": variant.precision, "execution_provider": ep,
                        "metric": "exact_match", "decoding": "greedy", "max_new_tokens": max_new_tokens,
                        "prompt": "each holdout record's chat messages, whole, through this folder's chat template",
                    },
                    evaluation={name: {**a.summary(), "answers": a.answers[:KEEP_ANSWERS]} for name, a in answers.items()},
                    reference={"runtime": _pytorch_name(), "seconds": round(reference_seconds, 1),
                               "tasks": {name: a.summary() for name, a in reference.items()}},
                    parity={**figures, "per_task": check.per_task},
                    **({"parity_rejected": rejected} if rejected else {}),
                    **info,
                )
            break
        except ParityError as e:
            if i + 1 == len(candidates):
                raise ParityError(f"{out_dir.name}: no export passed the answer check ({len(candidates)} tried): {e}") from e
            log.warning("export rejected; trying the next one", extra={"variant": variant.name, "next": candidates[i + 1].name, "error": str(e)})
            rejected.append({**figures, "reasons": check.reasons})
    log.info("export ready", extra={"path": str(out_dir), "target": target, "variant": variant.name, "ep": ep})
    return out_dir


KEEP_ANSWERS = 20  # per task, in the manifest: enough to see what the model says
