"""ReduceSum, ReduceMean, GlobalAveragePool (pooling): eps-LRP of a sum, ``R_x = x * R_y / stab(y)``;
ReduceMax/Min (winner takes all); ReduceL2/ReduceSumSquare (norm statistics, for the Gradient rule).

Gradient form with eps = 0: ``G_x = broadcast(G_y)`` (divided by the count for a mean).
"""
from __future__ import annotations

import numpy as np

from ..rules import Constant, Gradient
from ._base import OpContext, ints, register


def _axes_of(ctx: OpContext, env, ndim: int) -> list[int]:
    """Reduced axes, from the ``axes`` input (ReduceSum >= 13, others >= 18) or attribute."""
    node = ctx.node
    if node.op_type == "GlobalAveragePool":
        return list(range(2, ndim))
    axes_in = ctx.input(1)
    if axes_in is not None:
        axes = ints(env[axes_in])
    else:
        axes = list(node.attr("axes", []))
    if not axes:
        return [] if int(node.attr("noop_with_empty_axes", 0)) else list(range(ndim))
    return sorted(a if a >= 0 else a + ndim for a in axes)


@register("ReduceSum", "ReduceMean", "GlobalAveragePool", kind="reduce", layer="pool")
def reduce_sum(ctx: OpContext):
    node = ctx.node
    sx = ctx.shape(ctx.input(0))
    if ctx.input(1) is not None:
        ctx.value(ctx.input(1))
    keep = bool(int(node.attr("keepdims", 1))) or node.op_type == "GlobalAveragePool"
    mean = node.op_type in ("ReduceMean", "GlobalAveragePool")
    xp = ctx.xp

    def back(env, gy):
        shape = env.shape(sx)
        axes = _axes_of(ctx, env, len(shape))
        g = _expand(xp, gy[0], axes, keep, shape)
        if mean:
            g = g / float(np.prod([shape[a] for a in axes]) or 1)
        return [g] + [None] * (len(node.inputs) - 1)

    return back


def _expand(xp, g, axes: list[int], keep: bool, shape) -> object:
    """``g`` of a reduction's output broadcast back to the input ``shape`` (leading target axes kept)."""
    nd = len(shape)
    lead = g.ndim - (nd if keep else nd - len(axes))
    if not keep:
        for a in axes:
            g = xp.expand_dims(g, lead + a)
    return xp.broadcast_to(g, g.shape[:lead] + tuple(shape))


def _reduce_values(ctx: OpContext) -> tuple[str, str, bool]:
    """A reduction's input and output (needed at run time; axes given as an input too) and ``keepdims``."""
    vx, vy = ctx.value(ctx.input(0)), ctx.value(ctx.node.outputs[0])
    if ctx.input(1) is not None:
        ctx.value(ctx.input(1))
    return vx, vy, bool(int(ctx.node.attr("keepdims", 1)))


@register("ReduceL2", "ReduceSumSquare", kind="nonlinear", rules=(Gradient, Constant))
def reduce_l2(ctx: OpContext):
    """Norm statistics (kind ``norm``: constants under AttnLRP), differentiated under the Gradient rule:
    ``||x||_2``: ``G_x = G_y * x / y`` (0 where ``y = 0``); ``sum x^2``: ``G_x = 2 x G_y``."""
    if not isinstance(ctx.rule, Gradient):
        raise ctx.fail(f"rule {ctx.rule.name} does not apply to a norm statistic (Gradient differentiates it; "
                       "ConstantStatistic makes it a constant)")
    node, xp = ctx.node, ctx.xp
    vx, vy, keep = _reduce_values(ctx)
    l2 = node.op_type == "ReduceL2"

    def back(env, gy):
        X, Y = env[vx], env[vy]
        axes = _axes_of(ctx, env, X.ndim)
        g = _expand(xp, gy[0], axes, keep, X.shape)
        if not l2:
            return [2 * X * g] + [None] * (len(node.inputs) - 1)
        Yb = _expand(xp, Y, axes, keep, X.shape)
        return [xp.where(Yb > 0, X * g / xp.where(Yb > 0, Yb, 1), 0)] + [None] * (len(node.inputs) - 1)

    return back


@register("ReduceMax", "ReduceMin", kind="movement")
def reduce_max(ctx: OpContext):
    """Max/min pooling: the gradient goes to the selected entries (ties share it)."""
    node, xp = ctx.node, ctx.xp
    vx, vy, keep = _reduce_values(ctx)

    def back(env, gy):
        g, X, Y = gy[0], env[vx], env[vy]
        axes = _axes_of(ctx, env, X.ndim)
        lead = env.lead
        if not keep:
            for a in axes:
                Y = xp.expand_dims(Y, a)
                g = xp.expand_dims(g, lead + a)
        sel = (X == Y).astype(g.dtype)
        sel = sel / sel.sum(axis=tuple(axes), keepdims=True)
        return [g * sel] + [None] * (len(node.inputs) - 1)

    return back
