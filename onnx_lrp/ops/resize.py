"""Resize (nearest, linear, cubic; any coordinate transformation): the plain vector-Jacobian product.

Resize is linear in its input and separable: along each resized axis ``i`` it applies a 1-D matrix ``A_i``
(``out_i x in_i``), so ``G_x = G_y`` contracted with ``A_i`` along every resized axis. ``A_i`` is read off
onnxruntime's own kernel, by resizing the one-hot basis ``eye(in_i)`` along that axis with the node's attributes
and scale, so the backward matches the forward exactly (rounding of nearest modes included).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..rules import Constant, Epsilon, Gradient
from ._base import OpContext, register

_SKIP_ATTRS = {"axes", "keep_aspect_ratio_policy"}


def _basis_response(attrs: dict, opset: int, n_in: int, n_out: int, scale: float | None) -> np.ndarray:
    """``A^T`` (``n_in x n_out``): onnxruntime's Resize of ``eye(n_in)`` along its last axis."""
    import onnxruntime as ort

    old = opset < 13  # roi and scales are required inputs before opset 13 (empty tensors allowed)
    inputs = (["x", "roi" if old else "", "scales"] if scale is not None
              else ["x", "roi" if old else "", "scales" if old else "", "sizes"])
    node = helper.make_node("Resize", inputs, ["y"], **{k: v for k, v in attrs.items() if k not in _SKIP_ATTRS})
    inits = ([helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, scale])] if scale is not None
             else [helper.make_tensor("sizes", TensorProto.INT64, [2], [n_in, n_out])])
    if old:
        inits.append(helper.make_tensor("roi", TensorProto.FLOAT, [0], []))
        if scale is None:
            inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [0], []))
    graph = helper.make_graph([node], "resize_basis",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_in, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.eye(n_in, dtype=np.float32)})[0]
    if y.shape != (n_in, n_out):
        raise ValueError(f"basis resize gave shape {y.shape}, expected {(n_in, n_out)}")
    return y


@register("Resize", kind="linear", rules=(Epsilon, Gradient, Constant))
def resize(ctx: OpContext):
    xp = ctx.xp
    if ctx.opset < 11:
        raise ctx.fail("Resize before opset 11 is not supported")
    if any(ctx.carrying(k) for k in (1, 2, 3)):
        raise ctx.fail("roi, scales and sizes must not carry relevance")
    mode = ctx.attr("coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    policy = ctx.attr("keep_aspect_ratio_policy", b"stretch")
    if mode == "tf_crop_and_resize" or (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
        raise ctx.fail(f"Resize with coordinate mode {mode!r} / aspect policy {policy!r} is not supported")
    sx, sy = ctx.shape(ctx.input(0)), ctx.shape(ctx.node.outputs[0])
    vs = ctx.value(ctx.input(2)) if ctx.input(2) else None
    axes_attr = ctx.attr("axes")
    attrs, opset = dict(ctx.node.attrs), ctx.opset
    cache: dict[tuple, object] = {}

    def matrix(n_in: int, n_out: int, scale: float | None):
        key = (n_in, n_out, scale)
        if key not in cache:
            cache[key] = ctx.array(_basis_response(attrs, opset, n_in, n_out, scale).T.copy())  # (out, in)
        return cache[key]

    def back(env, gy):
        g = gy[0]
        xs, ys = tuple(env.shape(sx)), tuple(env.shape(sy))
        scales = None
        if vs is not None:
            sc = np.asarray(env[vs].get() if hasattr(env[vs], "get") else env[vs], dtype=np.float64).reshape(-1)
            if sc.size:
                axes = list(axes_attr) if axes_attr is not None else list(range(len(xs)))
                scales = {a % len(xs): float(s) for a, s in zip(axes, sc)}
        lead = env.lead
        for i, (n_in, n_out) in enumerate(zip(xs, ys)):
            s = scales.get(i) if scales is not None else None
            if n_in == n_out and (s is None or s == 1.0):
                continue
            A = matrix(n_in, n_out, s)
            ax = lead + i
            g = xp.moveaxis(xp.moveaxis(g, ax, -1) @ A, -1, ax)
        return [g, None, None, None][: len(ctx.node.inputs)]

    return back
