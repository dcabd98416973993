"""The API reference (``docs/api``, Sphinx autodoc from the docstrings) builds with warnings as errors and documents
every public name of the package and its front ends."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx_lrp
from onnx_lrp import image, text, visualize

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api"


def test_api_reference_builds_without_warnings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = "".join(p.read_text(encoding="utf-8") for p in tmp_path.glob("*.html"))
    anchors = set(re.findall(r'id="(onnx_lrp\.[\w.]+)"', html))
    public = [(onnx_lrp, n) for n in onnx_lrp.__all__]
    public += [(text, n) for n in ("TextExplainer", "Tokenizer", "TextExplanation", "GenerationExplanation")]
    public += [(image, n) for n in ("ImageExplainer", "ImageExplanation", "Preprocessor")]
    public += [(visualize, n) for n in ("terminal", "terminal_matrix", "html_page", "heatmap_rgb", "write_png")]
    missing = []
    for module, name in public:
        obj = getattr(module, name)
        where = {f"{module.__name__}.{name}", f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', name)}"}
        if not where & anchors:
            missing.append(f"{module.__name__}.{name}")
    assert not missing, f"not in the API reference: {missing}"
    assert "onnx_lrp.Explainer.explain" in anchors and "onnx_lrp.text.TextExplainer.similarity" in anchors
