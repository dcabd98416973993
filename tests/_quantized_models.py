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


def float_twin(quant: onnx.ModelProto) -> onnx.ModelProto:
    """``quant`` with every ``MatMulInteger``/``ConvInteger`` written as the float product of the same integer values:
    ``MatMul(Cast(A) - a_zp, B - b_zp)`` (``Conv`` likewise) with the weight side a float constant; ``QAttention``
    as ``Attention(DequantizeLinear(input), W)`` and ``QEmbedLayerNormalization`` as ``EmbedLayerNormalization``
    of the dequantised weights. The forward is the quantised model's (up to float rounding), so only the rules of
    the integer ops differ."""
    from onnx import TensorProto, helper

    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    twin = onnx.ModelProto()
    twin.CopyFrom(quant)
    nodes = []
    for n in twin.graph.node:
        if n.op_type == "QAttention":  # Attention on DequantizeLinear(input) with the dequantised weight
            ins = list(n.input) + [""] * (9 - len(n.input))
            q, w, bias, s, ws, mask, zp, wzp = ins[:8]
            x = f"{n.name}::float_input"
            nodes.append(helper.make_node("DequantizeLinear", [q, s] + ([zp] if zp else []), [x], name=x))
            wf = (inits[w].astype(np.float32) - (inits[wzp].astype(np.float32) if wzp else 0)) * inits[ws]
            twin.graph.initializer.append(numpy_helper.from_array(wf.astype(np.float32), x + "_weight"))
            nodes.append(helper.make_node("Attention", [x, x + "_weight", bias, mask], list(n.output),
                                          name=f"{n.name}::float", domain="com.microsoft",
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
            continue
        if n.op_type == "QEmbedLayerNormalization":  # EmbedLayerNormalization of the dequantised tables
            ins = list(n.input) + [""] * (18 - len(n.input))
            floats = []
            for k in range(2, 7):
                if not ins[k]:
                    floats.append("")
                    continue
                v = (inits[ins[k]].astype(np.float32) - inits[ins[k + 11]].astype(np.float32)) * inits[ins[k + 6]]
                floats.append(f"{n.name}::float_{k}")
                twin.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), floats[-1]))
            nodes.append(helper.make_node("EmbedLayerNormalization", ins[:2] + floats + [ins[7]], list(n.output),
                                          name=f"{n.name}::float", domain="com.microsoft",
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
            continue
        if n.op_type not in ("MatMulInteger", "ConvInteger"):
            nodes.append(n)
            continue
        ins = list(n.input) + [""] * (4 - len(n.input))
        a, b, a_zp, b_zp = ins[:4]

        def centred(t, zp, tag):  # Cast(t) - Cast(zp): an activation's integers as floats
            x = f"{n.name}::float_{tag}"
            nodes.append(helper.make_node("Cast", [t], [x], name=x, to=TensorProto.FLOAT))
            if zp:
                nodes.append(helper.make_node("Cast", [zp], [x + "_zp"], name=x + "_zp", to=TensorProto.FLOAT))
                nodes.append(helper.make_node("Sub", [x, x + "_zp"], [x + "_centred"], name=x + "_centred"))
                x += "_centred"
            return x

        if b in inits:
            w = inits[b].astype(np.float32)
            if b_zp:
                zp = inits[b_zp].astype(np.float32)
                w = w - (zp.reshape(-1, *([1] * (w.ndim - 1))) if n.op_type == "ConvInteger" and zp.size > 1 else zp)
            wname = f"{n.name}::float_weight"
            twin.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), wname))
        else:  # a product of two activations
            wname = centred(b, b_zp, "other")
        x = centred(a, a_zp, "input")
        op = "MatMul" if n.op_type == "MatMulInteger" else "Conv"
        nodes.append(helper.make_node(op, [x, wname], list(n.output), name=f"{n.name}::float",
                                      **({} if op == "MatMul" else {a.name: helper.get_attribute_value(a)
                                                                    for a in n.attribute})))
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    for vi in twin.graph.value_info:  # the integer products' outputs are float now
        if any(vi.name == o for n in nodes if n.name.endswith("::float") for o in n.output):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return twin
