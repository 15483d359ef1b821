"""Every base family the onnxruntime-genai builder supports and transformers builds in-process
(Llama, Qwen2, Gemma 3) goes through train -> fuse -> genai export -> the answer check; bases
without a chat template get one (model.chat_template, edgekif.chat_templates), the same in
training and in every export.

Each family is a tiny random model (hidden 64, 2 layers) with the tests' byte-level tokenizer;
Qwen2 and Gemma 3 have their template stripped, so the family defaults (ChatML, Gemma's turn
format) are what training and the export use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgekif.chat_templates import CHATML_TEMPLATE, GEMMA_TEMPLATE, configured_template, family_default
from edgekif.config import ALL_LINEAR, LoRAConfig, load_config
from edgekif.errors import ConfigError, ExportError
from edgekif.export.genai_builder import flat_rope_config
from edgekif.model import add_lora, load_model, load_tokenizer
from edgekif.records import Record

PROMPTS = ["Hello there", "What is 2+2?", "Classify: a great movie", "Name a colour."]
USER = [{"role": "user", "content": "hi"}]
LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=list(ALL_LINEAR))  # the default placement


# --------------------------------------------------------------------------- builder config


GEMMA3_NESTED = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "sliding_window": 512,
}


def test_gemma3_nested_rope_is_flattened_for_the_builder():
    flat = flat_rope_config(GEMMA3_NESTED)
    assert flat["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
    assert flat["rope_theta"] == 1000000.0 and flat["rope_local_base_freq"] == 10000.0
    assert {k: v for k, v in flat.items() if k not in ("rope_parameters", "rope_theta", "rope_local_base_freq")} == {
        k: v for k, v in GEMMA3_NESTED.items() if k != "rope_parameters"}
    assert GEMMA3_NESTED["rope_parameters"]["full_attention"] == {"rope_theta": 1000000.0, "rope_type": "default"}  # not mutated


def test_flat_configs_are_untouched():
    from transformers import LlamaConfig, Qwen2Config

    for config in (LlamaConfig().to_dict(), Qwen2Config().to_dict(), {"model_type": "llama", "rope_scaling": None}):
        assert flat_rope_config(config) == config
    linear = dict(GEMMA3_NESTED, rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6})
    assert flat_rope_config(linear) == linear


def test_rope_the_builder_cannot_express_is_an_export_error():
    scaled_local = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(ExportError, match="sliding_attention"):
        flat_rope_config(dict(GEMMA3_NESTED, rope_parameters=scaled_local))
    with pytest.raises(ExportError, match="chunked"):
        flat_rope_config(dict(GEMMA3_NESTED, rope_parameters={"full_attention": {"rope_theta": 1e6}, "chunked": {"rope_theta": 1.0}}))


def test_a_transformers_config_object_is_normalised_in_place():
    from transformers import Gemma3TextConfig

    from edgekif.export.genai_builder import normalise_hf_config

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, head_dim=16)
    assert sorted(normalise_hf_config(config)) == ["rope_local_base_freq", "rope_parameters", "rope_theta"]
    assert config.rope_parameters["rope_type"] == "default" and config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4


# --------------------------------------------------------------------------- chat template setting


def _render(template: str, messages=USER, gen=True) -> str:
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer().apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=False)


def test_gemma_template_renders_gemmas_turns():
    assert _render(GEMMA_TEMPLATE) == "<|im_start|><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"  # bos is the tokenizer's
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}]
    assert _render(GEMMA_TEMPLATE, chat, gen=False) == (
        "<|im_start|><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n")


def test_the_setting_names_a_template_or_a_jinja_file(tmp_path):
    assert configured_template("") is None and configured_template("  ") is None
    assert configured_template("chatml") == CHATML_TEMPLATE and configured_template("gemma") == GEMMA_TEMPLATE
    own = tmp_path / "mine.jinja"
    own.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert configured_template(str(own)) == own.read_text()
    for bad in ("llama3", str(tmp_path / "missing.jinja"), str(tmp_path / "x.txt")):
        with pytest.raises(ConfigError, match="model.chat_template"):
            configured_template(bad)
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_config(None, ["model.chat_template=nope"])
    assert load_config(None, ["model.chat_template=gemma"]).model.chat_template == "gemma"


def _saved_base(folder: Path, family: str, *, template: bool) -> Path:
    model, tok = tiny_family(family)
    if not template:
        tok.chat_template = None
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_load_tokenizer_gives_a_base_without_template_its_familys(tmp_path):
    from tiny_models import TINY_CHAT_TEMPLATE

    gemma = _saved_base(tmp_path / "gemma", "gemma3", template=False)
    qwen = _saved_base(tmp_path / "qwen", "qwen2", template=False)
    llama = _saved_base(tmp_path / "llama", "llama", template=True)
    assert family_default(gemma) == "gemma" and family_default(qwen) == "chatml"
    assert load_tokenizer(gemma).chat_template == GEMMA_TEMPLATE
    assert load_tokenizer(qwen).chat_template == CHATML_TEMPLATE
    assert load_tokenizer(llama).chat_template == TINY_CHAT_TEMPLATE  # a base's own template is kept
    # a configured template replaces the base's own
    assert load_tokenizer(llama, chat_template="gemma").chat_template == GEMMA_TEMPLATE
    assert load_tokenizer(gemma, chat_template="chatml").chat_template == CHATML_TEMPLATE


# --------------------------------------------------------------------------- families end to end


def tiny_family(family: str, seed: int = 0):
    """A tiny random model of `family` and the tests' byte-level tokenizer (Gemma's turn markers
    added as special tokens, as Gemma's own tokenizer has them)."""
    import transformers
    from tiny_models import tiny_llama, tiny_tokenizer

    if family == "llama":
        return tiny_llama(seed=seed)
    tok = tiny_tokenizer()
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=True, use_cache=False)
    if family == "gemma3":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        # one sliding and one full-attention layer, so both RoPE caches (local, global) are used;
        # a window longer than prompt + answer, as real Gemma's 512, so the runner must size the cache for it
        cfg = transformers.Gemma3TextConfig(head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"], **size)
        cls = transformers.Gemma3ForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**size), transformers.Qwen2ForCausalLM
    else:
        raise ValueError(family)
    cfg.vocab_size = len(tok)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model.eval(), tok


def _train(base: Path, steps: int = 10):
    """A few LoRA steps on examples encoded as training encodes them (edgekif.inputs), with the
    tokenizer training loads (edgekif.model.load_tokenizer). LoRA B starts at zero, so the steps
    are what makes the fused model differ from the base."""
    from edgekif.inputs import collate, encode_example

    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = add_lora(load_model(base, "fp32"), LORA)
    batch = collate([encode_example(tok, Record.from_prompt(p, "yes indeed"), 64) for p in PROMPTS], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.03)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return model.eval(), tok, losses


def _torch_greedy(model, tok, prompt: str, n: int) -> list[int]:
    """The fp32 model's greedy answer on the prompt as training renders it."""
    from edgekif.inputs import render_prompt

    seq = render_prompt(tok, [{"role": "user", "content": prompt}])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


EXPECTED_TURNS = {
    "llama": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # its own (tests' ChatML)
    "qwen2": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # stripped: the ChatML default
    "gemma3": "<|im_start|><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",  # stripped: Gemma's turns
}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def exported(request, tmp_path_factory):
    from edgekif.export.exporter import export_model
    from edgekif.export.fuse import fuse_model

    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = _saved_base(root / "base", family, template=family == "llama")
    peft_model, train_tok, losses = _train(base)
    fused = fuse_model(peft_model, base, root / "fused")
    holdout = {"t": [Record.from_prompt(p, "") for p in PROMPTS]}
    out = export_model(fused, root / "genai", target="genai", precision="fp32", execution_provider="cpu", holdout=holdout, max_new_tokens=6)
    return {"family": family, "base": base, "fused": fused, "export": out, "train_tok": train_tok, "losses": losses}


@pytest.mark.slow
def test_family_trains_fuses_and_exports_with_answers_equal_to_fp32(exported):
    from edgekif.export.manifest import verify_manifest
    from edgekif.infer import GenaiRunner

    assert exported["losses"][-1] < exported["losses"][0]  # the LoRA steps trained
    fused_model, fused_tok = load_model(exported["fused"], "fp32").eval(), load_tokenizer(exported["fused"])
    base_model = load_model(exported["base"], "fp32").eval()
    expected = [_torch_greedy(fused_model, fused_tok, p, 6) for p in PROMPTS]
    assert expected != [_torch_greedy(base_model, fused_tok, p, 6) for p in PROMPTS], "training must change the answers or this proves little"
    assert any(len(ids) >= 2 for ids in expected)

    runner = GenaiRunner(exported["export"])  # loads with onnxruntime_genai
    assert [runner.generate_ids(p, 6) for p in PROMPTS] == expected
    parity = verify_manifest(exported["export"]).to_dict()["parity"]
    assert parity["passed"] is True and parity["agreement"] == 1.0 and parity["n"] == len(PROMPTS)


@pytest.mark.slow
def test_one_template_from_training_to_the_export(exported):
    """Training's tokenizer, the fused folder and the export all carry the same template, and it
    renders the family's turn markers; the export's runner renders the very same prompt tokens."""
    from transformers import AutoTokenizer

    from edgekif.infer import GenaiRunner

    template = exported["train_tok"].chat_template
    export = exported["export"]
    assert load_tokenizer(exported["fused"]).chat_template == template
    assert (export / "chat_template.jinja").read_text(encoding="utf-8") == template
    shipped = AutoTokenizer.from_pretrained(str(export))  # what a client of the folder loads
    assert shipped.apply_chat_template(USER, add_generation_prompt=True, tokenize=False) == EXPECTED_TURNS[exported["family"]]
    runner = GenaiRunner(export)
    from edgekif.inputs import render_prompt

    assert list(runner.tokenizer.encode(runner.chat_text("hi"))) == render_prompt(exported["train_tok"], USER)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_one_pass_evaluation_equals_the_two_calls_in_each_family(family, monkeypatch):
    """generate_and_pick copies and re-slices the prompt's KV cache: each family's cache
    (Gemma 3's sliding-window layers among them, with prompts longer than the window) must give
    the answers of generate_answers and the scores of label_logprobs."""
    import edgekif.evaluate as ev
    from edgekif.evaluate import answers_and_label_logprobs, generate_answers, label_logprobs
    from edgekif.inputs import encode_prompt

    # compare the answer token ids: a random model's bytes are mostly not valid UTF-8, which
    # decoding drops, so the text alone could be equal (and empty) for different tokens
    monkeypatch.setattr(ev, "decode_answer", lambda decode, ids: " ".join(map(str, ids)))

    model, tok = tiny_family(family, seed=1)
    gen = torch.Generator().manual_seed(1)
    scale = 0.02 if family == "gemma3" else 0.3  # (Gemma's scaled embeddings saturate at 0.3)
    with torch.no_grad():  # re-drawn random weights: varied greedy tokens, so equality is not vacuous
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    records = [Record.from_prompt(p, "") for p in [*PROMPTS, "a long story " * 8]]
    assert max(len(encode_prompt(tok, r)) for r in records) > 64  # past Gemma's sliding window
    labels = ["yes", "no", "maybe not"]
    answers, scores = answers_and_label_logprobs(model, tok, records, labels, max_new_tokens=6, batch_size=4)
    assert answers == generate_answers(model, tok, records, max_new_tokens=6, batch_size=4)
    assert len(set(answers)) > 1
    for got, want in zip(scores, label_logprobs(model, tok, records, labels, batch_size=4)):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("positions", [256, 1])
def test_label_scores_equal_scoring_the_whole_sequence_in_each_family(family, positions, monkeypatch):
    """The packed label pass hands the model its own 4-D mask (edgekif.evaluate._label_totals):
    in each family, Gemma 3's sliding-window layers among them with prompts past the window,
    each label's log-likelihood equals the one of prompt + label scored in one forward pass,
    in one pass a batch or a record at a time (positions=1: each on a copy of its cache rows)."""
    import edgekif.evaluate as ev
    from edgekif.evaluate import label_logprobs

    monkeypatch.setattr(ev, "LABEL_PASS_POSITIONS", positions)
    from edgekif.inputs import encode_prompt, encode_target

    model, tok = tiny_family(family, seed=1)
    gen = torch.Generator().manual_seed(2)
    scale = 0.02 if family == "gemma3" else 0.3
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    records = [Record.from_prompt(p, "") for p in ["a long story " * 8, "short", "a longer story " * 7]]
    assert max(len(encode_prompt(tok, r)) for r in records) > 64  # past Gemma's sliding window
    labels = ["yes", "no", "maybe not"]
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        fast = label_logprobs(model, tok, records, labels, batch_size=2)
        with torch.no_grad():
            for r, row in zip(records, fast):
                prompt = encode_prompt(tok, r)
                for lab, got in zip(labels, row):
                    target = encode_target(tok, Record.from_prompt("", lab))
                    logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0].float(), -1)
                    want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(target))
                    assert got == pytest.approx(want, abs=2e-3), (attention, lab)
