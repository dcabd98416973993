"""onnxruntime contrib ops of production decoder graphs: GroupQueryAttention, MultiHeadAttention, MatMulNBits.

References: (a) single ops, under the plain gradient: <G_x, v> equals central differences of onnxruntime's own
kernel; (b) whole models built by onnxruntime-genai's model builder: token relevance equals that of the optimum
export of the same weights and LXT's (batch 2, right padding).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrp import Explainer
from onnx_lrp.errors import OnnxLrpError

from _support import GENAI_CONFIG, genai_model, lxt_relevance, rel_err, tiny_model

needs_genai = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime-genai (its model builder) is not installed")
TYPES = {"f": TensorProto.FLOAT, "i32": TensorProto.INT32, "i64": TensorProto.INT64}


def _model(nodes, inputs, outputs, initializers=None):
    vi = [helper.make_tensor_value_info(n, TYPES[t], s) for n, t, s in inputs]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "single", vi, out, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _check_vjp(model, feeds, x_names, G, rows=None, seed=0):
    """Under the plain gradient, <G_x, v> = d/dh <G, y(x + h v)> (central differences of onnxruntime's kernel),
    for random directions v in all float inputs ``x_names``; ``rows`` (B, S) restricts <G, .> to those rows."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = Explainer(model, composite="gradient").explain(feeds, output="y", output_relevance=G)
    rng = np.random.RandomState(seed)
    keep = np.ones(G.shape[:2], bool) if rows is None else rows
    h = 1e-2
    for _ in range(3):
        vs = {n: rng.randn(*feeds[n].shape).astype(np.float32) for n in x_names}
        up = sess.run(["y"], {**feeds, **{n: feeds[n] + h * vs[n] for n in x_names}})[0]
        down = sess.run(["y"], {**feeds, **{n: feeds[n] - h * vs[n] for n in x_names}})[0]
        numeric = float(((up - down)[keep] * G[keep]).sum()) / (2 * h)  # padded rows: undefined output
        ours = sum(float((res.relevance[n] * vs[n]).sum()) for n in x_names)
        assert abs(ours - numeric) <= 1e-2 * abs(numeric) + 1e-3, (ours, numeric)
    return res


# ---------------------------------------------------------------------------------------------- GroupQueryAttention
@pytest.mark.parametrize("packed,rotary,interleaved,window,pad,softcap", [
    (True, True, False, -1, False, 0.0), (True, True, True, -1, True, 0.0), (False, True, False, 2, True, 0.0),
    (False, False, False, -1, False, 0.0), (True, True, False, 3, False, 0.0), (True, True, False, 3, True, 1.0)])
def test_group_query_attention_gradient_matches_onnxruntime(packed, rotary, interleaved, window, pad, softcap):
    """GQA (2 query heads per key/value head, head size 16 as onnxruntime's CPU kernel wants) as the genai builder
    writes it for a first prompt: empty past, seqlens_k = length - 1, rotary inside, optional local window and
    soft-cap (scores of order 1 against a cap of 1: far from linear)."""
    B, S, N, Nkv, d = 2, 5, 4, 2, 16
    rng = np.random.RandomState(1)
    lengths = np.array([S, S - 2 if pad else S])
    names = ["query"] if packed else ["query", "key", "value"]
    widths = {"query": (N + 2 * Nkv) * d if packed else N * d, "key": Nkv * d, "value": Nkv * d}
    inputs = [(n, "f", [B, S, widths[n]]) for n in names]
    inputs += [("past_key", "f", [B, Nkv, 0, d]), ("past_value", "f", [B, Nkv, 0, d]),
               ("seqlens_k", "i32", [B]), ("total_sequence_length", "i32", [])]
    inits = {}
    if rotary:
        angle = np.arange(16)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))
        inits = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
    ins = (["query", "", ""] if packed else names) + ["past_key", "past_value", "seqlens_k", "total_sequence_length"]
    ins += ["cos", "sin"] if rotary else []
    node = helper.make_node("GroupQueryAttention", ins, ["y", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=N, kv_num_heads=Nkv, do_rotary=int(rotary), rotary_interleaved=int(interleaved),
                            local_window_size=window, softcap=softcap)
    model = _model([node], inputs, ["y", "present_key", "present_value"], inits)
    feeds = {n: rng.randn(B, S, widths[n]).astype(np.float32) for n in names}
    feeds.update(past_key=np.zeros((B, Nkv, 0, d), np.float32), past_value=np.zeros((B, Nkv, 0, d), np.float32),
                 seqlens_k=(lengths - 1).astype(np.int32), total_sequence_length=np.array(S, np.int32))
    rows = np.arange(S)[None, :] < lengths[:, None]
    G = rng.randn(B, S, N * d).astype(np.float32) * rows[..., None]
    res = _check_vjp(model, feeds, names, G, rows)
    if not pad:  # the explainer fills empty caches, seqlens_k = S - 1 and total_sequence_length = S itself
        bare = Explainer(model, composite="gradient").explain({n: feeds[n] for n in names}, output="y",
                                                              output_relevance=G)
        for n in names:
            np.testing.assert_array_equal(bare.relevance[n], res.relevance[n])
    # relevance reaching a row onnxruntime leaves undefined (past seqlens_k) is refused
    if pad:
        with pytest.raises(OnnxLrpError, match="padding row"):
            Explainer(model, composite="gradient").explain(feeds, output="y", output_relevance=np.ones_like(G))


@pytest.mark.parametrize("attr", ["smooth_softmax", "sliding_window_cache"])
def test_group_query_attention_refuses_what_it_does_not_implement(attr):
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "pk", "pv", "sk", "t"], ["y", "k", "v"],
                            domain="com.microsoft", num_heads=2, kv_num_heads=1, **{attr: 1})
    model = _model([node], [("q", "f", [1, 2, 64]), ("pk", "f", [1, 1, 0, 16]), ("pv", "f", [1, 1, 0, 16]),
                            ("sk", "i32", [1]), ("t", "i32", [])], ["y"])
    feeds = {"q": np.ones((1, 2, 64), np.float32), "pk": np.zeros((1, 1, 0, 16), np.float32),
             "pv": np.zeros((1, 1, 0, 16), np.float32), "sk": np.array([1], np.int32), "t": np.array(2, np.int32)}
    with pytest.raises(OnnxLrpError, match=attr):
        Explainer(model).explain(feeds, output="y", output_relevance=np.ones((1, 2, 32), np.float32))


# ---------------------------------------------------------------------------------------------- MultiHeadAttention
@pytest.mark.parametrize("bias,mask,causal,past", [(False, None, 0, False), (True, "raw2d", 0, False),
                                                   (True, "lengths", 1, False), (False, "raw2d", 1, True)])
def test_multi_head_attention_gradient_matches_onnxruntime(bias, mask, causal, past):
    B, S, T, N, d = 2, 4, 4, 2, 8
    rng = np.random.RandomState(2)
    names = ["query", "key", "value"]
    inputs = [("query", "f", [B, S, N * d]), ("key", "f", [B, T, N * d]), ("value", "f", [B, T, N * d])]
    masks = {"raw2d": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32), "lengths": np.array([4, 3], np.int32)}
    ins = names + (["bias"] if bias else [""]) + (["mask"] if mask else [""])
    ins += ["", "past_key", "past_value"] if past else []
    inits = {"bias": (0.3 * rng.randn(3 * N * d)).astype(np.float32)} if bias else {}
    if mask:
        inputs.append(("mask", "i32", list(masks[mask].shape)))
    outs = ["y", "present_key", "present_value"] if past else ["y"]
    if past:
        inputs += [("past_key", "f", [B, N, 0, d]), ("past_value", "f", [B, N, 0, d])]
    node = helper.make_node("MultiHeadAttention", ins, outs, domain="com.microsoft", num_heads=N,
                            unidirectional=causal)
    model = _model([node], inputs, outs, inits)
    feeds = {n: rng.randn(*s).astype(np.float32) for n, _, s in inputs[:3]}
    if mask:
        feeds["mask"] = masks[mask]
    if past:
        feeds.update(past_key=np.zeros((B, N, 0, d), np.float32), past_value=np.zeros((B, N, 0, d), np.float32))
    _check_vjp(model, feeds, names, rng.randn(B, S, N * d).astype(np.float32))


# ---------------------------------------------------------------------------------------------- MatMulNBits
@pytest.mark.parametrize("bits,zero_points,K", [(4, None, 64), (4, "packed", 40), (8, "packed", 64), (4, "float", 64)])
def test_matmul_nbits_gradient_matches_onnxruntime(bits, zero_points, K):
    """MatMulNBits is linear in A: its VJP with the dequantised weight must match onnxruntime's kernel (fp32
    accuracy level), including a K that is not a multiple of the block size and the zero-point formats."""
    N, block, B, S = 12, 32, 2, 3
    rng = np.random.RandomState(3)
    blocks = -(-K // block)
    Bq = rng.randint(0, 256, (N, blocks, block * bits // 8)).astype(np.uint8)
    inits = {"B": Bq, "scales": (0.1 + rng.rand(N * blocks)).astype(np.float32)}
    ins = ["A", "B", "scales"]
    if zero_points == "packed":
        inits["zp"] = rng.randint(0, 256, (N * (-(-blocks * bits // 8)),)).astype(np.uint8)
        ins.append("zp")
    elif zero_points == "float":
        inits["zp"] = rng.randn(N * blocks).astype(np.float32)
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=0)
    model = _model([node], [("A", "f", [B, S, K])], ["y"], inits)
    feeds = {"A": rng.randn(B, S, K).astype(np.float32)}
    _check_vjp(model, feeds, ["A"], rng.randn(B, S, N).astype(np.float32))


# ---------------------------------------------------------------------------------------------- whole models
def _padded_inputs(seq: int = 8):
    ids = np.random.RandomState(5).randint(3, 120, (2, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # genai graphs take right padding
    return ids, mask


@needs_genai
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_genai_graph_matches_optimum_and_lxt(family):
    """The builder's fp32 graph (GroupQueryAttention with packed QKV and rotary inside, SkipSimplifiedLayerNorm)
    gives the AttnLRP token relevance of the optimum export of the same weights and of LXT."""
    pt_dir, gpath = genai_model(family)
    _, opath = tiny_model(family, config=GENAI_CONFIG)
    ops = {n.op_type for n in onnx.load(str(gpath), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    ids, mask = _padded_inputs()
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = Explainer(opath).explain(feeds)
    res = Explainer(gpath).explain(feeds)  # past caches, seqlens_k, total_sequence_length filled by default
    assert np.array_equal(res.target, ref.target) and np.array_equal(res.position, [7, 4])
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4
    assert np.all(res.relevance["input_ids"][mask == 0] == 0)
    lxt = lxt_relevance(family, pt_dir, ids, mask, np.clip(np.cumsum(mask, -1) - 1, 0, None), res.position,
                        res.target)
    assert rel_err(res.relevance["input_ids"], lxt["relevance"]) <= 1e-3


@needs_genai
def test_genai_gemma2_graph_matches_optimum():
    """Gemma-2 from the builder: GQA with softcap 1.5 and a local window of 6 on every other layer (10 tokens: the
    window is active), the final logit soft-cap written out; same relevance as the optimum export."""
    cfg = {"head_dim": 16, "query_pre_attn_scalar": 16}
    _, gpath = genai_model("gemma2", config=cfg, extra=("windowed_kv_cache=false",))
    _, opath = tiny_model("gemma2", config=dict(GENAI_CONFIG, **cfg))
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in onnx.load(str(gpath), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]
    assert {a["local_window_size"] for a in attrs} == {6, -1} and all(a["softcap"] == 1.5 for a in attrs)
    ids = np.random.RandomState(5).randint(3, 120, (2, 10))
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    for composite in ("attnlrp", "gradient"):
        ref = Explainer(opath, composite=composite).explain(feeds)
        res = Explainer(gpath, composite=composite).explain(feeds)
        assert np.array_equal(res.target, ref.target)
        assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4


@needs_genai
def test_genai_graph_cp_lrp_matches_optimum():
    _, gpath = genai_model("llama")
    _, opath = tiny_model("llama", config=GENAI_CONFIG)
    ids, mask = _padded_inputs()
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = Explainer(opath, composite="cp-lrp").explain(feeds)
    res = Explainer(gpath, composite="cp-lrp").explain(feeds)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4


@needs_genai
def test_genai_graph_refuses_left_padding():
    """onnxruntime's GroupQueryAttention computes a left-padded prompt as if it were right-padded: refused."""
    _, gpath = genai_model("llama")
    ids, mask = _padded_inputs()
    with pytest.raises(OnnxLrpError, match="right padding"):
        Explainer(gpath).explain({"input_ids": ids, "attention_mask": mask[:, ::-1].copy()})


def _ort_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The (K, N) weight onnxruntime's MatMulNBits kernel multiplies by: its output for A = identity."""
    import onnxruntime as ort

    K = next(a.i for a in node.attribute if a.name == "K")
    inits = {t.name: t for t in model.graph.initializer}
    single = onnx.NodeProto()
    single.CopyFrom(node)
    single.input[0] = "A"
    del single.output[:]
    single.output.append("y")
    m = _model([single], [("A", "f", [K, K])], ["y"], {n: numpy_helper.to_array(inits[n]) for n in node.input[1:] if n})
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"A": np.eye(K, dtype=np.float32)})[0]


TIED = dict(config={"tie_word_embeddings": True},
            extra=("shared_embeddings=true", "op_types_to_quantize=MatMul/Gather"))


@needs_genai
@pytest.mark.parametrize("tied", [False, True])
def test_genai_int4_graph_matches_lxt_on_dequantised_weights(tmp_path, tied):
    """The builder's int4 graph (MatMulNBits, block 32) at fp32 accuracy level: AttnLRP token relevance equals
    LXT's on the PyTorch model whose linear weights are the ones onnxruntime's kernel multiplies by. ``tied``:
    tied embeddings, looked up in the int4 lm-head table by GatherBlockQuantized (a relevance source)."""
    import torch
    import transformers

    pt_dir, qpath = genai_model("llama", "int4", **(TIED if tied else {}))
    model = onnx.load(str(qpath))
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and ("GatherBlockQuantized" in ops) == tied
    torch_model = transformers.LlamaForCausalLM.from_pretrained(pt_dir).eval()
    params = dict(torch_model.named_parameters())
    q_out = torch_model.config.num_attention_heads * torch_model.config.head_dim
    k_out = torch_model.config.num_key_value_heads * torch_model.config.head_dim
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0  # onnxruntime's int8 activations would be a different forward than PyTorch's
        W = torch.from_numpy(_ort_weight(model, node).T.copy())
        name = node.name.split("/MatMul")[0].strip("/").replace("/", ".").replace("attn", "self_attn")
        with torch.no_grad():
            if name.endswith("qkv_proj"):
                base = name[: -len("qkv_proj")]
                for part, rows in (("q_proj", W[:q_out]), ("k_proj", W[q_out:q_out + k_out]),
                                   ("v_proj", W[q_out + k_out:])):
                    params[f"{base}{part}.weight"].copy_(rows)
            else:  # a tied lm_head is the embedding table
                params.get(f"{name}.weight", torch_model.get_output_embeddings().weight).copy_(W)
    torch_model.save_pretrained(tmp_path / "pt")
    ids, mask = _padded_inputs()
    res = Explainer(model).explain({"input_ids": ids, "attention_mask": mask})
    lxt = lxt_relevance("llama", tmp_path / "pt", ids, mask, np.clip(np.cumsum(mask, -1) - 1, 0, None),
                        res.position, res.target)
    assert rel_err(res.relevance["input_ids"], lxt["relevance"]) <= 1e-3


def test_optimizer_multi_head_attention_graph_matches_plain_export():
    """onnxruntime's transformer optimizer with ``use_multi_head_attention`` writes BERT attention as
    MultiHeadAttention (separate Q/K/V MatMuls, packed bias, lengths from EmbedLayerNormalization): same
    AttnLRP relevance as the plain optimum export (right padding, which the lengths mask assumes)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _, base = tiny_model("bert")
    opts = FusionOptions("bert")
    opts.use_multi_head_attention = True
    fused = optimize_model(str(base), model_type="bert", num_heads=4, hidden_size=32, optimization_options=opts,
                           opt_level=1).model
    assert "MultiHeadAttention" in {n.op_type for n in fused.graph.node}
    ids = np.random.RandomState(0).randint(3, 120, (2, 7))
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = Explainer(base).explain(feeds)
    res = Explainer(fused).explain(feeds, target=ref.target)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4


def test_matmul_nbits_scales_stay_in_the_session():
    """Scales large enough to count as weights (bound at run time otherwise) stay initializers: onnxruntime's
    MatMulNBits at accuracy_level 4 returns zeros when they come in as a graph input. The explained forward must
    be onnxruntime's own (from a file, as Explainer loads it, and from a ModelProto)."""
    import onnxruntime as ort

    K, N, block = 64, 1024, 32
    rng = np.random.RandomState(4)
    inits = {"B": rng.randint(0, 256, (N, K // block, block // 2)).astype(np.uint8),
             "scales": (0.1 + rng.rand(N * K // block)).astype(np.float32)}
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=block, accuracy_level=4)
    model = _model([node], [("A", "f", [2, K])], ["y"], inits)
    A = rng.randn(2, K).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    assert np.abs(want).max() > 1
    res = Explainer(model, composite="gradient").explain({"A": A}, output="y", output_relevance=np.ones_like(want))
    np.testing.assert_allclose(res.outputs["y"], want, rtol=1e-6)
