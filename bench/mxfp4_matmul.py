"""Micro-benchmark of the frozen MXFP4 grouped matmul at gpt-oss-20b shapes (CUDA only).

For each expert projection (``gate_up_proj`` ``[2I, H]``, ``down_proj`` ``[H, I]``) and both
directions (forward ``x · Wᵀ``, input gradient ``dy · W``), over the rows one batch routes
(``--tokens`` tokens x top-4 of 32 experts, random router logits), times:

* ``default``: exactly what training runs at that size: the registered op
  ``mxlora::mxfp4_grouped_mm`` with the backend a module built on this GPU picks
  (:func:`mxlora.mxfp4.kernels.resolve_backend`: ``triton`` on CUDA >= 8.0, which then takes the
  fused kernel for few rows per expert and dequantize + ``grouped_mm`` for many);
* ``torch``: the op's no-Triton backend (whole projection dequantized by torch ops, compiled,
  then ``grouped_mm``), what CPUs, ROCm and older GPUs run;
* ``triton``: :func:`mxlora.mxfp4.triton_kernels.grouped_mxfp4_matmul_triton`, dequantization
  fused into the grouped GEMM, at every size (autotuned first, outside the timing);
* ``reference``: one expert dequantized to bf16 at a time, then a matmul;
* ``bf16_grouped_mm``: torch's grouped GEMM on weights dequantized to bf16 beforehand (what the
  seed's ``grouped_mm`` experts run; the same math without 4-bit weights, 3.8x their memory).

Also times the Triton dequantizer alone (effective bandwidth: packed bytes read + bf16 written).
Prints milliseconds and TFLOP/s (``2 · rows · in · out`` a call) and each method's largest error
relative to the largest bf16 ``grouped_mm`` output; ``--json`` also writes the rows
(``device``, ``tokens``, ``results``: ``projection``, ``direction``, ``method``, ``ms``, ...).

    python bench/mxfp4_matmul.py --tokens 8192 --json bench/results/mxfp4_matmul-8192.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mxlora.model.configs import gpt_oss_20b_config
from mxlora.mxfp4 import dequantize_mxfp4, ops, quantize_mxfp4
from mxlora.mxfp4.kernels import resolve_backend

METHODS = ("default", "torch", "triton", "reference", "bf16_grouped_mm")


def routed_counts(tokens: int, experts: int, top_k: int, device: str) -> tuple[int, ...]:
    """Rows per expert for ``tokens`` tokens routed to their top-k of random router logits."""
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    chosen = logits.topk(top_k, dim=-1).indices.flatten()
    return tuple(torch.bincount(chosen, minlength=experts).tolist())


def time_ms(fn: Callable[[], Tensor]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_projection(
    name: str, n_out: int, n_in: int, counts: tuple[int, ...], device: str
) -> tuple[list[dict], dict]:
    from mxlora.mxfp4.triton_kernels import dequantize_mxfp4_triton, grouped_mxfp4_matmul_triton

    gen = torch.Generator(device).manual_seed(1)
    experts, rows = len(counts), sum(counts)
    w = torch.randn(experts, n_out, n_in, generator=gen, device=device) * 0.02
    blocks, scales = quantize_mxfp4(w)
    del w
    dense = dequantize_mxfp4(blocks, scales, torch.bfloat16)  # [E, out, in], for grouped_mm only
    offsets = ops.offsets_from_counts(counts, device)
    backend = resolve_backend(device)
    results = []
    for transpose in (False, True):
        width = n_out if transpose else n_in
        x = torch.randn(rows, width, generator=gen, device=device).to(torch.bfloat16)
        calls = {
            "default": lambda x=x, t=transpose: ops.mxfp4_grouped_mm(
                x, blocks, scales, offsets, t, backend
            ),
            "torch": lambda x=x, t=transpose: ops.mxfp4_grouped_mm(
                x, blocks, scales, offsets, t, "torch"
            ),
            "triton": lambda x=x, t=transpose: grouped_mxfp4_matmul_triton(
                x, blocks, scales, offsets, transpose=t
            ),
            "reference": lambda x=x, t=transpose: ops.grouped_mxfp4_matmul_reference(
                x, blocks, scales, counts, transpose=t
            ),
            "bf16_grouped_mm": lambda x=x, t=transpose: ops._aten_grouped_mm(
                x, dense if t else dense.transpose(-1, -2), offsets
            ),
        }
        outputs = {method: fn() for method, fn in calls.items()}  # also autotunes / compiles
        truth = outputs["bf16_grouped_mm"].float()
        flops = 2 * rows * n_in * n_out
        for method, fn in calls.items():
            ms = time_ms(fn)
            error = ((outputs[method].float() - truth).abs().max() / truth.abs().max()).item()
            results.append(
                dict(
                    projection=name,
                    direction="input_grad" if transpose else "forward",
                    method=method,
                    rows=rows,
                    n_in=n_in,
                    n_out=n_out,
                    ms=ms,
                    tflops=flops / ms / 1e9,
                    max_rel_error=error,
                    default_path=(
                        ("dequantize+grouped_mm" if ops.uses_dense_path(x, experts) else "fused")
                        if backend == "triton"
                        else backend
                    ),
                )
            )
    ms = time_ms(lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16))
    moved = blocks.numel() + scales.numel() + 2 * dense.numel()
    dequantize = dict(projection=name, ms=ms, effective_gb_per_s=moved / ms / 1e6)
    return results, dequantize


def run(tokens: int) -> tuple[list[dict], list[dict]]:
    """Benchmark both projections and directions at gpt-oss-20b shapes on the current GPU."""
    config = gpt_oss_20b_config()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    counts = routed_counts(
        tokens, config["num_local_experts"], config["num_experts_per_tok"], "cuda"
    )
    results, dequantize = [], []
    for name, n_out, n_in in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
        rows, deq = bench_projection(name, n_out, n_in, counts, "cuda")
        results += rows
        dequantize.append(deq)
    return results, dequantize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a batch (4 x 2048)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("mxfp4_matmul: needs a CUDA GPU", file=sys.stderr)
        return 2
    results, dequantize = run(args.tokens)
    device = torch.cuda.get_device_name()
    print(f"{device}, {args.tokens} tokens x top-4")
    print(f"{'projection':13} {'direction':10} {'method':16} {'ms':>8} {'TFLOP/s':>8} {'err':>9}")
    for r in results:
        print(
            f"{r['projection']:13} {r['direction']:10} {r['method']:16} "
            f"{r['ms']:8.3f} {r['tflops']:8.1f} {r['max_rel_error']:9.2e}"
        )
    for d in dequantize:
        print(f"dequantize {d['projection']}: {d['ms']:.3f} ms, {d['effective_gb_per_s']:.0f} GB/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(
            device=device,
            tokens=args.tokens,
            fused_max_rows_per_expert=ops.FUSED_MAX_ROWS_PER_EXPERT,
            results=results,
            dequantize=dequantize,
        )
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
