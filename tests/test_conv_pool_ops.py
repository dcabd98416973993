"""ConvTranspose, GlobalMaxPool, GlobalLpPool.

References: torch autograd on exported ``nn.ConvTranspose1d/2d`` (Gradient x Input, and the gamma rule written
with torch ops as zennit does it); central differences of onnxruntime's own kernels for every padding mode;
hand-computed relevance for the pools.
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnx_lrp import Explainer, Gamma
from onnx_lrp.errors import OnnxLrpError

from _graphs import f32, model, node


def _export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _central_differences(m: onnx.ModelProto, x: np.ndarray, w: np.ndarray, seed: int = 0, h: float = 1e-2):
    """(d/dt <w, y(x + t v)>, v) for a random direction v, from onnxruntime."""
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    v = np.random.RandomState(seed).randn(*x.shape).astype(np.float32)
    up, down = (sess.run(["y"], {"x": x + s * h * v})[0] for s in (1, -1))
    return float(((up - down) * w).astype(np.float64).sum()) / (2 * h), v


# ---------------------------------------------------------------------------------------------- ConvTranspose
TORCH_CASES = [
    (torch.nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                                    output_padding=1, bias=True), (2, 4, 7)),
    (torch.nn.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                    dilation=(1, 2), groups=2, bias=True), (2, 4, 5, 6)),
    (torch.nn.ConvTranspose2d, dict(in_channels=3, out_channels=2, kernel_size=4, stride=3, output_padding=2,
                                    bias=False), (1, 3, 4, 4)),
]


@pytest.mark.parametrize("cls,kw,shape", TORCH_CASES)
def test_conv_transpose_gradient_x_input_matches_torch(cls, kw, shape):
    """Exported nn.ConvTranspose{1,2}d (strides, padding, output_padding, dilation, groups): Gradient x Input
    equals torch autograd's x * grad, and AttnLRP (eps = 0 on a linear map) gives the same."""
    torch.manual_seed(0)
    conv = cls(**kw).eval()
    x = torch.randn(*shape)
    m = _export(conv, x)
    assert [n.op_type for n in m.graph.node] == ["ConvTranspose"]
    xr = x.clone().requires_grad_(True)
    y = conv(xr)
    w = torch.randn(y.shape)
    (y * w).sum().backward()
    ref = (xr * xr.grad).detach().numpy()
    for composite in ("gradient-x-input", "attnlrp"):
        res = Explainer(m, composite=composite).explain({"x": x.numpy()}, output="y", output_relevance=w.numpy())
        np.testing.assert_allclose(res.relevance["x"], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # two start vectors at once (a leading target axis): each one's relevance, the target axis after the batch
    both = Explainer(m).explain({"x": x.numpy()}, output="y", output_relevance=np.stack([w.numpy(), -2 * w.numpy()]))
    np.testing.assert_allclose(both.relevance["x"], np.stack([ref, -2 * ref], 1), rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_conv_transpose_gamma_matches_torch():
    """The gamma rule on ConvTranspose vs the same rule in torch autograd (zennit's gradient form):
    ``z = convT(x, W) + b``, ``z' = z + gamma (convT(x, W+) + b+)``, backward of ``z' * (z / stab(z')).detach()``."""
    torch.manual_seed(1)
    conv = torch.nn.ConvTranspose2d(3, 4, kernel_size=3, stride=2, padding=1, output_padding=1).eval()
    x = torch.randn(2, 3, 4, 5)
    m = _export(conv, x)
    gamma, eps = 0.25, 1e-6
    xr = x.clone().requires_grad_(True)
    z = conv(xr)
    zplus = torch.nn.functional.conv_transpose2d(xr, conv.weight.clamp(min=0), conv.bias.clamp(min=0), stride=2,
                                                 padding=1, output_padding=1)
    zg = z + gamma * zplus
    stab = zg + eps * torch.where(zg >= 0, 1.0, -1.0)
    w = torch.randn(z.shape)
    (zg * (z / stab).detach() * w).sum().backward()
    ref = (xr * xr.grad).detach().numpy()
    res = Explainer(m, overrides={"ConvTranspose": Gamma(gamma, eps)}).explain(
        {"x": x.numpy()}, output="y", output_relevance=w.numpy())
    np.testing.assert_allclose(res.relevance["x"], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("attrs,shape", [
    (dict(strides=[2, 2], pads=[1, 0, 0, 1]), (1, 2, 4, 5)),  # asymmetric explicit pads
    (dict(strides=[2, 3], auto_pad="SAME_UPPER"), (2, 2, 3, 4)),  # odd total padding: onnxruntime's split
    (dict(strides=[2, 2], auto_pad="SAME_LOWER", dilations=[2, 1]), (1, 2, 3, 3)),
    (dict(strides=[2, 2], auto_pad="VALID", output_padding=[1, 0]), (1, 2, 3, 3)),
    (dict(strides=[3, 2], output_shape=[9, 8]), (1, 2, 3, 4)),  # pads derived from the output shape
    (dict(strides=[3, 2], output_shape=[8, 7]), (1, 2, 3, 4)),
    (dict(strides=[3, 2], output_shape=[10, 9], auto_pad="SAME_UPPER"), (1, 2, 3, 4)),  # larger than the kernel reaches
    (dict(strides=[3, 2], output_shape=[8, 7], auto_pad="SAME_UPPER"), (1, 2, 3, 4)),
    (dict(strides=[1, 1], group=2), (2, 2, 3, 3)),
])
def test_conv_transpose_vjp_matches_onnxruntime(attrs, shape):
    """Every padding mode of the ONNX op: <G_x, v> equals central differences of onnxruntime's kernel."""
    cin, cout_g = shape[1], 3
    W = f32(cin, cout_g, 3, 3, seed=4)
    m = model([node("ConvTranspose", ["x", "W", "b"], ["y"], **attrs)], {"x": shape}, {"y": ()},
              {"W": W, "b": f32(cout_g * attrs.get("group", 1), seed=5)})
    x = f32(*shape, seed=6)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = f32(*y.shape, seed=7)
    numeric, v = _central_differences(m, x, w)
    res = Explainer(m, composite="gradient").explain({"x": x}, output="y", output_relevance=w)
    assert float((res.relevance["x"] * v).sum()) == pytest.approx(numeric, rel=1e-3, abs=1e-3)


def test_conv_transpose_refuses_carrying_kernel():
    m = model([node("ConvTranspose", ["x", "k"], ["y"])], {"x": (1, 1, 3, 3), "k": (1, 1, 2, 2)}, {"y": ()})
    with pytest.raises(OnnxLrpError, match="carrying kernel"):
        Explainer(m).explain({"x": f32(1, 1, 3, 3), "k": f32(1, 1, 2, 2)}, output="y",
                             output_relevance=np.ones((1, 1, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------- global pools
def test_global_max_pool_winner_takes_all():
    """Each channel's relevance goes to its maximum entry; conserved exactly."""
    x = f32(2, 3, 4, 5, seed=8)
    m = model([node("GlobalMaxPool", ["x"], ["y"])], {"x": x.shape}, {"y": (2, 3, 1, 1)})
    w = f32(2, 3, 1, 1, seed=9)
    res = Explainer(m).explain({"x": x}, output="y", output_relevance=w)
    expected = np.zeros_like(x)
    for b in range(2):
        for c in range(3):
            i = np.unravel_index(x[b, c].argmax(), x[b, c].shape)
            expected[(b, c) + i] = w[b, c, 0, 0] * x[b, c].max()
    np.testing.assert_allclose(res.relevance["x"], expected, rtol=1e-6)
    both = Explainer(m).explain({"x": x}, output="y", output_relevance=np.stack([w, 3 * w]))
    np.testing.assert_allclose(both.relevance["x"], np.stack([expected, 3 * expected], 1), rtol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool_shares_of_the_norm(p):
    """AttnLRP: R_x = R_y |x|^p / sum |x|^p per channel (conservative, as the p-norm is 1-homogeneous); the
    Gradient rule differentiates the pooling (central differences of onnxruntime)."""
    x = f32(2, 3, 4, 4, seed=10)
    x[1, 2] = 0  # an all-zero channel passes nothing
    m = model([node("GlobalLpPool", ["x"], ["y"], p=p)], {"x": x.shape}, {"y": (2, 3, 1, 1)})
    w = f32(2, 3, 1, 1, seed=11)
    res = Explainer(m).explain({"x": x}, output="y", output_relevance=w)
    a = np.abs(x.astype(np.float64)) ** p
    y = a.sum(axis=(2, 3), keepdims=True) ** (1 / p)
    share = np.divide(a, a.sum(axis=(2, 3), keepdims=True), out=np.zeros_like(a), where=y > 0)
    np.testing.assert_allclose(res.relevance["x"], w * y * share, rtol=1e-4, atol=1e-7)
    numeric, v = _central_differences(m, x, w, h=1e-3)
    grad = Explainer(m, composite="gradient").explain({"x": x}, output="y", output_relevance=w)
    assert float((grad.relevance["x"] * v).sum()) == pytest.approx(numeric, rel=1e-3, abs=1e-3)


# ---------------------------------------------------------------------------------------------- gates
class SqueezeExcitation(torch.nn.Module):
    """conv -> ReLU -> ``x * sigmoid(fc2(relu(fc1(pool(x)))))`` -> pool -> linear: a squeeze-excitation block."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Conv2d(channels, 4, 1), torch.nn.Conv2d(4, channels, 1)
        self.head = torch.nn.Linear(channels, 5)

    gate = staticmethod(torch.sigmoid)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        s = self.gate(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.head((h * s).mean((2, 3)))


def test_squeeze_excitation_gate_is_held_constant():
    """AttnLRP on a squeeze-excitation block: the sigmoid gate is a constant of the product ``x * gate`` (the
    signal takes all: no identity rule on a sigmoid, whose f(0) = 1/2 makes relevance explode), equal to torch
    autograd with the gate detached; the input relevance stays of the order of the explained logit.
    Needs the gate rule of the graph patterns (issue 11, item 2)."""
    torch.manual_seed(4)
    model = SqueezeExcitation().eval()
    with torch.no_grad():  # gate pre-activations near 0, where sigmoid(a) / a is large
        model.fc2.weight.mul_(1e-4)
        model.fc2.bias.zero_()
    x = torch.randn(2, 3, 6, 6)
    m = _export(model, x)
    assert "Sigmoid" in {n.op_type for n in m.graph.node}
    w = torch.zeros(2, 5)
    w[:, 1] = 1.0
    xr = x.clone().requires_grad_(True)
    model.gate = lambda a: torch.sigmoid(a).detach()
    (model(xr) * w).sum().backward()
    ref = (xr * xr.grad).detach().numpy()
    res = Explainer(m).explain({"x": x.numpy()}, output="y", output_relevance=w.numpy())
    sums, ref_sums = res.relevance["x"].reshape(2, -1).sum(1), ref.reshape(2, -1).sum(1)
    assert np.all(np.abs(sums) <= 10 * np.abs(ref_sums)), (sums, ref_sums, res.score)  # no explosion
    np.testing.assert_allclose(res.relevance["x"], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
