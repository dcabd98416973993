"""Rules: small parameter objects that say how relevance passes one node (or one pattern of nodes), and carry
the maths of their modification once.

The engine propagates the *modified gradient* ``G`` (Arras et al. 2025, arXiv 2502.15886): relevance of a
tensor ``t`` is ``R_t = t * G_t``. Each rule states which modification of the ordinary vector-Jacobian
product it applies; the op implementations in :mod:`onnx_lrp.ops` read the rule and call its methods
(``Epsilon.output_scale``, ``Gamma.weight`` / ``Gamma.output_scale``, ``Identity.ratio``, ``Uniform.share``), so
that every op family applies the same formula.

Which rule a node gets is decided by a :class:`~onnx_lrp.composites.Composite` from the node's *kind*
(:data:`onnx_lrp.composites.KINDS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np


def stabilise(z: Any, eps: float) -> Any:
    """The eps-LRP denominator ``stab(z) = z + eps * sign(z)`` with ``sign(0) = 1`` (numpy or CuPy arrays).

    ``z + 0.0`` turns ``-0.0`` into ``+0.0``, whose sign ``copysign`` then reads as positive: three passes, no
    boolean or integer temporaries (2-4x faster than the ``(z >= 0)``-times-two form on float32;
    ``benchmarks/bench_kernels.py``)."""
    xp = _array_module(z)
    d = xp.empty_like(z)
    xp.add(z, 0.0, out=d)
    xp.copysign(eps, d, out=d)
    d += z
    return d


def _array_module(a: Any) -> Any:
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy
    return np


@dataclass(frozen=True)
class Rule:
    """Base class of all rules. Parameters are validated when a rule is made (finite, in range)."""

    # parameters that are a denominator's only guard: 0 would divide by zero where the input is 0
    _POSITIVE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{type(self).__name__}: {f.name} must be a number, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{type(self).__name__}: {f.name} must be a finite number >= 0, got {v!r}")
            if v == 0 and f.name in self._POSITIVE:
                raise ValueError(f"{type(self).__name__}: {f.name} must be > 0 (it keeps the denominator away "
                                 f"from 0 where the input is 0), got {v!r}")

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
    ``Epsilon`` there passes the gradient unchanged (see :func:`onnx_lrp._patterns.epsilon_site`).
    """

    epsilon: float = 0.0

    def output_scale(self, z: Any) -> Any:
        """``z / stab(z)``: what ``G_z`` is multiplied by before the linear map's transpose."""
        return z / stabilise(z, self.epsilon)


@dataclass(frozen=True)
class Gamma(Rule):
    """gamma-LRP for linear/conv layers: ``R_x = x * ((W + g W+)^T (R_z / stab(z + g z+)))`` with ``W+`` the
    positive part of the weight and ``z+ = W+ x + b+``.

    Gradient form: ``G_x = (W + g W+)^T (G_z * z / stab(z + g z+))``: :meth:`weight` gives the modified weight,
    :meth:`output_scale` the factor on ``G_z``; each layer type computes ``z+`` with its own map."""

    gamma: float = 0.25
    epsilon: float = 1e-6
    _POSITIVE: ClassVar[tuple[str, ...]] = ("epsilon",)

    def weight(self, W: Any) -> Any:
        """``W + gamma * W+`` (numpy or CuPy)."""
        return W + self.gamma * W.clip(0, None)

    @staticmethod
    def positive(W: Any) -> Any:
        """``W+`` (also for a bias: ``b+``)."""
        return W.clip(0, None)

    def output_scale(self, z: Any, zplus: Any) -> Any:
        """``z / stab(z + gamma * z+)``."""
        return z / stabilise(z + self.gamma * zplus, self.epsilon)


@dataclass(frozen=True)
class Uniform(Rule):
    """Uniform rule for products of N carrying factors (AttnLRP Prop. 3.2 / 3.3, Eq. 7).

    Each factor receives ``R_y / N``; gradient form: each factor gets its ordinary partial gradient / N.
    A division ``a / b`` with carrying ``b`` is ``a * (1/b)`` with the identity rule on ``1/b``.
    """

    @staticmethod
    def share(n: int) -> float:
        return 1.0 / n


@dataclass(frozen=True)
class Identity(Rule):
    """Identity rule for an element-wise non-linearity ``y = f(x)`` (AttnLRP Eq. 9): ``R_x = R_y``.

    Gradient form: ``G_x = G_y * f(x) / stab(x)`` with the sign-aware ``stab(x) = x + epsilon * sign(x)`` (never 0;
    LXT adds a plain ``+1e-10``, the same but at ``x = -1e-10``, where it divides by zero). Sound only where
    ``f(0) = 0`` and ``f(x)/x`` stays bounded (GELU, SiLU, tanh, ReLU, ...): the analysis gives it to such
    functions only (kind ``unary``), also when written out as several element-wise ops (Erf-GELU, tanh-GELU,
    ``x * sigmoid(x)``: one region).
    """

    epsilon: float = 1e-10
    _POSITIVE: ClassVar[tuple[str, ...]] = ("epsilon",)

    def ratio(self, x: Any, y: Any) -> Any:
        """``f(x) / stab(x)``: what ``G_y`` is multiplied by."""
        return y / stabilise(x, self.epsilon)


@dataclass(frozen=True)
class ConstantStatistic(Rule):
    """Identity rule for normalisation (AttnLRP Prop. 3.4): the statistic (``1/sigma``) is a constant.

    LayerNorm keeps the mean: ``y = w * (x - mean(x)) / sigma + b`` is then linear in ``x``;
    RMSNorm ``y = w * x / rms`` gives ``G_x = w * G_y / rms``. Written-out norms are recognised by their maths
    (a second-moment statistic of ``x`` that makes the product scale-invariant, :mod:`onnx_lrp._patterns`).
    """


@dataclass(frozen=True)
class Constant(Rule):
    """The node's output is a constant for the rules: no relevance flows back through it.

    CP-LRP (Ali et al. 2022) puts it on attention ``Softmax`` (attention weights are constants).
    """


@dataclass(frozen=True)
class ConstantGate(Rule):
    """Products where the gating factor is a constant and the other factor takes all relevance ("signal takes
    it all", Arras et al. 2017 for LSTMs; CP-LRP for gated MLPs and MoE routing). Which factor is the gate is
    decided by the analysis: under kind ``gate`` the output of a non-zero-centred function (a sigmoid gate);
    under kind ``product`` (CP-LRP) a factor computed by any non-linearity (activation, softmax, top-k)."""
