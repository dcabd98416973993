"""The result of :func:`~onnx_lrp.validate.compare`: per-input measures, their aggregates, the threshold checks
and where along the residual stream the two models' explanations part.

Aggregates: each measure's ``mean`` over the inputs and its ``worst`` value (lowest for agreements, highest for
errors) with the input it comes from. Checks compare the worst input with a threshold (``fail_under``: the
measure must be at least it; ``fail_over``: at most it). The divergence is the first block, walking forward, whose
stream *values* differ by more than ``layer_value_err`` (the forward pass changed there), else the first block,
walking back from the output, whose relevance differs by more than ``layer_rel_err`` (relevance flows backwards:
the block that reads an agreeing stream and writes a disagreeing relevance is where the rules differ).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

# measure -> which way is better
OUTPUT_METRICS = {"max_abs": "low", "max_rel": "low", "kl": "low", "same_prediction": "high"}
RELEVANCE_METRICS = {"rel_err": "low", "spearman": "high", "kendall": "high", "topk": "high", "sign": "high"}
LAYER_METRICS = {"value_err": "low", **RELEVANCE_METRICS}
DEFAULT_FAIL_UNDER = {"spearman": 0.9, "topk": 0.8}
# tolerances that locate the divergence (override with fail_over layer_value_err=..., layer_rel_err=...)
LAYER_TOLERANCE = {"value_err": 1e-3, "rel_err": 1e-2}
SHARP = 10.0  # a divergence is sharp when the error grows this much in one block


def _better(metric: str) -> str:
    if metric.startswith("layer_"):
        return LAYER_METRICS[metric[len("layer_"):]]
    return {**OUTPUT_METRICS, **RELEVANCE_METRICS}[metric]


def known_metrics() -> list[str]:
    return list(OUTPUT_METRICS) + list(RELEVANCE_METRICS) + ["layer_" + m for m in LAYER_METRICS]


def _parse(spec: Mapping[str, float] | str | None, option: str) -> dict[str, float]:
    if spec is None:
        return {}
    if isinstance(spec, str):
        out = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, val = part.partition("=")
            try:
                out[key.strip()] = float(val)
            except ValueError:
                raise ValueError(f"{option}: expected NAME=NUMBER[,NAME=NUMBER...], got {part!r}") from None
            if not sep:
                raise ValueError(f"{option}: expected NAME=NUMBER, got {part!r}")
        return out
    return {k: float(v) for k, v in spec.items()}


def parse_thresholds(fail_under: Mapping[str, float] | str | None = None,
                     fail_over: Mapping[str, float] | str | None = None) -> list[tuple[str, str, float]]:
    """``[(measure, ">=" or "<=", threshold)]`` from ``fail_under`` (agreements: spearman, kendall, topk, sign,
    same_prediction; default ``spearman=0.9,topk=0.8``) and ``fail_over`` (errors: rel_err, max_abs, max_rel, kl);
    ``layer_<measure>`` checks every stream tensor. A dict or ``"name=value,name=value"``."""
    under = DEFAULT_FAIL_UNDER if fail_under is None else _parse(fail_under, "fail_under")
    over = _parse(fail_over, "fail_over")
    checks = []
    for option, spec, op, want in (("fail_under", under, ">=", "high"), ("fail_over", over, "<=", "low")):
        for key, val in spec.items():
            if key not in known_metrics():
                raise ValueError(f"{option}: unknown measure {key!r}; measures: {', '.join(known_metrics())}")
            if _better(key) != want:
                other = "fail_over" if option == "fail_under" else "fail_under"
                raise ValueError(f"{option}: {key!r} is {'an error' if want == 'high' else 'an agreement'} "
                                 f"measure; use {other} {key}={val:g}")
            checks.append((key, op, val))
    return checks


def _worst(values: list, better: str) -> tuple[float | None, int | None]:
    pairs = [(v, k) for k, v in enumerate(values) if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not pairs:
        return None, None
    v, k = (min if better == "high" else max)(pairs, key=lambda p: p[0])
    return float(v), k


def aggregate(values: list, better: str) -> dict:
    """``mean`` (NaN and None left out), ``worst`` and ``worst_input`` (its index in ``values``)."""
    ok = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    worst, k = _worst(values, better)
    return {"mean": sum(ok) / len(ok) if ok else None, "worst": worst, "worst_input": k}


class Report:
    """What :func:`~onnx_lrp.validate.compare` measured.

    ``passed``: every check holds. ``summary()``: print the terminal table (``str(report)``: its text).
    ``worst(n)``: the n inputs whose relevance agrees least. ``to_dict()`` / ``to_json(path)``: the machine-readable form (keys documented in
    docs/validate.md). ``to_html(path)``: the page a person reads.
    """

    def __init__(self, settings: dict, items: list[dict], layers: list[dict],
                 checks: list[tuple[str, str, float]]):
        self.settings = settings
        self.items = items
        self.layer_names = layers
        self.thresholds = checks
        self.sources = sorted({s for it in items for s in it["sources"]})
        self.output = {m: aggregate([it["output"][m] for it in items], b) for m, b in OUTPUT_METRICS.items()}
        if settings["mode"] != "embedding":
            self.output["same_prediction"] = self._fraction_same()
        self.relevance = {s: {m: aggregate([it["sources"].get(s, {}).get(m) for it in items], b)
                              for m, b in RELEVANCE_METRICS.items()} for s in self.sources}
        self.layers = []
        for i, names in enumerate(layers):
            row = dict(names)
            for m, b in LAYER_METRICS.items():
                row[m] = aggregate([it["layers"][i][m] for it in items], b)
            self.layers.append(row)
        self.checks = [self._check(*c) for c in checks]
        self.divergence = self._divergence()

    # ------------------------------------------------------------------ checks
    def _fraction_same(self) -> dict:
        same = [it["output"]["same_prediction"] for it in self.items]
        worst = next((k for k, s in enumerate(same) if not s), None)
        return {"mean": sum(map(bool, same)) / len(same), "worst": float(all(same)), "worst_input": worst}

    def _check(self, metric: str, op: str, threshold: float) -> dict:
        better = _better(metric)
        where, value, k = "output", None, None
        if metric == "same_prediction":
            agg = self.output.get(metric)
            value = None if self.settings["mode"] == "embedding" else agg["mean"]
            k = agg["worst_input"]
        elif metric in OUTPUT_METRICS:
            value, k = self.output[metric]["worst"], self.output[metric]["worst_input"]
        elif metric in RELEVANCE_METRICS:
            where = ", ".join(self.sources)
            vals = [(self.relevance[s][metric]["worst"], self.relevance[s][metric]["worst_input"])
                    for s in self.sources]
            value, k = _worst([v for v, _ in vals], better)
            k = vals[k][1] if k is not None else None
        else:
            where = "layers"
            m = metric[len("layer_"):]
            vals = [(row[m]["worst"], row[m]["worst_input"], row["index"]) for row in self.layers]
            value, j = _worst([v for v, _, _ in vals], better)
            if j is not None:
                k, where = vals[j][1], f"layers ({self.layers[j]['block']})"
        passed = value is None or (value >= threshold if op == ">=" else value <= threshold)
        return {"metric": metric, "where": where, "op": op, "threshold": threshold, "value": value,
                "worst_input": k, "passed": bool(passed), "measured": value is not None}

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    # ------------------------------------------------------------------ divergence
    def layer_tolerance(self, m: str) -> float:
        """The tolerance on the layer measure ``m`` (``value_err``, ``rel_err``) that locates the divergence."""
        for metric, op, val in self.thresholds:
            if metric == "layer_" + m and op == "<=":
                return val
        return LAYER_TOLERANCE[m]

    def _divergence(self) -> dict | None:
        if not self.layers:
            return None
        tv, tr = self.layer_tolerance("value_err"), self.layer_tolerance("rel_err")
        worst_v = [row["value_err"]["worst"] for row in self.layers]
        for i, row in enumerate(self.layers):
            v = worst_v[i]
            if v is not None and v > tv:
                before = max([w for w in worst_v[:i] if w is not None], default=0.0)
                k = row["value_err"]["worst_input"]
                sharp = v > SHARP * before
                what = (f"the forward pass diverges at {row['block']}: the residual stream after it differs by "
                        f"{v:.3g} (worst token, relative L2; input {k}), up from {before:.3g} before it; "
                        "everything after it differs too" if sharp else
                        f"the forward values drift gradually (as lower precision makes them): the residual stream "
                        f"first differs by more than {tv:g} after {row['block']} ({v:.3g}, input {k}; {before:.3g} "
                        "before it); no single block breaks them")
                return {"kind": "forward", "layer": i, "block": row["block"], "value": v, "before": before,
                        "tolerance": tv, "sharp": bool(sharp), "message": what}
        worst_r = [row["rel_err"]["worst"] for row in self.layers]
        for i in range(len(self.layers) - 1, -1, -1):
            v = worst_r[i]
            if v is not None and v > tr:
                row = self.layers[i]
                after = max([w for w in worst_r[i + 1:] if w is not None], default=0.0)
                where = "the head (after the last block)" if i == len(self.layers) - 1 else f"block {i}"
                sharp = v > SHARP * after
                k = row["rel_err"]["worst_input"]
                what = (f"the relevance diverges in {where}: the forward values agree, the relevance it receives "
                        f"differs by at most {after:.3g}, and the relevance it passes on by {v:.3g} (max |diff| / "
                        f"max |R|, input {k}): the rules differ there" if sharp else
                        f"the relevance drifts gradually: it first differs by more than {tr:g} below {where} "
                        f"({v:.3g}, input {k}; {after:.3g} above it); the forward values agree")
                return {"kind": "relevance", "layer": i, "block": where, "value": v, "before": after,
                        "tolerance": tr, "sharp": bool(sharp), "message": what}
        return None

    # ------------------------------------------------------------------ views
    def worst(self, n: int = 5) -> list[dict]:
        """The ``n`` inputs whose relevance agrees least (lowest Spearman over the sources, then largest
        rel_err)."""
        def key(it):
            sp = [m["spearman"] for m in it["sources"].values() if not math.isnan(m["spearman"])]
            err = [m["rel_err"] for m in it["sources"].values()]
            return (min(sp) if sp else 1.0, -(max(err) if err else 0.0))

        return sorted(self.items, key=key)[:n]

    def to_dict(self) -> dict:
        """The report as plain data (keys documented in docs/validate.md; ``version`` 1)."""
        return {"version": 1, "passed": self.passed, "settings": self.settings, "checks": self.checks,
                "output": self.output, "relevance": self.relevance, "layers": self.layers,
                "divergence": self.divergence, "inputs": self.items}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(_clean(self.to_dict()), indent=1)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_html(self, path: str | os.PathLike | None = None, worst: int = 5) -> str:
        from ._html import page

        text = page(self, worst)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def summary(self, color: bool | None = None, file: Any = None) -> None:
        """Print the terminal table to ``file`` (default stdout); ``color`` None: coloured PASS/FAIL when ``file``
        is a terminal and ``NO_COLOR`` is unset. ``str(report)`` is the same table without colour."""
        file = file or sys.stdout
        if color is None:
            color = file.isatty() and not os.environ.get("NO_COLOR")
        print(_summary(self, color), file=file)

    def __str__(self) -> str:
        return _summary(self, False)

    def __repr__(self) -> str:
        return f"<Report {'PASS' if self.passed else 'FAIL'}: {len(self.items)} inputs, {len(self.layers)} layers>"


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and inf become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- terminal
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    v = float(v)
    if math.isnan(v):
        return "nan"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def _paint(text: str, ok: bool, color: bool) -> str:
    if not color:
        return text
    return f"\x1b[1;32m{text}\x1b[0m" if ok else f"\x1b[1;31m{text}\x1b[0m"


def _side(d: dict) -> str:
    if d["kind"] == "onnx":
        return f"{d['path']} (ONNX {d['precision']}, onnx-lrp)"
    return f"{d['path']} (PyTorch {d['class']}, {d['explained_by']})"


def _summary(r: Report, color: bool) -> str:
    s = r.settings
    lines = [f"A: {_side(s['a'])}", f"B: {_side(s['b'])}",
             f"{s['inputs']} inputs, composite {s['composite']}, output {s['output']!r} ({s['mode']}), "
             f"top-k {s['top_k']}",
             "", f"{'measure':<28}{'mean':>12}{'worst':>12}  worst input"]

    def row(name: str, agg: dict) -> str:
        k = agg["worst_input"]
        return f"{name:<28}{_fmt(agg['mean']):>12}{_fmt(agg['worst']):>12}  {'' if k is None else k}"

    for m in OUTPUT_METRICS:
        if r.output[m]["mean"] is not None or m not in ("kl", "same_prediction"):
            lines.append(row(f"output {m}", r.output[m]))
    for src in r.sources:
        for m in RELEVANCE_METRICS:
            lines.append(row(f"{src} {m}", r.relevance[src][m]))
    if r.layers:
        lines += ["", f"{'layer':<14}{'value_err':>11}{'rel_err':>11}{'spearman':>10}{'topk':>8}   A / B tensor"]
        for row_ in r.layers:
            names = row_["a"] if row_["a"] == row_["b"] else f"{row_['a']} / {row_['b']}"
            lines.append(f"{row_['block']:<14}{_fmt(row_['value_err']['worst']):>11}"
                         f"{_fmt(row_['rel_err']['worst']):>11}{_fmt(row_['spearman']['worst']):>10}"
                         f"{_fmt(row_['topk']['worst']):>8}   {names}")
        lines.append("(worst over the inputs; value_err: forward values, rel_err: relevance per neuron, "
                     "spearman/topk: per token)")
    lines.append("")
    lines.append("divergence: " + (r.divergence["message"] if r.divergence else "none (every stream tensor agrees "
                                   "within the layer tolerances)"))
    lines.append("")
    for c in r.checks:
        if not c["measured"]:
            status, text = "SKIP", f"{c['metric']} {c['op']} {c['threshold']:g}: not measured"
        else:
            status = "PASS" if c["passed"] else "FAIL"
            text = (f"{c['metric']} {c['op']} {c['threshold']:g} ({c['where']}): worst {_fmt(c['value'])}"
                    + (f" (input {c['worst_input']})" if c["worst_input"] is not None else ""))
        lines.append(f"{_paint(status, c['passed'], color)}  {text}")
    lines.append(_paint("RESULT: PASS" if r.passed else "RESULT: FAIL", r.passed, color))
    return "\n".join(lines)
