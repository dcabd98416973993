"""The op declarations: one :class:`OpSpec` per ``(domain, op_type)``, made by :func:`register` in the op family's
module under :mod:`onnx_lrp.ops` and read by the analysis (kinds, patterns) and the engine (builders).

Kept apart from :mod:`onnx_lrp.ops` so that the structural patterns (:mod:`onnx_lrp._patterns`), which the op
modules use, can read the declarations without importing the op modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ._graph import Graph, Node

Builder = Callable[[Any], Any]  # OpContext -> backward | None (see onnx_lrp.ops._base)
KindFn = Callable[["NodeView"], str]
# an element-wise op's forward, for evaluating constants and probing functions: (inputs, attrs) -> y (numpy)
Forward = Callable[[list, dict], Any]
ONNX, MS = "ai.onnx", "com.microsoft"


class NodeView(NamedTuple):
    """What a kind function sees: the graph, the node, which of its inputs carry relevance (``carrying``) and the
    set of all tensors of the graph that do (``live``)."""

    graph: Graph
    node: Node
    carrying: tuple[bool, ...]
    live: set[str]

    @property
    def n_carrying(self) -> int:
        return sum(self.carrying)


@dataclass(frozen=True)
class OpSpec:
    """What one op type means for the rules, declared once in its family's module:

    - ``kind``: the node's kind (:data:`onnx_lrp.composites.KINDS`), or a function of the node (e.g. ``MatMul`` is
      ``linear`` with one carrying operand, ``product`` with two); ``"constant"`` for ops whose outputs never carry
      relevance (shapes, comparisons, integer results);
    - ``builder``: builds the node's backward (the contract above);
    - ``layer``: for eps-LRP, what kind of layer the node's output is the ``z`` of (the engine multiplies ``G_z``
      by ``z / stab(z)``): ``"map"`` (a linear map whose bias may be added by the next node), ``"output"`` (``z``
      is the output, bias included: ``Gemm``, ``Conv``), ``"sum"``, ``"pool"``
      (:func:`onnx_lrp._patterns.epsilon_site`); None: never;
    - ``rules``: rule types the op implements, when fewer than its kind allows;
    - ``forward``: the op's element-wise function, for ops that unary regions are made of;
    - ``carries``: whether output ``k`` can carry relevance (default: every output).
    """

    domain: str
    op_type: str
    kind: str | KindFn
    builder: Builder | None = None
    layer: str | None = None
    rules: tuple[type, ...] | None = None
    forward: Forward | None = None
    carries: Callable[[Node, int], bool] | None = None

    def kind_of(self, view: NodeView) -> str:
        return self.kind(view) if callable(self.kind) else self.kind


REGISTRY: dict[tuple[str, str], OpSpec] = {}


def register(*op_types: str, kind: str | KindFn, domain: str | tuple[str, ...] = ONNX,
             layer: str | None = None, rules: tuple[type, ...] | None = None,
             forward: Forward | None = None, carries: Callable[[Node, int], bool] | None = None
             ) -> Callable[[Builder], Builder]:
    """Declare op types (in ``domain``: ``"ai.onnx"`` by default, a tuple for several) with their kind and the
    decorated builder; see :class:`OpSpec`."""
    domains = (domain,) if isinstance(domain, str) else tuple(domain)

    def deco(fn: Builder) -> Builder:
        for d in domains:
            for op in op_types:
                REGISTRY[(d, op)] = OpSpec(d, op, kind, fn, layer, rules, forward, carries)
        return fn

    return deco


def declare(*op_types: str, kind: str, domain: str | tuple[str, ...] = ONNX,
            carries: Callable[[Node, int], bool] | None = None) -> None:
    """Declare op types that need no builder (kind ``"constant"``: their outputs never carry relevance)."""
    for d in (domain,) if isinstance(domain, str) else domain:
        for op in op_types:
            REGISTRY[(d, op)] = OpSpec(d, op, kind, None, carries=carries)


def spec_of(node: Node) -> OpSpec | None:
    """The declaration of ``node``'s (domain, op type), or None."""
    return REGISTRY.get((node.domain or ONNX, node.op_type))


def known_op_types() -> set[str]:
    return {op for _, op in REGISTRY}


