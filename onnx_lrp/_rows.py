"""The explained rows of a position-wise output head: compute a language model's logits only where explained.

A causal LM's output ``logits = h W`` (optionally soft-capped: ``c tanh(logits / c)``) treats every sequence
position on its own, and the head is the largest product of a small model's forward (SmolLM2: a 576 x 49,152 weight,
21% of the forward's FLOPs) and its largest tensor (``T x vocab`` floats: 1.6 GB at 8,192 tokens). Relevance starts
at a few positions, so the capture computes the head for those rows only: ``GatherND(h, rows)`` before it, with
``rows`` a run-time input (``(batch, k, 1)`` positions; all positions for a full output). The head's backward steps
then run on those rows, and the gradient at ``h`` is scattered back into its ``(batch, T, hidden)`` shape: exact,
because no other row of ``h`` reaches the explained rows through the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ._graph import Graph

ROWS = "onnx_lrp::rows"  # the session input holding the rows: (batch, k, 1) int64 positions
_GATHERED = "onnx_lrp::rows::"  # prefix of the gathered input of the head
_SCALING = ("Add", "Sub", "Mul", "Div")  # with a constant of rank <= 1 (bias, soft-capping scale)
_ROWWISE_UNARY = ("Tanh", "Cast", "Identity")


@dataclass(frozen=True)
class RowHead:
    """The position-wise head of ``output``: ``nodes`` (output first, the product with the weight last) computing
    ``tensors`` from ``h`` (``(batch, seq, hidden)``); the sequence length is axis ``axis`` of the graph input
    ``feed``."""

    output: str
    h: str
    nodes: tuple[str, ...]
    tensors: tuple[str, ...]
    feed: str
    axis: int


def find_row_head(graph: Graph, carrying: set[str], output: str) -> RowHead | None:
    """The position-wise head of ``output`` (:class:`RowHead`), or None when there is none to restrict.

    Recognised by its maths: from the output up, each node reads one tensor of the chain and treats rows on their own
    (``Tanh``/``Cast``/``Identity``; ``Add``/``Sub``/``Mul``/``Div`` by a constant of rank <= 1), up to a ``MatMul`` with a
    constant 2-D weight; each tensor of the chain is read by the next node only (and is no graph output). The output
    must be 3-D with its batch and sequence axes named like those of a graph input, or of the same fixed sizes (the
    rows are chosen before the forward runs; :func:`check_rows` verifies the sizes after it)."""
    dims = graph.output_dims.get(output) or []
    if len(dims) != 3 or not all(isinstance(d, (str, int)) and d not in ("", 0) for d in dims[:2]):
        return None
    feed = next(((i.name, a) for i in graph.inputs for a, d in enumerate(i.shape)
                 if a > 0 and d == dims[1] and i.shape and i.shape[0] == dims[0]), None)
    if feed is None or graph.consumers.get(output):
        return None
    t, nodes, outs = output, [], []
    while True:
        p = graph.producer.get(t)
        if p is None or p.domain not in ("", "ai.onnx") or len([o for o in p.outputs if o]) != 1:
            return None
        if t != output and ([c.name for c in graph.consumers.get(t, [])] != [nodes[-1]]
                            or t in graph.output_names):
            return None
        nodes.append(p.name)
        outs.append(t)
        if p.op_type == "MatMul":
            w = graph.constant(p.inputs[1]) if len(p.inputs) == 2 else None
            if w is None or w.ndim != 2 or p.inputs[0] not in carrying:
                return None
            return RowHead(output, p.inputs[0], tuple(nodes), tuple(outs), *feed)
        if p.op_type in _ROWWISE_UNARY:
            t = p.inputs[0]
        elif p.op_type in _SCALING and len(p.inputs) == 2:
            consts = [graph.constant(i) for i in p.inputs]
            k = [j for j in (0, 1) if consts[j] is None]
            if len(k) != 1 or consts[1 - k[0]].ndim > 1:
                return None
            t = p.inputs[k[0]]
        else:
            return None


def check_rows(head: RowHead, h_shape: tuple[int, ...] | None, B: int, S: int, source: str) -> None:
    """An :class:`~onnx_lrp.errors.OnnxLrpError` when the head's input ``h`` is not ``(B, S, hidden)`` (``h_shape``
    None: onnxruntime could not gather the rows): the graph declared its output's axes like the input's, and they
    are not, so the rows were chosen for a wrong length."""
    from .errors import OnnxLrpError

    if h_shape is None or tuple(h_shape[:2]) != (B, S):
        found = "onnxruntime could not gather the rows" if h_shape is None else f"has shape {tuple(h_shape)}"
        raise OnnxLrpError(
            f"{source}: output {head.output!r} is declared with the batch and sequence axes of input {head.feed!r} "
            f"({B}, {S}), but its head's input {head.h!r} {found}: the graph's declared shapes are wrong; explain "
            "with full_output=True")


def is_gather_failure(exc: Exception) -> bool:
    """Whether onnxruntime's failure (as :func:`onnx_lrp._inputs.ort_failure` words it) is in the rows' gather."""
    return f"'{_GATHERED}" in str(exc)


def gather_rows(head: RowHead, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` (the session's, in order) with ``h`` gathered at :data:`ROWS` before the head's product."""
    product = head.nodes[-1]
    out = []
    for n in nodes:
        if n.name == product:
            gathered = _GATHERED + head.h
            out.append(helper.make_node("GatherND", [head.h, ROWS], [gathered], name=gathered, batch_dims=1))
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0] = gathered
            n = m
        out.append(n)
    return out


def rows_feed(head: RowHead, feeds: dict[str, Any], rows: Any = None) -> dict[str, Any]:
    """``feeds`` with :data:`ROWS`: ``rows`` (``(batch, k)`` positions), by default every position."""
    if rows is None:
        x = feeds[head.feed]
        rows = np.broadcast_to(np.arange(x.shape[head.axis]), (x.shape[0], x.shape[head.axis]))
    return {**feeds, ROWS: np.ascontiguousarray(rows, dtype=np.int64)[..., None]}


def scatter_rows(xp: Any, g: Any, rows: Any, length: int) -> Any:
    """``g`` (``(..., batch, k, d)``: the gradient at the gathered rows) in the full ``(..., batch, length, d)``
    shape: row ``j`` of batch element ``b`` at position ``rows[b, j]``, zeros elsewhere (repeated positions add)."""
    full = xp.zeros(g.shape[:-2] + (length, g.shape[-1]), dtype=g.dtype)
    b = xp.arange(rows.shape[0])
    for j in range(rows.shape[1]):
        full[..., b, rows[:, j], :] += g[..., :, j, :]
    return full
