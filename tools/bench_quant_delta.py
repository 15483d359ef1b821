#!/usr/bin/env python
"""How much of a fused LoRA update survives the export's weight quantisation?

The export quantises the fused weights W' = W + dW block-wise (onnxruntime's MatMulNBits, RTN).
A version's change against the base, as clients see it, is Q(W') - Q(W), not dW. This tool
loads the base and a peft adapter, merges them the way the export does (peft's
merge_and_unload in fp32), quantises every changed matrix and its base with onnxruntime's own
block-quantisation kernels (the ones the model builder calls), and reports, summed over the
changed matrices (Frobenius norms):

  |dW|                  the update the adapter makes
  |Q(W) - W|            the rounding error on the base alone
  |Q(W')-Q(W) - dW|     how far the update clients get is from the update trained
  cos(Q(W')-Q(W), dW)   its direction

    python tools/bench_quant_delta.py --adapter DATA/jobs/1/learner/adapter
    python tools/bench_quant_delta.py --adapter A --variants int8 int8-asym int4 int4-asym --block-sizes 16 32

Weights only: the answers are what tools/bench_quant.py measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edgekif.config import load_config  # noqa: E402
from edgekif.model import load_model, resolve_base  # noqa: E402
from edgekif.workflow import cache_root  # noqa: E402

VARIANTS = {"int8": (8, True), "int8-asym": (8, False), "int4": (4, True), "int4-asym": (4, False)}


def quantize_dequantize(w: np.ndarray, bits: int, symmetric: bool, block_size: int) -> np.ndarray:
    """W (out x in, as torch stores it) through onnxruntime's MatMulNBits block quantiser and back.
    MatMulNBits quantises the MatMul's B = W^T (K = in, N = out) in blocks along K."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    b = np.ascontiguousarray(w.T.astype(np.float32))
    k, n = b.shape
    if k % block_size:
        raise SystemExit(f"in-features {k} not a multiple of block size {block_size}")
    k_blocks = k // block_size
    per_byte = 8 // bits
    packed = np.zeros((n, k_blocks, block_size // per_byte), dtype=np.uint8)
    zero_point = np.zeros((n, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    (quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits)(packed, b, scales, zero_point, block_size, n, k, symmetric)
    if bits == 8:
        q = packed.astype(np.float32)
        zp = np.full((n, k_blocks), 128.0, np.float32) if symmetric else zero_point[:, :k_blocks].astype(np.float32)
    else:  # two 4-bit values a byte, low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, block_size).astype(np.float32)
        if symmetric:
            zp = np.full((n, k_blocks), 8.0, np.float32)
        else:
            zp = np.stack([zero_point & 0x0F, zero_point >> 4], axis=-1).reshape(n, -1)[:, :k_blocks].astype(np.float32)
    deq = (q - zp[..., None]) * scales[..., None]  # (n, k_blocks, block)
    return deq.reshape(n, k)  # = W's layout (out x in)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, type=Path, help="a peft adapter folder (a learner's adapter/ or a version's)")
    ap.add_argument("--config", type=Path, help="edgekif.toml naming the base (default: the default base)")
    ap.add_argument("--variants", nargs="+", default=["int8", "int8-asym", "int4-asym"], choices=list(VARIANTS))
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[32])
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    from peft import PeftModel

    cfg = load_config(args.config)
    base = resolve_base(cfg.model, cache_root(cfg))
    model = load_model(base.path, "fp32")
    base_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # copies: the merge writes in place
    merged = {k: v.detach().numpy() for k, v in PeftModel.from_pretrained(model, str(args.adapter)).merge_and_unload().state_dict().items()}
    changed = {k: v for k, v in merged.items() if k in base_sd and v.ndim == 2 and not np.array_equal(v, base_sd[k])}
    if not changed:
        raise SystemExit(f"{args.adapter}: the adapter changes no matrix of {base.path}")

    d2 = sum(float(np.sum((changed[k] - base_sd[k]) ** 2)) for k in changed)
    rows = []
    for name in args.variants:
        bits, symmetric = VARIANTS[name]
        for bs in args.block_sizes:
            base_err2 = err2 = dot = got2 = 0.0
            for k, w_new in changed.items():
                w = base_sd[k]
                qw, qn = quantize_dequantize(w, bits, symmetric, bs), quantize_dequantize(w_new, bits, symmetric, bs)
                dw, got = (w_new - w).astype(np.float64), (qn - qw).astype(np.float64)
                base_err2 += float(np.sum((qw - w) ** 2))
                err2 += float(np.sum((got - dw) ** 2))
                dot += float(np.sum(got * dw))
                got2 += float(np.sum(got**2))
            rows.append({
                "variant": name, "block_size": bs, "dW": d2**0.5, "base_error": base_err2**0.5,
                "update_error": err2**0.5, "update_error_rel": (err2 / d2) ** 0.5, "update_cos": dot / (got2 * d2) ** 0.5 if got2 else 0.0,
            })

    print(f"base {base.path}\nadapter {args.adapter}: {len(changed)} matrices changed, |dW| = {d2 ** 0.5:.3f}\n")
    print("| variant | block | rounding error on the base | error on the update | relative to the update | cos(update served, update trained) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['block_size']} | {r['base_error']:.3f} | {r['update_error']:.3f} | {r['update_error_rel']:.2f} | {r['update_cos']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"adapter": str(args.adapter), "matrices": len(changed), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
