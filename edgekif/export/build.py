"""Build an export of a fused model folder: onnxruntime-genai or plain ONNX, one variant at a time.

  resolve_export_settings(target, precision, ep)     # config values ("auto") -> concrete settings
  export_candidates(...)                             # the variants to try, in order
  build_variant(fused_dir, dest, target, variant, ep)   # one build, no check, no manifest

Two export targets:
  genai  onnxruntime-genai's model builder (GQA attention + KV cache, int4/int8/fp16/fp32), run
         as a child process (edgekif.children.run_child) through edgekif.export.genai_builder,
         which normalises the model config first; the folder loads with
         `onnxruntime_genai.Model(folder)`. This is what clients should use. On CPU its logits
         are each row's last real position only (edgekif.export.lm_head).
  onnx   a plain ONNX causal-LM graph from torch.onnx.export: inputs input_ids + attention_mask,
         output logits, no KV cache (each step re-reads the whole sequence). For runtimes without
         onnxruntime-genai; optional int8 dynamic quantisation.

Each builder writes export_info.json (edgekif.export.files) and the fused model's chat template;
the genai builder also the decoder's CPU threads into genai_config.json (session_options), so
`onnxruntime_genai.Model(folder)` alone decodes as fast as the export was measured.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_dir, atomic_write_json
from ..chat_templates import folder_template
from ..children import run_child
from ..errors import ConfigError, ExportError
from ..metrics import GENERATION
from .files import GENAI_CONFIG, ONNX_MODEL_FILE, write_export_info
from .genai_builder import prunes_lm_head

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

AUTO_PRECISION = {("genai", "cpu"): "int4", ("genai", "cuda"): "fp16", ("onnx", "cpu"): "fp32", ("onnx", "cuda"): "fp32"}

GENAI_PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16", "bf16", "fp32")}
ONNX_PRECISIONS = ("fp32", "int8")


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
    threads: int = 0,
) -> Path:
    """Build an onnxruntime-genai model folder from a fused HF folder (atomically into out_dir).

    builder_options are the builder's `--extra_options` (key=value); threads: the decoder's
    CPU threads (0 = physical_cores()).
    """
    _, precision, execution_provider = resolve_export_settings("genai", precision, execution_provider)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _build_genai(Path(fused_dir), tmp, precision, execution_provider, builder_options, threads)
    return out_dir


GENAI_CACHE_PREFIX = "edgekif-genai-cache-"  # + "<pid>-": start-up cleanup skips live pids


def _build_genai(fused_dir: Path, dest: Path, precision: str, ep: str, builder_options: dict[str, str] | None = None, threads: int = 0) -> None:
    if not (fused_dir / "config.json").is_file():
        raise ExportError(f"{fused_dir}: not a Hugging Face model folder (no config.json)")
    # The pid in the name lets the daemon's start-up cleanup remove caches of dead processes
    # (service.housekeeping.cleanup_stale_temp) without touching a running export's.
    with tempfile.TemporaryDirectory(prefix=f"{GENAI_CACHE_PREFIX}{os.getpid()}-") as cache:
        # the builder, run through edgekif.export.genai_builder: it flattens configs the builder
        # cannot read (transformers 5's nested Gemma 3 RoPE) before building
        cmd = [sys.executable, "-m", "edgekif.export.genai_builder", "-i", str(fused_dir.resolve()), "-o", str(dest.resolve()), "-p", precision, "-e", ep, "-c", cache]
        options = dict(builder_options or {})  # the variant's own: what export_info records
        given = [f"{k}={v}" for k, v in options.items()]
        if ep == "cpu" and "prune_lm_head" not in options:
            # the LM head on each row's last real position only (edgekif.export.lm_head: the
            # wrapper rewrites the builder's prune): prompts read 14-18% faster, the same
            # answers. Not on other providers, where it has not been measured.
            given.append("prune_lm_head=true")
        if given:
            cmd += ["--extra_options", *given]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        # the child runs in the cache dir: make this edgekif importable there even when not installed
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        log.info("running onnxruntime-genai model builder", extra={"cmd": " ".join(cmd)})
        res = run_child(cmd, env=env, cwd=cache)
    output = (res.stdout or "") + (res.stderr or "")
    if res.returncode != 0:
        # its own error (a traceback, exit 1) repeats on the same model; a signal (the OOM killer) may not
        raise ExportError(f"onnxruntime-genai builder failed (exit {res.returncode}) for {fused_dir}:\n{output[-3000:]}", permanent=res.returncode > 0)
    for required in (GENAI_CONFIG, ONNX_MODEL_FILE):
        if not (dest / required).is_file():
            raise ExportError(f"onnxruntime-genai builder wrote no {required} into {dest}:\n{output[-3000:]}")
    _ensure_chat_template(fused_dir, dest)
    # before export_info and long before the manifest hashes the folder (write_manifest)
    session = write_session_options(dest, threads)
    write_export_info(dest, "genai", precision, ep, builder_options=options, session_options=session,
                      logits="each row's last real position" if prunes_lm_head(given) else "every position")


def physical_cores() -> int:
    """The physical cores this process may run on: the CPUs of os.sched_getaffinity (what a
    taskset or systemd CPUAffinity= leaves; os.cpu_count() counts the whole machine) counted
    once per (package, core) in /sys topology, so hyperthread siblings count once. Falls back
    to the affinity's CPU count where the topology is unreadable, then to os.cpu_count()."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def session_options(threads: int = 0) -> dict[str, int]:
    """The decoder session options every genai export carries (threads 0 = physical_cores()).

    Only the intra-op threads: onnxruntime-genai runs its sessions sequentially, where
    onnxruntime uses no inter-op pool, so inter_op_num_threads changes nothing (measured within
    noise); spinning cannot be turned off from genai_config.json (0.18 refuses config_entries)."""
    if threads < 0:
        raise ConfigError(f"export.threads: {threads} must be >= 0 (0 = the physical cores)")
    return {"intra_op_num_threads": threads or physical_cores()}


def write_session_options(folder: Path, threads: int = 0) -> dict[str, int]:
    """Merge session_options(threads) into the folder's genai_config.json
    (model.decoder.session_options, where onnxruntime-genai reads them); returns them."""
    options = session_options(threads)
    path = folder / GENAI_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        decoder = cfg["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: cannot set the session options, not an onnxruntime-genai config: {e}", permanent=True) from e
    decoder["session_options"] = {**(decoder.get("session_options") or {}), **options}
    atomic_write_json(path, cfg)  # clients open this file
    return options


def _ensure_chat_template(fused_dir: Path, dest: Path) -> None:
    """Publish the fused model's chat template, which is the format training used.

    The fused folder's tokenizer was saved by edgekif.model.load_tokenizer, whose template
    renders exactly the training prompts (SmolLM2's default system prompt removed, see
    edgekif.inputs.without_default_system). Whatever the builder wrote is replaced by it, in
    chat_template.jinja and in tokenizer_config.json, so a client that sends only a user
    message gets the very tokens the model was trained on.
    """
    template = folder_template(fused_dir)
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


# --------------------------------------------------------------------------- export: plain onnx


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

    from ..model import load_model

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
    write_export_info(dest, "onnx", "int8" if quantize_int8 else "fp32", ep)
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


# --------------------------------------------------------------------------- variants


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
# answers pass the check (edgekif.export.check.compare_answers) is published. Measured on SmolLM2-135M
# with the demo's adapter (tools/bench_quant.py, docs/benchmarks/quant): no int4 variant keeps the
# fp32 answers (k-quant with int8 LM head and sensitive layers is the closest: 80% identical,
# -3 points; builder-default int4 54%, -21 points), int8 does (97%, +3). One int4 try stays first
# because a larger base may pass it; each failed try costs a build and one holdout pass.
#
# int8 is the builder's default (symmetric, blocks of 32) unless export.int8_block_size /
# export.int8_symmetric say otherwise (int8_variant). Blocks of 16 with a zero point serve a
# fused LoRA update more faithfully on the weights (error 70% of the update's norm vs 91%) and on
# free text (a headlines job: 72% of fp32's answers vs 66%, the gate's gain +2.9 p = 0.040 vs
# +1.7 p = 0.22), but changed more label answers on the demo's jobs (10 of 240 vs 6) and failed
# the label rule twice in one `make demo`: so it is what a model that answers only free text gets
# (int8_for_tasks), and label models keep the builder's default;
# docs/serving.md, "int8 in blocks of 16 with a zero point".
INT8_CPU = ExportVariant("int8")


def int8_variant(block_size: int = 32, symmetric: bool = True) -> ExportVariant:
    """The CPU genai int8 export with these builder settings (the builder's default: INT8_CPU)."""
    if (block_size, symmetric) == (32, True):
        return INT8_CPU  # named as before: export histories and the base's zero-shot caches still apply
    return ExportVariant("int8", (("block_size", str(block_size)), ("is_symmetric", str(symmetric).lower())))


# The int8 a model gets when every task it answers is free text (int8_for_tasks).
FREE_TEXT_INT8 = int8_variant(16, False)


def int8_for_tasks(kinds: Iterable[str | None], block_size: int = 32, symmetric: bool = True, by_task_kind: bool = True) -> ExportVariant:
    """The CPU genai int8 variant for a model whose tasks are of these kinds (one per task; None
    for a task without a spec, judged by exact match like a label): FREE_TEXT_INT8 when
    `by_task_kind` and every task is generation, else int8_variant(block_size, symmetric).
    A label task anywhere keeps the configured variant: its near-tied first tokens flipped more
    often with the free-text one (docs/serving.md)."""
    kinds = list(kinds)
    if by_task_kind and kinds and all(k == GENERATION for k in kinds):
        return FREE_TEXT_INT8
    return int8_variant(block_size, symmetric)


def second_int8(first: ExportVariant, configured: ExportVariant) -> ExportVariant | None:
    """The int8 `auto` tries when `first` fails the answer check, before fp32: the other of the
    configured int8 and FREE_TEXT_INT8 (None when they are the same). Which label answers flip
    depends on how the weights are rounded, so the two fail on different jobs: of three jobs
    where one was rejected and both were measured, the other passed each time (make demo's
    job 2 on a Zen 3: the builder's int8 94% identical on dbpedia and 1.0 point under fp32,
    blocks of 16 with a zero point equal to fp32; the reverse on jobs 1 and 2 of a Zen 4 run;
    docs/serving.md, "A second int8 before fp32"). An int8 version is half fp32's size and
    decodes twice as fast; the extra try costs a build and one holdout pass, only when the
    first int8 fails."""
    other = configured if first == FREE_TEXT_INT8 else FREE_TEXT_INT8
    return None if other == first else other


AUTO_VARIANTS_GENAI_CPU: tuple[ExportVariant, ...] = (
    ExportVariant("int4", (("algo_config", "k_quant_mixed"),)),
    INT8_CPU,
    ExportVariant("fp32"),
)


def export_candidates(target: str, precision: str, ep: str, requested: str, builder_options: dict[str, str] | None = None,
                      int8: ExportVariant = INT8_CPU, int8_second: ExportVariant | None = None) -> list[ExportVariant]:
    """The variants to build and check, in order: `auto` on the CPU genai target tries
    AUTO_VARIANTS_GENAI_CPU with its INT8_CPU replaced by `int8` (int8_variant: the config's
    choice), followed by `int8_second` when given (second_int8); otherwise the one precision
    asked for, with `builder_options` (int8 on the CPU genai target without options is `int8`)."""
    if target == "genai" and ep == "cpu" and not builder_options:
        if requested == "auto":
            int8s = [int8] if int8_second is None or int8_second == int8 else [int8, int8_second]
            return [w for v in AUTO_VARIANTS_GENAI_CPU for w in (int8s if v == INT8_CPU else [v])]
        if precision == "int8":
            return [int8]
    return [ExportVariant(precision, tuple(sorted((builder_options or {}).items())))]


def build_variant(fused_dir: Path, dest: Path, target: str, variant: ExportVariant, ep: str, threads: int = 0) -> None:
    """Build one export variant into `dest` (no check, no manifest; the caller makes it atomic).
    threads: a genai export's decoder CPU threads (session_options; 0 = physical cores)."""
    if target == "genai":
        _build_genai(fused_dir, dest, variant.precision, ep, variant.builder_options(), threads)
    else:
        _build_onnx(fused_dir, dest, quantize_int8=variant.precision == "int8", ep=ep)
