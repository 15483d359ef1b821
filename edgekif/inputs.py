"""Records into model inputs: prompt shapes (chat template), fitting long prompts into a
token budget, tokenisation of prompt and answer, and batching. Training, evaluation and the
export check all tokenise through here, so the model sees one rule everywhere.
(Reading and validating task files is edgekif.taskfile.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, ModelError
from .records import Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value ignored by the loss (prompt tokens, padding)


@dataclass
class Encoded:
    """One tokenised example: `labels` is IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_task(tokenizer, task, max_length: int) -> list[Encoded]:
    """Every record of a task (an edgekif.taskfile.TaskFile), logging how many were cut."""
    encoded = [encode_example(tokenizer, r, max_length) for r in task.records]
    if n_trunc := sum(e.truncated for e in encoded):
        log.info("%s: %d of %d examples truncated to %d tokens", task.name, n_trunc, len(encoded), max_length)
    return encoded


# --------------------------------------------------------------------------- tokenisation


def _as_ids(result: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if isinstance(result, Mapping) or hasattr(result, "input_ids"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):
        result = result[0]
    return [int(t) for t in result]


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt tokens for chat messages, ending where the answer starts (the assistant cue).

    With a chat template: the template with add_generation_prompt. Without one: the
    contents joined by newlines, plus a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        return _as_ids(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    return _as_ids(tokenizer("\n".join(m["content"] for m in messages) + "\n")["input_ids"])


def encode_prompt(tokenizer, record: Record, max_tokens: int = 0) -> list[int]:
    """Prompt tokens of a record; `max_tokens` > 0 fits the prompt into that many (fit_prompt)."""
    if max_tokens > 0:
        return fit_prompt(tokenizer, record, max_tokens)
    return render_prompt(tokenizer, record.chat())


def encode_target(tokenizer, record: Record) -> list[int]:
    """Answer tokens followed by eos (for ChatML `<|im_end|>`, which ends an assistant turn)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no eos token, so an answer's end cannot be learned")
    return _as_ids(tokenizer(record.output, add_special_tokens=False)["input_ids"]) + [int(eos)]


# --------------------------------------------------------------------------- chat template

# Plain ChatML: SmolLM2's template without the default system prompt it inserts when a
# conversation has no system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PROBES = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}],
)


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many tokens every sequence starts with, leaving each at least one of its own (the
    token whose logits start its answer): what evaluation can read once for all of them."""
    common = os.path.commonprefix([list(s) for s in seqs])
    return max(0, min(len(common), min(len(s) for s in seqs) - 1))


def without_default_system(tokenizer) -> str | None:
    """A chat template that renders like the tokenizer's, except that a conversation without a
    system message gets none; None when the template adds no default system message or is not
    one this can rewrite safely (then it is left as it is).

    Checked by rendering, not by reading the Jinja: the result must equal the original on
    conversations with a system message, and on those without it must be the original minus
    one leading system turn.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or template == CHATML_TEMPLATE:
        return None

    def render(messages, tpl, gen=True) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=tpl, add_generation_prompt=gen, tokenize=False)

    try:
        for messages in _PROBES:
            for gen in (True, False):
                if render(messages, template, gen) != render(messages, CHATML_TEMPLATE, gen):
                    return None
        prefix = None
        for messages in (_PROBES[0][1:], _PROBES[1][1:]):
            for gen in (True, False):
                orig, plain = render(messages, template, gen), render(messages, CHATML_TEMPLATE, gen)
                if not orig.endswith(plain) or orig == plain:
                    return None
                head = orig[: len(orig) - len(plain)]
                if not (head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n")) or head != (prefix or head):
                    return None
                prefix = head
    except Exception:  # a template that fails on these probes is not one to rewrite
        return None
    return CHATML_TEMPLATE


# --------------------------------------------------------------------------- prompt fitting
#
# One rule for training and fitted evaluation (eval.max_prompt_tokens): when a
# prompt does not fit, cut the MIDDLE of the text that matters least and keep both ends.
# Cutting from the left (as before) dropped the chat template's start, the system message and
# the instruction with its answer options, which come first; the end holds the answer cue.
#
#   1. Alpaca records: the input's middle, down to CUT_TAIL_TOKENS (the instruction, with
#      its options, is kept whole; the input's end holds the answer cue).
#   2. The main user turn's middle (Alpaca: the last user turn, instruction included; chat:
#      the longest user turn), down to MIN_KEEP_TOKENS.
#   3. The middle of the other turns, longest first (long system prompts, earlier turns).
#   4. The main user turn, down to nothing.
#   5. Last resort (the template's own tokens do not fit): keep the prompt's last tokens.
# A middle cut keeps the text's start (titles, context) and at least CUT_TAIL_TOKENS of its
# end (the answer cue, e.g. "Answer:"), and puts CUT_MARK where text was removed.

CUT_MARK = " … "
CUT_TAIL_TOKENS = 8  # tokens of a cut text's end always kept (when the budget allows)
MIN_KEEP_TOKENS = 2 * CUT_TAIL_TOKENS  # the main turn keeps this much while other text can go
_FIT_ROUNDS = 6  # re-measure rounds per cut (tokens can merge across the cut mark)


def _detokenize(tokenizer, ids: list[int]) -> str:
    # a cut may split a multi-byte character; drop the replacement characters that leaves
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).replace("\ufffd", "")


def _cut_middle(tokenizer, ids: list[int], keep: int) -> str:
    """The text of `ids` with its middle removed so that about `keep` tokens remain."""
    if keep <= 0:
        return ""
    tail = min(keep, max(CUT_TAIL_TOKENS, keep // 3))
    head = keep - tail
    return _detokenize(tokenizer, ids[:head]).rstrip() + CUT_MARK + _detokenize(tokenizer, ids[len(ids) - tail :]).lstrip()


def _cut_plan(record: Record, messages: list[dict[str, str]]) -> list[tuple[int, int, int]]:
    """(message index, protected leading chars, tokens to keep at least) in cutting order."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    plan: list[tuple[int, int, int]] = []
    if record.instruction_chars and users:
        main = users[-1]
        plan.append((main, record.instruction_chars, CUT_TAIL_TOKENS))
    else:
        main = max(users, key=lambda i: len(messages[i]["content"])) if users else len(messages) - 1
    plan.append((main, 0, MIN_KEEP_TOKENS))
    others = sorted((i for i in range(len(messages)) if i != main), key=lambda i: -len(messages[i]["content"]))
    return plan + [(i, 0, 0) for i in others] + [(main, 0, 0)]


def _shrink(tokenizer, messages: list[dict[str, str]], index: int, protect: int, floor: int, budget: int, over: int) -> int:
    """Cut the middle of messages[index]'s content after its first `protect` chars, keeping at
    least `floor` of those tokens, until the prompt fits `budget`. Edits `messages`; returns
    the tokens still over."""
    content = messages[index]["content"]
    head, body = content[:protect], content[protect:]
    ids = _as_ids(tokenizer(body, add_special_tokens=False)["input_ids"]) if body else []
    if len(ids) <= floor:
        return over
    keep = max(floor, len(ids) - over)
    for _ in range(_FIT_ROUNDS):
        messages[index] = {**messages[index], "content": head + _cut_middle(tokenizer, ids, keep)}
        over = len(render_prompt(tokenizer, messages)) - budget
        if over <= 0 or keep <= floor:
            break
        keep = max(floor, keep - over)
    return over


def fit_messages(tokenizer, record: Record, max_length: int, answer_tokens: int = 0) -> list[dict[str, str]]:
    """The record's chat messages, cut so the rendered prompt plus `answer_tokens` fit
    `max_length` tokens (see the rule above). Unchanged when they already fit.

    The result can still be too long only when the chat template's own tokens do not fit;
    fit_prompt handles that case.
    """
    messages = record.chat()
    budget = max_length - answer_tokens
    over = len(render_prompt(tokenizer, messages)) - budget
    for index, protect, floor in _cut_plan(record, messages):
        if over <= 0:
            break
        over = _shrink(tokenizer, messages, index, protect, floor, budget, over)
    return messages


def fit_prompt(tokenizer, record: Record, max_length: int, answer_tokens: int = 0) -> list[int]:
    """Prompt tokens of fit_messages, at most max_length - answer_tokens of them (at least one)."""
    return _fit(tokenizer, record, max_length - answer_tokens)[0]


def _fit(tokenizer, record: Record, budget: int) -> tuple[list[int], bool]:
    """(prompt ids within `budget` tokens, whether anything was cut)."""
    ids = render_prompt(tokenizer, record.chat())
    if len(ids) <= budget:
        return ids, False
    budget = max(1, budget)
    ids = render_prompt(tokenizer, fit_messages(tokenizer, record, budget))
    if len(ids) > budget:
        log.debug("prompt template alone exceeds %d tokens; keeping its end", budget)
        ids = ids[len(ids) - budget :]
    return ids, True


def encode_example(tokenizer, record: Record, max_length: int, answer_budget: int = 0) -> Encoded:
    """Prompt + target, at most `max_length` tokens; loss only on the target.

    A prompt that does not fit is fitted (fit_prompt: middle cut, instruction and answer
    cue kept) into max_length minus the answer's length, or minus `answer_budget` when that
    is larger: evaluation that fits prompts reserves the task's budget (fit_prompt's
    answer_tokens), and the same reserve cuts a prompt in the same place. The answer is never
    cut for the prompt's sake; only an answer that alone reaches max_length is cut at its end,
    after one prompt token (the assistant cue).
    """
    if max_length < 2:
        raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
    target = encode_target(tokenizer, record)
    if len(target) >= max_length:
        prompt = render_prompt(tokenizer, record.chat())[-1:]
        target = target[: max_length - len(prompt)]
        truncated = True
    else:
        reserve = max(len(target), min(answer_budget, max_length - 1))
        prompt, truncated = _fit(tokenizer, record, max_length - reserve)
    return Encoded(
        input_ids=prompt + target,
        labels=[IGNORE_INDEX] * len(prompt) + target,
        truncated=truncated,
    )


def collate(encoded: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad a batch to its longest example: input_ids, attention_mask, labels (pad = -100)."""
    import torch

    if not encoded:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(e.input_ids) for e in encoded)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return fill + seq if padding_side == "left" else seq + fill

    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in encoded], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in encoded], dtype=torch.long),
        "labels": torch.tensor([pad(e.labels, IGNORE_INDEX) for e in encoded], dtype=torch.long),
    }
