"""What clients get: an export's answers on holdout records, scored as a client would see them,
and the rule that accepts a quantised export only when its answers match the fp32 model's.

  client_answers(runner, records)            # one record at a time, the folder's chat template, greedy
  reference_answers(model_dir, holdout)      # the fp32 PyTorch model on the same prompts: the reference
  compare_answers(reference, answers, ...)   # -> AnswerCheck (agreement, accuracy drop, passed)

Prompts are the records' whole chat messages (`Record.chat()`), rendered by the export's own
chat template, which equals the training format (tests/test_export.py checks it): exactly
what `edgekif infer` and a local client send. Exact match compares the stripped answer with
the stripped label.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .records import Record

Holdout = Mapping[str, Sequence[Record]]  # task name -> records (labels may be empty: agreement only)


def scored(records: Sequence[Record]) -> bool:
    """Exact match means something only when every record has an answer to compare with."""
    return bool(records) and all(r.label for r in records)


def exact_match(answers: Sequence[str], records: Sequence[Record]) -> float:
    return sum(a.strip() == r.label for a, r in zip(answers, records)) / max(1, len(records))


def client_answers(runner: Any, records: Sequence[Record], max_new_tokens: int = 8) -> list[str]:
    """The runner's greedy answer to each record, one request at a time as a client sends it."""
    return [runner.generate(r.chat(), max_new_tokens).strip() for r in records]


@dataclass
class TaskAnswers:
    answers: list[str]
    n: int
    exact_match: float | None  # None: the records carry no labels
    label_accuracy: float | None = None  # label scoring (PyTorch only)

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "exact_match": self.exact_match, **({"label_accuracy": self.label_accuracy} if self.label_accuracy is not None else {})}


def score_answers(answers: Sequence[str], records: Sequence[Record]) -> TaskAnswers:
    return TaskAnswers(list(answers), len(records), exact_match(answers, records) if scored(records) else None)


def runner_answers(runner: Any, holdout: Holdout, max_new_tokens: int = 8) -> dict[str, TaskAnswers]:
    return {name: score_answers(client_answers(runner, recs, max_new_tokens), recs) for name, recs in holdout.items()}


def reference_answers(
    model_dir: str | os.PathLike,
    holdout: Holdout,
    *,
    max_new_tokens: int = 8,
    labels: Mapping[str, Sequence[str] | None] | None = None,
    batch_size: int = 16,
) -> dict[str, TaskAnswers]:
    """Greedy answers of the fp32 PyTorch model in `model_dir` (the fused model) on whole
    prompts, plus label-scoring accuracy for tasks with a label set: the reference an export
    is held to, and the figures the manifest keeps as `reference`."""
    from .evaluate import generate_answers, label_scores
    from .model import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "fp32").eval()
    out: dict[str, TaskAnswers] = {}
    for name, recs in holdout.items():
        recs = list(recs)
        res = score_answers(generate_answers(model, tok, recs, max_new_tokens=max_new_tokens, batch_size=batch_size), recs)
        task_labels = (labels or {}).get(name)
        if task_labels and scored(recs):
            picked = label_scores(model, tok, recs, task_labels, batch_size=batch_size)
            res.label_accuracy = sum(p == r.label for p, r in zip(picked, recs)) / len(recs)
        out[name] = res
    del model
    return out


def pooled_exact_match(results: Mapping[str, TaskAnswers]) -> float | None:
    """Exact match over every labelled record (each record counts once, whatever its task)."""
    hits = total = 0
    for r in results.values():
        if r.exact_match is not None:
            hits += round(r.exact_match * r.n)
            total += r.n
    return hits / total if total else None


@dataclass
class AnswerCheck:
    """An export's answers against the fp32 reference's, on the same records."""

    agreement: float  # share of records answered exactly as the reference answered (no tie allowance)
    accuracy: float | None  # pooled exact match of the export (None: no labels)
    reference_accuracy: float | None
    n: int
    min_agreement: float
    max_accuracy_drop: float  # points
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100 * (self.reference_accuracy - self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop}


def compare_answers(
    reference: Mapping[str, TaskAnswers],
    answers: Mapping[str, TaskAnswers],
    *,
    min_agreement: float,
    max_accuracy_drop: float,
) -> AnswerCheck:
    """Passed when the share of identical answers is >= min_agreement and the pooled exact
    match is at most `max_accuracy_drop` points below the reference's."""
    same = total = 0
    per_task = {}
    for name, ref in reference.items():
        got = answers[name]
        agree = sum(a == b for a, b in zip(ref.answers, got.answers))
        same += agree
        total += ref.n
        per_task[name] = {"n": ref.n, "agreement": agree / max(1, ref.n), "exact_match": got.exact_match, "reference_exact_match": ref.exact_match}
    check = AnswerCheck(
        agreement=same / total if total else 1.0, accuracy=pooled_exact_match(answers), reference_accuracy=pooled_exact_match(reference),
        n=total, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, per_task=per_task,
    )
    if check.agreement < min_agreement:
        check.reasons.append(f"answers agree with the fp32 model on {100 * check.agreement:.1f}% of {total} records (needs >= {100 * min_agreement:.0f}%)")
    drop = check.accuracy_drop
    if drop is not None and drop > max_accuracy_drop + 1e-9:  # 1e-9: float noise of the pooled fractions
        check.reasons.append(f"exact match {100 * check.accuracy:.1f} vs fp32 {100 * check.reference_accuracy:.1f} (-{drop:.1f} points > {max_accuracy_drop:g} allowed)")  # type: ignore[operator]
    check.passed = not check.reasons
    return check


def read_holdout(path: str | os.PathLike) -> list[Record]:
    """A holdout file as the daemon writes it (Record JSON lines). The daemon's own file, but
    it lives on disk for weeks: a damaged or hand-edited one is a ValidationError naming the
    file, line and field (DamagedFileError), not a bare JSON or KeyError."""
    import json

    from .errors import DamagedFileError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"not UTF-8 text ({e.reason})", file=str(path), kind="damaged_holdout") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise DamagedFileError(f"not a JSON record ({e})", file=str(path), line=n, kind="damaged_holdout") from e
        if not isinstance(d, dict):
            raise DamagedFileError(f"a record must be a JSON object, got {type(d).__name__}", file=str(path), line=n, kind="damaged_holdout")
        for field in ("messages", "output"):
            if field not in d:
                raise DamagedFileError("missing", file=str(path), line=n, field=field, kind="damaged_holdout")
        try:
            out.append(Record.from_dict(d))
        except (TypeError, ValueError) as e:
            raise DamagedFileError(f"malformed record ({e})", file=str(path), line=n, field="messages", kind="damaged_holdout") from e
    return out
