"""ONNX export of transformers models with optimum's exporter (torch, transformers, optimum-onnx needed)."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..progress import step

#: files a tokenizer / processor may consist of (copied next to the ONNX file)
PREPROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
)


def _missing_extra(err: ImportError) -> ImportError:
    return ImportError(
        f"exporting needs torch, transformers and optimum-onnx ({err}); install them with "
        "`pip install 'onnx-lrp[export]'`"
    )


def export(
    source: Any,
    out_dir: str | os.PathLike,
    task: str = "auto",
    *,
    opset: int | None = None,
    tokenizer: Any = None,
    processor: Any = None,
    validate: bool = False,
) -> Path:
    """Export a transformers model to ``out_dir/model.onnx`` and save its tokenizer / processor next to it.

    source: a transformers model folder (``config.json`` + weights) or an in-memory ``PreTrainedModel``.
    task: optimum task (``"text-generation"``, ``"text-classification"``, ``"feature-extraction"``,
        ``"image-classification"``, ...); ``"auto"`` infers it from the model. Causal LMs are exported without
        a key/value cache (one graph with ``input_ids``, ``attention_mask``, ``position_ids``).
    tokenizer / processor: saved to ``out_dir`` (default: the ones found in the source folder).
    validate: let optimum compare ONNX and PyTorch outputs (slow for large models).
    Returns the path of ``model.onnx``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401
        from optimum.exporters.onnx import main_export, onnx_export_from_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise _missing_extra(err) from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(opset=opset, no_post_process=True, do_validation=validate)
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a transformers model folder (no config.json)")
        if task == "auto":  # optimum cannot infer a local folder's task
            task = task_from_config(folder)
        with step(f"exporting {folder} to ONNX (task {task})"), quiet_libraries():
            main_export(str(folder), str(out), task=task, library_name="transformers", **kw)
        _copy_preprocessor_files(folder, out)
    else:
        if not hasattr(source, "config") or not hasattr(source, "forward"):
            raise TypeError(f"source must be a model folder or a transformers PreTrainedModel, got {type(source)}")
        if task == "auto":
            from optimum.exporters.tasks import TasksManager

            task = TasksManager.infer_task_from_model(source)
        with step(f"exporting {type(source).__name__} to ONNX (task {task})"), quiet_libraries():
            onnx_export_from_model(source.eval(), str(out), task=task, **kw)
    for pre in (tokenizer, processor):
        if pre is not None:
            pre.save_pretrained(str(out))
    path = out / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"optimum wrote no model.onnx into {out}: {sorted(p.name for p in out.iterdir())}")
    return path


def task_from_config(folder: Path) -> str:
    """The optimum task of a transformers folder, from the model class ``config.json`` names
    (``architectures``), e.g. ``LlamaForCausalLM`` -> ``text-generation``."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{folder / 'config.json'}: not a readable JSON file ({exc})") from None
    archs = config.get("architectures") or [] if isinstance(config, dict) else []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{folder}: cannot infer the task: config.json names no transformers model class "
                         f"(architectures: {archs}); give it (--task text-generation, text-classification, "
                         "feature-extraction, image-classification, ...)")
    try:
        return TasksManager.infer_task_from_model(cls)
    except Exception as exc:  # optimum raises KeyError/ValueError for classes it has no task for
        raise ValueError(f"{folder}: cannot infer the task of {archs[0]} ({exc}); give it with --task") from None


def _copy_preprocessor_files(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor files optimum did not save (it skips some, e.g. chat templates)."""
    for name in PREPROCESSOR_FILES:
        f = src / name
        if f.is_file() and not (dst / name).exists():
            shutil.copy2(f, dst / name)



@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the tracer warnings and transformers' info messages of a conversion / export (errors still show)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_logging:
            hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            if hf_logging:
                hf_logging.set_verbosity(level)
