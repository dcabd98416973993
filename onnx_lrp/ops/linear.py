"""MatMul, Gemm, Conv, ConvTranspose, Einsum, FusedMatMul: eps-LRP / gamma-LRP with one carrying operand, uniform rule
with two (Prop. 3.3)."""
from __future__ import annotations

import numpy as np

from .._patterns import following_bias
from ..rules import Constant, ConstantGate, Epsilon, Gamma, Gradient, Uniform
from ._base import MS, NodeView, OpContext, register, unbroadcast


def _two_operand_kind(view: NodeView) -> str:
    """``linear`` with one carrying operand (a layer), ``product`` with two (``Q K^T``, ``A V``)."""
    return "product" if sum(view.carrying[:2]) >= 2 else "linear"


def _einsum_kind(view: NodeView) -> str:
    return "product" if view.n_carrying >= 2 else "linear"


def _swap(a):
    return a.swapaxes(-1, -2)


def matmul_const(xp, g, Wt, matmul=None):
    """``g @ Wt`` for a constant 2-D ``Wt`` (a transposed view is fine: BLAS reads it in place).

    The leading axes of ``g`` are merged into one GEMM (``matmul(a, b)``: the engine's 2-D product,
    :class:`onnx_lrp._kernels.Gemm` on the CPU), and rows of ``g`` that are all zero (positions the explained
    output does not depend on, e.g. all but one after a one-hot start) are skipped: exact, and the lm-head and
    last layers of a causal LM then cost one row instead of one row per token.
    """
    if Wt.ndim != 2 or g.ndim < 2:
        return g @ Wt
    matmul = matmul or (lambda a, b: a @ b)
    g2 = g.reshape(-1, g.shape[-1])
    live = g2.any(axis=1)
    n_live = int(live.sum())
    if n_live * 2 > g2.shape[0]:
        out = matmul(g2, Wt)
    else:
        out = xp.zeros((g2.shape[0], Wt.shape[1]), dtype=xp.result_type(g2.dtype, Wt.dtype))
        rows = xp.flatnonzero(live)
        if n_live:
            out[rows] = matmul(g2[rows], Wt)
    return out.reshape(g.shape[:-1] + (Wt.shape[1],))


def product_weights(ctx: OpContext, operands: list[int]) -> list[float]:
    """Per-operand factor for a product of carrying tensors under the node's rule.

    Uniform: 1/N each (Prop. 3.2/3.3). Gradient: 1. ConstantGate: 0 for the gating factors the analysis found
    (``ctx.gates``: a sigmoid gate; under CP-LRP any factor computed by a non-linearity), 1 for the others; if that
    does not single out a factor, Uniform.
    """
    n = len(operands)
    rule = ctx.rule
    if isinstance(rule, Gradient):
        return [1.0] * n
    if isinstance(rule, ConstantGate):
        gates = [k in ctx.gates for k in operands]
        if 0 < sum(gates) < n:
            return [0.0 if g else 1.0 for g in gates]
        return [Uniform.share(n)] * n
    if isinstance(rule, Uniform):
        return [rule.share(n)] * n
    raise ctx.fail(f"rule {rule.name} does not apply to a product of {n} carrying tensors")


def const_weight_backward(ctx: OpContext, W, bias=None):
    """Backward of ``z = x W`` (``x`` = input 0, ``z`` = output 0, constant ``W``): ``G_x = G_z W^T`` (eps rule,
    gradient form); under :class:`~onnx_lrp.rules.Gamma` ``G_x = (W + gamma W+)^T (G_z * z / stab(z + gamma z+))``
    (``bias``: the constant added to ``z`` after the node, included in ``z`` and ``z+``). Other inputs get None."""
    xp, a, n_in, rule = ctx.xp, ctx.input(0), len(ctx.node.inputs), ctx.rule
    gamma = isinstance(rule, Gamma)
    Wp = ctx.array(rule.positive(W)) if gamma else None
    Wm = rule.weight(W) if gamma else W
    Wt = ctx.array(Wm) if W.ndim == 1 else _swap(ctx.array(Wm))  # a view: no copy of the weight
    sa = ctx.shape(a)
    bias_c = ctx.array(bias) if (gamma and bias is not None) else None
    bias_p = ctx.array(rule.positive(bias)) if bias_c is not None else None
    vx, vz = (ctx.value(a), ctx.value(ctx.node.outputs[0])) if gamma else (None, None)

    def back_const(env, gy):
        g = gy[0]
        if gamma:
            z, zplus = env[vz], env[vx] @ Wp
            if bias_c is not None:
                z, zplus = z + bias_c, zplus + bias_p
            g = g * rule.output_scale(z, zplus)
        if Wt.ndim == 1:
            return [g[..., None] * Wt] + [None] * (n_in - 1)
        in_shape = env.shape(sa)
        gx = matmul_const(xp, g, Wt, env.matmul)
        return [unbroadcast(xp, gx, in_shape, max(len(in_shape), Wt.ndim))] + [None] * (n_in - 1)

    return back_const


@register("MatMul", kind=_two_operand_kind, layer="map")
def matmul(ctx: OpContext):
    a, b = ctx.input(0), ctx.input(1)
    ca, cb = ctx.carrying(0), ctx.carrying(1)
    xp = ctx.xp
    if ca and cb:
        wa, wb = product_weights(ctx, [0, 1])
        va, vb = ctx.value(a), ctx.value(b)

        def back_product(env, gy):
            g = gy[0]
            A, B = env[va], env[vb]
            out_ndim = max(A.ndim, B.ndim)
            if A.ndim == 1 or B.ndim == 1:
                raise ctx.fail("products of 1-D operands are not supported")
            ga = unbroadcast(xp, env.matmul(g, _swap(B), wa), A.shape, out_ndim) if wa else None
            gb = unbroadcast(xp, env.matmul(_swap(A), g, wb), B.shape, out_ndim) if wb else None
            return [ga, gb]

        return back_product
    gamma = isinstance(ctx.rule, Gamma)
    if ca:
        W = ctx.const(1)
        if W is not None:
            return const_weight_backward(ctx, W, following_bias(ctx.graph, ctx.node) if gamma else None)
        if gamma and b in ctx.graph.static:  # a weight computed from constants (e.g. DequantizeLinear)
            raise ctx.fail(f"the gamma rule needs the weight {b!r} as an initializer; it is computed in the graph")
        # a run-time "weight" (a detached attention or dynamic-convolution kernel under CP-LRP) is no layer: the
        # gamma rule, like LXT's, applies to parameters only; the product passes the plain gradient, as below
        vb, sa = ctx.value(b), ctx.shape(a)

        def back_dyn_weight(env, gy):
            g, B = gy[0], env[vb]
            if B.ndim == 1:
                return [g[..., None] * B, None]
            in_shape = env.shape(sa)
            return [unbroadcast(xp, g @ _swap(B), in_shape, max(len(in_shape), B.ndim)), None]

        return back_dyn_weight
    # carrying right operand, constant left operand
    va, sb = ctx.value(a), ctx.shape(b)

    def back_right(env, gy):
        g, A = gy[0], env[va]
        b_shape = env.shape(sb)
        if A.ndim == 1:
            return [None, A[:, None] * g[..., None, :]]
        return [None, unbroadcast(xp, _swap(A) @ g, b_shape, max(A.ndim, len(b_shape)))]

    return back_right


@register("Gemm", kind=_two_operand_kind, layer="output")
def gemm(ctx: OpContext):
    """``Y = alpha * A' B' + beta * C`` with ``A' = A^T`` if transA, ``B' = B^T`` if transB."""
    xp = ctx.xp
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    ca, cb = ctx.carrying(0), ctx.carrying(1)
    cc = ctx.carrying(2)
    a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
    sc = ctx.shape(c) if cc else None
    weights = product_weights(ctx, [0, 1]) if (ca and cb) else [1.0, 1.0]
    rule = ctx.rule
    gamma = isinstance(rule, Gamma) and not (ca and cb)
    if gamma and not (ca and ctx.const(1) is not None):
        raise ctx.fail("the gamma rule needs a constant weight B")
    Bc = ctx.const(1) if (ca and not cb) else None
    Bp = bias_p = None
    if Bc is not None:
        Bprime = Bc.T if tb else Bc
        BpT = ctx.array(Bc) if tb else _swap(ctx.array(Bc))  # (N, K), a view: no copy of the weight
        if gamma:
            Bp = ctx.array(rule.positive(Bprime))
            Cc = ctx.const(2)
            bias_p = ctx.array(rule.positive(Cc) * beta) if Cc is not None else None
            ctx.value(a), ctx.value(ctx.node.outputs[0])
            BpT = _swap(ctx.array(rule.weight(Bprime)))
    va = ctx.value(a) if cb else None
    vb = ctx.value(b) if (ca and Bc is None) else None

    def back(env, gy):
        g = gy[0]
        out = [None, None, None]
        if gamma:
            A = env[a]
            zplus = alpha * ((_swap(A) if ta else A) @ Bp)
            if bias_p is not None:
                zplus = zplus + bias_p
            g = g * rule.output_scale(env[ctx.node.outputs[0]], zplus)
        if ca:
            Bt = BpT if Bc is not None else _swap(_swap(env[vb]) if tb else env[vb])
            ga = matmul_const(xp, g, Bt, env.matmul) if Bc is not None else g @ Bt
            if alpha * weights[0] != 1.0:
                ga = ga * (alpha * weights[0])
            out[0] = _swap(ga) if ta else ga
        if cb:
            A = env[va]
            Ap = _swap(A) if ta else A
            gb = (_swap(Ap) @ g) * (alpha * weights[1])
            out[1] = _swap(gb) if tb else gb
        if cc:
            out[2] = unbroadcast(xp, g * beta, env.shape(sc), 2)
        return out

    return back


def _conv_kernels(ctx: OpContext):
    """(spatial rank, ``kernels(env) -> (W', W+)``, ``b+``) of a Conv/ConvTranspose node under its rule: ``W' = W +
    gamma W+`` under Gamma, else ``W``. The kernel is a constant, or computed from tensors that carry no relevance
    (weight normalisation, a dequantised int8 kernel) and read at run time."""
    op, rule = ctx.node.op_type, ctx.rule
    if ctx.carrying(1):
        raise ctx.fail(f"{op} with a carrying kernel is not supported")
    W = ctx.const(1)
    vw = None
    if W is None:
        if ctx.attr("kernel_shape") is None:
            raise ctx.fail(f"{op} with a computed kernel needs the kernel_shape attribute")
        vw = ctx.value(ctx.input(1))
    nd = W.ndim - 2 if W is not None else len(ctx.attr("kernel_shape"))
    gamma = isinstance(rule, Gamma)
    Bc = ctx.const(2)
    if gamma and Bc is None and ctx.input(2) is not None:
        raise ctx.fail(f"the gamma rule needs the {op} bias as an initializer")
    bias_p = ctx.array(rule.positive(Bc)) if (gamma and Bc is not None) else None
    fixed = None
    if W is not None:
        fixed = (ctx.array(rule.weight(W)) if gamma else ctx.array(W), ctx.array(rule.positive(W)) if gamma else None)

    def kernels(env):
        if fixed is not None:
            return fixed
        Wr = env[vw]
        return (rule.weight(Wr), rule.positive(Wr)) if gamma else (Wr, None)

    if gamma:
        ctx.value(ctx.input(0)), ctx.value(ctx.node.outputs[0])
    return nd, kernels, bias_p


def _gamma_scale(ctx: OpContext, g, z, zplus, bias_p):
    """``G_z * z / stab(z + gamma (z+ + b+))`` (the gamma rule on a convolution, ``z+`` from the positive kernel)."""
    if bias_p is not None:
        zplus = zplus + bias_p.reshape((-1,) + (1,) * (zplus.ndim - 2))
    return g * ctx.rule.output_scale(z, zplus)


def conv_geometry(ctx: OpContext, nd: int) -> tuple[int, list[int], list[int], list[int]]:
    """(group, strides, dilations, pads) of a Conv-like node with ``nd`` spatial axes (auto_pad SAME_* refused)."""
    if ctx.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ctx.fail(f"{ctx.node.op_type} with auto_pad SAME_* is not supported")
    return (int(ctx.attr("group", 1)), list(ctx.attr("strides", [1] * nd)), list(ctx.attr("dilations", [1] * nd)),
            list(ctx.attr("pads", [0] * (2 * nd))))


@register("Conv", kind="linear", layer="output")
def conv(ctx: OpContext):
    """Conv with a constant kernel (ViT patch embedding and others): the transposed convolution of ``G``.

    Gamma rule: ``G_x = conv^T(G_z * z / stab(z + gamma * conv(x, W+)), W + gamma W+)``.
    """
    xp = ctx.xp
    nd, kernels, bias_p = _conv_kernels(ctx)
    group, strides, dil, pads = conv_geometry(ctx, nd)
    gamma = isinstance(ctx.rule, Gamma)
    x_name, z_name = ctx.input(0), ctx.node.outputs[0]
    sx = ctx.shape(x_name)

    def back(env, gy):
        g = gy[0]
        Wc, Wpos = kernels(env)
        if gamma:
            g = _gamma_scale(ctx, g, env[z_name], _conv_forward(xp, env[x_name], Wpos, strides, dil, pads, group), bias_p)
        return [conv_input_grad(xp, g, Wc, env.shape(sx), strides, dil, pads, group), None, None]

    return back


@register("ConvTranspose", kind="linear", layer="output")
def conv_transpose(ctx: OpContext):
    """ConvTranspose with a constant kernel ``W`` of shape ``(C_in, C_out / group, *k)``: a linear map whose VJP
    is the convolution of ``G`` with the same kernel (strides, dilations and groups as the node; the padding at the
    start of each axis as onnxruntime derives it from ``pads``, ``auto_pad``, ``output_shape``).

    Gamma rule as for Conv: ``G_x = conv(G_z * z / stab(z + gamma * convT(x, W+)), W + gamma W+)``.
    """
    xp = ctx.xp
    nd, kernels, bias_p = _conv_kernels(ctx)
    gamma = isinstance(ctx.rule, Gamma)
    group = int(ctx.attr("group", 1))
    strides = list(ctx.attr("strides", [1] * nd))
    dil = list(ctx.attr("dilations", [1] * nd))
    adj = list(ctx.attr("output_padding", [0] * nd))
    auto = ctx.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto!r} is not defined")
    shaped = bool(ctx.attr("output_shape"))
    explicit = auto == "NOTSET" and not shaped
    begin_attr = list(ctx.attr("pads", [0] * (2 * nd)))[:nd]
    x_name, z_name = ctx.input(0), ctx.node.outputs[0]
    sx, sz = ctx.shape(x_name), ctx.shape(z_name)

    def pads_of(x_shape, z_shape, k_shape):
        """(begin, end) pads of the equivalent convolution ``z -> x``. Derived from the total padding (the spec's
        rules, as onnxruntime 1.32 applies them): an odd total puts the extra entry at the end for SAME_UPPER, at
        the start for SAME_LOWER and for an ``output_shape`` without auto_pad."""
        begin, end = [], []
        for i in range(nd):
            X, Z, k = x_shape[2 + i], z_shape[2 + i], k_shape[2 + i]
            span = (X - 1) * strides[i] + adj[i] + (k - 1) * dil[i] + 1
            total = max(0, span - Z)
            b = begin_attr[i] if explicit else 0 if auto == "VALID" and not shaped else (
                total // 2 if auto == "SAME_UPPER" else total - total // 2)
            begin.append(b)
            end.append(max(0, (X - 1) * strides[i] + (k - 1) * dil[i] + 1 - Z - b))  # enough for X outputs
        return begin + end

    def back(env, gy):
        g = gy[0]
        x_shape, z_shape = tuple(env.shape(sx)), tuple(env.shape(sz))
        Wc, Wpos = kernels(env)
        pads = pads_of(x_shape, z_shape, Wc.shape)
        if gamma:
            g = _gamma_scale(ctx, g, env[z_name],
                             conv_input_grad(xp, env[x_name], Wpos, z_shape, strides, dil, pads, group), bias_p)
        lead = g.shape[: g.ndim - (nd + 2)]
        gx = _conv_forward(xp, g.reshape((-1,) + g.shape[len(lead) + 1:]), Wc, strides, dil, pads, group)
        gx = gx[(slice(None), slice(None)) + tuple(slice(0, x_shape[2 + i]) for i in range(nd))]
        return [gx.reshape(lead + x_shape), None, None]

    return back


def _kernel_offsets(kshape):
    return np.ndindex(*kshape)


def _conv_forward(xp, x, W, strides, dil, pads, group):
    """Plain N-d convolution (used only by the gamma rule) as a sum over kernel offsets."""
    nd = W.ndim - 2
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xpad = xp.pad(x, pad_width)
    out_sp = [
        (xpad.shape[2 + i] - dil[i] * (W.shape[2 + i] - 1) - 1) // strides[i] + 1 for i in range(nd)
    ]
    cout, cin_g = W.shape[0], W.shape[1]
    cout_g = cout // group
    out = xp.zeros((x.shape[0], cout, *out_sp), dtype=x.dtype)
    for off in _kernel_offsets(W.shape[2:]):
        sl = tuple(
            slice(off[i] * dil[i], off[i] * dil[i] + strides[i] * (out_sp[i] - 1) + 1, strides[i]) for i in range(nd)
        )
        patch = xpad[(slice(None), slice(None)) + sl]  # (B, Cin, *out)
        for gi in range(group):
            w = W[gi * cout_g : (gi + 1) * cout_g, :, *off]  # (cout_g, cin_g)
            p = patch[:, gi * cin_g : (gi + 1) * cin_g]
            out[:, gi * cout_g : (gi + 1) * cout_g] += xp.einsum("oc,bc...->bo...", w, p)
    return out


def conv_input_grad(xp, g, W, x_shape, strides, dil, pads, group):
    """Gradient of a convolution with respect to its input (leading target axes allowed): the transposed
    convolution of ``g`` with ``W``, cropped to ``x_shape``."""
    nd = W.ndim - 2
    lead = g.shape[: g.ndim - (nd + 2)]
    g2 = g.reshape((-1,) + g.shape[len(lead) + 1 :]) if lead else g  # merge target axes into batch
    B = g2.shape[0]
    padded = [x_shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd)]
    gx = xp.zeros((B, x_shape[1], *padded), dtype=g.dtype)
    out_sp = g2.shape[2:]
    cout, cin_g = W.shape[0], W.shape[1]
    cout_g = cout // group
    for off in _kernel_offsets(W.shape[2:]):
        sl = tuple(
            slice(off[i] * dil[i], off[i] * dil[i] + strides[i] * (out_sp[i] - 1) + 1, strides[i]) for i in range(nd)
        )
        for gi in range(group):
            w = W[gi * cout_g : (gi + 1) * cout_g, :, *off]  # (cout_g, cin_g)
            gg = g2[:, gi * cout_g : (gi + 1) * cout_g]
            gx[(slice(None), slice(gi * cin_g, (gi + 1) * cin_g)) + sl] += xp.einsum("oc,bo...->bc...", w, gg)
    crop = tuple(slice(pads[i], pads[i] + x_shape[2 + i]) for i in range(nd))
    gx = gx[(slice(None), slice(None)) + crop]
    return gx.reshape(lead + tuple(x_shape)) if lead else gx



@register("FusedMatMul", kind=_two_operand_kind, domain=MS, layer="map")
def fused_matmul(ctx: OpContext):
    """com.microsoft ``FusedMatMul`` (onnxruntime's optimizer: a MatMul with a transpose and a scale folded in):
    ``Y = alpha A' B'`` with ``A' = A^T`` if transA, ``B' = B^T`` if transB (last two axes). The MatMul rules:
    one carrying operand takes the plain VJP (eps-LRP through the engine), two the product rule."""
    xp = ctx.xp
    if int(ctx.attr("transBatchA", 0)) or int(ctx.attr("transBatchB", 0)):
        raise ctx.fail("transBatchA/transBatchB are not supported")
    if isinstance(ctx.rule, Gamma):
        raise ctx.fail("the gamma rule on FusedMatMul is not supported")
    alpha, ta, tb = float(ctx.attr("alpha", 1.0)), int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    carry = [ctx.carrying(0), ctx.carrying(1)]
    weights = product_weights(ctx, [0, 1]) if all(carry) else [1.0, 1.0]
    operands = []
    for k in (0, 1):
        c = ctx.const(k)
        operands.append(ctx.array(c) if c is not None else ctx.value(ctx.input(k)))

    def value(env, k):
        v = operands[k]
        return env[v] if isinstance(v, str) else v

    def back(env, gy):
        g = gy[0] * alpha
        A, B = value(env, 0), value(env, 1)
        Ap, Bp = (_swap(A) if ta else A), (_swap(B) if tb else B)
        out_ndim = max(A.ndim, B.ndim)
        out = [None, None]
        if carry[0] and weights[0]:
            ga = g @ _swap(Bp)
            out[0] = unbroadcast(xp, _swap(ga) if ta else ga, A.shape, out_ndim) * weights[0]
        if carry[1] and weights[1]:
            gb = _swap(Ap) @ g
            out[1] = unbroadcast(xp, _swap(gb) if tb else gb, B.shape, out_ndim) * weights[1]
        return out

    return back


@register("Einsum", kind=_einsum_kind, layer="map", rules=(Epsilon, Gradient, Uniform, ConstantGate, Constant))
def einsum(ctx: OpContext):
    """Einsum: linear in each operand. One carrying operand: plain VJP (eps-LRP, eps=0); several: the uniform
    rule (each gets its gradient / N). Leading target axes ride along as an extra index of ``G``; an ellipsis
    is spelled out with spare letters once the operand ranks are known."""
    eq = ctx.attr("equation")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    lhs, out_spec = eq.split("->") if "->" in eq else (eq, None)
    specs = lhs.split(",")
    if out_spec is None:
        raise ctx.fail(f"Einsum {eq!r}: implicit output is not supported")
    if any(len(set(s.replace("...", ""))) != len(s.replace("...", "")) for s in specs):
        raise ctx.fail(f"Einsum {eq!r}: repeated indices within an operand (diagonals) are not supported")
    carry = [ctx.carrying(k) for k in range(len(specs))]
    n = sum(carry)
    weights = product_weights(ctx, [k for k in range(len(specs)) if carry[k]]) if n > 1 else [1.0]
    weight_of = dict(zip([k for k in range(len(specs)) if carry[k]], weights))
    names = [ctx.value(i) if not carry[k] or n > 1 else None for k, i in enumerate(ctx.node.inputs)]
    shapes = [ctx.shape(i) for i in ctx.node.inputs]
    free = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    spare = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq and c != free]
    xp = ctx.xp

    def spelled(ranks: list[int]) -> tuple[list[str], str]:
        """``specs``/``out_spec`` with each ``...`` replaced by letters (right-aligned, as broadcasting)."""
        if "..." not in eq:
            return specs, out_spec
        ell = {k: ranks[k] - (len(s) - 3) for k, s in enumerate(specs) if "..." in s}
        letters = "".join(spare[: max(ell.values())])
        sp = [s.replace("...", letters[len(letters) - ell[k]:]) if k in ell else s for k, s in enumerate(specs)]
        return sp, out_spec.replace("...", letters)

    def back(env, gy):
        g = gy[0]
        lead = free if env.lead else ""
        sp, osp = spelled([len(env.shape(s)) for s in shapes])
        out = [None] * len(sp)
        for k, spec in enumerate(sp):
            if not carry[k] or not weight_of.get(k):
                continue
            others = [j for j in range(len(sp)) if j != k]
            seen = set(osp) | {c for j in others for c in sp[j]}
            kept = "".join(c for c in spec if c in seen)
            sub = ",".join([lead + osp] + [sp[j] for j in others]) + "->" + lead + kept
            r = xp.einsum(sub, g, *[env[names[j]] for j in others])
            shape = env.shape(shapes[k])
            if kept != spec:  # indices summed inside this operand alone: the gradient is constant along them
                full = [shape[spec.index(c)] for c in spec]
                r = r.reshape(r.shape[: len(lead)] + tuple(shape[spec.index(c)] if c in kept else 1 for c in spec))
                r = xp.broadcast_to(r, r.shape[: len(lead)] + tuple(full))
            r = unbroadcast(xp, r, tuple(shape), len(shape))  # '...' axes of size 1 broadcast against the others
            out[k] = r * weight_of[k] if weight_of[k] != 1.0 else r
        return out

    return back
