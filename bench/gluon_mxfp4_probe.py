"""Probe: two warp-specialised Gluon versions of the fused MXFP4 forward matmul (sm_90).

Issue 9 asks the expert matmul at 530 tokens (66 rows per expert) for at most 0.6x bf16
``grouped_mm``; the Triton kernel training runs (:mod:`mxlora.mxfp4.triton_kernels`) decodes each
weight tile and feeds the tensor cores in the same warps, one after the other. These two designs
hand-partition the work with Gluon (Triton's explicit-layout dialect, ``triton.experimental``),
and were measured against it; neither was adopted (docs/BENCHMARKS.md, "Warp-specialised kernels
in Gluon"). Both compute ``y_e = x_e · W_eᵀ`` for rows grouped by expert, bit for bit what the
Triton kernel computes, with the same on-device tile schedule and the same PTX decode.

* ``ws``: a 1-warp TMA loader (x tile, packed bytes), a decoder partition (packed bytes ->
  bf16 tile in shared memory) and the default partition issuing wgmma from shared memory. The
  ``mode`` field switches parts off to see what bounds it (the result is then wrong): 1 no scale
  loads, 2 no decode arithmetic, 3 no store of the decoded tile, 4 no wgmma; 16 decodes with one
  scale group per thread.
* ``swap``: ``yᵀ = W · xᵀ`` with the decoded weights as wgmma's register operand (decoded
  straight into its layout, no shared-memory round trip), decoded by the MMA warps while the
  previous step's wgmma runs; the same 1-warp TMA loader. ``vec`` loads the packed bytes 16 at a
  time and regroups them within each quad of lanes.

Needs triton 3.6 (the device's; Gluon's API moves between releases) and, to run, an sm_90 GPU::

    python bench/gluon_mxfp4_probe.py --design swap --configs '[{}, {"block_k": 128}]' \\
        --tokens 530 896 --json out.json
    python bench/gluon_mxfp4_probe.py --design ws --compile '{"mode": 16}'   # no GPU needed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mxlora.mxfp4.triton_kernels import _bf16_decode_ptx  # noqa: E402

PTX = gl.constexpr(_bf16_decode_ptx())

#: gpt-oss-20b's expert projections, (out, in).
SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _tile(
    offsets_ptr, n_rows, n_experts, COLS,
    BLOCK_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    GROUP_M: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """This program's tile, as the Triton kernel schedules it: (has rows, expert, first row,
    the expert's row end, first column (the last tile moved back inside))."""
    pid = gl.program_id(0)
    n_m_tiles = gl.cdiv(n_rows, BLOCK_M) + n_experts
    per_group = GROUP_M * gl.cdiv(COLS, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = gl.minimum(n_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    e_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    experts = gl.arange(0, BLOCK_E, layout=e_layout)
    ends = gl.load(offsets_ptr + experts, mask=experts < n_experts, other=0).to(gl.int32)
    first = (experts > 0) & (experts < n_experts)
    starts = gl.load(offsets_ptr + experts - 1, mask=first, other=0).to(gl.int32)
    tiles = gl.cdiv(ends - starts, BLOCK_M)
    tile_end = gl.associative_scan(tiles, 0, _add)
    expert = gl.sum((tile_end <= pid_m).to(gl.int32), 0)
    mine = experts == expert
    first_tile = gl.sum(gl.where(mine, tile_end - tiles, 0), 0)
    row_end = gl.sum(gl.where(mine, ends, 0), 0)
    m0 = gl.sum(gl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    n0 = gl.minimum(pid_n * BLOCK_N, COLS - BLOCK_N)
    return pid_m < gl.sum(tiles, 0), expert, m0, row_end, n0


@gluon.jit
def _loader(
    x_desc, p_desc, x_bufs, p_bufs, load_ready, load_empty, row0, prow0, n_steps,
    BLOCK_K: gl.constexpr,
):  # fmt: skip
    """TMA the x tile and the packed bytes of each step into a ring of ``STAGES`` buffers."""
    S: gl.constexpr = x_bufs.type.shape[0]
    for i in range(n_steps):
        s = i % S
        mbarrier.wait(load_empty.index(s), ((i // S) & 1) ^ 1)
        bar = load_ready.index(s)
        mbarrier.expect(bar, x_desc.block_type.nbytes + p_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [row0, i * BLOCK_K], bar, x_bufs.index(s))
        tma.async_copy_global_to_shared(p_desc, [prow0, i * (BLOCK_K // 2)], bar, p_bufs.index(s))


@gluon.jit
def _scale_bits(scale):
    """e8m0 bytes to the bf16 bits of 2**(byte - 127) (byte 0: the subnormal 2**-127)."""
    s = scale.to(gl.int32)
    return gl.where(s == 0, 1 << 6, s << 7).to(gl.int16)


@gluon.jit
def _decode_ptx(packed, bits):
    return gl.inline_asm_elementwise(
        PTX, "=r,=r,=r,=r,r,r,r", [packed, bits], dtype=(gl.bfloat16, gl.bfloat16),
        is_pure=True, pack=4,
    )  # fmt: skip


# --- design "ws": decoder partition -> shared memory -> wgmma --------------------------------


@gluon.jit
def _ws_decoder(
    p_bufs, w_bufs, load_ready, load_empty, w_ready, w_empty, s_ptr, srow0, stride_so, n_steps,
    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, DEC_WARPS: gl.constexpr, MODE: gl.constexpr,
):  # fmt: skip
    S: gl.constexpr = p_bufs.type.shape[0]
    G: gl.constexpr = BLOCK_K // 32
    if MODE == 16:  # a thread holds one scale group's 16 bytes, one scale load each
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // G, G], [DEC_WARPS, 1], [1, 0])
        l3: gl.constexpr = gl.BlockedLayout(
            [1, 1, 16], [32 // G, G, 1], [DEC_WARPS, 1, 1], [2, 1, 0]
        )
        s_layout: gl.constexpr = gl.SliceLayout(2, l3)
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        cols = gl.arange(0, G, layout=gl.SliceLayout(0, s_layout))
    else:  # 4 bytes a thread, one scale load per byte
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [DEC_WARPS, 1], [1, 0])
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, layout)) // 16
    s_ptrs = s_ptr + (srow0 + rows).to(gl.int64)[:, None] * stride_so + cols[None, :]
    # The scale bytes are loaded two steps ahead.
    scale = gl.load(s_ptrs)
    following = gl.load(s_ptrs + G, mask=n_steps > 1, other=0)
    for i in range(n_steps):
        s = i % S
        ph = (i // S) & 1
        if MODE == 1:
            after = following
        else:
            after = gl.load(s_ptrs + (i + 2) * G, mask=i + 2 < n_steps, other=0)
        bits = _scale_bits(scale)
        if MODE == 16:
            bits = gl.expand_dims(bits, 2) + gl.zeros([BLOCK_N, G, 16], gl.int16, l3)
            bits = gl.convert_layout(gl.reshape(bits, [BLOCK_N, BLOCK_K // 2]), layout)
        mbarrier.wait(load_ready.index(s), ph)
        packed = p_bufs.index(s).load(layout)
        fence_async_shared()
        mbarrier.arrive(load_empty.index(s), count=1)
        if MODE == 2:
            low = packed.to(gl.bfloat16)
            high = bits.to(gl.bfloat16)
        else:
            low, high = _decode_ptx(packed, bits)
        w = gl.reshape(gl.join(low, high), [BLOCK_N, BLOCK_K])
        mbarrier.wait(w_empty.index(s), ph ^ 1)
        if MODE != 3:
            w_bufs.index(s).store(w)
        fence_async_shared()
        mbarrier.arrive(w_ready.index(s), count=1)
        scale = following
        following = after


@gluon.jit
def _ws_mma(
    x_bufs, w_bufs, load_ready, load_empty, w_ready, w_empty, y_ptr, stride_ym, m0, row_end, n0,
    COLS, n_steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
    MODE: gl.constexpr,
):  # fmt: skip
    S: gl.constexpr = x_bufs.type.shape[0]
    # wgmma n256 needs more registers than a partition gets: two n128 instructions instead.
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0],
        warps_per_cta=[num_warps, 1],
        instr_shape=[16, 128 if BLOCK_N > 128 else BLOCK_N, 16],
    )
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
    for i in range(n_steps):
        s = i % S
        ph = (i // S) & 1
        mbarrier.wait(load_ready.index(s), ph)
        mbarrier.wait(w_ready.index(s), ph)
        if MODE != 4:
            w = w_bufs.index(s).permute((1, 0))
            acc = warpgroup_mma(x_bufs.index(s), w, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # The previous step's wgmma is done: its buffers are free.
        previous = (i + S - 1) % S
        mbarrier.arrive(load_empty.index(previous), count=1, pred=i > 0)
        mbarrier.arrive(w_empty.index(previous), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    mask = (offs_m < row_end)[:, None] & (offs_n < COLS)[None, :]
    ptrs = y_ptr + offs_m.to(gl.int64)[:, None] * stride_ym + offs_n[None, :]
    gl.store(ptrs, acc.to(gl.bfloat16), mask=mask)


# --- design "swap": decoded weights as wgmma's register operand ------------------------------


@constexpr_function
def vec_layout(block_n, bytes_per_row, num_warps):
    """Bytes of a ``[block_n, bytes_per_row]`` tile, a quarter row contiguous per thread, with
    the rows per lane and warp of the wgmma operand's byte layout (regrouping stays in quads)."""

    def log2(v):
        return v.bit_length() - 1

    reg = [[0, 1 << i] for i in range(log2(bytes_per_row // 4))] + [[8, 0]]
    reg += [[16 * num_warps << i, 0] for i in range(log2(block_n // (16 * num_warps)))]
    lane = [[0, bytes_per_row // 4], [0, bytes_per_row // 2], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(log2(num_warps))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, bytes_per_row])


@gluon.jit
def _swap_decode(
    p_buf, scale, byte_layout: gl.constexpr, dot_layout: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, VEC: gl.constexpr, NUM_WARPS: gl.constexpr,
):  # fmt: skip
    """One step's weight tile decoded straight into the wgmma register-operand layout;
    ``scale`` one byte per row and group, in the layout that broadcasts to ``byte_layout``."""
    if VEC:
        v_layout: gl.constexpr = vec_layout(BLOCK_N, BLOCK_K // 2, NUM_WARPS)
        packed = gl.convert_layout(p_buf.load(v_layout), byte_layout)
    else:
        packed = p_buf.load(byte_layout)
    bits = gl.expand_dims(_scale_bits(scale), 2)
    l3: gl.constexpr = bits.type.layout
    bits = bits + gl.zeros([BLOCK_N, BLOCK_K // 32, 16], gl.int16, l3)
    bits = gl.reshape(bits, [BLOCK_N, BLOCK_K // 2])
    low, high = _decode_ptx(packed, gl.convert_layout(bits, byte_layout, assert_trivial=True))
    w = gl.reshape(gl.join(low, high), [BLOCK_N, BLOCK_K])
    return gl.convert_layout(w, dot_layout, assert_trivial=True)


@gluon.jit
def _swap_consumer(
    x_bufs, p_bufs, load_ready, load_empty, s_ptr, srow0, stride_so, y_ptr, stride_ym, m0,
    row_end, n0, COLS, n_steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, VEC: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    S: gl.constexpr = x_bufs.type.shape[0]
    G: gl.constexpr = BLOCK_K // 32
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    dot_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    # The layouts of the packed bytes (each byte is a bf16 pair of the operand) and of the
    # scale bytes (the byte layout with each group's 16 bytes reduced away), derived from it.
    pairs = gl.reshape(gl.zeros([BLOCK_N, BLOCK_K], gl.bfloat16, dot_layout), [BLOCK_N, G * 16, 2])
    low, _high = gl.split(pairs)
    byte_layout: gl.constexpr = low.type.layout
    per_group = gl.max(gl.reshape(low, [BLOCK_N, G, 16]), axis=2)
    s_layout: gl.constexpr = per_group.type.layout
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    groups = gl.arange(0, G, layout=gl.SliceLayout(0, s_layout))
    s_ptrs = s_ptr + (srow0 + rows).to(gl.int64)[:, None] * stride_so + groups[None, :]

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma_layout)
    scale = gl.load(s_ptrs + gl.minimum(1, n_steps - 1) * G)
    mbarrier.wait(load_ready.index(0), 0)
    w = _swap_decode(
        p_bufs.index(0), gl.load(s_ptrs), byte_layout, dot_layout, BLOCK_N, BLOCK_K, VEC,
        num_warps,
    )  # fmt: skip
    for i in range(n_steps):
        s = i % S
        acc = warpgroup_mma(w, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
        # The next step's tile is decoded while this step's wgmma runs (the last step decodes
        # its own tile again rather than branch).
        following = gl.minimum(i + 1, n_steps - 1)
        s1 = following % S
        scale_after = gl.load(s_ptrs + gl.minimum(i + 2, n_steps - 1) * G)
        mbarrier.wait(load_ready.index(s1), (following // S) & 1)
        w_next = _swap_decode(
            p_bufs.index(s1), scale, byte_layout, dot_layout, BLOCK_N, BLOCK_K, VEC, num_warps
        )
        acc, _done = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))
        mbarrier.arrive(load_empty.index(s), count=1)
        w = w_next
        scale = scale_after
    # acc is yᵀ: [weights (columns of y), rows of y].
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    mask = (offs_m < row_end)[None, :] & (offs_n < COLS)[:, None]
    ptrs = y_ptr + offs_m.to(gl.int64)[None, :] * stride_ym + offs_n[:, None]
    gl.store(ptrs, acc.to(gl.bfloat16), mask=mask)


@gluon.jit
def probe_kernel(
    x_desc, p_desc, s_ptr, y_ptr, offsets_ptr, n_rows, n_experts, RED, COLS, stride_ym, stride_so,
    BLOCK_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, DEC_WARPS: gl.constexpr,
    DEC_REGS: gl.constexpr, MODE: gl.constexpr, VEC: gl.constexpr, SWAP: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    """Either design (``SWAP``): the tile, the ring of loaded buffers, the partitions."""
    valid, expert, m0, row_end, n0 = _tile(
        offsets_ptr, n_rows, n_experts, COLS, BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M, num_warps
    )
    if valid:
        n_steps = gl.cdiv(RED, BLOCK_K)
        prow0 = expert * COLS + n0
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        p_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 2], p_desc.layout)
        load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        load_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        if SWAP:
            for i in gl.static_range(STAGES):
                mbarrier.init(load_ready.index(i), count=1)
                mbarrier.init(load_empty.index(i), count=1)
            gl.warp_specialize(
                [
                    (_swap_consumer, (x_bufs, p_bufs, load_ready, load_empty, s_ptr, prow0,
                                      stride_so, y_ptr, stride_ym, m0, row_end, n0, COLS,
                                      n_steps, BLOCK_M, BLOCK_N, BLOCK_K, VEC, num_warps)),
                    (_loader, (x_desc, p_desc, x_bufs, p_bufs, load_ready, load_empty, m0,
                               prow0, n_steps, BLOCK_K)),
                ],
                [1],
                [24],
            )  # fmt: skip
        else:
            w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
                [BLOCK_N, BLOCK_K], gl.bfloat16
            )
            w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, BLOCK_K], w_layout)
            w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            for i in gl.static_range(STAGES):
                mbarrier.init(load_ready.index(i), count=1)
                mbarrier.init(load_empty.index(i), count=2)  # the decoder and the wgmma
                mbarrier.init(w_ready.index(i), count=1)
                mbarrier.init(w_empty.index(i), count=1)
            gl.warp_specialize(
                [
                    (_ws_mma, (x_bufs, w_bufs, load_ready, load_empty, w_ready, w_empty, y_ptr,
                               stride_ym, m0, row_end, n0, COLS, n_steps, BLOCK_M, BLOCK_N,
                               num_warps, MODE)),
                    (_loader, (x_desc, p_desc, x_bufs, p_bufs, load_ready, load_empty, m0,
                               prow0, n_steps, BLOCK_K)),
                    (_ws_decoder, (p_bufs, w_bufs, load_ready, load_empty, w_ready, w_empty,
                                   s_ptr, prow0, stride_so, n_steps, BLOCK_N, BLOCK_K,
                                   DEC_WARPS, MODE)),
                ],
                [1, DEC_WARPS],
                [24, DEC_REGS],
            )  # fmt: skip


# --- host side ---------------------------------------------------------------------------------

DESIGNS = ("ws", "swap")
#: Defaults per design; a config overrides any of them.
DEFAULTS = {
    "ws": dict(block_m=128, block_n=128, block_k=64, group_m=8, stages=3, dec_warps=4,
               dec_regs=96, num_warps=4, mode=0, vec=False, maxnreg=None),
    "swap": dict(block_m=128, block_n=128, block_k=64, group_m=8, stages=4, dec_warps=0,
                 dec_regs=0, num_warps=8, mode=0, vec=False, maxnreg=None),
}  # fmt: skip


def _constexprs(design: str, c: dict) -> dict:
    return dict(SWAP=design == "swap",
        BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], GROUP_M=c["group_m"],
        STAGES=c["stages"], DEC_WARPS=c["dec_warps"], DEC_REGS=c["dec_regs"], MODE=c["mode"],
        VEC=c["vec"], num_warps=c["num_warps"],
    )  # fmt: skip


def _layouts(c: dict):
    x_layout = gl.NVMMASharedLayout.get_default_for([c["block_m"], c["block_k"]], gl.bfloat16)
    p_layout = gl.NVMMASharedLayout.get_default_for([c["block_n"], c["block_k"] // 2], gl.uint8)
    return x_layout, p_layout


def forward(design: str, x, blocks, scales, offsets, **config):
    """``y_e = x_e · W_eᵀ`` (bf16), ``blocks [E, out, in/32, 16]``, ``scales [E, out, in/32]``,
    ``offsets`` the int32 end of each expert's rows."""
    c = DEFAULTS[design] | config
    n_experts, out = blocks.shape[:2]
    red = x.shape[1]
    y = torch.empty(x.shape[0], out, device=x.device, dtype=x.dtype)
    x_layout, p_layout = _layouts(c)
    x_desc = TensorDescriptor.from_tensor(x, [c["block_m"], c["block_k"]], x_layout)
    packed = blocks.view(n_experts * out, red // 2)
    p_desc = TensorDescriptor.from_tensor(packed, [c["block_n"], c["block_k"] // 2], p_layout)
    s2 = scales.view(n_experts * out, red // 32)
    m_tiles = triton.cdiv(x.shape[0], c["block_m"]) + n_experts
    grid = (m_tiles * triton.cdiv(out, c["block_n"]),)
    extra = {} if c["maxnreg"] is None else {"maxnreg": c["maxnreg"]}
    probe_kernel[grid](
        x_desc, p_desc, s2, y, offsets, x.shape[0], n_experts, red, out, y.stride(0),
        s2.stride(0), BLOCK_E=triton.next_power_of_2(n_experts), **_constexprs(design, c), **extra,
    )  # fmt: skip
    return y


def compile_sm90(design: str, **config):
    """Compile for sm_90 without a GPU at gate_up's shapes; registers and spills from
    cuobjdump."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    c = DEFAULTS[design] | config
    x_layout, p_layout = _layouts(c)
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    signature = {
        "x_desc": f"tensordesc<bf16[{bm}, {bk}],{x_layout!r}>",
        "p_desc": f"tensordesc<u8[{bn}, {bk // 2}],{p_layout!r}>",
        "s_ptr": "*u8", "y_ptr": "*bf16", "offsets_ptr": "*i32", "n_rows": "i32",
        "n_experts": "i32", "RED": "i32", "COLS": "i32", "stride_ym": "i32", "stride_so": "i32",
    }  # fmt: skip
    constexprs = {"BLOCK_E": 32, **_constexprs(design, c)}
    signature |= dict.fromkeys(constexprs, "constexpr")
    options = {"num_warps": c["num_warps"]}
    if c["maxnreg"]:
        options["maxnreg"] = c["maxnreg"]
    source = GluonASTSource(probe_kernel, signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return {
        "registers": int(usage.split("REG:")[1].split()[0]),
        "spill_bytes": int(usage.split("STACK:")[1].split()[0]),
        "shared_bytes": compiled.metadata.shared,
    }


def bench(design: str, configs: list[dict], tokens: list[int]) -> dict:
    """Each config against the Triton kernel training runs and bf16 ``grouped_mm``, at
    gpt-oss-20b's shapes, rows routed top-4 of 32 by random logits (as bench/mxfp4_matmul.py);
    ``max_abs_diff`` against the Triton kernel (0: bit for bit)."""
    from mxlora.mxfp4.ops import _aten_grouped_mm, _dequantize_torch
    from mxlora.mxfp4.triton_kernels import grouped_mxfp4_matmul_triton

    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    result |= {"design": design, "configs": configs, "rows": []}
    for n_tokens in tokens:
        for projection, (out, inn) in SHAPES.items():
            e = 32
            blocks = torch.randint(
                0, 256, (e, out, inn // 32, 16), dtype=torch.uint8, device="cuda"
            )
            scales = torch.randint(118, 128, (e, out, inn // 32), dtype=torch.uint8, device="cuda")
            ids = torch.randn(n_tokens, e, device="cuda").topk(4, dim=-1).indices.reshape(-1)
            offsets = torch.bincount(ids, minlength=e).cumsum(0).to(torch.int32)
            x = torch.randn(ids.numel(), inn, device="cuda", dtype=torch.bfloat16)

            def current(x=x, blocks=blocks, scales=scales, offsets=offsets):
                return grouped_mxfp4_matmul_triton(x, blocks, scales, offsets, transpose=False)

            w = _dequantize_torch(blocks, scales, torch.bfloat16).transpose(-1, -2)
            reference = current()
            row = {
                "tokens": n_tokens,
                "projection": projection,
                "bf16_grouped_mm_ms": triton.testing.do_bench(
                    lambda x=x, w=w, offsets=offsets: _aten_grouped_mm(x, w, offsets)
                ),
                "triton_ms": triton.testing.do_bench(current),
                "configs": [],
            }
            for config in configs:
                try:
                    y = forward(design, x, blocks, scales, offsets, **config)
                    diff = (y.float() - reference.float()).abs().max().item()
                    ms = triton.testing.do_bench(
                        lambda x=x, b=blocks, s=scales, o=offsets, c=config: forward(
                            design, x, b, s, o, **c
                        )
                    )
                    row["configs"].append({"ms": ms, "max_abs_diff": diff})
                except Exception as exc:  # noqa: BLE001 (a config that cannot launch is a result)
                    row["configs"].append({"error": repr(exc)[:300]})
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--design", choices=DESIGNS, required=True)
    parser.add_argument("--configs", default="[{}]", help="JSON list of config overrides")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 530, 896])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--compile", metavar="CONFIG", help="compile this config for sm_90 only")
    args = parser.parse_args()
    if args.compile is not None:
        print(json.dumps(compile_sm90(args.design, **json.loads(args.compile))))
        return
    result = bench(args.design, json.loads(args.configs), args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
