"""Performance features of the engine keep results exact.

- k targets in one batched pass == k separate passes;
- the row-sparse constant MatMul backward == the dense product;
- captured tensors are zero-copy views of onnxruntime's outputs that stay valid after later runs
  (checked against a plain onnxruntime session), and tensors are released after their last use;
- weights are held once (session inputs, data-less stubs in the loaded graph), the user's ModelProto untouched;
- the softmax NaN guard lets the softmax output and IsNaN mask go uncaptured;
- the shapes asked for come back through two outputs (concatenated, and their ranks), each right.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_lrp import Explainer
from onnx_lrp import OnnxLrpError
from onnx_lrp._engine import Env
from onnx_lrp.ops.linear import matmul_const

from _support import tiny_model


def _ids(batch: int = 2, seq: int = 9, seed: int = 3) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 120, size=(batch, seq)).astype(np.int64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_targets_equal_separate_passes(family):
    _, path = tiny_model(family)
    ex = Explainer(path)
    ids = _ids()
    pos = np.array([[8, 5, 2], [7, 8, 4]])
    tgt = np.array([[3, 17, 40], [99, 3, 64]])
    res = ex.explain({"input_ids": ids}, target=tgt, position=pos)
    assert res.relevance["input_ids"].shape == (2, 3, 9)
    for j in range(3):
        one = ex.explain({"input_ids": ids}, target=tgt[:, j], position=pos[:, j])
        np.testing.assert_allclose(res.relevance["input_ids"][:, j], one.relevance["input_ids"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.score[:, j], one.score, rtol=1e-6)


def test_batched_classes_equal_separate_passes_bert():
    _, path = tiny_model("bert")
    ex = Explainer(path)
    ids = _ids()
    tgt = np.array([[0, 1, 2], [2, 0, 1]])
    res = ex.explain({"input_ids": ids}, target=tgt)
    for j in range(3):
        one = ex.explain({"input_ids": ids}, target=tgt[:, j])
        np.testing.assert_allclose(res.relevance["input_ids"][:, j], one.relevance["input_ids"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("live_rows", [[], [3], [0, 5, 11], list(range(12))])
def test_row_sparse_matmul_equals_dense(live_rows):
    rng = np.random.RandomState(0)
    W = rng.randn(7, 5).astype(np.float32)
    g = np.zeros((2, 6, 7), dtype=np.float32)  # 12 rows
    flat = g.reshape(-1, 7)
    for r in live_rows:
        flat[r] = rng.randn(7)
    out = matmul_const(np, g, W)
    ref = np.einsum("bsk,kn->bsn", g.astype(np.float64), W.astype(np.float64))
    assert out.shape == (2, 6, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # a transposed view of a weight is used in place
    np.testing.assert_allclose(matmul_const(np, g, W.T.T), ref, rtol=1e-5, atol=1e-6)


def test_captured_views_stay_valid_across_runs():
    """Outputs are views of onnxruntime memory: a second run must not overwrite the first result."""
    _, path = tiny_model("llama")
    ex = Explainer(path)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, b = _ids(seed=4), _ids(seed=5)
    ra = ex.explain({"input_ids": a})
    ex.explain({"input_ids": b})
    feeds = ex.prepare_inputs({"input_ids": a})
    ref = plain.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in plain.get_inputs()}})[0]
    np.testing.assert_allclose(ra.outputs["logits"], ref, rtol=1e-5, atol=1e-5)


def test_release_plan_keeps_sources_and_collected():
    _, path = tiny_model("llama")
    ex = Explainer(path)
    mlp = next(n.outputs[0] for n in ex.graph.nodes if n.name.endswith("layers.0/mlp/down_proj/MatMul"))
    res = ex.explain({"input_ids": _ids()}, collect=[mlp])
    plan = ex._plans[(ex.default_output, (mlp,), "capture")]
    released = {n for names in plan.release for n in names}
    assert released, "nothing is released after its last use"
    assert not released & (plan.keep | set(ex.graph.output_names))
    assert released <= plan.values | set(plan.recompute)  # recomputed masks are released too
    # the latent relevance of the collected tensor is the input relevance plus what bypasses it (residual):
    # it must be finite and non-zero, i.e. still available at the end of the pass
    assert np.isfinite(res.latent[mlp]).all() and np.abs(res.latent[mlp]).sum() > 0


def test_env_names_a_tensor_it_does_not_have():
    env = Env(np, np.float32, 0, {"a": np.ones(2)}, {}, {})
    env.end_step(("a",))
    with pytest.raises(OnnxLrpError, match="'a' is not available"):
        env["a"]


def test_weights_held_once_and_user_proto_untouched():
    _, path = tiny_model("llama")
    ex = Explainer(path)
    cap = ex._capture
    assert cap.weight_names, "no weight is bound as an input"
    stubs = {t.name: t for t in ex.graph.model.graph.initializer if t.name in cap.weight_names}
    assert all(not t.raw_data and not t.float_data for t in stubs.values())
    sess_inputs = {i.name for i in cap.session.get_inputs()}
    assert set(cap.weight_names) <= sess_inputs
    for name in cap.weight_names:  # the rules and onnxruntime read the same array
        assert cap.weights[name] is ex.graph.constant(name) or np.shares_memory(cap.weights[name], ex.graph.constant(name))
    proto = onnx.load(str(path))
    before = proto.SerializeToString()
    r1 = Explainer(proto).explain({"input_ids": _ids()})
    assert proto.SerializeToString() == before
    r2 = ex.explain({"input_ids": _ids()})
    np.testing.assert_array_equal(r1.relevance["input_ids"], r2.relevance["input_ids"])


def test_softmax_guard_is_not_captured():
    _, path = tiny_model("llama")
    ex = Explainer(path)
    softmax = [n.outputs[0] for n in ex.graph.nodes if n.op_type == "Softmax"]
    isnan = [n.outputs[0] for n in ex.graph.nodes if n.op_type == "IsNaN"]
    assert softmax and isnan
    assert not (set(softmax) | set(isnan)) & ex._capture.exposed


def test_blas_threads_do_not_change_results():
    _, path = tiny_model("qwen2")
    ids = _ids()
    a = Explainer(path).explain({"input_ids": ids}).relevance["input_ids"]
    b = Explainer(path, blas_threads=None).explain({"input_ids": ids}).relevance["input_ids"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shapes_come_back_concatenated_and_right(family):
    """The capture returns the shapes asked for through two outputs (all shapes concatenated, and their ranks):
    each equals the shape of the tensor's value, for every tensor of every rank the graph computes."""
    _, path = tiny_model(family)
    ex = Explainer(path)
    feeds = ex.prepare_inputs({"input_ids": _ids(2, 7)})
    names = [o for n in ex.graph.nodes for o in n.outputs if o and ex._capture._needs_output(o)]
    ex._capture.prepare(set(names), set(names))
    values, shapes = ex._capture.run(feeds, names, names)
    assert set(shapes) == set(names)
    assert {len(s) for s in shapes.values()} >= {1, 2, 3, 4}  # ranks differ: the split must follow them
    for n in names:
        assert shapes[n] == tuple(values[n].shape), n
    assert len(ex._capture.session.get_outputs()) == len(set(ex.graph.output_names) | set(names)) + 2
