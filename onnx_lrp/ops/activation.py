"""Element-wise non-linearities: identity rule (AttnLRP Eq. 9) where it is sound, else their true derivative.

Identity rule, gradient form: ``G_x = G_y * f(x) / (x + eps)`` (LXT: ``eps = 1e-10``), so that
``R_x = x * G_x = R_y``. It is sound only where ``f(0) = 0`` and ``f(x)/x`` stays bounded near 0: such ops are kind
``unary`` (GELU, tanh, ReLU, SiLU written out, ...); the others are kind ``nonlinear`` (sigmoid, hard-sigmoid,
softplus, exp, log, sqrt, ``Clip`` with a bound away from 0, ...) and take the plain gradient under AttnLRP, and as
gates of a product they are held constant (kind ``gate``, :mod:`onnx_lrp._patterns`). The kind of a node is
decided by evaluating the op's function at probe points (:func:`onnx_lrp._patterns.zero_centred`), attributes and
constant operands included, so ``Clip(x, 0, 6)`` is ``unary`` and ``Clip(x, 0.1, 6)`` is not.
The identity rule also applies to *unary regions*: a non-linearity written out as several element-wise ops
(``x * Sigmoid(x)``, Erf-GELU, tanh-GELU), found by graph analysis and handled here as one node from its input
``x`` to its output ``y``. Fused ops with a bias (``BiasGelu``, ``FastGelu`` with bias) apply the rule after the
bias add (their kind is that of the function of ``x + bias``).

Each op also declares its element-wise ``forward`` (numpy, float64), used to evaluate constants and to probe
functions; it is never used to compute the model's forward pass (onnxruntime does).
"""
from __future__ import annotations

import math

import numpy as np

from .._patterns import erf as _erf_exact, function_of_node, scalar
from ..rules import Gradient, Identity
from ._base import MS, ONNX, NodeView, OpContext, register, unbroadcast

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


def _np_sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_PI * (x + 0.044715 * x**3)))


def _attr_str(at: dict, key: str, default: str) -> str:
    v = at.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _clip(ins, at):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min", -np.inf)
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max", np.inf)
    return np.minimum(np.maximum(ins[0], lo), hi)


def _with_bias(ins):
    return ins[0] + ins[1] if len(ins) > 1 and ins[1] is not None else ins[0]


# y = f(x) of each op, numpy float64 (ins: the op's inputs, at: its attributes)
FORWARD = {
    "Erf": lambda ins, at: _erf_exact(ins[0]),
    "Tanh": lambda ins, at: np.tanh(ins[0]),
    "Sigmoid": lambda ins, at: _np_sigmoid(ins[0]),
    "Relu": lambda ins, at: np.maximum(ins[0], 0.0),
    "LeakyRelu": lambda ins, at: np.where(ins[0] > 0, ins[0], at.get("alpha", 0.01) * ins[0]),
    "Elu": lambda ins, at: np.where(ins[0] > 0, ins[0], at.get("alpha", 1.0) * np.expm1(np.minimum(ins[0], 0))),
    "Selu": lambda ins, at: at.get("gamma", 1.05070102214813232421875) * np.where(
        ins[0] > 0, ins[0], at.get("alpha", 1.67326319217681884765625) * np.expm1(np.minimum(ins[0], 0))),
    "Celu": lambda ins, at: np.maximum(ins[0], 0) + np.minimum(
        0, at.get("alpha", 1.0) * np.expm1(np.minimum(ins[0], 0) / at.get("alpha", 1.0))),
    "Gelu": lambda ins, at: (_gelu_tanh(ins[0]) if _attr_str(at, "approximate", "none") == "tanh"
                             else 0.5 * ins[0] * (1.0 + _erf_exact(ins[0] / math.sqrt(2.0)))),
    "BiasGelu": lambda ins, at: (lambda u: 0.5 * u * (1.0 + _erf_exact(u / math.sqrt(2.0))))(_with_bias(ins)),
    "FastGelu": lambda ins, at: _gelu_tanh(_with_bias(ins)),
    "QuickGelu": lambda ins, at: ins[0] * _np_sigmoid(at.get("alpha", 1.702) * ins[0]),
    "Softplus": lambda ins, at: np.logaddexp(0.0, ins[0]),
    "Softsign": lambda ins, at: ins[0] / (1.0 + np.abs(ins[0])),
    "HardSigmoid": lambda ins, at: np.clip(at.get("alpha", 0.2) * ins[0] + at.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda ins, at: ins[0] * np.clip(ins[0] / 6.0 + 0.5, 0.0, 1.0),
    "Mish": lambda ins, at: ins[0] * np.tanh(np.logaddexp(0.0, ins[0])),
    "Sqrt": lambda ins, at: np.sqrt(ins[0]),
    "Reciprocal": lambda ins, at: 1.0 / ins[0],
    "Exp": lambda ins, at: np.exp(ins[0]),
    "Log": lambda ins, at: np.log(ins[0]),
    "Abs": lambda ins, at: np.abs(ins[0]),
    "Sin": lambda ins, at: np.sin(ins[0]),
    "Cos": lambda ins, at: np.cos(ins[0]),
    "Clip": _clip,
    "PRelu": lambda ins, at: np.where(ins[0] > 0, ins[0], ins[1] * ins[0]),
    "ThresholdedRelu": lambda ins, at: np.where(ins[0] > at.get("alpha", 1.0), ins[0], 0.0),
}
UNARY_OPS = tuple(FORWARD)
_MS_OPS = ("BiasGelu", "FastGelu", "QuickGelu")


def unary_kind(view: NodeView) -> str:
    """``unary`` if the op's function of its first input is zero-centred (the identity rule is sound), else
    ``nonlinear``; a fused bias (``BiasGelu``, ``FastGelu``) is left out: the rule applies after it."""
    node = view.node
    if node.op_type in ("BiasGelu", "FastGelu") and len(node.inputs) > 1:
        node = type(node)(node.index, node.op_type, node.name, node.domain, node.inputs[:1], node.outputs,
                          node.attrs)
    return "unary" if function_of_node(view.graph, node, view.live) else "nonlinear"


def identity_backward(ctx: OpContext, x: str, y: str, bias: str | None = None):
    """``G_x = G_y * y / (x [+ bias] + eps)`` (:meth:`Identity.ratio`); computed once per forward pass."""
    rule = ctx.rule
    vx, vy = ctx.value(x), ctx.value(y)
    vb = ctx.value(bias) if bias else None
    key = f"identity-ratio:{y}"

    def ratio(env):
        return rule.ratio(env[vx] + env[vb] if vb else env[vx], env[vy])

    return lambda env: env.memo(key, lambda: ratio(env))


def _declare_unary(fn):
    for op in UNARY_OPS:
        register(op, kind=unary_kind, domain=(MS,) if op in _MS_OPS else ((ONNX, MS) if op == "Gelu" else ONNX),
                 forward=FORWARD[op])(fn)
    return fn


@_declare_unary
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


def _pow_kind(view: NodeView) -> str:
    """``x ** 1`` is linear, a carrying exponent a product; else by its function (``x ** 2``: unary, ``x ** 0.5``:
    nonlinear)."""
    if view.carrying[1:2] == (True,):
        return "product"
    if scalar(view.graph, view.node.inputs[1]) == 1.0:
        return "linear"
    return unary_kind(view)


@register("Pow", kind=_pow_kind, forward=lambda ins, at: np.power(ins[0], ins[1]))
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
