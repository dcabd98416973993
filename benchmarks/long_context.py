"""Long inputs on SmolLM2: where the peak memory goes, and recompute == capture on the real model.

``phases``: one explanation at ``--tokens`` in this process, printing the resident memory (VmRSS) and its peak
(VmHWM, reset at each phase) after loading, after the forward capture (with the size of what it returns and its
largest tensors) and after the relevance pass, then the peak over all phases. ``--memory-budget`` and
``--no-arena`` (onnxruntime's CPU memory arena off) try the alternatives.

``agree``: the relevance of the recomputing plan (attention probabilities recomputed in blocks of query rows, the
default beyond :data:`onnx_lrp.explainer.SHORT_INPUT` elements) against the capturing plan (probabilities
captured), on the same input: max |recompute - capture| / max |capture|.

    nice python benchmarks/long_context.py phases --tokens 2048
    nice python benchmarks/long_context.py phases --tokens 4096 --memory-budget 5GB
    nice python benchmarks/long_context.py agree --tokens 1024
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx_lrp.explainer as explainer_module  # noqa: E402
from onnx_lrp import Explainer  # noqa: E402
from onnx_lrp._capture import default_session_options  # noqa: E402
from onnx_lrp.exporters.assets import smollm2  # noqa: E402


PEAKS: list[int] = []


def memory() -> str:
    d = {line.split(":")[0]: int(line.split()[1]) >> 10 for line in open("/proc/self/status")
         if line.startswith(("VmHWM", "VmRSS"))}
    PEAKS.append(d["VmHWM"])
    return f"resident {d['VmRSS']} MiB, peak {d['VmHWM']} MiB"


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def phases(ex: Explainer, ids: np.ndarray) -> None:
    print("loaded:", memory(), flush=True)
    cap, run_plan = ex._capture_long, explainer_module.run_plan
    capture_run = cap.run

    def run(*args, **kw):
        reset_peak()
        values, shapes = capture_run(*args, **kw)
        sizes = sorted(((v.nbytes >> 20, n) for n, v in values.items()), reverse=True)
        print(f"after the forward capture: {memory()}; returned {len(values)} tensors, "
              f"{sum(s for s, _ in sizes)} MiB, largest {sizes[:3]}", flush=True)
        reset_peak()
        return values, shapes

    def relevance(*args, **kw):
        out = run_plan(*args, **kw)
        print("after the relevance pass:", memory(), flush=True)
        return out

    cap.run, explainer_module.run_plan = run, relevance
    t = time.perf_counter()
    ex.explain({"input_ids": ids})
    dt = time.perf_counter() - t
    print(f"explain: {dt:.1f} s, plans {sorted({k[2] for k in ex._plans})}; {memory()}; "
          f"peak over the phases {max(PEAKS)} MiB", flush=True)


def agree(ex: Explainer, ids: np.ndarray) -> None:
    t = time.perf_counter()
    rec = ex.explain({"input_ids": ids})
    t_rec = time.perf_counter() - t
    explainer_module.SHORT_INPUT = ids.size  # the capturing plan for this input
    t = time.perf_counter()
    ref = ex.explain({"input_ids": ids}, target=rec.target, position=rec.position)
    t_ref = time.perf_counter() - t
    a, b = np.asarray(rec.relevance["input_ids"]), np.asarray(ref.relevance["input_ids"])
    print(f"{ids.shape[1]} tokens: max |recompute - capture| / max |capture| = "
          f"{np.abs(a - b).max() / np.abs(b).max():.2e} (recompute {t_rec:.1f} s, capture {t_ref:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("phases", "agree"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--no-arena", action="store_true")
    args = ap.parse_args()
    opts = None
    if args.no_arena:
        opts = default_session_options()
        opts.enable_cpu_mem_arena = False
        opts.intra_op_num_threads = args.threads or 0
    ex = Explainer(smollm2(), threads=args.threads, memory_budget=args.memory_budget, session_options=opts)
    ids = np.random.RandomState(0).randint(3, 49000, size=(1, args.tokens)).astype(np.int64)
    (phases if args.what == "phases" else agree)(ex, ids)


if __name__ == "__main__":
    main()
