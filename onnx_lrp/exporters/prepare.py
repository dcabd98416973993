"""Fuse written-out normalisations and GELU into single ops, keeping attention explicit.

optimum's exports write RMSNorm as ``Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul``, LayerNorm (opset < 17) as
``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add`` and exact GELU (opset < 20) as
``Div, Erf, Add, Mul, Mul``. :func:`prepare` replaces them by ``SimplifiedLayerNormalization``,
``LayerNormalization`` and ``com.microsoft`` ``Gelu`` / ``FastGelu`` with onnxruntime's transformer optimizer,
with every fusion that would hide attention (``Attention``, ``RotaryEmbedding``, ``Skip*``/``Embed*`` norms,
``BiasGelu``) switched off, then checks the op types of the result. Relevance is unchanged (the fused ops get
the same rules as their written-out forms); the graph is smaller and a little faster to explain.
"""
from __future__ import annotations

import copy
import os
from collections import Counter

import onnx

from ..errors import ModelLoadError

#: FusionOptions switched off: they would fuse attention or hide residual adds / embeddings in one op
DISABLED_FUSIONS = (
    "enable_attention", "enable_rotary_embeddings", "enable_skip_layer_norm", "enable_bias_skip_layer_norm",
    "enable_embed_layer_norm", "enable_bias_gelu", "enable_qordered_matmul", "enable_gemm_fast_gelu",
    "use_multi_head_attention",
)
#: op types that must not appear in a prepared graph
FORBIDDEN_OPS = {
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "RotaryEmbedding",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
    "QOrderedMatMul", "GemmFastGelu", "SparseAttention", "DecoderMaskedMultiHeadAttention",
}


def prepare(model: str | os.PathLike | onnx.ModelProto, *, model_type: str = "bert",
            inplace: bool = False) -> onnx.ModelProto:
    """Return a copy of ``model`` with norms and GELU fused and attention kept as ``MatMul`` + ``Softmax``.

    model: a path or a ``ModelProto`` (copied unless ``inplace``).

    model_type: onnxruntime optimizer's model type; ``"bert"`` (default) fuses LayerNorm, RMSNorm
        (``SimplifiedLayerNormalization``) and GELU for all optimum decoder and encoder exports; ``"gpt2"``
        also fuses GPT-2's tanh GELU into ``FastGelu``.

    Raises :class:`~onnx_lrp.errors.ModelLoadError` if a forbidden fusion (attention, rotary, skip norms)
    shows up anyway.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if isinstance(model, onnx.ModelProto):
        proto = model if inplace else copy.deepcopy(model)
        where = "ModelProto"
    else:
        where = str(model)
        proto = onnx.load(where)
    opts = FusionOptions(model_type)
    for name in DISABLED_FUSIONS:
        if hasattr(opts, name):
            setattr(opts, name, False)
    opts.enable_layer_norm = True
    opts.enable_gelu = True
    opts.enable_gelu_approximation = False
    optimized = optimize_model(proto, model_type=model_type, optimization_options=opts, opt_level=0)
    out = optimized.model
    bad = sorted({n.op_type for n in out.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ModelLoadError(f"{where}: prepare fused {bad}, which would hide attention or residuals; "
                             f"use another model_type than {model_type!r}")
    return out


def op_counts(model: onnx.ModelProto) -> Counter:
    """Op types of the main graph and how often each occurs (to see what :func:`prepare` fused)."""
    return Counter(n.op_type for n in model.graph.node)
