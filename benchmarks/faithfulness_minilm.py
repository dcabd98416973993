"""Faithfulness benchmark: MiniLM-L6 sentiment classifier on held-out Rotten Tomatoes sentences.

The paper's IMDB classification setting, scaled to 2 CPU cores: the classifier is fine-tuned by
``benchmarks/finetune_minilm.py`` (run first; cached). For each held-out sentence the predicted class logit is
explained by every method, then its word embeddings are zeroed in ``--steps`` steps (MoRF / LeRF; [CLS] and
[SEP] are never removed). ``--lxt`` repeats AttnLRP entirely in PyTorch with LXT (relevance and perturbation)
and compares the per-sentence faithfulness.

    python benchmarks/faithfulness_minilm.py [--samples 100] [--steps 10] [--ig-steps 16] [--lxt]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import faithfulness_common as common  # noqa: E402
from finetune_minilm import ensure_model, rotten_tomatoes  # noqa: E402
from onnx_lrp.evaluate import METHODS, Evaluator  # noqa: E402


def lxt_check(pt_dir: Path, batches: list[dict], perturbable: list[np.ndarray], steps: int) -> dict:
    """Per-sentence AttnLRP faithfulness computed with LXT + PyTorch (tests/_lxt_faithfulness.py)."""
    ids = [r.tolist() for b in batches for r in b["input_ids"]]
    mask = [r.tolist() for b in batches for r in b["attention_mask"]]
    pert = [r.tolist() for p in perturbable for r in p]
    req = {"family": "bert", "model_cls": "BertForSequenceClassification", "pt_dir": str(pt_dir),
           "composite": "attnlrp", "input_ids": ids, "attention_mask": mask, "perturbable": pert, "steps": steps,
           "threads": 2}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_lxt_faithfulness.py")], input=json.dumps(req),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"LXT worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100, help="held-out sentences (default 100)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="perturbation steps K (default 10)")
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lxt", action="store_true", help="cross-check AttnLRP against LXT in PyTorch")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    pt_dir, onnx_path, metrics = ensure_model()
    tok = AutoTokenizer.from_pretrained(pt_dir)
    _, held = rotten_tomatoes()
    held = held[: a.samples]
    ev = Evaluator(onnx_path, max_batch=64)
    batches, perturbable, labels = [], [], []
    for k in range(0, len(held), a.batch):
        rows = held[k : k + a.batch]
        enc = [tok(s, truncation=True, max_length=a.max_tokens)["input_ids"] for s, _ in rows]
        ids, mask = common.pad_batch(enc, tok.pad_token_id)
        special = np.isin(ids, tok.all_special_ids)
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        perturbable.append((mask > 0) & ~special)
        labels.extend(l for _, l in rows)
    preds = np.concatenate([ev.predict(b)[0] for b in batches])
    acc = float((preds == np.asarray(labels)).mean())
    print(f"MiniLM-L6 Rotten Tomatoes classifier: held-out accuracy {metrics['held_out_accuracy']:.3f} "
          f"(fine-tuned on {metrics['train_sentences']} sentences); on the {len(held)} evaluated: {acc:.3f}")
    t0 = time.perf_counter()
    results = common.run(ev, batches, perturbable, a.methods.split(","), a.steps, a.ig_steps)
    table = common.summary(results)
    print(f"\n{len(held)} sentences, K={a.steps} steps, zero embedding; mean ± standard error "
          f"(logit units; ERASER on probabilities); {time.perf_counter() - t0:.0f}s\n")
    print(common.table_markdown(table))
    payload = {"benchmark": "minilm-rotten-tomatoes", "args": vars(a), "model": str(onnx_path),
               "finetune": metrics, "accuracy_evaluated": acc, "summary": table, "results": results}
    print("wrote", common.write("faithfulness_minilm", payload))
    if a.lxt:
        ref = lxt_check(pt_dir, batches, perturbable, a.steps)
        ours = np.asarray(results["attnlrp"]["per_input"]["faithfulness"]) if "attnlrp" in results else None
        theirs = np.asarray(ref["faithfulness"])
        payload["lxt"] = {"faithfulness": theirs.tolist()}
        print(f"\nLXT (PyTorch) AttnLRP faithfulness: {common.fmt(theirs)}")
        if ours is not None:
            diff = np.abs(ours - theirs)
            payload["lxt"]["max_abs_diff"] = float(diff.max())
            print(f"ours (ONNX):                        {common.fmt(ours)}; max |ours - LXT| per sentence "
                  f"{diff.max():.2e}")
        print("wrote", common.write("faithfulness_minilm", payload))


if __name__ == "__main__":
    main()
