"""Reference MXFP4 dequantization in pure PyTorch (CPU or any GPU).

Bit for bit what transformers computes when it loads a gpt-oss checkpoint with
``Mxfp4Config(dequantize=True)``: the e2m1 value from a lookup table in the target dtype, then
``torch.ldexp`` by the e8m0 exponent, rounded to the target dtype (so out-of-range results become
inf/0 exactly as there). Callers that must stay small pass one expert (``blocks[e]``) or a tile
(``blocks[e, r0:r1, g0:g1]``): any leading shape works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mxlora.mxfp4.format import e8m0_to_exponent, fp4_lut


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dequantize packed MXFP4 to ``[..., out, in]`` (the Hub's orientation).

    Args:
        blocks: uint8 ``[..., out, in // 32, 16]``, two e2m1 codes per byte, low nibble first.
        scales: uint8 e8m0 ``[..., out, in // 32]``.
        dtype: result dtype.

    Returns:
        ``[..., out, in]`` tensor of ``dtype`` on ``blocks``' device.
    """
    if blocks.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks must be uint8, got {blocks.dtype}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            "expected blocks [..., groups, bytes] and scales [..., groups]"
        )
    lut = fp4_lut(dtype, blocks.device)
    out = torch.empty(*blocks.shape[:-1], 2 * blocks.shape[-1], dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).int()]
    out[..., 1::2] = lut[(blocks >> 4).int()]
    # In place, in ``dtype``, as transformers does: the rounding of extreme scales matches too.
    torch.ldexp(out, e8m0_to_exponent(scales).unsqueeze(-1), out=out)
    return out.flatten(-2)


def dequantize_mxfp4_experts(
    blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Dequantize expert weights into the orientation transformers' ``GptOssExperts`` holds.

    The Hub stores ``gate_up_proj`` as ``[E, 2 * intermediate, hidden]`` and ``down_proj`` as
    ``[E, hidden, intermediate]`` (out, in); ``GptOssExperts`` multiplies ``x @ W`` with
    ``gate_up_proj [E, hidden, 2 * intermediate]`` and ``down_proj [E, intermediate, hidden]``.

    Returns:
        ``[..., in, out]`` contiguous tensor, equal bit for bit to transformers' loaded parameter.
    """
    return dequantize_mxfp4(blocks, scales, dtype).transpose(-1, -2).contiguous()
