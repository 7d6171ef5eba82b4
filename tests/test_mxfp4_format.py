"""MXFP4 numerics: the e2m1 grid, nibble order, e8m0, quantize (OCP MX v1.0) and the reference
dequantize against transformers' own, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import mxlora.mxfp4.quantize as quantize_module
from mxlora.mxfp4 import (
    FP4_VALUES,
    dequantize_mxfp4,
    dequantize_mxfp4_experts,
    e8m0_to_exponent,
    exponent_to_e8m0,
    pack_fp4,
    quantize_mxfp4,
    quantize_mxfp4_experts,
    unpack_fp4,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so -0.0 differs from +0.0 and NaN payloads compare."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _grid_blocks(gen: torch.Generator, rows: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 bytes where every block holds a code of magnitude 4 or 6, so each block's
    amax lies in [4, 8) x scale and requantizing must reproduce the same scale byte."""
    codes = torch.randint(0, 16, (rows, groups, 32), generator=gen, dtype=torch.uint8)
    pos = torch.randint(0, 32, (rows, groups, 1), generator=gen)
    top = torch.randint(6, 8, (rows, groups, 1), generator=gen, dtype=torch.uint8)
    top |= torch.randint(0, 2, (rows, groups, 1), generator=gen, dtype=torch.uint8) << 3
    codes.scatter_(-1, pos, top)
    # Scales whose every block value (0.5 * 2**-127 .. 6 * 2**127) stays normal-or-exact in f32.
    scales = torch.randint(3, 253, (rows, groups), generator=gen, dtype=torch.uint8)
    return pack_fp4(codes), scales


def test_fp4_values_are_the_e2m1_grid_transformers_uses():
    from transformers.integrations.mxfp4 import FP4_VALUES as HF_FP4_VALUES

    assert list(FP4_VALUES) == HF_FP4_VALUES
    # e2m1 by its definition: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
    for code, value in enumerate(FP4_VALUES):
        sign = -1.0 if code & 8 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        expected = sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))
        assert math.copysign(1, value) == math.copysign(1, expected) and value == expected


def test_pack_unpack_nibble_order_and_inverse():
    # Element 0 in the low nibble, element 1 in the high one (transformers reads lo -> even).
    assert pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert unpack_fp4(torch.tensor([0x21], dtype=torch.uint8)).tolist() == [1, 2]
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)
    codes = torch.randint(0, 16, (3, 5, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes.to(torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_e8m0_helpers():
    scales = torch.tensor([0, 127, 254, 255], dtype=torch.uint8)
    assert e8m0_to_exponent(scales).tolist() == [-127, 0, 127, 128]
    assert exponent_to_e8m0(torch.tensor([-127, 0, 127])).tolist() == [0, 127, 254]
    with pytest.raises(ValueError, match="e8m0"):
        exponent_to_e8m0(torch.tensor([128]))


def test_dequantize_known_values():
    # Byte 0x7F: low nibble 15 (-6), high nibble 7 (+6); scale 2**-3.
    blocks = torch.full((1, 1, 16), 0x7F, dtype=torch.uint8)
    scales = torch.tensor([[127 - 3]], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (1, 32)
    assert out[0, :2].tolist() == [-0.75, 0.75]


def test_grid_values_times_power_of_two_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _grid_blocks(gen, rows=64, groups=6)
    for dtype in (torch.float32, torch.bfloat16):
        w = dequantize_mxfp4(blocks, scales, dtype)
        b2, s2 = quantize_mxfp4(w)
        assert torch.equal(s2, scales)
        assert torch.equal(b2, blocks)
        assert torch.equal(_bits(dequantize_mxfp4(b2, s2, dtype)), _bits(w))


def test_grid_values_with_smaller_block_max_also_round_trip():
    # A block whose largest value is e.g. 0.5 * 2**k gets a smaller scale; its values stay on
    # the finer grid, so the values (not necessarily the bytes) come back exactly.
    k = torch.arange(-120, 121, 10, dtype=torch.float32)
    grid = torch.tensor(FP4_VALUES[:8]).repeat(4)  # 32 values, max 6
    for top in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0):
        row = torch.where(grid.abs() <= top, grid, 0.0)
        w = row * torch.exp2(k)[:, None]
        w[:, 1::2] *= -1
        b, s = quantize_mxfp4(w)
        assert torch.equal(_bits(dequantize_mxfp4(b, s, torch.float32)), _bits(w))


def test_all_zero_block_gets_smallest_scale_and_signed_zeros_survive():
    w = torch.zeros(2, 32)
    w[1] = -0.0
    b, s = quantize_mxfp4(w)
    assert s.tolist() == [[0], [0]]
    assert torch.equal(_bits(dequantize_mxfp4(b, s, torch.float32)), _bits(w))


def test_rounding_is_nearest_even_and_saturates():
    # The 4.0 fixes the scale at 2**0; the rest are the midpoints between grid values and beyond.
    vals = [4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, 0.26, 0.74, 5.01, 0.1]
    want = [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.5, 0.5, 6.0, 0.0]
    row = torch.tensor(vals + [0.0] * (32 - len(vals)))
    w = torch.stack([row, -row])
    b, s = quantize_mxfp4(w)
    out = dequantize_mxfp4(b, s, torch.float32)
    assert out[0, : len(want)].tolist() == want
    assert out[1, : len(want)].tolist() == [-v for v in want]
    assert torch.signbit(out[1, 12])  # -0.1 rounds to -0.0, keeping the sign like IEEE


def _error_bound(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Per-element bound of the MXFP4 error, derived from the format.

    With X = 2**(floor(log2(amax)) - 2), every |x| / X lies in [0, 8). The e2m1 grid has spacing
    0.5 below 2, 1 in [2, 4) and 2 in [4, 6], so round-to-nearest is off by at most half of it:
    X/4, X/2, X. Above 6X the value saturates, off by |x| - 6X < 2X. Overall |error| < 2X <= amax/2,
    and <= X <= amax/4 for every element not above 6X.
    """
    wb = w.reshape(*w.shape[:-1], -1, block)
    amax = wb.abs().amax(-1, keepdim=True)
    x_scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    a = wb.abs() / x_scale
    half_spacing = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))
    bound = torch.where(a <= 6, half_spacing, a - 6) * x_scale
    return bound.reshape(w.shape)


def test_random_normal_within_the_format_error_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 48, 256, generator=gen, dtype=torch.float64) * 0.02
    w[0, 0, :32] *= 1e-30  # tiny blocks
    w[1, 1, 32:64] *= 1e30  # huge blocks
    b, s = quantize_mxfp4(w)
    err = (dequantize_mxfp4(b, s, torch.float64) - w).abs()
    bound = _error_bound(w)
    assert (err <= bound).all()
    amax = w.reshape(8, 48, 8, 32).abs().amax(-1)
    assert (err.reshape(8, 48, 8, 32) < amax[..., None] / 2).all()
    # The bound is tight: some element reaches at least half of it.
    assert (err > bound / 2).any()
    # Scale bytes: floor(log2(amax)) - 2 + 127, checked with Python floats on every block.
    want = [math.floor(math.log2(a)) - 2 + 127 for a in amax.flatten().tolist()]
    assert s.flatten().tolist() == want


def test_bf16_input_quantizes_like_its_float32_value():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    b16, s16 = quantize_mxfp4(w)
    b32, s32 = quantize_mxfp4(w.float())
    assert torch.equal(b16, b32) and torch.equal(s16, s32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    w = torch.zeros(3, 4, 64)
    w[2, 1, 40] = bad
    kind = "NaN" if math.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"{kind} at index \(2, 1, 40\)"):
        quantize_mxfp4(w)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(TypeError):
        quantize_mxfp4(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(
            torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8)
        )


def test_chunking_and_strided_input_do_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 40, 96, generator=gen).to(torch.bfloat16)
    whole = quantize_mxfp4(w)
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 96 * 7)  # 7 rows a chunk, ragged end
    chunked = quantize_mxfp4(w)
    assert all(torch.equal(a, c) for a, c in zip(whole, chunked, strict=True))
    # Expert orientation: a transposed view quantizes like its contiguous copy.
    w_in_out = w.transpose(1, 2).contiguous()
    experts = quantize_mxfp4_experts(w_in_out)
    assert all(torch.equal(a, c) for a, c in zip(whole, experts, strict=True))
    assert torch.equal(dequantize_mxfp4_experts(*experts), dequantize_mxfp4(*whole).transpose(1, 2))


def test_other_block_sizes():
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (5, 4, 16), generator=gen, dtype=torch.uint8)
    codes[..., 0] = 7
    scales = torch.randint(100, 150, (5, 4), generator=gen, dtype=torch.uint8)
    w = dequantize_mxfp4(pack_fp4(codes), scales, torch.float32)
    assert w.shape == (5, 64)
    b, s = quantize_mxfp4(w, block=16)
    assert b.shape == (5, 4, 8) and torch.equal(s, scales) and torch.equal(b, pack_fp4(codes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_dequantize_matches_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # Every byte value under every scale byte (including 0, 254 and the NaN byte 255), so the
    # extreme exponents round/overflow identically, plus a random expert tensor.
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(256, 1, 1)
    every = every.reshape(1, 256, 16, 16)
    every_scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).reshape(1, 256, 16)
    gen = torch.Generator().manual_seed(7)
    rand = torch.randint(0, 256, (3, 24, 2, 16), generator=gen, dtype=torch.uint8)
    rand_scales = torch.randint(110, 130, (3, 24, 2), generator=gen, dtype=torch.uint8)
    for blocks, scales in ((every, every_scales), (rand, rand_scales)):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = dequantize_mxfp4_experts(blocks, scales, dtype)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.equal(_bits(ours), _bits(theirs))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    w = (torch.randn(4, 256, 512, generator=gen) * 0.02).to(torch.bfloat16)
    cpu = quantize_mxfp4(w)
    gpu = quantize_mxfp4(w.cuda())
    assert all(torch.equal(a, g.cpu()) for a, g in zip(cpu, gpu, strict=True))
    ref = dequantize_mxfp4(*cpu)
    assert torch.equal(_bits(dequantize_mxfp4(*gpu).cpu()), _bits(ref))


def test_one_dimensional_input():
    w = torch.tensor([4.0] + [0.5] * 31 + [-6.0] + [1.0] * 31)
    b, s = quantize_mxfp4(w)
    assert b.shape == (2, 16) and s.tolist() == [127, 127]
    assert torch.equal(dequantize_mxfp4(b, s, torch.float32), w)
