"""Heatmaps: coloured terminal text (ANSI 24-bit), a standalone HTML page, PNG images.

Colours are diverging: red for positive relevance (speaks for the target), blue for negative, white for none;
each map is scaled by its largest absolute value. Text on a coloured background is black or white, whichever
contrasts more with it (WCAG relative luminance). No dependencies beyond numpy (PNG files are written with
zlib); set ``NO_COLOR=1`` for plain terminal output.
"""
from __future__ import annotations

import base64
import html as _html
import json
import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

RED = np.array([178, 24, 43], dtype=np.float64)
BLUE = np.array([33, 102, 172], dtype=np.float64)
WHITE = np.array([255, 255, 255], dtype=np.float64)


def colours(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """RGB uint8 colours (``values.shape + (3,)``) on a blue-white-red scale; ``vmax``: value of full colour."""
    v = np.asarray(values, dtype=np.float64)
    if vmax is None:
        vmax = float(np.abs(v).max()) if v.size else 0.0
    t = np.clip(v / vmax, -1.0, 1.0) if vmax > 0 else np.zeros_like(v)
    t = t[..., None]
    rgb = np.where(t >= 0, WHITE + t * (RED - WHITE), WHITE - t * (BLUE - WHITE))
    return np.rint(rgb).astype(np.uint8)


def ink(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher contrast ratio against the background ``rgb`` (WCAG 2)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ np.array([0.2126, 0.7152, 0.0722]))
    return (255, 255, 255) if 1.05 / (lum + 0.05) > (lum + 0.05) / 0.05 else (0, 0, 0)


PART = "\u00b7"  # shown for a token that adds no text alone (the first bytes of a character split over tokens)


def _visible(token: str) -> str:
    """A token as shown: control characters escaped, an empty piece as a middle dot."""
    if not token:
        return PART
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def width(text: str) -> int:
    """Terminal columns ``text`` takes (wide CJK and emoji characters take two, combining marks none)."""
    return sum(0 if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Cf") else
               2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _pad(text: str, n: int) -> str:
    return text + " " * max(0, n - width(text))


# ---------------------------------------------------------------------------------------------- terminal
def terminal(tokens: Sequence[str], relevance: np.ndarray, *, title: str = "", color: bool | None = None) -> str:
    """Tokens on coloured backgrounds (24-bit ANSI), followed by a legend line.

    color: None = on unless ``NO_COLOR`` is set; without colour each token is followed by its relevance.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    vmax = float(np.abs(rel).max()) if rel.size else 0.0
    if color is None:
        color = not os.environ.get("NO_COLOR")
    parts = []
    for tok, r, (cr, cg, cb) in zip(tokens, rel, colours(rel, vmax)):
        text = _visible(tok)
        if color:
            parts.append(_ansi(text, (cr, cg, cb)))
        else:
            parts.append(f"{text}[{r:+.2f}]")
    lines = [title] if title else []
    lines.append(("" if color else " ").join(parts))
    legend = f"scale: blue = -{vmax:.3g} (against), white = 0, red = +{vmax:.3g} (for); sum = {rel.sum():.4g}"
    lines.append(legend)
    return "\n".join(lines)


def _ansi(text: str, rgb: Sequence[int]) -> str:
    fg = ";".join(str(v) for v in ink(rgb))
    return f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg}m{text}\x1b[0m"


def terminal_matrix(inputs: Sequence[str], outputs: Sequence[str], matrix: np.ndarray, *,
                    color: bool | None = None, max_width: int = 12, columns: int | None = None) -> str:
    """An input x output table for generation spans: one row per generated token, one column per input token,
    cells coloured by relevance (each row scaled by its own maximum).

    Tokens are shown whole up to ``max_width`` columns; longer ones are abbreviated (``abc~1``) and spelt out in a
    legend under the table. Tables wider than the terminal (``columns``, default: its width) wrap into blocks of
    input columns.
    """
    if color is None:
        color = not os.environ.get("NO_COLOR")
    columns = columns or shutil.get_terminal_size((120, 24)).columns
    m = np.asarray(matrix, dtype=np.float64)
    legend: list[str] = []

    def label(token: str) -> str:
        text = _visible(token)
        if width(text) <= max_width:
            return text
        short = f"~{len(legend) + 1}"
        cut = text
        while cut and width(cut) > max_width - len(short):
            cut = cut[:-1]
        legend.append(f"{cut}{short} = {token!r}")
        return cut + short

    heads = [label(t) for t in inputs]
    rows = [label(t) for t in outputs]
    cell = max([6] + [width(h) for h in heads]) + 1
    first = max([4] + [width(r) for r in rows]) + 1
    per_block = max(1, (columns - first) // cell)
    cols = [colours(m[j]) for j in range(len(outputs))]
    blocks = []
    for start in range(0, len(inputs), per_block):
        idx = range(start, min(len(inputs), start + per_block))
        lines = [" " * first + "".join(_pad(heads[i], cell) for i in idx)]
        for j, out in enumerate(rows):
            cells = []
            for i in idx:
                txt = _pad(f"{m[j, i]:+.2f}", cell)
                cells.append(_ansi(txt, cols[j][i]) if color else txt)
            lines.append(_pad(out, first) + "".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" + "\n".join(legend) if legend else "")


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em} .meta{color:#555}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:1.1em;line-height:2.1em;white-space:pre-wrap;
 border:1px solid #ddd;padding:.8em;border-radius:6px}
.tok{border-radius:3px;padding:.15em 0;box-shadow:inset 0 0 0 1px rgba(255,255,255,.7)}
.special{outline:1px dashed #999}
.part{color:#999} .download{margin:1.2em 0}
.legend{display:flex;align-items:center;gap:.6em;margin:.8em 0;font-size:.9em}
.bar{width:16em;height:.9em;border:1px solid #ccc;
 background:linear-gradient(to right,rgb(33,102,172),rgb(255,255,255),rgb(178,24,43))}
table{border-collapse:collapse;font-size:.9em} td,th{padding:.2em .5em;border:1px solid #eee;text-align:right}
th{font-weight:600;background:#fafafa} td.w{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace}
table.m td{min-width:3.2em}
"""


def _rgb(c: np.ndarray) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"


def _chip_style(c: np.ndarray) -> str:
    return f"background:{_rgb(c)};color:{_rgb(ink(c))}"


def _text_block(tokens: Sequence[str], rel: np.ndarray, special: Sequence[bool] | None,
                vmax: float | None = None) -> str:
    special = list(special) if special else [False] * len(tokens)
    spans = []
    for tok, r, c, sp in zip(tokens, rel, colours(rel, vmax), special):
        cls = "tok" + (" special" if sp else "") + ("" if tok else " part")
        tip = f"{tok!r}: {r:+.4g}" if tok else f"part of the next character (a byte-level piece): {r:+.4g}"
        style = _chip_style(c) if tok else f"background:{_rgb(c)}"
        shown = (tok or PART).replace("\n", "\u21b5")  # a line break shows as a visible mark, then breaks the line
        spans.append(f'<span class="{cls}" style="{style}" title="{_html.escape(tip)}">'
                     f'{_html.escape(shown)}</span>' + "\n" * tok.count("\n"))
    return '<div class="text">' + "".join(spans) + "</div>"


def _legend(rel: np.ndarray, vmax: float | None = None) -> str:
    if vmax is None:
        vmax = float(np.abs(rel).max()) if np.size(rel) else 0.0
    return (f'<div class="legend"><span>-{vmax:.3g} (against)</span><span class="bar"></span>'
            f'<span>+{vmax:.3g} (for)</span><span class="meta">sum {float(np.sum(rel)):.4g}</span></div>')


def html_page(sections: Sequence[dict], title: str = "onnx-lrp explanation", *, data: dict | None = None,
              filename: str = "onnx-lrp.json") -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external files).

    Each section is a dict with ``tokens``, ``relevance`` and optional ``heading``, ``subtitle``, ``special``,
    ``words`` (list of (word, relevance): shown as a table, largest first) or ``matrix`` + ``outputs``
    (an input x output table for generated tokens). ``data``: scores offered as a JSON download (a ``data:``
    link inside the page, saved as ``filename``).
    """
    body = [f"<h1>{_html.escape(title)}</h1>"]
    for s in sections:
        rel = np.asarray(s["relevance"], dtype=np.float64)
        if s.get("heading"):
            body.append(f"<h2>{_html.escape(s['heading'])}</h2>")
        if s.get("subtitle"):
            body.append(f'<p class="meta">{_html.escape(s["subtitle"])}</p>')
        body.append(_legend(rel))
        body.append(_text_block(s["tokens"], rel, s.get("special")))
        if s.get("words"):
            words = sorted(s["words"], key=lambda w: -abs(w[1]))[:30]
            vmax = max((abs(r) for _, r in words), default=0.0)
            rows = "".join(
                f'<tr><td class="w" style="{_chip_style(colours(np.array(r), vmax))}">{_html.escape(_visible(w))}'
                f"</td><td>{r:+.4g}</td></tr>" for w, r in words)
            body.append(f"<h2>Words (sub-words joined), largest |relevance| first</h2>"
                        f"<table><tr><th>word</th><th>relevance</th></tr>{rows}</table>")
        if s.get("matrix") is not None:
            body.append(_matrix_table(s["tokens"], s["outputs"], np.asarray(s["matrix"])))
    if data is not None:
        blob = base64.b64encode(json.dumps(data).encode("utf-8")).decode("ascii")
        body.append(f'<p class="download"><a download="{_html.escape(filename)}" '
                    f'href="data:application/json;base64,{blob}">Download the scores (JSON)</a></p>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}"
            '<p class="meta">Made with onnx-lrp (AttnLRP). Red: relevance for the explained output; '
            "blue: against. Hover over a token for its score.</p></body></html>")


def _matrix_table(inputs: Sequence[str], outputs: Sequence[str], m: np.ndarray) -> str:
    head = "".join(f"<th>{_html.escape(_visible(t))}</th>" for t in inputs)
    rows = []
    for j, out in enumerate(outputs):
        cols = colours(m[j])
        cells = "".join(f'<td style="{_chip_style(c)}" title="{_html.escape(repr(inputs[i]))}: {m[j, i]:+.4g}">'
                        f"{m[j, i]:+.2f}</td>" for i, c in enumerate(cols[: len(inputs)]))
        rows.append(f'<tr><th>{_html.escape(_visible(out))}</th>{cells}</tr>')
    return ("<h2>Input x output relevance (row: generated token; column: input token; each row scaled to its "
            f'own maximum)</h2><div style="overflow-x:auto"><table class="m"><tr><th></th>{head}</tr>'
            f"{''.join(rows)}</table></div>")


# ---------------------------------------------------------------------------------------------- images
def heatmap_rgb(heat: np.ndarray, image: np.ndarray | None = None, *, alpha: float = 0.6,
                percentile: float = 99.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: the relevance map in diverging colours, blended over a grey copy of ``image``.

    The colour scale saturates at the ``percentile`` of ``|heat|`` (a few extreme pixels do not wash out
    the rest).
    """
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}")
    vmax = float(np.percentile(np.abs(h), percentile)) if h.size else 0.0
    col = colours(h, vmax if vmax > 0 else None).astype(np.float64)
    if image is None:
        return col.astype(np.uint8)
    img = np.asarray(image, dtype=np.float64)
    if img.shape[:2] != h.shape:
        raise ValueError(f"image {img.shape[:2]} and heatmap {h.shape} differ in size")
    grey = img[..., :3].mean(-1, keepdims=True) if img.ndim == 3 else img[..., None]
    strength = np.clip(np.abs(h) / (vmax if vmax > 0 else 1.0), 0, 1)[..., None]
    a = alpha * strength
    return np.rint((1 - a) * grey + a * col).astype(np.uint8)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG file (8-bit RGB, zlib; no imaging library needed)."""
    path = Path(path)
    path.write_bytes(png_bytes(rgb))
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 array as the bytes of a PNG file."""
    a = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"write_png expects (H, W, 3) uint8, got shape {a.shape}")
    height, width = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
