"""tools/bench_quant_delta.py: onnxruntime's block quantisers, unpacked back to weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_quant_delta import quantize_dequantize  # noqa: E402


@pytest.mark.parametrize("bits,symmetric,block", [(8, True, 32), (8, False, 16), (4, True, 32), (4, False, 16)])
def test_weights_on_the_variants_own_grid_come_back_exactly(bits, symmetric, block):
    """A weight the variant can represent exactly (integer levels times a per-block step, with
    each block's extreme levels used) round-trips unchanged: the unpacking (layout, nibble
    order, zero points) is right."""
    rng = np.random.default_rng(0)
    out, inp = 6, 2 * block
    step = rng.uniform(0.01, 0.1, size=(out, inp // block, 1)).astype(np.float32)
    if symmetric:
        q = rng.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), size=(out, inp // block, block))
        q[..., 0] = -(2 ** (bits - 1))  # the block's most negative level sets the scale (max|w| = 2^(b-1) * step)
    else:
        q = rng.integers(0, 2**bits, size=(out, inp // block, block))
        q[..., 0], q[..., 1] = 0, 2**bits - 1  # min and max levels present: scale = (max - min) / (2^b - 1)
        q = q - 2 ** (bits - 1)  # zero point mid-range: the levels straddle zero as weights do
    w = (q * step).reshape(out, inp).astype(np.float32)
    back = quantize_dequantize(w, bits, symmetric, block)
    assert back.shape == w.shape
    np.testing.assert_allclose(back, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_rounding_error_is_at_most_half_a_step(bits, symmetric):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, size=(8, 64)).astype(np.float32)
    back = quantize_dequantize(w, bits, symmetric, 16)
    blocks = w.reshape(8, 4, 16)
    if symmetric:
        step = np.abs(blocks).max(-1) / (2 ** (bits - 1))
    else:
        step = (blocks.max(-1) - blocks.min(-1)) / (2**bits - 1)
    err = np.abs(back - w).reshape(8, 4, 16).max(-1)
    # symmetric int4 puts the largest-magnitude weight at -8 (levels -8..7), so the far side
    # clips by up to one step; everything else rounds to the nearest level
    bound = 1.0 if (bits, symmetric) == (4, True) else 0.5
    assert (err <= bound * step * 1.01 + 1e-7).all()
    assert err.max() > 0  # random weights are not on the grid: the quantiser did something
