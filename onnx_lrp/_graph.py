"""A small read-only view of an ONNX graph: nodes in topological order, producers, consumers, constants.

The view never modifies the user's ``ModelProto``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._stream import check_tensors, read_external, read_split, split_weights
from .errors import ModelLoadError

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
INT_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


@dataclass
class Node:
    """One ONNX node; ``name`` is unique within the graph (empty names are filled in)."""

    index: int
    op_type: str
    name: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    proto: onnx.NodeProto | None = None
    captures: list[str] = field(default_factory=list)  # outer tensors read inside its subgraphs (If, Loop, Scan)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def __repr__(self) -> str:
        return f"{self.op_type}({self.name!r})"


@dataclass
class GraphInput:
    name: str
    elem_type: int
    shape: list[int | str | None]  # ints for fixed dims, names for symbolic, None for unknown

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    @property
    def is_int(self) -> bool:
        return self.elem_type in INT_TYPES

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


class Graph:
    """Nodes, tensors and constants of one ONNX model (the main graph)."""

    def __init__(self, model: onnx.ModelProto, source: str = "model", constants: dict[str, np.ndarray] | None = None):
        """``constants``: values of initializers that ``model`` holds as data-less stubs (see
        :func:`onnx_lrp._stream.split_weights`)."""
        self.model = model
        self.source = source
        g = model.graph
        self.opset = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
        self._initializers = {t.name: t for t in g.initializer}
        self.inputs = [
            GraphInput(i.name, i.type.tensor_type.elem_type, _dims(i))
            for i in g.input
            if i.name not in self._initializers
        ]
        self.input_names = {i.name for i in self.inputs}
        self.output_names = [o.name for o in g.output]
        self.output_types = {o.name: o.type.tensor_type.elem_type for o in g.output}
        self.output_dims = {o.name: _dims(o) for o in g.output}
        self.nodes: list[Node] = []
        used: set[str] = set()
        for k, n in enumerate(_topological(g.node, source)):
            name = n.name or f"{n.op_type}_{k}"
            if name in used:
                name = f"{name}#{k}"
            used.add(name)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            self.nodes.append(
                Node(k, n.op_type, name, n.domain, list(n.input), list(n.output), attrs, n, _captures(n))
            )
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {}
        for n in self.nodes:
            for o in n.outputs:
                if o:
                    self.producer[o] = n
            for i in dict.fromkeys(n.inputs + n.captures):
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self._constants: dict[str, np.ndarray] = {}
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                self._constants[n.outputs[0]] = _constant_value(n)
        self._constants.update(constants or {})
        # static = does not depend on any graph input (weights, constants and what is computed from them)
        self.static: set[str] = set(self._initializers) | set(self._constants)
        for n in self.nodes:
            if all((not i) or i in self.static for i in n.inputs + n.captures) and n.op_type not in _RANDOM_OPS:
                self.static.update(o for o in n.outputs if o)

    # ------------------------------------------------------------------ constants
    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output (also through ``Identity``/``Cast``/``Transpose``
        of one, as exporters write deduplicated and transposed weights, and ``DequantizeLinear`` of constants,
        as quantisers write int8/int4 weights), or None when computed at run time."""
        if name in self._constants:
            return self._constants[name]
        t = self._initializers.get(name)
        if t is not None:
            arr = numpy_helper.to_array(t)
        else:
            p = self.producer.get(name)
            if p is None or p.op_type not in _FOLDABLE or not p.inputs or name not in self.static:
                return None
            if p.op_type == "DequantizeLinear":  # an int8/int4 weight: dequantised once, here
                if name != p.outputs[0]:
                    return None
                args = [self.constant(i) if i else None for i in p.inputs[:3]]
                if args[0] is None or args[1] is None or (len(p.inputs) > 2 and p.inputs[2] and args[2] is None):
                    return None
                arr = dequantize_linear(*(args + [None] * (3 - len(args))), axis=int(p.attr("axis", 1)),
                                        block_size=int(p.attr("block_size", 0)))
                self._constants[name] = arr
                return arr
            src = self.constant(p.inputs[0])
            if src is None:
                return None
            arr = _fold(p, src)
        self._constants[name] = arr
        return arr

    def is_initializer(self, name: str) -> bool:
        return name in self._initializers


def _captures(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors the subgraphs of a control-flow node read (they are no node inputs in ONNX)."""
    out: list[str] = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                for i in list(n.input) + _captures(n):
                    if i and i not in local and i not in out:
                        out.append(i)
                local.update(o for o in n.output if o)
    return out


def _topological(nodes, source: str) -> list[onnx.NodeProto]:
    """The nodes in topological order (onnxruntime accepts unsorted graphs, e.g. from fp16 converters);
    the original order when it already is one."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    if all(producer.get(i, -1) < k for k, n in enumerate(nodes) for i in n.input if i):
        return list(nodes)
    state = [0] * len(nodes)  # 0 unseen, 1 on the stack, 2 placed
    order: list[int] = []
    for start in range(len(nodes)):
        stack = [start]
        while stack:
            k = stack[-1]
            if state[k] == 2:
                stack.pop()
                continue
            state[k] = 1
            deps = [producer[i] for i in nodes[k].input if i in producer and state[producer[i]] != 2]
            for d in deps:
                if state[d] == 1:
                    raise ModelLoadError(f"{source}: the graph has a cycle through node {nodes[d].name!r}")
            if deps:
                stack.extend(deps)
            else:
                state[k] = 2
                order.append(k)
                stack.pop()
    return [nodes[k] for k in order]


_FOLDABLE = {"Identity", "Cast", "Transpose", "DequantizeLinear"}


def quantization_axis_shape(param: np.ndarray, ndim: int, axis: int, block_size: int = 0,
                            extent: int | None = None) -> np.ndarray:
    """A ``QuantizeLinear``/``DequantizeLinear`` scale or zero point shaped to broadcast against an ``ndim``-d
    tensor: a scalar (per tensor), a 1-D vector along ``axis`` (per channel), or blocks of ``block_size`` along
    ``axis`` (repeated to ``extent``, the tensor's length on that axis)."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1 and not block_size:
        return param.reshape(())
    axis = axis % ndim
    if block_size:
        param = np.repeat(param, block_size, axis=axis)
        return param[tuple(slice(0, extent) if k == axis else slice(None) for k in range(ndim))]
    return param.reshape([-1 if k == axis else 1 for k in range(ndim)])


def dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1,
                      block_size: int = 0) -> np.ndarray:
    """``(x - zero_point) * scale`` in float32 (ONNX ``DequantizeLinear``: per tensor, per channel along ``axis``
    or per block); ``x - zero_point`` is exact in float32, so each value is rounded once, as onnxruntime does."""
    x = np.asarray(x)
    shape = lambda p: quantization_axis_shape(p, x.ndim, axis, block_size, x.shape[axis % x.ndim] if x.ndim else 1)  # noqa: E731
    w = x.astype(np.float32)
    if zero_point is not None:
        w -= shape(zero_point).astype(np.float32)
    return w * shape(scale).astype(np.float32)


def _fold(node: Node, value: np.ndarray) -> np.ndarray:
    if node.op_type == "Cast":
        return value.astype(helper.tensor_dtype_to_np_dtype(node.attr("to")))
    if node.op_type == "Transpose":
        perm = node.attr("perm")
        return np.ascontiguousarray(np.transpose(value, perm))
    return value


_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _constant_value(node: Node) -> np.ndarray:
    for key, val in node.attrs.items():
        if key == "value":
            return numpy_helper.to_array(val)
        if key == "value_float":
            return np.array(val, dtype=np.float32)
        if key == "value_floats":
            return np.array(val, dtype=np.float32)
        if key == "value_int":
            return np.array(val, dtype=np.int64)
        if key == "value_ints":
            return np.array(val, dtype=np.int64)
    raise ModelLoadError(f"Constant node {node.name!r} has no supported value attribute ({list(node.attrs)})")


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, str | None]:
    """Load a model from a path or take a ``ModelProto``; returns (model, description, directory)."""
    if isinstance(model, onnx.ModelProto):
        check_tensors(model, "ModelProto")
        return model, "ModelProto", None
    path = model_path(model)
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    _check_nodes(proto, path)
    check_tensors(proto, str(path))
    return proto, str(path), str(path.parent)


def load_split(model: str | os.PathLike | onnx.ModelProto, base_dir: str | os.PathLike | None = None
               ) -> tuple[onnx.ModelProto, dict | None, str]:
    """Like :func:`load_model`, for a model onnx-lrp keeps: from a path, the model with its weights as stubs and
    the weights as arrays, each held once (:func:`onnx_lrp._stream.read_split`); a ``ModelProto`` as it is
    (weights ``None``: it is the user's, never changed), or, when its tensors use external data, a copy with that
    data read from ``base_dir`` (never from the working directory). Returns (model, weights, description)."""
    if isinstance(model, onnx.ModelProto):
        external = [t.name for t in external_tensors(model)]
        if not external:
            check_tensors(model, "ModelProto")
            return model, None, "ModelProto"
        if base_dir is None:
            raise ModelLoadError(f"ModelProto: {len(external)} tensor(s) ({external[0]!r}, ...) keep their data in "
                                 "external files; pass base_dir= (the folder holding them), or the path of the .onnx")
        base = Path(base_dir)
        if not base.is_dir():
            raise ModelLoadError(f"ModelProto: base_dir {str(base)!r} is not a folder")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the structure only: the data is in the external files
        weights: dict = {}
        desc = f"ModelProto (data in {base})"
        read_external(copy, base, weights, desc)
        check_tensors(copy, desc, held=weights)
        proto, rest = split_weights(copy, held=weights)
        weights.update(rest)
        return proto, weights, desc
    path = model_path(model)
    proto, weights = read_split(path)
    _check_nodes(proto, path)
    return proto, weights, str(path)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and ``Constant`` values of the main graph whose data lives in external files."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute
                                               if a.type == onnx.AttributeProto.TENSOR]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def model_path(model: str | os.PathLike) -> Path:
    """The ``.onnx`` file a path names (a folder holding exactly one), checked to exist."""
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(
            f"expected a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise ModelLoadError(
                f"{path}: is a folder with {len(candidates)} .onnx files "
                f"({', '.join(c.name for c in candidates) or 'none'}); name the file"
            )
        path = candidates[0]
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():  # reading a FIFO or a device would block or never end
        raise ModelLoadError(f"{path}: not a regular file (a FIFO, device or socket); give the .onnx file")
    return path


def _check_nodes(proto: onnx.ModelProto, path: Path) -> None:
    if not proto.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (the graph has no nodes)")
