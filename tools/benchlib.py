"""What every benchmark tool stamps on its results: the machine and the package versions."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai", "onnxruntime-gpu", "onnxruntime-genai-cuda")


def cache_dir() -> Path:
    """Where converted base models are cached: $EDGEKIF_CACHE_DIR (the library's variable,
    edgekif.workflow.cache_root), else ~/.cache/edgekif, shared by every tool and `make demo`."""
    return Path(os.environ.get("EDGEKIF_CACHE_DIR") or Path.home() / ".cache" / "edgekif")


def gpu_figures_measured(path: Path) -> bool:
    """True if a gpu_check.json (tools/gpu_check.py) holds figures measured on a GPU."""
    try:
        return json.loads(Path(path).read_text()).get("status") == "measured"
    except (OSError, ValueError, AttributeError):
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM and versions; no torch import (the caller may not want it)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gb": ram_gb(), "python": platform.python_version(), "versions": package_versions()}


def profile_settings(profiles: dict[str, dict], name: str, args: Any, keys: tuple[str, ...]) -> dict:
    """A profile's settings with the command-line options that override them (None = not given)."""
    prof = dict(profiles[name])
    for key in keys:
        if getattr(args, key, None) is not None:
            prof[key] = getattr(args, key)
    return prof
