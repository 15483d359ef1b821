"""Fuse, export (genai + plain ONNX), parity, manifest, local inference.

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
from edgekif.errors import ConfigError, IntegrityError, ParityError
from edgekif.export import (
    adapter_sha256,
    check_parity,
    export_model,
    fuse_adapter,
    fuse_model,
    resolve_export_settings,
    verify_manifest,
    write_manifest,
)
from edgekif.model import add_lora, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello there", "What is 2+2?", "Classify: a great movie"]
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
        "accuracies": {"t1": 0.75, "t2": 0.5},
    }


@pytest.fixture(scope="module")
def genai_fp32(fused, manifest_info):
    return export_model(
        fused["fused"], fused["root"] / "genai-fp32", target="genai", precision="fp32", execution_provider="cpu",
        parity_prompts=PROMPTS, manifest_info=manifest_info,
    )


@pytest.fixture(scope="module")
def onnx_fp32(fused, manifest_info):
    return export_model(
        fused["fused"], fused["root"] / "onnx-fp32", target="onnx", precision="fp32", execution_provider="cpu",
        parity_prompts=PROMPTS, manifest_info=manifest_info,
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


# --------------------------------------------------------------------------- export + parity


def test_genai_export_passes_parity_and_has_the_client_files(genai_fp32, manifest_info):
    files = set(os.listdir(genai_fp32))
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "manifest.json"} <= files
    manifest = verify_manifest(genai_fp32)
    assert manifest["parity"]["greedy_equal"] is True and manifest["parity"]["agreement"] == 1.0
    assert manifest["parity"]["positions"] > 0
    assert manifest["export"] == {"target": "genai", "precision": "fp32", "execution_provider": "cpu"}
    assert manifest["tasks"] == manifest_info["tasks"] and manifest["accuracies"] == manifest_info["accuracies"]
    assert manifest["base_model"] == {"id": "tiny-llama", "sha256": "ab" * 32}
    assert manifest["adapter_sha256"] == manifest_info["adapter_sha256"]
    assert manifest["runtime"]["onnxruntime"] and manifest["runtime"]["onnxruntime_genai"]
    assert dt.datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert set(manifest["files"]) == files - {"manifest.json"}


def test_onnx_export_passes_parity(onnx_fp32):
    manifest = verify_manifest(onnx_fp32)
    assert manifest["export"]["target"] == "onnx" and manifest["parity"]["greedy_equal"] is True
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


def test_parity_rejects_an_export_of_another_model(fused, genai_fp32, onnx_fp32):
    # The export holds base+LoRA; against the bare base the greedy paths must differ.
    assert [_torch_greedy(fused["base"], p, 8) for p in PROMPTS] != [_torch_greedy(fused["fused"], p, 8) for p in PROMPTS]
    with pytest.raises(ParityError, match="fails parity"):
        check_parity(fused["base"], genai_fp32, "genai", PROMPTS)
    with pytest.raises(ParityError):
        check_parity(fused["base"], onnx_fp32, "onnx", PROMPTS)
    report = check_parity(fused["fused"], onnx_fp32, "onnx", PROMPTS)
    assert report.passed and report.greedy_equal and report.agreement == 1.0


def test_parity_prompts_are_fitted_like_evaluation_prompts(fused, onnx_fp32):
    """With max_prompt_tokens, parity checks the prompt training and evaluation would see."""
    from edgekif.data import CUT_MARK, fit_prompt
    from edgekif.export import _chat_ids
    from edgekif.records import Record

    long = "Classify: " + "very long text " * 40 + "Answer:"
    report = check_parity(fused["fused"], onnx_fp32, "onnx", [long], max_prompt_tokens=64, max_new_tokens=2)
    fitted = report.details[0]["prompt"]
    assert CUT_MARK in fitted and fitted.startswith("Classify: very") and fitted.endswith("Answer:")
    tok = load_tokenizer(fused["fused"])
    assert _chat_ids(tok, fitted) == fit_prompt(tok, Record.from_prompt(long, "-"), 64)
    whole = check_parity(fused["fused"], onnx_fp32, "onnx", [long], max_new_tokens=2)
    assert whole.details[0]["prompt"] == long[:200]  # 0 = whole prompts, as before


def test_failed_parity_publishes_no_export_folder(fused, tmp_path):
    out = tmp_path / "onnx-int8"
    with pytest.raises(ParityError):
        # int8 is judged by agreement; > 1 can never be reached.
        export_model(fused["fused"], out, target="onnx", precision="int8", execution_provider="cpu", parity_prompts=PROMPTS[:1], min_agreement=1.01)
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
    manifest = write_manifest(tmp_path, target="onnx", precision="fp32", tasks=[{"id": "x", "name": "x", "examples": 1}])
    assert set(manifest["files"]) == {"a.bin", "sub/b.bin"}
    assert verify_manifest(tmp_path)["export"]["target"] == "onnx"
    (tmp_path / "sub" / "b.bin").write_bytes(b"B")
    with pytest.raises(IntegrityError, match="b.bin"):
        verify_manifest(tmp_path)


# --------------------------------------------------------------------------- settings


def test_resolve_export_settings(monkeypatch):
    import edgekif.export as export

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
    from edgekif.infer import GenaiRunner, OnnxRunner, open_current
    from edgekif.publish import ModelStore

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
def test_smollm2_default_cpu_export_passes_parity_and_serves(smollm2, tmp_path):
    from edgekif.infer import GenaiRunner

    peft_model = add_lora(load_model(smollm2.path, "fp32"), LoRAConfig())  # zero LoRA: fused == base
    fused_dir = fuse_model(peft_model, smollm2.path, tmp_path / "fused")
    prompts = ["What is the capital of France?", "Name a fruit.", "Classify the sentiment: I loved this film."]
    out = export_model(
        fused_dir, tmp_path / "export", target="genai", precision="auto", execution_provider="cpu",
        parity_prompts=prompts, manifest_info={"base_model_id": smollm2.name, "base_model_sha256": smollm2.source_sha256},
    )
    manifest = verify_manifest(out)
    # int4 of this 135M base does not reach the bar (measured ~70% agreement); auto falls back.
    assert manifest["export"]["precision"] in ("int4", "int8", "fp32")
    assert manifest["parity"]["agreement"] >= 0.95 and manifest["parity"]["positions"] >= 10
    assert [r["precision"] for r in manifest.get("parity_rejected", [])] == ["int4", "int8", "fp32"][: len(manifest.get("parity_rejected", []))]
    # Where no position was a flipped near-tie, the runner's free greedy answer is PyTorch's.
    report = check_parity(fused_dir, out, "genai", prompts, max_new_tokens=8)
    runner = GenaiRunner(out)
    exact = [d for d in report.details if d["torch_tokens"] == d["export_tokens"]]
    assert exact, report.details
    for d in exact:
        want = [t for t in d["torch_tokens"] if t not in runner.eos_ids]
        assert runner.generate_ids(d["prompt"], len(d["torch_tokens"]))[: len(want)] == want


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_trained_adapter_cpu_export_answers_with_the_pytorch_label(smollm2, benchmark_data, tmp_path):
    """A LoRA adapter trained on a benchmark task, fused and exported for CPU (`auto`): the
    published export answers test prompts with the labels the PyTorch model gives wherever
    PyTorch's choice is clear.

    Deterministic: seeded, train.deterministic=true. The comparison itself holds for any
    adapter: a quantised export may flip a near-tie between two labels (int8 did, 'Science or
    Technology' vs 'Sports', on an unseeded run), so agreement is required only where PyTorch's
    best label beats the runner-up by a clear log-likelihood margin. int4 of such an adapter
    fails parity on this base (measured), so `auto` publishes the next precision."""
    from edgekif.config import Config
    from edgekif.data import read_task
    from edgekif.evaluate import generate_answers, label_logprobs
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
    test = read_task(benchmark_data / "agnews" / "test.jsonl").records[:6]
    torch_answers = generate_answers(learner.model, tok, test, max_new_tokens=6)
    labelled = [(r, a) for r, a in zip(test, torch_answers) if a in train.labels]
    assert len(labelled) >= 3, torch_answers  # the adapter learned the answer format
    logps = label_logprobs(learner.model, tok, [r for r, _ in labelled], train.labels)
    margins = [sorted(lp, reverse=True)[0] - sorted(lp, reverse=True)[1] for lp in logps]

    fused = fuse_model(learner.model, smollm2.path, tmp_path / "fused")
    prompts = [r.messages[-1][1] for r, _ in labelled[:2]]
    out = export_model(fused, tmp_path / "export", target="genai", precision="auto", execution_provider="cpu", parity_prompts=prompts)
    manifest = verify_manifest(out)
    assert manifest["export"]["precision"] in ("int8", "fp32")
    assert [r["precision"] for r in manifest["parity_rejected"]][:1] == ["int4"]
    runner = GenaiRunner(out)
    got = [runner.generate([{"role": role, "content": text} for role, text in r.messages], 6).strip() for r, _ in labelled]
    clear = [(g, a) for g, (_, a), m in zip(got, labelled, margins) if m > CLEAR_MARGIN]
    assert [g for g, _ in clear] == [a for _, a in clear], (got, torch_answers, margins)


CLEAR_MARGIN = 1.0  # nats between PyTorch's best and second-best label: no quantisation tie


# --------------------------------------------------------------------------- published template = training format (issue 11)

@pytest.fixture(scope="module")
def smol_style(tmp_path_factory, smollm2_template):
    """A tiny base whose tokenizer carries SmolLM2's template, fused with a LoRA and exported
    both ways, as the daemon publishes models."""
    from edgekif.model import tiny_llama

    root = tmp_path_factory.mktemp("smol-style")
    model, tok = tiny_llama()
    tok.chat_template = smollm2_template
    model.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    adapter = root / "adapter"
    _random_lora(root / "base").save_pretrained(adapter, safe_serialization=True)
    fused_dir = fuse_adapter(root / "base", adapter, root / "fused")
    kw = dict(execution_provider="cpu", precision="fp32", parity_prompts=PROMPTS[:1], max_new_tokens=2)
    return {
        "base": root / "base",
        "genai": export_model(fused_dir, root / "genai", target="genai", **kw),
        "onnx": export_model(fused_dir, root / "onnx", target="onnx", **kw),
    }


def test_published_template_renders_the_training_prompt(smol_style, smollm2_template):
    """A client that sends only a user message gets exactly the tokens training used."""
    from transformers import AutoTokenizer

    from edgekif.data import encode_example, encode_target, render_prompt
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
