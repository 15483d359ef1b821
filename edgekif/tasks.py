"""What a task asks for: its kind, the metric that judges it, and its answer budget.

  read_task_spec(task_file, records, tokenizer)  -> TaskSpec(kind, metric, max_new_tokens, source, stated)
      = the sidecar NAME.task.toml beside the file, where there is one (read_sidecar)
        + what it leaves out, decided from the training records:
          detect_kind(records)                  classification | generation
          HEADLINE_METRIC[kind]                 normalized_exact_match | rouge_l (edgekif.metrics)
          answer_budget(tokenizer, records, kind)  max_new_tokens from the answers' own lengths

Kind detection (KindDetectionConfig): a task is `classification` when its answers form a
closed label set, i.e. after `normalize_answer` (case, whitespace, trailing punctuation)
  * there are at most max(2, min(max_labels, floor(max_label_share * n))) distinct answers
    (defaults: 50 and 0.2, so 1000 records may have up to 50 labels, 40 records up to 8), and
  * every distinct answer is given at least `min_label_count` (2) times;
otherwise `generation`. A label set repeats by nature: 4 topics over 1000 news texts, while
free text (headlines, titles, summaries) is unique per record. On the shared benchmarks the
four label tasks have 4-14 labels each seen >= 53 times, and the three free-text tasks have
534-998 distinct answers of 534-999, most seen once: the rule is far from both. A label file
with one misspelt label fails the second test and is judged as generation: the sidecar says
otherwise when that is wrong.

The sidecar `NAME.task.toml` next to `NAME.jsonl` (same stem) states any of
    kind = "generation"          # or "classification"
    metric = "rouge_l"           # normalized_exact_match | exact_match | rouge_l | chrf
    max_new_tokens = 48          # 1..MAX_STATED_NEW_TOKENS
Each key it leaves out is decided as above (the metric from the kind, stated or detected).
Any other key, a wrong type or value, or a TOML syntax error raises TaskSpecError naming the
sidecar, the line and the key.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import TaskSpecError
from .layout import SIDECAR_SUFFIX, sidecar_of
from .metrics import CLASSIFICATION, GENERATION, HEADLINE_METRIC, KINDS, METRICS, normalize_answer
from .records import Record

SIDECAR_KEYS = ("kind", "metric", "max_new_tokens")
# A stated budget above this is a typo, not a task: 100000 new tokens a record would keep
# evaluation busy for days. 2048 is more than any answer a small on-device model should write.
MAX_STATED_NEW_TOKENS = 2048
MAX_SIDECAR_BYTES = 64 * 1024  # a sidecar states three keys: a larger file is not one


# --------------------------------------------------------------------------- kind


@dataclass(frozen=True)
class KindDetectionConfig:
    """When a task's answers count as a closed label set (see the module docstring)."""

    max_labels: int = 50  # no more labels than this, however many records
    max_label_share: float = 0.2  # ... and no more than this share of the records
    min_label_count: int = 2  # every label is the answer of at least this many records


def detect_kind(records: Sequence[Record], config: KindDetectionConfig | None = None) -> str:
    """`classification` when the records' answers are a closed label set, else `generation`."""
    config = config or KindDetectionConfig()
    counts = Counter(normalize_answer(r.output) for r in records)
    if not counts:
        return GENERATION  # nothing repeats in no records
    allowed = max(2, min(config.max_labels, math.floor(config.max_label_share * len(records))))
    if len(counts) <= allowed and min(counts.values()) >= config.min_label_count:
        return CLASSIFICATION
    return GENERATION


# --------------------------------------------------------------------------- answer budget


@dataclass(frozen=True)
class AnswerBudgetConfig:
    """How many new tokens a task's answers may take, from its training answers' lengths.

    Generation: the `percentile` of the answers' token lengths plus `margin_tokens`, at most
    `max_new_tokens` (a few long outliers must not make every answer slow). Classification:
    the longest label plus `classification_margin_tokens`, at most
    `classification_max_new_tokens`: every label fits whole, and a model that rambles is
    cut early (its answer is wrong anyway). Never below `min_new_tokens`."""

    percentile: float = 95.0
    margin_tokens: int = 4
    max_new_tokens: int = 128
    classification_margin_tokens: int = 2
    classification_max_new_tokens: int = 16
    min_new_tokens: int = 4


def answer_token_lengths(tokenizer: Any, records: Sequence[Record]) -> list[int]:
    """Each record's answer in tokens, as training encodes it (edgekif.inputs.encode_target:
    no special tokens; the eos after it ends generation and is not part of the answer)."""
    if not records:
        return []
    ids = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def answer_budget(tokenizer: Any, records: Sequence[Record], kind: str, config: AnswerBudgetConfig | None = None) -> int:
    """`max_new_tokens` for a task of `kind` whose training records are `records`."""
    import numpy as np

    config = config or AnswerBudgetConfig()
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (one of {', '.join(KINDS)})")
    lengths = answer_token_lengths(tokenizer, records)
    if not lengths:
        return config.min_new_tokens
    if kind == CLASSIFICATION:
        budget, cap = max(lengths) + config.classification_margin_tokens, config.classification_max_new_tokens
    else:
        budget = math.ceil(float(np.percentile(lengths, config.percentile))) + config.margin_tokens
        cap = config.max_new_tokens
    return max(config.min_new_tokens, min(budget, cap))


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class TaskSpec:
    """What judges a task. `source` says where the kind came from ("sidecar" or "detected");
    `stated` names the keys the sidecar set (the rest were decided from the records).
    `max_new_tokens` is None only when nothing stated it and no tokenizer was at hand."""

    kind: str
    metric: str
    max_new_tokens: int | None
    source: str  # "detected" | "sidecar"
    stated: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stated": list(self.stated)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        return cls(d["kind"], d["metric"], d.get("max_new_tokens"), d.get("source", "detected"), tuple(d.get("stated") or ()))

    def with_budget(self, max_new_tokens: int) -> "TaskSpec":
        return TaskSpec(self.kind, self.metric, max_new_tokens, self.source, self.stated)


def sidecar_path(task_file: str | os.PathLike) -> Path:
    """`inbox/NAME.jsonl` -> `inbox/NAME.task.toml` (the task's name is the file's stem)."""
    return sidecar_of(task_file)


def read_task_spec(
    task_file: str | os.PathLike,
    records: Sequence[Record],
    tokenizer: Any = None,
    *,
    detection: KindDetectionConfig | None = None,
    budget: AnswerBudgetConfig | None = None,
    sidecar: str | os.PathLike | None = None,
) -> TaskSpec:
    """The spec of the task in `task_file` with training records `records`: the sidecar's
    statements where it has any (TaskSpecError when it is invalid), the rest decided from the
    records. Without a tokenizer an unstated budget stays None. `sidecar`: where the sidecar
    is when it is not beside the file under the same stem (a copy the daemon renamed)."""
    side = Path(sidecar) if sidecar is not None else sidecar_path(task_file)
    stated = read_sidecar(side) if side.is_file() else {}
    kind = stated.get("kind") or detect_kind(records, detection)
    metric = stated.get("metric") or HEADLINE_METRIC[kind]
    max_new_tokens = stated.get("max_new_tokens")
    if max_new_tokens is None and tokenizer is not None:
        max_new_tokens = answer_budget(tokenizer, records, kind, budget)
    source = "sidecar" if "kind" in stated else "detected"
    return TaskSpec(kind, metric, max_new_tokens, source, tuple(k for k in SIDECAR_KEYS if k in stated))


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The validated keys of a sidecar NAME.task.toml (any of SIDECAR_KEYS; none is required)."""
    file = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
        if len(raw_bytes) > MAX_SIDECAR_BYTES:
            raise TaskSpecError(f"larger than {MAX_SIDECAR_BYTES} bytes: not a task's sidecar", file=file, kind="too_large")
        text = raw_bytes.decode("utf-8-sig")
    except OSError as e:
        raise TaskSpecError(f"cannot read the task's sidecar: {e.strerror or e}", file=file, kind="unreadable") from e
    except UnicodeDecodeError as e:
        raise TaskSpecError("the task's sidecar is not UTF-8 text", file=file, kind="encoding") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TaskSpecError(f"not valid TOML: {e}", file=file, line=_toml_error_line(e), kind="bad_toml") from None
    for key, value in raw.items():
        _check_sidecar_value(key, value, file, _key_line(text, key))
    return raw


def _check_sidecar_value(key: str, value: Any, file: str, line: int | None) -> None:
    def bad(message: str, kind: str = "bad_value") -> TaskSpecError:
        return TaskSpecError(message, file=file, line=line, field=key, kind=kind)

    if key not in SIDECAR_KEYS:
        raise bad(f"unknown key (a task's sidecar may state {', '.join(SIDECAR_KEYS)})", "unknown_field")
    if key == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be a whole number, not {type(value).__name__}", "bad_type")
        if not 1 <= value <= MAX_STATED_NEW_TOKENS:
            raise bad(f"must be between 1 and {MAX_STATED_NEW_TOKENS}, not {value}")
        return
    if not isinstance(value, str):
        raise bad(f"must be a string, not {type(value).__name__}", "bad_type")
    allowed = KINDS if key == "kind" else METRICS
    if value not in allowed:
        raise bad(f"{value!r} is not one of {', '.join(allowed)}")


def _key_line(text: str, key: str) -> int | None:
    """The 1-based line where `key` is set at the top of a TOML document (bare or quoted), or
    where the table of that name starts: tomllib keeps no positions of valid documents."""
    pattern = re.compile(r"""^\s*(?:\[\s*)?(?:{k}|"{k}"|'{k}')\s*(?:=|\])""".format(k=re.escape(key)))
    for n, line in enumerate(text.split("\n"), start=1):  # TOML's lines: not splitlines()'s U+2028 etc.
        if pattern.match(line):
            return n
    return None


def _toml_error_line(e: tomllib.TOMLDecodeError) -> int | None:
    """Python >= 3.14 gives the line as `lineno`; before, only in the message "(at line N, column M)"."""
    lineno = getattr(e, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    m = re.search(r"at line (\d+)", str(e))
    return int(m.group(1)) if m else None
