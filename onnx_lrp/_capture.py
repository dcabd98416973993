"""Forward capture: one onnxruntime run that also returns the intermediate tensors the rules need.

The session runs a copy of the graph whose outputs are extended with the needed tensors (and ``Shape`` nodes
for tensors whose shape alone is needed); the user's ``ModelProto`` is never changed.

Weights are held once: the large float initializers become graph inputs of the session copy and are bound
at every run from the arrays the rules use (``graph.constant``), so onnxruntime keeps no copy of its own.
Outputs stay where onnxruntime wrote them (IO binding) and reach the rules through DLPack without a copy: as
numpy arrays on the CPU, as CuPy arrays on CUDA (the same code path on both devices).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Sequence

import numpy as np
import onnx
try:
    import onnxruntime as ort
except ImportError as exc:  # neither onnxruntime nor onnxruntime-gpu
    raise ImportError(
        "onnx-lrp needs onnxruntime: pip install 'onnx-lrp[cpu]' (onnxruntime) or 'onnx-lrp[gpu]' "
        "(onnxruntime-gpu + cupy-cuda13x); never both"
    ) from exc
from onnx import helper, numpy_helper

from ._device import CPU, Device, check_session
from ._graph import Graph
from ._stream import copy_without_initializers, is_weight
from ._inputs import ort_failure, quiet_run
from ._rows import ROWS, RowHead, gather_rows, rows_feed
from .errors import ConfigError, ModelLoadError
from .ops.attention_blocks import Block

SHAPE_PREFIX = "onnx_lrp::shape::"
_SHAPES, _RANKS = "onnx_lrp::shapes", "onnx_lrp::ranks"  # the shapes asked for, concatenated, and their lengths
# com.microsoft ops that pre-pack their constant inputs when the session is created
_PREPACKING_OPS = {"MatMulNBits", "GatherBlockQuantized"}


def prepacked_constants(graph: Any) -> set[str]:
    """Initializers that quantised ops read after their first input (scales, zero points, bias): they stay
    initializers of the session, never bound at run time (onnxruntime 1.32's MatMulNBits at accuracy_level 4
    returns zeros when its scales come in as a graph input)."""
    return {i for n in graph.nodes if n.op_type in _PREPACKING_OPS and n.domain == "com.microsoft"
            for i in n.inputs[1:] if i and graph.is_initializer(i)}


def default_session_options() -> ort.SessionOptions:
    """onnxruntime's defaults, except:

    - idle pool threads sleep instead of spinning: the relevance pass runs right after the forward and would
      otherwise compete with them for the cores (measured 20% faster on 2 cores);
    - priority-based execution order: with the default order the ``Shape`` nodes added for the rules run
      late and keep their tensors alive to the end of the run (SmolLM2, 512 tokens: +2.2 GB vs +0.85 GB);
    - onnxruntime logs errors only (its warnings about the graph are not for the user; failures are raised).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return opts


class ForwardCapture:
    """An onnxruntime session over the model with extra outputs; rebuilt only when new tensors are needed.

    ``device``: where the session runs and the outputs live (:mod:`onnx_lrp._device`): on the CPU, weights are
    bound from and outputs returned as numpy arrays; on CUDA, as CuPy arrays on the GPU. ``attention``: attention
    blocks (:func:`~onnx_lrp.ops.attention_blocks.find_blocks`) that runs on long inputs may evaluate in chunks of
    query rows (:func:`chunk_attention`), so that the forward holds one chunk of one layer's scores at a time.
    ``rows``: the output's position-wise head (:func:`onnx_lrp._rows.find_row_head`), computed at the rows fed as
    :data:`~onnx_lrp._rows.ROWS` only.
    """

    def __init__(self, graph: Graph, device: Device = CPU, session_options: ort.SessionOptions | None = None,
                 attention: dict[str, Block] | None = None, prepack: bool = False,
                 share: ForwardCapture | None = None, rows: RowHead | None = None):
        self.graph = graph
        self.rows = rows  # a head computed at the rows fed as ROWS only (onnx_lrp._rows)
        self.device = device
        self.providers = list(device.providers)
        self.session_options = session_options
        self.exposed: set[str] = set()
        self.shape_exposed: set[str] = set()
        self.session: ort.InferenceSession | None = None
        self.attention = attention or {}
        self.prepack = prepack and device.name == "cpu"
        self._chunked: dict[int, ort.InferenceSession] = {}  # sessions by chunks per attention block
        self._rank_of: dict[str, int | None] | None = None
        init = graph.model.graph.initializer
        self._prepacked = prepacked_constants(graph)
        self.weight_names = [t.name for t in init if is_weight(t) and t.name not in self._prepacked]
        if share is not None:  # another capture of the same graph: its weight arrays (uploaded once)
            weights = share.weights
        else:
            weights = {n: device.to_device(np.ascontiguousarray(graph.constant(n))) for n in self.weight_names}
            device.synchronize()  # uploads finish before onnxruntime's stream reads them
        self._weights = weights
        # weights registered with the session options (prepack): names, and the OrtValues kept alive; shared with
        # ``share`` when both use the same options (onnxruntime takes each name once per options object)
        shared = share is not None and session_options is not None and share.session_options is session_options
        self._external: tuple[set, list] = share._external if shared else (set(), [])
        self._lock = threading.Lock()
        self._shape_order: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> shaped tensors

    def set_prepack(self, prepack: bool, session_options: ort.SessionOptions | None) -> None:
        """Switch pre-packing (CPU only); the sessions, and the packed copies of the weights they hold, are dropped
        and rebuilt at the next run with ``session_options``: a pre-packing capture registers the weights with
        its options, so it needs options no other session uses."""
        with self._lock:
            self.prepack = prepack and self.device.name == "cpu"
            self.session_options = session_options
            self._external = (set(), [])
            self.session, self._chunked = None, {}

    @property
    def weights(self) -> dict[str, Any]:
        """The arrays bound as weights at every run (on the capture's device)."""
        return self._weights

    def prepare(self, values: set[str], shapes: set[str]) -> None:
        """Make sure the session returns ``values`` and the shapes of ``shapes`` (thread-safe: the new session
        and what it exposes are swapped in together)."""
        values = {v for v in values if self._needs_output(v)}
        shapes = {s for s in shapes if self._needs_output(s)}  # also for returned tensors: run() asks Shape nodes
        with self._lock:
            if self.session is not None and values <= self.exposed and shapes <= self.shape_exposed:
                return
            exposed, shape_exposed = self.exposed | values, self.shape_exposed | shapes
            session = self._session(self._session_model(exposed, shape_exposed))
            self.session, self.exposed, self.shape_exposed = session, exposed, shape_exposed
            self._chunked = {}

    def _session_model(self, exposed: set[str], shape_exposed: set[str], chunks: int = 1) -> onnx.ModelProto:
        """The model with weights as graph inputs (``prepack``: as initializers whose data onnxruntime reads from
        our arrays), the ``exposed`` tensors (and the shapes of ``shape_exposed``) as extra outputs, and
        attention blocks in ``chunks`` chunks of query rows."""
        src = self.graph.model
        model = copy_without_initializers(src)
        weights = set(self.weight_names)
        model.graph.initializer.extend(
            numpy_helper.from_array(self.graph.constant(t.name), t.name) if t.name in self._prepacked else t
            for t in src.graph.initializer if t.name not in weights)
        for t in src.graph.initializer:
            if t.name in weights and self.prepack:
                model.graph.initializer.append(_external_stub(t))
            elif t.name in weights:
                model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        existing = set(self.graph.output_names)
        for name in sorted(exposed - existing):
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        # each Shape node right after the producer of its tensor (see default_session_options)
        del model.graph.node[:]
        nodes = (chunk_attention(self.graph.nodes, self.chunkable(exposed | shape_exposed), chunks, self._ranks())
                 if chunks > 1 else [n.proto for n in self.graph.nodes])
        if self.rows is not None:
            nodes = gather_rows(self.rows, nodes)
            model.graph.input.append(helper.make_tensor_value_info(ROWS, onnx.TensorProto.INT64, ["batch", "k", 1]))
        order = []
        for node in nodes:
            model.graph.node.append(node)
            for o in node.output:
                if o in shape_exposed:
                    out = SHAPE_PREFIX + o
                    model.graph.node.append(helper.make_node("Shape", [o], [out], name=out))
                    order.append(o)
        if order:  # two outputs, not one per shape: each output costs onnxruntime and Python (SmolLM2: 1,266)
            shapes = [SHAPE_PREFIX + o for o in order]
            for o in shapes:
                model.graph.node.append(helper.make_node("Shape", [o], [o + "::rank"], name=o + "::rank"))
            model.graph.node.append(helper.make_node("Concat", shapes, [_SHAPES], name=_SHAPES, axis=0))
            model.graph.node.append(helper.make_node("Concat", [o + "::rank" for o in shapes], [_RANKS],
                                                     name=_RANKS, axis=0))
            model.graph.output.extend([onnx.ValueInfoProto(name=_SHAPES), onnx.ValueInfoProto(name=_RANKS)])
        return model

    def _needs_output(self, name: str) -> bool:
        g = self.graph
        return name not in g.input_names and not g.is_initializer(name) and g.constant(name) is None

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        if self.session_options is None:
            self.session_options = default_session_options()
        opts = self.session_options
        if self.prepack:  # once per options object: every session made with them reads the same arrays
            names, kept = self._external
            new = [n for n in self.weight_names if n not in names]
            values = [ort.OrtValue.ortvalue_from_numpy(self._weights[n]) for n in new]
            if new:
                try:
                    opts.add_external_initializers(new, values)
                except Exception as exc:  # onnxruntime takes each name once per options object
                    raise ConfigError(
                        f"{self.graph.source}: these session_options already hold the weights of another "
                        f"pre-packing Explainer ({exc}); give each Explainer(prepack=True) session options of "
                        "its own") from exc
                names.update(new)
                kept.extend(values)
        try:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.graph.source}: onnxruntime cannot load the model: {exc}") from exc
        check_session(session, self.device.name, self.graph.source)
        concat = next((n for n in reversed(model.graph.node) if list(n.output) == [_SHAPES]), None)
        self._shape_order[session] = [i[len(SHAPE_PREFIX):] for i in concat.input] if concat is not None else []
        return session

    def chunkable(self, seen: set[str] | None = None) -> list[Block]:
        """Blocks whose inner tensors are neither returned nor shape-read (``seen``: by default what the session
        exposes), that reshape no scores, and whose chain operands have known ranks."""
        seen = (self.exposed | self.shape_exposed if seen is None else seen) | set(self.graph.output_names)
        ranks = self._ranks()
        out = []
        for b in self.attention.values():
            inner = {o for n in b.nodes if n is not b.pv for o in n.outputs}
            if (not inner & seen and all(n.op_type != "Reshape" for n in b.chain + b.after)
                    and all(ranks.get(s) is not None for s in _chain_operands(b))):
                out.append(b)
        return out

    def _ranks(self) -> dict[str, int | None]:
        """Ranks of the attention chains' operands: from their values (constants) or onnx shape inference."""
        if self._rank_of is None:
            operands = {s for b in self.attention.values() for s in _chain_operands(b)}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.graph.model, data_prop=True).graph.value_info
            except Exception:  # shape inference refuses some contrib graphs: nothing is chunked then
                inferred = []
            known = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred
                     if v.type.tensor_type.HasField("shape")}
            self._rank_of = {}
            for s in operands:
                c = self.graph.constant(s)
                self._rank_of[s] = c.ndim if c is not None else known.get(s)
        return self._rank_of

    def chunked_session(self, chunks: int) -> ort.InferenceSession:
        """The session whose attention blocks run in ``chunks`` chunks of query rows (1: the plain one)."""
        with self._lock:
            if self.session is None:  # dropped by set_prepack
                self.session = self._session(self._session_model(self.exposed, self.shape_exposed))
            session = self.session
            if chunks <= 1 or not self.chunkable():
                return session
            sess = self._chunked.get(chunks)
            if sess is None:
                sess = self._chunked[chunks] = self._session(
                    self._session_model(self.exposed, self.shape_exposed, chunks))
            return sess

    def run(self, feeds: dict[str, np.ndarray], values: Sequence[str], shapes: Sequence[str],
            chunks: int = 1) -> tuple[dict, dict]:
        """Run once; returns (tensor values by name, shapes by name). Values live on the capture's device.
        ``chunks``: attention blocks in that many chunks of query rows (:meth:`chunked_session`); one session
        throughout (prepare() may swap in a new one meanwhile). With a row-restricted head (``rows``) the head
        runs at the rows ``feeds`` give as :data:`~onnx_lrp._rows.ROWS`, by default at every position."""
        session = self.chunked_session(chunks)
        if self.rows is not None and ROWS not in feeds:
            feeds = rows_feed(self.rows, feeds)  # the head at every position
        names = list(dict.fromkeys(values))
        if shapes:
            names += [_SHAPES, _RANKS]
        out_values, out_shapes = {}, {}
        outs = self._run(session, feeds, names)
        for n, ov in zip(names, outs):
            if n not in (_SHAPES, _RANKS):
                out_values[n] = self._wrap(ov)
        if shapes:
            flat, ranks = outs[-2].numpy().tolist(), outs[-1].numpy().tolist()
            ends = np.cumsum(ranks).tolist()
            every = {t: tuple(flat[e - r: e]) for t, r, e in zip(self._shape_order[session], ranks, ends)}
            out_shapes = {t: every[t] for t in shapes}
        return out_values, out_shapes

    def _run(self, session: ort.InferenceSession, feeds: dict, names: list[str]) -> list:
        binding = session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        if not self.prepack:
            for name, arr in self._weights.items():
                self._bind_weight(binding, name, arr)
        for n in names:
            on_host = n in (_SHAPES, _RANKS) or self.device.name == "cpu"
            binding.bind_output(n, "cpu" if on_host else self.device.name, 0 if on_host else self.device.index)
        try:
            session.run_with_iobinding(binding, quiet_run())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ort_failure(self.graph, feeds, exc) from exc
        return binding.get_outputs()

    def _bind_weight(self, binding: Any, name: str, arr: Any) -> None:
        if isinstance(arr, np.ndarray):
            binding.bind_cpu_input(name, arr)
        else:  # a CuPy array: onnxruntime reads it in place
            binding.bind_input(name, "cuda", arr.device.id, arr.dtype.type, list(arr.shape), arr.data.ptr)

    def _wrap(self, ov: Any) -> Any:
        """An array on the memory of an onnxruntime output, no copy: numpy on the host, CuPy on a GPU."""
        return array_view(ov, np if ov.device_name().lower() == "cpu" else self.device.xp)

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []


def _external_stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """A data-less initializer entry; its data comes from ``SessionOptions.add_external_initializers`` (our array,
    no copy)."""
    stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    stub.data_location = onnx.TensorProto.EXTERNAL
    stub.external_data.add(key="location", value="onnx-lrp-array")
    return stub


def chunk_attention(nodes: list[Any], blocks: list[Block], n: int, ranks: dict[str, int | None]
                    ) -> list[onnx.NodeProto]:
    """The graph's ``nodes`` (:class:`~onnx_lrp._graph.Node`) as protos, each attention block
    ``O = softmax(f(A Bt)) V`` evaluated in ``n`` chunks of query rows.

    Chunk ``c`` takes rows ``[c k, (c + 1) k)`` of ``A`` (``k = ceil(rows / n)``, the last chunks may be empty)
    and of every operand of the score chain ``f`` of rank >= 2 (a mask ``(B, 1, rows, T)``; one with a single row
    is broadcast as before), runs the block's own nodes on them, and the chunks' outputs are concatenated: the
    same arithmetic row by row, with one chunk's scores and probabilities alive at a time.
    """
    by_pv = {b.pv.name: b for b in blocks}
    dropped = {m.name for b in blocks for m in b.nodes}
    out: list[onnx.NodeProto] = []
    for node in nodes:
        b = by_pv.get(node.name)
        if b is not None:
            out.extend(_chunked_block(b, n, ranks))
        elif node.name not in dropped:
            out.append(node.proto)
    return out


def _chain_operands(b: Block) -> list[str]:
    inner = {b.qk.outputs[0]} | {o for m in b.chain for o in m.outputs}
    return list(dict.fromkeys(i for m in b.chain for i in m.inputs if i and i not in inner))


def _chunked_block(b: Block, n: int, ranks: dict[str, int | None]) -> list[onnx.NodeProto]:
    p = f"onnx_lrp::chunk::{b.pv.name}::"
    nodes: list[onnx.NodeProto] = []

    def const(name: str, values: list[int]) -> str:
        nodes.append(helper.make_node("Constant", [], [p + name], name=p + name,
                                      value=numpy_helper.from_array(np.array(values, dtype=np.int64))))
        return p + name

    def op(op_type: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [p + name], name=p + name, **attrs))
        return p + name

    minus2, axis, one = const("minus2", [-2]), const("axis", [-2]), const("one", [1])
    rows = op("Gather", [op("Shape", [b.a], "shape_a"), minus2], "rows")
    k = op("Div", [op("Add", [rows, const("n_minus_1", [n - 1])], "rows_up"), const("n", [n])], "k")
    sides = [s for s in _chain_operands(b) if (ranks.get(s) or 0) >= 2]
    dims = {s: op("Gather", [op("Shape", [s], f"shape_{j}"), minus2], f"dim_{j}") for j, s in enumerate(sides)}
    bounds = [op("Mul", [k, const(f"c{c}", [c])], f"bound{c}") for c in range(n + 1)]
    results = []
    for c in range(n):
        start, end = bounds[c], bounds[c + 1]
        names = {b.a: op("Slice", [b.a, start, end, axis], f"a{c}")}
        for j, s in enumerate(sides):  # rows of a row-shaped operand; a one-row operand stays whole
            last = op("Sub", [dims[s], one], f"last_{j}_{c}")
            names[s] = op("Slice", [s, op("Min", [start, last], f"s_{j}_{c}"), op("Min", [end, dims[s]], f"e_{j}_{c}"),
                                    axis], f"side_{j}_{c}")
        for m in [b.qk, *b.chain, b.softmax, *b.after, b.pv]:
            node = onnx.NodeProto()
            node.CopyFrom(m.proto)
            node.name = f"{p}{m.name}#{c}"
            for i, t in enumerate(node.input):
                node.input[i] = names.get(t, t)
            for i, t in enumerate(node.output):
                if t:
                    names[t] = node.output[i] = f"{p}{t}#{c}"
            nodes.append(node)
        results.append(names[b.pv.outputs[0]])
    nodes.append(helper.make_node("Concat", results, [b.pv.outputs[0]], name=p + "concat", axis=-2))
    return nodes


def array_view(ov: Any, xp: Any) -> Any:
    """An ``xp`` array sharing the memory of the ``OrtValue`` ``ov`` (DLPack; it keeps ``ov`` alive).

    onnxruntime < 1.26 has no DLPack export (CPU only: the GPU extra needs >= 1.27): :func:`host_view`. Types
    DLPack cannot carry (bfloat16 into numpy) are copied. onnxruntime <= 1.31 exports bool tensors as uint8:
    they are viewed as bool again, so that masks keep their logic (``~mask``).
    """
    if not hasattr(ov, "__dlpack__"):
        return host_view(ov)
    try:
        arr = xp.from_dlpack(ov)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return xp.asarray(ov.numpy())
    if ov.data_type() == "tensor(bool)" and arr.dtype != xp.bool_:
        arr = arr.view(xp.bool_)
    return arr


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def ort_dtype(ov: Any) -> np.dtype | None:
    t = _ORT_TYPES.get(ov.data_type())
    return None if t is None else np.dtype(t)


class _Held:
    """Exposes onnxruntime-owned host memory to numpy; holds the ``OrtValue`` so the memory outlives the view."""

    def __init__(self, ov: Any, dtype: np.dtype, shape: tuple[int, ...]):
        self.ov = ov
        self.__array_interface__ = {"data": (ov.data_ptr(), False), "shape": shape, "typestr": dtype.str,
                                    "version": 3}


def host_view(ov: Any) -> np.ndarray:
    """A numpy view of a CPU ``OrtValue`` (no copy; types numpy cannot view, e.g. bfloat16, are copied)."""
    dtype, shape = ort_dtype(ov), tuple(ov.shape())
    if dtype is None or int(np.prod(shape, dtype=np.int64)) == 0:
        return ov.numpy()
    return np.asarray(_Held(ov, dtype, shape))
