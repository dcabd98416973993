"""Thread control and the relevance pass's matrix-product kernel.

- ``onnx_lrp._kernels.Gemm`` (onnxruntime's MLAS) equals numpy's product, for weights stored either way round;
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


def test_gemm_falls_back_to_numpy():
    rng = np.random.RandomState(1)
    g = Gemm(1)
    small = rng.randn(2, 3).astype(np.float32), rng.randn(3, 4).astype(np.float32)
    strided = rng.randn(64, 300).astype(np.float32), rng.randn(300, 400).astype(np.float32)[:, ::2]
    mixed = rng.randn(64, 300).astype(np.float32), rng.randn(300, 200)
    for a, b in (small, strided, mixed):
        np.testing.assert_allclose(g(a, b), a @ b, rtol=1e-5)
    assert not g._sessions  # none of them needed a session


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
