"""Print the measured tables of docs/frameworks.md and docs/third-party.md (exports cached like the tests):

    PYTHONPATH=$PWD .venv/bin/python tests/frameworks/table.py              # frameworks
    PYTHONPATH=$PWD .venv/bin/python tests/frameworks/table.py third-party  # shipped files
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_frameworks import CASES, compare  # noqa: E402


def main() -> None:
    print("| export | nodes | logits | Gradient x Input | AttnLRP | CP-LRP |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        cells = []
        for comp in ("gradient-x-input", "attnlrp", "cp-lrp"):
            try:
                cells.append(compare(case, comp))
            except Exception as e:  # a failing export or explainer is a row of the table too
                cells.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})
        if "error" in cells[0]:
            print(f"| {case} | | {cells[0]['error']} | | | |")
            continue
        vals = [f"{c['relevance']:.1e}" if "error" not in c else c["error"] for c in cells]
        print(f"| {case} | {cells[0]['nodes']} | {cells[0]['logits']:.1e} | " + " | ".join(vals) + " |", flush=True)


def third_party() -> None:
    import test_third_party as tp
    from onnx_lrp import Explainer

    print("| file | op types | Explainer(...) | AttnLRP sum R / logit | Gradient x Input sum R / logit |")
    print("|---|---|---|---|---|")
    for name in tp.FILES:
        path = tp.path(name)
        import onnx

        ops = len({n.op_type for n in onnx.load(str(path)).graph.node})
        try:
            Explainer(path)
            built = "builds"
        except Exception as e:
            built = f"{type(e).__name__}: {str(e).splitlines()[0].split(': ', 1)[-1][:90]}"
        ratios = []
        for comp in ("attnlrp", "gradient-x-input"):
            if built != "builds":
                ratios.append("")
                continue
            ratios.append(f"{_sum_ratio(tp, name, comp):.3g}")
        print(f"| {name} | {ops} | {built} | " + " | ".join(ratios) + " |", flush=True)


def _sum_ratio(tp, name: str, composite: str) -> float:
    """sum of input relevance / explained score: the OCR classifiers' logit before the softmax, ddddocr's time
    step 3 (time-major), the detector's text pixels (probability > 0.5), magika's top probability."""
    feeds = tp.FEEDS[name]()
    kw = {}
    if name in ("ocr-cls", "ocr-rec"):
        ex, out = tp.explainer(name, composite, logits=True)
        kw["output"] = out
    else:
        ex, out = tp.explainer(name, composite)
    if name == "ddddocr":
        kw["position"] = 3
    if name == "ocr-det":
        y = ex.forward(feeds, [out])[out]
        kw["output_relevance"] = tp.start_weights(name, y)
    res = ex.explain(feeds, **kw)
    r = next(iter(res.relevance.values()))
    return float(r.sum() / res.score[0])


if __name__ == "__main__":
    third_party() if sys.argv[1:] == ["third-party"] else main()
