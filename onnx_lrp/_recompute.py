"""Tensors the rules read that are recomputed at backward time instead of captured.

An attention block's additive mask is ``T x T`` per layer (``Where(mask, 0, -inf)`` of a causal/padding/window
mask built from ``attention_mask`` and index ranges). Capturing it for every layer is quadratic in the tokens, but
it is computed from very little: graph inputs, constants and the shapes of a few tensors. A :class:`Program` is
that computation: the ancestors of the tensor through nodes that read no carrying tensor, cut at ``Shape``/``Size``
of carrying tensors (a few integers, captured in the forward run). It runs in a small onnxruntime session when a
rule reads the tensor.

A program may also start from captured *leaves*: when memory is short, a written-out activation ``x sigmoid(x)`` is
recomputed from its captured input, a GQA head expansion from the keys before it (element-wise and data-movement
ops only).

Programs that differ only in node names share one session, and results of equal inputs are computed once per
explanation: every layer of a Llama reads its own ``Where`` of the same causal mask, computed once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._graph import Graph
from ._patterns import elementwise

_CUT_OPS = ("Shape", "Size")  # their output is a few integers, whatever the size of their (carrying) input
_MAX_NODES = 400
# data movement a program may compute from carrying leaves (besides element-wise maps), never a layer
_MOVEMENT = {"Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Tile", "Slice", "Concat", "Split",
             "Gather", "Neg", "Identity", "Cast"}


@dataclass
class Program:
    """The nodes computing ``output`` from ``leaves`` (graph inputs, captured cut tensors and captured carrying
    tensors, in canonical order) and constants; ``key`` identifies the computation up to tensor names."""

    output: str
    nodes: list[Any]
    leaves: list[str]
    cuts: set[str]
    captured: set[str]
    graph: onnx.GraphProto = field(repr=False)
    key: str
    opsets: list = field(repr=False, default_factory=list)

    def model(self, leaf_types: list[int]) -> onnx.ModelProto:
        """The program as a model whose inputs ``in<k>`` have the element types ``leaf_types``."""
        g = onnx.GraphProto()
        g.CopyFrom(self.graph)
        g.input.extend(helper.make_tensor_value_info(f"in{k}", t, None) for k, t in enumerate(leaf_types))
        return helper.make_model(g, opset_imports=self.opsets)


def find_program(graph: Graph, carrying: set[str], output: str, leaves: frozenset[str] = frozenset()
                 ) -> Program | None:
    """The program computing ``output`` from graph inputs, constants, shapes of carrying tensors and the captured
    ``leaves``, or None (it then has to be captured). Carrying tensors other than leaves may be computed only by
    element-wise maps and data movement from leaves; no layer (``MatMul``, norm, softmax) is ever recomputed."""
    nodes: dict[str, Any] = {}
    stack, seen = [output], set()
    while stack:
        t = stack.pop()
        if t in seen or t in leaves or t in graph.input_names or graph.constant(t) is not None:
            continue
        seen.add(t)
        p = graph.producer.get(t)
        if p is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for a in (p.proto.attribute if p.proto is not None else [])):
            return None
        if t in carrying and not (elementwise(p) or p.op_type in _MOVEMENT):
            return None
        if t not in carrying and any(i in carrying and i not in leaves for i in p.inputs if i):
            if p.op_type not in _CUT_OPS:
                return None
            continue  # a cut: captured
        nodes[p.name] = p
        if len(nodes) > _MAX_NODES:
            return None
        stack.extend(i for i in p.inputs if i)
    if not nodes:
        return None
    order = sorted(nodes.values(), key=lambda n: n.index)
    return _canonical(graph, order, output, leaves)


def _canonical(graph: Graph, order: list[Any], output: str, captured_leaves: frozenset[str]) -> Program:
    """Rename tensors by first use (leaves ``in<k>``, constants ``c<k>``, results ``t<k>``) into a graph whose
    serialisation is the program's key (its inputs are typed when it first runs)."""
    names: dict[str, str] = {}
    leaves: list[str] = []
    cuts: set[str] = set()
    captured: set[str] = set()
    inits, new_nodes = [], []
    for n in order:
        for i in n.inputs:
            if not i or i in names:
                continue
            value = graph.constant(i)
            if value is not None:
                names[i] = f"c{len(inits)}"
                inits.append(numpy_helper.from_array(np.asarray(value), names[i]))
                continue
            names[i] = f"in{len(leaves)}"
            leaves.append(i)
            if i in captured_leaves:
                captured.add(i)
            elif i not in graph.input_names:  # a Shape/Size of a carrying tensor (find_program)
                cuts.add(i)
        outs = []
        for o in n.outputs:
            if o:
                names[o] = f"t{len(names)}"
            outs.append(names.get(o, ""))
        node = helper.make_node(n.op_type, [names.get(i, "") for i in n.inputs], outs, domain=n.domain or None)
        if n.proto is not None:
            node.attribute.extend(n.proto.attribute)
        new_nodes.append(node)
    g = helper.make_graph(new_nodes, "recompute", [], [onnx.ValueInfoProto(name=names[output])], inits)
    kinds = "".join("c" if t in cuts else "l" if t in captured else "i" for t in leaves)
    key = hashlib.sha1(g.SerializeToString() + kinds.encode()).hexdigest()
    return Program(output, order, leaves, cuts, captured, g, key, list(graph.model.opset_import))


class Recompute:
    """Runs programs for one model; sessions are shared by equal programs and built on first use."""

    def __init__(self, session_options: Callable[[], Any]):
        self._options = session_options
        self._sessions: dict[tuple, Any] = {}

    def run(self, p: Program, leaf_value: Callable[[str], Any]) -> np.ndarray:
        """The value of ``p.output``; ``leaf_value(t)`` gives a leaf in the dtype the graph computed it in."""
        import onnxruntime as ort

        feeds = {f"in{k}": np.ascontiguousarray(_host(leaf_value(t))) for k, t in enumerate(p.leaves)}
        types = [onnx.helper.np_dtype_to_tensor_dtype(feeds[f"in{k}"].dtype) for k in range(len(p.leaves))]
        key = (p.key, tuple(types))
        sess = self._sessions.get(key)
        if sess is None:  # no arena: a mask's intermediates are freed, not kept for the next run
            opts = self._options()
            opts.enable_cpu_mem_arena = False
            sess = ort.InferenceSession(p.model(types).SerializeToString(), opts, providers=["CPUExecutionProvider"])
            self._sessions[key] = sess
        return sess.run(None, feeds)[0]


class RecomputeCache:
    """Recomputed values of one explanation: one array per distinct (program, inputs), computed when first read
    and dropped when the last tensor name that refers to it is released."""

    def __init__(self, recompute: Recompute, programs: dict[str, Program], leaf_value: Callable[[str], Any],
                 convert: Callable[[Any], Any]):
        self._rc, self._programs, self._leaf, self._convert = recompute, programs, leaf_value, convert
        self._key_of: dict[str, tuple] = {}
        self._names: dict[tuple, set[str]] = {}  # key -> names not released yet
        for name, p in programs.items():  # graph inputs and captured leaves by name, cut shapes by value
            key = (p.key, tuple(_host(leaf_value(t)).tobytes() if t in p.cuts else t for t in p.leaves))
            self._key_of[name] = key
            self._names.setdefault(key, set()).add(name)
        self._values: dict[tuple, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._key_of

    def get(self, name: str) -> Any:
        key = self._key_of[name]
        if key not in self._values:
            self._values[key] = self._convert(self._rc.run(self._programs[name], self._leaf))
        return self._values[key]

    def release(self, name: str) -> None:
        key = self._key_of.get(name)
        if key is None:
            return
        alive = self._names[key]
        alive.discard(name)
        if not alive:
            self._values.pop(key, None)


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
