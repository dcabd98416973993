"""Composites: maps from node kinds, op types and node names to rules (in the spirit of zennit).

A node's *kind* is decided by graph analysis (:mod:`onnx_lrp._analysis`) from its op's declaration
(:mod:`onnx_lrp.ops`), which of its inputs carry relevance, and the structure around it
(:mod:`onnx_lrp._patterns`). :data:`KINDS` lists every kind with the rules that fit it.

How relevance is read at a source ``x`` with modified gradient ``G`` is the composite's ``reading``:
``"input_x_gradient"`` (default, every LRP composite): ``R = x * G``, a token's relevance is the sum over the
hidden axis; ``"gradient"`` (saliency): ``R = G``, a token's relevance is ``||G||_2`` over the hidden axis.

Overrides name what they change explicitly: ``"op:MatMul"`` (every node of that op type), ``"node:NAME"``
(node names, ``fnmatch`` patterns allowed: ``"node:/model/layers.0/*"``). A bare key is accepted when it is
unambiguous for the model: an op type onnx-lrp knows, or else a node name/pattern of the graph; a key that matches
nothing, or both, is an error when the :class:`~onnx_lrp.Explainer` is built. Lookup order for a node: node
overrides (first match wins), then op-type overrides, then the kind map. An override applies only where its rule
fits the node's kind (``{"node:/model/layers.0/*": Epsilon(0.1)}`` changes only the linear maps, sums and pools
there); an override whose rule fits none of the nodes it names is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, NamedTuple

from .errors import ConfigError
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


class Kind(NamedTuple):
    """A kind of node: what it is, and which rule types fit it."""

    description: str
    rules: tuple[type[Rule], ...]


KINDS: dict[str, Kind] = {
    "linear": Kind("a linear map of one carrying tensor: MatMul/Gemm/Conv/Einsum by a constant, Mul/Div by a "
                   "constant, a bias Add, Resize, BatchNormalization, RotaryEmbedding",
                   (Epsilon, Gamma, Gradient, Constant)),
    "add": Kind("a sum of several carrying tensors (residual connections, embedding sums)",
                (Epsilon, Gradient, Constant)),
    "product": Kind("a product of several carrying tensors: Q K^T, A V, act(gate) * up, routing weight * expert",
                    (Uniform, ConstantGate, Gradient, Constant)),
    "gate": Kind("a product whose gating factor is the output of a non-zero-centred function (sigmoid gates of "
                 "squeeze-excitation blocks, LSTM/GRU cells written out, GLU): the gate is held constant",
                 (ConstantGate, Uniform, Gradient, Constant)),
    "unary": Kind("an element-wise non-linearity with f(0) = 0 and f(x)/x bounded (GELU, SiLU, tanh, ReLU, ...), "
                  "also written out as several ops: the identity rule is sound",
                  (Identity, Gradient, Constant)),
    "nonlinear": Kind("a non-linear function for which the identity rule is unsound (f(0) != 0 or f(x)/x unbounded: "
                      "Sigmoid, HardSigmoid, Softplus, Exp, Log, Sqrt, 1/x, ReduceL2, ...): the plain gradient",
                      (Gradient, Constant, Identity)),
    "attention": Kind("a Softmax whose probabilities weight other carrying values (attention, routing)",
                      (Gradient, Constant)),
    "softmax": Kind("any other Softmax/LogSoftmax (e.g. the model's own output distribution)", (Gradient, Constant)),
    "norm": Kind("a normalisation (LayerNorm, RMSNorm, Group/InstanceNorm, fused or written out): its statistic",
                 (ConstantStatistic, Gradient)),
    "reduce": Kind("a sum or mean pooling of a carrying tensor (ReduceSum, ReduceMean, GlobalAveragePool, "
                   "AveragePool)", (Epsilon, Gradient, Constant)),
    "movement": Kind("data movement and selection (Reshape, Transpose, Slice, Gather, Concat, Where, MaxPool, "
                     "ReduceMax, TopK, ...): relevance is routed exactly", (Gradient, Constant)),
}
# rules a user may force on a kind they do not fit soundly (a warning names the override)
UNSOUND = {("nonlinear", Identity)}


@dataclass
class Composite:
    """Rule map. ``kinds`` maps kind -> rule; ``overrides`` maps ``"op:TYPE"`` / ``"node:PATTERN"`` (or an
    unambiguous bare op type / node name) -> rule. ``reading`` says how relevance is read at the sources:
    ``"input_x_gradient"`` (``R = x * G``) or ``"gradient"`` (``R = G``; token relevance ``||G||_2``)."""

    name: str
    kinds: dict[str, Rule]
    overrides: dict[str, Rule] = field(default_factory=dict)
    reading: str = "input_x_gradient"
    defaults: dict[str, Rule] = field(default_factory=dict)  # the preset's own per-op rules ("op:Conv" in vit-lrp)

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ConfigError(f"composite {self.name!r}: unknown reading {self.reading!r}; readings are {READINGS}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ConfigError(f"composite {self.name!r}: unknown node kind(s) {sorted(unknown)}; kinds are "
                              f"{list(KINDS)}")
        for k in KINDS:
            self.kinds.setdefault(k, Gradient())
        for key, rule in list(self.kinds.items()) + list(self.overrides.items()) + list(self.defaults.items()):
            if not isinstance(rule, Rule):
                raise ConfigError(f"composite {self.name!r}: {key!r} maps to {rule!r}, which is not a Rule")
        for k, rule in self.kinds.items():
            if not isinstance(rule, KINDS[k].rules):
                raise ConfigError(f"composite {self.name!r}: rule {rule.name} does not fit kind {k!r}; use one of "
                                  f"{[r.__name__ for r in KINDS[k].rules]}")
        for key in self.overrides:
            if not isinstance(key, str) or not key or key in ("op:", "node:"):
                raise ConfigError(f"composite {self.name!r}: override key {key!r} is not 'op:TYPE' or 'node:NAME'")

    @property
    def conserving(self) -> bool:
        """Whether the rules are meant to conserve relevance (any LRP rule, not only gradients)."""
        return self.reading == "input_x_gradient" and any(not isinstance(r, Gradient) for r in self.kinds.values())

    def rule_for(self, kind: str, op_type: str, node_names: str | Iterable[str]) -> Rule:
        """The rule of a node (or a region of nodes) of ``kind``: node overrides, op-type overrides, kind map;
        overrides apply only where they fit ``kind``."""
        names = [node_names] if isinstance(node_names, str) else list(node_names)
        fits = KINDS[kind].rules + tuple(r for k, r in UNSOUND if k == kind)
        for key, rule in self.overrides.items():
            if key.startswith("node:") and isinstance(rule, fits) and any(fnmatchcase(n, key[5:]) for n in names):
                return rule
        for table in (self.overrides, self.defaults):
            rule = table.get("op:" + op_type)
            if rule is not None and isinstance(rule, fits):
                return rule
        return self.kinds[kind]

    def resolve(self, op_types: set[str], node_names: list[str], known_ops: set[str]) -> "Composite":
        """A copy whose override keys are all explicit (``op:``/``node:``), checked against a graph's op types and
        node names (``known_ops``: every op type with a rule). Raises :class:`~onnx_lrp.errors.ConfigError` for a key
        that names nothing, or that is both an op type and a node name."""
        out: dict[str, Rule] = {}
        for key, rule in self.overrides.items():
            if key.startswith("op:"):
                if key[3:] not in known_ops and key[3:] not in op_types:
                    raise ConfigError(f"override {key!r}: onnx-lrp knows no op type {key[3:]!r}")
                out[key] = rule
                continue
            if key.startswith("node:"):
                if not any(fnmatchcase(n, key[5:]) for n in node_names):
                    raise ConfigError(f"override {key!r}: no node of the model is named {key[5:]!r}")
                out[key] = rule
                continue
            is_op = key in known_ops or key in op_types
            is_node = any(fnmatchcase(n, key) for n in node_names)
            if is_op and is_node:
                raise ConfigError(f"override {key!r} is both an op type and a node name of this model: write "
                                  f"'op:{key}' or 'node:{key}'")
            if not (is_op or is_node):
                raise ConfigError(f"override {key!r} names no op type onnx-lrp knows and no node of the model "
                                  "(write 'op:TYPE' or 'node:NAME'; node names may be fnmatch patterns)")
            out[("op:" if is_op else "node:") + key] = rule
        return Composite(self.name, dict(self.kinds), out, self.reading, dict(self.defaults))

    def with_overrides(self, overrides: Mapping[str, Rule]) -> "Composite":
        """A copy of this composite with more overrides (these take precedence)."""
        merged = dict(overrides)
        for k, v in self.overrides.items():
            merged.setdefault(k, v)
        return Composite(self.name, dict(self.kinds), merged, self.reading, dict(self.defaults))


def attnlrp(epsilon: float = 0.0, identity_epsilon: float = 1e-10) -> Composite:
    """AttnLRP (Achtibat et al. 2024) as LXT's efficient engine applies it to LLMs; gates of non-zero-centred
    functions are held constant (the identity rule is unsound on them)."""
    return Composite(
        "attnlrp",
        {
            "linear": Epsilon(epsilon),
            "add": Epsilon(epsilon),
            "product": Uniform(),
            "gate": ConstantGate(),
            "unary": Identity(identity_epsilon),
            "nonlinear": Gradient(),
            "attention": Gradient(),
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
    comp.kinds["attention"] = Constant()
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
    comp.defaults["op:Conv"] = Gamma(conv_gamma)
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
            raise ConfigError(f"unknown composite {composite!r}; choose one of {sorted(PRESETS)} or pass a Composite")
        comp = PRESETS[key]()
    elif isinstance(composite, Composite):
        comp = Composite(composite.name, dict(composite.kinds), dict(composite.overrides), composite.reading,
                         dict(composite.defaults))
    else:
        raise ConfigError(f"composite must be a preset name or a Composite, got {type(composite).__name__}")
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a dict of 'op:TYPE' / 'node:NAME' -> Rule, got "
                              f"{type(overrides).__name__}")
        comp = comp.with_overrides(overrides)
    return comp
