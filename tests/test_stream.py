"""Reading .onnx files with each weight held once (onnx_lrp._stream) gives what onnx.load + split_weights gives."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_lrp import Explainer
from onnx_lrp._stream import read_split, split_weights
from onnx_lrp.errors import ModelLoadError

from _support import tiny_model


def _same(path):
    ref, ref_w = split_weights(onnx.load(str(path)))
    proto, weights = read_split(path)
    assert proto == ref
    assert weights.keys() == ref_w.keys() and len(weights) > 0
    for name, arr in ref_w.items():
        assert weights[name].dtype == arr.dtype and np.array_equal(weights[name], arr), name
        assert weights[name].flags.c_contiguous and weights[name].flags.owndata  # read from the file itself


def _model(tensors, dtype=onnx.TensorProto.FLOAT):
    """y = x @ W0 @ W1 ... for initializers ``tensors`` (32 x 32 each)."""
    nodes, prev = [], "x"
    for k, t in enumerate(tensors):
        nodes.append(helper.make_node("MatMul", [prev, t.name], [f"h{k}"], name=f"mm{k}"))
        prev = f"h{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, 32])],
                              [helper.make_tensor_value_info(prev, dtype, [1, 32])], list(tensors))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_exported_model_reads_as_onnx_load(tmp_path):
    _same(tiny_model("llama")[1])


def test_external_data_and_float_data_weights(tmp_path):
    rng = np.random.RandomState(0)
    w = [rng.randn(32, 32).astype(np.float32) for _ in range(3)]
    raw = numpy_helper.from_array(w[0], "w_raw")
    listed = helper.make_tensor("w_listed", onnx.TensorProto.FLOAT, [32, 32], w[1].reshape(-1).tolist())  # float_data
    ext = numpy_helper.from_array(w[2], "w_ext")
    model = _model([raw, listed, ext])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    proto, weights = read_split(tmp_path / "m.onnx")
    for name, arr in zip(["w_raw", "w_listed", "w_ext"], w):
        assert np.array_equal(weights[name], arr), name
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in proto.graph.initializer)
    x = rng.randn(1, 32).astype(np.float32)
    res = Explainer(tmp_path / "m.onnx", composite="gradient-x-input").explain({"x": x}, target=3)
    assert np.isclose(res.score[0], (x @ w[0] @ w[1] @ w[2])[0, 3], rtol=1e-5)


def test_fp16_weights(tmp_path):
    w = [numpy_helper.from_array(np.random.RandomState(k).randn(32, 32).astype(np.float16), f"w{k}") for k in (1, 2)]
    onnx.save(_model(w, onnx.TensorProto.FLOAT16), str(tmp_path / "h.onnx"))
    _same(tmp_path / "h.onnx")


def test_broken_files_are_named(tmp_path):
    good = tiny_model("llama")[1].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        Explainer(tmp_path / "cut.onnx")
    w = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")
    onnx.save(_model([w]), str(tmp_path / "e.onnx"), save_as_external_data=True, location="e.data",
              size_threshold=0)
    (tmp_path / "e.data").unlink()
    with pytest.raises(ModelLoadError, match="external data file .*e.data is missing"):
        Explainer(tmp_path / "e.onnx")
