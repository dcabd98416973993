"""Reading an ``.onnx`` file with every weight held once.

``onnx.load`` holds the file's bytes and the parsed protobuf at the same time (twice the model's size), and
turning the weights into arrays afterwards makes a third copy of each. :func:`read_split` walks the protobuf
wire format of the file instead: everything but the weights' data is parsed as usual (a few MB), and the data of
each weight (a large float initializer, :func:`is_weight`) is read from the file straight into
its numpy array, from the model file or from its external-data file. Peak memory while loading is then the
weights once plus the graph's structure.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Collection, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .errors import ModelLoadError

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_LEN = 2  # wire type of length-delimited fields
WEIGHT_MIN_ELEMENTS = 1024  # float initializers at least this large are weights (bound as session inputs)
# weight types and their byte layout in raw_data (little-endian)
_DTYPES = {onnx.TensorProto.FLOAT: np.dtype("<f4"), onnx.TensorProto.DOUBLE: np.dtype("<f8"),
           onnx.TensorProto.FLOAT16: np.dtype("<f2")}
WEIGHT_TYPES = set(_DTYPES)
_SMALL = WEIGHT_MIN_ELEMENTS * 2  # initializers shorter than this (bytes) cannot be weights


def is_weight(t: onnx.TensorProto) -> bool:
    """A large float initializer (a weight matrix, an embedding table, a norm scale of a wide model)."""
    return t.data_type in WEIGHT_TYPES and int(np.prod(t.dims, dtype=np.int64)) >= WEIGHT_MIN_ELEMENTS


def split_weights(model: onnx.ModelProto, held: Collection[str] = ()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` whose weights are data-less stubs (name, type, shape), and the weights as arrays.

    Used on models onnx-lrp loaded itself, so the loaded protobuf (a second copy of every weight) can be freed.
    ``held``: weights already read into arrays elsewhere (their initializers are stubs already).
    """
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
               if is_weight(t) and t.name not in held}
    slim = copy_without_initializers(model)
    for t in model.graph.initializer:
        if t.name in weights or t.name in held:
            stub = slim.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
        else:
            slim.graph.initializer.append(t)
    return slim, weights


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _set_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _set_field(out.graph, fd, value)
    return out


def _set_field(msg: Any, fd: Any, value: Any) -> None:
    if getattr(fd, "is_repeated", None) or getattr(fd, "label", None) == fd.LABEL_REPEATED:
        getattr(msg, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def read_split(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model at ``path`` with its weights as data-less stubs (name, type, shape), and the weights as arrays
    (the result of ``split_weights(onnx.load(path))`` without holding the model twice)."""
    weights: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        model = bytearray()
        for field, wire, key_at, start, end in _fields(f, 0, size, path):
            if field == _GRAPH and wire == _LEN:
                graph = _read_graph(f, start, end, path, weights)
                model += _key(_GRAPH) + _varint(len(graph)) + graph
            else:
                model += _read(f, key_at, end, path)
    try:
        proto = onnx.ModelProto.FromString(bytes(model))
    except Exception as exc:  # protobuf's DecodeError
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    read_external(proto, path.parent, weights, str(path))
    check_tensors(proto, str(path), held=weights)
    proto, rest = split_weights(proto, held=weights)  # weights stored another way (float_data)
    weights.update(rest)
    return proto, weights


def _read_graph(f: BinaryIO, start: int, end: int, path: Path, weights: dict) -> bytearray:
    """The GraphProto bytes in [start, end) with each weight's raw data moved into ``weights``."""
    out = bytearray()
    for field, wire, key_at, s, e in _fields(f, start, end, path):
        if field == _INITIALIZER and wire == _LEN and e - s >= _SMALL:
            stub, raw = bytearray(), None
            for tf, tw, tk, ts, te in _fields(f, s, e, path):
                if tf == _RAW_DATA and tw == _LEN:
                    raw = (ts, te)
                else:
                    stub += _read(f, tk, te, path)
            tensor = onnx.TensorProto.FromString(bytes(stub))
            if raw is not None and is_weight(tensor):
                weights[tensor.name] = _read_array(f, raw[0], raw[1] - raw[0], tensor, path)
                out += _key(_INITIALIZER) + _varint(len(stub)) + stub
                continue
        out += _read(f, key_at, e, path)
    return out


def read_external(proto: onnx.ModelProto, base: Path, weights: dict, where: str) -> None:
    """Weights kept in external-data files: read into arrays, their stubs cleared of the file reference;
    other external tensors loaded into the protobuf as ``onnx.load`` would."""
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        file = (base / info.get("location", "")).resolve()
        if not info.get("location") or base.resolve() not in file.parents:
            raise ModelLoadError(f"{where}: initializer {t.name!r} refers to external data at "
                                 f"{info.get('location')!r}, outside the model's folder {base}")
        if not file.exists():
            raise ModelLoadError(f"{where}: initializer {t.name!r}: external data file {file} is missing")
        if not file.is_file():
            raise ModelLoadError(f"{where}: initializer {t.name!r}: external data {file} is not a regular file")
        offset, nbytes = int(info.get("offset", 0)), int(info.get("length", _expected_bytes(t) or 0))
        if offset < 0 or offset + nbytes > file.stat().st_size:
            raise ModelLoadError(f"{where}: initializer {t.name!r} of shape {list(t.dims)} claims bytes "
                                 f"[{offset}, {offset + nbytes}) of {file.name}, which holds {file.stat().st_size}")
        if is_weight(t):
            with open(file, "rb") as f:
                weights[t.name] = _read_array(f, offset, nbytes, t, file)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    # every other external tensor (small initializers, subgraph initializers, Constant attributes) as onnx.load
    try:
        external_data_helper.load_external_data_for_model(proto, str(base))
    except Exception as exc:  # onnx raises ValidationError, OSError, ...
        raise ModelLoadError(f"{where}: cannot read the model's external data ({type(exc).__name__}: {exc})") from exc


# element types by the TensorProto field holding their values (when not in raw_data)
_FIELDS = {"float_data": {onnx.TensorProto.FLOAT, onnx.TensorProto.COMPLEX64},
           "double_data": {onnx.TensorProto.DOUBLE, onnx.TensorProto.COMPLEX128},
           "int64_data": {onnx.TensorProto.INT64}, "uint64_data": {onnx.TensorProto.UINT32, onnx.TensorProto.UINT64},
           "string_data": {onnx.TensorProto.STRING}}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
_PACKED4 = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes of ``t``'s data in raw form from its shape and type (None for strings and unknown types)."""
    n = math.prod(int(d) for d in t.dims)
    if t.data_type in _PACKED4:
        return (n + 1) // 2
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def check_tensors(model: onnx.ModelProto, where: str, held: Collection[str] = ()) -> None:
    """Every initializer and ``Constant`` value of the main graph holds as much data as its shape claims (a header
    claiming an impossible size is refused here, before numpy allocates it). ``held``: initializers whose data was
    read elsewhere (stubs)."""
    tensors = [(t, f"initializer {t.name!r}") for t in model.graph.initializer if t.name not in held]
    tensors += [(a.t, f"node {n.name!r} ({n.op_type}) attribute {a.name!r}") for n in model.graph.node
                for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t, what in tensors:
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{where}: {what} has a negative dimension {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # sized against its file when read
        n = math.prod(int(d) for d in t.dims)
        want = _expected_bytes(t)
        if t.HasField("raw_data"):
            have, unit = len(t.raw_data), "bytes"
        else:
            field = next((f for f, types in _FIELDS.items() if t.data_type in types), "int32_data")
            have, unit = len(getattr(t, field)), "values"
            want = n * (2 if t.data_type in _COMPLEX else 1)
            if t.data_type in _PACKED4:
                want = (n + 1) // 2
        if want is not None and have != want and (have or n):
            raise ModelLoadError(f"{where}: {what} of shape {list(t.dims)} "
                                 f"({onnx.TensorProto.DataType.Name(t.data_type)}) claims {want} {unit} of data, "
                                 f"holds {have}: the file is corrupt or truncated")


def _read_array(f: BinaryIO, offset: int, nbytes: int, tensor: onnx.TensorProto, path: Path) -> np.ndarray:
    dtype, shape = _DTYPES[tensor.data_type], tuple(int(d) for d in tensor.dims)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise ModelLoadError(f"{path}: initializer {tensor.name!r} of shape {list(shape)} "
                             f"({onnx.TensorProto.DataType.Name(tensor.data_type)}) holds {nbytes} bytes, "
                             f"expected {expected}")
    arr = np.empty(shape, dtype=dtype)
    f.seek(offset)
    if f.readinto(memoryview(arr).cast("B")) != nbytes:
        raise ModelLoadError(f"{path}: the file ends inside initializer {tensor.name!r}")
    return arr.astype(dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------ protobuf wire format
def _fields(f: BinaryIO, start: int, end: int, path: Path) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, offset of the key, payload start, payload end) of each field in [start, end)."""
    pos = start
    while pos < end:
        key_at = pos
        key, pos = _read_varint(f, pos, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, e = _read_varint(f, pos, path)
            s = pos
        elif wire == 1:
            s, e = pos, pos + 8
        elif wire == 2:
            n, s = _read_varint(f, pos, path)
            e = s + n
        elif wire == 5:
            s, e = pos, pos + 4
        else:
            raise ModelLoadError(f"{path}: not a readable ONNX model (protobuf wire type {wire} at byte {key_at})")
        if e > end:
            raise ModelLoadError(f"{path}: not a readable ONNX model (truncated field at byte {key_at})")
        yield field, wire, key_at, s, e
        pos = e


def _read_varint(f: BinaryIO, pos: int, path: Path) -> tuple[int, int]:
    f.seek(pos)
    buf = f.read(10)
    value = 0
    for i, b in enumerate(buf):
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return value, pos + i + 1
    raise ModelLoadError(f"{path}: not a readable ONNX model (bad varint at byte {pos})")


def _read(f: BinaryIO, start: int, end: int, path: Path) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise ModelLoadError(f"{path}: the file is truncated")
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LEN)
