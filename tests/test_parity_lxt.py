"""Parity with LXT 2.1 (efficient engine) on tiny random-weight models exported with optimum.

Measure: token relevance max |ours - LXT| <= 1e-3 * max |LXT|, batch 1 and batch 2 with padding.
"""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lrp import Explainer

from _support import lxt_relevance, rel_err, tiny_model

TOL = 1e-3
FAMILIES = ["llama", "qwen2", "gpt2", "bert"]


def _inputs(family: str, batch: int, pad: str | None, seq: int = 9, seed: int = 1):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 120, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if pad == "left":
        mask[1:, :3] = 0
    elif pad == "right":
        mask[1:, -3:] = 0
    return ids, mask


def _run(family: str, ex: Explainer, pt_dir, ids: np.ndarray, mask: np.ndarray):
    """Explain with ours and with LXT on the same inputs (explicit position ids, as generate() makes them)."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    position_ids = None
    if "position_ids" in ex.input_names:
        position_ids = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        feeds["position_ids"] = position_ids
    res = ex.explain(feeds)
    causal = res.outputs[ex.default_output].ndim == 3
    ref = lxt_relevance(family, pt_dir, ids, mask, position_ids, res.position if causal else None, res.target)
    return res, ref, causal


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch,pad", [(1, None), (2, "left"), (2, "right")])
def test_token_relevance_matches_lxt(family, batch, pad):
    pt_dir, onnx_path = tiny_model(family)
    ex = Explainer(onnx_path)
    ids, mask = _inputs(family, batch, pad)
    res, ref, causal = _run(family, ex, pt_dir, ids, mask)
    assert np.array_equal(ref["targets"], res.target)
    ours = res.relevance["input_ids"]
    assert ours.shape == ids.shape
    assert rel_err(ours, ref["relevance"]) <= TOL, (ours, ref["relevance"])
    # padding positions get no relevance (except BERT's pooled first token when it is itself padding)
    if causal or pad != "left":
        assert np.all(ours[mask == 0] == 0)
    # the explained score is the logit LXT starts from
    lxt_logit = np.asarray(ref["logits"])[np.arange(batch), res.target]
    np.testing.assert_allclose(res.score, lxt_logit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cp_lrp_matches_lxt(family):
    pt_dir, onnx_path = tiny_model(family)
    ex = Explainer(onnx_path, composite="cp-lrp")
    ids, mask = _inputs(family, 1, None)
    res = ex.explain({"input_ids": ids, "attention_mask": mask})
    ref = lxt_relevance(family, pt_dir, ids, mask, np.arange(ids.shape[1])[None], res.position, res.target,
                        composite="cp-lrp")
    assert rel_err(res.relevance["input_ids"], ref["relevance"]) <= TOL


VARIANTS = [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=16, num_key_value_heads=1,
                   hidden_act="gelu_pytorch_tanh")),
    ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    ("gpt2", dict(n_inner=48, scale_attn_by_inverse_layer_idx=True, activation_function="gelu")),
    ("bert", dict(position_embedding_type="relative_key", hidden_act="gelu_new")),
]


@pytest.mark.parametrize("family,config", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_config_variants_match_lxt(family, config):
    """Biases, tied embeddings, MQA, other activations, relative position (Einsum) attention."""
    pt_dir, onnx_path = tiny_model(family, config=config)
    ex = Explainer(onnx_path)
    ids, mask = _inputs(family, 2, "left", seq=8, seed=3)
    res, ref, _ = _run(family, ex, pt_dir, ids, mask)
    assert rel_err(res.relevance["input_ids"], ref["relevance"]) <= TOL
