"""Matrix products of the relevance pass on the CPU, run by onnxruntime's MLAS kernels.

The relevance pass is a chain of ``G W^T`` products with the model's weights. numpy's OpenBLAS picks its kernels by
CPU model and may run far below the machine's peak (on the AMD EPYC development machine it chooses its AVX2
"Haswell" kernels: 105 GFLOP/s on one core, against 190-220 GFLOP/s for MLAS's AVX-512 kernels on the same
products; ``benchmarks/bench_speed.py``), and its thread pool competes with onnxruntime's. MLAS is the kernel
library the forward pass already uses; a one-node ``Gemm`` session per dtype runs each product with
``threads`` intra-op threads, writing into a numpy array (no copy). Products of two run-time tensors with batch
axes (the attention products ``G P^T``, ``A^T G``...) run as one ``com.microsoft.FusedMatMul`` node, which reads
an operand's transposed view in place and applies the rule's scale (against numpy at 512 tokens, 9 heads:
1.6x faster on one thread, 2.3x on two; ``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from onnx import TensorProto, helper

_MIN_FLOPS = 1 << 20  # below this a numpy product is cheaper than a session call (~50 us)
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Gemm:
    """``alpha * (a @ b)`` for numpy arrays through onnxruntime's kernels with ``threads`` intra-op threads: ``Gemm``
    for 2-D float32/float64 operands, ``FusedMatMul`` for float32 operands with batch axes (broadcast as in
    ``numpy.matmul``); small or other products fall back to numpy.

    ``prepack(weights)``: products with one of these arrays (or its transpose) as ``b`` run in a session of their
    own that holds it as an initializer, which MLAS packs once (a packed copy of each weight) instead of at every
    call (measured ~20% of a 128-row product).
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._sessions: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._packable: dict[int, np.ndarray] = {}  # data pointer -> weight

    def prepack(self, weights: list[np.ndarray]) -> None:
        self._packable.update((w.ctypes.data, w) for w in weights if w.ndim == 2 and w.dtype in _TYPES
                              and w.flags.c_contiguous)

    def unpack(self) -> None:
        """Forget the weights given to :meth:`prepack` and drop the sessions holding their packed copies."""
        with self._lock:
            self._packable.clear()
            self._sessions = {k: s for k, s in self._sessions.items() if k[0] == "FusedMatMul" or k[2] is None}

    def __call__(self, a: np.ndarray, b: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        if (not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.ndim < 2 or b.ndim < 2
                or a.dtype != b.dtype or a.dtype not in _TYPES
                or 2 * a.size * b.shape[-1] < _MIN_FLOPS):
            return _scaled(a @ b, alpha)
        if a.ndim > 2 or b.ndim > 2:
            return self._batched(a, b, alpha) if a.dtype == np.float32 else _scaled(a @ b, alpha)
        if b.flags.c_contiguous:
            trans_b, bb = 0, b
        elif b.T.flags.c_contiguous:  # a transposed weight: Gemm reads it transposed, in place
            trans_b, bb = 1, b.T
        else:
            return _scaled(a @ b, alpha)
        a = np.ascontiguousarray(a)
        out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        w = self._packable.get(bb.ctypes.data)
        packed = w is not None and w.shape == bb.shape
        sess = self._session(a.dtype, trans_b, w if packed else None)
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        if not packed:
            binding.bind_cpu_input("b", bb)
        binding.bind_output("y", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        sess.run_with_iobinding(binding)
        return _scaled(out, alpha)

    def _batched(self, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
        if a.shape[-1] != b.shape[-2]:
            return _scaled(a @ b, alpha)  # numpy's error names the shapes
        m, n = a.shape[-2], b.shape[-1]
        (a, trans_a), (b, trans_b) = _operand(a), _operand(b)
        out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (m, n), dtype=a.dtype)
        key = ("FusedMatMul", trans_a, trans_b, float(alpha))
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", alpha=float(alpha),
                                        transA=trans_a, transB=trans_b)
                t = TensorProto.FLOAT
                sess = self._sessions[key] = self._new_session(
                    node, [helper.make_tensor_value_info(n, t, None) for n in ("a", "b")],
                    helper.make_tensor_value_info("y", t, None))
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        binding.bind_cpu_input("b", b)
        binding.bind_output("y", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        sess.run_with_iobinding(binding)
        return out

    def _new_session(self, node: Any, inputs: list, output: Any, weight: np.ndarray | None = None) -> Any:
        """A session running the one ``node`` with ``threads`` threads; ``weight``: the data of its initializer
        ``b`` (held in place, no copy)."""
        import onnxruntime as ort

        inits = []
        if weight is not None:
            stub = TensorProto(name="b", data_type=_TYPES[weight.dtype], dims=list(weight.shape))
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="onnx-lrp-array")
            inits.append(stub)
        model = helper.make_model(helper.make_graph([node], "product", inputs, [output], inits),
                                  opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if weight is not None:  # the initializer "b" is the weight itself (no copy)
            opts.add_external_initializers(["b"], [ort.OrtValue.ortvalue_from_numpy(weight)])
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _session(self, dtype: np.dtype, trans_b: int, weight: np.ndarray | None = None) -> Any:
        key = (dtype, trans_b, None if weight is None else weight.ctypes.data)
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                t = _TYPES[dtype]
                node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=trans_b)
                b_shape = ["n", "k"] if trans_b else ["k", "n"]
                inputs = [helper.make_tensor_value_info("a", t, ["m", "k"])]
                if weight is None:  # else an initializer whose data is the weight itself
                    inputs.append(helper.make_tensor_value_info("b", t, b_shape))
                sess = self._sessions[key] = self._new_session(
                    node, inputs, helper.make_tensor_value_info("y", t, ["m", "n"]), weight)
            return sess


def _operand(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(array, transposed)``: a C-contiguous array and whether the product reads it transposed (its last two
    axes swapped: a ``swapaxes`` view is read in place); other strided views are copied."""
    if x.flags.c_contiguous:
        return x, 0
    t = x.swapaxes(-1, -2)
    if t.flags.c_contiguous:
        return t, 1
    return np.ascontiguousarray(x), 0


def _scaled(x: Any, alpha: float) -> Any:
    return x if alpha == 1.0 else x * alpha
