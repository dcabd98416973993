"""Latent relevance at the level a person thinks in: residual stream dimensions, MLP neurons, attention heads.

Layers are named by **selectors** found from the graph's structure, never from node names:

- ``resid:L``: the residual stream entering layer ``L`` (``resid:0``: the embeddings; ``resid:N`` after the last of
  ``N`` layers, before the final norm). Post-norm models (BERT) carry the normalised stream between layers: there it
  is each layer's last norm output.
- ``mlp:L``: the MLP neurons of layer ``L``: the tensor entering the last linear map of the layer's MLP branch (the
  down projection).
- ``head:L``: the attention heads of layer ``L``: the attention output before the output projection, split into
  heads; ``head:L.H`` is head ``H`` alone. ``cross:L``: a decoder's second attention (cross-attention).

How the structure is found (:func:`find_layers`): a *residual sum* is a sum (a chain of ``Add``/``Sub``/``Sum``, or
the sum inside ``Skip*Normalization``) one of whose terms, the skip, is an ancestor of every other term through a
path with a linear map (a sublayer with weights: ``h + f(h)``; a GELU's ``x + c x^3`` has none); parallel blocks
(``h + attn(h) + mlp(h)``) are one sum with two branch terms. A branch is *attention* when it holds a product of two
carrying tensors fed by a ``Softmax`` (``A V``) or a fused attention op, else *MLP*. Residual sums whose skip
descends from the previous one form the stream; a layer is a run of attention sums followed by MLP sums. The
layer's sites are read off by walking back from a branch term to its last linear map (through bias adds, norms and
data movement; a branch that merges several paths before it, a mixture of experts, has no single down projection)
and, for heads, further back through the ``Transpose`` that merges heads (or to a fused attention op's
``num_heads``).

On a site, per explanation: the relevance of unit ``u`` is ``R_u = sum_p R_{p,u}`` over positions ``p`` (a head
sums over its output features too, as AttnLRP's Sec. 4.3 does for heads); conditional
relevance ("relevance through a concept", CRP) keeps only the part of the modified gradient at the site that flows
through chosen units: ``R_x(u) = x * G_x`` with ``G_site`` masked to ``u`` (linear in ``G``, so the conditional
heatmaps of all units of a site sum to the relevance that flows through the site).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ._analysis import Analysis, propagate
from ._graph import Graph, Node
from ._patterns import SUM_OPS
from ._registry import MS, spec_of
from .errors import TargetError
from .explainer import Explainer, Explanation
from .validate._residual import SKIP_NORMS

# fused attention ops with a num_heads attribute (com.microsoft)
FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
# single-input data movement a head output passes on its way to the output projection
_MOVES = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


@dataclass(frozen=True)
class Site:
    """A named layer: the graph tensor it reads and how its units lie in that tensor.

    ``axis``: the unit axis of the tensor (neurons, stream dimensions; heads-first attention outputs: the head
    axis), negative from the end, or 1 for the channels of a convolution's input. ``heads``: for attention outputs whose heads are packed in the last axis (fused
    attention ops), the number of heads (``axis`` is then -1 and ``D = features / heads``).
    """

    selector: str
    kind: str  # "resid", "mlp", "head", "cross"
    layer: int
    tensor: str
    axis: int = -1
    heads: int | None = None


@dataclass
class Layers:
    """The sites of a model (:func:`find_layers`), by selector, and notes on what was not found."""

    sites: dict[str, Site]
    n_layers: int
    notes: list[str] = field(default_factory=list)

    def selectors(self) -> list[str]:
        return list(self.sites)

    def resolve(self, selector: str) -> tuple[Site, int | None]:
        """``"mlp:12"`` -> (its site, None); ``"head:12.3"`` -> (the heads of layer 12, 3)."""
        if not isinstance(selector, str) or ":" not in selector:
            raise TargetError(f"selector {selector!r}: expected KIND:LAYER such as 'mlp:12', 'head:12.3', 'resid:8'")
        kind, _, rest = selector.partition(":")
        layer, _, unit = rest.partition(".")
        site = self.sites.get(f"{kind}:{layer}")
        if site is None:
            kinds = sorted({s.kind for s in self.sites.values()})
            msg = f"selector {selector!r}: this model offers {kinds} for layers 0..{self.n_layers - 1}"
            if self.notes:
                msg += "; " + "; ".join(self.notes)
            raise TargetError(msg)
        if not unit:
            return site, None
        if site.kind not in ("head", "cross") or not unit.isdigit():
            raise TargetError(f"selector {selector!r}: only heads take a unit ('head:12.3'); give neurons separately")
        return site, int(unit)


# ---------------------------------------------------------------------------------------------- structure
@dataclass
class _Sum:
    out: str  # the sum's value (or, for a Skip*Normalization without its sum output, the normalised one)
    skip: str
    branches: list[str]
    node: Node
    attn: list[str] = field(default_factory=list)  # the branch terms that hold attention
    mlp: list[str] = field(default_factory=list)  # the others


class _Finder:
    def __init__(self, graph: Graph, analysis: Analysis):
        self.g = graph
        # structural: what a composite detaches (CP-LRP's attention weights, norm statistics) still counts
        self.carrying = propagate(graph, dict(analysis.sources), set()) | analysis.carrying

    def index(self, t: str) -> int:
        p = self.g.producer.get(t)
        return -1 if p is None else p.index

    def preds(self, t: str) -> list[str]:
        """Carrying tensors ``t`` is computed from; a fused ``Skip*Normalization`` normalises its own sum
        (output 3), so its output 0 is computed from output 3 where the graph returns it."""
        p = self.g.producer.get(t)
        if p is None:
            return []
        ins = [i for i in p.inputs if i and i in self.carrying]
        if p.op_type in SKIP_NORMS and len(p.outputs) > 3 and p.outputs[3] and t != p.outputs[3]:
            return [p.outputs[3]]
        return ins

    def succs(self, t: str) -> list[str]:
        """Carrying tensors computed from ``t`` (the inverse of :meth:`preds`)."""
        out = []
        for c in self.g.consumers.get(t, []):
            if c.op_type in SKIP_NORMS and len(c.outputs) > 3 and c.outputs[3]:
                out.append(c.outputs[3])
            else:
                out.extend(o for o in c.outputs if o and o in self.carrying)
        p = self.g.producer.get(t)
        if p is not None and p.op_type in SKIP_NORMS and len(p.outputs) > 3 and t == p.outputs[3]:
            out.extend(o for k, o in enumerate(p.outputs) if o and k != 3 and o in self.carrying)
        return out

    def is_ancestor(self, a: str, t: str) -> bool:
        """Whether carrying tensor ``a`` is ``t`` or an ancestor of it."""
        lo = self.index(a)
        stack, seen = [t], set()
        while stack:
            u = stack.pop()
            if u == a:
                return True
            if u in seen or self.index(u) < lo:
                continue
            seen.add(u)
            stack.extend(self.preds(u))
        return False

    def between(self, a: str, t: str) -> list[Node]:
        """Nodes on carrying paths from ``a`` to ``t`` (``t``'s producer included), in topological order."""
        lo = self.index(a)
        back: set[str] = set()
        stack, seen = [t], set()
        while stack:
            u = stack.pop()
            if u in seen or u == a or self.index(u) < lo:
                continue
            seen.add(u)
            back.add(u)
            stack.extend(self.preds(u))
        fwd: set[str] = set()
        stack = [a]
        while stack:
            u = stack.pop()
            for v in self.succs(u):
                if v in back and v not in fwd:
                    fwd.add(v)
                    stack.append(v)
        nodes = {self.g.producer[v].name: self.g.producer[v] for v in fwd}
        return sorted(nodes.values(), key=lambda n: n.index)

    def nearest(self, t: str, targets: set[str]) -> str | None:
        """The first of ``targets`` met walking back from ``t`` breadth-first (``t`` itself included)."""
        frontier, seen = [t], {t}
        while frontier:
            hit = [u for u in frontier if u in targets]
            if hit:
                return hit[0]
            nxt = []
            for u in frontier:
                for v in self.preds(u):
                    if v not in seen:
                        seen.add(v)
                        nxt.append(v)
            frontier = nxt
        return None

    def is_weight_map(self, n: Node) -> bool:
        """A linear map with a weight (an op declared as a layer's map: ``MatMul``, ``Gemm``, ``Conv``, ``Einsum``,
        ``MatMulNBits``, ...): one carrying operand among the first two, the other static."""
        spec = spec_of(n)
        if spec is None or spec.layer not in ("map", "output"):
            return False
        ops = [i for i in n.inputs[:2] if i]
        return sum(i in self.carrying for i in ops) == 1 and any(i in self.g.static for i in ops)

    def is_attention(self, nodes: list[Node]) -> bool:
        names = {n.name for n in nodes}
        for n in nodes:
            if _fused_attention(n):
                return True
            if n.op_type in ("MatMul", "Einsum") and sum(i in self.carrying for i in n.inputs[:2] if i) == 2:
                if any(self._from_softmax(i, names) for i in n.inputs[:2]):
                    return True
        return False

    def _from_softmax(self, t: str, names: set[str]) -> bool:
        for _ in range(8):  # through data movement and masking (Where, Cast, Dropout, Reshape, Expand...)
            p = self.g.producer.get(t)
            if p is None or p.name not in names:
                return False
            if p.op_type == "Softmax":
                return True
            t = self.only_input(p)
            if t is None:
                return False
        return False

    def only_input(self, p: Node) -> str | None:
        """The one carrying input of ``p`` (None if it has several or none)."""
        ins = [i for i in p.inputs if i and i in self.carrying]
        return ins[0] if len(ins) == 1 else None

    # ------------------------------------------------------------------ sums
    def sums(self) -> list[_Sum]:
        out = []
        for n in self.g.nodes:
            if n.op_type in SKIP_NORMS:
                terms = [i for i in n.inputs[:2] if i and i in self.carrying]
                has_sum = len(n.outputs) > 3 and n.outputs[3] and self.g.consumers.get(n.outputs[3])
                value = n.outputs[3] if has_sum else n.outputs[0]
            elif n.op_type in SUM_OPS and n.outputs[0] in self.carrying and not self._continues(n):
                terms = self._terms(n)
                value = n.outputs[0]
            else:
                continue
            if len(terms) < 2:
                continue
            for skip in terms:
                others = [t for t in terms if t != skip]
                if all(self.is_ancestor(skip, t) for t in others):
                    paths = {t: self.between(skip, t) for t in others}
                    if all(any(self.is_weight_map(m) for m in p) for p in paths.values()):
                        s = _Sum(value, skip, others, n)
                        for t in others:
                            (s.attn if self.is_attention(paths[t]) else s.mlp).append(t)
                        out.append(s)
                    break
        return out

    def _continues(self, n: Node) -> bool:
        cons = self.g.consumers.get(n.outputs[0], [])
        return len(cons) == 1 and cons[0].op_type in SUM_OPS and n.outputs[0] not in self.g.output_names

    def _terms(self, n: Node) -> list[str]:
        terms: list[str] = []
        for i in n.inputs:
            if not i or i not in self.carrying:
                continue
            p = self.g.producer.get(i)
            if p is not None and p.op_type in SUM_OPS and self._continues(p):
                terms.extend(self._terms(p))
            else:
                terms.append(i)
        return list(dict.fromkeys(terms))

    # ------------------------------------------------------------------ sites
    def last_map(self, term: str, skip: str) -> Node | None:
        """The last weight map on the branch ending at ``term``: walk back through single-path nodes; where a node
        reads several carrying inputs, continue with the one all others descend from (a norm's ``x * 1/rms(x)``)."""
        t = term
        for _ in range(64):
            p = self.g.producer.get(t)
            if p is None or t == skip:
                return None
            if self.is_weight_map(p):
                return p
            ins = list(dict.fromkeys(self.preds(t)))
            if not ins:
                return None
            root = [a for a in ins if all(self.is_ancestor(a, b) for b in ins)]
            if len(root) != 1:
                return None
            t = root[0]
        return None

    def neuron_tensor(self, m: Node) -> tuple[str, int]:
        """The tensor entering weight map ``m`` before any reshape, and its unit axis."""
        t = next(i for i in m.inputs[:2] if i in self.carrying)
        while True:
            p = self.g.producer.get(t)
            if p is None or p.op_type not in _RESHAPES or len(self.g.consumers.get(t, [])) != 1:
                break
            nxt = self.only_input(p)
            if nxt is None:
                break
            t = nxt
        axis = 1 if m.op_type in ("Conv", "ConvTranspose") else -1
        return t, axis

    def head_tensor(self, m: Node) -> tuple[str, int, int | None] | None:
        """(tensor, head axis, packed heads) of the attention output entering the output projection ``m``."""
        t = next(i for i in m.inputs[:2] if i in self.carrying)
        for _ in range(16):
            p = self.g.producer.get(t)
            if p is None:
                return None
            if _fused_attention(p):
                heads = p.attr("num_heads")
                return (t, -1, int(heads)) if heads else None
            if p.op_type == "Transpose":
                perm = list(p.attr("perm") or [])
                if len(perm) == 4:  # (B, H, S, D) -> (B, S, H, D): heads on the input's axis perm[2]
                    return p.inputs[0], perm[2] - 4, None
            t = self.only_input(p) if p.op_type in _MOVES else None
            if t is None:
                return None
        return None


def _fused_attention(n: Node) -> bool:
    return n.op_type in FUSED_ATTENTION and n.domain == MS


def find_layers(graph: Graph, analysis: Analysis) -> Layers:
    """The residual stream, MLP and attention sites of ``graph`` (module docstring), from its structure (the
    tensors depending on ``analysis``' relevance sources, whatever its composite detaches)."""
    f = _Finder(graph, analysis)
    sums = f.sums()
    notes: list[str] = []
    if not sums:
        return Layers({}, 0, ["no residual sums found (h + f(h) with a weight map in f)"])
    chains: list[list[_Sum]] = []
    last_of: dict[str, list[_Sum]] = {}  # a chain by the value of its last sum
    for s in sums:  # each sum continues the chain of the nearest residual sum its skip is computed from
        prev = f.nearest(s.skip, set(last_of))
        chain = last_of.pop(prev) if prev is not None else None
        if chain is None:
            chain = []
            chains.append(chain)
        chain.append(s)
        last_of[s.out] = chain
    chain = max(chains, key=len)
    if len(chains) > 1:
        notes.append(f"{len(chains)} residual streams (e.g. an encoder and a decoder, two towers); selectors name "
                     f"the longest ({len(chain)} sums)")
    any_attn = any(s.attn for s in chain)
    if any_attn and not chain[0].attn:  # sums before the first attention (a convolutional position embedding)
        first = next(k for k, s in enumerate(chain) if s.attn)
        notes.append(f"{first} residual sum(s) before the first attention belong to the embeddings, not to a layer")
        chain = chain[first:]
    layers: list[list[_Sum]] = []
    for s in chain:
        if not layers or not any_attn or (s.attn and any(x.mlp for x in layers[-1])):
            layers.append([])
        layers[-1].append(s)
    sites: dict[str, Site] = {}
    streams = [(li, group[0].skip, group[0]) for li, group in enumerate(layers)]
    final = _final_stream(f, chain)
    if final is None:
        notes.append(f"resid:{len(layers)} (after the last layer) is not a tensor of this graph")
    else:
        streams.append((len(layers), final, chain[-1]))
    fused = []
    for li, tensor, s in streams:
        p = graph.producer.get(tensor)
        if p is not None and p.op_type in SKIP_NORMS and tensor != p.outputs[0]:
            fused.append(f"resid:{li}")  # its gradient also flows in through the node's own norm output
            continue
        sites[f"resid:{li}"] = Site(f"resid:{li}", "resid", li, tensor, _stream_axis(f, s))
    if fused:
        notes.append(f"{', '.join(fused)}: the sum inside a fused Skip*Normalization (pre-norm, onnxruntime-"
                     "optimised), whose relevance the node does not expose; explain the unfused export")
    for li, group in enumerate(layers):
        attn = [(s, t) for s in group for t in s.attn]
        mlp = [(s, t) for s in group for t in s.mlp]
        for kind, (s, t) in zip(("head", "cross"), attn):
            m = f.last_map(t, s.skip)
            found = f.head_tensor(m) if m is not None else None
            if found is None:
                notes.append(f"{kind}:{li}: no output projection with a head layout found")
                continue
            sites[f"{kind}:{li}"] = Site(f"{kind}:{li}", kind, li, found[0], found[1], found[2])
        if mlp:
            s, t = mlp[-1]
            m = f.last_map(t, s.skip)
            if m is None:
                notes.append(f"mlp:{li}: the MLP branch merges several paths before its last linear map "
                             "(a mixture of experts?): no single neuron tensor")
            else:
                tensor, axis = f.neuron_tensor(m)
                sites[f"mlp:{li}"] = Site(f"mlp:{li}", "mlp", li, tensor, axis)
    order = {"resid": 0, "mlp": 1, "head": 2, "cross": 3}
    sites = dict(sorted(sites.items(), key=lambda kv: (order[kv[1].kind], kv[1].layer)))
    return Layers(sites, len(layers), notes)


def _stream_axis(f: _Finder, s: _Sum) -> int:
    m = f.last_map(s.branches[0], s.skip)
    return 1 if m is not None and m.op_type in ("Conv", "ConvTranspose") else -1


def _final_stream(f: _Finder, chain: list[_Sum]) -> str | None:
    """The stream after the last residual sum, read the way the earlier layers hand it on: the sum itself
    (pre-norm), or what the same ops between a sum and the next skip give after the last sum (post-norm)."""
    last = chain[-1]
    if len(chain) < 2 or all(b.skip == a.out for a, b in zip(chain, chain[1:])):
        pre_norm = any(x.node.op_type in SKIP_NORMS and x.out != x.node.outputs[0] for x in chain)
        if pre_norm and last.out == last.node.outputs[0]:
            return None  # the last fused norm does not return its sum, only the final norm's output
        return last.out
    a, b = chain[-2], chain[-1]
    ops = sorted(n.op_type for n in f.between(a.out, b.skip))
    # candidates: tensors a few steps after the last sum, in topological order, reached by the same ops
    near, frontier = set(), [last.out]
    for _ in range(len(ops) + 2):
        frontier = [v for u in frontier for v in f.succs(u) if v not in near]
        near.update(frontier)
    for o in sorted(near, key=f.index):
        if ops and sorted(x.op_type for x in f.between(last.out, o)) == ops:
            return o
    return None


# ---------------------------------------------------------------------------------------------- read-outs
def unit_values(site: Site, values: Any, batch_axes: int = 1, reduce: str = "sum") -> np.ndarray:
    """``values`` of a site's tensor as ``lead + (positions, units)``: neurons or heads on the last axis, every
    other axis (sequence, image positions) flattened into positions. Heads sum their output features
    (``reduce="sum"``, for relevance) or take their L2 norm (``"norm"``, the size of a head's output).
    ``batch_axes``: leading axes kept (1; 2 for ``(batch, targets, ...)``)."""
    v = np.asarray(values)
    lead = v.shape[:batch_axes]
    if site.kind in ("head", "cross"):
        if site.heads:  # (..., S, H*D) -> (..., S, H, D)
            v = v.reshape(v.shape[:-1] + (site.heads, -1))
            axis = -2
        else:
            if v.ndim - batch_axes != 3:
                raise TargetError(f"{site.selector}: tensor {site.tensor!r} has shape {v.shape}, not (batch, heads, "
                                  "seq, head_dim)")
            axis = site.axis
        v = v.sum(-1) if reduce == "sum" else np.sqrt((v * v).sum(-1))
        axis += 1  # the reduced feature axis came after it
    else:
        axis = site.axis if site.axis < 0 else site.axis + batch_axes - 1
    if v.ndim - batch_axes < 1:
        raise TargetError(f"{site.selector}: tensor {site.tensor!r} has shape {v.shape}: no unit axis")
    v = np.moveaxis(v, axis, -1)
    return v.reshape(lead + (-1, v.shape[-1]))


# ---------------------------------------------------------------------------------------------- explaining
@dataclass
class LatentExplanation:
    """Relevance of the units (neurons, stream dimensions, heads) of chosen layers for one explained output.

    ``explanation``: the full :class:`~onnx_lrp.Explanation` (input relevance, outputs, target). Per selector:
    ``relevance[sel]`` and ``activations[sel]`` are ``(batch, positions, units)`` (heads: summed relevance and the
    L2 norm of each head's output per position); a selector naming one head (``"head:3.1"``) keeps that unit only.
    """

    explanation: Explanation
    relevance: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    sites: dict[str, Site]

    def unit_relevance(self, selector: str) -> np.ndarray:
        """``(batch, units)``: each unit's relevance summed over positions, ``R_u = sum_p R_{p,u}``."""
        return self.relevance[selector].sum(1)

    def top(self, selector: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` units with the largest ``|R_u|`` per batch element: ``(indices, signed relevance)``, each
        ``(batch, k)``, by decreasing magnitude (ties: lower index first)."""
        r = self.unit_relevance(selector)
        k = min(k, r.shape[-1])
        order = np.argsort(-np.abs(r), axis=-1, kind="stable")[:, :k]
        return order, np.take_along_axis(r, order, -1)


@dataclass
class ConditionalExplanation:
    """Input relevance of the part of an explained output that flows through each chosen unit of a site.

    ``relevance[input]``: ``(batch, units, seq)`` for token inputs (``(batch, units) + shape`` for float inputs),
    one heatmap per unit in ``units``. Summed over all units of a site they give the relevance flowing through
    the site (all of it for a residual stream site that every path crosses).
    """

    relevance: dict[str, np.ndarray]
    units: list[int]
    site: Site
    target: np.ndarray | None
    position: np.ndarray | None
    score: np.ndarray


class LatentExplainer:
    """Latent relevance by selector for an :class:`~onnx_lrp.Explainer` (its model's layers found once).

    >>> lat = LatentExplainer(Explainer("model.onnx"))
    >>> lat.selectors()                                # ['resid:0', ..., 'mlp:0', ..., 'head:0', ...]
    >>> r = lat.explain(inputs, ["mlp:12", "head:12"])
    >>> r.top("mlp:12", k=10)                          # most relevant neurons and their relevance, per sample
    >>> c = lat.conditional(inputs, "mlp:12", [3, 17])  # token heatmaps of the part flowing through 2 neurons
    """

    def __init__(self, explainer: Explainer):
        self.explainer = explainer
        self.layers = find_layers(explainer.graph, explainer.analysis)

    def selectors(self) -> list[str]:
        return self.layers.selectors()

    def site(self, selector: str) -> tuple[Site, int | None]:
        site, unit = self.layers.resolve(selector)
        if site.tensor not in self.explainer.analysis.carrying:
            raise TargetError(f"{selector}: tensor {site.tensor!r} carries no relevance under composite "
                              f"{self.explainer.composite.name!r}")
        return site, unit

    def explain(self, inputs: Mapping[str, Any], selectors: Sequence[str], target: Any = None,
                position: Any = None, *, output: str | None = None) -> LatentExplanation:
        """One relevance pass collecting every selector's tensor (target/position as in
        :meth:`Explainer.explain`; one target per batch element)."""
        resolved = {sel: self.site(sel) for sel in selectors}
        tensors = list(dict.fromkeys(site.tensor for site, _ in resolved.values()))
        res = self.explainer.explain(inputs, target, position, output=output, collect=tensors)
        if res.target is not None and np.ndim(res.target) > 1:
            raise TargetError("LatentExplainer.explain takes one target per batch element")
        rel, act = {}, {}
        for sel, (site, unit) in resolved.items():
            r = unit_values(site, res.latent[site.tensor])
            a = unit_values(site, res.activations[site.tensor], reduce="norm")
            if unit is not None:
                _check_unit(site, unit, r.shape[-1])
                r, a = r[..., unit:unit + 1], a[..., unit:unit + 1]
            rel[sel], act[sel] = r, a
        return LatentExplanation(res, rel, act, {sel: s for sel, (s, _) in resolved.items()})

    def conditional(self, inputs: Mapping[str, Any], selector: str, units: Sequence[int] | None = None,
                    target: Any = None, position: Any = None, *, output: str | None = None,
                    chunk: int = 16) -> ConditionalExplanation:
        """Input heatmaps conditioned on each unit of ``selector`` (CRP): the explained output's relevance that
        flows through unit ``u`` alone, for every ``u`` in ``units`` (default: the head a selector names). The
        units are explained as targets of one batched pass, ``chunk`` at a time."""
        site, unit = self.site(selector)
        if units is None:
            if unit is None:
                raise TargetError(f"conditional: give the units of {selector!r} (neuron or head indices)")
            units = [unit]
        units = [int(u) for u in units]
        if not units:
            raise TargetError("conditional: no units given")
        ex = self.explainer
        out_name = output or ex.default_output
        feeds = ex.prepare_inputs(inputs)
        tgt, pos = _default_target(ex, feeds, out_name, target, position)
        parts: list[Explanation] = []
        for c in range(0, len(units), chunk):
            block = units[c:c + chunk]
            k = len(block)
            res = ex.explain(feeds, np.repeat(tgt[:, None], k, 1), None if pos is None else np.repeat(pos[:, None], k, 1),
                             output=out_name, conditions={site.tensor: _unit_mask(ex.xp, site, block)})
            parts.append(res)
        rel = {name: np.concatenate([p.relevance[name] for p in parts], axis=1) for name in parts[0].relevance}
        return ConditionalExplanation(rel, units, site, tgt, pos, parts[0].score[:, 0])


def _check_unit(site: Site, unit: int, n: int) -> None:
    if not 0 <= unit < n:
        raise TargetError(f"{site.selector}: unit {unit} out of range: the site has {n} units")


def _default_target(ex: Explainer, feeds: dict, output: str, target: Any, position: Any
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """One target (and position for sequence outputs) per batch element: as given, or the model's prediction at
    the default position, checked and resolved as :meth:`Explainer.explain` does, from a forward pass."""
    y = ex.forward(feeds, [output])[output]
    _, lead, tgt, pos = ex._one_hot(y, target, position, feeds)
    if lead:
        raise TargetError(f"target {np.shape(target)} / position {np.shape(position)}: one target per batch element "
                          "here (the units of a layer are the explanations of this pass)")
    return tgt.astype(np.int64), (None if pos is None else pos.astype(np.int64))


def _unit_mask(xp: Any, site: Site, block: Sequence[int]):
    """The gradient mask keeping, for target ``j``, unit ``block[j]`` of the site (a function of the gradient,
    whose first axis is the target axis and the rest the site tensor's shape)."""
    k = len(block)

    def mask(g: Any) -> Any:
        nd = g.ndim - 1
        if site.heads:  # packed heads: features [u*D, (u+1)*D) of the last axis
            F = g.shape[-1]
            D = F // site.heads
            for u in block:
                _check_unit(site, u, site.heads)
            m = np.zeros((k, F), dtype=g.dtype)
            for j, u in enumerate(block):
                m[j, u * D:(u + 1) * D] = 1
            shape = [k] + [1] * (nd - 1) + [F]
        else:
            ax = site.axis if site.axis < 0 else site.axis - nd
            n = g.shape[ax]
            for u in block:
                _check_unit(site, u, n)
            m = np.zeros((k, n), dtype=g.dtype)
            m[np.arange(k), list(block)] = 1
            shape = [k] + [1] * nd
            shape[ax] = n
        return g * xp.asarray(m.reshape(shape))

    return mask


def describe(layers: Layers) -> str:
    """One line per site kind, with its layer range, and the notes (for ``onnx-lrp inspect``)."""
    by_kind: dict[str, list[int]] = {}
    for s in layers.sites.values():
        by_kind.setdefault(s.kind, []).append(s.layer)
    lines = [f"latent selectors ({layers.n_layers} layers; onnx-lrp latent / concepts):"]
    for kind, ls in by_kind.items():
        ranges = _ranges(sorted(ls))
        extra = " (add .H for one head)" if kind in ("head", "cross") else ""
        lines.append(f"  {kind}:{ranges}{extra}")
    lines += [f"  note: {n}" for n in layers.notes]
    if not layers.sites:
        lines.append("  none")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}..{x}")
            start = None
    return ",".join(out)
