"""Activation quantisation: ``QuantizeLinear``, ``DequantizeLinear``, ``DynamicQuantizeLinear`` of a carrying tensor.

Transparent to relevance (straight-through): an integer tensor ``q`` stands for the real value
``x = (q - zp) * s``, and its modified gradient is held in integer units, ``G_q = s * G_x``, so that a quantise /
dequantise pair passes ``G`` unchanged whatever ``s`` and ``zp`` are:

- ``DequantizeLinear`` ``y = (q - zp) * s``: ``G_q = s * G_y``;
- ``QuantizeLinear`` ``q = saturate(round(x / s) + zp)``: ``G_x = G_q / s`` (rounding and saturation passed
  straight through, as quantisation-aware training does);
- ``DynamicQuantizeLinear``: the same with the scale it computes at run time; that scale and zero point are
  statistics of ``x`` and carry no relevance (graph analysis treats them as constants).

Scales are per tensor, per channel (``axis``) or per block (``block_size``). What relevance a quantised tensor
carries is then that of the float tensor it stands for; the relevance pass uses the quantised forward values
(what the model computed). Integer matrix products: :mod:`onnx_lrp.ops.quantized`.
"""
from __future__ import annotations

import numpy as np

from .._graph import quantization_axis_shape
from ._base import MS, ONNX, OpContext, register


def _scale(ctx: OpContext, k: int):
    """``scale(env, shape)``: input ``k`` (a constant, or read at run time) shaped to broadcast against ``shape``."""
    axis, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    const = ctx.const(k)
    if const is not None and not (np.isfinite(const).all() and (const != 0).all()):
        raise ctx.fail(f"scale {ctx.input(k)!r} is {np.asarray(const).reshape(-1)[:4].tolist()}: the quantised tensor "
                       f"{ctx.input(0)!r} carries no information (a calibration range that is infinite or empty, "
                       "e.g. attention scores holding a -inf mask); quantise the model without that tensor "
                       "(quantize_static's nodes_to_exclude / op_types_to_quantize)")
    name = None if const is not None else ctx.value(ctx.input(k))
    cache: dict[tuple, object] = {}
    xp = ctx.xp

    def scale(env, shape):
        if const is None:
            value = env[name]
            if value.ndim == 0 or value.size == 1:
                return value
            a = axis % len(shape)
            if block:  # one scale per block of the axis: repeated to its extent (the last block may be short)
                return xp.take(xp.repeat(value, block, axis=a), xp.arange(shape[a]), axis=a)
            return value.reshape([-1 if j == a else 1 for j in range(len(shape))])
        key = tuple(shape)
        if key not in cache:
            extent = shape[axis % len(shape)] if shape else 1
            cache[key] = ctx.array(quantization_axis_shape(const, len(shape), axis, block, extent).astype(np.float32))
        return cache[key]

    return scale


def _check(ctx: OpContext) -> None:
    for k in range(1, len(ctx.node.inputs)):
        if ctx.carrying(k):
            raise ctx.fail(f"input {k} ({ctx.input(k)!r}, a scale or zero point) carries relevance")


# for the structural patterns (probing a region's function, static values) a quantise/dequantise step is the
# identity on the real values it stands for
@register("DequantizeLinear", kind="movement", domain=(ONNX, MS), forward=lambda ins, at: ins[0])
def dequantize_linear(ctx: OpContext):
    """``G_q = s * G_y``."""
    _check(ctx)
    scale, sx = _scale(ctx, 1), ctx.shape(ctx.input(0))

    def back(env, gy):
        return [gy[0] * scale(env, env.shape(sx))] + [None] * (len(ctx.node.inputs) - 1)

    return back


@register("QuantizeLinear", kind="movement", domain=(ONNX, MS), forward=lambda ins, at: ins[0])
def quantize_linear(ctx: OpContext):
    """``G_x = G_q / s``."""
    _check(ctx)
    scale, sx = _scale(ctx, 1), ctx.shape(ctx.input(0))

    def back(env, gy):
        return [gy[0] / scale(env, env.shape(sx))] + [None] * (len(ctx.node.inputs) - 1)

    return back


@register("DynamicQuantizeLinear", kind="movement", carries=lambda node, k: k == 0)
def dynamic_quantize_linear(ctx: OpContext):
    """``G_x = G_q / s`` with the run-time per-tensor scale ``s`` (output 1)."""
    vs = ctx.value(ctx.node.outputs[1])

    def back(env, gy):
        return [gy[0] / env[vs]] if gy[0] is not None else [None]

    return back

