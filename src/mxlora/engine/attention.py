"""Packed (document-masked) attention with gpt-oss's attention sinks, for padding-free training.

A step's rows are concatenated into one sequence (:mod:`mxlora.engine.packing`). A query may see
a key only if both belong to the same row (``doc_ids`` equal), the key is not in the future, and,
on gpt-oss's sliding layers, the key is fewer than ``sliding_window`` tokens back. Each head also
has a learned sink logit that joins the softmax's denominator but carries no value (gpt-oss's
``sinks``), so a head can attend "nowhere".

Two implementations behind one attention function, registered with transformers'
``AttentionInterface`` under :data:`ATTN_NAME`; which runs follows the type of the mask handed in:

- :func:`reference_attention`: a dense ``[T, T]`` boolean mask and the softmax written out, as
  transformers' eager gpt-oss attention computes it (the oracle; any device, any shape).
- :func:`flex_sink_attention`: ``flex_attention`` with a block mask, so masked-out blocks are
  skipped and no ``[heads, T, T]`` score tensor exists. flex has no sink term; the sink is folded
  in afterwards through the log-sum-exp flex returns:
  ``out_sink = out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink)``.
  The gradient must flow through ``lse`` too (flex's backward accepts an LSE gradient); a
  rescaling by a detached LSE would give wrong q/k/sink gradients.

Padding (bucketing the packed length) gets ``doc_id -1``: the pad tokens form one more document,
attend only among themselves, and never reach a real row, so no softmax row is empty.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask
from transformers import AttentionInterface

# The name under which transformers finds this attention (``config._attn_implementation``).
ATTN_NAME = "mxlora_packed"


def allowed(
    doc_q: torch.Tensor, doc_k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, window
) -> torch.Tensor:
    """Same row, causal, and within ``window`` when given (elementwise; broadcastable)."""
    ok = (doc_q == doc_k) & (q_idx >= k_idx)
    if window is not None:
        ok = ok & (q_idx - k_idx < window)
    return ok


def dense_mask(doc_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """The ``[1, 1, T, T]`` boolean mask (True = may attend) of a packed sequence."""
    idx = torch.arange(doc_ids.numel(), device=doc_ids.device)
    return allowed(doc_ids[:, None], doc_ids[None, :], idx[:, None], idx[None, :], window)[
        None, None
    ]


def block_mask(doc_ids: torch.Tensor, window: int | None) -> BlockMask:
    """flex_attention's block mask of a packed sequence (``T`` a multiple of 128 is cheapest)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(doc_ids[q_idx], doc_ids[kv_idx], q_idx, kv_idx, window)

    length = doc_ids.numel()
    return create_block_mask(mask_mod, None, None, length, length, device=doc_ids.device)


def build_masks(
    doc_ids: torch.Tensor, sliding_window: int | None, use_flex: bool
) -> dict[str, Any]:
    """The per-layer-type masks gpt-oss's decoder takes in place of its own causal masks."""
    make = block_mask if use_flex else dense_mask
    return {
        "full_attention": make(doc_ids, None),
        "sliding_attention": make(doc_ids, sliding_window),
    }


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Dense masked attention with sinks (the oracle).

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, KV, T, D]`` with ``H`` a multiple of ``KV``.
        mask: boolean ``[1 | B, 1, T, T]``, True where a query may attend a key.
        sinks: ``[H]`` sink logits.
        scaling: the score scale (``head_dim ** -0.5``).

    Returns:
        ``[B, H, T, D]``.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
    logits = torch.cat([scores, sink], dim=-1)
    # As transformers' eager gpt-oss: subtract the row max before the softmax (bf16 overflow).
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return probs.to(value.dtype) @ value


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Fold sink logits into attention computed without them.

    ``out`` is softmax attention over the keys alone and ``lse`` its per-query log-sum-exp of the
    scores (``[B, H, T]``, natural log). Adding ``exp(sink)`` to the softmax's denominator scales
    each output by ``exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``; differentiable in
    ``out``, ``lse`` and ``sinks``.
    """
    scale = torch.sigmoid(lse.float() - sinks.float().reshape(1, -1, 1))
    return out * scale.unsqueeze(-1).to(out.dtype)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once (eager flex materializes the scores). Shapes are left to
    dynamo's automatic dynamic shapes: the second bucketed length compiles a length-generic
    kernel instead of one per length (a recompile per length is what made transformers' own
    flex path slow on real rows)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: BlockMask,
    sinks: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`reference_attention` through flex_attention and a block mask (CUDA; forward-only
    on the CPU, where flex has no backward)."""
    flex = _compiled_flex() if query.device.type == "cuda" else _eager_flex()
    out, aux = flex(
        query,
        key,
        value,
        block_mask=mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        return_aux=AuxRequest(lse=True),
    )
    return apply_sinks(out, aux.lse, sinks)


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask,
    scaling: float,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; the mask comes from :func:`build_masks`.

    Returns:
        ``([B, T, H, D], None)`` as transformers' attention functions do (no weights).
    """
    if dropout:
        raise ValueError(f"{ATTN_NAME}: attention dropout is not supported (got {dropout})")
    sinks = s_aux if s_aux is not None else module.sinks
    if isinstance(attention_mask, BlockMask):
        out = flex_sink_attention(query, key, value, attention_mask, sinks, scaling)
    else:
        out = reference_attention(query, key, value, attention_mask, sinks, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`packed_attention` with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_NAME, packed_attention)
    return ATTN_NAME
