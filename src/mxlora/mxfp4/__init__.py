"""The MXFP4 format of gpt-oss expert weights, in one place.

MXFP4 (OCP Microscaling Formats Specification v1.0): blocks of 32 values share one power-of-two
scale (e8m0: a byte ``s`` meaning ``2**(s - 127)``); each value is a 4-bit e2m1 float
(:data:`FP4_VALUES`). 4.25 bits per weight.

Layout in the Hub checkpoints (``openai/gpt-oss-20b`` / ``-120b``), per layer ``L``::

    model.layers.L.mlp.experts.gate_up_proj_blocks  uint8 [E, 2*I, H/32, 16]
    model.layers.L.mlp.experts.gate_up_proj_scales  uint8 [E, 2*I, H/32]
    model.layers.L.mlp.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
    model.layers.L.mlp.experts.down_proj_scales     uint8 [E, H, I/32]

(E experts, H hidden size, I intermediate size). Weights are ``[out, in]``: the 32-value blocks
run along the *input* dimension (H for gate_up_proj, I for down_proj), as transformers'
``Mxfp4GptOssExperts`` declares them (``gate_up_proj [E, 2*I, H/2]`` bytes) and as its
dequantizer reads them (``[E, out, in]`` then transposed). In each byte the even element sits in
the low nibble, the odd one in the high nibble. The gate/up rows of ``gate_up_proj`` interleave
(gate = even output rows, up = odd ones).

transformers' ``GptOssExperts`` (and a ``--bf16`` checkpoint) holds the transposes,
``gate_up_proj [E, H, 2*I]`` and ``down_proj [E, I, H]`` (``x @ W``):
:func:`dequantize_mxfp4_experts` / :func:`quantize_mxfp4_experts` convert to and from that.
"""

from mxlora.mxfp4.format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E8M0_BIAS,
    FP4_VALUES,
    e8m0_to_exponent,
    exponent_to_e8m0,
    fp4_lut,
    pack_fp4,
    unpack_fp4,
)
from mxlora.mxfp4.quantize import quantize_mxfp4, quantize_mxfp4_experts
from mxlora.mxfp4.reference import dequantize_mxfp4, dequantize_mxfp4_experts

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MAX",
    "E8M0_BIAS",
    "FP4_VALUES",
    "dequantize_mxfp4",
    "dequantize_mxfp4_experts",
    "e8m0_to_exponent",
    "exponent_to_e8m0",
    "fp4_lut",
    "pack_fp4",
    "quantize_mxfp4",
    "quantize_mxfp4_experts",
    "unpack_fp4",
]
