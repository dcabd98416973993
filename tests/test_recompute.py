"""Attention blocks explained by recomputing their probabilities equal the node-by-node rules on captured tensors.

The reference is the capturing path (the plan short inputs get): every node (``MatMul``, mask ``Add``, soft-cap
``Tanh``, ``Softmax``, NaN guard, ``MatMul``) takes its own rule and reads the probabilities captured from
onnxruntime. The recomputing path is the plan of long inputs, forced here on short ones. Compared: token relevance to 1e-5 (relative to its largest
entry), with one query row per block (``BLOCK_BYTES`` tiny) and with all rows in one block, on tiny models
with left and right padding, sliding windows, GQA, ALiBi, soft-caps, several composites and the fused
onnxruntime attention ops. And: nothing of attention size is captured, masks are recomputed once per explanation.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_lrp import Explainer
from onnx_lrp import _recompute
from onnx_lrp import explainer as explainer_module
from onnx_lrp.ops import attention_blocks

from _support import rel_err, tiny_model
from _variants import variant

TOL = 1e-5


def _inputs(ex: Explainer, seq: int, pad: str, batch: int = 2, seed: int = 0) -> dict:
    ids = np.random.RandomState(seed).randint(3, 120, size=(batch, seq)).astype(np.int64)
    feeds = {"input_ids": ids}
    if "attention_mask" in ex.input_names:
        mask = np.ones_like(ids)
        if pad in ("left", "both"):
            mask[0, : seq // 4] = 0
        if pad in ("right", "both"):
            mask[-1, -(seq // 5) - 1:] = 0
        feeds["attention_mask"] = mask
    return feeds


def _explain(path, composite, feeds, monkeypatch, *, recompute: bool, row_blocks: bool = False, **kw):
    """``Explainer.explain`` with the recomputing plan (``recompute``) or the capturing one, whatever the length;
    ``row_blocks``: one query row per block."""
    with monkeypatch.context() as m:
        m.setattr(explainer_module, "SHORT_INPUT", 0 if recompute else 1 << 40)
        if row_blocks:
            m.setattr(attention_blocks, "BLOCK_BYTES", 1)
        ex = Explainer(path, composite)
        res = ex.explain(feeds, **kw)
    mode = "blocks" if recompute else "capture"
    steps = [s.op_type for s in ex._plans[(ex.default_output, tuple(kw.get("collect", ())), mode)].steps]
    assert ("attention" in steps) == recompute
    return res, ex


def _compare(path, composite, feeds, monkeypatch, *, blocks: int, **kw):
    res, _ = _explain(path, composite, feeds, monkeypatch, recompute=True, row_blocks=blocks > 1, **kw)
    ref, _ = _explain(path, composite, feeds, monkeypatch, recompute=False, target=res.target, position=res.position)
    assert np.abs(ref.relevance["input_ids"]).max() > 0
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= TOL


MODELS = {  # (family, config, graph shape)
    "llama-gqa": ("llama", None, None),
    "gpt2": ("gpt2", None, None),
    "gpt2-eager": ("gpt2", None, "eager"),  # masked_fill Where on a scale computed from shapes
    "bert": ("bert", None, None),
    "mistral-window": ("mistral", dict(sliding_window=4), None),
    "gemma2-softcap-eager": ("gemma2", None, "eager"),  # c tanh(s / c) written out, sliding window
    "gemma3": ("gemma3", None, None),  # sliding and full layers: two masks
    "bloom-alibi": ("bloom", None, None),  # scores reshaped (B*N, S, T) -> (B, N, S, T) and back
    "llama-dynamo": ("llama", None, "dynamo"),
}


def _path(name):
    family, config, shape = MODELS[name]
    return variant(family, shape) if shape else tiny_model(family, config=config)[1]


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_recompute_equals_capture(name, blocks, monkeypatch):
    path = _path(name)
    ex = Explainer(path)
    pad = "right" if MODELS[name][0] == "bert" else "both"
    _compare(path, "attnlrp", _inputs(ex, 12, pad), monkeypatch, blocks=blocks)


@pytest.mark.parametrize("composite", ["cp-lrp", "gradient-x-input", "gradient"])
def test_recompute_equals_capture_other_composites(composite, monkeypatch):
    path = _path("mistral-window")
    _compare(path, composite, _inputs(Explainer(path), 12, "left"), monkeypatch, blocks=2)


def test_softmax_with_a_positive_keys_axis_is_an_attention_block(tmp_path, monkeypatch):
    """jax2onnx and Keras write the keys axis of the attention softmax as a positive number (3 of (B, N, S, T)):
    the same block, explained in blocks of rows like ``axis=-1``."""
    import onnx

    m = onnx.load(str(_path("llama-gqa")))
    softmaxes = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for n in softmaxes:
        n.attribute.remove(next(a for a in n.attribute if a.name == "axis"))
        n.attribute.append(helper.make_attribute("axis", 3))
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    assert len(Explainer(path)._capture_long.attention) == len(softmaxes)
    _compare(path, "attnlrp", _inputs(Explainer(path), 12, "both"), monkeypatch, blocks=2)


def test_recompute_equals_capture_with_several_targets(monkeypatch):
    path = _path("llama-gqa")
    feeds = _inputs(Explainer(path), 10, "left")
    kw = dict(target=np.array([[3, 17], [99, 5]]), position=np.array([[9, 4], [7, 8]]))
    res, _ = _explain(path, "attnlrp", feeds, monkeypatch, recompute=True, **kw)
    ref, _ = _explain(path, "attnlrp", feeds, monkeypatch, recompute=False, **kw)
    assert res.relevance["input_ids"].shape == (2, 2, 10)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= TOL


def test_recompute_equals_capture_at_a_few_hundred_tokens(monkeypatch):
    """300 tokens, batch 2 with left padding, in blocks of 25 query rows."""
    path = _path("mistral-window")
    feeds = _inputs(Explainer(path), 300, "left")
    with monkeypatch.context() as m:
        m.setattr(attention_blocks, "BLOCK_BYTES", 2 * 4 * 25 * 300 * 4)  # (batch, heads, 25 rows, keys) floats
        res, _ = _explain(path, "attnlrp", feeds, m, recompute=True)
    ref, _ = _explain(path, "attnlrp", feeds, monkeypatch, recompute=False, target=res.target, position=res.position)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= TOL


def test_nothing_attention_sized_is_captured():
    """At T = 48 no captured tensor has two axes of length T (probabilities, scores, masks), and the masks are
    recomputed: the plan's only T x T values are the recomputed ones."""
    path = _path("gemma3")
    ex = Explainer(path)
    T = 48
    feeds = ex.prepare_inputs(_inputs(ex, T, "left"))
    plan = ex._plan(ex.default_output, ())
    assert plan.recompute
    captured = ex._captured(plan, feeds)
    values, _ = ex._capture_long.run(feeds, captured, [])
    assert values
    square = {k: v.shape for k, v in values.items() if sum(d == T for d in v.shape) >= 2}
    assert not square, square


def test_masks_computed_once_per_distinct_mask(monkeypatch):
    """Gemma3 (one sliding and one full layer): two distinct masks; Llama: one mask for both layers."""
    calls = []
    run = _recompute.Recompute.run

    def counted(self, p, leaf):
        calls.append(p.output)
        return run(self, p, leaf)

    monkeypatch.setattr(_recompute.Recompute, "run", counted)
    for name, distinct in (("gemma3", 2), ("llama-gqa", 1)):
        calls.clear()
        path = _path(name)
        _, ex = _explain(path, "attnlrp", _inputs(Explainer(path), 9, "left"), monkeypatch, recompute=True)
        assert len(ex._plan(ex.default_output, ()).recompute) == 2  # each layer reads its own tensor
        assert len(calls) == distinct, calls


def test_collected_tensor_inside_a_block_keeps_the_node_rules(monkeypatch):
    """Collecting the attention probabilities needs them: that block is explained node by node."""
    path = _path("llama-gqa")
    ex = Explainer(path)
    softmax = next(n.outputs[0] for n in ex.graph.nodes if n.op_type == "Softmax")
    res, ex = _explain(path, "attnlrp", _inputs(ex, 8, "none"), monkeypatch, recompute=True, collect=[softmax])
    plan = ex._plans[(ex.default_output, (softmax,), "blocks")]
    assert sum(s.op_type == "attention" for s in plan.steps) == 1  # the other layer's block
    assert np.abs(res.latent[softmax]).sum() > 0


# ---------------------------------------------------------------------------------------------- fused ops
def _blocked_equals_whole(model, feeds, G, monkeypatch, composite="attnlrp"):
    whole = Explainer(model, composite).explain(feeds, output="y", output_relevance=G)
    with monkeypatch.context() as m:
        m.setattr(attention_blocks, "BLOCK_BYTES", 1)
        rows = Explainer(model, composite).explain(feeds, output="y", output_relevance=G)
    assert max(np.abs(r).max() for r in whole.relevance.values()) > 0
    for n, r in whole.relevance.items():  # (under CP-LRP the queries and keys get nothing)
        np.testing.assert_allclose(rows.relevance[n], r, rtol=0, atol=TOL * np.abs(r).max(), err_msg=n)


@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (3, 1.0)])
def test_group_query_attention_in_blocks(window, softcap, monkeypatch):
    B, S, N, Nkv, d = 2, 6, 4, 2, 16
    rng = np.random.RandomState(3)
    angle = np.arange(16)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))
    inits = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "past_k", "past_v", "sk", "t", "cos", "sin"],
                            ["y", "k", "v"], domain="com.microsoft", num_heads=N, kv_num_heads=Nkv, do_rotary=1,
                            local_window_size=window, softcap=softcap)
    model = _single([node], [("q", [B, S, (N + 2 * Nkv) * d]), ("past_k", [B, Nkv, 0, d]), ("past_v", [B, Nkv, 0, d])],
                    [("sk", [B]), ("t", [])], inits)
    feeds = {"q": rng.randn(B, S, (N + 2 * Nkv) * d).astype(np.float32),
             "past_k": np.zeros((B, Nkv, 0, d), np.float32), "past_v": np.zeros((B, Nkv, 0, d), np.float32),
             "sk": np.array([S - 1, S - 3], np.int32), "t": np.array(S, np.int32)}
    G = rng.randn(B, S, N * d).astype(np.float32) * (np.arange(S) < np.array([[S], [S - 2]]))[..., None]
    _blocked_equals_whole(model, feeds, G, monkeypatch)


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_multi_head_attention_in_blocks(composite, monkeypatch):
    B, S, N, d = 2, 5, 2, 8
    rng = np.random.RandomState(4)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "m"], ["y"], domain="com.microsoft",
                            num_heads=N, unidirectional=1)
    model = _single([node], [(n, [B, S, N * d]) for n in "qkv"], [("m", [B, S])])
    feeds = {n: rng.randn(B, S, N * d).astype(np.float32) for n in "qkv"}
    feeds["m"] = np.array([[1] * S, [1] * (S - 1) + [0]], np.int32)
    _blocked_equals_whole(model, feeds, rng.randn(B, S, N * d).astype(np.float32), monkeypatch, composite)


def test_fused_bert_attention_in_blocks(monkeypatch):
    path = variant("bert", "ort")
    ex = Explainer(path)
    assert "Attention" in {n.op_type for n in ex.graph.nodes}
    feeds = _inputs(ex, 10, "right")
    whole = ex.explain(feeds)
    with monkeypatch.context() as m:
        m.setattr(attention_blocks, "BLOCK_BYTES", 1)
        rows = Explainer(path).explain(feeds)
    assert rel_err(rows.relevance["input_ids"], whole.relevance["input_ids"]) <= TOL


def _single(nodes, float_inputs, int_inputs, initializers=None):
    from onnx import TensorProto, numpy_helper

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in float_inputs]
    vi += [helper.make_tensor_value_info(n, TensorProto.INT32, s) for n, s in int_inputs]
    out = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in nodes[0].output if o]
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "single", vi, out, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)
