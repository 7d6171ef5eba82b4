"""gpt-oss MoE experts with frozen MXFP4 weights and LoRA, trained with exact gradients.

:class:`Mxfp4Experts` replaces transformers' ``GptOssExperts`` (``model.layers.L.mlp.experts``)
and computes exactly what it computes, while the expert weights stay packed as the checkpoint
ships them (uint8 blocks + e8m0 scales, 4.25 bits a weight). Per expert ``e``::

    y = x · W_e + b_e + Σ_adapters s · (x · A_e) · B_e      (LoRA split, ΔW never formed)

gate/up columns interleaved (gate = even, up = odd), gate clamped at ``limit``, up to
``[-limit, limit]``, ``(up + 1) · gate · sigmoid(alpha · gate)``, then ``down_proj`` and the
routing weights. The frozen ``x · W`` is one registered op,
:func:`mxlora.mxfp4.ops.mxfp4_grouped_mm`, whose backward gives ``dx = dy · Wᵀ`` by dequantizing
again: nothing dequantized is kept for backward (so gradient checkpointing recomputes nothing big
either). The routing stays on the device (per-expert row offsets, no host sync, no
data-dependent shape) and the expert LoRA runs as grouped GEMMs over stacked factors, so the
whole block compiles to one graph (``torch.compile(fullgraph=True)``). In eager mode on the
``torch`` backend (CPU, ROCm, GPUs without Triton), the block is one hand-differentiated
autograd function (:class:`_TorchBlock`): the same ops and values, a fraction of the
dispatches.

LoRA on the experts has the semantics, parameter shapes and state-dict keys of PEFT's
``target_parameters`` on the dequantized model, because it *is* PEFT's ``ParamWrapper``: each
targeted projection is wrapped by :class:`Mxfp4ParamWrapper`, a ``ParamWrapper`` whose base
"parameter" is only a shape/dtype/device descriptor and whose forward hands its low-rank factors
(``ParamWrapper.get_delta_factors``) down to :class:`Mxfp4Experts` instead of adding ``ΔW`` to a
weight. Wrappers nest in the order PEFT nests them (``gate_up_proj`` innermost, in
``GptOssExperts``' parameter order), so an adapter saved here loads with
``PeftModel.from_pretrained`` on a ``Mxfp4Config(dequantize=True)`` model and vice versa.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import cast_adapter_dtype
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.other import get_pattern_key
from torch import Tensor, nn

from mxlora.mxfp4.combine import fused_combine
from mxlora.mxfp4.gate import (
    fused_gate,
    gate_activation,
    gate_activation_backward,
    gate_reference,
)
from mxlora.mxfp4.kernels import TORCH, TRITON, resolve_backend
from mxlora.mxfp4.ops import (
    frozen_mxfp4_matmul,
    grouped_mxfp4_matmul_reference,
    lora_grouped_mm,
    offsets_covering,
    torch_mxfp4_grouped_mm,
)

__all__ = [
    "PROJECTIONS",
    "Mxfp4Experts",
    "Mxfp4ParamWrapper",
    "get_mxfp4_peft_model",
    "grouped_lora",
    "grouped_mxfp4_matmul_reference",
    "inject_expert_lora",
    "padding_skipped",
]

#: The expert weights, in ``GptOssExperts``' parameter registration order. PEFT wraps the targeted
#: ones in this order (``_inject_parameters`` walks ``named_parameters``), so the first is the
#: innermost ``ParamWrapper`` (``experts.base_layer.lora_A`` when both are targeted).
PROJECTIONS: tuple[str, ...] = ("gate_up_proj", "down_proj")

#: One adapter's factors for one projection, as ``ParamWrapper.get_delta_factors`` returns them:
#: ``lhs [E, in, r]``, ``rhs [E, r, out]`` and the scaling, with ``ΔW_e = scaling · lhs[e] @ rhs[e]``.
LoraFactors = tuple[Tensor, Tensor, float]


def grouped_lora(x: Tensor, factors: LoraFactors, offsets: Tensor) -> Tensor:
    """``scaling · (x_e · lhs[e]) · rhs[e]`` per expert group: two grouped GEMMs, no loop.

    The rank-r path (``ΔW`` never formed), factors as :func:`_padded` makes them.
    """
    lhs, rhs, scaling = factors
    lhs, rhs = _padded(lhs, rhs, x.dtype)
    return lora_grouped_mm(lora_grouped_mm(x, lhs, offsets), rhs, offsets) * scaling


def _padded(lhs: Tensor, rhs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lhs [E, in, r]`` and ``rhs [E, r, out]`` in ``dtype`` with the rank zero-padded to a
    multiple of 8, so that every operand's strides are multiples of 16 bytes, as torch's grouped
    GEMM requires; the padded columns are zero and get no gradient that reaches the factors."""
    pad = -lhs.shape[-1] % 8
    lhs = F.pad(lhs.to(dtype), (0, pad)).contiguous()  # [E, in, r + pad]
    rhs = F.pad(rhs.to(dtype), (0, 0, 0, pad)).contiguous()  # [E, r + pad, out]
    return lhs, rhs


class _Gathered(torch.autograd.Function):
    """``x[index]``, where each row of ``x`` is taken ``copies`` times and ``inverse[r * copies +
    c]`` is the position of row r's copy c: the backward gathers the gradient back to row order
    and sums each row's copies (with ``fused``, in one kernel: :func:`fused_combine` unweighted).
    Autograd's own index backward would scatter-add, with atomics, not knowing ``index`` is
    (copies of) a permutation."""

    @staticmethod
    def forward(
        ctx, x: Tensor, index: Tensor, inverse: Tensor, copies: int, fused: bool = False
    ) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies, ctx.fused = copies, fused
        return x[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        if ctx.fused:
            return fused_combine(grad, None, inverse.view(-1, ctx.copies)), None, None, None, None
        grad = grad[inverse]
        if ctx.copies > 1:
            grad = grad.view(-1, ctx.copies, grad.shape[-1]).sum(1)
        return grad, None, None, None, None


def _group_by_expert(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group the (token, slot) assignments ``ids`` (``[T * K]`` expert ids) by expert, stably
    (each expert sees its tokens in order), on the device: no host sync, no data-dependent shape.

    Returns:
        ``expert_ids`` (sorted), ``order`` (``order[p]`` the assignment at sorted position p),
        ``inverse`` (its inverse permutation) and ``offsets`` (int32 ``[num_experts]``, the end
        of each expert's rows; ids ``>= num_experts`` sort past them all).
    """
    positions = torch.arange(ids.numel(), device=ids.device)
    expert_ids, order = torch.sort(ids, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, positions)
    bounds = torch.arange(1, num_experts + 1, device=ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, bounds, out_int32=True)
    return expert_ids, order, inverse, offsets


class _TorchBlock(torch.autograd.Function):
    """The whole experts block on the ``torch`` backend in eager mode, forward and backward
    written out: the block :meth:`Mxfp4Experts.forward_composed` computes, with the same ops in
    the same order, its gradients' parts summed in autograd's order (bit for bit its values and
    gradients, LoRA's included, on the CPU), but one autograd node instead of about twenty,
    and fewer passes (the routing's gathers, the gate's gradient by
    :func:`gate_activation_backward`). Where each op is a launch or a dispatch that costs as much
    as its arithmetic (the CPU, ROCm's eager path at short rows), that is most of the block's
    time besides its matmuls. Keeps for the backward what the composed block keeps but the
    gate's intermediates: the biased gate_up output, each slot's expert output, the routing
    weights, the two permutations and, with expert LoRA, each adapted projection's input and
    each adapter's rank-wide middle.

    The LoRA factors come flat after ``scalings``: per projection in :data:`PROJECTIONS` order,
    per adapter, ``lhs`` then ``rhs``; ``scalings`` holds each projection's adapters' scalings.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: Tensor,
        router_indices: Tensor,
        routing_weights: Tensor,
        experts,
        scalings: tuple[tuple[float, ...], tuple[float, ...]],
        *factors: Tensor,
    ):
        tokens, top_k = router_indices.shape
        expert_ids, order, inverse, offsets = _group_by_expert(
            router_indices.reshape(-1), experts.num_experts
        )
        x = hidden_states.index_select(0, order // top_k)
        padded = [
            _padded(lhs, rhs, x.dtype) for lhs, rhs in zip(factors[::2], factors[1::2], strict=True)
        ]
        up_lora, down_lora = padded[: len(scalings[0])], padded[len(scalings[0]) :]
        y = experts.torch_matmul("gate_up_proj", x, offsets)
        middles = _lora_forward(y, x, up_lora, scalings[0], offsets)
        y += experts.gate_up_proj_bias.index_select(0, expert_ids)
        gated = gate_activation(y, experts.alpha, experts.limit)
        out = experts.torch_matmul("down_proj", gated, offsets)
        out += experts.down_proj_bias.index_select(0, expert_ids)
        down_middles = _lora_forward(out, gated, down_lora, scalings[1], offsets)
        per_slot = out.index_select(0, inverse).view(tokens, top_k, out.shape[-1])
        combined = (per_slot * routing_weights.unsqueeze(-1)).sum(1)
        ctx.save_for_backward(
            routing_weights, per_slot, y, order, inverse, offsets,
            x if up_lora else None, gated if down_lora else None,
            *(t for pair in padded for t in pair), *middles, *down_middles,
        )  # fmt: skip
        ctx.experts, ctx.scalings, ctx.combined_dtype = experts, scalings, combined.dtype
        ctx.factors = [(t.dtype, t.shape) for t in factors]
        return combined.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        routing_weights, per_slot, y, order, inverse, offsets, x, gated, *rest = ctx.saved_tensors
        experts, scalings = ctx.experts, ctx.scalings
        adapters = len(ctx.factors) // 2
        padded = list(zip(rest[0 : 2 * adapters : 2], rest[1 : 2 * adapters : 2], strict=True))
        lora = list(zip(padded, rest[2 * adapters :], scalings[0] + scalings[1], strict=True))
        up_lora, down_lora = lora[: len(scalings[0])], lora[len(scalings[0]) :]
        grad = grad.to(ctx.combined_dtype).unsqueeze(1)
        d_weights = None
        if ctx.needs_input_grad[2]:
            d_weights = (grad * per_slot).sum(-1).to(routing_weights.dtype)
        d_out = (grad * routing_weights.unsqueeze(-1)).to(per_slot.dtype)
        d_out = d_out.view(-1, per_slot.shape[-1]).index_select(0, order)
        d_gated = experts.torch_matmul("down_proj", d_out, offsets, transpose=True)
        d_down: list[Tensor] = []
        for factors in down_lora:
            d_gated += _lora_backward(d_out, gated, *factors, offsets, d_down)
        d_y = gate_activation_backward(d_gated, y, experts.alpha, experts.limit)
        d_x = experts.torch_matmul("gate_up_proj", d_y, offsets, transpose=True)
        d_up: list[Tensor] = []
        for factors in up_lora:
            d_x += _lora_backward(d_y, x, *factors, offsets, d_up)
        top_k = per_slot.shape[1]
        d_hidden = d_x.index_select(0, inverse).view(-1, top_k, d_x.shape[-1]).sum(1)
        # Undo _padded: the rank's padding sliced off, the factors' own dtype.
        d_factors = [
            d[:, :, : shape[-1]].to(dtype) if i % 2 == 0 else d[:, : shape[-2]].to(dtype)
            for i, (d, (dtype, shape)) in enumerate(zip(d_up + d_down, ctx.factors, strict=True))
        ]
        return d_hidden, None, d_weights, None, None, *d_factors


def _lora_forward(
    y: Tensor,
    x: Tensor,
    adapters: list[tuple[Tensor, Tensor]],
    scalings: tuple[float, ...],
    offsets: Tensor,
) -> list[Tensor]:
    """Adds each adapter's ``(x_e · lhs[e]) · rhs[e] · scaling`` to ``y`` in place, as
    :func:`grouped_lora` computes it (padded factors); returns the middles ``x_e · lhs[e]``."""
    middles = [lora_grouped_mm(x, lhs, offsets) for lhs, _ in adapters]
    for (_, rhs), middle, scaling in zip(adapters, middles, scalings, strict=True):
        y += lora_grouped_mm(middle, rhs, offsets) * scaling
    return middles


def _lora_backward(
    grad: Tensor,
    x: Tensor,
    factors: tuple[Tensor, Tensor],
    middle: Tensor,
    scaling: float,
    offsets: Tensor,
    grads: list[Tensor],
) -> Tensor:
    """The gradient of ``x`` through ``(x_e · lhs[e]) · rhs[e] · scaling`` (``middle``: ``x_e ·
    lhs[e]``), as autograd computes it for :func:`grouped_lora`; appends the gradients of the
    padded ``lhs`` and ``rhs`` to ``grads``."""
    lhs, rhs = factors
    grad = grad * scaling
    d_middle = lora_grouped_mm(grad, rhs.transpose(-1, -2), offsets)
    grads += [
        lora_grouped_mm(x.transpose(0, 1), d_middle, offsets),
        lora_grouped_mm(middle.transpose(0, 1), grad, offsets),
    ]
    return lora_grouped_mm(d_middle, lhs.transpose(-1, -2), offsets)


class Mxfp4Experts(nn.Module):
    """Drop-in for transformers' ``GptOssExperts`` holding the expert weights in MXFP4.

    Its parameters carry the checkpoint's own names (``gate_up_proj_blocks``,
    ``gate_up_proj_scales``, ``gate_up_proj_bias``, ``down_proj_*``); none is trainable (the
    packed blocks and scales are uint8 parameters with ``requires_grad=False``). LoRA comes from
    :class:`Mxfp4ParamWrapper` around this module.

    Args:
        gate_up_proj_blocks: uint8 ``[E, 2 * I, H // 32, 16]``.
        gate_up_proj_scales: uint8 ``[E, 2 * I, H // 32]``.
        gate_up_proj_bias: ``[E, 2 * I]``, its dtype is the compute dtype.
        down_proj_blocks: uint8 ``[E, H, I // 32, 16]``.
        down_proj_scales: uint8 ``[E, H, I // 32]``.
        down_proj_bias: ``[E, H]``.
        alpha: the gate's sigmoid slope (gpt-oss: 1.702), ``GptOssExperts.alpha``.
        limit: the gate/up clamp (gpt-oss: 7.0), ``GptOssExperts.limit``.
        backend: what computes the frozen matmul (``reference``, ``torch``, ``triton``); by
            default :func:`mxlora.mxfp4.kernels.resolve_backend` for the blocks' device
            (``MXLORA_KERNELS``, else capability detection), decided here, once.
    """

    #: PEFT's ``ParamWrapper`` reads this (as it does on ``GptOssExperts``) to orient the expert
    #: LoRA as ``[E, in, out]``, i.e. ``x @ W``; without it the adapter shapes would differ.
    is_transposed = True

    def __init__(
        self,
        gate_up_proj_blocks: Tensor,
        gate_up_proj_scales: Tensor,
        gate_up_proj_bias: Tensor,
        down_proj_blocks: Tensor,
        down_proj_scales: Tensor,
        down_proj_bias: Tensor,
        *,
        alpha: float,
        limit: float,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        num_experts, two_inter = gate_up_proj_blocks.shape[:2]
        hidden = down_proj_blocks.shape[1]
        expected = {
            "gate_up_proj_blocks": (num_experts, two_inter, hidden // 32, 16),
            "gate_up_proj_scales": (num_experts, two_inter, hidden // 32),
            "gate_up_proj_bias": (num_experts, two_inter),
            "down_proj_blocks": (num_experts, hidden, two_inter // 64, 16),
            "down_proj_scales": (num_experts, hidden, two_inter // 64),
            "down_proj_bias": (num_experts, hidden),
        }
        given = dict(
            gate_up_proj_blocks=gate_up_proj_blocks,
            gate_up_proj_scales=gate_up_proj_scales,
            gate_up_proj_bias=gate_up_proj_bias,
            down_proj_blocks=down_proj_blocks,
            down_proj_scales=down_proj_scales,
            down_proj_bias=down_proj_bias,
        )
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
            packed = not name.endswith("_bias")
            if packed != (tensor.dtype == torch.uint8):
                raise TypeError(f"{name}: dtype {tensor.dtype} (blocks/scales uint8, biases float)")
        self.num_experts = num_experts
        self.hidden_size = hidden
        self.intermediate_size = two_inter // 2
        self.alpha = alpha
        self.limit = limit
        self.backend = resolve_backend(gate_up_proj_blocks.device, backend)
        #: 0-dim integer tensor on the device, or None: the tokens from this index on are
        #: padding that no expert computes (:func:`padding_skipped`).
        self.padding_from: Tensor | None = None
        # All frozen parameters (uint8 ones included, so that FSDP2 can shard them along the
        # expert dimension like any parameter): never trainable, never cast by ``.to(dtype)``
        # (which converts floating-point tensors only).
        for name, tensor in given.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def weight_spec(self, proj: str) -> Tensor:
        """A stand-in with the shape, dtype and device of the dequantized ``GptOssExperts`` weight.

        ``[E, in, out]`` (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) in the compute
        dtype, one element of storage expanded: what PEFT's ``ParamWrapper`` reads from the
        parameter it wraps (shape for the LoRA factors, dtype/device to place them).
        """
        bias = getattr(self, f"{proj}_bias")
        blocks = getattr(self, f"{proj}_blocks")
        in_features = blocks.shape[2] * blocks.shape[3] * 2
        shape = (self.num_experts, in_features, blocks.shape[1])
        return torch.empty((), dtype=bias.dtype, device=bias.device).expand(shape)

    def forward(
        self,
        hidden_states: Tensor,
        router_indices: Tensor,
        routing_weights: Tensor,
        lora: Mapping[str, Sequence[LoraFactors]] | None = None,
    ) -> Tensor:
        """``GptOssExperts.forward`` with MXFP4 weights plus the LoRA factors in ``lora``.

        Args:
            hidden_states: ``[T, H]`` tokens.
            router_indices: ``[T, K]`` chosen experts per token.
            routing_weights: ``[T, K]`` their weights.
            lora: per projection name, the factors of each active adapter.

        Returns:
            ``[T, H]``: each token's routing-weighted sum of its experts' outputs.
        """
        if self.backend == TORCH and not torch.compiler.is_compiling():
            lora = lora or {}
            adapters = [lora.get(proj, ()) for proj in PROJECTIONS]
            scalings = tuple(tuple(scaling for *_, scaling in a) for a in adapters)
            factors = [t for a in adapters for lhs, rhs, _ in a for t in (lhs, rhs)]
            return _TorchBlock.apply(
                hidden_states, router_indices, routing_weights, self, scalings, *factors
            )
        return self.forward_composed(hidden_states, router_indices, routing_weights, lora)

    def forward_composed(
        self,
        hidden_states: Tensor,
        router_indices: Tensor,
        routing_weights: Tensor,
        lora: Mapping[str, Sequence[LoraFactors]] | None = None,
    ) -> Tensor:
        """:meth:`forward` as ops that autograd differentiates: what ``torch.compile`` traces,
        and the eager blocks of the ``triton`` and ``reference`` backends (the ``torch``
        backend's eager block computes the same by hand: :class:`_TorchBlock`)."""
        lora = lora or {}
        tokens, top_k = router_indices.shape
        # The gate and the combine: one Triton kernel each way on the kernel backend in eager
        # blocks; torch ops otherwise (mxlora.mxfp4.gate, mxlora.mxfp4.combine), which compiled
        # blocks fuse themselves (inductor's kernels beat ours at many rows: docs/BENCHMARKS.md).
        fused = self.backend == TRITON and not torch.compiler.is_compiling()
        ids = router_indices.reshape(-1)
        skip = fused and self.padding_from is not None
        if skip:
            # Padding takes expert "E": sorted past every expert's rows, which the fused
            # kernel does not compute (mxlora.mxfp4.ops.mxfp4_grouped_mm).
            positions = torch.arange(ids.numel(), device=ids.device)
            ids = torch.where(positions < self.padding_from * top_k, ids, self.num_experts)
        expert_ids, order, inverse, offsets = _group_by_expert(ids, self.num_experts)
        lora_offsets = offsets
        if skip:
            # The expert LoRA's grouped GEMMs take the padding into the last expert's group
            # (its gradient there is zero: the padding reaches no loss position). The biases
            # take that expert's too.
            lora_offsets = offsets_covering(offsets, ids.numel())
            expert_ids = expert_ids.clamp(max=self.num_experts - 1)

        x = _Gathered.apply(hidden_states, order // top_k, inverse, top_k, fused)
        # The gate adds gate_up's bias itself (in one kernel on the triton backend).
        gate_up = self._project(
            "gate_up_proj", x, expert_ids, (offsets, lora_offsets), lora, bias=False
        )
        gate = fused_gate if fused else gate_reference
        gated = gate(gate_up, self.gate_up_proj_bias, expert_ids, self.alpha, self.limit)
        out = self._project("down_proj", gated, expert_ids, (offsets, lora_offsets), lora)
        # Back to (token, slot) order, then each token's routing-weighted sum over its slots:
        # permutations and a reduction, no scatter (atomics) either way.
        if fused:
            combined = fused_combine(out, routing_weights, inverse.view(tokens, top_k))
        else:
            out = _Gathered.apply(out, inverse, order, 1).view(tokens, top_k, out.shape[-1])
            combined = (out * routing_weights.unsqueeze(-1)).sum(1)
        return combined.to(hidden_states.dtype)

    def torch_matmul(self, proj: str, x: Tensor, ends: Tensor, transpose: bool = False) -> Tensor:
        """``x_e · W_eᵀ`` of projection ``proj`` per expert group (``x_e · W_e`` with
        ``transpose``) by the ``torch`` backend, outside autograd, the groups covering every row
        of the contiguous ``x`` (:func:`mxlora.mxfp4.ops.torch_mxfp4_grouped_mm`)."""
        return torch_mxfp4_grouped_mm(x, *self._packed(proj), ends, transpose)

    def _packed(self, proj: str) -> tuple[Tensor, Tensor]:
        # ``view``: the bytes may be held under a 1-byte float dtype (FSDP2, see
        # :func:`mxlora.distributed.shard_model`); a no-op for uint8.
        return (
            getattr(self, f"{proj}_blocks").view(torch.uint8),
            getattr(self, f"{proj}_scales").view(torch.uint8),
        )

    def _project(
        self,
        proj: str,
        x: Tensor,
        expert_ids: Tensor,
        offsets: tuple[Tensor, Tensor],
        lora: Mapping[str, Sequence[LoraFactors]],
        bias: bool = True,
    ) -> Tensor:
        # ``offsets``: the frozen matmul's and the LoRA's (they differ where padding is skipped).
        blocks, scales = self._packed(proj)
        y = frozen_mxfp4_matmul(x, blocks, scales, offsets[0], False, self.backend)
        if bias:
            y = y + getattr(self, f"{proj}_bias")[expert_ids]
        for factors in lora.get(proj, ()):
            y = y + grouped_lora(x, factors, offsets[1])
        return y

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, mxfp4, backend={self.backend}"
        )


@contextlib.contextmanager
def padding_skipped(model: nn.Module, start: Tensor) -> Iterator[None]:
    """Within, the MXFP4 experts of ``model`` compute nothing for the tokens from ``start`` on.

    For a packed batch's bucket padding (:mod:`mxlora.engine.packing`), which would otherwise
    take real expert work: identical padding tokens route alike, so they pile onto the same few
    experts and add whole row tiles there. ``start`` is a 0-dim integer tensor on the device
    (the packed batch's ``cu_seqlens[-2]``, a CUDA graph's static buffer), so nothing syncs.
    The padding's expert output is then zero plus the biases and the last expert's LoRA, and
    the real tokens' values and gradients are those of the full computation: no real token
    sees the padding. Applied on the ``triton`` backend in eager blocks: its fused kernel
    (short rows) writes the skipped rows zero and computes none of them; at many rows its
    grouped GEMM computes them with the last expert (:func:`mxlora.mxfp4.ops.mxfp4_grouped_mm`).
    Elsewhere the padding is routed and computed as before.
    """
    experts = [m for m in model.modules() if isinstance(m, Mxfp4Experts)]
    for m in experts:
        m.padding_from = start
    try:
        yield
    finally:
        for m in experts:
            m.padding_from = None


class Mxfp4ParamWrapper(ParamWrapper):
    """PEFT's ``ParamWrapper`` for one projection of :class:`Mxfp4Experts`.

    Everything PEFT does with a ``ParamWrapper`` (factor shapes, init, scaling, rsLoRA, rank and
    alpha patterns, fp32 upcast, adapter (de)activation, state-dict keys) is PEFT's own code; only
    the two points that would touch a float weight differ: the wrapped "parameter" is the
    descriptor :meth:`Mxfp4Experts.weight_spec`, and the forward passes the factors down instead
    of parametrizing ``W + ΔW``. Merging into MXFP4 weights is not supported: merge the adapter
    into the dequantized model instead.
    """

    def get_param(self) -> Tensor:
        return self.get_base_layer().weight_spec(self.parameter_name)

    def forward(
        self,
        hidden_states: Tensor,
        router_indices: Tensor,
        routing_weights: Tensor,
        lora: Mapping[str, Sequence[LoraFactors]] | None = None,
    ) -> Tensor:
        factors = dict(lora or {})
        if not self.disable_adapters:
            own = [self.get_delta_factors(a) for a in self.active_adapters if a in self.lora_A]
            if own:
                factors[self.parameter_name] = own
        return self.base_layer(hidden_states, router_indices, routing_weights, lora=factors)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "LoRA cannot be merged into MXFP4 expert weights; merge the adapter into the "
            "dequantized model (Mxfp4Config(dequantize=True)) instead"
        )

    def unmerge(self) -> None:
        raise NotImplementedError("MXFP4 expert LoRA is never merged")


def expert_target_keys(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """``(experts module name, projection)`` of each MXFP4 expert weight ``config`` targets.

    PEFT's rule (``BaseTuner._inject_parameters``): a target names the parameter key
    ``<module>.<projection>`` in full or as a suffix after a dot, e.g. ``7.mlp.experts.down_proj``
    matches ``model.layers.7.mlp.experts.down_proj``. In projection order (the nesting order).
    """
    targets = set(config.target_parameters or ())
    found = []
    for name, module in model.named_modules():
        if isinstance(module, Mxfp4Experts):
            for proj in PROJECTIONS:
                key = f"{name}.{proj}"
                if key in targets or any(key.endswith(f".{t}") for t in targets):
                    found.append((name, proj))
    return found


def inject_expert_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default"
) -> list[str]:
    """Wrap the :class:`Mxfp4Experts` projections named by ``config.target_parameters``.

    Matching (:func:`expert_target_keys`), ranks (``rank_pattern``) and alphas
    (``alpha_pattern``) follow PEFT's ``target_parameters`` rules on the same parameter keys.

    Args:
        model: the transformers model (``PeftModel.get_base_model()``), experts already MXFP4.
        config: PEFT LoRA config; only ``target_parameters`` and the LoRA hyperparameters are read.
        adapter_name: PEFT adapter name.

    Returns:
        The wrapped parameter keys (``model.layers.7.mlp.experts.down_proj``).

    Raises:
        ValueError: targets given but none matched, or the experts already carry an adapter.
    """
    found = expert_target_keys(model, config)
    if config.target_parameters and not found:
        raise ValueError(
            f"target_parameters={sorted(config.target_parameters)} matched no MXFP4 expert weight"
        )
    for name, proj in found:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, Mxfp4ParamWrapper):
            raise ValueError(f"{name} already has expert LoRA; mxfp4 mode holds one adapter")
        # The module now at ``name`` is the wrapper of an earlier projection, if any: the new
        # wrapper goes around it, as PEFT nests.
        key = f"{name}.{proj}"
        r_key = get_pattern_key(config.rank_pattern.keys(), key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), key)
        wrapper = Mxfp4ParamWrapper(
            model.get_submodule(name),
            adapter_name,
            parameter_name=proj,
            config=config,
            r=config.rank_pattern.get(r_key, config.r),
            lora_alpha=config.alpha_pattern.get(alpha_key, config.lora_alpha),
        )
        setattr(parent, child_name, wrapper)
    return [f"{name}.{proj}" for name, proj in found]


def _patterns_for(patterns: Mapping[str, int], keys: Sequence[str]) -> set[str]:
    """The ``rank_pattern``/``alpha_pattern`` keys that apply to some parameter key in ``keys``."""
    return {p for p in patterns for key in keys if get_pattern_key([p], key) == p}


def get_mxfp4_peft_model(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """``peft.get_peft_model`` for a model whose experts are :class:`Mxfp4Experts`.

    PEFT injects the module targets (``target_modules``, e.g. attention ``all-linear``) as usual;
    the expert ``target_parameters`` are injected by :func:`inject_expert_lora` (PEFT's own
    injection looks for float parameters named ``gate_up_proj``/``down_proj``, which MXFP4
    experts do not have). The adapter config then names both again, so ``save_pretrained``
    writes the same ``adapter_config.json`` and keys as the seed path, and
    ``PeftModel.from_pretrained`` on the dequantized model rebuilds the same adapter.

    Args:
        model: the transformers model with MXFP4 experts.
        config: the PEFT LoRA config, exactly as for the dequantized model.
        adapter_name: PEFT adapter name.
        autocast_adapter_dtype: upcast bf16/fp16 LoRA weights to float32, as PEFT does.

    Returns:
        The ``PeftModel``; only LoRA weights are trainable (none with ``config.inference_mode``).
    """
    expert_keys = [f"{name}.{proj}" for name, proj in expert_target_keys(model, config)]
    module_config = copy.deepcopy(config)
    module_config.target_parameters = None
    # Patterns for expert weights are ours to apply; PEFT would call them unmatched.
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field)
        ours = _patterns_for(patterns, expert_keys)
        setattr(module_config, field, {k: v for k, v in patterns.items() if k not in ours})
    if not config.target_modules:
        # Expert-only adapter: PEFT's placeholder makes a PeftModel without injecting modules.
        module_config.target_modules = DUMMY_TARGET_MODULES
    peft_model = get_peft_model(
        model,
        module_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    inject_expert_lora(peft_model.get_base_model(), config, adapter_name)
    cast_adapter_dtype(peft_model.get_base_model(), adapter_name, autocast_adapter_dtype)
    saved = peft_model.peft_config[adapter_name]
    saved.target_parameters = copy.deepcopy(config.target_parameters)
    saved.rank_pattern = copy.deepcopy(config.rank_pattern)
    saved.alpha_pattern = copy.deepcopy(config.alpha_pattern)
    if not config.target_modules:
        saved.target_modules = copy.deepcopy(config.target_modules)
    return peft_model
