"""Faithfulness benchmark: SmolLM2-135M next-token prediction on English Wikipedia sentences.

The paper's LLaMa-2 / Wikipedia setting, scaled to 2 CPU cores. Sentences come from gensim's test data (the
shortened English Wikipedia dump, CC BY-SA; ``gensim.test.utils.datapath``): per article, the first sentences
of 10-40 words from the lead text. Each sentence is cut to at most ``--max-tokens`` tokens, minus its last one;
the model's predicted next token (logit at the last position) is explained and every token may be removed.

The ONNX export is expected at ``~/.cache/onnx-lrp/models/SmolLM2-135M-Instruct/onnx/model.onnx`` (tokenizer
files next to it).

    python benchmarks/faithfulness_smollm2.py [--samples 16] [--steps 10] [--ig-steps 8]
"""
from __future__ import annotations

import argparse
import bz2
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import faithfulness_common as common  # noqa: E402
from onnx_lrp.evaluate import METHODS, Evaluator  # noqa: E402

MODEL = Path(os.environ.get("ONNX_LRP_CACHE", Path.home() / ".cache" / "onnx-lrp")) / "models" / \
    "SmolLM2-135M-Instruct" / "onnx"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def wikipedia_sentences(per_article: int = 2, min_words: int = 10, max_words: int = 40) -> list[str]:
    """Plain-text sentences from the lead paragraphs of gensim's shortened English Wikipedia dump."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    for _, text, _ in extract_pages(bz2.BZ2File(path)):
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        plain = filter_wiki(text).replace("'''", "").replace("''", "")
        taken = 0
        for para in plain.split("\n"):
            para = para.strip()
            if not para or para[0] in "=*|{!#:;<" or para.startswith("Category"):
                continue
            for s in _SENTENCE_END.split(para):
                words = s.split()
                clean = re.fullmatch(r"[\w\s,.;:()'\"%$&-]+", s) and not re.search(r"\(\s*[,;)]|\s[,.;]", s)
                if min_words <= len(words) <= max_words and clean and s.endswith(".") and taken < per_article:
                    out.append(s)
                    taken += 1
            if taken >= per_article:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16, help="sentences (default 16)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many sentences (to extend a sample)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="perturbation steps K (default 10)")
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default=str(MODEL / "model.onnx"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    model = Path(a.model)
    if not model.exists():
        raise SystemExit(f"{model} not found (the SmolLM2 ONNX export)")
    tok = AutoTokenizer.from_pretrained(model.parent)
    sentences = wikipedia_sentences()[a.offset : a.offset + a.samples]
    t_load = time.perf_counter()
    ev = Evaluator(model, max_batch=16)  # also bounds the IG relevance pass (16 rows): memory
    print(f"loaded {model} in {time.perf_counter() - t_load:.0f}s")
    batches, perturbable = [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for k in range(0, len(sentences), a.batch):
        enc = [tok(s)["input_ids"][: a.max_tokens + 1][:-1] for s in sentences[k : k + a.batch]]
        ids, mask = common.pad_batch(enc, pad, left=True)  # position_ids follow from the mask
        batches.append({"input_ids": ids, "attention_mask": mask})
        perturbable.append(mask > 0)
    t0 = time.perf_counter()
    results = common.run(ev, batches, perturbable, a.methods.split(","), a.steps, a.ig_steps)
    table = common.summary(results)
    print(f"\n{len(sentences)} Wikipedia sentences (<= {a.max_tokens} tokens), next-token logit, K={a.steps} steps, "
          f"zero embedding; mean ± standard error (logit units; ERASER on probabilities); "
          f"{time.perf_counter() - t0:.0f}s\n")
    print(common.table_markdown(table))
    payload = {"benchmark": "smollm2-wikipedia-next-token", "args": vars(a), "model": str(model),
               "sentences": sentences, "summary": table, "results": results}
    print("wrote", common.write("faithfulness_smollm2" + (f"_from{a.offset}" if a.offset else ""), payload))


if __name__ == "__main__":
    main()
