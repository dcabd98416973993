"""Graph analysis, once per model and composite: which tensors carry relevance and which rule every node gets.

1. *Sources* (:func:`find_sources`): float graph inputs (except ``past_*`` caches); embedding lookups
   ``Gather(table, ids)`` (or com.microsoft ``GatherBlockQuantized`` of an int4 table; an int8 table's rows are read
   after their ``DequantizeLinear``) of a constant table by an integer graph input, and one-hot encodings of an
   integer input (``OneHot``, ``Equal`` + ``Cast``/``Where``), when they enter the model additively
   (:func:`is_additive_lookup`); lookups used only as factors (RoPE cos/sin caches indexed by position ids) are
   constants.
2. *Carrying* tensors: those that depend on a source through ops that pass relevance. Everything else (masks,
   position ids, RoPE tables, shapes) is a constant for the rules.
3. *Kinds*: each carrying node's op is declared once in its family's module under :mod:`onnx_lrp.ops` (keyed by
   domain and op type) with its kind (:data:`onnx_lrp.composites.KINDS`); structural patterns refine it, by the
   maths they compute (:mod:`onnx_lrp._patterns`): normalisations (their second-moment statistic held constant),
   zero-centred unary regions (identity rule), gates (non-zero-centred factors of a product, held constant),
   attention softmax vs a model's output softmax. The composite then picks a rule per node.
4. *Detaching*: nodes whose rule is :class:`~onnx_lrp.rules.Constant`, and normalisation statistics under
   :class:`~onnx_lrp.rules.ConstantStatistic`, stop carrying; steps 2-4 repeat to a fixed point.

Every decision keeps the reason it was taken (:class:`Decision`), which ``onnx-lrp inspect`` shows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import onnx

from . import _patterns as pat
from ._graph import FLOAT_TYPES, Graph, Node
from ._patterns import Region
from .composites import KINDS, UNSOUND, Composite
from .errors import ConfigError, InputError, UnsupportedOpError
from .ops._base import ONNX, NodeView, known_op_types, spec_of
from .rules import Constant, ConstantGate, ConstantStatistic, Gradient, Identity, Rule

# embedding lookups (table, ids): Gather, and onnxruntime's lookup in an int4 table (onnxruntime-genai)
EMBEDDING_LOOKUPS = {("Gather", ONNX), ("GatherBlockQuantized", "com.microsoft")}
# ops that move or copy a looked-up row without combining it with anything else
ROW_MOVEMENT_OPS = pat.ID_CHAIN_OPS | {"Transpose", "Slice", "Split", "Concat", "Expand", "Tile", "Gather", "Dropout"}
# ops whose result is a product of their operands
PRODUCT_OPS = {"Mul", "Div", "MatMul", "Gemm", "Einsum"}
# ops that move token ids without computing new ones, and which of their inputs hold the ids (``None``: all)
ID_ROUTE_OPS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in pat.ID_CHAIN_OPS}, "Slice": (0,), "Expand": (0,), "Tile": (0,), "Transpose": (0,),
    "Pad": (0,), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Concat": None, "Where": (1, 2),
    "ScatterND": (0, 2), "ScatterElements": (0, 2),
}
_NON_PROPAGATING = "constant"


@dataclass
class Decision:
    """How one node is explained: its kind, its rule, why (the declaration or pattern that decided), and for
    products the inputs that are gating factors."""

    kind: str
    rule: Rule
    why: str
    gates: frozenset[int] = frozenset()


@dataclass
class Analysis:
    """Result of :func:`analyse`."""

    sources: dict[str, str]  # source tensor -> graph input it reports to
    token_axis: dict[str, int | None]  # id-derived sources: token relevance = sum over this axis (None: as is)
    carrying: set[str]
    decisions: dict[str, Decision]  # node name -> decision (nodes on carrying paths)
    regions: dict[str, Region]  # region name -> region
    region_rules: dict[str, Rule]
    region_of: dict[str, str]  # node name -> region name
    detached: set[str]
    statistics: dict[str, tuple[str, str]] = field(default_factory=dict)  # norm product -> (held statistic, why)
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    composite: Composite | None = None  # for fused ops that apply several kinds' rules inside one node
    token_inputs: set[str] = field(default_factory=set)  # id inputs that receive routed token relevance

    @property
    def kinds(self) -> dict[str, str]:
        return {n: d.kind for n, d in self.decisions.items()}

    @property
    def rules(self) -> dict[str, Rule]:
        return {n: d.rule for n, d in self.decisions.items()}


# ---------------------------------------------------------------------------------------------- sources
def find_sources(graph: Graph, names: list[str] | None = None) -> tuple[dict[str, str], dict[str, int | None]]:
    """Relevance sources: ``(source tensor -> graph input, token axis of id-derived sources)``.

    By default: every float input except ``past_*`` caches, and every id-derived float tensor (lookup
    ``Gather(table, ids)`` of a constant table, one-hot encoding) of an integer input that
    :func:`is_additive_lookup` accepts (token, segment and learned position embeddings; not RoPE cos/sin caches).
    Token relevance of an id input sums its source over the embedding axis (lookups) or the one-hot axis.
    ``names`` restricts the sources to these graph inputs and takes every id-derived tensor of a named integer
    input, additive or not, also plain casts of the ids to float.
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
    token_axis: dict[str, int | None] = {}
    for i in graph.inputs:
        if i.name in wanted and i.is_float:
            sources[i.name] = i.name
    encoded: list[tuple[str, str, int | None]] = []  # (float tensor, integer graph input, token axis)
    for n in graph.nodes:
        lookup = _lookup_ids(graph, n)
        if lookup is not None:
            encoded.append((_dequantized(graph, n.outputs[0]), lookup, -1))
            continue
        onehot = pat.one_hot_ids(graph, n)
        if onehot is not None:
            encoded.append((n.outputs[0], onehot, _one_hot_axis(graph, n)))
        elif names is not None and n.outputs and pat.is_float_cast_of(graph, n) in wanted:
            encoded.append((n.outputs[0], pat.is_float_cast_of(graph, n), None))
    candidates = {i.name for i in graph.inputs if i.is_float and not i.name.startswith("past")}
    candidates |= {t for t, _, _ in encoded}
    data: set[str] | None = None  # tensors computed from the values of the candidates (not from masks alone)
    for tensor, origin, axis in encoded:
        if origin not in wanted:
            continue
        if names is None:
            data = data if data is not None else propagate(graph, candidates, set())
            if not is_additive_lookup(graph, tensor, data, lambda t=tensor: propagate(graph, candidates - {t}, set())):
                continue
        sources[tensor] = origin
        token_axis[tensor] = axis
    return sources, token_axis


def _lookup_ids(graph: Graph, n: Node) -> str | None:
    """The integer input whose ids ``n`` looks up in a constant table (axis 0), else None."""
    if (n.op_type, n.domain or ONNX) not in EMBEDDING_LOOKUPS:
        return None
    axis = "gather_axis" if n.op_type == "GatherBlockQuantized" else "axis"
    if int(n.attr(axis, 0)) != 0 or n.inputs[0] not in graph.static:
        return None
    return pat.id_origin(graph, n.inputs[1])


def _dequantized(graph: Graph, t: str) -> str:
    """The float rows of a lookup in an int8 table: the output of the ``DequantizeLinear`` (constant scale and zero
    point) that is the lookup's only reader, as ``quantize_dynamic`` writes embeddings; else ``t`` itself."""
    cons = graph.consumers.get(t, [])
    if (len(cons) == 1 and cons[0].op_type == "DequantizeLinear" and cons[0].inputs[0] == t
            and all(i in graph.static for i in cons[0].inputs[1:] if i) and t not in graph.output_names):
        return cons[0].outputs[0]
    return t


def _one_hot_axis(graph: Graph, n: Node) -> int | None:
    """The axis of a one-hot tensor that the vocabulary runs along (negative), if known from the graph."""
    if n.op_type == "OneHot":
        axis = int(n.attr("axis", -1))
        return axis if axis < 0 else None  # a non-negative axis: resolved against the ids' rank at run time
    return -1


def is_additive_lookup(graph: Graph, lookup: str, data: set[str], others: Callable[[], set[str]]) -> bool:
    """Whether looked-up rows enter the model as a term, i.e. are an embedding rather than a factor table.

    ``data``: tensors computed from the values of float inputs or embedding lookups; ``others()``: those computed
    from the values of the other inputs and lookups (evaluated when needed). The rows are followed through data
    movement (:data:`ROW_MOVEMENT_OPS`) and element-wise ``Mul``/``Div`` by tensors that are not ``data``
    (constants such as Gemma's ``sqrt(hidden)``, a mask computed from ``attention_mask``). A use as a factor of a
    product with ``others()`` (``q * cos[pos]``, as RoPE applies its cos/sin caches, also in later layers where
    ``q`` depends on the table itself) does not count, nor does reading the shape or comparing (ops of kind
    ``constant``); any other use does (a sum with other embeddings or the residual stream, a linear layer, a
    normalisation, a product with a function of the rows alone as in RMSNorm, a graph output, ...). Lookups with
    no such use are constants for the rules: were they sources, the product rule would split relevance with them.
    """
    seen = {lookup}
    stack = [lookup]
    other_data: set[str] | None = None
    while stack:
        t = stack.pop()
        if t in graph.output_names:
            return True
        for c in graph.consumers.get(t, []):
            spec = spec_of(c)
            if spec is not None and spec.kind == _NON_PROPAGATING:
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
        if n.op_type in ID_ROUTE_OPS and (n.domain or ONNX) == ONNX and n.outputs:
            if any(t in reach for t in _route_inputs(n)):  # other operands (a start token) are constants
                reach.add(n.outputs[0])
    lookups = {_dequantized(graph, n.outputs[0]): n.inputs[1] for n in graph.nodes  # int8 tables: their float rows
               if n.op_type == "Gather" and (n.domain or ONNX) == ONNX and n.inputs[0] in graph.static
               and _dequantized(graph, n.outputs[0]) not in sources and n.inputs[1] in reach
               and int(n.attr("axis", 0)) == 0
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


# ---------------------------------------------------------------------------------------------- carrying
def _carries(node: Node, k: int) -> bool:
    spec = spec_of(node)
    if spec is None:
        return True
    if spec.kind == _NON_PROPAGATING:
        return False
    return spec.carries(node, k) if spec.carries is not None else True


def propagate(graph: Graph, sources: dict[str, str] | set[str], detached: set[str]) -> set[str]:
    """Tensors that depend on a source through relevance-passing ops (and are not detached)."""
    carrying = set(sources)
    for n in graph.nodes:
        if n.outputs and n.outputs[0] in sources:
            continue
        if any(i in carrying for i in n.inputs + n.captures if i):
            for k, o in enumerate(n.outputs):
                if o and o not in detached and _carries(n, k):
                    carrying.add(o)
    return carrying


# ---------------------------------------------------------------------------------------------- rules
def analyse(
    graph: Graph,
    composite: Composite,
    sources: list[str] | None = None,
    allow_unsupported: bool = False,
) -> Analysis:
    """Sources, carrying tensors, kinds, rules and unary regions for ``graph`` under ``composite``."""
    composite = composite.resolve({n.op_type for n in graph.nodes}, [n.name for n in graph.nodes], known_op_types())
    src, token_axis = find_sources(graph, sources)
    if not src:
        raise InputError(
            f"{graph.source}: found no relevance source: no float input and no embedding lookup or one-hot "
            f"encoding of an integer input; inputs: {[i.name for i in graph.inputs]} (name them with sources=[...])"
        )
    routed, chain = find_routed_ids(graph, src, sources)
    notes: list[str] = []
    if routed and composite.reading == "gradient":  # a gradient vector per token cannot be routed like relevance
        notes.append(f"{graph.source}: the gradient preset does not report embedding lookups of moved ids "
                     f"(e.g. a decoder reading the input shifted): {sorted(routed)}")
        warnings.warn(notes[-1], stacklevel=3)
        routed, chain = set(), set()
    token_inputs = {t for t in chain if t in graph.input_names}
    roots = {**src, **{t: t for t in routed}}
    detached: set[str] = set()
    statistics: dict[str, tuple[str, str]] = {}
    held: dict[str, Decision] = {}  # nodes a Constant rule detached in some round (they leave the carrying set)
    for _ in range(12):
        carrying = propagate(graph, roots, detached) | chain
        state = _decide(graph, composite, carrying, src, statistics, allow_unsupported)
        decisions, regions, region_rules, new_detached, unsupported = state
        held.update((k, d) for k, d in decisions.items() if isinstance(d.rule, Constant))
        if new_detached <= detached:
            break
        detached |= new_detached
    if allow_unsupported:  # ops detached for lacking a rule have left the carrying set: report them too
        for n in graph.nodes:
            if (spec_of(n) is None and n.name not in unsupported.get(n.op_type, [])
                    and any(o in detached for o in n.outputs) and any(i in carrying for i in n.inputs)):
                unsupported.setdefault(n.op_type, []).append(n.name)
    if unsupported and not allow_unsupported:
        raise UnsupportedOpError(unsupported, graph.source)
    _check_overrides(graph, composite, {**held, **decisions}, regions)
    decisions = {k: d for k, d in decisions.items() if not isinstance(d.rule, Constant)}
    region_of = {n.name: r.name for r in regions.values() for n in r.nodes}
    if regions:
        notes.append(f"{len(regions)} unary region(s)")
    if unsupported:
        notes.append("treated as constants (no rule): " + ", ".join(sorted(unsupported)))
    return Analysis(src, token_axis, carrying, decisions, regions, region_rules, region_of, detached, statistics,
                    unsupported, notes, composite, token_inputs)


def _decide(graph: Graph, composite: Composite, carrying: set[str], src: dict[str, str], statistics: dict,
            allow_unsupported: bool):
    """One round of decisions on the current carrying set: (decisions, regions, region rules, tensors to detach,
    unsupported ops)."""
    decisions: dict[str, Decision] = {}
    detach: set[str] = set()
    unsupported: dict[str, list[str]] = {}
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        if not any(o in carrying for o in n.outputs) or n.outputs[0] in src:
            continue
        spec = spec_of(n)
        if spec is None:
            unsupported.setdefault(n.op_type, []).append(n.name)
            if allow_unsupported:
                detach.update(o for o in n.outputs if o)
            continue
        flags = tuple(bool(i) and i in carrying for i in n.inputs)
        kind = spec.kind_of(NodeView(graph, n, flags, carrying))
        decisions[n.name] = Decision(kind, composite.kinds.get(kind, Gradient()), _declared(kind, n))
    # normalisations: the second-moment statistic of a scale-invariant product is held constant (Prop. 3.4)
    forced: dict[str, tuple[Rule, str]] = {}
    for name, d in list(decisions.items()):
        n = by_name[name]
        found = pat.normalisation_statistic(graph, n, carrying) if d.kind == "product" else None
        if found is None:
            continue
        s, root = found
        members = pat.statistic_nodes(graph, s, root)
        rule = composite.rule_for("norm", n.op_type, [name] + [m.name for m in members])
        why = f"normalisation: {s!r} is a second-moment statistic of {root!r} (the product is scale-invariant)"
        if isinstance(rule, ConstantStatistic):
            detach.add(s)
            statistics[name] = (s, why + ": held constant")
            decisions[name] = Decision("linear", composite.rule_for("linear", n.op_type, name), why + ": held constant")
        else:  # differentiated as a whole
            for m in [n] + members:
                if m.name in decisions:
                    forced[m.name] = (rule, why + f": {rule.name} on the whole normalisation")
    for name, (s, why) in statistics.items():  # products whose statistic an earlier round held constant
        d = decisions.get(name)
        if d is not None and s not in carrying:
            decisions[name] = Decision(d.kind, d.rule, why)
    kinds = {k: d.kind for k, d in decisions.items()}
    regions: dict[str, Region] = {}
    region_rules: dict[str, Rule] = {}
    for r in pat.find_unary_regions(graph, carrying, kinds).values():
        names = [m.name for m in r.nodes]
        if any(m in forced for m in names):
            continue
        kind = "unary" if r.sound else "nonlinear"
        rule = composite.rule_for(kind, _main_op(r), r.name)  # a region is named by its output node
        if not r.sound and not isinstance(rule, (Identity, Constant)):
            continue  # a non-zero-centred function: its ops keep their own rules
        if isinstance(rule, Identity):
            regions[r.name] = r
            region_rules[r.name] = rule
            why = ("zero-centred (f(0) = 0, f(x)/x bounded): identity rule" if r.sound else
                   "NOT zero-centred: identity rule forced by an override")
            for m in names:
                decisions[m] = Decision(kind, rule, f"unary region {_describe(r)}: {why}")
        elif len(r.nodes) > 1 or isinstance(rule, Constant):  # the function as a whole under the override
            for m in names:
                forced[m] = (rule, f"unary region {_describe(r)}: {rule.name} by override")
            if isinstance(rule, Constant):
                detach.add(r.y)
    # gates and the composite's rule for every other node
    cache_gate: dict[str, bool] = {}
    cache_nl: dict[str, bool] = {}
    members = _region_members(regions)

    def gate_origin(p: Node) -> bool:  # a non-zero-centred function (not part of a region)
        return kinds.get(p.name) == "nonlinear" and p.name not in members

    def nonlinear_origin(p: Node) -> bool:  # any non-linearity (CP-LRP's gates)
        return kinds.get(p.name) in ("unary", "nonlinear", "attention", "softmax") or p.name in members or (
            p.op_type == "TopK")

    for name, d in list(decisions.items()):
        if name in forced:
            rule, why = forced[name]
            decisions[name] = Decision(d.kind, rule, why)
            continue
        if name in members:
            continue
        n = by_name[name]
        kind, gates, why = d.kind, frozenset(), d.why
        if kind == "product":
            gates = pat.gate_inputs(graph, n, carrying, gate_origin, cache_gate)
            if gates:
                kind = "gate"
                why = (f"gate: input(s) {sorted(gates)} come from a non-zero-centred function (sigmoid-like), held "
                       "constant; the other factor takes the relevance")
        rule = composite.rule_for(kind, n.op_type, name)
        if kind == "product" and isinstance(rule, ConstantGate):
            gates = pat.gate_inputs(graph, n, carrying, nonlinear_origin, cache_nl)
        spec = spec_of(n)
        if spec is not None and spec.rules is not None and not isinstance(rule, spec.rules):
            raise ConfigError(f"{graph.source}: node {name!r} ({n.op_type}, kind {kind}) does not implement rule "
                              f"{rule.name}; it implements {[r.__name__ for r in spec.rules]}")
        decisions[name] = Decision(kind, rule, why, gates)
        if isinstance(rule, Constant):
            detach.update(o for o in n.outputs if o)
    return decisions, regions, region_rules, detach, unsupported


def _region_members(regions: dict[str, Region]) -> set[str]:
    return {m.name for r in regions.values() for m in r.nodes}


def _main_op(r: Region) -> str:
    """The op type that names a region for op-type overrides: its first non-linear op."""
    for m in r.nodes:
        if m.op_type not in ("Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity"):
            return m.op_type
    return r.nodes[-1].op_type


def _describe(r: Region) -> str:
    return "(" + " ".join(m.op_type for m in r.nodes) + ")"


def _declared(kind: str, n: Node) -> str:
    return f"{n.op_type}: {KINDS[kind].description.split(':')[0].split(' (')[0]}" if kind in KINDS else kind


def _check_overrides(graph: Graph, composite: Composite, decisions: dict[str, Decision],
                     regions: dict[str, Region]) -> None:
    """Every override must fit at least one node it names; a rule a user forces where it is unsound warns."""
    from fnmatch import fnmatchcase

    by_name = {n.name: n for n in graph.nodes}
    for key, rule in composite.overrides.items():
        if key.startswith("op:"):
            named = [n for n in decisions if by_name[n].op_type == key[3:]]
            if not named:
                where = "no relevance flows through its nodes" if key[3:] in {n.op_type for n in graph.nodes} else (
                    f"the model has no {key[3:]} node")
                warnings.warn(f"{graph.source}: override {key!r} changes nothing: {where}", stacklevel=4)
                continue
        else:
            named = [n for n in decisions if fnmatchcase(n, key[5:])]
            if not named:
                warnings.warn(f"{graph.source}: override {key!r} changes nothing: no relevance flows through the "
                              "nodes it names", stacklevel=4)
                continue
        inner = [n for n in named if any(n != r.name and n in {m.name for m in r.nodes} for r in regions.values())]
        if inner and len(inner) == len(named):
            warnings.warn(f"{graph.source}: override {key!r} names node(s) {inner[:3]} inside the unary region(s) of a "
                          "written-out activation, which takes the rule of its output node: name that node instead",
                          stacklevel=4)
            continue
        kinds = {decisions[n].kind for n in named}
        fitting = [k for k in kinds if isinstance(rule, KINDS[k].rules) or (k, type(rule)) in UNSOUND]
        if not fitting:
            raise ConfigError(
                f"{graph.source}: override {key!r} -> {rule.name}: the rule fits none of the nodes it names "
                f"(kind(s) {sorted(kinds)} take " + "; ".join(
                    f"{k}: {', '.join(r.__name__ for r in KINDS[k].rules)}" for k in sorted(kinds)) + ")")
        unsound = [k for k in kinds if (k, type(rule)) in UNSOUND]
        if unsound:
            warnings.warn(f"{graph.source}: override {key!r} -> {rule.name} on kind {unsound}: the identity rule "
                          "divides by the input of a function with f(0) != 0 (or f(x)/x unbounded); relevance can "
                          "explode near 0", stacklevel=4)


def graph_output_is_float(graph: Graph, name: str) -> bool:
    t = graph.output_types.get(name)
    return t in FLOAT_TYPES or t == onnx.TensorProto.UNDEFINED
