"""Print the measured table of docs/frameworks.md (runs the exports once, cached like the tests):

    PYTHONPATH=$PWD .venv/bin/python tests/frameworks/table.py
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


if __name__ == "__main__":
    main()
