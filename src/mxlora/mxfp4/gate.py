"""gpt-oss's expert gate, with the gate_up projection's expert bias added first.

For rows grouped by expert (``expert_ids[r]`` the expert of row ``r``), ``y = gate_up +
bias[expert_ids]`` holds gate and up interleaved along its last dimension (gate at ``2c``, up at
``2c + 1``), and the gate is transformers' ``GptOssExperts._apply_gate``::

    gate = min(y[:, 0::2], limit)
    up = clamp(y[:, 1::2], -limit, limit)
    out = (up + 1) * gate * sigmoid(alpha * gate)

Implementations, picked by the experts' backend (:mod:`mxlora.mxfp4.kernels`):

- :func:`gate_reference`: those torch ops, autograd differentiates them (the oracle, and the path
  of the ``reference`` backend and of every block ``torch.compile`` traces);
- :func:`gate_activation_backward`: the gradient written out in torch ops, for the ``torch``
  backend's eager block (:class:`mxlora.mxfp4.experts.Mxfp4Experts`), which differentiates the
  whole block by hand: it keeps the biased input only, like the kernel below, and no autograd
  node per op runs;
- :func:`fused_gate`: the registered op ``mxlora::gpt_oss_gate`` (``triton`` backend), one Triton
  kernel forward and one backward, instead of about eight passes forward and a dozen backward
  over the ``[rows, 2I]`` activations in eager torch, and autograd keeps only its input (eager
  torch keeps the clamped halves and the sigmoid too). The bias is frozen (the experts' biases
  never train), so it gets no gradient.

The kernel computes in fp32 and rounds once, where eager torch rounds after every op in bf16: in
bf16 the two differ by about one bf16 rounding; in fp32 they agree to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_reference(
    gate_up: Tensor, bias: Tensor, expert_ids: Tensor, alpha: float, limit: float
) -> Tensor:
    """The gate as transformers computes it (see the module docstring); ``[rows, I]``."""
    return gate_activation(gate_up + bias[expert_ids], alpha, limit)


def gate_activation(y: Tensor, alpha: float, limit: float) -> Tensor:
    """The gate of the biased ``y`` (``[rows, 2I]``, gate and up interleaved); ``[rows, I]``."""
    gate, up = y[..., ::2], y[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def gate_activation_backward(grad: Tensor, y: Tensor, alpha: float, limit: float) -> Tensor:
    """The gradient of :func:`gate_activation` with respect to ``y`` (``[rows, 2I]``), by the
    ops autograd runs for it, in its order (the same roundings in bf16). The clamps pass the
    gradient where they left the value as it was, bounds included, as torch's clamp does."""
    gate, up = y[..., ::2], y[..., 1::2]
    clamped_gate = gate.clamp(min=None, max=limit)
    clamped_up = up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(clamped_gate * alpha)
    d_glu = grad * (clamped_up + 1)
    d_gate = d_glu * sig + torch.ops.aten.sigmoid_backward(d_glu * clamped_gate, sig) * alpha
    d_up = grad * (clamped_gate * sig)
    # Straight into the interleaved halves: a stack along the last dimension is a slow copy.
    d_y, zero = torch.empty_like(y), y.new_zeros(())
    torch.where(clamped_gate == gate, d_gate, zero, out=d_y[..., ::2])
    torch.where(clamped_up == up, d_up, zero, out=d_y[..., 1::2])
    return d_y


def _check(gate_up: Tensor, bias: Tensor, expert_ids: Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or bias.shape[-1] != gate_up.shape[1]:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} / bias {tuple(bias.shape)}")
    if expert_ids.shape != gate_up.shape[:1]:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} for {gate_up.shape[0]} rows")


@torch.library.custom_op("mxlora::gpt_oss_gate", mutates_args=())
def fused_gate(
    gate_up: Tensor, bias: Tensor, expert_ids: Tensor, alpha: float, limit: float
) -> Tensor:
    """:func:`gate_reference` in one Triton kernel; differentiable in ``gate_up``.

    Args:
        gate_up: ``[rows, 2I]``, rows grouped by expert, gate and up interleaved.
        bias: ``[E, 2I]`` the experts' gate_up bias (frozen).
        expert_ids: ``[rows]`` each row's expert (int64 or int32).
        alpha: the sigmoid's slope.
        limit: the clamp.

    Returns:
        ``[rows, I]`` in ``gate_up``'s dtype.
    """
    from mxlora.mxfp4 import triton_kernels

    _check(gate_up, bias, expert_ids)
    return triton_kernels.gate_forward_triton(gate_up, bias, expert_ids, alpha, limit)


@fused_gate.register_fake
def _(gate_up, bias, expert_ids, alpha, limit):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("mxlora::gpt_oss_gate_backward", mutates_args=())
def fused_gate_backward(
    grad: Tensor, gate_up: Tensor, bias: Tensor, expert_ids: Tensor, alpha: float, limit: float
) -> Tensor:
    """The gradient of :func:`fused_gate` with respect to ``gate_up`` (``[rows, 2I]``)."""
    from mxlora.mxfp4 import triton_kernels

    return triton_kernels.gate_backward_triton(grad, gate_up, bias, expert_ids, alpha, limit)


@fused_gate_backward.register_fake
def _(grad, gate_up, bias, expert_ids, alpha, limit):
    return torch.empty_like(gate_up)


def _setup_context(ctx, inputs, output) -> None:
    gate_up, bias, expert_ids, alpha, limit = inputs
    ctx.save_for_backward(gate_up, bias, expert_ids)
    ctx.alpha, ctx.limit = alpha, limit


def _backward(ctx, grad):
    gate_up, bias, expert_ids = ctx.saved_tensors
    d_gate_up = fused_gate_backward(
        grad.contiguous(), gate_up, bias, expert_ids, ctx.alpha, ctx.limit
    )
    return d_gate_up, None, None, None, None


fused_gate.register_autograd(_backward, setup_context=_setup_context)
