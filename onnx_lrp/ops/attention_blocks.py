"""Attention explained without capturing its ``T x T`` tensors: the probabilities recomputed in blocks of query rows.

An attention block is ``O = P V`` with ``P = softmax_keys(f(A Bt))``: ``A Bt`` a ``MatMul`` of the (scaled,
rotated) queries by the transposed keys, ``f`` a chain of element-wise ops whose other operands carry no relevance
(a scale, an additive mask or position bias, a ``masked_fill`` ``Where``, a soft-cap ``c tanh(x / c)``, casts), the
softmax over the last (key) axis, then maybe a NaN guard ``Where(IsNaN(P), 0, P)`` or a cast before the product.
:func:`find_blocks` recognises this from the graph's maths, whatever the exporter wrote before ``A`` and ``Bt``
(GQA head expansion, rotary embedding, ``1/sqrt(d)`` on either side) and without node names.

Its backward (:func:`attention_backward`, also used by the fused ``Attention``/``MultiHeadAttention``/
``GroupQueryAttention`` ops) reads ``A``, ``Bt``, ``V`` (``O(T d)``) and the chain's other operands (the mask:
recomputed from its small inputs, :mod:`onnx_lrp._recompute`), and for each block of query rows recomputes the
scores and ``P`` and applies the AttnLRP rules of the nodes it replaces, in gradient form (Arras et al. 2025):

    G_V  += wV P_r^T G_O,r                               (P V, uniform rule: wP = wV = 1/2, Prop. 3.3)
    G_P,r = wP G_O,r V^T
    G_S,r = P_r (G_P,r - sum_keys(P_r G_P,r))           (softmax, Prop. 3.1)
    G_Z,r = chain rules of f, backwards                  (each node's own rule, e.g. identity on the soft-cap tanh)
    G_A,r = wA G_Z,r Bt^T,  G_Bt += wB A_r^T G_Z,r       (A Bt, uniform rule: wA = wB = 1/2)

so memory is ``O(rows_per_block x T)`` instead of ``O(layers x T^2)``, and rows whose output gradient is zero
(all but the explained position after a one-hot start) are skipped. With ``P`` constant (CP-LRP) only ``G_V``
is computed. The result equals the node-by-node rules on captured tensors (tests/test_recompute.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._graph import FLOAT_TYPES, Graph, Node
from .._patterns import nan_guard
from ..rules import stabilise
from ._base import scaled_matmul, unbroadcast

BLOCK_BYTES = 32 << 20  # size of one (targets, batch, heads, rows, keys) array of a block
# ops of the score chain f (one carrying operand) and between softmax and P
CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Tanh", "Reshape", "Neg"}
AFTER_OPS = {"Cast", "Identity", "Dropout", "Reshape"}


@dataclass
class Block:
    """One attention block: ``qk`` = MatMul(A, Bt) -> Z, ``chain`` (Z -> softmax input), ``softmax``, ``after``
    (softmax output -> P), ``pv`` = MatMul(P, V) -> O; ``units``: names of the plan units (nodes, or regions of
    chain nodes) it replaces besides ``pv``; ``sides``: the chain's non-carrying operands that are not constants."""

    qk: Node
    chain: list[Node]
    softmax: Node
    after: list[Node]
    pv: Node
    units: set[str]
    sides: list[str]

    @property
    def a(self) -> str:
        return self.qk.inputs[0]

    @property
    def bt(self) -> str:
        return self.qk.inputs[1]

    @property
    def v(self) -> str:
        return self.pv.inputs[1]

    @property
    def nodes(self) -> list[Node]:
        return [self.qk, *self.chain, self.softmax, *self.after, self.pv]


def find_blocks(graph: Graph, carrying: set[str], region_of: dict[str, str], regions: dict[str, Any],
                protect: set[str]) -> dict[str, Block]:
    """Attention blocks of the graph, by the name of their ``pv`` MatMul. ``protect``: tensors that must stay
    visible (graph outputs, collected tensors): a block holding one is not recognised."""
    blocks: dict[str, Block] = {}
    default_axis = -1 if graph.opset.get("ai.onnx", 0) >= 13 else 1
    ranks: dict[str, int] | None = None
    for sm in graph.nodes:
        if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx"):
            continue
        axis = int(sm.attr("axis", default_axis))
        if axis >= 0:  # jax2onnx and Keras write the keys axis as a positive number
            ranks = _inferred_ranks(graph) if ranks is None else ranks
            axis -= ranks.get(sm.inputs[0], axis + 2)
        if axis != -1:  # also for opset < 13: Softmax(axis=k) normalises the axes k.. together
            continue
        b = _block_at(graph, carrying, sm, protect)
        if b is None or b.pv.name in blocks:
            continue
        names = {n.name for n in b.nodes if n is not b.pv}
        units, ok = set(), True
        for n in [b.qk, *b.chain, b.softmax, *b.after]:
            r = region_of.get(n.name)
            if r is None:
                units.add(n.name)
            elif all(m.name in names for m in regions[r].nodes):
                units.add(r)
            else:
                ok = False
        if ok:
            b.units = units
            blocks[b.pv.name] = b
    return blocks


def _single_use(graph: Graph, t: str, protect: set[str]) -> Node | None:
    cons = graph.consumers.get(t, [])
    return cons[0] if len(cons) == 1 and t not in protect and t not in graph.output_names else None


def _inferred_ranks(graph: Graph) -> dict[str, int]:
    """Ranks of the graph's tensors from onnx shape inference (empty where it refuses the graph)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(graph.model).graph.value_info
    except Exception:  # contrib ops or stubs it cannot read: positive softmax axes stay unrecognised
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in inferred if v.type.tensor_type.HasField("shape")}


def _block_at(graph: Graph, carrying: set[str], sm: Node, protect: set[str]) -> Block | None:
    x = sm.inputs[0]
    if x not in carrying:
        return None
    # softmax output -> P: a NaN guard, float casts, identities
    after: list[Node] = []
    t = sm.outputs[0]
    while True:
        guard = nan_guard(graph, t)
        if guard is not None and len(graph.consumers.get(t, [])) == 2 and t not in protect | set(graph.output_names):
            isnan = next(c for c in graph.consumers[t] if c.op_type == "IsNaN")
            if len(graph.consumers.get(isnan.outputs[0], [])) != 1:
                return None
            after += [isnan, guard]
            t = guard.outputs[0]
            continue
        c = _single_use(graph, t, protect)
        if c is None:
            return None
        if c.op_type in AFTER_OPS and c.inputs[0] == t and _float_cast(c) and not any(c.outputs[1:]):
            after.append(c)
            t = c.outputs[0]
            continue
        if c.op_type == "MatMul" and c.domain in ("", "ai.onnx") and c.inputs[0] == t and c.inputs[1] != t:
            pv = c
            break
        return None
    # softmax input <- Z = MatMul(A, Bt): element-wise ops with one carrying operand
    chain: list[Node] = []
    sides: list[str] = []
    t = x
    while True:
        p = graph.producer.get(t)
        if p is None or len(chain) > 12:
            return None
        if chain and _single_use(graph, t, protect) is not chain[0]:
            return None
        if not chain and _single_use(graph, t, protect) is not sm:
            return None
        if p.op_type == "MatMul" and p.domain in ("", "ai.onnx"):
            qk = p
            break
        if p.op_type not in CHAIN_OPS or p.domain not in ("", "ai.onnx") or not _float_cast(p):
            return None
        k = _chain_input(p, carrying)
        if k is None:
            return None
        for j, i in enumerate(p.inputs):
            if j != k and i and i not in graph.static and i not in sides:
                sides.append(i)
        chain.insert(0, p)
        t = p.inputs[k]
    if not any(i in carrying for i in qk.inputs):
        return None
    return Block(qk, chain, sm, after, pv, set(), sides)


def _float_cast(node: Node) -> bool:
    return node.op_type != "Cast" or node.attr("to") in FLOAT_TYPES


def _chain_input(node: Node, carrying: set[str]) -> int | None:
    """Index of the one carrying input of a chain node (the scores), if the op is linear in it or unary."""
    c = [k for k, i in enumerate(node.inputs) if i and i in carrying]
    if len(c) != 1:
        return None
    k = c[0]
    op = node.op_type
    if op == "Where":
        return k if k in (1, 2) else None
    if op in ("Div", "Sub", "Reshape") and k != 0:  # c / x is no scaling; c - x is rare: not recognised
        return None
    return k


# --------------------------------------------------------------------------------------------- backward
class _NotRowwise(Exception):
    """The chain reshapes the key/row axes: the block falls back to all rows at once."""


def rows_of(x: Any, r0: int, r1: int, rows: int) -> Any:
    """Rows ``r0:r1`` of an operand broadcast against ``(.., rows, keys)`` scores (itself when it has one row)."""
    if getattr(x, "ndim", 0) >= 2 and x.shape[-2] == rows and rows > 1:
        return x[..., r0:r1, :]
    return x


def softmax_rows(xp: Any, S: Any) -> Any:
    """``softmax(S)`` over the last axis; rows of only ``-inf`` (fully masked) are 0, as the exporters' NaN guard
    ``Where(IsNaN(P), 0, P)`` makes them."""
    m = S.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        P = xp.exp(S - m)
        P /= P.sum(axis=-1, keepdims=True)
    bad = xp.isnan(P)
    if bad.any():
        P[bad] = 0
    return P


def block_rows(shape: tuple[int, ...], itemsize: int, rows: int) -> int:
    """Query rows per block so that one ``shape[:-2] + (rows, keys)`` array stays within :data:`BLOCK_BYTES`."""
    per_row = max(1, int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1] * itemsize)
    return max(1, min(rows, BLOCK_BYTES // per_row))


Scores = Callable[[Any, int, int], "tuple[Any, Callable[[Any], Any]]"]


def attention_backward(xp: Any, GO: Any, A: Any, Bt: Any, V: Any, scores: Scores,
                       weights: tuple[float, float, float, float], eps: float = 0.0,
                       matmul: Callable | None = None) -> tuple[Any, Any, Any]:
    """``(G_A, G_Bt, G_V)`` of ``O = softmax(f(A Bt)) V`` in blocks of query rows (module docstring).

    ``GO``: ``(targets.., batch.., rows, dv)``; ``A``: ``(batch.., rows, d)``; ``Bt``: ``(batch.., d, keys)``;
    ``V``: ``(batch.., keys, dv)``. ``scores(Z_r, r0, r1)`` -> ``(S_r, back)``: the softmax input of rows
    ``r0:r1`` from ``Z_r = A_r Bt`` and ``back(G_S) = G_Z`` through ``f``. ``weights``: ``(wA, wB, wP, wV)``.
    ``eps``: eps-LRP on ``O = P V`` when ``P`` is constant (``wP = 0``): ``G_O`` is first scaled by
    ``O / stab(O)``. Gradients of operands that get weight 0 are None. ``matmul(a, b, alpha)``: the engine's
    product (``env.matmul``; default numpy's).
    """
    rows = A.shape[-2]
    out_batch = np.broadcast_shapes(A.shape[:-2], Bt.shape[:-2], V.shape[:-2])
    lead = GO.ndim - len(out_batch) - 2  # target axes in front of the output's own
    r = block_rows(GO.shape[:lead] + out_batch + (rows, Bt.shape[-1]), GO.dtype.itemsize, rows)
    mm = matmul or scaled_matmul
    try:
        return _blocks(xp, GO, A, Bt, V, scores, weights, eps, rows, r, lead, mm)
    except _NotRowwise:
        return _blocks(xp, GO, A, Bt, V, scores, weights, eps, rows, rows, lead, mm)


def _blocks(xp, GO, A, Bt, V, scores, weights, eps, rows, r, lead, mm):
    wA, wB, wP, wV = weights
    if eps and not wP:
        O = xp.concatenate([mm(_probs(xp, A, Bt, scores, r0, min(rows, r0 + r), mm)[0], V)
                            for r0 in range(0, rows, r)], axis=-2)
        GO = GO * (O / stabilise(O, eps))
    if not wP:
        wA = wB = 0.0
    GA = xp.zeros(GO.shape[:lead] + np.broadcast_shapes(A.shape[:-2], Bt.shape[:-2]) + A.shape[-2:],
                  dtype=GO.dtype) if wA else None
    GB = GV = None
    Vt = V.swapaxes(-1, -2)
    for r0 in range(0, rows, r):
        r1 = min(rows, r0 + r)
        g = GO[..., r0:r1, :]
        if not g.any():
            continue
        P, back = _probs(xp, A, Bt, scores, r0, r1, mm)
        if wV:
            gv = mm(P.swapaxes(-1, -2), g)
            GV = gv if GV is None else GV + gv
        if not wP:
            continue
        GP = mm(g, Vt, wP)
        GS = P * (GP - (P * GP).sum(axis=-1, keepdims=True))
        del P, GP
        GZ = back(GS)
        del GS
        if GA is not None:
            GA[..., r0:r1, :] = mm(GZ, Bt.swapaxes(-1, -2), wA)
        if wB:
            gb = mm(A[..., r0:r1, :].swapaxes(-1, -2), GZ, wB)
            GB = gb if GB is None else GB + gb
    if wV and GV is None:  # no row reached
        GV = xp.zeros(GO.shape[:lead] + np.broadcast_shapes(V.shape[:-2], A.shape[:-2]) + V.shape[-2:], dtype=GO.dtype)
    if wB and GB is None:
        GB = xp.zeros(GO.shape[:lead] + np.broadcast_shapes(A.shape[:-2], Bt.shape[:-2]) + Bt.shape[-2:],
                      dtype=GO.dtype)
    GV = unbroadcast(xp, GV * wV, V.shape, GV.ndim - lead) if wV else None
    GA = unbroadcast(xp, GA, A.shape, GA.ndim - lead) if GA is not None else None
    GB = unbroadcast(xp, GB, Bt.shape, GB.ndim - lead) if wB else None
    return GA, GB, GV


def _probs(xp, A, Bt, scores, r0, r1, mm):
    S, back = scores(mm(A[..., r0:r1, :], Bt), r0, r1)
    return softmax_rows(xp, S), back


# --------------------------------------------------------------------------------------------- eager blocks
@dataclass
class ChainUnit:
    """One rule of the score chain, backwards: ``backward(env, [G_y])[k]`` is ``G_x`` (a node, or a unary region
    of chain nodes such as a written-out soft-cap)."""

    backward: Callable
    k: int = 0


class _BlockEnv:
    """What the chain's rules read on one block of query rows: the block's scores and row-sliced operands."""

    def __init__(self, env: Any, values: dict[str, Any]):
        self.xp, self.dtype, self.lead, self.matmul = env.xp, env.dtype, env.lead, env.matmul
        self._env, self._values, self._memo = env, values, {}

    def __getitem__(self, name: str) -> Any:
        v = self._values.get(name)
        return self._env[name] if v is None else v

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def block_backward(block: Block, units: list[ChainUnit], weights: tuple[float, float, float, float],
                   carrying: tuple[bool, bool, bool], xp: Any) -> Callable:
    """The plan step of an eager block: ``backward(env, [G_O]) -> [G_A, G_Bt, G_V]`` (None where not carrying)."""
    z, s = block.qk.outputs[0], block.softmax.inputs[0]
    chain_tensors = {z} | {n.outputs[0] for n in block.chain}
    operands = list(dict.fromkeys(i for n in block.chain for i in n.inputs if i and i not in chain_tensors))
    reshapes = [n for n in block.after if n.op_type == "Reshape"]  # softmax commutes with them (keys stay last)

    def back(env, gy):
        A, Bt, V = env[block.a], env[block.bt], env[block.v]
        rows = A.shape[-2]
        full = {i: env[i] for i in operands}

        def scores(Z, r0, r1):
            vals = {i: rows_of(v, r0, r1, rows) for i, v in full.items()}
            vals[z] = Z
            with np.errstate(over="ignore"):  # scores + finfo.min masks overflow to -inf, as in onnxruntime
                for n in block.chain:
                    vals[n.outputs[0]] = _forward(xp, n, [vals[i] if i else None for i in n.inputs], rows, r1 - r0)
            benv = _BlockEnv(env, vals)
            S = vals[s]
            for n in reshapes:
                S = _forward(xp, n, [S, env[n.inputs[1]]], rows, r1 - r0)

            def back_chain(GS):
                g = GS.reshape(GS.shape[: env.lead] + vals[s].shape)
                for u in reversed(units):
                    g = u.backward(benv, [g])[u.k]
                return g

            return S, back_chain

        grads = attention_backward(xp, gy[0], A, Bt, V, scores, weights, matmul=env.matmul)
        return [g if c else None for g, c in zip(grads, carrying)]

    return back


def _forward(xp: Any, node: Node, a: list, rows: int, r: int) -> Any:
    """One chain node on a block of ``r`` of the ``rows`` query rows."""
    op = node.op_type
    if op == "Add":
        return a[0] + a[1]
    if op == "Sub":
        return a[0] - a[1]
    if op == "Mul":
        return a[0] * a[1]
    if op == "Div":
        return a[0] / a[1]
    if op == "Neg":
        return -a[0]
    if op == "Tanh":
        return xp.tanh(a[0])
    if op == "Where":
        return xp.where(a[0], a[1], a[2])
    if op == "Reshape":
        x = a[0]
        shape = [int(v) for v in np.asarray(a[1].get() if hasattr(a[1], "get") else a[1]).reshape(-1)]
        if not int(node.attr("allowzero", 0)):
            shape = [x.shape[k] if d == 0 and k < x.ndim else d for k, d in enumerate(shape)]
        if r != rows and len(shape) >= 2 and shape[-2] == rows:
            shape[-2] = r
        y = x.reshape(shape)
        if r != rows and y.shape[-2:] != x.shape[-2:]:
            raise _NotRowwise
        return y
    return a[0]  # Cast between float types, Identity: the compute dtype throughout
