"""Canonizers (as zennit calls them): rewrites of a copy of the graph, before the analysis, that make a fused op's
relevance path explicit without changing what the model computes.

- :func:`expand_embed_layer_norm`: ``EmbedLayerNormalization`` (onnxruntime's optimizer) looks token embeddings up
  inside one node, so it would hide the relevance sources: ``Gather`` lookups, ``Add`` and ``LayerNormalization`` are
  added next to the fused node and its ``output`` (and ``embedding_sum``) moved there, while the fused node still
  computes ``mask_index``. Relevance then follows the ordinary rules (lookups are the sources, the LayerNorm statistic
  is constant, position embeddings absorb their share).
"""
from __future__ import annotations

import onnx
from onnx import helper

from ._registry import MS


def expand_embed_layer_norm(model: onnx.ModelProto) -> bool:
    """Add the definition of every ``EmbedLayerNormalization`` next to it (in place); True if any was found.

    ``output = LayerNorm(word[input_ids] + position[position_ids or arange(S)] + segment[segment_ids])``.
    The fused node keeps computing ``mask_index``; its ``output`` and ``embedding_sum`` are renamed and the
    new nodes produce the original names, so every consumer reads the expanded computation.
    """
    g = model.graph
    found = False
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type != "EmbedLayerNormalization" or node.domain != MS:
            new_nodes.append(node)
            continue
        found = True
        ins = list(node.input) + [""] * (9 - len(node.input))
        ids, seg, word, pos_t, seg_t, gamma, beta, _, pos_ids = ins[:9]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        p = f"{node.name or 'EmbedLayerNormalization'}::"
        out, sum_out = node.output[0], (node.output[2] if len(node.output) > 2 else "")
        extra = [helper.make_node("Gather", [word, ids], [p + "word"], name=p + "word")]
        terms = [p + "word"]
        if pos_ids:
            extra.append(helper.make_node("Gather", [pos_t, pos_ids], [p + "position"], name=p + "position"))
        else:
            extra += [
                helper.make_node("Shape", [ids], [p + "shape"], name=p + "shape", start=1, end=2),
                helper.make_node("Squeeze", [p + "shape"], [p + "seq"], name=p + "seq"),
                helper.make_node("Constant", [], [p + "zero"], name=p + "zero", value=helper.make_tensor("z", 7, [], [0])),
                helper.make_node("Constant", [], [p + "one"], name=p + "one", value=helper.make_tensor("o", 7, [], [1])),
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
