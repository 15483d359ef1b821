"""General rehearsal: the base's own answers to general prompts, replayed beside past tasks.

A daemon that replaces the served model after every file must keep what the base could do for
clients that never dropped a file (edgekif.general_ability gates on it). The base's training
data is not available, so the model rehearses what it answered itself before any training
(self-synthesised rehearsal, Huang et al., ACL 2024): a second set of general prompts shipped
with the package (`rehearsal_prompts.jsonl`, disjoint from the gate's `general_prompts.jsonl`,
so the gate still measures on prompts training never saw) is answered once per base, greedily,
by the untrained base in its training precision and chat template (an answer the budget cut
ends at its last full sentence); with
`replay.general_share` > 0 that share of every replay batch is drawn from those answers (a
first task, with no past task to replay, has no replay batches).

  load_rehearsal_prompts()                                   the shipped prompts, validated
  base_rehearsal_records(model, tokenizer, cache_dir, base_id, max_new_tokens)
                                                             [Record], the base's answers (cached)
  mix_general(sampler, records, share)                       a replay sampler that mixes them in
"""

from __future__ import annotations

import contextlib
import math
import random
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .general_ability import GeneralPrompt, cached_base_answers, parse_prompts
from .records import Record

if TYPE_CHECKING:
    from .trainer import ReplaySampler

REHEARSAL_RESOURCE = "rehearsal_prompts.jsonl"
# The default base's answers, computed beforehand by tools/rehearsal_answers.py (same format
# and names as the cache): a fresh install of the default base rehearses without first
# generating 128 answers (~50 s on 2 cores). Any other base, precision or template misses the
# key and is answered once on the machine.
SHIPPED_ANSWERS = "rehearsal_answers"
GENERAL_TASK_ID = "general"  # the records' meta task_id: training reserves each answer's own length


def load_rehearsal_prompts() -> list[GeneralPrompt]:
    text = resources.files(__package__).joinpath(REHEARSAL_RESOURCE).read_text(encoding="utf-8")
    return parse_prompts(text, REHEARSAL_RESOURCE)


class _BaseRunner:
    """The untrained base inside a LoRA model: generate_batch with the adapter switched off."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def _answers(self, chats: Sequence[Any], max_new_tokens: int) -> list[str]:
        from .evaluate import generate_answers

        records = [Record(messages=tuple((m["role"], m["content"]) for m in chat), output="") for chat in chats]
        off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        with off:
            return generate_answers(self.model, self.tokenizer, records, max_new_tokens=max_new_tokens)

    def generate_batch(self, chats: Sequence[Any], max_new_tokens: int = 64) -> list[str]:
        return self._answers(chats, max_new_tokens)

    def generate(self, chat: Any, max_new_tokens: int = 64) -> str:
        return self._answers([chat], max_new_tokens)[0]


def base_rehearsal_records(model: Any, tokenizer: Any, cache_dir: str | Path, base_id: str, max_new_tokens: int,
                           prompts: Sequence[GeneralPrompt] | None = None) -> list[Record]:
    """The base's greedy answers to the rehearsal prompts as training records, computed once per
    `base_id` (which must name the base, its training precision and chat template) and kept in
    `cache_dir`; answers shipped in the package for the same key are used when `cache_dir` has
    none. An empty answer is left out: it would teach the model to stop at once."""
    prompts = list(prompts) if prompts is not None else load_rehearsal_prompts()
    answers = cached_base_answers(cache_dir, base_id, prompts, max_new_tokens, lambda: _BaseRunner(model, tokenizer),
                                  shipped=resources.files(__package__).joinpath(SHIPPED_ANSWERS))
    records = []
    for p, a in zip(prompts, answers):
        if len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1:
            a = _last_sentence_end(a)  # cut by the budget: training appends an end of turn
        if a.strip():
            records.append(Record(messages=p.messages, output=a, id=f"{GENERAL_TASK_ID}/{p.id}", meta={"task_id": GENERAL_TASK_ID}))
    return records


def _last_sentence_end(text: str) -> str:
    """`text` up to its last full sentence ("" if none): an answer the budget cut mid-sentence
    would teach the model to end its turn there."""
    ends = [i for i, ch in enumerate(text) if ch in ".!?" and (i + 1 == len(text) or text[i + 1].isspace())]
    return text[: ends[-1] + 1] if ends else ""


def mix_general(tasks: ReplaySampler | None, general: Sequence[Record], share: float) -> ReplaySampler | None:
    """A replay sampler whose batches of n hold ceil(share * n) rehearsal records (seeded by the
    batch's seed) and the rest from `tasks` (rehearsal fills up where the past tasks have fewer).
    Returns `tasks` unchanged when there is nothing to mix, or no past task: a first task
    trains without replay steps, as before. Rehearsing on it too (every replay batch general)
    cost Recurrent-KIF its first task (dbpedia 63 and 72 just after learning it, against 79 and
    75 without; docs/benchmarks.md, "general rehearsal")."""
    if not general or share <= 0 or tasks is None:
        return tasks
    pool = list(general)

    def sample(n: int, seed: int) -> list[Record]:
        from_tasks = tasks(max(1, n - math.ceil(share * n)), seed)  # at least one: a probe of n=1 finds replay
        k = min(n - len(from_tasks), len(pool))
        return [*from_tasks, *random.Random(seed).sample(pool, k)] if from_tasks else []

    return sample
