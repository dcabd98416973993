"""The HTML page of a :class:`~onnx_lrp.validate.Report`: one self-contained file (inline CSS and SVG, images as
data URIs, no scripts): result and checks, the aggregates, the layer-divergence plot, the per-layer table, the
two heatmaps side by side for the worst inputs, and the settings."""
from __future__ import annotations

import base64
import html
import math
from typing import Any

import numpy as np

from ..visualize import _CSS, _legend, _text_block, colours, png_bytes
from ._report import OUTPUT_METRICS, RELEVANCE_METRICS, Report, _fmt, _side

_PAGE_CSS = _CSS + """
.pass{color:#1a7f37;font-weight:700} .fail{color:#c62828;font-weight:700}
.banner{font-size:1.3em;padding:.5em .8em;border-radius:6px;display:inline-block}
.banner.pass{background:#e6f4ea} .banner.fail{background:#fdecea}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em} .pair h3{font-size:1em;margin:.3em 0}
table.t td:first-child,table.t th:first-child{text-align:left} svg{background:#fff;border:1px solid #eee}
.item{border-top:1px solid #ddd;margin-top:1.2em;padding-top:.4em} img.heat{max-width:100%;image-rendering:pixelated}
.scroll{overflow-x:auto} td.name{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8em;
 word-break:break-all;max-width:24em} td.txt{text-align:left}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[Any]], cls: str = "t", cell: dict[int, str] | None = None) -> str:
    """A table; ``cell`` gives the class of the cells of some columns (``name``: tensor names, ``txt``: text)."""
    cell = cell or {}
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="{cell[k]}">{c}</td>' if k in cell else f"<td>{c}</td>"
                                    for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="{cls}"><tr>{th}</tr>{body}</table></div>'


def _agg_rows(prefix: str, aggs: dict, names: dict) -> list[list[str]]:
    rows = []
    for m in names:
        a = aggs.get(m)
        if a is None or (a["mean"] is None and m in ("kl", "same_prediction")):
            continue
        k = a["worst_input"]
        rows.append([_e(f"{prefix}{m}"), _fmt(a["mean"]), _fmt(a["worst"]), "" if k is None else str(k)])
    return rows


def _log_plot(r: Report, width: int = 820, height: int = 250) -> str:
    """Worst value_err and rel_err per stream tensor on a log scale, the tolerances dashed, the divergence
    marked."""
    n = len(r.layers)
    series = {"value_err (forward)": ("value_err", "#2166ac"), "rel_err (relevance)": ("rel_err", "#b2182b")}
    vals = [row[m]["worst"] for row in r.layers for m, _ in series.values() if row[m]["worst"]]
    tol = {m: r.layer_tolerance(m) for m, _ in series.values()}
    lo = min([v for v in vals if v > 0] + list(tol.values()) + [1e-8])
    hi = max(vals + list(tol.values()) + [1.0])
    y0, y1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    left, right, top, bottom = 60, 20, 20, 40
    pw, ph = width - left - right, height - top - bottom

    def x(i: float) -> float:
        return left + (pw * i / max(n - 1, 1))

    def y(v: float) -> float:
        v = max(v, 10.0 ** y0)
        return top + ph * (y1 - math.log10(v)) / max(y1 - y0, 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="layer divergence">']
    for e in range(y0, y1 + 1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(10.0 ** e):.1f}" y2="{y(10.0 ** e):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y(10.0 ** e) + 4:.1f}" font-size="11" text-anchor="end">1e{e}</text>')
    step = max(1, n // 16)
    for i in range(0, n, step):
        parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle">residual stream '
                 'tensor (0 = embeddings, i = after block i-1)</text>')
    if r.divergence:
        xd = x(r.divergence["layer"])
        parts.append(f'<line x1="{xd:.1f}" x2="{xd:.1f}" y1="{top}" y2="{top + ph}" stroke="#999" '
                     'stroke-dasharray="2,3"/>')
    for k, (label, (m, colour)) in enumerate(series.items()):
        pts = [(x(i), y(row[m]["worst"])) for i, row in enumerate(r.layers) if row[m]["worst"] is not None]
        if pts:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            parts.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"/>' for px, py in pts)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tol[m]):.1f}" y2="{y(tol[m]):.1f}" '
                     f'stroke="{colour}" stroke-dasharray="6,4" stroke-opacity="0.6"/>')
        parts.append(f'<text x="{left + 10 + 190 * k}" y="{top + 12}" font-size="12" fill="{colour}">{_e(label)}'
                     "</text>")
    parts.append("</svg>")
    return "".join(parts)


def _heat(values: list, tokens: list | None, vmax: float) -> str:
    """A token heatmap, or a pixel heatmap as an inline PNG; colours scaled to ``vmax`` (shared by A and B)."""
    rel = np.asarray(values, dtype=np.float64)
    if tokens is not None and rel.ndim == 1:
        return _legend(rel, vmax) + _text_block(tokens, rel, None, vmax)
    rgb = colours(rel if rel.ndim == 2 else rel.reshape(1, -1), vmax)
    data = base64.b64encode(png_bytes(np.repeat(np.repeat(rgb, 4, 0), 4, 1))).decode()
    return _legend(rel, vmax) + f'<img class="heat" alt="heatmap" src="data:image/png;base64,{data}">'


def _item(it: dict, r: Report) -> str:
    s = r.settings
    what = ""
    if it["target"] is not None:
        shown = (f"{it['target_text']!r} (id {it['target']})" if it["target_text"] is not None
                 else f"class {it['target']}")
        pa = it["prediction_a_text"] if it["prediction_a_text"] is not None else it["prediction_a"]
        pb = it["prediction_b_text"] if it["prediction_b_text"] is not None else it["prediction_b"]
        what = f"explained: {_e(shown)}; A predicts {_e(repr(pa))}, B predicts {_e(repr(pb))}; "
    what += f"score A {it['score_a']:.5g}, B {it['score_b']:.5g}"
    out = [f'<div class="item"><h2>Input {it["index"]}: {_e(it["label"][:160])}</h2><p class="meta">{what}</p>']
    for src in it["sources"]:
        m = it["sources"][src]
        out.append(_table(["source"] + list(RELEVANCE_METRICS), [[_e(src)] + [_fmt(m[k]) for k in RELEVANCE_METRICS]]))
        tokens = it["tokens"] if src == "input_ids" else None
        ra, rb = it["relevance_a"][src], it["relevance_b"][src]
        vmax = float(max(np.abs(ra).max(initial=0.0), np.abs(rb).max(initial=0.0)))
        out.append('<div class="pair">'
                   f'<div><h3>A: {_e(s["a"]["path"])}</h3>{_heat(ra, tokens, vmax)}</div>'
                   f'<div><h3>B: {_e(s["b"]["path"])}</h3>{_heat(rb, tokens, vmax)}</div></div>')
    out.append("</div>")
    return "".join(out)


def page(r: Report, worst: int = 5) -> str:
    """The HTML text of the report, with the ``worst`` least-agreeing inputs shown as heatmaps."""
    s = r.settings
    verdict = "PASS" if r.passed else "FAIL"
    cls = "pass" if r.passed else "fail"
    body = ["<h1>onnx-lrp validate: do the two models decide for the same reasons?</h1>",
            f'<p><span class="banner {cls}">{verdict}</span></p>',
            f'<p class="meta">A: {_e(_side(s["a"]))}<br>B: {_e(_side(s["b"]))}</p>',
            "<h2>Checks (worst input)</h2>"]
    rows = []
    for c in r.checks:
        status = "SKIP" if not c["measured"] else ("PASS" if c["passed"] else "FAIL")
        rows.append([f'<span class="{"pass" if c["passed"] else "fail"}">{status}</span>',
                     _e(f"{c['metric']} {c['op']} {c['threshold']:g}"), _e(c["where"]), _fmt(c["value"]),
                     "" if c["worst_input"] is None else str(c["worst_input"])])
    body.append(_table(["", "check", "where", "worst", "input"], rows, cell={1: "txt", 2: "txt"}))
    body.append("<h2>Agreement over the inputs</h2>")
    agg = _agg_rows("output ", r.output, OUTPUT_METRICS)
    for src in r.sources:
        agg += _agg_rows(f"{src} ", r.relevance[src], RELEVANCE_METRICS)
    body.append(_table(["measure", "mean", "worst", "worst input"], agg))
    if r.layers:
        body.append("<h2>Where the two diverge: the residual stream, block by block</h2>")
        none = "No divergence: every stream tensor agrees within the layer tolerances."
        body.append(f'<p class="meta">{_e(r.divergence["message"] if r.divergence else none)}</p>')
        body.append(_log_plot(r))
        lrows = [[_e(row["block"]), _fmt(row["value_err"]["worst"]), _fmt(row["rel_err"]["worst"]),
                  _fmt(row["spearman"]["worst"]), _fmt(row["kendall"]["worst"]), _fmt(row["topk"]["worst"]),
                  _e(row["a"]), _e(row["b"])] for row in r.layers]
        body.append(_table(["layer", "value_err", "rel_err", "spearman", "kendall", "top-k", "A tensor", "B tensor"],
                           lrows, cell={6: "name", 7: "name"}))
        body.append('<p class="meta">Worst over the inputs. value_err: forward values, the worst token\'s '
                    "||A - B|| / ||A||; rel_err: relevance per neuron, max |A - B| / max |A|; Spearman, Kendall, "
                    "top-k: relevance per token (summed over the hidden axis). Each pair of heatmaps below shares "
                    "one colour scale.</p>")
    shown = r.worst(worst)
    body.append(f"<h2>The {len(shown)} least-agreeing inputs (A left, B right)</h2>")
    body.extend(_item(it, r) for it in shown)
    body.append("<h2>Settings</h2>")
    rows = [[_e(k), _e(v)] for k, v in s.items() if k not in ("a", "b")]
    rows += [[_e(f"{side} {k}"), _e(v)] for side in ("a", "b") for k, v in s[side].items()]
    rows += [[_e("threshold"), _e(f"{m} {op} {v:g}")] for m, op, v in r.thresholds]
    body.append(_table(["setting", "value"], rows, cell={1: "txt"}))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>onnx-lrp validate: {verdict}'
            f"</title><style>{_PAGE_CSS}</style></head><body>{''.join(body)}"
            '<p class="meta">Made with onnx-lrp (AttnLRP). Red: relevance for the explained output; blue: '
            "against.</p></body></html>")
