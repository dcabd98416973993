"""Graph analysis, once per model and composite.

1. *Sources*: float graph inputs (except ``past_*`` caches), and embedding lookups ``Gather(table, ids)`` (or
   com.microsoft ``GatherBlockQuantized`` of an int4 table; an int8 table's lookup is read after its
   ``DequantizeLinear``) of a constant table by an integer graph input that enter the model additively
   (:func:`is_additive_lookup`); lookups used only as factors (RoPE cos/sin caches indexed by position ids) are
   constants.
2. *Carrying* tensors: those that depend on a source through ops that pass relevance. Everything else (masks,
   position ids, RoPE tables, shapes) is a constant for the rules.
3. *Kinds*: each carrying node is ``linear``, ``add``, ``product``, ``unary``, ``softmax``, ``norm``,
   ``reduce`` or ``movement`` (see :mod:`onnx_lrp.composites`); the composite picks a rule per node.
4. *Detaching*: nodes whose rule is :class:`~onnx_lrp.rules.Constant`, and the variance statistic of written-out
   norms under :class:`~onnx_lrp.rules.ConstantStatistic`, stop carrying; steps 2-4 repeat to a fixed point.
5. *Unary regions*: an element-wise subgraph with one carrying input ``x`` and one output ``y`` that contains a
   non-linearity (``x * sigmoid(x)``, Erf-GELU, tanh-GELU) is one unary node for the identity rule. A region
   takes in the static shifts/scales chained to it in the same exporter module scope (Laplace activation).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ._graph import FLOAT_TYPES, Graph, Node
from .composites import Composite
from .errors import InputError, UnsupportedOpError
from .rules import Constant, ConstantStatistic, Identity, Rule

# ops whose outputs never carry relevance (integer/boolean results, or shape-only dependence)
NON_PROPAGATING = {
    "Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero", "ConstantOfShape", "EyeLike", "Range", "Sign", "Floor",
    "Ceil", "Round", "OneHot", "BitShift", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
    "NonMaxSuppression", "Constant", "RandomNormal", "RandomUniform",
}
# element-wise ops: the material unary regions are made of
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh",
    "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu", "BiasGelu",
    "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Sin", "Cos", "Clip", "Max", "Min", "Cast",
    "Identity", "Where", "PRelu", "ThresholdedRelu", "Sum", "Dropout", "GeluGrad",
    "QuantizeLinear", "DequantizeLinear",  # activation quantisation (QDQ): regions and patterns see through it
}
# element-wise non-linear ops with one carrying input
NONLINEAR = {
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu",
    "BiasGelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Sqrt", "Reciprocal", "Exp", "Log",
    "Abs", "Sin", "Cos", "Clip", "PRelu", "ThresholdedRelu",
}
LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulNBits", "FusedMatMul"}
NORM_OPS = {
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization", "InstanceNormalization",
    "GroupNormalization",
}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "GlobalAveragePool", "GlobalLpPool"}
# integer linear layers (onnxruntime.quantization): kind "linear", explained as the float layer of the dequantised
# weight; they apply eps-LRP at their float result themselves (onnx_lrp.ops.quantized), so not in LINEAR_OPS
QUANTIZED_LINEAR_OPS = {
    "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul",
    "QLinearConv",
}
# fused attention (com.microsoft): products of carrying tensors inside, so they take the product rule
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"}
# recurrent ops: gated products of carrying tensors inside (their rules: onnx_lrp.ops.recurrent)
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
ID_CHAIN_OPS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
# ops that move or copy a looked-up row without combining it with anything else
ROW_MOVEMENT_OPS = ID_CHAIN_OPS | {"Transpose", "Slice", "Split", "Concat", "Expand", "Tile", "Gather", "Dropout"}
# ops whose result is a product of their operands
PRODUCT_OPS = {"Mul", "Div", "MatMul", "Gemm", "Einsum"}
# embedding lookups (table, ids): Gather, and onnxruntime's lookup in an int4 table (onnxruntime-genai)
EMBEDDING_LOOKUPS = {("Gather", "ai.onnx"), ("GatherBlockQuantized", "com.microsoft")}
# ops that move token ids without computing new ones, and which of their inputs hold the ids (``None``: all)
ID_ROUTE_OPS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in ID_CHAIN_OPS}, "Slice": (0,), "Expand": (0,), "Tile": (0,), "Transpose": (0,),
    "Pad": (0,), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Concat": None, "Where": (1, 2),
    "ScatterND": (0, 2), "ScatterElements": (0, 2),
}


@dataclass
class Region:
    """A unary region: element-wise nodes computing ``y = f(x)`` from one carrying tensor ``x``."""

    nodes: list[Node]
    x: str
    y: str
    rule: Rule = field(default_factory=Identity)

    @property
    def name(self) -> str:
        return self.nodes[-1].name


@dataclass
class Analysis:
    """Result of :func:`analyse`."""

    sources: dict[str, str]  # source tensor -> graph input it reports to
    id_sources: set[str]  # source tensors that are embedding lookups (token relevance = sum over hidden)
    carrying: set[str]
    kinds: dict[str, str]  # node name -> kind
    rules: dict[str, Rule]  # node name -> rule
    regions: dict[str, Region]  # region name -> region
    region_of: dict[str, str]  # node name -> region name
    detached: set[str]
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    composite: Composite | None = None  # for fused ops that apply several kinds' rules inside one node
    token_inputs: set[str] = field(default_factory=set)  # id inputs that receive routed token relevance


def find_sources(graph: Graph, names: list[str] | None = None) -> tuple[dict[str, str], set[str]]:
    """Relevance sources: float graph inputs and embedding-lookup outputs fed by integer graph inputs.

    By default: every float input except ``past_*`` caches, and every lookup ``Gather(table, ids)`` of a
    constant table by an integer input that :func:`is_additive_lookup` accepts (token, segment and learned
    position embeddings; not RoPE cos/sin caches). ``names`` restricts the sources to these graph inputs and
    takes every constant-table lookup of a named integer input, additive or not.
    """
    by_name = {i.name: i for i in graph.inputs}
    if names is not None:
        bad = [n for n in names if n not in by_name]
        if bad:
            raise InputError(f"{graph.source}: sources {bad} are not graph inputs; inputs are {sorted(by_name)}")
        wanted = set(names)
    else:
        wanted = {i.name for i in graph.inputs if i.is_int or not i.name.startswith("past")}
    sources: dict[str, str] = {}
    id_sources: set[str] = set()
    for i in graph.inputs:
        if i.name in wanted and i.is_float:
            sources[i.name] = i.name
    lookups: list[tuple[str, str]] = []  # (lookup output, integer graph input)
    for n in graph.nodes:
        axis = "gather_axis" if n.op_type == "GatherBlockQuantized" else "axis"
        if ((n.op_type, n.domain or "ai.onnx") not in EMBEDDING_LOOKUPS or int(n.attr(axis, 0)) != 0
                or n.inputs[0] not in graph.static):
            continue
        origin = _id_origin(graph, n.inputs[1])
        if origin is not None:
            lookups.append((_dequantized(graph, n.outputs[0]), origin))
    candidates = {i.name for i in graph.inputs if i.is_float and not i.name.startswith("past")}
    candidates |= {t for t, _ in lookups}
    data: set[str] | None = None  # tensors computed from the values of the candidates (not from masks alone)
    for lookup, origin in lookups:
        if origin not in wanted:
            continue
        if names is None:
            data = data if data is not None else propagate(graph, candidates, set())
            if not is_additive_lookup(graph, lookup, data, lambda: propagate(graph, candidates - {lookup}, set())):
                continue
        sources[lookup] = origin
        id_sources.add(lookup)
    return sources, id_sources


def is_additive_lookup(graph: Graph, lookup: str, data: set[str], others: Callable[[], set[str]]) -> bool:
    """Whether looked-up rows enter the model as a term, i.e. are an embedding rather than a factor table.

    ``data``: tensors computed from the values of float inputs or embedding lookups; ``others()``: those computed
    from the values of the other inputs and lookups (evaluated when needed). The rows are followed through data
    movement (:data:`ROW_MOVEMENT_OPS`) and element-wise ``Mul``/``Div`` by tensors that are not ``data``
    (constants such as Gemma's ``sqrt(hidden)``, a mask computed from ``attention_mask``). A use as a factor of a
    product with ``others()`` (``q * cos[pos]``, as RoPE applies its cos/sin caches, also in later layers where
    ``q`` depends on the table itself) does not count, nor does reading the shape or comparing
    (:data:`NON_PROPAGATING`); any other use does (a sum with other embeddings or the residual stream, a linear
    layer, a normalisation, a product with a function of the rows alone as in RMSNorm, a graph output, ...).
    Lookups with no such use are constants for the rules: were they sources, the product rule would split
    relevance with them.
    """
    seen = {lookup}
    stack = [lookup]
    other_data: set[str] | None = None
    while stack:
        t = stack.pop()
        if t in graph.output_names:
            return True
        for c in graph.consumers.get(t, []):
            if c.op_type in NON_PROPAGATING:
                continue
            factors = [i for i in c.inputs if i and i != t and i in data] if c.op_type in PRODUCT_OPS else []
            if factors:
                other_data = other_data if other_data is not None else others()
                if not any(i in other_data for i in factors):
                    return True
            elif c.op_type in ROW_MOVEMENT_OPS and (c.op_type != "Gather" or c.inputs[0] == t) or c.op_type in (
                    "Mul", "Div"):
                nxt = [o for o in c.outputs if o and o not in seen]
                seen.update(nxt)
                stack.extend(nxt)
            else:
                return True
    return False


def _route_inputs(node: Node) -> list[str]:
    spec = ID_ROUTE_OPS[node.op_type]
    return [t for k, t in enumerate(node.inputs) if t and (spec is None or k in spec)]


def find_routed_ids(graph: Graph, sources: dict[str, str], names: list[str] | None = None
                    ) -> tuple[set[str], set[str]]:
    """Embedding lookups whose ids are an integer input moved around (BART's decoder ids: the input shifted right
    with a start token, ``Slice``/``ScatterND``/``Where``): (their outputs, the id tensors on the way).

    The token relevance ``(e * G).sum(-1)`` of such a lookup is routed back to the input positions through the
    moves (plain VJP of each move; constants put in, like the start token, receive nothing).
    """
    wanted = {i.name for i in graph.inputs if i.is_int and (names is None or i.name in names)}
    reach = set(wanted)  # int tensors that are ids moved from a wanted input
    for n in graph.nodes:
        if n.op_type in ID_ROUTE_OPS and n.domain in ("", "ai.onnx") and n.outputs:
            ins = _route_inputs(n)
            if any(t in reach for t in ins):  # other operands (a start token, zeros) are constants for the rules
                reach.add(n.outputs[0])
    lookups = {n.outputs[0]: n.inputs[1] for n in graph.nodes
               if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.inputs[0] in graph.static
               and n.outputs[0] not in sources and n.inputs[1] in reach and int(n.attr("axis", 0)) == 0
               and getattr(graph.constant(n.inputs[0]), "ndim", 0) == 2}  # an embedding table
    if lookups and names is None:  # as for sources: only lookups that enter the model as a term (no RoPE tables)
        candidates = set(sources) | set(lookups)
        data = propagate(graph, candidates, set())
        lookups = {t: ids for t, ids in lookups.items()
                   if is_additive_lookup(graph, t, data, lambda t=t: propagate(graph, candidates - {t}, set()))}
    routed, chain, stack = set(lookups), set(), list(lookups.values())
    while stack:
        t = stack.pop()
        if t in chain or t not in reach:
            continue
        chain.add(t)
        p = graph.producer.get(t)
        if p is not None:
            stack.extend(_route_inputs(p))
    return routed, chain


def _dequantized(graph: Graph, t: str) -> str:
    """The float rows of a lookup in an int8 table: the output of the ``DequantizeLinear`` (constant scale and zero
    point) that is the lookup's only reader, as ``quantize_dynamic`` writes embeddings; else ``t`` itself."""
    cons = graph.consumers.get(t, [])
    if (len(cons) == 1 and cons[0].op_type == "DequantizeLinear" and cons[0].inputs[0] == t
            and all(i in graph.static for i in cons[0].inputs[1:] if i) and t not in graph.output_names):
        return cons[0].outputs[0]
    return t


def _id_origin(graph: Graph, tensor: str) -> str | None:
    while True:
        if tensor in graph.input_names:
            gi = next(i for i in graph.inputs if i.name == tensor)
            return tensor if gi.is_int else None
        p = graph.producer.get(tensor)
        if p is None or p.op_type not in ID_CHAIN_OPS:
            return None
        tensor = p.inputs[0]


def _output_is_float(node: Node, k: int) -> bool:
    if node.op_type in NON_PROPAGATING:
        return False
    if node.op_type == "Cast":
        return node.attr("to") in FLOAT_TYPES
    if node.op_type == "TopK" and k == 1:
        return False
    if node.op_type in ("MaxPool", "Unique", "DynamicQuantizeLinear") and k > 0:  # indices; a quantisation's scale
        return False
    return True


def propagate(graph: Graph, sources: dict[str, str], detached: set[str]) -> set[str]:
    """Tensors that depend on a source through relevance-passing ops (and are not detached)."""
    carrying = set(sources)
    for n in graph.nodes:
        if n.outputs and n.outputs[0] in sources:
            continue
        if any(i in carrying for i in n.inputs if i):
            for k, o in enumerate(n.outputs):
                if o and o not in detached and _output_is_float(n, k):
                    carrying.add(o)
    return carrying


def is_variance(graph: Graph, node: Node) -> bool:
    """``ReduceMean/ReduceSum(x*x or x**2)``, ``ReduceSumSquare``, ``ReduceL2``: a norm's statistic."""
    if node.op_type in ("ReduceSumSquare", "ReduceL2"):
        return True
    if node.op_type not in ("ReduceMean", "ReduceSum"):
        return False
    p = graph.producer.get(node.inputs[0])
    while p is not None and p.op_type == "Cast":
        p = graph.producer.get(p.inputs[0])
    if p is None:
        return False
    if p.op_type == "Pow":
        e = graph.constant(p.inputs[1])
        return e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0
    if p.op_type == "Mul":
        return p.inputs[0] == p.inputs[1]
    return False


def node_kind(graph: Graph, node: Node, carrying: set[str]) -> str:
    op = node.op_type
    c = [bool(i) and i in carrying for i in node.inputs]
    if op in NORM_OPS or is_variance(graph, node):
        return "norm"
    if op in ("Softmax", "LogSoftmax"):
        return "softmax"
    if op in FUSED_ATTENTION_OPS and node.domain == "com.microsoft" or op in RECURRENT_OPS:
        return "product"
    if op in LINEAR_OPS:
        n_op = sum(c[:2]) if op in ("MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul") else sum(c)
        return "product" if n_op >= 2 else "linear"
    if op in QUANTIZED_LINEAR_OPS:  # QLinearMatMul's operands are inputs 0 and 3
        second = 3 if op == "QLinearMatMul" else 1
        return "product" if c[0] and len(c) > second and c[second] else "linear"
    if op == "Mul":
        return "product" if sum(c) >= 2 else "linear"
    if op == "Div":
        if len(c) > 1 and c[1]:
            return "product" if c[0] else "unary"
        return "linear"
    if op in ("Add", "Sub", "Sum"):
        return "add" if sum(c) >= 2 else "linear"
    if op == "Pow":
        e = graph.constant(node.inputs[1])
        if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 1.0:
            return "linear"
        return "unary" if not c[1] else "product"
    if op in ("Max", "Min"):
        return "unary" if sum(c) == 1 else "product"
    if op in NONLINEAR:
        return "unary"
    if op in REDUCE_OPS:
        return "reduce"
    return "movement"


def analyse(
    graph: Graph,
    composite: Composite,
    registered: set[str],
    sources: list[str] | None = None,
    allow_unsupported: bool = False,
) -> Analysis:
    """Sources, carrying tensors, kinds, rules and unary regions for ``graph`` under ``composite``."""
    src, id_src = find_sources(graph, sources)
    if not src:
        raise InputError(
            f"{graph.source}: found no relevance source: no float input and no embedding lookup "
            f"(Gather of a weight table by an integer input); inputs: {[i.name for i in graph.inputs]}"
        )
    routed, chain = find_routed_ids(graph, src, sources)
    route_note = []
    if routed and composite.reading == "gradient":  # a gradient vector per token cannot be routed like relevance
        route_note = [f"{graph.source}: the gradient preset does not report embedding lookups of moved ids "
                      f"(e.g. a decoder reading the input shifted): {sorted(routed)}"]
        warnings.warn(route_note[0], stacklevel=3)
        routed, chain = set(), set()
    token_inputs = {t for t in chain if t in graph.input_names}
    detached: set[str] = set()
    unsupported: dict[str, list[str]] = {}
    for _ in range(8):
        carrying = propagate(graph, {**src, **{t: t for t in routed}}, detached) | chain
        kinds: dict[str, str] = {}
        rules: dict[str, Rule] = {}
        new_detached: set[str] = set()
        unsupported = {}
        for n in graph.nodes:
            if not any(o in carrying for o in n.outputs) or n.outputs[0] in src:
                continue
            kind = node_kind(graph, n, carrying)
            rule = composite.rule_for(kind, n.op_type, n.name)
            kinds[n.name], rules[n.name] = kind, rule
            if isinstance(rule, Constant) or (kind == "norm" and n.op_type not in NORM_OPS and isinstance(rule, ConstantStatistic)):
                new_detached.update(o for o in n.outputs if o)
            elif n.op_type not in registered:
                unsupported.setdefault(n.op_type, []).append(n.name)
                if allow_unsupported:
                    new_detached.update(o for o in n.outputs if o)
        if new_detached <= detached:  # detached tensors stop carrying, so they leave new_detached: union them
            break
        detached |= new_detached
    if allow_unsupported:  # ops detached for lacking a rule have left the carrying set: report them too
        for n in graph.nodes:
            if (n.op_type not in registered and n.name not in unsupported.get(n.op_type, [])
                    and any(o in detached for o in n.outputs) and any(i in carrying for i in n.inputs)):
                unsupported.setdefault(n.op_type, []).append(n.name)
    if unsupported and not allow_unsupported:
        raise UnsupportedOpError(unsupported, graph.source)
    for name in [n for n, r in rules.items() if isinstance(r, Constant)]:
        del kinds[name], rules[name]
    regions = find_unary_regions(graph, carrying, kinds, rules, composite)
    region_of = {n.name: r.name for r in regions.values() for n in r.nodes}
    notes = ([f"{len(regions)} unary region(s)"] if regions else []) + route_note
    if unsupported:
        notes.append("treated as constants (no rule): " + ", ".join(sorted(unsupported)))
    return Analysis(src, id_src, carrying, kinds, rules, regions, region_of, detached, unsupported, notes,
                    composite, token_inputs)


# ---------------------------------------------------------------------------------------------- regions
_MAX_REGION_DEPTH = 12


def _ew(node: Node | None, carrying: set[str]) -> bool:
    return node is not None and node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx", "com.microsoft")


def _carrying_inputs(node: Node, carrying: set[str]) -> list[str]:
    return [i for i in node.inputs if i and i in carrying]


def _ew_ancestors(graph: Graph, t: str, carrying: set[str]) -> set[str]:
    """Tensors reachable backwards from ``t`` through element-wise producers (``t`` included)."""
    seen = {t}
    frontier = [t]
    for _ in range(_MAX_REGION_DEPTH):
        nxt = []
        for u in frontier:
            p = graph.producer.get(u)
            if _ew(p, carrying):
                for i in _carrying_inputs(p, carrying):
                    if i not in seen:
                        seen.add(i)
                        nxt.append(i)
        frontier = nxt
        if not frontier:
            break
    return seen


def _order(graph: Graph, t: str) -> int:
    p = graph.producer.get(t)
    return -1 if p is None else p.index


def find_unary_regions(
    graph: Graph, carrying: set[str], kinds: dict[str, str], rules: dict[str, Rule], composite: Composite
) -> dict[str, Region]:
    """Group element-wise nodes into unary regions (only where the composite's rule is Identity)."""
    seeds: list[tuple[Node, str, set[str]]] = []  # (seed node, root tensor, node names)
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        if n.name not in kinds or not _ew(n, carrying):
            continue
        cin = _carrying_inputs(n, carrying)
        if kinds[n.name] == "unary" and len(set(cin)) == 1:
            if isinstance(rules[n.name], Identity):
                seeds.append((n, cin[0], {n.name}))
            continue
        if len(cin) < 2:
            continue
        common = set.intersection(*[_ew_ancestors(graph, i, carrying) for i in cin])
        if not common:
            continue
        if not isinstance(composite.rule_for("unary", n.op_type, n.name), Identity):
            continue
        root = max(common, key=lambda t: _order(graph, t))
        seeds.append((n, root, _nodes_between(graph, root, n, carrying)))
    # merge overlapping seeds
    groups: list[set[str]] = []
    for _, _, names in seeds:
        merged = set(names)
        rest = []
        for g in groups:
            if g & merged:
                merged |= g
            else:
                rest.append(g)
        groups = rest + [merged]
    regions: dict[str, Region] = {}
    singles = {s.name for s, _, names in seeds if len(names) == 1}
    for g in groups:
        if not any(kinds.get(x) in ("unary", "product") for x in g):
            continue  # only linear maps and sums (``w * (x * c) + x``): no non-linearity, each op keeps its rule
        region = _make_region(graph, [by_name[x] for x in g], carrying)
        if region is None:  # not unary after all: keep the single non-linearities inside it
            for x in g:
                if x in singles:
                    r = _make_region(graph, [by_name[x]], carrying)
                    if r is not None:
                        regions[r.name] = r
            continue
        regions[region.name] = region
    for r in regions.values():
        last = r.nodes[-1]
        r.rule = composite.rule_for("unary", last.op_type, last.name)
    taken = {n.name for r in regions.values() for n in r.nodes}
    out: dict[str, Region] = {}
    for r in regions.values():
        r = _extend_by_constant_affine(graph, r, kinds, taken)
        out[r.name] = r
    return out


_AFFINE_OPS = {"Add", "Sub", "Mul", "Div", "Neg"}


def _scope(node: Node) -> str:
    """The exporter's module scope of a node name (``/model/layers.0/mlp/act_fn/Sub`` ->
    ``/model/layers.0/mlp/act_fn``); empty for names without one."""
    return node.name.rsplit("/", 1)[0] if node.name.count("/") >= 2 else ""


def _affine_step(graph: Graph, node: Node | None, kinds: dict[str, str], scope: str, taken: set[str]) -> str | None:
    """The carrying input of ``node`` if it shifts/scales it by a static constant inside ``scope``."""
    if node is None or node.op_type not in _AFFINE_OPS or node.name not in kinds or node.name in taken:
        return None
    if _scope(node) != scope or node.domain not in ("", "ai.onnx"):
        return None
    dynamic = [i for i in node.inputs if i and i not in graph.static]
    if len(dynamic) != 1 or (node.op_type == "Div" and node.inputs[0] != dynamic[0]):  # c / x is not affine
        return None
    return dynamic[0]


def _extend_by_constant_affine(graph: Graph, r: Region, kinds: dict[str, str], taken: set[str]) -> Region:
    """Grow a unary region over the constant shifts and scales around it in the same module scope, so that an
    activation written as ``c1 * (g((x - c2) / c3) + c4)`` (e.g. Laplace) is one ``y = f(x)`` for the identity
    rule, as LXT applies it to the activation module. Static operands only (never a run-time mask), only along
    single-consumer chains, and only when the grown region is the whole module scope (an activation module, not
    a shift written inline next to a clamp in a larger module, as GPT-OSS's ``(clamp(up) + 1) * glu``); scalings
    alone change nothing (the identity ratios telescope)."""
    scope = _scope(r.nodes[-1])
    if not scope:
        return r
    nodes, x, y = list(r.nodes), r.x, r.y

    def users(t: str) -> list[Node]:
        return [c for c in graph.consumers.get(t, []) if c.name in kinds]

    while len(users(x)) == 1:
        p = graph.producer.get(x)
        inner = _affine_step(graph, p, kinds, scope, taken)
        if inner is None:
            break
        nodes.insert(0, p)
        x = inner
    while y not in graph.output_names and len(users(y)) == 1:
        c = users(y)[0]
        if _affine_step(graph, c, kinds, scope, taken) != y:
            break
        nodes.append(c)
        y = c.outputs[0]
    if len(nodes) == len(r.nodes):
        return r
    names = {n.name for n in nodes}
    module = [n for n in graph.nodes if _scope(n) == scope and n.op_type != "Constant"]
    if any(n.name not in names for n in module):  # the scope is not one element-wise activation module
        return r
    taken.update(names)
    return Region(nodes, x, y, r.rule)


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
        if not _ew(p, carrying) or root not in _ew_ancestors(graph, t, carrying):
            continue
        out.add(p.name)
        stack.extend(_carrying_inputs(p, carrying))
    return out


def _make_region(graph: Graph, nodes: list[Node], carrying: set[str]) -> Region | None:
    nodes = sorted(nodes, key=lambda n: n.index)
    names = {n.name for n in nodes}
    produced = {o for n in nodes for o in n.outputs if o}
    ext_in = {i for n in nodes for i in _carrying_inputs(n, carrying) if i not in produced}
    outs = set()
    for t in produced:
        if t not in carrying:
            continue
        if t in graph.output_names or any(c.name not in names for c in graph.consumers.get(t, [])):
            outs.add(t)
    if len(ext_in) != 1 or len(outs) != 1:
        return None
    return Region(nodes, ext_in.pop(), outs.pop())


def graph_output_is_float(graph: Graph, name: str) -> bool:
    t = graph.output_types.get(name)
    return t in FLOAT_TYPES or t == onnx.TensorProto.UNDEFINED
