"""Softmax and LogSoftmax: AttnLRP Prop. 3.1.

Explicit form ``R_x = x * (R_s - s * sum(R_s))``; in gradient form this is the plain vector-Jacobian
product ``G_x = s * (G_s - sum(s * G_s))`` (masked ``-inf`` entries have ``s = 0`` and get nothing).
Under CP-LRP the rule is :class:`~onnx_lrp.rules.Constant` and the node never reaches here.
"""
from __future__ import annotations

import numpy as np

from ..rules import Gradient
from .._patterns import nan_guard, weights_values
from ._base import NodeView, OpContext, register


def _axes(ctx: OpContext, ndim: int) -> tuple[int, ...]:
    """Reduction axes, negative. Before opset 13 softmax flattens ``[axis:]`` into one axis (default 1)."""
    if ctx.opset < 13:
        axis = int(ctx.attr("axis", 1))
        axis = axis if axis >= 0 else axis + ndim
        return tuple(range(axis - ndim, 0))
    axis = int(ctx.attr("axis", -1))
    return (axis - ndim if axis >= 0 else axis,)


def _finite(xp, S):
    """Rows that were fully masked (all ``-inf``) are NaN in the forward pass and guarded by the graph
    (``Where(IsNaN(s), 0, s)``); they receive no gradient, so treat them as 0 rather than ``NaN * 0``."""
    bad = xp.isnan(S)
    return xp.where(bad, 0.0, S).astype(S.dtype) if bad.any() else S


def softmax_kind(view: NodeView) -> str:
    """``attention`` when the probabilities weight other carrying values (``P V``, routing weights times expert
    outputs), else ``softmax`` (e.g. the model's own output distribution, never held constant by CP-LRP)."""
    return "attention" if weights_values(view.graph, view.node.outputs[0], view.live) else "softmax"


@register("Softmax", kind=softmax_kind)
def softmax(ctx: OpContext):
    if not isinstance(ctx.rule, Gradient):
        raise ctx.fail(f"rule {ctx.rule.name} does not apply to Softmax (use Gradient or Constant)")
    guard = nan_guard(ctx.graph, ctx.node.outputs[0])
    s = ctx.value(guard.outputs[0] if guard is not None else ctx.node.outputs[0])
    key = f"softmax-finite:{s}"

    def back(env, gy):
        g = gy[0]
        S = env[s] if guard is not None else env.memo(key, lambda: _finite(env.xp, env[s]))
        axes = _axes(ctx, S.ndim)
        if env.xp is not np:  # CuPy: fused kernels
            from .._device import softmax_vjp

            return [softmax_vjp(S, g, axes)]
        return [S * (g - (S * g).sum(axis=axes, keepdims=True))]

    return back


@register("LogSoftmax", kind="softmax")
def log_softmax(ctx: OpContext):
    if not isinstance(ctx.rule, Gradient):
        raise ctx.fail(f"rule {ctx.rule.name} does not apply to LogSoftmax (use Gradient or Constant)")
    ls = ctx.value(ctx.node.outputs[0])

    def back(env, gy):
        g, L = gy[0], env[ls]
        axes = _axes(ctx, L.ndim)
        xp = env.xp
        return [g - xp.exp(L) * g.sum(axis=axes, keepdims=True)]

    return back
