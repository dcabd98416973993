"""Rule unit tests on hand-built graphs: expected values are written out from the explicit AttnLRP formulas
(attnlrp-rules.md), independently of the gradient-form engine."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lrp import Explainer

from _graphs import f32, model, node

RTOL = 1e-5


def explain(m, feeds, w, composite="attnlrp", **kw):
    ex = Explainer(m, composite=composite, **kw)
    return ex.explain(feeds, output_relevance=w)


def onehot(shape, index):
    w = np.zeros(shape, np.float32)
    w[index] = 1
    return w


def test_linear_with_bias_eps0():
    """z = x W + b: R_x = x * W^T (R_z / z); with R_z = onehot * z that is x_i W_ij; the bias absorbs b_j."""
    x, W, b = f32(1, 4, seed=1), f32(4, 3, seed=2), f32(3, seed=3)
    m = model([node("MatMul", ["x", "W"], ["h"]), node("Add", ["h", "b"], ["y"])],
              {"x": (1, 4)}, {"y": (1, 3)}, {"W": W, "b": b})
    res = explain(m, {"x": x}, onehot((1, 3), (0, 1)))
    np.testing.assert_allclose(res.relevance["x"], x * W[:, 1][None], rtol=RTOL, atol=1e-7)
    y = x @ W + b
    assert res.score[0] == pytest.approx(y[0, 1], rel=1e-6)
    assert res.relevance["x"].sum() == pytest.approx(y[0, 1] - b[1], rel=1e-5)


def test_linear_epsilon_rule():
    """eps-LRP with eps > 0: R_x = x * W^T (R_z / (z + eps sign z))."""
    x, W = f32(1, 4, seed=1), f32(4, 3, seed=2)
    eps = 0.5
    m = model([node("MatMul", ["x", "W"], ["y"])], {"x": (1, 4)}, {"y": (1, 3)}, {"W": W})
    from onnx_lrp import Epsilon

    ex = Explainer(m, overrides={"MatMul": Epsilon(eps)})
    res = ex.explain({"x": x}, output_relevance=np.ones((1, 3), np.float32))
    z = x @ W
    expected = x * ((z / (z + eps * np.where(z >= 0, 1, -1))) @ W.T)
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=RTOL)


def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def test_stabilise_signs_and_dtype():
    """``stab(z) = z + eps sign(z)`` with ``sign(+0) = sign(-0) = 1``; never 0 where ``|z|`` is below ``eps``; the
    input's dtype is kept and the input is not written."""
    from onnx_lrp.rules import stabilise

    z = np.array([0.0, -0.0, 1e-12, -1e-12, -2.0, 3.0, np.inf, -np.inf], dtype=np.float32)
    before = z.copy()
    out = stabilise(z, 1e-10)
    eps32 = np.float32(1e-10)
    expected = np.array([eps32, eps32, np.float32(1e-12) + eps32, np.float32(-1e-12) - eps32, -2.0, 3.0, np.inf,
                         -np.inf], dtype=np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, expected) and (out != 0).all()
    assert np.array_equal(z, before, equal_nan=True) and np.signbit(z[1])
    np.testing.assert_array_equal(stabilise(np.array([-0.0, -1.0, 2.0]), 0.5), [0.5, -1.5, 2.5])
    assert stabilise(np.array(-0.0, np.float32), 0.5) == 0.5 and stabilise(np.float64(-2.0), 0.5) == -2.5  # 0-d, scalar


def _two_layer_graphs():
    """``y = (0.5 (x W1 + b1)) W2 + b2`` written as MatMul + bias Add + scale Mul, and as Gemm + Mul + Gemm."""
    W1, b1, W2, b2 = f32(5, 6, seed=11), f32(6, seed=12), f32(6, 3, seed=13), f32(3, seed=14)
    inits = {"W1": W1, "b1": b1, "W2": W2, "b2": b2, "half": np.float32(0.5)}
    split = model([node("MatMul", ["x", "W1"], ["m1"]), node("Add", ["m1", "b1"], ["z1"]),
                   node("Mul", ["z1", "half"], ["a"]), node("MatMul", ["a", "W2"], ["m2"]),
                   node("Add", ["b2", "m2"], ["y"])], {"x": (2, 5)}, {"y": (2, 3)}, inits)
    fused = model([node("Gemm", ["x", "W1", "b1"], ["z1"]), node("Mul", ["z1", "half"], ["a"]),
                   node("Gemm", ["a", "W2", "b2"], ["y"])], {"x": (2, 5)}, {"y": (2, 3)}, inits)
    return split, fused, (W1, b1, W2, b2)


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_epsilon_once_per_layer(eps):
    """eps-LRP treats ``x W + b`` as one layer, whatever nodes write it (LXT's ``linear_epsilon`` divides by
    ``z = F.linear(x, W, b)``); scaling by a constant is no layer. Reference written out explicitly:
    ``R_a = a * W2 (R_y / stab(y))``, ``R_z1 = R_a``, ``R_x = x * W1 (R_z1 / stab(z1))``."""
    from onnx_lrp import attnlrp

    split, fused, (W1, b1, W2, b2) = _two_layer_graphs()
    x = f32(2, 5, seed=15)
    w = onehot((2, 3), (slice(None), 1))
    z1 = x @ W1 + b1
    a = 0.5 * z1
    y = a @ W2 + b2
    R_a = a * ((w * y / _stab(y, eps)) @ W2.T)
    R_x = x * ((R_a / _stab(z1, eps)) @ W1.T)
    for m in (split, fused):
        res = explain(m, {"x": x}, w, composite=attnlrp(epsilon=eps))
        np.testing.assert_allclose(res.relevance["x"], R_x, rtol=1e-4, atol=1e-6)


def test_epsilon_on_a_sum_chain_is_order_independent():
    """``word + segment + position`` is one sum layer, ``z = w + t + p`` (stabilised once, at the chain's end),
    whichever order the Adds come in and whichever term is a constant. Reference:
    ``R_s = s * W (R_y / stab(y))``, ``R_w = w * R_s / stab(s)``."""
    from onnx_lrp import attnlrp

    eps = 0.5
    E, T, Pos, W = f32(10, 4, seed=21), f32(2, 4, seed=22), f32(3, 4, seed=23), f32(4, 2, seed=24)
    ids, tt = np.array([[4, 9, 1]]), np.array([[0, 1, 1]])
    lookups = [node("Gather", ["E", "ids"], ["w"]), node("Gather", ["T", "tt"], ["t"])]
    orders = ([node("Add", ["w", "t"], ["wt"]), node("Add", ["wt", "P"], ["s"])],
              [node("Add", ["P", "w"], ["wp"]), node("Add", ["wp", "t"], ["s"])])
    w_, t_ = E[ids[0]], T[tt[0]]
    s = w_ + t_ + Pos
    y = s @ W
    R_y = onehot((1, 3, 2), (0, 2, 0))[0] * y
    R_s = s * ((R_y / _stab(y, eps)) @ W.T)
    for order in orders:
        m = model(lookups + order + [node("MatMul", ["s", "W"], ["y"])], {"ids": ("int", 1, 3), "tt": ("int", 1, 3)},
                  {"y": (1, 3, 2)}, {"E": E, "T": T, "P": Pos, "W": W})
        res = Explainer(m, composite=attnlrp(epsilon=eps)).explain({"ids": ids, "tt": tt}, target=0, position=2)
        np.testing.assert_allclose(res.relevance["ids"][0], (w_ * R_s / _stab(s, eps)).sum(-1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(res.relevance["tt"][0], (t_ * R_s / _stab(s, eps)).sum(-1), rtol=1e-4, atol=1e-6)


def test_bias_free_linear_chain_conserves():
    x = f32(2, 6, seed=4)
    m = model([node("MatMul", ["x", "W1"], ["h"]), node("MatMul", ["h", "W2"], ["y"])],
              {"x": (2, 6)}, {"y": (2, 5)}, {"W1": f32(6, 8, seed=5), "W2": f32(8, 5, seed=6)})
    ex = Explainer(m)
    res = ex.explain({"x": x}, target=[1, 3])
    np.testing.assert_allclose(res.relevance["x"].sum(-1), res.score, rtol=1e-5)


def test_gemm_trans_b_matches_matmul():
    x, W, b = f32(2, 4, seed=1), f32(3, 4, seed=2), f32(3, seed=3)
    m = model([node("Gemm", ["x", "W", "b"], ["y"], transB=1, alpha=0.5)], {"x": (2, 4)}, {"y": (2, 3)},
              {"W": W, "b": b})
    res = Explainer(m).explain({"x": x}, target=2)
    np.testing.assert_allclose(res.relevance["x"], x * 0.5 * W[2][None], rtol=RTOL)


def test_softmax_with_masked_entry():
    """Prop. 3.1: R_x = x * (R_s - s * sum(R_s)); masked (-inf) entries get 0, never NaN."""
    x = f32(1, 4, seed=7)
    mask = np.array([[0, 0, -np.inf, 0]], np.float32)
    c = f32(1, 4, seed=8)
    m = model([node("Add", ["x", "m"], ["z"]), node("Softmax", ["z"], ["s"], axis=-1),
               node("Mul", ["s", "c"], ["y"])], {"x": (1, 4)}, {"y": (1, 4)}, {"m": mask, "c": c})
    res = explain(m, {"x": x}, onehot((1, 4), (0, 1)))
    z = x + mask
    s = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    R_s = np.zeros((1, 4))
    R_s[0, 1] = s[0, 1] * c[0, 1]  # R_y at the target, passed unchanged through the constant scaling
    zz = np.where(np.isinf(z), 0, z)
    R_z = zz * (R_s - s * R_s.sum())
    expected = np.where(np.isinf(z), 0, x * R_z / np.where(zz == 0, 1, zz))  # eps-LRP through the mask add
    assert not np.isnan(res.relevance["x"]).any()
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=1e-5, atol=1e-7)
    assert res.relevance["x"][0, 2] == 0


def test_bilinear_matmul_uniform():
    """Prop. 3.3: N = R_O / (2 O); R_A = A * (N B^T); R_B = B * (A^T N)."""
    A, B = f32(1, 3, 4, seed=9), f32(1, 4, 2, seed=10)
    m = model([node("MatMul", ["A", "B"], ["O"])], {"A": (1, 3, 4), "B": (1, 4, 2)}, {"O": (1, 3, 2)})
    w = np.zeros((1, 3, 2), np.float32)
    w[0, 1, 0] = 1
    res = explain(m, {"A": A, "B": B}, w)
    O = A @ B
    N = w * O / (2 * O)
    np.testing.assert_allclose(res.relevance["A"], A * (N @ B.transpose(0, 2, 1)), rtol=RTOL)
    np.testing.assert_allclose(res.relevance["B"], B * (A.transpose(0, 2, 1) @ N), rtol=RTOL)
    total = res.relevance["A"].sum() + res.relevance["B"].sum()
    assert total == pytest.approx(O[0, 1, 0], rel=1e-5)


def test_uniform_product_and_gradient_rule():
    a, b = f32(2, 3, seed=11), f32(2, 3, seed=12)
    m = model([node("Mul", ["a", "b"], ["y"])], {"a": (2, 3), "b": (2, 3)}, {"y": (2, 3)})
    w = np.ones((2, 3), np.float32)
    res = explain(m, {"a": a, "b": b}, w)
    np.testing.assert_allclose(res.relevance["a"], a * b / 2, rtol=RTOL)
    np.testing.assert_allclose(res.relevance["b"], a * b / 2, rtol=RTOL)
    gxi = explain(m, {"a": a, "b": b}, w, composite="gradient-x-input")
    np.testing.assert_allclose(gxi.relevance["a"], a * b, rtol=RTOL)  # d(ab)/da * a


def test_division_of_carrying_tensors():
    """a / b with both carrying: a * (1/b) under the uniform rule, identity on 1/b: each gets R/2."""
    a, b = f32(2, 3, seed=13), np.abs(f32(2, 3, seed=14)) + 0.5
    m = model([node("Div", ["a", "b"], ["y"])], {"a": (2, 3), "b": (2, 3)}, {"y": (2, 3)})
    res = explain(m, {"a": a, "b": b}, np.ones((2, 3), np.float32))
    np.testing.assert_allclose(res.relevance["a"], a / b / 2, rtol=RTOL)
    np.testing.assert_allclose(res.relevance["b"], a / b / 2, rtol=RTOL)


def _layernorm_expected(x, w, b, eps, j):
    """eps-LRP (eps=0) on y = w * (x - mean) / sigma + b with sigma constant: R_x_i = x_i M_ji."""
    n = x.shape[-1]
    sigma = np.sqrt(((x - x.mean()) ** 2).mean() + eps)
    M = np.diag(w / sigma) @ (np.eye(n) - np.ones((n, n)) / n)
    return x * M[j]


def test_layernorm_fused_and_written_out():
    x, w, b = f32(1, 6, seed=15), 1 + f32(6, seed=16, scale=0.3), f32(6, seed=17, scale=0.2)
    eps = 1e-5
    fused = model([node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=eps)],
                  {"x": (1, 6)}, {"y": (1, 6)}, {"w": w, "b": b})
    written = model([
        node("ReduceMean", ["x", "axes"], ["mu"]), node("Sub", ["x", "mu"], ["d"]),
        node("Pow", ["d", "two"], ["d2"]), node("ReduceMean", ["d2", "axes"], ["var"]),
        node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]), node("Div", ["d", "sd"], ["xh"]),
        node("Mul", ["xh", "w"], ["yw"]), node("Add", ["yw", "b"], ["y"]),
    ], {"x": (1, 6)}, {"y": (1, 6)}, {"w": w, "b": b, "axes": np.array([-1]), "two": np.float32(2.0),
                                     "eps": np.float32(eps)})
    expected = _layernorm_expected(x[0], w, b, eps, 2)
    for m in (fused, written):
        res = explain(m, {"x": x}, onehot((1, 6), (0, 2)))
        np.testing.assert_allclose(res.relevance["x"][0], expected, rtol=1e-4, atol=1e-7)


def test_rmsnorm_fused_and_written_out():
    """Identity rule for the normaliser: y_j = w_j x_j / rms, so R_x = onehot * y."""
    x, w = f32(1, 5, seed=18), 1 + f32(5, seed=19, scale=0.3)
    eps = 1e-6
    fused = model([node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1, epsilon=eps)],
                  {"x": (1, 5)}, {"y": (1, 5)}, {"w": w})
    written = model([  # as optimum writes RMSNorm
        node("Pow", ["x", "two"], ["x2"]), node("ReduceMean", ["x2", "axes"], ["ms"]),
        node("Add", ["ms", "eps"], ["mse"]), node("Sqrt", ["mse"], ["rms"]), node("Div", ["one", "rms"], ["inv"]),
        node("Mul", ["x", "inv"], ["xn"]), node("Mul", ["w", "xn"], ["y"]),
    ], {"x": (1, 5)}, {"y": (1, 5)}, {"w": w, "axes": np.array([-1]), "two": np.float32(2.0),
                                     "eps": np.float32(eps), "one": np.float32(1.0)})
    y = w * x / np.sqrt((x**2).mean() + eps)
    for m in (fused, written):
        res = explain(m, {"x": x}, onehot((1, 5), (0, 3)))
        np.testing.assert_allclose(res.relevance["x"], onehot((1, 5), (0, 3)) * y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("act", ["silu", "erf_gelu", "tanh_gelu", "tanh", "gelu_op"])
def test_identity_rule_on_activations(act):
    """Eq. 9: R_x = R_y element-wise, for single ops and for activations written out as several ops."""
    x = f32(2, 5, seed=20)
    c = {"half": np.float32(0.5), "one": np.float32(1.0), "sqrt2": np.float32(np.sqrt(2)),
         "k": np.float32(0.044715), "three": np.float32(3.0), "s2p": np.float32(np.sqrt(2 / np.pi))}
    nodes = {
        "silu": [node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])],
        "erf_gelu": [node("Div", ["x", "sqrt2"], ["a"]), node("Erf", ["a"], ["e"]), node("Add", ["e", "one"], ["e1"]),
                     node("Mul", ["x", "e1"], ["m"]), node("Mul", ["m", "half"], ["y"])],
        "tanh_gelu": [node("Pow", ["x", "three"], ["x3"]), node("Mul", ["x3", "k"], ["kx3"]),
                      node("Add", ["x", "kx3"], ["inner"]), node("Mul", ["inner", "s2p"], ["u"]),
                      node("Tanh", ["u"], ["t"]), node("Add", ["t", "one"], ["t1"]),
                      node("Mul", ["x", "half"], ["hx"]), node("Mul", ["hx", "t1"], ["y"])],
        "tanh": [node("Tanh", ["x"], ["y"])],
        "gelu_op": [node("Gelu", ["x"], ["y"])],
    }[act]
    m = model(nodes, {"x": (2, 5)}, {"y": (2, 5)}, c, opset=20)
    ex = Explainer(m)
    w = f32(2, 5, seed=21)
    res = ex.explain({"x": x}, output_relevance=w)
    y = res.outputs["y"]
    np.testing.assert_allclose(res.relevance["x"], w * y, rtol=1e-4, atol=1e-6)
    if act in ("silu", "erf_gelu", "tanh_gelu"):
        assert len(ex.analysis.regions) == 1  # one unary region, not a product of x and f(x)


def test_broadcast_operand_sums_over_broadcast_axes():
    """z = x + b with b broadcast over rows: R_x = x R / z, R_b = sum_rows b R / z; R = z gives R_x = x, R_b = 2b."""
    x, b = f32(2, 3, seed=22), f32(3, seed=23)
    m = model([node("Add", ["x", "b"], ["y"])], {"x": (2, 3), "b": (3,)}, {"y": (2, 3)})
    res = explain(m, {"x": x, "b": b}, np.ones((2, 3), np.float32))
    np.testing.assert_allclose(res.relevance["x"], x, rtol=RTOL)
    np.testing.assert_allclose(res.relevance["b"], 2 * b, rtol=RTOL)


def test_data_movement_routes_exactly():
    """Slice, Neg, Concat, Transpose, Reshape, Gather: relevance moves with the values."""
    x = f32(2, 4, seed=24)
    m = model([
        node("Slice", ["x", "s0", "e0", "ax"], ["a"]), node("Slice", ["x", "s1", "e1", "ax"], ["b"]),
        node("Neg", ["b"], ["nb"]), node("Concat", ["nb", "a"], ["c"], axis=1),
        node("Transpose", ["c"], ["t"], perm=[1, 0]), node("Reshape", ["t", "shape"], ["r"]),
        node("Gather", ["r", "idx"], ["y"], axis=0),
    ], {"x": (2, 4)}, {"y": (3,)}, {"s0": np.array([0]), "e0": np.array([2]), "s1": np.array([2]),
                                    "e1": np.array([4]), "ax": np.array([1]), "shape": np.array([-1]),
                                    "idx": np.array([0, 5, 5])})
    res = explain(m, {"x": x}, np.ones((3,), np.float32))
    # c = [-x[:, 2:], x[:, :2]] ; t = c.T ; r = t.ravel() ; y = r[[0, 5, 5]]
    c = np.concatenate([-x[:, 2:], x[:, :2]], 1)
    r = c.T.ravel()
    expected_r = np.zeros(8)
    np.add.at(expected_r, [0, 5, 5], r[[0, 5, 5]])
    # route back: r -> t -> c -> (x[:, 2:] via Neg, x[:, :2])
    Rc = expected_r.reshape(4, 2).T
    expected = np.concatenate([Rc[:, 2:], Rc[:, :2]], 1)
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=RTOL, atol=1e-7)
    assert res.relevance["x"].sum() == pytest.approx(res.score.sum(), rel=1e-5)


def test_cp_lrp_treats_softmax_as_constant():
    """CP-LRP: in A V all relevance goes to V (A constant), none through the softmax."""
    q, v = f32(1, 3, 3, seed=25), f32(1, 3, 2, seed=26)
    m = model([node("Softmax", ["q"], ["a"], axis=-1), node("MatMul", ["a", "v"], ["o"])],
              {"q": (1, 3, 3), "v": (1, 3, 2)}, {"o": (1, 3, 2)})
    w = np.ones((1, 3, 2), np.float32)
    cp = explain(m, {"q": q, "v": v}, w, composite="cp-lrp")
    a = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    np.testing.assert_allclose(cp.relevance["v"], v * (a.transpose(0, 2, 1) @ w), rtol=RTOL)
    assert np.all(cp.relevance["q"] == 0)
    att = explain(m, {"q": q, "v": v}, w)
    np.testing.assert_allclose(att.relevance["v"], v * (a.transpose(0, 2, 1) @ w) / 2, rtol=RTOL)


def test_einsum_linear_and_bilinear():
    """Einsum with a constant operand is linear (conserves without bias); with two carrying operands it is the
    uniform rule like MatMul."""
    x, W = f32(2, 3, 4, seed=30), f32(4, 5, seed=31)
    lin = model([node("Einsum", ["x", "W"], ["y"], equation="bld,de->ble")], {"x": (2, 3, 4)}, {"y": (2, 3, 5)},
                {"W": W})
    w = np.zeros((2, 3, 5), np.float32)
    w[1, 2, 3] = 1
    res = explain(lin, {"x": x}, w)
    np.testing.assert_allclose(res.relevance["x"][1, 2], x[1, 2] * W[:, 3], rtol=RTOL)
    assert res.relevance["x"].sum() == pytest.approx(float(res.score[1]), rel=1e-5)
    A, B = f32(1, 3, 4, seed=32), f32(1, 4, 2, seed=33)
    bil = model([node("Einsum", ["A", "B"], ["O"], equation="bij,bjk->bik")], {"A": (1, 3, 4), "B": (1, 4, 2)},
                {"O": (1, 3, 2)})
    mm = model([node("MatMul", ["A", "B"], ["O"])], {"A": (1, 3, 4), "B": (1, 4, 2)}, {"O": (1, 3, 2)})
    w = f32(1, 3, 2, seed=34)
    r1, r2 = explain(bil, {"A": A, "B": B}, w), explain(mm, {"A": A, "B": B}, w)
    for k in ("A", "B"):
        np.testing.assert_allclose(r1.relevance[k], r2.relevance[k], rtol=1e-5)
    # an index summed inside one operand only: the gradient is constant along it
    red = model([node("Einsum", ["x"], ["y"], equation="bld->bl")], {"x": (2, 3, 4)}, {"y": (2, 3)})
    res = explain(red, {"x": x}, np.ones((2, 3), np.float32))
    np.testing.assert_allclose(res.relevance["x"], x, rtol=RTOL)


def test_reduce_max_routes_to_the_maximum():
    x = f32(2, 5, seed=35)
    m = model([node("ReduceMax", ["x", "ax"], ["y"], keepdims=0)], {"x": (2, 5)}, {"y": (2,)}, {"ax": np.array([1])})
    res = explain(m, {"x": x}, np.ones(2, np.float32))
    expected = np.where(x == x.max(1, keepdims=True), x, 0)
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=RTOL)
