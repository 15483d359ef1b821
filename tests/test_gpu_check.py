"""tools/gpu_check.py without a GPU: the install checks run, it says the GPU figures are missing
and exits 0; a GPU that torch cannot use is a failure (exit 1). Nothing heavy runs."""

from __future__ import annotations

import json

import pytest

from tools import gpu_check


def _no_training(*args, **kwargs):
    raise AssertionError("no GPU: nothing may train or export")


@pytest.fixture()
def no_heavy(monkeypatch):
    monkeypatch.setattr(gpu_check, "train_job", _no_training)
    monkeypatch.setattr(gpu_check, "export_and_speed", _no_training)


def test_without_a_gpu_it_checks_the_install_and_says_the_figures_are_missing(tmp_path, monkeypatch, capsys, no_heavy):
    monkeypatch.setattr(gpu_check, "nvidia_gpus", lambda: [])
    monkeypatch.setattr(gpu_check, "torch_info", lambda: {"version": "2.13.0+cpu", "cuda_build": None, "cuda_available": False})
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert gpu_check.NO_GPU in capsys.readouterr().out
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["status"] == "no_gpu" and "train" not in result and "export" not in result
    names = {c["name"]: c for c in result["checks"]}
    assert "one ONNX runtime flavour installed" in names
    if "make setup plan" not in names:  # make is installed: the plan is read from the Makefile
        assert result["environment"]["make_plan"]["extras"] == ["dev", "cpu"]
        assert names["make setup installs the cpu extra only"]["ok"] and names["make setup picks the CPU torch"]["ok"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("## GPU check") and gpu_check.NO_GPU in md


def test_a_gpu_that_torch_cannot_use_fails_the_check(tmp_path, monkeypatch, capsys, no_heavy):
    monkeypatch.setattr(gpu_check, "nvidia_gpus", lambda: ["GPU 0: NVIDIA Test (UUID: GPU-0)"])
    monkeypatch.setattr(gpu_check, "torch_info", lambda: {"version": "2.13.0+cpu", "cuda_build": None, "cuda_available": False})
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["status"] == "cuda_unavailable"
    failed = {c["name"] for c in result["checks"] if not c["ok"]}
    assert "torch is a CUDA build and sees the GPU" in failed


def test_both_runtime_flavours_installed_is_reported():
    dists = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1", "onnxruntime-genai-cuda": "0.18.0"}
    plan = {"torch_spec": "torch", "torch_index": "pypi", "extras": ["dev", "bench", "gpu"]}
    checks = {c["name"]: c["ok"] for c in gpu_check.environment_checks(["GPU 0: x"], plan, dists, {"cuda_available": True}, ["CPUExecutionProvider"])}
    assert checks["one ONNX runtime flavour installed"] is False
    assert checks["onnxruntime offers CUDAExecutionProvider"] is False
    assert checks["make setup installs the gpu extra only"] is True and checks["GPU runtimes installed"] is True


def test_a_cpu_run_leaves_figures_measured_on_a_gpu_alone(tmp_path, monkeypatch, no_heavy):
    monkeypatch.setattr(gpu_check, "nvidia_gpus", lambda: [])
    measured = json.dumps({"status": "measured", "train": {"nf4": {"sec_per_step": 0.1}}})
    (tmp_path / "gpu_check.json").write_text(measured)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "gpu_check.json").read_text() == measured
