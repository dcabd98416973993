"""AttnLRP rules, one module per op family; each op type is declared once, keyed by (domain, op type), with its kind,
its builder and what the analysis needs (:class:`~onnx_lrp.ops._base.OpSpec`, :func:`register`).

=====================  =========================================================================
module                 op types
=====================  =========================================================================
``linear``             MatMul, Gemm, Conv, ConvTranspose, Einsum, com.microsoft FusedMatMul
``elementwise``        Add, Sub, Sum, Mul, Div, Where, Max, Min
``activation``         Erf, Tanh, Sigmoid, Relu, Gelu, FastGelu, BiasGelu, QuickGelu, Pow, ... and
                       unary regions (non-linearities written out as several ops)
``softmax``            Softmax, LogSoftmax
``normalization``      LayerNormalization, SimplifiedLayerNormalization, RMSNormalization, Skip* forms,
                       InstanceNormalization, GroupNormalization, BatchNormalization (inference)
``reduction``          ReduceSum, ReduceMean, GlobalAveragePool, ReduceL2, ReduceSumSquare, ReduceMax/Min
``pooling``            AveragePool, MaxPool, GlobalMaxPool, GlobalLpPool
``resize``             Resize (the kernel's own interpolation matrices)
``movement``           Reshape, Transpose, Slice, Gather, Concat, Split, Expand, Tile, Pad, Scatter*, TopK, ...;
                       ops whose outputs never carry relevance (Shape, Equal, ArgMax, ...)
``fused``              com.microsoft Attention, RotaryEmbedding; (Q)EmbedLayerNormalization (expanded)
``contrib_attention``  com.microsoft GroupQueryAttention, MultiHeadAttention
``recurrent``          LSTM, GRU, RNN, com.microsoft DynamicQuantizeLSTM (unrolled; gates held constant)
``qdq``                QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear (activation quantisation:
                       straight-through)
``quantized``          int8/int4 linear layers through their dequantised weight: MatMulInteger,
                       ConvInteger, QLinearMatMul, QLinearConv; com.microsoft MatMulNBits,
                       MatMulIntegerToFloat, DynamicQuantizeMatMul, QGemm, QAttention
=====================  =========================================================================

Add a rule for a new op type with :func:`register` in the module of its family (see :mod:`onnx_lrp.ops._base`
for the contract).
"""
from ._base import REGISTRY, NodeView, OpContext, OpSpec, declare, known_op_types, register, spec_of
from . import (  # noqa: F401
    activation, contrib_attention, elementwise, fused, linear, movement, normalization, pooling, qdq, quantized,
    recurrent, reduction, resize, softmax,
)
from .activation import region_backward

__all__ = ["REGISTRY", "NodeView", "OpContext", "OpSpec", "declare", "known_op_types", "register", "region_backward",
           "spec_of"]
