"""Where and in which dtype PyTorch computes: the one place training and evaluation ask.

  with compute_dtype(model, "bf16"): ...   # autocast (train.compute_dtype, eval.compute_dtype)
  fast_bf16("cpu")                          # does this machine compute bf16 natively?
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def compute_dtype(model, dtype: str = "fp32") -> Iterator[None]:
    """Run the block's PyTorch forward with matmuls in `dtype` (eval.compute_dtype, train.compute_dtype).

    bf16 is torch.autocast: weights stay fp32, linear layers and attention compute in bfloat16,
    softmax and log-softmax stay fp32 (autocast's op lists), so label log-likelihoods are
    still summed in fp32. On a CPU with AVX512-BF16 it runs a 100-record evaluation ~1.5x as
    fast; it changes a few greedy answers, so it is for benchmarks that compare methods under
    one setting, never for the export check's fp32 reference (docs/benchmarks.md).
    In training it covers the forward only: backward follows the forward's dtypes, and the
    LoRA weights, their gradients, the importance scores and the optimizer stay fp32.
    """
    if dtype == "fp32":
        yield
        return
    if dtype != "bf16":
        raise ValueError(f"compute dtype must be fp32 or bf16, not {dtype!r}")
    import torch

    with torch.autocast(device_type=device_of(model).type, dtype=torch.bfloat16):
        yield


def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether this machine computes bf16 matmuls natively (so compute_dtype "bf16" pays):
    a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 / AMX-BF16 (x86) or BF16 (Arm)
    in /proc/cpuinfo. Elsewhere autocast emulates bf16 and is no faster than fp32."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def device_of(model):
    return next(model.parameters()).device
