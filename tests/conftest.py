"""Shared fixtures. Unit tests use a tiny random Llama built in-process; tests marked
`integration` use the real SmolLM2 base (converted once per session into a temp cache)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A developer's own ~/.config/edgekif/config.toml must not reach the tests (edgekif.config.find_config).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="edgekif-test-xdg-config-")
# Removed when the test process exits, so that test runs do not pile empty folders up in /tmp.
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)
# Nor the developer's ~/.cache/edgekif: a tiny test base's cached answers or zero-shot scores
# would otherwise land beside the real bases' (edgekif.workflow.cache_root).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="edgekif-test-xdg-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_DATA = REPO.parent / "shared" / "data" / "cl-benchmark"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as an HF folder (safetensors + tokenizer + chat template)."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture()
def tiny():
    """(model, tokenizer): a fresh tiny random Llama in memory."""
    from tiny_models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real default base (SmolLM2-135M-Instruct), converted once into a session cache.

    Uses $EDGEKIF_TEST_CACHE if set, so repeated local runs skip the ~30 s GGUF conversion.
    """
    from edgekif.config import ModelConfig
    from edgekif.model import resolve_base

    cache = Path(os.environ.get("EDGEKIF_TEST_CACHE") or tmp_path_factory.mktemp("smol-cache"))
    return resolve_base(ModelConfig(), cache)


@pytest.fixture(scope="session")
def benchmark_data() -> Path:
    if not BENCHMARK_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {BENCHMARK_DATA}")
    return BENCHMARK_DATA


# SmolLM2-135M-Instruct's chat template as shipped: it adds a default system prompt to any
# conversation without a system message (edgekif drops it; see edgekif.model.load_tokenizer).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful "
    "AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_template() -> str:
    return SMOLLM2_TEMPLATE
