"""Throughput of corpus runs (``onnx-lrp explain-dataset``): a plain loop of ``TextExplainer.explain`` vs the shard
runner in this process, on 1 Ray actor and on 2 Ray actors, on the same corpus and model.

Each configuration runs in its own process (fresh memory, fresh Ray), in the order given and then reversed
(``--repeats`` rounds), so that a change of load on the shared machine affects every configuration alike; the table
gives the median per configuration. ``wall`` counts everything from the start of the process's work (model load,
Ray start-up, actors loading their model); ``rows/s`` is rows / wall. ``steady rows/s`` leaves the start-up out: the
loop's rows over its time after the model load; a runner's rows after its first shard over the time from the first
shard file written to the last (file modification times).

    python benchmarks/bench_dataset.py [--rows 64] [--configs loop,here,ray1,ray2] [--repeats 2] [--batch-size 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = ("loop", "here", "ray1", "ray2")
SHARD = 8  # rows per shard


def one(config: str, model: str, data: Path, batch_size: int, out: Path) -> dict:
    """Run one configuration in this process (results to ``out``); returns its timings."""
    import numpy as np

    from onnx_lrp.dataset import read_rows, run
    from onnx_lrp.jobs import ExplainJob

    t0 = time.perf_counter()
    rows = [r.fields["text"] for r in read_rows(data)]
    if config == "loop":
        from onnx_lrp._capture import default_session_options
        from onnx_lrp.text import TextExplainer

        opts = default_session_options()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1  # as each actor runs
        tx = TextExplainer(model, session_options=opts)
        loaded = time.perf_counter()
        rel = [tx.explain(text).relevance for text in rows]
        wall = time.perf_counter() - t0
        np.savez(out / "loop.npz", *rel)
        return {"config": config, "rows": len(rows), "wall_s": wall, "load_s": loaded - t0,
                "steady_rows_s": len(rows) / (wall - (loaded - t0))}
    workers = {"here": 0, "ray1": 1, "ray2": 2}[config]
    shutil.rmtree(out / config, ignore_errors=True)
    run(ExplainJob(model, batch_size=batch_size), data, out / config, shard_size=SHARD, workers=workers,
        progress=False)
    wall = time.perf_counter() - t0
    # steady state: the rows of all but the first shard over the time from the first shard written to the last
    written = sorted(f.stat().st_mtime for f in (out / config).glob("shard-*.parquet"))
    steady = (len(rows) - SHARD) / (written[-1] - written[0]) if len(written) > 2 else float("nan")
    return {"config": config, "rows": len(rows), "wall_s": wall, "steady_rows_s": steady}


def max_difference(out: Path, config: str) -> tuple[float, bool]:
    """max over rows of max |R - R_loop| / max |R_loop|, and whether every row is bit-identical to the loop's."""
    import numpy as np

    from onnx_lrp.dataset import read_results

    loop = np.load(out / "loop.npz")
    got = read_results(out / config).column("relevance").to_pylist()
    refs = [loop[f"arr_{k}"] for k in range(len(got))]
    err = max(float(np.abs(np.asarray(g) - r).max() / np.abs(r).max()) for g, r in zip(got, refs))
    return err, all(np.array_equal(np.asarray(g, np.float32), r) for g, r in zip(got, refs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--model", default=str(Path(os.environ.get("ONNX_LRP_CACHE", Path.home() / ".cache" / "onnx-lrp"))
                                           / "models" / "SmolLM2-135M-Instruct" / "onnx" / "model.onnx"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("@@" + json.dumps(one(a.one, a.model, Path(a.data), a.batch_size, Path(a.data).parent)))
        return
    from faithfulness_smollm2 import wikipedia_sentences

    configs = a.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        sents = wikipedia_sentences(per_article=4)[: a.rows]
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sents))
        results: dict[str, list[dict]] = {c: [] for c in configs}
        for rep in range(a.repeats):
            for c in (configs if rep % 2 == 0 else configs[::-1]):
                done = subprocess.run([sys.executable, __file__, "--one", c, "--data", str(data), "--model", a.model,
                                       "--batch-size", str(a.batch_size)], capture_output=True, text=True,
                                      env={**os.environ, "ONNX_LRP_QUIET": "1"})
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("@@")), None)
                if line is None:
                    raise SystemExit(f"{c} failed:\n{done.stderr[-3000:]}")
                r = json.loads(line[2:])
                results[c].append(r)
                print(f"  round {rep}: {c:5s} {r['wall_s']:.1f} s", flush=True)
        base = statistics.median(r["wall_s"] for r in results[configs[0]])
        print(f"\n{a.rows} Wikipedia sentences, {Path(a.model).parent.parent.name}, batch size {a.batch_size}, "
              f"os.cpu_count() = {os.cpu_count()}, load average at the end {os.getloadavg()[0]:.1f}; median of "
              f"{a.repeats}\n")
        print(f"| configuration | wall s (incl. start-up) | rows/s | speed vs {configs[0]} | steady rows/s | "
              f"steady speed vs {configs[0]} |")
        print("|---|---|---|---|---|---|")
        names = {"loop": "plain loop of TextExplainer.explain", "here": "runner, this process (--workers 0)",
                 "ray1": "runner, 1 Ray actor", "ray2": "runner, 2 Ray actors"}
        steady0 = statistics.median(r["steady_rows_s"] for r in results[configs[0]])
        for c in configs:
            w = statistics.median(r["wall_s"] for r in results[c])
            st = statistics.median(r["steady_rows_s"] for r in results[c])
            print(f"| {names[c]} | {w:.1f} | {a.rows / w:.2f} | {base / w:.2f}x | {st:.2f} | {st / steady0:.2f}x |")
        if "loop" in results:
            print(f"\nmodel load (loop): {statistics.median(r['load_s'] for r in results['loop']):.1f} s")
            for c in configs:
                if c != "loop":
                    err, same = max_difference(data.parent, c)
                    print(f"{c}: relevance vs the loop: max relative difference {err:.1e}, bit-identical: {same}")


if __name__ == "__main__":
    main()
