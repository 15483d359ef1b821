"""Fuse, export (genai + plain ONNX), the answer check against the fp32 model, manifest, local inference.

One fused tiny model and one export per target are shared by the whole module (the genai
builder alone takes several seconds)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekif.config import LoRAConfig
from edgekif.errors import ConfigError, ExportError, IntegrityError, ParityError
from edgekif.export.build import ExportVariant, resolve_export_settings
from edgekif.export.exporter import export_model
from edgekif.export.fuse import adapter_sha256, fuse_adapter, fuse_model
from edgekif.export.manifest import read_manifest, verify_manifest, write_manifest
from edgekif.model import add_lora, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello there", "What is 2+2?", "Classify: a great movie"]


def _holdout(prompts=PROMPTS, labels=None):
    from edgekif.records import Record

    return {"sentiment": [Record.from_prompt(p, (labels or {}).get(p, "")) for p in prompts]}
LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])


def _random_lora(base_path: Path, seed: int = 1):
    """A PeftModel on the fp32 base whose LoRA B is random (fresh LoRA is a no-op: B = 0)."""
    torch.manual_seed(seed)
    peft_model = add_lora(load_model(base_path, "fp32"), LORA)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return peft_model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _torch_greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "fp32").eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    seq = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        nxt = int(_logits(model, torch.tensor([seq + out]))[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return out


@pytest.fixture(scope="module")
def fused(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    peft_model = _random_lora(tiny_dir)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    out = fuse_adapter(tiny_dir, adapter, root / "fused")
    return {"base": tiny_dir, "adapter": adapter, "fused": out, "peft": peft_model, "root": root}


@pytest.fixture(scope="module")
def manifest_info(fused):
    return {
        "base_model_id": "tiny-llama",
        "base_model_sha256": "ab" * 32,
        "adapter_sha256": adapter_sha256(fused["adapter"]),
        "tasks": [{"id": "t1", "name": "sentiment", "examples": 12}, {"id": "t2", "name": "topic", "examples": 30}],
    }


@pytest.fixture(scope="module")
def genai_fp32(fused, manifest_info):
    return export_model(
        fused["fused"], fused["root"] / "genai-fp32", target="genai", precision="fp32", execution_provider="cpu",
        holdout=_holdout(), manifest_info=manifest_info,
    )


@pytest.fixture(scope="module")
def onnx_fp32(fused, manifest_info):
    return export_model(
        fused["fused"], fused["root"] / "onnx-fp32", target="onnx", precision="fp32", execution_provider="cpu",
        holdout=_holdout(), manifest_info=manifest_info,
    )


# --------------------------------------------------------------------------- fuse


def test_fused_model_reproduces_peft_logits(fused):
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    peft_logits = _logits(fused["peft"], ids)
    fused_logits = _logits(load_model(fused["fused"], "fp32").eval(), ids)
    base_logits = _logits(load_model(fused["base"], "fp32").eval(), ids)
    assert (peft_logits - base_logits).abs().max() > 1e-2, "the LoRA must change the model or this test proves nothing"
    assert (peft_logits - fused_logits).abs().max() < 1e-4


def test_fused_folder_is_servable(fused):
    folder = fused["fused"]
    config = json.loads((folder / "config.json").read_text())
    assert config["use_cache"] is True
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    assert "adapter_config.json" not in os.listdir(folder)
    tok = load_tokenizer(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".fused")], "temp build folder left behind"


def test_fuse_model_from_memory_equals_fuse_adapter(fused, tmp_path):
    out = fuse_model(fused["peft"], fused["base"], tmp_path / "fused2")
    ids = torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(1))
    a = _logits(load_model(out, "fp32").eval(), ids)
    b = _logits(load_model(fused["fused"], "fp32").eval(), ids)
    assert (a - b).abs().max() < 1e-5


def test_fuse_model_from_nf4_merges_into_fp32_weights(fused, tmp_path):
    from edgekif.model import bitsandbytes_available
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not bitsandbytes_available():
        pytest.skip("bitsandbytes 4-bit does not work on this host")
    nf4 = add_lora(load_model(fused["base"], "nf4"), LORA)
    set_peft_model_state_dict(nf4, get_peft_model_state_dict(fused["peft"]))
    out = fuse_model(nf4, fused["base"], tmp_path / "fused-from-nf4")
    ids = torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(2))
    # Same LoRA, base re-read in fp32: identical to the fp32 fuse (no NF4 rounding in the weights).
    diff = (_logits(load_model(out, "fp32").eval(), ids) - _logits(load_model(fused["fused"], "fp32").eval(), ids)).abs().max()
    assert diff < 1e-5


# --------------------------------------------------------------------------- export + answer check


def test_genai_export_passes_the_answer_check_and_has_the_client_files(genai_fp32, manifest_info):
    files = set(os.listdir(genai_fp32))
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "manifest.json"} <= files
    manifest = verify_manifest(genai_fp32).to_dict()
    parity = manifest["parity"]
    assert parity["agreement"] == 1.0 and parity["n"] == len(PROMPTS) and parity["passed"] is True
    assert parity["accuracy"] is None  # prompts without labels: agreement only
    assert manifest["accuracies"] == {} and manifest["accuracies_measured_by"]["runtime"].startswith("onnxruntime-genai ")
    assert manifest["reference"]["runtime"].startswith("pytorch ")
    assert {k: v for k, v in manifest["export"].items() if k != "session_options"} == {"target": "genai", "precision": "fp32", "execution_provider": "cpu",
                                                                                   "logits": "each row's last real position"}
    assert manifest["tasks"] == manifest_info["tasks"]
    assert manifest["base_model"] == {"id": "tiny-llama", "sha256": "ab" * 32}
    assert manifest["adapter_sha256"] == manifest_info["adapter_sha256"]
    assert manifest["runtime"]["onnxruntime"] and manifest["runtime"]["onnxruntime_genai"]
    assert dt.datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert "/" not in json.dumps(manifest.get("parity_rejected", []))  # no paths in the manifest


def test_onnx_export_passes_the_answer_check(onnx_fp32):
    manifest = verify_manifest(onnx_fp32).to_dict()
    assert manifest["export"]["target"] == "onnx" and manifest["parity"]["agreement"] == 1.0
    assert manifest["accuracies_measured_by"]["runtime"].startswith("onnxruntime ")
    assert {"model.onnx", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])


def test_runners_reproduce_pytorch_greedy(fused, genai_fp32, onnx_fp32):
    from edgekif.infer import GenaiRunner, OnnxRunner

    expected = [_torch_greedy(fused["fused"], p, 6) for p in PROMPTS]
    genai, plain = GenaiRunner(genai_fp32), OnnxRunner(onnx_fp32)
    assert [genai.generate_ids(p, 6) for p in PROMPTS] == expected
    assert [plain.generate_ids(p, 6) for p in PROMPTS] == expected
    # Batches are padded; padding must not change any answer.
    assert genai.generate_batch_ids(PROMPTS, 6) == expected
    assert plain.generate_batch_ids(PROMPTS, 6) == expected
    pieces: list[str] = []
    text = genai.generate(PROMPTS[0], 6, stream_callback=pieces.append)
    assert isinstance(text, str) and pieces


def test_answer_all_batches_by_length_and_keeps_each_answer_in_its_place(genai_fp32):
    from edgekif.infer import GenaiRunner, answer_all

    genai = GenaiRunner(genai_fp32)
    prompts = [*PROMPTS, "x", "A much longer prompt than the others, so the batches sort it last", PROMPTS[0]]
    one_by_one = [genai.generate(p, 6) for p in prompts]
    assert answer_all(genai, prompts, 6, batch_size=2) == one_by_one  # 3 batches, sorted by length

    class ClientOnly:  # no generate_batch: one request at a time
        calls: list = []

        def generate(self, prompt, max_new_tokens):
            self.calls.append(prompt)
            return f"{prompt}/{max_new_tokens}"

    runner = ClientOnly()
    assert answer_all(runner, ["b", "a"], 3) == ["b/3", "a/3"] and runner.calls == ["b", "a"]

    class NoPaddedBatches(ClientOnly):  # a graph that refuses padded batches: one at a time
        calls: list = []

        def generate_batch(self, prompts, max_new_tokens):
            raise RuntimeError("seqlens_k[0] = 70 is too small for sequence_length 93")

    runner = NoPaddedBatches()
    assert answer_all(runner, ["bb", "a", "ccc"], 2, batch_size=2) == ["bb/2", "a/2", "ccc/2"] and sorted(runner.calls) == ["a", "bb", "ccc"]


@pytest.fixture(scope="module")
def opinionated_genai(tmp_path_factory):
    """A genai fp32 export of a tiny Llama with large random weights, whose greedy answers
    differ from prompt to prompt (the small LoRA of `fused` answers every prompt alike)."""
    from edgekif.export.build import export_genai
    from tiny_models import opinionated_llama

    root = tmp_path_factory.mktemp("opinionated")
    model, tok = opinionated_llama()
    model.save_pretrained(root / "hf", safe_serialization=True)
    tok.save_pretrained(root / "hf")
    return export_genai(root / "hf", root / "genai", precision="fp32", execution_provider="cpu")


def test_answer_all_reads_a_shared_prefix_once_with_the_answers_of_one_at_a_time(opinionated_genai, monkeypatch):
    """Prompts that share a long instruction for their answer budget are answered one at a time
    on one generator that reads the prefix once and is rewound to it after each answer: the
    answers of one request at a time, fewer tokens read. A budget too long for the prefix keeps
    the padded batches."""
    import types

    import numpy as np
    import onnxruntime_genai as og

    from edgekif.infer import SHARED_PREFIX_PER_ANSWER_TOKEN, GenaiRunner, answer_all

    genai = GenaiRunner(opinionated_genai)
    instruction = "Classify the sentiment of this movie review as positive or negative, in one word.\n"
    prompts = [instruction + t for t in ("a great movie", "dull and far too long", "x", "I loved every minute of it", "a great movie")]
    one_by_one = [genai.generate(p, 4) for p in prompts]
    assert len(set(one_by_one)) > 1  # answers that differ, or equality proves little

    appended: list[int] = []

    class Spy:  # counts the tokens each append_tokens call reads
        def __init__(self, model, params):
            self._gen = og.Generator(model, params)

        def append_tokens(self, tokens):  # a numpy array, or a batch as a genai Tensor
            appended.append(int(np.prod(tokens.shape() if callable(tokens.shape) else tokens.shape)))
            self._gen.append_tokens(tokens)

        def __getattr__(self, name):
            return getattr(self._gen, name)

    monkeypatch.setattr(genai, "_og", types.SimpleNamespace(Generator=Spy, GeneratorParams=og.GeneratorParams))
    assert answer_all(genai, prompts, 4, batch_size=2) == one_by_one
    lengths = [len(genai.tokenizer.encode(genai.chat_text(p))) for p in prompts]
    shared = appended[0]
    assert shared >= SHARED_PREFIX_PER_ANSWER_TOKEN * 4 and len(appended) == 1 + len(prompts)
    assert appended[1:] == [n - shared for n in lengths]  # each prompt's own tokens only
    appended.clear()
    long_budget = shared // SHARED_PREFIX_PER_ANSWER_TOKEN + 1
    assert genai.answers_after_shared_prefix(prompts, long_budget) is None
    assert answer_all(genai, prompts, long_budget, batch_size=2) == [genai.generate(p, long_budget) for p in prompts]
    assert appended and all(n >= shared for n in appended)  # whole prompts, batched or alone

    def refuse(self, length):
        raise RuntimeError("rewind_to is not supported for this model")

    monkeypatch.setattr(Spy, "rewind_to", refuse, raising=False)
    assert genai.answers_after_shared_prefix(prompts, 4) is None
    assert answer_all(genai, prompts, 4, batch_size=2) == one_by_one  # padded batches instead


def _graph_logits(folder: Path, ids: list[list[int]], mask: list[list[int]], past: dict | None = None):
    """A genai export's model.onnx run directly: (logits, present) for one call."""
    import numpy as np
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array(ids, dtype=np.int64), "attention_mask": np.array(mask, dtype=np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            empty = np.zeros((len(ids), config["num_key_value_heads"], 0, config["head_size"]), np.float32)
            feeds[i.name] = past[i.name.replace("past_key_values", "present")] if past else empty
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def test_a_cpu_genai_export_computes_logits_on_each_rows_last_real_position(fused, genai_fp32):
    """The LM head runs on one position a row (edgekif.export.lm_head): the prompt's last real
    token whatever the padding on its right, and the new token in a decoding step; each equals
    the fused PyTorch model's logits there. The builder's own prune took the batch's last
    position, a pad for every shorter row."""
    model = load_model(fused["fused"], "fp32").eval()
    info = json.loads((genai_fp32 / "export_info.json").read_text())
    assert info["logits"] == "each row's last real position" and info["builder_options"] == {}  # not a variant option
    assert verify_manifest(genai_fp32).export["logits"] == info["logits"]  # what a client reading the manifest sees
    short, long = [5, 9, 13], [7, 11, 2, 30, 41, 8]
    out = _graph_logits(genai_fp32, [short + [0] * 3, long], [[1] * 3 + [0] * 3, [1] * 6])  # right padded, as genai pads
    assert out["logits"].shape == (2, 1, model.config.vocab_size)
    for row, seq in enumerate((short, long)):
        expected = _logits(model, torch.tensor([seq]))[0, -1]
        assert torch.allclose(torch.from_numpy(out["logits"][row, 0]), expected, atol=1e-3), row
    # a decoding step after the long prompt: position 0 of a one-token input
    first = _graph_logits(genai_fp32, [long], [[1] * 6])
    step = _graph_logits(genai_fp32, [[17]], [[1] * 7], past=first)
    assert torch.allclose(torch.from_numpy(step["logits"][0, 0]), _logits(model, torch.tensor([long + [17]]))[0, -1], atol=1e-3)


def test_a_graph_the_rewrite_does_not_know_is_refused_and_a_variant_may_keep_every_position(fused, genai_fp32, tmp_path):
    from edgekif.export.build import build_variant
    from edgekif.export.lm_head import last_position_head

    with pytest.raises(ExportError, match="/lm_head/prune/Gather"):
        last_position_head(genai_fp32)  # already rewritten: nothing of the builder's to replace
    out = tmp_path / "every"
    build_variant(fused["fused"], out, "genai", ExportVariant("fp32", (("prune_lm_head", "false"),)), "cpu")
    assert json.loads((out / "export_info.json").read_text())["logits"] == "every position"
    assert _graph_logits(out, [[5, 9, 13]], [[1, 1, 1]])["logits"].shape[1] == 3
    with pytest.raises(ExportError, match="without prune_lm_head"):
        last_position_head(out)


def test_a_damaged_or_missing_graph_is_a_typed_error_naming_the_file_and_is_left_as_it_was(genai_fp32, tmp_path):
    from edgekif.export.lm_head import last_position_head

    damaged = tmp_path / "damaged"
    shutil.copytree(genai_fp32, damaged)
    graph = damaged / "model.onnx"
    cut = graph.read_bytes()[:-7]  # truncated: a half-copied file
    graph.write_bytes(cut)
    with pytest.raises(ExportError, match=r"damaged/model.onnx: cannot read the builder's graph"):
        last_position_head(damaged)
    assert graph.read_bytes() == cut
    graph.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ExportError, match="cannot read the builder's graph"):
        last_position_head(damaged)
    graph.unlink()
    with pytest.raises(ExportError, match="cannot read the builder's graph"):
        last_position_head(damaged)


def test_an_export_that_cannot_answer_fails_once_with_the_reason(genai_fp32, tmp_path, monkeypatch):
    """A built export the runtime opens but cannot answer with (here: no chat template, as a
    template-less base once gave) is a permanent ExportError naming the cause, not a retry."""
    import edgekif.infer as infer
    from edgekif.export.check import _deterministic, check_candidate

    def no_template(*a, **k):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    monkeypatch.setattr(infer.GenaiRunner, "generate_batch", no_template)
    with pytest.raises(ExportError) as e:
        check_candidate(genai_fp32, genai_fp32, target="genai", variant=ExportVariant("fp32"), execution_provider="cpu", build=False,
                        holdout=_holdout(), max_new_tokens=4)
    assert e.value.permanent and "chat_template is not set" in str(e.value) and "model.chat_template" in e.value.hint
    assert isinstance(e.value.__cause__, ValueError)
    # shortages stay retryable
    assert not _deterministic(MemoryError()) and not _deterministic(RuntimeError("Failed to allocate memory for tensor"))
    assert _deterministic(RuntimeError("KV cache capacity (32) must be at least local_window_size (512)"))


def test_a_genai_export_carries_its_decoder_threads_and_the_manifest_records_them(genai_fp32, fused, tmp_path):
    """onnxruntime-genai's own default ran the decoder on one core here: every genai export
    writes its threads into genai_config.json (where `og.Model(folder)` reads them), before the
    manifest hashes the folder; 0 (the default) is the physical cores, N is N."""
    from edgekif.config import Config, validate_config
    from edgekif.export.build import build_variant, physical_cores
    from edgekif.infer import GenaiRunner

    def decoder_options(folder):
        return json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["session_options"]

    manifest = verify_manifest(genai_fp32)
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert decoder_options(genai_fp32)["intra_op_num_threads"] == cores
    assert manifest.export["session_options"]["intra_op_num_threads"] == cores and manifest.threads == cores
    assert manifest.export_settings.keys() == {"target", "precision", "execution_provider", "builder_options"}  # not a like-for-like key

    out = tmp_path / "three"
    build_variant(fused["fused"], out, "genai", ExportVariant("fp32"), "cpu", 3)
    assert decoder_options(out)["intra_op_num_threads"] == 3 and decoder_options(out)["log_id"] == "onnxruntime-genai"  # merged, not replaced
    write_manifest(out)
    assert verify_manifest(out).threads == 3
    assert GenaiRunner(out).generate([{"role": "user", "content": "Hi"}], 2) is not None  # the runtime accepts the options

    cfg = Config()
    assert cfg.export.threads == 0
    cfg.export.threads = -1
    with pytest.raises(ConfigError, match="export.threads"):
        validate_config(cfg)


def test_an_older_manifest_without_session_options_still_reads(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"model.onnx": "0" * 64}, "export": {"target": "genai", "precision": "int8"}}))
    manifest = read_manifest(tmp_path)
    assert manifest.session_options == {} and manifest.threads is None


def test_manifest_accuracies_are_what_a_separate_client_measures(fused, tmp_path):
    """Labels chosen so the fp32 model gets 2 of 3 right: the manifest's exact match is the
    export's own, and a client running the published files (onnxruntime-genai, whole records
    through the folder's chat template, greedy) measures the same."""
    from edgekif.infer import GenaiRunner
    from edgekif.export.check import reference_answers

    plain = _holdout()
    ref = reference_answers(fused["fused"], plain)["sentiment"].answers
    labels = {PROMPTS[0]: ref[0], PROMPTS[1]: ref[1], PROMPTS[2]: ref[2] + " not this"}
    holdout = _holdout(labels=labels)
    out = export_model(fused["fused"], tmp_path / "genai", target="genai", precision="fp32", execution_provider="cpu", holdout=holdout)
    manifest = verify_manifest(out).to_dict()
    runner = GenaiRunner(out)  # a client of its own: no edgekif.export.check
    answers = [runner.generate([{"role": "user", "content": p}], 8).strip() for p in PROMPTS]
    client_em = sum(a == labels[p].strip() for a, p in zip(answers, PROMPTS)) / len(PROMPTS)
    assert manifest["accuracies"] == {"sentiment": pytest.approx(client_em)} and client_em == pytest.approx(2 / 3)
    assert manifest["evaluation"]["sentiment"]["answers"] == answers
    assert manifest["reference"]["tasks"]["sentiment"]["exact_match"] == pytest.approx(2 / 3)


def _int8_answers_as_the_base(fused, monkeypatch) -> list[str]:
    """`auto` tries int8 then fp32, and int8 is built from the base without the adapter, so
    its answers differ from the fused model's. Returns the list of variants built, in order."""
    from edgekif.export import build as export_mod

    monkeypatch.setattr(export_mod, "AUTO_VARIANTS_GENAI_CPU", (ExportVariant("int8"), ExportVariant("fp32")))
    real_build = export_mod.build_variant
    built: list[str] = []

    def build(src, dest, target, variant, ep, *rest):
        built.append(variant.name)
        real_build(fused["base"] if variant.precision == "int8" else src, dest, target, variant, ep, *rest)

    monkeypatch.setattr(export_mod, "build_variant", build)
    return built


def test_an_export_whose_answers_differ_is_rejected_and_the_next_precision_tried(fused, tmp_path, monkeypatch):
    """`auto` tries its variants in order; one whose holdout answers differ from the fp32
    model's beyond the margin is rejected with its figures, and the next one is published.
    The rejected candidate is made to answer differently on purpose: it is built from the
    base without the adapter (whose greedy answers differ from the fused model's)."""
    from edgekif.export import exporter

    assert [_torch_greedy(fused["base"], p, 8) for p in PROMPTS] != [_torch_greedy(fused["fused"], p, 8) for p in PROMPTS]
    built = _int8_answers_as_the_base(fused, monkeypatch)
    references = []  # (drafts, answers) of each fp32 reference measured
    real = exporter.reference_answers

    def reference(*a, **k):
        out = real(*a, **k)
        references.append((k["drafts"]["sentiment"].answers, out["sentiment"].answers))
        return out

    monkeypatch.setattr(exporter, "reference_answers", reference)
    out = export_model(fused["fused"], tmp_path / "auto", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout())
    manifest = verify_manifest(out).to_dict()
    assert built == ["int8", "fp32"] and manifest["export"]["precision"] == "fp32"
    # measured once, after the first candidate answered, with its (wrong) answers as drafts:
    # the reference is still the fused fp32 model's own
    ((drafts, answers),) = references
    assert drafts != answers and answers == real(fused["fused"], _holdout())["sentiment"].answers
    (rejected,) = manifest["parity_rejected"]
    assert rejected["precision"] == "int8" and rejected["passed"] is False and rejected["agreement"] < 0.95
    assert rejected["n"] == len(PROMPTS) and "agree with the fp32 model" in rejected["reasons"][0]
    assert manifest["parity"]["agreement"] == 1.0


def test_a_rejected_int8_is_followed_by_the_other_int8_before_fp32(fused, tmp_path, monkeypatch):
    """With `int8_second`, the first int8 (built from the base, so its answers differ) is
    rejected and the second int8, built from the fused model, is published: fp32 is not built."""
    from edgekif.export import build as export_mod
    from edgekif.export.build import FREE_TEXT_INT8, INT8_CPU

    monkeypatch.setattr(export_mod, "AUTO_VARIANTS_GENAI_CPU", (INT8_CPU, ExportVariant("fp32")))
    real_build = export_mod.build_variant
    built: list[str] = []

    def build(src, dest, target, variant, ep, *rest):
        built.append(variant.name)
        real_build(fused["base"] if variant == INT8_CPU else src, dest, target, variant, ep, *rest)

    monkeypatch.setattr(export_mod, "build_variant", build)
    out = export_model(fused["fused"], tmp_path / "auto", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout(),
                       int8=INT8_CPU, int8_second=FREE_TEXT_INT8)
    published = verify_manifest(out)
    assert built == ["int8", FREE_TEXT_INT8.name]
    assert published.precision == "int8" and published.builder_options == FREE_TEXT_INT8.builder_options() == {"block_size": "16", "is_symmetric": "false"}
    (rejected,) = published.parity_rejected
    assert rejected["variant"] == "int8" and rejected["agreement"] < 0.95


def test_a_variant_that_cannot_build_or_answer_is_rejected_and_the_next_tried(fused, tmp_path, monkeypatch):
    """A variant whose build (or answers) fail every time is rejected like one whose answers
    differ: the next precision is built and published; the manifest names the failure. Only the
    last variant's failure ends the export."""
    from edgekif.export import build as export_mod

    monkeypatch.setattr(export_mod, "AUTO_VARIANTS_GENAI_CPU", (ExportVariant("int8"), ExportVariant("fp32")))
    real_build = export_mod.build_variant

    def build(src, dest, target, variant, ep, *rest):
        if variant.precision == "int8":
            raise ExportError("onnxruntime-genai builder failed (exit 1): KeyError 'rope_type'", permanent=True)
        real_build(src, dest, target, variant, ep, *rest)

    monkeypatch.setattr(export_mod, "build_variant", build)
    out = export_model(fused["fused"], tmp_path / "auto", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout())
    manifest = verify_manifest(out).to_dict()
    assert manifest["export"]["precision"] == "fp32"
    (rejected,) = manifest["parity_rejected"]
    assert rejected["variant"] == "int8" and "rope_type" in rejected["reasons"][0]
    monkeypatch.setattr(export_mod, "AUTO_VARIANTS_GENAI_CPU", (ExportVariant("int8"),))
    with pytest.raises(ExportError, match="rope_type") as e:
        export_model(fused["fused"], tmp_path / "only", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout())
    assert e.value.permanent and not (tmp_path / "only").exists()


def test_precisions_known_to_fail_are_not_built_under_auto_but_an_explicit_one_is(fused, tmp_path, monkeypatch):
    """skip_precisions (the workflow's known failures for a base) removes those candidates from
    `auto` before anything is built, with the reason in parity_skipped; a single requested
    precision is built all the same."""
    built = _int8_answers_as_the_base(fused, monkeypatch)
    reason = "the base's GGUF stores its projections as Q4_1"
    out = export_model(fused["fused"], tmp_path / "auto", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout(),
                       skip_precisions={"int8": reason})
    manifest = verify_manifest(out)
    assert built == ["fp32"] and manifest.precision == "fp32" and manifest.parity_rejected is None
    assert manifest.parity_skipped == [{"variant": "int8", "reason": reason}]
    built.clear()
    export_model(fused["fused"], tmp_path / "asked", target="genai", precision="fp32", execution_provider="cpu", holdout=_holdout(),
                 skip_precisions={"fp32": reason})
    assert built == ["fp32"]  # the only candidate: never skipped


def test_a_variant_this_base_keeps_failing_is_skipped_and_the_manifest_says_so(fused, tmp_path, monkeypatch):
    """With a history file, int8 (built from the base, so its answers differ) is rejected on
    two exports and not built on the third; the manifest names it under parity_skipped."""
    from edgekif.export.history import SkipPolicy

    built = _int8_answers_as_the_base(fused, monkeypatch)
    history = tmp_path / "export-history.json"
    info = {"base_model_sha256": "ab" * 32}
    for i in range(3):
        out = export_model(fused["fused"], tmp_path / f"v{i}", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout(),
                           manifest_info=info, history_file=history, skip_policy=SkipPolicy(skip_after=2, retry_after=5))
        assert verify_manifest(out).precision == "fp32"
    assert built == ["int8", "fp32", "int8", "fp32", "fp32"]
    third = verify_manifest(tmp_path / "v2")
    assert [s["variant"] for s in third.parity_skipped] == ["int8"] and third.parity_rejected is None
    assert "rejected on the last 2 checks" in third.parity_skipped[0]["reason"]
    # another base: its own history, int8 is tried again
    export_model(fused["fused"], tmp_path / "other", target="genai", precision="auto", execution_provider="cpu", holdout=_holdout(),
                 manifest_info={"base_model_sha256": "cd" * 32}, history_file=history)
    assert built[-2:] == ["int8", "fp32"]


def test_an_accuracy_drop_beyond_the_margin_fails_even_when_most_answers_agree():
    from edgekif.export.check import AnswerSet, compare_answers

    ref = {"t": AnswerSet(["a"] * 100, 100, 0.50)}
    got = {"t": AnswerSet(["a"] * 98 + ["b", "b"], 100, 0.48)}
    check = compare_answers(ref, got, min_agreement=0.95, max_accuracy_drop=1.0)
    assert check.agreement == 0.98 and check.accuracy_drop == pytest.approx(2.0) and not check.passed
    assert check.reasons == ["exact match 48.0 vs fp32 50.0 (-2.0 points > 1 allowed)"]
    assert compare_answers(ref, got, min_agreement=0.95, max_accuracy_drop=2.0).passed
    # no near-tie allowance: a different answer never counts as agreeing
    assert compare_answers(ref, got, min_agreement=0.99, max_accuracy_drop=5.0).reasons[0].startswith("answers agree with the fp32 model on 98.0%")


def test_the_tasks_own_metric_is_scored_beside_strict_exact_match():
    """With a metric named, score_answers adds the task's metric per record; exact_match stays
    strict, and without one the AnswerSet and its summary are what they always were."""
    from edgekif.export.check import score_answers
    from edgekif.records import Record

    records = [Record.from_prompt("q1", "World"), Record.from_prompt("q2", "Sports"), Record.from_prompt("q3", "Business")]
    answers = ["world.", "Sports", "Science"]
    plain = score_answers(answers, records)
    assert (plain.exact_match, plain.metric, plain.score, plain.scores) == (pytest.approx(1 / 3), None, None, None)
    assert plain.summary() == {"n": 3, "exact_match": pytest.approx(1 / 3)}
    norm = score_answers(answers, records, "normalized_exact_match")
    assert norm.exact_match == plain.exact_match  # strict, as before
    assert (norm.metric, norm.scores, norm.score) == ("normalized_exact_match", [1.0, 1.0, 0.0], pytest.approx(2 / 3))
    assert norm.summary() == {"n": 3, "exact_match": pytest.approx(1 / 3), "metric": "normalized_exact_match", "score": pytest.approx(2 / 3)}
    # free text: LCS "the cat on mat" of 5 and 6 words -> F1 8/11
    gen = score_answers(["the cat on a mat"], [Record.from_prompt("q", "the cat sat on the mat")], "rouge_l")
    assert (gen.exact_match, gen.scores) == (0.0, [pytest.approx(8 / 11)])
    # no labels: nothing to score against
    assert score_answers(["x"], [Record.from_prompt("q", "")], "rouge_l").metric is None


def test_specs_give_each_task_its_budget_and_metric_and_leave_the_pass_rule_alone():
    from edgekif.export.check import AnswerSet, compare_answers, runner_answers
    from edgekif.records import Record
    from edgekif.tasks import TaskSpec

    class Runner:  # answers "the cat sat on the mat", cut to its budget in words
        budgets: list[int] = []

        def generate(self, chat, max_new_tokens):
            self.budgets.append(max_new_tokens)
            return " ".join("the cat sat on the mat".split()[:max_new_tokens])

    holdout = {"news": [Record.from_prompt("q", "the cat sat on the mat")], "labels": [Record.from_prompt("q", "the")]}
    specs = {"news": TaskSpec("generation", "rouge_l", 3, "detected")}  # "labels": no spec
    got = runner_answers(Runner(), holdout, 8, specs)
    assert Runner.budgets == [3, 8]
    assert got["news"].answers == ["the cat sat"] and got["news"].scores == [pytest.approx(2 * 1 * 0.5 / 1.5)]  # P 3/3, R 3/6
    assert got["labels"].metric is None and runner_answers(Runner(), holdout, 8)["news"].metric is None
    ref = {"news": AnswerSet(["the cat sat on the mat"], 1, 1.0, metric="rouge_l", score=1.0, scores=[1.0]), "labels": AnswerSet(["the"], 1, 1.0)}
    same = {k: AnswerSet(v.answers, 1, v.exact_match) for k, v in ref.items()}
    check = compare_answers(ref, {**same, "news": got["news"]}, min_agreement=0.0, max_accuracy_drop=100.0)
    assert check.per_task["news"] == {"n": 1, "agreement": 0.0, "exact_match": 0.0, "reference_exact_match": 1.0,
                                      "metric": "rouge_l", "score": pytest.approx(2 / 3), "reference_score": 1.0}
    assert "metric" not in check.per_task["labels"] and check.passed  # the margins decide, as before
    assert compare_answers(ref, same, min_agreement=0.95, max_accuracy_drop=1.0).per_task["news"].keys() == {"n", "agreement", "exact_match", "reference_exact_match"}


def test_reference_answers_use_the_tasks_budget_and_metric(fused):
    from edgekif.export.check import reference_answers
    from edgekif.tasks import TaskSpec

    tok = load_tokenizer(fused["fused"])
    holdout = _holdout(labels={p: "some reference text" for p in PROMPTS})
    full = reference_answers(fused["fused"], holdout)["sentiment"]
    short = reference_answers(fused["fused"], holdout, specs={"sentiment": TaskSpec("generation", "chrf", 2, "sidecar", ("kind",))})["sentiment"]
    assert all(len(tok(a, add_special_tokens=False)["input_ids"]) <= 2 for a in short.answers)
    assert any(len(tok(a, add_special_tokens=False)["input_ids"]) > 2 for a in full.answers)  # else the budget proves nothing
    assert full.metric is None and short.metric == "chrf" and len(short.scores) == len(PROMPTS)
    assert short.exact_match == 0.0 and all(0.0 <= s <= 1.0 for s in short.scores)


def test_the_manifest_records_each_tasks_kind_metric_budget_and_score(fused, tmp_path):
    """With specs, each task is answered with its own budget and scored by its own metric, and
    the manifest says which (task_specs) and what it measured (scores), beside the unchanged
    strict `accuracies`; a task without a spec is answered as before; the spec is in the
    reference cache's key, so a changed budget measures the reference again."""
    from edgekif.export.check import reference_answers
    from edgekif.records import Record
    from edgekif.tasks import TaskSpec

    plain = reference_answers(fused["fused"], _holdout())["sentiment"].answers
    holdout = {"news": [Record.from_prompt(p, "a short headline for " + p) for p in PROMPTS],
               "sentiment": [Record.from_prompt(p, a) for p, a in zip(PROMPTS, plain)]}
    specs = {"news": TaskSpec("generation", "rouge_l", 5, "detected"), "other": TaskSpec("generation", "chrf", 9, "sidecar", ("kind",))}
    cache = tmp_path / "reference.json"
    out = export_model(fused["fused"], tmp_path / "genai", target="genai", precision="fp32", execution_provider="cpu",
                       holdout=holdout, specs=specs, reference_cache=cache)
    manifest = verify_manifest(out)
    assert manifest.task_specs == {"news": {"kind": "generation", "metric": "rouge_l", "max_new_tokens": 5, "source": "detected"}}
    assert set(manifest.scores) == {"news"} and 0.0 <= manifest.scores["news"] <= 1.0
    assert manifest.scores["news"] == pytest.approx(manifest.evaluation["news"]["score"])
    assert manifest.evaluation["news"]["metric"] == "rouge_l" and "metric" not in manifest.evaluation["sentiment"]
    assert manifest.accuracies == {"news": 0.0, "sentiment": 1.0}  # strict exact match, as without specs
    assert manifest.accuracies_measured_by["max_new_tokens"] == {"news": 5, "sentiment": 8}  # what each was answered within
    assert manifest.summary()["task_specs"] == manifest.task_specs
    key = json.loads(cache.read_text())["key"]
    export_model(fused["fused"], tmp_path / "genai2", target="genai", precision="fp32", execution_provider="cpu",
                 holdout=holdout, specs={"news": TaskSpec("generation", "rouge_l", 6, "detected")}, reference_cache=cache)
    assert json.loads(cache.read_text())["key"] != key
    # a manifest written before specs reads with them empty
    old = verify_manifest(export_model(fused["fused"], tmp_path / "plain", target="genai", precision="fp32", execution_provider="cpu",
                                       holdout=holdout))
    assert old.task_specs is None and old.scores is None and "task_specs" not in old.to_dict() and "task_specs" not in old.summary()


def test_failed_check_publishes_no_export_folder(fused, tmp_path):
    out = tmp_path / "onnx-int8"
    with pytest.raises(ParityError, match="no export passed"):
        # > 1 can never be reached
        export_model(fused["fused"], out, target="onnx", precision="int8", execution_provider="cpu", holdout=_holdout(PROMPTS[:1]), min_agreement=1.01)
    assert not out.exists()
    assert os.listdir(tmp_path) == [], "temporary export folder left behind"


# --------------------------------------------------------------------------- manifest


def test_verify_manifest_names_a_truncated_or_missing_file(genai_fp32, tmp_path):
    copy = Path(shutil.copytree(genai_fp32, tmp_path / "copy"))
    verify_manifest(copy)
    data = copy / "model.onnx.data" if (copy / "model.onnx.data").exists() else copy / "model.onnx"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(IntegrityError, match=data.name):
        verify_manifest(copy)
    data.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_manifest(copy)


def test_verify_manifest_rejects_edited_hash_and_accepts_extra_files(genai_fp32, tmp_path):
    copy = Path(shutil.copytree(genai_fp32, tmp_path / "copy"))
    (copy / "notes.txt").write_text("not in the manifest")
    verify_manifest(copy)  # unlisted files are tolerated
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["genai_config.json"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="genai_config.json"):
        verify_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="manifest.json"):
        verify_manifest(copy)


def test_write_manifest_hashes_nested_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"b")
    manifest = write_manifest(tmp_path, target="onnx", precision="fp32", tasks=[{"id": "x", "name": "x", "examples": 1}]).to_dict()
    assert set(manifest["files"]) == {"a.bin", "sub/b.bin"}
    assert verify_manifest(tmp_path).to_dict()["export"]["target"] == "onnx"
    (tmp_path / "sub" / "b.bin").write_bytes(b"B")
    with pytest.raises(IntegrityError, match="b.bin"):
        verify_manifest(tmp_path)


# --------------------------------------------------------------------------- settings


def test_resolve_export_settings(monkeypatch):
    import edgekif.export.build as export

    monkeypatch.setattr(export, "_cuda_usable", lambda target: False)
    assert resolve_export_settings("genai", "auto", "auto") == ("genai", "int4", "cpu")
    assert resolve_export_settings("onnx", "auto", "auto") == ("onnx", "fp32", "cpu")
    monkeypatch.setattr(export, "_cuda_usable", lambda target: True)
    assert resolve_export_settings("genai", "auto", "auto") == ("genai", "fp16", "cuda")
    assert resolve_export_settings("genai", "int4", "cpu") == ("genai", "int4", "cpu")
    with pytest.raises(ConfigError, match="fp16"):
        resolve_export_settings("genai", "fp16", "cpu")
    with pytest.raises(ConfigError):
        resolve_export_settings("onnx", "int4", "cpu")
    with pytest.raises(ConfigError):
        resolve_export_settings("tflite", "auto", "cpu")


# --------------------------------------------------------------------------- serving from a store


def test_open_current_keeps_its_version_across_a_publish(genai_fp32, onnx_fp32, tmp_path):
    from edgekif.infer import GenaiRunner, OnnxRunner
    from edgekif.publish import ModelStore, open_current

    store = ModelStore(tmp_path)
    store.publish(genai_fp32)
    runner = open_current(tmp_path)
    assert isinstance(runner, GenaiRunner) and runner.version == "v0001"
    before = runner.generate_ids(PROMPTS[0], 5)
    store.publish(onnx_fp32)
    assert runner.generate_ids(PROMPTS[0], 5) == before  # still v0001, still loadable
    newer = open_current(tmp_path)
    assert isinstance(newer, OnnxRunner) and newer.version == "v0002"
    assert newer.generate_ids(PROMPTS[0], 5) == before  # same fused model, other target


def test_client_example_streams_an_answer(genai_fp32, tmp_path):
    from edgekif.publish import ModelStore

    ModelStore(tmp_path).publish(genai_fp32)
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "client_example.py"), str(tmp_path), "Hello there", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "v0001" in res.stderr and "sentiment" in res.stderr


def test_client_example_fails_cleanly_without_a_model(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "client_example.py"), str(tmp_path), "hi"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no model published" in res.stderr


# --------------------------------------------------------------------------- real model


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_trained_adapter_cpu_export_keeps_the_fp32_answers(smollm2, benchmark_data, tmp_path):
    """A LoRA adapter trained on a benchmark task, fused and exported for CPU with `auto`: what
    is published answers the holdout as the fp32 model does (>= 95% identical answers, exact
    match within 1 point), whichever precision that took, and the manifest's accuracy is what
    a separate onnxruntime-genai client measures on the same records.

    Deterministic: seeded, train.deterministic=true; the assertions hold for any precision the
    check picks (a CPU with other int4 kernels may pick another)."""
    from edgekif.config import Config
    from edgekif.taskfile import read_task
    from edgekif.infer import GenaiRunner
    from edgekif.trainer import Learner

    torch.manual_seed(0)
    cfg = Config()
    cfg.train.strategy, cfg.train.max_steps, cfg.train.batch_size, cfg.train.checkpoint_every = "seq_lora", 6, 4, 0
    cfg.train.seed, cfg.train.deterministic = 0, True
    cfg.data.max_length = 96
    tok = load_tokenizer(smollm2.path)
    learner = Learner.create(cfg, add_lora(load_model(smollm2.path, "fp32"), cfg.lora), tok)
    train = read_task(benchmark_data / "agnews" / "train.jsonl")
    learner.train_task("agnews", train.records[:24])
    test = read_task(benchmark_data / "agnews" / "test.jsonl").records[:12]
    fused = fuse_model(learner.model, smollm2.path, tmp_path / "fused")
    del learner
    out = export_model(fused, tmp_path / "export", target="genai", precision="auto", execution_provider="cpu",
                       holdout={"agnews": test}, labels={"agnews": train.labels})
    manifest = verify_manifest(out).to_dict()
    parity = manifest["parity"]
    assert manifest["export"]["precision"] in ("int4", "int8", "fp32") and parity["passed"]
    assert parity["agreement"] >= 0.95 and parity["accuracy_drop_points"] <= 1.0
    for rejected in manifest.get("parity_rejected", []):
        assert rejected["reasons"] and rejected["n"] == len(test)
    runner = GenaiRunner(out)
    answers = [runner.generate(r.chat(), 8).strip() for r in test]
    em = sum(a == r.label for a, r in zip(answers, test)) / len(test)
    assert manifest["accuracies"]["agnews"] == pytest.approx(em)
    assert manifest["reference"]["tasks"]["agnews"]["label_accuracy"] is not None




# --------------------------------------------------------------------------- published template = training format (issue 11)

@pytest.fixture(scope="module")
def smol_style(tmp_path_factory, smollm2_template):
    """A tiny base whose tokenizer carries SmolLM2's template, fused with a LoRA and exported
    both ways, as the daemon publishes models."""
    from tiny_models import tiny_llama

    root = tmp_path_factory.mktemp("smol-style")
    model, tok = tiny_llama()
    tok.chat_template = smollm2_template
    model.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    adapter = root / "adapter"
    _random_lora(root / "base").save_pretrained(adapter, safe_serialization=True)
    fused_dir = fuse_adapter(root / "base", adapter, root / "fused")
    kw = dict(execution_provider="cpu", precision="fp32", holdout=_holdout(PROMPTS[:1]), max_new_tokens=2)
    return {
        "base": root / "base",
        "genai": export_model(fused_dir, root / "genai", target="genai", **kw),
        "onnx": export_model(fused_dir, root / "onnx", target="onnx", **kw),
    }


def test_published_template_renders_the_training_prompt(smol_style, smollm2_template):
    """A client that sends only a user message gets exactly the tokens training used."""
    from transformers import AutoTokenizer

    from edgekif.inputs import encode_example, encode_target, render_prompt
    from edgekif.infer import GenaiRunner, OnnxRunner
    from edgekif.records import Record

    tok = load_tokenizer(smol_style["base"])
    assert "You are a helpful" not in tok.decode(render_prompt(tok, [{"role": "user", "content": "hi"}]))  # the decision
    shipped = load_tokenizer(smol_style["base"], keep_default_system=True)
    assert shipped.chat_template == smollm2_template

    genai, onnx = GenaiRunner(smol_style["genai"]), OnnxRunner(smol_style["onnx"])
    hf = AutoTokenizer.from_pretrained(str(smol_style["genai"]))  # a plain transformers client
    conversations = [
        "Classify: a great movie",
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    ]
    for conv in conversations:
        messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        record = Record(messages=tuple((m["role"], m["content"]) for m in messages), output="Positive")
        enc = encode_example(tok, record, 512)
        training = enc.input_ids[: len(enc.input_ids) - len(encode_target(tok, record))]
        assert [int(t) for t in genai.tokenizer.encode(genai.chat_text(conv))] == training
        assert onnx.chat_ids(conv) == training
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == training
    for folder in (smol_style["genai"], smol_style["onnx"]):
        assert (folder / "chat_template.jinja").read_text() == tok.chat_template
        assert json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template", tok.chat_template) == tok.chat_template
        verify_manifest(folder)  # the template was in place before the manifest hashed it


@pytest.mark.parametrize("line, field, msg", [
    ('{"messages": [["user", "hi"]], "output": "a"', None, "not a JSON record"),
    ('{"messages": [["user", "hi"]]}', "output", "missing"),
    ('["user", "hi"]', None, "must be a JSON object"),
    ('{"messages": [["user"]], "output": "a"}', "messages", "malformed record"),
])
def test_a_damaged_holdout_names_file_line_and_field(tmp_path, line, field, msg):
    """The daemon's own holdout file, damaged or hand-edited: a typed error saying where, which
    the pipeline fails the job with (never a rejection of the user's file)."""
    from edgekif.errors import DamagedFileError, ValidationError
    from edgekif.holdouts import read_holdout
    from edgekif.records import Record

    path = tmp_path / "dbpedia.jsonl"
    path.write_text(Record.from_prompt("Q?", "A").to_json() + "\n\n" + line + "\n")
    with pytest.raises(DamagedFileError) as info:
        read_holdout(path)
    e = info.value
    assert isinstance(e, ValidationError) and e.file == str(path) and e.line == 3 and e.field == field and msg in e.message
    assert e.kind == "damaged_holdout" and f"{path}:line 3" in str(e)


def test_a_retry_reuses_the_reference_answers_and_a_failed_check_is_permanent(fused, tmp_path, monkeypatch):
    """A second try on the same fused model and records reads the fp32 answers from the cache
    (no PyTorch pass); other records are measured anew. A failed answer check is permanent."""
    from edgekif.errors import ParityError
    from edgekif.export import exporter

    calls = []
    real = exporter.reference_answers
    monkeypatch.setattr(exporter, "reference_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "reference.json"
    kw = dict(target="onnx", precision="fp32", execution_provider="cpu", reference_cache=cache)
    first = export_model(fused["fused"], tmp_path / "a", holdout=_holdout(PROMPTS[:2]), **kw)
    second = export_model(fused["fused"], tmp_path / "b", holdout=_holdout(PROMPTS[:2]), **kw)
    assert len(calls) == 1 and cache.is_file()
    assert read_manifest(first).evaluation == read_manifest(second).evaluation
    export_model(fused["fused"], tmp_path / "c", holdout=_holdout(PROMPTS[:1]), **kw)
    assert len(calls) == 2  # other records: measured
    cache.write_text('{"key": "')  # a try killed while writing it (the write is atomic; a hand edit is not)
    export_model(fused["fused"], tmp_path / "c2", holdout=_holdout(PROMPTS[:1]), **kw)
    assert len(calls) == 3 and json.loads(cache.read_text())["tasks"]  # measured again, written whole
    with pytest.raises(ParityError) as e:
        export_model(fused["fused"], tmp_path / "d", holdout=_holdout(PROMPTS[:1]), min_agreement=1.01, **kw)
    assert e.value.permanent and "fp32" in e.value.hint
