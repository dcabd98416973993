"""Print which latent selectors (onnx_lrp.latent) each family of tests/_support.py FAMILIES offers, from its default
export (exported on demand: the first run takes long; later ones read the cache), and the notes on what is not
found. The table of docs/concepts.md.

    cd <repo> && PYTHONPATH=. python tests/latent_sweep.py [family ...]
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _support import FAMILIES, tiny_model  # noqa: E402
from _variants import mixtral_model, seq2seq_model  # noqa: E402

from onnx_lrp import Explainer  # noqa: E402
from onnx_lrp.latent import find_layers  # noqa: E402

SEQ2SEQ = {"t5", "bart", "marian", "mbart", "pegasus", "m2m_100", "blenderbot", "mt5", "longt5", "whisper"}


def paths(family: str) -> list[tuple[str, Path]]:
    if family == "mixtral":
        return [("", mixtral_model()[1])]
    if family in SEQ2SEQ:
        _, enc, dec = seq2seq_model(family)
        return [(" encoder", enc), (" decoder", dec)]
    return [("", tiny_model(family)[1])]


def main() -> None:
    warnings.filterwarnings("ignore")
    families = sys.argv[1:] or list(FAMILIES)
    full = 0
    print("| family | layers | resid | mlp | head | cross | notes |\n|---|---|---|---|---|---|---|")
    for fam in families:
        for part, path in paths(fam):
            try:
                ex = Explainer(path, allow_unsupported=True)
            except Exception as err:  # a graph the explainer refuses: shown, not hidden
                print(f"| {fam}{part} | error: {type(err).__name__} | | | | | |")
                continue
            layers = find_layers(ex.graph, ex.analysis)
            n = {k: sum(s.kind == k for s in layers.sites.values()) for k in ("resid", "mlp", "head", "cross")}
            full += n["resid"] == layers.n_layers + 1 and n["mlp"] == n["head"] == layers.n_layers > 0
            print(f"| {fam}{part} | {layers.n_layers} | {n['resid']} | {n['mlp']} | {n['head']} | {n['cross']} | "
                  f"{'; '.join(layers.notes)} |")
    print(f"\n{full} graphs with every site (resid 0..N, mlp and head for every layer)")


if __name__ == "__main__":
    main()
