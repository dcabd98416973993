"""Latent relevance by selector (onnx_lrp.latent): sites found by graph structure for the coverage families and
graph shapes, unit relevance and conditional heatmaps against LXT on the same PyTorch weights, conservation
through a residual stream site, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_lrp import Explainer, TargetError
from onnx_lrp.latent import LatentExplainer, find_layers

from _graphs import f32, model, node
from _support import rel_err, tiny_model
from _variants import mixtral_model, seq2seq_model, variant

HERE = Path(__file__).parent
DENSE = ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "bert", "vit"]


def _ids(batch=2, seq=7, seed=0):
    return np.random.RandomState(seed).randint(3, 120, size=(batch, seq))


def _sites(path, **kw):
    ex = Explainer(path, **kw)
    return ex, find_layers(ex.graph, ex.analysis)


@pytest.mark.parametrize("family", DENSE)
def test_sites_of_dense_families(family):
    ex, layers = _sites(tiny_model(family)[1])
    want = {"resid:0", "resid:1", "resid:2", "mlp:0", "mlp:1", "head:0", "head:1"}
    assert set(layers.sites) == want, layers.notes
    assert layers.n_layers == 2
    for site in layers.sites.values():  # each is a carrying tensor of the graph, in its layer
        assert site.tensor in ex.analysis.carrying
    # the MLP site is the tensor entering a weight map; the heads site the output of A V (a product)
    for li in (0, 1):
        mlp = layers.sites[f"mlp:{li}"].tensor
        assert any(c.op_type in ("MatMul", "Gemm") or c.op_type == "Reshape" for c in ex.graph.consumers[mlp])
        assert ex.graph.producer[layers.sites[f"head:{li}"].tensor].op_type == "MatMul"


def test_sites_of_moe_encoder_decoder_and_mixtral():
    for path in (tiny_model("qwen3_moe")[1], mixtral_model()[1]):
        _, layers = _sites(path)
        assert {"resid:0", "resid:1", "resid:2", "head:0", "head:1"} == set(layers.sites)
        with pytest.raises(TargetError, match="mixture of experts"):
            layers.resolve("mlp:0")
    _, enc, dec = seq2seq_model("t5")
    assert set(_sites(enc)[1].sites) == {"resid:0", "resid:1", "resid:2", "mlp:0", "mlp:1", "head:0", "head:1"}
    _, layers = _sites(dec)
    assert {"cross:0", "cross:1", "head:0", "mlp:1"} <= set(layers.sites)
    assert layers.sites["cross:0"].tensor != layers.sites["head:0"].tensor


def test_sites_do_not_depend_on_node_names(tmp_path):
    path = tiny_model("llama")[1]
    _, named = _sites(path)
    proto = onnx.load(str(path))
    for n in proto.graph.node:
        n.name = ""
    _, anonymous = _sites(proto)
    assert {k: s.tensor for k, s in anonymous.sites.items()} == {k: s.tensor for k, s in named.sites.items()}


@pytest.mark.parametrize("family,shape", [("llama", "ort2"), ("llama", "ort"), ("bert", "ort"), ("bert", "opset14"),
                                          ("gpt2", "ort"), ("llama", "eager")])
def test_same_latent_relevance_on_other_graph_shapes(family, shape):
    """onnxruntime-optimised (fused norms, attention, GELU), written-out and eager graphs: the same selector gives
    the same per-unit relevance as the default export. Pre-norm graphs whose residual sums are fused into
    Skip*Normalization do not offer those resid sites (the sum is not a tensor of the graph)."""
    base = LatentExplainer(Explainer(tiny_model(family)[1]))
    other = LatentExplainer(Explainer(variant(family, shape)))
    common = [s for s in base.selectors() if s in other.selectors()]
    missing = set(base.selectors()) - set(common)
    assert not missing or (shape == "ort" and family in ("llama", "gpt2") and missing == {"resid:1", "resid:2"})
    assert any(n.startswith("resid:1") for n in other.layers.notes) or not missing
    feeds = {"input_ids": _ids()}
    a, b = base.explain(feeds, common), other.explain(feeds, common)
    for sel in common:
        assert rel_err(b.relevance[sel], a.relevance[sel]) < 1e-5, sel
        np.testing.assert_allclose(b.activations[sel], a.activations[sel], rtol=1e-4, atol=1e-5)


def _lxt_latent(pt_dir, ids, sites) -> dict:
    req = {"family": "llama", "model_cls": "LlamaForCausalLM", "pt_dir": str(pt_dir), "input_ids": ids.tolist(),
           "sites": sites}
    done = subprocess.run([sys.executable, str(HERE / "_lxt_latent.py")], input=json.dumps(req) + "\n",
                          capture_output=True, text=True, cwd=HERE, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    assert line, done.stderr[-3000:]
    out = json.loads(line[len("@@RESULT "):])
    assert "error" not in out, out.get("error")
    return out


def test_units_and_conditional_heatmaps_match_lxt():
    """Per-unit relevance and conditional heatmaps (relevance through one neuron / head / stream dimension) vs LXT's
    efficient engine on the same weights, where the sites are read from the PyTorch modules."""
    pt_dir, path = tiny_model("llama")
    lat = LatentExplainer(Explainer(path))
    ids = _ids()
    picks = {"mlp:0": [3, 17, 40], "head:1": [0, 1, 2, 3], "resid:1": [5, 30], "resid:2": [0, 11]}
    ref = _lxt_latent(pt_dir, ids, [{"kind": s.split(":")[0], "layer": int(s.split(":")[1]), "units": u, "heads": 4}
                                    for s, u in picks.items()])
    res = lat.explain({"input_ids": ids}, list(picks))
    for sel, units in picks.items():
        r = ref[sel]
        np.testing.assert_array_equal(res.explanation.target, r["targets"])
        ours = res.unit_relevance(sel)
        assert rel_err(ours, np.asarray(r["units"])) < 1e-5, sel
        top, vals = res.top(sel, k=3)  # the same most relevant units, with signs
        ref_top = np.argsort(-np.abs(np.asarray(r["units"])), axis=-1, kind="stable")[:, :3]
        np.testing.assert_array_equal(top, ref_top)
        np.testing.assert_allclose(vals, np.take_along_axis(ours, top, -1))
        cond = lat.conditional({"input_ids": ids}, sel, units).relevance["input_ids"]  # (batch, units, seq)
        assert cond.shape == (2, len(units), ids.shape[1])
        assert rel_err(cond, np.asarray(r["conditional"]).transpose(1, 0, 2)) < 1e-5, sel


def test_conditional_heatmaps_of_a_stream_layer_sum_to_the_heatmap():
    """Every path from the tokens to the logit crosses the residual stream entering a layer: the conditional
    heatmaps of all its dimensions add up to the unconditional heatmap (the relevance pass is linear in G)."""
    lat = LatentExplainer(Explainer(tiny_model("llama")[1]))
    feeds = {"input_ids": _ids(seed=3)}
    full = lat.explainer.explain(feeds).relevance["input_ids"]
    for sel in ("resid:0", "resid:1", "resid:2"):
        cond = lat.conditional(feeds, sel, range(32), chunk=12).relevance["input_ids"]
        np.testing.assert_allclose(cond.sum(1), full, rtol=1e-5, atol=1e-6 * np.abs(full).max())
    heads = lat.conditional(feeds, "head:0", range(4)).relevance["input_ids"]  # only what flows through heads
    assert not np.allclose(heads.sum(1), full, rtol=1e-2)


def test_conditions_keep_only_what_flows_through_by_hand():
    """y = (x + x A) w with Gradient x Input: conditioning on h = x A with mask m leaves R_x = x * (A (m * w)): the
    bypass through the residual sum is dropped, the mask applies to the complete gradient of h."""
    x, A, w = f32(1, 4, seed=1), f32(4, 4, seed=2), f32(4, 1, seed=3)
    m = model([node("MatMul", ["x", "A"], ["h"]), node("Add", ["x", "h"], ["s"]), node("MatMul", ["s", "w"], ["y"])],
              {"x": (1, 4)}, {"y": (1, 1)}, {"A": A, "w": w})
    ex = Explainer(m, "gradient-x-input")
    mask = np.array([1, 0, 1, 0], np.float32)
    got = ex.explain({"x": x}, target=0, conditions={"h": mask}).relevance["x"]
    np.testing.assert_allclose(got, x * (A @ (mask * w[:, 0])), rtol=1e-6)
    both = [ex.explain({"x": x}, target=0, conditions={"h": mk}).relevance["x"] for mk in (mask, 1 - mask)]
    direct = x * w[:, 0]  # the bypass, which no condition on h keeps
    np.testing.assert_allclose(both[0] + both[1] + direct, ex.explain({"x": x}, target=0).relevance["x"], rtol=1e-6)
    src = ex.explain({"x": x}, target=0, conditions={"x": mask}).relevance["x"]  # on a source: at the end
    np.testing.assert_allclose(src, mask * ex.explain({"x": x}, target=0).relevance["x"], rtol=1e-6)


def test_conditioned_explain_and_errors():
    ex = Explainer(tiny_model("llama")[1])
    lat = LatentExplainer(ex)
    feeds = {"input_ids": _ids()}
    one = lat.conditional(feeds, "head:1.2")  # the head the selector names
    assert one.units == [2] and one.relevance["input_ids"].shape == (2, 1, 7)
    with pytest.raises(TargetError, match="offers"):
        lat.site("mlp:7")
    with pytest.raises(TargetError, match="KIND:LAYER"):
        lat.site("mlp12")
    with pytest.raises(TargetError, match="only heads"):
        lat.site("mlp:1.3")
    with pytest.raises(TargetError, match="out of range"):
        lat.conditional(feeds, "mlp:0", [64])
    with pytest.raises(TargetError, match="give the units"):
        lat.conditional(feeds, "mlp:0")
    with pytest.raises(TargetError, match=r"position \[99, 99\] out of range for sequence length 7"):
        lat.conditional(feeds, "mlp:0", [1], position=99)
    with pytest.raises(TargetError, match="position"):  # not truncated to 1
        lat.conditional(feeds, "mlp:0", [1], position=1.5)
    with pytest.raises(TargetError, match="not on the relevance path"):
        ex.explain(feeds, conditions={"attention_mask": np.ones(1)})
    # conditions on a collected tensor: its latent relevance is what flows through the kept neuron
    t = lat.site("mlp:0")[0].tensor
    mask = np.zeros(64, np.float32)
    mask[5] = 1
    r = ex.explain(feeds, collect=[t], conditions={t: mask})
    assert np.abs(r.latent[t][..., :5]).max() == 0 and np.abs(r.latent[t][..., 5]).max() > 0


def test_cli_latent_and_inspect(text_model, tmp_path, capsys):
    from onnx_lrp.cli import main

    assert main(["inspect", str(text_model), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "latent selectors (2 layers" in out and "resid:0..2" in out and "mlp:0..1" in out and "head:0..1" in out
    js = tmp_path / "latent.json"
    code = main(["latent", str(text_model), "t5 t9 t17 t33", "--layers", "mlp:1", "head:0", "--top-k", "3",
                 "--through", "head:0", "--units", "0,2", "--json", str(js), "--no-color"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mlp:1: most relevant neurons:" in out and "relevance through head:0 unit 2" in out
    report = json.loads(js.read_text())
    lat = LatentExplainer(Explainer(text_model))
    ids = np.asarray([[5, 9, 17, 33]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    top, val = lat.explain(feeds, ["mlp:1"]).top("mlp:1", 3)
    assert report["layers"]["mlp:1"]["units"] == top[0].tolist()
    np.testing.assert_allclose(report["layers"]["mlp:1"]["relevance"], val[0], rtol=1e-6)
    cond = lat.conditional(feeds, "head:0", [0, 2]).relevance["input_ids"][0]
    np.testing.assert_allclose(report["conditional"]["2"], cond[1], rtol=1e-6, atol=1e-9)
    assert main(["latent", str(text_model), "t5 t9", "--layers", "mlp:9"]) == 2  # a clear error, no traceback
    assert "this model offers" in capsys.readouterr().err


def test_cli_latent_default_layers_without_heads(text_model, capsys, monkeypatch):
    """Without --layers: the first attention heads, else the first selector the model offers (a graph whose heads
    are not recognised), else a clear error; never a run that lists nothing."""
    from onnx_lrp import latent
    from onnx_lrp.cli import main

    offered = latent.LatentExplainer.selectors
    monkeypatch.setattr(latent.LatentExplainer, "selectors",
                        lambda self: [s for s in offered(self) if not s.startswith("head:")])
    assert main(["latent", str(text_model), "t5 t9", "--no-color"]) == 0
    assert "resid:0: most relevant neurons:" in capsys.readouterr().out
    monkeypatch.setattr(latent.LatentExplainer, "selectors", lambda self: [])
    assert main(["latent", str(text_model), "t5 t9"]) == 2
    assert "no latent layers found" in capsys.readouterr().err
