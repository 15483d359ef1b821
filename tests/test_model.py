"""Base model provider: GGUF conversion (real SmolLM2), precision modes, LoRA training."""

from __future__ import annotations

import os
import time

import pytest
import torch

from edgekif.config import LoRAConfig, ModelConfig
from edgekif.errors import ModelError
from edgekif.model import add_lora, load_model, load_tokenizer, locate_default_gguf, lora_parameters, resolve_base


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_lora_trains_and_loss_falls_on_repeated_batch(tiny_dir, precision):
    model = add_lora(load_model(tiny_dir, precision), LoRAConfig(r=4, alpha=8, dropout=0.0))
    params = lora_parameters(model)
    assert params and all("lora_" in n for n in params)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # the base stays frozen
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    x = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    if precision == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_bad_base_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        resolve_base(ModelConfig(base=str(tmp_path)), tmp_path / "cache")
    with pytest.raises(ModelError, match="model.base"):
        resolve_base(ModelConfig(base=str(tmp_path / "nope")), tmp_path / "cache")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="cannot load GGUF"):
        resolve_base(ModelConfig(base=str(bad)), tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").glob("*/config.json"))  # nothing half-written


def test_local_hf_folder_as_base(tiny_dir, tmp_path):
    base = resolve_base(ModelConfig(base=str(tiny_dir)), tmp_path)
    assert base.path == tiny_dir and len(base.source_sha256) == 64


@pytest.mark.integration
def test_gguf_conversion_once_and_logits_match(smollm2):
    """The converted folder reproduces the GGUF-loaded model's logits, and a second resolve is a cache hit."""
    from transformers import AutoModelForCausalLM

    gguf = locate_default_gguf()
    cache_root = smollm2.path.parent.parent
    stamp = os.stat(smollm2.path / "model.safetensors").st_mtime_ns
    t = time.perf_counter()
    again = resolve_base(ModelConfig(), cache_root)
    assert again.path == smollm2.path and time.perf_counter() - t < 5  # no second conversion
    assert os.stat(again.path / "model.safetensors").st_mtime_ns == stamp
    assert len(smollm2.source_sha256) == 64

    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    conv = load_model(smollm2.path, "fp32")
    tok = load_tokenizer(smollm2.path)
    assert tok.chat_template and "im_start" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_dict=True)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, conv(x).logits, atol=1e-4)


def test_auto_precision_is_fp32_and_nf4_only_for_a_base_too_large_for_the_gpu(monkeypatch, tmp_path):
    """What measured best per device: fp32 on CPU (nf4 was slower and larger there); on CUDA fp32
    (nf4 was 2x slower than bf16 on an H200 and saved 12% of the peak), nf4 only when the base's
    fp32 weights exceed a quarter of the GPU's memory and bitsandbytes works."""
    from edgekif import model as m

    small, large = tmp_path / "small", tmp_path / "large"
    for folder, size in ((small, 1000), (large, 3000)):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * size)
    monkeypatch.setattr(m, "_gpu_memory", lambda device: 8000)  # a quarter: 2000 bytes
    monkeypatch.setattr(m, "bitsandbytes_available", lambda: True)
    assert m.resolve_precision("auto", "cpu", large) == "fp32"
    assert m.resolve_precision("auto", "cuda", small) == "fp32" and m.resolve_precision("auto", "cuda:1", small) == "fp32"
    assert m.resolve_precision("auto", "cuda", large) == "nf4" and m.resolve_precision("auto", "cuda:1", large) == "nf4"
    assert m.resolve_precision("auto", "cuda") == "fp32"  # size unknown: full precision
    assert m.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(m, "bitsandbytes_available", lambda: False)
    assert m.resolve_precision("auto", "cuda", large) == "fp32"
    assert m.weight_bytes(large) == 3000


def _write_gguf(path, projection_type, n_projections=3):
    """A GGUF header with `n_projections` 2-D weights of `projection_type`, an F16 embedding and
    an F32 norm: enough for edgekif.model.source_quantization (no model behind it)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="llama")
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for i in range(n_projections):
        if projection_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            w.add_tensor(f"blk.{i}.attn_q.weight", a.astype(np.float16 if projection_type == gguf.GGMLQuantizationType.F16 else np.float32))
        else:
            w.add_tensor(f"blk.{i}.attn_q.weight", gguf.quants.quantize(a, projection_type), raw_dtype=projection_type)
    w.add_tensor("token_embd.weight", a.astype(np.float16))
    w.add_tensor("norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_low_bit_gguf_base_skips_int4_in_auto_and_the_reason_names_its_type(tmp_path):
    """source_quantization reads the projections' dominant type from the GGUF header (bits per
    weight with the block scales), memoised beside the converted model; the export's known
    failures skip int4 for a base below 8 bits, not for an F16 one, nor when the config says try."""
    from gguf import GGMLQuantizationType as Q

    from edgekif.config import Config
    from edgekif.model import QUANT_FILE, BaseModel, source_quantization
    from edgekif.workflow import _known_failures

    def base(qtype, name):
        (tmp_path / name).mkdir()
        _write_gguf(tmp_path / f"{name}.gguf", qtype)
        return BaseModel(name=name, path=tmp_path / name, source=tmp_path / f"{name}.gguf", source_sha256=name * 4)

    low, high, q8 = base(Q.Q4_1, "low"), base(Q.F16, "high"), base(Q.Q8_0, "q8")
    assert source_quantization(low) == {"type": "Q4_1", "bits_per_weight": 5.0, "share": 0.75}  # 3 of 4 2-D weights
    assert source_quantization(high)["bits_per_weight"] == 16.0 and source_quantization(q8)["bits_per_weight"] == 8.5
    cfg = Config()
    reason = _known_failures(cfg, low)["int4"]
    assert "Q4_1 (5.0 bits per weight)" in reason and "export.int4_on_low_bit_base" in reason
    assert _known_failures(cfg, high) == {} and _known_failures(cfg, q8) == {}
    cfg.export.int4_on_low_bit_base = True
    assert _known_failures(cfg, low) == {}
    # memoised for this GGUF's hash: the header is not read again (a changed file, a new hash, is)
    (tmp_path / "low.gguf").write_bytes(b"not a gguf any more")
    assert source_quantization(low)["type"] == "Q4_1"
    assert (tmp_path / "low" / QUANT_FILE).is_file()
    changed = BaseModel(name="low", path=low.path, source=low.source, source_sha256="other")
    assert source_quantization(changed) is None  # unreadable now: no prior, the check decides
    assert source_quantization(BaseModel(name="dir", path=tmp_path / "high", source=tmp_path / "high", source_sha256="x")) is None


def test_converted_base_is_found_without_hashing_or_writing(tmp_path):
    """edgekif check's look at the cache: a known base by name, a GGUF file by its path, a
    model folder as itself; None before a conversion; nothing is written."""
    import json

    from edgekif.config import ModelConfig
    from edgekif.model import SOURCE_FILE, converted_base

    cache = tmp_path / "cache"
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    assert converted_base(ModelConfig(base="smollm2-135m-instruct"), cache) is None and not cache.exists()
    for digest, info in (("a" * 16, {"name": "smollm2-135m-instruct", "source": "/x.gguf"}), ("b" * 16, {"name": "mine", "source": str(gguf)})):
        (cache / "models" / digest).mkdir(parents=True)
        (cache / "models" / digest / SOURCE_FILE).write_text(json.dumps(info))
    assert converted_base(ModelConfig(base="smollm2-135m-instruct"), cache) == cache / "models" / ("a" * 16)
    assert converted_base(ModelConfig(base=""), cache) == cache / "models" / ("a" * 16)  # the default base
    assert converted_base(ModelConfig(base=str(gguf)), cache) == cache / "models" / ("b" * 16)
    assert converted_base(ModelConfig(base="gemma3-270m"), cache) is None
    folder = tmp_path / "hf"
    folder.mkdir()
    assert converted_base(ModelConfig(base=str(folder)), cache) is None  # no config.json
    (folder / "config.json").write_text("{}")
    assert converted_base(ModelConfig(base=str(folder)), cache) == folder
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["a" * 16, "b" * 16]  # nothing added


def test_a_folder_base_s_hash_covers_its_tokenizer_files(tmp_path):
    """The hash keys every cache of the base (its export, zero-shot scores, general answers):
    an edited chat template or tokenizer file must not reuse what the old one measured."""
    from edgekif.model import _folder_hash

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "merges.txt", "tokenizer.model"):
        (base / name).write_text(name)
    before = _folder_hash(base)
    for name in ("chat_template.jinja", "merges.txt", "tokenizer.model"):
        (base / name).write_text("changed")
        assert _folder_hash(base) != before, name
        before = _folder_hash(base)
    (base / "README.md").write_text("notes")  # not part of the model
    assert _folder_hash(base) == before
