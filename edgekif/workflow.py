"""Compositions of the library used by the CLI, the benchmarks and the daemon's stages.

Each function is one step a user thinks in: open a learner (base + LoRA + strategy state),
fuse and export a trained adapter (checked, with its manifest; publishing is
edgekif.publish.ModelStore), score the untrained base the same way (the zero-shot baseline).
The run across tasks is edgekif.continual.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .atomic import atomic_write_text
from .config import Config, xdg_dir
from .layout import DataLayout
from .model import BaseModel, add_lora, load_model, load_tokenizer, resolve_base, resolve_device, resolve_precision, source_quantization

if TYPE_CHECKING:  # the trainer imports torch, which a stage that only answers through an export never needs
    from .trainer import Learner

log = logging.getLogger(__name__)


def cache_root(cfg: Config) -> Path:
    """Where converted base models live: $EDGEKIF_CACHE_DIR; else DATA_DIR/cache if it exists
    (made by versions before the XDG rule: reused rather than converted again); else
    $XDG_CACHE_HOME/edgekif (~/.cache/edgekif), shared by every data dir of the user.
    The system unit sets EDGEKIF_CACHE_DIR, so it never depends on the service user's HOME."""
    if env := os.environ.get("EDGEKIF_CACHE_DIR"):
        return Path(env)
    legacy = DataLayout(cfg.data_path).legacy_cache
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
    precision = resolve_precision(cfg.model.precision, device, base.path)
    model = load_model(base.path, precision, device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA's initial weights: the same run gives the same adapter
    model = add_lora(model, cfg.lora)
    tok = load_tokenizer(base.path, chat_template=cfg.model.chat_template)
    from .trainer import Learner

    learner = Learner.create(cfg, model, tok, strategy)
    if state_dir is not None and (Path(state_dir) / "learner.json").is_file():
        learner.load_state(Path(state_dir))
    if cfg.replay.general_share > 0 and learner.strategy.uses_replay:
        learner.rehearsal_source = functools.cache(lambda: rehearsal_records(cfg, base, precision, learner))
    log.info("learner ready", extra={"base": base.name, "precision": precision, "device": device, "strategy": learner.strategy.name})
    return learner, base


def rehearsal_records(cfg: Config, base: BaseModel, precision: str, learner: Learner, cache_dir: Path | None = None) -> list:
    """The base's answers to the rehearsal prompts (edgekif.rehearsal), cached per base,
    training precision and chat template in `cache_dir` (default: the cache root's
    rehearsal/); none for a base without a chat template of its own (a pretrained model echoes
    prompts: nothing general to keep, as the general gate says)."""
    from .chat_templates import has_own_template
    from .rehearsal import base_rehearsal_records

    if not has_own_template(base.path):
        log.info("general rehearsal off: the base is not an instruction-following model", extra={"base": base.name})
        return []
    base_id = "/".join([f"{base.name}-{(base.source_sha256 or 'unknown')[:12]}", f"torch-{precision}", "training-template", *_template_tag(cfg)])
    records = base_rehearsal_records(learner.model, learner.tokenizer, cache_dir or cache_root(cfg) / "rehearsal", base_id,
                                     cfg.replay.general_max_new_tokens)
    log.info("general rehearsal ready", extra={"records": len(records), "share": cfg.replay.general_share})
    return records


def export_adapter(
    cfg: Config,
    base: BaseModel,
    adapter_dir: Path,
    work_dir: Path,
    out_dir: Path,
    *,
    holdout: Mapping[str, Sequence[Any]],
    labels: Mapping[str, Sequence[str] | None] | None = None,
    manifest_info: dict[str, Any],
    specs: Mapping[str, Any] | None = None,
    history_file: Path | None = None,
) -> Path:
    """Fuse the adapter into an fp32 copy of the base and export it, checked and scored on the
    holdout records as a client would run them (edgekif.export.exporter.export_model), with manifest.

    The export also carries the peft adapter itself under adapter/ (about 1/100 of the fused
    model's size), with the base's id as base_model_name_or_path; the manifest records it under
    `adapter` with the base's id and SHA-256, so it can be loaded on another machine that has
    the same base (docs/serving.md, "Adapters"). `specs` ({task: edgekif.tasks.TaskSpec}):
    each task is answered with its own budget and scored by its own metric; tasks without one
    with `eval.max_new_tokens` and exact match only. `history_file`: past check outcomes, so a
    variant this base keeps failing is skipped (edgekif.export.history)."""
    from .export.check import GenerationRule
    from .export.exporter import export_model
    from .export.files import ADAPTER_DIR
    from .export.fuse import adapter_sha256, fuse_adapter, portable_adapter
    from .export.build import int8_variant, second_int8
    from .export.history import SkipPolicy

    # A retry starts from what the last try finished in work_dir: the fused model (made from
    # this very adapter, base and chat template) and the reference answers (the fused model's,
    # so they go when it is made anew) are reused.
    work_dir, digest = Path(work_dir), adapter_sha256(adapter_dir)
    fused, fused_from, reference = work_dir / "fused", work_dir / "fused.adapter_sha256", work_dir / "reference.json"
    made_from = f"{digest} base={base.source_sha256} {' '.join(_template_tag(cfg)) or 'template=base'}"
    if not (fused_from.is_file() and fused_from.read_text().strip() == made_from and fused.is_dir()):
        fused_from.unlink(missing_ok=True)
        reference.unlink(missing_ok=True)
        fuse_adapter(base.path, adapter_dir, fused, chat_template=cfg.model.chat_template)
        atomic_write_text(fused_from, made_from + "\n")
    else:
        log.info("fused model reused from the last try", extra={"path": str(fused)})
    portable = work_dir / "adapter"
    adapter_info = portable_adapter(adapter_dir, portable, base_model_id=base.name)
    adapter_info["base_model"] = {"id": base.name, "sha256": base.source_sha256, "source_file": Path(base.source).name}
    info = {
        "base_model_id": base.name,
        "base_model_sha256": base.source_sha256,
        "adapter_sha256": digest,
        "adapter": adapter_info,
        **manifest_info,
    }
    # every task the version answers, by kind (a task without a spec is scored like a label)
    int8 = _int8_for(cfg, [getattr((specs or {}).get(t), "kind", None) for t in holdout])
    return export_model(
        fused,
        out_dir,
        target=cfg.export.target,
        precision=cfg.export.precision,
        execution_provider=cfg.export.execution_provider,
        holdout=holdout,
        labels=labels if cfg.eval.label_scoring else None,
        manifest_info=info,
        min_agreement=cfg.export.parity_min_agreement,
        max_accuracy_drop=cfg.export.parity_max_accuracy_drop,
        max_new_tokens=cfg.eval.max_new_tokens,
        extra_dirs={ADAPTER_DIR: portable},
        reference_cache=reference,
        specs=specs,
        generation=GenerationRule(cfg.export.parity_max_score_drop, cfg.export.parity_min_prefix_agreement, cfg.export.parity_prefix_words),
        history_file=history_file if cfg.export.skip_rejected_after > 0 else None,
        skip_policy=SkipPolicy(max(1, cfg.export.skip_rejected_after), cfg.export.retry_skipped_after),
        skip_precisions=_known_failures(cfg, base),
        threads=cfg.export.threads,
        int8=int8,
        int8_second=second_int8(int8, int8_variant(cfg.export.int8_block_size, cfg.export.int8_symmetric)) if cfg.export.int8_second_try else None,
    )


def _int8_for(cfg: Config, kinds: Sequence[str | None]) -> Any:
    """The CPU genai int8 variant (edgekif.export.build.int8_for_tasks) of a model whose tasks
    are of these kinds, with the config's int8 settings."""
    from .export.build import int8_for_tasks

    return int8_for_tasks(kinds, cfg.export.int8_block_size, cfg.export.int8_symmetric, cfg.export.int8_by_task_kind)


def _known_failures(cfg: Config, base: BaseModel) -> dict[str, str]:
    """Precisions `auto` does not try for this base, with the reason (export_model's
    skip_precisions): int4 on a base whose GGUF projections are already below 8 bits."""
    if cfg.export.int4_on_low_bit_base:
        return {}
    quant = source_quantization(base)
    if quant is None or quant["bits_per_weight"] >= 8:
        return {}
    return {"int4": f"the base's GGUF stores its projections as {quant['type']} ({quant['bits_per_weight']} bits per weight): "
                    "another 4-bit grid changes too many answers (export.int4_on_low_bit_base = true tries it)"}


def _zero_shot_root(cfg: Config, base: BaseModel, export_settings: Mapping[str, Any]) -> tuple[Path, Any, str, str]:
    """(the cache folder of the base exported with these settings, its variant, target, ep)."""
    import hashlib
    import json

    from .export.build import ExportVariant

    variant = ExportVariant(str(export_settings["precision"]), tuple(sorted((export_settings.get("builder_options") or {}).items())))
    target, ep = str(export_settings["target"]), str(export_settings.get("execution_provider") or "cpu")
    # "training-template": the base is exported with the chat template training uses (older
    # caches kept the base's own template, default system prompt and all: not like for like)
    key = hashlib.sha256(json.dumps([target, ep, variant.name, "training-template", *_template_tag(cfg), _code_tag()]).encode()).hexdigest()[:12]
    return _zero_shot_base_dir(cfg, base) / f"{target}-{variant.precision}-{key}", variant, target, ep


def _zero_shot_base_dir(cfg: Config, base: BaseModel) -> Path:
    """Where `base`'s exports are cached, one folder per setting and code (_zero_shot_root)."""
    return cache_root(cfg) / "zero-shot" / f"{base.name}-{(base.source_sha256 or 'unknown')[:12]}"


# The modules that decide what the base's cached export is and how its answers are prompted,
# decoded and scored. A cache made by other code is not like for like: on 2026-12-04 a new
# cache gave the base 27.1 on the demo's agnews holdout where an older one had kept 22.9.
_CACHE_CODE = ("inputs.py", "chat_templates.py", "decoding.py", "infer.py", "metrics.py", "general_ability.py",
               "export/build.py", "export/genai_builder.py", "export/lm_head.py", "export/check.py")


@functools.cache  # the sources do not change under a running process: read them once
def _code_tag() -> str:
    """A hash of _CACHE_CODE's sources: an upgrade that changes them measures the base again."""
    import hashlib

    h = hashlib.sha256()
    for name in _CACHE_CODE:
        h.update(name.encode())
        h.update((Path(__file__).parent / name).read_bytes())
    return "code-" + h.hexdigest()[:12]


def _template_tag(cfg: Config) -> list[str]:
    """[] for the base's own template (keeps older cache keys), else [a hash of the configured
    template], so a changed model.chat_template never reuses the base's cached export."""
    import hashlib

    from .chat_templates import configured_template

    template = configured_template(cfg.model.chat_template)
    return [] if template is None else ["template-" + hashlib.sha256(template.encode()).hexdigest()[:12]]


def base_source(root: Path, base: BaseModel, chat_template: str = "") -> Path:
    """The base's folder as a trained model's is exported: its weights (linked, not copied) with
    the tokenizer training uses (edgekif.model.load_tokenizer: no default system prompt), so the
    base's export renders a prompt exactly as a trained version's does: ROOT/source. The daemon
    calls it under base_export's cache lock; tools/bench_quant.py with a scratch root."""
    from .atomic import atomic_dir

    src = root / "source"
    if (src / "config.json").exists():
        return src
    with atomic_dir(src, overwrite=True) as tmp:
        load_tokenizer(base.path, chat_template=chat_template).save_pretrained(tmp)
        for f in Path(base.path).iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                os.symlink(f.resolve(), tmp / f.name)
    return src


def base_export(cfg: Config, base: BaseModel, export_settings: Mapping[str, Any]) -> Path:
    """The untrained base exported exactly as a job's export was (`export_settings`: target,
    precision, execution_provider, builder_options, as in its manifest), with the training
    chat template; built once per setting into the cache (cache_root/zero-shot)."""
    from .atomic import atomic_dir, remove_dead_temps
    from .export.build import build_variant
    from .export.files import EXPORT_INFO

    root, variant, target, ep = _zero_shot_root(cfg, base, export_settings)
    with _cache_lock(root):
        export_dir = root / "export"
        if not (export_dir / EXPORT_INFO).is_file():
            # what a build killed on the way left (the preparation is stopped with SIGKILL)
            if stale := remove_dead_temps(root):
                log.info("removed half-built base exports left by stopped processes", extra={"paths": [str(p) for p in stale]})
            source = base_source(root, base, cfg.model.chat_template)
            with atomic_dir(export_dir, overwrite=True) as tmp:
                build_variant(source, tmp, target, variant, ep, cfg.export.threads)
            log.info("base exported for zero-shot and general-ability figures", extra={"base": base.name, "variant": variant.name})
        return export_dir


def zero_shot_scores(cfg: Config, base: BaseModel, export_settings: Mapping[str, Any], holdout: Mapping[str, Sequence[Any]],
                     specs: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The *untrained* base on each holdout, exported and run exactly as a job's export was
    (base_export), so a trained model is compared with the base like for like: per task its
    strict exact match and, with the task's spec (edgekif.tasks.TaskSpec), its answer budget,
    its headline metric and every record's score (the gate's paired test) with the records'
    SHA-256.

    The base's export is answered by the export check (edgekif.export.check); scores are
    cached by the records' SHA-256, budget and metric, so each holdout is run once per base.
    """
    import hashlib
    import json

    from .atomic import atomic_write_json
    from .export.check import check_candidate, scored, task_budget, task_metric
    from .records import records_sha256

    export_dir = base_export(cfg, base, export_settings)
    root, variant, target, ep = _zero_shot_root(cfg, base, export_settings)
    specs = {k: v for k, v in (specs or {}).items() if k in holdout}
    with _cache_lock(root):
        scores_path = root / "scores.json"
        try:
            scores = json.loads(scores_path.read_text())
        except (FileNotFoundError, ValueError):
            scores = {}
        todo = {}
        for name, recs in holdout.items():
            if not scored(recs):
                continue
            budget, metric = task_budget(name, cfg.eval.max_new_tokens, specs), task_metric(name, specs)
            digest = records_sha256(recs)
            # the budget and metric are part of what was measured (older entries: the records alone)
            todo[name] = digest if not specs.get(name) else hashlib.sha256(f"{digest}/{budget}/{metric}".encode()).hexdigest()
        missing = [name for name, digest in todo.items() if digest not in scores]
        if missing:
            todo_records = {name: holdout[name] for name in missing}
            result = check_candidate(base.path, export_dir, target=target, variant=variant, execution_provider=ep, holdout=todo_records,
                                     max_new_tokens=cfg.eval.max_new_tokens, build=False,
                                     **({"specs": {k: v for k, v in specs.items() if k in todo_records}} if specs else {}))
            for name in missing:
                a = result.answers[name]
                scores[todo[name]] = {"exact_match": a.exact_match, "n": a.n, "task": name,
                                      "max_new_tokens": task_budget(name, cfg.eval.max_new_tokens, specs),
                                      **({"metric": a.metric, "score": a.score, "scores": [round(x, 6) for x in a.scores],
                                          "records_sha256": records_sha256(holdout[name])} if a.scores is not None else {})}
            atomic_write_json(scores_path, scores)
            log.info("zero-shot scores of the base measured", extra={"base": base.name, "variant": variant.name, "tasks": missing})
        return {name: scores[digest] for name, digest in todo.items()}


def general_ability(cfg: Config, base: BaseModel, export_dir: Path, fused_dir: Path | None) -> dict[str, Any]:
    """How far the export in `export_dir` drifted from the base on the shipped general prompts
    (edgekif.general_ability): both answer them greedily through their exports as a client
    does (the base's answers cached per base and export setting), and, with `fused_dir` (the
    candidate's fp32 weights) and `max_loglik_drop` > 0, the mean log-likelihood each PyTorch
    model gives the base's answers. Returns the figures, the bounds and the verdict
    (`held`, `reason`), as the manifest keeps them."""
    from .export.manifest import read_manifest
    from .chat_templates import has_own_template
    from .general_ability import base_answer_loglik, base_answers, drift, drifted, load_prompts
    from .infer import open_model

    gcfg = cfg.general_ability
    prompts = load_prompts()
    settings = read_manifest(export_dir).export_settings
    reference, ll_base = _base_general_reference(cfg, base, settings, loglik=fused_dir is not None)
    runner = open_model(export_dir)
    answers = base_answers(runner, prompts, gcfg.max_new_tokens)
    del runner
    ll_cand = None
    if ll_base is not None:
        tok = load_tokenizer(base.path, chat_template=cfg.model.chat_template)
        ll_cand = base_answer_loglik(load_model(fused_dir, "fp32"), tok, prompts, reference)
    figures = drift(answers, reference, prompts, loglik_base=ll_base, loglik_candidate=ll_cand)
    instruct = has_own_template(base.path)
    held, reason = drifted(figures, gcfg, instruct_base=instruct)
    log.info("general ability measured", extra={"rouge_l": figures.rouge_l, "loglik_drop": figures.loglik_drop, "held": held})
    return {**figures.to_dict(), "max_new_tokens": gcfg.max_new_tokens, "min_rouge_l": gcfg.min_rouge_l,
            "max_loglik_drop": gcfg.max_loglik_drop, "prompts": len(prompts), "instruct_base": instruct, "held": held, "reason": reason,
            "answers": dict(list(zip([p.id for p in prompts], answers))[:10])}


def _base_general_reference(cfg: Config, base: BaseModel, settings: Mapping[str, Any], *, loglik: bool) -> tuple[list[str], float | None]:
    """The base's answers to the general prompts through its export with `settings` and, with
    `loglik` and a log-likelihood bound configured, the mean log-likelihood the fp32 base gives
    them: both cached per base, export setting, template and code (computed on a miss)."""
    from .general_ability import base_answer_loglik, cached_base_answers, cached_base_loglik, load_prompts
    from .infer import open_model

    gcfg, prompts = cfg.general_ability, load_prompts()
    _root, variant, target, _ep = _zero_shot_root(cfg, base, settings)
    base_id = "/".join([f"{base.name}-{(base.source_sha256 or 'unknown')[:12]}", f"{target}-{variant.name}", "training-template", *_template_tag(cfg), _code_tag()])
    reference = cached_base_answers(cache_root(cfg) / "general-ability", base_id, prompts, gcfg.max_new_tokens,
                                    lambda: open_model(base_export(cfg, base, settings)))
    if not loglik or gcfg.max_loglik_drop <= 0:
        return reference, None
    ll_base = cached_base_loglik(cache_root(cfg) / "general-ability", base_id, prompts, gcfg.max_new_tokens,
                                 lambda: base_answer_loglik(load_model(base.path, "fp32"),
                                                            load_tokenizer(base.path, chat_template=cfg.model.chat_template), prompts, reference))
    return reference, ll_base


def prepare_settings(cfg: Config, base: BaseModel) -> list[dict[str, Any]]:
    """The export settings a first job's version is built with when its first candidate passes
    (export_adapter): with `auto` on the CPU genai target, the int8 of a model with label tasks
    and, when it differs, the int8 of a free-text-only model (int4 is skipped on a low-bit base);
    otherwise the one precision asked for. In manifest form (Manifest.export_settings)."""
    from .export.build import export_candidates, resolve_export_settings
    from .metrics import CLASSIFICATION, GENERATION

    target, precision, ep = resolve_export_settings(cfg.export.target, cfg.export.precision, cfg.export.execution_provider)
    skip = _known_failures(cfg, base)
    variants = []
    for kind in (CLASSIFICATION, GENERATION):
        candidates = export_candidates(target, precision, ep, cfg.export.precision, None, _int8_for(cfg, [kind]))
        first = next((v for v in candidates if v.precision not in skip), candidates[0])
        if first not in variants:
            variants.append(first)
    return [{"target": target, "precision": v.precision, "execution_provider": ep, "builder_options": v.builder_options()} for v in variants]


def prepare_base(cfg: Config, progress: Any = None) -> list[dict[str, Any]]:
    """Do once, before any job, the work a base's first jobs would otherwise pay (`edgekif
    model prepare`, `make demo` before it starts the daemon): convert the base into the cache,
    export it with each of prepare_settings (the zero-shot and general-ability baselines), and
    record its answers to the general prompts and their log-likelihood. Everything lands in the
    caches the jobs read, under their keys, so a job finds it done; a second call only checks.
    The per-task zero-shot scores stay in the jobs: they need the task's holdout. Returns, per
    setting, the variant and the seconds it took; `progress(str)` is told each step."""
    import time

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    base = resolve_base(cfg.model, cache_root(cfg))
    say(f"base {base.name} ready ({time.perf_counter() - t0:.0f} s)")
    done = []
    for settings in prepare_settings(cfg, base):
        t1 = time.perf_counter()
        _, variant, _, _ = _zero_shot_root(cfg, base, settings)
        base_export(cfg, base, settings)
        _base_general_reference(cfg, base, settings, loglik=True)
        done.append({"variant": variant.name, "seconds": round(time.perf_counter() - t1, 1), **settings})
        say(f"exported as {variant.name} and answered the general prompts ({done[-1]['seconds']:.0f} s)")
    if removed := prune_base_exports(cfg, base):
        say(f"removed {len(removed)} cached base exports made by other edgekif code and unused for "
            f"{cfg.export.stale_base_export_days:g} days (export.stale_base_export_days)")
    return done


USED_FILE = "used.json"  # in each zero-shot cache folder: the code that last used it, and when (its mtime)


def prune_base_exports(cfg: Config, base: BaseModel, *, now: float | None = None) -> list[Path]:
    """Remove the cache folders of `base`'s exports (cache_root/zero-shot/<base>-<sha12>) that
    this code cannot use: last used by other edgekif code (USED_FILE names it; its mtime is the
    last use) and not for export.stale_base_export_days. A folder from before USED_FILE is
    marked on first sight and judged from then on (it may be this code's own, or in use by an
    older edgekif that does not mark it). Decided under the folder's lock (a folder in use is
    left); removed by renaming it away first, so a crash never leaves half a folder under its
    name. Returns the folders removed."""
    import fcntl
    import shutil
    import time

    days = cfg.export.stale_base_export_days
    parent = _zero_shot_base_dir(cfg, base)
    if days <= 0 or not parent.is_dir():
        return []
    for left in parent.glob(".removing-*"):  # a removal a crash cut short
        shutil.rmtree(left, ignore_errors=True)
    cutoff = (time.time() if now is None else now) - days * 86400
    removed = []
    for root in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _stale(root, cutoff):
            continue
        try:
            fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _stale(root, cutoff):  # used between the look and the lock
                continue
            away = parent / f".removing-{root.name}"
            os.rename(root, away)
        except OSError:  # BlockingIOError: another process is using it
            continue
        finally:
            os.close(fd)
        shutil.rmtree(away, ignore_errors=True)
        removed.append(root)
    if removed:
        log.info("removed cached base exports of other edgekif code", extra={"base": base.name, "paths": [str(p) for p in removed], "unused_days": days})
    return removed


def _stale(root: Path, cutoff: float) -> bool:
    """Whether a zero-shot cache folder was last used by other code before `cutoff`. A folder
    without USED_FILE gets one (code unknown, used now): it is judged from its first sighting."""
    import json

    from .atomic import atomic_write_json

    try:
        code = json.loads((root / USED_FILE).read_text()).get("code")
    except FileNotFoundError:
        try:
            atomic_write_json(root / USED_FILE, {"code": None})
        except OSError:
            pass
        return False
    except (OSError, ValueError, AttributeError):
        code = None
    if code == _code_tag():
        return False
    try:
        return (root / USED_FILE).stat().st_mtime <= cutoff
    except OSError:
        return False


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Exclusive use of one zero-shot cache folder (daemons on other data dirs may share the
    cache): the holder is its only writer, so a temp folder found there is a crashed build's
    (kill -9 mid-build) and is removed, not left to take disk for good."""
    import fcntl
    import shutil

    from .atomic import atomic_write_json

    while True:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another process's build (minutes at most)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(root / ".lock"))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # pruned (renamed away, prune_base_exports) while this waited: lock the new folder
    try:
        for stale in [*root.glob(".export.*.tmp"), *root.glob(".export.old-*")]:  # atomic_dir's temp and parked old folder
            log.warning("removing a crashed zero-shot build", extra={"path": str(stale)})
            shutil.rmtree(stale, ignore_errors=True)
        try:
            atomic_write_json(root / USED_FILE, {"code": _code_tag()})  # for prune_base_exports: its mtime is the last use
        except OSError as e:  # a full disk: the folder still works; it only looks older to a pruner
            log.warning("cannot mark a zero-shot cache folder used", extra={"path": str(root), "error": str(e)})
        yield
    finally:
        os.close(fd)  # releases the lock
