"""Evaluation of a model on records: greedy generation + exact match, and label scoring.

  generate_answers(model, tok, records)          # greedy answers, batched with left padding
                                                 # after the prompts' shared prefix, read once
  label_scores(model, tok, records, labels)      # pick the most likely label per record
  evaluate_task(model, tok, records, labels=...) # -> EvalScores(n, exact_match, label_accuracy, ...)

Prompts and targets are tokenised exactly as for training (edgekif.inputs.encode_prompt /
encode_target), so a label's score is the log-likelihood the trainer optimised.
Works on a plain transformers CausalLM, a peft PeftModel and an NF4 (bitsandbytes) model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .compute import device_of
from .decoding import decode_answer
from .inputs import encode_prompt, encode_target, shared_prefix_length
from .errors import EdgekifError
from .records import Record

log = logging.getLogger(__name__)

KEEP_PREDICTIONS = 20  # answers kept in a EvalScores for reports

# Records per generation batch (rows of the label pass). 32 measured fastest of 16/32/64/128 on
# 100 dbpedia test records with SmolLM2 on 2 cores (generate 34.0 s vs 40.5 at 16, label scoring
# 56.4 vs 71.6) and second on headlines (29.8 vs 35.6; 64: 22.7 but 46.0 on dbpedia), with the
# same answers at every size: tools/bench_eval.py, docs/benchmarks.md.
EVAL_BATCH_SIZE = 32

# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """eval() + inference_mode for the block; give the model back in the mode it came in."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def _eos_ids(model, tokenizer) -> list[int]:
    """Stop tokens: the tokenizer's eos plus whatever the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    ids.discard(None)
    return sorted(ids)


def _left_pad(seqs: Sequence[list[int]], pad_id: int, device):
    """(input_ids, attention_mask, position_ids) for left-padded prompts.

    Positions count real tokens only, so a padded prompt sees the same positions as alone.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


# A prompt prefix every prompt of a batch shares (the chat template's start and the task's
# instruction: 34-61 of the ~65-170 tokens of make demo's prompts) runs once, at batch 1, and
# every row continues its KV cache: the prompt pass, which is most of an evaluation's cost on a
# CPU, shrinks by that share. Shorter prefixes are not worth the extra forward call.
MIN_SHARED_PREFIX = 8


@dataclass
class _PromptBatch:
    """A batch of prompts laid out as the shared prefix, then each row's own tokens left padded.

    ids, mask, pos: (b, shared + width); positions count real tokens, so each row sees the
    positions it would alone. cache: the shared prefix's KV cache, one copy per row (None when
    nothing is shared; then the layout is plain left padding)."""

    ids: Any
    mask: Any
    pos: Any
    shared: int
    cache: Any

    def past(self) -> dict[str, Any]:
        """`past_key_values` for a call on ids[:, shared:] (nothing when no prefix is cached:
        passing None warns on transformers >= 5.25)."""
        return {} if self.cache is None else {"past_key_values": self.cache}


def _sliding_window(model) -> int:
    """The attention window of a model with sliding-window layers (Gemma 2/3), else 0."""
    return int(getattr(model.config, "sliding_window", None) or 0)


def _prompt_batch(model, seqs: Sequence[list[int]], pad_id: int, device, *, extra: int) -> _PromptBatch:
    """The batch of `seqs` with their shared prefix computed once (MIN_SHARED_PREFIX).

    Each row keeps at least one token of its own (the prompt's last logits come from it).
    `extra`: tokens the caller appends after the prompts (answers or labels). A sliding window
    counts cache positions, padding included: when the padded batch plus `extra` could exceed
    the window, the plain left-padded layout keeps the padding before every real token."""
    import torch

    shared = shared_prefix_length(seqs)
    window = _sliding_window(model)
    if shared < MIN_SHARED_PREFIX or (window and max(len(s) for s in seqs) + extra >= window):
        ids, mask, pos = _left_pad(seqs, pad_id, device)
        return _PromptBatch(ids, mask, pos, 0, None)
    own_ids, own_mask, _ = _left_pad([s[shared:] for s in seqs], pad_id, device)
    b = len(seqs)
    prefix = torch.tensor([list(seqs[0][:shared])], dtype=torch.long, device=device)
    ids = torch.cat([prefix.expand(b, shared), own_ids], dim=1)
    mask = torch.cat([torch.ones((b, shared), dtype=own_mask.dtype, device=device), own_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(b)
    return _PromptBatch(ids, mask, pos, shared, cache)


def _batches_by_length(prompts: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar prompt length (less padding); callers restore order."""
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# --------------------------------------------------------------------------- generation


def _prompts(tokenizer, records: Sequence[Record], max_prompt_tokens: int) -> list[list[int]]:
    """Prompt token ids; with max_prompt_tokens > 0 fitted into that many tokens by the rule
    training uses (inputs.fit_prompt: the middle is cut, the instruction and answer cue kept)."""
    return [encode_prompt(tokenizer, r, max_prompt_tokens) for r in records]


# 256 MB of fp32 logits: SmolLM2's 49k-token vocabulary, 32 rows, 41 draft tokens; Gemma 3's
# 262k, 7 tokens
DRAFT_LOGITS = 1 << 26


def _greedy(model, tokenizer, ids, mask, pos, max_new_tokens: int, eos_ids: list[int], cache=None,
            draft_ids: Sequence[list[int]] | None = None) -> list[str]:
    """Greedy answers of one left-padded batch (ids, mask, pos as _left_pad and _prompt_batch
    lay them out), in row order; `cache` may hold the prompts' first tokens already (only the
    rest is run).

    A plain argmax loop, as the exports' runtime decodes (no logits processors), rather than
    generate(): a row that has ended leaves the batch, its KV-cache rows dropped, so a batch
    costs the tokens of its answers instead of its longest answer times its rows (free-text
    answers end anywhere between a few tokens and the budget).

    `draft_ids` (per row, token ids, eos included where the draft ended): answers proposed by
    another model (the export being checked), verified as speculative decoding verifies a
    draft: they are fed with the prompt in one pass, each row keeps its own greedy tokens as
    long as they equal the draft's, and only rows that part from their draft decode on, one
    token a step. The answers are this model's own greedy answers either way (up to float
    rounding: a longer pass sums in another order); a draft that agrees saves its tokens' steps."""
    import torch

    done = 0 if cache is None else cache.get_seq_length()
    given = {} if cache is None else {"past_key_values": cache}  # (passing None warns on transformers >= 5.25)
    b, device = ids.shape[0], ids.device
    # the verifying pass keeps logits for every draft position: at most DRAFT_LOGITS floats
    # (a draft longer than that is verified that far; the row decodes on after it)
    fits = max(0, DRAFT_LOGITS // (b * model.get_output_embeddings().weight.shape[0]) - 1) if draft_ids is not None else 0
    drafts = [list(d[: min(max_new_tokens, fits)]) for d in draft_ids] if draft_ids is not None else [[] for _ in range(b)]
    width = max((len(d) for d in drafts), default=0)
    run_ids, run_pos = ids[:, done:], pos[:, done:]
    if width:
        fed = torch.zeros((b, width), dtype=ids.dtype)
        for row, d in enumerate(drafts):
            fed[row, : len(d)] = torch.tensor(d, dtype=ids.dtype)
        run_ids = torch.cat([run_ids, fed.to(device)], dim=1)
        run_pos = torch.cat([run_pos, pos[:, -1:] + 1 + torch.arange(width, device=device)], dim=1)
        mask = torch.cat([mask, mask.new_ones((b, width))], dim=1)  # a row's padding after its draft is never attended to
    # use_cache=True explicitly: training loads set config.use_cache=False
    out = model(input_ids=run_ids, attention_mask=mask, position_ids=run_pos, use_cache=True, logits_to_keep=width + 1, **given)
    cache, picks = out.past_key_values, out.logits.argmax(-1).tolist()  # picks[row][k]: its token after the prompt and draft[:k]
    stop = set(eos_ids)
    answers: list[list[int]] = [[] for _ in range(b)]
    going: list[int] = []  # rows that decode on, each from its last answer token
    for row in range(b):
        for k, token in enumerate(picks[row]):
            if token in stop or len(answers[row]) >= max_new_tokens:
                break
            answers[row].append(token)
            if len(answers[row]) == max_new_tokens:
                break
            if k >= len(drafts[row]) or token != drafts[row][k]:
                going.append(row)  # its own token: the draft's cache columns from k on are not its answer
                break
    if not going:
        return _decoded(tokenizer, answers)
    keep = torch.tensor(going, device=device)
    if len(going) < b:
        cache.batch_select_indices(keep)
    mask = mask[keep]  # (a copy: indexing with a tensor)
    if width:
        prompt_width = mask.shape[1] - width
        for i, row in enumerate(going):
            mask[i, prompt_width + len(answers[row]) - 1 :] = 0  # draft tokens past the agreed ones
    rows = going
    token = torch.tensor([answers[r][-1] for r in rows], dtype=torch.long, device=device)
    position = pos[keep, -1] + torch.tensor([len(answers[r]) for r in rows], device=device)
    while True:
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        token = out.logits[:, -1, :].argmax(-1)
        alive = []
        for i, (row, t) in enumerate(zip(rows, token.tolist())):
            if t in stop:
                continue
            answers[row].append(t)
            if len(answers[row]) < max_new_tokens:
                alive.append(i)
        if not alive:
            return _decoded(tokenizer, answers)
        if len(alive) < len(rows):  # ended rows leave the batch
            sel = torch.tensor(alive, device=device)
            cache.batch_select_indices(sel)
            rows, token, mask, position = [rows[i] for i in alive], token[sel], mask[sel], position[sel]
        position = position + 1


def _decoded(tokenizer, answers: list[list[int]]) -> list[str]:
    # whole characters only, as the runners decode (a cut at the token limit drops a
    # partial one): the export check compares these answers with theirs
    return [decode_answer(lambda t: tokenizer.decode(t, skip_special_tokens=True), a).strip() for a in answers]


def generate_answers(model, tokenizer, records: Sequence[Record], *, max_new_tokens: int = 8, batch_size: int = EVAL_BATCH_SIZE, max_prompt_tokens: int = 0,
                     drafts: Sequence[str] | None = None) -> list[str]:
    """Greedy answers (special tokens skipped, stripped), one per record, in record order.
    `max_prompt_tokens` > 0 fits prompts into that many tokens as training does (0 = whole prompts).
    `drafts` (one answer a record, e.g. another model's): verified rather than decoded where
    this model would answer the same (_greedy); the answers are this model's either way."""
    if not records:
        return []
    prompts = _prompts(tokenizer, records, max_prompt_tokens)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    device = device_of(model)
    drafted = _draft_ids(tokenizer, drafts, len(records), max_new_tokens)
    answers: list[str] = [""] * len(records)
    with _eval_mode(model):
        for idx in _batches_by_length(prompts, max(1, batch_size)):
            rows = [drafted[k] for k in idx] if drafted is not None else None
            batch = _prompt_batch(model, [prompts[k] for k in idx], pad_id, device, extra=max_new_tokens + _draft_width(rows))
            for k, answer in zip(idx, _greedy(model, tokenizer, batch.ids, batch.mask, batch.pos, max_new_tokens, eos_ids, cache=batch.cache, draft_ids=rows)):
                answers[k] = answer
    return answers


def _draft_ids(tokenizer, drafts: Sequence[str] | None, n: int, max_new_tokens: int) -> list[list[int]] | None:
    """Each draft answer's tokens followed by eos (as an answer that ended there was
    generated), at most `max_new_tokens` of them: what _greedy verifies."""
    if drafts is None:
        return None
    if len(drafts) != n:
        raise ValueError(f"{len(drafts)} drafts for {n} records")
    eos = tokenizer.eos_token_id
    out = []
    for d in drafts:
        ids = [int(t) for t in tokenizer(d, add_special_tokens=False)["input_ids"]] if d else []
        out.append((ids + ([int(eos)] if eos is not None else []))[:max_new_tokens])
    return out


def _draft_width(drafts: Sequence[list[int]] | None) -> int:
    return max((len(d) for d in drafts), default=0) if drafts else 0


# --------------------------------------------------------------------------- label scoring


@dataclass
class _PackedLabels:
    """Every label's target tokens (label text + eos, as encode_target builds them) packed into
    one row: each label's tokens but its last, label after label (its last token is predicted,
    never fed). One row a record then scores every label, on that record's own KV cache."""

    first: Any  # (n_labels,) each label's first token: predicted by the prompt's last logits
    fed: Any  # (P,) the fed tokens
    offset: Any  # (P,) each fed token's position within its label (0 = the label's first)
    predicts: Any  # (P,) the token each fed token's logits predict: the next of its label
    label: Any  # (P,) the label each fed token belongs to
    sees: Any  # (P, P) bool: fed token i attends fed token j (same label, j <= i)

    @property
    def longest(self) -> int:
        """The longest label's target tokens: how far past its prompt a label reaches."""
        return int(self.offset.max()) + 2 if len(self.offset) else 1


def _pack_labels(tokenizer, record: Record, labels: Sequence[str], device) -> _PackedLabels:
    import torch

    targets = [encode_target(tokenizer, dataclasses.replace(record, output=lab)) for lab in labels]
    fed, offset, predicts, label = [], [], [], []
    for n, t in enumerate(targets):
        fed += t[:-1]
        offset += range(len(t) - 1)
        predicts += t[1:]
        label += [n] * (len(t) - 1)
    label_t = torch.tensor(label, dtype=torch.long)
    offset_t = torch.tensor(offset, dtype=torch.long)
    # same label, and j's position within it <= i's: a causal mask per label
    sees = (label_t[:, None] == label_t[None, :]) & (offset_t[None, :] <= offset_t[:, None])
    as_long = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in (("first", [t[0] for t in targets]), ("fed", fed), ("predicts", predicts))}
    return _PackedLabels(first=as_long["first"], fed=as_long["fed"], offset=offset_t.to(device), predicts=as_long["predicts"],
                         label=label_t.to(device), sees=sees.to(device))


def _as_attention_mask(model, sees):
    """A (b, q, k) boolean "query sees key" as the 4-D mask `model`'s attention takes as it
    is: booleans for sdpa; for eager attention, which adds the mask to the scores, 0 where seen
    and the dtype's minimum elsewhere."""
    import torch

    sees = sees[:, None]
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return sees
    dtype = getattr(model, "dtype", torch.float32)
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)


# Fed label positions a label pass may hold (records x packed label tokens): its logits are
# this many vocabulary rows (SmolLM2: 50 MB; Gemma 3, 262 k words: 270 MB). A task may have 50
# labels, a few tokens each, so a batch's rows are scored in chunks when they would hold more.
LABEL_PASS_POSITIONS = 256


def _cache_rows(cache, rows):
    """A new KV cache holding copies of `rows` of `cache` (which is left as it was): the
    layers are copied shallowly and each keeps only those rows."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(rows)  # indexing makes new tensors: `cache`'s stay untouched
    return out


def _label_totals(model, last_logits, cache, mask, packed: _PackedLabels):
    """Summed log-probability of every label after each of b prompts: (b, n_labels).
    `last_logits` (b, vocab) are the prompts' last logits, `cache` their KV cache (extended
    here: pass a copy), `mask` their (left-padded) attention mask.

    One forward pass of the packed labels, a row a prompt, with a 4-D attention mask: each fed
    token sees its prompt's real tokens and its own label's earlier tokens; rows in chunks of
    at most LABEL_PASS_POSITIONS fed tokens. Repeating each prompt's cache once per label, as
    this did before, made the label part about 3x as long (100 dbpedia test records, 14
    labels, SmolLM2 on 2 cores: docs/benchmarks.md, "Label scoring in one pass")."""
    import torch

    b, width = mask.shape[0], packed.fed.shape[0]
    chunk = max(1, LABEL_PASS_POSITIONS // max(1, width))
    if b <= chunk:
        return _label_totals_rows(model, last_logits, cache, mask, packed)
    parts = []
    for lo in range(0, b, chunk):
        rows = torch.arange(lo, min(lo + chunk, b), device=mask.device)
        parts.append(_label_totals_rows(model, last_logits[rows], _cache_rows(cache, rows), mask[rows], packed))
    return torch.cat(parts)


def _label_totals_rows(model, last_logits, cache, mask, packed: _PackedLabels):
    """_label_totals on rows whose label pass fits LABEL_PASS_POSITIONS; `cache` is extended."""
    import torch

    first_logp = torch.log_softmax(last_logits.float(), dim=-1)  # predicts each label's token 0
    totals = first_logp[:, packed.first]
    width = packed.fed.shape[0]
    if width == 0:  # every label one token long (its eos only)
        return totals
    b, prompt_len = mask.shape
    labels_part = packed.sees[None].expand(b, width, width)
    sees = torch.cat([mask.bool()[:, None, :].expand(b, width, prompt_len), labels_part], dim=2)
    attention: Any = _as_attention_mask(model, sees)
    sliding = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "is_sliding", False)]
    if sliding:
        # a sliding-window layer's cache keeps the prompt's last window-1 positions only, and a
        # fed token at position prompt_len + offset sees keys after it minus the window, as
        # transformers' own sliding masks count them (cache positions)
        window = int(sliding[0].sliding_window)
        kept = min(prompt_len, window - 1)
        if "sliding_attention" not in (getattr(model.config, "layer_types", None) or []):
            raise EdgekifError(f"label scoring: {type(model).__name__} has sliding-window cache layers but no config.layer_types to give them their own mask")
        key_at = torch.arange(prompt_len - kept, prompt_len, device=mask.device)
        near = key_at[None, :] > (prompt_len + packed.offset[:, None] - window)  # (P, kept)
        kept_part = mask.bool()[:, None, prompt_len - kept :] & near[None]
        attention = {"full_attention": attention,
                     "sliding_attention": _as_attention_mask(model, torch.cat([kept_part, labels_part], dim=2))}
    pos = mask.sum(-1)[:, None] + packed.offset[None, :]  # positions count real prompt tokens (_left_pad)
    out = model(input_ids=packed.fed.expand(b, width), attention_mask=attention, position_ids=pos, past_key_values=cache, use_cache=True)
    logits = out.logits.float()
    # log-softmax at the predicted token only: no second (b, P, vocab) tensor
    logp = logits.gather(2, packed.predicts.expand(b, width)[..., None]).squeeze(2) - torch.logsumexp(logits, dim=-1)
    return totals.index_add(1, packed.label, logp)


def label_logprobs(model, tokenizer, records: Sequence[Record], labels: Sequence[str], *, batch_size: int = EVAL_BATCH_SIZE, max_prompt_tokens: int = 0) -> list[list[float]]:
    """Total log-probability (sum over tokens, no length normalisation) of each label's
    target tokens (label text + eos, as encode_target builds them) given each prompt.

    Returns scores[record][label]. Summing includes the eos, so a label that is only a
    prefix of the answer ("Art" vs "Artist") is penalised for stopping early.

    How: the prompt runs once per record with the KV cache on; every label's continuation
    is then scored in one more pass, a row a record, on that cache (_label_totals). Labels are
    a few tokens and prompts hundreds, so this costs little more than the prompt pass.
    `batch_size` bounds the records a pass.
    """
    if not records:
        return []
    if not labels:
        raise ValueError("label_logprobs needs at least one label")
    prompts = _prompts(tokenizer, records, max_prompt_tokens)
    pad_id = _pad_id(tokenizer)
    device = device_of(model)
    packed = _pack_labels(tokenizer, records[0], labels, device)

    scores: list[list[float]] = [[] for _ in records]
    with _eval_mode(model):
        for idx in _batches_by_length(prompts, max(1, batch_size)):
            batch = _prompt_batch(model, [prompts[k] for k in idx], pad_id, device, extra=packed.longest)
            # logits_to_keep=1: only the last position's logits are used (the rest cost a
            # vocabulary-wide matmul per prompt token)
            out = model(input_ids=batch.ids[:, batch.shared :], attention_mask=batch.mask, position_ids=batch.pos[:, batch.shared :],
                        use_cache=True, logits_to_keep=1, **batch.past())
            totals = _label_totals(model, out.logits[:, -1, :], out.past_key_values, batch.mask, packed)
            for row, k in enumerate(idx):
                scores[k] = totals[row].tolist()
    return scores


def answers_and_label_logprobs(model, tokenizer, records: Sequence[Record], labels: Sequence[str], *, max_new_tokens: int = 8,
                               batch_size: int = EVAL_BATCH_SIZE, max_prompt_tokens: int = 0,
                               drafts: Sequence[str] | None = None) -> tuple[list[str], list[list[float]]]:
    """generate_answers and label_logprobs of the same records in one pass over the prompts.

    Why: on a label task both cost mostly the prompt's forward pass (hundreds of tokens, where
    the answer and the labels are a few); run separately they pay it twice. Here each batch's
    prompt, but its last token, runs once into a KV cache; label scoring runs the last prompt
    token and then every label (_label_totals) on one copy of it; greedy generation continues
    the cache itself. Same answers and scores as the two functions, up to float rounding.
    `drafts`: as generate_answers."""
    if not records:
        return [], []
    if not labels:
        raise ValueError("answers_and_label_logprobs needs at least one label")
    prompts = _prompts(tokenizer, records, max_prompt_tokens)
    if min(len(p) for p in prompts) < 2:  # no prefix to share; never for a chat-templated prompt
        return (generate_answers(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                 drafts=drafts),
                label_logprobs(model, tokenizer, records, labels, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens))
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    device = device_of(model)
    packed = _pack_labels(tokenizer, records[0], labels, device)
    drafted = _draft_ids(tokenizer, drafts, len(records), max_new_tokens)

    answers: list[str] = [""] * len(records)
    scores: list[list[float]] = [[] for _ in records]
    with _eval_mode(model):
        for idx in _batches_by_length(prompts, max(1, batch_size)):
            rows = [drafted[k] for k in idx] if drafted is not None else None
            batch = _prompt_batch(model, [prompts[k] for k in idx], pad_id, device, extra=max(max_new_tokens + _draft_width(rows), packed.longest))
            ids, mask, pos = batch.ids, batch.mask, batch.pos
            if ids.shape[1] - 1 > batch.shared:  # the rows' own tokens but the last, after the shared prefix
                prefix = model(input_ids=ids[:, batch.shared : -1], attention_mask=mask[:, :-1], position_ids=pos[:, batch.shared : -1],
                               use_cache=True, logits_to_keep=1, **batch.past()).past_key_values
            else:  # every row's own part is its last token
                prefix = batch.cache
            # the last prompt token and the labels on a copy (generation continues `prefix`)
            whole = copy.deepcopy(prefix)
            last_logits = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], past_key_values=whole, use_cache=True).logits[:, -1, :]
            totals = _label_totals(model, last_logits, whole, mask, packed)
            for row, k in enumerate(idx):
                scores[k] = totals[row].tolist()
            # _greedy runs only the tokens the cache lacks: the last prompt token, then the answer
            for k, answer in zip(idx, _greedy(model, tokenizer, ids, mask, pos, max_new_tokens, eos_ids, cache=prefix, draft_ids=rows)):
                answers[k] = answer
    return answers, scores


def label_scores(model, tokenizer, records: Sequence[Record], labels: Sequence[str], *, batch_size: int = EVAL_BATCH_SIZE, max_prompt_tokens: int = 0) -> list[str]:
    """For each record, the label with the highest summed log-probability (see label_logprobs)."""
    labels = list(labels)
    return _best(labels, label_logprobs(model, tokenizer, records, labels, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens))


def _best(labels: list[str], scores: list[list[float]]) -> list[str]:
    """Each record's highest-scoring label (the first on a tie)."""
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]


def generate_and_pick(model, tokenizer, records: Sequence[Record], labels: Sequence[str] | None, *, max_new_tokens: int = 8,
                      batch_size: int = EVAL_BATCH_SIZE, max_prompt_tokens: int = 0,
                      drafts: Sequence[str] | None = None) -> tuple[list[str], list[str] | None]:
    """Greedy answers and, when `labels` are given, each record's label by label scoring
    (None without labels), in one pass over the prompts (answers_and_label_logprobs).
    `drafts`: as generate_answers."""
    if not labels:
        return generate_answers(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                drafts=drafts), None
    labels = list(labels)
    answers, scores = answers_and_label_logprobs(model, tokenizer, records, labels, max_new_tokens=max_new_tokens,
                                                 batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, drafts=drafts)
    return answers, _best(labels, scores)


# --------------------------------------------------------------------------- one task


@dataclass
class EvalScores:
    n: int
    exact_match: float  # fraction of generated answers == record.label; NaN when n == 0
    label_accuracy: float | None  # label-scoring accuracy; None when not computed
    predictions: list[str] = field(default_factory=list)  # first KEEP_PREDICTIONS generated answers
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """The headline accuracy: label scoring when computed (robust to formatting), else exact match."""
        return self.label_accuracy if self.label_accuracy is not None else self.exact_match

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("exact_match", "label_accuracy"):  # JSON has no NaN
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
        return d


def evaluate_task(
    model,
    tokenizer,
    records: Sequence[Record],
    *,
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = EVAL_BATCH_SIZE,
    max_examples: int = 0,
    label_scoring: bool = True,
    max_prompt_tokens: int = 0,
) -> EvalScores:
    """Exact match of greedy answers, plus label-scoring accuracy when a label set is given.
    `max_prompt_tokens` > 0 evaluates on prompts fitted into that many tokens (inputs.fit_prompt)."""
    t0 = time.perf_counter()
    records = list(records)
    if max_examples > 0:
        records = records[:max_examples]
    if not records:
        log.warning("evaluate_task called with no records")
        return EvalScores(n=0, exact_match=float("nan"), label_accuracy=None, predictions=[], seconds=0.0)

    answers, picked = generate_and_pick(model, tokenizer, records, labels if label_scoring else None, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    exact = sum(a == r.label for a, r in zip(answers, records)) / len(records)
    label_acc = None if picked is None else sum(p == r.label for p, r in zip(picked, records)) / len(records)

    seconds = time.perf_counter() - t0
    log.info("evaluated %d records: exact_match=%.3f label_accuracy=%s (%.1fs)", len(records), exact, label_acc, seconds)
    return EvalScores(n=len(records), exact_match=exact, label_accuracy=label_acc, predictions=answers[:KEEP_PREDICTIONS], seconds=seconds)
