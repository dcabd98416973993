"""Composites: maps from node kinds, op types and node-name patterns to rules (in the spirit of zennit).

A node's *kind* is decided by graph analysis from which of its inputs carry relevance:

========== =================================================================================
kind       nodes
========== =================================================================================
linear     MatMul/Gemm/Conv/Einsum with one carrying operand; Mul/Div by a constant; Add/Sub of
           a constant (bias)
add        Add/Sub/Sum of several carrying tensors (residual connections)
product    Mul/Div/MatMul/Einsum of several carrying tensors (``Q K^T``, ``A V``, ``gate * up``)
unary      element-wise non-linearities, including ones written out as several ops
softmax    Softmax, LogSoftmax
norm       LayerNormalization, SimplifiedLayerNormalization and Skip/Embed forms; the variance
           statistic of written-out norms
reduce     ReduceSum/ReduceMean (pooling)
movement   everything else (Reshape, Transpose, Gather, Slice, Concat, Where, ...): plain routing
========== =================================================================================

How relevance is read at a source ``x`` with modified gradient ``G`` is the composite's ``reading``:
``"input_x_gradient"`` (default, every LRP composite): ``R = x * G``, a token's relevance is the sum over the
hidden axis; ``"gradient"`` (saliency): ``R = G``, a token's relevance is ``||G||_2`` over the hidden axis.

Lookup order for a node: name-pattern overrides (``fnmatch`` on the node name, first match wins), then
op-type overrides, then the kind map. An override applies only where its rule fits the node's kind
(:data:`APPLICABLE`): ``{"/model/layers.0/*": Gradient()}`` changes every node there, while
``{"/model/layers.0/*": Epsilon(0.1)}`` changes only the linear maps, sums and pools there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping

from .rules import (
    Constant,
    ConstantGate,
    ConstantStatistic,
    Epsilon,
    Gamma,
    Gradient,
    Identity,
    Rule,
    Uniform,
)

READINGS = ("input_x_gradient", "gradient")
KINDS = ("linear", "add", "product", "unary", "softmax", "norm", "reduce", "movement")
# which rules fit which kind; an override that does not fit a node's kind does not apply to it
APPLICABLE: dict[str, tuple[type, ...]] = {
    "linear": (Epsilon, Gamma, Gradient, Constant),
    "add": (Epsilon, Gradient, Constant),
    "product": (Uniform, ConstantGate, Gradient, Constant),
    "unary": (Identity, Gradient, Constant),
    "softmax": (Gradient, Constant),
    "norm": (ConstantStatistic, Gradient),
    "reduce": (Epsilon, Gradient, Constant),
    "movement": (Gradient, Constant),
}


@dataclass
class Composite:
    """Rule map. ``kinds`` maps kind -> rule; ``overrides`` maps an op type (``"Softmax"``) or a node-name
    pattern (``"/model/layers.0/*"``) -> rule. Patterns are recognised by containing ``/``, ``*``, ``?``
    or ``[``; anything else is an op type. ``reading`` says how relevance is read at the sources:
    ``"input_x_gradient"`` (``R = x * G``) or ``"gradient"`` (``R = G``; token relevance ``||G||_2``)."""

    name: str
    kinds: dict[str, Rule]
    overrides: dict[str, Rule] = field(default_factory=dict)
    reading: str = "input_x_gradient"

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ValueError(f"composite {self.name!r}: unknown reading {self.reading!r}; readings are {READINGS}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown node kind(s) {sorted(unknown)}; kinds are {KINDS}")
        for k in KINDS:
            self.kinds.setdefault(k, Gradient())
        for key, rule in list(self.kinds.items()) + list(self.overrides.items()):
            if not isinstance(rule, Rule):
                raise TypeError(f"composite {self.name!r}: {key!r} maps to {rule!r}, which is not a Rule")

    def rule_for(self, kind: str, op_type: str, node_name: str) -> Rule:
        fits = APPLICABLE[kind]
        for pattern, rule in self.overrides.items():
            if _is_pattern(pattern) and isinstance(rule, fits) and fnmatchcase(node_name, pattern):
                return rule
        rule = self.overrides.get(op_type)
        if rule is not None and isinstance(rule, fits):
            return rule
        rule = self.kinds[kind]
        if not isinstance(rule, fits):
            raise ValueError(f"composite {self.name!r}: rule {rule.name} for kind {kind!r} does not fit it; "
                             f"use one of {[r.__name__ for r in fits]}")
        return rule

    def with_overrides(self, overrides: Mapping[str, Rule]) -> "Composite":
        """A copy of this composite with more overrides (these take precedence)."""
        merged = dict(overrides)
        for k, v in self.overrides.items():
            merged.setdefault(k, v)
        return Composite(self.name, dict(self.kinds), merged, self.reading)


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "/*?[")


def attnlrp(epsilon: float = 0.0, identity_epsilon: float = 1e-10) -> Composite:
    """AttnLRP (Achtibat et al. 2024) as LXT's efficient engine applies it to LLMs."""
    return Composite(
        "attnlrp",
        {
            "linear": Epsilon(epsilon),
            "add": Epsilon(epsilon),
            "product": Uniform(),
            "unary": Identity(identity_epsilon),
            "softmax": Gradient(),
            "norm": ConstantStatistic(),
            "reduce": Epsilon(epsilon),
            "movement": Gradient(),
        },
    )


def cp_lrp(epsilon: float = 0.0, identity_epsilon: float = 1e-10) -> Composite:
    """CP-LRP (Ali et al. 2022): attention weights and gates are constants; norms as in AttnLRP."""
    comp = attnlrp(epsilon, identity_epsilon)
    comp.name = "cp-lrp"
    comp.kinds["softmax"] = Constant()
    comp.kinds["product"] = ConstantGate()
    return comp


def gradient_x_input() -> Composite:
    """Gradient x Input: the ordinary gradient everywhere, relevance read as ``x * grad``."""
    return Composite("gradient-x-input", {k: Gradient() for k in KINDS})


def gradient() -> Composite:
    """The plain gradient (saliency); relevance is the gradient itself, not times the input."""
    return Composite("gradient", {k: Gradient() for k in KINDS}, reading="gradient")


def vit_lrp(conv_gamma: float = 0.25, linear_gamma: float = 0.05) -> Composite:
    """LXT's choice for vision transformers: gamma rule on Conv/linear layers, CP-LRP attention."""
    comp = cp_lrp()
    comp.name = "vit-lrp"
    comp.kinds["linear"] = Gamma(linear_gamma)
    comp.overrides["Conv"] = Gamma(conv_gamma)
    return comp


PRESETS = {
    "attnlrp": attnlrp,
    "cp-lrp": cp_lrp,
    "gradient-x-input": gradient_x_input,
    "gradient": gradient,
    "vit-lrp": vit_lrp,
}


def get_composite(composite: "str | Composite", overrides: Mapping[str, Rule] | None = None) -> Composite:
    """Resolve a preset name or a Composite; apply extra overrides."""
    if isinstance(composite, str):
        key = composite.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown composite {composite!r}; choose one of {sorted(PRESETS)} or pass a Composite")
        comp = PRESETS[key]()
    elif isinstance(composite, Composite):
        comp = Composite(composite.name, dict(composite.kinds), dict(composite.overrides), composite.reading)
    else:
        raise TypeError(f"composite must be a preset name or a Composite, got {type(composite).__name__}")
    if overrides:
        comp = comp.with_overrides(overrides)
    return comp
