"""Every published version carries its peft adapter (adapter/), loadable on another machine
that has the same base: a portable base_model_name_or_path and the base's SHA-256 in the manifest."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgekif.config import Config, LoRAConfig, ModelConfig
from edgekif.errors import IntegrityError
from edgekif.export.fuse import adapter_sha256
from edgekif.export.manifest import verify_manifest
from edgekif.model import add_lora, load_model, load_tokenizer, model_info, resolve_base
from edgekif.publish import ModelStore
from edgekif.records import Record
from edgekif.workflow import export_adapter

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def published(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-publish")
    base_dir = shutil.copytree(tiny_dir, root / "machine-a" / "cache" / "tiny-llama")
    base = resolve_base(ModelConfig(base=str(base_dir)), root / "cache")
    torch.manual_seed(1)
    peft_model = add_lora(load_model(base.path, "fp32"), LORA)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA is a no-op (B = 0): make it change the model
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    learner_adapter = root / "jobs" / "1" / "learner" / "adapter"
    peft_model.save_pretrained(learner_adapter, safe_serialization=True)
    cfg = Config()
    cfg.export.target, cfg.export.precision, cfg.export.execution_provider = "onnx", "fp32", "cpu"
    holdout = {"prompts": [Record.from_prompt("Hello there", ""), Record.from_prompt("Classify: a great movie", "")]}
    out = export_adapter(cfg, base, learner_adapter, root / "work", root / "export", holdout=holdout, manifest_info={"tasks": []})
    version = ModelStore(root / "data").publish(out)
    ids = torch.tensor([load_tokenizer(base.path)("Classify: a great movie")["input_ids"]])
    return {"root": root, "base": base, "base_dir": base_dir, "folder": root / "data" / "models" / version,
            "learner_adapter": learner_adapter, "ids": ids, "peft_logits": _logits(peft_model, ids)}


def test_version_holds_the_adapter_covered_by_the_manifest(published):
    folder = published["folder"]
    manifest = verify_manifest(folder).to_dict()
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    # the weights are the learner's, byte for byte: adapter_sha256 names the published file
    assert manifest["adapter_sha256"] == adapter_sha256(folder / "adapter") == adapter_sha256(published["learner_adapter"])
    base = published["base"]
    assert manifest["adapter"] == {
        "path": "adapter/", "format": "peft", "peft_version": manifest["adapter"]["peft_version"], "peft_type": "LORA",
        "r": 4, "lora_alpha": 8, "target_modules": ["down_proj", "o_proj", "q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
        "base_model": {"id": "tiny-llama", "sha256": base.source_sha256, "source_file": "tiny-llama"},
    }
    assert manifest["adapter"]["peft_version"]
    assert manifest["base_model"] == {"id": "tiny-llama", "sha256": base.source_sha256}


def test_adapter_config_names_the_base_not_a_local_path(published):
    text = (published["folder"] / "adapter" / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == "tiny-llama"
    assert str(published["root"]) not in text  # nothing of this machine's paths


def test_adapter_loads_on_a_moved_copy_of_the_base_and_matches_the_fused_model(published, tmp_path):
    from peft import PeftModel

    # "another machine": the same base under another path, the original gone
    elsewhere = shutil.copytree(published["base_dir"], tmp_path / "machine-b" / "models" / "tiny-llama")
    shutil.rmtree(published["base_dir"])
    try:
        # how a user checks the base: its SHA-256 as edgekif computes it equals the manifest's
        assert model_info(ModelConfig(base=str(elsewhere)), tmp_path / "cache")["source_sha256"] == \
            json.loads((published["folder"] / "manifest.json").read_text())["adapter"]["base_model"]["sha256"]
        model = PeftModel.from_pretrained(load_model(elsewhere, "fp32"), str(published["folder"] / "adapter")).eval()
        ids = published["ids"]
        logits = _logits(model, ids)
        fused = load_model(published["root"] / "work" / "fused", "fp32").eval()
        assert torch.allclose(logits, published["peft_logits"], atol=1e-5)
        assert torch.allclose(logits, _logits(fused, ids), atol=1e-4)
        # and the adapter does something: not the bare base
        assert not torch.allclose(logits, _logits(load_model(elsewhere, "fp32").eval(), ids), atol=1e-2)
    finally:
        shutil.copytree(elsewhere, published["base_dir"])


def test_a_modified_adapter_fails_verification(published, tmp_path):
    copy = shutil.copytree(published["folder"], tmp_path / "v-copy")
    cfg = copy / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"tiny-llama"', '"other-base"'))
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        verify_manifest(copy)


def test_infer_file_answers_every_shape_from_its_chat_messages(published, tmp_path, capsys):
    """`edgekif infer --file` end to end on the published version: one line per prompt, each
    answer the one the runner gives for the prompt's chat messages."""
    from edgekif.cli import main
    from edgekif.infer import open_model

    f = tmp_path / "prompts.jsonl"
    rows = [{"id": "a1", "instruction": "Topic?", "input": "Text: x", "output": "A"}, {"prompt": "2+2?"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "plain"]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["infer", "--model", str(published["folder"]), "--file", str(f), "--max-new-tokens", "3", "--data-dir", str(tmp_path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["line"], o.get("id")) for o in out] == [(1, "a1"), (2, None), (3, None), (4, None)]
    assert [o["messages"] for o in out] == [[{"role": "user", "content": "Topic?\nText: x"}], [{"role": "user", "content": "2+2?"}],
                                            [{"role": "user", "content": "hi"}], [{"role": "user", "content": "plain"}]]
    runner = open_model(published["folder"])
    answers = [o["answer"] for o in out]
    assert answers == [runner.generate(o["messages"], max_new_tokens=3) for o in out]


@pytest.mark.parametrize("kinds, expected, second", [
    (["generation", "generation"], "int8/block_size=16/is_symmetric=false", "int8"),
    (["generation", "classification"], "int8", "int8/block_size=16/is_symmetric=false"),
    (["generation", None], "int8", "int8/block_size=16/is_symmetric=false"),  # a task without a spec is scored like a label
])
def test_export_adapter_picks_the_int8_variant_from_the_kinds_of_every_task_it_answers(published, tmp_path, monkeypatch, kinds, expected, second):
    import edgekif.export.exporter as exporter
    from edgekif.tasks import TaskSpec

    seen = {}
    monkeypatch.setattr(exporter, "export_model", lambda fused, out, **kw: seen.update(kw) or out)
    tasks = [f"t{i}" for i in range(len(kinds))]
    holdout = {t: [Record.from_prompt("Hello there", "hi")] for t in tasks}
    specs = {t: TaskSpec(k, "rouge_l" if k == "generation" else "normalized_exact_match", 8, "detected") for t, k in zip(tasks, kinds) if k}
    export_adapter(Config(), published["base"], published["learner_adapter"], tmp_path / "work", tmp_path / "export",
                   holdout=holdout, specs=specs, manifest_info={"tasks": []})
    # and the other int8 is tried before fp32, unless export.int8_second_try is off
    assert seen["int8"].name == expected and seen["int8_second"].name == second
    from edgekif.config import apply_overrides

    export_adapter(apply_overrides(Config(), ["export.int8_second_try=false"]), published["base"], published["learner_adapter"],
                   tmp_path / "work", tmp_path / "export", holdout=holdout, specs=specs, manifest_info={"tasks": []})
    assert seen["int8"].name == expected and seen["int8_second"] is None


def test_a_retry_reuses_the_fused_model_and_its_reference_only_when_they_are_this_model_s(published, tmp_path, monkeypatch):
    """The work folder keeps the fused model and the fp32 reference answers for a retry. Both
    belong to one adapter, base and chat template: with another template the model is fused
    anew and the old reference answers go with it (they would judge the new model by the old
    one's answers)."""
    import edgekif.export.exporter as exporter
    import edgekif.export.fuse as fuse
    from edgekif.config import apply_overrides

    monkeypatch.setattr(exporter, "export_model", lambda fused, out, **kw: out)
    fused_calls = []
    real_fuse = fuse.fuse_adapter
    monkeypatch.setattr(fuse, "fuse_adapter", lambda *a, **k: fused_calls.append(k.get("chat_template")) or real_fuse(*a, **k))
    work, holdout = tmp_path / "work", {"t": [Record.from_prompt("Hello there", "hi")]}

    def export(cfg):
        export_adapter(cfg, published["base"], published["learner_adapter"], work, tmp_path / "export", holdout=holdout, manifest_info={"tasks": []})

    export(Config())
    (work / "reference.json").write_text('{"key": "the fp32 answers of the fused model"}')
    export(Config())  # a retry: the same model
    assert fused_calls == [""] and (work / "reference.json").exists()
    export(apply_overrides(Config(), ["model.chat_template=chatml"]))
    assert fused_calls == ["", "chatml"] and not (work / "reference.json").exists()
