"""An independent AttnLRP reference: the modified-gradient rules written with torch autograd on the PyTorch model.

Used for the families LXT 2.1 has no patches for (Phi3, Gemma 1/2, Qwen3-MoE, Mixtral, ...). It is checked
against LXT itself on the families LXT does support (tests/test_coverage.py), so the two references agree.

Rules, in gradient form (relevance ``R_t = t * grad_t``), applied by patching module forwards of ONE loaded model
instance (the module-level attention function is swapped only inside :func:`lrp_patched`):

- norms: the statistic is a constant. RMSNorm-like ``y = f(x)`` (any weight convention, e.g. Gemma's ``1 + w``)
  is linear in ``x`` once ``1/rms`` is fixed, so ``grad_x = grad_y * f(x) / x``; LayerNorm keeps its mean:
  ``y = w * (x - mean(x)) / std(x).detach() + b``;
- element-wise activations (incl. soft-capping ``c * tanh(s / c)``): identity rule,
  ``grad_x = grad_y * f(x) / (x + 1e-10)``;
- products of two relevance-carrying tensors (``Q K^T``, ``A V``, ``act(gate) * up``, expert output * routing
  weight, ``w / sum(w)`` as ``w * (1/sum)``): the product's gradient is halved (uniform rule);
- softmax, linear layers, additions, RoPE (cos/sin are constants): the plain gradient;
- CP-LRP: the attention weights and the activated gate are detached instead;
- "vit-lrp" (LXT's ViT recipe): CP-LRP plus the gamma rule on every ``nn.Linear`` (gamma 0.05) and ``nn.Conv2d``
  (gamma 0.25), written as zennit does it in gradient form: with ``z = layer(x)`` and ``z' = z + gamma z+``
  (``z+`` from the positive weights and bias), ``grad_x = grad_y * (z / stab(z')) * dz'/dx``, ``stab`` sign-aware with
  eps 1e-6; so ``grad_x = (W + gamma W+)^T (grad_y * z / stab(z'))``;
- ``epsilon > 0`` (BERT-style encoders only): eps-LRP once per layer, ``grad_in = grad_z * z / stab(z)`` through
  ``dz/din`` with ``stab(z) = z + eps sign(z)``, for every ``nn.Linear`` (``z = x W^T + b``), the residual sums of
  ``*SelfOutput`` / ``*Output`` (``z = dense(h) + x``) and the embeddings sum (``z = word + segment + position``).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import types

import numpy as np
import torch
import torch.nn.functional as F

IDENTITY_EPS = 1e-10


def forward_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """The forward value of ``value`` with the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def half(t: torch.Tensor) -> torch.Tensor:
    """Forward ``t``; backward ``grad / 2`` (uniform rule on the product that produced ``t``)."""
    return forward_of(t, 0.5 * t)


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    """Forward ``fn(x)``; backward ``grad * fn(x) / (x + eps)`` (identity rule)."""
    y = fn(x)
    return forward_of(y, x * (y / (x + IDENTITY_EPS)).detach())


def _rms_forward(self, x):
    y = self._lrp_orig(x)
    return forward_of(y, x * (y / x).detach())


def _layer_norm_forward(self, x):
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
    y = (x - mean) / std.detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _gated_mlp_forward(self, x):
    act = getattr(self, "act_fn", None) or self.activation_fn
    if hasattr(self, "gate_up_proj"):  # Phi3: one fused projection, split in two
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    if self._lrp_cp:
        return self.down_proj(act(gate.detach()) * up)
    return self.down_proj(half(identity_rule(act, gate) * up))


def _dense_act_forward(self, x):
    """Non-gated MLP input half (ViT/BERT ``Intermediate``): identity rule on the activation."""
    return identity_rule(self.intermediate_act_fn, self.dense(x))


def _pooler_forward(self, hidden):
    """BERT pooler ``tanh(dense(h[:, 0]))``: identity rule on the tanh."""
    return identity_rule(self.activation, self.dense(hidden[:, 0]))


def eps_layer(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Forward ``z``; backward ``grad * z / stab(z)`` into whatever computed ``z`` (eps-LRP on one layer)."""
    return forward_of(z, z * (z / (z + eps * torch.where(z >= 0, 1.0, -1.0))).detach())


def _linear_eps_forward(self, x):
    return eps_layer(self._lrp_orig(x), self._lrp_eps)


def _residual_eps_forward(self, hidden_states, input_tensor):
    """BERT ``*Output``: ``LayerNorm(dense(h) + x)`` with eps-LRP on the residual sum."""
    s = self.dropout(self.dense(hidden_states)) + input_tensor
    return self.LayerNorm(eps_layer(s, self._lrp_eps))


def _embeddings_eps_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                            past_key_values_length=0):
    """BERT embeddings ``LayerNorm(word + segment + position)`` with eps-LRP on the sum."""
    S = inputs_embeds.shape[1]
    if token_type_ids is None:
        token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long)
    if position_ids is None:
        position_ids = self.position_ids[:, past_key_values_length:past_key_values_length + S]
    s = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
    return self.dropout(self.LayerNorm(eps_layer(s, self._lrp_eps)))


def _gamma_forward(self, x):
    z = self._lrp_orig(x)
    w_pos = self.weight.clamp(min=0)
    b_pos = self.bias.clamp(min=0) if self.bias is not None else None
    if isinstance(self, torch.nn.Conv2d):
        z_pos = self._conv_forward(x, w_pos, b_pos)
    else:
        z_pos = F.linear(x, w_pos, b_pos)
    zm = z + self._lrp_gamma * z_pos
    den = zm + 1e-6 * torch.where(zm >= 0, 1.0, -1.0)
    return forward_of(z, zm * (z / den).detach())


def _mixtral_expert_forward(self, x):
    """Mixtral expert: ``w2(act(w1 x) * w3 x)``."""
    return self.w2(half(identity_rule(self.act_fn, self.w1(x)) * self.w3(x)))


def _t5_gated_forward(self, x):
    """T5 v1.1 ``DenseGatedActDense``: ``wo(act(wi_0 x) * wi_1 x)``."""
    return self.wo(half(identity_rule(self.act, self.wi_0(x)) * self.wi_1(x)))


class _HalvedMatmul:
    """Stands in for the ``torch`` module inside a modeling file whose attention calls ``torch.matmul``
    directly (T5): a product of two tensors that both carry gradient gets half of it (uniform rule)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def matmul(a, b):
        y = torch.matmul(a, b)
        return half(y) if a.requires_grad and b.requires_grad else y


def _moe_forward(self, hidden):
    """Sparse MoE (Qwen3-MoE, Mixtral): softmax router, top-k, optional renormalisation, weighted experts."""
    B, S, D = hidden.shape
    x = hidden.reshape(-1, D)
    logits = self.gate(x)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    w, sel = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        w = half(w * identity_rule(torch.reciprocal, w.sum(-1, keepdim=True)))
    out = torch.zeros_like(x)
    for e, expert in enumerate(self.experts):
        we = (w * (sel == e).to(w.dtype)).sum(-1, keepdim=True)  # 0 where e is not selected
        y = expert(x)
        out = out + (y * we.detach() if self._lrp_cp else half(y * we))
    return out.reshape(B, S, D), logits


def _make_attention(cp: bool):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        """Eager attention with the AttnLRP rules (grouped K/V heads repeated; float additive mask)."""
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if cp:
            query, key = query.detach(), key.detach()
        scores = torch.matmul(query, key.transpose(2, 3))
        scores = (scores if cp else half(scores)) * scaling
        if softcap is not None:
            scores = identity_rule(lambda s: torch.tanh(s / softcap) * softcap, scores)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
        out = out if cp else half(out)
        return out.transpose(1, 2).contiguous(), probs

    return attention


@contextlib.contextmanager
def lrp_patched(model, composite: str = "attnlrp", epsilon: float = 0.0):
    """Patch ``model`` (loaded with ``attn_implementation="eager"``) with the rules; restore on exit."""
    cp = composite in ("cp-lrp", "vit-lrp")
    gammas = {torch.nn.Linear: 0.05, torch.nn.Conv2d: 0.25} if composite == "vit-lrp" else {}
    modeling = importlib.import_module(type(model).__module__)
    saved_attention = getattr(modeling, "eager_attention_forward", None)
    saved_torch = modeling.torch
    if saved_attention is not None:
        modeling.eager_attention_forward = _make_attention(cp)
    elif not cp:
        modeling.torch = _HalvedMatmul()
    for m in model.modules():
        name = type(m).__name__
        m._lrp_cp = cp
        if name.endswith("RMSNorm") or name == "T5LayerNorm":
            m._lrp_orig = m.forward
            m.forward = types.MethodType(_rms_forward, m)
        elif isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(_layer_norm_forward, m)
        elif hasattr(m, "down_proj") and (hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj")):
            m.forward = types.MethodType(_gated_mlp_forward, m)
        elif hasattr(m, "experts") and hasattr(m, "gate") and hasattr(m, "top_k"):
            m.forward = types.MethodType(_moe_forward, m)
        elif all(hasattr(m, w) for w in ("w1", "w2", "w3")):
            m.forward = types.MethodType(_mixtral_expert_forward, m)
        elif hasattr(m, "wi_0") and hasattr(m, "wi_1"):
            m.forward = types.MethodType(_t5_gated_forward, m)
        elif hasattr(m, "intermediate_act_fn") and hasattr(m, "dense"):
            m.forward = types.MethodType(_dense_act_forward, m)
        elif name.endswith("Pooler") and hasattr(m, "dense") and hasattr(m, "activation"):
            m.forward = types.MethodType(_pooler_forward, m)
        elif type(m) in gammas:
            m._lrp_orig, m._lrp_gamma = m.forward, gammas[type(m)]
            m.forward = types.MethodType(_gamma_forward, m)
        if epsilon:
            m._lrp_eps = epsilon
            if isinstance(m, torch.nn.Linear):
                m._lrp_orig = m.forward
                m.forward = types.MethodType(_linear_eps_forward, m)
            elif name.endswith("Output") and all(hasattr(m, a) for a in ("dense", "LayerNorm", "dropout")):
                m.forward = types.MethodType(_residual_eps_forward, m)
            elif name.endswith("Embeddings") and hasattr(m, "token_type_embeddings"):
                m.forward = types.MethodType(_embeddings_eps_forward, m)
    try:
        yield model
    finally:
        modeling.torch = saved_torch
        if saved_attention is not None:
            modeling.eager_attention_forward = saved_attention


def torch_relevance(model_cls: str, pt_dir, input_ids, attention_mask=None, position_ids=None, positions=None,
                    targets=None, composite: str = "attnlrp", epsilon: float = 0.0) -> dict:
    """Token relevance ``(inputs_embeds * grad).sum(-1)`` of the explained logit, LXT's read-out."""
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(
        str(pt_dir), dtype=torch.float32, attn_implementation="eager").eval()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # applied below with the identity rule instead of inside the model
        model.config.final_logit_softcapping = None
    ids = torch.as_tensor(np.asarray(input_ids))
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids))
    with lrp_patched(model, composite, epsilon):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        if "use_cache" in inspect.signature(model.forward).parameters:
            kw["use_cache"] = False
        logits = model(inputs_embeds=emb, **kw).logits
        if cap is not None:
            logits = identity_rule(lambda z: torch.tanh(z / cap) * cap, logits)
        B = ids.shape[0]
        pos = torch.as_tensor(np.asarray(positions)) if positions is not None else torch.full((B,), ids.shape[1] - 1)
        rows = logits[torch.arange(B), pos] if logits.ndim == 3 else logits
        tgt = torch.as_tensor(np.asarray(targets)) if targets is not None else rows.argmax(-1)
        rows[torch.arange(B), tgt].sum().backward()
    rel = (emb * emb.grad).sum(-1).detach().double().numpy()
    return {"relevance": rel, "targets": tgt.numpy(), "logits": rows.detach().double().numpy()}


def torch_image_relevance(model_cls: str, pt_dir, pixel_values, targets=None, composite: str = "attnlrp") -> dict:
    """Pixel relevance ``pixel_values * grad`` of the explained class logit."""
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(
        str(pt_dir), dtype=torch.float32, attn_implementation="eager").eval()
    with lrp_patched(model, composite):
        x = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32)).requires_grad_()
        logits = model(pixel_values=x).logits
        B = x.shape[0]
        tgt = torch.as_tensor(np.asarray(targets)) if targets is not None else logits.argmax(-1)
        logits[torch.arange(B), tgt].sum().backward()
    rel = (x * x.grad).detach().double().numpy()
    return {"relevance": rel, "targets": tgt.numpy(), "logits": logits.detach().double().numpy()}


def torch_seq2seq_relevance(model_cls: str, pt_dir, input_ids, attention_mask, decoder_input_ids, positions,
                            targets) -> dict:
    """Encoder and decoder token relevance (``(embeds * grad).sum(-1)`` of both embedding inputs)."""
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(str(pt_dir), dtype=torch.float32).eval()
    emb_layer = model.get_input_embeddings()
    with lrp_patched(model):
        enc = emb_layer(torch.as_tensor(np.asarray(input_ids))).detach().requires_grad_()
        dec = emb_layer(torch.as_tensor(np.asarray(decoder_input_ids))).detach().requires_grad_()
        logits = model(inputs_embeds=enc, attention_mask=torch.as_tensor(np.asarray(attention_mask)),
                       decoder_inputs_embeds=dec, use_cache=False).logits
        B = enc.shape[0]
        rows = logits[torch.arange(B), torch.as_tensor(np.asarray(positions))]
        rows[torch.arange(B), torch.as_tensor(np.asarray(targets))].sum().backward()
    return {"encoder": (enc * enc.grad).sum(-1).detach().double().numpy(),
            "decoder": (dec * dec.grad).sum(-1).detach().double().numpy(),
            "logits": rows.detach().double().numpy()}
