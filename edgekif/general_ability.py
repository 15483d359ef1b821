"""The base's general ability as a gate: how far a candidate's answers to a fixed set of
general prompts drifted from the base's own.

Training on a user's tasks must not make the model worse at everything else. Task holdouts
cannot see that (they measure the tasks), so a fixed set of general prompts written for this
project (`general_prompts.jsonl` beside this module: questions, instructions, arithmetic,
rewriting, summaries, lists, short conversations) is answered by the base once and by every
candidate, and the candidate's answers are compared with the base's:

  load_prompts()                          the shipped prompts, validated
  base_answers(runner, prompts, budget)   greedy answers of a runner (edgekif.infer)
  cached_base_answers(...)                the same, computed once per base and setting
  base_answer_loglik(model, tok, ...)     mean per-token log-likelihood a PyTorch model gives them
  drift(candidate, base, prompts)         DriftFigures: ROUGE-L to the base, identical share
  drifted(figures, config)                (held?, reason with the figure)

The base's answers are the reference, not a gold answer: a small base is often wrong, and
the question is only whether the candidate still answers *like the base*.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .atomic import atomic_write_json
from .metrics import rouge_l_scores, strip_end_of_turn

PROMPTS_RESOURCE = "general_prompts.jsonl"
CATEGORIES = ("factual", "instruction", "arithmetic", "rewrite", "summarise", "list", "multi_turn")
ROLES = ("system", "user", "assistant")
CACHE_FORMAT = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneralPrompt:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...), the last one the user's

    def chat(self) -> list[dict[str, str]]:
        """The messages as a runner or chat template takes them."""
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "messages": self.chat()}


def _parse_line(obj: Any, where: str) -> GeneralPrompt:
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
        raise ValueError(f"{where}: needs a non-empty string 'id'")
    if obj.get("category") not in CATEGORIES:
        raise ValueError(f"{where}: category {obj.get('category')!r} is not one of {', '.join(CATEGORIES)}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: needs a non-empty 'messages' list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{where}: each message needs a role in {ROLES} and non-empty content, got {m!r}")
        out.append((m["role"], m["content"]))
    # The answer is the assistant's next turn: a conversation must end on the user's turn,
    # and turns must alternate (chat templates reject two user turns in a row).
    turns = [r for r, _ in out if r != "system"]
    if not turns or turns[-1] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        raise ValueError(f"{where}: turns must alternate user/assistant and end with the user's")
    return GeneralPrompt(obj["id"], obj["category"], tuple(out))


def parse_prompts(text: str, source: str = PROMPTS_RESOURCE) -> list[GeneralPrompt]:
    """Prompts from JSON lines, validated: known categories and roles, unique ids."""
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines: a prompt may hold U+2028 raw
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{source}:{n}: not JSON: {e}") from e
            prompts.append(_parse_line(obj, f"{source}:{n}"))
    ids = [p.id for p in prompts]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"{source}: duplicate ids {dupes}")
    return prompts


def load_prompts() -> list[GeneralPrompt]:
    """The prompt set shipped with the package (importlib.resources: works from a wheel)."""
    text = resources.files(__package__).joinpath(PROMPTS_RESOURCE).read_text(encoding="utf-8")
    return parse_prompts(text)


def prompts_sha256(prompts: Sequence[GeneralPrompt]) -> str:
    """Digest of the prompts' content (canonical JSON), so an edited set invalidates caches."""
    canon = json.dumps([p.to_dict() for p in prompts], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- answers


def base_answers(runner: Any, prompts: Sequence[GeneralPrompt], max_new_tokens: int) -> list[str]:
    """Greedy answers of `runner` (anything with edgekif.infer's `generate(messages,
    max_new_tokens) -> str`), one per prompt, end-of-turn text removed. Used for the base and,
    the same way, for a candidate."""
    from .infer import answer_all

    return [strip_end_of_turn(a) for a in answer_all(runner, [p.chat() for p in prompts], max_new_tokens)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "base"


def cache_path(cache_dir: str | Path, base_id: str, prompts: Sequence[GeneralPrompt], max_new_tokens: int) -> Path:
    """Where the base's answers for this (base, prompt set, budget) are kept. `base_id` must
    name the base *and* the export setting (target, precision): an int4 export answers
    differently from the fp32 weights. Its hash is in the name so two ids that slug the same
    do not share a file."""
    digest = hashlib.sha256(base_id.encode("utf-8")).hexdigest()[:8]
    return Path(cache_dir) / f"{_slug(base_id)}-{digest}-{prompts_sha256(prompts)[:16]}-{max_new_tokens}.json"


def _read_cache(path: Any, base_id: str, sha: str, max_new_tokens: int, ids: list[str]) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: computed again
        return None
    if not isinstance(data, dict):
        return None
    # The name is a digest prefix: the full key inside must match too, else recompute.
    if (data.get("format"), data.get("base_id"), data.get("prompts_sha256"), data.get("max_new_tokens")) != (CACHE_FORMAT, base_id, sha, max_new_tokens):
        return None
    answers = data.get("answers")
    if not isinstance(answers, dict) or sorted(answers) != sorted(ids):
        return None
    return [str(answers[i]) for i in ids]


def cached_base_answers(cache_dir: str | Path, base_id: str, prompts: Sequence[GeneralPrompt], max_new_tokens: int,
                        open_runner: Callable[[], Any], shipped: Any = None) -> list[str]:
    """The base's answers from the cache, or computed with `open_runner()` and cached (written
    atomically). `open_runner` is called only on a miss: opening a base is the slow part.
    `shipped` (a folder: a Path or an importlib.resources Traversable) holds answers computed
    beforehand in the same format and name; it is read when the cache misses, and its file is
    used only when the whole key inside matches. A cache that cannot be written (read-only, disk
    full) costs a recomputation next time, not the job."""
    path = cache_path(cache_dir, base_id, prompts, max_new_tokens)
    sha, ids = prompts_sha256(prompts), [p.id for p in prompts]
    cached = _read_cache(path, base_id, sha, max_new_tokens, ids)
    if cached is None and shipped is not None:
        cached = _read_cache(shipped.joinpath(path.name), base_id, sha, max_new_tokens, ids)
    if cached is not None:
        return cached
    answers = base_answers(open_runner(), prompts, max_new_tokens)
    try:
        atomic_write_json(path, {"format": CACHE_FORMAT, "base_id": base_id, "prompts_sha256": sha, "max_new_tokens": max_new_tokens,
                                 "answers": dict(zip(ids, answers))})
    except OSError as e:
        log.warning("base answers not cached", extra={"path": str(path), "error": str(e)})
    return answers


def cached_base_loglik(cache_dir: str | Path, base_id: str, prompts: Sequence[GeneralPrompt], max_new_tokens: int,
                       compute: Callable[[], float]) -> float:
    """The base's own mean log-likelihood of its cached answers (base_answer_loglik), kept in
    the answers' cache file: the same for every job of a base, and a full fp32 pass over the
    prompts to compute. `compute()` runs only on a miss; call after cached_base_answers."""
    path = cache_path(cache_dir, base_id, prompts, max_new_tokens)
    sha, ids = prompts_sha256(prompts), [p.id for p in prompts]
    if _read_cache(path, base_id, sha, max_new_tokens, ids) is None:
        return compute()  # no answers cached (a read-only cache): nothing to keep it beside
    data = json.loads(path.read_text(encoding="utf-8"))
    value = data.get("loglik_base")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    value = compute()
    if math.isfinite(value):
        try:
            atomic_write_json(path, {**data, "loglik_base": value})
        except OSError:  # a read-only cache: computing it again next time is fine
            pass
    return value


def base_answer_loglik(model: Any, tokenizer: Any, prompts: Sequence[GeneralPrompt], answers: Sequence[str], *,
                       batch_size: int = 8, max_length: int = 1024) -> float:
    """Mean per-token log-likelihood (nats) a PyTorch causal LM gives `answers` after their
    prompts, teacher-forced: the mean over all answer tokens of all prompts, each answer
    followed by eos as training encodes it (edgekif.inputs.encode_example), so "stops here"
    counts too. Higher (closer to 0) means the model still finds the base's answers likely; nan
    when there is no answer token at all."""
    import torch

    from .inputs import collate, encode_example
    from .records import Record

    if len(prompts) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    encoded = [encode_example(tokenizer, Record(messages=p.messages, output=a, id=p.id), max_length) for p, a in zip(prompts, answers)]
    # batches of similar length (less padding); the mean does not depend on the order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in order[start : start + batch_size]], int(pad)).items()}
                labels = batch["labels"][:, 1:]  # token t is predicted from the logits at t-1
                mask = labels >= 0
                if not bool(mask.any()):
                    continue
                # logits from the batch's first answer position on: the vocabulary-wide head
                # and log-softmax on prompt positions cost a fifth of the pass (63 general
                # prompts on SmolLM2, 2 cores: 4.5 s -> 3.6 s with the sorting above)
                first = int(mask.any(dim=0).nonzero()[0])
                positions = torch.arange(first, labels.shape[1], device=device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions).logits.float()
                labels, mask = labels[:, first:], mask[:, first:]
                logp = torch.log_softmax(logits, dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                total += float(picked[mask].sum())
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


# --------------------------------------------------------------------------- figures and gate


@dataclass
class DriftFigures:
    """How a candidate's general answers compare with the base's own."""

    n: int
    rouge_l: float | None  # mean ROUGE-L F1 against the base's answers (None: nothing measured)
    identical: float | None  # share of answers equal to the base's
    per_category: dict[str, float] = field(default_factory=dict)  # category -> mean ROUGE-L
    loglik_base: float | None = None  # mean per-token log-likelihood of the base's answers: the base's
    loglik_candidate: float | None = None  # ... and the candidate's

    @property
    def loglik_drop(self) -> float | None:
        """How much less likely the candidate finds the base's answers (nats per token)."""
        if self.loglik_base is None or self.loglik_candidate is None:
            return None
        return self.loglik_base - self.loglik_candidate

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "rouge_l": self.rouge_l, "identical": self.identical, "per_category": dict(self.per_category),
                "loglik_base": self.loglik_base, "loglik_candidate": self.loglik_candidate, "loglik_drop": self.loglik_drop}


def drift(candidate_answers: Sequence[str], base_answers: Sequence[str], prompts: Sequence[GeneralPrompt] | None = None, *,
          loglik_base: float | None = None, loglik_candidate: float | None = None) -> DriftFigures:
    """Figures of the candidate's answers against the base's, in the prompts' order
    (`prompts` only gives the categories)."""
    if len(candidate_answers) != len(base_answers):
        raise ValueError(f"{len(candidate_answers)} candidate answers for {len(base_answers)} base answers")
    if prompts is not None and len(prompts) != len(base_answers):
        raise ValueError(f"{len(base_answers)} answers for {len(prompts)} prompts")
    cand = [strip_end_of_turn(a) for a in candidate_answers]
    base = [strip_end_of_turn(a) for a in base_answers]
    same = [a == b for a, b in zip(cand, base)]
    # An identical answer scores 1 even where ROUGE cannot: rouge-score gives 0 to a pair with
    # no words ("" and "", or "?!" and "?!"), and an unchanged answer has not drifted.
    scores = [1.0 if s else r for s, r in zip(same, rouge_l_scores(cand, base))]
    per_category: dict[str, list[float]] = {}
    for p, s in zip(prompts or (), scores):
        per_category.setdefault(p.category, []).append(s)
    n = len(scores)
    return DriftFigures(
        n=n,
        rouge_l=sum(scores) / n if n else None,
        identical=sum(same) / n if n else None,
        per_category={c: sum(v) / len(v) for c, v in sorted(per_category.items())},
        loglik_base=loglik_base,
        loglik_candidate=loglik_candidate,
    )


@dataclass
class GeneralAbilityConfig:
    """The general-ability gate (the `[general_ability]` section of the daemon's config).
    `max_new_tokens`: answer budget for base and candidate (the cache key includes it).
    `min_rouge_l`: hold a candidate whose mean ROUGE-L to the base's answers is below.
    `max_loglik_drop`: hold one whose mean per-token log-likelihood of the base's answers fell
    by more than this many nats (0: not checked). The defaults are set from measured drift:
    docs/daemon.md, "General ability"."""

    enabled: bool = True
    max_new_tokens: int = 32
    min_rouge_l: float = 0.2
    max_loglik_drop: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "general_ability") -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"{section}.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.min_rouge_l <= 1.0:
            raise ValueError(f"{section}.min_rouge_l must be in [0, 1], got {self.min_rouge_l}")
        if self.max_loglik_drop < 0:
            raise ValueError(f"{section}.max_loglik_drop must be >= 0 (0: not checked), got {self.max_loglik_drop}")


def gate_note(recorded: Mapping[str, Any]) -> tuple[str, str]:
    """(verdict, bounds) for a person, from a manifest's `general_ability` figures: "HELD" / "ok"
    with the bounds judged against, or "not gated" with why (a base that does not follow
    instructions: its figures, far outside the bounds, decided nothing)."""
    if recorded.get("instruct_base") is False:
        return "not gated", "the base does not follow instructions: recorded, not judged"
    bounds = f"held if ROUGE-L < {recorded.get('min_rouge_l')} or the drop > {recorded.get('max_loglik_drop')}"
    return ("HELD" if recorded.get("held") else "ok"), bounds


def drifted(figures: DriftFigures, config: GeneralAbilityConfig, *, instruct_base: bool = True) -> tuple[bool, str]:
    """(whether to hold the candidate, a reason that carries the figures). A base that is not an
    instruction-following model (no chat template of its own: a pretrained checkpoint) has no
    answers to protect: Gemma 3 270M "answers" the general prompts by echoing them ("What is 17
    plus 26? mendatang\nWhat is 17 plus 26? ..."), so the figures are recorded, not gated."""
    if not config.enabled:
        return False, "general ability: not checked (disabled)"
    if not instruct_base and figures.rouge_l is not None:
        return False, (f"general ability: not gated, the base is not an instruction-following model (no chat template of its own); "
                       f"answers ROUGE-L {figures.rouge_l:.2f} vs the base's own over {figures.n} prompts")
    if figures.rouge_l is None:
        return False, "general ability: not measured (no prompts)"
    over = f"over {figures.n} prompts"
    rouge = f"answers ROUGE-L {figures.rouge_l:.2f} vs the base's own"
    if figures.rouge_l < config.min_rouge_l:
        return True, f"general ability: {rouge} (needs >= {config.min_rouge_l:.2f}) {over}"
    drop = figures.loglik_drop
    if config.max_loglik_drop > 0 and drop is not None and not math.isfinite(drop):
        # a NaN compares False with any bound: a model whose log-likelihoods overflowed is no model to ship
        return True, f"general ability: the log-likelihood of the base's answers is not a number ({figures.loglik_candidate}) {over}"
    if config.max_loglik_drop > 0 and drop is not None and drop > config.max_loglik_drop:
        return True, (f"general ability: mean log-likelihood of the base's answers {figures.loglik_candidate:.2f} per token vs the "
                      f"base's {figures.loglik_base:.2f} (drop {drop:.2f}, allowed <= {config.max_loglik_drop:.2f}) {over}")
    extra = f", log-likelihood drop {drop:.2f}" if drop is not None else ""
    return False, f"general ability: {rouge} (>= {config.min_rouge_l:.2f}), {figures.identical:.0%} identical{extra} {over}"
