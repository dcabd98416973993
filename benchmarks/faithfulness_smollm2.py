"""Faithfulness benchmark: SmolLM2-135M next-token prediction on English Wikipedia sentences.

The paper's LLaMa-2 / Wikipedia setting, scaled to 2 CPU cores. Sentences come from gensim's test data (the
shortened English Wikipedia dump, CC BY-SA; ``gensim.test.utils.datapath``): per article, the first sentences
of 10-40 words from the lead text. Each sentence is cut to at most ``--max-tokens`` tokens, minus its last one;
the model's predicted next token (logit at the last position) is explained and every token may be removed.

Runs through the corpus runner (:mod:`onnx_lrp.dataset`): the sentences are written to ``OUT/sentences.jsonl``,
processed in shards (``--workers 0``: this process; ``N``: N Ray actors), each shard's per-sentence scores written
to ``OUT/shard-*.parquet`` as soon as it is done: a stopped run resumes where it was. The table is printed from
all shards at the end (``--summary``: from the shards written so far).

The ONNX export is expected at ``~/.cache/onnx-lrp/models/SmolLM2-135M-Instruct/onnx/model.onnx`` (tokenizer
files next to it).

    python benchmarks/faithfulness_smollm2.py [--samples 16] [--steps 10] [--ig-steps 8] [--out DIR] [--workers 0]
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import faithfulness_common as common  # noqa: E402
import numpy as np  # noqa: E402

from onnx_lrp.dataset import read_results, run  # noqa: E402
from onnx_lrp.jobs import TextJob  # noqa: E402
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


class FaithfulnessJob(TextJob):
    """Per shard: every method's attribution of each sentence's next-token logit, then MoRF/LeRF/ERASER scores;
    one row per sentence with ``{method}.{score}`` columns."""

    name = "faithfulness"

    def __init__(self, model: str, methods: list[str], steps: int, ig_steps: int, max_tokens: int, batch: int):
        super().__init__(model, on_error="fail")
        self.methods, self.steps, self.ig_steps, self.batch, self.cut = methods, steps, ig_steps, batch, max_tokens

    def config(self) -> dict:
        return {**super().config(), "methods": self.methods, "steps": self.steps, "ig_steps": self.ig_steps,
                "max_tokens": self.cut, "batch": self.batch}

    def prepare(self, rows):
        items = super().prepare(rows)
        for it in items:  # at most max_tokens + 1 tokens, minus the last: its prediction is explained
            it["ids"] = it["ids"][: self.cut + 1][:-1]
        return items

    def setup(self) -> None:
        self.ev = Evaluator(self.model, max_batch=16)  # also bounds the IG relevance pass (16 rows): memory

    def process(self, items):
        import pyarrow as pa

        pad = 0
        batches, perturbable, rows = [], [], []
        for k in range(0, len(items), self.batch):
            group = items[k : k + self.batch]
            ids, mask = common.pad_batch([it["ids"] for it in group], pad, left=True)  # position_ids from the mask
            batches.append({"input_ids": ids, "attention_mask": mask})
            perturbable.append(mask > 0)
            rows.append([it["row"] for it in group])
        cols = {"row": [it["row"] for it in items], "text": [it["text"] for it in items],
                "n_tokens": [len(it["ids"]) for it in items]}
        for method in self.methods:
            t0 = time.perf_counter()
            per = {k: [] for k in common.SCORES}
            for inputs, pert, rr in zip(batches, perturbable, rows):
                rel = self.ev.attribute(method, inputs, ig_steps=self.ig_steps, seed=rr[0])
                f = self.ev.evaluate(inputs, rel, steps=self.steps, perturbable=pert)
                for k in common.SCORES:
                    per[k].extend(np.asarray(getattr(f, k), dtype=float).tolist())
            self.ev.release()  # one method's explainer in memory at a time
            for k, v in per.items():
                cols[f"{method}.{k}"] = v
            cols[f"{method}.seconds"] = [(time.perf_counter() - t0) / len(items)] * len(items)
        return pa.Table.from_pydict(cols)


def results_from_shards(out: Path, methods: list[str]) -> tuple[dict, list[str]]:
    """The per-sentence scores of all shards written so far, in :func:`faithfulness_common.run`'s layout."""
    table = read_results(out).to_pydict()
    results = {m: {"per_input": {k: table[f"{m}.{k}"] for k in common.SCORES},
                   "attribute_and_perturb_s_per_input": float(np.mean(table[f"{m}.seconds"]))}
               for m in methods if f"{m}.faithfulness" in table}
    return results, table["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16, help="sentences (default 16)")
    ap.add_argument("--per-article", type=int, default=2, help="sentences per article (default 2: 200 sentences; "
                    "4 gives 393)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="perturbation steps K (default 10)")
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default=str(MODEL / "model.onnx"))
    ap.add_argument("--out", help="run folder (default benchmarks/results/faithfulness_smollm2-N)")
    ap.add_argument("--workers", type=int, default=0, help="Ray actors (default 0: this process)")
    ap.add_argument("--shard-size", type=int, default=24)
    ap.add_argument("--summary", action="store_true", help="only print the table of the shards written so far")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Path(a.model)
    if not model.exists():
        raise SystemExit(f"{model} not found (the SmolLM2 ONNX export)")
    methods = a.methods.split(",")
    sentences = wikipedia_sentences(per_article=a.per_article)[: a.samples]
    out = Path(a.out) if a.out else common.RESULTS / f"faithfulness_smollm2-{len(sentences)}"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sentences.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    t0 = time.perf_counter()
    if not a.summary:
        job = FaithfulnessJob(str(model), methods, a.steps, a.ig_steps, a.max_tokens, a.batch)
        run(job, data, out, shard_size=a.shard_size, workers=a.workers)
    results, texts = results_from_shards(out, methods)
    table = common.summary(results)
    print(f"\n{len(texts)} Wikipedia sentences (<= {a.max_tokens} tokens), next-token logit, K={a.steps} steps, "
          f"zero embedding; mean ± standard error (logit units; ERASER on probabilities); "
          f"{time.perf_counter() - t0:.0f}s\n")
    print(common.table_markdown(table))
    print("\npaired differences of faithfulness (row - column), mean [95% confidence interval]:\n")
    print(common.pairwise_markdown(results))
    payload = {"benchmark": "smollm2-wikipedia-next-token", "args": vars(a), "model": str(model),
               "sentences": texts, "summary": table, "results": results}
    print("wrote", common.write(out.name, payload))


if __name__ == "__main__":
    main()
