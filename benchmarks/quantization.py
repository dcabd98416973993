"""What quantisation does to explanations: token relevance of int8 models against their fp32 originals.

Models: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (``benchmarks/finetune_minilm.py``; the sentiment logit of
the fp32 prediction is explained on held-out review sentences), and SmolLM2-135M-Instruct (the fp32 model's next
token after the first words of Wikipedia sentences, as in ``faithfulness_smollm2.py``).
Quantised with onnxruntime.quantization (cached in ``~/.cache/onnx-lrp/models/quantized``):

- ``dynamic``: ``quantize_dynamic`` (int8 weights per channel, activations quantised at run time, uint8 per tensor);
- ``qdq``: ``quantize_static`` in QDQ format (int8 weights per channel and activations per tensor), calibrated on
  32 other sentences (for SmolLM2 only MatMul and Gather are quantised: quantising every op gives the masked
  attention scores an infinite scale, which onnx-lrp refuses);
- ``qdq-a16``: the same with 16-bit activations (isolates what the int8 weights alone do);
- ``qdq-w4``: int4 weights (MatMul only), int8 activations.

Per sentence (tokens other than special ones), each quantised model's relevance is compared with the fp32 model's:
Spearman rank correlation, overlap of the 3 most relevant tokens, sign agreement, ``max |R_q - R| / max |R|``; and
with the relevance of the fp32 model whose weights are the dequantised ones (activation quantisation off:
``act``), which separates what the activation rounding does from what the weights do. Explained with AttnLRP and,
for comparison, Gradient x Input; each sentence on its own (no padding: QDQ's calibrated attention mask ranges).

    python benchmarks/quantization.py [--models minilm,smollm2] [--samples 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))

import faithfulness_common as common  # noqa: E402
from _quantized_models import dequantised_reference, quantize  # noqa: E402
from onnx_lrp import Explainer  # noqa: E402

CACHE = Path(os.environ.get("ONNX_LRP_CACHE", Path.home() / ".cache" / "onnx-lrp")) / "models" / "quantized"
VARIANTS = ("dynamic", "qdq", "qdq-a16", "qdq-w4")
COMPOSITES = ("attnlrp", "gradient-x-input")


def _options(variant: str, model: str) -> tuple[str, dict]:
    from onnxruntime.quantization import QuantType

    if variant == "dynamic":
        return "dynamic", dict(per_channel=True)
    kw: dict = dict(per_channel=True)
    if model == "smollm2":
        kw["op_types_to_quantize"] = ["MatMul", "Gather"]
    if variant == "qdq-a16":
        kw["activation_type"] = QuantType.QInt16
    if variant == "qdq-w4":
        kw.update(weight_type=QuantType.QInt4, op_types_to_quantize=["MatMul"])
    return "qdq", kw


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def compare(r: np.ndarray, q: np.ndarray, k: int = 3) -> dict:
    k = min(k, len(r))
    top = len(set(np.argsort(-r)[:k]) & set(np.argsort(-q)[:k])) / k
    return {"spearman": spearman(r, q), "top3": top, "sign": float((np.sign(r) == np.sign(q)).mean()),
            "rel": float(np.abs(q - r).max() / max(np.abs(r).max(), 1e-30))}


def minilm_inputs(n: int, n_calibration: int) -> tuple[Path, list[dict], list[dict], list]:
    from transformers import AutoTokenizer

    from finetune_minilm import ensure_model, rotten_tomatoes

    pt_dir, onnx_path, _ = ensure_model()
    tok = AutoTokenizer.from_pretrained(pt_dir)
    train, held = rotten_tomatoes()

    def feeds(s):
        ids = np.array([tok(s, truncation=True, max_length=64)["input_ids"]], np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    special = set(tok.all_special_ids)
    explained = [feeds(s) for s, _ in held[:n]]
    keep = [~np.isin(f["input_ids"][0], list(special)) for f in explained]
    return onnx_path, explained, [feeds(s) for s, _ in train[:n_calibration]], keep


def smollm2_inputs(n: int, n_calibration: int) -> tuple[Path, list[dict], list[dict], list]:
    from transformers import AutoTokenizer

    from faithfulness_smollm2 import MODEL, wikipedia_sentences

    tok = AutoTokenizer.from_pretrained(MODEL)
    sentences = wikipedia_sentences()

    def feeds(s):
        ids = np.array([tok(s)["input_ids"][:24][:-1]], np.int64)
        mask = np.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(ids.shape[1])[None]}

    explained = [feeds(s) for s in sentences[:n]]
    keep = [np.ones(f["input_ids"].shape[1], bool) for f in explained]
    return MODEL / "model.onnx", explained, [feeds(s) for s in sentences[n:n + n_calibration]], keep


def relevance(path, explained: list[dict], composite: str, targets=None) -> tuple[list, list]:
    """Per sentence: token relevance of ``targets[k]`` (default: the model's prediction) and the prediction."""
    ex = Explainer(path, composite=composite)
    rel, pred = [], []
    for k, f in enumerate(explained):
        res = ex.explain(f)
        pred.append(int(np.asarray(res.target).reshape(-1)[0]))
        if targets is not None and targets[k] != pred[-1]:
            res = ex.explain(f, target=targets[k])
        rel.append(np.asarray(res.relevance["input_ids"][0], np.float64))
    return rel, pred


def run_model(name: str, n: int, n_calibration: int, variants: list[str], log=print) -> dict:
    fp32, explained, calibration, keep = {"minilm": minilm_inputs, "smollm2": smollm2_inputs}[name](n, n_calibration)
    CACHE.mkdir(parents=True, exist_ok=True)
    out: dict = {"model": str(fp32), "sentences": len(explained), "calibration": len(calibration), "variants": {}}
    base = {c: relevance(fp32, explained, c) for c in COMPOSITES}
    targets = base["attnlrp"][1]
    for variant in variants:
        t0 = time.perf_counter()
        mode, kw = _options(variant, name)
        qpath = quantize(fp32, CACHE / f"{name}-{variant}.onnx", mode, calibration, **kw)
        deq_path = CACHE / f"{name}-{variant}-dequantised.onnx"
        if not deq_path.exists():
            onnx.save(dequantised_reference(onnx.load(fp32), onnx.load(qpath)), deq_path)
        row: dict = {}
        deq, _ = relevance(deq_path, explained, "attnlrp", targets)
        for composite in COMPOSITES:
            q_same, q_tgt = relevance(qpath, explained, composite, targets)
            per = [compare(r[m], s[m]) for r, s, m in zip(base[composite][0], q_same, keep)]
            row[composite] = {key: [p[key] for p in per] for key in per[0]}
            row[composite]["same_prediction"] = float(np.mean(np.equal(q_tgt, targets)))
            if composite == "attnlrp":
                row[composite]["act"] = [compare(d[m], s[m])["rel"] for d, s, m in zip(deq, q_same, keep)]
        out["variants"][variant] = row
        log(f"{name} {variant}: {time.perf_counter() - t0:.0f}s")
    return out


def summary_rows(results: dict) -> list[str]:
    lines = ["| model | quantisation | rule | Spearman | top-3 overlap | sign agreement | max rel. diff (median) | "
             "activation rounding alone (median) | same prediction |", "|---" * 9 + "|"]
    for model, res in results.items():
        for variant, row in res["variants"].items():
            for composite, m in row.items():
                act = f"{np.median(m['act']):.1e}" if "act" in m else "-"
                lines.append(f"| {model} | {variant} | {composite} | {common.fmt(m['spearman'])} | "
                             f"{common.fmt(m['top3'])} | {common.fmt(m['sign'])} | {np.median(m['rel']):.1e} | {act} | "
                             f"{m['same_prediction']:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    results = {m: run_model(m, a.samples, a.calibration, a.variants.split(",")) for m in a.models.split(",")}
    print(f"\n{a.samples} sentences per model, {time.perf_counter() - t0:.0f}s; mean ± standard error\n")
    print("\n".join(summary_rows(results)))
    print("wrote", common.write("quantization-" + "-".join(results), {"args": vars(a), "results": results}))


if __name__ == "__main__":
    main()
