"""The contract between the engine and the op rules.

Each op type is declared once, in its family's module, keyed by ``(domain, op_type)``: its *kind* (which rules
fit it, :data:`onnx_lrp.composites.KINDS`), its builder, and what else the analysis needs (:class:`OpSpec`)::

    @register("Softmax", kind=softmax_kind)
    def softmax(ctx: OpContext) -> Backward | None: ...

The builder runs once per node when a plan is compiled. It reads the node, the chosen rule (``ctx.rule``),
which inputs carry relevance, and static constants; it declares the run-time tensors it needs with
``ctx.value(name)`` / ``ctx.shape(name)``; and it returns a ``backward(env, grads)`` function, or ``None``
when nothing flows back. ``backward`` maps the modified gradients of the node's outputs (``None`` where an
output received nothing) to one gradient per node input (``None`` for non-carrying inputs).

Gradients may carry extra *leading* axes (one per explained target); rules address axes from the end
(negative axes) and let broadcasting handle the leading ones.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .._graph import Graph, Node
from .._registry import MS, ONNX, REGISTRY, NodeView, OpSpec, declare, known_op_types, register, spec_of  # noqa: F401
from ..errors import OnnxLrpError
from ..rules import Rule

Array = Any  # numpy.ndarray or cupy.ndarray


class Env(Protocol):
    """Run-time view of the forward pass handed to ``backward``."""

    xp: Any
    dtype: Any

    def __getitem__(self, name: str) -> Array: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def memo(self, key: str, fn: Callable[[], Array]) -> Array: ...

    def matmul(self, a: Array, b: Array, alpha: float = 1.0) -> Array: ...


Backward = Callable[[Env, list], list]
Builder = Callable[["OpContext"], "Backward | None"]
class OpContext:
    """What a builder knows about one node at compile time."""

    def __init__(
        self,
        graph: Graph,
        node: Node,
        rule: Rule,
        kind: str,
        carrying: set[str],
        xp: Any,
        dtype: Any,
        needs_value: set[str],
        needs_shape: set[str],
        gates: frozenset[int] = frozenset(),
        composite: Any = None,
    ):
        self.graph, self.node, self.rule, self.kind = graph, node, rule, kind
        self._composite = composite
        self.xp, self.dtype = xp, dtype
        self._carrying = carrying
        self._needs_value, self._needs_shape = needs_value, needs_shape
        self.gates = gates  # inputs the analysis found to be gating factors (held constant under ConstantGate)

    def rule_of(self, kind: str, op_type: str) -> Rule:
        """The composite's rule for an op of ``kind``/``op_type`` inside this (fused) node, e.g. the linear
        rule of the projections inside a fused attention; the node's own rule when no composite is known."""
        if self._composite is None:
            return self.rule
        return self._composite.rule_for(kind, op_type, self.node.name)

    @property
    def opset(self) -> int:
        return self.graph.opset.get("ai.onnx", 0)

    def carrying(self, k: int) -> bool:
        ins = self.node.inputs
        return k < len(ins) and bool(ins[k]) and ins[k] in self._carrying

    def input(self, k: int) -> str | None:
        ins = self.node.inputs
        return ins[k] if k < len(ins) and ins[k] else None

    def attr(self, key: str, default: Any = None) -> Any:
        return self.node.attr(key, default)

    def const(self, k: int) -> np.ndarray | None:
        """Compile-time value of input ``k`` if it is an initializer or Constant, else None."""
        name = self.input(k)
        return None if name is None else self.graph.constant(name)

    def array(self, value: np.ndarray) -> Array:
        """A compile-time constant on the engine's device, floats in the compute dtype."""
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(self.dtype, copy=False)
        return self.xp.asarray(value)

    def value(self, name: str) -> str:
        """Declare that ``backward`` reads tensor ``name`` (``env[name]``)."""
        self._needs_value.add(name)
        return name

    def shape(self, name: str) -> str:
        """Declare that ``backward`` reads the shape of ``name`` (``env.shape(name)``)."""
        self._needs_shape.add(name)
        return name

    def fail(self, message: str) -> Exception:
        n = self.node
        return OnnxLrpError(f"node {n.name!r} ({n.op_type}): {message}")


def scaled_matmul(a: Array, b: Array, alpha: float = 1.0) -> Array:
    """``alpha * (a @ b)``: the product rules use where the engine gives none of its own (``Env.matmul``)."""
    return a @ b if alpha == 1.0 else (a @ b) * alpha


def unbroadcast(xp: Any, g: Array, shape: Sequence[int], out_ndim: int) -> Array:
    """Sum ``g`` (leading target axes + an ``out_ndim``-dim output) down to an operand of ``shape``."""
    lead = g.ndim - out_ndim
    extra = out_ndim - len(shape)
    axes = list(range(lead, lead + extra))
    for j, d in enumerate(shape):
        ax = lead + extra + j
        if d == 1 and g.shape[ax] != 1:
            axes.append(ax)
    if axes:
        g = g.sum(axis=tuple(axes), keepdims=True)
        if extra:
            g = g.reshape(g.shape[:lead] + g.shape[lead + extra :])
    return g


def ints(value: Any) -> list[int]:
    """A small integer tensor (shape, axes, pads) as a list; CuPy arrays are read back from the device."""
    if not isinstance(value, np.ndarray) and hasattr(value, "get"):
        value = value.get()
    return [int(v) for v in np.asarray(value).reshape(-1)]


def scatter_add(xp: Any, target: Array, index: tuple, values: Array) -> None:
    """``target[index] += values`` with repeated indices accumulated (numpy ``add.at`` / CuPy ``scatter_add``)."""
    if xp is np:
        np.add.at(target, index, values)
    else:  # CuPy
        import cupyx

        cupyx.scatter_add(target, index, values)
