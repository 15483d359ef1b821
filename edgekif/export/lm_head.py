"""The LM head of a genai export on each row's last real position only.

  last_position_head(folder)   # rewrite a builder graph built with prune_lm_head=true

Why: in the prompt pass the builder's graph runs the LM head (SmolLM2: 28 M multiply-adds a
position, a quarter of the body's 106 M) on every prompt position, though generation reads one
position a row. The builder's `prune_lm_head=true` keeps only the last position
(Gather(axis=1, index=-1)), but onnxruntime-genai 0.18 pads a batch's shorter prompts on the
right, so that position is a pad for every row but the longest: 6 of 96 batched answers were
right (docs/benchmarks.md, "Session 33"). This swaps that Gather for a per-row GatherND at the
last position whose attention mask is 1, less the past length: the prompt's last real token in
the prompt pass (left or right padding alike), position 0 in a decoding step. Measured on the
base's int8 export, 96 records each: every batched answer as the unpruned export's, the prompts
read 14-18% faster (docs/benchmarks.md, "The LM head on each row's last position").

Only logits change: [batch, 1, vocab] instead of [batch, sequence, vocab]. Generation through
onnxruntime-genai reads nothing else; a client that wants every position's logits uses the
plain ONNX target (export.target = "onnx"), which is never pruned.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import ExportError
from .files import ONNX_MODEL_FILE

BUILDER_GATHER = "/lm_head/prune/Gather"  # the node the builder's prune_lm_head adds (builders/base.py make_lm_head)
PREFIX = "/lm_head/last_position/"


def last_position_head(folder: str | os.PathLike) -> None:
    """Rewrite `folder`'s model.onnx (built with prune_lm_head=true) so the LM head reads each
    row's last real position; the weights (model.onnx.data) are not touched. Raises ExportError
    when the graph cannot be read (missing, truncated) or has no builder prune node (or has it
    already rewritten); the file is then left as it was."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(folder) / ONNX_MODEL_FILE
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's DecodeError, OSError, ...: one typed error naming the file
        raise ExportError(f"{path}: cannot read the builder's graph to rewrite its LM head ({type(e).__name__}: {e})") from e
    graph = model.graph
    found = [n for n in graph.node if n.name == BUILDER_GATHER]
    if len(found) != 1 or "attention_mask" not in {i.name for i in graph.input}:
        raise ExportError(f"{path}: no {BUILDER_GATHER} node and attention_mask input to rewrite "
                          "(built without prune_lm_head, or by a builder this edgekif does not know)")
    gather = found[0]
    hidden = gather.input[0]  # [batch, sequence, hidden]

    def name(s: str) -> str:
        return PREFIX + s

    def const(s: str, value: int | list[int]) -> onnx.NodeProto:
        dims, vals = ([len(value)], value) if isinstance(value, list) else ([], [value])
        return helper.make_node("Constant", [], [name(s)], name=name(s), value=helper.make_tensor(name(s), TensorProto.INT64, dims, vals))

    nodes = [
        const("zero", 0), const("one", 1), const("axis1", [1]),
        helper.make_node("Shape", ["attention_mask"], [name("mask_shape")], name=name("mask_shape")),
        helper.make_node("Gather", [name("mask_shape"), name("one")], [name("total")], name=name("total"), axis=0),
        helper.make_node("Shape", [hidden], [name("hidden_shape")], name=name("hidden_shape")),
        helper.make_node("Gather", [name("hidden_shape"), name("one")], [name("length")], name=name("length"), axis=0),
        # the last position each row's mask marks: max over t of mask[b, t] * t  -> [batch, 1]
        helper.make_node("Range", [name("zero"), name("total"), name("one")], [name("positions")], name=name("positions")),
        helper.make_node("Mul", ["attention_mask", name("positions")], [name("marked")], name=name("marked")),
        helper.make_node("ReduceMax", [name("marked"), name("axis1")], [name("last")], name=name("last"), keepdims=1),
        # ... as a position of this call's input: less the past length, within [0, length - 1]
        helper.make_node("Sub", [name("total"), name("length")], [name("past")], name=name("past")),
        helper.make_node("Sub", [name("last"), name("past")], [name("index_raw")], name=name("index_raw")),
        helper.make_node("Sub", [name("length"), name("one")], [name("highest")], name=name("highest")),
        helper.make_node("Max", [name("index_raw"), name("zero")], [name("index_low")], name=name("index_low")),
        helper.make_node("Min", [name("index_low"), name("highest")], [name("index")], name=name("index")),
        # [batch, sequence, hidden] at [batch, 1] -> [batch, hidden], as the builder's Gather gave
        helper.make_node("GatherND", [hidden, name("index")], list(gather.output), name=name("GatherND"), batch_dims=1),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, node in enumerate(nodes):
        graph.node.insert(at + k, node)
    # the builder's index constant, when nothing else reads it (onnxruntime warns on every load)
    index = gather.input[1]
    if not any(index in n.input for n in graph.node):
        for init in [i for i in graph.initializer if i.name == index]:
            graph.initializer.remove(init)
    # the initializers keep their external-data entries, so model.onnx.data stays as it is
    atomic_write_bytes(path, model.SerializeToString())
