"""Perturbation inside the ONNX graph: a copy of the model with a token mask after each embedding lookup.

For every embedding lookup ``e = Gather(table, ids)`` fed by the chosen token input (the analysis' id sources),
the copy computes ``e' = e * m`` (or ``e * m + b * (1 - m)`` with a baseline vector ``b``) from a new float
input ``m`` of shape ``(batch, seq, 1)``, and every former reader of ``e`` reads ``e'``. ``m = 1`` gives the
original model, ``m = 0`` removes a token (zero embedding, or the baseline), ``m = alpha`` scales the embedding
(the Integrated Gradients path). Rows of a batch are independent, so one onnxruntime run evaluates many
perturbed copies of one input: the feeds are replicated along the batch axis (:meth:`Perturber.run`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ._analysis import find_sources
from ._graph import Graph, load_model
from .errors import InputError, ModelLoadError

MASK_PREFIX = "onnx_lrp_mask::"


def mask_name(id_input: str) -> str:
    """Name of the mask input added for the token input ``id_input``."""
    return MASK_PREFIX + id_input


def insert_token_mask(
    model: onnx.ModelProto, id_input: str | None = None, baseline: np.ndarray | None = None
) -> tuple[onnx.ModelProto, str, str]:
    """A copy of ``model`` with a ``(batch, seq, 1)`` mask after the embedding lookups of ``id_input``
    (default: the token input with an embedding lookup, ``input_ids`` when several have one).

    Returns (new model, token input name, mask input name). ``baseline``: a ``(hidden,)`` vector that replaces
    masked embeddings (``e * m + b * (1 - m)``); default zero (``e * m``).
    """
    graph = Graph(model, "model")
    sources, token_axis = find_sources(graph, [id_input] if id_input else None)
    by_input: dict[str, list[str]] = {}
    for tensor in token_axis:
        if graph.producer[tensor].op_type in ("Gather", "GatherBlockQuantized"):  # embedding lookups
            by_input.setdefault(sources[tensor], []).append(tensor)
    if not by_input:
        raise InputError(
            f"found no embedding lookup (Gather of a weight table by an integer graph input"
            f"{' ' + repr(id_input) if id_input else ''}); inputs: {[i.name for i in graph.inputs]}"
        )
    if len(by_input) > 1 and "input_ids" in by_input:
        by_input = {"input_ids": by_input["input_ids"]}
    if len(by_input) > 1:
        raise InputError(f"several token inputs have embedding lookups ({sorted(by_input)}); pass id_input=")
    token_input, lookups = next(iter(by_input.items()))
    table = graph.constant(graph.producer[lookups[0]].inputs[0])
    if table is None:
        raise ModelLoadError(f"embedding table of {lookups[0]!r} is not an initializer or Constant")
    elem = helper.np_dtype_to_tensor_dtype(table.dtype)
    hidden = table.shape[-1]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    mname = mask_name(token_input)
    g.input.append(helper.make_tensor_value_info(mname, elem, ["batch", "seq", 1]))
    fill: list[onnx.NodeProto] = []  # baseline nodes; they read only the mask input, so they go first
    if baseline is not None:
        b = np.asarray(baseline, dtype=table.dtype).reshape(-1)
        if b.shape != (hidden,):
            raise InputError(f"baseline must be a ({hidden},) vector (the embedding width), got {np.shape(baseline)}")
        g.initializer.extend([numpy_helper.from_array(b, "onnx_lrp_baseline"),
                              numpy_helper.from_array(np.ones((), table.dtype), "onnx_lrp_one")])
        fill.append(helper.make_node("Sub", ["onnx_lrp_one", mname], ["onnx_lrp_inv_mask"], name="onnx_lrp_inv_mask"))
        fill.append(helper.make_node("Mul", ["onnx_lrp_inv_mask", "onnx_lrp_baseline"], ["onnx_lrp_fill"],
                                     name="onnx_lrp_fill"))
    after: dict[str, list[onnx.NodeProto]] = {}  # lookup -> its mask nodes, placed right after the lookup
    for e in lookups:
        masked = e + "::masked"
        after[e] = [helper.make_node("Mul", [e, mname], [masked if baseline is None else e + "::kept"],
                                     name=e + "::mask")]
        if baseline is not None:
            after[e].append(helper.make_node("Add", [e + "::kept", "onnx_lrp_fill"], [masked], name=e + "::fill"))
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in after:
                node.input[k] = name + "::masked"
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(fill)
    for node in nodes:
        g.node.append(node)
        for o in node.output:
            g.node.extend(after.get(o, []))
    return out, token_input, mname


class Perturber:
    """Runs perturbed copies of one input in batched onnxruntime calls.

    ``model``: path or ``ModelProto``; ``baseline``: optional ``(hidden,)`` replacement vector;
    ``max_batch``: rows per onnxruntime call.
    """

    def __init__(
        self,
        model: Any,
        *,
        id_input: str | None = None,
        baseline: np.ndarray | None = None,
        providers: Sequence[Any] | None = None,
        max_batch: int = 64,
        session_options: ort.SessionOptions | None = None,
    ):
        proto, self.source, _ = load_model(model)
        self.model, self.token_input, self.mask_input = insert_token_mask(proto, id_input, baseline)
        self.max_batch = int(max_batch)
        try:
            self.session = ort.InferenceSession(self.model.SerializeToString(), session_options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.source}: onnxruntime cannot load the masked model: {exc}") from exc
        self.mask_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(
            next(i for i in self.model.graph.input if i.name == self.mask_input).type.tensor_type.elem_type))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, feeds: dict[str, np.ndarray], mask: np.ndarray, outputs: Sequence[str] | None = None) -> list:
        """One onnxruntime run of a batch with a ``(batch, seq)`` token mask; returns the output arrays."""
        feeds = dict(feeds)
        feeds[self.mask_input] = np.asarray(mask).astype(self.mask_dtype)[:, :, None]
        try:
            return self.session.run(list(outputs) if outputs else None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"{self.source}: onnxruntime failed on the perturbed inputs: {exc}") from exc

    def run(self, feeds: dict[str, np.ndarray], masks: np.ndarray, outputs: Sequence[str] | None = None,
            reduce: Any = None) -> list[Any]:
        """Run ``feeds`` (batch 1) once per row of ``masks`` ``(n, seq)``, ``max_batch`` rows per onnxruntime
        call; returns ``reduce(output arrays, rows)`` per call (default: the output arrays)."""
        masks = np.asarray(masks)
        ids = feeds[self.token_input]
        if ids.shape[0] != 1:
            raise InputError(f"Perturber.run takes one input (batch 1), got batch {ids.shape[0]}")
        if masks.ndim != 2 or masks.shape[1] != ids.shape[1]:
            raise InputError(f"masks must be (n, {ids.shape[1]}) for a sequence of {ids.shape[1]}, got {masks.shape}")
        results = []
        for k in range(0, masks.shape[0], self.max_batch):
            m = masks[k : k + self.max_batch]
            n = m.shape[0]
            batch = {name: np.repeat(v, n, axis=0) for name, v in feeds.items()}
            out = self.forward(batch, m, outputs)
            results.append(reduce(out, slice(k, k + n)) if reduce is not None else out)
        return results
