"""Packed (document-masked) attention with gpt-oss's attention sinks, for padding-free training.

A step's rows are concatenated into one sequence (:mod:`mxlora.engine.packing`). A query may see
a key only if both belong to the same row (``doc_ids`` equal), the key is not in the future, and,
on gpt-oss's sliding layers, the key is fewer than ``sliding_window`` tokens back. Each head also
has a learned sink logit that joins the softmax's denominator but carries no value (gpt-oss's
``sinks``), so a head can attend "nowhere".

Four implementations behind one attention function, registered with transformers'
``AttentionInterface`` under :data:`ATTN_NAME`; which runs follows the type of the mask handed in
(:func:`build_masks` makes the one a :data:`Kind` names):

- :func:`reference_attention`: a dense ``[T, T]`` boolean mask and the softmax written out, as
  transformers' eager gpt-oss attention computes it (the oracle; any device, any shape).
- :func:`sdpa_sink_attention`: ``scaled_dot_product_attention`` with an additive ``[T, T + 8]``
  mask (float), no compile needed and no ``[heads, T, T]`` tensor (on CUDA the memory-efficient
  kernel, O(T) memory besides the one shared mask). SDPA has no sink term; the sink becomes one
  more key: every query gets one more dimension holding ``sink_h / scaling``, every real key a
  0 there, and an extra "sink key" (1 in that dimension, 0 elsewhere, value 0) is visible to
  every query. Its score is exactly ``sink_h``, so the softmax denominator gains ``exp(sink_h)``
  and the sink key adds nothing to the output: the attention with sinks, and autograd gives
  exact q/k/v gradients (and the sinks' gradient through the extra query dimension, should they
  ever be trained; the seed's LoRA freezes them).
- :func:`flex_sink_attention`: ``flex_attention`` with a block mask, so masked-out blocks are
  skipped and no ``[heads, T, T]`` score tensor exists. flex has no sink term; the sink is folded
  in afterwards through the log-sum-exp flex returns:
  ``out_sink = out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink)``.
  The gradient must flow through ``lse`` too (flex's backward accepts an LSE gradient); a
  rescaling by a detached LSE would give wrong q/k/sink gradients.
- :func:`varlen_sink_attention`: flash attention's variable-length kernel (CUDA, bf16/fp16):
  each row a sequence of its own given by its boundaries (``cu_seqlens``), causal, the sliding
  window as flash's left window, grouped-query heads native, no mask and no padding of the head
  dimension. The sink is folded in as for flex, and the backward stays exact without an LSE
  gradient: flash's backward recomputes the probabilities as ``exp(score - lse)`` and takes
  ``rowsum(dout * out)`` from the output it is handed, so handing it the log-sum-exp *with* the
  sink (``logaddexp(lse, sink)``) and the sink-scaled output makes it differentiate the
  attention with sinks itself (:class:`_VarlenSinkAttention`). On the CPU the same function runs
  a dense stand-in of the two flash calls (tests).

Padding (bucketing the packed length) gets ``doc_id -1``: the pad tokens form one more document,
attend only among themselves, and never reach a real row, so no softmax row is empty.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask
from transformers import AttentionInterface

# The name under which transformers finds this attention (``config._attn_implementation``).
ATTN_NAME = "mxlora_packed"

# Which implementation a run uses (see the module docstring).
Kind = Literal["reference", "sdpa", "flex", "varlen"]

# Key slots appended to a packed sequence on the SDPA path: the first is the sink key, the rest
# (masked out) keep the key length a multiple of 8, so the mask's rows stay 16-byte aligned as
# the memory-efficient kernel wants them (an unaligned mask is copied padded on every call).
SINK_SLOTS = 8


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


def sdpa_mask(doc_ids: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``[1, 1, T, T + SINK_SLOTS]`` mask of :func:`sdpa_sink_attention`: 0 where a
    query may attend (its keys, and the sink key for every query), ``-inf`` elsewhere."""
    allowed_keys = dense_mask(doc_ids, window)[0, 0]
    slots = torch.zeros(doc_ids.numel(), SINK_SLOTS, dtype=torch.bool, device=doc_ids.device)
    slots[:, 0] = True
    visible = torch.cat([allowed_keys, slots], dim=1)
    bias = torch.zeros(visible.shape, dtype=dtype, device=doc_ids.device)
    return bias.masked_fill_(~visible, float("-inf"))[None, None]


@dataclass(frozen=True)
class VarlenMask:
    """What :func:`varlen_sink_attention` takes in place of a mask.

    Attributes:
        cu_seqlens: int32 ``[rows + 2]``, the start of each row, of the padding, and the packed
            length (:attr:`mxlora.engine.packing.PackedBatch.cu_seqlens`).
        max_len: the packed length, a bound on every row's (flash sizes its grid by it; a bound
            set by the shapes keeps the call free of host syncs and its shapes static).
        window: the sliding window, or ``None``.
    """

    cu_seqlens: torch.Tensor
    max_len: int
    window: int | None


def build_masks(
    doc_ids: torch.Tensor,
    sliding_window: int | None,
    kind: Kind,
    dtype: torch.dtype,
    cu_seqlens: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The per-layer-type masks gpt-oss's decoder takes in place of its own causal masks.

    Args:
        doc_ids: ``[T]`` row of each packed token (``-1`` on padding).
        sliding_window: the sliding layers' window.
        kind: the implementation the masks are for.
        dtype: the attention's compute dtype (the SDPA mask's dtype must match the query's).
        cu_seqlens: the rows' boundaries (``varlen`` only; see :class:`VarlenMask`).
    """

    def make(window):
        if kind == "varlen":
            if cu_seqlens is None:
                raise ValueError("build_masks: the varlen attention needs cu_seqlens")
            return VarlenMask(cu_seqlens, doc_ids.numel(), window)
        if kind == "flex":
            return block_mask(doc_ids, window)
        if kind == "sdpa":
            return sdpa_mask(doc_ids, window, dtype)
        return dense_mask(doc_ids, window)

    return {"full_attention": make(None), "sliding_attention": make(sliding_window)}


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


def sdpa_sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`reference_attention` through ``scaled_dot_product_attention`` and the sink key
    (see the module docstring); ``mask`` from :func:`sdpa_mask`.

    The query/key head dimension grows by one (the sink dimension) and is zero-padded to a
    multiple of 8 (the memory-efficient kernel's alignment); zeros add nothing to a score. GQA:
    the keys and values are repeated per query head (O(T) memory, as the inputs). On CUDA only
    the memory-efficient kernel may run (a silent fallback to the math kernel would build the
    ``[B, H, T, T]`` scores).
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    pad = -(dim + 1) % 8
    sink_dim = (sinks.float() / scaling).to(query.dtype).reshape(1, heads, 1, 1)
    query = torch.cat(
        [
            query,
            sink_dim.expand(batch, heads, length, 1),
            query.new_zeros(batch, heads, length, pad),
        ],
        dim=-1,
    )
    sink_keys = key.new_zeros(batch, kv_heads, SINK_SLOTS, dim + 1 + pad)
    sink_keys[:, :, 0, dim] = 1
    key = torch.cat([F.pad(key, (0, 1 + pad)), sink_keys], dim=2)
    value = torch.cat([value, value.new_zeros(batch, kv_heads, SINK_SLOTS, value.shape[-1])], 2)
    groups = heads // kv_heads
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = mask.to(query.dtype)  # a no-op when built for the compute dtype
    if query.device.type != "cuda":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


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
    if query.device.type != "cuda" or torch.compiler.is_compiling():
        # Inside a compiled decoder block dynamo compiles flex_attention into the block's graph;
        # reaching for the cached compiled wrapper there would only make dynamo trace through
        # the cache (and warn that it ignores it).
        flex = _eager_flex()
    else:
        flex = _compiled_flex()
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


def flash_varlen_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`varlen_sink_attention` runs flash attention here: CUDA (compute capability
    8.0 or later, as torch's flash kernels need), bf16/fp16, a head dimension flash supports, and a
    torch whose flash op takes a sliding window."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if head_dim % 8 or head_dim > 256 or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    schema = torch.ops.aten._flash_attention_forward.default._schema
    return "window_size_left" in {a.name for a in schema.arguments}


def _window(mask: VarlenMask) -> tuple[int, int]:
    """Flash's ``(left, right)`` window: a key at most ``window - 1`` tokens back (``-1``: any)."""
    return (-1 if mask.window is None else mask.window - 1), 0


def _dense_scores(q, k, v, mask: VarlenMask, scaling: float):
    """The CPU stand-in's ``[H, T, S]`` fp32 scores, ``-inf`` where :func:`dense_mask` of the
    rows ``mask.cu_seqlens`` bounds forbids, and the keys and values repeated per query head."""
    idx = torch.arange(mask.max_len, device=q.device, dtype=torch.int32)
    rows = torch.searchsorted(mask.cu_seqlens.to(q.device), idx, right=True)
    groups = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(groups, 1)
    values = v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("thd,shd->hts", q.float(), keys) * scaling
    scores = scores.masked_fill(~dense_mask(rows, mask.window)[0, 0], float("-inf"))
    return scores, keys, values


def _flash_forward(q, k, v, mask: VarlenMask, scaling: float):
    """Flash's varlen forward: ``(out [T, H, D], lse [H, T] fp32, state)``; on the CPU a dense
    stand-in with the same outputs."""
    if q.is_cuda:
        left, right = _window(mask)
        cu = mask.cu_seqlens
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, mask.max_len, mask.max_len, 0.0, True, False,
            scale=scaling, window_size_left=left, window_size_right=right,
        )  # fmt: skip
        return out, lse, (rng, unused)
    scores, _, values = _dense_scores(q, k, v, mask, scaling)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), values)
    return out.to(q.dtype), lse, ()


def _flash_backward(dout, q, k, v, out, lse, state, mask: VarlenMask, scaling: float):
    """Flash's varlen backward given ``out`` and its ``lse``: ``(dq, dk, dv)``; on the CPU a
    dense stand-in that, like flash, recomputes the probabilities as ``exp(score - lse)`` and
    takes ``rowsum(dout * out)`` from the ``out`` handed in."""
    if q.is_cuda:
        left, right = _window(mask)
        cu = mask.cu_seqlens
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu, cu, mask.max_len, mask.max_len, 0.0, True, *state,
            scale=scaling, window_size_left=left, window_size_right=right,
        )  # fmt: skip
    scores, keys, values = _dense_scores(q, k, v, mask, scaling)
    probs = torch.exp(scores - lse[..., None])  # [H, T, S], 0 where masked
    dout = dout.float()
    dv = torch.einsum("hts,thd->shd", probs, dout)
    d_probs = torch.einsum("thd,shd->hts", dout, values)
    row = (dout * out.float()).sum(-1).t()  # [H, T]
    d_scores = probs * (d_probs - row[..., None]) * scaling
    dq = torch.einsum("hts,shd->thd", d_scores, keys)
    dk = torch.einsum("hts,thd->shd", d_scores, q.float())

    def per_kv_head(g):  # [S, H, D] -> [S, KV, D]: the group's query heads summed
        return g.unflatten(1, (k.shape[1], -1)).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


class _VarlenSinkAttention(torch.autograd.Function):
    """Attention with sinks from flash's varlen kernels (see the module docstring).

    ``q [T, H, D]``, ``k, v [T, KV, D]``, ``sinks [H]``; returns ``[T, H, D]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask: VarlenMask, scaling: float):
        out, lse, state = _flash_forward(q, k, v, mask, scaling)
        # The sink joins each query's softmax denominator: scale by exp(lse) / (exp(lse) +
        # exp(sink)), and keep the log-sum-exp with the sink for the backward.
        total = torch.logaddexp(lse, sinks.float()[:, None])  # [H, T]
        out = (out.float() * torch.exp(lse - total).t()[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, out, total, *state)
        ctx.mask, ctx.scaling = mask, scaling
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, total, *state = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _flash_backward(dout, q, k, v, out, total, state, ctx.mask, ctx.scaling)
        d_sinks = None
        if ctx.needs_input_grad[3]:
            # d out_i / d sink = -out_i * p_sink_i, with p_sink_i = exp(sink - total_i).
            row = (dout.float() * out.float()).sum(-1).t()  # [H, T]
            p_sink = torch.exp(sinks.float()[:, None] - total)
            d_sinks = -(p_sink * row).sum(1).to(sinks.dtype)
        return dq, dk, dv, d_sinks, None, None


def varlen_sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: VarlenMask,
    sinks: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`reference_attention` through flash attention's varlen kernels (see the module
    docstring); ``query [1, H, T, D]``, ``key, value [1, KV, T, D]``.

    Returns:
        ``[1, T, H, D]`` (the layout transformers' attention functions return).
    """
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed sequence, got batch {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return _VarlenSinkAttention.apply(q, k, v, sinks, mask, scaling)[None]


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
    """transformers' attention-interface signature; the mask comes from :func:`build_masks`
    (a :class:`VarlenMask`: flash varlen; a ``BlockMask``: flex; a float tensor: SDPA; a
    boolean tensor: the reference).

    Returns:
        ``([B, T, H, D], None)`` as transformers' attention functions do (no weights).
    """
    if dropout:
        raise ValueError(f"{ATTN_NAME}: attention dropout is not supported (got {dropout})")
    sinks = s_aux if s_aux is not None else module.sinks
    if isinstance(attention_mask, VarlenMask):
        return varlen_sink_attention(query, key, value, attention_mask, sinks, scaling), None
    if isinstance(attention_mask, BlockMask):
        out = flex_sink_attention(query, key, value, attention_mask, sinks, scaling)
    elif attention_mask.dtype != torch.bool:
        out = sdpa_sink_attention(query, key, value, attention_mask, sinks, scaling)
    else:
        out = reference_attention(query, key, value, attention_mask, sinks, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`packed_attention` with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_NAME, packed_attention)
    return ATTN_NAME
