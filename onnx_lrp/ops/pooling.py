"""AveragePool, MaxPool: the plain vector-Jacobian product (both are data movement for the rules).

AveragePool ``y = sum_window(x) / count`` is linear: ``G_x = sum over windows of G_y / count``
(``count`` = kernel size, or the non-padding entries of the window when ``count_include_pad=0``).
MaxPool routes ``G_y`` to the window's maximum (the first one on ties, as onnxruntime and torch select it):
winner-takes-all, so ``R_x = x * G_x`` conserves ``R_y = y * G_y``. GlobalMaxPool is MaxPool over the whole
spatial extent.

GlobalLpPool ``y = (sum |x|^p)^(1/p)`` is positively homogeneous of degree 1, so its plain gradient
``G_x = G_y * sign(x) |x|^(p-1) / y^(p-1)`` conserves (Euler: ``sum x dy/dx = y``) and distributes
``R_x = R_y * |x|^p / sum |x|^p``: the p-norm's own share of each entry, between sum pooling (``p = 1``, positive
inputs) and winner-takes-all (``p -> inf``). AttnLRP (kind ``reduce``: eps-LRP of the pooling, ``z = y``) and
Gradient both use it; a window of zeros passes nothing.
"""
from __future__ import annotations

import itertools
import math

from ._base import OpContext, register


def _geometry(ctx: OpContext, spatial: tuple[int, ...]):
    """(kernel, strides, dilations, pads_begin, pads_end, out) for the node on input ``spatial`` dims."""
    k = list(ctx.attr("kernel_shape"))
    n = len(k)
    s = list(ctx.attr("strides", [1] * n))
    d = list(ctx.attr("dilations", [1] * n))
    pads = list(ctx.attr("pads", [0] * 2 * n))
    auto = ctx.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    ceil = bool(int(ctx.attr("ceil_mode", 0)))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * n
        for i in range(n):
            out = -(-spatial[i] // s[i])
            total = max(0, (out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 2 * n
    rnd = math.ceil if ceil else math.floor
    out = []
    for i in range(n):
        o = rnd((spatial[i] + pads[i] + pads[i + n] - ((k[i] - 1) * d[i] + 1)) / s[i]) + 1
        if ceil and (o - 1) * s[i] >= spatial[i] + pads[i]:  # the last window must start inside
            o -= 1
        out.append(o)
    return k, s, d, pads[:n], pads[n:], out


def _windows(k, s, d, out):
    """Per kernel offset: the slices of the padded input that the output grid reads at that offset."""
    for off in itertools.product(*[range(x) for x in k]):
        yield tuple(slice(o * di, o * di + st * (n - 1) + 1, st) for o, di, st, n in zip(off, d, s, out))


def _padded_extent(spatial, k, s, d, begin, out):
    return [max(sp + b, (n - 1) * st + (kk - 1) * di + 1) for sp, b, kk, st, di, n in zip(spatial, begin, k, s, d, out)]


@register("AveragePool", kind="reduce", layer="pool")
def average_pool(ctx: OpContext):
    xp = ctx.xp
    sx = ctx.shape(ctx.input(0))
    include_pad = bool(int(ctx.attr("count_include_pad", 0)))

    def back(env, gy):
        g = gy[0]
        shape = tuple(env.shape(sx))
        n = len(ctx.attr("kernel_shape"))
        spatial = shape[-n:]
        k, s, d, begin, end, out = _geometry(ctx, spatial)
        ext = _padded_extent(spatial, k, s, d, begin, out)
        valid = xp.zeros(ext, dtype=g.dtype)  # entries a window counts
        hi = [b + sp + (e if include_pad else 0) for b, sp, e in zip(begin, spatial, end)]
        lo = [0 if include_pad else b for b in begin]
        valid[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
        count = sum(valid[w] for w in _windows(k, s, d, out))
        gc = g / xp.maximum(count, 1)
        gx = xp.zeros(g.shape[:-n] + tuple(ext), dtype=g.dtype)
        for w in _windows(k, s, d, out):
            gx[(Ellipsis,) + w] += gc * valid[w]
        return [gx[(Ellipsis,) + tuple(slice(b, b + sp) for b, sp in zip(begin, spatial))]]

    return back


@register("MaxPool", kind="movement", carries=lambda node, k: k == 0)
def max_pool(ctx: OpContext):
    xp = ctx.xp
    vx, vy = ctx.value(ctx.input(0)), ctx.value(ctx.node.outputs[0])
    if int(ctx.attr("storage_order", 0)):
        raise ctx.fail("storage_order=1 is not supported")

    def back(env, gy):
        g, X, Y = gy[0], env[vx], env[vy]
        n = len(ctx.attr("kernel_shape"))
        spatial = X.shape[-n:]
        k, s, d, begin, end, out = _geometry(ctx, spatial)
        ext = _padded_extent(spatial, k, s, d, begin, out)
        Xp = xp.full(X.shape[:-n] + tuple(ext), -xp.inf, dtype=X.dtype)
        inner = (Ellipsis,) + tuple(slice(b, b + sp) for b, sp in zip(begin, spatial))
        Xp[inner] = X
        gx = xp.zeros(g.shape[: g.ndim - X.ndim] + Xp.shape, dtype=g.dtype)
        free = xp.ones(Y.shape, dtype=bool)  # windows whose maximum is not yet found
        for w in _windows(k, s, d, out):
            hit = (Xp[(Ellipsis,) + w] == Y) & free
            free &= ~hit
            gx[(Ellipsis,) + w] += g * hit
        return [gx[inner]]

    return back


@register("GlobalMaxPool", kind="movement")
def global_max_pool(ctx: OpContext):
    """``G_y`` to the first maximum of each channel (as MaxPool)."""
    xp = ctx.xp
    vx = ctx.value(ctx.input(0))

    def back(env, gy):
        g, X = gy[0], env[vx]
        flat = X.reshape(X.shape[:2] + (-1,))
        hit = xp.arange(flat.shape[-1]) == flat.argmax(axis=-1)[..., None]
        return [g * hit.reshape(X.shape).astype(g.dtype)]

    return back


@register("GlobalLpPool", kind="reduce", layer="pool")
def global_lp_pool(ctx: OpContext):
    """``G_x = G_y * sign(x) |x|^(p-1) / y^(p-1)`` (0 where ``y = 0``); see the module docstring."""
    xp = ctx.xp
    p = int(ctx.attr("p", 2))
    if p < 1:
        raise ctx.fail(f"p={p} is not supported (p >= 1)")
    vx, vy = ctx.value(ctx.input(0)), ctx.value(ctx.node.outputs[0])

    def back(env, gy):
        g, X, Y = gy[0], env[vx], env[vy]
        if p == 1:
            return [g * xp.sign(X)]
        ratio = xp.where(Y > 0, X / xp.where(Y > 0, Y, 1), 0)  # x / y, |x| <= y
        return [g * xp.sign(ratio) * xp.abs(ratio) ** (p - 1)]

    return back
