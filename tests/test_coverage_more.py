"""More families (docs/coverage-more.md): each explains a batch of 2 with padding, and agrees with independent
torch-autograd references on the same PyTorch weights:

- Gradient x Input: plain autograd on the unpatched model (exact; graph and rules plumbing, sources);
- AttnLRP: onnx_lrp/reference/torch.py (module patches plus rules on torch functions for inline attention);
  Gradient x Input must be far from it, so the check has teeth.
Token relevance max |ours - ref| <= 1e-3 * max |ref|; relevance at padding exactly 0.
Also: encoder-decoder families chained with onnx_lrp.seq2seq, BART as a classifier (moved decoder ids), the other
presets on the new op mixes, and single ops met on the way (Resize, pooling, InstanceNormalization,
BatchNormalization, GatherND, Einsum with an ellipsis) against onnxruntime-probed Jacobians or torch autograd.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from onnx_lrp import Explainer

from _support import FAMILIES, rel_err, tiny_model
from onnx_lrp.reference.torch import torch_output_relevance

TOL = 1e-3
ENCODERS = ["roberta", "xlm_roberta", "camembert", "distilbert", "albert", "electra", "mpnet", "deberta_v2",
            "modernbert", "esm", "roformer", "rembert", "convbert", "squeezebert", "mobilebert", "big_bird",
            "data2vec_text", "megatron_bert", "roberta_mc"]
DECODERS = ["opt", "bloom", "falcon", "falcon_mqa", "falcon_alibi", "gpt_neox", "gptj", "gpt_neo", "codegen", "phi",
            "stablelm", "granite", "olmo", "olmo2", "gpt_bigcode", "cohere", "smollm3", "helium", "arcee",
            "nemotron", "glm", "mpt", "gpt_oss", "deepseek_v3",
            "llama_cls", "gpt2_cls", "bloom_cls", "gpt_neox_cls", "qwen2_tok", "qwen3_fe"]
VISION = ["deit", "beit", "swin", "convnext", "clip_vision", "siglip_vision", "segformer", "poolformer", "resnet",
          "mobilenet_v2", "swinv2", "convnextv2", "data2vec_vision", "vit_msn", "mobilevit", "levit", "hiera",
          "yolos", "regnet", "clip", "wav2vec2", "sew", "wavlm", "ast"]  # (and audio)
# the export traces transformers' SDPA path; its eager Falcon-ALiBi path computes slightly different logits
REFERENCE_ATTN = {"falcon_alibi": "sdpa"}
# Gradient x Input of these tiny models is ill-conditioned in float32 (token relevance 1e-5 of the output, with
# cancellations): our own float64 result is 2.5e-3 (DeBERTa-v2) / 1.8e-3 (ModernBERT) from our float32 one, and
# 1.7e-3 / 8.5e-4 from torch's float32 (measured); AttnLRP is not affected and keeps TOL
GXI_TOL = {"deberta_v2": 1e-2, "modernbert": 1e-2}
# no AttnLRP reference: WavLM's attention is torch's F.multi_head_attention_forward, which the reference cannot
# patch (its input-dependent gated relative position bias is checked through Gradient x Input); RegNet's
# squeeze-excitation product x * gate(x) is an element-wise product the reference does not halve
GXI_ONLY = {"wavlm", "regnet"}
# ReLU networks without attention or norm statistics that matter: AttnLRP equals Gradient x Input
RULES_ARE_GRADIENT = {"resnet", "mobilenet_v2"}
# tokens mix their neighbours before attention (MobileBERT's trigram embedding, ConvBERT's span convolution):
# padding tokens legitimately receive relevance
MIXES_PADDING = {"mobilebert", "convbert"}


def _feeds(family: str, names: list[str], batch: int = 2, seq: int = 9) -> dict:
    """Decoders padded on the left, encoders on the right (second row, 3 tokens); random images and audio;
    multiple choice: two choices per row."""
    rng = np.random.RandomState(1)
    cfg = FAMILIES[family][3]
    feeds = {}
    if "pixel_values" in names:
        size = cfg.get("vision_config", cfg).get("image_size", 16)
        size = size[0] if isinstance(size, list) else size
        feeds["pixel_values"] = rng.randn(batch, 3, size, size).astype(np.float32)
    if "input_values" in names:  # AST: (frames, mel bins); wav2vec2: a waveform
        shape = (cfg["max_length"], cfg["num_mel_bins"]) if "max_length" in cfg else (400,)
        feeds["input_values"] = rng.randn(batch, *shape).astype(np.float32)
    if "input_ids" not in names:
        return feeds
    ids = rng.randint(5, 120, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if family in DECODERS:
        mask[1:, :3] = 0
    else:
        mask[1:, -3:] = 0
    if FAMILIES[family][2] == "multiple-choice":
        ids, mask = np.stack([ids, ids[::-1]], 1), np.stack([mask, mask], 1)
    feeds.update(input_ids=ids, attention_mask=mask)
    if "position_ids" in names:
        feeds["position_ids"] = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = (np.arange(seq) >= seq // 2).astype(np.int64) * np.ones_like(ids)
    return {k: v for k, v in feeds.items() if k in names}


@functools.lru_cache(maxsize=None)
def _case(family: str):
    pt_dir, path = tiny_model(family)
    ex = Explainer(path)
    feeds = _feeds(family, ex.input_names)
    res = ex.explain(feeds)
    gxi = Explainer(path, composite="gradient-x-input").explain(feeds, target=res.target, position=res.position)
    return pt_dir, feeds, res, gxi


def _reference(family: str, composite: str) -> dict:
    pt_dir, feeds, res, _ = _case(family)
    return torch_output_relevance(FAMILIES[family][1], pt_dir, feeds, res.output, res.position, res.target,
                                  composite=composite, attn=REFERENCE_ATTN.get(family, "eager"))


@pytest.mark.parametrize("family", ENCODERS + DECODERS + VISION)
def test_family(family):
    """The explained logit is PyTorch's; Gradient x Input equals autograd's; AttnLRP equals the torch reference."""
    _, feeds, res, gxi = _case(family)
    ref_gxi = _reference(family, "gradient-x-input")
    np.testing.assert_allclose(res.score, ref_gxi["score"], rtol=1e-4, atol=1e-5)
    assert set(ref_gxi["relevance"]) <= set(res.relevance)
    for src, r in ref_gxi["relevance"].items():  # (multiple choice: the reference has batch x choices rows)
        assert rel_err(gxi.relevance[src], r.reshape(gxi.relevance[src].shape)) <= GXI_TOL.get(family, TOL)
    if "attention_mask" in feeds and family not in MIXES_PADDING:
        assert np.all(res.relevance["input_ids"][feeds["attention_mask"] == 0] == 0)
    if family in GXI_ONLY:
        return
    ref = _reference(family, "attnlrp")
    for src, r in ref["relevance"].items():
        r = r.reshape(res.relevance[src].shape)
        assert rel_err(res.relevance[src], r) <= TOL
        if family not in RULES_ARE_GRADIENT:  # the rules matter on this model
            assert rel_err(gxi.relevance[src], r) > 10 * TOL


SEQ2SEQ = ["bart", "marian", "mbart", "pegasus", "m2m_100", "blenderbot", "mt5", "longt5", "whisper"]


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_encoder_decoder(family):
    """A decoder logit over encoder and decoder inputs (onnx_lrp.seq2seq) equals the torch reference on the whole
    model; Whisper's encoder input is the float ``input_features`` (relevance per feature)."""
    from onnx_lrp.reference.torch import torch_seq2seq_relevance
    from _variants import seq2seq_model
    from onnx_lrp.seq2seq import explain_seq2seq

    pt_dir, enc_path, dec_path = seq2seq_model(family)
    enc, dec = Explainer(enc_path), Explainer(dec_path)
    rng = np.random.RandomState(0)
    dec_ids = rng.randint(3, 120, (2, 5))
    if "input_features" in enc.input_names:
        name, x, mask = "input_features", rng.randn(2, 8, 3000).astype(np.float32), None
        inputs = {name: x}
    else:
        name, x = "input_ids", rng.randint(3, 120, (2, 7))
        mask = np.ones_like(x)
        mask[1, -2:] = 0
        inputs = {name: x, "attention_mask": mask}
    res = explain_seq2seq(enc, dec, inputs, dec_ids, position=[4, 2])
    ref = torch_seq2seq_relevance(FAMILIES[family][1], pt_dir, x, mask, dec_ids, res.position, res.target,
                                  encoder_input=name)
    np.testing.assert_allclose(res.score, ref["logits"][np.arange(2), res.target], rtol=1e-4, atol=1e-5)
    assert res.encoder_relevance.shape == x.shape
    assert rel_err(res.encoder_relevance, ref["encoder"]) <= TOL
    assert rel_err(res.decoder_relevance, ref["decoder"]) <= TOL
    if mask is not None:
        assert np.all(res.encoder_relevance[mask == 0] == 0)
    assert np.abs(res.encoder_relevance).sum() > 0.05 * np.abs(res.decoder_relevance).sum()  # both sides matter


@pytest.mark.parametrize("family", ["convbert", "olmo", "poolformer", "wav2vec2", "swinv2"])
@pytest.mark.parametrize("composite", ["cp-lrp", "vit-lrp", "gradient"])
def test_other_composites_run(family, composite):
    """The other presets run on the op mixes found here (dynamic-convolution MatMul under the gamma rule, Clip,
    pooling, GroupNorm, computed Conv kernels, ReduceL2) and give finite, non-zero relevance."""
    _, path = tiny_model(family)
    _, feeds, res, _ = _case(family)
    out = Explainer(path, composite=composite).explain(feeds, target=res.target, position=res.position)
    for r in out.relevance.values():
        assert np.all(np.isfinite(r)) and np.abs(r).max() > 0


# ------------------------------------------------------------------ single ops found on the way (exact references)
def _op_relevance(op_node, x: np.ndarray, composite="gradient-x-input", inits=None):
    """(relevance of x, start weights w, model) for a one-node graph ``x -> y`` explained with ``R_y = w * y``."""
    from _graphs import model

    m = model([op_node], {"x": x.shape}, {"y": tuple(f"d{i}" for i in range(x.ndim))}, inits)
    y = Explainer(m).forward({"x": x})["y"]
    w = np.random.RandomState(3).randn(*y.shape).astype(np.float32)
    res = Explainer(m, composite=composite).explain({"x": x}, output="y", output_relevance=w)
    return res.relevance["x"], w, m


def _probe_vjp(m, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``J^T w`` of a LINEAR op, by running onnxruntime on every one-hot input (independent of the rule)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.zeros(x.size)
    for k in range(x.size):
        e = np.zeros(x.size, np.float32)
        e[k] = 1
        out[k] = (sess.run(None, {"x": e.reshape(x.shape)})[0] * w).sum()
    return out.reshape(x.shape)


RESIZES = {
    "nearest-x2": (dict(mode="nearest"), [1, 1, 2, 2], None),
    "nearest-floor-asym-1.7": (dict(mode="nearest", nearest_mode="floor",
                                    coordinate_transformation_mode="asymmetric"), [1, 1, 1.7, 1.7], None),
    "linear-half-pixel-x2": (dict(mode="linear"), [1, 1, 2, 2], None),
    "linear-align-corners-sizes": (dict(mode="linear", coordinate_transformation_mode="align_corners"), None,
                                   [1, 2, 9, 4]),
    "linear-down-0.5": (dict(mode="linear"), [1, 1, 0.5, 0.5], None),
    "cubic-x2": (dict(mode="cubic"), [1, 1, 2, 2], None),
}


@pytest.mark.parametrize("case", list(RESIZES))
def test_resize_is_its_vjp(case):
    """Resize rule (MobileViT, segmentation heads): ``x * J^T w`` with ``J`` probed from onnxruntime."""
    from _graphs import f32, node

    attrs, scales, sizes = RESIZES[case]
    x = f32(1, 2, 5, 6, seed=1)
    inits = {"scales": np.asarray(scales, np.float32)} if scales else {"sizes": np.asarray(sizes, np.int64)}
    ins = ["x", "", "scales"] if scales else ["x", "", "", "sizes"]
    rel, w, m = _op_relevance(node("Resize", ins, ["y"], **attrs), x, inits=inits)
    np.testing.assert_allclose(rel, x * _probe_vjp(m, x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),  # PoolFormer
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
])
def test_average_pool_is_its_vjp(attrs):
    from _graphs import f32, node

    x = f32(1, 2, 5, 7, seed=2)
    rel, w, m = _op_relevance(node("AveragePool", ["x"], ["y"], **attrs), x)
    np.testing.assert_allclose(rel, x * _probe_vjp(m, x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),  # ResNet stem
    dict(kernel_shape=[2, 3], strides=[1, 1], dilations=[2, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
])
def test_max_pool_matches_torch(attrs):
    """MaxPool routes the gradient to the window maxima, as torch's max_pool2d does (overlapping windows add)."""
    import torch
    import torch.nn.functional as F
    from _graphs import f32, node

    x = f32(1, 2, 6, 7, seed=4)
    rel, w, _ = _op_relevance(node("MaxPool", ["x"], ["y"], **attrs), x)
    p = attrs.get("pads", [0, 0, 0, 0])
    xt = torch.tensor(x, requires_grad=True)
    y = F.max_pool2d(F.pad(xt, (p[1], p[3], p[0], p[2]), value=-float("inf")), attrs["kernel_shape"],
                     attrs["strides"], dilation=attrs.get("dilations", 1), ceil_mode=bool(attrs.get("ceil_mode")))
    (y * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(rel, x * xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("composite", ["gradient-x-input", "attnlrp"])
def test_instance_norm_as_group_norm(composite):
    """torch's GroupNorm export (``InstanceNormalization`` over groups): the gradient, and under AttnLRP the
    normalisation with its standard deviation constant (mean kept), written with torch autograd."""
    import torch
    from _graphs import f32, node
    from onnx_lrp.reference.torch import _group_norm_detached

    x = f32(2, 3, 10, seed=5, scale=2.0) + 0.5  # (batch, groups, channels per group x positions)
    scale, bias = f32(3, seed=6) + 1, f32(3, seed=7)
    rel, w, _ = _op_relevance(node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5), x,
                              composite=composite, inits={"s": scale, "b": bias})
    xt = torch.tensor(x, requires_grad=True)
    if composite == "attnlrp":
        y = _group_norm_detached(xt, 3, torch.tensor(scale), torch.tensor(bias))
    else:
        y = torch.nn.functional.group_norm(xt, 3, torch.tensor(scale), torch.tensor(bias))
    (y * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(rel, x * xt.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_batch_norm_inference_is_affine():
    """Inference BatchNormalization (LeViT): the gradient of torch's batch_norm with running statistics, under
    AttnLRP too (an affine map per channel: no statistic of the input)."""
    import torch
    from _graphs import f32, node

    x = f32(2, 4, 3, 5, seed=8)
    s, b, mean, var = f32(4, seed=9), f32(4, seed=10), f32(4, seed=11), np.abs(f32(4, seed=12)) + 0.5
    xt = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, torch.tensor(mean), torch.tensor(var), torch.tensor(s), torch.tensor(b),
                                       training=False, eps=1e-5)
    for composite in ("attnlrp", "gradient-x-input"):
        rel, w, _ = _op_relevance(node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5), x,
                                  composite=composite, inits={"s": s, "b": b, "m": mean, "v": var})
        if xt.grad is None:
            (y * torch.tensor(w)).sum().backward()
        np.testing.assert_allclose(rel, x * xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gather_nd_is_its_vjp(batch_dims):
    """GatherND on the relevance path (the dynamo export of Falcon's fused QKV split), repeated and negative
    addresses included: ``x * J^T w`` with ``J`` probed from onnxruntime."""
    from _graphs import f32, node

    x = f32(2, 4, 3, seed=13)
    if batch_dims:
        idx = np.array([[[1], [-1], [1]], [[0], [2], [3]]])
    else:
        idx = np.array([[[1, 2], [0, 0]], [[1, 2], [-1, 1]]])
    rel, w, m = _op_relevance(node("GatherND", ["x", "i"], ["y"], batch_dims=batch_dims), x, inits={"i": idx})
    np.testing.assert_allclose(rel, x * _probe_vjp(m, x, w), rtol=1e-5, atol=1e-6)


def test_einsum_with_ellipsis_is_its_vjp():
    """Einsum with ``...`` (LongT5's local attention ``...hqk,...khd->...qhd``), one carrying operand."""
    from _graphs import f32, node

    x = f32(2, 3, 4, 5, 6, seed=14)  # (..., h, q, k)
    v = f32(2, 3, 6, 4, 7, seed=15)  # (..., k, h, d)
    rel, w, m = _op_relevance(node("Einsum", ["x", "v"], ["y"], equation="...hqk,...khd->...qhd"), x,
                              inits={"v": v})
    np.testing.assert_allclose(rel, x * _probe_vjp(m, x, w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["bart_cls", "mbart_cls"])
@pytest.mark.parametrize("composite", ["gradient-x-input", "attnlrp"])
def test_classifier_routes_shifted_decoder_ids(family, composite):
    """BART/mBART classification feeds ``input_ids`` to the encoder AND, shifted right (BART: behind a start
    token; mBART: the last non-pad token wrapped to the front), to the decoder: each decoder lookup's relevance
    belongs to the input token it reads. Reference: both embedding lookups hooked in torch; which input position
    each decoder position reads comes from the modeling file's own ``shift_tokens_right`` applied to position
    codes."""
    import importlib
    import inspect

    import torch
    import transformers
    from onnx_lrp.reference.torch import lrp_patched

    pt_dir, path = tiny_model(family)
    ids = np.random.RandomState(0).randint(5, 120, (2, 9))
    mask = np.ones_like(ids)
    ids[:, -1], ids[1, -4], mask[1, -3:], ids[1, -3:] = 2, 2, 0, 1  # one eos per row (pooled at), pads = 1
    res = Explainer(path, composite=composite).explain({"input_ids": ids, "attention_mask": mask})
    cls = getattr(transformers, FAMILIES[family][1])
    model = cls.from_pretrained(str(pt_dir), attn_implementation="eager")
    held = []

    def hook(module, args, out):
        held.append(out.detach().requires_grad_())
        return held[-1]

    for emb in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        emb.register_forward_hook(hook)
    with lrp_patched(model.eval(), composite) if composite == "attnlrp" else torch.enable_grad():
        y = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        y[torch.arange(2), torch.tensor(res.target)].sum().backward()
    enc, dec = [(h * h.grad).sum(-1).detach().double().numpy() for h in held]
    shift = importlib.import_module(cls.__module__).shift_tokens_right
    codes = torch.where(torch.tensor(ids) == 1, 1, torch.arange(9) + 1000)  # pads stay pads for the shift
    extra = (2,) if "decoder_start_token_id" in inspect.signature(shift).parameters else ()
    read = shift(codes, 1, *extra).numpy() - 1000  # input position read by each decoder position (< 0: none)
    ref = enc.copy()
    for b, j in zip(*np.nonzero(read >= 0)):
        ref[b, read[b, j]] += dec[b, j]
    assert rel_err(res.relevance["input_ids"], ref) <= TOL
    assert rel_err(res.relevance["input_ids"], enc) > 30 * TOL  # the decoder side matters


def test_resize_at_opset_11_is_its_vjp():
    """Before opset 13 Resize's ``roi`` is a required input: the rule's basis probe must give it too."""
    from _graphs import f32, model, node

    x = f32(1, 2, 5, 6, seed=1)
    m = model([node("Resize", ["x", "roi", "scales"], ["y"], mode="linear")], {"x": x.shape}, {"y": (1, 2, 10, 12)},
              {"roi": np.zeros(0, np.float32), "scales": np.asarray([1, 1, 2, 2], np.float32)}, opset=11)
    w = np.random.RandomState(3).randn(1, 2, 10, 12).astype(np.float32)
    rel = Explainer(m, composite="gradient-x-input").explain({"x": x}, output_relevance=w).relevance["x"]
    np.testing.assert_allclose(rel, x * _probe_vjp(m, x, w), rtol=1e-5, atol=1e-6)


def test_einsum_ellipsis_broadcast_is_summed_back():
    """``...qk,...kd->...qd`` with a size-1 ``...`` axis against size 2: the gradient of the size-1 operand sums
    over the broadcast axis (torch autograd reference)."""
    import torch
    from _graphs import f32, model, node

    x, v, w = f32(1, 3, 4, 5, seed=1), f32(2, 3, 5, 6, seed=2), f32(2, 3, 4, 6, seed=3)
    m = model([node("Einsum", ["x", "v"], ["y"], equation="...qk,...kd->...qd")], {"x": x.shape, "v": v.shape},
              {"y": w.shape})
    res = Explainer(m, composite="gradient-x-input").explain({"x": x, "v": v}, output_relevance=w)
    xt, vt = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    (torch.einsum("...qk,...kd->...qd", xt, vt) * torch.tensor(w)).sum().backward()
    assert res.relevance["x"].shape == x.shape
    np.testing.assert_allclose(res.relevance["x"], x * xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.relevance["v"], v * vt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_unsupported_variants_are_refused():
    """BatchNormalization spatial=0 and the gamma rule on a weight computed in the graph: clear errors."""
    from _graphs import f32, model, node
    from onnx_lrp import Gamma
    from onnx_lrp.errors import OnnxLrpError

    c = np.ones(3, np.float32)
    bn = model([node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0)], {"x": (2, 3)}, {"y": (2, 3)},
               {"s": c, "b": c, "m": c, "v": c}, opset=7)
    with pytest.raises(OnnxLrpError, match="spatial=0"):
        Explainer(bn).explain({"x": f32(2, 3)}, output_relevance=np.ones((2, 3), np.float32))
    # (a DequantizeLinear of constants is folded into a constant weight: tests/test_quantized.py)
    computed = model([node("Neg", ["W0"], ["W"]), node("MatMul", ["x", "W"], ["y"])], {"x": (2, 3)},
                     {"y": (2, 4)}, {"W0": np.ones((3, 4), np.float32)})
    with pytest.raises(OnnxLrpError, match="gamma rule needs the weight 'W' as an initializer"):
        Explainer(computed, overrides={"MatMul": Gamma(0.25)}).explain({"x": f32(2, 3)})
