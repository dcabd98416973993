"""Tiny hand-built ONNX graphs for rule unit tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def model(nodes, inputs: dict[str, tuple], outputs: dict[str, tuple], inits: dict[str, np.ndarray] | None = None,
          opset: int = OPSET, ms_domain: bool = False) -> onnx.ModelProto:
    """A model from nodes; inputs/outputs map name -> shape (float32 unless the shape tuple starts with 'int')."""

    def vi(name, shape):
        if shape and shape[0] == "int":
            return helper.make_tensor_value_info(name, TensorProto.INT64, list(shape[1:]))
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    graph = helper.make_graph(
        nodes,
        "g",
        [vi(k, v) for k, v in inputs.items()],
        [vi(k, v) for k, v in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    imports = [helper.make_opsetid("", opset)]
    if ms_domain:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=imports, ir_version=9)


def node(op, inputs, outputs, name=None, domain=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or f"{op}_{outputs[0]}", domain=domain, **attrs)


def f32(*shape, seed=0, scale=1.0):
    return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)
