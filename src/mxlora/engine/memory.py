"""Whether to recompute activations (gradient checkpointing), decided per run.

Checkpointing trades one more forward per step for not keeping the decoder blocks' activations.
Short rows (the seed's quotes: ~130 tokens a row) keep little, so recomputing them is pure loss;
4 x 2048 tokens keep tens of GB on gpt-oss-20b. ``train.gradient_checkpointing: auto`` estimates
the activations the longest packed micro-batch keeps without checkpointing and turns it on when
they would not fit the memory left under ``train.memory_budget_gb`` (default: the device's
memory) after the weights already loaded.

The estimate counts the tensors a gpt-oss block saves for its backward per token, in the training
dtype: about ten hidden-size tensors (norms, residuals, projections' inputs), the q/k/v/attention
outputs, and per routed expert its gate_up output, activation and down input. It is an estimate
(allocator slack, the loss chunk and autograd bookkeeping come on top), hence the headroom factor.
"""

from __future__ import annotations

from typing import Any

import torch

GB = 1e9
# Share of the free budget the estimated activations may take before checkpointing turns on.
HEADROOM = 0.6


def activation_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes one token's activations take across all decoder blocks without checkpointing."""
    hidden = config.hidden_size
    attention = (config.num_attention_heads * 2 + config.num_key_value_heads * 2) * config.head_dim
    experts = config.num_experts_per_tok * (3 * config.intermediate_size + hidden)
    per_layer = 10 * hidden + attention + experts + config.num_local_experts
    return per_layer * config.num_hidden_layers * dtype_bytes


def free_budget_gb(device: torch.device, budget_gb: float | None) -> float | None:
    """Device memory left for activations: ``budget_gb`` (default: the CUDA device's total)
    minus what is allocated now (the weights); ``None`` on the CPU without a budget."""
    if budget_gb is None:
        if device.type != "cuda":
            return None
        budget_gb = torch.cuda.get_device_properties(device).total_memory / GB
    used_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else 0.0
    return max(budget_gb - used_gb, 0.0)


def activations_fit(
    config: Any,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_gb: float | None,
    copies: int = 1,
) -> bool | None:
    """Whether ``copies`` x the activations of a ``tokens``-long micro-batch (no checkpointing)
    fit :data:`HEADROOM` of the free budget; ``None`` when there is no budget to read (CPU)."""
    free = free_budget_gb(device, budget_gb)
    if free is None:
        return None
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    need_gb = copies * activation_bytes_per_token(config, dtype_bytes) * tokens / GB
    return need_gb <= HEADROOM * free


def use_gradient_checkpointing(
    setting: bool | str,
    config: Any,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_gb: float | None,
) -> bool:
    """Resolve ``train.gradient_checkpointing`` (``True``, ``False`` or ``"auto"``).

    Args:
        setting: the config value.
        config: the model's (transformers) config.
        tokens: tokens of the longest micro-batch (packed, or padded rows x longest row).
        dtype: the training dtype.
        device: the training device.
        budget_gb: ``train.memory_budget_gb``; ``None``: the CUDA device's total memory, and on
            the CPU (no fixed budget to read) checkpointing stays off.
    """
    if setting != "auto":
        return bool(setting)
    return activations_fit(config, tokens, dtype, device, budget_gb) is False
