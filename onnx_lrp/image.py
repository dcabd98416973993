"""Image front end for ViT-style classifiers: preprocessing from ``preprocessor_config.json`` (resize, centre
crop, rescale, normalise), pixel relevance summed over colour channels as a heatmap, PNG output.

>>> ix = ImageExplainer("vit/model.onnx")              # preprocessor_config.json and config.json next to it
>>> res = ix.explain("cat.png")                        # or an (H, W, 3) uint8 array
>>> res.heatmap                                        # (H, W) relevance at the model's input resolution
>>> res.save_png("cat-lrp.png")

Images are read with Pillow when it is installed (any format); without it, pass arrays or ``.npy`` files.
Resizing uses Pillow's bilinear filter (what transformers' processors use) when available, else a numpy
bilinear resize (half-pixel centres).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import read_json
from .errors import InputError, TargetError
from .explainer import Explainer
from .visualize import heatmap_rgb, write_png


@dataclass
class Preprocessor:
    """The image transform of transformers' ViT-style processors (fields of ``preprocessor_config.json``)."""

    size: tuple[int, int] | None = (224, 224)  # (height, width) after resizing; None = keep
    shortest_edge: int | None = None  # resize so the short side has this length (keeps aspect)
    crop: tuple[int, int] | None = None  # centre crop (height, width)
    rescale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    normalize: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "Preprocessor":
        size = cfg.get("size", 224)
        hw, short = None, None
        if cfg.get("do_resize", True):
            if isinstance(size, int):
                hw = (size, size)
            elif "height" in size:
                hw = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                short = int(size["shortest_edge"])
        crop = None
        if cfg.get("do_center_crop"):
            c = cfg.get("crop_size", 224)
            crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        return cls(
            size=hw, shortest_edge=short, crop=crop,
            rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            normalize=bool(cfg.get("do_normalize", True)),
        )

    def resized(self, image: np.ndarray) -> np.ndarray:
        """Resize and crop an ``(H, W, 3)`` uint8 image to the model's input size (still uint8)."""
        img = image
        if self.size is not None:
            img = resize(img, self.size)
        elif self.shortest_edge is not None:
            h, w = img.shape[:2]
            s = self.shortest_edge / min(h, w)
            img = resize(img, (max(1, round(h * s)), max(1, round(w * s))))
        if self.crop is not None:
            ch, cw = self.crop
            h, w = img.shape[:2]
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            img = img[top: top + ch, left: left + cw]
        return img

    def pixel_values(self, resized: np.ndarray) -> np.ndarray:
        """``(1, 3, H, W)`` float32: ``(image * rescale - mean) / std``."""
        x = resized.astype(np.float64) * self.rescale
        if self.normalize:
            x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32)


def load_image(image: Any) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from a path (Pillow; ``.npy`` without it), a PIL image or an array."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: " + ("not a regular file" if path.exists() else "no such image file"))
        if path.suffix == ".npy":
            try:
                image = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        else:
            try:
                from PIL import Image
            except ImportError as err:
                raise InputError(f"{path}: reading image files needs Pillow (`pip install pillow`); "
                                 "or pass an (H, W, 3) uint8 array / .npy file") from err
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError, truncated
                raise InputError(f"{path}: not a readable image ({exc})") from None
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    try:
        arr = np.asarray(image)
    except (ValueError, TypeError) as exc:
        raise InputError(f"image must be an (H, W, 3) RGB array, got {type(image).__name__} ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"image must hold numbers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or not arr.shape[0] or not arr.shape[1]:
        raise InputError(f"image must be (H, W, 3) RGB with H, W > 0, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("image holds NaN/inf values")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` uint8 image to ``size = (height, width)``."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    try:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    except ImportError:
        pass
    src = image.astype(np.float64)

    def coords(n_out: int, n_in: int):
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, c - lo

    y0, y1, fy = coords(h, image.shape[0])
    x0, x1, fx = coords(w, image.shape[1])
    top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
    bot = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class ImageExplanation:
    """``heatmap``: ``(H, W)`` pixel relevance (summed over colour channels) at the model's input size;
    ``image``: the resized input it refers to; ``relevance``: the raw ``(3, H, W)`` relevance."""

    image: np.ndarray
    heatmap: np.ndarray
    relevance: np.ndarray
    score: float
    target: int
    label: str
    prediction: int
    prediction_label: str

    def overlay(self, alpha: float = 0.6) -> np.ndarray:
        """``(H, W, 3)`` uint8: the heatmap blended over a grey copy of the image."""
        return heatmap_rgb(self.heatmap, self.image, alpha=alpha)

    def save_png(self, path: str | os.PathLike, side_by_side: bool = True, min_size: int = 224) -> Path:
        """Write the image, the heatmap and the overlay side by side (or the overlay alone) as a PNG; small
        inputs are enlarged (nearest neighbour, integer factor) to at least ``min_size`` pixels high."""
        panels = [self.image, heatmap_rgb(self.heatmap), self.overlay()] if side_by_side else [self.overlay()]
        f = max(1, -(-min_size // self.image.shape[0]))
        panels = [p.repeat(f, 0).repeat(f, 1) for p in panels]
        gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
        row = [panels[0]]
        for p in panels[1:]:
            row += [gap, p]
        return write_png(path, np.concatenate(row, axis=1))

    def to_dict(self) -> dict:
        return {"score": self.score, "target": self.target, "label": self.label, "prediction": self.prediction,
                "prediction_label": self.prediction_label, "heatmap": self.heatmap.tolist()}


class ImageExplainer:
    """Explain an image classifier exported to ONNX (input ``pixel_values`` of shape ``(batch, 3, H, W)``).

    model: the ``.onnx`` file or its folder (``preprocessor_config.json`` and ``config.json`` are read there);
    preprocessor: overrides the folder's preprocessing. Other keyword arguments go to
    :class:`~onnx_lrp.Explainer` (``composite="vit-lrp"`` is LXT's choice for vision transformers).
    """

    def __init__(self, model: str | os.PathLike, composite: str | Any = "attnlrp", *,
                 preprocessor: Preprocessor | None = None, **kwargs: Any):
        path = Path(model).expanduser()
        self.folder = path if path.is_dir() else path.parent
        self.explainer = Explainer(path, composite, **kwargs)
        inputs = [i for i in self.explainer.graph.inputs if i.is_float]
        if not inputs:
            raise InputError(f"{path}: no float image input (expected pixel_values of shape (batch, 3, H, W))")
        self.input_name = "pixel_values" if "pixel_values" in self.explainer.input_names else inputs[0].name
        if preprocessor is None:
            cfg = read_json(self.folder / "preprocessor_config.json")
            preprocessor = Preprocessor.from_config(cfg)
            spec = next(i for i in inputs if i.name == self.input_name)
            if not cfg and len(spec.shape) == 4 and all(isinstance(d, int) and d > 0 for d in spec.shape[2:]):
                preprocessor.size = (spec.shape[2], spec.shape[3])
        self.preprocessor = preprocessor
        self.labels = {int(k): v for k, v in read_json(self.folder / "config.json").get("id2label", {}).items()}

    def _target(self, target: int | str | None) -> int | None:
        if target is None or isinstance(target, (int, np.integer)):
            return None if target is None else int(target)
        by_name = {v.lower(): k for k, v in self.labels.items()}
        if target.lower() in by_name:
            return by_name[target.lower()]
        if target.isdigit():
            return int(target)
        raise TargetError(f"unknown label {target!r}; the model's labels are {list(self.labels.values())[:20]}")

    def explain(self, image: Any, target: int | str | None = None) -> ImageExplanation:
        """Pixel relevance for class ``target`` (id or label name; default: the predicted class)."""
        resized = self.preprocessor.resized(load_image(image))
        x = self.preprocessor.pixel_values(resized)
        res = self.explainer.explain({self.input_name: x}, target=self._target(target))
        y = res.outputs[res.output][0]
        rel = res.relevance[self.input_name][0]
        tgt, pred = int(res.target[0]), int(np.argmax(y))
        return ImageExplanation(resized, rel.sum(0), rel, float(res.score[0]), tgt, self.labels.get(tgt, str(tgt)),
                                pred, self.labels.get(pred, str(pred)))
