""":func:`compare`: explain the same inputs with two models and measure where their explanations agree.

Per batch: side A's forward decides what is explained (its prediction at the last token of each input for logits
outputs; for embeddings, ``score = e(x) . e_A(x)`` with ``e`` the mask-weighted mean of the output and ``e_A``
A's embedding held fixed, the same start weights on both sides); both sides explain that quantity and return the
relevance of each source input and of the residual stream after each block.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .._files import read_json
from ..errors import InputError
from ._inputs import DEFAULT_TEXTS, Item, array_batches, image_batches, read_arrays, read_texts, text_batches
from ._metrics import SIGN_FLOOR, output_agreement, rel_err, relevance_agreement, row_err
from ._report import Report, parse_thresholds
from ._sides import TORCH_INPUTS, MismatchError, OnnxSide, Request, Result, TorchSide, open_side

# inputs the explainers fill themselves when they are missing
_FILLED = {"attention_mask", "position_ids", "token_type_ids", "global_attention_mask", "seqlens_k",
           "total_sequence_length"}
# a candidate replaces the structural stream tensor when it matches the PyTorch hidden state this much better
_BETTER_MATCH = 10.0


def compare(a: Any, b: Any, *, texts: Sequence[str] | str | os.PathLike | None = None,
            inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None, images: Sequence[Any] | None = None,
            tokenizer: Any = None, composite: Any = "attnlrp", reference: str = "auto", output: str | None = None,
            batch_size: int = 8, top_k: int = 5, fail_under: Mapping[str, float] | str | None = None,
            fail_over: Mapping[str, float] | str | None = None) -> Report:
    """Explain the same inputs with models ``a`` (the reference) and ``b`` and compare outputs, relevance per
    source input, and relevance along the residual stream, block by block.

    Parameters
    ----------
    a, b: an ONNX file (or folder holding ``model.onnx``, ``ModelProto``, :class:`~onnx_lrp.Explainer`), or the
        PyTorch original (a transformers folder, or a ``PreTrainedModel``) explained by LXT 2.1 where it supports
        the family, else by :mod:`onnx_lrp.reference.torch` (``reference="lxt"`` or ``"torch"`` forces one).
    texts: a list of strings, or a file (one text per line, or ``.jsonl``). Default: a few built-in sentences.
    inputs: raw input arrays (a dict or an ``.npz`` file, batch axis first).
    images: image files or arrays.
    tokenizer: a folder or :class:`~onnx_lrp.text.Tokenizer` (default: next to A, else next to B).
    composite: the rule set on both sides (a name; a :class:`~onnx_lrp.composites.Composite` only for ONNX vs
        ONNX).
    output: the output to explain (default: A's first explainable output).
    top_k: k of the top-k overlap.
    fail_under, fail_over: thresholds, e.g. ``{"spearman": 0.9}`` or ``"spearman=0.9,topk=0.8"``, checked on the
        worst input (see :func:`parse_thresholds`).
    """
    checks = parse_thresholds(fail_under, fail_over)
    if isinstance(texts, (str, os.PathLike)):
        texts = read_texts(texts)
    side_a = open_side(a, composite, "A", reference)
    try:
        side_b = open_side(b, composite, "B", reference)
    except Exception:
        side_a.close()
        raise
    try:
        out = output or _default_output(side_a, side_b)
        _check_correspondence(side_a, side_b, out)
        tok = _tokenizer(tokenizer, side_a, side_b) if inputs is None and images is None else (
            _load_tokenizer(tokenizer) if tokenizer is not None else None)
        batches = _batches(texts, inputs, images, tok, batch_size, side_a, side_b)
        items, mode, layer_names = _run(side_a, side_b, out, batches, top_k, tok)
        settings = {
            "a": side_a.describe(), "b": side_b.describe(), "composite": str(composite), "output": out,
            "mode": mode, "inputs": len(items), "batch_size": batch_size, "top_k": top_k,
            "sign_floor": SIGN_FLOOR,
        }
        return Report(settings, items, layer_names, checks)
    finally:
        side_a.close()
        side_b.close()


# ---------------------------------------------------------------------------------------------- checks
def _default_output(a, b) -> str:
    for side in (a, b):
        if isinstance(side, OnnxSide):
            return side.default_output()
    return "logits"


def _data_inputs(side: OnnxSide) -> set[str]:
    return {n for n in side.input_names if n not in _FILLED and not n.startswith("past")}


def _check_correspondence(a, b, output: str) -> None:
    """Inputs, the explained output and the vocabularies of the two sides must correspond."""
    onnx_sides = [s for s in (a, b) if isinstance(s, OnnxSide)]
    for s in onnx_sides:
        if output not in s.output_names:
            raise MismatchError(f"{s.label} ({s.name}) has no output {output!r}; its outputs are {s.output_names}")
    if len(onnx_sides) == 2 and _data_inputs(a) != _data_inputs(b):
        raise MismatchError(f"the inputs do not correspond: A ({a.name}) takes {sorted(_data_inputs(a))}, "
                            f"B ({b.name}) takes {sorted(_data_inputs(b))}")
    for s in onnx_sides:
        extra = _data_inputs(s) - set(TORCH_INPUTS)
        if len(onnx_sides) == 1 and extra:
            raise MismatchError(f"{s.label} ({s.name}) takes inputs {sorted(extra)} that a PyTorch model is not "
                                f"fed here ({', '.join(TORCH_INPUTS)})")
    va, vb = a.vocab_size(), b.vocab_size()
    if va and vb and va != vb:
        raise MismatchError(f"the vocabularies do not correspond: A ({a.name}) has {va} tokens, B ({b.name}) has "
                            f"{vb}")


def _load_tokenizer(tokenizer: Any):
    from ..text import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_folder(tokenizer)
    return Tokenizer(tokenizer)


def _folder_tokenizer(side):
    from ..text import Tokenizer

    folder = side.folder
    if folder is None or not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    return Tokenizer.from_folder(folder)


def _tokenizer(tokenizer: Any, a, b):
    """The tokenizer for texts: given, or next to A, else next to B; two tokenizers with different vocabularies
    are a mismatch."""
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
    else:
        ta, tb = _folder_tokenizer(a), _folder_tokenizer(b)
        if ta is not None and tb is not None:
            _same_vocabulary(ta, tb, a, b)
        tok = ta or tb
        if tok is None:
            raise InputError(f"no tokenizer next to A ({a.name}) or B ({b.name}); pass tokenizer=FOLDER "
                             "(CLI: --tokenizer DIR), or raw input arrays (--inputs FILE.npz)")
    for side in (a, b):
        size = side.vocab_size()
        top = _vocab(tok)
        if size and top and max(top.values()) >= size:
            raise MismatchError(f"the tokenizer has ids up to {max(top.values())}, but {side.label} ({side.name}) "
                                f"has {size} tokens: they do not correspond")
    return tok


def _vocab(tok) -> dict[str, int]:
    return dict(tok.backend.get_vocab())  # tokenizers and transformers both: added tokens included


def _same_vocabulary(ta, tb, a, b) -> None:
    va, vb = _vocab(ta), _vocab(tb)
    if va == vb:
        return
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
    raise MismatchError(f"the tokenizers next to A ({a.name}, {len(va)} tokens) and B ({b.name}, {len(vb)} tokens) "
                        f"have different vocabularies (e.g. {diff}); pass the right one with tokenizer=")


def _batches(texts, inputs, images, tok, batch_size: int, a, b) -> Iterator[tuple[list[Item], dict]]:
    given = [x is not None for x in (texts, inputs, images)]
    if sum(given) > 1:
        raise InputError("give one of texts, inputs (arrays) or images")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if inputs is not None:
        arrays = read_arrays(inputs) if isinstance(inputs, (str, os.PathLike)) else {
            k: np.asarray(v) for k, v in inputs.items()}
        return array_batches(arrays, batch_size, tok)
    if images is not None:
        return image_batches(list(images), _preprocessor(a, b), batch_size)
    texts = list(DEFAULT_TEXTS if texts is None else texts)
    if not texts:
        raise InputError("no texts to compare on")
    pad = 0
    for key in ("pad_token_id", "eos_token_id"):
        for side in (a, b):
            v = side.config().get(key)
            if isinstance(v, int):
                pad = v
                break
        else:
            continue
        break
    return text_batches(texts, tok, batch_size, pad)


def _preprocessor(a, b):
    from ..image import Preprocessor

    for side in (a, b):
        f = side.folder / "preprocessor_config.json" if side.folder is not None else None
        if f is not None and f.is_file():
            return Preprocessor.from_config(read_json(f))
    raise InputError(f"images need a preprocessor_config.json next to A ({a.name}) or B ({b.name})")


# ---------------------------------------------------------------------------------------------- running
def _run(a, b, output: str, batches, top_k: int, tok) -> tuple[list[dict], str, list[dict]]:
    labels = {int(k): v for k, v in (a.config().get("id2label") or b.config().get("id2label") or {}).items()}
    items: list[dict] = []
    mode = None
    layer_names: list[dict] = []
    for k, (batch_items, base) in enumerate(batches):
        feeds = _common_feeds(base, a, b)
        ya = a.forward(feeds, output)
        if mode is None:
            yb = b.forward(feeds, output)
            if ya.shape != yb.shape:
                raise MismatchError(f"output {output!r} does not correspond: A ({a.name}) gives shape {ya.shape}, "
                                    f"B ({b.name}) gives {yb.shape} on the same batch")
            mode = _mode(output, ya)
        req = _request(feeds, output, ya, mode, batch_items)
        if k == 0:
            ra, rb, layer_names = _first_batch(a, b, req)
        else:
            ra, rb = a.explain(req), b.explain(req)
        _check_shapes(a, b, ra, rb, output)
        for j, item in enumerate(batch_items):
            items.append(_item(item, j, ra, rb, req, mode, top_k, tok, labels))
    return items, mode, layer_names


def _common_feeds(base: dict, a, b) -> dict:
    """The batch as both sides see it: an ONNX side fills attention_mask / position_ids / token_type_ids, and a
    PyTorch side gets the same arrays."""
    onnx_side = next((s for s in (a, b) if isinstance(s, OnnxSide)), None)
    if onnx_side is None:
        return dict(base)
    filled = onnx_side.prepare(base)
    return {**base, **{k: v for k, v in filled.items() if k in TORCH_INPUTS}}


def _mode(output: str, y: np.ndarray) -> str:
    if "logits" in output:
        if y.ndim == 3:
            return "token"
        if y.ndim == 2:
            return "class"
        raise MismatchError(f"output {output!r} has shape {y.shape}: expected (batch, classes) or "
                            "(batch, seq, classes)")
    if y.ndim in (2, 3):
        return "embedding"
    raise MismatchError(f"output {output!r} has shape {y.shape}: expected (batch, hidden) or (batch, seq, hidden)")


def _request(feeds: dict, output: str, ya: np.ndarray, mode: str, items: list[Item]) -> Request:
    """What both sides explain: A's prediction (at each input's last token), or for embeddings the start
    weights ``w = p * e_A`` (``p`` the pooling weights) so that ``sum(w * y) = e(x) . e_A(x)``."""
    if mode == "token":
        pos = np.array([int(np.flatnonzero(it.valid)[-1]) if it.valid is not None else ya.shape[1] - 1
                        for it in items])
        return Request(feeds, output, positions=pos, targets=ya[np.arange(ya.shape[0]), pos].argmax(-1))
    if mode == "class":
        return Request(feeds, output, targets=ya.argmax(-1))
    if ya.ndim == 3:
        m = np.stack([it.valid if it.valid is not None else np.ones(ya.shape[1], bool) for it in items])
        p = m / m.sum(-1, keepdims=True)
        w = p[..., None] * (p[..., None] * ya).sum(1)[:, None, :]
    else:
        w = ya.copy()
    return Request(feeds, output, weights=w)


def _first_batch(a, b, req: Request) -> tuple[Result, Result, list[dict]]:
    """Set up the residual streams on the first batch and explain it. ONNX sides take the structural stream
    (:mod:`._residual`); next to a PyTorch side, each stream tensor is the cut vertex between its neighbours
    whose value matches the PyTorch hidden state much better than the structural one, if any."""
    results: dict[str, Result] = {}
    hidden = None
    for s in (a, b):  # PyTorch sides first: their hidden states pick the ONNX stream tensors
        if isinstance(s, TorchSide):
            results[s.label] = s.explain(req)
            hidden = hidden or (s, results[s.label].stream_values)
    found = {}
    for s in (a, b):
        if isinstance(s, OnnxSide):
            s.layout(req.output)
            values = s.cut_values(req.feeds)
            found[s.label] = (s, s.structural_stream(values), values)
    if len(found) == 2 and len(found["A"][1]) != len(found["B"][1]):
        raise MismatchError(f"the residual streams do not correspond: A ({a.name}) has {len(found['A'][1]) - 1} "
                            f"blocks, B ({b.name}) has {len(found['B'][1]) - 1}")
    mask = req.feeds.get("attention_mask")
    for s, idx, values in found.values():
        s.set_stream(idx if hidden is None else _match_hidden(s, idx, values, *hidden, mask))
        results[s.label] = s.explain(req)
    return results["A"], results["B"], _layer_names(a, b, len(results["A"].stream_values))


def _match_hidden(s: OnnxSide, idx: list[int], values: dict, t: TorchSide, hidden: list[np.ndarray],
                  mask: np.ndarray | None) -> list[int]:
    if len(hidden) != len(idx):
        raise MismatchError(f"the residual streams do not correspond: {t.label} ({t.name}) returns {len(hidden)} "
                            f"hidden states ({len(hidden) - 1} blocks), {s.label} ({s.name}) has {len(idx) - 1} "
                            "blocks")
    chosen = []
    for i, h in enumerate(hidden):
        lo = idx[i - 1] if i > 0 else -1
        hi = idx[i + 1] if i + 1 < len(idx) else len(s.cuts)
        best, best_err = idx[i], _value_err(values, s.cuts[idx[i]], h, mask)
        for k in range(lo + 1, hi):
            err = _value_err(values, s.cuts[k], h, mask)
            if err * _BETTER_MATCH < best_err:
                best, best_err = k, err
        chosen.append(best)
    return chosen


def _value_err(values: dict, point, h: np.ndarray, mask: np.ndarray | None) -> float:
    """How far a cut vertex's value is from a hidden state, on the non-padding tokens."""
    v = values.get(point.name)
    if v is None or v.shape != h.shape:
        return float("inf")
    if mask is not None and mask.shape == h.shape[:2]:
        keep = mask.astype(bool)
        return rel_err(h[keep], v[keep])
    return rel_err(h, v)


def _layer_names(a, b, n: int) -> list[dict]:
    na, nb = a.stream_names(), b.stream_names()
    out = []
    for i in range(n):
        out.append({"index": i, "block": "embeddings" if i == 0 else f"block {i - 1}",
                    "a": na[i] if na else f"hidden_states[{i}]", "b": nb[i] if nb else f"hidden_states[{i}]"})
    return out


def _check_shapes(a, b, ra: Result, rb: Result, output: str) -> None:
    if len(ra.stream_values) != len(rb.stream_values):
        raise MismatchError(f"the residual streams do not correspond: A ({a.name}) has "
                            f"{len(ra.stream_values) - 1} blocks, B ({b.name}) has {len(rb.stream_values) - 1}")
    if ra.rows.shape != rb.rows.shape:
        raise MismatchError(f"output {output!r} does not correspond: A ({a.name}) gives {ra.rows.shape[1:]} per "
                            f"input, B ({b.name}) gives {rb.rows.shape[1:]}")
    for x, y in zip(ra.stream_values, rb.stream_values):
        if x.shape != y.shape:
            raise MismatchError(f"the residual streams do not correspond: A's is {x.shape[1:]}, B's {y.shape[1:]} "
                                "per input")


# ---------------------------------------------------------------------------------------------- per input
def _item(item: Item, j: int, ra: Result, rb: Result, req: Request, mode: str, top_k: int, tok,
          labels: dict[int, str]) -> dict:
    valid = item.valid
    rows_a, rows_b = ra.rows[j], rb.rows[j]
    if mode == "embedding" and valid is not None and rows_a.ndim == 2:
        rows_a, rows_b = rows_a[valid], rows_b[valid]
    agree = output_agreement(rows_a, rows_b, distribution=mode != "embedding")
    target = None if req.targets is None else int(np.asarray(req.targets)[j])
    pa = pb = None
    if mode != "embedding":
        pa, pb = int(np.argmax(ra.rows[j])), int(np.argmax(rb.rows[j]))
    out = {
        "index": item.index, "label": item.label, "tokens": _cut(item.tokens, valid),
        "position": None if req.positions is None else int(req.positions[j]), "target": target,
        "target_text": _text(tok, labels, target, mode), "prediction_a": pa, "prediction_b": pb,
        "prediction_a_text": _text(tok, labels, pa, mode), "prediction_b_text": _text(tok, labels, pb, mode),
        "score_a": float(ra.score[j]), "score_b": float(rb.score[j]), "output": agree,
        "sources": {}, "relevance_a": {}, "relevance_b": {}, "layers": [],
    }
    for name in sorted(set(ra.relevance) & set(rb.relevance)):
        x, y = ra.relevance[name][j], rb.relevance[name][j]
        if name == "input_ids" and valid is not None:
            x, y = x[valid], y[valid]
        out["sources"][name] = relevance_agreement(x, y, top_k)
        out["relevance_a"][name] = x.tolist()
        out["relevance_b"][name] = y.tolist()
    for va, vb, xa, xb in zip(ra.stream_values, rb.stream_values, ra.stream_relevance, rb.stream_relevance):
        va, vb, xa, xb = (v[j] for v in (va, vb, xa, xb))
        if valid is not None and va.shape[0] == valid.shape[0]:
            va, vb, xa, xb = va[valid], vb[valid], xa[valid], xb[valid]
        layer = {"value_err": row_err(va, vb),
                 **relevance_agreement(xa.sum(-1, dtype=np.float64), xb.sum(-1, dtype=np.float64), top_k)}
        layer["rel_err"] = rel_err(xa, xb)  # per neuron, the strictest
        out["layers"].append(layer)
    return out


def _cut(tokens, valid):
    if tokens is None or valid is None:
        return tokens
    return [t for t, v in zip(tokens, valid) if v]


def _text(tok, labels: dict[int, str], idx, mode: str):
    """The token (next-token mode) or label (class mode, from config.json's id2label) of an id."""
    if idx is None:
        return None
    if mode == "class":
        return labels.get(idx)
    return tok.decode([idx]) if tok is not None and mode == "token" else None
