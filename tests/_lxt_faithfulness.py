"""Faithfulness computed entirely in PyTorch: LXT 2.1 relevance + MoRF/LeRF perturbation of ``inputs_embeds``.

The independent reference for :mod:`onnx_lrp.evaluate` (cross-framework check). One JSON request on stdin,
one JSON line out; runs in its own process because LXT patches transformers' classes globally.

Protocol (written here from the documented formulas, not from onnx_lrp): the word embeddings of removed tokens
are zeroed (``inputs_embeds * mask``); ``m_k = floor(k n / K + 1/2)`` tokens removed at ``x_k = k / K``; MoRF
removes by descending relevance, LeRF by ascending; the areas are trapezoids; faithfulness = A(LeRF) - A(MoRF).
"""
from __future__ import annotations

import importlib
import json
import math
import sys

from onnx_lrp.reference.lxt import import_lxt


def main() -> None:
    req = json.loads(sys.stdin.read())
    import torch

    torch.set_num_threads(int(req.get("threads", 1)))
    monkey_patch = import_lxt()
    family = req["family"]
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    patch_map = None
    if req["composite"] == "cp-lrp":
        patch_map = importlib.import_module(f"lxt.efficient.models.{family}").cp_LRP
    monkey_patch(mod, patch_map)
    model = getattr(mod, req["model_cls"]).from_pretrained(req["pt_dir"], torch_dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    steps = int(req["steps"])
    out = {"relevance": [], "targets": [], "morf": [], "lerf": [], "faithfulness": []}
    for ids_row, mask_row, pert_row in zip(req["input_ids"], req["attention_mask"], req["perturbable"]):
        ids = torch.tensor([ids_row])
        att = torch.tensor([mask_row])
        S = ids.shape[1]
        pos = max(i for i in range(S) if mask_row[i] > 0)

        def logits_of(embeds: torch.Tensor) -> torch.Tensor:
            y = model(inputs_embeds=embeds, attention_mask=att.expand(embeds.shape[0], -1)).logits
            return y[:, pos] if y.ndim == 3 else y

        emb = embed(ids).detach().requires_grad_()
        y = logits_of(emb)[0]
        tgt = int(y.argmax())
        y[tgt].backward()
        rel = (emb * emb.grad).sum(-1)[0].detach()
        cand = [i for i in range(S) if pert_row[i]]
        n = len(cand)
        morf = sorted(cand, key=lambda i: -float(rel[i]))
        lerf = sorted(cand, key=lambda i: float(rel[i]))
        counts = [math.floor(k * n / steps + 0.5) for k in range(steps + 1)]
        curves = {}
        with torch.no_grad():
            base = embed(ids)
            for name, order in (("morf", morf), ("lerf", lerf)):
                masks = torch.ones(steps + 1, S)
                for k, m in enumerate(counts):
                    masks[k, order[:m]] = 0.0
                curves[name] = logits_of(base * masks[:, :, None])[:, tgt].tolist()
        area = {k: sum((v[i] + v[i + 1]) / 2 / steps for i in range(steps)) for k, v in curves.items()}
        out["relevance"].append(rel.tolist())
        out["targets"].append(tgt)
        out["morf"].append(curves["morf"])
        out["lerf"].append(curves["lerf"])
        out["faithfulness"].append(area["lerf"] - area["morf"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
