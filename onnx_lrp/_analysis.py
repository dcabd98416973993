"""Graph analysis, once per model and composite.

1. *Sources*: float graph inputs, and embedding lookups ``Gather(table, ids)`` whose ids come from an integer
   graph input (not ``position_ids``).
2. *Carrying* tensors: those that depend on a source through ops that pass relevance. Everything else (masks,
   position ids, RoPE tables, shapes) is a constant for the rules.
3. *Kinds*: each carrying node is ``linear``, ``add``, ``product``, ``unary``, ``softmax``, ``norm``,
   ``reduce`` or ``movement`` (see :mod:`onnx_lrp.composites`); the composite picks a rule per node.
4. *Detaching*: nodes whose rule is :class:`~onnx_lrp.rules.Constant`, and the variance statistic of written-out
   norms under :class:`~onnx_lrp.rules.ConstantStatistic`, stop carrying; steps 2-4 repeat to a fixed point.
5. *Unary regions*: an element-wise subgraph with one carrying input ``x`` and one output ``y`` that contains a
   non-linearity (``x * sigmoid(x)``, Erf-GELU, tanh-GELU) is one unary node for the identity rule.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

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
}
# element-wise non-linear ops with one carrying input
NONLINEAR = {
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu",
    "BiasGelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Sqrt", "Reciprocal", "Exp", "Log",
    "Abs", "Sin", "Cos", "Clip", "PRelu", "ThresholdedRelu",
}
LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
NORM_OPS = {
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization", "InstanceNormalization",
    "GroupNormalization",
}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "GlobalAveragePool"}
# fused attention (com.microsoft): products of carrying tensors inside, so they take the product rule
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention"}
ID_CHAIN_OPS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
# ops that move token ids without computing new ones, and which of their inputs hold the ids (``None``: all)
ID_ROUTE_OPS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in ID_CHAIN_OPS}, "Slice": (0,), "Expand": (0,), "Tile": (0,), "Transpose": (0,),
    "Pad": (0,), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Concat": None, "Where": (1, 2),
    "ScatterND": (0, 2), "ScatterElements": (0, 2),
}
EXCLUDED_ID_INPUTS = ("position", "cache_position")


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

    ``names`` restricts the sources to these graph inputs (by default all float inputs except
    ``past_*`` caches, and all integer inputs except position ids).
    """
    by_name = {i.name: i for i in graph.inputs}
    if names is not None:
        bad = [n for n in names if n not in by_name]
        if bad:
            raise InputError(f"{graph.source}: sources {bad} are not graph inputs; inputs are {sorted(by_name)}")
        wanted = set(names)
    else:
        wanted = {
            i.name
            for i in graph.inputs
            if (i.is_float and not i.name.startswith("past"))
            or (i.is_int and not any(x in i.name for x in EXCLUDED_ID_INPUTS))
        }
    sources: dict[str, str] = {}
    id_sources: set[str] = set()
    for i in graph.inputs:
        if i.name in wanted and i.is_float:
            sources[i.name] = i.name
    for n in graph.nodes:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx"):
            continue
        table, ids = n.inputs[0], n.inputs[1]
        if table not in graph.static:
            continue
        origin = _id_origin(graph, ids)
        if origin is not None and origin in wanted:
            sources[n.outputs[0]] = origin
            id_sources.add(n.outputs[0])
    return sources, id_sources


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
    wanted = {i.name for i in graph.inputs if i.is_int and (names is None or i.name in names)
              and not any(x in i.name for x in EXCLUDED_ID_INPUTS)}
    reach = set(wanted)  # int tensors that are ids moved from a wanted input
    for n in graph.nodes:
        if n.op_type in ID_ROUTE_OPS and n.domain in ("", "ai.onnx") and n.outputs:
            ins = _route_inputs(n)
            if any(t in reach for t in ins):  # other operands (a start token, zeros) are constants for the rules
                reach.add(n.outputs[0])
    routed, chain, stack = set(), set(), []
    for n in graph.nodes:
        if (n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.inputs[0] in graph.static
                and n.outputs[0] not in sources and n.inputs[1] in reach and int(n.attr("axis", 0)) == 0
                and getattr(graph.constant(n.inputs[0]), "ndim", 0) == 2):  # an embedding table
            routed.add(n.outputs[0])
            stack.append(n.inputs[1])
    while stack:
        t = stack.pop()
        if t in chain or t not in reach:
            continue
        chain.add(t)
        p = graph.producer.get(t)
        if p is not None:
            stack.extend(_route_inputs(p))
    return routed, chain


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
    if node.op_type in ("MaxPool", "Unique") and k > 0:
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
    if op in FUSED_ATTENTION_OPS and node.domain == "com.microsoft":
        return "product"
    if op in LINEAR_OPS:
        n_op = sum(c[:2]) if op in ("MatMul", "Gemm", "Conv", "ConvTranspose") else sum(c)
        return "product" if n_op >= 2 else "linear"
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
    if routed and composite.name == "gradient":  # a gradient vector per token cannot be routed like relevance
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
    return regions


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
