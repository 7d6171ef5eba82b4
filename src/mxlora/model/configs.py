"""The published gpt-oss model configurations, embedded so nothing is read or downloaded.

:data:`GPT_OSS_20B_CONFIG` is the Hub's ``openai/gpt-oss-20b`` ``config.json``, copied verbatim
(key for key; a test compares it with the copy in ``../shared/data/gpt-oss-20b/config.json``).
The 120b shape is derived from it: OpenAI's gpt-oss model card (arXiv:2508.10925, table 1 and
section 2) gives both models the same residual width (2880), attention (64 query heads of 64, 8
key/value heads, 128-token banded windows alternating with dense layers), expert width, top-4
routing, vocabulary and YaRN context; they differ in depth (36 vs 24 layers) and experts per layer
(128 vs 32). :func:`gpt_oss_120b_config` is that shape; :func:`parameter_counts` gives the model
card's figures for both (20.91 B / 116.83 B total, 3.61 B / 5.13 B active). The 120b's own
``config.json`` is not here to compare key for key: only these differences are claimed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# Published layer pattern: even layers sliding-window (128 tokens), odd layers dense.
_ALTERNATING = ["sliding_attention", "full_attention"]

#: ``openai/gpt-oss-20b`` ``config.json`` (Hub revision of August 2025, transformers 4.55.0.dev0).
GPT_OSS_20B_CONFIG: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": _ALTERNATING * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

#: ``openai/gpt-oss-20b`` ``generation_config.json`` (Hub, verbatim).
GPT_OSS_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999],
    "pad_token_id": 199999,
    "transformers_version": "4.55.0.dev0",
}


def layer_types(num_layers: int) -> list[str]:
    """gpt-oss's attention pattern for ``num_layers`` layers (sliding first, then alternating)."""
    return [_ALTERNATING[i % 2] for i in range(num_layers)]


def gpt_oss_20b_config() -> dict[str, Any]:
    """A fresh copy of :data:`GPT_OSS_20B_CONFIG` (safe to modify)."""
    return copy.deepcopy(GPT_OSS_20B_CONFIG)


def gpt_oss_120b_config() -> dict[str, Any]:
    """The gpt-oss-120b shape: the 20b config with 36 layers and 128 experts per layer."""
    config = gpt_oss_20b_config()
    config.update(num_hidden_layers=36, num_local_experts=128, layer_types=layer_types(36))
    return config


def parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a gpt-oss config, counted on a meta-device model (no memory used).

    Returns:
        ``total``: every parameter as transformers' ``GptOssForCausalLM`` holds it (experts
        dequantized); ``experts``: those of the routed experts (weights and biases);
        ``active``: what one token computes with, as the gpt-oss model card counts it (3.61 B for
        20b, 5.13 B for 120b): everything but the input embedding table (a lookup) and the
        unrouted experts, i.e. ``total - embedding - experts * (1 - top_k / experts_per_layer)``.
        The figure for ``6 * active * tokens`` training FLOPs.
    """
    from transformers import GptOssConfig, GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(GptOssConfig.from_dict(config))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embedding = model.get_input_embeddings().weight.numel()
    top_k, per_layer = config["num_experts_per_tok"], config["num_local_experts"]
    active = total - embedding - experts + experts * top_k // per_layer
    return {"total": total, "experts": experts, "active": active}
