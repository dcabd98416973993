"""Run onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``) under transformers 4.x.

The builder (0.18) imports vision/audio classes that only newer transformers releases define; they are never used
for the text-only decoders built here, so a missing ``transformers.<Class>`` resolves to an empty stand-in class.
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
sys.argv = ["onnxruntime_genai.models.builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
