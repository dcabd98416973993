"""onnx-lrp: AttnLRP explanations for transformer models in ONNX form.

>>> from onnx_lrp import Explainer
>>> ex = Explainer("model.onnx")                       # composite="attnlrp" by default
>>> res = ex.explain({"input_ids": ids}, target=42)    # res.relevance["input_ids"]: (batch, seq)
"""
from .composites import Composite, attnlrp, cp_lrp, get_composite, gradient, gradient_x_input, vit_lrp
from .errors import (ConfigError, InputError, ModelLoadError, OnnxLrpError, RelevanceWarning, TargetError,
                     UnsupportedOpError)
from .explainer import Explainer, Explanation
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

__version__ = "0.1.0"

__all__ = [
    "Explainer", "Explanation", "Composite", "attnlrp", "cp_lrp", "gradient", "gradient_x_input", "vit_lrp",
    "get_composite", "Rule", "Gradient", "Epsilon", "Gamma", "Uniform", "Identity", "ConstantStatistic",
    "Constant", "ConstantGate", "OnnxLrpError", "ModelLoadError", "UnsupportedOpError", "InputError", "TargetError",
    "ConfigError", "RelevanceWarning",
]
