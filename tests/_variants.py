"""Other graph shapes of the tiny test models, built from the SAME PyTorch weights as ``tiny_model(family)``.

``variant(family, shape)`` returns the path of an ONNX file, cached next to the default export:

- ``opset14`` / ``opset20``: optimum export at that opset (written-out LayerNorm / a single ``Gelu`` op);
- ``eager``: the model loaded with ``attn_implementation="eager"`` (``Div`` scaling, no ``IsNaN`` guard);
- ``ort``, ``ort0``, ``ort2``: onnxruntime's transformer optimizer at opt_level 1 / 0 / 2 on the default export
  (gpt2 with ``model_type="gpt2"``, everything else ``"bert"``);
- ``past``: optimum task ``text-generation-with-past`` (``past_key_values.*`` inputs, ``present.*`` outputs);
- ``fp16``: the default export converted to float16 (weights and activations; inputs/outputs stay fp32);
- ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` of the PyTorch model (logits only).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from _support import FAMILIES, tiny_model

SHAPES = ("opset14", "opset20", "eager", "ort", "ort0", "ort2", "past", "fp16", "dynamo")


def variant(family: str, shape: str) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown graph shape {shape!r}; shapes are {SHAPES}")
    pt_dir, base = tiny_model(family)
    out_dir = base.parent.parent / "variants" / shape
    path = out_dir / "model.onnx"
    if path.exists():
        return path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    task = FAMILIES[family][2]
    if shape in ("opset14", "opset20", "past"):
        from optimum.exporters.onnx import main_export

        main_export(str(pt_dir), str(out_dir), task=task + ("-with-past" if shape == "past" else ""),
                    library_name="transformers", opset=int(shape[5:]) if shape != "past" else None,
                    no_post_process=True, do_validation=False)
    elif shape == "eager":
        from optimum.exporters.onnx import onnx_export_from_model

        onnx_export_from_model(_load(family, pt_dir, attn_implementation="eager"), str(out_dir), task=task,
                               no_post_process=True, do_validation=False)
    elif shape.startswith("ort"):
        from onnxruntime.transformers.optimizer import optimize_model

        level = {"ort": 1, "ort0": 0, "ort2": 2}[shape]
        opt = optimize_model(str(base), model_type="gpt2" if family == "gpt2" else "bert", num_heads=4,
                             hidden_size=32, opt_level=level)
        opt.save_model_to_file(str(path))
    elif shape == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
        onnx.save(model, str(path))
    elif shape == "dynamo":
        import onnx

        names = [i.name for i in onnx.load(str(base), load_external_data=False).graph.input]
        torch_export(family, pt_dir, path, names)
    return path


def _load(family: str, pt_dir: Path, **kw):
    import torch
    import transformers

    return getattr(transformers, FAMILIES[family][1]).from_pretrained(str(pt_dir), dtype=torch.float32, **kw).eval()


def torch_export(family: str, pt_dir: Path, path: Path, names: list[str], *, dynamo: bool = True,
                 constant_folding: bool = True) -> None:
    """``torch.onnx.export`` of the logits (no optimum), with the inputs ``names`` of the default export: the
    dynamo exporter (torch.export + onnxscript) or, ``dynamo=False``, the TorchScript one."""
    import torch

    model = _load(family, pt_dir)
    extra = {"use_cache": False} if FAMILIES[family][2].startswith("text-generation") else {}

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *tensors):
            return self.m(**dict(zip(names, tensors)), **extra).logits

    ids = torch.randint(3, 100, (2, 9))
    make = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(9).repeat(2, 1),
            "token_type_ids": torch.zeros_like(ids)}
    args = tuple(make[n] for n in names)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(Logits(model), args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                          dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),), external_data=False,
                          do_constant_folding=constant_folding)
    else:
        with _traceable_masks():
            torch.onnx.export(Logits(model), args, str(path), dynamo=False, input_names=names,
                              output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                              opset_version=17, do_constant_folding=constant_folding)


@contextlib.contextmanager
def _traceable_masks():
    """transformers >= 4.53 builds attention masks with ``torch.vmap`` (and packed-sequence ids with
    ``torch.diff``), which TorchScript cannot trace ("unordered_map::at"): swap in optimum's vectorised mask
    functions for the export, as optimum's own patcher does."""
    import transformers.masking_utils as mu
    from optimum.exporters.onnx import model_patcher as mp

    saved = mu.find_packed_sequence_indices
    mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mp.sdpa_mask_without_vmap)
    mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", mp.eager_mask_without_vmap)
    mu.find_packed_sequence_indices = mp.find_packed_sequence_indices_patched
    try:
        yield
    finally:
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mu.sdpa_mask)
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", mu.eager_mask)
        mu.find_packed_sequence_indices = saved


def seq2seq_model(family: str = "t5", seed: int = 0) -> tuple[Path, Path, Path]:
    """(pytorch folder, encoder_model.onnx, decoder_model.onnx) of a tiny encoder-decoder model (cached)."""
    from _support import CACHE, _key, randomize_

    cfg_cls, model_cls, task, cfg = FAMILIES[family]
    root = CACHE / _key(family, cfg, {"seed": seed, "files": "encoder+decoder"})
    pt_dir, onnx_dir = root / "pt", root / "onnx"
    enc, dec = onnx_dir / "encoder_model.onnx", onnx_dir / "decoder_model.onnx"
    if enc.exists() and dec.exists():
        return pt_dir, enc, dec
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg)).eval()
    randomize_(model, seed)
    model.save_pretrained(pt_dir)
    main_export(str(pt_dir), str(onnx_dir), task=task, library_name="transformers", no_post_process=True,
                do_validation=False)
    return pt_dir, enc, dec


def mixtral_model(seed: int = 0, task: str = "text-generation") -> tuple[Path, Path]:
    """(pytorch folder, model.onnx) of a tiny Mixtral exported with ``onnx_lrp.exporters.mixtral`` (cached)."""
    from _support import CACHE, _key, randomize_

    cfg_cls, model_cls, _, cfg = FAMILIES["mixtral"]
    root = CACHE / _key("mixtral", cfg, {"seed": seed, "exporter": "onnx_lrp", "task": task})
    pt_dir, path = root / "pt", root / "onnx" / "model.onnx"
    if path.exists():
        return pt_dir, path
    import torch
    import transformers
    from onnx_lrp.exporters.mixtral import export_mixtral

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg)).eval()
    randomize_(model, seed)
    model.save_pretrained(pt_dir)
    export_mixtral(pt_dir, path.parent, task=task)
    return pt_dir, path
