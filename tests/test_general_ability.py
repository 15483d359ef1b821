"""The general-ability gate (edgekif.general_ability): the shipped prompt set, drift figures
against hand-computed values, the cache of the base's answers, and on the tiny Llama that a
perturbed model finds the base's answers less likely and is held."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from edgekif.general_ability import (
    CATEGORIES,
    ROLES,
    DriftFigures,
    GeneralAbilityConfig,
    GeneralPrompt,
    base_answer_loglik,
    base_answers,
    cache_path,
    cached_base_answers,
    drift,
    drifted,
    load_prompts,
    parse_prompts,
    prompts_sha256,
)

REPO = Path(__file__).resolve().parents[1]


class FakeRunner:
    """edgekif.infer's runner interface: answers from a function of the last user message."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[list[dict[str, str]], int]] = []

    def generate(self, messages, max_new_tokens=64):
        self.calls.append((messages, max_new_tokens))
        return self.answer(messages[-1]["content"])


def _prompt(pid: str, category: str, text: str) -> GeneralPrompt:
    return GeneralPrompt(pid, category, (("user", text),))


# --------------------------------------------------------------------------- the prompt set


def test_the_shipped_prompts_are_valid_and_varied():
    prompts = load_prompts()
    assert len(prompts) >= 60
    assert len({p.id for p in prompts}) == len(prompts)
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert all(n >= 5 for n in counts.values()), counts  # every kind of prompt, several of each
    for p in prompts:
        roles = [r for r, _ in p.messages]
        assert set(roles) <= set(ROLES) and roles[-1] == "user", p.id
        assert all(c.strip() for _, c in p.messages), p.id
    multi = [p for p in prompts if p.category == "multi_turn"]
    assert all([r for r, _ in p.messages] == ["user", "assistant", "user"] for p in multi)
    assert len(prompts_sha256(prompts)) == 64 and prompts_sha256(prompts) == prompts_sha256(load_prompts())


def test_the_prompts_ship_in_the_wheel():
    """importlib.resources reads the file from the installed package: setuptools must put it
    there (package-data), or an installed daemon finds no prompts."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in ("general_prompts.jsonl", "rehearsal_prompts.jsonl"):  # the gate's, and general rehearsal's
        assert name in data["edgekif"]
        assert (REPO / "edgekif" / name).is_file()


def test_a_built_wheel_holds_the_prompts(tmp_path):
    """Build the wheel (no isolation, no dependencies: ~5 s) from a copy of the sources, so
    the checkout gets no build/ folder, and look for the prompt file in it."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("edgekif", "service"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("edgekif-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in ("general_prompts.jsonl", "rehearsal_prompts.jsonl"):
            assert zf.read(f"edgekif/{name}").decode() == (REPO / "edgekif" / name).read_text()


@pytest.mark.parametrize("line,error", [
    ('{"id": "a", "category": "poetry", "messages": [{"role": "user", "content": "x"}]}', "category"),
    ('{"id": "a", "category": "list", "messages": [{"role": "bot", "content": "x"}]}', "role"),
    ('{"id": "a", "category": "list", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', "end with the user"),
    ('{"id": "a", "category": "list", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "alternate"),
    ('{"id": "", "category": "list", "messages": [{"role": "user", "content": "x"}]}', "id"),
    ("not json", "not JSON"),
])
def test_invalid_prompt_lines_are_refused(line, error):
    with pytest.raises(ValueError, match=error):
        parse_prompts(line)


def test_duplicate_ids_are_refused():
    line = '{"id": "a", "category": "list", "messages": [{"role": "user", "content": "x"}]}'
    with pytest.raises(ValueError, match="duplicate ids \\['a'\\]"):
        parse_prompts(line + "\n" + line)


# --------------------------------------------------------------------------- figures and gate


def test_identical_answers_have_not_drifted():
    prompts = load_prompts()
    base = FakeRunner(lambda text: f"An answer to: {text}")
    answers = base_answers(base, prompts, 16)
    assert [c[1] for c in base.calls] == [16] * len(prompts)
    figures = drift(answers, answers, prompts)
    assert figures.rouge_l == 1.0 and figures.identical == 1.0 and figures.n == len(prompts)
    assert figures.per_category == {c: 1.0 for c in sorted(CATEGORIES)}
    held, reason = drifted(figures, GeneralAbilityConfig())
    assert not held
    assert reason == f"general ability: answers ROUGE-L 1.00 vs the base's own (>= 0.20), 100% identical over {len(prompts)} prompts"


def test_identical_answers_without_words_count_as_identical():
    # rouge-score gives 0 to a pair with no words; an unchanged answer has not drifted.
    figures = drift(["", "?!", "x<|im_end|>"], ["", "?!", "x"])
    assert figures.rouge_l == 1.0 and figures.identical == 1.0


def test_drift_figures_by_hand():
    prompts = [_prompt("a", "factual", "q1"), _prompt("b", "list", "q2"), _prompt("c", "list", "q3")]
    base = ["the cat sat on the mat", "the cat sat on the mat", "blue"]
    cand = ["the cat sat on the mat", "the dog sat", "forty two"]
    figures = drift(cand, base, prompts)
    # "the dog sat" vs "the cat sat on the mat": LCS "the sat" = 2 words; P = 2/3, R = 2/6,
    # F1 = 2PR / (P + R) = 4/9. The third pair shares no word: 0.
    assert figures.per_category == pytest.approx({"factual": 1.0, "list": (4 / 9 + 0) / 2})
    assert figures.rouge_l == pytest.approx((1 + 4 / 9 + 0) / 3)  # 13/27 = 0.481
    assert figures.identical == pytest.approx(1 / 3)
    held, reason = drifted(figures, GeneralAbilityConfig(min_rouge_l=0.5))
    assert held
    assert reason == "general ability: answers ROUGE-L 0.48 vs the base's own (needs >= 0.50) over 3 prompts"
    assert not drifted(figures, GeneralAbilityConfig(min_rouge_l=0.4))[0]


def test_unrelated_answers_are_held_with_the_figure():
    prompts = load_prompts()
    base = base_answers(FakeRunner(lambda text: f"Here is my answer about {text}"), prompts, 48)
    cand = base_answers(FakeRunner(lambda text: "Banana."), prompts, 48)
    figures = drift(cand, base, prompts)
    assert figures.identical == 0.0 and figures.rouge_l < 0.05
    held, reason = drifted(figures, GeneralAbilityConfig())
    assert held and f"ROUGE-L {figures.rouge_l:.2f} vs the base's own (needs >= 0.20) over {len(prompts)} prompts" in reason
    assert json.loads(json.dumps(figures.to_dict()))["rouge_l"] == pytest.approx(figures.rouge_l)
    # a pretrained base (no chat template of its own) has no answers to protect: recorded, not gated
    held, reason = drifted(figures, GeneralAbilityConfig(), instruct_base=False)
    assert not held and reason.startswith("general ability: not gated, the base is not an instruction-following model")
    assert f"ROUGE-L {figures.rouge_l:.2f}" in reason


def test_a_base_has_its_own_template_only_when_its_folder_ships_one(tmp_path):
    from edgekif.chat_templates import has_own_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert not has_own_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert has_own_template(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert has_own_template(tmp_path) and not has_own_template(tmp_path / "missing")


def test_the_loglik_bound_holds_and_an_empty_set_is_not_measured():
    figures = DriftFigures(n=5, rouge_l=0.9, identical=0.6, loglik_base=-1.20, loglik_candidate=-2.31)
    assert figures.loglik_drop == pytest.approx(1.11)
    held, reason = drifted(figures, GeneralAbilityConfig(max_loglik_drop=0.5))
    assert held and reason == ("general ability: mean log-likelihood of the base's answers -2.31 per token vs the base's -1.20 "
                               "(drop 1.11, allowed <= 0.50) over 5 prompts")
    assert not drifted(figures, GeneralAbilityConfig(max_loglik_drop=0))[0]
    assert not drifted(figures, GeneralAbilityConfig(max_loglik_drop=1.2))[0]
    assert drifted(drift([], []), GeneralAbilityConfig()) == (False, "general ability: not measured (no prompts)")
    with pytest.raises(ValueError, match="min_rouge_l"):
        GeneralAbilityConfig(min_rouge_l=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GeneralAbilityConfig(max_new_tokens=0)


# --------------------------------------------------------------------------- the cache


def test_the_base_answers_are_computed_once_and_reused(tmp_path):
    prompts = load_prompts()
    opened: list[FakeRunner] = []

    def open_runner():
        opened.append(FakeRunner(lambda text: f"base says {len(text)}"))
        return opened[-1]

    first = cached_base_answers(tmp_path, "smollm2-135m/genai-int4", prompts, 48, open_runner)
    path = cache_path(tmp_path, "smollm2-135m/genai-int4", prompts, 48)
    data = json.loads(path.read_text())
    assert data["prompts_sha256"] == prompts_sha256(prompts) and data["max_new_tokens"] == 48
    assert data["answers"][prompts[0].id] == first[0] and len(opened) == 1
    assert cached_base_answers(tmp_path, "smollm2-135m/genai-int4", prompts, 48, open_runner) == first
    assert len(opened) == 1  # reused: the base was not opened again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write left no temp file

    # Another budget, base/setting or prompt set is another entry.
    cached_base_answers(tmp_path, "smollm2-135m/genai-int4", prompts, 32, open_runner)
    cached_base_answers(tmp_path, "smollm2-135m/onnx-fp32", prompts, 48, open_runner)
    cached_base_answers(tmp_path, "smollm2-135m/genai-int4", prompts[:10], 48, open_runner)
    assert len(opened) == 4 and len(list(tmp_path.iterdir())) == 4

    path.write_text("{torn")  # an unreadable entry is recomputed, not trusted
    assert cached_base_answers(tmp_path, "smollm2-135m/genai-int4", prompts, 48, open_runner) == first
    assert len(opened) == 5 and json.loads(path.read_text())["answers"] == data["answers"]


def test_the_base_loglik_is_kept_beside_its_answers_and_computed_once(tmp_path):
    from edgekif.general_ability import cached_base_loglik

    prompts = load_prompts()
    calls: list[int] = []

    def compute():
        calls.append(1)
        return -1.25

    # no cached answers yet: computed, nothing written
    assert cached_base_loglik(tmp_path, "b/genai-int8", prompts, 32, compute) == -1.25 and not list(tmp_path.iterdir())
    answers = cached_base_answers(tmp_path, "b/genai-int8", prompts, 32, lambda: FakeRunner(lambda text: "ok"))
    assert cached_base_loglik(tmp_path, "b/genai-int8", prompts, 32, compute) == -1.25
    assert cached_base_loglik(tmp_path, "b/genai-int8", prompts, 32, compute) == -1.25
    assert len(calls) == 2  # once before the answers were cached, once after: then reused
    data = json.loads(cache_path(tmp_path, "b/genai-int8", prompts, 32).read_text())
    assert data["loglik_base"] == -1.25 and list(data["answers"].values()) == answers
    # a nan is not kept: the next job computes it again
    cached_base_answers(tmp_path, "b/other", prompts, 32, lambda: FakeRunner(lambda text: "ok"))
    assert math.isnan(cached_base_loglik(tmp_path, "b/other", prompts, 32, lambda: float("nan")))
    assert "loglik_base" not in json.loads(cache_path(tmp_path, "b/other", prompts, 32).read_text())


# --------------------------------------------------------------------------- PyTorch


class TorchRunner:
    """Greedy answers of a PyTorch model, encoded as edgekif.inputs encodes prompts."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, messages, max_new_tokens=64):
        import torch

        from edgekif.inputs import render_prompt

        ids = torch.tensor([render_prompt(self.tokenizer, messages)])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# Answers the tiny base is taught for a few steps, so that it has answers of its own: an
# untrained random Llama answers every prompt with the same run of newlines. Short ones: the
# byte-level tiny model learns a few bytes in a few seeded steps (its answers need not be these).
TAUGHT = {"factual-02": "Mercury.", "factual-03": "366.", "factual-08": "Au.", "multi_turn-04": "24."}


def _taught_tiny_llama(steps: int = 60):
    """The tiny Llama after a few seeded full-batch steps on TAUGHT (a 'base' with answers).
    lr 3e-3: it learns the four answers exactly for every seed tried (0-2, 60 or 100 steps); at
    3e-2 (before 2026-12-04) what it learned in 40 steps changed with the installed packages'
    numerics (base log-likelihood -0.37 one week, -1.38 the next)."""
    import torch

    from edgekif.inputs import collate, encode_example
    from edgekif.records import Record
    from tiny_models import tiny_llama

    model, tok = tiny_llama(seed=0)
    prompts = [p for p in load_prompts() if p.id in TAUGHT]
    batch = collate([encode_example(tok, Record(messages=p.messages, output=TAUGHT[p.id]), 256) for p in prompts], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return model, tok, prompts


def test_a_perturbed_tiny_llama_finds_the_base_answers_less_likely_and_is_held():
    import copy

    import torch

    base_model, tok, prompts = _taught_tiny_llama()
    answers = base_answers(TorchRunner(base_model, tok), prompts, 8)
    assert answers == [TAUGHT[p.id] for p in prompts], answers  # the 'base' knows its answers
    base_ll = base_answer_loglik(base_model, tok, prompts, answers)

    drifted_model = copy.deepcopy(base_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training" that moved every weight: seeded noise as large as each tensor's spread
        for p in drifted_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std())
    cand_ll = base_answer_loglik(drifted_model, tok, prompts, answers, batch_size=3)  # batching does not change the figure
    same_ll = base_answer_loglik(copy.deepcopy(base_model), tok, prompts, answers, batch_size=3)
    cand_answers = base_answers(TorchRunner(drifted_model, tok), prompts, 8)
    figures = drift(cand_answers, answers, prompts, loglik_base=base_ll, loglik_candidate=cand_ll)
    print(f"base {base_ll:.3f} perturbed {cand_ll:.3f} rouge {figures.rouge_l:.3f}", answers, cand_answers)

    assert same_ll == pytest.approx(base_ll, abs=1e-4)  # the same weights give the same figure, batched or not
    # Observed (torch 2.13, CPU): base -0.035 nats per token, perturbed -1.28, answers ROUGE-L 0.0.
    assert -1.0 < base_ll < 0 and cand_ll < base_ll - 0.5
    assert drifted(figures, GeneralAbilityConfig())[0]  # its answers moved too: held by ROUGE-L as well
    config = GeneralAbilityConfig(min_rouge_l=0.0, max_loglik_drop=0.25)  # the log-likelihood bound decides here
    held, reason = drifted(figures, config)
    assert held and f"{cand_ll:.2f} per token vs the base's {base_ll:.2f}" in reason
    itself = drift(answers, answers, prompts, loglik_base=base_ll, loglik_candidate=same_ll)
    assert drifted(itself, config)[0] is False


def test_gate_note_says_how_a_versions_drift_was_judged():
    """What `models show` and the demo print beside the figures: the bounds a held or passed
    version was judged against, or that a pretrained base's drift was not judged at all."""
    from edgekif.general_ability import gate_note

    bounds = {"min_rouge_l": 0.2, "max_loglik_drop": 0.5}
    assert gate_note({**bounds, "held": True, "instruct_base": True}) == ("HELD", "held if ROUGE-L < 0.2 or the drop > 0.5")
    assert gate_note({**bounds, "held": False}) == ("ok", "held if ROUGE-L < 0.2 or the drop > 0.5")  # manifests before instruct_base
    assert gate_note({**bounds, "held": False, "instruct_base": False})[0] == "not gated"


def test_the_loglik_is_the_mean_over_every_answer_token_scored_in_full():
    """base_answer_loglik batches by length and computes the head only from a batch's first
    answer position: the mean over all answer tokens (eos included) of scoring each
    prompt + answer alone in one full pass."""
    import torch

    from edgekif.inputs import encode_example
    from edgekif.records import Record
    from tiny_models import opinionated_llama

    model, tok = opinionated_llama(seed=3)
    prompts = [GeneralPrompt(f"p{n}", "test", (("user", "q" * n + "?"),)) for n in (30, 2, 11, 5, 19)]
    answers = ["a", "a longer answer here", "", "mid answer", "xyz"]
    logps = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            enc = encode_example(tok, Record(messages=p.messages, output=a, id=p.id), 1024)
            logp = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0].float(), -1)
            logps += [logp[t - 1, label].item() for t, label in enumerate(enc.labels) if label >= 0]
    want = sum(logps) / len(logps)
    for batch_size in (1, 2, 8):
        assert base_answer_loglik(model, tok, prompts, answers, batch_size=batch_size) == pytest.approx(want, abs=1e-5)
    assert len(logps) > len(prompts) and len({round(x, 2) for x in logps}) > 3


def test_a_non_finite_log_likelihood_holds_the_version():
    from edgekif.general_ability import DriftFigures, GeneralAbilityConfig, drifted

    figures = DriftFigures(n=63, rouge_l=0.5, identical=0.1, loglik_base=-1.1, loglik_candidate=float("nan"))
    held, reason = drifted(figures, GeneralAbilityConfig())
    assert held and "not a number" in reason
