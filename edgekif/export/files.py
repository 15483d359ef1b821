"""An export folder's file names, and export_info.json: the note each builder leaves on what
it built (target, precision, execution provider, runtime versions).

Shared by the builders (edgekif.export.build), the manifest (edgekif.export.manifest) and the
runners that read a folder (edgekif.infer), so none of them needs another for a name.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import ExportError

MANIFEST = "manifest.json"
EXPORT_INFO = "export_info.json"
ONNX_MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
ADAPTER_DIR = "adapter"  # the peft adapter inside an export / version folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def runtime_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("onnxruntime_genai", ("onnxruntime-genai", "onnxruntime-genai-cuda"))):
        out[key] = None
        for d in dists:
            try:
                out[key] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def write_export_info(folder: Path, target: str, precision: str, ep: str, **extra: Any) -> None:
    atomic_write_json(folder / EXPORT_INFO, {"target": target, "precision": precision, "execution_provider": ep, "runtime": runtime_versions(), **extra})


def read_export_info(folder: str | os.PathLike) -> dict[str, Any]:
    p = Path(folder) / EXPORT_INFO
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {EXPORT_INFO} (not an edgekif export folder)") from None
    except ValueError as e:
        raise ExportError(f"{p}: not valid JSON: {e}") from e
