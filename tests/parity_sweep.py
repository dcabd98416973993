"""Print the LXT parity table of docs/parity-more.md: every case of tests/test_parity_more.py, and with
``--activations`` every transformers activation (``ACT2FN``) in BERT, Llama and GPT-2.

    cd <repo> && PYTHONPATH=. python tests/parity_sweep.py [--activations] [case ...]

Columns: max relative error of the token relevance against LXT, the same without each row's most relevant
token, the error of the explained score, and Gradient x Input's error against LXT (how far a wrong rule lands).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import test_parity_more as t  # noqa: E402

ACTIVATIONS = ["gelu_10", "gelu_fast", "gelu_python", "gelu_pytorch_tanh", "gelu_accurate", "laplace", "leaky_relu",
               "linear", "mish", "quick_gelu", "relu2", "relu6", "sigmoid", "silu", "tanh", "prelu"]


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    names = [a for a in argv if not a.startswith("--")] or list(t.CASES)
    if "--activations" in argv:
        names = []
        for fam in ("bert", "llama", "gpt2"):
            for act in ACTIVATIONS:
                key = "activation_function" if fam == "gpt2" else "hidden_act"
                t.CASES[f"{fam}-act-{act}"] = t.Case(fam, {key: act})
                names.append(f"{fam}-act-{act}")
    print("| case | rel. error | without top token | score | G×I vs LXT |\n|---|---|---|---|---|")
    for name in names:
        try:
            err, info = t.compare(name)
            gxi, _ = t.compare(name, "gradient-x-input")
            print(f"| `{name}` | {err:.2e} | {info['rest_err']:.2e} | {info['score_err']:.1e} | {gxi:.2e} |",
                  flush=True)
        except Exception as e:  # report and go on
            print(f"| `{name}` | {type(e).__name__}: {str(e)[:200]} | | | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
