"""Structural patterns recognised by their maths (onnx_lrp._patterns), on hand-built graphs written the way other
exporters (tf2onnx, jax2onnx, torch.onnx) and hand-written graphs spell them, with and without node names.

Expected values come from the fused op of the same maths (``LayerNormalization``, ``Gelu``), from the explicit
formulas, or from the graph with the other spelling; they never come from the code path under test.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrp import ConfigError, Constant, Epsilon, Explainer, Gamma, Gradient, Identity, InputError, attnlrp
from onnx_lrp._graph import Graph
from onnx_lrp._patterns import normalisation_statistic, probe_function, zero_centred
from onnx_lrp.errors import RelevanceWarning, TargetError

from _graphs import f32, model, node

H = 6
RTOL = 1e-5


def _unnamed(m: onnx.ModelProto) -> onnx.ModelProto:
    for n in m.graph.node:
        n.name = ""
    return m


def _head(x: str) -> list:
    """``y = norm @ W`` read-out shared by the norm graphs."""
    return [node("MatMul", [x, "W"], ["y"])]


def _norm_inits(**more):
    return {"W": f32(H, 3, seed=2), "gamma": f32(H, seed=3) + 1.5, "beta": f32(H, seed=4), "eps": np.float32(1e-5),
            **more}


def _fused_layer_norm(rms: bool = False) -> onnx.ModelProto:
    op = "SimplifiedLayerNormalization" if rms else "LayerNormalization"
    ins = ["x", "gamma"] if rms else ["x", "gamma", "beta"]
    return model([node(op, ins, ["n"], axis=-1, epsilon=1e-5)] + _head("n"), {"x": (2, 4, H)}, {"y": (2, 4, 3)},
                 _norm_inits())


def _tf2onnx_layer_norm() -> onnx.ModelProto:
    """tf2onnx's spelling: means by GlobalAveragePool (over the trailing axes: here the last one of a reshaped
    ``(N*T, 1, H)`` tensor), the squared difference written as its own Sub, Reciprocal(Sqrt), gamma folded into the
    scale, ``x * s + (beta - mean * s)``."""
    nodes = [
        node("Reshape", ["x", "flat"], ["xf"]), node("GlobalAveragePool", ["xf"], ["mf"]),
        node("Reshape", ["mf", "back"], ["mean"]),
        node("Sub", ["x", "mean"], ["d2"]), node("Mul", ["d2", "d2"], ["sq"]),
        node("Reshape", ["sq", "flat"], ["sqf"]), node("GlobalAveragePool", ["sqf"], ["vf"]),
        node("Reshape", ["vf", "back"], ["var"]),
        node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]), node("Reciprocal", ["sd"], ["rs"]),
        node("Mul", ["rs", "gamma"], ["s"]), node("Mul", ["x", "s"], ["xs"]), node("Mul", ["mean", "s"], ["ms"]),
        node("Sub", ["beta", "ms"], ["off"]), node("Add", ["xs", "off"], ["n"]),
    ]
    inits = _norm_inits(flat=np.array([-1, 1, H], np.int64), back=np.array([2, 4, 1], np.int64))
    return model(nodes + _head("n"), {"x": (2, 4, H)}, {"y": (2, 4, 3)}, inits)


def _jax_layer_norm() -> onnx.ModelProto:
    """JAX/Flax's spelling: ``var = E[x^2] - E[x]^2``, ``rsqrt`` as ``Pow(-0.5)``."""
    nodes = [
        node("ReduceMean", ["x", "ax"], ["mean"], keepdims=1), node("Mul", ["x", "x"], ["x2"]),
        node("ReduceMean", ["x2", "ax"], ["ex2"], keepdims=1), node("Pow", ["mean", "two"], ["m2"]),
        node("Sub", ["ex2", "m2"], ["var"]), node("Add", ["var", "eps"], ["ve"]),
        node("Pow", ["ve", "mhalf"], ["rs"]), node("Sub", ["x", "mean"], ["d"]), node("Mul", ["d", "rs"], ["u"]),
        node("Mul", ["u", "gamma"], ["g"]), node("Add", ["g", "beta"], ["n"]),
    ]
    inits = _norm_inits(ax=np.array([-1], np.int64), two=np.float32(2.0), mhalf=np.float32(-0.5))
    return model(nodes + _head("n"), {"x": (2, 4, H)}, {"y": (2, 4, 3)}, inits)


def _sum_rms_norm() -> onnx.ModelProto:
    """RMSNorm with the mean of squares as ``ReduceSum / H`` and ``Div(x, Sqrt(.))``."""
    nodes = [
        node("Pow", ["x", "two"], ["x2"]), node("ReduceSum", ["x2", "ax"], ["ss"], keepdims=1),
        node("Div", ["ss", "n_h"], ["ms"]), node("Add", ["ms", "eps"], ["ve"]), node("Sqrt", ["ve"], ["rms"]),
        node("Div", ["x", "rms"], ["u"]), node("Mul", ["u", "gamma"], ["n"]),
    ]
    inits = _norm_inits(ax=np.array([-1], np.int64), two=np.float32(2.0), n_h=np.float32(H))
    return model(nodes + _head("n"), {"x": (2, 4, H)}, {"y": (2, 4, 3)}, inits)


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("spelling, rms", [(_tf2onnx_layer_norm, False), (_jax_layer_norm, False),
                                           (_sum_rms_norm, True)])
def test_written_out_norms_hold_their_statistic_like_the_fused_op(spelling, rms, named):
    """However the norm is written, AttnLRP holds its statistic constant (Prop. 3.4) and keeps the mean: the
    relevance equals the fused op's (whose builder applies the formula directly)."""
    m = spelling() if named else _unnamed(spelling())
    x, w = f32(2, 4, H, seed=1, scale=2.0) + 0.5, f32(2, 4, 3, seed=5)
    ours = Explainer(m).explain({"x": x}, output_relevance=w)
    ref = Explainer(_fused_layer_norm(rms)).explain({"x": x}, output_relevance=w)
    np.testing.assert_allclose(ours.outputs["y"], ref.outputs["y"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.relevance["x"], ref.relevance["x"], rtol=1e-4, atol=1e-6)
    # and the plain gradient differentiates the statistic: Gradient x Input of both spellings agree too
    g_ours = Explainer(m, composite="gradient-x-input").explain({"x": x}, output_relevance=w)
    g_ref = Explainer(_fused_layer_norm(rms), composite="gradient-x-input").explain({"x": x}, output_relevance=w)
    np.testing.assert_allclose(g_ours.relevance["x"], g_ref.relevance["x"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(g_ours.relevance["x"], ours.relevance["x"], rtol=1e-3)


def test_l2_normalisation_holds_the_norm():
    """``x / max(||x||, eps)`` (sentence embeddings): the norm is a second-moment statistic, held constant:
    ``R_x = x * w / ||x||`` for ``R_y = w * y``."""
    nodes = [node("ReduceL2", ["x", "ax"], ["nrm"], keepdims=1), node("Max", ["nrm", "eps"], ["d"]),
             node("Div", ["x", "d"], ["y"])]
    m = model(nodes, {"x": (3, H)}, {"y": (3, H)}, {"ax": np.array([-1], np.int64), "eps": np.float32(1e-12)})
    x, w = f32(3, H, seed=1), f32(3, H, seed=2)
    res = Explainer(m).explain({"x": x}, output_relevance=w)
    np.testing.assert_allclose(res.relevance["x"], x * w / np.linalg.norm(x, axis=-1, keepdims=True), rtol=RTOL)


def test_normalisation_statistic_is_found_structurally():
    g = Graph(_jax_layer_norm())
    carrying = set(g.producer) - g.static | {"x"}
    found = [(n.name, normalisation_statistic(g, n, carrying)) for n in g.nodes]
    stats = {name: s for name, s in found if s is not None}
    assert [s for s, _ in stats.values()] == ["rs"]  # Mul(d, rs): rs = (E[x^2] - E[x]^2 + eps)^-1/2 of x
    # a softmax written out (exp(x) / sum(exp(x))) is no normalisation: exp is not homogeneous
    sm = model([node("Exp", ["x"], ["e"]), node("ReduceSum", ["e", "ax"], ["s"], keepdims=1),
                node("Div", ["e", "s"], ["y"])], {"x": (2, H)}, {"y": (2, H)}, {"ax": np.array([-1], np.int64)})
    g = Graph(sm)
    assert normalisation_statistic(g, g.nodes[-1], {"x", "e", "s", "y"}) is None
    # nor is a mean normalisation w / sum(w) (no second moment)
    mn = model([node("ReduceSum", ["x", "ax"], ["s"], keepdims=1), node("Div", ["x", "s"], ["y"])],
               {"x": (2, H)}, {"y": (2, H)}, {"ax": np.array([-1], np.int64)})
    g = Graph(mn)
    assert normalisation_statistic(g, g.nodes[-1], {"x", "s", "y"}) is None


# ---------------------------------------------------------------------------------------------- activations
def _probe(nodes, inits=None):
    m = model(nodes, {"x": (2, H)}, {"y": (2, H)}, inits or {})
    g = Graph(m)
    return zero_centred(probe_function(g, g.nodes, "x", "y"))


@pytest.mark.parametrize("nodes, inits, expected", [
    ([node("Gelu", ["x"], ["y"])], None, True),
    ([node("Tanh", ["x"], ["y"])], None, True),
    ([node("Relu", ["x"], ["y"])], None, True),
    ([node("Sigmoid", ["x"], ["y"])], None, False),
    ([node("HardSigmoid", ["x"], ["y"])], None, False),
    ([node("Softplus", ["x"], ["y"])], None, False),
    ([node("Exp", ["x"], ["y"])], None, False),
    ([node("Sqrt", ["x"], ["y"])], None, False),  # f(0) = 0 but f(x)/x unbounded
    ([node("Clip", ["x", "lo", "hi"], ["y"])], {"lo": np.float32(0), "hi": np.float32(6)}, True),  # ReLU6
    ([node("Clip", ["x", "lo", "hi"], ["y"])], {"lo": np.float32(0.1), "hi": np.float32(6)}, False),
    ([node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])], None, True),  # SiLU
    ([node("Sigmoid", ["x"], ["s"]), node("Mul", ["s", "two"], ["t"]), node("Sub", ["t", "one"], ["y"])],
     {"two": np.float32(2), "one": np.float32(1)}, True),  # 2 sigmoid(x) - 1 = tanh(x / 2)
])
def test_zero_centred_is_decided_by_probing_the_function(nodes, inits, expected):
    assert _probe(nodes, inits) is expected


def _tanh_gelu_tf2onnx():
    """tf2onnx's tanh GELU: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``, operands in tf's order."""
    nodes = [node("Pow", ["x", "three"], ["x3"]), node("Mul", ["c1", "x3"], ["a"]), node("Add", ["x", "a"], ["b"]),
             node("Mul", ["c2", "b"], ["u"]), node("Tanh", ["u"], ["t"]), node("Add", ["one", "t"], ["p"]),
             node("Mul", ["half", "x"], ["hx"]), node("Mul", ["hx", "p"], ["g"])]
    inits = {"three": np.float32(3), "c1": np.float32(0.044715), "c2": np.float32(math.sqrt(2 / math.pi)),
             "one": np.float32(1), "half": np.float32(0.5), "W": f32(H, 3, seed=2)}
    return model(nodes + _head("g"), {"x": (2, H)}, {"y": (2, 3)}, inits)


@pytest.mark.parametrize("named", [True, False])
def test_written_out_gelu_is_one_identity_region(named):
    m = _tanh_gelu_tf2onnx() if named else _unnamed(_tanh_gelu_tf2onnx())
    fused = model([node("Gelu", ["x"], ["g"], approximate="tanh")] + _head("g"), {"x": (2, H)}, {"y": (2, 3)},
                  {"W": f32(H, 3, seed=2)}, opset=20)
    x, w = f32(2, H, seed=1, scale=2.0), f32(2, 3, seed=5)
    ex = Explainer(m)
    res = ex.explain({"x": x}, output_relevance=w)
    np.testing.assert_allclose(res.relevance["x"], Explainer(fused).explain({"x": x}, output_relevance=w)
                               .relevance["x"], rtol=1e-4, atol=1e-6)
    assert len(ex.analysis.regions) == 1


# ---------------------------------------------------------------------------------------------- gates
def _se_block():
    """Squeeze-excitation: ``h = x * sigmoid(mean(x) W1)``, read out by ``W2`` (no biases: conservation)."""
    nodes = [node("ReduceMean", ["x", "ax"], ["p"], keepdims=1), node("MatMul", ["p", "W1"], ["z"]),
             node("Sigmoid", ["z"], ["g"]), node("Mul", ["x", "g"], ["h"]), node("MatMul", ["h", "W2"], ["y"])]
    inits = {"ax": np.array([1], np.int64), "W1": f32(H, H, seed=3), "W2": f32(H, 3, seed=4)}
    return model(nodes, {"x": (2, 5, H)}, {"y": (2, 5, 3)}, inits)


def test_sigmoid_gate_is_held_constant_and_relevance_is_conserved():
    """The identity rule on a sigmoid divides by its input (sigmoid(0) = 0.5): the gate is held constant instead
    (signal-take-all), so ``R_x = x * (g * (w W2^T))`` and the relevance sums to the explained score."""
    m = _se_block()
    x = f32(2, 5, H, seed=1)
    x[0, 0, 0] = 1e-7  # inputs near 0 are where the identity rule on a sigmoid explodes
    w = np.zeros((2, 5, 3), np.float32)
    w[:, 2, 1] = 1
    ex = Explainer(m)
    res = ex.explain({"x": x}, output_relevance=w)
    W1, W2 = (numpy_helper.to_array(t) for t in m.graph.initializer if t.name in ("W1", "W2"))
    g = 1 / (1 + np.exp(-(x.mean(1, keepdims=True) @ W1)))
    np.testing.assert_allclose(res.relevance["x"], x * g * (w @ W2.T), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.relevance["x"].sum((1, 2)), res.score, rtol=1e-4)
    (mul,) = [n for n in ex.graph.nodes if n.op_type == "Mul"]
    assert ex.analysis.decisions[mul.name].kind == "gate"
    assert ex.analysis.decisions[[n.name for n in ex.graph.nodes if n.op_type == "Sigmoid"][0]].kind == "nonlinear"


def test_forcing_the_identity_rule_on_a_gate_warns_and_the_guard_names_the_layer():
    """A user may force the identity rule on a sigmoid (LXT does): a warning says it is unsound, and when the
    relevance then blows up, the conservation guard names where."""
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "b"], ["z"]), node("Sigmoid", ["z"], ["g"]),
             node("MatMul", ["g", "W2"], ["y"])]
    W1, b = f32(H, H, seed=3), f32(H, seed=5)
    m = model(nodes, {"x": (1, H)}, {"y": (1, 2)}, {"W1": W1, "b": b, "W2": f32(H, 2, seed=4)})
    # z = x W1 + b ~ 1e-4: the bias takes the share b / z of R_z, and G_z = G_g sigmoid(z) / z is huge
    x = np.linalg.solve(W1.T.astype(np.float64), 1e-4 - b.astype(np.float64))[None].astype(np.float32)
    with pytest.warns(UserWarning, match="identity rule divides"):
        ex = Explainer(m, overrides={"op:Sigmoid": Identity()})
    with pytest.warns(RelevanceWarning, match="Sigmoid"):
        ex.explain({"x": x}, target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = Explainer(m).explain({"x": x}, target=0)  # default: plain gradient through the sigmoid, no warning
    assert np.all(np.isfinite(res.relevance["x"]))


def test_sigmoid_alone_takes_the_plain_gradient():
    """A logistic read-out ``y = sigmoid(x W)``: R_x = x * W^T sigmoid'(z) (never the identity rule)."""
    W = f32(H, 2, seed=3)
    m = model([node("MatMul", ["x", "W"], ["z"]), node("Sigmoid", ["z"], ["y"])], {"x": (2, H)}, {"y": (2, 2)},
              {"W": W})
    x = f32(2, H, seed=1)
    res = Explainer(m).explain({"x": x}, target=1)
    s = 1 / (1 + np.exp(-(x @ W)))
    np.testing.assert_allclose(res.relevance["x"], x * (s * (1 - s))[:, 1:2] * W[:, 1], rtol=1e-4)


# ---------------------------------------------------------------------------------------------- softmax
def _attention_classifier(output_softmax: bool):
    """One attention block (P = softmax(q k^T), o = P v) and a classifier read-out, optionally with the model's own
    output softmax."""
    nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]), node("MatMul", ["x", "Wv"], ["v"]),
             node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["s"]),
             node("Softmax", ["s"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["o"]),
             node("ReduceMean", ["o", "ax"], ["pool"], keepdims=0), node("MatMul", ["pool", "Wc"], ["logits"])]
    out = "logits"
    if output_softmax:
        nodes.append(node("Softmax", ["logits"], ["probs"], axis=-1))
        out = "probs"
    inits = {"Wq": f32(H, H, seed=1), "Wk": f32(H, H, seed=2), "Wv": f32(H, H, seed=3), "Wc": f32(H, 3, seed=4),
             "ax": np.array([1], np.int64)}
    return model(nodes, {"x": (2, 5, H)}, {out: (2, 3)}, inits)


def test_output_softmax_is_not_attention_under_cp_lrp():
    """CP-LRP holds the attention weights constant, never the softmax that produces the explained output."""
    x = f32(2, 5, H, seed=9)
    ex = Explainer(_attention_classifier(True), composite="cp-lrp")
    kinds = {n.op_type + ":" + n.outputs[0]: ex.analysis.decisions[n.name].kind
             for n in ex.graph.nodes if n.op_type == "Softmax" and n.name in ex.analysis.decisions}
    assert kinds == {"Softmax:probs": "softmax"}  # the attention softmax is held constant (no decision kept)
    res = ex.explain({"x": x}, target=1)
    assert np.abs(res.relevance["x"]).sum() > 0
    # the logits' explanation under CP-LRP: all relevance through v (the attention weights are constants)
    lg = Explainer(_attention_classifier(False), composite="cp-lrp").explain({"x": x}, target=1)
    assert np.abs(lg.relevance["x"]).sum() > 0


# ---------------------------------------------------------------------------------------------- sources
V = 7


def _lookup_graph(kind: str) -> onnx.ModelProto:
    """Token ids encoded into embeddings three ways (and by Gather, the reference), then a linear read-out."""
    table = f32(V, H, seed=6)
    if kind == "gather":
        nodes = [node("Gather", ["table", "ids"], ["e"])]
        inits = {"table": table}
    elif kind == "onehot":
        nodes = [node("OneHot", ["ids", "depth", "vals"], ["oh"], axis=-1), node("MatMul", ["oh", "table"], ["e"])]
        inits = {"table": table, "depth": np.array(V, np.int64), "vals": np.float32([0, 1])}
    else:  # Equal with the vocabulary, then Cast (tf2onnx, hand-written graphs) or Where
        nodes = [node("Unsqueeze", ["ids", "last"], ["u"]), node("Equal", ["u", "vocab"], ["eq"])]
        if kind == "equal_cast":
            nodes.append(node("Cast", ["eq"], ["oh"], to=TensorProto.FLOAT))
        else:
            nodes.append(node("Where", ["eq", "one", "zero"], ["oh"]))
        nodes.append(node("MatMul", ["oh", "table"], ["e"]))
        inits = {"table": table, "last": np.array([-1], np.int64), "vocab": np.arange(V, dtype=np.int64),
                 "one": np.float32(1), "zero": np.float32(0)}
    nodes += [node("Tanh", ["e"], ["h"]), node("ReduceMean", ["h", "ax"], ["p"], keepdims=0),
              node("MatMul", ["p", "Wc"], ["y"])]
    inits.update(ax=np.array([1], np.int64), Wc=f32(H, 2, seed=7))
    return model(nodes, {"ids": ("int", 2, 5)}, {"y": (2, 2)}, inits)


@pytest.mark.parametrize("kind", ["onehot", "equal_cast", "equal_where"])
def test_one_hot_encoded_ids_are_relevance_sources(kind):
    ids = np.array([[1, 3, 0, 6, 2], [4, 4, 5, 1, 0]])
    ref = Explainer(_lookup_graph("gather")).explain({"ids": ids}, target=1)
    res = Explainer(_lookup_graph(kind)).explain({"ids": ids}, target=1)
    assert res.relevance["ids"].shape == ids.shape
    np.testing.assert_allclose(res.relevance["ids"], ref.relevance["ids"], rtol=1e-4, atol=1e-7)


def test_named_integer_input_is_a_source_whatever_the_encoding():
    """Byte values cast to float and scaled (no lookup at all): ``sources=["ids"]`` makes the cast a source."""
    nodes = [node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), node("Div", ["f", "c"], ["u"]),
             node("MatMul", ["u", "W"], ["y"])]
    W = f32(5, 2, seed=1)
    m = model(nodes, {"ids": ("int", 2, 5)}, {"y": (2, 2)}, {"c": np.float32(255), "W": W})
    ids = np.array([[1, 30, 0, 200, 7], [9, 4, 5, 1, 0]])
    with pytest.raises(InputError, match="no relevance source"):
        Explainer(m)
    res = Explainer(m, sources=["ids"]).explain({"ids": ids}, target=0)
    np.testing.assert_allclose(res.relevance["ids"], ids / 255 * W[:, 0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------- layouts
def _time_major(named_dims: bool):
    """A recogniser with ``(T, N, C)`` scores (CTC style): input ``(N, T, F)``, output transposed."""
    nodes = [node("MatMul", ["x", "W"], ["z"]), node("Transpose", ["z"], ["y"], perm=[1, 0, 2])]
    b, t = ("N", "T") if named_dims else (None, None)
    m = model(nodes, {"x": (b, t, H)}, {"y": (t, b, 4)}, {"W": f32(H, 4, seed=1)})
    return m


@pytest.mark.parametrize("named_dims", [True, False])
def test_time_major_output_is_explained_per_batch_element(named_dims):
    x = f32(3, 5, H, seed=2)  # N = 3, T = 5: the sizes tell apart even without names
    ex = Explainer(_time_major(named_dims))
    res = ex.explain({"x": x}, target=2, position=4)
    W = numpy_helper.to_array(ex.graph.model.graph.initializer[0])
    expected = np.zeros_like(x)
    expected[:, 4] = x[:, 4] * W[:, 2]
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.score, (x[:, 4] @ W)[:, 2], rtol=1e-5)
    # the same sizes both ways (N = T): names decide; without them the caller says so
    sq = f32(4, 4, H, seed=3)
    r = Explainer(_time_major(named_dims)).explain({"x": sq}, target=2, position=1, batch_axis=1)
    assert np.abs(r.relevance["x"][:, 1]).sum() > 0 and np.abs(r.relevance["x"][:, 0]).sum() == 0


def test_output_without_a_batch_axis_is_refused():
    """Scores of all batch elements flattened into one axis: explaining one row per batch element would fold
    several scores together."""
    nodes = [node("MatMul", ["x", "W"], ["z"]), node("Reshape", ["z", "shp"], ["y"])]
    m = model(nodes, {"x": (3, 5, H)}, {"y": (15, 4)}, {"W": f32(H, 4, seed=1), "shp": np.array([-1, 4], np.int64)})
    with pytest.raises(TargetError, match="no axis of the batch size 3"):
        Explainer(m).explain({"x": f32(3, 5, H)})


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_say_what_they_name():
    m = _se_block()
    x = f32(2, 5, H, seed=1)
    base = Explainer(m).explain({"x": x}, target=0).relevance["x"]
    by_node = Explainer(m, overrides={"Mul_h": Gradient()}).explain({"x": x}, target=0).relevance["x"]
    explicit = Explainer(m, overrides={"node:Mul_h": Gradient()}).explain({"x": x}, target=0).relevance["x"]
    np.testing.assert_array_equal(by_node, explicit)  # "Mul_h" is a node name (no op type of that name)
    assert not np.allclose(by_node, base)
    with pytest.raises(ConfigError, match="names no op type onnx-lrp knows and no node"):
        Explainer(m, overrides={"MatMull": Gradient()})
    with pytest.raises(ConfigError, match="knows no op type 'Bogus'"):
        Explainer(m, overrides={"op:Bogus": Gradient()})
    with pytest.raises(ConfigError, match="no node of the model is named"):
        Explainer(m, overrides={"node:/nothing/*": Gradient()})
    with pytest.raises(ConfigError, match="fits none of the nodes"):
        Explainer(m, overrides={"op:Sigmoid": Epsilon(0.1)})
    with pytest.warns(UserWarning, match="changes nothing: the model has no Conv node"):
        Explainer(m, overrides={"op:Conv": Gamma(0.25)})
    amb = model([node("Relu", ["x"], ["r"], name="Tanh"), node("Tanh", ["r"], ["y"], name="t")], {"x": (2, H)},
                {"y": (2, H)})
    with pytest.raises(ConfigError, match="both an op type and a node name"):
        Explainer(amb, overrides={"Tanh": Gradient()})


@pytest.mark.parametrize("bad", [lambda: Epsilon(-1.0), lambda: Gamma(float("nan")), lambda: Identity(float("inf")),
                                 lambda: Epsilon("0.1")])
def test_rule_parameters_are_checked(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


@pytest.mark.parametrize("bad", [lambda: Identity(0.0), lambda: Gamma(0.25, 0.0), lambda: attnlrp(identity_epsilon=0)])
def test_a_denominator_guard_of_zero_is_refused(bad):
    """Identity's ``f(x) / stab(x)`` and Gamma's ``z / stab(z + g z+)`` divide by 0 at a zero input without their
    epsilon (``Epsilon(0)`` is the plain gradient and stays allowed)."""
    with pytest.raises(ValueError, match="must be > 0"):
        bad()
    assert Epsilon(0.0).epsilon == 0.0


def test_onnx_attention_is_not_taken_for_the_contrib_op():
    """The registry is keyed by domain: the ai.onnx opset-23 ``Attention`` has no rule here (the com.microsoft
    builder would misread its inputs), so it is reported, not run."""
    from onnx_lrp import UnsupportedOpError

    m = model([node("Attention", ["x", "x", "x"], ["y"])], {"x": (1, 2, 4, H)}, {"y": (1, 2, 4, H)}, opset=23)
    with pytest.raises(UnsupportedOpError, match="Attention") as err:
        Explainer(m)
    assert err.value.ops == {"Attention": ["Attention_y"]}


def test_constant_rule_on_a_region_detaches_it():
    """``Constant`` on a written-out SiLU (named by its last node): nothing flows through it; the linear branch keeps
    its relevance. Naming a node inside the region (not its output) warns."""
    W = f32(H, H, seed=3)
    nodes = [node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["a"]), node("MatMul", ["x", "W"], ["h"]),
             node("Add", ["a", "h"], ["y"])]
    m = model(nodes, {"x": (2, H)}, {"y": (2, H)}, {"W": W})
    x, w = f32(2, H, seed=1), f32(2, H, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Constant override changes something: no "changes nothing" warning
        res = Explainer(m, overrides={"node:Mul_a": Constant()}).explain({"x": x}, output_relevance=w)
    np.testing.assert_allclose(res.relevance["x"], x * (w @ W.T), rtol=1e-5)
    with pytest.warns(UserWarning, match="inside the unary region"):
        Explainer(m, overrides={"node:Sigmoid_s": Gradient()})


def test_left_padding_is_refused_where_the_fused_attention_cannot_express_it():
    """onnxruntime's optimised BERT: ``EmbedLayerNormalization`` turns the mask into one length per row, which the
    fused ``Attention`` reads as right padding; a left-padded mask is refused before running, a right-padded one is
    explained as the plain export explains it."""
    from _support import tiny_model
    from _variants import variant

    fused = Explainer(variant("bert", "ort"))
    ids = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    left = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with pytest.raises(InputError, match=r"rows \[1\] are not right-padded"):
        fused.explain({"input_ids": ids, "attention_mask": left})
    right = left[:, ::-1].copy()
    ref = Explainer(tiny_model("bert")[1]).explain({"input_ids": ids, "attention_mask": right})
    res = fused.explain({"input_ids": ids, "attention_mask": right})
    np.testing.assert_allclose(res.relevance["input_ids"], ref.relevance["input_ids"], rtol=1e-3, atol=1e-6)


def test_inspect_shows_each_decision_and_why(tmp_path, capsys):
    """``onnx-lrp inspect`` prints, per node, the kind, the rule and the reason, before anything runs."""
    from onnx_lrp.cli import main

    path = tmp_path / "se.onnx"
    onnx.save(_se_block(), str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gate: input(s) [1] come from a non-zero-centred function" in out
    assert "Sigmoid: a non-linear function for which the identity rule is unsound" in out
    path = tmp_path / "ln.onnx"
    onnx.save(_jax_layer_norm(), str(path))
    assert main(["inspect", str(path), "--carrying-only"]) == 0
    out = capsys.readouterr().out
    assert "normalisation: 'rs' is a second-moment statistic of 'x'" in out and "held" in out


def test_small_patterns_on_hand_built_graphs():
    """The structural helpers, each on the smallest graph that shows it."""
    from onnx_lrp import _patterns as pat

    b = f32(3, seed=1)
    g = Graph(model([node("MatMul", ["x", "W"], ["h"]), node("Add", ["b", "h"], ["z"]),
                     node("Add", ["z", "r"], ["s1"]), node("Add", ["s1", "x2"], ["s"])],
                    {"x": (2, 3), "r": (2, 3), "x2": (2, 3)}, {"s": (2, 3)}, {"W": f32(3, 3), "b": b}))
    mm, bias_add, add1, add2 = g.nodes
    np.testing.assert_array_equal(pat.following_bias(g, mm), b)  # the bias on either side of the Add
    assert pat.following_bias(g, add1) is None  # its consumer adds a run-time tensor, no bias
    assert pat.continues_sum(g, add1) and not pat.continues_sum(g, add2)
    kinds = {"Add_s1": "add", "Add_s": "add"}
    assert pat.sums_carrying_terms(g, add2, kinds)
    carrying = {"x", "h", "z", "r", "s1", "x2", "s"}
    assert pat.epsilon_site(g, mm, "map", "linear", kinds, carrying) == (True, pytest.approx(b))
    assert pat.epsilon_site(g, add1, "sum", "add", kinds, carrying) == (False, None)  # the chain goes on
    assert pat.epsilon_site(g, add2, "sum", "add", kinds, carrying) == (True, None)  # ...and ends here
    # a LayerNorm's centring x - mean(x) is no layer of its own
    g = Graph(_jax_layer_norm())
    sub = next(n for n in g.nodes if n.name == "Sub_d")
    carrying = set(g.producer) - g.static | {"x"}
    assert pat.is_centring(g, sub, carrying)
    assert pat.epsilon_site(g, sub, "sum", "add", {}, carrying) == (False, None)
    # Where(IsNaN(s), 0, s) after a softmax
    g = Graph(model([node("Softmax", ["x"], ["s"]), node("IsNaN", ["s"], ["n"]),
                     node("Where", ["n", "zero", "s"], ["y"])], {"x": (2, 3)}, {"y": (2, 3)}, {"zero": np.float32(0)}))
    assert pat.nan_guard(g, "s").name == "Where_y"
    # a seq-first recurrent input has its batch on axis 1
    W = np.zeros((1, 8, 3), np.float32)
    g = Graph(model([node("LSTM", ["x", "W", "R"], ["y"], hidden_size=2)], {"x": (5, 2, 3)}, {"y": (5, 1, 2, 2)},
                    {"W": W, "R": np.zeros((1, 8, 2), np.float32)}))
    assert pat.input_batch_axis(g, "x") == 1
    g = Graph(model([node("LSTM", ["x", "W", "R"], ["y"], hidden_size=2, layout=1)], {"x": (2, 5, 3)},
                    {"y": (2, 5, 1, 2)}, {"W": W, "R": np.zeros((1, 8, 2), np.float32)}))
    assert pat.input_batch_axis(g, "x") == 0
