"""Weight-quantised linear layers (``com.microsoft``): ``MatMulNBits`` (int4/int8 weights of onnxruntime-genai
and onnxruntime's ``MatMulNBitsQuantizer``).

``Y = A W^T (+ bias)`` with ``W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b]``, ``b = k // block_size``: the
weights are dequantised once when the plan is compiled (into the compute dtype) and the node is explained as a
``MatMul`` by that constant weight (:func:`~onnx_lrp.ops.linear.const_weight_backward`: the composite's linear
rule). ``q`` is packed in ``B`` (``(N, blocks, block_size * bits / 8)`` bytes, low bits first); ``zp`` is
absent (``2^(bits-1)``), packed the same way per row, or a float per block. onnxruntime may compute the forward
with quantised activations (``accuracy_level``); relevance uses the captured forward values and the dequantised
weights. Refused: ``g_idx`` (act-order), a non-constant weight, gamma rules with the op's own ``bias`` input.
"""
from __future__ import annotations

import numpy as np

from ..rules import Gamma
from .._patterns import following_bias
from ._base import MS, OpContext, register
from .linear import const_weight_backward


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
