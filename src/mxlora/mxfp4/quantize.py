"""Quantize floating-point weights to MXFP4 (OCP MX v1.0), in the Hub's packed layout."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from mxlora.mxfp4.format import (
    BLOCK_SIZE,
    E2M1_EMAX,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    exponent_to_e8m0,
    pack_fp4,
)

# Values handled per step: bounds the float temporaries (a few times this many 4-byte values)
# so a 120b expert tensor (128 x 5760 x 2880) quantizes on a GPU without multi-GB scratch.
_CHUNK_ELEMENTS = 1 << 24

# Rounding |x| / scale to the e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 to nearest, ties to even:
# the magnitude code is the number of midpoints passed. At a tie (equality) the code only goes up
# when the upper neighbour's code is even (its mantissa bit is 0), hence > or >= below.
_MIDPOINTS_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)  # ties go to codes 0, 2, 4, 6
_MIDPOINTS_TIE_UP = (0.75, 1.75, 3.5)  # ties go to codes 2, 4, 6


def quantize_mxfp4(w: Tensor, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Quantize ``w`` to MXFP4 along its last (input) dimension.

    Each run of ``block`` values along the last dimension shares the scale
    ``2**(floor(log2(amax)) - 2)`` (OCP MX v1.0 section 6.3; 2 is e2m1's emax), an all-zero block
    gets the smallest scale ``2**-127``. Elements divided by the scale are rounded to the nearest
    e2m1 value, ties to even, and saturate at +-6. Work proceeds a chunk of rows at a time, so
    temporaries stay small whatever the size of ``w`` (which may be a strided view, e.g. a
    transposed expert tensor, without being copied whole).

    Args:
        w: float tensor ``[..., out, in]``; ``in`` a multiple of ``block``. Float64 input is
            computed in float64, everything else in float32 (exact for bf16/fp16).
        block: values per scale; 32 in MXFP4 and in the gpt-oss checkpoints.

    Returns:
        ``(blocks, scales)``: uint8 ``[..., out, in // block, block // 2]`` (two e2m1 codes per byte,
        low nibble first) and uint8 e8m0 ``[..., out, in // block]``, on ``w``'s device.

    Raises:
        ValueError: ``w`` holds NaN or Inf (MXFP4 cannot encode them), or the shape does not fit.
    """
    if not w.is_floating_point():
        raise TypeError(f"quantize_mxfp4 needs a float tensor, got {w.dtype}")
    if w.ndim < 1 or block % 2 or w.shape[-1] % block:
        raise ValueError(
            f"quantize_mxfp4: last dimension of shape {tuple(w.shape)} must be a multiple of the "
            f"block size {block} (an even number)"
        )
    groups = w.shape[-1] // block
    blocks = torch.empty(*w.shape[:-1], groups, block // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], groups, dtype=torch.uint8, device=w.device)
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32

    # Walk all leading dims but the rows one, then chunks of rows: never reshapes a strided w.
    w2, b2, s2 = (t.reshape(1, *t.shape) if w.ndim == 1 else t for t in (w, blocks, scales))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // w.shape[-1])
    for lead in itertools.product(*(range(n) for n in w2.shape[:-2])):
        for r0 in range(0, w2.shape[-2], rows_per_chunk):
            rows = slice(r0, r0 + rows_per_chunk)
            x = w2[lead][rows].to(compute)
            _check_finite(x, lead, r0)
            b2[lead][rows], s2[lead][rows] = _quantize_rows(x, block)
    return blocks, scales


def quantize_mxfp4_experts(w: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize expert weights held as transformers' ``GptOssExperts`` holds them.

    ``GptOssExperts`` keeps ``gate_up_proj [E, hidden, 2 * intermediate]`` and
    ``down_proj [E, intermediate, hidden]`` (``[..., in, out]``, used as ``x @ W``); the Hub stores
    the transpose. Inverse orientation of :func:`mxlora.mxfp4.dequantize_mxfp4_experts`.

    Returns:
        The Hub's ``*_blocks [..., out, in // 32, 16]`` and ``*_scales [..., out, in // 32]``.
    """
    return quantize_mxfp4(w.transpose(-1, -2))


def _check_finite(x: Tensor, lead: tuple[int, ...], r0: int) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(x[row, col]) else "Inf"
        where = (*lead, r0 + row, col)
        raise ValueError(
            f"quantize_mxfp4: input holds {int(bad.sum())} non-finite value(s) in this chunk, "
            f"first a {kind} at index {where}; MXFP4 has no encoding for NaN or Inf"
        )


def _quantize_rows(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Quantize a finite 2-D float chunk ``[rows, in]``; returns packed codes and e8m0 bytes."""
    xb = x.reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(dim=-1)
    # frexp: amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly (also for
    # subnormals, where a float log2 could round).
    _, e = torch.frexp(amax)
    exp = torch.where(amax > 0, e - 1 - E2M1_EMAX, SCALE_EXP_MIN)
    exp = exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX)
    # Exact: multiplying by a power of two only moves the exponent (results < 8, or so small
    # they round to 0 anyway).
    scaled = torch.ldexp(xb, -exp.unsqueeze(-1))
    mag = scaled.abs()
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=x.device)
    for t in _MIDPOINTS_TIE_DOWN:
        code += mag > t
    for t in _MIDPOINTS_TIE_UP:
        code += mag >= t
    # The sign bit, kept for zeros too (-0.0 and negatives rounding to zero give code 8, -0.0).
    code |= torch.signbit(scaled).to(torch.uint8) << 3
    return pack_fp4(code), exponent_to_e8m0(exp)
