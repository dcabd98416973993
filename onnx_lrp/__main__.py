"""``python -m onnx_lrp``: the ``onnx-lrp`` command line."""
import sys

from .cli import main

sys.exit(main())
