"""Faithfulness evaluation (onnx_lrp.evaluate): in-graph perturbation, curves, scores, methods.

References are independent of the code under test: the unmodified model with a spare embedding-table row set to
zero / the baseline (a removed token = that row's id), hand-computed trapezoids, the completeness property of
Integrated Gradients, and a PyTorch + LXT implementation of the whole protocol (tests/_lxt_faithfulness.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_lrp.evaluate import METHODS, Evaluator, removal_counts

from _support import FAMILIES, HERE, tiny_model

CONFIG = {"bert": dict(initializer_range=0.2), "llama": {}}
SPARE = 127  # an id the test inputs never use (they draw from 3..119)


def _model(family):
    return tiny_model(family, config=CONFIG[family])


def _inputs(batch=4, seq=10, seed=0, pad=False):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 120, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if pad:
        mask[1:, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _spare_row_session(onnx_path, row: np.ndarray):
    """The unmodified graph whose embedding row ``SPARE`` is set to ``row``."""
    proto = onnx.load(str(onnx_path))
    for k, init in enumerate(proto.graph.initializer):
        if "word_embeddings" in init.name or "embed_tokens" in init.name:
            table = numpy_helper.to_array(init).copy()
            table[SPARE] = row
            proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(table, init.name))
            return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    raise AssertionError("no word embedding table found")


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("with_baseline", [False, True])
def test_mask_equals_replaced_token(family, with_baseline):
    _, onnx_path = _model(family)
    hidden = 32
    b = np.linspace(-1, 1, hidden).astype(np.float32) if with_baseline else None
    ref_sess = _spare_row_session(onnx_path, b if with_baseline else np.zeros(hidden, np.float32))
    ev = Evaluator(onnx_path, baseline=b)
    feeds = ev.feeds(_inputs(batch=1))
    masks = np.ones((3, 10))
    masks[0, [1, 4]] = 0
    masks[1, :] = 0
    y = np.concatenate([o[0] for o in ev.perturber.run(feeds, masks, [ev.output])])
    for k in range(3):
        ids = feeds["input_ids"].copy()
        ids[0, masks[k] == 0] = SPARE
        ref = ref_sess.run([ev.output], dict(feeds, input_ids=ids))[0]
        np.testing.assert_allclose(y[k], ref[0], rtol=1e-4, atol=1e-5)
    # the unmasked copy is the original model
    orig = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run([ev.output], feeds)[0]
    np.testing.assert_allclose(y[2], orig[0], rtol=1e-5, atol=1e-6)


def test_curves_match_hand_computation():
    _, onnx_path = _model("llama")
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=2, pad=True)
    rel = np.random.default_rng(1).standard_normal((2, 10))
    steps = 4
    f = ev.evaluate(inputs, rel, steps=steps)
    zero_sess = _spare_row_session(onnx_path, np.zeros(32, np.float32))
    feeds = ev.feeds(inputs)
    for b in range(2):
        fb = {k: v[b : b + 1] for k, v in feeds.items()}
        valid = np.flatnonzero(feeds["attention_mask"][b])
        pos = valid.max()
        n = valid.size
        assert list(f.removed[b]) == [int(np.floor(k * n / steps + 0.5)) for k in range(steps + 1)]
        for name, order in (("morf", valid[np.argsort(-rel[b, valid])]), ("lerf", valid[np.argsort(rel[b, valid])])):
            for k, m in enumerate(f.removed[b]):
                ids = fb["input_ids"].copy()
                ids[0, order[:m]] = SPARE
                logits = zero_sess.run([ev.output], dict(fb, input_ids=ids))[0][0, pos]
                assert getattr(f, name)[b, k] == pytest.approx(float(logits[f.target[b]]), rel=1e-4, abs=1e-5)
        area = lambda y: sum((y[i] + y[i + 1]) / 2 for i in range(steps)) / steps  # noqa: E731
        assert f.faithfulness[b] == pytest.approx(area(f.lerf[b]) - area(f.morf[b]), rel=1e-9, abs=1e-12)
    assert removal_counts(7, 3).tolist() == [0, 2, 5, 7]


def test_reversed_ranking_flips_the_sign():
    _, onnx_path = _model("llama")
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=3)
    rel = ev.attribute("attnlrp", inputs)
    f, g = ev.evaluate(inputs, rel), ev.evaluate(inputs, -rel)
    np.testing.assert_allclose(g.faithfulness, -f.faithfulness, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g.morf, f.lerf, rtol=1e-6, atol=1e-9)
    # ERASER: probabilities in [0, 1]; removing the top tokens hurts more than keeping them for a good ranking
    assert np.all((f.morf_prob >= 0) & (f.morf_prob <= 1))


def test_random_attribution_scores_about_zero():
    """Mean faithfulness of random rankings is 0 within 3 standard errors; AttnLRP's is far above it."""
    _, onnx_path = _model("llama")
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=24, seq=10, seed=3)
    scores = np.concatenate([ev.evaluate(inputs, ev.attribute("random", inputs, seed=s), steps=5).faithfulness
                             for s in range(5)])
    mean, se = scores.mean(), scores.std(ddof=1) / np.sqrt(scores.size)
    assert abs(mean) < 3 * se, (mean, se)
    lrp = ev.evaluate(inputs, ev.attribute("attnlrp", inputs), steps=5).faithfulness
    assert lrp.mean() > mean + 3 * se + 3 * lrp.std(ddof=1) / np.sqrt(lrp.size)


def test_integrated_gradients_completeness():
    """Sum of IG over tokens = f(x) - f(all word embeddings zero) (up to the midpoint rule's error)."""
    _, onnx_path = _model("llama")
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=2)
    ig = ev.attribute("integrated-gradients", inputs, ig_steps=64)
    zero_sess = _spare_row_session(onnx_path, np.zeros(32, np.float32))
    feeds = ev.feeds(inputs)
    tgt, pos = ev.predict(inputs)
    y = zero_sess.run([ev.output], feeds)[0][np.arange(2), pos, tgt]
    y0 = zero_sess.run([ev.output], dict(feeds, input_ids=np.full_like(feeds["input_ids"], SPARE)))[0]
    y0 = y0[np.arange(2), pos, tgt]
    np.testing.assert_allclose(ig.sum(-1), y - y0, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_all_methods_run(family):
    _, onnx_path = _model(family)
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=2, pad=True)
    for m in METHODS:
        r = ev.attribute(m, inputs, seed=0, ig_steps=4)
        assert r.shape == (2, 10) and np.all(np.isfinite(r)), m
    roll = ev.attribute("rollout", inputs)
    np.testing.assert_allclose(roll.sum(-1), 1.0, rtol=1e-6)  # a row of a product of row-stochastic matrices
    with pytest.raises(ValueError, match="unknown method"):
        ev.attribute("occlusion", inputs)


def test_bad_inputs_are_named():
    _, onnx_path = _model("llama")
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=2)
    with pytest.raises(Exception, match=r"relevance must be \(batch, seq\)"):
        ev.evaluate(inputs, np.zeros((2, 3)))
    with pytest.raises(Exception, match="no perturbable token"):
        ev.evaluate(inputs, np.zeros((2, 10)), perturbable=np.zeros((2, 10), bool))
    with pytest.raises(Exception, match="Perturber.run takes one input"):
        ev.perturber.run(ev.feeds(inputs), np.ones((1, 10)))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_faithfulness_matches_lxt_in_pytorch(family):
    """The whole protocol in PyTorch (LXT relevance, perturbation of inputs_embeds) gives the same numbers."""
    pt_dir, onnx_path = _model(family)
    ev = Evaluator(onnx_path)
    inputs = _inputs(batch=4, seq=10, seed=5)
    perturbable = np.ones((4, 10), bool)
    if family == "bert":
        perturbable[:, 0] = False  # keep the pooled first token
    steps = 5
    ours = ev.evaluate(inputs, ev.attribute("attnlrp", inputs), steps=steps, perturbable=perturbable)
    req = {"family": family, "model_cls": FAMILIES[family][1], "pt_dir": str(pt_dir), "composite": "attnlrp",
           "input_ids": inputs["input_ids"].tolist(), "attention_mask": inputs["attention_mask"].tolist(),
           "perturbable": perturbable.tolist(), "steps": steps}
    proc = subprocess.run([sys.executable, str(HERE / "_lxt_faithfulness.py")], input=json.dumps(req),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ref["targets"] == ours.target.tolist()
    np.testing.assert_allclose(ours.morf, ref["morf"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.lerf, ref["lerf"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.faithfulness, ref["faithfulness"], rtol=1e-4, atol=1e-4)
