"""LXT 2.1 (the AttnLRP authors' efficient engine) on transformers model folders, in a worker process.

LXT patches transformers' classes process-wide, once per family and composite, so each (family, composite) gets
its own long-lived worker (``python -m onnx_lrp.reference._lxt_worker``), reused for later requests and closed at
exit. Needs torch, transformers and ``lxt==2.1`` (installed with ``--no-deps``: its dependencies pull a CUDA
torchvision); nothing here imports them in the calling process.

Caveats handled (see docs/validate.md): ``lxt.efficient`` imports ``torchvision.models.vision_transformer`` at
import time, so without torchvision an empty stand-in is registered for that one import; for BERT LXT replaces
the attributes of ``transformers.models.bert.modeling_bert`` with its own copy, so classes are fetched from that
module after patching (never ``transformers.BertModel``); Mistral borrows Llama's patch map (same classes renamed).
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

# transformers module names LXT 2.1 has patch maps for, and families it explains with a map borrowed from the
# architecture they copy: family -> (lxt module, class prefix there, class prefix here)
FAMILIES = frozenset({"llama", "qwen2", "qwen3", "gemma3", "bert", "gpt2", "mistral"})
BORROWED = {"mistral": ("llama", "Llama", "Mistral")}
COMPOSITES = ("attnlrp", "cp-lrp")


def family_of(model_type: str) -> str:
    """The transformers module name of a config's ``model_type`` (``gemma3_text`` -> ``gemma3``)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


def import_lxt():
    """``lxt.efficient.monkey_patch``, imported with a stand-in for torchvision's ViT module when torchvision is
    missing (the stand-in is removed again, so that transformers never sees a fake torchvision)."""
    import torch.nn as nn
    import transformers  # noqa: F401  (before the stand-in, so transformers sees no torchvision)

    try:
        import torchvision  # noqa: F401
        stub = False
    except Exception:
        stub = True
        tv = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        vt = types.ModuleType("torchvision.models.vision_transformer")
        vt.nn = nn
        tv.models, models.vision_transformer = models, vt
        sys.modules.update({"torchvision": tv, "torchvision.models": models,
                            "torchvision.models.vision_transformer": vt})
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import get_default_map  # noqa: F401

    if stub:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
    return monkey_patch


def patch_map(family: str, mod: types.ModuleType, which: str) -> dict:
    """LXT's patch map ``which`` (``attnLRP`` or ``cp_LRP``) for ``family``'s modeling module ``mod``; a borrowed
    map gets its classes renamed (``LlamaMLP`` -> ``MistralMLP``)."""
    base, old, new = BORROWED.get(family, (family, "", ""))
    lxt_models = importlib.import_module(f"lxt.efficient.models.{base}")
    base_mod = importlib.import_module(f"transformers.models.{base}.modeling_{base}")
    out = {}
    for key, fn in getattr(lxt_models, which).items():
        if key is base_mod:
            key = mod
        elif old and key.__name__.startswith(old):
            key = getattr(mod, new + key.__name__[len(old):])
        out[key] = fn
    return out


def relevance(family: str, model_cls: str, pt_dir: str | os.PathLike, input_ids: np.ndarray,
              attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None,
              positions: np.ndarray | None = None, targets: np.ndarray | None = None, composite: str = "attnlrp", *,
              token_type_ids: np.ndarray | None = None, output: str | None = None, via_ids: bool = False,
              weights: np.ndarray | None = None, pair_similarity: bool = False,
              hidden_states: bool = False) -> dict[str, np.ndarray]:
    """LXT token relevance ``(inputs_embeds * grad).sum(-1)`` of ``output[b, positions[b], targets[b]]`` (default:
    the argmax at the last position) for ``model_cls`` of the transformers module ``family``, loaded from
    ``pt_dir``.

    ``output``: the model output explained (default ``logits``). ``via_ids``: feed ``input_ids`` and read the
    relevance at the embedding lookup's output (sequence classifiers pool at the last non-pad token only when they
    see the ids). ``weights``: explain ``sum(weights * output)`` per batch element. ``pair_similarity`` (batch of
    two): explain ``e(a) . e(b)`` for a with ``e(b)`` held fixed and vice versa, ``e`` = mask-weighted mean of
    ``last_hidden_state``. ``hidden_states``: also ``h * grad`` at every ``output_hidden_states`` tensor.

    Returns ``relevance`` and ``score`` (the explained quantity); ``targets`` and ``logits`` (the explained rows)
    for one-entry explanations; ``output`` (all of the explained output) with ``weights``; ``pooled`` with
    ``pair_similarity``; ``hidden_states`` / ``hidden_relevance`` (layers first) with ``hidden_states``.
    """
    if family not in FAMILIES:
        raise ValueError(f"LXT 2.1 has no patches for {family!r}; families: {sorted(FAMILIES)}")
    if composite not in COMPOSITES:
        raise ValueError(f"LXT runs the composites {COMPOSITES}, not {composite!r}")

    def lst(a):
        return None if a is None else np.asarray(a).tolist()

    req = {
        "family": family, "model_cls": model_cls, "pt_dir": str(pt_dir), "composite": composite,
        "input_ids": lst(input_ids), "attention_mask": lst(attention_mask), "position_ids": lst(position_ids),
        "token_type_ids": lst(token_type_ids), "positions": lst(positions), "targets": lst(targets),
        "output": output, "via_ids": via_ids, "weights": lst(weights), "pair_similarity": pair_similarity,
        "hidden_states": hidden_states,
    }
    return _worker(family, composite).ask(req)


def forward(family: str, model_cls: str, pt_dir: str | os.PathLike, feeds: dict[str, np.ndarray],
            output: str = "logits", composite: str = "attnlrp") -> np.ndarray:
    """The output ``output`` of the (patched) model on ``feeds`` (``input_ids``, ``attention_mask``,
    ``position_ids``, ``token_type_ids``), computed in the worker of ``(family, composite)``."""
    req = {"family": family, "model_cls": model_cls, "pt_dir": str(pt_dir), "composite": composite, "forward": True,
           "output": output, "input_ids": np.asarray(feeds["input_ids"]).tolist()}
    for name in ("attention_mask", "position_ids", "token_type_ids"):
        req[name] = np.asarray(feeds[name]).tolist() if feeds.get(name) is not None else None
    return _worker(family, composite).ask(req)["output"]


class Worker:
    """A long-lived LXT worker process: JSON requests on stdin, answered by ``@@RESULT {json}`` lines on stdout;
    the arrays of an answer go through an ``.npz`` file named in the request."""

    def __init__(self):
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this onnx_lrp, whatever the caller's sys.path
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
        self.proc = subprocess.Popen([sys.executable, "-m", "onnx_lrp.reference._lxt_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def ask(self, req: dict) -> dict[str, np.ndarray]:
        fd, out = tempfile.mkstemp(suffix=".npz", prefix="onnx-lrp-lxt-")
        os.close(fd)
        try:
            self.proc.stdin.write(json.dumps(dict(req, out=out)) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith("@@RESULT "):
                    answer = json.loads(line[len("@@RESULT "):])
                    if "error" in answer:
                        raise RuntimeError(f"LXT worker failed:\n{answer['error'][-4000:]}")
                    with np.load(out) as z:
                        return {k: z[k] for k in z.files}
            self.log.seek(0)
            raise RuntimeError(f"LXT worker died:\n{self.log.read()[-4000:]}")
        finally:
            os.unlink(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


_WORKERS: dict[tuple[str, str], Worker] = {}


def _worker(family: str, composite: str) -> Worker:
    key = (family, composite)
    if key not in _WORKERS or _WORKERS[key].proc.poll() is not None:
        _WORKERS[key] = Worker()
    return _WORKERS[key]


@atexit.register
def close_workers() -> None:
    """End every worker process (also run at exit)."""
    for w in _WORKERS.values():
        w.close()
    _WORKERS.clear()
