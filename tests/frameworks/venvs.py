"""The export venvs of other frameworks (TensorFlow, JAX), built once from their pinned requirements and cached.

    python tests/frameworks/venvs.py tf jax      # what `make venvs` runs (also built on first use by the tests)

A venv lives in ``$ONNX_LRP_VENVS`` (default ``~/.cache/onnx-lrp/venvs``) under ``NAME-<hash of
requirements-NAME.txt>``, so editing the pins builds a new one. They stay out of the main test venv (3.6 GB, Keras 3,
transformers seeing TF/Flax in every process): they only export ONNX files, in subprocesses.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("ONNX_LRP_VENVS", Path.home() / ".cache" / "onnx-lrp" / "venvs"))


class VenvError(RuntimeError):
    """A framework venv could not be built (the registry refused a package, or a pin does not install)."""


def requirements(name: str) -> Path:
    return REPO / f"requirements-{name}.txt"


def location(name: str) -> Path:
    digest = hashlib.sha1(requirements(name).read_bytes()).hexdigest()[:10]
    return ROOT / f"{name}-{digest}"


_FAILED: dict[str, VenvError] = {}  # one build attempt per process


def ensure(name: str) -> Path:
    """The python of venv ``name`` (``tf`` or ``jax``), built from ``requirements-NAME.txt`` if missing."""
    if name in _FAILED:
        raise _FAILED[name]
    try:
        return _build(name)
    except VenvError as e:
        _FAILED[name] = e
        raise


def _build(name: str) -> Path:
    req = requirements(name)
    if not req.exists():
        raise VenvError(f"no pinned requirements for the {name!r} export venv: {req} is missing")
    home = location(name)
    python, stamp = home / "bin" / "python", home / ".onnx-lrp-ok"
    if stamp.exists():
        return python
    shutil.rmtree(home, ignore_errors=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in ([base, "-m", "venv", str(home)],
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(req)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise VenvError(f"building the {name!r} export venv failed ({' '.join(cmd[-3:])} exited "
                            f"{done.returncode}); requirements {req}:\n{(done.stdout + done.stderr)[-3000:]}")
    stamp.write_text(f"built in {time.time() - start:.0f} s from {req.name}\n")
    return python


if __name__ == "__main__":
    for n in sys.argv[1:] or ["tf", "jax"]:
        t = time.time()
        print(f"{n}: {ensure(n)} ({time.time() - t:.0f} s)", flush=True)
