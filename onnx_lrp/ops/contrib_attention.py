"""onnxruntime's attention ops for decoders (``com.microsoft``): ``GroupQueryAttention`` (onnxruntime-genai's
model builder) and ``MultiHeadAttention`` (onnxruntime's transformer optimizer), explained with an empty cache.

Both recompute the forward from the captured inputs and take the fused ``Attention`` rule of
:mod:`~onnx_lrp.ops.fused` (:func:`~onnx_lrp.ops.fused.fused_attention_backward`: the composite's *product* rule
on ``Q K^T`` and ``P V``, softmax VJP, in blocks of query rows), so relevance matches the unfused graph of the same
model.

``GroupQueryAttention``: ``query`` is ``Q`` or packed ``[Q K V]`` (``(B, S, (N + 2 Nkv) d)``); query head ``h``
reads key/value head ``h // (N / Nkv)``, so ``G_K``, ``G_V`` sum over each group. With ``do_rotary`` the op
rotates ``Q`` and ``K`` by the angles of ``cos_cache``/``sin_cache`` at positions ``0..S-1`` (or
``position_ids``); the VJP rotates ``G_Q``, ``G_K`` back by the opposite angle. Keys: causal, ``j <= i``, within
``local_window_size`` (``i - j < w``, as onnxruntime 1.32 computes it) and ``j <= seqlens_k[b]``. ``softcap`` ``c``:
scores ``c tanh(s / c)``, the tanh under the composite's unary rule (Identity: ``G_s = G * tanh(u) / (u + eps)``,
``u = s / c``, as for the written-out soft-cap). onnxruntime treats a first prompt as
*right*-padded: row ``i > seqlens_k[b]`` is padding with an undefined output, so relevance reaching such a row
is refused (left-padded batches are computed differently from the model's PyTorch original already in the
forward pass). Refused: a non-empty past, ``smooth_softmax``, ``head_sink``, ``sliding_window_cache``
(a bounded cache).

``MultiHeadAttention``: separate ``(B, S, D)`` query/key/value, optional constant ``bias`` ``[bq bk bv]``,
``key_padding_mask`` (``(B, T)`` 0/1 or ``(B,)`` lengths: masked keys get ``mask_filter_value`` added),
``attention_bias``, ``unidirectional`` and empty ``past_key``/``past_value``. Refused: packed QKV/KV layouts, a
non-empty past, relevance at the ``present`` outputs.
"""
from __future__ import annotations

import numpy as np

from .._graph import Graph
from ..rules import Gradient, Identity
from ._base import MS, OpContext, register
from .attention_blocks import rows_of
from .fused import attention_weights, fused_attention_backward, heads_first, key_mask, linear_epsilon, rotate


def _heads_last(t):
    """``(.., n, S, d) -> (.., S, n*d)``."""
    t = t.swapaxes(-2, -3)
    return t.reshape(t.shape[:-2] + (-1,))


def _group_sum(g, kv_heads: int):
    """Sum the gradients of the query heads that share one key/value head: ``(.., N, T, d) -> (.., Nkv, T, d)``."""
    n = g.shape[-3]
    return g.reshape(g.shape[:-3] + (kv_heads, n // kv_heads) + g.shape[-2:]).sum(axis=-3)


def _past_is_empty(ctx: OpContext, env, shapes: list[str]) -> None:
    for s in shapes:
        if env.shape(s)[2] != 0:
            raise ctx.fail(f"input {s!r} holds a non-empty cache ({env.shape(s)}); explain with an empty past")


@register("GroupQueryAttention", kind="product", domain=MS)
def group_query_attention(ctx: OpContext):
    xp = ctx.xp
    if ctx.input(11) is not None:
        raise ctx.fail("input 'head_sink' is not supported")
    if int(ctx.attr("sliding_window_cache", 0)):
        raise ctx.fail("sliding_window_cache=1 (a bounded KV cache) is not supported; build the model with "
                       "--extra_options windowed_kv_cache=false")
    softcap = float(ctx.attr("softcap", 0.0))
    tanh_rule = ctx.rule_of("unary", "Tanh") if softcap > 0 else None
    if tanh_rule is not None and not isinstance(tanh_rule, (Identity, Gradient)):
        raise ctx.fail(f"rule {tanh_rule.name} for the soft-cap's tanh is not supported (Identity or Gradient)")
    if softcap > 0 and ctx.input(10):
        raise ctx.fail("softcap together with attention_bias is not supported")
    if int(ctx.attr("smooth_softmax", 0)):
        raise ctx.fail("smooth_softmax=1 is not supported")
    for k in range(3, len(ctx.node.inputs)):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only query/key/value may")
    heads, kv_heads = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
    packed = ctx.input(1) is None
    window = int(ctx.attr("local_window_size", -1))
    rotary = bool(int(ctx.attr("do_rotary", 0)))
    interleaved = bool(int(ctx.attr("rotary_interleaved", 0)))
    scale_attr = float(ctx.attr("scale", 0.0))
    weights, eps = attention_weights(ctx), linear_epsilon(ctx)
    cos_c, sin_c = (ctx.const(7), ctx.const(8)) if rotary else (None, None)
    if rotary and (cos_c is None or sin_c is None):
        raise ctx.fail("do_rotary=1 needs constant cos_cache/sin_cache")
    cos_v = ctx.array(cos_c) if rotary else None
    sin_v = ctx.array(sin_c) if rotary else None
    vq = ctx.value(ctx.input(0))
    vk = None if packed else ctx.value(ctx.input(1))
    vv = None if packed else ctx.value(ctx.input(2))
    vseq = ctx.value(ctx.input(5))
    vpos = ctx.value(ctx.input(9)) if ctx.input(9) else None
    vbias = ctx.value(ctx.input(10)) if ctx.input(10) else None
    past = [ctx.shape(ctx.input(k)) for k in (3, 4) if ctx.input(k)]
    key = f"gqa:{ctx.node.name}"

    def forward(env):
        _past_is_empty(ctx, env, past)
        last = xp.asarray(env[vseq]).astype(np.int64).reshape(-1)  # seqlens_k = valid length - 1
        rows_ok = xp.arange(env[vq].shape[-2])[None, :] <= last[:, None]  # (B, S): rows onnxruntime computes
        # padding rows may hold anything (onnxruntime leaves them undefined, even inf/nan): zeros, never read
        x = xp.where(rows_ok[..., None], env[vq], 0)
        if packed:
            d = x.shape[-1] // (heads + 2 * kv_heads)
            q, k, v = x[..., : heads * d], x[..., heads * d: (heads + kv_heads) * d], x[..., (heads + kv_heads) * d:]
        else:
            q, k, v = x, xp.where(rows_ok[..., None], env[vk], 0), xp.where(rows_ok[..., None], env[vv], 0)
        Q, K, V = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
        B, _, S, d = Q.shape
        if rotary:
            pos = xp.asarray(env[vpos]).astype(np.int64) if vpos else xp.arange(S)[None, :]
            c, s = cos_v[pos][:, None], sin_v[pos][:, None]  # (B or 1, 1, S, rd/2)
            rd = 2 * cos_v.shape[-1]
            Q, K = rotate(Q, c, s, rd, interleaved), rotate(K, c, s, rd, interleaved)
        else:
            c = s = rd = None
        group = heads // kv_heads
        Kx, Vx = xp.repeat(K, group, axis=-3), xp.repeat(V, group, axis=-3)
        scale = scale_attr or 1.0 / float(np.sqrt(d))
        bias_full = env[vbias] if vbias else None

        def scores(Z, r0, r1):
            s_ = Z * scale
            factor = None
            if softcap > 0:  # c tanh(s / c): its tanh takes the composite's unary rule, as in the unfused graph
                u = s_ / softcap
                t = xp.tanh(u)
                factor = tanh_rule.ratio(u, t) if isinstance(tanh_rule, Identity) else 1 - t * t
                s_ = softcap * t
            if bias_full is not None:
                s_ = s_ + rows_of(bias_full, r0, r1, S)
            i, j = xp.arange(r0, r1)[:, None], xp.arange(S)[None, :]
            keep = j <= i
            if window > 0:
                keep = keep & (i - j < window)  # the window counts the query's own key (onnxruntime 1.32)
            # keys up to seqlens_k; padding rows (maybe without any key) get no key at all: P = 0 there
            keep = keep[None, None] & (j[None, None] <= last[:, None, None, None]) & rows_ok[:, None, r0:r1, None]
            s_ = xp.where(keep, s_, -xp.inf)
            return s_, (lambda GS: GS * (scale * factor)) if factor is not None else (lambda GS: GS * scale)

        return Q, Kx, Vx, scores, (c, s, rd), rows_ok

    def back(env, gy):
        if any(g is not None for g in gy[1:]):
            raise ctx.fail("relevance at the 'present' outputs is not supported")
        Q, Kx, Vx, scores, (c, s, rd), rows_ok = env.memo(key, lambda: forward(env))
        g = gy[0]
        if bool(((g != 0).any(axis=-1) & ~rows_ok).any()):
            raise ctx.fail("relevance reaches a padding row (position > seqlens_k): onnxruntime's "
                           "GroupQueryAttention assumes right padding, so its output there is undefined")
        GQ, GK, GV = fused_attention_backward(xp, heads_first(g, heads), Q, Kx, Vx, scores, weights, eps,
                                              env.matmul)
        GK, GV = _group_sum(GK, kv_heads), _group_sum(GV, kv_heads)
        if rd:
            GQ, GK = rotate(GQ, c, s, rd, interleaved, inverse=True), rotate(GK, c, s, rd, interleaved, inverse=True)
        parts = [_heads_last(GQ), _heads_last(GK), _heads_last(GV)]
        rest = [None] * (len(ctx.node.inputs) - 3)
        if packed:
            return [xp.concatenate(parts, axis=-1), None, None] + rest
        return [p if ctx.carrying(k) else None for k, p in enumerate(parts)] + rest

    return back


@register("MultiHeadAttention", kind="product", domain=MS)
def multi_head_attention(ctx: OpContext):
    xp = ctx.xp
    for k, what in ((8, "past_sequence_length"), (9, "cache_indirection")):
        if ctx.input(k) is not None:
            raise ctx.fail(f"input {what!r} is not supported (explain with an empty cache)")
    past = [ctx.shape(ctx.input(k)) for k in (6, 7) if ctx.input(k)]
    if ctx.input(1) is None or ctx.input(2) is None:
        raise ctx.fail("packed QKV / KV layouts (no separate key and value) are not supported")
    for k in (3, 4, 5):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}) carries relevance; only query/key/value may")
    heads = int(ctx.attr("num_heads"))
    scale_attr = float(ctx.attr("scale", 0.0))
    causal = bool(int(ctx.attr("unidirectional", 0)))
    filt = float(ctx.attr("mask_filter_value", -10000.0))
    weights, eps = attention_weights(ctx), linear_epsilon(ctx)
    bias = None
    if ctx.input(3):
        b = ctx.const(3)
        if b is None:
            raise ctx.fail("the bias must be a constant")
        bias = ctx.array(b)
    names = [ctx.value(ctx.input(k)) for k in range(3)]
    vmask = ctx.value(ctx.input(4)) if ctx.input(4) else None
    vattn = ctx.value(ctx.input(5)) if ctx.input(5) else None
    key = f"mha:{ctx.node.name}"

    def forward(env):
        _past_is_empty(ctx, env, past)
        q, k, v = (env[n] for n in names)
        if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
            raise ctx.fail(f"query/key/value of shapes {q.shape}, {k.shape}, {v.shape}: only (B, S, D) is supported")
        if bias is not None:
            dq, dk = q.shape[-1], k.shape[-1]
            q, k, v = q + bias[:dq], k + bias[dq: dq + dk], v + bias[dq + dk:]
        Q, K, V = heads_first(q, heads), heads_first(k, heads), heads_first(v, heads)
        scale = scale_attr or 1.0 / float(np.sqrt(Q.shape[-1]))
        B, _, S, _ = Q.shape
        T = K.shape[-2]
        bias_full = env[vattn] if vattn else None
        valid = key_mask(ctx, env[vmask] if vmask else None, B, S, T)

        def scores(Z, r0, r1):
            s_ = Z * scale
            if bias_full is not None:
                s_ = s_ + rows_of(bias_full, r0, r1, S)
            if valid is not None:
                s_ = xp.where(rows_of(valid, r0, r1, S), s_, s_ + filt)
            if causal:
                tri = xp.arange(T)[None, :] <= xp.arange(r0, r1)[:, None] + (T - S)
                s_ = xp.where(tri, s_, -xp.inf)
            return s_, lambda GS: GS * scale

        return Q, K, V, scores

    def back(env, gy):
        if any(g is not None for g in gy[1:]):
            raise ctx.fail("relevance at the 'present' outputs is not supported")
        Q, K, V, scores = env.memo(key, lambda: forward(env))
        parts = fused_attention_backward(xp, heads_first(gy[0], heads), Q, K, V, scores, weights, eps=eps,
                                         matmul=env.matmul)
        return [_heads_last(p) if ctx.carrying(k) else None for k, p in enumerate(parts)] + [None] * (
            len(ctx.node.inputs) - 3)

    return back


def cache_head_size(graph: Graph, name: str) -> int | None:
    """The head size of the past key/value input ``name`` of a ``GroupQueryAttention``/``MultiHeadAttention``
    (its last axis, which exports leave symbolic), from the width of the node's key (or packed query) input and
    its head counts: the width of a ``MatMul``/``MatMulNBits`` output (through a bias ``Add``). None if unknown."""
    for node in graph.consumers.get(name, []):
        if node.op_type == "GroupQueryAttention" and name in node.inputs[3:5]:
            heads, kv = int(node.attr("num_heads")), int(node.attr("kv_num_heads"))
            if len(node.inputs) > 1 and node.inputs[1]:
                width, n = _width(graph, node.inputs[1]), kv
            else:
                width, n = _width(graph, node.inputs[0]), heads + 2 * kv
        elif node.op_type == "MultiHeadAttention" and name in node.inputs[6:8]:
            width, n = _width(graph, node.inputs[1]), int(node.attr("num_heads"))
        else:
            continue
        if width:
            return width // n
    return None


def _width(graph: Graph, name: str) -> int | None:
    """Last-axis size of ``name`` when it is the output of a linear layer with a constant weight."""
    p = graph.producer.get(name)
    if p is None:
        return None
    if p.op_type == "Add":
        for k, i in enumerate(p.inputs):
            other = p.inputs[1 - k]
            if graph.constant(other) is not None:
                return _width(graph, i)
        return None
    if p.op_type == "MatMulNBits":
        return int(p.attr("N"))
    if p.op_type == "MatMul":
        w = graph.constant(p.inputs[1])
        return int(w.shape[-1]) if w is not None else None
    return None
