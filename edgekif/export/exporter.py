"""export_model: a fused model folder -> a checked export folder with its manifest.

  for each candidate variant (edgekif.export.build.export_candidates), fastest first:
       check_candidate (build, answer the holdout as a client)
       the first to answer: reference_answers (fp32 PyTorch, edgekif.export.check) verifies
       its answers as drafts
       check_answers (compare with the reference)
  -> the first that passes gets its manifest (edgekif.export.manifest) and appears at out_dir

Each candidate is built in a temp sibling of out_dir and renamed into place only when it passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..atomic import atomic_dir, atomic_write_json
from ..errors import ExportError, ParityError
from ..records import records_sha256
from .build import INT8_CPU, ExportVariant, export_candidates, resolve_export_settings
from .check import CandidateCheck, AnswerSet, GenerationRule, check_answers, check_candidate, reference_answers, task_budget
from .files import runtime_versions
from .fuse import dist_version
from .history import SkipPolicy, VariantHistory, setting_key
from .manifest import write_manifest

if TYPE_CHECKING:
    from ..tasks import TaskSpec

log = logging.getLogger(__name__)

KEEP_ANSWERS = 20  # per task, in the manifest: enough to see what the model says


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
    reference_cache: str | os.PathLike | None = None,
    specs: Mapping[str, "TaskSpec"] | None = None,
    generation: GenerationRule | None = None,
    history_file: str | os.PathLike | None = None,
    skip_policy: SkipPolicy | None = None,
    skip_precisions: Mapping[str, str] | None = None,
    threads: int = 0,
    int8: ExportVariant = INT8_CPU,
    int8_second: ExportVariant | None = None,
) -> Path:
    """Export, score it on `holdout` as a client would, write the manifest; out_dir appears
    only when an export passes.

    Each candidate export answers every holdout record through its own runtime (one request at
    a time, its chat template, greedy, `max_new_tokens`); the fp32 PyTorch model in `fused_dir`
    answers the same records (the reference), once, after the first candidate has answered: it
    verifies that candidate's answers as drafts and decodes only where it parts from them
    (edgekif.export.check.reference_answers; its answers are its own either way). A candidate
    passes when it answers exactly as the reference on >= `min_agreement` of the records and its pooled exact match is
    at most `max_accuracy_drop` points below the reference's (edgekif.export.check.compare_answers).
    With precision "auto" on the CPU genai target the candidates are AUTO_VARIANTS_GENAI_CPU,
    fastest first; rejected ones are recorded in the manifest with their figures.

    The manifest's `accuracies` are the published export's own exact match per task (named by
    `accuracies_measured_by`); the PyTorch figures are kept under `reference`.
    Records without labels (prompts only) count for agreement, not accuracy.
    `extra_dirs` ({name: folder}) are copied in as subfolders before the manifest is written, so
    its hashes cover them (the published peft adapter). `reference_cache` (a JSON file) keeps
    the reference answers for a retry of the same fused model on the same records.
    `specs` ({task: TaskSpec}): each task's answers are generated with its own budget and
    scored by its own metric too (edgekif.export.check); the manifest records per task its
    kind, metric and budget (`task_specs`) and its headline score (`scores`), beside
    `accuracies` (strict exact match, as always); free-text tasks are held to `generation`
    (edgekif.export.check.GenerationRule) instead of identical answers.
    `history_file`: past check outcomes (edgekif.export.history): with several candidates, a
    variant rejected on the last checks of the same base and rules is skipped, and the
    manifest says so under `parity_skipped`.
    `skip_precisions` ({precision: reason}): with several candidates, those of these precisions
    are not tried at all (known to fail for this base: edgekif.workflow.export decides), and the
    manifest says why under `parity_skipped`. A single requested precision is always built.
    `threads`: a genai export's decoder CPU threads, written into its genai_config.json and
    recorded in the manifest's `export` (edgekif.export.build.session_options; 0 = physical cores).
    `int8`: the CPU genai int8 variant (edgekif.export.build.int8_variant; default INT8_CPU);
    `int8_second`: with `auto`, the int8 tried next when `int8` fails (edgekif.export.build.second_int8).
    """
    requested = precision
    target, precision, ep = resolve_export_settings(target, precision, execution_provider)
    candidates = export_candidates(target, precision, ep, requested, builder_options, int8, int8_second)
    fused_dir, out_dir = Path(fused_dir), Path(out_dir)
    holdout = {k: list(v) for k, v in holdout.items() if v}
    if not holdout:
        raise ExportError("export_model needs holdout records (or prompts) to check the export with")
    specs = {k: v for k, v in (specs or {}).items() if k in holdout}
    generation = generation or GenerationRule()
    history = None
    skipped: list[dict[str, Any]] = []
    if skip_precisions and len(candidates) > 1:
        known_bad = [v for v in candidates if v.precision in skip_precisions]
        if len(known_bad) < len(candidates):
            for v in known_bad:
                log.info("export variant skipped: known to fail for this base", extra={"variant": v.name, "reason": skip_precisions[v.precision]})
            skipped = [{"variant": v.name, "reason": skip_precisions[v.precision]} for v in known_bad]
            candidates = [v for v in candidates if v.precision not in skip_precisions]
    if history_file is not None and len(candidates) > 1:
        rules = {"min_agreement": min_agreement, "max_accuracy_drop": max_accuracy_drop, "generation": asdict(generation)}
        history = VariantHistory(history_file, setting_key(str((manifest_info or {}).get("base_model_sha256")), target, ep, rules), skip_policy)
        skipped_names = history.skip([v.name for v in candidates])
        for v in candidates:
            if v.name in skipped_names:
                history.note_skipped(v.name)
                log.info("export variant skipped: rejected on the last checks of this base", extra={"variant": v.name})
        candidates = [v for v in candidates if v.name not in skipped_names]
        skipped += [{"variant": name, "reason": f"rejected on the last {history.policy.skip_after} checks with this base and rules; "
                     f"tried again after {history.policy.retry_after} skips"} for name in sorted(skipped_names)]
    key = _reference_key(holdout, max_new_tokens, labels, specs)
    reference, reference_seconds = _cached_reference(reference_cache, key)
    rejected: list[dict[str, Any]] = []
    for i, variant in enumerate(candidates):
        try:
            with atomic_dir(out_dir, overwrite=True) as tmp:
                result = check_candidate(fused_dir, tmp, target=target, variant=variant, execution_provider=ep, holdout=holdout,
                                         max_new_tokens=max_new_tokens, specs=specs, threads=threads)
                if reference is None:  # the first export to answer: its answers are the fp32 model's drafts
                    reference, reference_seconds = _reference(fused_dir, holdout, max_new_tokens, labels, reference_cache, specs, key, result.answers)
                check = result.check = check_answers(reference, result.answers, specs=specs, min_agreement=min_agreement,
                                                     max_accuracy_drop=max_accuracy_drop, generation=generation)
                check.seconds = result.seconds
                if history is not None:
                    history.record(variant.name, check.passed)
                figures = {"variant": variant.name, "precision": variant.precision, "builder_options": variant.builder_options(),
                           "build_seconds": round(result.build_seconds or 0.0, 1), **{k: v for k, v in check.to_dict().items() if k != "per_task"}}
                log.info("export checked on the holdout", extra={k: figures[k] for k in ("variant", "agreement", "accuracy", "reference_accuracy", "passed")})
                if not check.passed:
                    raise ParityError(f"{variant.name} export: " + "; ".join(check.reasons))
                for name, src in (extra_dirs or {}).items():  # e.g. the peft adapter: in before the manifest hashes the folder
                    shutil.copytree(src, tmp / name)
                # each task was answered within its own budget (task_specs), the default where it has none
                budgets = {name: task_budget(name, max_new_tokens, specs) for name in result.answers} if specs else max_new_tokens
                _write_checked_manifest(tmp, target, ep, result, figures, reference, reference_seconds, rejected, budgets,
                                        {**(manifest_info or {}), **_spec_info(specs, result.answers, max_new_tokens),
                                         **({"parity_skipped": skipped} if skipped else {})}, holdout)
            break
        except ParityError as e:
            if i + 1 == len(candidates):
                raise ParityError(f"{out_dir.name}: no export passed the answer check ({len(candidates)} tried): {e}") from e
            log.warning("export rejected; trying the next one", extra={"variant": variant.name, "next": candidates[i + 1].name, "error": str(e)})
            rejected.append({**figures, "reasons": check.reasons, "per_task": check.per_task})
        except ExportError as e:
            # a variant that builds but cannot answer (or cannot build) every time is rejected
            # like one whose answers differ: the next precision may work (the last one's error
            # ends the export)
            if not e.permanent or i + 1 == len(candidates):
                raise
            if history is not None:
                history.record(variant.name, False)
            log.warning("export variant failed; trying the next one", extra={"variant": variant.name, "next": candidates[i + 1].name, "error": str(e)[:500]})
            rejected.append({"variant": variant.name, "precision": variant.precision, "builder_options": variant.builder_options(), "reasons": [str(e)[:500]]})
    log.info("export ready", extra={"path": str(out_dir), "target": target, "variant": variant.name, "ep": ep})
    return out_dir


def _spec_info(specs: Mapping[str, "TaskSpec"], answers: Mapping[str, AnswerSet], max_new_tokens: int) -> dict[str, Any]:
    """The manifest's `task_specs` (per task: kind, metric, the budget it was answered with,
    where the spec came from) and `scores` (its headline metric, measured on this export)."""
    if not specs:
        return {}
    task_specs = {name: {"kind": s.kind, "metric": s.metric, "max_new_tokens": task_budget(name, max_new_tokens, specs), "source": s.source}
                  for name, s in specs.items()}
    scores = {name: a.score for name, a in answers.items() if name in specs and a.score is not None}
    return {"task_specs": task_specs, "scores": scores}


def _reference_key(holdout: Mapping[str, Sequence[Any]], max_new_tokens: int, labels: Mapping[str, Sequence[str] | None] | None,
                   specs: Mapping[str, "TaskSpec"] | None) -> str:
    """What the reference answers depend on: the records, budgets, metrics and label sets."""
    key_of = {"records": {k: [r.to_json() for r in v] for k, v in holdout.items()}, "max_new_tokens": max_new_tokens, "labels": labels or {},
              "specs": {k: {**s.to_dict(), "max_new_tokens": task_budget(k, max_new_tokens, specs)} for k, s in (specs or {}).items()}}
    return hashlib.sha256(json.dumps(key_of, sort_keys=True).encode()).hexdigest()


def _cached_reference(cache: str | os.PathLike | None, key: str) -> tuple[dict[str, AnswerSet] | None, float]:
    """The reference answers (and how long they took) from `cache` when it was written for
    `key` (a retry after a failed try), else (None, 0.0)."""
    if cache is not None:
        try:
            saved = json.loads(Path(cache).read_text())
            if saved.get("key") == key:
                log.info("reference answers reused from the last try", extra={"path": str(cache)})
                return {k: AnswerSet(**v) for k, v in saved["tasks"].items()}, float(saved["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return None, 0.0


def _reference(fused_dir: Path, holdout: Mapping[str, Sequence[Any]], max_new_tokens: int,
               labels: Mapping[str, Sequence[str] | None] | None, cache: str | os.PathLike | None,
               specs: Mapping[str, "TaskSpec"] | None, key: str, drafts: Mapping[str, AnswerSet]) -> tuple[dict[str, AnswerSet], float]:
    """The fp32 reference answers, measured with a candidate's answers as drafts, and how long
    they took; kept in `cache` under `key` for a retry."""
    t0 = time.perf_counter()
    reference = reference_answers(fused_dir, holdout, max_new_tokens=max_new_tokens, labels=labels, specs=specs, drafts=drafts)
    seconds = time.perf_counter() - t0
    if cache is not None:
        atomic_write_json(cache, {"key": key, "seconds": seconds, "tasks": {k: asdict(v) for k, v in reference.items()}})
    return reference, seconds


def _write_checked_manifest(
    folder: Path, target: str, ep: str, result: CandidateCheck, figures: dict[str, Any], reference: Mapping[str, AnswerSet],
    reference_seconds: float, rejected: list[dict[str, Any]], max_new_tokens: int | dict[str, int], manifest_info: dict[str, Any] | None,
    holdout: Mapping[str, Sequence[Any]],
) -> None:
    """The manifest of a candidate that passed: its own accuracies, the reference's, the check's figures."""
    variant, answers, check = result.variant, result.answers, result.check
    assert check is not None
    info = {k: v for k, v in (manifest_info or {}).items() if k not in ("target", "precision", "execution_provider", "accuracies")}
    measured = {name: a.exact_match for name, a in answers.items() if a.exact_match is not None}
    write_manifest(
        folder, target=target, precision=variant.precision, execution_provider=ep, accuracies=measured,
        accuracies_measured_by={
            "runtime": _runtime_name(target), "target": target, "precision": variant.precision, "execution_provider": ep,
            # "accuracies" are strict exact match; "scores" each task's own metric (a free-text
            # task has accuracy 0 and a ROUGE-L score): named per task so neither is misread
            "metric": "exact_match", "scores_metric": {name: a.metric for name, a in answers.items() if a.metric is not None},
            "decoding": "greedy", "max_new_tokens": max_new_tokens,
            "prompt": "each holdout record's chat messages, whole, through this folder's chat template",
        },
        evaluation={name: _evaluation(a, holdout[name]) for name, a in answers.items()},
        reference={"runtime": _pytorch_name(), "seconds": round(reference_seconds, 1),
                   "tasks": {name: a.summary() for name, a in reference.items()}},
        parity={**figures, "per_task": check.per_task},
        **({"parity_rejected": rejected} if rejected else {}),
        **info,
    )


def _evaluation(a: AnswerSet, records: Sequence[Any]) -> dict[str, Any]:
    """A task's figures on the export, its first answers, and (when its metric was measured)
    every record's score, for the gate's paired tests."""
    out: dict[str, Any] = {**a.summary(), "answers": a.answers[:KEEP_ANSWERS]}
    if a.scores is not None:
        out["scores"] = [round(s, 6) for s in a.scores]
        out["records_sha256"] = records_sha256(records)
    return out


def _runtime_name(target: str) -> str:
    versions = runtime_versions()
    if target == "genai":
        return f"onnxruntime-genai {versions.get('onnxruntime_genai')}"
    return f"onnxruntime {versions.get('onnxruntime')}"


def _pytorch_name() -> str:
    version = dist_version("torch")
    return f"pytorch {version} fp32 (fused model, eager)" if version else "pytorch fp32 (fused model, eager)"
