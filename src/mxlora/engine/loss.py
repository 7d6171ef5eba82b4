"""Cross-entropy over the trained positions without the full logits.

gpt-oss's vocabulary has 201,088 tokens: the logits of a 4 x 2048 batch are 3.3 GB in bf16, and
autograd's cross-entropy over them (transformers' ``ForCausalLMLoss``: logits upcast to fp32)
keeps an fp32 copy, its log-softmax and, in the backward, their gradient: 14 bytes a logit. Only
assistant tokens carry loss, so the hidden states of those positions are selected first, then
pushed through ``lm_head`` a chunk of :data:`CHUNK` positions at a time. Two ways:

- ``lm_head`` frozen (LoRA never adapts it unless told to): :class:`_LinearCrossEntropy`
  computes each chunk's loss *and* its gradient in the forward, as Liger-Kernel's fused linear
  cross-entropy does: the chunk's logits in the compute dtype, overwritten in place by
  ``softmax - onehot`` (:func:`cross_entropy_rows_`), then one matmul back to the hidden
  states' gradient, which is all it keeps (``[positions, hidden]``). Never more than one
  chunk's logits, 2 bytes a logit in bf16, and ``lm_head`` runs once forward and once
  backward. Liger's own function is not used: it reads the number of trained tokens to the
  host (``.item()``), which CUDA graphs cannot capture.
- anything else (a LoRA on ``lm_head``, its dropout): autograd through each chunk, the chunk's
  logits recomputed in its backward (activation checkpointing per chunk) when there is more
  than one.

Both give transformers' loss: fp32 log-sum-exp of the compute-dtype logits, the gradient
``softmax - onehot`` rounded to the compute dtype before ``lm_head``'s backward, as autograd
rounds it.

Positions may be padded (target ``-100``, cross-entropy's ``ignore_index``: no loss, no
gradient) so that the shapes, and the number of chunks, depend on the packed length alone.

:func:`reference_loss` is the oracle: full logits for every position, then the same selection.
All return the *sum* of the per-token cross-entropies (fp32); the caller divides by the number of
trained tokens of the optimizer step (TRL's ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Positions per lm_head chunk: [1024, 201088] bf16 logits are 0.4 GB.
CHUNK = 1024
# Targets that carry no loss (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


def cross_entropy_rows_torch(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`cross_entropy_rows_` in torch ops (the CPU, devices without Triton): the same
    fp32 arithmetic, with ``[N, V]`` fp32 temporaries."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != IGNORE_INDEX
    index = torch.where(valid, targets, 0).unsqueeze(-1)
    losses = torch.where(valid, lse - x.gather(-1, index).squeeze(-1), 0.0)
    grad = torch.exp(x - lse.unsqueeze(-1))
    grad.scatter_add_(-1, index, -valid.unsqueeze(-1).float())
    logits.copy_(grad * valid.unsqueeze(-1))
    return losses


@torch.library.custom_op("mxlora::cross_entropy_rows_", mutates_args=("logits",))
def cross_entropy_rows_(logits: Tensor, targets: Tensor, backend: str) -> Tensor:
    """Per row of ``logits [N, V]``: the cross-entropy of ``targets [N]`` (fp32, ``[N]``; 0 for
    :data:`IGNORE_INDEX`), and the row overwritten by that loss's gradient with respect to it,
    ``softmax(row) - onehot(target)`` in the logits' dtype (zeros for an ignored row).

    ``backend``: ``triton`` runs one kernel (two passes over each row:
    :mod:`mxlora.mxfp4.triton_kernels`), any other :func:`cross_entropy_rows_torch`; the
    caller resolves it once for the device (:func:`mxlora.mxfp4.kernels.resolve_backend`).
    """
    from mxlora.mxfp4.kernels import TRITON

    if backend == TRITON:
        from mxlora.mxfp4 import triton_kernels

        return triton_kernels.cross_entropy_rows_triton(logits, targets, IGNORE_INDEX)
    return cross_entropy_rows_torch(logits, targets)


@cross_entropy_rows_.register_fake
def _(logits, targets, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``F.linear(hidden, weight, bias)``, chunk by chunk, the
    gradient with respect to ``hidden`` computed in the forward (``weight``/``bias`` frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, backend, need_grad):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk], weight, bias)
            losses = cross_entropy_rows_(logits, targets[start : start + chunk], backend)
            total = total + losses.sum()
            if need_grad:
                grad[start : start + chunk] = torch.mm(logits, weight)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None


def gradient_in_forward(lm_head: torch.nn.Module) -> bool:
    """Whether :func:`chunked_loss` computes the gradient in the forward: ``lm_head`` a plain
    frozen ``nn.Linear`` (no LoRA on it)."""
    return type(lm_head) is torch.nn.Linear and not any(
        p.requires_grad for p in lm_head.parameters()
    )


def _chunk_ce(lm_head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    # As transformers' ForCausalLMLoss: the logits upcast to fp32 before the cross-entropy.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunked_loss(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    positions: Tensor,
    targets: Tensor,
    backend: str,
    chunk: int = CHUNK,
) -> Tensor:
    """Summed cross-entropy of ``targets`` predicted from ``hidden[positions]``.

    Args:
        hidden: ``[T, hidden]`` final hidden states (after the final norm).
        lm_head: the output projection (any module, LoRA on it included).
        positions: ``[N]`` positions that carry loss.
        targets: ``[N]`` the tokens they predict; ``-100`` on padding positions (ignored).
        backend: the kernels' backend for the device (:func:`cross_entropy_rows_`).
        chunk: positions per ``lm_head`` call.

    Returns:
        A 0-dim fp32 tensor.
    """
    selected = hidden.index_select(0, positions)
    if gradient_in_forward(lm_head):
        need_grad = torch.is_grad_enabled() and selected.requires_grad
        return _LinearCrossEntropy.apply(
            selected, lm_head.weight, lm_head.bias, targets, chunk, backend, need_grad
        )
    if selected.shape[0] <= chunk:
        # One chunk: its logits live only from here to its own backward, which follows at
        # once, so recomputing them would save no memory.
        return _chunk_ce(lm_head, selected, targets)
    # The chunk's recompute must draw the same random numbers only if lm_head has dropout (a
    # LoRA on it); saving the CUDA RNG state cannot be captured in a CUDA graph, so only then.
    random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm_head.modules())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk):
        total = total + checkpoint(
            _chunk_ce,
            lm_head,
            selected[start : start + chunk],
            targets[start : start + chunk],
            use_reentrant=False,
            preserve_rng_state=random,
        )
    return total


def reference_loss(
    hidden: Tensor, lm_head: torch.nn.Module, positions: Tensor, targets: Tensor
) -> Tensor:
    """:func:`chunked_loss` the plain way: logits of every position, then the selection."""
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits[positions], targets, reduction="sum")
