"""Structural patterns, recognised by the maths they compute rather than by op spellings or node names.

Every pattern here is a small function over a :class:`~onnx_lrp._graph.Graph` (and, where it matters, the set of
tensors that carry relevance); each has a unit test on hand-built graphs (``tests/test_patterns.py``).

- :func:`moment`: how a tensor depends on a root tensor ``x``: its degree of homogeneity in ``x``, whether it is
  reduced (a statistic broadcast back), whether a second moment (``E[x^2]``, a variance, ``||x||_2``) went into it.
  A *normalisation* is a product ``a * s`` (or ``a / s``) whose result is scale-invariant in ``x`` (degree 0) with
  ``s`` a second-moment statistic of ``x``: LayerNorm and RMSNorm however written (``ReduceMean`` or
  ``GlobalAveragePool`` or ``ReduceSum``/N, ``Pow``/``Mul`` squares, ``Sqrt``/``Reciprocal``/``Div``/``Pow(-0.5)``,
  ``E[x^2] - E[x]^2``), group norms, L2 normalisation (:func:`normalisation_statistic`). A *centring* is
  ``x - mean(x)`` (:func:`is_centring`).
- :func:`probe_function`: an element-wise chain ``y = f(x)`` evaluated numerically at probe points; the identity
  rule is sound only for ``f(0) = 0`` with ``f(x)/x`` bounded near 0 (:func:`zero_centred`).
- :func:`find_unary_regions`: element-wise subgraphs with one carrying input and one output that contain a
  non-linearity (``x * sigmoid(x)``, Erf/tanh GELU, Mish, ...) and are zero-centred: one node for the identity rule.
- gates (:func:`gate_inputs`): factors of a product computed by a non-zero-centred function (a sigmoid gate);
  :func:`nonlinearity_inputs`: factors computed by any non-linearity (CP-LRP's gates).
- :func:`weights_values`: a softmax whose probabilities weight other carrying values (attention, routing), as
  opposed to a model's output distribution.
- eps-LRP layers (:func:`epsilon_site`): a linear map with its bias (:func:`following_bias`), a chain of sums
  (:func:`continues_sum`), a pooling; :func:`nan_guard` after a softmax.
- :func:`one_hot_ids`: integer inputs one-hot encoded (``OneHot``, ``Equal`` + ``Cast``/``Where``) into a float
  tensor: relevance sources like an embedding lookup.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np

from ._graph import Graph, Node
from ._registry import ONNX, spec_of

# ops that pass a tensor on unchanged in value (up to layout) for the patterns below; activation quantisation
# (a QuantizeLinear/DequantizeLinear pair of a QDQ graph) is transparent to relevance (onnx_lrp.ops.qdq)
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "CastLike", "Expand",
              "Dropout", "Tile", "QuantizeLinear", "DequantizeLinear"}
SUM_OPS = ("Add", "Sub", "Sum")
_REDUCTIONS = {"ReduceMean", "ReduceSum", "GlobalAveragePool"}
_MAX_DEPTH = 48


def _onnx(node: Node | None) -> bool:
    return node is not None and (node.domain or ONNX) == ONNX


def scalar(graph: Graph, name: str) -> float | None:
    """The value of a static one-element tensor, else None."""
    v = static_value(graph, name)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


# ---------------------------------------------------------------------------------------------- static values
def static_value(graph: Graph, name: str, depth: int = 0) -> np.ndarray | None:
    """The value of a static tensor: an initializer or constant, or computed from them by element-wise ops
    (evaluated with their declared forward), else None."""
    v = graph.constant(name)
    if v is not None or name not in graph.static or depth > 8:
        return v
    p = graph.producer.get(name)
    spec = spec_of(p) if p is not None else None
    if spec is None or spec.forward is None or len([o for o in p.outputs if o]) != 1:
        return None
    ins = [static_value(graph, i, depth + 1) if i else None for i in p.inputs]
    if any(i and v is None for i, v in zip(p.inputs, ins)):
        return None
    try:
        with np.errstate(all="ignore"):
            return np.asarray(spec.forward(ins, p.attrs))
    except Exception:  # an op this evaluator cannot compute here: not a known constant
        return None


# ---------------------------------------------------------------------------------------------- moments
class Moment(NamedTuple):
    """How a tensor depends on a root ``x``: ``t(c x) = c^degree t(x)`` for ``c > 0`` (up to eps-like constants);
    ``reduced``: a statistic over some axes; ``second``: a second moment of ``x`` went into it."""

    degree: Fraction
    reduced: bool
    second: bool


_CONST = Moment(Fraction(0), False, False)


def moment(graph: Graph, t: str, root: str, carrying: set[str], memo: dict | None = None, depth: int = 0
           ) -> Moment | None:
    """The :class:`Moment` of ``t`` in ``root``, or None when ``t`` is not such a function of ``root`` alone.
    Tensors that carry no relevance are constants (degree 0); adding a constant to a term of another degree (a
    norm's ``eps``) keeps the term's degree."""
    memo = {} if memo is None else memo
    key = (t, root)
    if key in memo:
        return memo[key]
    memo[key] = None  # cycles cannot happen in a DAG; this bounds re-entry while computing
    result = _moment(graph, t, root, carrying, memo, depth)
    memo[key] = result
    return result


def _moment(graph: Graph, t: str, root: str, carrying: set[str], memo: dict, depth: int) -> Moment | None:
    if t == root:
        return Moment(Fraction(1), False, False)
    if t not in carrying:
        return _CONST
    p = graph.producer.get(t)
    if p is None or depth > _MAX_DEPTH or not _onnx(p):
        return None
    op = p.op_type

    def m(k: int) -> Moment | None:
        i = p.inputs[k] if k < len(p.inputs) else ""
        return moment(graph, i, root, carrying, memo, depth + 1) if i else _CONST

    if op in LAYOUT_OPS or op in ("Neg", "Abs"):
        return m(0)
    if op in ("Max", "Min", "Clip"):  # a floor/ceiling by a constant (clamp_min(norm, eps))
        terms = [m(k) for k in range(len(p.inputs))]
        live = [x for k, x in enumerate(terms) if p.inputs[k] in carrying]
        return live[0] if len(live) == 1 and live[0] is not None else None
    if op in SUM_OPS:
        terms = [m(k) for k in range(len(p.inputs)) if p.inputs[k] in carrying]
        if not terms or any(x is None for x in terms) or len({x.degree for x in terms}) != 1:
            return None
        return Moment(terms[0].degree, all(x.reduced for x in terms), any(x.second for x in terms))
    if op in ("Mul", "Div"):
        a, b = m(0), m(1)
        if a is None or b is None:
            return None
        live = [x for x, i in ((a, p.inputs[0]), (b, p.inputs[1])) if i in carrying]
        deg = a.degree + b.degree if op == "Mul" else a.degree - b.degree
        return Moment(deg, all(x.reduced for x in live), a.second or b.second)
    if op == "Pow":
        e = scalar(graph, p.inputs[1])
        a = m(0)
        if a is None or e is None or p.inputs[1] in carrying:
            return None
        return Moment(a.degree * Fraction(e).limit_denominator(64), a.reduced, a.second)
    if op in ("Sqrt", "Reciprocal"):
        a = m(0)
        if a is None:
            return None
        return Moment(a.degree / 2 if op == "Sqrt" else -a.degree, a.reduced, a.second)
    if op in _REDUCTIONS:
        a = m(0)
        if a is None:
            return None
        return Moment(a.degree, True, a.second or (a.degree == 2 and not a.reduced))
    if op in ("ReduceSumSquare", "ReduceL2"):
        a = m(0)
        if a is None or a.reduced:
            return None
        return Moment(a.degree * (2 if op == "ReduceSumSquare" else 1), True, a.degree == 1 or a.second)
    return None


def _roots(graph: Graph, t: str, carrying: set[str], limit: int = 24) -> list[str]:
    """Candidate roots for a pattern at ``t``: ``t`` and the tensors it is computed from by the ops
    :func:`moment` knows, nearest first."""
    out, frontier, seen = [], [t], {t}
    while frontier and len(out) < limit:
        nxt = []
        for u in frontier:
            out.append(u)
            p = graph.producer.get(u)
            if p is None or not _onnx(p) or (p.op_type not in LAYOUT_OPS and p.op_type not in SUM_OPS
                                             and p.op_type not in ("Mul", "Div", "Pow", "Neg")):
                continue
            for i in p.inputs:
                if i and i in carrying and i not in seen:
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return out


def normalisation_statistic(graph: Graph, node: Node, carrying: set[str]) -> tuple[str, str] | None:
    """``(statistic, root)`` when ``node`` is the product of a normalisation: ``a * s`` or ``a / s`` whose result
    is scale-invariant in a root ``x`` (degree 0), ``s`` being a reduced second-moment statistic of ``x``
    (``1/sigma``, ``sigma``, ``gamma / sigma``, ``||x||``): the tensor AttnLRP holds constant (Prop. 3.4)."""
    if node.op_type not in ("Mul", "Div") or not _onnx(node) or len(node.inputs) != 2:
        return None
    a_in, b_in = node.inputs
    if a_in not in carrying or b_in not in carrying:
        return None
    orders = [(a_in, b_in)] if node.op_type == "Div" else [(a_in, b_in), (b_in, a_in)]
    memo: dict = {}
    for a, s in orders:
        for root in _roots(graph, a, carrying):
            ma, ms = moment(graph, a, root, carrying, memo), moment(graph, s, root, carrying, memo)
            if ma is None or ms is None or ma.degree == 0 or ms.degree == 0 or not (ms.reduced and ms.second):
                continue
            total = ma.degree + ms.degree if node.op_type == "Mul" else ma.degree - ms.degree
            if total == 0 and not ma.second:
                return s, root
    return None


def statistic_nodes(graph: Graph, s: str, root: str) -> list[Node]:
    """The nodes computing statistic ``s`` from ``root`` (for a norm under the Gradient rule)."""
    out, stack, seen = [], [s], set()
    while stack:
        t = stack.pop()
        if t in seen or t == root:
            continue
        seen.add(t)
        p = graph.producer.get(t)
        if p is None or t in graph.static:
            continue
        out.append(p)
        stack.extend(i for i in p.inputs if i)
    return sorted(out, key=lambda n: n.index)


def is_centring(graph: Graph, node: Node, carrying: set[str]) -> bool:
    """``x - mean(x)`` (however the mean is spelled), or a mean read only by such centrings: LayerNorm's linear
    part, which gets no eps-LRP stabiliser of its own (as inside ``LayerNormalization``)."""
    if not _onnx(node):
        return False
    if node.op_type in _REDUCTIONS:
        cons = _through_layout(graph, node.outputs[0])
        return bool(cons) and all(is_centring(graph, c, carrying) for c in cons)
    if node.op_type != "Sub" or len(node.inputs) != 2 or not all(i in carrying for i in node.inputs):
        return False
    memo: dict = {}
    for root in _roots(graph, node.inputs[0], carrying):
        ma, mb = moment(graph, node.inputs[0], root, carrying, memo), moment(graph, node.inputs[1], root, carrying,
                                                                               memo)
        if (ma is not None and mb is not None and ma.degree == mb.degree == 1 and not ma.reduced and mb.reduced
                and not (ma.second or mb.second)):
            return True
    return False


def _through_layout(graph: Graph, t: str) -> list[Node]:
    """The consumers of ``t``, looking through layout ops."""
    out = []
    for c in graph.consumers.get(t, []):
        if c.op_type in LAYOUT_OPS and _onnx(c) and c.inputs[0] == t:
            out.extend(_through_layout(graph, c.outputs[0]))
        else:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- functions
PROBES = np.array([0.0, 1e-8, -1e-8, 1e-4, -1e-4, 1e-2, -1e-2, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 10.0, -10.0])


def probe_function(graph: Graph, nodes: list[Node], x: str, y: str, points: np.ndarray = PROBES
                   ) -> np.ndarray | None:
    """``f(points)`` for the element-wise chain ``nodes`` computing ``y`` from ``x`` (static operands
    evaluated), as a ``(len(points), ...)`` array; None if an op has no declared forward or an operand is unknown."""
    values: dict[str, np.ndarray] = {}
    rank = 0
    for n in nodes:
        for i in n.inputs:
            if i and i != x and i not in values and i not in {o for m in nodes for o in m.outputs}:
                v = static_value(graph, i)
                if v is None:
                    return None
                values[i] = np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                rank = max(rank, values[i].ndim)
    values[x] = points.astype(np.float64).reshape((-1,) + (1,) * rank)
    with np.errstate(all="ignore"):
        for n in nodes:
            spec = spec_of(n)
            if spec is None or spec.forward is None:
                return None
            try:
                out = spec.forward([values[i] if i else None for i in n.inputs], n.attrs)
            except Exception:  # not evaluable here (unusual attributes): no verdict
                return None
            out = np.asarray(out)
            values[n.outputs[0]] = out.astype(np.float64) if out.dtype.kind == "f" else out
    if y not in values:
        return None
    out = np.asarray(values[y], dtype=np.float64)
    return out.reshape((len(points), -1)) if out.ndim else None


def zero_centred(values: np.ndarray | None, points: np.ndarray = PROBES) -> bool:
    """Whether ``f`` (sampled by :func:`probe_function`) has ``f(0) = 0`` and ``|f(x)/x|`` bounded near 0: where
    the identity rule ``G_x = G_y f(x)/x`` is sound (GELU, SiLU, tanh, ReLU: yes; sigmoid, exp, softplus, sqrt:
    no)."""
    if values is None:
        return False
    scale = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
    if not np.all(np.isfinite(values[0])) or np.max(np.abs(values[0])) > 1e-7 * scale:
        return False
    small = np.abs(points) <= 1e-2
    small[0] = False
    ratio = values[small] / points[small][:, None]
    return bool(np.all(np.isfinite(ratio)) and np.max(np.abs(ratio)) < 1e3)


def function_of_node(graph: Graph, node: Node, carrying: set[str]) -> bool:
    """Whether a single element-wise op with one carrying input (the first) is zero-centred in it."""
    if not node.inputs or node.inputs[0] not in carrying:
        return False
    if any(i in carrying for i in node.inputs[1:] if i):
        return False
    return zero_centred(probe_function(graph, [node], node.inputs[0], node.outputs[0]))


# ---------------------------------------------------------------------------------------------- unary regions
class Region(NamedTuple):
    """A unary region: element-wise nodes computing ``y = f(x)`` from one carrying tensor ``x``; ``sound``: ``f``
    is zero-centred (the identity rule applies by default)."""

    nodes: list[Node]
    x: str
    y: str
    sound: bool = True

    @property
    def name(self) -> str:
        return self.nodes[-1].name


def elementwise(node: Node | None) -> bool:
    spec = spec_of(node) if node is not None else None
    return spec is not None and spec.forward is not None


def _carrying_inputs(node: Node, carrying: set[str]) -> list[str]:
    return [i for i in node.inputs if i and i in carrying]


def _ew_ancestors(graph: Graph, t: str, carrying: set[str]) -> set[str]:
    """Tensors reachable backwards from ``t`` through element-wise producers (``t`` included)."""
    seen, frontier = {t}, [t]
    for _ in range(12):
        nxt = []
        for u in frontier:
            p = graph.producer.get(u)
            if elementwise(p):
                for i in _carrying_inputs(p, carrying):
                    if i not in seen:
                        seen.add(i)
                        nxt.append(i)
        frontier = nxt
        if not frontier:
            break
    return seen


def _nodes_between(graph: Graph, root: str, seed: Node, carrying: set[str]) -> set[str]:
    out = {seed.name}
    stack = [i for i in _carrying_inputs(seed, carrying) if i != root]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t == root:
            continue
        seen.add(t)
        p = graph.producer.get(t)
        if not elementwise(p) or root not in _ew_ancestors(graph, t, carrying):
            continue
        out.add(p.name)
        stack.extend(_carrying_inputs(p, carrying))
    return out


def _make_region(graph: Graph, nodes: list[Node], carrying: set[str]) -> Region | None:
    nodes = sorted(nodes, key=lambda n: n.index)
    names = {n.name for n in nodes}
    produced = {o for n in nodes for o in n.outputs if o}
    ext_in = {i for n in nodes for i in _carrying_inputs(n, carrying) if i not in produced}
    outs = {t for t in produced if t in carrying
            and (t in graph.output_names or any(c.name not in names for c in graph.consumers.get(t, [])))}
    if len(ext_in) != 1 or len(outs) != 1:
        return None
    return Region(nodes, ext_in.pop(), outs.pop())


def _chain_step(graph: Graph, t: str, carrying: set[str], inside: set[str], forward: bool, taken: set[str]
                ) -> Node | None:
    """The element-wise node with static other operands that extends a region (``inside``: its node names) at
    ``t``: forwards, the only consumer of its output ``t``; backwards, the producer of its input ``t`` when only the
    region reads ``t``. None if there is none."""
    if forward:
        cons = graph.consumers.get(t, [])
        if len(cons) != 1 or t in graph.output_names:
            return None
        n = cons[0]
    else:
        n = graph.producer.get(t)
        if n is None or t in graph.output_names or any(c.name not in inside for c in graph.consumers.get(t, [])):
            return None
    if n.name in taken or not elementwise(n) or len(_carrying_inputs(n, carrying)) != 1:
        return None
    return n


def _grow(graph: Graph, r: Region, carrying: set[str], taken: set[str], depth: int = 4) -> Region | None:
    """The smallest extension of a non-zero-centred region over neighbouring element-wise ops with static operands
    that is zero-centred (``2 * sigmoid(x) - 1``), or None."""
    best: Region | None = None
    before: list[Node] = []
    x = r.x
    for back in range(depth + 1):
        after: list[Node] = []
        y = r.y
        for fwd in range(depth + 1):
            if back or fwd:
                cand = Region(before + list(r.nodes) + after, x, y)
                if zero_centred(probe_function(graph, cand.nodes, cand.x, cand.y)):
                    if best is None or len(cand.nodes) < len(best.nodes):
                        best = cand
                    break
            n = _chain_step(graph, y, carrying, set(), True, taken)
            if n is None:
                break
            after.append(n)
            y = n.outputs[0]
        inside = {n.name for n in before + list(r.nodes)}
        p = _chain_step(graph, x, carrying, inside, False, taken)
        if p is None:
            break
        before.insert(0, p)
        x = _carrying_inputs(p, carrying)[0]
    return best


def find_unary_regions(graph: Graph, carrying: set[str], kinds: dict[str, str]) -> dict[str, Region]:
    """Zero-centred element-wise functions ``y = f(x)`` as regions (single non-linear ops included).

    Seeds: element-wise non-linearities with one carrying input, and element-wise nodes with several carrying
    inputs computed from one common tensor (``x * sigmoid(x)``, ``0.5 x (1 + erf(x / sqrt 2))``). Overlapping
    seeds merge; a region must have one carrying input and one output. A region that is not zero-centred grows over
    neighbouring static shifts/scales when that makes it zero-centred (``2 sigmoid(x) - 1``); else it is returned
    with ``sound=False`` (the analysis keeps its nodes' own rules unless a user forces the identity rule on it)."""
    by_name = {n.name: n for n in graph.nodes}
    seeds: list[set[str]] = []
    singles: set[str] = set()
    for n in graph.nodes:
        if n.name not in kinds or not elementwise(n):
            continue
        cin = _carrying_inputs(n, carrying)
        if kinds[n.name] in ("unary", "nonlinear") and len(set(cin)) == 1:
            seeds.append({n.name})
            singles.add(n.name)
            continue
        if len(cin) < 2:
            continue
        common = set.intersection(*[_ew_ancestors(graph, i, carrying) for i in cin])
        if not common:
            continue
        root = max(common, key=lambda t: -1 if graph.producer.get(t) is None else graph.producer[t].index)
        seeds.append(_nodes_between(graph, root, n, carrying))
    groups: list[set[str]] = []
    for names in seeds:
        merged, rest = set(names), []
        for g in groups:
            if g & merged:
                merged |= g
            else:
                rest.append(g)
        groups = rest + [merged]
    regions: dict[str, Region] = {}
    taken: set[str] = set()
    pending: list[Region] = []
    for g in groups:
        if not any(kinds.get(x) in ("unary", "nonlinear", "product", "gate") for x in g):
            continue  # only linear maps and sums: no non-linearity, each op keeps its rule
        region = _make_region(graph, [by_name[x] for x in g], carrying)
        candidates = [region] if region is not None else [
            r for r in (_make_region(graph, [by_name[x]], carrying) for x in g if x in singles) if r is not None]
        for r in candidates:
            if zero_centred(probe_function(graph, r.nodes, r.x, r.y)):
                regions[r.name] = r
                taken.update(n.name for n in r.nodes)
            else:
                pending.append(r)
    for r in pending:  # grow only after the zero-centred regions are fixed, so that growth never steals from them
        if any(n.name in taken for n in r.nodes):
            continue
        grown = _grow(graph, r, carrying, taken)
        if grown is not None:
            regions[grown.name] = grown
            taken.update(n.name for n in grown.nodes)
        elif len(r.nodes) > 1:
            regions[r.name] = r._replace(sound=False)
    return regions


# ---------------------------------------------------------------------------------------------- gates
def _pass_through(graph: Graph, node: Node, carrying: set[str]) -> list[str]:
    """The carrying inputs a factor's value is taken from, through data movement, sums and means, scaling by
    constants and products/quotients of such values (renormalised routing weights)."""
    cin = _carrying_inputs(node, carrying)
    if node.op_type in ("Mul", "Div"):
        return cin
    spec = spec_of(node)
    kind = spec.kind if spec is not None and not callable(spec.kind) else None
    if kind in ("movement", "reduce") or node.op_type in LAYOUT_OPS or node.op_type in SUM_OPS and len(cin) == 1:
        return cin[:1] if node.op_type not in ("Concat", "Where", "Max", "Min") else cin
    return []


def traced_to(graph: Graph, t: str, carrying: set[str], is_origin: Callable[[Node], bool],
              cache: dict[str, bool]) -> bool:
    """Whether the value of ``t`` comes only from nodes with ``is_origin`` (looking through
    :func:`_pass_through` ops), e.g. a gate computed by a sigmoid and then moved and renormalised."""
    if t in cache:
        return cache[t]
    cache[t] = False
    p = graph.producer.get(t)
    result = False
    if p is not None and t in carrying:
        if is_origin(p):
            result = True
        else:
            ins = _pass_through(graph, p, carrying)
            result = bool(ins) and all(traced_to(graph, i, carrying, is_origin, cache) for i in ins)
    cache[t] = result
    return result


def gate_inputs(graph: Graph, node: Node, carrying: set[str], is_gate_node: Callable[[Node], bool],
                cache: dict[str, bool]) -> frozenset[int]:
    """Indices of the carrying factors of a product that are gates (computed by ``is_gate_node`` nodes), when some
    other carrying factor is not a gate; else empty."""
    idx = [k for k, i in enumerate(node.inputs) if i and i in carrying]
    gates = frozenset(k for k in idx if traced_to(graph, node.inputs[k], carrying, is_gate_node, cache))
    return gates if 0 < len(gates) < len(idx) else frozenset()


# ---------------------------------------------------------------------------------------------- softmax
def nan_guard(graph: Graph, s: str) -> Node | None:
    """The ``Where(IsNaN(s), 0, s)`` node exporters put after a softmax ``s`` (fully masked rows), or None.

    Its output is exactly the NaN-free softmax: the rule reads it instead of ``s`` (one captured tensor less),
    and the ``Where`` passes the gradient through unmasked (the softmax rule multiplies it by ``s = 0`` there).
    """
    for node in graph.consumers.get(s, []):
        if node.op_type != "IsNaN":
            continue
        for where in graph.consumers.get(node.outputs[0], []):
            zero = graph.constant(where.inputs[1]) if where.op_type == "Where" else None
            if (where.inputs[0] == node.outputs[0] and where.inputs[2] == s and zero is not None
                    and zero.size == 1 and float(zero.reshape(-1)[0]) == 0.0):
                return where
    return None


_PRODUCTS = {"MatMul", "Mul", "Einsum", "Gemm", "Div"}


def weights_values(graph: Graph, s: str, carrying: set[str]) -> bool:
    """Whether the probabilities ``s`` weight other carrying values: followed through data movement, scaling by
    constants and renormalisation, they reach a product with a carrying operand that does not come from ``s``
    (``P V`` of attention, routing weights times expert outputs), rather than (only) the model's outputs."""
    derived = {s}
    stack = [s]
    while stack:
        t = stack.pop()
        for c in graph.consumers.get(t, []):
            cin = _carrying_inputs(c, carrying | derived)
            others = [i for i in cin if i not in derived]
            if c.op_type in _PRODUCTS and others and not all(i in graph.static for i in others):
                if any(i in carrying for i in others):
                    return True
            if c.op_type in _PRODUCTS or _pass_through(graph, c, carrying | derived) or c.op_type in ("Where",):
                for o in c.outputs:
                    if o and o not in derived:
                        derived.add(o)
                        stack.append(o)
    return False


# ---------------------------------------------------------------------------------------------- eps-LRP layers
# consumers that add a linear layer's bias: op type -> index of the bias input (the MatMul output is input 0)
_BIAS_CONSUMERS = {"BiasGelu": 1, "FastGelu": 1, "SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}


def following_bias(graph: Graph, node: Node) -> np.ndarray | None:
    """The constant bias ``b`` added to ``x W`` by the node's only consumer: ``Add(MatMul(x, W), b)`` (how
    exporters write a linear layer) or a fused op holding it (``BiasGelu``, ``FastGelu``, ``Skip*Normalization``
    from onnxruntime's optimizer), also behind a ``QuantizeLinear``/``DequantizeLinear`` pair; else None. The eps and gamma rules' ``z`` (and ``z+``) include the bias, as they
    do for ``Gemm`` and ``Conv``, so that the result does not depend on where the exporter put the bias."""
    out = _after_qdq(graph, node.outputs[0])  # a QDQ graph quantises x W before the bias Add
    cons = graph.consumers.get(out, [])
    if len(cons) != 1 or out in graph.output_names:
        return None
    c = cons[0]
    if c.op_type == "Add":
        other = [i for i in c.inputs if i != out]
        name = other[0] if len(other) == 1 else None
    elif c.op_type in _BIAS_CONSUMERS and c.inputs[0] == out and out not in c.inputs[1:]:
        k = _BIAS_CONSUMERS[c.op_type]
        name = c.inputs[k] if len(c.inputs) > k and c.inputs[k] else None
    else:
        return None
    b = static_value(graph, name) if name else None
    return b if b is not None and b.ndim <= 1 else None


def _after_qdq(graph: Graph, t: str) -> str:
    """``t`` followed through the ``QuantizeLinear``/``DequantizeLinear`` pairs that are its only readers (activation
    quantisation of a QDQ graph, transparent to relevance)."""
    for _ in range(4):
        cons = graph.consumers.get(t, [])
        if len(cons) != 1 or cons[0].op_type != "QuantizeLinear" or t in graph.output_names:
            return t
        deq = graph.consumers.get(cons[0].outputs[0], [])
        if len(deq) != 1 or deq[0].op_type != "DequantizeLinear":
            return t
        t = deq[0].outputs[0]
    return t


def _before_qdq(graph: Graph, t: str) -> str:
    """``t`` followed back through ``DequantizeLinear(QuantizeLinear(.))`` pairs (see :func:`_after_qdq`)."""
    for _ in range(4):
        d = graph.producer.get(t)
        q = graph.producer.get(d.inputs[0]) if d is not None and d.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or _after_qdq(graph, q.inputs[0]) != t:
            return t
        t = q.inputs[0]
    return t


def continues_sum(graph: Graph, node: Node) -> bool:
    """Whether the node's output is read only by one more ``Add``/``Sub``/``Sum`` (the sum goes on there)."""
    out = _after_qdq(graph, node.outputs[0])
    cons = graph.consumers.get(out, [])
    return len(cons) == 1 and cons[0].op_type in SUM_OPS and out not in graph.output_names


def sums_carrying_terms(graph: Graph, node: Node, kinds: dict[str, str]) -> bool:
    """Whether the chain of sums ending at ``node`` adds several carrying tensors (some node of it is ``add``)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if kinds.get(n.name) == "add":
            return True
        for i in n.inputs:
            i = _before_qdq(graph, i) if i else i
            p = graph.producer.get(i) if i else None
            if p is not None and p.op_type in SUM_OPS and continues_sum(graph, p):
                stack.append(p)
    return False


def epsilon_site(graph: Graph, node: Node, layer: str | None, kind: str, kinds: dict[str, str], carrying: set[str]
                 ) -> tuple[bool, np.ndarray | None]:
    """``(is_site, bias)``: whether eps-LRP stabilises this node's output, once per *layer* whatever ops a graph
    splits it into, and the bias to include in ``z``.

    Layers: a linear map with its bias, ``z = x W + b`` (``MatMul``/``Einsum`` take the bias from the node that adds
    it, :func:`following_bias`; ``Gemm``/``Conv`` hold it); a sum of several carrying tensors, ``z`` being the whole
    chain of ``Add`` nodes it is written as (``word + segment + position``, in any order), stabilised at the chain's
    last ``Add``; a pooling (``reduce``). Element-wise scaling or shifting by a tensor that carries no relevance (a
    bias ``Add`` after its ``MatMul``, attention's ``1/sqrt(d)`` and mask, GELU's ``0.5``, a detached norm
    statistic) belongs to its neighbouring layer: no stabiliser, as in the fused ops (``Attention``, ``BiasGelu``,
    ``Skip*Normalization``) that compute it inside. A LayerNorm's centring ``x - mean(x)`` gets none either, as
    inside ``LayerNormalization``.

    ``layer`` is what the op declares (:class:`onnx_lrp.ops.OpSpec`): ``"map"`` (a linear map whose bias may follow
    in the next node), ``"output"`` (``z`` is the node's output: ``Gemm``/``Conv`` with their bias), ``"sum"``,
    ``"pool"``, or None."""
    if layer is None or is_centring(graph, node, carrying):
        return False, None
    if layer == "sum":
        if kind not in ("add", "linear") or continues_sum(graph, node):
            return False, None
        return sums_carrying_terms(graph, node, kinds), None
    if layer == "pool":
        return kind == "reduce", None
    if kind != "linear":
        return False, None
    return True, (following_bias(graph, node) if layer == "map" else None)


# ---------------------------------------------------------------------------------------------- one-hot ids
ID_CHAIN_OPS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def id_origin(graph: Graph, tensor: str) -> str | None:
    """The integer graph input ``tensor`` is (through reshapes and casts), else None."""
    while True:
        if tensor in graph.input_names:
            gi = next(i for i in graph.inputs if i.name == tensor)
            return tensor if gi.is_int else None
        p = graph.producer.get(tensor)
        if p is None or p.op_type not in ID_CHAIN_OPS:
            return None
        tensor = p.inputs[0]


def one_hot_ids(graph: Graph, node: Node) -> str | None:
    """The integer input that ``node`` one-hot encodes into a float tensor, else None: ``OneHot(ids, depth,
    values)`` with float values, ``Cast(Equal(ids, range))`` to a float type, ``Where(Equal(ids, range), 1, 0)``
    (``range`` static: the vocabulary)."""
    from ._graph import FLOAT_TYPES

    if not _onnx(node):
        return None
    if node.op_type == "OneHot":
        vals = graph.constant(node.inputs[2]) if len(node.inputs) > 2 else None
        if vals is not None and vals.dtype.kind == "f":
            return id_origin(graph, node.inputs[0])
        return None
    if node.op_type == "Cast" and node.attr("to") in FLOAT_TYPES:
        eq = graph.producer.get(node.inputs[0])
    elif node.op_type == "Where" and len(node.inputs) == 3:
        on, off = (graph.constant(i) for i in node.inputs[1:])
        if on is None or off is None or on.dtype.kind != "f" or on.size != 1 or off.size != 1:
            return None
        if not (float(on.reshape(-1)[0]) == 1.0 and float(off.reshape(-1)[0]) == 0.0):
            return None
        eq = graph.producer.get(node.inputs[0])
    else:
        return None
    if eq is None or eq.op_type != "Equal" or not _onnx(eq):
        return None
    a, b = eq.inputs
    for ids, vocab in ((a, b), (b, a)):
        if vocab in graph.static:
            origin = id_origin(graph, ids)
            if origin is not None:
                return origin
    return None


def is_float_cast_of(graph: Graph, node: Node) -> str | None:
    """The integer input that ``node`` casts to a float tensor (through reshapes), else None."""
    from ._graph import FLOAT_TYPES

    if node.op_type == "Cast" and _onnx(node) and node.attr("to") in FLOAT_TYPES:
        return id_origin(graph, node.inputs[0])
    return None


def erf(x: np.ndarray) -> np.ndarray:
    """The error function on a numpy array (exact: ``math.erf`` per element; for small probe arrays)."""
    x = np.asarray(x, dtype=np.float64)
    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x


# ---------------------------------------------------------------------------------------------- layouts
_RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}


def input_batch_axis(graph: Graph, name: str) -> int:
    """The batch axis of graph input ``name``: 1 where it feeds (through casts/identities) the sequence input of a
    recurrent op in its default seq-first layout (``layout = 0``: ``(seq, batch, features)``), else 0."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        for c in graph.consumers.get(t, []):
            if c.op_type in _RECURRENT and c.inputs and c.inputs[0] == t:
                return 0 if int(c.attr("layout", 0)) else 1
            if c.op_type in ("Cast", "Identity") and c.outputs[0] not in seen:
                seen.add(c.outputs[0])
                stack.append(c.outputs[0])
    return 0


def output_layout(graph: Graph, output: str, shape: tuple[int, ...], feeds: dict, sources: dict[str, str],
                  batch_axis: int | None = None, position_axis: int | None = None) -> tuple[int, int | None]:
    """``(batch axis, position axis or None)`` of an output of ``shape`` (classes: the last axis).

    The batch axis is the one the graph names after the batch dimension of the explained input (a time-major
    ``(T, N, C)`` output of a CTC recogniser names its axis 1 like the input's axis 0); without such names, the one
    axis whose size is the batch size; else axis 0. A 3-D output's position axis is the other non-class axis.
    Raises :class:`~onnx_lrp.errors.TargetError` for an output with no axis of the batch size (explaining it would
    fold several scores of one batch element together)."""
    from .errors import TargetError

    nd = len(shape)
    src = graph.source

    def axis(a: int, what: str) -> int:
        if not -nd <= a < nd:
            raise TargetError(f"{src}: {what}={a} is out of range for output {output!r} of shape {tuple(shape)}")
        return a % nd

    main = next((i for i in sources.values() if i in feeds and feeds[i].ndim), None)
    if batch_axis is not None:
        b = axis(batch_axis, "batch_axis")
    elif main is None:
        b = 0
    else:
        in_axis = input_batch_axis(graph, main)
        in_dims = next((i.shape for i in graph.inputs if i.name == main), [])
        name = in_dims[in_axis] if len(in_dims) > in_axis and isinstance(in_dims[in_axis], str) else None
        dims = graph.output_dims.get(output, [])
        B = feeds[main].shape[in_axis] if feeds[main].ndim > in_axis else 1
        cands = [k for k in range(max(nd - 1, 1)) if shape[k] == B]
        if name and len(dims) == nd and dims.count(name) == 1 and shape[dims.index(name)] == B:
            b = dims.index(name)
        elif cands:
            b = 0 if 0 in cands else cands[0]
        else:
            raise TargetError(
                f"{src}: output {output!r} of shape {tuple(shape)} has no axis of the batch size {B} (input {main!r});"
                " explaining it would fold several scores of one batch element together: pass batch_axis= or "
                "output_relevance=")
    if nd != 3:
        return b, None
    if b == nd - 1:
        raise TargetError(f"{src}: the batch axis of output {output!r} {tuple(shape)} is its class axis (the last)")
    p = axis(position_axis, "position_axis") if position_axis is not None else 1 - b
    if p in (b, nd - 1):
        raise TargetError(f"{src}: position_axis={position_axis} of output {output!r} {tuple(shape)} must be "
                          "neither the batch nor the class axis")
    return b, p


def right_padding_only(graph: Graph) -> list[str]:
    """Names of the attention nodes that take one sequence length per row instead of a mask, so that a padded
    batch can only be right-padded: com.microsoft ``Attention``/``MultiHeadAttention`` whose mask is 1-D (the
    ``mask_index`` of ``EmbedLayerNormalization``, or a ``ReduceSum`` of the mask) and ``GroupQueryAttention``
    (``seqlens_k``)."""
    out = []
    for n in graph.nodes:
        if (n.domain or ONNX) != "com.microsoft":
            continue
        if n.op_type == "GroupQueryAttention":
            out.append(n.name)
            continue
        k = {"Attention": 3, "MultiHeadAttention": 4}.get(n.op_type)
        if k is None or len(n.inputs) <= k or not n.inputs[k]:
            continue
        p = graph.producer.get(n.inputs[k])
        while p is not None and p.op_type in ("Cast", "Identity"):
            p = graph.producer.get(p.inputs[0])
        if p is not None and p.op_type in ("EmbedLayerNormalization", "ReduceSum"):
            out.append(n.name)
    return out
