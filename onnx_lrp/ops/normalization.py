"""LayerNormalization, SimplifiedLayerNormalization (RMSNorm), RMSNormalization and their Skip forms.

Identity rule for the normaliser (AttnLRP Prop. 3.4, rule :class:`~onnx_lrp.rules.ConstantStatistic`):
``1/sigma`` is a constant, so LayerNorm ``y = w * (x - mean(x)) / sigma + b`` is linear in ``x`` (mean kept):
``G_x = (1/sigma) * (g - mean(g))`` with ``g = w * G_y``; RMSNorm ``y = w * x / rms``: ``G_x = w * G_y / rms``.
Under :class:`~onnx_lrp.rules.Gradient` the statistic is differentiated too.
Skip forms normalise ``s = input + skip (+ bias)``; ``input`` and ``skip`` both receive ``G_s`` (residual add),
times ``s / stab(s)`` where the composite's rule for a sum is ``Epsilon(eps > 0)`` (as for an unfused ``Add``).
Statistics are recomputed from the captured input, in the compute dtype.
"""
from __future__ import annotations

from ..rules import Constant, ConstantStatistic, Epsilon, Gradient
from ._base import MS, ONNX, OpContext, register, unbroadcast


def _stats(xp, x, axes, eps, rms):
    if rms:
        mean = None
        inv = 1.0 / xp.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
        xc = x
    else:
        mean = x.mean(axis=axes, keepdims=True)
        xc = x - mean
        inv = 1.0 / xp.sqrt((xc * xc).mean(axis=axes, keepdims=True) + eps)
    return xc, inv


def _norm_grad(xp, g, xc, inv, w, axes, rms, detach):
    gw = g * w if w is not None else g
    if detach:
        if rms:
            return gw * inv
        return inv * (gw - gw.mean(axis=axes, keepdims=True))
    xhat = xc * inv
    corr = xhat * (gw * xhat).mean(axis=axes, keepdims=True)
    if rms:
        return inv * (gw - corr)
    return inv * (gw - gw.mean(axis=axes, keepdims=True) - corr)


def _check_rule(ctx: OpContext) -> bool:
    if isinstance(ctx.rule, ConstantStatistic):
        return True
    if isinstance(ctx.rule, Gradient):
        return False
    raise ctx.fail(f"rule {ctx.rule.name} does not apply to a normalisation (use ConstantStatistic or Gradient)")


def _build(ctx: OpContext, x_inputs: list[int], scale_k: int, bias_k: int | None, rms: bool, skip: bool):
    """Shared builder: normalise ``sum(inputs[x_inputs]) (+ inputs[bias_k])`` over ``axis..end``.

    ``bias_k`` is a bias added *before* normalising (Skip forms); a shift after it does not matter here.
    """
    xp = ctx.xp
    detach = _check_rule(ctx)
    for k in range(len(ctx.node.inputs)):
        if k not in x_inputs and ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only the normalised input may")
    eps = float(ctx.attr("epsilon", 1e-5))
    axis = int(ctx.attr("axis", -1))
    w_static = ctx.const(scale_k)
    w = ctx.array(w_static) if w_static is not None else None
    vw = ctx.value(ctx.input(scale_k)) if w is None else None
    xs = [ctx.value(ctx.input(k)) for k in x_inputs if ctx.input(k)]
    vbias = ctx.value(ctx.input(bias_k)) if (bias_k is not None and ctx.input(bias_k)) else None
    carry = [ctx.carrying(k) for k in x_inputs]
    n_in = len(ctx.node.inputs)
    y_sum = ctx.node.outputs[3] if skip and len(ctx.node.outputs) > 3 and ctx.node.outputs[3] else None
    key = f"norm-stats:{ctx.node.name}"
    add_rule = ctx.rule_of("add", "Add") if skip and all(carry) else None
    sum_rule = add_rule if isinstance(add_rule, Epsilon) and add_rule.epsilon else None

    def back(env, gy):
        X = env[xs[0]]
        for name in xs[1:]:
            X = X + env[name]
        if vbias is not None:
            X = X + env[vbias]
        nd = X.ndim
        a = axis if axis >= 0 else axis + nd
        axes = tuple(range(a - nd, 0))
        xc, inv = env.memo(key, lambda: _stats(xp, X, axes, eps, rms))
        W = w if w is not None else env[vw]
        g = None
        if gy[0] is not None:
            g = _norm_grad(xp, gy[0], xc, inv, W, axes, rms, detach)
        if y_sum is not None and len(gy) > 3 and gy[3] is not None:
            g = gy[3] if g is None else g + gy[3]
        if sum_rule is not None:  # eps-LRP on the residual sum s
            g = g * sum_rule.output_scale(X)
        out = [None] * n_in
        for k, c in zip(x_inputs, carry):
            if c:
                out[k] = unbroadcast(xp, g, env[ctx.input(k)].shape, nd)
        return out

    return back


@register("LayerNormalization", kind="norm")
def layer_norm(ctx: OpContext):
    return _build(ctx, [0], 1, None, rms=False, skip=False)


@register("SimplifiedLayerNormalization", kind="norm", domain=(ONNX, MS))
@register("RMSNormalization", kind="norm")
def rms_norm(ctx: OpContext):
    return _build(ctx, [0], 1, None, rms=True, skip=False)


@register("SkipLayerNormalization", kind="norm", domain=MS)
def skip_layer_norm(ctx: OpContext):
    # inputs: input, skip, gamma, beta, bias
    return _build(ctx, [0, 1], 2, 4, rms=False, skip=True)


@register("SkipSimplifiedLayerNormalization", kind="norm", domain=MS)
def skip_rms_norm(ctx: OpContext):
    # inputs: input, skip, gamma, bias
    return _build(ctx, [0, 1], 2, 3, rms=True, skip=True)


@register("InstanceNormalization", "GroupNormalization", kind="norm")
def group_norm(ctx: OpContext):
    """``y = scale_c * (x - mean) / sigma + bias_c`` with statistics per sample over the spatial axes
    (InstanceNormalization) or per group of channels (GroupNormalization, ``num_groups``); channel axis 1.
    Torch's GroupNorm is exported as ``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``.
    Rule (``gw = scale_c * G_y``): ConstantStatistic (AttnLRP) ``G_x = (gw - mean(gw)) / sigma`` (sigma constant,
    the mean subtraction a linear map); Gradient: the full derivative including that of sigma."""
    xp = ctx.xp
    detach = _check_rule(ctx)
    if any(ctx.carrying(k) for k in (1, 2)):
        raise ctx.fail("scale and bias must not carry relevance")
    eps = float(ctx.attr("epsilon", 1e-5))
    groups = int(ctx.attr("num_groups", 0))
    scale = ctx.value(ctx.input(1))
    vx = ctx.value(ctx.input(0))
    key = f"norm-stats:{ctx.node.name}"

    def back(env, gy):
        X, g = env[vx], gy[0]
        lead = g.ndim - X.ndim
        shape = X.shape
        W = env[scale].reshape((-1,) + (1,) * (X.ndim - 2))
        if groups and W.shape[0] == groups and groups != shape[1]:  # opset 18: one scale per group
            W = xp.repeat(W, shape[1] // groups, axis=0)
        gw = g * W
        if groups:  # (N, C, *S) -> (N, G, C/G * prod S)
            X = X.reshape(shape[0], groups, -1)
            gw = gw.reshape(g.shape[:lead] + X.shape)
        axes = tuple(range(2 - X.ndim, 0))
        xc, inv = env.memo(key, lambda: _stats(xp, X, axes, eps, False))
        out = _norm_grad(xp, gw, xc, inv, None, axes, False, detach)
        return [out.reshape(g.shape), None, None]

    return back


@register("BatchNormalization", kind="linear", layer="output", rules=(Epsilon, Gradient, Constant))
def batch_norm(ctx: OpContext):
    """Inference BatchNormalization ``y = scale * (x - mean) / sqrt(var + eps) + B`` with the running statistics:
    an affine map per channel (axis 1), so ``G_x = G_y * scale / sqrt(var + eps)`` under every rule."""
    if int(ctx.attr("training_mode", 0)) or len([o for o in ctx.node.outputs if o]) > 1:
        raise ctx.fail("training-mode BatchNormalization (batch statistics) is not supported")
    if any(ctx.carrying(k) for k in range(1, 5)):
        raise ctx.fail("scale, bias, mean and variance must not carry relevance")
    if not int(ctx.attr("spatial", 1)):
        raise ctx.fail("spatial=0 (per-activation statistics, opset < 9) is not supported")
    eps = float(ctx.attr("epsilon", 1e-5))
    vs, vv = ctx.value(ctx.input(1)), ctx.value(ctx.input(4))
    sx = ctx.shape(ctx.input(0))
    xp = ctx.xp

    def back(env, gy):
        nd = len(env.shape(sx))
        k = (env[vs] / xp.sqrt(env[vv] + eps)).reshape((-1,) + (1,) * (nd - 2))
        return [gy[0] * k, None, None, None, None]

    return back
