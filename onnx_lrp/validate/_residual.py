"""The residual stream of an ONNX transformer, found from the graph's structure (no node or tensor names).

Every path from the relevance sources to the explained output runs through the residual stream: in the tensor
graph of the carrying tensors, the stream tensors are *cut vertices* (each source -> output path passes
through them). In a topological order, a tensor is a cut vertex iff no edge jumps over it (an edge ``u -> w``
with ``u`` before it and ``w`` after it), so one sweep over the edges finds them all.

Between two consecutive cut vertices lies a *segment*: an attention segment holds a product of two tensors
computed from the inputs (``Q K^T``, ``A V``) or a fused attention op; a block is one attention segment and what
follows it up to the next one. The stream *entering* block ``i`` is the last cut vertex before its attention
segment; after the last block, the stream is the last cut vertex with the stream's shape (transformers' last
hidden state, after the final norm). So ``stream[0]`` is the embedding output, ``stream[i]`` the output of block ``i - 1``, like
``output_hidden_states=True``.

onnxruntime's ``Skip*Normalization`` ops compute the residual sum inside the node: it is a cut vertex of its own
(a :class:`Point` whose value is the sum of the node's operands, bias included, and whose modified gradient is
that of an operand only the node reads), so an optimised graph has the same stream as its plain source.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._analysis import Analysis, propagate
from .._graph import Graph, Node

SKIP_NORMS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
# operands of the internal sum of a Skip*Normalization node: (input, skip, bias) at these input indices
_SKIP_SUM_INPUTS = {"SkipLayerNormalization": (0, 1, 4), "SkipSimplifiedLayerNormalization": (0, 1, 3)}
_BILINEAR = {"MatMul", "Einsum"}
# fused attention ops (onnxruntime's com.microsoft ones, and ONNX's own Attention of opset 23)
_FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                    "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention"}


@dataclass(frozen=True)
class Point:
    """A tensor of the relevance path: a graph tensor, or the sum computed inside a ``Skip*Normalization`` node.

    Its value is the sum of ``value_parts`` (for a graph tensor: itself); its relevance is ``value * G`` with
    ``G`` the modified gradient at ``grad_of`` (the tensor itself, or an operand of the sum that only the sum
    reads, whose gradient is the sum's). ``measurable`` is False for a sum whose operands all have other readers.
    """

    name: str
    value_parts: tuple[str, ...]
    grad_of: str
    node: str  # the node computing it
    measurable: bool = True

    @property
    def is_tensor(self) -> bool:
        return self.value_parts == (self.name,)


def cut_points(graph: Graph, analysis: Analysis, output: str) -> tuple[list[Point], list[bool]]:
    """The cut vertices between the sources and ``output`` in topological order, and for each one whether the
    segment that ends at it holds attention."""
    carrying = analysis.carrying
    relevant = _ancestors(graph, carrying, output)
    dependent = propagate(graph, analysis.sources, set())  # as the forward computes it: nothing detached
    order: dict[str, tuple[int, int]] = {}
    points: dict[str, Point] = {}
    edges: list[tuple[str, str]] = []
    inputs = {name: k for k, name in enumerate(graph.input_names)}
    for src in analysis.sources:
        if src in relevant:
            p = graph.producer.get(src)
            order[src] = (p.index, 1) if p is not None else (-1, inputs.get(src, 0))
            points[src] = Point(src, (src,), src, p.name if p is not None else src)
            edges.append(("", src))
    attention: set[str] = set()  # outputs of attention nodes
    for n in graph.nodes:
        cin = [i for i in n.inputs if i and i in relevant]
        outs = [o for o in n.outputs if o and o in relevant and o not in points]
        if not cin or not outs:
            continue
        heads = cin
        if n.op_type in SKIP_NORMS:
            inner = f"{n.name}::sum"
            order[inner] = (n.index, 0)
            operands = tuple(n.inputs[k] for k in _SKIP_SUM_INPUTS[n.op_type] if k < len(n.inputs) and n.inputs[k])
            only = [i for i in cin if len(graph.consumers.get(i, [])) == 1]
            points[inner] = Point(f"{n.name} (residual sum)", operands, only[0] if only else cin[0], n.name,
                                  bool(only))
            edges.extend((i, inner) for i in cin)
            heads = [inner]
        for k, o in enumerate(n.outputs):
            if o in outs:
                order[o] = (n.index, 1 + k)
                points[o] = Point(o, (o,), o, n.name)
                edges.extend((i, o) for i in heads)
                if _is_attention(n, dependent):
                    attention.add(o)
    ranked = sorted(order, key=order.__getitem__)
    rank = {t: r for r, t in enumerate(ranked)}
    cover = np.zeros(len(ranked) + 1, dtype=np.int64)
    for u, w in edges:
        lo = rank[u] + 1 if u else 0
        cover[lo] += 1
        cover[rank[w]] -= 1
    covered = np.cumsum(cover)[: len(ranked)] > 0
    cuts = [t for r, t in enumerate(ranked) if not covered[r]]
    # a segment holds attention when an attention node's output is ranked in (previous cut, this cut]
    att_ranks = np.array(sorted(rank[t] for t in attention), dtype=np.int64)
    bounds = np.array([rank[t] for t in cuts], dtype=np.int64)
    counts = np.searchsorted(att_ranks, bounds, side="right")
    seg_attention = list(np.diff(counts, prepend=0) > 0)
    return [points[t] for t in cuts], seg_attention


def _is_attention(node: Node, dependent: set[str]) -> bool:
    """A fused attention op, or a matrix product of two tensors computed from the inputs (whatever the composite
    holds constant: CP-LRP detaches the attention weights, yet ``A V`` is still attention)."""
    if node.op_type in _FUSED_ATTENTION:
        return True
    return node.op_type in _BILINEAR and sum(1 for i in node.inputs if i and i in dependent) >= 2


def _ancestors(graph: Graph, carrying: set[str], output: str) -> set[str]:
    """Carrying tensors from which ``output`` is reached through carrying tensors."""
    seen = {output}
    stack = [output]
    while stack:
        p = graph.producer.get(stack.pop())
        if p is None:
            continue
        for i in p.inputs:
            if i and i in carrying and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def block_entries(cuts: list[Point], seg_attention: list[bool]) -> list[int]:
    """Indices into ``cuts`` of the stream entering each block: the last cut before each attention segment."""
    return [k - 1 for k in range(1, len(cuts)) if seg_attention[k]]
