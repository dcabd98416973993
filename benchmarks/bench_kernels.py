"""Kernels of the relevance pass against the numpy forms they replaced, in one run on one machine.

- attention products ``alpha * (G B^T)`` and ``alpha * (A^T G)`` of one SmolLM2-shaped layer (9 heads, head size 64,
  ``--tokens`` query and key rows): numpy's batched matmul (BLAS on one thread, as in the relevance pass) against
  :class:`onnx_lrp._kernels.Gemm` (onnxruntime's ``FusedMatMul``) with 1 and 2 threads;
- the eps-LRP denominator ``stab(z)`` on a ``(tokens, 1536)`` float32 array: the former
  ``z + eps * (2 (z >= 0) - 1)`` against :func:`onnx_lrp.rules.stabilise` (bit-identical results checked).

Medians of ``--repeats`` interleaved runs, in ms, and the ratios numpy / ours.

    python benchmarks/bench_kernels.py --tokens 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnx_lrp._engine import blas_threads  # noqa: E402
from onnx_lrp._kernels import Gemm  # noqa: E402
from onnx_lrp.rules import stabilise  # noqa: E402


def _median_ms(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    t, rng = args.tokens, np.random.default_rng(0)
    g = rng.standard_normal((1, 9, t, t), dtype=np.float32)
    b = rng.standard_normal((1, 9, 64, t), dtype=np.float32)  # G B^T (B = K^T, keys last): B read transposed
    a = rng.standard_normal((1, 9, t, 64), dtype=np.float32)  # A^T G: A read transposed
    gemm1, gemm2 = Gemm(1), Gemm(2)
    for k in (gemm1, gemm2):  # the results agree with numpy's
        np.testing.assert_allclose(k(g, b.swapaxes(-1, -2), 0.5), 0.5 * (g @ b.swapaxes(-1, -2)), rtol=1e-4, atol=1e-3)

    def numpy_products():
        with blas_threads(np, 1):
            (g @ b.swapaxes(-1, -2)) * 0.5
            (a.swapaxes(-1, -2) @ g) * 0.5

    def ours(k):
        return lambda: (k(g, b.swapaxes(-1, -2), 0.5), k(a.swapaxes(-1, -2), g, 0.5))

    m = _median_ms({"numpy": numpy_products, "ours, 1 thread": ours(gemm1), "ours, 2 threads": ours(gemm2)},
                   args.repeats)
    print(f"attention products, 9 heads x {t} x {t} x 64 (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    print(f"  numpy / ours: {m['numpy'] / m['ours, 1 thread']:.2f}x (1 thread), "
          f"{m['numpy'] / m['ours, 2 threads']:.2f}x (2 threads)")

    z = rng.standard_normal((t, 1536), dtype=np.float32)
    z[0, :4] = [0.0, -0.0, 1e-12, -1e-12]
    eps = 1e-10

    def former():
        return z + (eps * (2 * (z >= 0) - 1)).astype(z.dtype)

    assert np.array_equal(former(), stabilise(z, eps))
    m = _median_ms({"former": former, "stabilise": lambda: stabilise(z, eps)}, args.repeats)
    print(f"stab(z), {t} x 1536 float32 (ms): former {m['former']:.2f}, stabilise {m['stabilise']:.2f}; "
          f"former / stabilise: {m['former'] / m['stabilise']:.2f}x")


if __name__ == "__main__":
    main()
