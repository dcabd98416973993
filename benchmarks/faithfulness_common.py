"""Shared driver of the faithfulness benchmarks: attribute with every method, perturb, tabulate, write JSON."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnx_lrp.evaluate import METHODS, Evaluator  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCORES = ("faithfulness", "area_morf", "area_lerf", "comprehensiveness", "sufficiency")


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id lists (on the right, or the left) into (ids, attention_mask)."""
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), S), dtype=np.int64)
    for i, r in enumerate(rows):
        cols = slice(S - len(r), S) if left else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def run(ev: Evaluator, batches: list[dict], perturbable: list[np.ndarray], methods: Sequence[str], steps: int,
        ig_steps: int, seed: int = 0, log: Any = print) -> dict:
    """Per method: per-input scores (lists) over all batches, and seconds spent attributing / perturbing."""
    out: dict[str, dict] = {}
    for method in methods:
        per = {k: [] for k in SCORES}
        t_attr = t_eval = 0.0
        for i, (inputs, pert) in enumerate(zip(batches, perturbable)):
            t0 = time.perf_counter()
            rel = ev.attribute(method, inputs, ig_steps=ig_steps, seed=seed + i)
            t1 = time.perf_counter()
            f = ev.evaluate(inputs, rel, steps=steps, perturbable=pert)
            t_eval += time.perf_counter() - t1
            t_attr += t1 - t0
            for k in SCORES:
                per[k].extend(np.asarray(getattr(f, k), dtype=float).tolist())
        ev.release()  # large models: one method's explainer in memory at a time
        out[method] = {"per_input": per, "attribute_s": round(t_attr, 1), "perturb_s": round(t_eval, 1)}
        log(f"  {method:22s} faithfulness {fmt(per['faithfulness'])}  ({t_attr:.0f}s attribute, {t_eval:.0f}s perturb)")
    return out


def fmt(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else float("nan")
    return f"{v.mean():+.3f} +- {se:.3f}"


def _mean_se(vals: Sequence[float]) -> dict:
    v = np.asarray(vals, dtype=float)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None}


def summary(results: dict, reference: str = "attnlrp") -> dict:
    """Mean and standard error of each score per method, and the paired faithfulness difference to
    ``reference`` (same inputs, so the spread between inputs cancels)."""
    table = {}
    ref = results.get(reference, {}).get("per_input", {}).get("faithfulness")
    for method, r in results.items():
        row = {k: _mean_se(vals) for k, vals in r["per_input"].items()}
        if ref is not None:
            row["faithfulness_minus_" + reference] = _mean_se(
                np.asarray(r["per_input"]["faithfulness"]) - np.asarray(ref))
        table[method] = row
    return table


def table_markdown(table: dict) -> str:
    """Markdown table, methods sorted by faithfulness (best first)."""
    paired = next((k for k in next(iter(table.values())) if k.startswith("faithfulness_minus_")), None)
    keys = list(SCORES) + ([paired] if paired else [])
    head = "| method | faithfulness A(LeRF)-A(MoRF) | A(MoRF) | A(LeRF) | comprehensiveness | sufficiency |"
    head += f" paired faithfulness - {paired[len('faithfulness_minus_'):]} |" if paired else ""
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for method, row in sorted(table.items(), key=lambda kv: -kv[1]["faithfulness"]["mean"]):
        cells = [f"{row[k]['mean']:+.3f} ± {row[k]['se']:.3f}" for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairwise_markdown(results: dict, z: float = 1.96) -> str:
    """Paired differences of per-input faithfulness between every two methods: mean and the normal-approximation
    confidence interval ``mean ± z * se`` (95% for z = 1.96); a row method is ahead of a column method where the
    interval lies above 0. Methods sorted by mean faithfulness."""
    f = {m: np.asarray(r["per_input"]["faithfulness"], dtype=float) for m, r in results.items()}
    order = sorted(f, key=lambda m: -f[m].mean())
    lines = ["| | " + " | ".join(order) + " |", "|" + "---|" * (len(order) + 1)]
    for a in order:
        cells = []
        for b in order:
            if a == b:
                cells.append("")
                continue
            d = f[a] - f[b]
            se = d.std(ddof=1) / np.sqrt(d.size)
            cells.append(f"{d.mean():+.3f} [{d.mean() - z * se:+.3f}, {d.mean() + z * se:+.3f}]")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine={"platform": platform.platform(), "cpus": os.cpu_count()},
                   methods_available=list(METHODS))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def merge(paths: Sequence[str]) -> dict:
    """The per-input results of several runs over disjoint inputs, concatenated per method and score."""
    runs = [json.loads(Path(p).read_text())["results"] for p in paths]
    methods = [m for m in runs[0] if all(m in r for r in runs)]
    return {m: {"per_input": {k: [v for r in runs for v in r[m]["per_input"][k]] for k in SCORES}} for m in methods}


if __name__ == "__main__":  # python benchmarks/faithfulness_common.py results/A.json [results/B.json ...]
    from statistics import NormalDist

    merged = merge(sys.argv[1:])
    n = len(next(iter(merged.values()))["per_input"]["faithfulness"])
    pairs = len(merged) * (len(merged) - 1) // 2
    z_all = NormalDist().inv_cdf(1 - 0.025 / pairs)  # Bonferroni: all pairs' intervals hold together at 95%
    print(f"{', '.join(sys.argv[1:])}: {n} inputs\n\n{table_markdown(summary(merged))}\n\n"
          f"paired differences of faithfulness (row - column), mean [95% confidence interval]:\n\n"
          f"{pairwise_markdown(merged)}\n\nthe same, simultaneous 95% intervals over the {pairs} pairs "
          f"(Bonferroni, z = {z_all:.3f}):\n\n{pairwise_markdown(merged, z=z_all)}")
