"""Exceptions raised by onnx-lrp. Every error names what is wrong and where."""
from __future__ import annotations


class OnnxLrpError(Exception):
    """Base class of every error onnx-lrp raises on purpose."""


class ModelLoadError(OnnxLrpError, ValueError):
    """The model file or object cannot be read as an ONNX model."""


class UnsupportedOpError(OnnxLrpError):
    """The graph holds relevance-carrying ops that have no rule.

    ``ops`` maps each op type to the names of the nodes that use it.
    """

    def __init__(self, ops: dict[str, list[str]], where: str = "model"):
        self.ops = ops
        lines = [
            f"  {op} (e.g. node {names[0]!r}; {len(names)} node(s)){_HINTS.get(op, '')}"
            for op, names in sorted(ops.items())
        ]
        super().__init__(
            f"{where}: {len(ops)} op type(s) on the relevance path have no LRP rule:\n"
            + "\n".join(lines)
            + "\nRegister a rule with onnx_lrp.ops.register(op_type), or pass allow_unsupported=True "
            "to treat them as constants (no relevance flows through them)."
        )


_HINTS = {
    "If": " - control flow: tensors inside subgraphs cannot be explained; export decoders without merging "
    "(optimum: --no-post-process / no_post_process=True)",
    "Loop": " - control flow: tensors inside subgraphs cannot be explained",
    "Scan": " - control flow: tensors inside subgraphs cannot be explained",
    **{op: " - an int8 element-wise op of the QOperator format (or of onnxruntime's optimizer run on a QDQ file): "
           "explain the QDQ file (quantize_static(..., quant_format=QuantFormat.QDQ)) before that optimizer runs"
       for op in ("QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearSoftmax", "QLinearConcat", "QLinearLeakyRelu",
                  "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearWhere")},
}


class InputError(OnnxLrpError, ValueError):
    """The inputs given to ``explain`` do not fit the model."""


class TargetError(OnnxLrpError, ValueError):
    """The target, position or output to explain is invalid."""


class ConfigError(OnnxLrpError, ValueError):
    """A composite, rule, override or option is invalid for this model (names nothing, does not fit, ...)."""


class RelevanceWarning(UserWarning):
    """The relevance is implausible for the rules used (e.g. far from conserving the explained score)."""


class ResourceError(OnnxLrpError, MemoryError):
    """The explanation needs more memory than is available (estimated before running, or onnxruntime failed to
    allocate). The message names the input size, the estimated need, the memory available and what helps."""


class DatasetError(OnnxLrpError):
    """A corpus run cannot go on: a bad row with ``on_error="fail"``, an output folder holding another run, a
    worker that keeps failing."""
