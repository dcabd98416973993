"""Every bad input a clear error (issue 15): one test per kind of bad input through the API and the CLI.

Each test asserts the exception type and that the message names the offending input, parameter, file or node
(and, where the model has one, the limit it breaks); CLI cases assert exit status 2, one ``onnx-lrp: error:``
line and no Python traceback. Models: the cached tiny random exports (``_support.tiny_model``) and hand-built
graphs. The table of checks and their messages: ``docs/errors.md``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_lrp import Explainer, InputError, ModelLoadError, TargetError
from onnx_lrp._device import DeviceError
from onnx_lrp.cli import main

from _graphs import f32, model, node
from _support import tiny_model
from _variants import variant
from test_frontends import text_model  # noqa: F401 - the tiny Llama with a word-level tokenizer (a fixture)


@pytest.fixture(scope="module")
def llama():
    return Explainer(tiny_model("llama")[1])


@pytest.fixture(scope="module")
def bert():
    return Explainer(tiny_model("bert")[1])


@pytest.fixture(scope="module")
def gpt2():
    return Explainer(tiny_model("gpt2")[1])


@pytest.fixture(scope="module")
def vit():
    return Explainer(tiny_model("vit")[1])


IDS = np.array([[5, 9, 17, 33]])


def _error_line(err: str, *words: str) -> bool:
    """stderr of a failed command: an ``onnx-lrp: error:`` line holding ``words``, and no Python traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("onnx-lrp: error:")]
    return len(lines) == 1 and all(w in err for w in words) and "Traceback" not in err


def _raises(exc, *words):
    """pytest.raises that also checks every word appears in the message."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            ok = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            missing = [w for w in words if w not in msg]
            assert not missing, f"{missing} not in: {msg}"
            return ok
    return _Check()


# ---------------------------------------------------------------------------------------------- each array
def test_not_a_dict_unknown_and_missing_names(llama):
    with _raises(InputError, "dict", "ndarray"):
        llama.explain(IDS)
    with _raises(InputError, "unknown input name", "input_idz", "input_ids"):
        llama.explain({"input_idz": IDS})
    m = model([node("MatMul", ["x", "W"], ["y"])], {"x": (2, 3), "z": (2, 3)}, {"y": (2, 4)}, {"W": f32(3, 4)})
    with _raises(InputError, "missing input", "'z'"):
        Explainer(m).explain({"x": f32(2, 3)}, target=0)


@pytest.mark.parametrize("value, words", [
    ([[1, 2, 3], [4]], ("input_ids", "not a rectangular array", "attention_mask")),
    ("the cat", ("input_ids", "must be an array", "str")),
    (None, ("input_ids", "must be an array", "NoneType")),
    ({"ids": 1}, ("input_ids", "must be an array", "dict")),
    (np.array([["a", "b"]]), ("input_ids", "must hold numbers", "<U1")),
    (IDS.astype(np.float32), ("input_ids", "must hold integers", "float32")),
    (IDS[0], ("input_ids", "rank 2", "(4,)")),
    (np.zeros((1, 0), np.int64), ("input_ids", "empty", "(1, 0)")),
    (np.zeros((0, 4), np.int64), ("input_ids", "empty", "(0, 4)")),
    (np.array([[2**63]], np.uint64), ("input_ids", "int64 range", "9223372036854775808")),
])
def test_array_checks(llama, value, words):
    with _raises(InputError, *words):
        llama.explain({"input_ids": value})


def test_fixed_sizes_and_float_inputs(vit):
    m = model([node("MatMul", ["x", "W"], ["y"])], {"x": (2, 3)}, {"y": (2, 4)}, {"W": f32(3, 4)})
    with _raises(InputError, "'x'", "axis 1 must be 3", "(2, 5)"):
        Explainer(m).explain({"x": f32(2, 5)}, target=0)
    img = np.zeros((1, 3, 16, 16), np.uint8)
    with _raises(InputError, "pixel_values", "must hold floats", "uint8", "normalise"):
        vit.explain({"pixel_values": img})
    bad = f32(1, 3, 16, 16)
    bad[0, 1, 2, 3] = np.nan
    with _raises(InputError, "pixel_values", "NaN/inf", "(0, 1, 2, 3)"):
        vit.explain({"pixel_values": bad})
    with _raises(InputError, "pixel_values", "NaN/inf"):  # finite float64 beyond float32: inf after the cast
        vit.explain({"pixel_values": np.full((1, 3, 16, 16), 1e300)})


def test_boolean_inputs():
    g = helper.make_graph([helper.make_node("Where", ["m", "x", "z"], ["y"], name="w")], "g",
                          [helper.make_tensor_value_info("m", onnx.TensorProto.BOOL, [2]),
                           helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor("z", onnx.TensorProto.FLOAT, [2], [0.0, 0.0])])
    ex = Explainer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    run = dict(output_relevance=np.ones(2, np.float32))
    np.testing.assert_array_equal(ex.explain({"m": np.array([1, 0]), "x": np.ones(2, np.float32)}, **run)
                                  .relevance["x"], [1, 0])  # 0/1 integers are bools
    with _raises(InputError, "'m'", "boolean", "0/1", "[0, 2]"):
        ex.explain({"m": np.array([2, 0]), "x": np.ones(2, np.float32)}, **run)
    with _raises(InputError, "'m'", "boolean", "float64"):  # 0.5 would silently be True
        ex.explain({"m": np.array([0.5, 1.0]), "x": np.ones(2, np.float32)}, **run)


# ---------------------------------------------------------------------------------------------- across inputs
def test_named_axes_agree(bert, llama):
    with _raises(InputError, "attention_mask", "axis 0 is 3", "input_ids", "axis 0 is 2", "batch_size"):
        bert.explain({"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((3, 4), np.int64)})
    with _raises(InputError, "attention_mask", "axis 1 is 6", "sequence_length"):
        bert.explain({"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 6), np.int64)})
    with _raises(InputError, "position_ids", "axis 1 is 5", "input_ids", "axis 1 is 4"):
        llama.explain({"input_ids": IDS, "position_ids": np.arange(5)[None]})


def test_mask_with_an_empty_past():
    ex = Explainer(variant("llama", "past"))
    with _raises(InputError, "attention_mask", "axis 1 is 6", "past_sequence_length + sequence_length", "= 4"):
        ex.explain({"input_ids": IDS, "attention_mask": np.ones((1, 6), np.int64)})
    with _raises(InputError, "past_key_values.0.key", "axis 0 is 2", "batch_size"):
        ex.explain({"input_ids": IDS, "past_key_values.0.key": np.zeros((2, 2, 0, 8), np.float32)})
    assert ex.explain({"input_ids": IDS, "attention_mask": np.ones((1, 4), np.int64)}).relevance["input_ids"].shape \
        == (1, 4)


def test_mask_values(llama):
    with _raises(InputError, "attention_mask", "row 1 is all zeros"):
        llama.explain({"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.array([[1, 1, 1, 1], [0] * 4])})
    with _raises(InputError, "attention_mask", "0 (padding) and 1 (token)", "[0, 2]"):
        llama.explain({"input_ids": IDS, "attention_mask": np.array([[0, 1, 2, 1]])})
    res = llama.explain({"input_ids": IDS, "attention_mask": np.ones((1, 4), bool)})  # bool masks are masks
    assert np.isfinite(res.relevance["input_ids"]).all()


# ---------------------------------------------------------------------------------------------- model limits
def test_ids_outside_the_vocabulary(llama, bert):
    with _raises(InputError, "input_ids", "holds -1 at index (0, 2)", "[0, 128)", "model.embed_tokens.weight"):
        llama.explain({"input_ids": np.array([[5, 9, -1, 33]])})  # -1 would silently read the last row
    with _raises(InputError, "input_ids", "holds 128", "[0, 128)"):
        llama.explain({"input_ids": np.array([[5, 128]])})
    with _raises(InputError, "token_type_ids", "holds 5", "[0, 2)", "token_type_embeddings"):
        bert.explain({"input_ids": IDS, "token_type_ids": np.array([[0, 1, 5, 0]])})


def test_longer_than_the_position_table(bert, gpt2):
    # BERT slices its position buffer (64 entries): 70 tokens would be clamped to 64, then fail in onnxruntime
    with _raises(InputError, "'input_ids' (1, 70)", "at most 64", "/bert/embeddings/Slice", "holds 64"):
        bert.explain({"input_ids": np.ones((1, 70), np.int64)})
    # GPT-2: the filled-in position ids index a learned table of 64 rows
    with _raises(InputError, "'input_ids' (1, 70)", "at most 64", "position_ids", "transformer.wpe.weight"):
        gpt2.explain({"input_ids": np.ones((1, 70), np.int64)})
    with _raises(InputError, "position_ids", "holds 100", "[0, 64)"):
        gpt2.explain({"input_ids": np.ones((1, 7), np.int64), "position_ids": 100 + np.arange(7)[None]})
    assert gpt2.explain({"input_ids": np.ones((1, 64), np.int64)}).relevance["input_ids"].shape == (1, 64)


def test_offset_positions_computed_in_the_graph():
    """RoBERTa computes its positions from the ids (padding_idx + cumsum): 64 rows hold 62 tokens."""
    ex = Explainer(tiny_model("roberta")[1])
    with _raises(InputError, "'input_ids' (1, 63)", "at most 62", "position_embeddings", "64 entries"):
        ex.explain({"input_ids": np.full((1, 63), 5)})
    assert ex.explain({"input_ids": np.full((1, 62), 5)}).relevance["input_ids"].shape == (1, 62)


def test_rope_without_a_cache_has_no_limit(llama):
    """Llama's RoPE is computed from the positions (no cos/sin table): longer inputs than the config's 64 run."""
    assert np.isfinite(llama.explain({"input_ids": np.ones((1, 80), np.int64)}).relevance["input_ids"]).all()


def test_image_of_the_wrong_size(vit):
    with _raises(InputError, "pixel_values", "(1, 3, 20, 20)", "5 x 5 = 25 patches", "hold 16 patches",
                 "16 x 16 images"):
        vit.explain({"pixel_values": f32(1, 3, 20, 20)})
    with _raises(InputError, "pixel_values", "2 x 8 = 16 patches", "square grid"):  # right count, wrong layout
        vit.explain({"pixel_values": f32(1, 3, 8, 32)})


def test_onnxruntime_failure_names_the_node_and_inputs():
    m = model([node("Add", ["a", "b"], ["c"], name="my_add")], {"a": ("n",), "b": ("m",)}, {"c": ("n",)})
    ex = Explainer(m)
    with _raises(InputError, "node 'my_add' (Add)", "'a' (3,)", "'b' (4,)", "broadcast") as e:
        ex.explain({"a": f32(3), "b": f32(4)}, output_relevance=np.ones(3, np.float32))
    assert "onnxruntime_src" not in str(e.value)


def test_onnxruntime_log_stays_out_of_the_terminal(capfd):
    m = model([node("Add", ["a", "b"], ["c"], name="my_add")], {"a": ("n",), "b": ("m",)}, {"c": ("n",)})
    with pytest.raises(InputError):
        Explainer(m).explain({"a": f32(3), "b": f32(4)}, output_relevance=np.ones(3, np.float32))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "[E:" not in err


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kw, words", [
    (dict(target=np.zeros((1, 0), np.int64)), ("target", "(1, 0)", "empty")),
    (dict(target=2.0), ("target", "integer", "float64")),
    (dict(target=True), ("target", "integer", "bool")),
    (dict(target=[[1, 2], [3]]), ("target", "not a rectangular array")),
    (dict(target=[1, 2]), ("target", "2 targets for a batch of 1")),
    (dict(target=128), ("target", "out of range", "128 classes")),
    (dict(position=1.5), ("position", "integer", "float64", "round")),  # truncated to 1 before
    (dict(position=np.zeros((1, 0), np.int64)), ("position", "empty")),
    (dict(position=4), ("position", "out of range", "length 4")),
    (dict(target=np.ones((1, 2), np.int64), position=np.ones((1, 3), np.int64)), ("different numbers",)),
    (dict(output_relevance=np.full((1, 4, 128), np.nan, np.float32)), ("output_relevance", "NaN/inf")),
    (dict(output_relevance=np.ones((1, 4), np.float32)), ("output_relevance", "(1, 4)", "(1, 4, 128)")),
    (dict(output="nope"), ("no graph output", "'nope'")),
    (dict(collect=["attention_mask"]), ("collect", "attention_mask", "carries no relevance")),
])
def test_target_position_and_start_checks(llama, kw, words):
    with _raises(TargetError, *words):
        llama.explain({"input_ids": IDS}, **kw)


def test_non_finite_model_output():
    """Finite inputs whose forward overflows: an error, not NaN relevance."""
    m = model([node("Exp", ["x"], ["y"])], {"x": (1, 3)}, {"y": (1, 3)})
    with _raises(InputError, "not finite", "'x'"):
        Explainer(m).explain({"x": np.array([[1.0, 2.0, 100.0]], np.float32)}, target=0)


# ---------------------------------------------------------------------------------------------- loading
def test_fifo_and_device_paths_are_refused(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with _raises(ModelLoadError, "not a regular file", "model.onnx"):
        Explainer(fifo)
    with _raises(ModelLoadError, "not a regular file", "/dev/null"):
        Explainer("/dev/null")
    # the CLI: refused at once instead of blocking on the FIFO
    proc = subprocess.run([sys.executable, "-m", "onnx_lrp", "inspect", str(fifo)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and _error_line(proc.stderr, "not a regular file")


def _impossible(tmp_path, dims):
    """A Gather over an initializer whose header claims ``dims`` with 16 bytes of data."""
    table = onnx.TensorProto(name="table", data_type=onnx.TensorProto.FLOAT, dims=dims, raw_data=b"\0" * 16)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")], "g",
                          [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [table])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "bad.onnx"))
    return m


@pytest.mark.parametrize("dims", [[2**31, 2**31], [1 << 40]])
def test_impossible_tensor_size_is_a_load_error(tmp_path, dims, capsys):
    m = _impossible(tmp_path, dims)
    for source in (tmp_path / "bad.onnx", m):
        with _raises(ModelLoadError, "initializer 'table'", str(dims), "holds 16"):
            Explainer(source)
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err
    assert _error_line(err, "'table'")


def test_external_data_beyond_its_file(tmp_path):
    _, path = tiny_model("llama")
    proto = onnx.load(str(path))
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated data file
    with _raises(ModelLoadError, "m.onnx", "claims bytes", "m.data"):
        Explainer(tmp_path / "m.onnx")


def test_truncated_and_corrupt_files(tmp_path):
    _, path = tiny_model("llama")
    blob = path.read_bytes()
    (tmp_path / "half.onnx").write_bytes(blob[: len(blob) // 2])
    with _raises(ModelLoadError, "half.onnx"):
        Explainer(tmp_path / "half.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf \x00\xff" * 10)
    with _raises(ModelLoadError, "junk.onnx", "not a readable ONNX model"):
        Explainer(tmp_path / "junk.onnx")
    with _raises(ModelLoadError, "no such file"):
        Explainer(tmp_path / "nope.onnx")


def test_model_proto_external_data_needs_base_dir(tmp_path, monkeypatch):
    _, path = tiny_model("llama")
    proto = onnx.load(str(path))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    stub = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    before = stub.SerializeToString()
    with _raises(ModelLoadError, "ModelProto", "external files", "base_dir"):
        Explainer(stub)
    # a same-named data file in the working directory is never read
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    shutil.copy(folder / "m.data", decoy / "m.data")
    with open(decoy / "m.data", "r+b") as f:
        f.write(b"\x7f" * 4096)
    monkeypatch.chdir(decoy)
    res = Explainer(stub, base_dir=folder).explain({"input_ids": IDS})
    ref = Explainer(path).explain({"input_ids": IDS})
    np.testing.assert_array_equal(res.relevance["input_ids"], ref.relevance["input_ids"])
    assert stub.SerializeToString() == before  # the user's ModelProto is unchanged
    with _raises(ModelLoadError, "base_dir", "not a folder"):
        Explainer(stub, base_dir=tmp_path / "nowhere")


def test_external_data_outside_the_folder_is_refused(tmp_path):
    _, path = tiny_model("llama")
    proto = onnx.load(str(path))
    (tmp_path / "a").mkdir()
    onnx.save(proto, str(tmp_path / "a" / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    m = onnx.load(str(tmp_path / "a" / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(m, str(tmp_path / "a" / "evil.onnx"))
    with _raises(ModelLoadError, "'../secret.data'", "outside the model's folder"):
        Explainer(tmp_path / "a" / "evil.onnx")


# ---------------------------------------------------------------------------------------------- configuration
def test_unavailable_providers(capfd):
    _, path = tiny_model("llama")
    with _raises(DeviceError, "none of the requested providers", "'CUDAExecutionProvider'", "CPUExecutionProvider"):
        Explainer(path, providers=["CUDAExecutionProvider"])
    with _raises(DeviceError, "unknown", "'CPUProvider'"):
        Explainer(path, providers=["CPUProvider"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = Explainer(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ex.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in str(w.message) and "onnx-lrp" in str(w.message) for w in caught)
    assert not any("Specified provider" in str(w.message) for w in caught)  # onnxruntime's own notice
    assert "Specified provider" not in capfd.readouterr().err


def test_overrides_and_rule_parameters(llama):
    """The lead's override and rule checks (issue 11), as a user meets them."""
    from onnx_lrp import ConfigError, Epsilon, Gamma, Gradient, Uniform

    path = tiny_model("llama")[1]
    with _raises(ConfigError, "override 'node:/nope/*'", "no node of the model is named"):
        Explainer(path, overrides={"node:/nope/*": Gradient()})
    with _raises(ConfigError, "override 'op:Mtmul'", "knows no op type 'Mtmul'"):
        Explainer(path, overrides={"op:Mtmul": Gradient()})
    with _raises(ConfigError, "override 'node:/model/norm/*'", "Uniform", "fits none of the nodes"):
        Explainer(path, overrides={"node:/model/norm/*": Uniform()})
    with _raises(ValueError, "Epsilon", "epsilon", "-1"):
        Epsilon(-1)
    with _raises(ValueError, "Gamma", "gamma", "nan"):
        Gamma(float("nan"))


@pytest.mark.slow
def test_composite_whose_relevance_explodes_is_reported(capsys):
    """vit-lrp's gamma rule on an LLM (SmolLM2): the relevance sums to ~1e3x the logit; the CLI says so in one
    warning line naming where it blew up, and still explains."""
    code = main(["explain", "smollm2", "The capital of France is", "--composite", "vit-lrp", "--no-color"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("onnx-lrp: warning:")]
    assert code == 0 and len(lines) == 1 and "not conserved" in lines[0] and "vit-lrp" in lines[0]
    assert "first exceeds 10x the score at tensor" in lines[0] and "Traceback" not in err


def test_similarity_on_a_causal_lm(text_model):  # noqa: F811
    from onnx_lrp.text import TextExplainer

    tx = TextExplainer(text_model[0])
    with _raises(TargetError, "similarity()", "encoder", "causal LM"):
        tx.similarity("the cat", "the dog")


# ---------------------------------------------------------------------------------------------- tokenizers
def _folder_with(tmp_path, text_model, **files):  # noqa: F811
    """A copy of the tiny Llama's folder with some files replaced (None: removed)."""
    folder = tmp_path / "m"
    shutil.copytree(text_model[0].parent, folder)
    for name, content in files.items():
        name = name.replace("_json", ".json")
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(content)
    return folder


def test_corrupt_tokenizer_and_configs(tmp_path, text_model, capsys):  # noqa: F811
    from onnx_lrp.text import TextExplainer

    folder = _folder_with(tmp_path, text_model, tokenizer_json='{"version": "1.0", "model": ')
    with _raises(ModelLoadError, "tokenizer.json", "not a readable tokenizer"):
        TextExplainer(folder)
    assert main(["explain", str(folder), "the cat"]) == 2
    err = capsys.readouterr().err
    assert _error_line(err, "tokenizer.json")
    folder = _folder_with(tmp_path / "b", text_model, config_json="{not json")
    with _raises(ModelLoadError, "config.json", "not a readable JSON file"):
        TextExplainer(folder)
    folder = _folder_with(tmp_path / "c", text_model, tokenizer_config_json="[1, 2]")
    with _raises(ModelLoadError, "tokenizer_config.json", "JSON object"):
        TextExplainer(folder)


def test_only_a_tokenizer_config(tmp_path, text_model, capsys):  # noqa: F811
    from onnx_lrp.text import TextExplainer

    folder = _folder_with(tmp_path, text_model, tokenizer_json=None)
    with _raises(ModelLoadError, "no tokenizer.json", "tokenizer_config.json alone"):
        TextExplainer(folder)
    assert main(["explain", str(folder), "the cat"]) == 2
    err = capsys.readouterr().err
    assert _error_line(err, "tokenizer_config.json")


@pytest.mark.parametrize("size", [200, 40])
def test_tokenizer_of_another_model(tmp_path, text_model, size, capsys):  # noqa: F811
    """A word-level tokenizer with 200 (ids beyond the table) or 40 (a small part of 128 rows) tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from onnx_lrp.text import TextExplainer

    folder = _folder_with(tmp_path, text_model)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    with _raises(ModelLoadError, f"tokenizer has {size} tokens", "128 rows", "not this model's tokenizer"):
        TextExplainer(folder)
    assert main(["explain", str(folder), "w1 w2"]) == 2
    assert "not this model's tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.err


def test_cli_errors_are_one_line_with_exit_2(text_model, tmp_path, capsys):  # noqa: F811
    path = str(text_model[0])
    cases = [
        (["explain", str(tmp_path / "nope"), "hi"], "no such file or folder"),
        (["explain", path, "the cat", "--target", "big house"], "2 tokens"),
        (["explain", path, "the cat", "--composite", "atnlrp"], "unknown composite 'atnlrp'"),
        (["inspect", path, "--composite", "atnlrp"], "unknown composite 'atnlrp'"),
        (["explain", path], "give a TEXT"),
        (["explain", path, "the cat", "--png", str(tmp_path / "x.png")], "--png needs --image"),
        (["explain", path, "the cat", "--generate", "-2"], "--generate N must be at least 1"),
        (["explain", path, "--image", str(tmp_path / "none.png")], "no such image file"),
    ]
    for argv, words in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert _error_line(err, words), (argv, err)


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    code, err = _cli(capsys, "--debug", "inspect", str(tmp_path / "nope.onnx"))
    assert code == 2 and "Traceback" in err and "onnx-lrp: error:" in err
    code, err = _cli(capsys, "inspect", str(tmp_path / "nope.onnx"), "--debug")  # also after the command
    assert code == 2 and "Traceback" in err


def test_cli_output_paths_checked_before_explaining(tmp_path, capsys):
    """Bad --html/--json/--png paths fail first: the model path here does not even exist."""
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    nowhere = str(tmp_path / "missing")
    for opt, value, words in [("--html", str(tmp_path), "is a folder"),
                              ("--json", str(tmp_path / "no" / "x.json"), "does not exist"),
                              ("--html", str(fifo), "not a regular file"),
                              ("--png", str(tmp_path), "is a folder")]:
        argv = ["explain", nowhere, "text", opt, value] if opt != "--png" else \
            ["explain", nowhere, "--image", "x.npy", opt, value]
        code, err = _cli(capsys, *argv)
        assert code == 2 and _error_line(err, words) and "no such file" not in err, (opt, err)
    code, err = _cli(capsys, "explain", nowhere, "a", "--pair", "b", "--html", str(tmp_path / "sub" / "p.html"))
    assert code == 2 and "does not exist" in err


def test_cli_export_infers_the_task(tmp_path, capsys):
    from onnx_lrp.exporters._optimum import task_from_config

    pt_dir, _ = tiny_model("bert")
    assert task_from_config(pt_dir) == "text-classification"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with _raises(ValueError, "cannot infer the task", "--task"):
        task_from_config(tmp_path / "cfg")
    assert main(["export", str(pt_dir), str(tmp_path / "out")]) == 0  # no --task
    assert capsys.readouterr().out.strip().endswith("model.onnx")
    ref = Explainer(tiny_model("bert")[1]).explain({"input_ids": IDS}).relevance["input_ids"]
    res = Explainer(tmp_path / "out" / "model.onnx").explain({"input_ids": IDS}).relevance["input_ids"]
    np.testing.assert_allclose(res, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- threads
def test_one_explainer_from_many_threads():
    """Each thread is the first to collect a different tensor: plans and the capture session grow concurrently
    (intermittently "Invalid output name" / "IOBinding must be used with the session that created it" before)."""
    _, path = tiny_model("llama")
    ids = np.random.RandomState(0).randint(3, 120, size=(1, 6))
    names = sorted(t for t in Explainer(path).analysis.carrying if t.endswith("MatMul_output_0"))[:8]
    ref = {n: Explainer(path).explain({"input_ids": ids}, collect=[n]).latent[n] for n in names[:2]}
    for _ in range(3):
        ex = Explainer(path)
        start = threading.Barrier(len(names))
        results, errors = {}, []

        def work(name):
            start.wait()
            try:
                results[name] = ex.explain({"input_ids": ids}, collect=[name]).latent[name]
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(err))

        threads = [threading.Thread(target=work, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        for n, r in ref.items():
            np.testing.assert_array_equal(results[n], r)
