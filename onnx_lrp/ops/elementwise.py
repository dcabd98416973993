"""Add, Sub, Sum, Mul, Div, Where, Max, Min: linear maps, residual sums and products of carrying tensors.

- one carrying operand (bias add, scaling, mask): linear, ``G_x = G_y * c`` (Mul/Div) or ``G_y`` (Add/Sub);
- several carrying operands of Add/Sub (residual): ``G_a = G_b = G_y`` (eps-LRP on a sum, eps=0);
- several carrying factors of Mul (Prop. 3.2): ``G_a = G_y * b / N`` under the uniform rule;
- ``a / b`` with carrying ``b``: ``a * (1/b)``, the identity rule on ``1/b`` gives ``G_b = G_y * a / (N b^2)``.
Broadcast operands receive the sum over their broadcast axes.
"""
from __future__ import annotations

import functools

import numpy as np

from .._patterns import function_of_node, nan_guard
from ..rules import Gradient, Identity
from ._base import NodeView, OpContext, register, unbroadcast
from .linear import product_weights


def _sum_kind(view: NodeView) -> str:
    return "add" if view.n_carrying >= 2 else "linear"


def _product_kind(view: NodeView) -> str:
    return "product" if view.n_carrying >= 2 else "linear"


def _div_kind(view: NodeView) -> str:
    """``x / c`` linear, ``a / b`` a product, ``c / x`` a function of ``x`` (never zero-centred)."""
    if not view.carrying[1]:
        return "linear"
    return "product" if view.carrying[0] else "nonlinear"


def _maxmin_kind(view: NodeView) -> str:
    """A selection between carrying tensors; with constants, a function of one tensor (``Max(x, 0)`` is ReLU)."""
    if view.n_carrying != 1 or not view.carrying[0] and len(view.node.inputs) != 2:
        return "movement"
    node = view.node
    if not view.carrying[0]:  # Max(c, x): the same function of x
        node = type(node)(node.index, node.op_type, node.name, node.domain, node.inputs[::-1], node.outputs,
                          node.attrs)
    return "unary" if function_of_node(view.graph, node, view.live) else "nonlinear"


def _shapes(ctx: OpContext) -> list[str | None]:
    """Declare the shapes of all inputs (broadcasting needs every operand's rank)."""
    return [ctx.shape(i) if i else None for i in ctx.node.inputs]


@register("Add", kind=_sum_kind, layer="sum", forward=lambda ins, at: ins[0] + ins[1])
@register("Sub", kind=_sum_kind, layer="sum", forward=lambda ins, at: ins[0] - ins[1])
@register("Sum", kind=_sum_kind, layer="sum", forward=lambda ins, at: sum(ins[1:], ins[0]))
def add(ctx: OpContext):
    sign = [1.0, -1.0] if ctx.node.op_type == "Sub" else [1.0] * len(ctx.node.inputs)
    shapes = _shapes(ctx)
    carry = [ctx.carrying(k) for k in range(len(ctx.node.inputs))]
    xp = ctx.xp

    def back(env, gy):
        g = gy[0]
        sh = [env.shape(s) for s in shapes]
        out_ndim = max(len(s) for s in sh)
        return [
            (unbroadcast(xp, g if sign[k] > 0 else -g, sh[k], out_ndim) if carry[k] else None)
            for k in range(len(sh))
        ]

    return back


@register("Mul", kind=_product_kind, forward=lambda ins, at: ins[0] * ins[1])
def mul(ctx: OpContext):
    xp = ctx.xp
    shapes = _shapes(ctx)
    a, b = ctx.input(0), ctx.input(1)
    ca, cb = ctx.carrying(0), ctx.carrying(1)
    if ca and cb:
        wa, wb = product_weights(ctx, [0, 1])
        va, vb = ctx.value(a), ctx.value(b)

        def back_product(env, gy):
            g = gy[0]
            A, B = env[va], env[vb]
            out_ndim = max(A.ndim, B.ndim)
            ga = unbroadcast(xp, g * (B * wa), A.shape, out_ndim) if wa else None
            gb = unbroadcast(xp, g * (A * wb), B.shape, out_ndim) if wb else None
            return [ga, gb]

        return back_product
    k = 0 if ca else 1
    other = ctx.input(1 - k)
    c_static = ctx.const(1 - k)
    c = ctx.array(c_static) if c_static is not None else None
    vc = None if c is not None else ctx.value(other)

    def back_scale(env, gy):
        cv = c if c is not None else env[vc]
        sx, so = env.shape(shapes[k]), cv.shape
        out = [None, None]
        out[k] = unbroadcast(xp, gy[0] * cv, sx, max(len(sx), len(so)))
        return out

    return back_scale


@register("Div", kind=_div_kind, forward=lambda ins, at: ins[0] / ins[1])
def div(ctx: OpContext):
    xp = ctx.xp
    shapes = _shapes(ctx)
    a, b = ctx.input(0), ctx.input(1)
    ca, cb = ctx.carrying(0), ctx.carrying(1)
    if not cb:  # x / c: linear
        c_static = ctx.const(1)
        c = ctx.array(c_static) if c_static is not None else None
        vc = None if c is not None else ctx.value(b)

        def back_scale(env, gy):
            cv = c if c is not None else env[vc]
            sx = env.shape(shapes[0])
            return [unbroadcast(xp, gy[0] / cv, sx, max(len(sx), cv.ndim)), None]

        return back_scale
    vb = ctx.value(b)
    va = ctx.value(a)
    if not ca:  # c / x: a unary non-linearity of x
        if isinstance(ctx.rule, Identity):
            rule = ctx.rule
            y = ctx.value(ctx.node.outputs[0])

            def back_identity(env, gy):
                B = env[vb]
                return [None, unbroadcast(xp, gy[0] * rule.ratio(B, env[y]), B.shape, max(B.ndim, env[va].ndim))]

            return back_identity
        if not isinstance(ctx.rule, Gradient):
            raise ctx.fail(f"rule {ctx.rule.name} does not apply to c / x")

        def back_recip(env, gy):
            A, B = env[va], env[vb]
            return [None, unbroadcast(xp, -gy[0] * A / (B * B), B.shape, max(A.ndim, B.ndim))]

        return back_recip
    wa, wb = product_weights(ctx, [0, 1])
    grad = isinstance(ctx.rule, Gradient)

    def back_product(env, gy):
        g = gy[0]
        A, B = env[va], env[vb]
        out_ndim = max(A.ndim, B.ndim)
        ga = unbroadcast(xp, g * (wa / B), A.shape, out_ndim) if wa else None
        # gradient: d(a/b)/db = -a/b^2; identity rule on 1/b inside a uniform product: +a/(N b^2)
        gb = unbroadcast(xp, g * ((-wb if grad else wb) * A / (B * B)), B.shape, out_ndim) if wb else None
        return [ga, gb]

    return back_product


@register("Where", kind="movement")
def where(ctx: OpContext):
    """``Where(cond, x, y)``: relevance follows the selected branch."""
    xp = ctx.xp
    if ctx.carrying(0):
        raise ctx.fail("a carrying condition is not supported")
    shapes = _shapes(ctx)
    cx, cy = ctx.carrying(1), ctx.carrying(2)
    src = ctx.graph.producer.get(ctx.input(2) or "")
    if cy and not cx and src is not None and src.op_type == "Softmax" and nan_guard(ctx.graph, src.outputs[0]) is ctx.node:
        return lambda env, gy: [None, None, gy[0]]  # see softmax.nan_guard
    cond = ctx.value(ctx.input(0))

    def back(env, gy):
        g = gy[0]
        c = env[cond]
        sh = [env.shape(s) for s in shapes]
        out_ndim = max(len(s) for s in sh)
        zero = xp.zeros((), dtype=g.dtype)
        return [
            None,
            unbroadcast(xp, xp.where(c, g, zero), sh[1], out_ndim) if cx else None,
            unbroadcast(xp, xp.where(c, zero, g), sh[2], out_ndim) if cy else None,
        ]

    return back


@register("Max", kind=_maxmin_kind, forward=lambda ins, at: functools.reduce(np.maximum, ins))
@register("Min", kind=_maxmin_kind, forward=lambda ins, at: functools.reduce(np.minimum, ins))
def maxmin(ctx: OpContext):
    """Element-wise max/min: the gradient goes to the selected operand (ties: the first)."""
    xp = ctx.xp
    names = [ctx.value(i) for i in ctx.node.inputs]
    y = ctx.value(ctx.node.outputs[0])
    carry = [ctx.carrying(k) for k in range(len(names))]

    def back(env, gy):
        g, Y = gy[0], env[y]
        out, taken = [], xp.zeros(Y.shape, dtype=bool)
        for k, n in enumerate(names):
            X = env[n]
            sel = (X == Y) & ~taken
            taken = taken | sel
            out.append(unbroadcast(xp, xp.where(sel, g, 0), X.shape, Y.ndim) if carry[k] else None)
        return out

    return back
