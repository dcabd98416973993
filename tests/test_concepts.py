"""Reference samples over a corpus (onnx_lrp.concepts): the running top-k of a sharded Ray run equals a brute-force
top-k over every sample; merging is order-free; the atlas page renders and searches in headless chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnx_lrp.concepts import KINDS, ConceptsJob, TopK, read_concepts
from onnx_lrp.dataset import run
from onnx_lrp.latent import LatentExplainer
from onnx_lrp.text import TextExplainer

from _corpus import texts

LAYERS = ["mlp:1", "head:0", "resid:1"]
K, WINDOW = 4, 2


@pytest.fixture(scope="module")
def concepts_run(ray_session, text_model, tmp_path_factory):
    rows = texts(23, seed=7)
    rows[5] = ""  # a row that encodes to no tokens: reported, skipped
    d = tmp_path_factory.mktemp("concepts")
    data = d / "rows.txt"
    data.write_text("\n".join(rows) + "\n")
    job = ConceptsJob(text_model, LAYERS, top_k=K, window=WINDOW)
    summary = run(job, data, d / "out", shard_size=6, workers=2, progress=False)
    return d / "out", rows, summary


def _brute_force(text_model, rows):
    """Every sample alone; per unit all (score, row, position, window) candidates, sorted by score, row; and per
    selector the sum of the RelMax scores over all samples."""
    tx = TextExplainer(text_model)
    lat = LatentExplainer(tx.explainer)
    cand, sums = {}, {}
    for row, t in enumerate(rows):
        if not t:
            continue
        ids = tx.tokenizer.encode(t)
        arr = np.asarray([ids])
        res = lat.explain({"input_ids": arr, "attention_mask": np.ones_like(arr)}, LAYERS)
        for sel in LAYERS:
            a, r = res.activations[sel][0], res.relevance[sel][0]
            sums[sel] = sums.get(sel, 0) + r.sum(0).astype(np.float64)
            for kind, score, pos, vals in (("act", a.max(0), a.argmax(0), a), ("rel", r.sum(0), r.argmax(0), r)):
                for u in range(a.shape[1]):
                    start = int(np.clip(pos[u] - WINDOW, 0, max(len(ids) - 2 * WINDOW - 1, 0)))
                    win = list(range(start, min(start + 2 * WINDOW + 1, len(ids))))
                    cand.setdefault((sel, kind, u), []).append(
                        (float(score[u]), row, int(pos[u]), [ids[p] for p in win], vals[win, u]))
    return {key: sorted(c, key=lambda x: (-x[0], x[1]))[:K] for key, c in cand.items()}, sums


def test_sharded_top_k_equals_brute_force(concepts_run, text_model):
    out, rows, summary = concepts_run
    assert summary.shards == 4 and summary.errors == 1
    c = read_concepts(out)
    assert c.samples == 22 and (c.k, c.window) == (K, WINDOW)
    ref, sums = _brute_force(text_model, rows)
    for (sel, kind, u), best in ref.items():
        t = c.tops[(sel, kind)]
        assert t.row[u].tolist() == [b[1] for b in best], (sel, kind, u)
        assert t.score[u].tolist() == [b[0] for b in best]  # the same numbers: each sample explained alone
        assert t.position[u].tolist() == [b[2] for b in best]
        for r, b in enumerate(best):
            n = len(b[3])
            assert t.ids[u, r, :n].tolist() == b[3] and (t.ids[u, r, n:] == -1).all()
            np.testing.assert_array_equal(t.values[u, r, :n], b[4].astype(np.float32))
    for sel in LAYERS:  # corpus relevance of a unit: the sum over samples of its RelMax score
        np.testing.assert_allclose(c.relevance_sum[sel], sums[sel], rtol=1e-9, atol=1e-12)
    assert np.isclose(c.activation_max["mlp:1"], [ref[("mlp:1", "act", u)][0][0] for u in range(64)]).all()


def test_merging_top_k_does_not_depend_on_order():
    rng = np.random.RandomState(0)
    parts = []
    for s in range(5):
        t = TopK.empty(6, 3, 1)
        for row in range(s * 4, s * 4 + 4):
            vals = rng.randint(0, 3, size=(5, 6)).astype(np.float32)  # many ties
            t = t.add(vals.max(0), row, vals.argmax(0), list(range(5)), vals, 1)
        parts.append(t)
    a = parts[0]
    for p in parts[1:]:
        a = a.merge(p)
    b = parts[-1]
    for p in reversed(parts[:-1]):
        b = p.merge(b)
    for f in ("score", "row", "position", "start", "ids", "values"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def _dom(page: Path, query: str = "") -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is needed for the atlas test (apt-get install -y chromium; .ci/run installs it)"
    url = page.resolve().as_uri() + (f"#q={query}" if query else "")
    done = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("<script>")[0]  # the rendered document, without the page's own code


def test_atlas_renders_and_searches_in_chromium(concepts_run):
    out, _, _ = concepts_run
    c = read_concepts(out)
    page = out / "atlas.html"
    dom = _dom(page)
    n_units = sum(v.size for v in c.relevance_sum.values())
    assert f"{n_units} of {n_units} units match (22 samples)" in dom
    assert len(re.findall(r'<div class="unit" data-id="[^"]+">', dom)) == 40  # the first page of cards
    assert re.search(r'id="errors"[^>]*>1 row\(s\) skipped: row 5: ', dom)
    # search by token text: the units whose reference samples contain it, as counted from the parquet
    query = "t17"
    want = 0
    for sel in c.relevance_sum:
        for u in range(c.relevance_sum[sel].size):
            if any(17 in c.tops[(sel, k)].ids[u].ravel().tolist() for k in KINDS):
                want += 1
    assert 0 < want < n_units
    dom = _dom(page, query)
    assert f"{want} of {n_units} units match" in dom
    cards = re.findall(r'<div class="unit" data-id="([^"]+)">(.*?)</div></div></div>', dom, flags=re.S)
    assert cards and all(">t17<" in body for _, body in cards)
