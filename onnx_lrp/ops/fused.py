"""Fused onnxruntime ops (``com.microsoft``) that onnxruntime's transformer optimizer writes.

- ``Attention`` (fused BERT self-attention): the AttnLRP rules applied inside the fused computation, with the
  forward recomputed from the captured input. ``[Q K V] = X W + b``, ``S = scale * Q K^T + mask``,
  ``P = softmax(S)``, ``O = P V``. Gradient form: ``G_V = wV P^T G_O``, ``G_P = wP G_O V^T``,
  ``G_S = P (G_P - sum(P G_P))`` (softmax VJP), ``G_Q = wQK scale G_S K``, ``G_K = wQK scale G_S^T Q``,
  ``G_X = [G_Q G_K G_V] W^T``. The node takes the composite's *product* rule: Uniform gives the AttnLRP
  weights (``wP = wV = wQK = 1/2``); ConstantGate (CP-LRP) makes ``P`` a constant (``wP = 0``, ``wV = 1``);
  Gradient gives 1 everywhere. The projection ``X W + b`` takes the composite's rule for a linear ``MatMul``
  (Epsilon or Gamma, with ``z`` including the bias, as for the unfused graph); with ``P`` constant, ``O = P V``
  is a linear map of ``V`` and takes its eps too.
- ``RotaryEmbedding``: linear in its input with the cos/sin caches as constants: the VJP is the rotation by
  the opposite angle, ``G_x1 = G_y1 cos + G_y2 sin``, ``G_x2 = G_y2 cos - G_y1 sin``.
- ``EmbedLayerNormalization``: a relevance *source* (token embeddings are looked up inside it), so it is
  explained through its definition, written out next to it before the analysis
  (:func:`onnx_lrp._canonize.expand_embed_layer_norm`).

``SkipLayerNormalization``, ``SkipSimplifiedLayerNormalization`` and ``SimplifiedLayerNormalization`` are in
:mod:`~onnx_lrp.ops.normalization`; ``FastGelu``, ``BiasGelu``, ``QuickGelu`` in :mod:`~onnx_lrp.ops.activation`.
"""
from __future__ import annotations

import numpy as np

from ..rules import ConstantGate, Epsilon, Gamma, Gradient, Uniform, stabilise
from . import attention_blocks
from ._base import MS, OpContext, register
from .attention_blocks import rows_of


def attention_weights(ctx: OpContext) -> tuple[float, float, float]:
    """(wP, wV, wQK): weights of the A·V factors and of each Q K^T factor under the node's product rule."""
    rule = ctx.rule
    if isinstance(rule, Uniform):
        return 0.5, 0.5, 0.5
    if isinstance(rule, ConstantGate):
        return 0.0, 1.0, 0.0
    if isinstance(rule, Gradient):
        return 1.0, 1.0, 1.0
    raise ctx.fail(f"rule {rule.name} does not apply to fused attention (use Uniform, ConstantGate or Gradient)")


def linear_epsilon(ctx: OpContext) -> float:
    """The ``eps`` of eps-LRP on ``O = P V`` with ``P`` constant: the composite's linear rule if it is
    :class:`~onnx_lrp.rules.Epsilon` (the engine applies no other rule's eps to the unfused ``MatMul``), else 0."""
    lin = ctx.rule_of("linear", "MatMul")
    return lin.epsilon if isinstance(lin, Epsilon) else 0.0


def fused_attention_backward(xp, GO, Q, K, V, scores, weights: tuple[float, float, float], eps: float = 0.0,
                             matmul=None):
    """``(G_Q, G_K, G_V)`` of ``O = softmax(scores(Q K^T)) V`` (heads first, ``(.., N, S, d)``) with the product
    weights of :func:`attention_weights`, in blocks of query rows
    (:func:`~onnx_lrp.ops.attention_blocks.attention_backward`: ``G_V = wV P^T G_O``, ``G_P = wP G_O V^T``, softmax
    VJP, ``G_Q = wQK G_Z K``, ``G_K = wQK G_Z^T Q``). ``scores(Z_r, r0, r1) -> (S_r, back)`` applies the op's scale,
    soft-cap, bias and masks to rows ``r0:r1``. ``eps`` (eps-LRP of the composite's linear rule): with ``P``
    constant (``wP = 0``), ``O = P V`` is a linear map of ``V`` and ``G_O`` is first scaled by ``O / stab(O)``,
    as on the unfused ``MatMul``. ``matmul``: the engine's product (``env.matmul``)."""
    wP, wV, wQK = weights
    GQ, GKt, GV = attention_blocks.attention_backward(xp, GO, Q, K.swapaxes(-1, -2), V, scores, (wQK, wQK, wP, wV),
                                                      eps, matmul)
    if GQ is None:
        GQ = xp.zeros(GV.shape[:-2] + Q.shape[-2:], dtype=GO.dtype)
    GK = GKt.swapaxes(-1, -2) if GKt is not None else xp.zeros(GV.shape[:-2] + K.shape[-2:], dtype=GO.dtype)
    return GQ, GK, GV


def rotate(x, c, s, rd: int, interleaved: bool, inverse: bool = False):
    """Rotary embedding of the first ``rd`` features of ``x`` (pairs ``(x1, x2)``: halves, or even/odd features
    when ``interleaved``) by the angles with cosines ``c`` and sines ``s`` (broadcast to ``(.., rd/2)``):
    ``y1 = x1 c - x2 s``, ``y2 = x2 c + x1 s``. ``inverse``: by the opposite angle (its VJP)."""
    if inverse:
        s = -s
    out = x.copy()
    if interleaved:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = x1 * c - x2 * s
        out[..., 1:rd:2] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., : rd // 2], x[..., rd // 2: rd]
        out[..., : rd // 2] = x1 * c - x2 * s
        out[..., rd // 2: rd] = x2 * c + x1 * s
    return out


def heads_first(t, n: int):
    """``(.., S, n*d) -> (.., n, S, d)``: split the last axis into ``n`` heads."""
    return t.reshape(t.shape[:-1] + (n, t.shape[-1] // n)).swapaxes(-2, -3)


def key_mask(ctx: OpContext, mask, B: int, S: int, T: int):
    """Boolean (B, 1, S, T) of attended keys from an attention op's key mask (None: all keys): end positions
    (B,), end and start positions (2B,), raw 0/1 (B, T) or (B, S, T)."""
    if mask is None:
        return None
    xp = ctx.xp
    m = xp.asarray(mask)
    j = xp.arange(T)
    if m.ndim == 1 and m.shape[0] == B:  # end positions (right padding)
        valid = j[None, :] < m[:, None]
        return valid[:, None, None, :]
    if m.ndim == 1 and m.shape[0] == 2 * B:  # end and start positions
        valid = (j[None, :] < m[:B, None]) & (j[None, :] >= m[B:, None])
        return valid[:, None, None, :]
    if m.ndim == 2:  # raw (B, T) 0/1
        return (m != 0)[:, None, None, :]
    if m.ndim == 3:  # raw (B, S, T)
        return (m != 0)[:, None, :, :]
    raise ctx.fail(f"a key mask of shape {tuple(m.shape)} is not supported (batch {B}, {T} keys)")


@register("Attention", kind="product", domain=MS)
def attention(ctx: OpContext):
    for k, what in ((4, "past"), (6, "past_sequence_length")):
        if ctx.input(k) is not None:
            raise ctx.fail(f"input {what!r} is not supported (explain with an empty cache)")
    W = ctx.const(1)
    if W is None:
        raise ctx.fail("the qkv weight must be an initializer")
    return attention_backward(ctx, W, mask=3, attention_bias=5)


def attention_backward(ctx: OpContext, W: np.ndarray, mask: int, attention_bias: int | None, quantized_input=None):
    """The backward of a fused ``Attention``-like node with the (float) qkv weight ``W`` (``X W + b``, the bias
    input 2), its key mask input ``mask`` and additive ``attention_bias`` input (indices of the node's inputs).
    ``quantized_input``: ``(scale(env), zero_point(env))`` of an integer input 0, which stands for
    ``X = (q - zp) * scale`` (and gets ``G_q = scale * G_X``)."""
    node, xp = ctx.node, ctx.xp
    if int(ctx.attr("do_rotary", 0)):
        raise ctx.fail("do_rotary=1 is not supported")
    for k in (1, 2):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only the hidden states may")
    bias = ctx.const(2) if ctx.input(2) else None
    if ctx.input(2) and bias is None:
        raise ctx.fail("the qkv bias must be an initializer")
    heads = int(ctx.attr("num_heads"))
    sizes = list(ctx.attr("qkv_hidden_sizes", [])) or [W.shape[1] // 3] * 3
    hq, hk, hv = sizes
    scale = float(ctx.attr("scale", 0.0)) or 1.0 / float(np.sqrt(hq // heads))
    causal = bool(int(ctx.attr("unidirectional", 0)))
    filt = float(ctx.attr("mask_filter_value", -10000.0))
    weights = attention_weights(ctx)
    lin = ctx.rule_of("linear", "MatMul")
    gamma = lin.gamma if isinstance(lin, Gamma) else 0.0
    eps = lin.epsilon if isinstance(lin, (Gamma, Epsilon)) else 0.0  # of the qkv projection
    Wc = ctx.array(W)
    Wt = ctx.array(np.ascontiguousarray((W + gamma * np.maximum(W, 0)).T))
    Wpos = ctx.array(np.maximum(W, 0)) if gamma else None
    bc = ctx.array(bias) if bias is not None else None
    bpos = ctx.array(np.maximum(bias, 0)) if (gamma and bias is not None) else None
    x = ctx.value(ctx.input(0))
    vmask = ctx.value(ctx.input(mask)) if ctx.input(mask) else None
    vbias = ctx.value(ctx.input(attention_bias)) if attention_bias is not None and ctx.input(attention_bias) else None
    key = f"fused-attention:{node.name}"

    def projection_scale(X, qkv):
        """``z / stab(z + gamma z+)`` of the eps/gamma rule on ``z = X W + b`` (None for the plain gradient)."""
        if not (gamma or eps):
            return None
        zm = qkv + gamma * (X @ Wpos + (bpos if bpos is not None else 0)) if gamma else qkv
        return qkv / stabilise(zm, eps)

    def input_of(env):
        if quantized_input is None:
            return env[x]
        scale, zero = quantized_input
        return (env[x].astype(env.dtype) - zero(env)) * scale(env)

    def forward(env):
        X = input_of(env)
        qkv = X @ Wc + (bc if bc is not None else 0)
        Q = heads_first(qkv[..., :hq], heads)
        K = heads_first(qkv[..., hq:hq + hk], heads)
        V = heads_first(qkv[..., hq + hk:], heads)
        B, _, Sq, _ = Q.shape
        T = K.shape[-2]
        bias_full = env[vbias] if vbias is not None else None
        valid = key_mask(ctx, env[vmask] if vmask else None, B, Sq, T)

        def scores(Z, r0, r1):
            S = Z * scale
            if bias_full is not None:
                S = S + rows_of(bias_full, r0, r1, Sq)
            if valid is not None:  # masked keys: + mask_filter_value (a fully masked row stays a softmax)
                S = xp.where(rows_of(valid, r0, r1, Sq), S, S + filt)
            if causal:  # future keys are excluded outright, as onnxruntime does
                tri = xp.arange(T)[None, :] <= xp.arange(r0, r1)[:, None] + (T - Sq)
                S = xp.where(tri, S, -xp.inf)
            return S, lambda GS: GS * scale

        return Q, K, V, scores, projection_scale(X, qkv)

    def back(env, gy):
        if len(gy) > 1 and any(g is not None for g in gy[1:]):
            raise ctx.fail("relevance at the 'present' output is not supported")
        Q, K, V, scores, zscale = env.memo(key, lambda: forward(env))
        g = gy[0]
        dv = hv // heads
        GO = g.reshape(g.shape[:-1] + (heads, dv)).swapaxes(-2, -3)
        parts = fused_attention_backward(xp, GO, Q, K, V, scores, weights, eps=linear_epsilon(ctx), matmul=env.matmul)
        flat = [p.swapaxes(-2, -3) for p in parts]  # (.., B, S, N, d)
        Gqkv = xp.concatenate([p.reshape(p.shape[:-2] + (-1,)) for p in flat], axis=-1)
        if zscale is not None:
            Gqkv = Gqkv * zscale
        gx = Gqkv @ Wt
        return [gx if quantized_input is None else gx * quantized_input[0](env)] + [None] * (len(node.inputs) - 1)

    return back


@register("RotaryEmbedding", kind="linear", domain=MS)
def rotary_embedding(ctx: OpContext):
    xp = ctx.xp
    for k in (1, 2, 3):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only the rotated input may")
    if float(ctx.attr("scale", 1.0)) != 1.0 or int(ctx.attr("is_packed_batching", 0)):
        raise ctx.fail("scale != 1 and packed batching are not supported")
    interleaved = bool(int(ctx.attr("interleaved", 0)))
    heads = int(ctx.attr("num_heads", 0))
    cos_c, sin_c = ctx.const(2), ctx.const(3)
    cos_v = ctx.array(cos_c) if cos_c is not None else None
    sin_v = ctx.array(sin_c) if sin_c is not None else None
    vc = ctx.value(ctx.input(2)) if cos_v is None else None
    vs = ctx.value(ctx.input(3)) if sin_v is None else None
    vpos = ctx.value(ctx.input(1))
    sx = ctx.shape(ctx.input(0))
    rot_attr = int(ctx.attr("rotary_embedding_dim", 0))

    def back(env, gy):
        g = gy[0]
        shape = env.shape(sx)
        cos = cos_v if cos_v is not None else env[vc]
        sin = sin_v if sin_v is not None else env[vs]
        half = cos.shape[-1]
        rd = rot_attr or 2 * half
        pos = xp.asarray(env[vpos]).astype(np.int64)
        B = shape[0]
        S = shape[2] if len(shape) == 4 else shape[1]
        if pos.size == 1:  # an offset
            pos = int(pos.reshape(-1)[0]) + xp.arange(S)[None, :]
        c, s = cos[pos], sin[pos]  # (B or 1, S, rd/2)
        lead = g.shape[: g.ndim - len(shape)]
        if len(shape) == 4:  # (B, N, S, D)
            c, s = c[:, None], s[:, None]
            gg = g
        else:  # (B, S, N*D)
            d = shape[2] // heads if heads else rd
            gg = g.reshape(lead + (B, S, shape[2] // d, d))
            c, s = c[:, :, None], s[:, :, None]
        out = rotate(gg, c, s, rd, interleaved, inverse=True)
        return [out.reshape(g.shape), None, None, None]

    return back
