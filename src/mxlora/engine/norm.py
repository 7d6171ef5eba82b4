"""gpt-oss's RMSNorm as one registered op, one Triton kernel each way, for eager blocks on CUDA.

transformers' ``GptOssRMSNorm`` computes, for ``x [..., H]`` in the compute dtype::

    x32 = x.float()
    y = (weight * (x32 * rsqrt(mean(x32²) + eps))).to(x.dtype)

eager: about eight kernels forward (casts, square, mean, add, rsqrt, two products) and a dozen
backward, on a short step's few hundred tokens each a launch-sized job, twice a block; autograd
keeps the fp32 copy of the input. Two implementations:

- :func:`rms_norm_reference`: that formula (the oracle; what compiled blocks, the CPU and fp32
  runs use, and inductor fuses it there);
- :func:`fused_rms_norm`: the registered op ``mxlora::rms_norm``, one Triton kernel forward and
  one backward (:mod:`mxlora.mxfp4.triton_kernels`), keeping only the input. The norms' weights
  are frozen (LoRA never trains them), so the op gives no weight gradient.

The kernel computes in fp32 and rounds once, as eager does; only the order of the row's fp32
sum differs. :func:`fused_norms` puts the op in a model's norms for the duration of a loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``GptOssRMSNorm.forward`` (see the module docstring)."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (weight * (x32 * torch.rsqrt(variance + eps))).to(x.dtype)


@torch.library.custom_op("mxlora::rms_norm", mutates_args=())
def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm_reference` in one Triton kernel; differentiable in ``x`` only.

    Args:
        x: ``[..., H]``.
        weight: ``[H]``, frozen.
        eps: added to the mean square.

    Returns:
        ``x``'s shape and dtype.
    """
    from mxlora.mxfp4 import triton_kernels

    return triton_kernels.rms_norm_forward_triton(x, weight, eps)


@fused_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("mxlora::rms_norm_backward", mutates_args=())
def fused_rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The gradient of :func:`fused_rms_norm` with respect to ``x``."""
    from mxlora.mxfp4 import triton_kernels

    return triton_kernels.rms_norm_backward_triton(grad, x, weight, eps)


@fused_rms_norm_backward.register_fake
def _(grad, x, weight, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return fused_rms_norm_backward(grad, x, weight, ctx.eps), None, None


fused_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def _fused_forward(norm: GptOssRMSNorm, hidden_states: Tensor) -> Tensor:
    return fused_rms_norm(hidden_states, norm.weight, norm.variance_epsilon)


@contextlib.contextmanager
def fused_norms(model: nn.Module, active: bool) -> Iterator[None]:
    """Run ``model``'s ``GptOssRMSNorm``s as :func:`fused_rms_norm`, for the duration (when
    ``active``; norms whose weight trains keep transformers' forward)."""
    norms = [
        m
        for m in model.modules()
        if active and isinstance(m, GptOssRMSNorm) and not m.weight.requires_grad
    ]
    for norm in norms:
        norm.forward = functools.partial(_fused_forward, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward  # the class's forward again
