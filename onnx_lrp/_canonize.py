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
"""
from __future__ import annotations

import onnx
from onnx import helper

from ._registry import MS


EMBED_LAYER_NORMS = ("EmbedLayerNormalization", "QEmbedLayerNormalization")


def canonize(model: onnx.ModelProto) -> bool:
    """Apply every canonizer that ``model`` needs (in place); True if it changed."""
    merged = merge_duplicated_dequantize(model)
    return expand_embed_layer_norm(model) or merged


def needs_canonizing(model: onnx.ModelProto) -> bool:
    return any(n.op_type in EMBED_LAYER_NORMS for n in model.graph.node) or bool(_dequantize_groups(model))


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
