"""Softmax and LogSoftmax: AttnLRP Prop. 3.1.

Explicit form ``R_x = x * (R_s - s * sum(R_s))``; in gradient form this is the plain vector-Jacobian
product ``G_x = s * (G_s - sum(s * G_s))`` (masked ``-inf`` entries have ``s = 0`` and get nothing).
Under CP-LRP the rule is :class:`~onnx_lrp.rules.Constant` and the node never reaches here.
"""
from __future__ import annotations

from ..rules import Gradient
from ._base import OpContext, register


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


@register("Softmax")
def softmax(ctx: OpContext):
    if not isinstance(ctx.rule, Gradient):
        raise ctx.fail(f"rule {ctx.rule.name} does not apply to Softmax (use Gradient or Constant)")
    s = ctx.value(ctx.node.outputs[0])
    key = f"softmax-finite:{s}"

    def back(env, gy):
        g, S = gy[0], env.memo(key, lambda: _finite(env.xp, env[s]))
        axes = _axes(ctx, S.ndim)
        return [S * (g - (S * g).sum(axis=axes, keepdims=True))]

    return back


@register("LogSoftmax")
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
