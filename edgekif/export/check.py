"""The export check: build a candidate, run it on records as a client does, compare it with a reference.

  check_candidate(source, folder, target=..., variant=..., holdout=..., reference=...)
      = build_variant (edgekif.export.build) -> open the folder's runner (edgekif.infer)
        -> client_answers on every record -> compare_answers with the reference
  reference_answers(model_dir, holdout)      # the fp32 PyTorch model on the same prompts: the reference
  compare_answers(reference, answers, ...)   # -> AnswerCheck (agreement, accuracy drop, passed)

The one place that loop exists: the exporter (edgekif.export.exporter), the base's zero-shot
baseline (edgekif.workflow.zero_shot_scores) and the benchmarks (tools/bench_serving.py,
tools/bench_quant.py) all call check_candidate.

Prompts are the records' whole chat messages (`Record.chat()`), rendered by the export's own
chat template, which equals the training format (tests/test_export.py checks it): exactly
what `edgekif infer` and a local client send. Exact match compares the stripped answer with
the stripped label.

Given the tasks' specs (edgekif.tasks.TaskSpec, `specs=` on runner_answers, reference_answers
and check_candidate), each task is also scored by its own metric (edgekif.metrics: e.g.
ROUGE-L for free text) in `AnswerSet.metric/score/scores`, and answered with its own budget
(`spec.max_new_tokens`). `exact_match` stays the strict figure it always was. The pass rule
is per kind (compare_answers): label tasks keep identical answers and exact match; free-text
tasks are judged by their metric, paired per record, and by their answers' first words
(GenerationRule). Without specs every task is a label task, as before.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ExportError, ModelError
from ..evaluate import EVAL_BATCH_SIZE
from ..metrics import score
from ..records import Record
from .build import ExportVariant

if TYPE_CHECKING:
    from ..tasks import TaskSpec

Holdout = Mapping[str, Sequence[Record]]  # task name -> records (labels may be empty: agreement only)


def scored(records: Sequence[Record]) -> bool:
    """Exact match means something only when every record has an answer to compare with."""
    return bool(records) and all(r.label for r in records)


def exact_match(answers: Sequence[str], records: Sequence[Record]) -> float:
    return sum(a.strip() == r.label for a, r in zip(answers, records)) / max(1, len(records))


def client_answers(runner: Any, records: Sequence[Record], max_new_tokens: int = 8) -> list[str]:
    """The runner's greedy answer to each record, with the prompt a client sends (batched by
    length: the same answers as one request at a time, edgekif.infer.answer_all)."""
    from ..infer import answer_all

    return [a.strip() for a in answer_all(runner, [r.chat() for r in records], max_new_tokens)]


@dataclass
class AnswerSet:
    answers: list[str]
    n: int
    exact_match: float | None  # None: the records carry no labels
    label_accuracy: float | None = None  # label scoring (PyTorch only)
    # The task's own metric (edgekif.metrics), when its spec was given and the records are labelled:
    metric: str | None = None
    score: float | None = None  # its mean
    scores: list[float] | None = None  # per record, in the records' order (paired comparisons)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n, "exact_match": self.exact_match,
            **({"label_accuracy": self.label_accuracy} if self.label_accuracy is not None else {}),
            # only when measured, so a summary without specs is the same as before
            **({"metric": self.metric, "score": self.score} if self.metric is not None else {}),
        }


def score_answers(answers: Sequence[str], records: Sequence[Record], metric: str | None = None) -> AnswerSet:
    """Strict exact match, plus `metric` (edgekif.metrics.METRICS) per record when one is named."""
    result = AnswerSet(list(answers), len(records), exact_match(answers, records) if scored(records) else None)
    if metric is not None and scored(records):
        measured = score(metric, result.answers, [r.label for r in records])
        result.metric, result.score, result.scores = metric, measured.mean, measured.scores
    return result


def task_budget(name: str, max_new_tokens: int, specs: Mapping[str, "TaskSpec"] | None) -> int:
    """The task's own answer budget where its spec has one, else the call's `max_new_tokens`."""
    spec = (specs or {}).get(name)
    return spec.max_new_tokens if spec is not None and spec.max_new_tokens is not None else max_new_tokens


def task_metric(name: str, specs: Mapping[str, "TaskSpec"] | None) -> str | None:
    spec = (specs or {}).get(name)
    return spec.metric if spec is not None else None


def runner_answers(runner: Any, holdout: Holdout, max_new_tokens: int = 8, specs: Mapping[str, "TaskSpec"] | None = None) -> dict[str, AnswerSet]:
    return {
        name: score_answers(client_answers(runner, recs, task_budget(name, max_new_tokens, specs)), recs, task_metric(name, specs))
        for name, recs in holdout.items()
    }


def reference_answers(
    model_dir: str | os.PathLike,
    holdout: Holdout,
    *,
    max_new_tokens: int = 8,
    labels: Mapping[str, Sequence[str] | None] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    specs: Mapping[str, "TaskSpec"] | None = None,
    drafts: Mapping[str, AnswerSet] | None = None,
) -> dict[str, AnswerSet]:
    """Greedy answers of the fp32 PyTorch model in `model_dir` (the fused model) on whole
    prompts, plus label-scoring accuracy for tasks with a label set: the reference an export
    is held to, and the figures the manifest keeps as `reference`.

    `drafts` (a candidate export's answers, runner_answers): the fp32 model verifies them as
    speculative decoding verifies a draft (edgekif.evaluate._greedy) and decodes only where it
    parts from them; its answers are its own either way. Most of an export's answers equal
    fp32's, so most of the reference's decoding steps become one pass."""
    from ..evaluate import generate_and_pick
    from ..model import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "fp32").eval()
    out: dict[str, AnswerSet] = {}
    for name, recs in holdout.items():
        recs = list(recs)
        budget = task_budget(name, max_new_tokens, specs)
        task_labels = (labels or {}).get(name)
        # one pass over the prompts gives both (the prompt is most of the cost)
        draft = drafts[name].answers if drafts is not None and name in drafts else None
        answers, picked = generate_and_pick(model, tok, recs, task_labels if scored(recs) else None, max_new_tokens=budget, batch_size=batch_size,
                                            drafts=draft)
        res = score_answers(answers, recs, task_metric(name, specs))
        if picked is not None:
            res.label_accuracy = sum(p == r.label for p, r in zip(picked, recs)) / len(recs)
        out[name] = res
    del model
    return out


def pooled_exact_match(results: Mapping[str, AnswerSet]) -> float | None:
    """Exact match over every labelled record (each record counts once, whatever its task)."""
    hits = total = 0
    for r in results.values():
        if r.exact_match is not None:
            hits += round(r.exact_match * r.n)
            total += r.n
    return hits / total if total else None


@dataclass(frozen=True)
class GenerationRule:
    """How a free-text task's export answers are held to the fp32 model's (compare_answers).

    Identical answers are the wrong test for free text: one changed word late in a 20-token
    headline is a different answer of the same quality. A free-text task passes when
      * the mean of the per-record paired differences of its metric (fp32 minus candidate,
        on the same records) is at most `max_score_drop` points, and
      * at least `min_prefix_agreement` of the answers begin with the same `prefix_words`
        words as fp32's (greedy decoding diverges after the first changed token, so the
        start of an answer is where quantisation error shows first and most clearly).
    The defaults are measured on real runs: docs/serving.md, "The export check for free text".
    """

    max_score_drop: float = 3.0  # points of the task's metric (ROUGE-L F1 x 100)
    min_prefix_agreement: float = 0.75
    prefix_words: int = 3

    def __post_init__(self) -> None:
        if self.max_score_drop < 0 or not 0.0 <= self.min_prefix_agreement <= 1.0 or self.prefix_words < 1:
            raise ValueError(f"bad GenerationRule {self}: max_score_drop >= 0, min_prefix_agreement in [0, 1], prefix_words >= 1")


def prefix_agreement(reference: Sequence[str], answers: Sequence[str], words: int) -> float:
    """Share of answers whose first `words` whitespace-separated words equal the reference's
    (the whole answer where it is shorter)."""
    same = sum(a.split()[:words] == r.split()[:words] for r, a in zip(reference, answers))
    return same / max(1, len(reference))


@dataclass
class AnswerCheck:
    """An export's answers against the fp32 reference's, on the same records."""

    agreement: float  # share of records answered exactly as the reference answered (no tie allowance), all tasks
    accuracy: float | None  # pooled exact match of the export over the label tasks (None: no labels)
    reference_accuracy: float | None
    n: int
    min_agreement: float
    max_accuracy_drop: float  # points
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    # the identical-answer share over the tasks that rule judges (all but free text)
    label_agreement: float | None = None
    generation_rule: dict[str, Any] | None = None  # GenerationRule, when a free-text task was checked

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100 * (self.reference_accuracy - self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop}


def compare_answers(
    reference: Mapping[str, AnswerSet],
    answers: Mapping[str, AnswerSet],
    *,
    min_agreement: float,
    max_accuracy_drop: float,
    kinds: Mapping[str, str] | None = None,
    generation: GenerationRule | None = None,
) -> AnswerCheck:
    """The export check, per kind of task (`kinds`: task -> "classification" | "generation";
    a task without a kind is judged as a label task, as before kinds existed):
      * label tasks, pooled: the share of identical answers is >= min_agreement and the pooled
        exact match is at most `max_accuracy_drop` points below the reference's;
      * each free-text task: its metric's mean paired drop and its answers' first words
        (GenerationRule).
    Passed when every rule holds; each failed rule is a reason naming its figures."""
    from ..metrics import GENERATION

    rule = generation or GenerationRule()
    free = {name for name in reference if (kinds or {}).get(name) == GENERATION}
    same = total = label_same = label_total = 0
    per_task: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    for name, ref in reference.items():
        got = answers[name]
        agree = sum(a == b for a, b in zip(ref.answers, got.answers))
        same, total = same + agree, total + ref.n
        per_task[name] = {"n": ref.n, "agreement": agree / max(1, ref.n), "exact_match": got.exact_match, "reference_exact_match": ref.exact_match}
        if got.metric is not None:  # the task's own metric
            per_task[name].update(metric=got.metric, score=got.score, reference_score=ref.score if ref.metric == got.metric else None)
        if name not in free:
            label_same, label_total = label_same + agree, label_total + ref.n
            continue
        prefix = prefix_agreement(ref.answers, got.answers, rule.prefix_words)
        per_task[name]["prefix_agreement"] = prefix
        if got.scores is not None and ref.scores is not None and ref.metric == got.metric:
            drop = 100 * sum(r - c for r, c in zip(ref.scores, got.scores)) / max(1, len(ref.scores))
            per_task[name]["score_drop_points"] = drop
            if drop > rule.max_score_drop + 1e-9:
                reasons.append(f"{name}: {got.metric} {100 * got.score:.1f} vs fp32 {100 * ref.score:.1f} "  # type: ignore[operator]
                               f"(mean paired drop {drop:.1f} points > {rule.max_score_drop:g} allowed)")
        if prefix < rule.min_prefix_agreement:
            reasons.append(f"{name}: {100 * prefix:.1f}% of {ref.n} answers begin with fp32's first {rule.prefix_words} words "
                           f"(needs >= {100 * rule.min_prefix_agreement:.0f}%)")
    labelled = {k: v for k, v in answers.items() if k not in free}
    check = AnswerCheck(
        agreement=same / total if total else 1.0,
        accuracy=pooled_exact_match({k: v for k, v in labelled.items() if k in reference}),
        reference_accuracy=pooled_exact_match({k: v for k, v in reference.items() if k not in free}),
        n=total, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, per_task=per_task,
        label_agreement=label_same / label_total if label_total else None,
        generation_rule=asdict(rule) if free else None,
    )
    if check.label_agreement is not None and check.label_agreement < min_agreement:
        what = "label-task records" if free else "records"
        reasons.insert(0, f"answers agree with the fp32 model on {100 * check.label_agreement:.1f}% of {label_total} {what} (needs >= {100 * min_agreement:.0f}%)")
    drop = check.accuracy_drop
    if drop is not None and drop > max_accuracy_drop + 1e-9:  # 1e-9: float noise of the pooled fractions
        reasons.insert(1 if check.label_agreement is not None and check.label_agreement < min_agreement else 0,
                       f"exact match {100 * check.accuracy:.1f} vs fp32 {100 * check.reference_accuracy:.1f} (-{drop:.1f} points > {max_accuracy_drop:g} allowed)")  # type: ignore[operator]
    check.reasons = reasons
    check.passed = not reasons
    return check


@dataclass
class CandidateCheck:
    """One candidate export: its answers, and how they compare with the reference's."""

    variant: ExportVariant
    answers: dict[str, AnswerSet]
    check: AnswerCheck | None  # None: no reference to compare with (the base's zero-shot score)
    build_seconds: float | None  # None: built before (build=False)
    seconds: float  # opening the runner, answering and comparing


def _deterministic(e: BaseException) -> bool:
    """An error from opening or answering a built export that the same export raises every time
    (no chat template, a config the runtime refuses: the job then fails once, with the reason,
    instead of re-fusing and re-checking three times). Shortages are not: memory errors, and
    runtime errors that speak of allocation, stay retryable (the daemon's transient_cause also
    looks through the chain)."""
    if isinstance(e, (MemoryError, OSError)):
        return False
    if isinstance(e, (ValueError, KeyError, TypeError, ModelError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and not any(w in text for w in ("alloc", "memory", "out of"))


def check_candidate(
    source_dir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    target: str,
    variant: ExportVariant,
    execution_provider: str,
    holdout: Holdout,
    reference: Mapping[str, AnswerSet] | None = None,
    max_new_tokens: int = 8,
    min_agreement: float = 0.95,
    max_accuracy_drop: float = 1.0,
    build: bool = True,
    specs: Mapping[str, "TaskSpec"] | None = None,
    generation: GenerationRule | None = None,
    threads: int = 0,
) -> CandidateCheck:
    """Build `variant` of the model in `source_dir` into `folder` (skipped with build=False: the
    folder holds it already), answer every holdout record through the folder's own runner as a
    client does, and compare with `reference` when one is given (compare_answers). `specs`:
    each task's kind, metric and answer budget (see the module docstring); free-text tasks
    are held to `generation` (GenerationRule), label tasks to identical answers.

    `folder` is written as it is (callers that publish it pass a temp folder). Raises
    ExportError when the build fails, and a permanent ExportError when the runtime cannot open
    the result or answer with it for a reason that repeats (_deterministic); a failed comparison is not an error here (`check.passed`), the caller decides.
    """
    from ..infer import open_model
    from .build import build_variant

    build_seconds = None
    if build:
        t0 = time.perf_counter()
        Path(folder).mkdir(parents=True, exist_ok=True)
        build_variant(Path(source_dir), Path(folder), target, variant, execution_provider, threads)
        build_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        runner = open_model(folder)
        answers = runner_answers(runner, holdout, max_new_tokens, specs)
    except Exception as e:
        if _deterministic(e):
            err = ExportError(f"{variant.name} export builds but cannot answer the holdout as a client would: {type(e).__name__}: {e}",
                              permanent=True)
            err.hint = ("set model.chat_template (chatml, gemma or a .jinja file): this base has no chat template, then `edgekif retry JOB`"
                        if "chat_template" in str(e) or "chat template" in str(e) else
                        "change export.target/precision or the base, then `edgekif retry JOB`")
            raise err from e
        raise
    del runner
    check = None
    if reference is not None:
        check = check_answers(reference, answers, specs=specs, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, generation=generation)
        check.seconds = time.perf_counter() - t0
    return CandidateCheck(variant, answers, check, build_seconds, time.perf_counter() - t0)


def check_answers(reference: Mapping[str, AnswerSet], answers: Mapping[str, AnswerSet], *, specs: Mapping[str, "TaskSpec"] | None,
                  min_agreement: float, max_accuracy_drop: float, generation: GenerationRule | None) -> AnswerCheck:
    """compare_answers with each task judged by its spec's kind (a task without one as a label task)."""
    return compare_answers(reference, answers, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
                           kinds={name: spec.kind for name, spec in (specs or {}).items()}, generation=generation)
