"""LSTM, GRU, RNN (and onnxruntime's DynamicQuantizeLSTM): unrolled relevance.

References: torch autograd on the exported torch modules (Gradient x Input, exact); the independent torch-autograd
reference of the same rules in tests/_recurrent_reference.py (AttnLRP: gates held constant, identity rule on
tanh), itself checked against the torch modules and against onnxruntime's outputs; central differences of
onnxruntime's kernels for the configurations torch does not export (sequence_lens, reverse, clip, peepholes,
input_forget, GRU without linear_before_reset).
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_lrp import Explainer, Uniform, attnlrp
from onnx_lrp.errors import OnnxLrpError

from onnx_lrp.reference.recurrent import onnx_rnn, torch_module_reference
from _support import rel_err

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The torch references are many tiny ops: more threads only contend (20x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Classifier(torch.nn.Module):
    """A recurrent encoder and a linear head on the last time step."""

    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(**kw)
        self.head = torch.nn.Linear(kw["hidden_size"] * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        y = self.rnn(x)[0]
        return self.head(y[:, -1] if self.rnn.batch_first else y[-1])

    def reference(self, x, rule, epsilon=0.0):
        y = torch_module_reference(self.rnn, x, rule, epsilon)
        last = y[:, -1] if self.rnn.batch_first else y[-1]
        if epsilon:
            from onnx_lrp.reference.torch import eps_layer

            return eps_layer(self.head(last), epsilon)
        return self.head(last)


def _export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _input_x_grad(fn, x, w):
    xr = x.clone().requires_grad_(True)
    (fn(xr) * w).sum().backward()
    return (xr * xr.grad).detach().numpy()


MODELS = [
    (torch.nn.LSTM, dict(num_layers=1, bidirectional=False, batch_first=False)),
    (torch.nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (torch.nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=False)),
    (torch.nn.GRU, dict(num_layers=1, bidirectional=False, batch_first=True)),
    (torch.nn.RNN, dict(num_layers=2, bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("cls,kw", MODELS, ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(
    f"{k}{int(x)}" for k, x in v.items()))
def test_exported_torch_models(cls, kw):
    """nn.LSTM / nn.GRU / nn.RNN (1-2 layers, bidirectional, batch-first) with a Linear head, exported by
    torch.onnx.export: Gradient x Input equals torch autograd on the module; AttnLRP, CP-LRP and eps-LRP equal the
    torch reference of the same rules (which itself reproduces the module's output and gradient)."""
    torch.manual_seed(0)
    model = Classifier(cls, input_size=5, hidden_size=6, **kw).eval()
    with torch.no_grad():  # gates far from 1/2 and pre-activations of order 1: far from linear
        for p in model.rnn.parameters():
            p.mul_(3.0)
    x = torch.randn(2, 7, 5) if kw["batch_first"] else torch.randn(7, 2, 5)
    m = _export(model, x)
    assert {n.op_type for n in m.graph.node} >= {cls.__name__}
    w = torch.randn(2, 3)
    feeds = {"x": x.numpy()}

    def ours(composite):
        return Explainer(m, composite=composite).explain(feeds, output="y", output_relevance=w.numpy()).relevance["x"]

    with torch.no_grad():  # the reference computes what the module computes
        np.testing.assert_allclose(model.reference(x, "gradient").numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    gxi = _input_x_grad(model, x, w)
    np.testing.assert_allclose(_input_x_grad(lambda v: model.reference(v, "gradient"), x, w), gxi, rtol=1e-4,
                               atol=1e-6 * np.abs(gxi).max())
    assert rel_err(ours("gradient-x-input"), gxi) <= 1e-5
    lrp = _input_x_grad(lambda v: model.reference(v, "attnlrp"), x, w)
    assert rel_err(lrp, gxi) > 1e-2  # the rules change the answer on this model
    assert rel_err(ours("attnlrp"), lrp) <= TOL
    assert rel_err(ours("cp-lrp"), lrp) <= TOL  # CP-LRP holds the gates constant too
    eps_ref = _input_x_grad(lambda v: model.reference(v, "attnlrp", epsilon=0.5), x, w)
    assert rel_err(ours(attnlrp(epsilon=0.5)), eps_ref) <= TOL


# ---------------------------------------------------------------------------------------------- single nodes
def _node_model(op, T=5, B=3, I=4, H=3, direction="bidirectional", lens=False, states=True, peepholes=False,
                dtype=np.float32, seed=0, **attrs):
    """One ``op`` node with random weights; initial states (and sequence lengths) as graph inputs."""
    rng = np.random.RandomState(seed)
    D, G = (2 if direction == "bidirectional" else 1), {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    ttype = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    inits = {"W": rng.randn(D, G * H, I) * 1.5, "R": rng.randn(D, G * H, H) * 1.5, "B": rng.randn(D, 2 * G * H)}
    names = ["x", "W", "R", "B", "lens" if lens else "", "h0" if states else ""]
    if op == "LSTM":
        names += ["c0" if states else "", "P" if peepholes else ""]
        if peepholes:
            inits["P"] = rng.randn(D, 3 * H)
    feeds = {"x": rng.randn(T, B, I).astype(dtype)}
    if lens:
        feeds["lens"] = np.array([T, 2, 4][:B], np.int32)
    for s in ("h0", "c0") if op == "LSTM" else ("h0",):
        if states:
            feeds[s] = rng.randn(D, B, H).astype(dtype)
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    vi = [helper.make_tensor_value_info(k, TensorProto.INT32 if k == "lens" else ttype, list(v.shape))
          for k, v in feeds.items()]
    graph = helper.make_graph([helper.make_node(op, names, outs, hidden_size=H, direction=direction, **attrs)], "g", vi,
                              [helper.make_tensor_value_info(o, ttype, None) for o in outs],
                              [numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), feeds, inits


CONFIGS = [
    ("RNN", dict()), ("RNN", dict(lens=True, direction="reverse")), ("RNN", dict(clip=0.6, states=False)),
    ("GRU", dict(lens=True)), ("GRU", dict(linear_before_reset=1, direction="reverse")), ("GRU", dict(clip=0.6)),
    ("LSTM", dict(lens=True)), ("LSTM", dict(peepholes=True, direction="forward")), ("LSTM", dict(clip=0.6)),
    ("LSTM", dict(input_forget=1, lens=True, peepholes=True)),
]


def _reference(op, feeds, inits, attrs, rule, outs_w, epsilon=0.0):
    """Reference relevance of every float input for ``sum_k <w_k, output_k>`` under ``rule``."""
    t = {k: torch.tensor(v.astype(np.float64), requires_grad=k in ("x", "h0", "c0")) for k, v in feeds.items()
         if k != "lens"}
    kw = {k: v for k, v in attrs.items() if k in ("clip", "linear_before_reset", "input_forget")}
    kw["direction"] = attrs.get("direction", "bidirectional")
    outs = onnx_rnn(op, t["x"], *(torch.tensor(inits[k]) for k in ("W", "R", "B")), t.get("h0"), t.get("c0"),
                    torch.tensor(inits["P"]) if "P" in inits else None,
                    torch.tensor(feeds["lens"]) if "lens" in feeds else None, rule=rule, epsilon=epsilon, **kw)
    sum(((o * torch.tensor(w)).sum() for o, w in zip(outs, outs_w) if w is not None)).backward()
    return {k: (v * v.grad).detach().numpy() for k, v in t.items()}, [o.detach().numpy() for o in outs]


@pytest.mark.parametrize("op,attrs", CONFIGS, ids=[f"{op}-{'-'.join(f'{k}{v}' for k, v in a.items())}"
                                                   for op, a in CONFIGS])
def test_single_node_configurations(op, attrs):
    """Every configuration: the reference reproduces onnxruntime's outputs; our Gradient x Input equals its
    autograd and our AttnLRP its rules, for relevance starting at each output (Y, Y_h, Y_c) and at all at once,
    with the initial states as relevance sources."""
    m, feeds, inits = _node_model(op, **attrs)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in m.graph.output]
    ys = sess.run(outs, feeds)
    rng = np.random.RandomState(1)
    ws = [rng.randn(*y.shape).astype(np.float32) for y in ys]
    _, ref_outs = _reference(op, feeds, inits, attrs, "gradient", ws)
    for y, r in zip(ys, ref_outs):
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-5)
    explainers = {c: Explainer(m, composite=c) for c in ("gradient-x-input", "attnlrp")}
    for k, out in enumerate(outs):
        only = [w if j == k else None for j, w in enumerate(ws)]
        for composite, rule in (("gradient-x-input", "gradient"), ("attnlrp", "attnlrp")):
            ref, _ = _reference(op, feeds, inits, attrs, rule, only)
            res = explainers[composite].explain(feeds, output=out, output_relevance=ws[k])
            for name, r in ref.items():
                assert rel_err(res.relevance[name], r) <= TOL, (composite, out, name)


@pytest.mark.parametrize("op,attrs,eps", [("LSTM", dict(peepholes=True), 0.0), ("GRU", dict(), 0.0),
                                          ("GRU", dict(linear_before_reset=1), 0.0),
                                          ("LSTM", dict(peepholes=True), 0.5)])
def test_uniform_rule_on_the_gated_products(op, attrs, eps):
    """A composite whose ``gate`` rule is Uniform, or that rule set on the op: inside the op each gated product gives
    half to the gate (through its sigmoid) and half to the signal, as the torch reference does with the products
    halved. With eps, each gate's pre-activation (its peephole term included) is one eps-LRP layer."""
    m, feeds, inits = _node_model(op, **attrs)
    composite = attnlrp(epsilon=eps)
    composite.kinds["gate"] = Uniform()
    w = np.random.RandomState(5).randn(*_node_output_shape(m, feeds)).astype(np.float32)
    ref, _ = _reference(op, feeds, inits, attrs, "uniform-gates", [w], epsilon=eps)
    for ex in (Explainer(m, composite=composite), Explainer(m, composite=attnlrp(epsilon=eps),
                                                            overrides={f"op:{op}": Uniform()})):
        res = ex.explain(feeds, output="Y", output_relevance=w)
        for name, r in ref.items():
            assert rel_err(res.relevance[name], r) <= TOL, name


def _node_output_shape(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["Y"], feeds)[0].shape


@pytest.mark.parametrize("op,attrs", [("RNN", dict(lens=True)), ("GRU", dict(lens=True, direction="reverse")),
                                      ("LSTM", dict(input_forget=1, peepholes=True, lens=True))])
def test_gradient_matches_onnxruntime_central_differences(op, attrs):
    """The plain gradient vs central differences of onnxruntime's own kernel (float32: onnxruntime's recurrent
    kernels have no float64; clip is left to the reference, whose kinks finite differences straddle)."""
    m, feeds, _ = _node_model(op, **attrs)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(2)
    floats = [k for k in feeds if k != "lens"]
    ex = Explainer(m, composite="gradient")
    for out in [o.name for o in m.graph.output]:
        y = sess.run([out], feeds)[0]
        w = rng.randn(*y.shape).astype(np.float32)
        res = ex.explain(feeds, output=out, output_relevance=w)
        v = {k: rng.randn(*feeds[k].shape).astype(np.float32) for k in floats}
        h = 1e-3
        up, down = (sess.run([out], {**feeds, **{k: feeds[k] + s * h * v[k] for k in floats}})[0] for s in (1, -1))
        numeric = float(((up - down) * w).astype(np.float64).sum()) / (2 * h)
        ours = sum(float((res.relevance[k] * v[k]).sum()) for k in floats)
        assert ours == pytest.approx(numeric, rel=2e-3, abs=1e-3), out


def test_several_targets_at_once():
    """A leading target axis (two start vectors in one pass) gives each target's relevance."""
    m, feeds, _ = _node_model("LSTM", lens=True)
    ex = Explainer(m)
    w = np.random.RandomState(3).randn(5, 2, 3, 3).astype(np.float32)
    one, two = (ex.explain(feeds, output="Y", output_relevance=v) for v in (w, -3 * w))
    both = ex.explain(feeds, output="Y", output_relevance=np.stack([w, -3 * w]))
    for name in ("x", "h0", "c0"):
        np.testing.assert_allclose(both.relevance[name], np.stack([one.relevance[name], two.relevance[name]], 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(activations=["Relu", "Relu"]), "activations"),
    (dict(layout=1), "layout=1"),
])
def test_refuses_what_it_does_not_implement(change, match):
    m, feeds, _ = _node_model("RNN", **change)
    with pytest.raises(OnnxLrpError, match=match):
        Explainer(m)


def test_refuses_the_gamma_rule():
    m, feeds, _ = _node_model("GRU")
    with pytest.raises(OnnxLrpError, match="Gamma for the linear maps inside a recurrent op"):
        Explainer(m, composite="vit-lrp")


# ---------------------------------------------------------------------------------------------- int8
def test_dynamic_quantize_lstm_is_the_lstm_of_the_dequantised_weights(tmp_path):
    """onnxruntime.quantization.quantize_dynamic turns an LSTM into DynamicQuantizeLSTM (int8 W and R per output
    channel, activations quantised inside the kernel). Its relevance equals that of the float LSTM with the
    dequantised weights (a graph built here from the quantised file's tensors) and the torch reference's on them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(2)
    model = Classifier(torch.nn.LSTM, input_size=5, hidden_size=6, bidirectional=True).eval()
    x = torch.randn(7, 2, 5)
    onnx.save(_export(model, x), tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["LSTM"])
    q = onnx.load(tmp_path / "q.onnx")
    node = next(n for n in q.graph.node if n.op_type == "DynamicQuantizeLSTM")
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}

    def dequantised(k_q, k_scale, k_zero):  # (D, I, 4H) int8 -> the ONNX LSTM layout (D, 4H, I)
        qv, scale, zero = (inits[node.input[k]] for k in (k_q, k_scale, k_zero))
        D = qv.shape[0]
        return ((qv.astype(np.float32) - zero.reshape(D, 1, -1)) * scale.reshape(D, 1, -1)).swapaxes(1, 2)

    W, R = dequantised(1, 8, 9), dequantised(2, 10, 11)
    assert inits[node.input[9]].size == 2 * 24  # per-channel zero points
    ref_graph = onnx.ModelProto()
    ref_graph.CopyFrom(q)
    ref_node = next(n for n in ref_graph.graph.node if n.op_type == "DynamicQuantizeLSTM")
    ref_node.op_type, ref_node.domain = "LSTM", ""
    ref_node.input[1], ref_node.input[2] = "W_deq", "R_deq"
    del ref_node.input[8:]
    ref_graph.graph.initializer.extend([numpy_helper.from_array(W, "W_deq"), numpy_helper.from_array(R, "R_deq")])
    w = np.random.RandomState(4).randn(2, 3).astype(np.float32)
    feeds = {"x": x.numpy()}
    for composite in ("attnlrp", "gradient-x-input"):
        ours = Explainer(q, composite=composite).explain(feeds, output="y", output_relevance=w).relevance["x"]
        ref = Explainer(ref_graph, composite=composite).explain(feeds, output="y", output_relevance=w).relevance["x"]
        assert rel_err(ours, ref) <= 1e-5, composite

    def reference(v):
        Y = onnx_rnn("LSTM", v, torch.tensor(W), torch.tensor(R), torch.tensor(inits[node.input[3]]),
                     direction="bidirectional", rule="attnlrp")[0]
        return model.head(Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1)[-1])

    ours = Explainer(q).explain(feeds, output="y", output_relevance=w).relevance["x"]
    assert rel_err(ours, _input_x_grad(reference, x, torch.tensor(w))) <= TOL


# ---------------------------------------------------------------------------------------------- written out
class WrittenOutLSTM(torch.nn.Module):
    """An LSTM cell written with torch ops (no nn.LSTM: the export holds MatMul, Sigmoid, Tanh, Mul, Add), run over
    the sequence, and a linear head; replacing ``gate``/``squash`` lets the reference apply the rules to the same
    code."""

    def __init__(self, inputs=5, hidden=6):
        super().__init__()
        self.x2h, self.h2h = torch.nn.Linear(inputs, 4 * hidden), torch.nn.Linear(hidden, 4 * hidden)
        self.head, self.hidden = torch.nn.Linear(hidden, 3), hidden

    gate, squash = staticmethod(torch.sigmoid), staticmethod(torch.tanh)

    def forward(self, x):
        h = c = torch.zeros(x.shape[1], self.hidden)
        for t in range(x.shape[0]):
            i, f, g, o = (self.x2h(x[t]) + self.h2h(h)).chunk(4, dim=-1)
            c = self.gate(f) * c + self.gate(i) * self.squash(g)
            h = self.gate(o) * self.squash(c)
        return self.head(h)


def test_written_out_lstm_cell_takes_the_gate_rule():
    """The same LSTM written out as element-wise ops: the graph patterns must give the gates the same rule as the
    LSTM op (held constant; the signal takes all) and tanh the identity rule: equal to the torch reference.
    Needs the gate rule of the graph patterns (issue 11, item 2)."""
    from onnx_lrp.reference.torch import identity_rule

    torch.manual_seed(3)
    model = WrittenOutLSTM().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x = torch.randn(6, 2, 5)
    m = _export(model, x)
    assert {"Sigmoid", "Tanh", "Mul"} <= {n.op_type for n in m.graph.node} and "LSTM" not in {
        n.op_type for n in m.graph.node}
    w = torch.randn(2, 3)

    model.gate, model.squash = (lambda a: torch.sigmoid(a).detach()), (lambda a: identity_rule(torch.tanh, a))
    ref = _input_x_grad(model, x, w)
    del model.gate, model.squash  # back to the class's sigmoid and tanh
    res = Explainer(m).explain({"x": x.numpy()}, output="y", output_relevance=w.numpy())
    assert rel_err(res.relevance["x"], ref) <= TOL
    gxi = Explainer(m, composite="gradient-x-input").explain({"x": x.numpy()}, output="y", output_relevance=w.numpy())
    assert rel_err(gxi.relevance["x"], _input_x_grad(model, x, w)) <= 1e-5
