"""Micro-benchmark of the frozen MXFP4 grouped matmul at gpt-oss-20b shapes (CUDA only).

For each expert projection (``gate_up_proj`` ``[2I, H]``, ``down_proj`` ``[H, I]``) and both
directions (forward ``x · Wᵀ``, input gradient ``dy · W``), over the rows one batch routes
(``--tokens`` tokens x top-4 of 32 experts, random router logits), times:

* ``triton``: :func:`mxlora.mxfp4.triton_kernels.grouped_mxfp4_matmul_triton`, dequantization
  fused into the grouped GEMM (autotuned first, outside the timing);
* ``reference``: :func:`mxlora.mxfp4.experts.grouped_mxfp4_matmul_reference`, one expert
  dequantized to bf16 at a time, then a matmul;
* ``bf16_grouped_mm``: torch's grouped GEMM on weights dequantized to bf16 beforehand (what the
  seed's ``grouped_mm`` experts run; the same math without 4-bit weights, 3.8x their memory).

Prints milliseconds and TFLOP/s (``2 · rows · in · out`` a call) and the triton result's largest
error relative to the largest bf16 output; ``--json`` also writes the rows.

    python bench/mxfp4_matmul.py --tokens 8192 --json bench/results/mxfp4_matmul.json
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
from mxlora.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from mxlora.mxfp4.experts import grouped_mxfp4_matmul_reference

METHODS = ("triton", "reference", "bf16_grouped_mm")


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """torch's grouped GEMM ``x_e @ w[e]`` (public from torch 2.10, private before)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


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
) -> list[dict]:
    from mxlora.mxfp4.triton_kernels import grouped_mxfp4_matmul_triton

    gen = torch.Generator(device).manual_seed(1)
    experts, rows = len(counts), sum(counts)
    w = torch.randn(experts, n_out, n_in, generator=gen, device=device) * 0.02
    blocks, scales = quantize_mxfp4(w)
    del w
    dense = dequantize_mxfp4(blocks, scales, torch.bfloat16)  # [E, out, in], for grouped_mm only
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    results = []
    for transpose in (False, True):
        width = n_out if transpose else n_in
        x = torch.randn(rows, width, generator=gen, device=device).to(torch.bfloat16)
        calls = {
            "triton": lambda x=x, t=transpose: grouped_mxfp4_matmul_triton(
                x, blocks, scales, counts, transpose=t
            ),
            "reference": lambda x=x, t=transpose: grouped_mxfp4_matmul_reference(
                x, blocks, scales, counts, transpose=t
            ),
            "bf16_grouped_mm": lambda x=x, t=transpose: grouped_mm(
                x, dense if t else dense.transpose(-1, -2), offsets
            ),
        }
        outputs = {method: fn() for method, fn in calls.items()}  # also autotunes the kernel
        truth = outputs["bf16_grouped_mm"].float()
        error = ((outputs["triton"].float() - truth).abs().max() / truth.abs().max()).item()
        flops = 2 * rows * n_in * n_out
        for method, fn in calls.items():
            ms = time_ms(fn)
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
                    triton_max_rel_error=error,
                )
            )
    return results


def run(tokens: int) -> list[dict]:
    """Benchmark both projections and directions at gpt-oss-20b shapes on the current GPU."""
    config = gpt_oss_20b_config()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    counts = routed_counts(
        tokens, config["num_local_experts"], config["num_experts_per_tok"], "cuda"
    )
    results = bench_projection("gate_up_proj", 2 * inter, hidden, counts, "cuda")
    results += bench_projection("down_proj", hidden, inter, counts, "cuda")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a batch (4 x 2048)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("mxfp4_matmul: needs a CUDA GPU", file=sys.stderr)
        return 2
    results = run(args.tokens)
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens x top-4")
    print(f"{'projection':13} {'direction':10} {'method':16} {'ms':>8} {'TFLOP/s':>8}")
    for r in results:
        print(
            f"{r['projection']:13} {r['direction']:10} {r['method']:16} "
            f"{r['ms']:8.3f} {r['tflops']:8.1f}"
        )
    errors = {(r["projection"], r["direction"]): r["triton_max_rel_error"] for r in results}
    print(
        "triton max |error| / max |bf16 grouped_mm|:",
        {"/".join(k): f"{v:.2e}" for k, v in errors.items()},
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                dict(device=torch.cuda.get_device_name(), tokens=args.tokens, results=results),
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
