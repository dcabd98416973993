"""Getting real models into ONNX form for onnx-lrp (needs the ``export`` extra: torch, transformers, optimum).

* :func:`export` - a transformers folder or in-memory ``PreTrainedModel`` -> ``out_dir/model.onnx`` with the
  tokenizer / image processor saved next to it (optimum's ONNX exporter).
* :func:`prepare` - fuse written-out RMSNorm / LayerNorm / GELU into single ops, attention kept explicit.
* :mod:`onnx_lrp.exporters.assets` - offline real models: :func:`smollm2`, :func:`minilm`,
  :func:`paraphrase_minilm`, :func:`minilm_sentiment` (built by ``benchmarks/finetune_minilm.py``).
* :mod:`onnx_lrp.exporters.mixtral` - :func:`~onnx_lrp.exporters.mixtral.export_mixtral`: exporters for architectures that the standard ONNX
  exporters refuse or export wrongly; import it explicitly.

torch and transformers are imported only when a function that needs them is called.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .assets import minilm, minilm_sentiment, paraphrase_minilm, smollm2
from .prepare import prepare  # onnx only at import; onnxruntime's optimizer is imported when called


def export(source: Any, out_dir: str | os.PathLike, task: str = "auto", **kwargs: Any) -> Path:
    """Export ``source`` (folder or ``PreTrainedModel``) to ``out_dir/model.onnx``; see :func:`._optimum.export`."""
    from ._optimum import export as _export

    return _export(source, out_dir, task=task, **kwargs)


__all__ = ["export", "prepare", "smollm2", "minilm", "minilm_sentiment", "paraphrase_minilm"]
