"""Triton grouped GEMM with MXFP4 weights dequantized in registers (the fast CUDA path).

Same contract as :func:`mxlora.mxfp4.ops.grouped_mxfp4_matmul_reference`: rows of ``x`` are
grouped by expert (``offsets[e - 1] .. offsets[e]`` for expert ``e``, in expert order); the weight of expert
``e`` is ``W_e [out, in]``, packed as the Hub ships it (uint8 ``blocks [E, out, in/32, 16]``, two
e2m1 codes a byte with element ``2i`` in the low nibble, e8m0 ``scales [E, out, in/32]``).
``transpose=False`` computes ``y_e = x_e · W_eᵀ`` (forward, ``[n, in] -> [n, out]``),
``transpose=True`` computes ``dx_e = dy_e · W_e`` (input gradient, ``[n, out] -> [n, in]``).

One kernel does both directions. Each program computes a ``BLOCK_M x BLOCK_N`` tile of the
output: it loads the packed bytes and scales of the weight tile it needs for each step of the
reduction, turns them into ``x``'s dtype in registers (never a dequantized weight in global
memory) and feeds ``tl.dot``, accumulating in fp32. The forward reduces over ``in`` and reads the
weight tile ``[BLOCK_N (out), BLOCK_K (in)]`` transposed; the input gradient reduces over ``out``
and reads ``[BLOCK_K (out), BLOCK_N (in)]`` as it lies. Either way the packed bytes are read along
``in``, the direction they are packed in.

The MoE tile schedule is computed on the device, inside the kernel, from the per-expert row
offsets (a device tensor): expert ``e`` owns ``ceil(counts[e] / BLOCK_M)`` row tiles,
consecutive across experts. The grid is launched for an upper bound of row tiles
(``ceil(rows / BLOCK_M) + E``) and the surplus programs return at once, so the host needs
neither the counts nor the tile list (no host synchronisation at all), and the schedule follows
whatever ``BLOCK_M`` the config has. Row tiles and column tiles are visited in
``GROUP_M`` super-rows (as in Triton's matmul tutorial) so that neighbouring programs share the
weight tiles of one expert and the activation rows in L2.

The module also holds the project's other Triton kernels, each behind a registered op with a
torch reference: the MXFP4 dequantizer, gpt-oss's expert gate (:mod:`mxlora.mxfp4.gate`) and its
RMSNorm (:mod:`mxlora.engine.norm`); and :func:`precompile`, which compiles the kernels a
training step runs in background threads while the model loads.

Under ``TRITON_INTERPRET=1`` (set before :mod:`triton` is imported) the same kernels run on CPU
tensors through Triton's interpreter; that is how the test suite checks them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from mxlora.mxfp4.format import BLOCK_SIZE


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel instance.

    ``block_n`` and ``block_k`` are multiples of the MXFP4 block (32), so a weight tile never
    splits a scale group; all three are >= 16, as ``tl.dot`` requires.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    #: Compute the output tile transposed, ``(W · xᵀ)ᵀ``: the dequantized weight tile is the
    #: dot's left operand, fed to the tensor cores from registers (no shared-memory round trip),
    #: and the weight dimension (not the few rows an expert has) fills the MMA's 64-row side.
    swap: bool = False

    def __post_init__(self) -> None:
        if self.block_n % BLOCK_SIZE or self.block_k % BLOCK_SIZE or self.block_m < 16:
            raise ValueError(f"{self}: block_n, block_k must be multiples of 32, block_m >= 16")

    def kwargs(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "GROUP_M": self.group_m,
            "SWAP": self.swap,
        }


#: Tile configs for bf16/fp16 on the GPU, the candidates :data:`TRAINING_CONFIGS` is chosen from
#: (``bench/mxfp4_matmul.py --configs`` times each). The first is the usual Hopper bf16 GEMM tile:
#: 128 x 128 outputs with a 64-deep reduction step (2880 needs no reduction mask at 64). A weight
#: tile is dequantized once per row tile, so taller tiles (256 rows) halve that work per flop;
#: shorter or narrower ones give more programs when experts have few rows. The last two are
#: swapped (:attr:`KernelConfig.swap`): 32-row tiles on wgmma, for experts of at most 16 rows.
#: All compile for sm_90 to tensor cores with pipelined loads and no register spills
#: (tests/test_mxfp4_triton.py); the third has 3 stages: its input gradient spilled with 4 and,
#: once the scale bytes were fetched a step ahead, with 2.
CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(64, 64, 128, num_warps=4, num_stages=4),
    KernelConfig(32, 64, 128, num_warps=4, num_stages=3),
    KernelConfig(16, 64, 128, num_warps=4, num_stages=4),
    KernelConfig(64, 32, 256, num_warps=4, num_stages=3),
    KernelConfig(256, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
    KernelConfig(64, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(128, 64, 64, num_warps=4, num_stages=4),
    KernelConfig(64, 64, 64, num_warps=4, num_stages=4),
    KernelConfig(32, 64, 128, num_warps=4, num_stages=4, swap=True),
    KernelConfig(32, 128, 64, num_warps=4, num_stages=4, swap=True),
)

#: What training runs, by direction (``transpose``) and size class (mean rows per expert rounded
#: up to a power of two): ``(largest class, index into CONFIGS)``, the last for every larger
#: class. Fixed rather than autotuned, so a run compiles only the configs it uses and times none:
#: per class the fastest in the H100 table of docs/BENCHMARKS.md measured with the PTX decode
#: (class 32, not in it, keeps the earlier table's choice), or one within 7 % of it that another
#: class uses too (each config is a Triton compile of about a second, in the background while
#: the model loads: :func:`precompile`). Both directions came out the same.
TRAINING_CONFIGS: dict[bool, tuple[tuple[int | None, int], ...]] = {
    False: ((16, 11), (32, 9), (None, 0)),
    True: ((16, 11), (32, 9), (None, 0)),
}


#: Launch pairs that split the experts' rows, per direction (``transpose``): index of the head
#: config into :data:`CONFIGS` -> the tail's. An expert's rows fill 128-row tiles, and a
#: remainder of at most 64 rows, which would leave half or more of its last 128-row tile
#: padding, goes to a second launch of 64-row tiles instead (one such tile costs about 0.64 of a
#: 128-row one: the per-config table of docs/BENCHMARKS.md). The second launch costs at least
#: one program's whole reduction loop however few tails there are, so it pays only with uneven
#: routing, and it was measured to pay in the forward direction only (docs/BENCHMARKS.md).
TAIL_SPLITS: dict[bool, dict[int, int]] = {False: {0: 9}, True: {}}


@dataclass(frozen=True)
class Launch:
    """One launch of the grouped kernel: its tile config and which of each expert's rows it
    computes (``part`` 0: all; 1: the head, 2: the tail of :data:`TAIL_SPLITS`, split by the
    head's and the tail's tile heights)."""

    config: KernelConfig
    part: int = 0
    head_m: int = 0
    tail_m: int = 0

    def kwargs(self) -> dict[str, int | bool]:
        return self.config.kwargs() | {
            "PART": self.part,
            "HEAD_M": self.head_m,
            "TAIL_M": self.tail_m,
        }


def split_launches(head: KernelConfig, tail: KernelConfig) -> tuple[Launch, Launch]:
    """The two launches that compute every row with ``head``'s tiles and short tails with
    ``tail``'s."""
    if head.block_m % tail.block_m:
        raise ValueError(f"split: head rows {head.block_m} not a multiple of {tail.block_m}")
    m = (head.block_m, tail.block_m)
    return Launch(head, 1, *m), Launch(tail, 2, *m)


def training_launches(rows: int, n_experts: int, transpose: bool) -> tuple[Launch, ...]:
    """What training launches for ``rows`` rows over ``n_experts`` in bf16/fp16: the config of
    :data:`TRAINING_CONFIGS` for the size class, split by :data:`TAIL_SPLITS` where it names one."""
    size_class = triton.next_power_of_2(max(1, rows // n_experts))
    for largest, index in TRAINING_CONFIGS[transpose]:
        if largest is None or size_class <= largest:
            tail = TAIL_SPLITS[transpose].get(index)
            if tail is not None:
                return split_launches(CONFIGS[index], CONFIGS[tail])
            return (Launch(CONFIGS[index]),)
    raise AssertionError("TRAINING_CONFIGS ends with a None class")


#: fp32 inputs (tests, exact checks): the dot runs on CUDA cores in full fp32, whose operands
#: live in registers; larger tiles spill.
FP32_CONFIG = KernelConfig(64, 64, 32, num_warps=8, num_stages=2)

#: The interpreter (tests): tiles wider than 32 so that shapes that are multiples of 32 but not
#: of the tile exercise the masks, and still several row tiles on tiny shapes.
INTERPRETER_CONFIG = KernelConfig(16, 64, 64)


#: 2**126, as exact fp32: scales :func:`_e2m1_bits` up to the e2m1 values.
_E2M1_BITS_SCALE = tl.constexpr(2.0**126)


@triton.jit
def _e2m1_bits(code_bits, SHIFT: tl.constexpr):
    """The e2m1 codes in bits ``SHIFT .. SHIFT + 3`` of ``code_bits`` (uint32) as fp32, / 2**126.

    The code's sign bit goes to the fp32 sign and its 2 exponent bits and 1 mantissa bit to the
    fp32 bits 24..22 (the low exponent bits and the top mantissa bit). The fp32 number is then
    the e2m1 value (OCP MX v1.0 section 5.3.3) times 2**-126 exactly, the exponent-0 codes (0
    and 0.5) landing on fp32 subnormals: 4 integer operations a value instead of a table.
    """
    sign = (code_bits << (28 - SHIFT)) & 0x80000000
    magnitude = (code_bits << (22 - SHIFT)) & 0x01C00000
    return (sign | magnitude).to(tl.float32, bitcast=True)


def _bf16_decode_ptx() -> str:
    """PTX decoding 4 packed bytes (``$4``) to bf16: the low nibbles' values in ``$0, $1``,
    the high nibbles' in ``$2, $3``, each times its byte's scale (bf16 bits ``$5, $6``).

    Two bytes at a time, as bf16x2: a byte permute puts bytes ``i`` and ``i + 1`` 16 bits
    apart; shifts and masks move each code's 2 exponent bits and 1 mantissa bit to the bf16
    exponent's low bits and the mantissa's top bit, and its sign to bit 15 (bf16 of the e2m1
    value times 2**-126, the exponent-0 codes landing on subnormals, as :func:`_e2m1_bits`
    does in fp32); then two exact packed products, by 2**126 and by the scales
    (``fma`` with -0.0 added: a product, sm_80 and up). Fewer instructions than the fp32
    arithmetic (docs/BENCHMARKS.md has the counts and times) and the same values: the GPU tests
    dequantize every code under every finite scale byte, in the dequantizer and in the matmul.
    """
    lines = [
        "{",
        ".reg .b32 w, v, t, u, k, z;",
        "mov.b32 k, 0x7E807E80;",  # 2**126, twice
        "mov.b32 z, 0x80008000;",  # -0.0, twice
    ]
    for pair, (select, scale) in enumerate((("0x4140", "$5"), ("0x4342", "$6"))):
        lines.append(f"prmt.b32 w, $4, 0, {select};")  # bytes 2 pair, 2 pair + 1: 16 bits apart
        for half, source in ((0, "w"), (2, "v")):
            if half == 2:
                lines.append("shr.b32 v, w, 4;")  # the high nibbles down to the low ones' place
            lines += [
                f"shl.b32 t, {source}, 6;",
                "and.b32 t, t, 0x01C001C0;",
                f"shl.b32 u, {source}, 12;",
                "and.b32 u, u, 0x80008000;",
                "or.b32 t, t, u;",
                "fma.rn.bf16x2 t, t, k, z;",
                f"fma.rn.bf16x2 ${half + pair}, t, {scale}, z;",
            ]
    lines.append("}")
    return "\n".join(lines)


_BF16_DECODE_PTX = tl.constexpr(_bf16_decode_ptx())


@triton.jit
def _e2m1_pairs_bf16(packed, scale_bits):
    """Bytes ``packed`` (uint8) to the bf16 values of their low and high nibbles times the
    scale whose bf16 bits are ``scale_bits`` (int16, one per byte): :func:`_bf16_decode_ptx`."""
    return tl.inline_asm_elementwise(
        _BF16_DECODE_PTX,
        "=r,=r,=r,=r,r,r,r",
        [packed, scale_bits],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _e8m0_bits(scale, MANTISSA: tl.constexpr):
    """e8m0 scale bytes to the bits of ``2**(byte - 127)`` in a float with 8 exponent bits and
    ``MANTISSA`` mantissa bits (fp32: 23, bf16: 7), exactly: byte 0 is the subnormal 2**-127."""
    s = scale.to(tl.int32)
    return tl.where(s == 0, 1 << (MANTISSA - 1), s << MANTISSA)


@triton.jit
def _e8m0_to_fp32(scale):
    """e8m0 scale bytes to ``2**(byte - 127)`` in fp32, exactly (byte 0 is the subnormal 2**-127)."""
    return _e8m0_bits(scale, 23).to(tl.float32, bitcast=True)


@triton.jit
def _tile_scales(s_ptr, offs_o, k0, n_out, n_in, stride_so, K_WIDTH: tl.constexpr):
    """The e8m0 scale bytes of ``W[offs_o, k0 : k0 + K_WIDTH]``, ``[len(offs_o), K_WIDTH // 32]``.

    Loaded apart from the tile's codes so that a loop can fetch them a step ahead: a row's few
    contiguous scale bytes are too narrow for Triton's pipelined (asynchronous) copies, so a
    load in the step that decodes would stall it for a full memory round trip every step.
    Rows past ``n_out`` and groups past ``n_in`` read as zero.
    """
    offs_group = k0 // 32 + tl.arange(0, K_WIDTH // 32)
    return tl.load(
        s_ptr + offs_o[:, None] * stride_so + offs_group[None, :],
        mask=(offs_o < n_out)[:, None] & (offs_group < n_in // 32)[None, :],
        other=0,
    )


@triton.jit
def _dequantize_tile(
    b_ptr,
    scale,
    offs_o,
    k0,
    n_out,
    n_in,
    stride_bo,
    O_WIDTH: tl.constexpr,
    K_WIDTH: tl.constexpr,
    DTYPE: tl.constexpr,
    MASK_O: tl.constexpr = True,
    MASK_I: tl.constexpr = True,
):
    """``W[offs_o, k0 : k0 + K_WIDTH]`` of one expert as ``DTYPE [O_WIDTH, K_WIDTH]``, its scale
    bytes given (:func:`_tile_scales`).

    ``k0`` is a multiple of 32; rows past ``n_out`` (``MASK_O``) and columns past ``n_in``
    (``MASK_I``) read as zero; without the flag the caller guarantees the tile is inside. Masked
    loads of the packed bytes made the whole kernel much slower at few rows
    (docs/BENCHMARKS.md), so the kernel masks only where a tile may cross an edge.
    """
    offs_byte = k0 // 2 + tl.arange(0, K_WIDTH // 2)
    pointers = b_ptr + offs_o[:, None] * stride_bo + offs_byte[None, :]
    if MASK_O and MASK_I:
        mask = (offs_o < n_out)[:, None] & (offs_byte < n_in // 2)[None, :]
        packed = tl.load(pointers, mask=mask, other=0)
    elif MASK_O:
        packed = tl.load(pointers, mask=(offs_o < n_out)[:, None], other=0)
    elif MASK_I:
        packed = tl.load(pointers, mask=(offs_byte < n_in // 2)[None, :], other=0)
    else:
        packed = tl.load(pointers)
    if PTX_DECODE and tl.bfloat16 == DTYPE:
        # 2**(byte - 127) as bf16 bits, one per 16 bytes, widened to the byte tile; the decode
        # is packed bf16x2 arithmetic in PTX.
        bits = _e8m0_bits(scale, 7).to(tl.int16)
        bits = tl.reshape(
            tl.broadcast_to(bits[:, :, None], (O_WIDTH, K_WIDTH // 32, 16)),
            (O_WIDTH, K_WIDTH // 2),
        )
        low, high = _e2m1_pairs_bf16(packed, bits)
    else:
        # One scale per 32 values = per 16 bytes: widen the scales to the byte tile.
        scale = _e8m0_to_fp32(scale)
        scale = tl.reshape(
            tl.broadcast_to(scale[:, :, None], (O_WIDTH, K_WIDTH // 32, 16)),
            (O_WIDTH, K_WIDTH // 2),
        )
        # Exact in fp32 and in DTYPE: an e2m1 value has at most 2 significant bits and both
        # factors are powers of two, so this equals the reference's ldexp in DTYPE (bar
        # overflow to inf). Two products, not one by 2**(scale - 1): that would overflow fp32
        # for scale bytes > 128.
        packed = packed.to(tl.uint32)
        low = (_e2m1_bits(packed, 0) * _E2M1_BITS_SCALE * scale).to(DTYPE)
        high = (_e2m1_bits(packed, 4) * _E2M1_BITS_SCALE * scale).to(DTYPE)
    # Element 2i is the low nibble of byte i, 2i + 1 the high one: interleave along ``in``.
    return tl.reshape(tl.join(low, high), (O_WIDTH, K_WIDTH))


@triton.jit
def _grouped_mxfp4_kernel(
    x_ptr,
    b_ptr,
    s_ptr,
    y_ptr,
    offsets_ptr,
    n_rows,
    n_experts,
    RED,
    COLS,
    stride_xm,
    stride_ym,
    stride_be,
    stride_bo,
    stride_se,
    stride_so,
    TRANSPOSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP: tl.constexpr,
    EVEN_K: tl.constexpr,
    SHIFT_N: tl.constexpr,
    PART: tl.constexpr,
    HEAD_M: tl.constexpr,
    TAIL_M: tl.constexpr,
):
    """``y[rows_e] = x[rows_e] · op(W_e)``: ``x [n_rows, RED]``, ``y [n_rows, COLS]``.

    ``op(W) = Wᵀ`` (``RED = in``, ``COLS = out``) or ``W`` with ``TRANSPOSE`` (``RED = out``,
    ``COLS = in``). ``EVEN_K``: ``RED`` is a multiple of ``BLOCK_K`` (no reduction mask);
    ``SHIFT_N``: ``COLS >= BLOCK_N``, and the last column tile is moved back to end at ``COLS``
    (no column mask). ``PART`` 0 computes every row; 1 and 2 split each expert's rows between two
    launches (:data:`TAIL_SPLITS`): an expert's last ``rows % HEAD_M`` rows, when they are at most
    ``TAIL_M``, are the tail (``PART`` 2), the rows before them the head (``PART`` 1).
    """
    # Program -> (row tile, column tile), GROUP_M row tiles at a time.
    pid = tl.program_id(0)
    # >= sum_e ceil(counts[e] / BLOCK_M) + ceil(rows past the last expert's / BLOCK_M): each
    # of those E + 1 ceilings adds less than 1 to n_rows / BLOCK_M.
    n_m_tiles = tl.cdiv(n_rows, BLOCK_M) + n_experts
    n_n_tiles = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * n_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # Row tile -> (expert, rows): expert e owns rows [offsets[e - 1], offsets[e]) and tiles
    # [tile_end[e] - tiles[e], tile_end[e]).
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + experts, mask=experts < n_experts, other=0).to(tl.int32)
    starts = tl.load(
        offsets_ptr + experts - 1, mask=(experts > 0) & (experts < n_experts), other=0
    ).to(tl.int32)
    if PART != 0:
        rest = (ends - starts) % HEAD_M
        tail = tl.where((rest > 0) & (rest <= TAIL_M), rest, 0)
        if PART == 1:
            ends = ends - tail
        else:
            starts = ends - tail
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tile_end = tl.cumsum(tiles, 0)
    n_tiles = tl.sum(tiles, 0)
    if pid_m >= n_tiles:
        # Rows past the last expert's belong to none (a packed batch's padding, which the
        # experts skip: mxlora.mxfp4.experts): the launch of every expert's first rows writes
        # them zero, with the programs left over (the grid has enough: see n_m_tiles).
        if PART != 2:
            pad_m = tl.load(offsets_ptr + n_experts - 1).to(tl.int32)
            pad_m += (pid_m - n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            pad_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            y = y_ptr + pad_m.to(tl.int64)[:, None] * stride_ym + pad_n[None, :]
            mask = (pad_m < n_rows)[:, None] & (pad_n < COLS)[None, :]
            tl.store(y, tl.zeros((BLOCK_M, BLOCK_N), y_ptr.dtype.element_ty), mask=mask)
        return
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0)

    offs_m = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < row_end
    n0 = pid_n * BLOCK_N
    if SHIFT_N:
        # The last column tile ends at COLS, overlapping the one before: it recomputes those
        # columns bit for bit (same operands, same order) and every weight load is in bounds.
        n0 = tl.minimum(n0, COLS - BLOCK_N)
        if TRANSPOSE:
            # Columns are ``in``, the packed bytes' contiguous dimension: both operands of the
            # minimum are multiples of 32 (MXFP4 blocks, tile widths), which the compiler cannot
            # see through it; without the hint the byte loads lose their 16-byte vectors.
            n0 = tl.multiple_of(n0, 32)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    b_e = b_ptr + expert.to(tl.int64) * stride_be
    s_e = s_ptr + expert.to(tl.int64) * stride_se
    if TRANSPOSE:
        n_out = RED
        n_in = COLS
    else:
        n_out = COLS
        n_in = RED
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dtype = x_ptr.dtype.element_ty

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The scale bytes are fetched a step ahead (see _tile_scales): the first step's here, each
    # step the next one's (masked off past the end).
    if TRANSPOSE:
        scale = _tile_scales(s_e, tl.arange(0, BLOCK_K), n0, n_out, n_in, stride_so, BLOCK_N)
    else:
        scale = _tile_scales(s_e, offs_n, 0, n_out, n_in, stride_so, BLOCK_K)
    for r0 in range(0, RED, BLOCK_K):
        offs_k = r0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :], mask=rows[:, None], other=0)
        else:
            k_in = (offs_k < RED)[None, :]
            a = tl.load(x_rows + offs_k[None, :], mask=rows[:, None] & k_in, other=0)
        if TRANSPOSE:
            # W[o, i] with o = reduction step, i = output columns: as stored ([K, N]).
            following = _tile_scales(s_e, offs_k + BLOCK_K, n0, n_out, n_in, stride_so, BLOCK_N)
            w = _dequantize_tile(
                b_e, scale, offs_k, n0, n_out, n_in, stride_bo, BLOCK_K, BLOCK_N, dtype,
                MASK_O=not EVEN_K, MASK_I=not SHIFT_N,
            )  # fmt: skip
            if SWAP:
                w = tl.trans(w)
        else:
            # W[o, i] with o = output columns, i = reduction step: read along i ([N, K]).
            following = _tile_scales(s_e, offs_n, r0 + BLOCK_K, n_out, n_in, stride_so, BLOCK_K)
            w = _dequantize_tile(
                b_e, scale, offs_n, r0, n_out, n_in, stride_bo, BLOCK_N, BLOCK_K, dtype,
                MASK_O=not SHIFT_N, MASK_I=not EVEN_K,
            )  # fmt: skip
            if not SWAP:
                w = tl.trans(w)
        scale = following
        # The operands: [M, K] · [K, N], or swapped [N, K] · [K, M].
        if SWAP:
            left = w
            right = tl.trans(a)
        else:
            left = a
            right = w
        if DOT_IN_FP32:
            # Interpreter only: its tl.dot multiplies bf16 bit patterns (triton#11584). The
            # products of bf16 values are exact in fp32, so this is the tensor-core dot bar the
            # order of the fp32 additions.
            acc = tl.dot(left.to(tl.float32), right.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
    if SWAP:
        acc = tl.trans(acc)

    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rows[:, None] & (offs_n < COLS)[None, :])


@triton.jit
def _dequantize_kernel(
    b_ptr,
    s_ptr,
    w_ptr,
    n_rows,
    n_in,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``w [n_rows, n_in] = dequantize(blocks [n_rows, n_in // 2], scales [n_rows, n_in // 32])``.

    The same in-register decoding as the grouped GEMM (:func:`_dequantize_tile`), written out:
    one ``BLOCK_R x BLOCK_K`` tile a program, all tensors contiguous.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    scale = _tile_scales(s_ptr, offs_r, k0, n_rows, n_in, n_in // 32, BLOCK_K)
    tile = _dequantize_tile(
        b_ptr, scale, offs_r, k0, n_rows, n_in, n_in // 2, BLOCK_R, BLOCK_K, w_ptr.dtype.element_ty
    )
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_r < n_rows)[:, None] & (offs_k < n_in)[None, :]
    tl.store(w_ptr + offs_r[:, None] * n_in + offs_k[None, :], tile, mask=mask)


@triton.jit
def _gate_inputs(
    y_ptr, b_ptr, e_ptr, n_rows, n_cols, limit, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """One tile of the gate's inputs: the gate and up halves (fp32) with the bias added and
    rounded to the input dtype as eager torch's add does, clamped copies, masks and offsets.

    The interleaved pairs are loaded as one contiguous ``[BLOCK_R, BLOCK_C, 2]`` tile (coalesced,
    vectorized) and split in registers.
    """
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    experts = tl.load(e_ptr + rows, mask=rows < n_rows, other=0).to(tl.int64)
    pair = tl.arange(0, 2)[None, None, :]
    at = (rows[:, None] * (2 * n_cols) + 2 * cols[None, :])[:, :, None] + pair
    bias_at = (experts[:, None] * (2 * n_cols) + 2 * cols[None, :])[:, :, None] + pair
    mask3 = mask[:, :, None] & (pair < 2)
    dtype = y_ptr.dtype.element_ty
    y = tl.load(y_ptr + at, mask=mask3, other=0.0).to(tl.float32)
    y += tl.load(b_ptr + bias_at, mask=mask3, other=0.0).to(tl.float32)
    gate, up = tl.split(y.to(dtype).to(tl.float32))
    clamped_gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    clamped_up = tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL)
    clamped_up = tl.minimum(clamped_up, limit, propagate_nan=tl.PropagateNan.ALL)
    return gate, up, clamped_gate, clamped_up, rows, cols, mask, at, mask3


@triton.jit
def _gate_forward_kernel(
    y_ptr, b_ptr, e_ptr, out_ptr, n_rows, n_cols, alpha, limit,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``out [n_rows, n_cols] = gate(y [n_rows, 2 n_cols] + bias[experts])`` (mxlora.mxfp4.gate)."""
    _, _, g, u, rows, cols, mask, _, _ = _gate_inputs(
        y_ptr, b_ptr, e_ptr, n_rows, n_cols, limit, BLOCK_R, BLOCK_C
    )
    out = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    offsets = rows[:, None] * n_cols + cols[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_backward_kernel(
    grad_ptr, y_ptr, b_ptr, e_ptr, dy_ptr, n_rows, n_cols, alpha, limit,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``dy [n_rows, 2 n_cols]``: the gate's gradient for ``grad [n_rows, n_cols]``; a clamp
    passes the gradient where its input lies within its bounds (bounds included), as torch's."""
    gate, up, g, u, rows, cols, mask, at, mask3 = _gate_inputs(
        y_ptr, b_ptr, e_ptr, n_rows, n_cols, limit, BLOCK_R, BLOCK_C
    )
    grad = tl.load(grad_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    s = tl.sigmoid(alpha * g)
    d_gate = grad * (u + 1.0) * (s + alpha * g * s * (1.0 - s))
    d_gate = tl.where(gate <= limit, d_gate, 0.0)
    d_up = tl.where((up >= -limit) & (up <= limit), grad * (g * s), 0.0)
    d_y = tl.join(d_gate, d_up)  # [BLOCK_R, BLOCK_C, 2]: interleaved again
    tl.store(dy_ptr + at, d_y.to(dy_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _rms_norm_row(x_ptr, w_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """One row of gpt-oss's RMSNorm input (fp32), the weight (fp32), the mask and the row's
    ``1 / sqrt(mean(x²) + eps)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    return x, w, rstd, row * n_cols + cols, mask


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """``y = weight * (x * rstd)`` of one row, in fp32, rounded once (mxlora.engine.norm)."""
    x, w, rstd, at, mask = _rms_norm_row(x_ptr, w_ptr, n_cols, eps, BLOCK)
    tl.store(y_ptr + at, (w * (x * rstd)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """The input gradient of one row: ``rstd * gw - x * rstd³ * mean(gw * x)``, ``gw = g * w``
    (the weight is frozen: no weight gradient). ``rstd`` is recomputed from the row."""
    x, w, rstd, at, mask = _rms_norm_row(x_ptr, w_ptr, n_cols, eps, BLOCK)
    gw = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32) * w
    dx = rstd * gw - x * (rstd * rstd * rstd) * (tl.sum(gw * x, 0) / n_cols)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    src_ptr, w_ptr, idx_ptr, y_ptr, width,
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``y[t] = Σ_k w[t, k] · src[idx[t, k]]`` (``w`` = 1 unless ``WEIGHTED``), in fp32 rounded
    once: one program per output row ``t``, ``idx``/``w`` ``[T, K]``, rows ``width`` wide."""
    t = tl.program_id(0).to(tl.int64)
    for c0 in range(0, width, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(idx_ptr + t * K + k).to(tl.int64)
            v = tl.load(src_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        tl.store(y_ptr + t * width + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(
    g_ptr, src_ptr, w_ptr, idx_ptr, dsrc_ptr, dw_ptr, width,
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The gradients of :func:`_combine_kernel` for ``g [T, width]``: ``dsrc[idx[t, k]] =
    w[t, k] · g[t]`` (each source row is some ``idx[t, k]`` exactly once: plain stores, no
    atomics) and, if ``WEIGHTED``, ``dw[t, k] = <g[t], src[idx[t, k]]>`` summed in fp32."""
    t = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        row = tl.load(idx_ptr + t * K + k).to(tl.int64)
        if WEIGHTED:
            weight = tl.load(w_ptr + t * K + k).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < width
            g = tl.load(g_ptr + t * width + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = tl.load(src_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
                dot += g * v
                g = g * weight
            tl.store(dsrc_ptr + row * width + cols, g.to(dsrc_ptr.dtype.element_ty), mask=mask)
        if WEIGHTED:
            tl.store(dw_ptr + t * K + k, tl.sum(dot, 0).to(dw_ptr.dtype.element_ty))


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, heads, stride_xt, stride_xh, stride_ct,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SIGN: tl.constexpr,
):  # fmt: skip
    """One token's heads rotated, in fp32 rounded once: with ``x = [x1, x2]`` (halves of the
    head dimension), ``y = [x1 · cos - SIGN · x2 · sin, x2 · cos + SIGN · x1 · sin]``; ``SIGN``
    -1 is the inverse rotation (the backward). ``x`` ``[T, heads, 2 HALF]`` strided (the last
    dimension contiguous), ``y`` ``[T, heads, 2 HALF]`` contiguous, ``cos``/``sin`` ``[T, HALF]``."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    x = x_ptr + t * stride_xt + h * stride_xh + d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = SIGN * tl.load(sin_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)
    y = y_ptr + (t * heads + h) * (2 * HALF) + d
    dtype = y_ptr.dtype.element_ty
    tl.store(y, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(y + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, targets_ptr, losses_ptr, n_cols, IGNORE: tl.constexpr, BLOCK: tl.constexpr
):
    """One row of :func:`mxlora.engine.loss.cross_entropy_rows_`: its loss
    ``logsumexp(x) - x[target]`` (fp32), and ``softmax(x) - onehot(target)`` written over the
    row in its dtype; 0 and a zero row for an ignored target."""
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    # Pass 1: the row's max and sum of exponentials, online, in fp32.
    top = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=float("-inf"))
        x = x.to(tl.float32)
        new_top = tl.maximum(top, tl.max(x, 0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
        top = new_top
    lse = top + tl.log(total)
    target = tl.load(targets_ptr + row)
    valid = target != IGNORE
    picked = tl.load(x_row + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, lse - picked, 0.0))
    # Pass 2: the gradient of the row's loss with respect to its logits, in place.
    for start in range(0, n_cols, BLOCK):
        at = start + cols
        x = tl.load(x_row + at, mask=at < n_cols, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - (at == target).to(tl.float32)
        grad = tl.where(valid, grad, 0.0)
        tl.store(x_row + at, grad.to(logits_ptr.dtype.element_ty), mask=at < n_cols)


#: Whether the kernel runs in Triton's CPU interpreter: ``triton.jit`` decides once, when this
#: module is imported, from ``TRITON_INTERPRET``.
INTERPRETED: bool = isinstance(_grouped_mxfp4_kernel, InterpretedFunction)
#: bf16 tiles decode with packed bf16x2 PTX (:func:`_bf16_decode_ptx`) on the GPU; the
#: interpreter cannot run PTX and keeps the fp32 arithmetic (the same values, bit for bit).
PTX_DECODE = tl.constexpr(not INTERPRETED)

#: Dequantizer tiles ``(rows, values, warps)``: the first is what runs (the fastest in the H100
#: table of docs/BENCHMARKS.md: 8 KiB of packed bytes a program, enough in flight to stream at
#: HBM bandwidth); the others are what ``bench/mxfp4_matmul.py --configs`` compares it with.
DEQUANTIZE_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (32, 512, 8),
    (64, 256, 4),
    (32, 256, 4),
    (64, 128, 4),
    (128, 256, 8),
)
#: The interpreter (tests): small tiles, still several programs on tiny shapes.
INTERPRETER_DEQUANTIZE = (16, 64, 4)


def grouped_mxfp4_matmul_triton(
    x: Tensor,
    blocks: Tensor,
    scales: Tensor,
    offsets: Tensor,
    *,
    transpose: bool,
    config: KernelConfig | None = None,
    split: tuple[KernelConfig, KernelConfig] | None = None,
) -> Tensor:
    """Grouped matmul with MXFP4 weights dequantized inside the kernel.

    The contract of :func:`mxlora.mxfp4.ops.grouped_mxfp4_matmul_reference`, accumulated in
    fp32 (bf16/fp16 inputs on tensor cores; fp32 inputs in full fp32, no TF32).

    Args:
        x: ``[rows, in]`` (``[rows, out]`` with ``transpose``), rows grouped by expert; bf16,
            fp16 or fp32.
        blocks: uint8 ``[E, out, in // 32, 16]``, its last two dimensions contiguous.
        scales: uint8 e8m0 ``[E, out, in // 32]``, its last dimension contiguous.
        offsets: int32 ``[E]`` on ``x``'s device, the end of each expert's rows
            (:func:`mxlora.mxfp4.ops.offsets_from_counts`); read by the kernel, never by the host.
            Rows past ``offsets[-1]`` belong to no expert: computed by nothing, output zero.
        transpose: ``x_e · W_e`` (input gradient) instead of ``x_e · W_eᵀ`` (forward).
        config: tile sizes of one launch; by default :func:`training_launches` on the GPU
            (:data:`FP32_CONFIG` for fp32) and :data:`INTERPRETER_CONFIG` under the interpreter.
        split: instead, two launches (:func:`split_launches`): head and tail configs.

    Returns:
        ``[rows, out]`` (``[rows, in]`` with ``transpose``), ``x``'s dtype.
    """
    n_experts, n_out = blocks.shape[:2]
    n_in = blocks.shape[2] * blocks.shape[3] * 2
    red, cols = (n_out, n_in) if transpose else (n_in, n_out)
    _check(x, blocks, scales, offsets, red)
    y = x.new_empty(x.shape[0], cols)
    if x.shape[0] == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    packed = blocks.flatten(-2)  # [E, out, in // 2]: a view for the Hub's layout
    if split is not None:
        launches = split_launches(*split)
    elif config is not None:
        launches = (Launch(config),)
    elif INTERPRETED:
        launches = (Launch(INTERPRETER_CONFIG),)
    elif x.dtype == torch.float32:
        launches = (Launch(FP32_CONFIG),)
    else:
        launches = training_launches(x.shape[0], n_experts, transpose)
    strides = (x.stride(0), y.stride(0), *packed.stride()[:2], *scales.stride()[:2])
    with _on(x):
        for launch in launches:
            _matmul_launch(
                (x, packed, scales, y, offsets), x.shape[0], n_experts, red, cols, strides,
                transpose, x.dtype, launch,
            )  # fmt: skip
    return y


def edge_flags(red: int, cols: int, config: KernelConfig) -> dict[str, bool]:
    """The kernel's ``EVEN_K`` and ``SHIFT_N`` for a launch: whether its weight tiles can be read
    without masks along the reduction (``red`` a multiple of ``block_k``) and along the columns
    (at least ``block_n`` of them, the last tile moved back inside). Unmasked packed-byte loads
    are what make the fused kernel fast at few rows (docs/BENCHMARKS.md); gpt-oss's shapes take
    both at every training config."""
    return {"EVEN_K": red % config.block_k == 0, "SHIFT_N": cols >= config.block_n}


def _matmul_launch(
    pointers: tuple,
    rows: int,
    n_experts: int,
    red: int,
    cols: int,
    strides: tuple[int, ...],
    transpose: bool,
    dtype: torch.dtype,
    launch: Launch,
    warmup: bool = False,
) -> None:
    """Launch :func:`_grouped_mxfp4_kernel`, or with ``warmup`` only compile what that launch
    would (``pointers`` may then be dtypes): one argument list for both, so a precompiled
    kernel is the one training launches (:func:`precompile`)."""
    config = launch.config
    meta = dict(
        TRANSPOSE=transpose,
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_IN_FP32=INTERPRETED and dtype == torch.bfloat16,
        BLOCK_E=max(16, triton.next_power_of_2(n_experts)),
        **edge_flags(red, cols, config),
        **launch.kwargs(),
    )
    row_tiles = triton.cdiv(rows, config.block_m) + n_experts
    grid = (row_tiles * triton.cdiv(cols, config.block_n),)
    args = (*pointers, rows, n_experts, red, cols, *strides)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if warmup:
        _loaded(_grouped_mxfp4_kernel.warmup(*args, grid=grid, **meta, **options))
    else:
        _wait_for_precompile(("matmul", transpose, launch))
        _grouped_mxfp4_kernel[grid](*args, **meta, **options)


def dequantize_mxfp4_triton(
    blocks: Tensor,
    scales: Tensor,
    dtype: torch.dtype,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """Dequantize packed MXFP4 ``[..., out, in // 32, 16]`` to ``dtype [..., out, in]``.

    Bit for bit :func:`mxlora.mxfp4.reference.dequantize_mxfp4` (bar overflow to inf), in one
    pass that reads the packed bytes once and writes the result once. ``config`` fixes the tile
    ``(rows, values, warps)``; by default the first of :data:`DEQUANTIZE_CONFIGS` on the GPU and
    :data:`INTERPRETER_DEQUANTIZE` under the interpreter.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}")
    n_in = blocks.shape[-2] * BLOCK_SIZE
    w = torch.empty(*blocks.shape[:-2], n_in, dtype=dtype, device=blocks.device)
    n_rows = w.numel() // n_in if n_in else 0
    if n_rows == 0:
        return w
    packed, scales = blocks.contiguous(), scales.contiguous()
    config = config or (INTERPRETER_DEQUANTIZE if INTERPRETED else DEQUANTIZE_CONFIGS[0])
    with _on(w):
        _dequantize_launch((packed, scales, w), n_rows, n_in, config)
    return w


def _dequantize_launch(
    pointers: tuple, n_rows: int, n_in: int, config: tuple[int, int, int]
) -> None:
    r, k, warps = config
    grid = (triton.cdiv(n_rows, r), triton.cdiv(n_in, k))
    _dequantize_kernel[grid](*pointers, n_rows, n_in, BLOCK_R=r, BLOCK_K=k, num_warps=warps)


#: Gate tiles ``(rows, columns, warps)`` on the GPU and under the interpreter (small, so that
#: the tests' odd shapes cover the masks).
GATE_TILE = (16, 128, 4)
INTERPRETER_GATE_TILE = (4, 32, 1)


def _launch(kernel, grid: tuple, args: tuple, meta: dict, warmup: bool) -> None:
    """Launch ``kernel`` on ``args[0]``'s device once its background compile is done, or with
    ``warmup`` compile and load what that launch would (:func:`precompile`; ``args`` may then
    hold dtypes for pointers): one argument list for both (the gate's, norm's and loss's
    launch helpers; the matmul has its own precompile tag)."""
    if warmup:
        _loaded(kernel.warmup(*args, grid=grid, **meta))
        return
    _wait_for_precompile(kernel)
    with _on(args[0]):
        kernel[grid](*args, **meta)


def _gate_launch(
    kernel,
    tensors: tuple,
    rows: int,
    cols: int,
    alpha: float,
    limit: float,
    warmup: bool = False,
) -> None:
    """Launch (or with ``warmup`` compile) a gate kernel, as :func:`_matmul_launch`."""
    r, c, warps = INTERPRETER_GATE_TILE if INTERPRETED else GATE_TILE
    grid = (triton.cdiv(rows, r), triton.cdiv(cols, c))
    args = (*tensors, rows, cols, float(alpha), float(limit))
    _launch(kernel, grid, args, dict(BLOCK_R=r, BLOCK_C=c, num_warps=warps), warmup)


def gate_forward_triton(
    gate_up: Tensor, bias: Tensor, expert_ids: Tensor, alpha: float, limit: float
) -> Tensor:
    """:func:`mxlora.mxfp4.gate.gate_reference` in one kernel (``[rows, I]``)."""
    if bias.dtype != gate_up.dtype:
        raise TypeError(f"gate: bias {bias.dtype} differs from the activations' {gate_up.dtype}")
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, cols)
    if rows:
        tensors = (gate_up.contiguous(), bias.contiguous(), expert_ids.contiguous(), out)
        _gate_launch(_gate_forward_kernel, tensors, rows, cols, alpha, limit)
    return out


def gate_backward_triton(
    grad: Tensor, gate_up: Tensor, bias: Tensor, expert_ids: Tensor, alpha: float, limit: float
) -> Tensor:
    """The gate's gradient with respect to ``gate_up`` (``[rows, 2I]``), in one kernel."""
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
    if rows:
        tensors = (grad.contiguous(), gate_up.contiguous(), bias.contiguous())
        tensors += (expert_ids.contiguous(), d_gate_up)
        _gate_launch(_gate_backward_kernel, tensors, rows, cols, alpha, limit)
    return d_gate_up


def _rms_norm_launch(
    kernel, tensors: tuple, rows: int, cols: int, eps: float, warmup: bool = False
) -> None:
    """Launch (or with ``warmup`` compile) an RMSNorm kernel: one program a row."""
    block = triton.next_power_of_2(cols)
    warps = 1 if INTERPRETED else min(max(block // 512, 4), 16)
    args = (*tensors, cols, float(eps))
    _launch(kernel, (rows,), args, dict(BLOCK=block, num_warps=warps), warmup)


def rms_norm_forward_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`mxlora.engine.norm.rms_norm_reference` in one kernel (``x [..., H]``)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_launch(_rms_norm_forward_kernel, (x2, weight.contiguous(), y), *x2.shape, eps)
    return y.view(x.shape)


def rms_norm_backward_triton(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The RMSNorm's gradient with respect to ``x`` (frozen weight), in one kernel."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    dx = torch.empty_like(x2)
    if x2.shape[0]:
        tensors = (grad.reshape(x2.shape).contiguous(), x2, weight.contiguous(), dx)
        _rms_norm_launch(_rms_norm_backward_kernel, tensors, *x2.shape, eps)
    return dx.view(x.shape)


#: Columns a cross-entropy program reads at a time, and its warps.
CROSS_ENTROPY_TILE = (4096, 8)
INTERPRETER_CROSS_ENTROPY_TILE = (64, 1)


def _cross_entropy_launch(
    tensors: tuple, rows: int, cols: int, ignore: int, warmup: bool = False
) -> None:
    """Launch (or with ``warmup`` compile) the cross-entropy kernel: one program a row."""
    block, warps = INTERPRETER_CROSS_ENTROPY_TILE if INTERPRETED else CROSS_ENTROPY_TILE
    meta = dict(IGNORE=ignore, BLOCK=block, num_warps=warps)
    _launch(_cross_entropy_rows_kernel, (rows,), (*tensors, cols), meta, warmup)


def cross_entropy_rows_triton(logits: Tensor, targets: Tensor, ignore: int) -> Tensor:
    """:func:`mxlora.engine.loss.cross_entropy_rows_` in one kernel (``logits [N, V]``
    contiguous, overwritten by the gradient)."""
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        tensors = (logits, targets.contiguous(), losses)
        _cross_entropy_launch(tensors, *logits.shape, ignore)
    return losses


def _rotary_launch(
    tensors: tuple,
    tokens: int,
    heads: int,
    strides: tuple,
    half: int,
    sign: int,
    warmup: bool = False,
) -> None:
    """Launch (or with ``warmup`` compile) the rotary kernel, as :func:`_matmul_launch`: one
    program per token."""
    meta = dict(
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(half),
        SIGN=sign,
        num_warps=1 if INTERPRETED else 4,
    )
    _launch(_rotary_kernel, (tokens,), (*tensors, heads, *strides), meta, warmup)


def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate ``x [1, heads, T, D]`` by ``cos``/``sin`` ``[1, T, D // 2]`` (the inverse rotation
    with ``inverse``): :func:`mxlora.engine.rotary.rotary_reference` in one kernel. The result
    is ``[1, heads, T, D]`` stored token-major (a transposed view of ``[1, T, heads, D]``), the
    layout the varlen attention reads without a copy."""
    _, heads, tokens, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = x.new_empty(1, tokens, heads, dim)
    if tokens and heads:
        cos, sin = cos.contiguous(), sin.contiguous()
        strides = (x.stride(2), x.stride(1), cos.stride(1))
        _rotary_launch((x, cos, sin, y), tokens, heads, strides, dim // 2, -1 if inverse else 1)
    return y.transpose(1, 2)


#: The combine's widest column block on the GPU (gpt-oss's 2880 in one pass) and its warps; the
#: interpreter's narrow block makes odd widths take several masked passes.
COMBINE_BLOCK, COMBINE_WARPS = 4096, 8
INTERPRETER_COMBINE_BLOCK = 64


def _combine_launch(
    kernel, tensors: tuple, tokens: int, width: int, k: int, weighted: bool, warmup: bool = False
) -> None:
    """Launch (or with ``warmup`` compile) a combine kernel, as :func:`_matmul_launch`: one
    program per output row."""
    if INTERPRETED:
        block, warps = INTERPRETER_COMBINE_BLOCK, 1
    else:
        block, warps = min(COMBINE_BLOCK, triton.next_power_of_2(width)), COMBINE_WARPS
    meta = dict(K=k, WEIGHTED=weighted, BLOCK=block, num_warps=warps)
    _launch(kernel, (tokens,), (*tensors, width), meta, warmup)


def combine_triton(src: Tensor, weights: Tensor | None, index: Tensor) -> Tensor:
    """:func:`mxlora.mxfp4.combine.combine_reference` in one kernel: ``[T, width]`` in the
    promoted dtype of ``src`` and ``weights``."""
    tokens, k = index.shape
    dtype = src.dtype if weights is None else torch.promote_types(src.dtype, weights.dtype)
    y = src.new_empty(tokens, src.shape[1], dtype=dtype)
    if tokens:
        w = src if weights is None else weights.contiguous()  # an unused pointer when unweighted
        tensors = (src.contiguous(), w, index.contiguous(), y)
        _combine_launch(_combine_kernel, tensors, tokens, src.shape[1], k, weights is not None)
    return y


def combine_backward_triton(
    grad: Tensor, src: Tensor, weights: Tensor | None, index: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The gradients of :func:`combine_triton` with respect to ``src`` and ``weights`` (None
    when unweighted), in one kernel."""
    tokens, k = index.shape
    d_src = torch.empty_like(src, memory_format=torch.contiguous_format)
    d_weights = (
        None
        if weights is None
        else torch.empty_like(weights, memory_format=torch.contiguous_format)
    )
    if tokens:
        w = src if weights is None else weights.contiguous()
        dw = d_src if d_weights is None else d_weights
        tensors = (grad.contiguous(), src.contiguous(), w, index.contiguous(), d_src, dw)
        _combine_launch(
            _combine_backward_kernel, tensors, tokens, src.shape[1], k, weights is not None
        )
    return d_src, d_weights


#: Compiles :func:`precompile` started, not yet waited for (:func:`_wait_for_precompile`), by
#: what a launch waits for: the kernel, or for the matmul ``("matmul", transpose, launch)``.
_PENDING: dict[object, concurrent.futures.Future] = {}
_PRECOMPILED: set[tuple] = set()


def precompile(config, dtype: torch.dtype, device: torch.device) -> None:
    """Start compiling, in background threads, the kernels training launches on ``device``.

    Triton compiles a kernel on its first launch, about a second each for the handful a run
    uses, all on the first step. Started when the model's weights start loading, the compiles
    run beside the load (Triton's compiler releases the GIL for much of its work), in parallel;
    a launch waits for its own kernel if that is still compiling. Only what every short-row
    step runs is compiled ahead (more threads slowed the first step down by holding the GIL):
    the matmul's launches for 64 rows per expert and more, each direction, the gate's, the
    combine's, the rotary embedding's and the norm's kernels and the loss's; the rest compiles
    on first use. Each compile is exactly the launch's (same argument list:
    :func:`_matmul_launch`, :func:`_gate_launch`, :func:`_combine_launch`,
    :func:`_rotary_launch`, :func:`_rms_norm_launch`, :func:`_cross_entropy_launch`),
    for row counts that are multiples of 16, as packed training batches' are. A kernel that
    fails to compile here is only warned about: its launch compiles it again and raises there.
    No-op under the interpreter and off CUDA.

    Args:
        config: the model's gpt-oss config (``GptOssConfig``: its experts, widths, heads,
            vocabulary and experts per token).
        dtype: the activations' dtype.
        device: the CUDA device training runs on.
    """
    n_experts, hidden = config.num_local_experts, config.hidden_size
    intermediate, vocab, top_k = (
        config.intermediate_size,
        config.vocab_size,
        config.num_experts_per_tok,
    )
    heads = (config.num_attention_heads, config.num_key_value_heads)
    head_dim = config.head_dim
    key = (dtype, n_experts, hidden, intermediate, vocab, top_k, heads, head_dim, device)
    if INTERPRETED or device.type != "cuda" or key in _PRECOMPILED:
        return
    _PRECOMPILED.add(key)
    if device.index is None:  # the pool's threads have a current device of their own
        device = torch.device("cuda", torch.cuda.current_device())
    rows = 16 * n_experts
    shapes = ((2 * intermediate, hidden), (hidden, intermediate))  # (out, in)
    jobs = []
    for transpose in (False, True):
        # The launches of 64 rows per expert and more (every packed micro-batch of 512 tokens
        # or more); the smaller classes' compile on first use.
        if dtype == torch.float32:
            launches = (Launch(FP32_CONFIG),)
        else:
            launches = training_launches(64 * n_experts, n_experts, transpose)
        for launch in launches:
            warm = (_warm_matmul, dtype, n_experts, shapes, transpose, launch, rows)
            jobs.append((("matmul", transpose, launch), *warm))
    if dtype != torch.float32:
        fwd = (dtype, dtype, torch.int64, dtype)
        bwd = (dtype, dtype, dtype, torch.int64, dtype)
        for kernel, pointers in ((_gate_forward_kernel, fwd), (_gate_backward_kernel, bwd)):
            warm = (_gate_launch, kernel, pointers, rows, intermediate, 1.0, 1.0, True)
            jobs.append((kernel, *warm))
        # The experts' combine (weighted, the routing weights in the model's dtype) and the
        # gradient gather back to token order (unweighted: the weights' pointer unused).
        jobs.append((_combine_kernel, _warm_combine, dtype, hidden, top_k))
        pointers = (dtype,) * 3 + (torch.int64, dtype, dtype)
        warm = (_combine_launch, _combine_backward_kernel, pointers, 16, hidden, top_k, True, True)
        jobs.append((_combine_backward_kernel, *warm))
        # The rotary embedding of queries and keys, each way (the angles in the model's dtype).
        jobs.append((_rotary_kernel, _warm_rotary, dtype, heads, head_dim))
        # gpt-oss's RMSNorm (eager blocks): the weight is in the model's dtype too.
        for kernel, pointers in (
            (_rms_norm_forward_kernel, (dtype,) * 3),
            (_rms_norm_backward_kernel, (dtype,) * 4),
        ):
            # eps: a float argument, which Triton does not specialize on.
            jobs.append((kernel, _rms_norm_launch, kernel, pointers, 16, hidden, 1e-5, True))
        # The loss's rows (mxlora.engine.loss), logits in the model's dtype.
        from mxlora.engine.loss import IGNORE_INDEX

        pointers = (dtype, torch.int64, torch.float32)
        loss = (_cross_entropy_launch, pointers, 16, vocab, IGNORE_INDEX, True)
        jobs.append((_cross_entropy_rows_kernel, *loss))
    pool = concurrent.futures.ThreadPoolExecutor(len(jobs), thread_name_prefix="mxlora-compile")
    _PENDING.update((tag, pool.submit(_on_device, device, *job)) for tag, *job in jobs)
    pool.shutdown(wait=False)


def _loaded(compiled) -> None:
    """After a warm-up compile, also what a kernel's first launch does next: build its launcher
    (a fraction of a second each on the H100, most of what was left of a short run's first step:
    docs/BENCHMARKS.md) and load its binary onto the device. Only Triton's private
    ``_init_handles`` does this ahead of a launch; where it is missing the first launch does it,
    as before."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()


def _on_device(device: torch.device, fn, *args) -> None:
    with torch.cuda.device(device):  # Triton compiles for, and caches under, the current device
        fn(*args)


def _warm_matmul(dtype, n_experts, shapes, transpose, launch, rows) -> None:
    for n_out, n_in in shapes:
        red, cols = (n_out, n_in) if transpose else (n_in, n_out)
        # Contiguous x and y, the Hub's packed layout (grouped_mxfp4_matmul_triton's strides).
        strides = (red, cols, n_out * n_in // 2, n_in // 2, n_out * n_in // 32, n_in // 32)
        pointers = (dtype, torch.uint8, torch.uint8, dtype, torch.int32)
        _matmul_launch(
            pointers, rows, n_experts, red, cols, strides, transpose, dtype, launch, True
        )


def _warm_rotary(dtype, heads, head_dim) -> None:
    # Queries and keys of projections' outputs ([T, heads, D] token-major, as the gradients
    # reach the backward too).
    for n in heads:
        for sign in (1, -1):
            strides = (n * head_dim, head_dim, head_dim // 2)
            _rotary_launch((dtype,) * 4, 16, n, strides, head_dim // 2, sign, True)


def _warm_combine(dtype, width, top_k) -> None:
    for weighted in (True, False):
        pointers = (dtype, dtype, torch.int64, dtype)
        _combine_launch(_combine_kernel, pointers, 16, width, top_k, weighted, True)


def _wait_for_precompile(tag: object = None) -> None:
    """Before a launch: wait for :func:`precompile`'s compile of ``tag`` (``None``: all)."""
    for key in list(_PENDING) if tag is None else [tag]:
        future = _PENDING.pop(key, None)
        error = future and future.exception()
        if error is not None:
            warnings.warn(
                f"mxlora: precompiling a Triton kernel failed ({type(error).__name__}: {error}); "
                "it compiles on its first launch instead",
                stacklevel=3,
            )


def _on(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(x: Tensor, blocks: Tensor, scales: Tensor, offsets: Tensor, red: int) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim != 4 or blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}: expected "
            "[E, out, in // 32, 16] / [E, out, in // 32]"
        )
    if blocks.stride(-1) != 1 or blocks.stride(-2) != blocks.shape[-1] or scales.stride(-1) != 1:
        raise ValueError("blocks need contiguous last two dimensions, scales a contiguous last one")
    if blocks.device != x.device or scales.device != x.device or offsets.device != x.device:
        raise ValueError(
            f"x on {x.device}, blocks on {blocks.device}, scales on {scales.device}, "
            f"offsets on {offsets.device}"
        )
    if x.ndim != 2 or x.shape[1] != red:
        raise ValueError(f"x {tuple(x.shape)}: expected [rows, {red}]")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if offsets.shape != (blocks.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets {offsets.dtype} {tuple(offsets.shape)}: expected int32 [{blocks.shape[0]}]"
        )
