"""The LXT worker process of :mod:`onnx_lrp.reference.lxt`: one JSON request per stdin line, answered by one
``@@RESULT {json}`` stdout line (``{}``, or ``{"error": traceback}``), the arrays saved to the request's ``out``
(``.npz``). Patches one family for one composite, once; keeps the last two loaded models for later requests."""
from __future__ import annotations

import importlib
import json
import sys
import traceback

from .lxt import BORROWED, import_lxt, patch_map

_PATCHED: dict[str, str] = {}
_LOADED: dict[tuple[str, str], object] = {}
_KEEP = 2


def _patched_module(family: str, composite: str, monkey_patch):
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family in _PATCHED:
        if _PATCHED[family] != composite:
            raise RuntimeError(f"{family} already patched for {_PATCHED[family]}; use another worker")
        return mod
    pmap = None
    if family in BORROWED or composite == "cp-lrp":
        pmap = patch_map(family, mod, "cp_LRP" if composite == "cp-lrp" else "attnLRP")
    monkey_patch(mod, pmap)
    _PATCHED[family] = composite
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")  # BERT: LXT's copy


def _model(req: dict, monkey_patch):
    import torch

    family = req["family"]
    mod = _patched_module(family, req["composite"], monkey_patch)
    key = (req["model_cls"], req["pt_dir"])
    if key not in _LOADED:
        cls = getattr(mod, req["model_cls"])  # fetched after patching (BERT: LXT's replacement module)
        if family == "bert" and "lxt" not in cls.__module__:
            raise RuntimeError(f"{cls} is not LXT's patched class")
        while len(_LOADED) >= _KEEP:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = cls.from_pretrained(req["pt_dir"], torch_dtype=torch.float32).eval()
    _LOADED[key] = _LOADED.pop(key)  # most recently used last
    return _LOADED[key]


def answer(req: dict, monkey_patch) -> dict:
    """The arrays answering one request (see :func:`onnx_lrp.reference.lxt.relevance`)."""
    import numpy as np
    import torch

    model = _model(req, monkey_patch)
    ids = torch.tensor(req["input_ids"])
    kw = {}
    for name in ("attention_mask", "position_ids", "token_type_ids"):
        if req.get(name) is not None:
            kw[name] = torch.tensor(req[name])
    if req.get("forward"):  # the output alone, no relevance
        with torch.no_grad():
            y = getattr(model(input_ids=ids, **kw), req.get("output") or "logits")
        return {"output": y.numpy().astype(np.float64)}
    if req.get("hidden_states"):
        kw["output_hidden_states"] = True
    if req.get("via_ids"):  # the model sees input_ids; the relevance is read at the embedding lookup's output
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
    hidden = list(out.hidden_states) if req.get("hidden_states") else []
    for h in hidden:
        if not h.is_leaf:
            h.retain_grad()
    B = ids.shape[0]
    res: dict = {}
    if req.get("pair_similarity"):  # batch of 2: explain e(a).e(b) for a with e(b) fixed, and vice versa
        h = out.last_hidden_state
        m = kw["attention_mask"].to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
        scores = (pooled * pooled.detach().flip(0)).sum(-1)
        res["pooled"] = pooled
    else:
        y = getattr(out, req.get("output") or "logits")  # e.g. start_logits, last_hidden_state
        if req.get("weights") is not None:  # explain sum(w * output) per batch element
            scores = (y * torch.tensor(req["weights"], dtype=y.dtype)).flatten(1).sum(-1)
            res["output"] = y
        else:
            if y.ndim == 3:
                pos = torch.tensor(req["positions"]) if req["positions"] is not None else torch.full(
                    (B,), y.shape[1] - 1)
                rows = y[torch.arange(B), pos]
            else:
                rows = y
            tgt = torch.tensor(req["targets"]) if req["targets"] is not None else rows.argmax(-1)
            scores = rows[torch.arange(B), tgt]
            res["targets"], res["logits"] = tgt, rows
    scores.sum().backward()
    res["relevance"] = (emb * emb.grad).sum(-1)
    res["score"] = scores
    if hidden:
        res["hidden_states"] = torch.stack(hidden)
        res["hidden_relevance"] = torch.stack([h * h.grad if h.grad is not None else torch.zeros_like(h)
                                               for h in hidden])
    # float64 (the parity tests' precision), but float32 for the hidden states (a few hundred MB in float64)
    arrays = {k: v.detach().numpy().astype(np.float32 if k.startswith("hidden") else np.float64)
              if v.is_floating_point() else v.numpy() for k, v in res.items()}
    model.zero_grad(set_to_none=True)  # the kept model holds no parameter gradients between requests
    return arrays


def main() -> None:
    import numpy as np

    monkey_patch = import_lxt()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            np.savez(req["out"], **answer(req, monkey_patch))
            reply = {}
        except Exception:
            reply = {"error": traceback.format_exc()}
        print("@@RESULT " + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
