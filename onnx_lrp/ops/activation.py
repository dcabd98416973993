"""Element-wise non-linearities: identity rule (AttnLRP Eq. 9) or their true derivative.

Identity rule, gradient form: ``G_x = G_y * f(x) / (x + eps)`` (LXT: ``eps = 1e-10``), so that
``R_x = x * G_x = R_y``. It applies to single ops (``Gelu``, ``Tanh``, ...) and to *unary regions*: a
non-linearity written out as several element-wise ops (``x * Sigmoid(x)``, Erf-GELU, tanh-GELU), found by
graph analysis and handled here as one node from its input ``x`` to its output ``y``.
Fused ops with a bias (``BiasGelu``, ``FastGelu`` with bias) apply the rule after the bias add.
"""
from __future__ import annotations

import math

from ..rules import Gradient, Identity
from ._base import OpContext, register, unbroadcast

_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def erf(xp, x):
    """Error function (Abramowitz & Stegun 7.1.26 refined by one Newton step; |error| < 1e-7)."""
    s = xp.sign(x)
    a = xp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * xp.exp(-a * a)
    return s * y


def _gelu_tanh_grad(xp, x):
    u = _SQRT_2_PI * (x + 0.044715 * x**3)
    t = xp.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_PI * (1 + 3 * 0.044715 * x * x)


def _gelu_erf_grad(xp, x):
    return 0.5 * (1 + erf(xp, x / math.sqrt(2.0))) + x * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def _derivative(node, xp, x, y, slope=None):
    """dy/dx of a single-input element-wise op (``x`` already includes a fused bias; ``slope``: PRelu's)."""
    op, at = node.op_type, node.attrs
    if op == "Erf":
        return (2.0 / math.sqrt(math.pi)) * xp.exp(-x * x)
    if op == "Tanh":
        return 1 - y * y
    if op == "Sigmoid":
        return y * (1 - y)
    if op == "Relu":
        return (x > 0).astype(x.dtype)
    if op == "PRelu":
        return xp.where(x > 0, xp.ones_like(x), slope).astype(x.dtype)
    if op == "Clip":  # 1 inside [min, max] (bounds included, as torch.clamp), where the output is the input
        return (y == x).astype(x.dtype)
    if op == "ThresholdedRelu":
        return (x > at.get("alpha", 1.0)).astype(x.dtype)
    if op == "Selu":
        a, g = at.get("alpha", 1.67326319217681884765625), at.get("gamma", 1.05070102214813232421875)
        return xp.where(x > 0, g, y + g * a).astype(x.dtype)
    if op == "Celu":
        return xp.where(x > 0, 1.0, y / at.get("alpha", 1.0) + 1).astype(x.dtype)
    if op == "LeakyRelu":
        return xp.where(x > 0, 1.0, at.get("alpha", 0.01)).astype(x.dtype)
    if op in ("Gelu", "BiasGelu"):
        approx = at.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        return _gelu_tanh_grad(xp, x) if approx == "tanh" else _gelu_erf_grad(xp, x)
    if op == "FastGelu":
        return _gelu_tanh_grad(xp, x)
    if op == "QuickGelu":
        a = at.get("alpha", 1.702)
        s = _sigmoid(xp, a * x)
        return s + a * x * s * (1 - s)
    if op == "Softplus":
        return _sigmoid(xp, x)
    if op == "Sqrt":
        return 0.5 / y
    if op == "Reciprocal":
        return -(y * y)
    if op == "Exp":
        return y
    if op == "Log":
        return 1.0 / x
    if op == "Abs":
        return xp.sign(x)
    if op == "Sin":
        return xp.cos(x)
    if op == "Cos":
        return -xp.sin(x)
    if op == "Elu":
        a = at.get("alpha", 1.0)
        return xp.where(x > 0, 1.0, y + a).astype(x.dtype)
    if op == "Softsign":
        return 1.0 / (1 + xp.abs(x)) ** 2
    if op == "HardSigmoid":
        a, b = at.get("alpha", 0.2), at.get("beta", 0.5)
        return xp.where((a * x + b > 0) & (a * x + b < 1), a, 0.0).astype(x.dtype)
    if op == "HardSwish":
        return xp.where(x < -3, 0.0, xp.where(x > 3, 1.0, (2 * x + 3) / 6)).astype(x.dtype)
    if op == "Mish":
        sp = xp.log1p(xp.exp(x))
        t = xp.tanh(sp)
        return t + x * (1 - t * t) * _sigmoid(xp, x)
    raise KeyError(op)


UNARY_OPS = (
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Softplus",
    "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Sin", "Cos", "Elu", "Softsign", "HardSigmoid", "HardSwish", "Mish",
    "Clip", "PRelu", "ThresholdedRelu", "Selu", "Celu",
)


def identity_backward(ctx: OpContext, x: str, y: str, bias: str | None = None):
    """``G_x = G_y * y / (x [+ bias] + eps)``; the ratio is computed once per forward pass."""
    eps = ctx.rule.epsilon
    vx, vy = ctx.value(x), ctx.value(y)
    vb = ctx.value(bias) if bias else None
    key = f"identity-ratio:{y}"

    def ratio(env):
        den = env[vx] + env[vb] if vb else env[vx]
        return env[vy] / (den + eps)

    return lambda env: env.memo(key, lambda: ratio(env))


@register(*UNARY_OPS)
def unary(ctx: OpContext):
    node, xp = ctx.node, ctx.xp
    x, y = ctx.input(0), node.outputs[0]
    has_bias = node.op_type in ("BiasGelu", "FastGelu") and ctx.input(1) is not None
    if not has_bias and any(ctx.carrying(k) for k in range(1, len(node.inputs))):
        raise ctx.fail("only the first input may carry relevance (e.g. Clip bounds must not depend on a source)")
    bias = ctx.input(1) if has_bias else None
    sx = ctx.shape(x)
    if isinstance(ctx.rule, Identity):
        ratio = identity_backward(ctx, x, y, bias)

        def back_identity(env, gy):
            g = gy[0] * ratio(env)
            return _split_bias(xp, env, g, sx, bias, ctx)

        return back_identity
    if not isinstance(ctx.rule, Gradient):
        raise ctx.fail(f"rule {ctx.rule.name} does not apply to a non-linearity")
    vx, vy = ctx.value(x), ctx.value(y)
    vb = ctx.value(bias) if bias else None
    vs = ctx.value(ctx.input(1)) if node.op_type == "PRelu" else None

    def back_grad(env, gy):
        X = env[vx] + env[vb] if vb else env[vx]
        g = gy[0] * _derivative(node, xp, X, env[vy], env[vs] if vs else None)
        return _split_bias(xp, env, g, sx, bias, ctx)

    return back_grad


def _split_bias(xp, env, g, sx, bias, ctx):
    """The gradient at ``x + bias`` goes unchanged to ``x`` and summed over broadcast axes to ``bias``."""
    out = [None] * len(ctx.node.inputs)
    if ctx.carrying(0):
        out[0] = g
    if bias and ctx.carrying(1):
        out[1] = unbroadcast(xp, g, env[bias].shape, len(env.shape(sx)))
    return out


@register("Pow")
def pow_(ctx: OpContext):
    """``x ** e`` with a constant exponent: identity rule, or ``e * x**(e-1)``."""
    if ctx.carrying(1):
        raise ctx.fail("a carrying exponent is not supported")
    x, y = ctx.input(0), ctx.node.outputs[0]
    e = ctx.const(1)
    if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 1.0:
        return lambda env, gy: [gy[0], None]
    if isinstance(ctx.rule, Identity):
        ratio = identity_backward(ctx, x, y)
        return lambda env, gy: [gy[0] * ratio(env), None]
    vx, ve = ctx.value(x), ctx.value(ctx.input(1))

    def back(env, gy):
        X, E = env[vx], env[ve].astype(env[vx].dtype)
        return [gy[0] * (E * X ** (E - 1)), None]

    return back


def region_backward(ctx: OpContext, x: str, y: str):
    """Backward of a multi-op unary region ``y = f(x)`` under the identity rule."""
    ratio = identity_backward(ctx, x, y)
    xp = ctx.xp

    def back(env, gy):
        g = gy[0] * ratio(env)
        xs = env[x].shape
        return [g if g.shape[g.ndim - len(xs):] == xs else unbroadcast(xp, g, xs, len(env[y].shape))]

    return back
