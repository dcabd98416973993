"""Quantised test models: onnxruntime.quantization's dynamic and static (QDQ) forms of an fp32 ONNX file, and the
reference for them: the fp32 model with each quantised weight replaced by its dequantised value
``(q - zero_point) * scale``, read from the quantised file's own tensors (activation quantisation off)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _per_axis(param: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return param.reshape(shape)


def dequantised_weights(quant: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Original initializer name -> dequantised value, for every weight ``name + '_quantized'`` in ``quant``."""
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    out = {}
    for node in quant.graph.node:
        for k, name in enumerate(node.input):
            if not name.endswith("_quantized") or name not in inits:
                continue
            q = inits[name]
            if node.op_type == "DequantizeLinear" and k == 0:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                scale, zp = inits[node.input[1]], inits[node.input[2]] if len(node.input) > 2 else 0
            elif node.op_type == "MatMulInteger" and k == 1:
                axis, zp = -1, inits[node.input[3]]
                scale = inits[name[: -len("_quantized")] + "_scale"]
            elif node.op_type == "Gather" and k == 0:  # the lookup's DequantizeLinear follows
                dq = next(n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0])
                axis, scale, zp = 1, inits[dq.input[1]], inits[dq.input[2]]
            else:
                continue
            w = (q.astype(np.float64) - _per_axis(zp, q, axis)) * _per_axis(scale, q, axis)
            out[name[: -len("_quantized")]] = w.astype(np.float32)
    return out


def dequantised_reference(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> onnx.ModelProto:
    """``fp32`` with its quantised weights replaced by the dequantised ones."""
    weights = dequantised_weights(quant)
    ref = onnx.ModelProto()
    ref.CopyFrom(fp32)
    replaced = 0
    for t in ref.graph.initializer:
        if t.name in weights:
            w = weights[t.name]
            assert tuple(w.shape) == tuple(t.dims), (t.name, w.shape, t.dims)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            replaced += 1
    assert replaced, "no quantised weight of the fp32 model was found"
    return ref


class _Reader:
    """A CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize(fp32_path: Path, out_path: Path, mode: str, calibration: list[dict] | None = None, **kw) -> Path:
    """``mode``: ``"dynamic"`` (quantize_dynamic, int8 weights) or ``"qdq"`` (quantize_static, QDQ format)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if not out_path.exists():
        if mode == "dynamic":
            quantize_dynamic(fp32_path, out_path, weight_type=kw.pop("weight_type", QuantType.QInt8), **kw)
        else:
            reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration)
            quantize_static(fp32_path, out_path, reader, quant_format=QuantFormat.QDQ, **kw)
    return out_path
