"""Mixtral to ONNX. optimum-onnx refuses Mixtral, and tracing transformers' MoE block freezes the experts hit by
the dummy input into the graph (wrong for other inputs, and failing for a single token). Here the sparse MoE
block is traced as a loop over ALL experts, each taking the tokens routed to it (``NonZero``) and adding its
weighted output back (``ScatterElements``), as optimum already does for Qwen3-MoE; the rest is optimum's
Mistral export (same attention, RoPE, RMSNorm). Needs the ``export`` extra (torch, transformers, optimum-onnx).
"""
from __future__ import annotations

import os
from pathlib import Path


def _all_experts_forward(self, hidden_states):
    """MixtralSparseMoeBlock.forward with a static loop over every expert (same values as the original)."""
    import torch
    import torch.nn.functional as F

    b, s, d = hidden_states.shape
    x = hidden_states.view(-1, d)
    router_logits = self.gate(x)
    probs = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, chosen = torch.topk(probs, self.top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    hit = F.one_hot(chosen, num_classes=self.num_experts).permute(2, 1, 0)  # (expert, slot, token)
    out = torch.zeros_like(x)
    for e in range(self.num_experts):
        slot, token = torch.where(hit[e])
        y = self.experts[e](x[token]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(x.dtype))
    return out.view(b, s, d), router_logits


def export_mixtral(model_or_dir, out_dir, *, task: str = "text-generation", opset: int | None = None) -> Path:
    """Export a Mixtral model (a ``MixtralForCausalLM`` or a folder holding one) to ``out_dir/model.onnx``.

    ``task``: ``"text-generation"`` (inputs ``input_ids``, ``attention_mask``, ``position_ids``; output
    ``logits``) or ``"text-generation-with-past"`` (plus ``past_key_values.*`` / ``present.*``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.onnx.model_configs import MistralOnnxConfig
    from optimum.exporters.onnx.model_patcher import ModelPatcher
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if task not in ("text-generation", "text-generation-with-past"):
        raise ValueError(f"task must be 'text-generation' or 'text-generation-with-past', got {task!r}")
    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        model = MixtralForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32)
    if type(model).__name__ != "MixtralForCausalLM":
        raise TypeError(f"expected a MixtralForCausalLM or its folder, got {type(model).__name__}")
    model = model.eval()

    class MixtralPatcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._moe_forward = MixtralSparseMoeBlock.forward
            MixtralSparseMoeBlock.forward = _all_experts_forward

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            MixtralSparseMoeBlock.forward = self._moe_forward

    class MixtralOnnxConfig(MistralOnnxConfig):
        _MODEL_PATCHER = MixtralPatcher

    past = task.endswith("-with-past")
    config = MixtralOnnxConfig(model.config, task="text-generation", use_past=past, use_past_in_inputs=past)
    out = Path(out_dir)
    onnx_export_from_model(model, str(out), task=task, opset=opset, custom_onnx_configs={"model": config},
                           no_post_process=True, do_validation=False)
    return out / "model.onnx"
