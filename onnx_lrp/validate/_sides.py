"""The two sides of a comparison: an ONNX model (explained by :class:`~onnx_lrp.Explainer`) or a PyTorch original
(explained by LXT 2.1 where it has patches for the family, else by :mod:`onnx_lrp.reference.torch`).

Both answer the same :class:`Request` (feeds, output, positions and targets, or start weights) with a
:class:`Result`: the explained output, the relevance of each source input, and the values and relevance of the
residual stream after each block (ONNX: :mod:`._residual`; PyTorch: ``output_hidden_states=True``).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._files import read_json
from .._graph import Graph
from ..errors import OnnxLrpError
from ..explainer import Explainer
from ._residual import Point, block_entries, cut_points

# ops that copy their input's values (same shape: checked at run time): a stream tensor is taken before them
_COPIES = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
             "ConvInteger", "QLinearConv", "DynamicQuantizeMatMul", "QAttention", "QGemm"}
TORCH_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values")


class MismatchError(OnnxLrpError, ValueError):
    """The two models of a comparison do not correspond (inputs, outputs, vocabularies, blocks), or a side
    cannot be explained."""


@dataclass
class Request:
    """What both sides explain on one batch: ``output[b, positions[b], targets[b]]`` (``positions`` ``None`` for
    ``(batch, classes)`` outputs), or ``sum(weights[b] * output[b])`` when ``weights`` is given."""

    feeds: dict[str, np.ndarray]
    output: str
    positions: np.ndarray | None = None
    targets: np.ndarray | None = None
    weights: np.ndarray | None = None


@dataclass
class Result:
    """One side's answer: ``rows`` (the explained output rows ``(batch, classes)``, or the whole output with
    weights), ``score`` (batch,), ``targets``, ``relevance`` per source input, and the residual stream
    (``stream_values`` / ``stream_relevance``: one ``(batch, seq, hidden)`` float32 array per point, in order)."""

    rows: np.ndarray
    score: np.ndarray
    targets: np.ndarray | None
    relevance: dict[str, np.ndarray]
    stream_values: list[np.ndarray] = field(default_factory=list)
    stream_relevance: list[np.ndarray] = field(default_factory=list)


def _rows(y: np.ndarray, req: Request) -> np.ndarray:
    if req.weights is not None:
        return y
    return y[np.arange(y.shape[0]), req.positions] if req.positions is not None else y


# ---------------------------------------------------------------------------------------------- ONNX
class OnnxSide:
    """An ONNX model explained by onnx-lrp."""

    kind = "onnx"

    def __init__(self, model: Any, composite: Any, label: str):
        self.label = label
        if isinstance(model, Explainer):
            self.explainer = model
        else:
            self.explainer = Explainer(model, composite)
        src = self.explainer.graph.source
        self.path = Path(src) if src.endswith(".onnx") else None
        self.folder = self.path.parent if self.path is not None else None
        self.graph: Graph = self.explainer.graph
        self.cuts: list[Point] = []
        self.stream: list[Point] | None = None
        self._entries: list[int] = []
        self._output: str | None = None

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "ModelProto"

    def precision(self) -> str:
        ops = {n.op_type for n in self.graph.nodes}
        if "MatMulNBits" in ops or "GatherBlockQuantized" in ops:
            bits = {int(n.attr("bits", 4)) for n in self.graph.nodes if n.op_type == "MatMulNBits"}
            return "/".join(f"int{b}" for b in sorted(bits)) or "int4"
        if ops & _INT8_OPS:
            return "int8"
        names = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
        kinds = sorted({names[t.data_type] for t in self.graph.model.graph.initializer if t.data_type in names})
        return "/".join(kinds) or "fp32"

    def describe(self) -> dict:
        return {"kind": "onnx", "path": self.name, "precision": self.precision(), "nodes": len(self.graph.nodes),
                "explained_by": "onnx-lrp"}

    @property
    def input_names(self) -> list[str]:
        return self.explainer.input_names

    @property
    def output_names(self) -> list[str]:
        return self.explainer.output_names

    def default_output(self) -> str:
        return self.explainer.default_output

    def vocab_size(self) -> int | None:
        """Rows of the embedding table that ``input_ids`` looks up (None without one)."""
        an = self.explainer.analysis
        dims = {t.name: t.dims for t in self.graph.model.graph.initializer}
        for tensor, inp in an.sources.items():
            p = self.graph.producer.get(tensor)
            if inp == "input_ids" and tensor in an.token_axis and p is not None and p.op_type == "Gather":
                if p.inputs[0] in dims:
                    return int(dims[p.inputs[0]][0])
                table = self.graph.constant(p.inputs[0])
                return None if table is None else int(table.shape[0])
        return None

    def config(self) -> dict:
        return {} if self.folder is None else read_json(self.folder / "config.json")

    # ------------------------------------------------------------------ running
    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.explainer.prepare_inputs({k: v for k, v in feeds.items() if k in self.input_names})

    def forward(self, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        return self.explainer.forward(self.prepare(feeds), [output])[output]

    def layout(self, output: str) -> None:
        """Find the cut vertices and block entries for ``output`` (once)."""
        if self._output == output:
            return
        self.cuts, att = cut_points(self.graph, self.explainer.analysis, output)
        self._entries = block_entries(self.cuts, att)
        self._output = output
        if not self._entries:
            raise MismatchError(f"{self.label} ({self.name}): no attention block found between the relevance "
                                f"sources and output {output!r} (is it a transformer?)")

    def cut_values(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Values of the measurable cut vertices (or of ``names``) on ``feeds``."""
        points = [c for c in self.cuts if c.measurable] if names is None else [
            c for c in self.cuts if c.name in names]
        feeds = self.prepare(feeds)
        tensors = list(dict.fromkeys(t for c in points for t in c.value_parts
                                     if t not in self.graph.static and t not in feeds))
        values = {**feeds, **self.explainer.forward(feeds, tensors)}
        out = {}
        for c in points:
            total = 0
            for t in c.value_parts:
                v = values[t] if t in values else self.graph.constant(t)
                total = total + np.asarray(v, dtype=np.float64)
            out[c.name] = total
        return out

    def structural_stream(self, values: dict[str, np.ndarray]) -> list[int]:
        """Indices into ``cuts`` of the stream entering each block, then the stream after the last block (the last
        cut with the stream's shape), each moved back over value-preserving copies."""
        idx = list(self._entries)
        shape = values[self.cuts[idx[0]].name].shape if self.cuts[idx[0]].measurable else None
        last = [k for k in range(idx[-1] + 1, len(self.cuts))
                if self.cuts[k].measurable and values[self.cuts[k].name].shape == shape]
        if not last:
            raise MismatchError(f"{self.label} ({self.name}): no tensor with the residual stream's shape {shape} "
                                "after the last block")
        idx.append(last[-1])
        return [self._before_copies(k, values) for k in idx]

    def _before_copies(self, k: int, values: dict[str, np.ndarray]) -> int:
        while k > 0:
            c, prev = self.cuts[k], self.cuts[k - 1]
            p = self.graph.producer.get(c.name)
            if (not c.is_tensor or p is None or p.op_type not in _COPIES or not prev.measurable
                    or not prev.is_tensor or p.inputs[0] != prev.name
                    or values[prev.name].shape != values[c.name].shape):
                return k
            k -= 1
        return k

    def set_stream(self, indices: list[int]) -> None:
        for k in indices:
            if not self.cuts[k].measurable:
                raise MismatchError(f"{self.label} ({self.name}): the residual stream at {self.cuts[k].name} is a "
                                    "sum inside a fused node whose operands have other readers: its relevance "
                                    "cannot be read")
        self.stream = [self.cuts[k] for k in indices]

    def stream_names(self) -> list[str]:
        return [p.name for p in self.stream or []]

    def explain(self, req: Request) -> Result:
        feeds = self.prepare(req.feeds)
        collect = list(dict.fromkeys(p.grad_of for p in self.stream or []))
        if req.weights is not None:
            res = self.explainer.explain(feeds, output=req.output, output_relevance=req.weights.astype(np.float32),
                                         collect=collect)
        else:
            res = self.explainer.explain(feeds, target=req.targets, position=req.positions, output=req.output,
                                         collect=collect)
        values = self.cut_values(req.feeds, self.stream_names()) if self.stream else {}
        stream_rel = [(values[p.name] * res.latent_gradient[p.grad_of]).astype(np.float32) for p in self.stream or []]
        rel = {k: _sum_channels(np.asarray(v, dtype=np.float64)) for k, v in res.relevance.items()}
        return Result(_rows(res.outputs[req.output].astype(np.float64), req), np.asarray(res.score, np.float64),
                      None if res.target is None else np.asarray(res.target), rel,
                      [values[p.name].astype(np.float32) for p in self.stream or []], stream_rel)

    def close(self) -> None:
        pass


def _sum_channels(r: np.ndarray) -> np.ndarray:
    """Pixel relevance ``(batch, channels, H, W)`` -> the heatmap ``(batch, H, W)``; other arrays unchanged."""
    return r.sum(1) if r.ndim == 4 else r


# ---------------------------------------------------------------------------------------------- PyTorch
class TorchSide:
    """A PyTorch transformers model (a folder, or a ``PreTrainedModel``) explained by LXT 2.1 or
    :mod:`onnx_lrp.reference.torch` (``reference``: ``"auto"``, ``"lxt"`` or ``"torch"``)."""

    kind = "pytorch"

    def __init__(self, model: Any, composite: Any, label: str, reference: str = "auto"):
        from ..reference import lxt

        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            raise ImportError(f"{label} ({model}): a PyTorch side needs torch and transformers: pip install "
                              f"'onnx-lrp[validate]' ({err})") from err
        self.label = label
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.module = None if isinstance(model, (str, os.PathLike)) else model
        if self.module is not None:
            self.folder = None
            self.cfg = self.module.config.to_dict() if hasattr(self.module, "config") else {}
        else:
            self.folder = Path(model)
            self.cfg = read_json(self.folder / "config.json")
        self.model_type = self.cfg.get("model_type", "")
        name = self.name
        if not isinstance(composite, str):
            raise MismatchError(f"{label} ({name}): a PyTorch side takes a composite by name (attnlrp, cp-lrp, "
                                f"vit-lrp, gradient-x-input), not {composite!r}")
        self.composite = composite
        if self.cfg.get("is_encoder_decoder"):
            raise MismatchError(f"{label} ({name}): encoder-decoder models are not supported by validate (their "
                                "ONNX form is two files); explain them with onnx_lrp.seq2seq")
        archs = self.cfg.get("architectures") or []
        self.model_cls = type(self.module).__name__ if self.module is not None else (archs[0] if archs else None)
        if not self.model_cls:
            raise MismatchError(f"{label} ({name}): config.json names no architecture (architectures)")
        family = lxt.family_of(self.model_type) if self.model_type else ""
        lxt_ok = family in lxt.FAMILIES and composite in lxt.COMPOSITES
        if reference == "lxt" and lxt_ok and importlib.util.find_spec("lxt") is None:
            raise ImportError(f"{label} ({name}): LXT is not installed: pip install --no-deps lxt==2.1")
        lxt_ok = lxt_ok and importlib.util.find_spec("lxt") is not None  # "auto" without LXT: the torch reference
        from ..reference.torch import CHECKED_MODEL_TYPES

        torch_ok = self.model_type in CHECKED_MODEL_TYPES and composite in (
            "attnlrp", "cp-lrp", "vit-lrp", "gradient-x-input")
        if reference == "auto":
            reference = "lxt" if lxt_ok else "torch"
        if reference not in ("lxt", "torch"):
            raise ValueError(f"reference must be 'auto', 'lxt' or 'torch', got {reference!r}")
        if (reference == "lxt" and not lxt_ok) or (reference == "torch" and not torch_ok):
            which = "LXT 2.1" if reference == "lxt" else "onnx_lrp.reference.torch"
            hint = ("neither LXT 2.1 nor onnx_lrp.reference.torch explains it" if not (lxt_ok or torch_ok)
                    else f"{which} does not explain it")
            raise MismatchError(
                f"{label} ({name}): model type {self.model_type!r} with composite {composite!r}: {hint}. Export the "
                "model to ONNX and compare ONNX vs ONNX instead (onnx-lrp validate a.onnx b.onnx)")
        self.reference = reference
        self.family = family
        self._model = None
        if reference == "lxt" and self.module is not None:  # LXT loads from a folder, in its worker process
            self._tmp = tempfile.TemporaryDirectory(prefix="onnx-lrp-validate-")
            self.module.save_pretrained(self._tmp.name)
            self.folder = Path(self._tmp.name)

    @property
    def name(self) -> str:
        return str(self.folder) if self.module is None else f"{type(self.module).__name__} (nn.Module)"

    def describe(self) -> dict:
        return {"kind": "pytorch", "path": self.name, "model_type": self.model_type, "class": self.model_cls,
                "explained_by": "LXT 2.1" if self.reference == "lxt" else "onnx_lrp.reference.torch"}

    def vocab_size(self) -> int | None:
        v = self.cfg.get("vocab_size") or (self.cfg.get("text_config") or {}).get("vocab_size")
        return int(v) if v else None

    def config(self) -> dict:
        return self.cfg

    def _torch_model(self):
        from ..reference import torch as ref

        if self._model is None:
            if self.module is not None:
                self._model = self.module.eval()
            else:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                self._model = ref.load(self.model_cls, self.folder)
        return self._model

    @staticmethod
    def _feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in feeds.items() if k in TORCH_INPUTS}

    def forward(self, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        feeds = self._feeds(feeds)
        if self.reference == "lxt":
            from ..reference import lxt

            return lxt.forward(self.family, self.model_cls, self.folder, feeds, output, self.composite)
        import torch

        with torch.no_grad():
            kw = {k: torch.as_tensor(np.array(v)) for k, v in feeds.items()}
            return self._output(self._torch_model()(**kw), output).double().numpy()

    def _output(self, out: Any, name: str):
        try:
            return out[name]
        except KeyError:
            raise MismatchError(f"{self.label} ({self.name}): the PyTorch model has no output {name!r}; it returns "
                                f"{list(out.keys())}") from None

    def explain(self, req: Request) -> Result:
        feeds = self._feeds(req.feeds)
        if self.reference == "lxt":
            from ..reference import lxt

            if "input_ids" not in feeds:
                raise MismatchError(f"{self.label} ({self.name}): LXT explains token inputs only")
            r = lxt.relevance(self.family, self.model_cls, self.folder, feeds["input_ids"],
                              feeds.get("attention_mask"), feeds.get("position_ids"), req.positions, req.targets,
                              self.composite, token_type_ids=feeds.get("token_type_ids"), output=req.output,
                              via_ids=True, weights=req.weights, hidden_states=True)
            rows = r["output"] if req.weights is not None else r["logits"]
            hidden, hidden_rel = list(r["hidden_states"]), list(r["hidden_relevance"])
            rel = {"input_ids": r["relevance"]}
        else:
            from ..reference import torch as ref

            try:
                r = ref.explain(self._torch_model(), feeds, req.output, req.positions, req.targets,
                                weights=req.weights, composite=self.composite, hidden_states=True)
            except KeyError as err:
                raise MismatchError(f"{self.label} ({self.name}): the PyTorch model has no output {err}") from None
            rows = _rows(r["output"], req)
            hidden, hidden_rel = r["hidden_states"], r["hidden_relevance"]
            rel = {k: _sum_channels(v) for k, v in r["relevance"].items()}
        return Result(np.asarray(rows, np.float64), np.asarray(r["score"], np.float64), r.get("targets"), rel,
                      [np.asarray(h, np.float32) for h in hidden], [np.asarray(h, np.float32) for h in hidden_rel])

    def stream_names(self) -> list[str]:
        return []

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_side(model: Any, composite: Any, label: str, reference: str = "auto") -> OnnxSide | TorchSide:
    """An ONNX file, a folder holding ``model.onnx``, a ``ModelProto`` or an :class:`~onnx_lrp.Explainer` ->
    :class:`OnnxSide`; a transformers folder (``config.json``, no ``.onnx``) or a ``torch.nn.Module`` ->
    :class:`TorchSide`."""
    if isinstance(model, (Explainer, onnx.ModelProto)):
        return OnnxSide(model, composite, label)
    if isinstance(model, (str, os.PathLike)):
        p = Path(model).expanduser()
        if p.is_file() or (p.is_dir() and any(p.glob("*.onnx"))):
            return OnnxSide(p / "model.onnx" if (p / "model.onnx").is_file() else p, composite, label)
        if p.is_dir() and (p / "config.json").is_file():
            return TorchSide(p, composite, label, reference)
        raise MismatchError(f"{label}: {model}: no such file, and not a folder with an .onnx file or a transformers "
                            "config.json")
    if type(model).__module__.startswith("torch") or hasattr(model, "state_dict"):
        return TorchSide(model, composite, label, reference)
    raise MismatchError(f"{label}: expected an ONNX path, ModelProto, Explainer, transformers folder or torch module, "
                        f"got {type(model).__name__}")
