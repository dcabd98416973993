"""An independent AttnLRP reference: the modified-gradient rules written with torch autograd on the PyTorch model.

Optional (needs torch and transformers: ``pip install 'onnx-lrp[validate]'``); onnx-lrp itself never imports it.
Used for the families LXT 2.1 has no patches for (Phi3, Gemma 1/2, Qwen3-MoE, Mixtral, ...) by the tests and by
:mod:`onnx_lrp.validate`. It is checked against LXT itself on the families LXT does support
(tests/test_coverage.py), so the two references agree; :data:`CHECKED_MODEL_TYPES` are the transformers model
types it is tested on (tests/test_coverage*.py).

Entry points: :func:`lrp_patched` (the rules on one loaded model, as a context manager) and :func:`explain`
(relevance of one output entry per batch element, and at the hidden states).

Rules, in gradient form (relevance ``R_t = t * grad_t``), applied by patching module forwards of ONE loaded model
instance (the module-level attention function is swapped only inside :func:`lrp_patched`):

- norms: the statistic is a constant. RMSNorm-like ``y = f(x)`` (any weight convention, e.g. Gemma's ``1 + w``)
  is linear in ``x`` once ``1/rms`` is fixed, so ``grad_x = grad_y * f(x) / x``; LayerNorm keeps its mean:
  ``y = w * (x - mean(x)) / std(x).detach() + b``;
- element-wise activations (incl. soft-capping ``c * tanh(s / c)``, and every activation module: ``ACT2FN``
  entries, ``nn.GELU``, ``nn.Tanh``, ...): identity rule, ``grad_x = grad_y * f(x) / (x + 1e-10)``, where it is
  sound (``f(0) = 0``, ``f(x)/x`` bounded: probed numerically); other activations (sigmoid, hard-sigmoid) the plain
  gradient;
- products of two relevance-carrying tensors (``Q K^T``, ``A V``, ``act(gate) * up``, expert output * softmax
  routing weight, ``w / sum(w)`` as ``w * (1/sum)``): the product's gradient is halved (uniform rule); a factor
  computed by a non-zero-centred function (DeepSeek-V3's sigmoid routing weights) is a gate, held constant;
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
from torch.overrides import TorchFunctionMode

IDENTITY_EPS = 1e-10

# transformers model types the reference is checked on (tests/test_coverage.py, tests/test_coverage_more.py)
CHECKED_MODEL_TYPES = frozenset({
    "albert", "arcee", "audio-spectrogram-transformer", "bart", "beit", "bert", "big_bird", "blenderbot", "bloom",
    "camembert", "clip", "clip_vision_model", "codegen", "cohere", "convbert", "convnext", "convnextv2",
    "data2vec-text", "data2vec-vision", "deberta-v2", "deepseek_v3", "deit", "distilbert", "electra", "esm", "falcon",
    "gemma", "gemma2", "gemma3_text", "glm", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_oss", "gptj",
    "granite", "helium", "hiera", "levit", "llama", "longformer", "longt5", "m2m_100", "marian", "mbart",
    "megatron-bert", "mistral", "mixtral", "mobilebert", "mobilenet_v2", "mobilevit", "modernbert", "mpnet", "mpt",
    "mt5", "nemotron", "olmo", "olmo2", "opt", "pegasus", "phi", "phi3", "poolformer", "qwen2", "qwen3", "qwen3_moe",
    "regnet", "rembert", "resnet", "roberta", "roformer", "segformer", "sew", "siglip_vision_model", "smollm3",
    "squeezebert", "stablelm", "swin", "swinv2", "t5", "vit", "vit_msn", "wav2vec2", "wavlm", "whisper",
    "xlm-roberta", "yolos",
})


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
    return forward_of(y, x * torch.where(x == 0, 0, y / torch.where(x == 0, 1, x)).detach())  # exact zeros: LongT5


def _layer_norm_forward(self, x):
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
    y = (x - mean) / std.detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _custom_layer_norm_forward(self, x):
    """A LayerNorm written out by a modeling file (Cohere, OLMo, ConvNeXt's channels-first): ``std`` detached; checked
    against the module's own output, so a norm of another form fails loudly instead of giving a wrong reference."""
    eps = getattr(self, "eps", getattr(self, "variance_epsilon", 1e-5))
    axis = 1 if getattr(self, "data_format", None) == "channels_first" else -1
    y = _layer_norm_forward(types.SimpleNamespace(eps=eps, weight=getattr(self, "weight", None),
                                                  bias=getattr(self, "bias", None)), x.movedim(axis, -1))
    y = y.movedim(-1, axis)
    ref = self._lrp_orig(x)
    if not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
        raise NotImplementedError(f"{type(self).__name__} is not a LayerNorm w * (x - mean) / std + b")
    return y


def _zero_centred(fn) -> bool:
    """Whether ``fn(0) = 0`` and ``fn(x)/x`` stays bounded near 0 (probed in float64): where the identity rule is
    sound."""
    x = torch.tensor([0.0, 1e-8, -1e-8, 1e-4, -1e-4, 1e-2, -1e-2], dtype=torch.float64)
    with torch.no_grad():
        y = fn(x)
    ratio = y[1:] / x[1:]
    return bool(abs(float(y[0])) < 1e-7 and torch.isfinite(ratio).all() and ratio.abs().max() < 1e3)


def activation_rule(fn, x: torch.Tensor) -> torch.Tensor:
    """An activation ``fn(x)``: the identity rule where it is sound (zero-centred), else the plain gradient;
    transformers' Laplace activation ``0.5 (1 + erf((x - mu) / (sigma sqrt 2)))``: the shifts are constants
    (biases) and the identity rule applies to the erf."""
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if type(owner).__name__ == "LaplaceActivation":
        defaults = inspect.signature(type(owner).forward).parameters  # forward(self, input, mu=..., sigma=...)
        u = (x - defaults["mu"].default) / (defaults["sigma"].default * 2**0.5)
        return 0.5 * (1.0 + identity_rule(torch.erf, u))
    if _zero_centred(fn):
        return identity_rule(fn, x)
    return fn(x)


def gated_product(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` under AttnLRP: uniform rule (halved) with the activation's rule; a non-zero-centred
    activation (a sigmoid GLU) is a gate, held constant: ``up`` takes all relevance."""
    if _zero_centred(act) or type(act).__name__ == "LaplaceActivation":  # (laplace: identity on its erf)
        return half(activation_rule(act, gate) * up)
    return act(gate).detach() * up


def _activation_forward(self, x):
    """An activation module (``ACT2FN`` entries, ``nn.GELU``, ``nn.Tanh``, ...): :func:`activation_rule`."""
    return activation_rule(self._lrp_orig, x)


_ACTIVATIONS = (torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish,
                torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU)


def _is_activation(m) -> bool:
    """Activation modules: torch's, ``transformers.activations`` (``ACT2FN``), and a modeling file's own
    ``*Gelu`` (BLOOM)."""
    return (isinstance(m, _ACTIVATIONS) or type(m).__module__ == "transformers.activations"
            or type(m).__name__.lower().endswith("gelu"))


def _gated_mlp_forward(self, x):
    act = getattr(self, "act_fn", None) or self.activation_fn
    if hasattr(self, "gate_up_proj"):  # Phi3: one fused projection, split in two
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    if self._lrp_cp:
        return self.down_proj(act(gate.detach()) * up)
    return self.down_proj(gated_product(act, gate, up))


def _dense_act_forward(self, x):
    """Non-gated MLP input half (ViT/BERT ``Intermediate``): identity rule on the activation."""
    return activation_rule(self.intermediate_act_fn, self.dense(x))


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
    return self.w2(gated_product(self.act_fn, self.w1(x), self.w3(x)))


def _gpt_oss_experts_forward(self, hidden, router_indices=None, routing_weights=None):
    """GPT-OSS experts: ``(clamp(up) + 1) * glu(clamp(gate))`` with ``glu(g) = g * sigmoid(alpha g)``, weighted by
    the routing scores (0 for experts not selected): identity rule on the clamps and the GLU, products halved."""
    x = hidden.reshape(-1, self.hidden_size)
    out = torch.zeros_like(x)
    for e in range(routing_weights.shape[1]):
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate = identity_rule(lambda t: t.clamp(max=self.limit), gate_up[..., ::2])
        up = identity_rule(lambda t: t.clamp(-self.limit, self.limit), gate_up[..., 1::2])
        glu = identity_rule(lambda t: t * torch.sigmoid(t * self.alpha), gate)
        y = half((up + 1) * glu) @ self.down_proj[e] + self.down_proj_bias[e]
        w = routing_weights[:, e, None]
        out = out + (y * w.detach() if self._lrp_cp else half(y * w))
    return out.reshape(hidden.shape)


def _deepseek_router_forward(self, hidden):
    """DeepSeek-V3 router: sigmoid scores, grouped top-k, renormalised top-k weights, routed scaling factor. The
    weights come from a non-zero-centred function (a sigmoid gate) and are held constant in the expert product
    (:func:`_deepseek_moe`), so no relevance reaches this router."""
    scores = identity_rule(torch.sigmoid, F.linear(hidden.reshape(-1, self.config.hidden_size), self.weight))
    idx = self.get_topk_indices(scores)
    w = scores.gather(1, idx)
    if self.norm_topk_prob:
        w = half(w * identity_rule(torch.reciprocal, w.sum(-1, keepdim=True) + 1e-20))
    return idx, w * self.routed_scaling_factor


def _deepseek_moe(self, hidden, topk_indices, topk_weights):
    """DeepSeek-V3 routed experts: expert output x routing weight, the sigmoid-router weight a gate held constant
    (the expert output takes all relevance: the signal-take-all rule of Arras et al. 2017, as CP-LRP does)."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(self.experts):
        we = (topk_weights * (topk_indices == e).to(topk_weights.dtype)).sum(-1, keepdim=True)
        out = out + expert(hidden) * we.detach()
    return out


def _t5_gated_forward(self, x):
    """T5 v1.1 ``DenseGatedActDense``: ``wo(act(wi_0 x) * wi_1 x)``."""
    return self.wo(gated_product(self.act, self.wi_0(x), self.wi_1(x)))


class _InlineRules(TorchFunctionMode):
    """The rules on torch functions, for what module patches cannot reach.

    Always: ``F.layer_norm`` and ``F.group_norm`` keep their mean with ``std`` detached (norms inside a modeling
    file's own module, e.g. OLMo's, Nemotron's ``1 + w``; ``nn.GroupNorm``); vector norms (``torch.norm``,
    ``linalg.vector_norm``, ``F.normalize``: Swin-V2's cosine attention, ConvNeXt-V2's GRN) are constants;
    ``clamp`` (OLMo's ``clip_qkv``) and activations called as functions (Whisper's ``F.gelu``) take the identity
    rule. With ``products`` (not under CP-LRP): every matrix product of two tensors that both carry gradient
    (``matmul``, ``@``, ``bmm``, two-operand ``einsum``, the product in ``baddbmm``, SDPA written out:
    attention written inline by T5, Falcon, BLOOM, RoBERTa, ..., and products outside attention such as CLIP's
    text x image logits) gets half of it, and ``torch.tanh`` the identity rule. ``eager_attention_forward``
    (replaced by :func:`_make_attention`) halves its own products.
    Parameters must not require grad (``lrp_patched`` turns it off), so "carries gradient" means "depends on
    the input".
    """

    _MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
    _NORMS = (torch.norm, torch.Tensor.norm, torch.linalg.vector_norm)
    _ACTIVATION_FUNCTIONS = (F.gelu, F.silu, F.relu, F.mish)
    _CLAMPS = (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, torch.Tensor.clamp_)

    def __init__(self, products: bool):
        super().__init__()
        self.products = products

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm and args[0].requires_grad:
            return _layer_norm_detached(*args, **kwargs)
        if func is F.group_norm and args[0].requires_grad:
            return _group_norm_detached(*args, **kwargs)
        if func is F.normalize and args[0].requires_grad:
            return _normalize_detached(*args, **kwargs)
        if func in self._NORMS and args[0].requires_grad:  # a norm statistic (ConvNeXt-V2's GRN)
            with torch.no_grad():
                return func(*args, **kwargs)
        if func in self._ACTIVATION_FUNCTIONS and args[0].requires_grad:
            return identity_rule(lambda t: func(t, *args[1:], **kwargs), args[0])
        if func in self._CLAMPS and args[0].requires_grad:
            y = identity_rule(lambda t: torch.clamp(t, *args[1:], **kwargs), args[0])
            return args[0].copy_(y) if func is torch.Tensor.clamp_ else y  # in place: the new value's grad is y's
        if not self.products:
            return func(*args, **kwargs)
        if func in self._MATMULS:
            y = func(*args, **kwargs)
            return half(y) if args[0].requires_grad and args[1].requires_grad else y
        if func in (torch.baddbmm, torch.Tensor.baddbmm):
            inp = args[0]
            b1, b2 = (args[1], args[2]) if len(args) > 2 else (kwargs["batch1"], kwargs["batch2"])
            if not (b1.requires_grad and b2.requires_grad):
                return func(*args, **kwargs)
            return kwargs.get("beta", 1) * inp + kwargs.get("alpha", 1) * half(torch.bmm(b1, b2))
        if func is torch.einsum:  # LongT5 attention: a product of n carrying operands, each gets 1/n
            ops = args[1:] if len(args) > 2 else args[1]
            y, n = func(*args, **kwargs), sum(o.requires_grad for o in ops)
            return forward_of(y, y / n) if n >= 2 else y
        if func in (torch.tanh, torch.Tensor.tanh) and args[0].requires_grad:
            return identity_rule(torch.tanh, args[0])
        if func is F.scaled_dot_product_attention:
            return _sdpa_halved(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm_detached(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    std = ((x - mean).pow(2).mean(dims, keepdim=True) + eps).sqrt()
    y = (x - mean) / std.detach()
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _normalize_detached(x, p=2.0, dim=1, eps=1e-12, out=None):
    return x / x.detach().norm(p, dim, keepdim=True).clamp_min(eps)


def _group_norm_detached(x, groups, weight=None, bias=None, eps=1e-5):
    xg = x.reshape(x.shape[0], groups, -1)
    mean = xg.mean(-1, keepdim=True)
    std = ((xg - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()
    y = ((xg - mean) / std.detach()).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def _sdpa_halved(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``softmax(q k^T * scale + mask) v`` with both products halved (eval: no dropout)."""
    if enable_gqa or k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = half(torch.matmul(q, k.transpose(-2, -1))) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return half(torch.matmul(F.softmax(scores, dim=-1), v))


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
        with torch._C.DisableTorchFunction():  # halved here, not again by _InlineRules
            scores = torch.matmul(query, key.transpose(2, 3))
        scores = (scores if cp else half(scores)) * scaling
        if softcap is not None:
            scores = identity_rule(lambda s: torch.tanh(s / softcap) * softcap, scores)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        sinks = getattr(module, "sinks", None)  # GPT-OSS: one constant logit per head joins the softmax
        if sinks is not None:
            scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if sinks is not None:
            probs = probs[..., :-1]
        with torch._C.DisableTorchFunction():
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
    if saved_attention is not None:
        modeling.eager_attention_forward = _make_attention(cp)
    saved_gelu = getattr(modeling, "gelu", None)
    if callable(saved_gelu) and not isinstance(saved_gelu, type):  # ESM: a module-level GELU function
        modeling.gelu = lambda t: identity_rule(saved_gelu, t)
    saved_norm = getattr(modeling, "_get_vector_norm", None)
    if saved_norm is not None:  # CLIP: L2 norm of the embeddings written with pow/sum: a norm statistic
        modeling._get_vector_norm = lambda t: saved_norm(t.detach())
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    for m in model.modules():
        name = type(m).__name__
        m._lrp_cp = cp
        if name.endswith("RMSNorm") or name.endswith("T5LayerNorm"):  # T5, mT5, LongT5: RMS norms
            m._lrp_orig = m.forward
            m.forward = types.MethodType(_rms_forward, m)
        elif type(m).forward is torch.nn.LayerNorm.forward:
            m.forward = types.MethodType(_layer_norm_forward, m)
        elif name.endswith("LayerNorm") and not any(m.children()) and (
                not isinstance(m, torch.nn.LayerNorm) or getattr(m, "data_format", None) == "channels_first"):
            m._lrp_orig = m.forward
            m.forward = types.MethodType(_custom_layer_norm_forward, m)
        elif hasattr(m, "get_topk_indices") and hasattr(m, "routed_scaling_factor"):
            m.forward = types.MethodType(_deepseek_router_forward, m)
        elif hasattr(m, "moe") and hasattr(m, "shared_experts"):
            m.moe = types.MethodType(_deepseek_moe, m)
        elif hasattr(m, "gate_up_proj") and hasattr(m, "alpha") and hasattr(m, "limit"):
            m.forward = types.MethodType(_gpt_oss_experts_forward, m)
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
        elif _is_activation(m):
            m._lrp_orig = m.forward
            m.forward = types.MethodType(_activation_forward, m)
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
        with _InlineRules(products=not cp):
            yield model
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        if saved_attention is not None:
            modeling.eager_attention_forward = saved_attention
        if saved_norm is not None:
            modeling._get_vector_norm = saved_norm
        if callable(saved_gelu) and not isinstance(saved_gelu, type):
            modeling.gelu = saved_gelu


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
                            targets, encoder_input: str = "input_ids") -> dict:
    """Encoder and decoder token relevance: ``(embedding output * grad).sum(-1)`` at both embedding lookups
    (hooked, so scales applied after the lookup stay in the model), or ``input_features * grad`` when
    ``encoder_input`` is a float input (Whisper)."""
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(
        str(pt_dir), dtype=torch.float32, attn_implementation="eager").eval()
    held = []

    def hook(module, args, out):
        held.append(out.detach().requires_grad_())
        return held[-1]

    text = encoder_input == "input_ids"
    src = torch.as_tensor(np.array(input_ids))
    if not text:
        src.requires_grad_()
    embs = {id(m): m for m in ([model.get_encoder().get_input_embeddings()] if text else [])
            + [model.get_decoder().get_input_embeddings()]}
    handles = [m.register_forward_hook(hook) for m in embs.values()]
    kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.asarray(attention_mask))}
    try:
        with lrp_patched(model):
            dec_ids = torch.as_tensor(np.asarray(decoder_input_ids))
            logits = model(**{encoder_input: src}, **kw, decoder_input_ids=dec_ids, use_cache=False).logits
            B = logits.shape[0]
            rows = logits[torch.arange(B), torch.as_tensor(np.asarray(positions))]
            rows[torch.arange(B), torch.as_tensor(np.asarray(targets))].sum().backward()
    finally:
        for h in handles:
            h.remove()
    enc = (held[0] * held[0].grad).sum(-1) if text else src * src.grad  # the encoder runs first
    dec = held[-1]
    return {"encoder": enc.detach().double().numpy(), "decoder": (dec * dec.grad).sum(-1).detach().double().numpy(),
            "logits": rows.detach().double().numpy()}


def torch_output_relevance(model_cls: str, pt_dir, feeds: dict, output: str, positions=None, targets=None,
                           composite: str = "attnlrp", attn: str = "eager") -> dict:
    """:func:`explain` on the model of class ``model_cls`` loaded from ``pt_dir``."""
    return explain(load(model_cls, pt_dir, attn), feeds, output, positions, targets, composite=composite)


def load(model_cls: str, pt_dir, attn: str = "eager") -> torch.nn.Module:
    """``transformers.<model_cls>`` from the folder ``pt_dir`` in float32 (eager attention: the rules patch it)."""
    import transformers

    return getattr(transformers, model_cls).from_pretrained(
        str(pt_dir), dtype=torch.float32, attn_implementation=attn).eval()


def explain(model: torch.nn.Module, feeds: dict, output: str = "logits", positions=None, targets=None, *,
            weights=None, composite: str = "attnlrp", hidden_states: bool = False) -> dict:
    """Relevance of ``score[b] = output[b, (positions[b],) targets[b]]`` (or of ``sum(weights[b] * output[b])``)
    for any model and graph-style ``feeds``, per input: ``input_ids``: ``(embedding output * grad).sum(-1)`` read
    at the input embedding module (hooked); float inputs (pixels, audio): ``x * grad``.
    ``composite="gradient-x-input"``: plain autograd on the unpatched model.

    Returns ``relevance`` (per input), ``score`` (b,), ``targets`` (when given or chosen: the argmax), ``output``
    (the explained output, all of it); with ``hidden_states``, also ``hidden_states`` and ``hidden_relevance``
    (``h * grad`` at each of ``output_hidden_states``: the residual stream after each block).
    """
    kw = {k: torch.as_tensor(np.array(v)) for k, v in feeds.items()}
    for v in kw.values():
        if v.is_floating_point():
            v.requires_grad_()
    held = {}

    def hook(module, args, out):
        held["x"] = out.detach().requires_grad_()
        return held["x"]

    handle = None if "input_ids" not in kw else _input_embeddings(model).register_forward_hook(hook)
    patch = contextlib.nullcontext() if composite == "gradient-x-input" else lrp_patched(model, composite)
    tgt = None
    try:
        with patch, torch.enable_grad():
            extra = {"use_cache": False} if "CausalLM" in type(model).__name__ else {}
            if hidden_states:
                extra["output_hidden_states"] = True
            out = model(**kw, **extra)
            y = out[output]
            hidden = list(out.hidden_states) if hidden_states else []
            for h in hidden:
                if h.requires_grad and not h.is_leaf:
                    h.retain_grad()
            B = y.shape[0]
            if weights is not None:
                sel = (y * torch.as_tensor(np.asarray(weights), dtype=y.dtype)).reshape(B, -1).sum(-1)
            else:
                rows = y[torch.arange(B), torch.as_tensor(np.asarray(positions))] if y.ndim == 3 else y
                tgt = torch.as_tensor(np.asarray(targets)) if targets is not None else rows.argmax(-1)
                sel = rows[torch.arange(B), tgt]
            sel.sum().backward()
    finally:
        if handle is not None:
            handle.remove()
    rel = {k: (v * v.grad).detach().double().numpy() for k, v in kw.items() if v.is_floating_point()}
    if "x" in held:
        rel["input_ids"] = (held["x"] * held["x"].grad).sum(-1).detach().double().numpy()
    res = {"relevance": rel, "score": sel.detach().double().numpy(), "output": y.detach().double().numpy()}
    if tgt is not None:
        res["targets"] = tgt.numpy()
    if hidden_states:
        res["hidden_states"] = [h.detach().float().numpy() for h in hidden]
        res["hidden_relevance"] = [(h * h.grad).detach().float().numpy() if h.grad is not None
                                   else np.zeros(h.shape, np.float32) for h in hidden]
    return res


def _input_embeddings(model):
    """The token embedding module (for a dual-encoder such as CLIP: the text tower's)."""
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return next(m for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Embedding) and ("token" in n or "word" in n))
