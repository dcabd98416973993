"""Data movement: relevance is routed exactly backwards (inverse indexing; a broadcast sums); and the ops whose
outputs never carry relevance (kind ``constant``: shapes, comparisons, integer results).

Reshape, Flatten, Squeeze, Unsqueeze, Identity, Cast, Dropout, Neg, Transpose, Expand, Slice, Gather,
GatherElements, GatherND, Concat, Split, Tile, Pad, ScatterND, ScatterElements, TopK (values).
All rules are the plain vector-Jacobian product of the op; ``env.lead`` counts leading target axes.
"""
from __future__ import annotations

import numpy as np

from onnx import helper

from .._graph import FLOAT_TYPES, Node
from ._base import OpContext, declare, ints, register, scatter_add, unbroadcast

# ops whose outputs never carry relevance: shapes, comparisons, integer or piecewise-constant results
declare("Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
        "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero", "ConstantOfShape", "EyeLike", "Range", "Sign", "Floor",
        "Ceil", "Round", "OneHot", "BitShift", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
        "NonMaxSuppression", "Constant", "RandomNormal", "RandomUniform", kind="constant")


def _none_tail(ctx: OpContext, first):
    return [first] + [None] * (len(ctx.node.inputs) - 1)


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze", kind="movement")
def reshape(ctx: OpContext):
    sx = ctx.shape(ctx.input(0))

    def back(env, gy):
        g = gy[0]
        return _none_tail(ctx, g.reshape(g.shape[: env.lead] + tuple(env.shape(sx))))

    return back


def _cast(ins, at):
    return np.asarray(ins[0]).astype(helper.tensor_dtype_to_np_dtype(at["to"]))


def _is_float_cast(node: Node, k: int) -> bool:
    return node.attr("to") in FLOAT_TYPES


@register("Identity", kind="movement", forward=lambda ins, at: ins[0])
@register("Dropout", kind="movement", forward=lambda ins, at: ins[0], carries=lambda node, k: k == 0)
@register("Cast", kind="movement", forward=_cast, carries=_is_float_cast)
@register("CastLike", kind="movement", forward=lambda ins, at: np.asarray(ins[0]).astype(np.asarray(ins[1]).dtype))
def identity(ctx: OpContext):
    return lambda env, gy: _none_tail(ctx, gy[0])


@register("Neg", kind="movement", forward=lambda ins, at: -ins[0])
def neg(ctx: OpContext):
    return lambda env, gy: [-gy[0]]


@register("Transpose", kind="movement")
def transpose(ctx: OpContext):
    perm = ctx.attr("perm")

    def back(env, gy):
        g = gy[0]
        lead = env.lead
        p = list(perm) if perm is not None else list(range(g.ndim - lead))[::-1]
        inv = list(np.argsort(p))
        return [g.transpose(list(range(lead)) + [lead + i for i in inv])]

    return back


@register("Expand", kind="movement")
def expand(ctx: OpContext):
    sx, xp = ctx.shape(ctx.input(0)), ctx.xp

    def back(env, gy):
        g = gy[0]
        return [unbroadcast(xp, g, env.shape(sx), g.ndim - env.lead), None]

    return back


def _zeros(env, g, shape):
    return env.xp.zeros(g.shape[: env.lead] + tuple(shape), dtype=g.dtype)


@register("Slice", kind="movement")
def slice_(ctx: OpContext):
    sx = ctx.shape(ctx.input(0))
    names = [ctx.value(ctx.input(k)) if ctx.input(k) else None for k in range(1, 5)]

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        starts, ends = ints(env[names[0]]), ints(env[names[1]])
        axes = ints(env[names[2]]) if names[2] else list(range(len(starts)))
        steps = ints(env[names[3]]) if names[3] else [1] * len(starts)
        index = [slice(None)] * (env.lead + len(shape))
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = a if a >= 0 else a + len(shape)
            index[env.lead + a] = slice(s, e, st)
        gx = _zeros(env, g, shape)
        gx[tuple(index)] = g
        return _none_tail(ctx, gx)

    return back


@register("Gather", kind="movement")
def gather(ctx: OpContext):
    """Selection by indices: ``G_data[.., idx, ..] += G_y`` (repeated indices accumulate).

    An embedding lookup whose ids are routed from an input (BART's shifted decoder ids, see
    :func:`onnx_lrp._analysis.find_routed_ids`) passes the token relevance ``(y * G_y).sum(-1)`` to the ids,
    which the moves before it route back to the input positions."""
    if ctx.carrying(1):
        table = ctx.const(0)
        if ctx.carrying(0) or int(ctx.attr("axis", 0)) != 0 or table is None or table.ndim != 2:
            raise ctx.fail("carrying indices are supported only for an embedding lookup (constant 2-D table, axis 0)")
        vy = ctx.value(ctx.node.outputs[0])
        return lambda env, gy: [None, (env[vy] * gy[0]).sum(-1)]
    sx, vi = ctx.shape(ctx.input(0)), ctx.value(ctx.input(1))
    axis = int(ctx.attr("axis", 0))
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        a = axis if axis >= 0 else axis + len(shape)
        idx = xp.asarray(env[vi]).astype(np.int64)
        idx = xp.where(idx < 0, idx + shape[a], idx)
        gx = _zeros(env, g, shape)
        index = (slice(None),) * (env.lead + a) + (idx,)
        if idx.ndim == 0:
            gx[index] = g
        else:
            scatter_add(xp, gx, index, g)
        return [gx, None]

    return back


@register("GatherND", kind="movement")
def gather_nd(ctx: OpContext):
    """``y[b.., i..] = data[b.., indices[b.., i.., :]]`` (``batch_dims`` leading axes shared): the gradient is
    scattered back to the addressed entries (repeated addresses accumulate)."""
    if ctx.carrying(1):
        raise ctx.fail("carrying indices are not supported")
    sx, vi = ctx.shape(ctx.input(0)), ctx.value(ctx.input(1))
    nb = int(ctx.attr("batch_dims", 0))
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        idx = xp.asarray(env[vi]).astype(np.int64)
        k = idx.shape[-1]
        grid = idx.shape[:-1]  # batch axes + gathered positions
        batch = [xp.arange(shape[j]).reshape((-1,) + (1,) * (len(grid) - j - 1)) for j in range(nb)]
        addr = [xp.where(idx[..., j] < 0, idx[..., j] + shape[nb + j], idx[..., j]) for j in range(k)]
        gx = _zeros(env, g, shape)
        scatter_add(xp, gx, (slice(None),) * env.lead + tuple(batch) + tuple(addr), g)
        return [gx, None]

    return back


@register("GatherElements", kind="movement")
def gather_elements(ctx: OpContext):
    sx, vi = ctx.shape(ctx.input(0)), ctx.value(ctx.input(1))
    axis = int(ctx.attr("axis", 0))
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        a = axis if axis >= 0 else axis + len(shape)
        idx = xp.asarray(env[vi]).astype(np.int64)
        idx = xp.where(idx < 0, idx + shape[a], idx)
        gx = _zeros(env, g, shape)
        grids = list(xp.indices(idx.shape, sparse=True))
        grids[a] = idx
        lead_idx = tuple(slice(None) for _ in range(env.lead))
        if env.lead:
            for k in range(g.shape[0]):
                scatter_add(xp, gx[k], tuple(grids), g[k])
        else:
            scatter_add(xp, gx, lead_idx + tuple(grids), g)
        return [gx, None]

    return back


@register("Concat", kind="movement")
def concat(ctx: OpContext):
    shapes = [ctx.shape(i) for i in ctx.node.inputs]
    axis = int(ctx.attr("axis"))
    carry = [ctx.carrying(k) for k in range(len(shapes))]

    def back(env, gy):
        g = gy[0]
        out, start = [], 0
        nd = g.ndim - env.lead
        a = env.lead + (axis if axis >= 0 else axis + nd)
        for s, c in zip(shapes, carry):
            n = env.shape(s)[a - env.lead]
            if c:
                index = [slice(None)] * g.ndim
                index[a] = slice(start, start + n)
                out.append(g[tuple(index)])
            else:
                out.append(None)
            start += n
        return out

    return back


@register("Split", kind="movement")
def split(ctx: OpContext):
    outs = [ctx.shape(o) for o in ctx.node.outputs]
    axis = int(ctx.attr("axis", 0))
    xp = ctx.xp

    def back(env, gy):
        ref = next(g for g in gy if g is not None)
        parts = [g if g is not None else _zeros(env, ref, env.shape(s)) for g, s in zip(gy, outs)]
        nd = ref.ndim - env.lead
        a = env.lead + (axis if axis >= 0 else axis + nd)
        return _none_tail(ctx, xp.concatenate(parts, axis=a))

    return back


@register("Tile", kind="movement")
def tile(ctx: OpContext):
    sx, vr = ctx.shape(ctx.input(0)), ctx.value(ctx.input(1))

    def back(env, gy):
        g = gy[0]
        shape, reps = env.shape(sx), ints(env[vr])
        lead = env.lead
        inter = list(g.shape[:lead])
        for r, d in zip(reps, shape):
            inter += [r, d]
        g = g.reshape(inter).sum(axis=tuple(lead + 2 * i for i in range(len(shape))))
        return [g, None]

    return back


@register("Pad", kind="movement")
def pad(ctx: OpContext):
    mode = ctx.attr("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ctx.fail(f"Pad mode {mode!r} is not supported (only constant)")
    sx = ctx.shape(ctx.input(0))
    vp = ctx.value(ctx.input(1)) if ctx.input(1) else None
    va = ctx.value(ctx.input(3)) if ctx.input(3) else None
    attr_pads = ctx.attr("pads")
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        nd = len(shape)
        pads = ints(env[vp]) if vp else list(attr_pads)
        axes = ints(env[va]) if va else list(range(nd))
        axes = [a if a >= 0 else a + nd for a in axes]
        before, after = [0] * nd, [0] * nd
        for k, a in enumerate(axes):
            before[a], after[a] = pads[k], pads[k + len(axes)]
        # negative pads cropped the input: put zeros back there
        widths = [(0, 0)] * env.lead + [(max(-b, 0), max(-e, 0)) for b, e in zip(before, after)]
        if any(w != (0, 0) for w in widths):
            g = xp.pad(g, widths)
        index = [slice(None)] * env.lead + [
            slice(max(b, 0), g.shape[env.lead + i] - max(e, 0)) for i, (b, e) in enumerate(zip(before, after))
        ]
        return _none_tail(ctx, g[tuple(index)])

    return back


@register("ScatterND", kind="movement")
def scatter_nd(ctx: OpContext):
    """``out = data; out[indices] = updates``: overwritten entries of ``data`` get nothing."""
    if ctx.attr("reduction", b"none") not in (b"none", "none", b"add", "add"):
        raise ctx.fail("ScatterND reductions other than none/add are not supported")
    replace = ctx.attr("reduction", b"none") in (b"none", "none")
    vi = ctx.value(ctx.input(1))
    cd, cu = ctx.carrying(0), ctx.carrying(2)

    def back(env, gy):
        g = gy[0]
        idx = env[vi].astype(np.int64)
        k = idx.shape[-1]
        lead = (slice(None),) * env.lead
        index = lead + tuple(idx[..., j] for j in range(k))
        gu = g[index] if cu else None  # leading target axes stay first: the indices are adjacent
        gd = None
        if cd:
            gd = g.copy() if replace else g
            if replace:
                gd[index] = 0
        return [gd, None, gu]

    return back


@register("ScatterElements", kind="movement")
def scatter_elements(ctx: OpContext):
    if ctx.attr("reduction", b"none") not in (b"none", "none", b"add", "add"):
        raise ctx.fail("ScatterElements reductions other than none/add are not supported")
    replace = ctx.attr("reduction", b"none") in (b"none", "none")
    vi = ctx.value(ctx.input(1))
    axis = int(ctx.attr("axis", 0))
    cd, cu = ctx.carrying(0), ctx.carrying(2)
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        idx = env[vi].astype(np.int64)
        nd = g.ndim - env.lead
        a = axis if axis >= 0 else axis + nd
        idx = xp.where(idx < 0, idx + g.shape[env.lead + a], idx)
        full = xp.broadcast_to(idx.reshape((1,) * env.lead + idx.shape), g.shape[: env.lead] + idx.shape)
        gu = xp.take_along_axis(g, full, axis=env.lead + a) if cu else None
        gd = None
        if cd:
            gd = g.copy() if replace else g
            if replace:
                xp.put_along_axis(gd, full, 0, axis=env.lead + a)
        return [gd, None, gu]

    return back


@register("TopK", kind="movement", carries=lambda node, k: k == 0)
def topk(ctx: OpContext):
    """Values of TopK: ``G_x`` holds ``G_values`` at the selected positions."""
    sx, vi = ctx.shape(ctx.input(0)), ctx.value(ctx.node.outputs[1])
    axis = int(ctx.attr("axis", -1))
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        if g is None:
            return [None, None]
        shape = env.shape(sx)
        a = axis if axis >= 0 else axis + len(shape)
        idx = env[vi].astype(np.int64)
        full = xp.broadcast_to(idx.reshape((1,) * env.lead + idx.shape), g.shape[: env.lead] + idx.shape)
        gx = _zeros(env, g, shape)
        xp.put_along_axis(gx, full, g, axis=env.lead + a)
        return [gx, None]

    return back
