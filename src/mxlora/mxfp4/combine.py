"""The experts' combine: each token's routing-weighted sum of its experts' output rows.

With the (token, slot) assignments sorted by expert, ``index[t, k]`` is the sorted row holding
token ``t``'s output from its ``k``-th expert and ``weights[t, k]`` that expert's routing weight::

    y[t] = Σ_k weights[t, k] · src[index[t, k]]

Unweighted (``weights`` None), the same sum gathers the gradient of the rows the experts read
(each token's row copied once per slot) back to token order.

Two implementations, picked as the gate's are (:mod:`mxlora.mxfp4.gate`):

- :func:`combine_reference`: an index, a product and a sum in torch ops, differentiated by
  autograd (the oracle; the experts' torch path spells the same sum with permutations instead of
  an index, whose backward would scatter-add);
- :func:`fused_combine`: the registered op ``mxlora::moe_combine`` (``triton`` backend in eager
  blocks), one Triton kernel forward and one backward, where eager torch makes five passes over
  the ``[T, K, width]`` rows forward and as many backward. It computes in fp32 and rounds once,
  where eager torch rounds each product to the activations' dtype first: in bf16 the two differ
  by about one rounding; in fp32 they agree to fp32 summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def combine_reference(src: Tensor, weights: Tensor | None, index: Tensor) -> Tensor:
    """``y[t] = Σ_k weights[t, k] · src[index[t, k]]`` (see the module docstring); ``[T, width]``."""
    rows = src[index]  # [T, K, width]
    if weights is not None:
        rows = rows * weights.unsqueeze(-1)
    return rows.sum(1)


def _check(src: Tensor, weights: Tensor | None, index: Tensor) -> None:
    if src.dim() != 2 or index.dim() != 2 or index.numel() != src.shape[0]:
        raise ValueError(f"combine: src {tuple(src.shape)} / index {tuple(index.shape)}")
    if weights is not None and weights.shape != index.shape:
        raise ValueError(f"combine: weights {tuple(weights.shape)} / index {tuple(index.shape)}")


@torch.library.custom_op("mxlora::moe_combine", mutates_args=())
def fused_combine(src: Tensor, weights: Tensor | None, index: Tensor) -> Tensor:
    """:func:`combine_reference` in one Triton kernel; differentiable in ``src`` and ``weights``.

    Args:
        src: ``[T * K, width]`` rows, each of them ``index[t, k]`` for exactly one ``(t, k)``.
        weights: ``[T, K]`` or None (each weight 1).
        index: ``[T, K]`` int64, a permutation of the rows of ``src``.

    Returns:
        ``[T, width]`` in the promoted dtype of ``src`` and ``weights``.
    """
    from mxlora.mxfp4 import triton_kernels

    _check(src, weights, index)
    return triton_kernels.combine_triton(src, weights, index)


@fused_combine.register_fake
def _(src, weights, index):
    dtype = src.dtype if weights is None else torch.promote_types(src.dtype, weights.dtype)
    return src.new_empty(index.shape[0], src.shape[1], dtype=dtype)


@torch.library.custom_op("mxlora::moe_combine_backward", mutates_args=())
def fused_combine_backward(
    grad: Tensor, src: Tensor, weights: Tensor | None, index: Tensor
) -> list[Tensor]:
    """The gradients of :func:`fused_combine`: ``[d_src]``, or ``[d_src, d_weights]``."""
    from mxlora.mxfp4 import triton_kernels

    d_src, d_weights = triton_kernels.combine_backward_triton(grad, src, weights, index)
    return [d_src] if d_weights is None else [d_src, d_weights]


@fused_combine_backward.register_fake
def _(grad, src, weights, index):
    return [torch.empty_like(src)] + ([] if weights is None else [torch.empty_like(weights)])


def _setup_context(ctx, inputs, output) -> None:
    src, weights, index = inputs
    ctx.save_for_backward(src, weights, index)


def _backward(ctx, grad):
    src, weights, index = ctx.saved_tensors
    grads = fused_combine_backward(grad.contiguous(), src, weights, index)
    return grads[0], grads[1] if weights is not None else None, None


fused_combine.register_autograd(_backward, setup_context=_setup_context)
