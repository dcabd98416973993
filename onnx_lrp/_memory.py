"""The memory an explanation needs, estimated from its plan before anything runs.

Shapes come from onnx shape inference on the model (weights as data-less stubs) with the graph inputs' dimensions
set to those of the actual inputs; dimensions it cannot follow (a batch size lost in a computed ``Reshape``) count
as the batch size. The estimate adds what is alive when the relevance pass starts and what it adds:

- ``captured``: the tensors the rules read (the plan's values, ``O(T d)`` each: attention is recomputed);
- ``outputs``: the graph outputs (an LM's logits, ``T x vocab``);
- ``forward``: the largest transient of the forward pass: one chunk of one attention block's scores and
  probabilities (:func:`chunks_for`), with the mask it reads;
- ``backward``: gradients in flight and one block of the attention backward;
- ``allocator``: onnxruntime's arena holds the captured tensors and outputs in regions that grow in powers of two
  and fragment: 20% of them (measured on SmolLM2: 2,048 tokens 2.43 GB needed, 4,096 tokens 5.12 GB).

The weights are not counted: they are resident already. :class:`~onnx_lrp.errors.ResourceError` is raised when
the estimate exceeds the memory available (``MemAvailable``, a cgroup limit) or the ``memory_budget``.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from ._graph import Graph
from ._stream import copy_without_initializers, is_weight

CHUNK_BYTES = 256 << 20  # scores + probabilities of one attention chunk in the forward
ARENA_OVERHEAD = 0.2  # of captured tensors and outputs (module docstring)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(size: int | float | str) -> int:
    """``6_000_000_000``, ``"6GB"``, ``"512 MiB"`` -> bytes (units are binary: 1 GB = 2**30 bytes)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value, unit = float(size), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget must be a number of bytes or a size such as '6GB', got {size!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory_budget must be positive, got {size!r}")
    return n


def human(n: float) -> str:
    """Bytes as ``"1.2 GB"`` / ``"340 MB"``."""
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MB"


def available_bytes() -> int | None:
    """Memory this process can still take: ``MemAvailable``, bounded by the cgroup's limit (None: unknown)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            left = int(limit) - usage
            avail = left if avail is None else min(avail, left)
        break
    return avail


@dataclass
class Inferred:
    """Shapes inferred for one set of input shapes (unknown dimensions counted as the batch size) and dtypes."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]

    def dtype(self, name: str) -> np.dtype:
        return self.dtypes.get(name, np.dtype(np.float32))


class Shapes:
    """Inferred tensor shapes of ``graph`` for given input shapes (cached per input shapes)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._cache: dict[tuple, Inferred] = {}

    def __call__(self, feeds: dict[str, np.ndarray]) -> Inferred:
        key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self._infer(feeds)
        return self._cache[key]

    def _infer(self, feeds: dict[str, np.ndarray]) -> Inferred:
        src = self.graph.model
        model = copy_without_initializers(src)
        for t in src.graph.initializer:
            if is_weight(t):
                stub = model.graph.initializer.add()
                stub.name, stub.data_type = t.name, t.data_type
                stub.dims.extend(t.dims)
            else:
                model.graph.initializer.append(t)
        del model.graph.value_info[:]
        for vi in model.graph.input:
            if vi.name in feeds:
                shape = vi.type.tensor_type.shape
                shape.Clear()
                for d in feeds[vi.name].shape:
                    shape.dim.add().dim_value = int(d)
        out = Inferred({}, {})
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
        except Exception:  # shape inference gives up on some graphs: no estimate then
            return out
        batch = max((int(v.shape[0]) for v in feeds.values() if v.ndim), default=1)
        for v in list(inferred.value_info) + list(inferred.output):
            tt = v.type.tensor_type
            if not tt.HasField("shape"):
                continue
            out.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch
                                       for d in tt.shape.dim)
            if tt.elem_type:
                out.dtypes[v.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        return out


def nbytes(shape: Iterable[int], itemsize: int) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * itemsize


def chunks_for(blocks: Iterable[Any], shapes: Inferred, budget: int | None = None) -> int:
    """Chunks of query rows per attention block (a power of two) so that one chunk's scores, probabilities and
    guard (3 of its ``(B, N, rows, T)`` float tensors) stay within ``budget`` (default :data:`CHUNK_BYTES`);
    1 when all fit."""
    budget = budget or CHUNK_BYTES
    worst = max((nbytes(shapes.shapes[b.qk.outputs[0]], 4) for b in blocks if b.qk.outputs[0] in shapes.shapes),
                default=0)
    n = 1
    while 3 * worst / n > budget and n < 1024:
        n *= 2
    return n


@dataclass
class Estimate:
    """Bytes beyond the resident model: captured tensors, graph outputs, forward transient, relevance pass."""

    captured: int
    outputs: int
    forward: int
    backward: int

    @property
    def allocator(self) -> int:
        return int(ARENA_OVERHEAD * (self.captured + self.outputs))

    @property
    def total(self) -> int:
        return self.captured + self.outputs + self.forward + self.backward + self.allocator

    def describe(self) -> str:
        return (f"{human(self.total)} (captured activations {human(self.captured)}, outputs {human(self.outputs)}, "
                f"forward attention {human(self.forward)}, relevance pass {human(self.backward)}, "
                f"allocator {human(self.allocator)})")


def estimate(shapes: Inferred, captured: Iterable[str], outputs: Iterable[str], blocks: Iterable[Any], chunks: int,
             compute_itemsize: int, block_bytes: int, chunked: set[str] = frozenset()) -> Estimate:
    """The :class:`Estimate` of one explanation (module docstring): ``blocks`` whose ``pv`` is in ``chunked``
    run in ``chunks`` chunks; a mask of unknown shape counts as the scores of one head; other tensors of unknown
    shape count as 0."""
    def size(name: str, itemsize: int | None = None) -> int:
        s = shapes.shapes.get(name)
        return nbytes(s, itemsize or shapes.dtype(name).itemsize) if s is not None else 0

    def converted(name: str) -> int:  # fp16 tensors are converted to the compute dtype (a second copy)
        dt = shapes.dtype(name)
        return size(name, compute_itemsize) if dt.kind == "f" and dt.itemsize != compute_itemsize else 0

    cap = [size(v) + converted(v) for v in captured]
    forward, masks, scores = 0, [], 0
    for b in blocks:
        z = shapes.shapes.get(b.qk.outputs[0])
        if z is None:  # scores of unknown size: a whole block of them
            scores = block_bytes
            continue
        scores = max(scores, nbytes(z, 4))
        head = nbytes(z, 4) // max(1, z[-3] if len(z) >= 3 else 1)
        masks.append(max([size(s) for s in b.sides if size(s) > 4] or [head if b.sides else 0]))
        forward = max(forward, 3 * nbytes(z, 4) // (chunks if b.pv.name in chunked else 1) + masks[-1])
    # one block of query rows of the attention backward: at most block_bytes of scores, none without attention
    backward = 4 * max(cap, default=0) + 6 * min(block_bytes, scores) + 2 * max(masks, default=0)
    return Estimate(sum(cap), sum(size(o) for o in outputs), forward, backward)


def return_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc's ``malloc_trim``; elsewhere nothing): large
    buffers freed by onnxruntime (packed weights) would otherwise stay in the process's heap."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
