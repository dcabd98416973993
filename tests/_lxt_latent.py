"""LXT 2.1 (efficient engine) latent relevance and conditional heatmaps on a Hugging Face decoder, as an independent
reference for :mod:`onnx_lrp.latent`. One JSON request on stdin, one ``@@RESULT {json}`` line on stdout.

Sites are read from the PyTorch modules (never from the ONNX graph): ``resid`` = the hidden states entering decoder
layer L (the final norm's input for L = N), ``mlp`` = the input of ``mlp.down_proj``, ``head`` = the input of
``self_attn.o_proj`` split into heads. Latent relevance: ``site * dy/dsite`` under LXT's rules; conditional
heatmap of unit u: the modified gradient at the site masked to u, propagated from the site alone to the input
embeddings (``torch.autograd.grad(site, emb, masked)``), read as ``(emb * grad).sum(-1)``.
"""
from __future__ import annotations

import json
import sys

from onnx_lrp.reference._lxt_worker import _patched_module
from onnx_lrp.reference.lxt import import_lxt


def _answer(req: dict, monkey_patch) -> dict:
    import torch

    mod = _patched_module(req["family"], "attnlrp", monkey_patch)
    model = getattr(mod, req["model_cls"]).from_pretrained(req["pt_dir"], torch_dtype=torch.float32).eval()
    ids = torch.tensor(req["input_ids"])
    layers = model.model.layers
    out: dict = {}
    for spec in req["sites"]:
        kind, layer, units, heads = spec["kind"], spec["layer"], spec["units"], spec.get("heads")
        kept = []
        if kind == "resid":
            module = model.model.norm if layer == len(layers) else layers[layer]
        else:
            module = layers[layer].mlp.down_proj if kind == "mlp" else layers[layer].self_attn.o_proj
        hook = module.register_forward_pre_hook(lambda m, args: kept.append(args[0]))
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).logits
        hook.remove()
        site = kept[0]
        B = ids.shape[0]
        rows = logits[torch.arange(B), -1]
        tgt = rows.argmax(-1)
        (g,) = torch.autograd.grad(rows[torch.arange(B), tgt].sum(), site, retain_graph=True)
        r = (site * g).detach()
        if kind == "head":  # (B, S, H*D) -> per head
            r = r.reshape(r.shape[:-1] + (heads, -1)).sum(-1)
        cond = []
        for u in units:
            m = torch.zeros_like(g)
            if kind == "head":
                d = g.shape[-1] // heads
                m[..., u * d:(u + 1) * d] = g[..., u * d:(u + 1) * d]
            else:
                m[..., u] = g[..., u]
            (ge,) = torch.autograd.grad(site, emb, grad_outputs=m, retain_graph=True)
            cond.append((emb * ge).sum(-1).detach().tolist())
        out[f"{kind}:{layer}"] = {"units": r.sum(1).tolist(), "conditional": cond, "targets": tgt.tolist()}
    return out


def main() -> None:
    import traceback

    monkey_patch = import_lxt()
    req = json.loads(sys.stdin.readline())
    try:
        out = _answer(req, monkey_patch)
    except Exception:
        out = {"error": traceback.format_exc()}
    print("@@RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
