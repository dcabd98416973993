"""Public API behaviour: errors, inputs, targets, batching, latent relevance, composites, overrides."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lrp import (
    Composite,
    Epsilon,
    Explainer,
    Gradient,
    InputError,
    ModelLoadError,
    TargetError,
    UnsupportedOpError,
    attnlrp,
)

from _graphs import f32, model, node
from _support import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _ids(batch=2, seq=6, seed=0):
    return np.random.RandomState(seed).randint(3, 120, size=(batch, seq))


# ----------------------------------------------------------------------------- errors
def test_unsupported_ops_listed_together():
    m = model([node("Hardmax", ["x"], ["h"], name="my_hardmax"), node("CumSum", ["h", "ax"], ["c"], name="my_cumsum"),
               node("Add", ["x", "c"], ["y"])], {"x": (2, 3)}, {"y": (2, 3)}, {"ax": np.array(1)})
    with pytest.raises(UnsupportedOpError) as e:
        Explainer(m)
    msg = str(e.value)
    assert "Hardmax" in msg and "CumSum" in msg and "my_hardmax" in msg and "my_cumsum" in msg
    assert set(e.value.ops) == {"Hardmax", "CumSum"}
    ex = Explainer(m, allow_unsupported=True)  # the user asked otherwise: constants, no relevance through them
    x = f32(2, 3)
    res = ex.explain({"x": x}, output_relevance=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(res.relevance["x"], x, rtol=1e-6)  # only the direct path x -> Add


def test_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Explainer(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        Explainer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="0 .onnx files"):
        Explainer(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="ModelProto"):
        Explainer(42)


def test_input_errors(llama):
    ex = Explainer(llama[1])
    ids = _ids()
    with pytest.raises(InputError, match="unknown input name.*input_idz"):
        ex.explain({"input_idz": ids})
    with pytest.raises(InputError, match="must hold integers"):
        ex.explain({"input_ids": ids.astype(np.float32)})
    with pytest.raises(InputError, match="rank 2"):
        ex.explain({"input_ids": ids[0]})
    with pytest.raises(InputError, match="dict"):
        ex.explain(ids)
    m = model([node("MatMul", ["x", "W"], ["y"])], {"x": (2, 3), "z": (2, 3)}, {"y": (2, 4)}, {"W": f32(3, 4)})
    with pytest.raises(InputError, match=r"missing input\(s\) \['z'\]"):
        Explainer(m).explain({"x": f32(2, 3)}, target=0)
    with pytest.raises(InputError, match="axis 1 must be 3"):
        Explainer(m).explain({"x": f32(2, 5), "z": f32(2, 3)}, target=0)


def test_target_errors(llama):
    ex = Explainer(llama[1])
    ids = _ids()
    with pytest.raises(TargetError, match="out of range.*128 classes"):
        ex.explain({"input_ids": ids}, target=128)
    with pytest.raises(TargetError, match="position"):
        ex.explain({"input_ids": ids}, target=1, position=6)
    with pytest.raises(TargetError, match="3 targets for a batch of 2"):
        ex.explain({"input_ids": ids}, target=[1, 2, 3])
    with pytest.raises(TargetError, match="no graph output"):
        ex.explain({"input_ids": ids}, output="nope")
    with pytest.raises(TargetError, match="carries no relevance"):
        ex.explain({"input_ids": ids}, collect=["attention_mask"])


# ----------------------------------------------------------------------------- behaviour
def test_model_proto_is_not_modified(llama):
    proto = onnx.load(str(llama[1]))
    before = proto.SerializeToString()
    Explainer(proto).explain({"input_ids": _ids()})
    assert proto.SerializeToString() == before


def test_external_data_file(tmp_path, llama):
    proto = onnx.load(str(llama[1]))
    path = tmp_path / "ext.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    a = Explainer(path).explain({"input_ids": _ids()}).relevance["input_ids"]
    b = Explainer(llama[1]).explain({"input_ids": _ids()}).relevance["input_ids"]
    np.testing.assert_array_equal(a, b)


def test_default_target_is_prediction_at_last_real_token(llama):
    ex = Explainer(llama[1])
    ids = _ids()
    mask = np.ones_like(ids)
    mask[1, -2:] = 0  # right padding: the last real token of row 1 is position 3
    res = ex.explain({"input_ids": ids, "attention_mask": mask})
    assert res.position.tolist() == [5, 3]
    logits = res.outputs["logits"]
    assert res.target.tolist() == [logits[0, 5].argmax(), logits[1, 3].argmax()]
    np.testing.assert_allclose(res.score, [logits[0, 5, res.target[0]], logits[1, 3, res.target[1]]], rtol=1e-6)


def test_contrastive_output_relevance_is_linear(llama):
    ex = Explainer(llama[1])
    ids = _ids(batch=1)
    a = ex.explain({"input_ids": ids}, target=5, position=-1).relevance["input_ids"]
    b = ex.explain({"input_ids": ids}, target=9, position=-1).relevance["input_ids"]
    w = np.zeros((1, 6, 128), np.float32)
    w[0, -1, 5], w[0, -1, 9] = 1, -1
    c = ex.explain({"input_ids": ids}, output_relevance=w).relevance["input_ids"]
    np.testing.assert_allclose(c, a - b, rtol=1e-4, atol=1e-7)


def test_latent_relevance_of_a_linear_layer_conserves():
    """Bias-free chain: relevance at the hidden layer and at the input both sum to the logit."""
    m = model([node("MatMul", ["x", "W1"], ["h"]), node("Relu", ["h"], ["a"]), node("MatMul", ["a", "W2"], ["y"])],
              {"x": (3, 5)}, {"y": (3, 4)}, {"W1": f32(5, 7, seed=1), "W2": f32(7, 4, seed=2)})
    res = Explainer(m).explain({"x": f32(3, 5, seed=3)}, target=2, collect=["h", "a"])
    np.testing.assert_allclose(res.latent["a"].sum(-1), res.score, rtol=1e-5)
    np.testing.assert_allclose(res.latent["h"], res.latent["a"], rtol=1e-5, atol=1e-6)  # identity rule on ReLU
    np.testing.assert_allclose(res.relevance["x"].sum(-1), res.score, rtol=1e-5)


def _lookup_tanh_model():
    """``y = tanh(E[ids] @ W)`` (batch 1, seq 3, hidden 4, 2 classes)."""
    return model([node("Gather", ["E", "ids"], ["e"]), node("MatMul", ["e", "W"], ["h"]), node("Tanh", ["h"], ["y"])],
                 {"ids": ("int", 1, 3)}, {"y": (1, 3, 2)}, {"E": f32(10, 4, seed=4), "W": f32(4, 2, seed=5)})


def test_reading_is_a_property_of_the_composite():
    """A custom composite picks the plain-gradient reading by its ``reading``, whatever its name; the preset
    ``gradient`` sets it. Reference: the hand-computed gradient of tanh(e W)[0, 2, 1] with respect to e."""
    m = _lookup_tanh_model()
    ids = np.array([[1, 7, 3]])
    E, W = f32(10, 4, seed=4), f32(4, 2, seed=5)
    e = E[ids[0]]
    G = np.zeros((3, 4))
    G[2] = (1 - np.tanh(e[2] @ W[:, 1]) ** 2) * W[:, 1]
    kinds = {k: Gradient() for k in ("linear", "add", "product", "unary", "softmax", "norm", "reduce", "movement")}
    saliency = Composite("my-saliency", dict(kinds), reading="gradient")
    res = Explainer(m, composite=saliency).explain({"ids": ids}, target=1, position=2)
    np.testing.assert_allclose(res.embedding_relevance["ids"][0], G, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.relevance["ids"][0], np.linalg.norm(G, axis=-1), rtol=1e-5, atol=1e-7)
    named = Composite("gradient", dict(kinds))  # the name alone does not change the reading
    res = Explainer(m, composite=named).explain({"ids": ids}, target=1, position=2)
    np.testing.assert_allclose(res.relevance["ids"][0], (e * G).sum(-1), rtol=1e-5, atol=1e-7)
    assert Explainer(m, composite="gradient").composite.reading == "gradient"
    assert Explainer(m, composite=saliency, overrides={"Tanh": Gradient()}).composite.reading == "gradient"
    with pytest.raises(ValueError, match="unknown reading"):
        Composite("x", dict(kinds), reading="saliency")


def test_float64_compute(llama):
    ids = _ids()
    a = Explainer(llama[1]).explain({"input_ids": ids}).relevance["input_ids"]
    b = Explainer(llama[1], dtype="float64").explain({"input_ids": ids}).relevance["input_ids"]
    assert b.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * np.abs(b).max())


def test_overrides_by_op_type_and_node_pattern(llama):
    ids = _ids(batch=1)
    base = Explainer(llama[1]).explain({"input_ids": ids}).relevance["input_ids"]
    # Gradient on every node is Gradient x Input
    allgrad = Explainer(llama[1], overrides={"/*": Gradient()}).explain({"input_ids": ids}).relevance["input_ids"]
    gxi = Explainer(llama[1], composite="gradient-x-input").explain({"input_ids": ids}).relevance["input_ids"]
    np.testing.assert_allclose(allgrad, gxi, rtol=1e-5, atol=1e-8)
    assert np.abs(allgrad - base).max() > 1e-3 * np.abs(base).max()
    # a pattern only reaches nodes whose names match, and only where the rule fits the kind
    ex = Explainer(llama[1], overrides={"/model/layers.1/*": Gradient()})
    changed = [n for n, r in ex.analysis.rules.items() if isinstance(r, Gradient) and n.startswith("/model/layers.1/")]
    untouched = [n for n, r in ex.analysis.rules.items() if not n.startswith("/model/layers.1/")
                 and ex.analysis.kinds[n] == "product"]
    assert changed and untouched
    assert all(not isinstance(ex.analysis.rules[n], Gradient) for n in untouched)
    # op-type override: an epsilon on MatMul changes relevance
    eps = Explainer(llama[1], overrides={"MatMul": Epsilon(1.0)}).explain({"input_ids": ids}).relevance["input_ids"]
    assert np.abs(eps - base).max() > 1e-4 * np.abs(base).max()
    comp = Composite("custom", dict(attnlrp().kinds), {"Softmax": Gradient()})
    assert Explainer(llama[1], composite=comp).composite.name == "custom"
    with pytest.raises(ValueError, match="unknown composite"):
        Explainer(llama[1], composite="lrp-magic")


def test_gradient_x_input_matches_torch_autograd(llama):
    """Independent reference: torch autograd gradient x input on the same PyTorch weights."""
    torch = pytest.importorskip("torch")
    import transformers

    pt_dir, onnx_path = llama
    model = transformers.LlamaForCausalLM.from_pretrained(pt_dir, torch_dtype=torch.float32).eval()
    ids = _ids(batch=1)
    res = Explainer(onnx_path, composite="gradient-x-input").explain({"input_ids": ids})
    emb = model.get_input_embeddings()(torch.tensor(ids)).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    logits[0, -1, int(res.target[0])].backward()
    ref = (emb * emb.grad).sum(-1).detach().numpy()
    assert np.abs(res.relevance["input_ids"] - ref).max() <= 1e-3 * np.abs(ref).max()
    grad = Explainer(onnx_path, composite="gradient").explain({"input_ids": ids})
    np.testing.assert_allclose(grad.embedding_relevance["input_ids"][0], emb.grad[0].numpy(), rtol=1e-3,
                               atol=1e-4 * np.abs(emb.grad.numpy()).max())


def test_inputs_filled_like_transformers(llama):
    ex = Explainer(llama[1])
    ids = _ids()
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # left padding
    full = ex.explain({"input_ids": ids, "attention_mask": mask,
                       "position_ids": np.clip(np.cumsum(mask, -1) - 1, 0, None)})
    filled = ex.explain({"input_ids": ids, "attention_mask": mask})
    feeds = ex.prepare_inputs({"input_ids": ids, "attention_mask": mask})
    # transformers: position_ids = cumsum(mask) - 1, set to 1 at padding
    np.testing.assert_array_equal(feeds["position_ids"], np.where(mask == 0, 1, np.cumsum(mask, -1) - 1))
    assert feeds["input_ids"].dtype == np.int64 and set(feeds) == set(ex.input_names)
    with pytest.raises(InputError, match="unknown input"):
        ex.prepare_inputs({"input_ids": ids, "ids": ids})
    np.testing.assert_allclose(full.relevance["input_ids"], filled.relevance["input_ids"], rtol=1e-6)
