"""The frozen MXFP4 grouped matmul as one registered op, and its three implementations.

``torch.ops.mxlora.mxfp4_grouped_mm(x, blocks, scales, offsets, transpose, backend)``: rows of
``x`` are grouped by expert, expert ``e`` owning rows ``offsets[e - 1] .. offsets[e]`` (int32 on
``x``'s device: the host never reads them); with ``W_e = dequantize(blocks[e], scales[e])`` of
shape ``[out, in]`` (the Hub's orientation), group ``e`` gives ``x_e · W_eᵀ`` (``transpose``
False, the forward ``[n, in] -> [n, out]``) or ``x_e · W_e`` (``transpose`` True, the input
gradient ``[n, out] -> [n, in]``), in ``x``'s dtype. The weights are frozen: the registered
autograd gives the gradient of ``x`` only, by the same op with ``transpose`` flipped (nothing
dequantized is saved for backward; backward dequantizes again).

Registered with ``torch.library`` (a fake implementation for tracing, autograd), so
``torch.compile`` sees one node per call, whatever runs inside. ``backend`` names what does
(chosen once, when the module is built: :func:`mxlora.mxfp4.kernels.resolve_backend`):

* ``reference``: one expert dequantized at a time (:func:`dequantize_mxfp4`), then a matmul.
  The oracle; reads the offsets on the host.
* ``torch``: the whole projection dequantized at once with torch ops
  (:func:`dequantize_mxfp4_torch`, compiled into one fused kernel on CUDA), then torch's
  ``grouped_mm``; the buffer is freed when the op returns. No Triton of ours.
* ``triton``: by the rows per expert, known from the shapes alone: few rows (bandwidth-bound)
  run the fused kernel that dequantizes in registers and reads the packed weights once
  (:func:`mxlora.mxfp4.triton_kernels.grouped_mxfp4_matmul_triton`); many rows (compute-bound)
  dequantize the projection with the Triton dequantizer and run ``grouped_mm`` on tensor cores.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from mxlora.mxfp4.format import FP4_VALUES
from mxlora.mxfp4.kernels import REFERENCE, TORCH, TRITON
from mxlora.mxfp4.reference import dequantize_mxfp4

#: ``triton`` backend: below this many rows per expert (on average) the fused kernel runs,
#: from it on the dequantize-then-``grouped_mm`` path: the measured cut-over on an H100 at
#: gpt-oss-20b shapes, between 128 rows (fused faster) and 256 (dense faster), summed over both
#: projections and directions (bench/results/mxfp4_matmul-sweep.json).
FUSED_MAX_ROWS_PER_EXPERT = 192


def offsets_from_counts(counts: Sequence[int] | Tensor, device: torch.device | str) -> Tensor:
    """Cumulative rows per expert (``offsets[e]`` = end of expert ``e``'s rows), int32 on ``device``.

    A host sequence goes through pinned memory and an asynchronous copy (a plain ``.to(cuda)``
    of pageable memory would synchronise the stream); a tensor is summed on its device.
    """
    device = torch.device(device)
    if isinstance(counts, Tensor):
        return counts.to(device).cumsum(0).to(torch.int32)
    host = torch.tensor(list(accumulate(counts)), dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _aten_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """torch's grouped GEMM (``F.grouped_mm`` from torch 2.10, private ``torch._grouped_mm``
    before); strides must be multiples of 16 bytes."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offsets)


@torch.library.custom_op("mxlora::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """torch's grouped GEMM, registered again so that it traces in every dtype.

    ``a [M, K] @ b[e] [K, N]`` for the rows of each group (``b`` 3-D), or, both 2-D, the
    per-group ``a[:, rows of e] @ b[rows of e, :]`` stacked to ``[E, K, N]`` (the weight
    gradient). torch's own fake (meta) implementation accepts bf16 only, while its CPU kernel
    computes fp32 as well: as this op, fp32 (the CPU's dtype) compiles too. Differentiable in
    both operands (3-D case).
    """
    return _aten_grouped_mm(a, b, offsets)


@grouped_mm.register_fake
def _(a, b, offsets):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[-1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


def _grouped_mm_backward(ctx, grad: Tensor):
    a, b, offsets = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("mxlora::grouped_mm: no gradient of the weight-gradient form")
    grad = grad.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_mm(grad, b.transpose(-1, -2), offsets)
    if ctx.needs_input_grad[1]:
        grad_b = grouped_mm(a.transpose(0, 1), grad, offsets)
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mxfp4_matmul_reference(
    x: Tensor, blocks: Tensor, scales: Tensor, counts: Sequence[int], *, transpose: bool
) -> Tensor:
    """Reference grouped matmul with MXFP4 weights, one expert dequantized at a time.

    The op's contract with host ``counts`` (rows per expert) in place of the offsets; computed
    in ``x``'s dtype, the dtype the seed dequantizes into.

    Args:
        x: ``[sum(counts), in]`` (or ``[sum(counts), out]`` with ``transpose``).
        blocks: uint8 ``[E, out, in // 32, 16]``.
        scales: uint8 e8m0 ``[E, out, in // 32]``.
        counts: rows per expert, ``len(counts) == E``.
        transpose: multiply by ``W_e`` instead of ``W_eᵀ``.

    Returns:
        ``[sum(counts), out]`` (``[sum(counts), in]`` with ``transpose``), ``x``'s dtype.
    """
    y = x.new_empty(x.shape[0], _width(blocks, transpose))
    ends = list(accumulate(counts))
    for e, (n, end) in enumerate(zip(counts, ends, strict=True)):
        if n == 0:
            continue
        w = dequantize_mxfp4(blocks[e], scales[e], x.dtype)  # [out, in], freed after this expert
        y[end - n : end] = x[end - n : end] @ w if transpose else x[end - n : end] @ w.T
    return y


@functools.cache
def _tables(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``pairs [256, 2]``: twice the two e2m1 values of each byte (low nibble first);
    ``pow2 [256]``: each e8m0 byte's ``2**(byte - 128)``. Their product is ``value * 2**(byte -
    127)``; the halved powers keep byte 255 (``2**128``) finite, as ``ldexp`` does."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device) * 2
    byte = torch.arange(256, device=device)
    pairs = torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1)
    pow2 = torch.ldexp(torch.ones(256, dtype=dtype, device=device), byte - 128)
    return pairs, pow2


@functools.cache
def _scaled_pairs(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every (scale byte, block byte)'s two values, ``[256 * 256]`` machine words (int64 holding
    two fp32, int32 two bf16) indexed by ``scale << 8 | byte``: the products of
    :func:`_tables`, computed once (512 KiB in fp32)."""
    pairs, pow2 = _tables(dtype, device)
    table = (pow2[:, None, None] * pairs[None]).reshape(-1, 2).contiguous()
    return table.view(torch.int64 if table.element_size() == 4 else torch.int32).view(-1)


def dequantize_mxfp4_torch(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Dequantize packed MXFP4 to ``dtype [..., out, in]`` with one table lookup, in eager mode.

    Each byte's two values, already scaled, are one word of :func:`_scaled_pairs` at ``scale <<
    8 | byte``: one integer pass to form the index and one 1-D gather, the fewest eager passes
    (the CPU's path, where each pass costs as much as its arithmetic on small layers). Bit for
    bit :func:`dequantize_mxfp4`: the product of an e2m1 value and a power of two is exact in
    fp32 and bf16 (same exponent range, at most 2 significant bits) or overflows to inf as
    ``ldexp`` does; other dtypes take the fp32 values and round.
    """
    words = _scaled_pairs(_compute_dtype(dtype), blocks.device)
    # ``byte + 256 * scale`` in one op (int32 [..., out, in // 32, 16]): each op is a pass.
    index = torch.add(blocks, scales.int().unsqueeze(-1), alpha=256)
    values = words.index_select(0, index.view(-1)).view(_compute_dtype(dtype))
    return values.view(*scales.shape[:-1], -1).to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def _lookup(blocks: Tensor, scales: Tensor, pairs: Tensor, pow2: Tensor, dtype) -> Tensor:
    """:func:`dequantize_mxfp4_torch` as two small lookups and a product: what ``torch.compile``
    fuses into one elementwise kernel (CUDA), no 64k-entry table to read."""
    values = pairs.index_select(0, blocks.reshape(-1).int()).view(*scales.shape, 32)
    w = values * pow2.index_select(0, scales.reshape(-1).int()).view(*scales.shape, 1)
    return w.flatten(-2).to(dtype)


@functools.cache
def _compiled_lookup():
    # One fused elementwise kernel instead of the eager lookups' several passes over memory.
    return torch.compile(_lookup, dynamic=False, fullgraph=True)


def _dequantize_torch(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`_lookup` compiled on CUDA (not on ROCm: no Triton trusted there), else
    :func:`dequantize_mxfp4_torch` in eager mode."""
    if blocks.is_cuda and torch.version.hip is None:
        tables = _tables(_compute_dtype(dtype), blocks.device)
        # The compiled function is guarded on the global state (grad mode, autocast and its
        # cache), under which the op runs in several (eager and compiled blocks, their
        # backward, CUDA-graph capture): each would be a recompile, and dynamo gives up after
        # eight. One fixed state, which changes nothing for these ops.
        off = dict(dtype=torch.bfloat16, enabled=False, cache_enabled=False)
        with torch.no_grad(), torch.autocast("cuda", **off), torch.autocast("cpu", **off):
            return _compiled_lookup()(blocks, scales, *tables, dtype)
    return dequantize_mxfp4_torch(blocks, scales, dtype)


def _width(blocks: Tensor, transpose: bool) -> int:
    """Output columns: ``in`` with ``transpose``, else ``out``."""
    return blocks.shape[2] * blocks.shape[3] * 2 if transpose else blocks.shape[1]


def offsets_covering(offsets: Tensor, rows: int) -> Tensor:
    """``offsets`` with the last group ending at ``rows``: torch's grouped GEMM leaves rows past
    the last group unwritten, so rows past ``offsets[-1]`` (no expert's: skipped padding) join
    the last group there, computed and finite."""
    return torch.cat((offsets[:-1], offsets.new_full((1,), rows)))


def _dense_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, transpose: bool) -> Tensor:
    """``x_e · W_eᵀ`` (or ``x_e · W_e``) with the dequantized ``w [E, out, in]``; rows past
    ``offsets[-1]`` in the last group (:func:`offsets_covering`)."""
    ends = offsets_covering(offsets, x.shape[0])
    return _aten_grouped_mm(x.contiguous(), w if transpose else w.transpose(-1, -2), ends)


def torch_mxfp4_grouped_mm(
    x: Tensor, blocks: Tensor, scales: Tensor, ends: Tensor, transpose: bool
) -> Tensor:
    """The ``torch`` backend's computation for groups that cover every row (``ends[-1]`` is
    ``x``'s row count, which the caller guarantees: nothing checks it without a host sync), so
    without the op's extension of the last group; for code that differentiates the op by hand
    (the experts' eager torch block). ``x`` contiguous."""
    w = _dequantize_torch(blocks, scales, x.dtype)
    return _aten_grouped_mm(x, w if transpose else w.transpose(-1, -2), ends)


def _reference_impl(x: Tensor, blocks, scales, offsets: Tensor, transpose: bool) -> Tensor:
    ends = offsets.tolist()  # the oracle may read the offsets on the host
    counts = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return grouped_mxfp4_matmul_reference(x, blocks, scales, counts, transpose=transpose)


def _torch_impl(x: Tensor, blocks, scales, offsets: Tensor, transpose: bool) -> Tensor:
    ends = offsets_covering(offsets, x.shape[0])
    return torch_mxfp4_grouped_mm(x.contiguous(), blocks, scales, ends, transpose)


def _triton_impl(x: Tensor, blocks, scales, offsets: Tensor, transpose: bool) -> Tensor:
    from mxlora.mxfp4 import triton_kernels

    if uses_dense_path(x, blocks.shape[0]):
        w = triton_kernels.dequantize_mxfp4_triton(blocks, scales, x.dtype)
        return _dense_grouped_mm(x, w, offsets, transpose)
    return triton_kernels.grouped_mxfp4_matmul_triton(
        x, blocks, scales, offsets, transpose=transpose
    )


def dense_path(rows: int, n_experts: int, dtype: torch.dtype, device: torch.device) -> bool:
    """``triton`` backend: whether ``rows`` rows of ``dtype`` on ``device`` take dequantize +
    ``grouped_mm`` (else the fused kernel): many rows per expert, and bf16 on CUDA (torch's
    grouped GEMM runs on tensor cores in bf16 only). The memory plan asks it too."""
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and rows >= FUSED_MAX_ROWS_PER_EXPERT * n_experts
    )


def uses_dense_path(x: Tensor, n_experts: int) -> bool:
    """:func:`dense_path` for ``x``, from its shape alone (no host sync)."""
    return dense_path(x.shape[0], n_experts, x.dtype, x.device)


_IMPLS = {REFERENCE: _reference_impl, TORCH: _torch_impl, TRITON: _triton_impl}


@torch.library.custom_op("mxlora::mxfp4_grouped_mm", mutates_args=())
def mxfp4_grouped_mm(
    x: Tensor, blocks: Tensor, scales: Tensor, offsets: Tensor, transpose: bool, backend: str
) -> Tensor:
    """The frozen MXFP4 grouped matmul (see the module docstring), by ``backend``.

    Args:
        x: ``[rows, in]`` (``[rows, out]`` with ``transpose``), rows grouped by expert.
        blocks: uint8 ``[E, out, in // 32, 16]``.
        scales: uint8 e8m0 ``[E, out, in // 32]``.
        offsets: int32 ``[E]``, the end of each expert's rows. Rows past ``offsets[-1]``
            belong to no expert (skipped padding): the fused Triton kernel writes them zero,
            the grouped-GEMM paths (``torch``, ``triton`` at many rows) compute them with the
            last expert's weight; the ``reference`` backend needs ``offsets[-1] == rows``.
        transpose: ``x_e · W_e`` (input gradient) instead of ``x_e · W_eᵀ``.
        backend: ``reference``, ``torch`` or ``triton``.

    Returns:
        ``[rows, out]`` (``[rows, in]`` with ``transpose``), ``x``'s dtype.
    """
    return _run(x, blocks, scales, offsets, transpose, backend)


def _run(x: Tensor, blocks, scales, offsets: Tensor, transpose: bool, backend: str) -> Tensor:
    if backend not in _IMPLS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(_IMPLS)}")
    if x.shape[0] == 0:
        return x.new_empty(0, _width(blocks, transpose))
    return _IMPLS[backend](x, blocks, scales, offsets, transpose)


@mxfp4_grouped_mm.register_fake
def _(x, blocks, scales, offsets, transpose, backend):
    return x.new_empty(x.shape[0], _width(blocks, transpose))


def _setup_context(ctx, inputs, output) -> None:
    _, blocks, scales, offsets, transpose, backend = inputs
    ctx.save_for_backward(blocks, scales, offsets)
    ctx.transpose, ctx.backend = transpose, backend


def _backward(ctx, grad: Tensor):
    blocks, scales, offsets = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = mxfp4_grouped_mm(
            grad.contiguous(), blocks, scales, offsets, not ctx.transpose, ctx.backend
        )
    return grad_x, None, None, None, None, None


mxfp4_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


class _EagerFrozenMatmul(torch.autograd.Function):
    """The op's forward and registered backward, as a plain autograd function.

    Eager calls take this: the custom op's Python dispatch and autograd wrappers cost more than
    the whole computation on small layers (the CPU, tiny models). Same implementations, same
    gradient; :func:`frozen_mxfp4_matmul` picks the op when tracing.
    """

    @staticmethod
    def forward(ctx, x, blocks, scales, offsets, transpose, backend):
        ctx.save_for_backward(blocks, scales, offsets)
        ctx.transpose, ctx.backend = transpose, backend
        return _run(x, blocks, scales, offsets, transpose, backend)

    @staticmethod
    def backward(ctx, grad):
        blocks, scales, offsets = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad = grad.contiguous()
            grad_x = _run(grad, blocks, scales, offsets, not ctx.transpose, ctx.backend)
        return grad_x, None, None, None, None, None


def frozen_mxfp4_matmul(
    x: Tensor, blocks: Tensor, scales: Tensor, offsets: Tensor, transpose: bool, backend: str
) -> Tensor:
    """:func:`mxfp4_grouped_mm` as training calls it: the registered op under ``torch.compile``
    (one node in the graph), its autograd-function twin in eager mode (less overhead)."""
    if torch.compiler.is_compiling():
        return mxfp4_grouped_mm(x, blocks, scales, offsets, transpose, backend)
    return _EagerFrozenMatmul.apply(x, blocks, scales, offsets, transpose, backend)


def lora_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """:func:`grouped_mm` under ``torch.compile``; torch's own (differentiable) in eager mode."""
    if torch.compiler.is_compiling():
        return grouped_mm(a, b, offsets)
    return _aten_grouped_mm(a, b, offsets)
