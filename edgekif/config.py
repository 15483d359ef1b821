"""edgekif configuration: one TOML file, one dataclass per section, every option overridable.

The sections mirror the architecture: [model] and [lora] configure the base model provider,
[data] the task reader, [replay] the replay buffer, [train] the trainer, [eval] evaluation,
[export] fusion/export/publish, [service] the daemon. Each strategy with options has its own
section ([kif] for recurrent_kif, [experience_replay] for replay), registered by the strategy
itself (edgekif.strategies.register_strategy, as peft's register_peft_method), so this module
does not import the strategies; `import edgekif` registers the built-in ones.

Load with `load_config(path, overrides=["train.lr=1e-3", ...])`. Unknown keys are errors
(a typo in a config file should not be silently ignored on an unattended box).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .general_ability import GeneralAbilityConfig

# Filled by edgekif.strategies.register_strategy: strategy name -> its section (None = no
# options), section -> the options' dataclass (which may have a `validate()` raising ConfigError).
STRATEGY_SECTIONS: dict[str, str | None] = {}
SECTION_CONFIGS: dict[str, type] = {}

COMPUTE_DTYPES = ("fp32", "bf16")  # eval.compute_dtype, train.compute_dtype (edgekif.compute)
# every linear layer of a decoder block: lora.target_modules' default
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def register_strategy_config(name: str, section: str | None, config_cls: type) -> None:
    """Make `train.strategy = name` valid and, with a section, add `[section]` to every Config."""
    if section is not None and SECTION_CONFIGS.get(section, config_cls) is not config_cls:
        raise ValueError(f"section [{section}] is already registered with {SECTION_CONFIGS[section].__name__}")
    STRATEGY_SECTIONS[name] = section
    if section is not None:
        SECTION_CONFIGS[section] = config_cls


def xdg_dir(variable: str, default: str) -> Path:
    """$XDG_<...>_HOME, else ~/<default>. The XDG spec says relative values are invalid: ignored."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / default


def default_data_dir() -> Path:
    """$EDGEKIF_DATA_DIR, else $XDG_DATA_HOME/edgekif, else ~/.local/share/edgekif."""
    if env := os.environ.get("EDGEKIF_DATA_DIR"):
        return Path(env)
    return xdg_dir("XDG_DATA_HOME", ".local/share") / "edgekif"


# The data dir's own config file; it takes the place of the user's XDG one (find_config).
DATA_DIR_CONFIG = "edgekif.toml"


def xdg_config_file() -> Path:
    """$XDG_CONFIG_HOME/edgekif/config.toml, else ~/.config/edgekif/config.toml."""
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "edgekif" / "config.toml"


def find_config(overrides: list[str] | None = None) -> Path | None:
    """The config file to load when none is named with --config: the first that exists of
    DATA_DIR/edgekif.toml (DATA_DIR from a `data_dir=` override, $EDGEKIF_DATA_DIR or the
    XDG default) and $XDG_CONFIG_HOME/edgekif/config.toml; None = defaults only.
    One file is in effect, never a merge of both: what `edgekif config` prints is that file."""
    data_dir = default_data_dir()
    for ov in overrides or []:
        key, sep, value = ov.partition("=")
        if sep and key.strip() == "data_dir" and value.strip():
            data_dir = Path(value.strip())
    for candidate in (data_dir / DATA_DIR_CONFIG, xdg_config_file()):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" (the bundled default), a local Hugging Face folder, or a .gguf file.
    base: str = "smollm2-135m-instruct"
    # "auto" = fp32 on CPU (measured faster and smaller than nf4 there); on CUDA fp32 too, nf4
    # (where bitsandbytes works) only for a base whose fp32 weights exceed a quarter of the GPU's
    # memory (edgekif.model.resolve_precision, measured on an H200). Or "nf4", "bf16", "fp32".
    precision: str = "auto"
    # "auto" = cuda if available, else cpu.
    device: str = "auto"
    # torch intra-op threads for training/eval; 0 = torch's default.
    threads: int = 0
    # Chat template for training and every export (edgekif.chat_templates): "" = the base's own,
    # or its family's default when it has none (Gemma's turn format for Gemma bases, ChatML
    # otherwise); "chatml" or "gemma" = that template; or a path to a .jinja file.
    chat_template: str = ""


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 32
    # 0: no dropout mask to draw and no dropped copy of each adapted layer's input to keep,
    # 11-12% less time a step and 250-350 MB less at batch 8 x 128 for q,v (1.59x -> 1.19x q,v's
    # step on every linear layer), and the same learning as 0.05 on the benchmark (three seeds):
    # docs/benchmarks.md, "LoRA dropout and bf16 autocast".
    dropout: float = 0.0
    # Every linear layer of each block (the same names in the Llama, Qwen2 and Gemma 3 families).
    # Against q,v alone at the `default` profile (3 seeds): joint 65.5 vs 60.3, Recurrent-KIF 64.4
    # vs 56.1, replay 61.3 vs 58.8; a free-text job learns as much or more (headlines +3.8 vs +3.1
    # ROUGE-L); label versions pass the int8 check where q,v's fell back to fp32 (make demo 599 s
    # vs 830 s). It costs 1.09-1.19x q,v's step, 0.9 GB more at 128 tokens and 1.8 GB at 256 (6.7 GB
    # peak at batch 8; train.gradient_checkpointing: 3.5 GB), and on label tasks 2-3x the drift of
    # the base's general answers (under the gate's bound; on free text it drifts less).
    # docs/benchmarks.md, "LoRA on every linear layer becomes the default".
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class DataConfig:
    max_length: int = 256  # tokens per example (prompt + answer); longer prompts are fitted (inputs.fit_prompt)
    max_file_bytes: int = 64 * 1024 * 1024
    max_records: int = 200_000
    max_line_bytes: int = 1024 * 1024
    max_field_chars: int = 100_000


@dataclass
class ReplayConfig:
    capacity: int = 2000  # examples kept in total, shared fairly across tasks
    fraction: float = 0.02  # of each task's examples offered to the buffer (paper: 2%)
    min_per_task: int = 16  # never keep fewer than this per task (small tasks)
    stratify_by_label: bool = True
    seed: int = 0
    # Share of every replay batch drawn from the base's own answers to the shipped rehearsal
    # prompts (edgekif.rehearsal; 0 = off): keeps the base's general answers while tasks are
    # learned. Instruction-tuned bases only (a pretrained base has no answers to keep).
    general_share: float = 0.0
    general_max_new_tokens: int = 64  # the base's rehearsal answers are this long at most


@dataclass
class TrainConfig:
    strategy: str = "recurrent_kif"  # a name in edgekif.strategies.STRATEGIES
    lr: float = 1e-3
    # A free-text (generation) task's job trains at lr and kif.outer_lr times this: with LoRA
    # on every linear layer, 1e-3 suits labels, while free text learned more at half the rate
    # and moved the base's general answers less (docs/benchmarks.md, "A lower learning rate
    # for free text"). 1.0 = one rate for every kind.
    generation_lr_scale: float = 0.5
    batch_size: int = 8
    # Steps per task (edgekif.schedule.task_steps): ceil(epochs * examples / batch_size),
    # raised to min_steps (small files: 48 examples are 6 steps an epoch) and lowered to
    # steps_cap (0 = no cap). max_steps > 0 overrides all three with an exact count, as it
    # always has (benchmarks and tests pin their step budgets with it).
    epochs: float = 1.0
    min_steps: int = 16
    steps_cap: int = 2000
    max_steps: int = 0  # exact steps per task; 0 = the policy above
    # Learning rate per step (edgekif.schedule.lr_multiplier): linear warmup over
    # warmup_ratio of the steps, then decay to min_lr_ratio * lr at the last step. Off by
    # default (a constant rate, as every measured figure so far) until a sweep shows the
    # warmup and decay help: with warmup 0.1 + cosine to 0.1 the real-stages gate test's
    # second task kept its first task at 33% instead of 100%.
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 1.0
    lr_decay: str = "cosine"  # cosine | linear | constant
    # Wall-time budget of one task's training in minutes; 0 = no limit. Training stops at the
    # first clean point after it is spent (after a fusion for Recurrent-KIF) and says so.
    max_minutes: float = 0.0
    # How a batch's answer tokens make its loss (edgekif.trainer.target_loss): "token" = their
    # mean (an example weighs by its answer's length, as in transformers), "example" = the mean
    # of each example's mean (a 2-token label weighs as much as a 15-token headline when the
    # two share a batch: joint training and replay over label and free-text tasks).
    loss_average: str = "token"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50  # optimizer steps; 0 = only at fusion/task boundaries
    deterministic: bool = False
    # fp32, or bf16: the training forward under torch.autocast (edgekif.compute.compute_dtype);
    # LoRA weights, gradients and optimizer stay fp32. Pays only where bf16 is native (AMX,
    # AVX512-BF16, CUDA; edgekif.compute.fast_bf16): docs/benchmarks.md, "LoRA dropout and bf16 autocast".
    compute_dtype: str = "fp32"


@dataclass
class EvalConfig:
    max_new_tokens: int = 8
    batch_size: int = 32  # edgekif.evaluate.EVAL_BATCH_SIZE: measured, see there
    label_scoring: bool = True
    max_examples: int = 0  # 0 = all
    # 0 = whole prompts, as clients send them; > 0 fits them into that many tokens by the rule
    # training uses (edgekif.inputs.fit_prompt; faster on long prompts, e.g. benchmarks that
    # train at a short max_length). The daemon's gate and export check use whole prompts, as clients do.
    max_prompt_tokens: int = 0
    # fp32, or bf16: PyTorch evaluation's matmuls in bfloat16 (torch.autocast), ~1.5x faster
    # where the CPU has bf16 instructions (AVX512-BF16, AMX) or on CUDA; a few answers change
    # (edgekif.compute.compute_dtype, docs/benchmarks.md). For benchmarks and `edgekif eval`:
    # the daemon's gates score the ONNX export, and its fp32 reference stays fp32.
    compute_dtype: str = "fp32"


@dataclass
class ExportConfig:
    target: str = "genai"  # genai | onnx
    # auto: on CPU (genai) k-quant mixed int4, else int8, else fp32, the first whose answers match
    # fp32's (AUTO_VARIANTS_GENAI_CPU); fp16 on CUDA; fp32 for the onnx target. Or int4 | int8 | fp16 | fp32.
    precision: str = "auto"
    execution_provider: str = "auto"  # auto | cpu | cuda
    keep_versions: int = 5
    # A quantised export is published only if, on the holdout records, its answers equal the
    # fp32 model's on >= parity_min_agreement of them and its exact match is at most
    # parity_max_accuracy_drop points lower (edgekif.export.check.compare_answers).
    parity_min_agreement: float = 0.95
    parity_max_accuracy_drop: float = 1.0
    # Free-text tasks are held to their metric instead (edgekif.export.check.GenerationRule):
    # the mean paired drop of e.g. ROUGE-L vs fp32 at most this many points, and at least this
    # share of answers starting with fp32's first `parity_prefix_words` words. Measured:
    # docs/serving.md, "The export check for free text".
    parity_max_score_drop: float = 3.0
    parity_min_prefix_agreement: float = 0.75
    parity_prefix_words: int = 3
    # A variant rejected on the last `skip_after` checks with the same base and rules is not
    # built again for `retry_after` jobs (edgekif.export.history); 0 = always try every one.
    skip_rejected_after: int = 2
    retry_skipped_after: int = 10
    # `auto` does not try int4 on a base whose GGUF already stores its projections below 8
    # bits per weight: re-quantising a 4-5 bit grid to another 4-bit grid changed too many
    # answers on every such base measured (SmolLM2 Q4_1: 62%, 80%, 33% identical; Gemma 3
    # Q4_K_M: 85%), about a minute of building and answering per job (docs/serving.md).
    # true = try it anyway (the check still decides).
    int4_on_low_bit_base: bool = False
    # int8 on the CPU genai target: the builder's default (32, true). 16 + false (a zero point in
    # blocks of 16) serves a fused LoRA update more faithfully (error 70% of its norm vs 91%) and
    # keeps more of fp32's free-text answers (a headlines job: 72% vs 66% identical; the file alone
    # is then published, +2.9 p = 0.040), for 16% of the decode speed, but changed more label
    # answers on the demo's jobs (10 of 240 vs 6). int8_by_task_kind: a model whose every task is
    # free text gets 16 + false whatever the two settings say (edgekif.export.build.int8_for_tasks);
    # false = the two settings for every model. docs/serving.md, "int8 in blocks of 16 with a zero point".
    int8_block_size: int = 32
    int8_symmetric: bool = True
    int8_by_task_kind: bool = True
    # With precision auto: when that int8 fails the answer check, try the other one (the
    # configured int8 or blocks of 16 with a zero point) before fp32. Each has failed where the
    # other passed; false = straight to fp32 (edgekif.export.build.second_int8).
    int8_second_try: bool = True
    # The base's cached exports (cache_root/zero-shot: ~0.3 GB each for SmolLM2) are keyed by the
    # code that made them, so each upgrade builds new ones. Those made by other edgekif code and
    # unused this many days are removed when the base is prepared (edgekif.workflow.prune_base_exports);
    # 0 = never.
    stale_base_export_days: float = 7.0
    parity_prompts: int = 4  # prompts checked when there is no holdout (edgekif export --prompt)
    # CPU threads a genai export's decoder runs on, written into its genai_config.json
    # (model.decoder.session_options.intra_op_num_threads), so a client that only opens the
    # folder gets them: onnxruntime-genai's own default used one core here (62-80 tok/s int8 vs
    # 96-113 with 2 threads). 0 = the physical cores this process may run on
    # (os.sched_getaffinity, one per core in /sys topology): a second hyperthread of a core
    # adds little to matmul-bound decoding and contends with the first. Measured on 2 cores
    # (demo int8, 64 tokens): idle, 2 threads 92-98 tok/s vs 58-59 unset, first token 61-69 ms
    # vs 114-119; but while a training stage (nice 10) holds both cores, 27-31 vs 53-63: onnxruntime's
    # spinning pool waits on a busy core. Set 1 where serving must stay fast during training.
    threads: int = 0


@dataclass
class ServiceConfig:
    quiet_seconds: float = 2.0  # a file is taken once size+mtime were stable this long
    scan_interval: float = 5.0
    max_file_bytes: int = 64 * 1024 * 1024
    # Records of each file kept out of training to judge it (gates, export check), capped since
    # every job's export check re-answers every task's holdout. A label task: a quarter, at most
    # 48 (0/1 scores; what a file teaches is tens of points, one record of 48 is ~2). A free-text
    # task: half, at most 96. Its per-record ROUGE-L differences vary by ~12 points, so a gain of
    # 3-4 points needs ~100 records to be seen (headlines, 3 seeds: p 0.011-0.20 at 48 held out
    # of 192, 0.0002-0.14 at 96; docs/benchmarks.md, "Headlines").
    holdout_fraction: float = 0.25
    holdout_max: int = 48
    generation_holdout_fraction: float = 0.5
    generation_holdout_max: int = 96
    forgetting_threshold: float = 5.0  # accuracy points a past task may drop before a publish is held
    # The new task's exact match on its holdout must beat the untrained base's (same runtime and
    # precision) by at least this many points, or the job is held: a model that learned nothing
    # is not published. 0 = only "not worse".
    min_gain_over_base: float = 1.0
    # Confidence of the paired gates (service.gates.beats_base / significant_loss, edgekif.stats):
    # a gain over the base, or a loss vs live, counts only when a paired test on the holdout's
    # per-record scores finds it at this level (p < 1 - gate_confidence); the two margins above
    # are then the smallest gain / largest loss that counts (service.gates.paired_publish_gate).
    gate_confidence: float = 0.95
    nice: int = 10
    memory_ceiling_mb: int = 0  # refuse to load a model if less is available; 0 = off
    # train/export/evaluate in a child process each (service.stage_process): the daemon never
    # loads torch, stays small when idle, and survives a stage the OOM killer takes
    model_stages_in_child: bool = True
    # Do the base's one-time work (conversion, its export, its general answers: ~80 s for
    # SmolLM2) in a child while no job is queued, instead of in the first job (service.preparer)
    prepare_base_when_idle: bool = True
    stop_timeout: float = 30.0
    metrics_file: str = "metrics.prom"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3


@dataclass
class Config:
    data_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # + one attribute per registered strategy section (cfg.kif, cfg.experience_replay)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    general_ability: GeneralAbilityConfig = field(default_factory=GeneralAbilityConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def __post_init__(self) -> None:
        for section, config_cls in SECTION_CONFIGS.items():
            if not hasattr(self, section):
                setattr(self, section, config_cls())

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def sections(self) -> list[str]:
        """Section names in file order: the strategies' sections follow [train]."""
        fixed = [f.name for f in dataclasses.fields(self) if f.name != "data_dir"]
        at = fixed.index("train") + 1
        return fixed[:at] + list(SECTION_CONFIGS) + fixed[at:]

    def to_dict(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, **{s: dataclasses.asdict(getattr(self, s)) for s in self.sections()}}


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Coerce a TOML or CLI value to the type of the default."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, int):
        try:
            if isinstance(value, bool):  # TOML `true` is an int to Python: `capacity = true` is a mistake, not 1
                raise ValueError
            if isinstance(value, str):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(current, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # TOML and float() read nan and inf; no option means them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if isinstance(current, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [str(v) for v in value]
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    if section == "" and key == "data_dir":
        cfg.data_dir = _coerce(value, "", where)
        return
    if section not in cfg.sections():
        raise ConfigError(f"{where}: unknown section [{section}] (known: {', '.join(cfg.sections())})")
    obj = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(obj)}
    if key not in names:
        raise ConfigError(f"{where}: unknown option {section}.{key} (known: {', '.join(sorted(names))})")
    setattr(obj, key, _coerce(value, getattr(obj, key), where))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file (if given or found in the data dir), then `key=value` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a leading BOM, as sidecars and task files accept
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: {e}") from None
        _apply_tables(cfg, raw, str(p))
    return apply_overrides(cfg, overrides or [])


def config_from_dict(d: dict[str, Any]) -> Config:
    """The inverse of Config.to_dict (a stage's child process gets the daemon's config this way)."""
    cfg = Config()
    _apply_tables(cfg, d, "config")
    validate_config(cfg)
    return cfg


def _apply_tables(cfg: Config, raw: dict[str, Any], where: str) -> None:
    """A TOML-shaped dict ({section: {key: value}}, top-level keys such as data_dir) onto cfg."""
    for key, value in raw.items():
        if isinstance(value, dict):
            for k, v in value.items():
                _apply(cfg, key, k, v, f"{where} [{key}] {k}")
        else:
            _apply(cfg, "", key, value, f"{where} {key}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings to cfg (in place) and validate the result."""
    for ov in overrides:
        section, key, value = _parse_override(ov)
        _apply(cfg, section, key, value, f"override {ov!r}")
    validate_config(cfg)
    return cfg


def _parse_override(ov: str) -> tuple[str, str, str]:
    """`section.key=value` -> (section, key, value); a top-level key (data_dir) has section ""."""
    if "=" not in ov:
        raise ConfigError(f"override {ov!r}: expected section.key=value")
    lhs, value = ov.split("=", 1)
    lhs = lhs.strip()
    section, key = lhs.split(".", 1) if "." in lhs else ("", lhs)
    return section, key, value.strip()


def validate_config(cfg: Config) -> None:
    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check(cfg.model.precision in ("auto", "nf4", "bf16", "fp32"), f"model.precision: {cfg.model.precision!r} not in auto|nf4|bf16|fp32")
    check(cfg.model.device in ("auto", "cpu", "cuda") or cfg.model.device.startswith("cuda:"), f"model.device: {cfg.model.device!r}")
    from .chat_templates import configured_template  # here: chat_templates imports edgekif.inputs

    configured_template(cfg.model.chat_template)  # a bad name or unreadable file fails at load, not mid-job
    check(cfg.lora.r > 0 and cfg.lora.alpha > 0, "lora.r and lora.alpha must be positive")
    check(0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)")
    check(cfg.data.max_length >= 8, "data.max_length must be >= 8")
    check(cfg.replay.capacity > 0, "replay.capacity must be positive")
    check(cfg.replay.min_per_task >= 0, "replay.min_per_task must be >= 0")
    d = cfg.data
    check(min(d.max_file_bytes, d.max_records, d.max_line_bytes, d.max_field_chars) > 0,
          "data.max_file_bytes, data.max_records, data.max_line_bytes and data.max_field_chars must be positive")
    check(0 < cfg.replay.fraction <= 1, "replay.fraction must be in (0, 1]")
    check(0 <= cfg.replay.general_share < 1, "replay.general_share must be in [0, 1) (0: no general rehearsal)")
    check(cfg.replay.general_max_new_tokens >= 1, "replay.general_max_new_tokens must be at least 1")
    check(cfg.train.strategy in STRATEGY_SECTIONS, f"train.strategy: {cfg.train.strategy!r} not in {'|'.join(STRATEGY_SECTIONS)}")
    check(cfg.train.batch_size > 0 and cfg.train.lr > 0, "train.batch_size and train.lr must be positive")
    check(cfg.train.generation_lr_scale > 0, "train.generation_lr_scale must be positive")
    t = cfg.train
    check(t.epochs > 0 and math.isfinite(t.epochs), "train.epochs must be a positive number")
    check(t.min_steps >= 0 and t.steps_cap >= 0 and t.max_steps >= 0, "train.min_steps, train.steps_cap and train.max_steps must be >= 0 (0 = none)")
    check(not t.steps_cap or t.min_steps <= t.steps_cap, f"train.min_steps ({t.min_steps}) must not exceed train.steps_cap ({t.steps_cap})")
    check(0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
    check(t.lr_decay in ("cosine", "linear", "constant"), f"train.lr_decay: {t.lr_decay!r} not in cosine|linear|constant")
    check(t.loss_average in ("token", "example"), f"train.loss_average: {t.loss_average!r} not in token|example")
    check(t.max_minutes >= 0 and math.isfinite(t.max_minutes), "train.max_minutes must be >= 0 (0 = no limit)")
    for section in SECTION_CONFIGS:
        options = getattr(cfg, section)
        if hasattr(options, "validate"):
            options.validate(section)
    check(cfg.eval.max_new_tokens > 0 and cfg.eval.batch_size > 0, "eval.max_new_tokens and eval.batch_size must be positive")
    check(cfg.eval.max_examples >= 0 and cfg.eval.max_prompt_tokens >= 0, "eval.max_examples and eval.max_prompt_tokens must be >= 0 (0 = no limit)")
    for section in ("train", "eval"):
        dtype = getattr(cfg, section).compute_dtype
        check(dtype in COMPUTE_DTYPES, f"{section}.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {dtype!r}")
    check(cfg.export.target in ("genai", "onnx"), f"export.target: {cfg.export.target!r} not in genai|onnx")
    check(cfg.export.precision in ("auto", "int4", "fp16", "fp32", "int8"), f"export.precision: {cfg.export.precision!r}")
    check(cfg.export.keep_versions >= 1, "export.keep_versions must be >= 1")
    check(cfg.export.stale_base_export_days >= 0, "export.stale_base_export_days must be >= 0 (0 = never remove)")
    check(cfg.export.threads >= 0, "export.threads must be >= 0 (0 = the physical cores)")
    check(cfg.export.int8_block_size in (16, 32, 64, 128, 256), f"export.int8_block_size: {cfg.export.int8_block_size} not in 16|32|64|128|256")
    check(0 < cfg.service.gate_confidence < 1, "service.gate_confidence must be in (0, 1)")
    # the log's rotation never happens at 0 (RotatingFileHandler's rule): the file would grow for good
    check(cfg.service.log_max_bytes >= 4096 and cfg.service.log_backups >= 1,
          "service.log_max_bytes must be at least 4096 and service.log_backups at least 1 (0 would never rotate the log)")
    for kind in ("", "generation_"):
        # 0 would hold out nothing, and a task with nothing held out is never published (the gate has nothing to judge)
        check(0 < getattr(cfg.service, f"{kind}holdout_fraction") < 1, f"service.{kind}holdout_fraction must be in (0, 1)")
        check(getattr(cfg.service, f"{kind}holdout_max") >= 1, f"service.{kind}holdout_max must be at least 1")
    e = cfg.export
    check(e.parity_max_score_drop >= 0 and 0 <= e.parity_min_prefix_agreement <= 1 and e.parity_prefix_words >= 1,
          "export.parity_max_score_drop >= 0, export.parity_min_prefix_agreement in [0, 1], export.parity_prefix_words >= 1")
    check(e.skip_rejected_after >= 0 and e.retry_skipped_after >= 1, "export.skip_rejected_after >= 0 (0 = never skip), export.retry_skipped_after >= 1")
    try:
        cfg.general_ability.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def dump_default_toml() -> str:
    """The documented defaults as TOML text (used for edgekif.toml.example and `edgekif config`)."""
    lines = ["# edgekif configuration. Every option can also be set with --set section.key=value.", ""]
    cfg = Config()
    d = cfg.to_dict()
    lines.append('data_dir = ""  # empty: $EDGEKIF_DATA_DIR or $XDG_DATA_HOME/edgekif')
    lines += _toml_tables(cfg, {section: list(values) for section, values in d.items() if isinstance(values, dict)})
    return "\n".join(lines) + "\n"


def overrides_toml(overrides: list[str]) -> str:
    """`section.key=value` overrides as the TOML a data dir's edgekif.toml holds: checked and
    coerced as `--set` would be (ConfigError names a bad one), only the keys given, grouped by
    section in file order; a key given twice keeps its last value."""
    cfg = apply_overrides(Config(), overrides)
    keys: dict[str, list[str]] = {}
    for section, key, _ in map(_parse_override, overrides):
        if key not in keys.setdefault(section, []):
            keys[section].append(key)
    lines = [f"data_dir = {_toml_value(cfg.data_dir)}"] if "data_dir" in keys.get("", []) else []
    lines += _toml_tables(cfg, keys)[0 if lines else 1 :]  # no blank line at the top of the file
    return "\n".join(lines) + "\n" if lines else ""


def _toml_tables(cfg: Config, keys: dict[str, list[str]]) -> list[str]:
    """`[section]` tables of cfg's current values for these keys, in file order, each after a blank line."""
    lines: list[str] = []
    for section in (s for s in cfg.sections() if s in keys):
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(getattr(getattr(cfg, section), k))}" for k in keys[section]]
    return lines


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
