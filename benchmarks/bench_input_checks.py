"""What the input checks cost: ``Explainer.prepare_inputs`` (every check of docs/errors.md, the derived-index
session included) against a whole ``explain``, interleaved in one run (medians).

    python benchmarks/bench_input_checks.py [--seq 128] [--repeats 7]

Models: SmolLM2-135M-Instruct (``onnx_lrp.exporters.smollm2``, cached) and all-MiniLM-L6-v2 (``minilm``; BERT: its
position buffer is sliced by the sequence length, so the derived-index session runs on every call).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from onnx_lrp import Explainer
from onnx_lrp.exporters import minilm, smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    for name, path, vocab in (("SmolLM2-135M", smollm2(), 49152), ("all-MiniLM-L6-v2", minilm(), 30522)):
        ex = Explainer(path)
        ids = np.random.RandomState(0).randint(1000, vocab - 1, size=(1, a.seq))
        inputs = {"input_ids": ids}
        ex.explain(inputs)  # plans and sessions built
        checks, explains = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            ex.prepare_inputs(inputs)
            checks.append(time.perf_counter() - t)
            t = time.perf_counter()
            ex.explain(inputs)
            explains.append(time.perf_counter() - t)
        c, e = statistics.median(checks), statistics.median(explains)
        print(f"{name} ({a.seq} tokens, {len(ex._checks.derived)} derived-index checks): prepare_inputs "
              f"{c * 1e3:.2f} ms, explain {e * 1e3:.0f} ms, ratio {c / e:.5f}")


if __name__ == "__main__":
    main()
