"""Rules: small parameter objects that say how relevance passes one node (or one pattern of nodes).

The engine propagates the *modified gradient* ``G`` (Arras et al. 2025, arXiv 2502.15886): relevance of a
tensor ``t`` is ``R_t = t * G_t``. Each rule states which modification of the ordinary vector-Jacobian
product it applies; the op implementations in :mod:`onnx_lrp.ops` read the rule to choose their backward.

Which rule a node gets is decided by a :class:`~onnx_lrp.composites.Composite` from the node's *kind*
(``linear``, ``add``, ``product``, ``unary``, ``softmax``, ``norm``, ``reduce``, ``movement``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """Base class of all rules."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Gradient(Rule):
    """The ordinary vector-Jacobian product (Gradient x Input when read as ``t * G``)."""


@dataclass(frozen=True)
class Epsilon(Rule):
    """eps-LRP for a linear map ``z = W x + b`` (AttnLRP Eq. 4): ``R_x = x * W^T (R_z / stab(z))``.

    Gradient form: ``G_x = W^T (G_z * z / stab(z))`` with ``stab(z) = z + eps * sign(z)``, ``sign(0)=1``.
    ``epsilon=0`` is the plain gradient (what LXT's efficient engine uses); the bias absorbs its share.
    The stabiliser is applied once per *layer*, independent of how a graph splits it into nodes: ``z`` is a
    linear map's output with its bias (``MatMul`` + bias ``Add`` = ``Gemm``), or a whole chain of sums
    (``word + segment + position``, residuals, also inside ``SkipLayerNormalization``), or a pooling. Scaling or
    shifting by a tensor that carries no relevance (attention scale and mask, GELU's ``0.5``) is no layer: an
    ``Epsilon`` there passes the gradient unchanged (see ``onnx_lrp._engine._epsilon_site``).
    """

    epsilon: float = 0.0


@dataclass(frozen=True)
class Gamma(Rule):
    """gamma-LRP for linear/conv layers: ``R_x = x * ((W + g W+)^T (R_z / stab(z + g z+)))``."""

    gamma: float = 0.25
    epsilon: float = 1e-6


@dataclass(frozen=True)
class Uniform(Rule):
    """Uniform rule for products of N carrying factors (AttnLRP Prop. 3.2 / 3.3, Eq. 7).

    Each factor receives ``R_y / N``; gradient form: each factor gets its ordinary partial gradient / N.
    A division ``a / b`` with carrying ``b`` is ``a * (1/b)`` with the identity rule on ``1/b``.
    """


@dataclass(frozen=True)
class Identity(Rule):
    """Identity rule for an element-wise non-linearity ``y = f(x)`` (AttnLRP Eq. 9): ``R_x = R_y``.

    Gradient form: ``G_x = G_y * f(x) / (x + epsilon)`` (LXT uses a plain ``+1e-10``). A non-linearity
    written out as several element-wise ops (Erf-GELU, tanh-GELU, ``x * sigmoid(x)``) is one region.
    """

    epsilon: float = 1e-10


@dataclass(frozen=True)
class ConstantStatistic(Rule):
    """Identity rule for normalisation (AttnLRP Prop. 3.4): the statistic (``1/sigma``) is a constant.

    LayerNorm keeps the mean: ``y = w * (x - mean(x)) / sigma + b`` is then linear in ``x``;
    RMSNorm ``y = w * x / rms`` gives ``G_x = w * G_y / rms``.
    """


@dataclass(frozen=True)
class Constant(Rule):
    """The node's output is a constant for the rules: no relevance flows back through it.

    CP-LRP (Ali et al. 2022) puts it on ``Softmax`` (attention weights are constants).
    """


@dataclass(frozen=True)
class ConstantGate(Rule):
    """Products where the factor computed by a non-linearity (activation, softmax, top-k routing) is a
    constant and the other factor takes all relevance (CP-LRP for gated MLPs and MoE routing)."""

