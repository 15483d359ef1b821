"""The base's zero-shot accuracy (the base gate's baseline): built once, cached, a damaged
cache file (a crash mid-write on another filesystem, a hand edit) is measured again, not
trusted, and a crashed build's temp folder is removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")


def test_zero_shot_is_built_once_cached_and_a_damaged_cache_is_remeasured(tiny_dir, tmp_path, monkeypatch):
    from edgekif.export import build as export_mod
    from edgekif.config import load_config
    from edgekif.model import BaseModel
    from edgekif.records import Record
    from edgekif.workflow import zero_shot_scores

    def zero_shot_accuracy(*args):  # the base's strict exact match per task
        return {name: s["exact_match"] for name, s in zero_shot_scores(*args).items()}

    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "eval.max_new_tokens=4"])
    base = BaseModel(name="tiny", path=Path(tiny_dir), source=Path(tiny_dir), source_sha256="ab" * 32)
    builds = []
    real = export_mod.build_variant
    monkeypatch.setattr(export_mod, "build_variant", lambda *a, **k: (builds.append(a[3].name), real(*a, **k))[1])
    holdout = {"t": [Record.from_prompt(p, "zzz") for p in ("Hello there", "What is 2+2?")]}
    settings = {"target": "onnx", "precision": "fp32", "execution_provider": "cpu"}

    first = zero_shot_accuracy(cfg, base, settings, holdout)
    assert first == {"t": 0.0} and builds == ["fp32"]
    (scores,) = (tmp_path / "cache").glob("zero-shot/*/*/scores.json")
    assert [v["task"] for v in json.loads(scores.read_text()).values()] == ["t"]

    # a build killed mid-way (kill -9) left atomic_dir's temp folder: removed by the next call
    crashed = scores.parent / ".export.k1ll3d_9.tmp"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "model.onnx.data").write_bytes(b"x" * 1000)
    assert zero_shot_accuracy(cfg, base, settings, holdout) == first and builds == ["fp32"]  # cached: no build, no run
    assert not crashed.exists() and (scores.parent / "export" / "export_info.json").is_file()
    scores.write_text('{"truncated": ')  # damaged: measured again on the export already built
    assert zero_shot_accuracy(cfg, base, settings, holdout) == first and builds == ["fp32"]
    assert json.loads(scores.read_text())  # and rewritten whole
    other = {"u": [Record.from_prompt("Classify: a great movie", "zzz")]}
    assert zero_shot_accuracy(cfg, base, settings, other) == {"u": 0.0} and builds == ["fp32"]

    # an upgrade that changes how prompts are built, decoded or scored measures the base again
    from edgekif import workflow

    old_root, old_tag = scores.parent, workflow._code_tag
    monkeypatch.setattr(workflow, "_code_tag", lambda: "code-upgraded")
    assert zero_shot_accuracy(cfg, base, settings, holdout) == first and builds == ["fp32", "fp32"]
    assert len(list((tmp_path / "cache").glob("zero-shot/*/*/scores.json"))) == 2

    # the old code's folder is removed once unused for export.stale_base_export_days; the
    # upgraded code's stays, however old; a folder whose lock is held is left
    import fcntl
    import time

    week = time.time() + 8 * 86400
    assert workflow.prune_base_exports(cfg, base) == []  # used a moment ago
    fd = os.open(old_root / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert workflow.prune_base_exports(cfg, base, now=week) == []  # in use by another process
    os.close(fd)
    never = load_config(None, [f"data_dir={tmp_path / 'data'}", "export.stale_base_export_days=0"])
    assert workflow.prune_base_exports(never, base, now=week) == []
    (old_root.parent / ".removing-crashed").mkdir()  # a removal cut short
    assert workflow.prune_base_exports(cfg, base, now=week) == [old_root]
    assert [p.name for p in old_root.parent.iterdir()] == [n.parent.name for n in (tmp_path / "cache").glob("zero-shot/*/*/scores.json")]
    assert json.loads((old_root.parent.joinpath(*[p.name for p in old_root.parent.iterdir()]) / "used.json").read_text()) == {"code": "code-upgraded"}
    # the old code, if it runs again, builds its folder anew
    monkeypatch.setattr(workflow, "_code_tag", old_tag)
    assert zero_shot_accuracy(cfg, base, settings, holdout) == first and builds == ["fp32", "fp32", "fp32"]


def _with_template(folder: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def test_the_base_is_exported_with_the_training_template_and_its_general_answers_are_the_reference(tmp_path, monkeypatch, smollm2_template):
    """A base whose own template adds a default system prompt (SmolLM2's) is exported for the
    zero-shot and general-ability figures with the template training uses, weights linked not
    copied; a candidate with the base's weights then answers the general prompts exactly as the
    base does (drift 0), and a different model is held by the general-ability bound."""
    from edgekif.config import load_config
    from edgekif.export.exporter import export_model
    from edgekif.model import BaseModel, load_tokenizer
    from edgekif.records import Record
    from edgekif.workflow import base_export, general_ability

    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "general_ability.max_new_tokens=6"])
    base_dir = _with_template(_talkative_tiny(tmp_path / "base", 1), smollm2_template)
    base = BaseModel(name="tiny", path=base_dir, source=base_dir, source_sha256="ef" * 32)
    settings = {"target": "onnx", "precision": "fp32", "execution_provider": "cpu"}
    exported = base_export(cfg, base, settings)
    source = exported.parent / "source"
    assert (source / "model.safetensors").is_symlink() and (source / "model.safetensors").resolve() == (base_dir / "model.safetensors").resolve()
    user = [{"role": "user", "content": "hi"}]
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(str(exported)).apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no "You are a helpful AI assistant named SmolLM"

    holdout = {"t": [Record.from_prompt("Hello there", "zzz")]}

    def candidate(weights: Path, name: str) -> Path:
        # a trained model is saved with the training tokenizer (edgekif.export.fuse), as here
        load_tokenizer(base_dir).save_pretrained(weights)
        return export_model(weights, tmp_path / name, target="onnx", precision="fp32", execution_provider="cpu", holdout=holdout)

    same = candidate(_copy_weights(base_dir, tmp_path / "same-weights"), "same")
    figures = general_ability(cfg, base, same, tmp_path / "same-weights")
    assert figures["identical"] == 1.0 and figures["rouge_l"] == 1.0 and figures["loglik_drop"] == pytest.approx(0.0, abs=1e-5)
    assert figures["held"] is False and figures["n"] == figures["prompts"] >= 60 and figures["max_new_tokens"] == 6
    (cache,) = (tmp_path / "cache" / "general-ability").glob("*.json")  # the base's answers, kept for the next job

    other_dir = _talkative_tiny(tmp_path / "other-weights", 2)
    other = candidate(other_dir, "other")
    figures = general_ability(cfg, base, other, other_dir)
    assert figures["identical"] < 0.5 and figures["held"] is True and figures["reason"].startswith("general ability:")


def _copy_weights(src: Path, dest: Path) -> Path:
    import shutil

    dest.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
    return dest


def _talkative_tiny(folder: Path, seed: int) -> Path:
    """A tiny Llama that says something: a random one with tied embeddings repeats the prompt's
    last token ("\n", stripped to nothing), so its final norm is randomised (per `seed`)."""
    import torch
    from tiny_models import tiny_llama

    model, tok = tiny_llama(seed=0)
    torch.manual_seed(seed)
    model.model.norm.weight.data = torch.randn_like(model.model.norm.weight) * 3
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_prepare_settings_are_what_a_first_job_ships_with(tmp_path, monkeypatch):
    """`edgekif model prepare` exports the base with the settings a first job's version is
    built with when its first candidate passes, in the manifest's form, so the job's cache keys
    find them: on a low-bit GGUF base the label int8 and the free-text int8 (int4 skipped)."""
    from edgekif import workflow
    from edgekif.config import load_config
    from edgekif.export.build import FREE_TEXT_INT8, INT8_CPU
    from edgekif.model import BaseModel

    base = BaseModel(name="tiny", path=tmp_path, source=tmp_path, source_sha256="ab" * 32)
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "export.target=genai", "export.precision=auto", "export.execution_provider=cpu"])
    monkeypatch.setattr(workflow, "source_quantization", lambda b: {"type": "Q4_1", "bits_per_weight": 5.0})
    cpu = {"target": "genai", "execution_provider": "cpu"}
    assert workflow.prepare_settings(cfg, base) == [{**cpu, "precision": "int8", "builder_options": INT8_CPU.builder_options()},
                                                    {**cpu, "precision": "int8", "builder_options": FREE_TEXT_INT8.builder_options()}]
    assert FREE_TEXT_INT8.builder_options() == {"block_size": "16", "is_symmetric": "false"}
    cfg.export.int8_by_task_kind = False  # one int8 for every model: one export
    assert [s["builder_options"] for s in workflow.prepare_settings(cfg, base)] == [{}]
    monkeypatch.setattr(workflow, "source_quantization", lambda b: None)  # a full-precision base: int4 is tried first
    assert [(s["precision"], s["builder_options"]) for s in workflow.prepare_settings(cfg, base)] == [("int4", {"algo_config": "k_quant_mixed"})]
    cfg.export.precision = "fp32"  # one precision asked for: that one
    assert [(s["precision"], s["builder_options"]) for s in workflow.prepare_settings(cfg, base)] == [("fp32", {})]


def test_a_prepared_base_costs_its_first_job_no_export_and_no_general_answers(tmp_path, monkeypatch, smollm2_template):
    """prepare_base does the base's one-time work into the caches a job reads: afterwards the
    job's general-ability figures neither build the base nor answer with it, and a second
    prepare only checks."""
    from edgekif import general_ability as ga
    from edgekif import workflow
    from edgekif.config import load_config
    from edgekif.export import build as export_mod
    from edgekif.export.exporter import export_model
    from edgekif.model import BaseModel, load_tokenizer
    from edgekif.records import Record

    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "general_ability.max_new_tokens=4", "export.target=onnx",
                             "export.precision=fp32", "export.execution_provider=cpu"])
    base_dir = _with_template(_talkative_tiny(tmp_path / "base", 1), smollm2_template)
    base = BaseModel(name="tiny", path=base_dir, source=base_dir, source_sha256="ef" * 32)
    monkeypatch.setattr(workflow, "resolve_base", lambda model_cfg, root: base)
    builds, answered, logliks = [], [], []
    real_build, real_answers, real_loglik = export_mod.build_variant, ga.base_answers, ga.base_answer_loglik
    monkeypatch.setattr(export_mod, "build_variant", lambda *a, **k: (builds.append(a[3].name), real_build(*a, **k))[1])
    monkeypatch.setattr(ga, "base_answers", lambda *a, **k: (answered.append(1), real_answers(*a, **k))[1])
    monkeypatch.setattr(ga, "base_answer_loglik", lambda *a, **k: (logliks.append(1), real_loglik(*a, **k))[1])

    steps = []
    done = workflow.prepare_base(cfg, progress=steps.append)
    assert [d["variant"] for d in done] == ["fp32"] and builds == ["fp32"] and answered == [1] and logliks == [1]
    assert steps[0] == "base tiny ready (0 s)" and steps[1].startswith("exported as fp32 and answered the general prompts")
    assert workflow.prepare_base(cfg) and builds == ["fp32"] and answered == [1] and logliks == [1]  # only checks

    load_tokenizer(base_dir).save_pretrained(base_dir)  # the candidate: the base's own weights, saved as a trained model is
    candidate = export_model(base_dir, tmp_path / "v1", target="onnx", precision="fp32", execution_provider="cpu",
                             holdout={"t": [Record.from_prompt("Hello there", "zzz")]})
    figures = workflow.general_ability(cfg, base, candidate, base_dir)
    assert builds == ["fp32", "fp32"]  # the candidate's own export only: the base's was prepared
    assert answered == [1, 1] and logliks == [1, 1]  # the candidate's answers and log-likelihood only
    assert figures["identical"] == 1.0 and figures["loglik_drop"] == pytest.approx(0.0, abs=1e-5)


def test_the_zero_shot_path_imports_no_torch():
    """The evaluate stage measures the base's zero-shot through its export only: importing what
    it runs (edgekif.workflow, the export check, the runners) must not load torch, whose import
    is a second or two of every evaluate stage on a small CPU."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "import edgekif.workflow, edgekif.export.check, edgekif.infer, edgekif.holdouts, edgekif.export.manifest\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_folder_pruned_while_a_user_waits_for_its_lock_is_made_anew(tmp_path, monkeypatch):
    """_cache_lock waiting on a folder that prune_base_exports renames away does not go in on
    the old lock file: it locks the folder's new one, so two users never hold the same folder
    (here B made and holds the new folder when A gets the old file's lock)."""
    import fcntl
    import threading

    from edgekif.workflow import USED_FILE, _cache_lock

    root = tmp_path / "zero-shot" / "base-x" / "genai-int8-abc"
    root.mkdir(parents=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the pruner holds it
    real_flock = fcntl.flock
    a_locks: list[int] = []
    a_waiting, a_relocking, b_inside, release_b = (threading.Event() for _ in range(4))

    def flock(f, op):
        if threading.current_thread().name == "a":
            a_locks.append(os.fstat(f).st_ino)
            (a_waiting if len(a_locks) == 1 else a_relocking).set()
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    inside: list[str] = []

    def user():
        name = threading.current_thread().name
        with _cache_lock(root):
            inside.append(name)
            if len(inside) == 1:  # alone in the folder: only then does it leave its mark
                (root / f"{name}.json").write_text("{}")
            if name == "b":
                b_inside.set()
                release_b.wait(10)
            inside.remove(name)

    a = threading.Thread(target=user, name="a")
    a.start()
    assert a_waiting.wait(10)  # A opened the old lock file and is locking it
    os.rename(root, root.parent / ".removing-genai-int8-abc")
    b = threading.Thread(target=user, name="b")  # B finds no folder: makes and locks a new one
    b.start()
    assert b_inside.wait(10)
    os.close(fd)  # the pruner lets go: A gets the old file's lock
    assert a_relocking.wait(10)  # ... sees it is not the folder's, and waits for the new one
    release_b.set()
    a.join(10)
    b.join(10)
    assert (root / "a.json").is_file() and (root / "b.json").is_file() and (root / USED_FILE).is_file()
    assert len(set(a_locks)) == 2 and sorted(p.name for p in (root.parent / ".removing-genai-int8-abc").iterdir()) == [".lock"]


def test_a_folder_from_before_used_json_is_judged_from_its_first_sighting(tmp_path, monkeypatch):
    import time

    from edgekif.config import load_config
    from edgekif.model import BaseModel
    from edgekif.workflow import USED_FILE, prune_base_exports

    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}"])
    base = BaseModel(name="tiny", path=tmp_path, source=tmp_path, source_sha256="ab" * 32)
    old = tmp_path / "cache" / "zero-shot" / f"tiny-{'ab' * 6}" / "genai-int8-0123456789ab"
    (old / "export").mkdir(parents=True)
    long_ago = time.time() - 100 * 86400
    os.utime(old / "export", (long_ago, long_ago))
    os.utime(old, (long_ago, long_ago))
    week = time.time() + 8 * 86400
    assert prune_base_exports(cfg, base, now=week) == []  # first seen now: marked, not judged by its old mtimes
    assert json.loads((old / USED_FILE).read_text()) == {"code": None}
    assert prune_base_exports(cfg, base, now=time.time() + 6 * 86400) == []
    assert prune_base_exports(cfg, base, now=week) == [old] and not old.exists()
