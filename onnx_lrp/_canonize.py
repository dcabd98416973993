"""Canonizers (as zennit calls them): rewrites of a copy of the graph, before the analysis, that make a fused op's
relevance path explicit without changing what the model computes.

- :func:`expand_embed_layer_norm`: ``EmbedLayerNormalization`` (onnxruntime's optimizer) looks token embeddings up
  inside one node, so it would hide the relevance sources: ``Gather`` lookups, ``Add`` and ``LayerNormalization`` are
  added next to the fused node and its ``output`` (and ``embedding_sum``) moved there, while the fused node still
  computes ``mask_index``. Relevance then follows the ordinary rules (lookups are the sources, the LayerNorm statistic
  is constant, position embeddings absorb their share). Its int8 form ``QEmbedLayerNormalization`` (``quantize_dynamic``
  of an optimised BERT) likewise, its tables, gamma and beta read through ``DequantizeLinear`` nodes.
- :func:`merge_duplicated_dequantize`: onnxruntime's optimizer writes one ``DequantizeLinear`` per reader of a
  tensor; the readers of identical ones read the first, so that an int8 embedding lookup's rows are one source.
- :func:`fuse_written_out_softmax`: ``exp(z - max z) / sum exp(z - max z)`` over one axis (jax2tf, hand-written
  graphs) becomes the ``Softmax`` it is, so that it gets the softmax rule (attention or output softmax), not a
  product and a sum of its pieces.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._registry import MS


EMBED_LAYER_NORMS = ("EmbedLayerNormalization", "QEmbedLayerNormalization")


def canonize(model: onnx.ModelProto) -> bool:
    """Apply every canonizer that ``model`` needs (in place); True if it changed."""
    merged = merge_duplicated_dequantize(model)
    fused = fuse_written_out_softmax(model)
    return expand_embed_layer_norm(model) or merged or fused


def needs_canonizing(model: onnx.ModelProto) -> bool:
    return (any(n.op_type in EMBED_LAYER_NORMS for n in model.graph.node) or bool(_dequantize_groups(model))
            or bool(_written_out_softmaxes(model)))


def _axes(model: onnx.ModelProto, node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    """A reduction's axes (attribute, or a constant second input), if it keeps its dimensions; else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("keepdims", 1)) != 1:
        return None
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        value = constants.get(node.input[1])
        return None if value is None else [int(a) for a in np.ravel(value)]
    return None  # all axes


def _written_out_softmaxes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, int, list[onnx.NodeProto]]]:
    """``Div(e, ReduceSum(e, [a]))`` with ``e = Exp(z - ReduceMax(z, [a]))`` (or ``e = Exp(z)``), whose pieces
    nothing else reads: (the Div, z, a, the nodes it replaces)."""
    g = model.graph
    if not any(n.op_type == "Exp" for n in g.node):
        return []
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer
                 if t.data_type == onnx.TensorProto.INT64 and (t.raw_data or t.int64_data)}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def only(t: str, *nodes: onnx.NodeProto) -> bool:
        return t not in outputs and {id(n) for n in readers.get(t, [])} == {id(n) for n in nodes}

    found = []
    for div in g.node:
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx") or len(div.input) != 2:
            continue
        exp, red = producer.get(div.input[0]), producer.get(div.input[1])
        if (exp is None or red is None or exp.op_type != "Exp" or red.op_type != "ReduceSum"
                or red.input[0] != exp.output[0] or not only(exp.output[0], red, div)
                or not only(red.output[0], div)):
            continue
        axes = _axes(model, red, constants)
        if axes is None or len(axes) != 1 or (opset < 13 and axes[0] != -1):  # < 13: Softmax flattens from axis
            continue
        z, replaced = exp.input[0], [exp, red]
        sub = producer.get(z)
        if sub is not None and sub.op_type == "Sub" and only(z, exp):
            mx = producer.get(sub.input[1])
            if (mx is not None and mx.op_type == "ReduceMax" and mx.input[0] == sub.input[0]
                    and _axes(model, mx, constants) == axes and only(mx.output[0], sub)):
                z, replaced = sub.input[0], replaced + [sub, mx]  # exp(z - max z): the same softmax
        found.append((div, z, axes[0], replaced))
    return found


def fuse_written_out_softmax(model: onnx.ModelProto) -> bool:
    """Replace each written-out softmax (:func:`_written_out_softmaxes`) by ``Softmax(z, axis)`` with the Div's
    output name (in place); True if any was found."""
    found = _written_out_softmaxes(model)
    if not found:
        return False
    g = model.graph
    dropped = {id(n) for _, _, _, nodes in found for n in nodes}
    fused = {id(div): helper.make_node("Softmax", [z], [div.output[0]], name=div.name or f"softmax_{k}", axis=axis)
             for k, (div, z, axis, _) in enumerate(found)}
    kept = [fused.get(id(n), n) for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(kept)
    return True


def expand_embed_layer_norm(model: onnx.ModelProto) -> bool:
    """Add the definition of every ``EmbedLayerNormalization`` (and ``QEmbedLayerNormalization``) next to it (in
    place); True if any was found.

    ``output = LayerNorm(word[input_ids] + position[position_ids or arange(S)] + segment[segment_ids])``.
    The fused node keeps computing ``mask_index``; its ``output`` and ``embedding_sum`` are renamed and the
    new nodes produce the original names, so every consumer reads the expanded computation.
    """
    g = model.graph
    found = False
    new_nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(g.node):
        if node.op_type not in EMBED_LAYER_NORMS or node.domain != MS:
            new_nodes.append(node)
            continue
        found = True
        p = f"{node.name or f'{node.op_type}_{k}'}::"  # unnamed fused nodes get distinct tensors
        extra: list[onnx.NodeProto] = []
        if node.op_type == "QEmbedLayerNormalization":  # int8 tables, gamma and beta: dequantised first
            ins = list(node.input) + [""] * (18 - len(node.input))
            ids, seg = ins[0], ins[1]
            floats = []
            for k, what in zip(range(2, 7), ("word", "position", "segment", "gamma", "beta")):
                if not ins[k]:
                    floats.append("")
                    continue
                dq = [ins[k], ins[k + 6]] + ([ins[k + 11]] if ins[k + 11] else [])
                extra.append(helper.make_node("DequantizeLinear", dq, [p + what + "_float"], name=p + what + "_float"))
                floats.append(p + what + "_float")
            word, pos_t, seg_t, gamma, beta = floats
            pos_ids = ""
        else:
            ins = list(node.input) + [""] * (9 - len(node.input))
            ids, seg, word, pos_t, seg_t, gamma, beta, _, pos_ids = ins[:9]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        out, sum_out = node.output[0], (node.output[2] if len(node.output) > 2 else "")
        extra.append(helper.make_node("Gather", [word, ids], [p + "word"], name=p + "word"))
        terms = [p + "word"]
        if pos_ids:
            extra.append(helper.make_node("Gather", [pos_t, pos_ids], [p + "position"], name=p + "position"))
        else:
            extra += [
                # Shape + Gather, not Shape(start=, end=) (opset >= 15): optimised BERTs are often opset 11-14
                helper.make_node("Shape", [ids], [p + "shape"], name=p + "shape"),
                helper.make_node("Constant", [], [p + "zero"], name=p + "zero", value=helper.make_tensor("z", 7, [], [0])),
                helper.make_node("Constant", [], [p + "one"], name=p + "one", value=helper.make_tensor("o", 7, [], [1])),
                helper.make_node("Gather", [p + "shape", p + "one"], [p + "seq"], name=p + "seq", axis=0),
                helper.make_node("Range", [p + "zero", p + "seq", p + "one"], [p + "arange"], name=p + "arange"),
                helper.make_node("Gather", [pos_t, p + "arange"], [p + "position"], name=p + "position"),
            ]
        terms.append(p + "position")
        if seg and seg_t:
            extra.append(helper.make_node("Gather", [seg_t, seg], [p + "segment"], name=p + "segment"))
            terms.append(p + "segment")
        acc = terms[0]
        for k, t in enumerate(terms[1:]):
            name = sum_out if (k == len(terms) - 2 and sum_out) else p + f"sum{k}"
            extra.append(helper.make_node("Add", [acc, t], [name], name=p + f"add{k}"))
            acc = name
        extra.append(helper.make_node("LayerNormalization", [acc, gamma, beta], [out], name=p + "layernorm",
                                      axis=-1, epsilon=eps))
        fused = onnx.NodeProto()
        fused.CopyFrom(node)
        fused.output[0] = p + "fused_output"
        if sum_out:
            fused.output[2] = p + "fused_embedding_sum"
        new_nodes.append(fused)
        new_nodes.extend(extra)
    if found:
        del g.node[:]
        g.node.extend(new_nodes)
    return found


def _dequantize_groups(model: onnx.ModelProto) -> list[list[onnx.NodeProto]]:
    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx"):
            key = (tuple(n.input), tuple(sorted(a.SerializeToString() for a in n.attribute)))
            groups.setdefault(key, []).append(n)
    return [v for v in groups.values() if len(v) > 1]


def merge_duplicated_dequantize(model: onnx.ModelProto) -> bool:
    """Let the readers of identical ``DequantizeLinear`` nodes read the first one (in place; the same values);
    True if any was merged."""
    g = model.graph
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    dropped: set[int] = set()
    for nodes in _dequantize_groups(model):
        for n in nodes[1:]:
            if n.output[0] not in outputs:
                alias[n.output[0]] = nodes[0].output[0]
                dropped.add(id(n))
    if not alias:
        return False
    kept = [n for n in g.node if id(n) not in dropped]
    for n in kept:
        for k, i in enumerate(n.input):
            if i in alias:
                n.input[k] = alias[i]
    del g.node[:]
    g.node.extend(kept)
    return True
