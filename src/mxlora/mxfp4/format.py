"""MXFP4 element and scale encodings: e2m1 codes, their nibble packing, and e8m0 scales.

Sources: the OCP Microscaling Formats (MX) Specification v1.0 (sections 5.3.3 "FP4 E2M1" and 5.4.1
"E8M0"), and the byte layout the gpt-oss checkpoints on the Hub use, as read by transformers'
``integrations/mxfp4.py`` (``FP4_VALUES`` and ``_convert_moe_packed_tensors``).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The e2m1 value of each 4-bit code (index = code): bit 3 is the sign, bits 2..1 the exponent
#: (bias 1), bit 0 the mantissa; code 1 is the one subnormal (0.5). OCP MX v1.0 table 5.3.3,
#: identical to transformers' ``integrations.mxfp4.FP4_VALUES``. Code 8 is -0.0.
FP4_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

#: Values sharing one scale (OCP MX v1.0 table 1: k = 32 for every MX format).
BLOCK_SIZE = 32
#: Exponent of the largest normal e2m1 value, 6 = 1.5 * 2**2 (OCP MX v1.0 section 6.3: emax_elem).
E2M1_EMAX = 2
#: Largest e2m1 magnitude; quantization saturates to it.
E2M1_MAX = 6.0
#: e8m0 scale byte ``s`` stands for ``2**(s - 127)``; 255 is NaN (OCP MX v1.0 section 5.4.1).
E8M0_BIAS = 127
E8M0_NAN = 255
#: Exponent range of a finite e8m0 scale: bytes 0..254.
SCALE_EXP_MIN = -E8M0_BIAS
SCALE_EXP_MAX = 254 - E8M0_BIAS


def fp4_lut(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 16 e2m1 values as a lookup table (exact in every float dtype)."""
    return torch.tensor(FP4_VALUES, dtype=dtype, device=device)


def pack_fp4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes two to a byte along the last dimension.

    Element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte ``i``, the order
    transformers unpacks (``lut[blk & 0x0F]`` to even positions, ``lut[blk >> 4]`` to odd ones).

    Args:
        codes: integer tensor of codes in ``[0, 16)``, last dimension even.

    Returns:
        uint8 tensor with the last dimension halved.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_fp4`: uint8 bytes to codes (uint8), last dimension doubled."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 needs uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def e8m0_to_exponent(scales: Tensor) -> Tensor:
    """e8m0 scale bytes to their power-of-two exponents (int32, ``byte - 127``).

    Byte 255 (NaN in OCP MX) maps to 128, so dequantizing it gives inf/NaN as transformers does.
    """
    if scales.dtype != torch.uint8:
        raise TypeError(f"e8m0 scales must be uint8, got {scales.dtype}")
    return scales.to(torch.int32) - E8M0_BIAS


def exponent_to_e8m0(exponents: Tensor) -> Tensor:
    """Power-of-two exponents in ``[-127, 127]`` to e8m0 scale bytes (uint8)."""
    if exponents.numel() and (
        int(exponents.min()) < SCALE_EXP_MIN or int(exponents.max()) > SCALE_EXP_MAX
    ):
        raise ValueError(f"e8m0 exponents must lie in [{SCALE_EXP_MIN}, {SCALE_EXP_MAX}]")
    return (exponents.to(torch.int32) + E8M0_BIAS).to(torch.uint8)
