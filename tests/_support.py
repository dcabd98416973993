"""Test support: tiny random-weight transformers built from configs, exported with optimum (cached), and an
independent reference (LXT 2.1's efficient engine on the same PyTorch weights: :mod:`onnx_lrp.reference.lxt`, run
in a subprocess because LXT's patches are process-global).

Exports are cached in ``$ONNX_LRP_TEST_CACHE`` (default ``~/.cache/onnx-lrp/tests``), keyed by family, config and
export options, so one test run exports each model once.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from onnx_lrp.reference import lxt

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("ONNX_LRP_TEST_CACHE", Path.home() / ".cache" / "onnx-lrp" / "tests"))

# family -> (config class, model class, optimum task, config kwargs)
FAMILIES: dict[str, tuple[str, str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, use_sliding_window=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, hidden_activation="gelu_pytorch_tanh")),
    # small soft-caps so that tanh is far from linear on tiny random weights
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=8,
        sliding_window=6, final_logit_softcapping=2.0, attn_logit_softcapping=1.5)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=8,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "vit": ("ViTConfig", "ViTForImageClassification", "image-classification", dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3)),
    # encoder-decoder: exported as encoder_model.onnx + decoder_model.onnx (tests/_variants.py: seq2seq_model)
    "t5": ("T5Config", "T5ForConditionalGeneration", "text2text-generation", dict(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, decoder_start_token_id=0)),
    # optimum refuses Mixtral: exported with onnx_lrp.exporters.mixtral (tests/_variants.py: mixtral_model)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "text-generation", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "bert": ("BertConfig", "BertForSequenceClassification", "text-classification", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3)),
    # other heads / optimum tasks on the same tiny bodies (tests/test_parity_more.py)
    "bert_mlm": ("BertConfig", "BertForMaskedLM", "fill-mask", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
    "bert_tok": ("BertConfig", "BertForTokenClassification", "token-classification", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=5)),
    "bert_qa": ("BertConfig", "BertForQuestionAnswering", "question-answering", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
    "bert_mc": ("BertConfig", "BertForMultipleChoice", "multiple-choice", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
    "bert_feat": ("BertConfig", "BertModel", "feature-extraction", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
    "llama_feat": ("LlamaConfig", "LlamaModel", "feature-extraction", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)),
    # sequence classifiers pool at the last non-pad token (ids != pad_token_id)
    "llama_cls": ("LlamaConfig", "LlamaForSequenceClassification", "text-classification", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, num_labels=3, pad_token_id=0)),
    "qwen2_cls": ("Qwen2Config", "Qwen2ForSequenceClassification", "text-classification", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=False, num_labels=3, pad_token_id=0)),
    "qwen3_cls": ("Qwen3Config", "Qwen3ForSequenceClassification", "text-classification", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, use_sliding_window=False, num_labels=3,
        pad_token_id=0)),
    "gpt2_tok": ("GPT2Config", "GPT2ForTokenClassification", "token-classification", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=4)),
    "gpt2_cls": ("GPT2Config", "GPT2ForSequenceClassification", "text-classification", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)),
}


# More families (tests/test_coverage_more.py, docs/coverage-more.md): encoders with other heads and position
# schemes, decoders with ALiBi / partial rotary / parallel residual / MQA / clipping / ReLU^2, vision backbones.
_D = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_DEC = dict(_D, intermediate_size=64, max_position_embeddings=64)
_ENC = dict(_D, intermediate_size=64, max_position_embeddings=64, num_labels=3)
_VIS = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_labels=3)
_S2S = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.2)
FAMILIES.update({
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "text-classification", dict(_ENC, pad_token_id=1)),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForTokenClassification", "token-classification",
                    dict(_ENC, pad_token_id=1)),
    "camembert": ("CamembertConfig", "CamembertForQuestionAnswering", "question-answering",
                  dict(_ENC, pad_token_id=1, num_labels=2)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", "text-classification", dict(
        vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3)),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", "text-classification", dict(_ENC, embedding_size=16)),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", "fill-mask", dict(_ENC, embedding_size=16)),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", "text-classification", dict(_ENC)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", "feature-extraction", dict(
        _ENC, relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        position_biased_input=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", "text-generation", dict(
        _D, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1)),
    "bloom": ("BloomConfig", "BloomForCausalLM", "text-generation", dict(vocab_size=128, hidden_size=32, n_layer=2,
                                                                         n_head=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM", "text-generation", dict(
        _D, new_decoder_architecture=True, num_kv_heads=2, alibi=False, parallel_attn=True, bias=True)),
    "falcon_mqa": ("FalconConfig", "FalconForCausalLM", "text-generation", dict(
        _D, new_decoder_architecture=False, multi_query=True, alibi=False, parallel_attn=True, bias=False)),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM", "text-generation", dict(
        _D, new_decoder_architecture=False, multi_query=False, alibi=True, parallel_attn=False, bias=True)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "text-generation", dict(
        _DEC, rotary_pct=0.5, use_parallel_residual=True)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", "text-generation", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", "text-generation", dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", "text-generation", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "phi": ("PhiConfig", "PhiForCausalLM", "text-generation", dict(_DEC, partial_rotary_factor=0.5)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5,
        attention_multiplier=0.3)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", "text-generation", dict(_DEC, num_key_value_heads=2, clip_qkv=0.05)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "text-generation", dict(_DEC, num_key_value_heads=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "text-generation", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
    "cohere": ("CohereConfig", "CohereForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, logit_scale=0.5)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", "text-generation", dict(_DEC, num_key_value_heads=2, head_dim=8)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", "text-generation", dict(_DEC, num_key_value_heads=2)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, partial_rotary_factor=0.5)),
    "glm": ("GlmConfig", "GlmForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    "mpt": ("MptConfig", "MptForCausalLM", "text-generation", dict(
        vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.1)),
    # decoders with other heads: pooled at the last token (no position_ids input), per token, hidden states
    "llama_cls": ("LlamaConfig", "LlamaForSequenceClassification", "text-classification", dict(
        _DEC, num_key_value_heads=2, num_labels=3, pad_token_id=0)),
    "gpt2_cls": ("GPT2Config", "GPT2ForSequenceClassification", "text-classification", dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)),
    "bloom_cls": ("BloomConfig", "BloomForSequenceClassification", "text-classification", dict(
        vocab_size=128, hidden_size=32, n_layer=2, n_head=4, num_labels=3, pad_token_id=0)),
    "gpt_neox_cls": ("GPTNeoXConfig", "GPTNeoXForSequenceClassification", "text-classification", dict(
        _DEC, rotary_pct=0.5, num_labels=3, pad_token_id=0)),
    "qwen2_tok": ("Qwen2Config", "Qwen2ForTokenClassification", "token-classification", dict(
        _DEC, num_key_value_heads=2, num_labels=3)),
    "qwen3_fe": ("Qwen3Config", "Qwen3Model", "feature-extraction", dict(_DEC, num_key_value_heads=2, head_dim=8)),
    "deit": ("DeiTConfig", "DeiTForImageClassification", "image-classification", dict(_VIS)),
    "beit": ("BeitConfig", "BeitForImageClassification", "image-classification", dict(
        _VIS, use_relative_position_bias=True, layer_scale_init_value=0.5, use_mean_pooling=True)),
    "swin": ("SwinConfig", "SwinForImageClassification", "image-classification", dict(
        image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", "image-classification", dict(
        image_size=16, num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
        num_labels=3)),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModelWithProjection", "feature-extraction", dict(
        _VIS, projection_dim=8)),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", "feature-extraction", dict(_VIS)),
    "modernbert": ("ModernBertConfig", "ModernBertForTokenClassification", "token-classification", dict(
        _ENC, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "esm": ("EsmConfig", "EsmForTokenClassification", "token-classification", dict(
        _ENC, pad_token_id=1, position_embedding_type="rotary", mask_token_id=4, token_dropout=True)),
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", "text-classification", dict(
        _ENC, embedding_size=32)),
    "rembert": ("RemBertConfig", "RemBertForSequenceClassification", "text-classification", dict(
        _ENC, input_embedding_size=16, output_embedding_size=16)),
    "convbert": ("ConvBertConfig", "ConvBertForSequenceClassification", "text-classification", dict(
        _ENC, embedding_size=32, head_ratio=2, conv_kernel_size=3)),
    "squeezebert": ("SqueezeBertConfig", "SqueezeBertForSequenceClassification", "text-classification", dict(
        _ENC, embedding_size=32, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
        output_groups=2)),
    "mobilebert": ("MobileBertConfig", "MobileBertForSequenceClassification", "text-classification", dict(
        _ENC, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2)),
    "big_bird": ("BigBirdConfig", "BigBirdForSequenceClassification", "text-classification", dict(
        _ENC, attention_type="original_full", hidden_act="gelu")),  # its head calls ACT2FN inline: unpatchable
    "longformer": ("LongformerConfig", "LongformerForSequenceClassification", "text-classification", dict(
        _ENC, attention_window=4, pad_token_id=1)),
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification", "text-classification", dict(
        _ENC, pad_token_id=1)),
    "megatron_bert": ("MegatronBertConfig", "MegatronBertForSequenceClassification", "text-classification",
                      dict(_ENC)),
    "roberta_mc": ("RobertaConfig", "RobertaForMultipleChoice", "multiple-choice", dict(_ENC, pad_token_id=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "text-generation", dict(
        _DEC, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1, pad_token_id=0)),
    "segformer": ("SegformerConfig", "SegformerForImageClassification", "image-classification", dict(
        image_size=16, num_labels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
    "poolformer": ("PoolFormerConfig", "PoolFormerForImageClassification", "image-classification", dict(
        image_size=16, num_labels=3, num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], padding=[1, 1])),
    "resnet": ("ResNetConfig", "ResNetForImageClassification", "image-classification", dict(
        image_size=16, num_labels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
    "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification", "image-classification", dict(
        image_size=32, num_labels=3, depth_multiplier=0.25)),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification", "image-classification", dict(
        image_size=16, num_labels=3, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification", "image-classification", dict(
        image_size=16, num_labels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
    "data2vec_vision": ("Data2VecVisionConfig", "Data2VecVisionForImageClassification", "image-classification",
                        dict(_VIS, use_relative_position_bias=True)),
    "vit_msn": ("ViTMSNConfig", "ViTMSNForImageClassification", "image-classification", dict(_VIS)),
    "clip": ("CLIPConfig", "CLIPModel", "zero-shot-image-classification", dict(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4), projection_dim=8)),
    "mobilevit": ("MobileViTConfig", "MobileViTForImageClassification", "image-classification", dict(
        image_size=32, num_labels=3, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        patch_size=2)),
    "levit": ("LevitConfig", "LevitForImageClassification", "image-classification", dict(
        image_size=64, num_labels=3, patch_size=16, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2])),
    "hiera": ("HieraConfig", "HieraForImageClassification", "image-classification", dict(
        image_size=[32, 32], num_labels=3, patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=8,
        num_heads=[1, 2], depths=[1, 1], query_stride=[2, 2], masked_unit_size=[4, 4],
        masked_unit_attention=[True, False], num_query_pool=1)),
    "yolos": ("YolosConfig", "YolosForObjectDetection", "object-detection", dict(
        _VIS, image_size=[16, 16], num_detection_tokens=3)),
    "regnet": ("RegNetConfig", "RegNetForImageClassification", "image-classification", dict(
        image_size=32, num_labels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4,
        layer_type="y")),
    # audio: waveform (GroupNorm feature extractor, weight-normed conv positions) and spectrogram patches
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", "audio-classification", dict(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=[8, 8], conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8, feat_extract_norm="group")),
    "sew": ("SEWConfig", "SEWForSequenceClassification", "audio-classification", dict(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=[8, 8], conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8, squeeze_factor=2)),
    "wavlm": ("WavLMConfig", "WavLMForSequenceClassification", "audio-classification", dict(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=[8, 8], conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8, feat_extract_norm="layer",
        num_buckets=16, max_bucket_distance=32)),
    "ast": ("ASTConfig", "ASTForAudioClassification", "audio-classification", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4,
        frequency_stride=4, time_stride=4, max_length=16, num_mel_bins=8, num_labels=3)),
    # encoder-decoder (tests/_variants.py: seq2seq_model)
    "bart": ("BartConfig", "BartForConditionalGeneration", "text2text-generation", dict(_S2S)),
    "marian": ("MarianConfig", "MarianMTModel", "text2text-generation", dict(_S2S, scale_embedding=True)),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", "text2text-generation", dict(_S2S, scale_embedding=True)),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", "text2text-generation", dict(_S2S)),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", "text2text-generation", dict(_S2S)),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration", "text2text-generation", dict(_S2S)),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", "text2text-generation", dict(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0)),
    "longt5": ("LongT5Config", "LongT5ForConditionalGeneration", "text2text-generation", dict(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, encoder_attention_type="transient-global",
        local_radius=2, global_block_size=2)),
    # BART as a classifier: the decoder reads the input ids shifted right (moved ids, see find_routed_ids)
    "bart_cls": ("BartConfig", "BartForSequenceClassification", "text-classification", dict(_S2S, num_labels=3)),
    # mBART: the last non-pad token (its language id) wrapped around to the front (GatherElements)
    "mbart_cls": ("MBartConfig", "MBartForSequenceClassification", "text-classification", dict(_S2S, num_labels=3)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", "automatic-speech-recognition", dict(
        _S2S, num_mel_bins=8, max_source_positions=1500, max_target_positions=32, suppress_tokens=[],
        begin_suppress_tokens=[])),
})

def _key(family: str, config: dict, export: dict) -> str:
    blob = json.dumps([family, config, export], sort_keys=True, default=str)
    return f"{family}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def randomize_(model, seed: int = 0) -> None:
    """Give norms and biases non-trivial values (all-ones norms and zero biases hide mistakes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in low or ".ln" in low or "layernorm" in low:
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


def tiny_model(family: str, *, config: dict | None = None, opset: int | None = None, seed: int = 0,
               attn: str | None = None) -> tuple[Path, Path]:
    """Build (once) a tiny random model of ``family``; returns (pytorch folder, onnx file)."""
    cfg_cls, model_cls, task, base = FAMILIES[family]
    cfg = dict(base, **(config or {}))
    export = {"opset": opset, "seed": seed, "attn": attn}
    root = CACHE / _key(family, cfg, export)
    pt_dir, onnx_dir = root / "pt", root / "onnx"
    onnx_path = onnx_dir / "model.onnx"
    if onnx_path.exists():
        return pt_dir, onnx_path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    torch.manual_seed(seed)
    conf = getattr(transformers, cfg_cls)(**cfg)
    if attn:
        conf._attn_implementation = attn
    model = getattr(transformers, model_cls)(conf).eval()
    randomize_(model, seed)
    model.save_pretrained(pt_dir)
    if attn:  # main_export reloads the folder with the default attention: export this instance instead
        from optimum.exporters.onnx import onnx_export_from_model

        onnx_export_from_model(model, str(onnx_dir), task=task, opset=opset, no_post_process=True,
                               do_validation=False)
    else:
        main_export(str(pt_dir), str(onnx_dir), task=task, library_name="transformers",
                    opset=opset, no_post_process=True, do_validation=False)
    return pt_dir, onnx_path


def lxt_relevance(family: str, pt_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                  position_ids: np.ndarray | None = None, positions: np.ndarray | None = None,
                  targets: np.ndarray | None = None, composite: str = "attnlrp", *, model_cls: str | None = None,
                  **kw) -> dict:
    """LXT (efficient engine) token relevance on the same weights (:func:`onnx_lrp.reference.lxt.relevance`, in a
    worker process kept for the test session); ``model_cls`` defaults to the class of :data:`FAMILIES`."""
    return lxt.relevance(family, model_cls or FAMILIES[family][1], pt_dir, input_ids, attention_mask, position_ids,
                         positions, targets, composite, **kw)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (the parity measure of the issues)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


# head_dim 16: onnxruntime's CPU GroupQueryAttention kernel requires a multiple of 16
GENAI_CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def genai_model(family: str, precision: str = "fp32", *, config: dict | None = None,
                extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The tiny model of ``family`` (:func:`tiny_model`, with :data:`GENAI_CONFIG` + ``config``) built by
    onnxruntime-genai's model builder (``-p precision -e cpu``, ``--extra_options *extra``), cached; returns
    (pytorch folder, onnx file).

    The builder wants a tokenizer: it reads a staging folder with the weights and a word-level tokenizer over the
    model's vocabulary (tests/_genai_builder.py runs it under transformers 4.x).
    """
    cfg = dict(GENAI_CONFIG, **(config or {}))
    pt_dir, _ = tiny_model(family, config=cfg)
    root = pt_dir.parent / ("-".join(("genai", precision) + tuple(extra)).replace("/", "_").replace("=", "_"))
    onnx_path = root / "model.onnx"
    if onnx_path.exists():
        return pt_dir, onnx_path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    stage = pt_dir.parent / "genai-input"
    stage.mkdir(exist_ok=True)
    for f in pt_dir.iterdir():
        if not (stage / f.name).exists():
            (stage / f.name).symlink_to(f)
    vocab = {f"t{i}": i for i in range(json.loads((pt_dir / "config.json").read_text())["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(stage)
    args = ["-i", str(stage), "-o", str(root), "-p", precision, "-e", "cpu", "-c", str(root.parent / "genai-cache")]
    args += ["--extra_options", *extra] if extra else []
    done = subprocess.run([sys.executable, str(HERE / "_genai_builder.py"), *args], capture_output=True, text=True)
    if done.returncode != 0 or not onnx_path.exists():
        raise RuntimeError(f"onnxruntime-genai's builder failed on {stage}:\n{done.stderr[-4000:]}")
    return pt_dir, onnx_path


def word_level_folder(family: str, name: str, specials: list[str], words: list[str], size: int = 128
                      ) -> tuple[Path, dict[str, int]]:
    """A cached folder ``name`` with the tiny ``family`` model as ``model.onnx`` and a word-level tokenizer
    (whitespace split; ``specials`` then ``words``, padded to ``size`` ids with ``w<i>``; the second special is
    the unknown token). Returns (model.onnx path, vocabulary)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    _, onnx_path = tiny_model(family)
    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(onnx_path, folder / "model.onnx")
    vocab = {t: i for i, t in enumerate(specials + words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "model.onnx", vocab
