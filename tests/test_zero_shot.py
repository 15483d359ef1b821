"""The base's zero-shot accuracy (the base gate's baseline): built once, cached, a damaged
cache file (a crash mid-write on another filesystem, a hand edit) is measured again, not
trusted, and a crashed build's temp folder is removed."""

from __future__ import annotations

import json
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
