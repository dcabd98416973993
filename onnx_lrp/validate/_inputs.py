"""What a comparison runs on: texts (a list, a file with one per line, or JSONL), images, or raw input arrays
(``.npz``), cut into batches of :class:`Item` s with their feeds."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError

# used when no inputs are given: factual prompts, reviews, a question, an instruction, a longer sentence
DEFAULT_TEXTS = [
    "The capital of France is",
    "Alice gave Bob a book because she",
    "This movie was a complete waste of time, the plot made no sense.",
    "A wonderful, moving film with brilliant performances.",
    "The quick brown fox jumps over the lazy",
    "Water boils at a temperature of one hundred degrees",
    "What is the largest planet in the solar system?",
    "After the meeting, the engineers went back to their desks and started to",
]


@dataclass
class Item:
    """One input of the comparison: ``label`` (the text, file name or row), ``tokens`` (what each position shows
    in a heatmap; None for images), ``valid`` (the positions that are not padding)."""

    index: int
    label: str
    tokens: list[str] | None
    valid: np.ndarray | None  # bool (seq,) for token inputs


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a file: JSONL (one JSON string, or an object with a ``"text"`` field, per line) when the name
    ends in ``.jsonl``, else one text per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file (texts: one per line, or JSONL with a 'text' field)")
    try:
        numbered = [(k, line) for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                    if line.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if p.suffix != ".jsonl":
        return [line for _, line in numbered]
    texts = []
    for k, line in numbered:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{p}:{k}: not JSON ({err.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise InputError(f"{p}:{k}: expected a JSON string or an object with a 'text' string")
        texts.append(text)
    return texts


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Input arrays by graph input name from an ``.npz`` file (batch axis first)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file (--inputs takes an .npz of arrays named after the model's inputs)")
    try:
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:
        raise InputError(f"{p}: not an .npz file ({type(err).__name__}: {err})") from None
    if not arrays:
        raise InputError(f"{p}: holds no arrays")
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise InputError(f"{p}: the arrays must share their first (batch) axis; sizes {sizes}")
    return arrays


def text_batches(texts: Sequence[str], tokenizer: Any, batch_size: int, pad_id: int
                 ) -> Iterator[tuple[list[Item], dict[str, np.ndarray]]]:
    """Tokenised texts, right-padded into batches: ``input_ids`` and ``attention_mask``."""
    encoded = [tokenizer.encode(t) for t in texts]
    for k, (t, ids) in enumerate(zip(texts, encoded)):
        if not ids:
            raise InputError(f"text {k} ({t!r}) encodes to no tokens")
    for start in range(0, len(texts), batch_size):
        chunk = encoded[start: start + batch_size]
        S = max(len(ids) for ids in chunk)
        ids = np.full((len(chunk), S), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        items = []
        for b, row in enumerate(chunk):
            ids[b, : len(row)], mask[b, : len(row)] = row, 1
            items.append(Item(start + b, texts[start + b], tokenizer.pieces(row), mask[b].astype(bool)))
        yield items, {"input_ids": ids, "attention_mask": mask}


def array_batches(arrays: dict[str, np.ndarray], batch_size: int, tokenizer: Any = None
                  ) -> Iterator[tuple[list[Item], dict[str, np.ndarray]]]:
    """Rows of raw input arrays in batches; token positions are valid where ``attention_mask`` is set."""
    n = next(iter(arrays.values())).shape[0]
    for start in range(0, n, batch_size):
        feeds = {k: v[start: start + batch_size] for k, v in arrays.items()}
        mask = feeds.get("attention_mask")
        items = []
        for b in range(next(iter(feeds.values())).shape[0]):
            valid = None
            tokens = None
            if "input_ids" in feeds:
                ids = feeds["input_ids"][b]
                valid = mask[b].astype(bool)[-ids.shape[-1]:] if mask is not None else np.ones(ids.shape[-1], bool)
                row = [int(i) for i in ids]
                tokens = tokenizer.pieces(row) if tokenizer is not None else [str(i) for i in row]
            items.append(Item(start + b, f"row {start + b}", tokens, valid))
        yield items, feeds


def image_batches(images: Sequence[Any], preprocessor: Any, batch_size: int
                  ) -> Iterator[tuple[list[Item], dict[str, np.ndarray]]]:
    """Images (files or arrays) through the model's preprocessing into ``pixel_values`` batches."""
    from ..image import load_image

    for start in range(0, len(images), batch_size):
        chunk = images[start: start + batch_size]
        pix = [preprocessor.pixel_values(preprocessor.resized(load_image(im))) for im in chunk]
        items = [Item(start + b, str(im) if isinstance(im, (str, os.PathLike)) else f"image {start + b}", None, None)
                 for b, im in enumerate(chunk)]
        yield items, {"pixel_values": np.concatenate(pix).astype(np.float32)}
