"""Relevance sources are found from the graph, not from input names: an embedding lookup is a source when its
rows enter the model as a term; a table looked up only to multiply run-time tensors (RoPE cos/sin) is not."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lrp import Explainer

from _graphs import f32, model, node

S, D, V, P = 4, 6, 20, 16  # sequence, hidden, vocabulary, positions
E, C, SN = f32(V, D, seed=1), f32(P, D, seed=2), f32(P, D, seed=3)
WQ, WO, R = f32(D, D, seed=4), f32(D, 3, seed=5), f32(D, D, seed=6)


def _rope_model(pos: str, layers: int = 1):
    """``y = rope(... rope(h)) Wo`` with ``h = E[ids] Wq`` and ``rope(v) = v * cos[pos] + (v R) * sin[pos]``:
    RoPE-style factor tables, shared by ``layers`` layers (from the second on, the rotated tensor depends on them)."""
    nodes = [node("Gather", ["E", "ids"], ["e"]), node("MatMul", ["e", "Wq"], ["v0"]),
             node("Gather", ["C", pos], ["cos"]), node("Gather", ["SN", pos], ["sin"])]
    for k in range(layers):
        v, o = f"v{k}", f"v{k + 1}"
        nodes += [node("Mul", [v, "cos"], [v + "c"]), node("MatMul", [v, "R"], [v + "r"]),
                  node("Mul", [v + "r", "sin"], [v + "s"]), node("Add", [v + "c", v + "s"], [o])]
    nodes.append(node("MatMul", [f"v{layers}", "Wo"], ["y"]))
    return model(nodes, {"ids": ("int", 1, S), pos: ("int", 1, S)}, {"y": (1, S, 3)},
                 {"E": E, "C": C, "SN": SN, "Wq": WQ, "Wo": WO, "R": R})


@pytest.mark.parametrize("pos,layers", [("pos", 1), ("idx", 1), ("idx", 2)])
def test_factor_tables_indexed_by_any_name_are_constants(pos, layers):
    """Hand-computed reference: y is linear in e for fixed cos/sin, ``y_p = e_p Wq M_p^layers Wo`` with
    ``M_p = diag(cos_p) + R diag(sin_p)``, so AttnLRP (eps=0) is gradient x input ``e * dy/de``; were the cos/sin
    lookups sources, the product rule would halve it."""
    ids, p = np.array([[3, 1, 7, 12]]), np.array([[0, 5, 2, 9]])
    ex = Explainer(_rope_model(pos, layers))
    assert set(ex.analysis.sources.values()) == {"ids"}
    res = ex.explain({"ids": ids, pos: p}, target=1, position=2)
    e, c, s = E[ids[0]], C[p[0]], SN[p[0]]
    M = np.diag(c[2]) + R @ np.diag(s[2])
    G = np.zeros((S, D))
    G[2] = WQ @ np.linalg.matrix_power(M, layers) @ WO[:, 1]
    np.testing.assert_allclose(res.relevance["ids"][0], (e * G).sum(-1), rtol=1e-5, atol=1e-6)
    assert pos not in res.relevance


def test_embeddings_times_a_mask_are_a_source():
    """Rows scaled by a mask computed from ``attention_mask`` (as ESM does) are still an embedding: relevance
    ``e * mask * Wo[:, k]`` at the explained position."""
    nodes = [node("Gather", ["E", "ids"], ["e"]), node("Unsqueeze", ["attention_mask", "ax"], ["m"]),
             node("Cast", ["m"], ["mf"], to=1), node("Mul", ["e", "mf"], ["x"]), node("MatMul", ["x", "Wo"], ["y"])]
    m = model(nodes, {"ids": ("int", 1, S), "attention_mask": ("int", 1, S)}, {"y": (1, S, 3)},
              {"E": E, "Wo": WO, "ax": np.array([-1])})
    ids, mask = np.array([[3, 1, 7, 12]]), np.array([[1, 1, 0, 1]])
    res = Explainer(m).explain({"ids": ids, "attention_mask": mask}, target=2, position=1)
    np.testing.assert_allclose(res.relevance["ids"][0, 1], E[1] @ WO[:, 2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.relevance["ids"].sum(), res.score, rtol=1e-5)


def test_explicit_sources_take_any_lookup():
    """``sources=[...]`` overrides the criterion: the cos/sin lookups of a named input are sources. With ``e``
    constant, y is linear in (cos, sin): their relevance sums to the logit."""
    ids, p = np.array([[3, 1, 7, 12]]), np.array([[0, 5, 2, 9]])
    ex = Explainer(_rope_model("pos"), sources=["pos"])
    assert set(ex.analysis.sources.values()) == {"pos"} and len(ex.analysis.sources) == 2
    res = ex.explain({"ids": ids, "pos": p}, target=1, position=2)
    np.testing.assert_allclose(res.relevance["pos"].sum(), res.score, rtol=1e-5)
    assert "ids" not in res.relevance


def test_word_ids_named_like_positions_are_a_source():
    """Token ids called ``position_tokens`` and a learned position table indexed by ``idx`` (added, then scaled
    by a constant as Gemma does) are both sources; the model is linear and bias-free, so token relevance is
    ``(e + p) . dy`` split by term and the two sum to the logit."""
    nodes = [
        node("Gather", ["E", "position_tokens"], ["e"]), node("Mul", ["e", "scale"], ["es"]),
        node("Gather", ["C", "idx"], ["pe"]), node("Add", ["es", "pe"], ["x"]), node("MatMul", ["x", "Wo"], ["y"]),
    ]
    m = model(nodes, {"position_tokens": ("int", 1, S), "idx": ("int", 1, S)}, {"y": (1, S, 3)},
              {"E": E, "C": C, "Wo": WO, "scale": np.float32(2.5)})
    ids, p = np.array([[3, 1, 7, 12]]), np.array([[0, 1, 2, 3]])
    res = Explainer(m).explain({"position_tokens": ids, "idx": p}, target=0, position=1)
    np.testing.assert_allclose(res.relevance["position_tokens"][0, 1], 2.5 * E[1] @ WO[:, 0], rtol=1e-5)
    np.testing.assert_allclose(res.relevance["idx"][0, 1], C[1] @ WO[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.relevance["position_tokens"][0, [0, 2, 3]], 0, atol=1e-7)
    np.testing.assert_allclose(res.relevance["position_tokens"].sum() + res.relevance["idx"].sum(), res.score,
                               rtol=1e-5)


def test_gather_along_another_axis_is_no_embedding_lookup():
    """``Gather(table, ids, axis=1)`` picks columns, not rows: not an embedding lookup, so no source here."""
    from onnx_lrp.errors import InputError

    m = model([node("Gather", ["T", "ids"], ["e"], axis=1), node("MatMul", ["e", "W"], ["y"])],
              {"ids": ("int", 1, S)}, {"y": (D, 1, 3)}, {"T": f32(D, V, seed=7), "W": f32(S, 3, seed=8)})
    with pytest.raises(InputError, match="found no relevance source"):
        Explainer(m)
