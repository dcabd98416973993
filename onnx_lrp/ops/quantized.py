"""Quantised linear layers: relevance flows through the *dequantised* linear map.

A layer computing ``y = x W (+ b)`` with an integer weight ``q`` and ``W = (q - zp) * scale`` is explained as the
float layer of ``W``, dequantised once when the plan is compiled: the composite's linear rule on it (``Epsilon``:
eps-LRP with ``z`` the layer's float result, bias included; gamma is refused). Activation quantisation is
transparent (:mod:`onnx_lrp.ops.qdq`: an integer activation carries ``G_q = s G_x``), so an integer matrix product
of quantised activations by quantised weights is the float product of the dequantised activation by the dequantised
weight. In integer units (``A`` the integer input with scale ``a_s``, ``G_Y`` at the output):

- ``MatMulInteger(A, B, a_zp, b_zp)`` (``Y`` int32): ``G_A = G_Y (B - b_zp)^T``; ``ConvInteger`` likewise with the
  transposed convolution (``quantize_dynamic``: ``Cast`` and ``Mul`` by ``a_s * b_s`` follow, plain rules);
- ``MatMulIntegerToFloat(A, B, a_s, b_s, ...)``, ``DynamicQuantizeMatMul(A_float, B, b_s, ...)``,
  ``QGemm``, ``QLinearMatMul``, ``QLinearConv`` (float or requantised outputs, onnxruntime's fused and QOperator
  forms): ``G_A = a_s (G_Y / y_s) W^T`` (``y_s = 1`` for a float output, ``a_s = 1`` for a float input);
  ``QLinearMatMul`` of two carrying operands: the composite's product rule on the dequantised operands;
- ``QAttention``: :func:`~onnx_lrp.ops.fused.attention_backward` with the dequantised qkv weight;
- ``MatMulNBits`` (com.microsoft, int4/int8 weights of onnxruntime-genai and ``MatMulNBitsQuantizer``):
  ``Y = A W^T (+ bias)`` with ``W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b]``, ``b = k // block_size``; ``q`` is
  packed in ``B`` (``(N, blocks, block_size * bits / 8)`` bytes, low bits first); ``zp`` is absent
  (``2^(bits-1)``), packed the same way per row, or a float per block. Refused: ``g_idx`` (act-order).

Weights must be constants; onnxruntime may compute the forward with quantised activations (``accuracy_level``,
dynamic quantisation); relevance uses the captured forward values and the dequantised weights.
"""
from __future__ import annotations

import numpy as np

from .._graph import dequantize_linear
from .._patterns import following_bias
from ..rules import Constant, ConstantGate, Epsilon, Gamma, Gradient, Uniform
from ._base import MS, ONNX, NodeView, OpContext, register, unbroadcast
from .fused import attention_backward
from .linear import const_weight_backward, conv_geometry, conv_input_grad, product_weights


def _unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` unsigned ``bits``-bit values packed low-bits-first along the last axis of bytes."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (data[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(data.shape[:-1] + (-1,))[..., :count]


def dequantize_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int,
                     bits: int, block_size: int) -> np.ndarray:
    """The float32 ``(N, K)`` weight of a ``MatMulNBits`` node (see the module docstring); ``q - zp`` is exact in
    float32, so each weight is rounded once, as in onnxruntime's kernel."""
    blocks = -(-K // block_size)
    f = np.float32
    q = _unpack(B.reshape(N, blocks, -1), bits, block_size).astype(f)  # (N, blocks, block_size)
    s = scales.reshape(N, blocks).astype(f)
    if zero_points is None:
        zp = np.full((N, blocks), 1 << (bits - 1), dtype=f)
    elif zero_points.dtype == np.uint8:
        zp = _unpack(zero_points.reshape(N, -1), bits, blocks).astype(f)
    else:
        zp = zero_points.reshape(N, blocks).astype(f)
    q -= zp[..., None]
    q *= s[..., None]
    return q.reshape(N, blocks * block_size)[:, :K]


@register("MatMulNBits", kind="linear", domain=MS, layer="map")
def matmul_nbits(ctx: OpContext):
    for k in range(1, len(ctx.node.inputs)):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only A may")
    if ctx.input(4) is not None:
        raise ctx.fail("g_idx (act-order quantisation) is not supported")
    B, scales = ctx.const(1), ctx.const(2)
    zp = ctx.const(3) if ctx.input(3) else None
    if B is None or scales is None or (ctx.input(3) and zp is None):
        raise ctx.fail("the quantised weight, scales and zero points must be constants")
    K, N = int(ctx.attr("K")), int(ctx.attr("N"))
    bits, block = int(ctx.attr("bits", 4)), int(ctx.attr("block_size"))
    if bits not in (2, 4, 8):
        raise ctx.fail(f"bits={bits} is not supported (2, 4 or 8)")
    W = dequantize_nbits(np.asarray(B), np.asarray(scales), None if zp is None else np.asarray(zp), K, N, bits, block)
    gamma = isinstance(ctx.rule, Gamma)
    if gamma and ctx.input(5):
        raise ctx.fail("the gamma rule with MatMulNBits' own bias input is not supported")
    return const_weight_backward(ctx, W.T, following_bias(ctx.graph, ctx.node) if gamma else None)  # (K, N) view


# ---------------------------------------------------------------------------------------------- integer layers


def _integer_matmul_kind(view: NodeView) -> str:
    """``linear`` with a weight, ``product`` when both operands carry (QLinearMatMul's are inputs 0 and 3)."""
    second = 3 if view.node.op_type == "QLinearMatMul" else 1
    c = view.carrying
    return "product" if c[0] and len(c) > second and c[second] else "linear"


# the rules integer layers implement (eps-LRP at their float result, products; no gamma: their float input is
# not in the graph)
_RULES = (Epsilon, Gradient, Constant, Uniform, ConstantGate)
def _epsilon(ctx: OpContext) -> float:
    """The eps of the node's linear rule (0 for Gradient); gamma and other rules are refused."""
    rule = ctx.rule
    if isinstance(rule, Epsilon):
        return rule.epsilon
    if isinstance(rule, Gradient):
        return 0.0
    if isinstance(rule, Gamma):
        raise ctx.fail("the gamma rule on an integer layer is not supported (its float input is not at hand)")
    raise ctx.fail(f"rule {rule.name} does not apply to a linear layer")


def _is_scale(ctx: OpContext, t: str, depth: int = 0) -> bool:
    """Whether ``t`` is a quantisation scale: a constant, ``DynamicQuantizeLinear``'s scale, or a product/reshape
    of those."""
    g = ctx.graph
    if t in g.static:
        return True
    p = g.producer.get(t)
    if p is None or depth > 4:
        return False
    if p.op_type == "DynamicQuantizeLinear":
        return t == p.outputs[1]
    return p.op_type in ("Mul", "Cast", "Reshape", "Unsqueeze") and all(
        _is_scale(ctx, i, depth + 1) for i in p.inputs if i)


def _dequantize_output(ctx: OpContext, ks: int, kz: int):
    """``z(env, y) = (y - zp) * s`` of a requantised output with scale input ``ks``, zero point ``kz``."""
    names = [ctx.value(ctx.input(k)) if ctx.input(k) else None for k in (ks, kz)]

    def z(env, y):
        y = y.astype(env.dtype)
        return (y - env[names[1]].astype(env.dtype) if names[1] else y) * env[names[0]]

    return z


def _with_epsilon(ctx: OpContext, back, z_of):
    """``back`` with eps-LRP at the layer's float result: ``G`` at the output scaled by ``z / stab(z)``.
    ``z_of(env) -> z`` (None: there is no eps)."""
    if not _epsilon(ctx):
        return back
    rule = ctx.rule

    def back_eps(env, gy):
        return back(env, [gy[0] * rule.output_scale(z_of(env))] + list(gy[1:]))

    return back_eps


def _float_result(ctx: OpContext, own_bias: int | None = None, scale: int | None = None, zero: int | None = None):
    """``z_of(env)``: the float result ``z`` of the layer the node computes (for eps-LRP), with its bias.

    A float output is ``z`` (plus the bias a following ``Add`` holds, unless input ``own_bias`` is the bias); a
    requantised output (scale input ``scale``, zero point ``zero``) is dequantised; an int32 output
    (``MatMulInteger``, ``ConvInteger``) is followed through its ``Cast`` and ``Mul`` by the scales."""
    graph, node = ctx.graph, ctx.node
    if _epsilon(ctx) == 0:
        return None
    if scale is not None and ctx.input(scale):
        vy, deq = ctx.value(node.outputs[0]), _dequantize_output(ctx, scale, zero)
        return lambda env: deq(env, env[vy])
    last = node  # the node whose output is z
    if node.op_type in ("MatMulInteger", "ConvInteger"):
        steps = 0
        while steps < 2:
            t = last.outputs[0]
            cons = graph.consumers.get(t, [])
            c = cons[0] if len(cons) == 1 and t not in graph.output_names else None
            if c is None or not (c.op_type == "Cast" or c.op_type == "Mul" and all(
                    i == t or _is_scale(ctx, i) for i in c.inputs)):
                break
            last, steps = c, steps + 1
        if steps < 2:
            raise ctx.fail("eps-LRP needs the layer's float result: expected a Cast and a Mul by the scales after "
                           f"{node.op_type}, found {[c.op_type for c in graph.consumers.get(last.outputs[0], [])]}")
    t = last.outputs[0]
    bias = None if own_bias is not None and ctx.input(own_bias) else following_bias(graph, last)
    vt, b = ctx.value(t), (ctx.array(bias) if bias is not None else None)
    return lambda env: env[vt] + b if b is not None else env[vt]


def _const(ctx: OpContext, k: int, what: str) -> np.ndarray | None:
    if ctx.carrying(k):
        raise ctx.fail(f"input {k} ({what}, {ctx.input(k)!r}) carries relevance")
    if not ctx.input(k):
        return None
    v = ctx.const(k)
    if v is None:
        raise ctx.fail(f"input {k} ({what}, {ctx.input(k)!r}) must be a constant")
    return v


def _only_input_carries(ctx: OpContext, k0: int = 0) -> None:
    for k in range(len(ctx.node.inputs)):
        if k != k0 and ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only input {k0} may")


def _scaled(back, scale_of):
    """``back`` with the gradient of input 0 multiplied by ``scale_of(env)`` (an input scale; None: 1)."""
    if scale_of is None:
        return back

    def out(env, gy):
        gx = back(env, gy)
        return [gx[0] * scale_of(env)] + gx[1:]

    return out


def _value_of(ctx: OpContext, k: int):
    """``f(env)``: the run-time value of input ``k`` (a scale), or None when the input is absent."""
    if not ctx.input(k):
        return None
    c = ctx.const(k)
    if c is not None:
        arr = ctx.array(c.astype(np.float32))
        return lambda env: arr
    name = ctx.value(ctx.input(k))
    return lambda env: env[name].astype(env.dtype)


def _integer_product(ctx: OpContext, zero_points: tuple[int, int], scales: tuple[int, int] | None):
    """A carrying right operand (attention's ``Q K^T`` and ``P V`` quantised too, as optimum's presets do; ``P``
    a constant under CP-LRP): the product rule on the dequantised operands, ``w = 1`` for a single carrying one.
    In integer units, ``G_A = w_A c G_Y (B - b_zp)^T``, ``G_B = w_B c (A - a_zp)^T G_Y`` with ``c = a_s b_s`` for a
    float output (``scales``), else 1."""
    xp = ctx.xp
    carry = [k for k in (0, 1) if ctx.carrying(k)]
    wa, wb = product_weights(ctx, [0, 1]) if len(carry) == 2 else [1.0 if k in carry else 0.0 for k in (0, 1)]
    va, vb = ctx.value(ctx.input(0)), ctx.value(ctx.input(1))
    zeros = [_value_of(ctx, k) for k in zero_points]
    factors = [_value_of(ctx, k) for k in scales] if scales else []

    def centred(env, v, zero):
        x = env[v].astype(env.dtype)
        return x - zero(env) if zero is not None else x

    def back(env, gy):
        A, B = centred(env, va, zeros[0]), centred(env, vb, zeros[1])
        g = gy[0]
        for f in factors:
            g = g * f(env)
        out_ndim = max(A.ndim, B.ndim)
        out = [None] * len(ctx.node.inputs)
        if wa:
            out[0] = unbroadcast(xp, g @ B.swapaxes(-1, -2), A.shape, out_ndim) * wa
        if wb:
            out[1] = unbroadcast(xp, A.swapaxes(-1, -2) @ g, B.shape, out_ndim) * wb
        return out

    if len(carry) == 2:
        return back
    own_bias = 6 if ctx.node.op_type == "MatMulIntegerToFloat" else None
    return _with_epsilon(ctx, back, _float_result(ctx, own_bias=own_bias))  # a linear map of the carrying one


@register("MatMulInteger", kind=_integer_matmul_kind, rules=_RULES)
def matmul_integer(ctx: OpContext):
    """``G_A = G_Y (B - b_zp)^T`` (int32 output; the scales are applied after it)."""
    if ctx.carrying(1):
        return _integer_product(ctx, (2, 3), None)
    _only_input_carries(ctx)
    B = _const(ctx, 1, "B")
    W = dequantize_linear(B, np.float32(1), _const(ctx, 3, "b_zero_point"), axis=-1)
    return _with_epsilon(ctx, const_weight_backward(ctx, W), _float_result(ctx))


@register("MatMulIntegerToFloat", kind=_integer_matmul_kind, domain=MS, rules=_RULES)
def matmul_integer_to_float(ctx: OpContext):
    """``G_A = a_s G_Y W^T``, ``W = (B - b_zp) b_s``."""
    if ctx.carrying(1):
        return _integer_product(ctx, (4, 5), (2, 3))
    _only_input_carries(ctx)
    W = dequantize_linear(_const(ctx, 1, "B"), _const(ctx, 3, "b_scale"), _const(ctx, 5, "b_zero_point"), axis=-1)
    back = _scaled(const_weight_backward(ctx, W), _value_of(ctx, 2))
    return _with_epsilon(ctx, back, _float_result(ctx, own_bias=6))


@register("DynamicQuantizeMatMul", kind="linear", domain=MS, rules=_RULES)
def dynamic_quantize_matmul(ctx: OpContext):
    """Float ``A`` quantised inside: ``G_A = G_Y W^T``, ``W = (B - b_zp) b_s``."""
    _only_input_carries(ctx)
    W = dequantize_linear(_const(ctx, 1, "B"), _const(ctx, 2, "b_scale"), _const(ctx, 3, "b_zero_point"), axis=-1)
    return _with_epsilon(ctx, const_weight_backward(ctx, W), _float_result(ctx, own_bias=4))


def _requantised(back, ctx: OpContext, k_scale: int):
    """``back`` fed ``G_Y / y_s`` for a requantised output with scale input ``k_scale`` (absent: float output)."""
    y_scale = _value_of(ctx, k_scale)
    if y_scale is None:
        return back
    return lambda env, gy: back(env, [gy[0] / y_scale(env)] + list(gy[1:]))


@register("QLinearMatMul", kind=_integer_matmul_kind, rules=_RULES)
def qlinear_matmul(ctx: OpContext):
    """``(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp)``: ``G_a = a_s (G_y / y_s) B^T``; two carrying operands: the
    product rule on the dequantised operands, ``G_a = w_a a_s (G_y / y_s) B^T``, ``G_b = w_b b_s A^T (G_y / y_s)``."""
    xp = ctx.xp
    for k in (1, 2, 4, 5, 6, 7):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}, a scale or zero point) carries relevance")
    a_scale = _value_of(ctx, 1)
    if ctx.carrying(0) and ctx.carrying(3):
        wa, wb = product_weights(ctx, [0, 3])
        b_scale = _value_of(ctx, 4)
        deq_a, deq_b = _dequantize_output(ctx, 1, 2), _dequantize_output(ctx, 4, 5)
        va, vb = ctx.value(ctx.input(0)), ctx.value(ctx.input(3))

        def back_product(env, gy):
            A, B = deq_a(env, env[va]), deq_b(env, env[vb])
            if A.ndim < 2 or B.ndim < 2:
                raise ctx.fail("products of 1-D operands are not supported")
            g = gy[0]
            out_ndim = max(A.ndim, B.ndim)
            ga = unbroadcast(xp, g @ B.swapaxes(-1, -2), A.shape, out_ndim) * (wa * a_scale(env)) if wa else None
            gb = unbroadcast(xp, A.swapaxes(-1, -2) @ g, B.shape, out_ndim) * (wb * b_scale(env)) if wb else None
            return [ga, None, None, gb, None, None, None, None]

        return _requantised(back_product, ctx, 6)
    if not ctx.carrying(0):
        raise ctx.fail("only the first operand (a) may carry relevance when b is a weight")
    W = dequantize_linear(_const(ctx, 3, "b"), _const(ctx, 4, "b_scale"), _const(ctx, 5, "b_zero_point"), axis=-1)
    back = _requantised(_scaled(const_weight_backward(ctx, W), a_scale), ctx, 6)
    return _with_epsilon(ctx, back, _float_result(ctx, scale=6, zero=7))


@register("QGemm", kind="linear", domain=MS, rules=_RULES)
def qgemm(ctx: OpContext):
    """``(A, a_s, a_zp, B, b_s, b_zp, C, y_s, y_zp)``, ``Y = alpha A' B' + C``: ``G_A' = alpha a_s G_Y' B'^T`` with
    ``G_Y' = G_Y / y_s`` for a requantised output."""
    _only_input_carries(ctx)
    ta, tb, alpha = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0)), float(ctx.attr("alpha", 1.0))
    W = dequantize_linear(_const(ctx, 3, "B"), _const(ctx, 4, "b_scale"), _const(ctx, 5, "b_zero_point"),
                          axis=0 if tb else 1)
    Wt = ctx.array(np.ascontiguousarray((W.T if tb else W).T))  # B'^T, (N, K)
    a_scale = _value_of(ctx, 1)

    def back(env, gy):
        ga = (gy[0] @ Wt) * (alpha * a_scale(env))
        return [ga.swapaxes(-1, -2) if ta else ga] + [None] * (len(ctx.node.inputs) - 1)

    back = _requantised(back, ctx, 7)
    return _with_epsilon(ctx, back, _float_result(ctx, own_bias=6, scale=7, zero=8))


def _conv_integer(ctx: OpContext, W: np.ndarray, k_out_scale: int | None, x_scale):
    """``G_x = x_s conv^T(G_y', W)`` for an integer convolution with the (dequantised) kernel ``W``."""
    xp = ctx.xp
    if int(ctx.attr("channels_last", 0)):
        raise ctx.fail("channels_last=1 is not supported")
    group, strides, dil, pads = conv_geometry(ctx, W.ndim - 2)
    Wc, sx = ctx.array(W), ctx.shape(ctx.input(0))

    def back(env, gy):
        g = conv_input_grad(xp, gy[0], Wc, env.shape(sx), strides, dil, pads, group)
        return [g] + [None] * (len(ctx.node.inputs) - 1)

    back = _scaled(back, x_scale)
    return _requantised(back, ctx, k_out_scale) if k_out_scale is not None else back


@register("ConvInteger", kind="linear", rules=_RULES)
def conv_integer(ctx: OpContext):
    """``(x, w, x_zp, w_zp)``: ``G_x = conv^T(G_y, w - w_zp)`` (int32 output; scales applied after it)."""
    _only_input_carries(ctx)
    W = dequantize_linear(_const(ctx, 1, "w"), np.float32(1), _const(ctx, 3, "w_zero_point"), axis=0)
    return _with_epsilon(ctx, _conv_integer(ctx, W, None, None), _float_result(ctx))


@register("QLinearConv", kind="linear", domain=(ONNX, MS), rules=_RULES)
def qlinear_conv(ctx: OpContext):
    """``(x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp, B)``: ``G_x = x_s conv^T(G_y / y_s, W)``."""
    _only_input_carries(ctx)
    W = dequantize_linear(_const(ctx, 3, "w"), _const(ctx, 4, "w_scale"), _const(ctx, 5, "w_zero_point"), axis=0)
    return _with_epsilon(ctx, _conv_integer(ctx, W, 6, _value_of(ctx, 1)), _float_result(ctx, scale=6, zero=7))


@register("QAttention", kind="product", domain=MS)
def qattention(ctx: OpContext):
    """Fused attention with int8 input and qkv weight ``(input, weight, bias, input_scale, weight_scale, mask_index,
    input_zero_point, weight_zero_point, past)``: the fused ``Attention`` rules on the dequantised input and weight."""
    if ctx.input(8) is not None:
        raise ctx.fail("input 'past' is not supported (explain with an empty cache)")
    W = dequantize_linear(_const(ctx, 1, "weight"), _const(ctx, 4, "weight_scale"), _const(ctx, 7, "weight_zero_point"),
                          axis=-1)
    zero = _value_of(ctx, 6) or (lambda env: 0.0)
    return attention_backward(ctx, W, mask=5, attention_bias=None, quantized_input=(_value_of(ctx, 3), zero))
