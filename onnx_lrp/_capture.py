"""Forward capture: one onnxruntime run that also returns the intermediate tensors the rules need.

A copy of the graph's outputs is extended with the needed tensors (and ``Shape`` nodes for tensors whose
shape alone is needed); the user's ``ModelProto`` is restored right after serialising, so it never changes.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ._graph import Graph
from .errors import InputError, ModelLoadError

SHAPE_PREFIX = "onnx_lrp::shape::"
_PROTO_LIMIT = 2**31 - 2**24  # protobuf's 2 GB limit, with a margin


class ForwardCapture:
    """An onnxruntime session over the model with extra outputs; rebuilt only when new tensors are needed."""

    def __init__(
        self,
        graph: Graph,
        providers: Sequence[Any] | None = None,
        session_options: ort.SessionOptions | None = None,
    ):
        self.graph = graph
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.session_options = session_options
        self.exposed: set[str] = set()
        self.shape_exposed: set[str] = set()
        self.session: ort.InferenceSession | None = None

    def prepare(self, values: set[str], shapes: set[str]) -> None:
        """Make sure the session returns ``values`` and the shapes of ``shapes``."""
        g = self.graph
        values = {v for v in values if self._needs_output(v)}
        shapes = {s for s in shapes if self._needs_output(s)}  # also for returned tensors: run() asks Shape nodes
        if self.session is not None and values <= self.exposed and shapes <= self.shape_exposed:
            return
        self.exposed |= values
        self.shape_exposed |= shapes
        model = g.model
        n_out, n_node = len(model.graph.output), len(model.graph.node)
        existing = set(g.output_names)
        try:
            for name in sorted(self.exposed - existing):
                model.graph.output.append(onnx.ValueInfoProto(name=name))
            for name in sorted(self.shape_exposed):
                out = SHAPE_PREFIX + name
                model.graph.node.append(onnx.helper.make_node("Shape", [name], [out], name=out))
                model.graph.output.append(onnx.ValueInfoProto(name=out))
            self.session = self._session(model)
        finally:
            del model.graph.output[n_out:]
            del model.graph.node[n_node:]

    def _needs_output(self, name: str) -> bool:
        g = self.graph
        return name not in g.input_names and not g.is_initializer(name) and g.constant(name) is None

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        opts = self.session_options or ort.SessionOptions()
        try:
            if model.ByteSize() < _PROTO_LIMIT:
                return ort.InferenceSession(model.SerializeToString(), opts, providers=self.providers)
            with tempfile.TemporaryDirectory(prefix="onnx_lrp_") as tmp:
                path = os.path.join(tmp, "model.onnx")
                onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
                return ort.InferenceSession(path, opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.graph.source}: onnxruntime cannot load the model: {exc}") from exc

    def run(self, feeds: dict[str, np.ndarray], values: Sequence[str], shapes: Sequence[str]) -> tuple[dict, dict]:
        """Run once; returns (tensor values by name, shapes by name)."""
        assert self.session is not None
        names = list(dict.fromkeys(list(values) + [SHAPE_PREFIX + s for s in shapes]))
        try:
            arrays = self.session.run(names, feeds)
        except Exception as exc:
            raise InputError(f"{self.graph.source}: onnxruntime failed on these inputs: {exc}") from exc
        out_values, out_shapes = {}, {}
        for n, a in zip(names, arrays):
            if n.startswith(SHAPE_PREFIX):
                out_shapes[n[len(SHAPE_PREFIX) :]] = tuple(int(d) for d in a)
            else:
                out_values[n] = a
        return out_values, out_shapes

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []
