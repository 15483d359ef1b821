"""Scores of a task's answers against its reference answers, by the metric that fits the task.

  task kind        headline metric            beside it
  classification   normalized_exact_match     exact_match (strict: stripped text equal)
  generation       rouge_l (ROUGE-L F1)       chrf (character n-gram F-score)

Every metric gives one score per record in [0, 1] (`MetricScores.scores`, in the records'
order: the later paired statistics compare two models record by record) and their mean.

The text metrics come from the libraries that define them, not from code of ours:
ROUGE-L from `rouge-score` (Google's reimplementation of Lin's ROUGE, what most papers
report) and chrF from `sacrebleu` (Popović's chrF as the MT community computes it). What is
ours is only what happens to the text before: end-of-turn text a runtime may leave in an
answer is removed for every metric, and classification answers are normalised
(`normalize_answer`), because "World." and "world" are the same label.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

CLASSIFICATION = "classification"
GENERATION = "generation"
KINDS = (CLASSIFICATION, GENERATION)

EXACT_MATCH = "exact_match"
NORMALIZED_EXACT_MATCH = "normalized_exact_match"
ROUGE_L = "rouge_l"
CHRF = "chrf"
METRICS = (NORMALIZED_EXACT_MATCH, EXACT_MATCH, ROUGE_L, CHRF)

HEADLINE_METRIC = {CLASSIFICATION: NORMALIZED_EXACT_MATCH, GENERATION: ROUGE_L}
COMPANION_METRIC = {CLASSIFICATION: EXACT_MATCH, GENERATION: CHRF}

# End-of-turn markers of common chat templates (ChatML, Llama 2/3, Gemma, Phi-3, GPT-2). A runtime
# that does not skip special tokens, or a model that spells one out as text, leaves them in an
# answer; they are not part of what the model answered.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<eos>")
_END_OF_TURN_RE = re.compile(r"(?:\s*(?:" + "|".join(map(re.escape, END_OF_TURN_TEXTS)) + r"))+\s*$")
_SPACES_RE = re.compile(r"\s+")


def strip_end_of_turn(text: str) -> str:
    """`text` without surrounding whitespace and without end-of-turn markers at its end."""
    return _END_OF_TURN_RE.sub("", text).strip()


# What ends a sentence or a clause, in the scripts edgekif has met: a model that answers
# "World." or "是。" means the label. Other punctuation can be the label's own ("A-", "C#",
# ":)"), so it stays.
_FINAL_PUNCTUATION = frozenset(
    ".!?,;:…"  # Latin, Greek, Cyrillic
    "。！？，、；：．｡"  # CJK and full-width
    "।॥"  # Devanagari and other Indic dandas
    "؟،؛۔"  # Arabic, Urdu
    "።፧၊။"  # Ethiopic, Myanmar
)


def normalize_answer(text: str) -> str:
    """A classification answer as compared by `normalized_exact_match`: end-of-turn text and
    surrounding whitespace removed, runs of whitespace made one space, case folded, and
    sentence-final punctuation at the end removed ("World." -> "world"). Other punctuation
    stays, inner or final: "Science & Technology" and "Science Technology", "A-" and "A", ":)"
    and ":(" are different labels. An answer made only of such punctuation ("?", "...") is
    kept as it is, never made empty."""
    text = _SPACES_RE.sub(" ", strip_end_of_turn(text)).casefold()
    end = len(text)
    while end and (text[end - 1] in _FINAL_PUNCTUATION or text[end - 1].isspace()):
        end -= 1
    return text[:end] if end else text


@dataclass
class MetricScores:
    """One metric on a set of answers: a score per record in [0, 1], in the records' order."""

    metric: str
    scores: list[float]

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float | None:
        """None when there are no records (nothing was measured, which is not a 0)."""
        return sum(self.scores) / len(self.scores) if self.scores else None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "n": self.n, "mean": self.mean}


def exact_match_scores(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the stripped answer equals the stripped reference (the score edgekif has always
    reported as `exact_match`)."""
    return [float(a.strip() == r.strip()) for a, r in zip(answers, references, strict=True)]


def normalized_exact_match_scores(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the answer equals the reference after `normalize_answer` on both."""
    return [float(normalize_answer(a) == normalize_answer(r)) for a, r in zip(answers, references, strict=True)]


class _WordTokenizer:
    """Words for ROUGE: lower-cased runs of letters, digits and combining marks in any script.
    rouge-score's own tokenizer keeps only [a-z0-9], which turns "Über" into "ber" and Chinese
    or Greek answers into nothing (every answer would score 0). On ASCII text both give the
    same tokens. The marks (Unicode M*) keep Devanagari, Tamil or Thai words whole: "की" is a
    letter and a vowel sign, and without the sign "का", "की" and "के" would be one word. Han and
    kana characters are words of their own: those scripts write no spaces, and a whole
    sentence as one "word" would match only when identical."""

    _CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

    def tokenize(self, text: str) -> list[str]:
        words: list[str] = []
        word: list[str] = []
        for ch in text.lower():
            if self._CJK_RE.match(ch):
                words += ["".join(word), ch] if word else [ch]
                word = []
            elif ch != "_" and unicodedata.category(ch)[0] in "LMN":
                word.append(ch)
            elif word:
                words.append("".join(word))
                word = []
        if word:
            words.append("".join(word))
        return words


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    # No stemming: the Porter stemmer is English-only, and a user's task may not be English.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_WordTokenizer())


def rouge_l_scores(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per record (rouge-score): the longest common subsequence of words, as
    precision over the answer's words and recall over the reference's, combined by F1.
    `rougeL` (not `rougeLsum`): an answer is scored as one sequence, not split into sentences."""
    scorer = _rouge_l_scorer()
    return [float(scorer.score(strip_end_of_turn(r), strip_end_of_turn(a))["rougeL"].fmeasure) for a, r in zip(answers, references, strict=True)]


@functools.lru_cache(maxsize=1)
def _chrf() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()  # sacrebleu's defaults: character 6-grams, beta 2, no word n-grams (chrF, not chrF++)


def chrf_scores(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """chrF per record (sacrebleu's sentence chrF), divided by 100 to lie in [0, 1] like the
    other metrics. Case-sensitive and blind to spaces, as sacrebleu computes it."""
    chrf = _chrf()
    return [chrf.sentence_score(strip_end_of_turn(a), [strip_end_of_turn(r)]).score / 100 for a, r in zip(answers, references, strict=True)]


_SCORERS = {
    EXACT_MATCH: exact_match_scores,
    NORMALIZED_EXACT_MATCH: normalized_exact_match_scores,
    ROUGE_L: rouge_l_scores,
    CHRF: chrf_scores,
}


def score(metric: str, answers: Sequence[str], references: Sequence[str]) -> MetricScores:
    """`metric` (one of METRICS) on each answer against the reference in the same position."""
    if metric not in _SCORERS:
        raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    return MetricScores(metric, _SCORERS[metric](answers, references))


def score_kind(kind: str, answers: Sequence[str], references: Sequence[str]) -> dict[str, MetricScores]:
    """The headline metric of `kind` and the one reported beside it, headline first."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (one of {', '.join(KINDS)})")
    return {m: score(m, answers, references) for m in (HEADLINE_METRIC[kind], COMPANION_METRIC[kind])}


def headline_figures(accuracies: Mapping[str, float], scores: Mapping[str, float] | None = None,
                     task_specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[float, str | None]]:
    """What a one-line listing shows per task: (value 0..1, the metric's name or None).

    A version with task specs is shown by each task's headline metric (`scores`); the name is
    given where it is not exact match, since a free-text task's strict exact match is ~0 and
    says nothing of what it learned. Older versions (no specs) show `accuracies`, unnamed."""
    out: dict[str, tuple[float, str | None]] = {t: (float(v), None) for t, v in accuracies.items()}
    for task, spec in (task_specs or {}).items():
        value = (scores or {}).get(task)
        if value is None:
            continue
        metric = spec.get("metric")
        out[task] = (float(value), None if metric in (EXACT_MATCH, NORMALIZED_EXACT_MATCH) else metric)
    return out

