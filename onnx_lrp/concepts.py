"""Reference samples of latent units over a corpus (the AttnLRP paper's Sec. 4.3, after CRP's ActMax / RelMax),
and a concept atlas page.

For every unit ``u`` of the chosen layers (selectors, :mod:`onnx_lrp.latent`) and every sample ``s`` of a corpus:

- **ActMax**: ``a_s(u) = max_p a_{s,p,u}``, the unit's largest activation over the sample's positions (heads: the L2
  norm of the head's output), at position ``argmax_p``;
- **RelMax**: ``R_s(u) = sum_p R_{s,p,u}``, the unit's relevance for the sample's own prediction (or a named
  target), highlighted at its most relevant position ``argmax_p R_{s,p,u}``.

Each unit keeps its ``k`` best samples by each score as a running top-k (:class:`TopK`: memory ``units x k``,
whatever the corpus size; ties broken by row then position, so shards merge to the same result in any order),
with a window of ``2 * window + 1`` tokens around the highlighted position and the unit's values on them. A corpus
run (:class:`ConceptsJob`, on Ray through :func:`onnx_lrp.dataset.run`) writes one top-k table per shard; the
shards are merged into ``concepts.parquet`` (the reference samples), ``units.parquet`` (per unit: corpus-wide
relevance, largest activation) and ``atlas.html``.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .dataset import shard_path
from .jobs import TextJob
from .errors import DatasetError

KINDS = ("act", "rel")  # ActMax, RelMax


@dataclass
class TopK:
    """Running top-k of one score per unit: ``score``, sample ``row`` and ``position`` ``(units, k)``; the window
    around the position: first position ``start`` ``(units, k)``, token ``ids`` and unit ``values``
    ``(units, k, 2 * window + 1)`` (ids -1 / values 0 outside the sample). Empty slots have ``row = -1``."""

    score: np.ndarray
    row: np.ndarray
    position: np.ndarray
    start: np.ndarray
    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, units: int, k: int, window: int) -> "TopK":
        w = 2 * window + 1
        return cls(np.full((units, k), -np.inf), np.full((units, k), -1, np.int64), np.zeros((units, k), np.int64),
                   np.zeros((units, k), np.int64), np.full((units, k, w), -1, np.int32),
                   np.zeros((units, k, w), np.float32))

    @property
    def k(self) -> int:
        return self.score.shape[1]

    def merge(self, other: "TopK") -> "TopK":
        """The best ``k`` of both, per unit: by score (descending), then row, then position (ascending)."""
        cat = [np.concatenate([getattr(self, f), getattr(other, f)], axis=1) for f in _FIELDS]
        score, row, pos = cat[0], cat[1], cat[2]
        filled = row >= 0
        # empty slots last; np.lexsort sorts by its last key first
        order = np.lexsort((pos, np.where(filled, row, np.iinfo(np.int64).max), -np.where(filled, score, -np.inf)),
                           axis=-1)[:, : self.k]
        return TopK(*[np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1) for a in cat])

    def add(self, score: np.ndarray, row: int, position: np.ndarray, ids: Sequence[int], values: np.ndarray,
            window: int) -> "TopK":
        """Merge one sample: ``score`` ``(units,)``, its highlighted ``position`` ``(units,)``, the sample's token
        ``ids`` and the unit values at every position ``values`` ``(positions, units)``."""
        U, P, w = score.shape[0], values.shape[0], 2 * window + 1
        start = np.clip(position - window, 0, max(P - w, 0))
        cols = start[:, None] + np.arange(w)[None, :]  # (U, w) positions of the window
        inside = cols < P
        colc = np.minimum(cols, P - 1)
        tokens = np.asarray(ids, dtype=np.int32)
        # positions are tokens when the site has one per token; else (a pooled site) no token window
        win_ids = np.where(inside, tokens[colc], -1) if tokens.size == P else np.full((U, w), -1, np.int32)
        win_vals = np.where(inside, values[colc, np.arange(U)[:, None]], 0).astype(np.float32)
        one = TopK(score.astype(np.float64)[:, None], np.full((U, 1), row, np.int64), position.astype(np.int64)[:, None],
                   start.astype(np.int64)[:, None], win_ids[:, None, :].astype(np.int32), win_vals[:, None, :])
        return self.merge(one)


_FIELDS = ("score", "row", "position", "start", "ids", "values")


@dataclass
class Concepts:
    """ActMax and RelMax top-k of every unit of some layers, and per-unit corpus statistics."""

    k: int
    window: int
    tops: dict[tuple[str, str], TopK] = field(default_factory=dict)  # (selector, kind) -> top-k
    relevance_sum: dict[str, np.ndarray] = field(default_factory=dict)  # selector -> (units,) sum_s R_s(u)
    relevance_abs: dict[str, np.ndarray] = field(default_factory=dict)  # selector -> sum_s |R_s(u)|
    activation_max: dict[str, np.ndarray] = field(default_factory=dict)  # selector -> max_s a_s(u)
    samples: int = 0

    def add(self, row: int, ids: Sequence[int], activations: dict[str, np.ndarray],
            relevance: dict[str, np.ndarray]) -> None:
        """One sample: per selector its ``(positions, units)`` activations and relevance."""
        for sel, a in activations.items():
            r = relevance[sel]
            U = a.shape[-1]
            if sel not in self.relevance_sum:
                for kind in KINDS:
                    self.tops[(sel, kind)] = TopK.empty(U, self.k, self.window)
                self.relevance_sum[sel], self.relevance_abs[sel] = np.zeros(U), np.zeros(U)
                self.activation_max[sel] = np.full(U, -np.inf)
            act_score, rel_score = a.max(0), r.sum(0)
            self.tops[(sel, "act")] = self.tops[(sel, "act")].add(act_score, row, a.argmax(0), ids, a, self.window)
            self.tops[(sel, "rel")] = self.tops[(sel, "rel")].add(rel_score, row, r.argmax(0), ids, r, self.window)
            self.relevance_sum[sel] += rel_score
            self.relevance_abs[sel] += np.abs(rel_score)
            self.activation_max[sel] = np.maximum(self.activation_max[sel], act_score)
        self.samples += 1

    def merge(self, other: "Concepts") -> None:
        for key, t in other.tops.items():
            self.tops[key] = self.tops[key].merge(t) if key in self.tops else t
        for sel in other.relevance_sum:
            if sel in self.relevance_sum:
                self.relevance_sum[sel] = self.relevance_sum[sel] + other.relevance_sum[sel]
                self.relevance_abs[sel] = self.relevance_abs[sel] + other.relevance_abs[sel]
                self.activation_max[sel] = np.maximum(self.activation_max[sel], other.activation_max[sel])
            else:
                self.relevance_sum[sel] = other.relevance_sum[sel]
                self.relevance_abs[sel] = other.relevance_abs[sel]
                self.activation_max[sel] = other.activation_max[sel]
        self.samples += other.samples

    # ------------------------------------------------------------------ tables
    def to_table(self) -> Any:
        """Long format, one row per (selector, kind, unit, rank) of a filled slot (``concepts.parquet``), plus
        one ``kind="units"`` row per unit with its statistics (``rank = -1``)."""
        import pyarrow as pa

        cols: dict[str, list] = {c: [] for c in ("selector", "kind", "unit", "rank", "score", "row", "position",
                                                 "start", "ids", "values")}
        for (sel, kind), t in self.tops.items():
            u, r = np.nonzero(t.row >= 0)
            cols["selector"] += [sel] * len(u)
            cols["kind"] += [kind] * len(u)
            cols["unit"] += u.tolist()
            cols["rank"] += r.tolist()
            for f in _FIELDS:
                vals = getattr(t, f)[u, r]
                cols[f] += vals.tolist() if vals.ndim == 1 else [v.tolist() for v in vals]
        for sel in self.relevance_sum:
            U = self.relevance_sum[sel].size
            cols["selector"] += [sel] * U
            cols["kind"] += ["units"] * U
            cols["unit"] += list(range(U))
            cols["rank"] += [-1] * U
            cols["score"] += self.relevance_sum[sel].tolist()  # sum of R_s(u)
            cols["row"] += [self.samples] * U
            cols["position"] += [0] * U
            cols["start"] += [0] * U
            cols["ids"] += [[]] * U
            cols["values"] += [[float(a), float(b)] for a, b in zip(self.relevance_abs[sel], self.activation_max[sel])]
        return pa.Table.from_pydict(cols, schema=concepts_schema())

    @classmethod
    def from_table(cls, table: Any, k: int, window: int) -> "Concepts":
        d = table.to_pydict()
        out = cls(k, window)
        sizes: dict[str, int] = {}
        for sel, kind, unit in zip(d["selector"], d["kind"], d["unit"]):
            sizes[sel] = max(sizes.get(sel, 0), unit + 1)
        for sel, U in sizes.items():
            for kind in KINDS:
                out.tops[(sel, kind)] = TopK.empty(U, k, window)
            out.relevance_sum[sel], out.relevance_abs[sel] = np.zeros(U), np.zeros(U)
            out.activation_max[sel] = np.full(U, -np.inf)
        for j, (sel, kind, u, r) in enumerate(zip(d["selector"], d["kind"], d["unit"], d["rank"])):
            if kind == "units":
                out.relevance_sum[sel][u] = d["score"][j]
                out.relevance_abs[sel][u], out.activation_max[sel][u] = d["values"][j]
                out.samples = d["row"][j]
                continue
            t = out.tops[(sel, kind)]
            for f in _FIELDS:
                getattr(t, f)[u, r] = d[f][j]
        return out


def concepts_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("selector", pa.string()), ("kind", pa.string()), ("unit", pa.int64()), ("rank", pa.int64()),
                      ("score", pa.float64()), ("row", pa.int64()), ("position", pa.int64()), ("start", pa.int64()),
                      ("ids", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])


# ---------------------------------------------------------------------------------------------- corpus job
class ConceptsJob(TextJob):
    """``concepts``: per shard the ActMax / RelMax top-k of every unit of ``layers`` (a :class:`Concepts` table;
    rows that fail are listed with ``kind="error"``); :meth:`finish` merges the shards into ``concepts.parquet``
    and writes ``atlas.html``."""

    name = "concepts"

    def __init__(self, model: str | os.PathLike, layers: Sequence[str], composite: str = "attnlrp", *,
                 target: int | str | None = None, top_k: int = 10, window: int = 8, atlas_units: int = 200, **kw: Any):
        super().__init__(model, composite, **kw)
        if not layers:
            raise ValueError("concepts: give the layers (selectors such as mlp:12)")
        self.layers, self.target, self.top_k, self.window = list(layers), target, top_k, window
        self.atlas_units = atlas_units

    def config(self) -> dict:
        return {**super().config(), "layers": self.layers, "target": self.target, "top_k": self.top_k,
                "window": self.window}

    def setup(self) -> None:
        super().setup()
        from .latent import LatentExplainer

        self.lat = LatentExplainer(self.tx.explainer)
        for sel in self.layers:
            self.lat.site(sel)
        self.tid = self.tx.resolve_target(self.target)

    def process(self, items: list[dict]) -> Any:
        import pyarrow as pa

        c = Concepts(self.top_k, self.window)

        def one(group: list[dict]) -> None:
            it = group[0]
            res = self.lat.explain(self.feeds([it["ids"]]), self.layers, self.tid, output=self.tx.output)
            c.add(it["row"], it["ids"], {s: a[0] for s, a in res.activations.items()},
                  {s: r[0] for s, r in res.relevance.items()})

        self.guarded(items, 1, one)
        table = c.to_table()
        bad = [it for it in items if it["error"]]
        if bad:
            errs = pa.Table.from_pydict({
                "selector": [""] * len(bad), "kind": ["error"] * len(bad), "unit": [-1] * len(bad),
                "rank": [-1] * len(bad), "score": [0.0] * len(bad), "row": [it["row"] for it in bad],
                "position": [0] * len(bad), "start": [0] * len(bad), "ids": [[]] * len(bad),
                "values": [[]] * len(bad)}, schema=concepts_schema())
            table = pa.concat_tables([table, errs])
        return table.append_column("error", pa.array([None] * (table.num_rows - len(bad)) +
                                                     [it["error"] for it in bad], pa.string()))

    def finish(self, out: Path, shards: int, data: str) -> None:
        """Merge the shard top-k tables (one at a time: memory of one shard plus the running top-k)."""
        import pyarrow.parquet as pq

        total = Concepts(self.top_k, self.window)
        errors: list[tuple[int, str]] = []
        for i in range(shards):
            t = pq.read_table(shard_path(out, i))
            kinds = t.column("kind").to_pylist()
            keep = [j for j, k in enumerate(kinds) if k != "error"]
            errors += [(t.column("row")[j].as_py(), t.column("error")[j].as_py()) for j, k in enumerate(kinds)
                       if k == "error"]
            total.merge(Concepts.from_table(t.take(keep).drop_columns(["error"]), self.top_k, self.window))
        pq.write_table(total.to_table(), str(out / "concepts.parquet"))
        if self._tok is None:
            from .text import Tokenizer

            self._tok = Tokenizer.from_folder(self.folder())
        name = "/".join(Path(self.model).parts[-3:])
        page = atlas_html(total, self._tok, title=f"concept atlas: {name}",
                          subtitle=f"{total.samples} samples of {Path(data).name}; {', '.join(self.layers)}; "
                          f"top {self.top_k} per unit; composite {self.composite}",
                          max_units=self.atlas_units, errors=errors)
        (out / "atlas.html").write_text(page, encoding="utf-8")


def read_concepts(out: str | os.PathLike, k: int | None = None, window: int | None = None) -> Concepts:
    """``out/concepts.parquet`` (written by a ``concepts`` run) as :class:`Concepts`."""
    import pyarrow.parquet as pq

    path = Path(out) / "concepts.parquet"
    if not path.is_file():
        raise DatasetError(f"{out}: no concepts.parquet (run `onnx-lrp concepts` first)")
    t = pq.read_table(str(path))
    ranks = [r for r, kind in zip(t.column("rank").to_pylist(), t.column("kind").to_pylist()) if kind != "units"]
    widths = [len(x) for x in t.column("ids").to_pylist() if x]
    return Concepts.from_table(t, k or (max(ranks) + 1 if ranks else 1), window or ((max(widths) - 1) // 2 if widths
                                                                                    else 0))


# ---------------------------------------------------------------------------------------------- atlas page
def atlas_html(concepts: Concepts, tokenizer: Any, *, title: str = "concept atlas", subtitle: str = "",
               max_units: int = 200, errors: Sequence[tuple[int, str]] = ()) -> str:
    """A self-contained searchable page: per unit (the ``max_units`` with the largest corpus relevance
    ``sum_s |R_s(u)|`` per layer) its ActMax and RelMax reference samples, the token window coloured by the
    unit's activation / relevance, the highlighted token outlined. The search box (or ``#q=...`` in the URL)
    filters units by the text of their samples, or by ``selector/unit`` (``mlp:12/345``)."""
    units = []
    used: set[int] = set()
    for sel in concepts.relevance_sum:
        order = np.argsort(-concepts.relevance_abs[sel], kind="stable")[:max_units]
        for u in order.tolist():
            entry = {"sel": sel, "unit": u, "rabs": float(concepts.relevance_abs[sel][u]),
                     "rsum": float(concepts.relevance_sum[sel][u]), "amax": float(concepts.activation_max[sel][u])}
            for kind in KINDS:
                t = concepts.tops[(sel, kind)]
                ex = []
                for r in range(t.k):
                    if t.row[u, r] < 0:
                        continue
                    ids = [int(i) for i in t.ids[u, r] if i >= 0]
                    used.update(ids)
                    ex.append({"row": int(t.row[u, r]), "score": float(t.score[u, r]),
                               "hi": int(t.position[u, r] - t.start[u, r]), "ids": ids,
                               "v": [round(float(v), 5) for v in t.values[u, r][: len(ids)]]})
                entry[kind] = ex
            units.append(entry)
    vocab = {i: tokenizer.decode([i]) for i in sorted(used)}
    data = {"units": units, "vocab": vocab, "samples": concepts.samples,
            "errors": [{"row": r, "error": e} for r, e in errors]}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return _PAGE.replace("@TITLE@", html.escape(title)).replace("@SUBTITLE@", html.escape(subtitle)).replace(
        "@DATA@", payload)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} .sub{color:#666;font-size:.9em;margin-bottom:.8em}
#bar{position:sticky;top:0;background:#fafafa;padding:.4em 0;border-bottom:1px solid #ddd;z-index:1}
#q{width:22em;font-size:1em;padding:.25em} #count{margin-left:1em;color:#444}
.unit{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.5em .8em}
.unit h2{font-size:1em;margin:.1em 0 .4em} .stat{color:#666;font-weight:normal;font-size:.85em}
.cols{display:flex;gap:1.5em;flex-wrap:wrap} .col{flex:1;min-width:28em}
.col h3{font-size:.85em;color:#555;margin:.2em 0} .ex{font-family:ui-monospace,monospace;font-size:.82em;
white-space:pre-wrap;margin:.15em 0 .15em 5.5em;text-indent:-5.5em}
.ex .sc{display:inline-block;width:5.5em;text-indent:0;color:#888} .t{padding:0 1px;border-radius:2px}
.t.hi{outline:2px solid #000} #more{margin:1em 0;font-size:1em}
</style></head><body>
<h1>@TITLE@</h1><div class="sub">@SUBTITLE@</div>
<div id="bar"><input id="q" type="search" placeholder="search tokens, or mlp:12/345" autofocus>
<span id="count"></span></div>
<div id="units"></div><button id="more">show more</button><div id="errors" class="sub"></div>
<script>
const D = @DATA@;
const PAGE = 40; let shown = PAGE, hits = [];
function esc(s){return s.replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function tok(i){const s = D.vocab[i]; return s === undefined ? "?" : s;}
function text(ex){return ex.ids.map(tok).join("");}
function colour(v, m, signed){ if(!(m>0)) return "#fff"; let t=Math.max(-1,Math.min(1,v/m));
  if(!signed) t=Math.max(0,t);
  const a = t>=0 ? [178,24,43] : [33,102,172]; t=Math.abs(t);
  return "rgb("+a.map(c=>Math.round(255+t*(c-255))).join(",")+")"; }
function line(ex, signed){ const m = Math.max(...ex.v.map(Math.abs));
  return '<div class="ex" title="row '+ex.row+'"><span class="sc">'+ex.score.toFixed(3)+'</span>'+
    ex.ids.map((id,k)=>'<span class="t'+(k===ex.hi?' hi':'')+'" style="background:'+colour(ex.v[k],m,signed)+
    '">'+esc(tok(id).replace(/\\n/g,"\\u21b5"))+'</span>').join("")+'</div>'; }
function card(u){ return '<div class="unit" data-id="'+u.sel+'/'+u.unit+'"><h2>'+u.sel+' / unit '+u.unit+
  ' <span class="stat">corpus relevance &Sigma;|R| '+u.rabs.toPrecision(3)+', &Sigma;R '+u.rsum.toPrecision(3)+
  ', max activation '+u.amax.toPrecision(3)+'</span></h2><div class="cols"><div class="col"><h3>ActMax: largest '+
  'activation (highlighted: where)</h3>'+u.act.map(e=>line(e,false)).join("")+'</div><div class="col"><h3>RelMax: '+
  'largest relevance for the prediction (highlighted: most relevant position)</h3>'+
  u.rel.map(e=>line(e,true)).join("")+'</div></div></div>'; }
for (const u of D.units) u.hay = (u.act.concat(u.rel)).map(text).join("\\n").toLowerCase();
function search(){ const q = document.getElementById("q").value.trim().toLowerCase(); shown = PAGE;
  hits = !q ? D.units : D.units.filter(u => (u.sel+"/"+u.unit) === q || (u.sel+"/"+u.unit).startsWith(q+"/")
    || u.sel === q || u.hay.includes(q));
  render(); }
function render(){ document.getElementById("units").innerHTML = hits.slice(0, shown).map(card).join("");
  document.getElementById("count").textContent = hits.length+" of "+D.units.length+" units match ("+D.samples+
    " samples)";
  document.getElementById("more").style.display = hits.length > shown ? "" : "none"; }
document.getElementById("q").addEventListener("input", search);
document.getElementById("more").addEventListener("click", ()=>{shown += PAGE; render();});
const h = new URLSearchParams(location.hash.slice(1)); if (h.get("q")) document.getElementById("q").value = h.get("q");
if (D.errors.length) document.getElementById("errors").textContent = D.errors.length+" row(s) skipped: "+
  D.errors.map(e=>e.error).join("; ");
search();
</script></body></html>
"""
