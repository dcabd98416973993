"""Cost of latent relevance on SmolLM2-135M: a plain explanation vs the same with three layers' units collected
(``LatentExplainer.explain``) vs conditional heatmaps of k units (one batched pass of k targets), interleaved
repeats, medians, ratios to the plain explanation (the machine is shared: ratios measured in one run).

    python benchmarks/bench_latent.py [--repeats 5] [--units 16] [--text "..."]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_lrp.latent import LatentExplainer  # noqa: E402
from onnx_lrp.text import TextExplainer  # noqa: E402

MODEL = Path(os.environ.get("ONNX_LRP_CACHE", Path.home() / ".cache" / "onnx-lrp")) / "models" / \
    "SmolLM2-135M-Instruct" / "onnx" / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--text", default="Anarchism is a political philosophy that advocates self-governed societies "
                    "based on voluntary")
    ap.add_argument("--model", default=str(MODEL))
    a = ap.parse_args()
    tx = TextExplainer(a.model)
    lat = LatentExplainer(tx.explainer)
    feeds = tx._feeds(tx.encode(a.text))
    layers = ["mlp:18", "head:18", "resid:18"]
    cases = {
        "plain explain": lambda: tx.explainer.explain(feeds),
        "+ 3 layers collected": lambda: lat.explain(feeds, layers),
        f"conditional, {a.units} units of mlp:18": lambda: lat.conditional(feeds, "mlp:18", range(a.units),
                                                                            chunk=a.units),
    }
    for fn in cases.values():  # compile plans, build sessions
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain explain"])
    n = feeds["input_ids"].shape[1]
    print(f"\nSmolLM2-135M, {n} tokens, median of {a.repeats} interleaved repeats, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| case | seconds | vs plain explain |\n|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
