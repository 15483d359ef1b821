"""Evaluation: generation + exact match, label scoring."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from edgekif.config import LoRAConfig
from edgekif import evaluate as evaluate_module
from edgekif.decoding import decode_answer
from edgekif.inputs import collate, encode_example, encode_prompt, encode_target, fit_prompt
from edgekif.compute import compute_dtype
from edgekif.evaluate import (
    EvalScores,
    answers_and_label_logprobs,
    evaluate_task,
    generate_answers,
    label_logprobs,
    label_scores,
)
from edgekif.model import add_lora, bitsandbytes_available, load_model
from edgekif.records import Record
from tiny_models import opinionated_llama, tiny_llama

SAY = [Record.from_prompt("say A", "A", id="a"), Record.from_prompt("say B", "B", id="b")]
LABELS = ["A", "B", "C"]


def train_to_answer(model, tok, records, *, lr: float, max_steps: int, stop_loss: float = 0.01) -> float:
    """Fit `model` on `records` (loss on the answer only, as the trainer does); returns the last loss."""
    batch = collate([encode_example(tok, r, 64) for r in records], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(max_steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_loss:
            break
    return loss.item()


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained (full weights) to answer "say A" -> "A" and "say B" -> "B"."""
    torch.manual_seed(0)
    model, tok = tiny_llama()
    loss = train_to_answer(model, tok, SAY, lr=3e-3, max_steps=300)
    assert loss < 0.01, f"fixture did not learn the two answers (loss {loss:.3f})"
    model.eval()
    return model, tok


@pytest.fixture()
def opinionated():
    """A random tiny Llama with large weights, so greedy output is varied text rather than
    the same whitespace token over and over (which would make invariance checks vacuous)."""
    return opinionated_llama()


# --------------------------------------------------------------------------- generation


def test_trained_model_answers_exactly(trained):
    model, tok = trained
    assert generate_answers(model, tok, SAY) == ["A", "B"]
    ev = evaluate_task(model, tok, SAY * 3, labels=LABELS)
    assert ev.n == 6
    assert ev.exact_match == 1.0
    assert ev.label_accuracy == 1.0
    assert ev.predictions == ["A", "B"] * 3
    assert ev.seconds > 0


def test_restores_train_mode(trained):
    model, tok = trained
    model.train()
    try:
        assert generate_answers(model, tok, SAY) == ["A", "B"]  # dropout-free tiny model: eval() is what matters
        assert model.training
        label_scores(model, tok, SAY, LABELS)
        assert model.training
    finally:
        model.eval()
    generate_answers(model, tok, SAY)
    assert not model.training


def test_untrained_model_fails_exact_match(tiny):
    model, tok = tiny
    records = [Record.from_prompt(f"say {c}", c) for c in "XYZW"]
    ev = evaluate_task(model, tok, records, labels=list("XYZW"))
    assert ev.exact_match == 0.0
    assert ev.predictions != [r.label for r in records]
    assert ev.label_accuracy is not None and ev.label_accuracy < 1.0


def test_left_padding_matches_one_by_one(opinionated):
    model, tok = opinionated
    records = [Record.from_prompt("q" * n + " what?", "x") for n in (1, 9, 40, 3, 17)]
    lengths = {len(encode_prompt(tok, r)) for r in records}
    assert len(lengths) == len(records)  # the batch really needs padding
    batched = generate_answers(model, tok, records, max_new_tokens=8, batch_size=16)
    alone = [generate_answers(model, tok, [r], max_new_tokens=8)[0] for r in records]
    assert batched == alone
    assert len(set(batched)) > 1 and all(batched)  # real, differing text, not all blanks


def _rows_per_call(model, run):
    """(run(), the rows of each forward call the model made while it ran)."""
    rows: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda _m, inp, _out: rows.append(inp[0].shape[0]))
    try:
        return run(), rows
    finally:
        hook.remove()


def test_greedy_answers_equal_generate_and_ended_rows_leave_the_batch(opinionated):
    """The plain greedy loop answers as transformers' generate() does, row by row, with rows
    that stop at different steps; once a row has ended, later steps run without it."""
    model, tok = opinionated
    records = [Record.from_prompt("q" * n + " what?", "x") for n in (1, 9, 40, 3, 17, 25)]
    budget = 10

    def greedy_ids(r, eos):
        ids = torch.tensor([encode_prompt(tok, r)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                             num_beams=1, eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]

    # an end token that the rows reach at different steps (and some never): a token the
    # model says mid-answer in some rows
    free = [greedy_ids(r, [tok.eos_token_id]) for r in records]
    firsts = {}
    for row in free:
        for i, t in enumerate(row):
            firsts.setdefault(t, set()).add(i)
    stop = max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))
    eos = [tok.eos_token_id, stop]
    expected_ids = [greedy_ids(r, eos) for r in records]
    assert len({len(e) for e in expected_ids}) >= 3 and max(len(e) for e in expected_ids) == budget  # rows end apart
    model.generation_config.eos_token_id = eos
    try:
        got, rows_run = _rows_per_call(model, lambda: generate_answers(model, tok, records, max_new_tokens=budget, batch_size=16))
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert got == [decode_answer(lambda t: tok.decode(t, skip_special_tokens=True), e).strip() for e in expected_ids]
    assert rows_run[-1] == sum(len(e) == budget for e in expected_ids) < len(records)  # the ended rows left
    after_prompt = rows_run[rows_run.index(len(records)):]  # (a shared prefix may run first, at batch 1)
    assert after_prompt == sorted(after_prompt, reverse=True) and len(after_prompt) == budget


def _drafts_of(answers: list[str]) -> list[str]:
    """Drafts of every sort: the answer itself, cut short, changed at its start and in its
    middle, run on past its end, and empty."""
    out = []
    for i, a in enumerate(answers):
        words = a.split(" ")
        out.append([a, a[: len(a) // 2], "zz" + a, " ".join(words[:1] + ["qq"] + words[2:]), a + " and more", ""][i % 6])
    return out


def test_drafted_answers_are_the_models_own(opinionated):
    """Drafts (another model's answers) change how many steps greedy decoding takes, never the
    answers: right, wrong, short, long or empty, each row ends with this model's own answer,
    within the budget, whether or not labels are scored in the same pass."""
    model, tok = opinionated
    records = [Record.from_prompt("q" * n + " what?", "x") for n in (1, 9, 40, 3, 17, 25, 6, 31, 12, 2, 22, 15)]
    for budget in (1, 5, 12):
        own = generate_answers(model, tok, records, max_new_tokens=budget, batch_size=4)
        assert budget == 1 or len(set(own)) > 3  # varied text, so a wrong draft is really wrong
        drafts = _drafts_of(own)
        assert sum(d != a for d, a in zip(drafts, own)) >= len(records) // 2
        assert generate_answers(model, tok, records, max_new_tokens=budget, batch_size=4, drafts=drafts) == own
        plain, plain_scores = answers_and_label_logprobs(model, tok, records, LABELS, max_new_tokens=budget, batch_size=4)
        drafted, drafted_scores = answers_and_label_logprobs(model, tok, records, LABELS, max_new_tokens=budget, batch_size=4, drafts=drafts)
        assert drafted == plain == own
        assert torch.allclose(torch.tensor(drafted_scores), torch.tensor(plain_scores), atol=1e-5)


SPELL = [Record.from_prompt("spell one", "one two three", id="one"), Record.from_prompt("spell four", "four five", id="four"),
         Record.from_prompt("spell six", "six", id="six")]


def test_agreeing_drafts_are_verified_in_one_pass(monkeypatch):
    """Where every row's draft is its own answer, the batch runs once after its prompt (prompt
    and drafts together) instead of once per answer token; a wrong draft brings the step loop
    back, for its row alone. Drafts are verified only as far as DRAFT_LOGITS allows."""
    torch.manual_seed(0)
    model, tok = tiny_llama()
    loss = train_to_answer(model, tok, SPELL, lr=3e-3, max_steps=400)
    assert loss < 0.01, f"did not learn the answers (loss {loss:.3f})"
    model.eval()
    budget = 16

    def calls(drafts):
        got, rows = _rows_per_call(model, lambda: generate_answers(model, tok, SPELL, max_new_tokens=budget, batch_size=16, drafts=drafts))
        assert got == [r.label for r in SPELL]
        return rows[rows.index(len(SPELL)):]  # (a shared prefix may run first, at batch 1)

    plain = calls(None)
    assert len(plain) == len("one two three") + 1  # a step a token, and the one that says it ended
    assert calls([r.label for r in SPELL]) == [len(SPELL)]
    wrong = calls(["one two four", "four five", "six"])
    # the pass gives that row's own "t" where its draft said "f"; then "hree" and its end, a step each, that row alone
    assert wrong[0] == len(SPELL) and set(wrong[1:]) == {1} and len(wrong) == 1 + len("three")
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(evaluate_module, "DRAFT_LOGITS", len(SPELL) * vocab * 3)  # logits for 3 positions: 2 draft tokens
    # the pass gives each row its first 3 tokens (2 drafted, 1 its own); every row then steps on
    assert len(calls([r.label for r in SPELL])) == 1 + len("one two three") - 3 + 1


def test_greedy_answers_ignore_the_generation_config_as_the_runtime_does(opinionated):
    """A base's generation_config may carry a repetition penalty; the exports' runtime decodes
    with plain argmax (edgekif.decoding.GREEDY sets the penalty to 1), so must the reference."""
    model, tok = opinionated
    records = [Record.from_prompt("q" * n + " what?", "x") for n in (1, 9, 40)]
    ids = [torch.tensor([encode_prompt(tok, r)]) for r in records]

    def generated(**kw):
        outs = [model.generate(input_ids=i, attention_mask=torch.ones_like(i), max_new_tokens=12, do_sample=False, num_beams=1,
                               pad_token_id=tok.pad_token_id, **kw)[0, i.shape[1]:].tolist() for i in ids]
        return [decode_answer(lambda t: tok.decode(t, skip_special_tokens=True), o[: o.index(tok.eos_token_id) if tok.eos_token_id in o else len(o)]).strip()
                for o in outs]

    model.generation_config.repetition_penalty = 5.0
    try:
        penalised = generated()
        got = generate_answers(model, tok, records, max_new_tokens=12)
    finally:
        model.generation_config.repetition_penalty = 1.0
    plain = generated(repetition_penalty=1.0)
    assert penalised != plain  # the config's penalty changes these answers
    assert got == plain


def _linear_dtypes(model, run) -> set:
    """The dtypes the model's linear layers computed in while `run()` ran."""
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_compute_dtype_bf16_runs_the_matmuls_in_bf16(trained):
    model, tok = trained
    assert _linear_dtypes(model, lambda: generate_answers(model, tok, SAY)) == {torch.float32}
    with compute_dtype(model, "fp32"):
        assert _linear_dtypes(model, lambda: generate_answers(model, tok, SAY)) == {torch.float32}
    with compute_dtype(model, "bf16"):
        answers: list = []
        assert _linear_dtypes(model, lambda: answers.extend(generate_answers(model, tok, SAY))) == {torch.bfloat16}
        ev = evaluate_task(model, tok, SAY, labels=LABELS)
    assert answers == ["A", "B"]  # a confident model answers the same in bf16
    assert ev.label_accuracy == 1.0
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the weights are not cast
    assert _linear_dtypes(model, lambda: generate_answers(model, tok, SAY)) == {torch.float32}  # and it ends with the block
    with pytest.raises(ValueError, match="fp32 or bf16"):
        with compute_dtype(model, "fp16"):
            pass


def test_evaluate_tasks_follows_eval_compute_dtype(trained):
    from edgekif.config import Config
    from edgekif.continual import evaluate_tasks

    model, tok = trained
    cfg = Config()
    cfg.eval.compute_dtype = "bf16"
    out: dict = {}
    assert _linear_dtypes(model, lambda: out.update(evaluate_tasks(cfg, model, tok, {"say": SAY}, {"say": LABELS}))) == {torch.bfloat16}
    assert out["say"].exact_match == 1.0


def test_max_examples_and_label_scoring_off(trained):
    model, tok = trained
    ev = evaluate_task(model, tok, SAY * 5, labels=LABELS, max_examples=3, label_scoring=False)
    assert ev.n == 3
    assert ev.label_accuracy is None
    assert ev.predictions == ["A", "B", "A"]
    assert evaluate_task(model, tok, SAY).label_accuracy is None  # no label set given


def test_empty_task_is_not_a_zero_score(trained):
    model, tok = trained
    ev = evaluate_task(model, tok, [], labels=LABELS)
    assert ev.n == 0 and math.isnan(ev.exact_match)
    d = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert d["exact_match"] is None and d["n"] == 0


def test_taskeval_score_prefers_label_accuracy():
    assert EvalScores(n=4, exact_match=0.25, label_accuracy=0.75).score == 0.75
    assert EvalScores(n=4, exact_match=0.25, label_accuracy=None).score == 0.25


# --------------------------------------------------------------------------- label scoring


def test_label_scores_pick_trained_label(trained):
    model, tok = trained
    assert label_scores(model, tok, SAY, LABELS) == ["A", "B"]
    assert label_scores(model, tok, SAY[::-1], ["C", "B", "A"], batch_size=3) == ["B", "A"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_label_logprobs_equal_full_sequence_scoring(opinionated, attention):
    """The packed label pass (every label in one row a record, a 4-D mask; sdpa takes it as
    booleans, eager as additive floats) gives the numbers of scoring prompt+label in full."""
    model, tok = opinionated
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    records = [Record.from_prompt("p" * n + " topic?", "x") for n in (2, 25, 7)]
    labels = ["A", "Bravo", "Charlie delta"]  # different token lengths
    fast = label_logprobs(model, tok, records, labels, batch_size=2)  # two batches, the first left padded
    with torch.no_grad():
        for r, row in zip(records, fast):
            prompt = encode_prompt(tok, r)
            for lab, got in zip(labels, row):
                target = encode_target(tok, Record.from_prompt("", lab))
                logits = model(torch.tensor([prompt + target])).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(target))
                assert got == pytest.approx(want, abs=1e-3)
    assert len({round(s, 3) for row in fast for s in row}) > 3  # scores actually differ


def test_cache_rows_copies_the_rows_and_leaves_the_cache_as_it_was(tiny):
    from edgekif.evaluate import _cache_rows

    model, tok = tiny
    ids = torch.randint(5, 100, (4, 7))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    rows = _cache_rows(cache, torch.tensor([1, 3]))
    for layer, sub, (k, v) in zip(cache.layers, rows.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)  # untouched
        assert torch.equal(sub.keys, k[[1, 3]]) and torch.equal(sub.values, v[[1, 3]])
        sub.keys.zero_()  # a copy, not a view of the source
        assert torch.equal(layer.keys, k)


def test_a_label_pass_over_its_position_budget_is_scored_in_chunks_with_the_same_scores(opinionated, monkeypatch):
    """Many labels (a task may have 50) would make one pass's logits records x label tokens
    vocabulary rows: past LABEL_PASS_POSITIONS the rows go in chunks, each on a copy of its
    rows' cache, with the scores of one pass."""
    import edgekif.evaluate as ev

    model, tok = opinionated
    records = [Record.from_prompt("p" * n + " topic?", "x") for n in (2, 25, 7, 13, 40)]
    labels = ["A", "Bravo", "Charlie delta"]
    whole = answers_and_label_logprobs(model, tok, records, labels, max_new_tokens=4, batch_size=8)
    calls = []
    rows_pass = ev._label_totals_rows
    monkeypatch.setattr(ev, "_label_totals_rows", lambda model, logits, *a: calls.append(len(logits)) or rows_pass(model, logits, *a))
    width = len(ev._pack_labels(tok, records[0], labels, "cpu").fed)
    monkeypatch.setattr(ev, "LABEL_PASS_POSITIONS", 2 * width)  # two records a pass
    chunked = answers_and_label_logprobs(model, tok, records, labels, max_new_tokens=4, batch_size=8)
    assert calls == [2, 2, 1]
    assert chunked[0] == whole[0]
    for got, want in zip(chunked[1], whole[1]):
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("batch_size", [3, 16])
def test_one_pass_equals_generate_then_label_scores(opinionated, batch_size):
    """The shared-prefix pass gives the answers of generate_answers and the scores of
    label_logprobs, whatever the batching (3: several batches; 16: one)."""
    model, tok = opinionated
    records = [Record.from_prompt("p" * n + " topic?", "x") for n in (2, 25, 7, 13, 40)]
    labels = ["A", "Bravo", "Charlie delta"]
    answers, scores = answers_and_label_logprobs(model, tok, records, labels, max_new_tokens=6, batch_size=batch_size)
    assert answers == generate_answers(model, tok, records, max_new_tokens=6, batch_size=batch_size)
    assert len(set(answers)) > 1 and all(answers)  # real, differing text
    want = label_logprobs(model, tok, records, labels, batch_size=batch_size)
    for got_row, want_row in zip(scores, want):
        assert got_row == pytest.approx(want_row, abs=1e-3)
    assert len({round(x, 3) for row in scores for x in row}) > 3


def _tokens_read(model, run) -> int:
    """How many input tokens the model's embedding looked up while `run()` ran."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].numel()))
    try:
        run()
    finally:
        hook.remove()
    return sum(seen)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_a_shared_instruction_is_read_once_with_the_same_answers_and_scores(opinionated, monkeypatch, batch_size):
    """Prompts that start alike (a task's instruction) read that prefix once per batch and
    continue its KV cache, each row left padded after it: the answers and label scores of the
    plain left-padded batches, which read every prompt whole."""
    import edgekif.evaluate as ev

    model, tok = opinionated
    instruction = "Which topic is this? Options: sport, business, science or world.\n"
    records = [Record(id=f"r{n}", messages=(("user", instruction + "w" * n + " news"),), output="x") for n in (1, 12, 5, 30, 8)]
    labels = ["A", "Bravo", "Charlie delta"]

    def run():
        return (generate_answers(model, tok, records, max_new_tokens=6, batch_size=batch_size),
                label_logprobs(model, tok, records, labels, batch_size=batch_size),
                answers_and_label_logprobs(model, tok, records, labels, max_new_tokens=6, batch_size=batch_size))

    shared_read = _tokens_read(model, run)
    (answers, scores, (one_answers, one_scores)) = run()
    monkeypatch.setattr(ev, "MIN_SHARED_PREFIX", 10**6)
    plain_read = _tokens_read(model, run)
    (plain_answers, plain_scores, _) = run()
    assert shared_read < plain_read  # the prefix was read once a batch, not once a row
    assert answers == plain_answers == one_answers
    assert len(set(answers)) > 1 and all(answers)
    for got, alt, want in zip(scores, one_scores, plain_scores):
        assert got == pytest.approx(want, abs=1e-4) and alt == pytest.approx(want, abs=1e-4)
    assert len({round(x, 3) for row in scores for x in row}) > 3


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    from edgekif.inputs import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token
    assert shared_prefix_length([[5, 6], [5, 6]]) == 1 and shared_prefix_length([[1], [2]]) == 0


def test_packed_labels_know_how_far_the_longest_label_reaches(tiny):
    """A label pass reaches as far past the prompt as its longest label (text + eos), not as
    far as all labels together: that is what a sliding window has to hold."""
    from edgekif.evaluate import _pack_labels

    _model, tok = tiny
    labels = ["A", "Bravo", "Charlie delta"]
    lengths = [len(encode_target(tok, Record.from_prompt("", lab))) for lab in labels]
    packed = _pack_labels(tok, Record.from_prompt("q", "x"), labels, "cpu")
    assert packed.longest == max(lengths) < len(packed.fed)


def test_a_sliding_window_the_batch_could_outgrow_keeps_plain_left_padding(opinionated):
    """A sliding window counts cache positions, padding included: a batch that could reach it
    is left padded whole, with no prefix cached."""
    from edgekif.evaluate import _prompt_batch

    model, tok = opinionated
    seqs = [[5] * 20 + [6, 7], [5] * 20 + [8]]
    assert _prompt_batch(model, seqs, 0, "cpu", extra=4).shared == 20
    model.config.sliding_window = 24
    try:
        batch = _prompt_batch(model, seqs, 0, "cpu", extra=4)
        assert batch.shared == 0 and batch.cache is None and batch.mask[1].tolist() == [0] + [1] * 21
        assert _prompt_batch(model, seqs, 0, "cpu", extra=1).shared == 20  # 22 + 1 stays inside 24
    finally:
        model.config.sliding_window = None


def test_evaluate_task_label_accuracy_from_the_one_pass(trained):
    model, tok = trained
    ev = evaluate_task(model, tok, SAY * 3, labels=LABELS, max_new_tokens=4)
    assert ev.predictions == ["A", "B"] * 3
    assert ev.exact_match == 1.0 and ev.label_accuracy == 1.0
    wrong = [dataclasses.replace(r, output="B" if r.output == "A" else "A") for r in SAY]
    ev = evaluate_task(model, tok, wrong, labels=LABELS, max_new_tokens=4)
    assert ev.exact_match == 0.0 and ev.label_accuracy == 0.0


# --------------------------------------------------------------------------- peft / nf4


def test_peft_lora_model(trained):
    torch.manual_seed(0)
    base, tok = tiny_llama()
    peft_model = add_lora(base, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]))
    # LoRA cannot move the tiny model's final norm, so its loss plateaus high; the argmax still learns.
    train_to_answer(peft_model, tok, SAY, lr=3e-3, max_steps=80)
    assert peft_model.training
    assert generate_answers(peft_model, tok, SAY) == ["A", "B"]
    assert label_scores(peft_model, tok, SAY, LABELS) == ["A", "B"]
    assert peft_model.training  # mode restored
    with peft_model.disable_adapter():  # the answers come from the adapter, not the base
        assert generate_answers(peft_model, tok, SAY) != ["A", "B"]


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes 4-bit does not work on this host")
def test_nf4_model(trained, tmp_path):
    model, tok = trained
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    q = load_model(tmp_path, "nf4")
    assert "4bit" in type(q.model.layers[0].self_attn.q_proj).__name__
    assert generate_answers(q, tok, SAY) == ["A", "B"]
    assert label_scores(q, tok, SAY, LABELS) == ["A", "B"]


def test_max_prompt_tokens_fits_prompts_as_training_does(opinionated, monkeypatch):
    """Evaluation can fit prompts as training does (bench_cl uses the training max_length).
    Issue 11 changed the rule from a left cut to inputs.fit_prompt (middle cut); so did this test."""
    model, tok = opinionated
    records = [Record.from_prompt("q" * n + " what?", "x") for n in (30, 2, 55)]
    full = [encode_prompt(tok, r) for r in records]
    assert min(len(p) for p in full) < 32 < max(len(p) for p in full)  # one is cut, one is not
    fitted = [fit_prompt(tok, r, 32) for r in records]
    assert fitted == [encode_prompt(tok, r, 32) for r in records] and all(len(p) <= 32 for p in fitted)
    for r, p in zip(records, fitted):  # training's prompt for an answer of 0 tokens: the same function
        assert encode_example(tok, dataclasses.replace(r, output=""), 33).input_ids[:-1] == p

    seen: list[list[int]] = []
    real_greedy = evaluate_module._greedy

    def spy(model, tokenizer, ids, mask, *args, **kw):  # the prompts a batch answers, as laid out
        for row, keep in zip(ids.tolist(), mask.tolist()):
            seen.append([t for t, m in zip(row, keep) if m])
        return real_greedy(model, tokenizer, ids, mask, *args, **kw)

    monkeypatch.setattr(evaluate_module, "_greedy", spy)
    cut = generate_answers(model, tok, records, max_prompt_tokens=32)
    assert sorted(seen) == sorted(fitted)
    seen.clear()
    whole = generate_answers(model, tok, records)
    assert sorted(seen) == sorted(full)  # 0 = whole prompts
    monkeypatch.undo()
    assert cut != whole  # the cut prompts really change what the model sees

    prompts_scored: list[list[int]] = []

    def hook(_mod, _args, kwargs):
        if kwargs.get("past_key_values") is None:  # the prompt pass, not the label pass
            for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()):
                prompts_scored.append([t for t, m in zip(ids, mask) if m])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        label_scores(model, tok, records, ["x", "y"], max_prompt_tokens=32)
    finally:
        handle.remove()
    assert sorted(prompts_scored) == sorted(fitted)


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    import builtins
    import io

    from edgekif.compute import fast_bf16

    real_open = builtins.open
    for flags, want in (("fpu avx512f avx512_bf16 avx2", True), ("fpu avx512f avx2", False), ("fp asimd bf16 i8mm", True), ("amx_bf16 amx_tile", True)):
        monkeypatch.setattr(builtins, "open", lambda path, *a, _f=flags, **k: io.StringIO(f"flags\t\t: {_f}\n") if path == "/proc/cpuinfo" else real_open(path, *a, **k))
        assert fast_bf16("cpu") is want, flags
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (_ for _ in ()).throw(OSError("no /proc")) if path == "/proc/cpuinfo" else real_open(path, *a, **k))
    assert fast_bf16("cpu") is False
