"""Input checks: what :meth:`~onnx_lrp.Explainer.prepare_inputs` verifies before onnxruntime runs.

Every failed check raises :class:`~onnx_lrp.errors.InputError` naming the input, what the model expects and what
was given (the table of checks: ``docs/errors.md``).

1. *Each array* (:meth:`InputChecks.convert`): a rectangular numeric array of the kind the graph declares
   (integer, float, bool), cast to the declared dtype without overflow, of the declared rank and fixed sizes,
   finite, and not empty where emptiness cannot mean anything (ids, masks, relevance sources).
2. *Across inputs* (:meth:`InputChecks.check`): axes the graph names alike agree (``batch_size``,
   ``sequence_length``; expressions such as ``past_sequence_length + sequence_length`` are evaluated); attention
   masks hold 0/1, at least one 1 per row, and cover the ids plus the past.
3. *The model's own limits*, read from the graph: ids that index a constant table directly (word, segment and
   learned position embeddings) lie in ``[0, rows)``; indices and slices of constant tables that the graph computes
   from the inputs (BERT's position buffer, RoBERTa's offset positions, RoPE caches) stay inside the table. These
   are evaluated by a small onnxruntime session over the graph's integer and shape arithmetic (no weights).

:func:`ort_failure` turns an onnxruntime failure during a run into an ``InputError`` that names the node and the
inputs it reads (a ``ResourceError`` when an allocation failed).
"""
from __future__ import annotations

import ast
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._graph import Graph, GraphInput, Node
from .errors import InputError, ResourceError

# inputs whose values are attention masks (transformers' names): 0/1, at least one 1 per row
MASK_INPUTS = ("attention_mask", "decoder_attention_mask", "encoder_attention_mask")
# integer ids reach their lookup through these without changing their values
_ID_CHAIN = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
# lookups of a constant table by ids: the table is input 0, gathered along axis 0
_LOOKUPS = {("Gather", "ai.onnx"): "axis", ("GatherBlockQuantized", "com.microsoft"): "gather_axis"}
_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}
_BIG = 2**62  # Slice ends at or beyond this mean "to the end" (exporters write INT64_MAX)


@dataclass(frozen=True)
class TableLookup:
    """``Gather(table, ids)`` where ``ids`` are the values of graph input ``input``: ids must be in ``[0, rows)``."""

    input: str
    node: str
    table: str
    rows: int


@dataclass(frozen=True)
class DerivedIndex:
    """A ``Gather`` or ``Slice`` of a constant ``data`` tensor whose indices (or starts/ends) the graph computes
    from ``inputs`` (their values or shapes), evaluated before each run."""

    node: Node
    data: str
    dims: tuple[int, ...]
    tensors: tuple[str, ...]  # Gather: (indices,); Slice: (starts, ends[, axes[, steps]])
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class PatchGrid:
    """A ``Conv`` patch embedding of image input ``input`` whose patches are added to a constant position table
    ``table`` of ``patches`` patch rows (after ``extra`` other tokens such as [CLS])."""

    input: str
    conv: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    table: str
    patches: int
    extra: int

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patches along (height, width) for an image of that size (ONNX Conv arithmetic)."""
        return tuple((n + self.pads[a] + self.pads[a + 2] - self.dilation[a] * (self.kernel[a] - 1) - 1)
                     // self.stride[a] + 1 for a, n in enumerate((height, width)))

    def side(self, patches: int, a: int) -> int:
        """The smallest image side giving ``patches`` patches along spatial axis ``a``."""
        return ((patches - 1) * self.stride[a] + self.dilation[a] * (self.kernel[a] - 1) + 1
                - self.pads[a] - self.pads[a + 2])


class InputChecks:
    """The checks of one model's inputs, derived once from its graph.

    ``sources``: graph inputs that are relevance sources (never empty).
    """

    def __init__(self, graph: Graph, sources: Iterable[str] = ()):
        self.graph = graph
        self.specs = {i.name: i for i in graph.inputs}
        self.sources = set(sources)
        self.lookups = table_lookups(graph)
        self.derived = derived_indices(graph, {lk.node for lk in self.lookups})
        self.grids = patch_grids(graph)
        self._session: Any = None
        self._session_failed = False
        self._lock = threading.Lock()

    def table_rows(self, name: str) -> int | None:
        """Rows of the smallest constant table that input ``name``'s ids index directly, or None."""
        rows = [lk.rows for lk in self.lookups if lk.input == name]
        return min(rows) if rows else None

    # ------------------------------------------------------------------ each array
    def convert(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` as arrays of the declared dtypes, each checked on its own (names, kind, range of the cast,
        rank, fixed sizes, finite values, emptiness)."""
        src = self.graph.source
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a dict of input name -> array, got {type(inputs).__name__}")
        unknown = [k for k in inputs if k not in self.specs]
        if unknown:
            raise InputError(f"{src}: unknown input name(s) {unknown}; the model's inputs are {list(self.specs)}")
        return {name: self._array(name, inputs[name], spec) for name, spec in self.specs.items() if name in inputs}

    def _array(self, name: str, value: Any, spec: GraphInput) -> np.ndarray:
        src, want = self.graph.source, _describe(spec)
        if type(value).__module__.split(".")[0] == "cupy":
            value = value.get()
        if value is None or isinstance(value, (str, bytes, dict, set)):
            raise InputError(f"{src}: input {name!r} must be an array {want}, got {type(value).__name__}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{src}: input {name!r} is not a rectangular array (rows of different lengths? pad "
                             f"them and pass an attention_mask); the model expects {want}: {exc}") from None
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{src}: input {name!r} must hold numbers {want}, got dtype {arr.dtype}")
        if spec.is_int and arr.dtype.kind not in "iub":
            raise InputError(f"{src}: input {name!r} must hold integers {want}, got {arr.dtype}")
        if spec.is_float and arr.dtype.kind != "f":
            raise InputError(f"{src}: input {name!r} must hold floats {want}, got {arr.dtype} (images: convert to "
                             "float and normalise as the model's preprocessor does)")
        if spec.elem_type == onnx.TensorProto.BOOL and (arr.dtype.kind == "f" or arr.dtype.kind in "iu" and arr.size
                                                        and (arr.min() < 0 or arr.max() > 1)):
            raise InputError(f"{src}: input {name!r} is boolean {want}: give bools or 0/1 integers, got {arr.dtype}"
                             + (f" in [{arr.min()}, {arr.max()}]" if arr.dtype.kind in "iu" else ""))
        if spec.elem_type and arr.dtype != spec.numpy_dtype:
            arr = _cast(arr, spec.numpy_dtype, name, src)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))
            raise InputError(f"{src}: input {name!r} holds {len(bad)} NaN/inf value(s) (first at index "
                             f"{tuple(int(i) for i in bad[0])}): inputs must be finite")
        if spec.shape and arr.ndim != len(spec.shape):
            raise InputError(f"{src}: input {name!r} must have rank {len(spec.shape)} {tuple(spec.shape)}, "
                             f"got shape {arr.shape}")
        for k, (d, a) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(d, int) and d > 0 and d != a:
                raise InputError(f"{src}: input {name!r} axis {k} must be {d} {tuple(spec.shape)}, "
                                 f"got shape {arr.shape}")
        if arr.size == 0 and (not spec.is_float or name in self.sources):
            raise InputError(f"{src}: input {name!r} is empty (shape {arr.shape}, declared {tuple(spec.shape)}): "
                             "give at least one batch element and one token/value")
        return arr

    # ------------------------------------------------------------------ across inputs, model limits
    def check(self, feeds: Mapping[str, np.ndarray], given: Iterable[str] = ()) -> None:
        """Checks across the complete ``feeds`` (the inputs filled in included; ``given``: those the user gave):
        named axes agree, masks are masks, ids and derived indices stay inside the model's tables."""
        given = set(given)
        self._check_axes(feeds)
        self._check_masks(feeds, given)
        for g in self.grids:
            if g.input in feeds:
                self._check_grid(g, feeds[g.input].shape)
        for lk in self.lookups:
            if lk.input in feeds:
                self._check_lookup(lk, feeds[lk.input], lk.input in given, feeds)
        if self.derived:
            self._check_derived(feeds)

    def _check_axes(self, feeds: Mapping[str, np.ndarray]) -> None:
        src = self.graph.source
        bound: dict[str, tuple[int, str, int]] = {}  # dim name -> (size, input, axis)
        exprs = []
        for name, arr in feeds.items():
            spec = self.specs.get(name)
            if spec is None or len(spec.shape) != arr.ndim:
                continue
            for axis, d in enumerate(spec.shape):
                if not isinstance(d, str) or not d:
                    continue
                if d.isidentifier():
                    seen = bound.setdefault(d, (arr.shape[axis], name, axis))
                    if seen[0] != arr.shape[axis]:
                        raise InputError(
                            f"{src}: input {name!r} axis {axis} is {arr.shape[axis]} (shape {arr.shape}), but input "
                            f"{seen[1]!r} axis {seen[2]} is {seen[0]} (shape {feeds[seen[1]].shape}): the model "
                            f"names both {d!r}, so they must be equal")
                else:
                    exprs.append((d, name, axis))
        for expr, name, axis in exprs:
            want = _evaluate(expr, {k: v[0] for k, v in bound.items()})
            got = feeds[name].shape[axis]
            if want is not None and want != got:
                parts = ", ".join(f"{k} = {v[0]} (input {v[1]!r})" for k, v in bound.items() if k in expr)
                raise InputError(f"{src}: input {name!r} axis {axis} is {got} (shape {feeds[name].shape}), but the "
                                 f"model declares it {expr!r} = {want} ({parts})")

    def _check_masks(self, feeds: Mapping[str, np.ndarray], given: set[str]) -> None:
        src = self.graph.source
        ids = next((feeds[n] for n in ("input_ids", "decoder_input_ids") if n in feeds), None)
        for name in MASK_INPUTS:
            m = feeds.get(name)
            if m is None or name not in given or m.dtype.kind == "f" or not m.size or not m.ndim:
                continue
            if m.min() < 0 or m.max() > 1:
                raise InputError(f"{src}: input {name!r} must hold 0 (padding) and 1 (token), got values in "
                                 f"[{m.min()}, {m.max()}]")
            rows = np.argwhere(m.reshape(-1, m.shape[-1]).max(-1) == 0)
            if len(rows):
                raise InputError(f"{src}: input {name!r} row {int(rows[0][0])} is all zeros (no token to attend to; "
                                 f"shape {m.shape}): every sequence needs at least one 1 in its mask")
            if name == "attention_mask" and ids is not None and m.ndim == ids.ndim:
                past = past_length(feeds)
                if m.shape[-1] != ids.shape[-1] + past:
                    raise InputError(
                        f"{src}: input 'attention_mask' has length {m.shape[-1]} (shape {m.shape}), but the ids hold "
                        f"{ids.shape[-1]} tokens" + (f" after {past} past positions" if past else " and there is no "
                                                     "past") + f": it must be {ids.shape[-1] + past}")

    def _check_grid(self, g: PatchGrid, shape: tuple[int, ...]) -> None:
        h, w = g.grid(shape[2], shape[3])
        n = math.isqrt(g.patches)
        if h * w == g.patches and (n * n != g.patches or h == w):  # a square table: the patches of a square grid
            return
        square = n * n == g.patches
        want = (f"{g.side(n, 0)} x {g.side(n, 1)} images ({n} x {n} patches)" if square else
                f"images of h x w patches with h * w = {g.patches}")
        raise InputError(
            f"{self.graph.source}: input {g.input!r} of shape {shape} gives {h} x {w} = {h * w} patches (node "
            f"{g.conv!r}: kernel {list(g.kernel)}, stride {list(g.stride)}), but the model's position embeddings "
            f"{g.table!r} hold {g.patches} patches (+ {g.extra} other token(s)){' in a square grid' if square else ''}"
            f": give {want}, the size the model was exported for (ImageExplainer resizes images to it from "
            "preprocessor_config.json)")

    def _check_lookup(self, lk: TableLookup, ids: np.ndarray, given: bool, feeds: Mapping[str, np.ndarray]) -> None:
        if not ids.size:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if 0 <= lo and hi < lk.rows:
            return
        table = f"the model's table {lk.table!r} (node {lk.node!r}) has {lk.rows} rows"
        if given:
            bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= lk.rows))[0])
            raise InputError(f"{self.graph.source}: input {lk.input!r} holds {int(ids[bad])} at index {bad}, outside "
                             f"[0, {lk.rows}): {table} (a tokenizer with another vocabulary?)")
        longest = lk.rows - (hi + 1 - ids.shape[-1]) if ids.ndim else lk.rows
        raise InputError(f"{self.graph.source}: input(s) {feed_shapes(feeds, exclude=lk.input)} are longer than the "
                         f"model allows (at most {longest} along their last axis): the {lk.input!r} filled in for "
                         f"them reach {hi}, and {table}; shorten them")

    def _check_derived(self, feeds: Mapping[str, np.ndarray]) -> None:
        problem = self._derived_problem(feeds)
        if problem is None:
            return
        d, what = problem
        longest = self._longest(feeds, d)
        limit = (f"at most {longest} along their last axis" if longest else "smaller")
        raise InputError(f"{self.graph.source}: input(s) {feed_shapes(feeds, only=d.inputs)} are larger than the model "
                         f"allows ({limit}): {what}; shorten them")

    def _derived_problem(self, feeds: Mapping[str, np.ndarray]) -> tuple[DerivedIndex, str] | None:
        """The first derived index outside its constant for ``feeds``, with a description, or None."""
        session = self._derived_session()
        if session is None:
            return None
        feeds_here = {i.name: feeds[i.name] for i in session.get_inputs()}
        try:
            outs = session.run(None, feeds_here, quiet_run())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ort_failure(self.graph, feeds_here, exc) from exc
        values = dict(zip([o.name for o in session.get_outputs()], outs))
        for d in self.derived:
            parts = [values[t] for t in d.tensors]
            what = _gather_problem(d, parts[0]) if d.node.op_type == "Gather" else _slice_problem(d, parts)
            if what:
                return d, what
        return None

    def _longest(self, feeds: Mapping[str, np.ndarray], d: DerivedIndex) -> int | None:
        """The longest prefix (along the last axis of the inputs ``d`` reads) for which no derived index leaves
        its constant (bisection over the check session), or None."""
        lengths = {feeds[n].shape[-1] for n in d.inputs if feeds[n].ndim}
        if len(lengths) != 1:
            return None
        n = lengths.pop()

        def fits(k: int) -> bool:
            cut = {name: (a[..., :k] if a.ndim and a.shape[-1] == n else a) for name, a in feeds.items()}
            return self._derived_problem(cut) is None

        lo, hi = 0, n  # fits(lo) holds (or lo == 0), fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo or None

    def _derived_session(self) -> Any:
        """A session over the integer/shape arithmetic that computes the derived indices (built once)."""
        with self._lock:
            if self._session is None and not self._session_failed:
                import onnxruntime as ort

                try:
                    model = _derived_model(self.graph, self.derived)
                    opts = ort.SessionOptions()
                    opts.log_severity_level = 3
                    self._session = ort.InferenceSession(model.SerializeToString(), opts,
                                                         providers=["CPUExecutionProvider"])
                except Exception:  # noqa: BLE001 - an optional pre-check: the run itself still checks
                    self._session_failed = True
            return self._session


# ---------------------------------------------------------------------------------------------- derivation
def table_lookups(graph: Graph) -> list[TableLookup]:
    """Lookups of a constant table (along axis 0) by the values of an integer graph input."""
    out = []
    for n in graph.nodes:
        axis_attr = _LOOKUPS.get((n.op_type, n.domain or "ai.onnx"))
        if axis_attr is None or int(n.attr(axis_attr, 0)) != 0 or len(n.inputs) < 2:
            continue
        dims = static_dims(graph, n.inputs[0])
        origin = _input_origin(graph, n.inputs[1])
        if dims and origin is not None and graph_input(graph, origin).is_int:
            out.append(TableLookup(origin, n.name, n.inputs[0], dims[0]))
    return out


def derived_indices(graph: Graph, skip: set[str]) -> list[DerivedIndex]:
    """``Gather``/``Slice`` nodes over a constant whose indices or starts/ends the graph computes from the inputs'
    integer values or shapes only (nodes in ``skip`` are checked directly)."""
    from_floats = _float_valued(graph)
    out = []
    for n in graph.nodes:
        if n.name in skip or n.domain not in ("", "ai.onnx") or n.op_type not in ("Gather", "Slice"):
            continue
        if n.op_type == "Slice" and len(n.inputs) < 3:  # opset < 10: starts/ends are attributes
            continue
        dims = static_dims(graph, n.inputs[0])
        tensors = tuple(t for t in n.inputs[1:] if t)
        if dims is None or all(t in graph.static for t in tensors) or any(t in from_floats for t in tensors):
            continue
        needed, inputs = _ancestors(graph, tensors)
        if any(t in from_floats and t not in graph.input_names or t in graph.producer and
               graph.producer[t].op_type in _SUBGRAPH_OPS for t in needed):
            continue  # computed from the model's activations (their shapes): not cheap to evaluate before the run
        out.append(DerivedIndex(n, n.inputs[0], dims, tensors, tuple(sorted(inputs))))
    return out


def patch_grids(graph: Graph) -> list[PatchGrid]:
    """Image inputs ``(batch, channels, height, width)`` read by a ``Conv`` whose patches meet a constant position
    table (ViT, DeiT, CLIP): the table's rows fix the number of patches, hence the image size."""
    out = []
    for spec in graph.inputs:
        if not spec.is_float or len(spec.shape) != 4:
            continue
        t = spec.name
        conv = None
        for _ in range(4):  # through casts to the first consumer that is a Conv on its data input
            users = graph.consumers.get(t, [])
            conv = next((c for c in users if c.op_type == "Conv" and c.inputs[0] == t), None)
            cast = next((c for c in users if c.op_type in ("Cast", "Identity")), None)
            if conv is not None or cast is None:
                break
            t = cast.outputs[0]
        if conv is None or len(conv.inputs) < 2:
            continue
        w, pad_mode = static_dims(graph, conv.inputs[1]), conv.attr("auto_pad", b"NOTSET")
        if w is None or len(w) != 4 or pad_mode not in (b"NOTSET", b"VALID"):
            continue
        found = _position_table(graph, conv.outputs[0])
        if found is None:
            continue
        table, rows, extra = found
        out.append(PatchGrid(spec.name, conv.name, tuple(conv.attr("kernel_shape", w[2:])),
                             tuple(conv.attr("strides", (1, 1))),
                             tuple(conv.attr("pads", (0, 0, 0, 0))) if pad_mode == b"NOTSET" else (0, 0, 0, 0),
                             tuple(conv.attr("dilations", (1, 1))), table, rows - extra, extra))
    return out


def _position_table(graph: Graph, patches: str) -> tuple[str, int, int] | None:
    """Follow a patch embedding through reshapes and token concatenations to the ``Add`` of a constant
    ``(1, tokens, hidden)`` table: (table, tokens, tokens that are not patches), or None."""
    stack = [(patches, 0)]
    for _ in range(16):
        if not stack:
            return None
        t, extra = stack.pop()
        for c in graph.consumers.get(t, []):
            if c.op_type in ("Reshape", "Flatten", "Transpose", "Cast", "Identity"):
                stack.append((c.outputs[0], extra))
            elif c.op_type == "Concat":
                others = [_static_axis(graph, i, int(c.attr("axis", 0))) for i in c.inputs if i and i != t]
                if all(o is not None for o in others):
                    stack.append((c.outputs[0], extra + sum(others)))
            elif c.op_type == "Add":
                other = next((i for i in c.inputs if i != t), None)
                shape = _static_shape(graph, other) if other else None
                if shape is not None and len(shape) == 3 and shape[0] == 1:
                    p = graph.producer.get(other)
                    return (p.inputs[0] if p is not None and p.op_type == "Gather" else other), shape[1], extra
    return None


def _static_axis(graph: Graph, name: str, axis: int) -> int | None:
    """Length along ``axis`` (of a rank-3 token tensor) of a constant, possibly ``Expand``-ed (a [CLS] token)."""
    while name not in graph.static:
        p = graph.producer.get(name)
        if p is None or p.op_type not in ("Expand", "Identity", "Cast"):
            return None
        name = p.inputs[0]
    shape = _static_shape(graph, name)
    if shape is None or len(shape) > 3:
        return None
    return ((1,) * (3 - len(shape)) + shape)[axis]


def _static_shape(graph: Graph, name: str) -> tuple[int, ...] | None:
    """The shape of a constant, or of a ``Gather`` of a constant table by constant indices (CLIP's positions)."""
    dims = static_dims(graph, name)
    p = graph.producer.get(name)
    if dims is None and p is not None and p.op_type == "Gather" and name in graph.static:
        table, idx = static_dims(graph, p.inputs[0]), static_dims(graph, p.inputs[1])
        if table is not None and idx is not None:
            axis = int(p.attr("axis", 0)) % len(table)
            dims = table[:axis] + idx + table[axis + 1:]
    return dims


def static_dims(graph: Graph, name: str) -> tuple[int, ...] | None:
    """The shape of a constant (initializer, ``Constant``, or folded from one), or None."""
    if name not in graph.static:
        return None
    value = graph.constant(name)
    return None if value is None else tuple(int(d) for d in value.shape)


def graph_input(graph: Graph, name: str) -> GraphInput:
    return next(i for i in graph.inputs if i.name == name)


def _input_origin(graph: Graph, tensor: str) -> str | None:
    """The graph input ``tensor`` is, through value-preserving ops (:data:`_ID_CHAIN`), or None."""
    while tensor not in graph.input_names:
        p = graph.producer.get(tensor)
        if p is None or p.op_type not in _ID_CHAIN:
            return None
        tensor = p.inputs[0]
    return tensor


def _float_valued(graph: Graph) -> set[str]:
    """Tensors whose values depend on the values of float graph inputs (not only on their shapes)."""
    out = {i.name for i in graph.inputs if i.is_float}
    for n in graph.nodes:
        if n.op_type not in ("Shape", "Size") and any(i in out for i in n.inputs if i):
            out.update(o for o in n.outputs if o)
    return out


def _ancestors(graph: Graph, tensors: Iterable[str]) -> tuple[set[str], set[str]]:
    """(tensors computed on the way to ``tensors``, graph inputs they read)."""
    seen, inputs, stack = set(), set(), list(tensors)
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in graph.input_names:
            inputs.add(t)
        elif t in graph.producer and not graph.is_initializer(t):
            stack.extend(graph.producer[t].inputs)
    return seen, inputs


def _derived_model(graph: Graph, derived: list[DerivedIndex]) -> onnx.ModelProto:
    """The sub-model computing every derived index tensor from the graph inputs (small constants inlined)."""
    wanted = list(dict.fromkeys(t for d in derived for t in d.tensors))
    needed, inputs = _ancestors(graph, wanted)
    nodes = {graph.producer[t].name for t in needed if t in graph.producer and not graph.is_initializer(t)}
    src = graph.model.graph
    inits = [numpy_helper.from_array(graph.constant(t), t) for t in sorted(needed)
             if graph.is_initializer(t) and t not in graph.producer]
    g = helper.make_graph(
        [n.proto for n in graph.nodes if n.name in nodes], "onnx_lrp_input_checks",
        [vi for vi in src.input if vi.name in inputs],
        [onnx.ValueInfoProto(name=t) for t in wanted], inits)
    model = helper.make_model(g, opset_imports=list(graph.model.opset_import))
    model.ir_version = graph.model.ir_version
    return model


# ---------------------------------------------------------------------------------------------- derived bounds
def _gather_problem(d: DerivedIndex, idx: np.ndarray) -> str:
    axis = int(d.node.attr("axis", 0))
    n = d.dims[axis if axis >= 0 else axis + len(d.dims)]
    if not idx.size or (idx.min() >= -n and idx.max() < n):
        return ""
    worst = int(idx.max()) if idx.max() >= n else int(idx.min())
    return (f"the model computes index {worst} into its constant {d.data!r} (node {d.node.name!r}), which has {n} "
            f"entries along axis {axis} (a position table?)")


def _slice_problem(d: DerivedIndex, parts: list) -> str:
    starts, ends = (np.asarray(p).reshape(-1) for p in parts[:2])
    axes = np.asarray(parts[2]).reshape(-1) if len(parts) > 2 else np.arange(len(starts))
    steps = np.asarray(parts[3]).reshape(-1) if len(parts) > 3 else np.ones_like(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + len(d.dims) * (a < 0)
        n = d.dims[a]
        s, e = int(s) + n * (s < 0), int(e) + n * (e < 0)
        if st > 0 and n < e < _BIG:
            return (f"the model slices entries [{s}, {e}) of its constant {d.data!r} (node {d.node.name!r}, shape "
                    f"{list(d.dims)}), which holds {n} along axis {a} (a position buffer?)")
    return ""


# ---------------------------------------------------------------------------------------------- helpers
def past_length(feeds: Mapping[str, np.ndarray]) -> int:
    """Positions already in the ``past_*`` key/value caches (their axis 2), 0 without a cache."""
    past = [v for k, v in feeds.items() if k.startswith("past") and v.ndim == 4]
    return int(past[0].shape[2]) if past else 0


def _cast(arr: np.ndarray, dtype: np.dtype, name: str, src: str) -> np.ndarray:
    if dtype.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InputError(f"{src}: input {name!r} holds values in [{arr.min()}, {arr.max()}], outside the "
                             f"model's {dtype} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(dtype)


def _describe(spec: GraphInput) -> str:
    dtype = spec.numpy_dtype if spec.elem_type else "any type"
    return f"({dtype}, shape {tuple(spec.shape)})" if spec.shape else f"({dtype})"


def feed_shapes(feeds: Mapping[str, np.ndarray], only: Iterable[str] | None = None, exclude: str = "") -> str:
    """``name (shape), ...`` of the inputs (``only`` these, without ``exclude``), for error messages."""
    names = [n for n in (only if only is not None else feeds) if n in feeds and n != exclude]
    return ", ".join(f"{n!r} {tuple(feeds[n].shape)}" for n in names) or "none"


_EXPR_NODES = (ast.Expression, ast.BinOp, ast.Name, ast.Constant, ast.Load, ast.Add, ast.Sub, ast.Mult,
               ast.FloorDiv, ast.UnaryOp, ast.USub)


def _evaluate(expr: str, sizes: Mapping[str, int]) -> int | None:
    """The value of a symbolic dimension such as ``past_sequence_length + sequence_length``, or None when it
    names an unknown size or is not simple arithmetic."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None
    if not all(isinstance(n, _EXPR_NODES) for n in ast.walk(tree)):
        return None
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    if not names <= set(sizes) or any(isinstance(n, ast.Constant) and not isinstance(n.value, int)
                                      for n in ast.walk(tree)):
        return None
    return int(eval(compile(tree, "<dim>", "eval"), {"__builtins__": {}}, dict(sizes)))  # noqa: S307 - checked AST


def quiet_run() -> Any:
    """Run options that keep onnxruntime's own error log out of the terminal (the error is raised anyway)."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.log_severity_level = 4
    return opts


# ---------------------------------------------------------------------------------------------- run failures
_NODE = re.compile(r"running (\S+) node\. Name:'([^']*)'")
_CXX = re.compile(r"/onnxruntime_src/\S+:\d+\s+(?:[\w:<>,*& ]+?\([^()]*\)(?:\s*const)?\s+)?")


# how onnxruntime reports an allocation that failed
_ALLOCATION_FAILURES = ("Failed to allocate memory", "bad_alloc", "BFCArena", "out of memory")


def is_allocation_failure(exc: BaseException) -> bool:
    """An allocation that failed: numpy's ``MemoryError``, CuPy's ``OutOfMemoryError``, onnxruntime's messages."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or any(m in str(exc) for m in _ALLOCATION_FAILURES))


def ort_failure(graph: Graph, feeds: Mapping[str, np.ndarray], exc: Exception) -> InputError | ResourceError:
    """An :class:`InputError` for an onnxruntime failure during a run: the node and its op type, the graph inputs
    the node reads (with their shapes), and onnxruntime's message without its source locations; a
    :class:`ResourceError` for an allocation that failed (the inputs are too large for the memory, not wrong)."""
    text = str(exc)
    text = text.split("Status Message:", 1)[-1] if "Status Message:" in text else text
    text = _CXX.sub("", text).strip()
    if is_allocation_failure(exc):
        return ResourceError(f"{graph.source}: onnxruntime ran out of memory on inputs of shapes {feed_shapes(feeds)} "
                             f"({text}); explain fewer tokens or a smaller batch")
    m = _NODE.search(str(exc))
    if m is None:
        return InputError(f"{graph.source}: onnxruntime failed on inputs {feed_shapes(feeds)}: {text}")
    op, name = m.groups()
    node = next((n for n in graph.nodes if n.name == name or (n.proto is not None and n.proto.name == name)), None)
    reads = sorted(_ancestors(graph, node.inputs)[1]) if node is not None else list(feeds)
    return InputError(f"{graph.source}: onnxruntime failed in node {name!r} ({op}), which reads input(s) "
                      f"{feed_shapes(feeds, only=reads)}: {text}. Check these inputs' shapes and values against the "
                      "model (onnx-lrp inspect lists its nodes)")
