"""Thread control and the relevance pass's matrix-product kernel.

- ``onnx_lrp._kernels.Gemm`` (onnxruntime's MLAS) equals numpy's product, for weights stored either way round,
  and for batched products of run-time tensors (transposed views, broadcast batch axes, the rule's scale);
- pre-packing (``Explainer(prepack=...)``, automatic by default) changes no relevance, and the first long input
  drops the packed copies;
- ``Explainer(threads=N)`` sets onnxruntime's intra-op threads and the kernels' threads, and the relevance does
  not depend on N; ``blas_threads`` still works, with a deprecation warning.
"""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lrp import Explainer
from onnx_lrp._kernels import Gemm, usable_cores

from _support import rel_err, tiny_model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_gemm_equals_numpy(dtype, transposed):
    rng = np.random.RandomState(0)
    a = rng.randn(70, 300).astype(dtype)
    w = rng.randn(200, 300).astype(dtype)  # a weight (out, in): the product reads it transposed
    b = w.T if transposed else np.ascontiguousarray(w.T)
    out = Gemm(2)(a, b)
    assert out.shape == (70, 200) and out.dtype == dtype
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4 if dtype == np.float32
                               else 1e-10, atol=1e-3 if dtype == np.float32 else 1e-10)


def test_prepacked_gemm_equals_numpy_and_unpack_drops_its_sessions():
    rng = np.random.RandomState(6)
    a, w = rng.randn(70, 300).astype(np.float32), rng.randn(200, 300).astype(np.float32)
    g = Gemm(1)
    g.prepack([w])
    np.testing.assert_allclose(g(a, w.T), a.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    assert [k for k in g._sessions if k[2] is not None] == [(np.dtype(np.float32), 1, w.ctypes.data)]
    g.unpack()
    assert not g._packable and all(k[2] is None for k in g._sessions)
    np.testing.assert_allclose(g(a, w.T), a.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)


def test_gemm_falls_back_to_numpy():
    rng = np.random.RandomState(1)
    g = Gemm(1)
    small = rng.randn(2, 3).astype(np.float32), rng.randn(3, 4).astype(np.float32)
    strided = rng.randn(64, 300).astype(np.float32), rng.randn(300, 400).astype(np.float32)[:, ::2]
    mixed = rng.randn(64, 300).astype(np.float32), rng.randn(300, 200)
    for a, b in (small, strided, mixed):
        np.testing.assert_allclose(g(a, b), a @ b, rtol=1e-5)
    assert not g._sessions  # none of them needed a session


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_batched_products_equal_numpy(trans_a, trans_b):
    """Attention-shaped products: operands given as ``swapaxes`` views are read in place, a batch axis of size 1
    broadcasts (grouped keys), ``alpha`` scales; float64 and mismatched shapes take numpy's path."""
    rng = np.random.RandomState(4)
    a = rng.randn(2, 3, 64, 48).astype(np.float32)
    b = rng.randn(1, 3, 48, 80).astype(np.float32)
    a_op = np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2) if trans_a else a
    b_op = np.ascontiguousarray(b.swapaxes(-1, -2)).swapaxes(-1, -2) if trans_b else b
    assert a_op.flags.c_contiguous != trans_a and b_op.flags.c_contiguous != trans_b
    g = Gemm(2)
    out = g(a_op, b_op, 0.5)
    ref = 0.5 * (a.astype(np.float64) @ b.astype(np.float64))
    assert out.shape == (2, 3, 64, 80) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert any(k[0] == "FusedMatMul" for k in g._sessions)  # ran on onnxruntime's kernel
    np.testing.assert_allclose(g(a.astype(np.float64), b.astype(np.float64), 0.5), ref, rtol=1e-12)
    w = rng.randn(80, 48).astype(np.float32)  # a 2-D operand against batch axes (read transposed)
    np.testing.assert_allclose(g(a, w.T), a.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="matmul"):
        g(a, rng.randn(1, 3, 49, 80).astype(np.float32))


@pytest.mark.parametrize("prepack", [None, True])
def test_prepacked_weights_change_no_relevance(prepack, monkeypatch):
    """Pre-packed weights (forward and relevance products) give the unpacked relevance; by default (None) they are
    used while they fit and dropped for good at the first long input, whose relevance is unchanged too."""
    import onnx_lrp.explainer as explainer_module

    _, path = tiny_model("llama")
    rng = np.random.RandomState(5)
    short, long_ = rng.randint(3, 120, size=(2, 9)), rng.randint(3, 120, size=(1, 40))
    monkeypatch.setattr(explainer_module, "SHORT_INPUT", 20)  # 40 tokens run the long path
    monkeypatch.setattr(explainer_module, "PREPACK_MIN_BYTES", 0)  # the tiny model's weights count as large
    plain = Explainer(path, prepack=False)
    packed = Explainer(path, prepack=prepack)
    assert not plain._capture.prepack and not plain._gemm._packable
    assert packed._capture.prepack and packed._gemm._packable
    assert packed._capture_long.prepack is (prepack is True)
    for ids in (short, long_, short):
        a = plain.explain({"input_ids": ids}).relevance["input_ids"]
        b = packed.explain({"input_ids": ids}).relevance["input_ids"]
        assert rel_err(b, a) <= 1e-5
    assert packed._capture.prepack is (prepack is True)  # automatic packing ended with the long input
    assert bool(packed._gemm._packable) is (prepack is True)


def test_session_options_shared_by_two_prepacking_explainers_are_refused():
    """Pre-packing registers the weights with the session options: a second Explainer on the same options object
    would read the first one's weights, so it is refused with a message naming the remedy."""
    from onnx_lrp._capture import default_session_options
    from onnx_lrp.errors import ConfigError

    _, path = tiny_model("llama")
    opts = default_session_options()
    Explainer(path, session_options=opts, prepack=True)
    with pytest.raises(ConfigError, match="session options of its own"):
        Explainer(path, session_options=opts, prepack=True)


def test_automatic_prepack_only_when_it_fits(monkeypatch):
    """Two more copies of the weights must fit in an eighth of the memory available, and the weights must be
    large enough to pay for the packed sessions; with the caller's session options (which pre-packing would
    change) nothing is packed automatically."""
    import onnx_lrp.explainer as explainer_module
    from onnx_lrp._capture import default_session_options

    _, path = tiny_model("llama")
    weights = sum(w.nbytes for w in Explainer(path, prepack=False)._capture.weights.values())
    assert weights < explainer_module.PREPACK_MIN_BYTES and not Explainer(path)._auto_packed  # tiny: not worth it
    monkeypatch.setattr(explainer_module, "PREPACK_MIN_BYTES", weights)
    monkeypatch.setattr(explainer_module, "available_bytes", lambda: 16 * weights - 8)
    assert not Explainer(path)._auto_packed
    monkeypatch.setattr(explainer_module, "available_bytes", lambda: 16 * weights)
    assert Explainer(path)._auto_packed
    assert not Explainer(path, session_options=default_session_options())._auto_packed
    monkeypatch.setattr(explainer_module, "available_bytes", lambda: None)
    assert not Explainer(path)._auto_packed


def test_threads_set_both_passes_and_do_not_change_results():
    _, path = tiny_model("qwen2")
    ids = np.random.RandomState(3).randint(3, 120, size=(2, 9))
    one, two = Explainer(path, threads=1), Explainer(path, threads=2)
    assert one._capture.session_options.intra_op_num_threads == 1
    assert two._capture.session_options.intra_op_num_threads == 2 and two._gemm.threads == 2
    assert Explainer(path).threads == usable_cores()
    a = one.explain({"input_ids": ids}).relevance["input_ids"]
    b = two.explain({"input_ids": ids}).relevance["input_ids"]
    assert rel_err(b, a) <= 1e-6


def test_threads_argument_checked_and_blas_threads_deprecated():
    _, path = tiny_model("qwen2")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="threads"):
            Explainer(path, threads=bad)
    with pytest.warns(DeprecationWarning, match="threads="):
        ex = Explainer(path, blas_threads=1)
    assert ex.blas_threads == 1
