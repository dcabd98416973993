"""ReduceSum, ReduceMean, GlobalAveragePool (pooling): eps-LRP of a sum, ``R_x = x * R_y / stab(y)``.

Gradient form with eps = 0: ``G_x = broadcast(G_y)`` (divided by the count for a mean).
"""
from __future__ import annotations

import numpy as np

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


@register("ReduceSum", "ReduceMean", "GlobalAveragePool")
def reduce_sum(ctx: OpContext):
    node = ctx.node
    sx = ctx.shape(ctx.input(0))
    if ctx.input(1) is not None:
        ctx.value(ctx.input(1))
    keep = bool(int(node.attr("keepdims", 1))) or node.op_type == "GlobalAveragePool"
    mean = node.op_type in ("ReduceMean", "GlobalAveragePool")
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        nd = len(shape)
        axes = _axes_of(ctx, env, nd)
        lead = g.ndim - (nd if keep else nd - len(axes))
        if not keep:
            for a in axes:
                g = xp.expand_dims(g, lead + a)
        g = xp.broadcast_to(g, g.shape[:lead] + tuple(shape))
        if mean:
            g = g / float(np.prod([shape[a] for a in axes]) or 1)
        return [g] + [None] * (len(node.inputs) - 1)

    return back


@register("ReduceMax", "ReduceMin")
def reduce_max(ctx: OpContext):
    """Max/min pooling: the gradient goes to the selected entries (ties share it)."""
    node = ctx.node
    vx, vy = ctx.value(ctx.input(0)), ctx.value(node.outputs[0])
    if ctx.input(1) is not None:
        ctx.value(ctx.input(1))
    keep = bool(int(node.attr("keepdims", 1)))
    xp = ctx.xp

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
