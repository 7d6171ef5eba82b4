"""How many decoder blocks recompute their activations (gradient checkpointing), decided per run.

Checkpointing a block trades one more forward of it per step for keeping only its input instead
of every tensor its backward needs. Short rows (the seed's quotes: ~130 tokens a row) keep
little, so recomputing them is pure loss; 4 x 2048 tokens keep tens of GB on gpt-oss-20b.
``train.gradient_checkpointing: auto`` checkpoints the fewest blocks that make the longest packed
micro-batch fit ``train.memory_budget_gb`` (default: the device's memory): the weights already
loaded, the LoRA gradients and AdamW moments, the saved tensors of the blocks that are not
checkpointed, the inputs of those that are, and the loss chunk's logits (:func:`loss_bytes`),
within :data:`HEADROOM` of the budget. ``true`` checkpoints every block, ``false`` none.

The checkpointed blocks are the *first* ``k``: the backward runs the blocks last to first, so by
the time it recomputes block ``j < k`` every later block's saved tensors are already freed, and
the recompute never adds to the memory peak at the end of the forward; checkpointing the last
blocks instead would recompute while everything else is still held.

The estimate counts, per block and token, the tensors a gpt-oss block saves for its backward in
the engine's configuration (packed flex attention, MXFP4 or dense experts, LoRA attached), as
:func:`torch.autograd.graph.saved_tensors_hooks` sees them (tests/test_memory.py pins it to the
measured bytes):

* both: the attention's ``q, k, v, out`` and fp32 log-sum-exp; each LoRA factor's rank-wide
  middle (one byte a value more for a dropout mask); the adapted projections' input, once per
  input (the loop turns off PEFT's cast of it to the fp32 LoRA weights, which made a copy per
  projection); the router's top-k indices and scores; the experts' ``gate_up`` output, expert
  outputs and routing weights, and the inverse of their sort order (MXFP4) or the sort order
  and token index (dense experts);
  with expert LoRA the projection's gathered input and the factors' middles (MXFP4), or the
  dense ``W + ΔW`` PEFT forms (dequantized experts: a per-block constant, ``E x in x out``);
* eager blocks: each norm's fp32 copy of its input and ``rsqrt`` (the fused norm of CUDA's
  eager blocks, ``fused_norm``: its input only); one more index (dense experts); on the CPU's
  paths (SDPA attention, the gate in torch ops) also the
  attention's running max and sink scale and the gate's four intermediates, which CUDA's
  kernels (flash varlen attention, the Triton gate: :class:`EagerKernels`) do not keep, nor
  does the ``torch`` backend's hand-differentiated experts block;
* compiled blocks (``torch.compile``): AOTAutograd's partitioner recomputes the cheap
  pointwise work in the backward instead: the norms keep their input in the compute dtype and
  ``rsqrt``, the attention and MLP inputs are kept once, and nothing of the gate or the sink
  scale is kept (about half of eager).

The peak is the larger of the end of the forward (all of the above plus the loss's logits, or
the MXFP4 experts' dequantized projection of their dense path if larger) and a checkpointed
block's recompute (:func:`peak_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mxlora.mxfp4.kernels import TRITON, resolve_backend

GB = 1e9
# Share of the budget the estimate may fill: allocator slack and the backward's own transients
# (one block's activation gradients) take the rest.
HEADROOM = 0.9
# fp32 tensors per logit of the loss at its peak (the chunk's backward), besides the logits in the
# compute dtype: their fp32 copy, the log-softmax and its gradient.
LOSS_BYTES_PER_LOGIT_FP32 = 3
FP32 = 4
INT64 = 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class EagerKernels:
    """Which fused paths eager blocks run, each keeping less for the backward than the torch
    ops it replaces (:func:`mxlora.engine.loop.eager_kernels` decides; compiled blocks
    run none: inductor fuses the same work itself).

    Attributes:
        varlen: attention by flash's varlen kernels (CUDA, bf16).
        fused_gate: the experts' gate as one Triton kernel (``triton`` backend).
        fused_norm: the norms as one Triton kernel each (:mod:`mxlora.engine.norm`).
        torch_block: the ``torch`` backend's experts block differentiated by hand
            (:class:`mxlora.mxfp4.experts.Mxfp4Experts`): like the Triton gate, it keeps the
            gate's input only.
    """

    varlen: bool = False
    fused_gate: bool = False
    fused_norm: bool = False
    torch_block: bool = False


NO_KERNELS = EagerKernels()


@dataclass(frozen=True)
class BlockLora:
    """The LoRA a decoder block carries (what changes the tensors it saves).

    Attributes:
        attention: rank of each adapted attention projection, by name (``q_proj`` ...).
        experts: rank of each adapted expert projection (``gate_up_proj``, ``down_proj``).
        dropout: LoRA dropout (each adapted projection keeps its mask).
    """

    attention: dict[str, int]
    experts: dict[str, int]
    dropout: float = 0.0


@dataclass(frozen=True)
class BlockCost:
    """Bytes one decoder block keeps for its backward.

    Attributes:
        per_token: saved tensors per token, not checkpointed.
        fixed: saved tensors independent of the length (dense ``W + ΔW`` of LoRA'd experts).
        checkpointed_per_token: what it keeps per token when checkpointed (its input).
    """

    per_token: int
    fixed: int
    checkpointed_per_token: int

    def saved(self, tokens: int) -> int:
        """Bytes kept without checkpointing for ``tokens`` tokens."""
        return self.per_token * tokens + self.fixed


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a gpt-oss causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def block_loras(model: torch.nn.Module) -> list[BlockLora]:
    """Per decoder block, the ranks of its LoRA layers (PEFT ``LoraLayer``, the MXFP4 expert
    wrappers included), active adapters summed."""
    from peft.tuners.lora.layer import LoraLayer

    loras = []
    for layer in decoder_layers(model):
        attention: dict[str, int] = {}
        experts: dict[str, int] = {}
        dropout = 0.0
        for name, module in layer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            rank = sum(module.r[a] for a in module.active_adapters if a in module.r)
            if not rank:
                continue
            for adapter, drop in module.lora_dropout.items():
                if adapter in module.active_adapters:
                    dropout = max(dropout, getattr(drop, "p", 0.0))
            last = name.rsplit(".", 1)[-1]
            if last in ATTENTION:
                attention[last] = attention.get(last, 0) + rank
            elif getattr(module, "parameter_name", None) in EXPERT_PROJECTIONS:
                experts[module.parameter_name] = experts.get(module.parameter_name, 0) + rank
        loras.append(BlockLora(attention, experts, dropout))
    return loras


def block_cost(
    config: Any,
    lora: BlockLora,
    experts: str,
    dtype: torch.dtype,
    compiled: bool,
    kernels: EagerKernels = NO_KERNELS,
) -> BlockCost:
    """What one gpt-oss decoder block saves for its backward (module docstring).

    Args:
        config: the model's (transformers) ``GptOssConfig``.
        lora: the block's LoRA (:func:`block_loras`).
        experts: ``mxfp4`` or ``dequantize-bf16`` (how the expert weights are held).
        dtype: the compute dtype (the autocast dtype; the weights' dtype in fp32).
        compiled: the block runs under ``torch.compile``.
        kernels: CUDA's fused kernels the (eager) block runs.
    """
    d = torch.empty((), dtype=dtype).element_size()
    h, k = config.hidden_size, config.num_experts_per_tok
    inter, heads, kv, hd = (
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": heads * hd}
    # Both norms: compiled, the input in the compute dtype and rsqrt (and with dense experts
    # the MLP's normalized input); eager, the fp32 copy of the input and rsqrt; the fused op,
    # its input.
    if compiled:
        per = 2 * (d * h + FP32) + (d * h if experts != "mxfp4" else 0)
    else:
        per = 2 * d * h if kernels.fused_norm else 2 * (FP32 * h + FP32)
    # Attention LoRA: each factor's rank-wide middle; for the factors' gradients, the input
    # shared by the projections that read it, or with dropout each projection's dropped-out
    # input and its dropout mask (one byte a value).
    if not lora.dropout and set(lora.attention) - {"o_proj"}:
        per += d * h
    if not lora.dropout and "o_proj" in lora.attention:
        per += d * widths["o_proj"]
    for name, rank in lora.attention.items():
        per += d * rank
        if lora.dropout:
            per += (d + 1) * widths[name]
    # Attention: q, k, v, out and the fp32 log-sum-exp; eager outside flash's varlen kernels
    # also a running max and the sink scale (fp32 and in the compute dtype).
    per += d * hd * (2 * heads + 2 * kv) + FP32 * heads
    if not compiled and not kernels.varlen:
        per += 2 * FP32 * heads + d * heads
    # Router: top-k indices and softmax scores.
    per += INT64 * k + d * k
    # Experts, per routed (token, expert): two indices (MXFP4: the inverse of the sort order
    # and the sorted expert ids; dense: the sort order and token index), the gate_up output
    # (2I wide) and the expert output; dense also a sorted copy of the routing weight and,
    # eager, one more index; eager also the gate's four intermediates unless the Triton gate
    # or the torch backend's hand-differentiated block runs it (they keep its input only).
    per += 2 * INT64 * k + d * k * (2 * inter + h)
    if experts != "mxfp4":
        per += d * k + (0 if compiled else INT64 * k)
    by_hand = kernels.torch_block and experts == "mxfp4"
    if not compiled and not kernels.fused_gate and not by_hand:
        per += 4 * d * k * inter
    fixed = 0
    pad = 8  # MXFP4 expert LoRA pads the rank to a multiple of 8 (grouped GEMM strides)
    ins = {"gate_up_proj": h, "down_proj": inter}
    outs = {"gate_up_proj": 2 * inter, "down_proj": h}
    for proj, rank in lora.experts.items():
        per += d * k * ins[proj]  # the projection's (gathered) input, for the LoRA gradients
        if experts == "mxfp4":
            per += d * k * math.ceil(rank / pad) * pad
        else:
            fixed += d * config.num_local_experts * ins[proj] * outs[proj]
    return BlockCost(per_token=per, fixed=fixed, checkpointed_per_token=d * h)


def block_costs(
    model: torch.nn.Module,
    experts: str,
    dtype: torch.dtype,
    compiled: bool,
    kernels: EagerKernels = NO_KERNELS,
) -> list[BlockCost]:
    """:func:`block_cost` of each decoder block of ``model`` (meta device is fine)."""
    config = decoder_layers(model)[0].self_attn.config
    return [
        block_cost(config, lora, experts, dtype, compiled, kernels) for lora in block_loras(model)
    ]


def loss_bytes(
    config: Any,
    tokens: int,
    dtype: torch.dtype,
    full_logits: bool = False,
    in_place: bool = False,
) -> int:
    """The loss at its peak: one chunk's logits of :mod:`mxlora.engine.loss`, in the compute
    dtype alone where the Triton kernel overwrites them with their gradient (``in_place``:
    :func:`loss_in_place`), which then keeps the hidden states' gradient, else with autograd's
    fp32 copies; or every position's logits (``full_logits``: the model-computed logits TRL's
    step takes the loss from)."""
    from mxlora.engine.loss import CHUNK

    d = torch.empty((), dtype=dtype).element_size()
    rows = tokens if full_logits else min(CHUNK, tokens)
    if in_place and not full_logits:
        return rows * config.vocab_size * d + tokens * config.hidden_size * d
    return rows * config.vocab_size * (d + LOSS_BYTES_PER_LOGIT_FP32 * FP32)


def loss_in_place(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s loss on ``device`` keeps one chunk's logits in the compute dtype
    only (:func:`loss_bytes`): a frozen ``lm_head`` and the Triton kernels."""
    from mxlora.engine.loss import gradient_in_forward

    head = model.get_output_embeddings()
    return gradient_in_forward(head) and resolve_backend(device) == TRITON


def trainable_bytes(model: torch.nn.Module) -> int:
    """The LoRA tensors' gradients and AdamW's two fp32 moments (allocated at the first step)."""
    return sum(
        p.numel() * (p.element_size() + 2 * FP32) for p in model.parameters() if p.requires_grad
    )


def experts_transient_bytes(
    config: Any, experts: str, tokens: int, dtype: torch.dtype, device: torch.device
) -> int:
    """What the MXFP4 experts' dense path holds while it runs (:mod:`mxlora.mxfp4.ops`): one
    projection of one layer dequantized to the compute dtype, the larger (``gate_up``), freed
    when the op returns. With the Triton kernels it runs where :func:`mxlora.mxfp4.ops.dense_path`
    says, always with the torch path; 0 for experts held dequantized."""
    from mxlora.mxfp4.ops import dense_path

    if experts != "mxfp4":
        return 0
    rows = tokens * config.num_experts_per_tok
    if resolve_backend(device) == TRITON and not dense_path(
        rows, config.num_local_experts, dtype, device
    ):
        return 0
    d = torch.empty((), dtype=dtype).element_size()
    return config.num_local_experts * 2 * config.intermediate_size * config.hidden_size * d


def step_extras(
    model: torch.nn.Module,
    experts: str,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    full_logits: bool = False,
) -> tuple[int, int]:
    """What a ``tokens``-long micro-batch of ``model`` on ``device`` adds besides its blocks'
    saved tensors: the loss's logits (:func:`loss_bytes`, in place where :func:`loss_in_place`)
    and what the experts' dense path holds while it runs (:func:`experts_transient_bytes`),
    ``peak_bytes``'s ``extra`` and ``transient``."""
    config = decoder_layers(model)[0].self_attn.config
    loss = loss_bytes(config, tokens, dtype, full_logits, loss_in_place(model, device))
    return loss, experts_transient_bytes(config, experts, tokens, dtype, device)


def peak_bytes(
    costs: list[BlockCost], checkpointed: int, tokens: int, extra: int, transient: int = 0
) -> int:
    """Estimated activation peak with the first ``checkpointed`` blocks checkpointed.

    The larger of two moments: the end of the forward (every block's saved tensors, a
    checkpointed one's input only, plus the larger of ``extra``, the loss's logits, and
    ``transient``, what one op holds while it runs: :func:`experts_transient_bytes`, at its
    largest in the last block's backward), and the recompute of a checkpointed block in the
    backward, which comes after every later block's backward has freed its tensors (the
    checkpointed inputs plus that block's saved tensors and ``transient``).
    """
    inputs = sum(c.checkpointed_per_token * tokens for c in costs[:checkpointed])
    kept = inputs + sum(c.saved(tokens) for c in costs[checkpointed:])
    recompute = max((c.saved(tokens) for c in costs[:checkpointed]), default=0)
    return max(kept + max(extra, transient), inputs + recompute + transient)


def plan_checkpointing(
    setting: bool | str,
    costs: list[BlockCost],
    tokens: int,
    extra_bytes: int,
    free_gb: float | None,
    transient: int = 0,
) -> int:
    """How many decoder blocks (the first ones) to checkpoint.

    Args:
        setting: ``train.gradient_checkpointing`` (``True``: all, ``False``: none, ``"auto"``).
        costs: the blocks' :class:`BlockCost`.
        tokens: tokens of the longest micro-batch.
        extra_bytes: what else the step adds at its peak (the loss chunk).
        free_gb: memory the activations may take (the budget's :data:`HEADROOM` share less what
            is already held); ``None``: no budget (nothing is checkpointed).
        transient: what one op holds while it runs (:func:`peak_bytes`).
    """
    if setting != "auto":
        return len(costs) if setting else 0
    if free_gb is None:
        return 0
    for checkpointed in range(len(costs) + 1):
        if peak_bytes(costs, checkpointed, tokens, extra_bytes, transient) <= free_gb * GB:
            return checkpointed
    return len(costs)


def checkpointed_blocks(
    setting: bool | str,
    model: torch.nn.Module,
    experts: str,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_gb: float | None,
    compiled: bool,
    held_gb: float | None = None,
    full_logits: bool = False,
    *,
    kernels: EagerKernels = NO_KERNELS,
) -> int:
    """Resolve ``train.gradient_checkpointing`` to a number of blocks (the first ones).

    Args:
        setting: the config value (``True``, ``False`` or ``"auto"``).
        model: the model with its LoRA attached (meta device is fine).
        experts: how its experts are held (``mxfp4``, ``dequantize-bf16``).
        tokens: tokens of the longest micro-batch (packed, or padded rows x longest row).
        dtype: the training (compute) dtype.
        device: the training device.
        budget_gb: ``train.memory_budget_gb``; ``None``: the CUDA device's total memory, and on
            the CPU (no fixed budget to read) nothing is checkpointed.
        compiled: the blocks run under ``torch.compile`` (they save about half as much).
        held_gb: device memory already held (the weights); ``None``: what CUDA has allocated
            on ``device`` (0 elsewhere).
        full_logits: the loss is taken from every position's logits (TRL), not a chunk.
        kernels: CUDA's fused kernels eager blocks run (:func:`block_cost`).
    """
    costs = block_costs(model, experts, dtype, compiled, kernels)
    if setting != "auto":
        return plan_checkpointing(setting, costs, tokens, 0, None)
    free_gb = _free_gb(model, device, budget_gb, held_gb)
    if free_gb is None:
        return 0
    loss, transient = step_extras(model, experts, tokens, dtype, device, full_logits)
    return plan_checkpointing(setting, costs, tokens, loss, free_gb, transient)


def memory_budget(device: torch.device, budget_gb: float | None) -> float | None:
    """The memory (GB) a run on ``device`` plans for: ``train.memory_budget_gb`` if set, else
    the CUDA (or ROCm) device's total memory; ``None`` on the CPU without a budget."""
    if budget_gb is not None:
        return budget_gb
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GB


def _free_gb(
    model: torch.nn.Module, device: torch.device, budget_gb: float | None, held_gb: float | None
) -> float | None:
    """What the activations may use: :data:`HEADROOM` of the budget (``None``: the CUDA
    device's total memory) less the memory held (``None``: what CUDA has allocated) and the
    trainable parameters' gradients and AdamW moments; ``None`` on the CPU without a budget."""
    budget_gb = memory_budget(device, budget_gb)
    if budget_gb is None:
        return None
    if held_gb is None:
        held_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else 0.0
    return max(HEADROOM * budget_gb - held_gb - trainable_bytes(model) / GB, 0.0)


def all_blocks(
    setting: bool | str,
    model: torch.nn.Module,
    experts: str,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_gb: float | None,
    held_gb: float | None = None,
) -> bool:
    """The all-or-nothing form for TRL's padded step (its ``gradient_checkpointing``): eager
    blocks and the loss from full logits; on when :func:`checkpointed_blocks` would checkpoint
    any block. Eager attention's ``[rows, heads, length, length]`` scores are not counted."""
    blocks = checkpointed_blocks(
        setting, model, experts, tokens, dtype, device, budget_gb, False, held_gb, True
    )
    return blocks > 0


def activations_fit(
    model: torch.nn.Module,
    experts: str,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_gb: float | None,
    compiled: bool,
    copies: int = 1,
    held_gb: float | None = None,
    *,
    kernels: EagerKernels = NO_KERNELS,
) -> bool | None:
    """Whether ``copies`` x the peak of a ``tokens``-long micro-batch with no block checkpointed
    (its saved tensors and the loss chunk) fit the budget left as :func:`checkpointed_blocks`
    counts it; ``None`` where there is no budget to read (the CPU without
    ``train.memory_budget_gb``). CUDA graphs ask for 2 copies: the graphs' shared pool keeps the
    largest bucket's activations while a new bucket's first micro-batch runs eagerly.
    ``kernels`` as for :func:`checkpointed_blocks`."""
    free_gb = _free_gb(model, device, budget_gb, held_gb)
    if free_gb is None:
        return None
    costs = block_costs(model, experts, dtype, compiled, kernels)
    need = copies * peak_bytes(
        costs, 0, tokens, *step_extras(model, experts, tokens, dtype, device)
    )
    return need <= free_gb * GB
