"""The install plans: a GPU host gets only the GPU ONNX runtimes, a CPU host only the CPU ones.

onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, as do onnxruntime-genai
and onnxruntime-genai-cuda; with both flavours in one environment the CUDA provider disappears
(microsoft/onnxruntime#26996). pyproject.toml keeps them in exclusive extras and the Makefile
picks one by nvidia-smi.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_RUNTIMES = {"onnxruntime", "onnxruntime-genai"}
GPU_RUNTIMES = {"onnxruntime-gpu", "onnxruntime-genai-cuda"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_runtimes_live_only_in_the_exclusive_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert not base & (CPU_RUNTIMES | GPU_RUNTIMES), "an ONNX runtime in the base dependencies reaches every host"
    assert extras["cpu"] == CPU_RUNTIMES and extras["gpu"] == GPU_RUNTIMES
    for name, members in extras.items():
        if name not in ("cpu", "gpu"):
            assert not members & (CPU_RUNTIMES | GPU_RUNTIMES), name


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("has_gpu,extras", [("0", "dev,cpu"), ("1", "dev,gpu")])
def test_makefile_installs_one_runtime_flavour_per_host(has_gpu, extras):
    # -n: print, run nothing; -B: as if nothing were installed yet; HAS_GPU on the command line
    # overrides the nvidia-smi probe.
    out = subprocess.run(["make", "-n", "-B", "setup", f"HAS_GPU={has_gpu}"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    installs = re.findall(r'pip install -q -e "\.\[([^\]]*)\]"', out)
    assert installs == [extras], out
    torch_line = next(line for line in out.splitlines() if "pip install" in line and "torch" in line)
    assert ("download.pytorch.org/whl/cpu" in torch_line) == (has_gpu == "0"), torch_line


def _registry_reachable() -> bool:
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "onnxruntime-genai-cuda", "--retries", "0", "--timeout", "15"],
                           capture_output=True, text=True, timeout=120)
    return probe.returncode == 0


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="onnxruntime-genai-cuda wheels are resolved for linux x86_64 here")
def test_gpu_install_plan_resolves_without_any_cpu_runtime(tmp_path):
    """Resolve what `make setup` installs on a GPU host (`pip install -e .[dev,gpu]`, after
    `pip install torch`) with pip's own resolver, nothing installed (`--dry-run --ignore-installed`),
    and check the plan holds the CUDA runtimes and no CPU one.

    torch stays in the resolution on purpose: on a GPU host the Makefile installs the default
    PyPI `torch` (the CUDA build) first, and the project's `torch>=2.4` then resolves to that
    same distribution, so one resolution of the project from PyPI yields the same set of names
    as the two steps; keeping it also checks that nothing under torch pulls `onnxruntime`.
    PyPI serves the wheels' metadata separately (PEP 658), so pip fetches metadata, not the
    multi-GB CUDA wheels: ~20 s on 2 cores. Skips when the registry cannot be reached.
    """
    report = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--retries", "1",
           "--timeout", "30", "--report", str(report), f"{REPO}[dev,gpu]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if not _registry_reachable():
            pytest.skip("package registry unreachable: GPU install plan not resolved")
        pytest.fail(f"pip could not resolve the GPU install plan:\n{proc.stderr[-3000:]}")
    plan = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert GPU_RUNTIMES <= plan, sorted(plan)
    assert not plan & CPU_RUNTIMES, f"CPU runtime(s) in the GPU plan: {sorted(plan & CPU_RUNTIMES)}"
    assert {"edgekif", "torch", "pytest"} <= plan  # the plan really is the project's, extras included


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_llama_cpp_is_installed_by_the_benchmarks_only():
    """llama-cpp-python compiles llama.cpp (minutes): `make test`/`make demo` must not install it."""
    setup = subprocess.run(["make", "-n", "-B", "setup", "HAS_GPU=0"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    bench = subprocess.run(["make", "-n", "-B", "bench-quick", "HAS_GPU=0"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "bench" not in re.findall(r'pip install -q -e "\.\[([^\]]*)\]"', setup)[0].split(",")
    assert '.[bench,cpu]' in bench
