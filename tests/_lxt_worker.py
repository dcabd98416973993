"""Run LXT 2.1 (efficient engine) on Hugging Face model folders: JSON requests on stdin, one per line, each
answered by one line ``@@RESULT {json}`` on stdout.

Used as the independent reference in parity tests. Runs in its own process, one per (family, composite) and
kept for the test session: LXT patches transformers' classes globally, once. LXT imports ``torchvision.models.vision_transformer`` at import time; without torchvision
(CPU torch here) an empty stand-in is registered for that import only and removed afterwards.
"""
from __future__ import annotations

import importlib
import json
import sys
import types


def _import_lxt():
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


# families LXT has no module for, patched with the map of an architecture they copy (classes renamed)
BORROWED = {"mistral": ("llama", "Llama", "Mistral")}


def _patch_map(family: str, mod, which: str) -> dict:
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


_PATCHED: dict[str, str] = {}


def _patched_module(family: str, composite: str):
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family in _PATCHED:
        if _PATCHED[family] != composite:
            raise RuntimeError(f"{family} already patched for {_PATCHED[family]}; use another worker")
        return mod
    patch_map = None
    if family in BORROWED or composite == "cp-lrp":
        patch_map = _patch_map(family, mod, "cp_LRP" if composite == "cp-lrp" else "attnLRP")
    _MONKEY_PATCH[0](mod, patch_map)
    _PATCHED[family] = composite
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


_MONKEY_PATCH: list = []


def main() -> None:
    import traceback

    _MONKEY_PATCH.append(_import_lxt())
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = _answer(json.loads(line))
        except Exception:
            out = {"error": traceback.format_exc()}
        print("@@RESULT " + json.dumps(out), flush=True)


def _answer(req: dict) -> dict:
    import numpy as np
    import torch

    family = req["family"]
    mod = _patched_module(family, req["composite"])
    cls = getattr(mod, req["model_cls"])  # fetched after patching (BERT: LXT's replacement module)
    assert "lxt" in cls.__module__ or family != "bert", f"{cls} is not LXT's patched class"
    model = cls.from_pretrained(req["pt_dir"], torch_dtype=torch.float32).eval()
    ids = torch.tensor(req["input_ids"])
    kw = {}
    for name in ("attention_mask", "position_ids", "token_type_ids"):
        if req.get(name) is not None:
            kw[name] = torch.tensor(req[name])
    if req.get("via_ids"):  # the model sees input_ids (e.g. to pool at the last non-pad token); the
        # relevance is read at the embedding lookup's output, kept by a forward hook
        kept = []

        def keep(module, args, output):
            output.retain_grad()
            kept.append(output)

        hook = model.get_input_embeddings().register_forward_hook(keep)
        out = model(input_ids=ids, **kw)
        hook.remove()
        emb = kept[0]
    else:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=emb, **kw)
    B = ids.shape[0]
    if req.get("pair_similarity"):  # batch of 2: explain e(a).e(b) for a with e(b) fixed, and vice versa
        h = out.last_hidden_state
        m = kw["attention_mask"].to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
        scores = (pooled * pooled.detach().flip(0)).sum(-1)
        scores.sum().backward()
        rel = (emb * emb.grad).sum(-1).detach().numpy().astype(np.float64)
        return {"relevance": rel.tolist(), "score": scores.detach().tolist(),
                "pooled": pooled.detach().numpy().tolist()}
    logits = getattr(out, req.get("output") or "logits")  # e.g. start_logits, last_hidden_state
    if req.get("weights") is not None:  # explain sum(w * output) per batch element
        scores = (logits * torch.tensor(req["weights"], dtype=logits.dtype)).flatten(1).sum(-1)
        scores.sum().backward()
        rel = (emb * emb.grad).sum(-1).detach().numpy().astype(np.float64)
        return {"relevance": rel.tolist(), "score": scores.detach().tolist()}
    if logits.ndim == 3:
        pos = torch.tensor(req["positions"]) if req["positions"] is not None else torch.full((B,), logits.shape[1] - 1)
        rows = logits[torch.arange(B), pos]
    else:
        rows = logits
    tgt = torch.tensor(req["targets"]) if req["targets"] is not None else rows.argmax(-1)
    rows[torch.arange(B), tgt].sum().backward()
    rel = (emb * emb.grad).sum(-1).detach().numpy().astype(np.float64)
    return {"relevance": rel.tolist(), "targets": tgt.tolist(), "logits": rows.detach().numpy().tolist()}


if __name__ == "__main__":
    main()
