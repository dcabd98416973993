"""The head computed at the explained rows only (``explain(full_output=False)``, :mod:`onnx_lrp._rows`): which heads
are recognised, the scatter back, and the same relevance as the full output on hand-built and exported models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from _graphs import f32, model, node
from _support import tiny_model
from onnx_lrp import Explainer
from onnx_lrp._graph import Graph
from onnx_lrp._rows import find_row_head, scatter_rows

D, V = 6, 5


def _head_model(softcap: bool = False, extra_output: bool = False, bias_shape=(V,), dims=("B", "T")):
    """x (B, T, D) -> x * s -> @ W [+ bias] [-> c tanh(. / c)] = y (B, T, V)."""
    nodes = [node("Mul", ["x", "s"], ["xs"]), node("MatMul", ["xs", "W"], ["z"]), node("Add", ["z", "b"], ["zb"])]
    inits = {"s": f32(D, seed=1), "W": f32(D, V, seed=2), "b": f32(*bias_shape, seed=3), "c": np.float32(3.0)}
    last = "zb"
    if softcap:
        nodes += [node("Div", ["zb", "c"], ["d"]), node("Tanh", ["d"], ["t"]), node("Mul", ["t", "c"], ["y"])]
    else:
        nodes += [node("Identity", ["zb"], ["y"])]
    outputs = {"y": (*dims, V)}
    if extra_output:
        outputs["zb"] = (*dims, V)
    return model(nodes, {"x": (*dims, D)}, outputs, inits), last


def test_head_recognised_by_its_maths():
    m, _ = _head_model(softcap=True)
    g = Graph(m)
    head = find_row_head(g, set(g.producer) | {"x"}, "y")
    assert head is not None and head.h == "xs" and (head.feed, head.axis) == ("x", 1)
    assert [g.nodes[[n.name for n in g.nodes].index(k)].op_type for k in head.nodes] == ["Mul", "Tanh", "Div", "Add",
                                                                                          "MatMul"]


@pytest.mark.parametrize("case", ["per-position bias", "tensor read elsewhere", "axes unlike the input's"])
def test_no_head_where_rows_are_not_independent(case):
    """A bias of shape (T, V) differs per position; a head tensor that is also a graph output must stay whole; with
    output axes named unlike any input's (tf2onnx's ``unk__`` names) the rows cannot be chosen before the forward."""
    kw = {"per-position bias": dict(bias_shape=(4, V)),
          "tensor read elsewhere": dict(extra_output=True)}.get(case, {})
    m, _ = _head_model(**kw)
    if case == "axes unlike the input's":
        for k, name in enumerate(("unk__1", "unk__2")):
            m.graph.output[0].type.tensor_type.shape.dim[k].dim_param = name
    g = Graph(m)
    assert find_row_head(g, set(g.producer) | {"x"}, "y") is None


def test_fixed_sizes_find_the_head():
    """A graph of fixed shapes (jax2onnx writes them): the output's (2, 4) axes match the input's sizes."""
    m, _ = _head_model(dims=(2, 4))
    ex = Explainer(m, sources=["x"])
    assert ex._rows is not None and (ex._rows.feed, ex._rows.axis) == ("x", 1)
    x = f32(2, 4, D, seed=7)
    full, rows = ex.explain({"x": x}, target=1), ex.explain({"x": x}, target=1, full_output=False)
    assert rows.outputs["y"].shape == (2, 1, V)
    np.testing.assert_allclose(rows.relevance["x"], full.relevance["x"], rtol=1e-6, atol=1e-7)


def test_wrongly_declared_axes_are_an_error():
    """The output declares the input's sequence axis, but the graph drops a position before the head: the rows
    were chosen for the wrong length, which is said, not explained wrongly."""
    from onnx_lrp import OnnxLrpError

    m, _ = _head_model()
    sl = node("Slice", ["x", "st", "en", "ax"], ["xs0"])
    m.graph.node.insert(0, sl)
    m.graph.node[1].input[0] = "xs0"  # Mul(x, s) reads the sliced x
    for name, v in (("st", [1]), ("en", [2 ** 62]), ("ax", [1])):
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), name))
    ex = Explainer(m, sources=["x"])
    assert ex._rows is not None
    x = f32(1, 4, D, seed=8)
    for position in (-1, 1):  # the last row is not there (onnxruntime's gather fails); row 1 is, of a shorter h
        with pytest.raises(OnnxLrpError, match="declared shapes are wrong"):
            ex.explain({"x": x}, target=0, position=position, full_output=False)


def test_scatter_rows_by_hand():
    g = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # (batch 2, k 2, d 3)
    rows = np.array([[1, 1], [0, 3]])  # batch 0 explains position 1 twice
    full = scatter_rows(np, g, rows, 4)
    want = np.zeros((2, 4, 3), np.float32)
    want[0, 1] = g[0, 0] + g[0, 1]
    want[1, 0], want[1, 3] = g[1, 0], g[1, 1]
    np.testing.assert_array_equal(full, want)
    lead = scatter_rows(np, np.stack([g, 2 * g]), rows, 4)  # a leading target axis
    np.testing.assert_array_equal(lead, np.stack([want, 2 * want]))


@pytest.mark.parametrize("softcap", [False, True])
def test_rows_only_match_full_output_by_hand(softcap):
    """Under eps-LRP the relevance of x at the explained row is x * s * W[:, c] (up to the bias's share), zero at
    other rows; the rows-only pass gives the full pass's relevance and the full output's rows."""
    m, _ = _head_model(softcap=softcap)
    ex = Explainer(m, sources=["x"])
    x = f32(2, 4, D, seed=5)
    pos, tgt = np.array([[3, 1], [0, 0]]), np.array([[2, 4], [1, 3]])
    full = ex.explain({"x": x}, target=tgt, position=pos)
    rows = ex.explain({"x": x}, target=tgt, position=pos, full_output=False)
    assert rows.outputs["y"].shape == (2, 2, V)
    np.testing.assert_array_equal(rows.outputs["y"], full.outputs["y"][np.arange(2)[:, None], pos])
    np.testing.assert_allclose(rows.relevance["x"], full.relevance["x"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rows.score, full.score, rtol=1e-6)
    if not softcap:  # by hand: G = 1 at the logit, (z+b)/stab(z+b) = 1 through the eps rule: R(x_i) = x_i s_i W_ic
        s, W = ex.graph.constant("s"), ex.graph.constant("W")
        for j in range(2):
            for bi in range(2):
                p, c = pos[bi, j], tgt[bi, j]
                want = x[bi, p] * s * W[:, c]
                got = rows.relevance["x"][bi, j]
                np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6)
                assert np.all(got[np.arange(4) != p] == 0)


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def lm(request):
    _, path = tiny_model(request.param)
    return Explainer(path)


@pytest.mark.parametrize("B,T", [(2, 9), (10, 60)])  # 600 ids: the long-input plan (attention recomputed)
def test_rows_only_equal_full_output_on_exported_lms(lm, B, T):
    rng = np.random.RandomState(T)
    ids = rng.randint(3, 100, size=(B, T))
    mask = np.ones_like(ids)
    mask[1, T - 3:] = 0  # right padding: batch element 1 explains its last real token by default
    feeds = {"input_ids": ids, "attention_mask": mask}
    assert lm._rows is not None and lm._rows.output == lm.default_output
    out = lm.default_output
    several = {"position": np.tile([[2, -1, 2]], (B, 1)), "target": np.tile([[1, 2, 3]], (B, 1))}  # k = 3
    for kw in ({}, {"target": 7}, several):
        full = lm.explain(feeds, **kw)
        rows = lm.explain(feeds, full_output=False, **kw)
        pos = full.position.reshape(B, -1)
        assert rows.outputs[out].shape == (B, pos.shape[1], full.outputs[out].shape[-1])
        np.testing.assert_allclose(rows.outputs[out], full.outputs[out][np.arange(B)[:, None], pos], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(rows.target, full.target)
        np.testing.assert_array_equal(rows.position, full.position)
        np.testing.assert_allclose(rows.score, full.score, rtol=1e-5, atol=1e-6)
        r, f = rows.relevance["input_ids"], full.relevance["input_ids"]
        assert np.abs(r - f).max() <= 1e-5 * np.abs(f).max()


def test_full_output_where_rows_cannot_be_chosen(lm):
    """output_relevance, or collecting the head's own tensors, needs the full output: it is computed in full."""
    ids = np.random.RandomState(0).randint(3, 100, size=(1, 7))
    feeds = {"input_ids": ids}
    ref = lm.explain(feeds)
    w = np.zeros(ref.outputs[lm.default_output].shape, np.float32)
    w[0, -1, 5] = 1.0
    res = lm.explain(feeds, output_relevance=w, full_output=False)
    assert res.outputs[lm.default_output].shape == ref.outputs[lm.default_output].shape
    head_tensor = lm._rows.tensors[-1]
    res = lm.explain(feeds, collect=[head_tensor], full_output=False)
    assert res.outputs[lm.default_output].shape == ref.outputs[lm.default_output].shape
    np.testing.assert_allclose(res.relevance["input_ids"], ref.relevance["input_ids"], rtol=1e-6, atol=1e-7)


def test_gamma_on_the_head_keeps_the_full_output():
    """The gamma rule on the head's product reads the head's input, which stays whole: rows-only is refused quietly
    and the full output explained (the same relevance as without the option)."""
    from onnx_lrp.rules import Gamma

    _, path = tiny_model("llama")
    ex = Explainer(path, overrides={"/lm_head/MatMul": Gamma(0.25)})
    feeds = {"input_ids": np.random.RandomState(1).randint(3, 100, size=(2, 6))}
    full = ex.explain(feeds)
    rows = ex.explain(feeds, full_output=False)
    assert rows.outputs[ex.default_output].shape == full.outputs[ex.default_output].shape
    np.testing.assert_allclose(rows.relevance["input_ids"], full.relevance["input_ids"], rtol=1e-6, atol=1e-7)


def test_non_finite_rows_are_refused():
    """A head whose explained rows overflow is an InputError on the rows-only path too, not NaN relevance."""
    from onnx_lrp import InputError

    m, _ = _head_model()
    ex = Explainer(m, sources=["x"])
    x = f32(1, 4, D, seed=5)
    x[0, 3] = 1e38  # the explained (last) row overflows to inf in the product
    with pytest.raises(InputError, match="not finite"):
        ex.explain({"x": x}, target=0, full_output=False, check_conservation=False)
