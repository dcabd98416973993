"""An independent torch-autograd reference of the recurrent rules (:mod:`onnx_lrp.ops.recurrent`).

The ONNX ``LSTM``/``GRU``/``RNN`` equations are written with torch ops, one time step after another, and torch
autograd does the backward. The rules are expressed the way :mod:`onnx_lrp.reference.torch` expresses AttnLRP:

- ``"gradient"``: nothing changed (the op's exact VJP);
- ``"attnlrp"``: every gate ``sigmoid(clip(.))`` is ``.detach()``-ed (held constant: the signal it multiplies takes all
  relevance, Arras et al. 2017), every ``tanh`` takes the identity rule (``grad * tanh(a) / (a + 1e-10)``);
  ``epsilon > 0`` adds eps-LRP at each pre-activation (``grad * a / stab(a)``);
- ``"uniform-gates"``: the identity rule on tanh, and each gated product's gradient halved (the uniform rule: the
  gate, through its sigmoid's derivative, and the signal take half each).

:func:`torch_to_onnx_weights` turns an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` layer's parameters into the ONNX layout
(gate order i,o,f,c for LSTM and z,r,h for GRU), so the same reference runs on exported torch models.
"""
from __future__ import annotations

import torch

from .torch import eps_layer, half, identity_rule

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _clip(a, clip):
    return a if clip is None else a.clamp(-clip, clip)


def _rules(rule: str, epsilon: float, clip):
    """(gate, squash, linear, mul): the parts of a step under ``rule``; ``mul`` is the gated product."""
    gate = (lambda a: torch.sigmoid(_clip(a, clip)).detach()) if rule == "attnlrp" else (
        lambda a: torch.sigmoid(_clip(a, clip)))

    def squash(a, clip=clip):
        fn = lambda v: torch.tanh(_clip(v, clip))  # noqa: E731
        return identity_rule(fn, a) if rule in ("attnlrp", "uniform-gates") else fn(a)

    mul = (lambda g, v: half(g * v)) if rule == "uniform-gates" else (lambda g, v: g * v)
    return gate, squash, (lambda a: eps_layer(a, epsilon)) if epsilon else (lambda a: a), mul


def onnx_rnn(op: str, X: torch.Tensor, W: torch.Tensor, R: torch.Tensor, B=None, h0=None, c0=None, P=None, lens=None,
             direction: str = "forward", clip: float | None = None, linear_before_reset: int = 0,
             input_forget: int = 0, rule: str = "gradient", epsilon: float = 0.0) -> tuple:
    """ONNX ``op`` on ``X (T, B, I)`` (layout 0) with the rule applied; returns ``(Y, Y_h[, Y_c])`` as ONNX does."""
    T, Bsz, _ = X.shape
    H = R.shape[-1]
    G = GATES[op]
    gate, squash, linear, mul = _rules(rule, epsilon, clip)
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    valid = None if lens is None else (torch.arange(T)[:, None] < torch.as_tensor(lens)[None, :])[..., None]
    Ys, Hs, Cs = [], [], []
    for d, dname in enumerate(dirs):
        zeros = torch.zeros(Bsz, H, dtype=X.dtype)
        Wb = B[d, : G * H] if B is not None else torch.zeros(G * H, dtype=X.dtype)
        Rb = B[d, G * H:] if B is not None else torch.zeros(G * H, dtype=X.dtype)
        h = h0[d] if h0 is not None else zeros
        c = c0[d] if c0 is not None else zeros
        Y = [None] * T
        for t in (range(T) if dname == "forward" else range(T - 1, -1, -1)):
            x = X[t]
            if op == "LSTM":
                a = x @ W[d].T + h @ R[d].T + Wb + Rb
                ai, ao, af, ac = a.split(H, dim=-1)
                if P is not None:
                    ai, af = ai + P[d, :H] * c, af + P[d, 2 * H:] * c
                i = gate(linear(ai))
                f = 1 - i if input_forget else gate(linear(af))
                c_new = mul(f, c) + mul(i, squash(linear(ac)))
                if P is not None:
                    ao = ao + P[d, H:2 * H] * c_new
                h_new = mul(gate(linear(ao)), squash(c_new, clip=None))  # clip bounds the gates' inputs only
            elif op == "GRU":
                Wz, Wr, Wh = W[d].split(H)
                Rz, Rr, Rh = R[d].split(H)
                z = gate(linear(x @ Wz.T + h @ Rz.T + Wb[:H] + Rb[:H]))
                r = gate(linear(x @ Wr.T + h @ Rr.T + Wb[H:2 * H] + Rb[H:2 * H]))
                if linear_before_reset:
                    ah = x @ Wh.T + mul(r, h @ Rh.T + Rb[2 * H:]) + Wb[2 * H:]
                else:
                    ah = x @ Wh.T + mul(r, h) @ Rh.T + Rb[2 * H:] + Wb[2 * H:]
                h_new = mul(1 - z, squash(linear(ah))) + mul(z, h)
                c_new = c
            else:
                h_new = squash(linear(x @ W[d].T + h @ R[d].T + Wb + Rb))
                c_new = c
            if valid is not None:  # past a sequence's length: state unchanged, Y zero
                Y[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
                h, c = torch.where(valid[t], h_new, h), torch.where(valid[t], c_new, c)
            else:
                Y[t], h, c = h_new, h_new, c_new
        Ys.append(torch.stack(Y))
        Hs.append(h)
        Cs.append(c)
    out = (torch.stack(Ys, 1), torch.stack(Hs))
    return out + (torch.stack(Cs),) if op == "LSTM" else out


_TORCH_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}  # ONNX gate block k = torch block order[k]


def torch_to_onnx_weights(module: torch.nn.RNNBase, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, R, B) of one layer of a torch recurrent module in the ONNX layout (directions stacked)."""
    op = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}[type(module).__name__]
    order = _TORCH_ORDER[op]

    def reorder(t):
        return torch.cat([t.chunk(len(order))[k] for k in order])

    Ws, Rs, Bs = [], [], []
    for suffix in ([""] + (["_reverse"] if module.bidirectional else [])):
        p = {n: getattr(module, f"{n}_l{layer}{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        Ws.append(reorder(p["weight_ih"]))
        Rs.append(reorder(p["weight_hh"]))
        Bs.append(torch.cat([reorder(p["bias_ih"]), reorder(p["bias_hh"])]))
    return torch.stack(Ws), torch.stack(Rs), torch.stack(Bs)


def torch_module_reference(module: torch.nn.RNNBase, x: torch.Tensor, rule: str, epsilon: float = 0.0) -> torch.Tensor:
    """The output sequence of a (multi-layer, maybe bidirectional, maybe batch-first) torch recurrent module,
    computed layer by layer with :func:`onnx_rnn` under ``rule``; same layout as ``module(x)[0]``."""
    op = type(module).__name__
    h = x.transpose(0, 1) if module.batch_first else x
    for layer in range(module.num_layers):
        W, R, B = torch_to_onnx_weights(module, layer)
        Y = onnx_rnn(op, h, W, R, B, direction="bidirectional" if module.bidirectional else "forward",
                     linear_before_reset=1, rule=rule, epsilon=epsilon)[0]  # (T, D, B, H)
        h = Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1)  # (T, B, D*H), directions concatenated
    return h.transpose(0, 1) if module.batch_first else h
