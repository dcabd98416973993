"""Run onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``) under transformers 4.x.

The builder (0.18) imports vision/audio classes that only newer transformers releases define; they are never used
for the text-only decoders built here, so a missing ``transformers.<Class>`` resolves to an empty stand-in class.
It also expects transformers-5 configs, where ``rope_scaling`` is never None: None becomes
``{"rope_type": "default"}`` (the same rotary embedding).
Usage: ``python tests/_genai_builder.py <builder arguments>``.
"""
import runpy
import sys

from transformers.utils import import_utils

_getattr = import_utils._LazyModule.__getattr__


def _lenient_getattr(self, name):
    try:
        return _getattr(self, name)
    except (ImportError, AttributeError):
        if self.__name__ == "transformers" and name[:1].isupper():
            return type(name, (), {})
        raise


import_utils._LazyModule.__getattr__ = _lenient_getattr

import onnxruntime_genai.models  # noqa: E402,F401  (puts the builder's folder on sys.path)
from builders import base  # noqa: E402

_config_init = base.Model.make_config_init


def _make_config_init(self, config):
    if getattr(config, "rope_scaling", {}) is None:
        config.rope_scaling = {"rope_type": "default"}
    _config_init(self, config)


base.Model.make_config_init = _make_config_init
sys.argv = ["onnxruntime_genai.models.builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
