"""Cross-framework validation: does the ONNX file you ship still decide for the same reasons as the model you
trained? Explain the same inputs with two models and measure where their explanations agree.

>>> from onnx_lrp.validate import compare
>>> report = compare("hf_model/", "model.int8.onnx", texts=["..."], composite="attnlrp")
>>> report.summary(); report.worst(5); report.to_html("report.html"); report.passed

Either side may be an ONNX file (fp32, fp16, int8/int4, onnxruntime-optimised, another exporter's graph) or the
PyTorch original (a transformers folder or ``PreTrainedModel``; needs ``pip install 'onnx-lrp[validate]'``),
explained with LXT 2.1 where it supports the family, else with :mod:`onnx_lrp.reference.torch`. Measured: output
agreement, relevance agreement per source input, and relevance along the residual stream after each block
(found from the graph's structure: :mod:`onnx_lrp.validate._residual`), pointing at the first block where the
two part. See docs/validate.md.
"""
from ._compare import compare
from ._report import Report, parse_thresholds
from ._sides import MismatchError

__all__ = ["compare", "Report", "MismatchError", "parse_thresholds"]
