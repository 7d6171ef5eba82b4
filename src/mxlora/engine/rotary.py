"""gpt-oss's rotary position embedding as one registered op, one Triton kernel each way, for
eager blocks on CUDA.

transformers' ``apply_rotary_pos_emb`` rotates each head's halves ``x = [x1, x2]`` of queries
and keys by the position's angle::

    y = [x1 · cos - x2 · sin, x2 · cos + x1 · sin]

eager: a chunk, four products, a difference, a sum and a concatenation per tensor forward (and
more backward), each over ``[1, heads, T, D]`` halves strided in memory; then the varlen
attention copies queries and keys to token-major ``[T, heads, D]``. Two implementations:

- :func:`rotary_reference`: transformers' own function (the oracle; what compiled blocks, the
  CPU and fp32 runs use);
- :func:`fused_rotary`: the registered op ``mxlora::rotary``, one Triton kernel forward and one
  backward (the inverse rotation), writing token-major so that the attention's copy is none.
  It keeps nothing but the angles for the backward (the rotation is linear; queries and keys
  need no gradient of the angles).

The kernel computes in fp32 and rounds once, where eager torch rounds after each product and
sum: in bf16 the two differ by about one rounding; in fp32 they agree to fp32 rounding.
:func:`fused_rotary_embeddings` puts the op in transformers' gpt-oss attention for the duration
of a loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from transformers.models.gpt_oss import modeling_gpt_oss

#: transformers' function, kept before any swap: the oracle and the fallback.
_TRANSFORMERS_ROTARY = modeling_gpt_oss.apply_rotary_pos_emb


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' rotation of ``x [B, heads, T, D]`` by ``cos``/``sin`` ``[B, T, D // 2]``."""
    return _TRANSFORMERS_ROTARY(x, x, cos, sin)[0]


@torch.library.custom_op("mxlora::rotary", mutates_args=())
def fused_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`rotary_reference` in one Triton kernel; differentiable in ``x`` only.

    Args:
        x: ``[1, heads, T, D]``, its last dimension contiguous.
        cos, sin: ``[1, T, D // 2]``.

    Returns:
        ``[1, heads, T, D]`` in ``x``'s dtype, stored token-major (``[1, T, heads, D]``
        transposed).
    """
    from mxlora.mxfp4 import triton_kernels

    return triton_kernels.rotary_triton(x, cos, sin)


@fused_rotary.register_fake
def _(x, cos, sin):
    batch, heads, tokens, dim = x.shape
    return x.new_empty(batch, tokens, heads, dim).transpose(1, 2)


@torch.library.custom_op("mxlora::rotary_backward", mutates_args=())
def fused_rotary_backward(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of :func:`fused_rotary` with respect to ``x``: the inverse rotation."""
    from mxlora.mxfp4 import triton_kernels

    return triton_kernels.rotary_triton(grad, cos, sin, inverse=True)


@fused_rotary_backward.register_fake
def _(grad, cos, sin):
    batch, heads, tokens, dim = grad.shape
    return grad.new_empty(batch, tokens, heads, dim).transpose(1, 2)


def _setup_context(ctx, inputs, output) -> None:
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return fused_rotary_backward(grad, cos, sin), None, None


fused_rotary.register_autograd(_backward, setup_context=_setup_context)


def _fused_apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """``apply_rotary_pos_emb``'s signature; the op where it applies (one packed sequence in
    ``[1, heads, T, D]``), transformers' function elsewhere."""
    if unsqueeze_dim != 1 or q.shape[0] != 1 or cos.shape[0] != 1:
        return _TRANSFORMERS_ROTARY(q, k, cos, sin, unsqueeze_dim)
    return fused_rotary(q, cos, sin), fused_rotary(k, cos, sin)


@contextlib.contextmanager
def fused_rotary_embeddings(active: bool) -> Iterator[None]:
    """Run gpt-oss's rotary embedding as :func:`fused_rotary`, for the duration (when
    ``active``). transformers' attention calls its module's ``apply_rotary_pos_emb`` by name
    (its hub-kernel hook for that function needs the ``kernels`` package and the Hub), so the
    name is pointed at the op and back."""
    if not active:
        yield
        return
    modeling_gpt_oss.apply_rotary_pos_emb = _fused_apply
    try:
        yield
    finally:
        modeling_gpt_oss.apply_rotary_pos_emb = _TRANSFORMERS_ROTARY
