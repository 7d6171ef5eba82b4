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
  fused into the grouped GEMM, at every size (the training config for the size class);
* ``reference``: one expert dequantized to bf16 at a time, then a matmul;
* ``bf16_grouped_mm``: torch's grouped GEMM on weights dequantized to bf16 beforehand (what the
  seed's ``grouped_mm`` experts run; the same math without 4-bit weights, 3.8x their memory);
* ``triton_kernels`` (forward only, and only where the package imports): OpenAI's
  ``triton_kernels.matmul_ogs``, the MXFP4 MoE matmul vLLM runs for gpt-oss, its weights in the
  layouts it picks for this GPU and its own tile flags, on the same rows already grouped by expert.
  A maintained kernel to measure ours against, not one training can use: it takes the scales
  along the reduction axis only, so it has no input gradient (``dy · W`` reduces over ``out``).
  Not a dependency; put it on ``PYTHONPATH`` (triton's ``python/triton_kernels`` at the installed
  triton's release, or the copy vLLM ships as ``vllm/third_party/triton_kernels``).

Also times the Triton dequantizer alone (effective bandwidth: packed bytes read + bf16 written)
and checks it decodes every code under every finite scale bit for bit (its bf16 arithmetic runs
on the GPU only). Prints milliseconds and TFLOP/s (``2 · rows · in · out`` a call) and each
method's largest error relative to the largest bf16 ``grouped_mm`` output; ``--json`` also
writes the rows (``device``, ``tokens``, ``results``: ``projection``, ``direction``, ``method``,
``ms``, ...), ``--json-dir`` one such file per ``--tokens`` value.

``--configs`` also times the fused kernel at each fixed tile config of
:data:`mxlora.mxfp4.triton_kernels.CONFIGS` (what ``TRAINING_CONFIGS`` is chosen from) beside bf16
``grouped_mm``, and prints one line per config with its time on each projection and direction
and the sum of the four over bf16's sum: the table the small-M default is chosen from.
``--compile-jobs N`` compiles every config first in N processes (Triton compiles serially).

    python bench/mxfp4_matmul.py --tokens 8192 --json bench/results/mxfp4_matmul-8192.json
    python bench/mxfp4_matmul.py --tokens 530 1536 8192 --methods default,bf16_grouped_mm \
        --configs --compile-jobs 12 --json-dir OUT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mxlora.model.configs import gpt_oss_20b_config
from mxlora.mxfp4 import dequantize_mxfp4, ops, quantize_mxfp4
from mxlora.mxfp4.kernels import resolve_backend

METHODS = ("default", "torch", "triton", "reference", "bf16_grouped_mm")
#: Methods timed only when asked for (``--methods``): another package's kernel.
EXTERNAL_METHODS = ("triton_kernels",)
#: Where it runs (a module constant so that a CPU test can run its logic in Triton's interpreter).
DEVICE = "cuda"


def routed_counts(tokens: int, experts: int, top_k: int, device: str) -> tuple[int, ...]:
    """Rows per expert for ``tokens`` tokens routed to their top-k of random router logits."""
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    chosen = logits.topk(top_k, dim=-1).indices.flatten()
    return tuple(torch.bincount(chosen, minlength=experts).tolist())


def time_ms(fn: Callable[[], Tensor], quick: bool = False) -> float:
    from triton.testing import do_bench

    if quick:  # the per-config sweep: many timings, each a sub-millisecond kernel
        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def projection_shapes() -> tuple[tuple[str, int, int], ...]:
    """``(name, out, in)`` of gpt-oss-20b's two expert projections."""
    config = gpt_oss_20b_config()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter))


def batch_counts(tokens: int, device: str) -> tuple[int, ...]:
    config = gpt_oss_20b_config()
    return routed_counts(tokens, config["num_local_experts"], config["num_experts_per_tok"], device)


def triton_kernels_forward(
    x: Tensor, blocks: Tensor, scales: Tensor, counts: tuple[int, ...]
) -> tuple[Callable[[], Tensor], str]:
    """``x · Wᵀ`` by ``triton_kernels.matmul_ogs`` as vLLM sets it up for gpt-oss on this GPU
    (weights and scales converted to the library's default layouts, rows grouped by expert, no
    gather or scatter), and the tile flags it chose."""
    from triton_kernels.matmul_ogs import PrecisionConfig, matmul_ogs
    from triton_kernels.matmul_ogs_details.opt_flags import make_opt_flags
    from triton_kernels.routing import RoutingData, compute_expt_data
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details import layout

    experts, n_out = blocks.shape[:2]
    # The Hub's [E, out, in/32, 16] bytes as the library's [E, in, out] FP4 (packed along in).
    values = wrap_torch_tensor(blocks.view(experts, n_out, -1).transpose(-2, -1), dtype=FP4)
    value_layout, value_options = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    scale_layout, scale_options = layout.make_default_matmul_mxfp4_w_scale_layout(
        mx_axis=1, num_warps=8
    )
    w = convert_layout(values, value_layout, **value_options)
    w_scale = convert_layout(
        wrap_torch_tensor(scales.transpose(-2, -1)), scale_layout, **scale_options
    )
    hist = torch.tensor(counts, dtype=torch.int32, device=x.device)
    routing = RoutingData(None, hist, experts, 1, compute_expt_data(hist, experts, x.shape[0]))
    precision = PrecisionConfig(weight_scale=w_scale)
    flags = make_opt_flags(
        x.dtype, x.dtype, FP4, precision, x.shape[0], n_out, x.shape[1], routing,
        False, False, None,
    )  # fmt: skip
    return (lambda: matmul_ogs(x, w, None, routing, precision_config=precision)), str(flags)


def bench_projection(
    name: str,
    n_out: int,
    n_in: int,
    counts: tuple[int, ...],
    device: str,
    methods: tuple[str, ...] = METHODS,
    configs: bool = False,
) -> tuple[list[dict], dict, list[dict]]:
    from mxlora.mxfp4.triton_kernels import (
        CONFIGS,
        DEQUANTIZE_CONFIGS,
        dequantize_mxfp4_triton,
        grouped_mxfp4_matmul_triton,
    )

    gen = torch.Generator(device).manual_seed(1)
    experts, rows = len(counts), sum(counts)
    w = torch.randn(experts, n_out, n_in, generator=gen, device=device) * 0.02
    blocks, scales = quantize_mxfp4(w)
    del w
    dense = dequantize_mxfp4(blocks, scales, torch.bfloat16)  # [E, out, in], for grouped_mm only
    offsets = ops.offsets_from_counts(counts, device)
    backend = resolve_backend(device)
    results, per_config = [], []
    for transpose in (False, True):
        width = n_out if transpose else n_in
        x = torch.randn(rows, width, generator=gen, device=device).to(torch.bfloat16)
        bf16 = dense if transpose else dense.transpose(-1, -2)
        truth = ops._aten_grouped_mm(x, bf16, offsets).float()
        direction = "input_grad" if transpose else "forward"
        if configs:
            bf16_ms = time_ms(lambda x=x, b=bf16: ops._aten_grouped_mm(x, b, offsets), quick=True)
            for index, config in enumerate(CONFIGS):

                def fused(x=x, t=transpose, c=config) -> Tensor:
                    return grouped_mxfp4_matmul_triton(
                        x, blocks, scales, offsets, transpose=t, config=c
                    )

                error = ((fused().float() - truth).abs().max() / truth.abs().max()).item()
                ms = time_ms(fused, quick=True)
                per_config.append(
                    dict(projection=name, direction=direction, config=index, rows=rows, ms=ms,
                         bf16_ms=bf16_ms, max_rel_error=error)
                )  # fmt: skip
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
            "bf16_grouped_mm": lambda x=x, b=bf16: ops._aten_grouped_mm(x, b, offsets),
        }
        notes = {}
        if "triton_kernels" in methods and not transpose:
            calls["triton_kernels"], notes["triton_kernels"] = triton_kernels_forward(
                x, blocks, scales, counts
            )
        calls = {method: calls[method] for method in methods if method in calls}
        outputs = {method: fn() for method, fn in calls.items()}  # also compiles
        flops = 2 * rows * n_in * n_out
        for method, fn in calls.items():
            ms = time_ms(fn)
            error = ((outputs[method].float() - truth).abs().max() / truth.abs().max()).item()
            results.append(
                dict(
                    projection=name,
                    direction=direction,
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
                    **({"flags": notes[method]} if method in notes else {}),
                )
            )
    ms = time_ms(lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16))
    moved = blocks.numel() + scales.numel() + 2 * dense.numel()
    dequantize = dict(projection=name, ms=ms, effective_gb_per_s=moved / ms / 1e6)
    if configs:
        for tile in DEQUANTIZE_CONFIGS:
            ms = time_ms(lambda t=tile: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16, t))
            dequantize[f"config {tile}"] = round(moved / ms / 1e6)
    return results, dequantize, per_config


def run(
    tokens: int, methods: tuple[str, ...] = METHODS, configs: bool = False
) -> tuple[list[dict], list[dict], list[dict]]:
    """Benchmark both projections and directions at gpt-oss-20b shapes on the current GPU."""
    counts = batch_counts(tokens, DEVICE)
    results, dequantize, per_config = [], [], []
    for name, n_out, n_in in projection_shapes():
        rows, deq, swept = bench_projection(name, n_out, n_in, counts, DEVICE, methods, configs)
        results += rows
        dequantize.append(deq)
        per_config += [dict(tokens=tokens, **r) for r in swept]
    return results, dequantize, per_config


def dequantizer_exact() -> bool:
    """Whether the Triton dequantizer decodes every byte under every scale byte but 255 (the
    NaN encoding) bit for bit as the reference, in bf16."""
    from mxlora.mxfp4.triton_kernels import dequantize_mxfp4_triton

    blocks = torch.arange(256, dtype=torch.uint8, device=DEVICE).view(16, 16).repeat(255, 1, 1)
    scales = torch.arange(255, device=DEVICE).to(torch.uint8)[:, None].repeat(1, 16)
    expected = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    return torch.equal(dequantize_mxfp4_triton(blocks, scales, torch.bfloat16), expected)


def _compile_one(job: tuple[int, int | None, str, bool]) -> None:
    """Compile (by launching once) config ``index`` for one shape, or with ``index`` None the
    dequantizer (each of its configs), in a child process: the compiled kernels land in
    Triton's on-disk cache, where the parent then finds them."""
    from mxlora.mxfp4.triton_kernels import (
        CONFIGS,
        DEQUANTIZE_CONFIGS,
        dequantize_mxfp4_triton,
        grouped_mxfp4_matmul_triton,
    )

    tokens, index, name, transpose = job
    counts = batch_counts(tokens, DEVICE)
    _, n_out, n_in = next(p for p in projection_shapes() if p[0] == name)
    blocks = torch.zeros(len(counts), n_out, n_in // 32, 16, dtype=torch.uint8, device=DEVICE)
    scales = torch.zeros(len(counts), n_out, n_in // 32, dtype=torch.uint8, device=DEVICE)
    x = torch.zeros(sum(counts), n_out if transpose else n_in, dtype=torch.bfloat16, device=DEVICE)
    offsets = ops.offsets_from_counts(counts, DEVICE)
    if index is None:
        for tile in DEQUANTIZE_CONFIGS:
            dequantize_mxfp4_triton(blocks, scales, torch.bfloat16, tile)
    else:
        grouped_mxfp4_matmul_triton(
            x, blocks, scales, offsets, transpose=transpose, config=CONFIGS[index]
        )
    torch.cuda.synchronize()


def precompile(tokens: list[int], jobs: int) -> None:
    """Compile every config for every shape the sweep launches, and the dequantizer, in ``jobs``
    processes."""
    from mxlora.mxfp4.triton_kernels import CONFIGS

    # Projections outermost: shapes that specialize alike (gpt-oss-20b's two projections) then
    # find the first one's kernels in the cache instead of compiling them again side by side.
    work = [(tokens[0], None, name, False) for name, _, _ in projection_shapes()]
    work += [
        (t, i, name, transpose)
        for name, _, _ in projection_shapes()
        for t in tokens
        for i in range(len(CONFIGS))
        for transpose in (False, True)
    ]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_compile_one, work, chunksize=1)


def config_label(config) -> str:
    """A config in one short line: tile sizes, warps, stages, variant."""
    return (
        f"m{config.block_m} n{config.block_n} k{config.block_k} g{config.group_m} "
        f"w{config.num_warps} s{config.num_stages}{' swap' if config.swap else ''}"
    )


def print_configs(per_config: list[dict]) -> None:
    """One line per config: ms on each (projection, direction), and sum / bf16's sum."""
    from mxlora.mxfp4.triton_kernels import CONFIGS

    for tokens in sorted({r["tokens"] for r in per_config}):
        rows = [r for r in per_config if r["tokens"] == tokens]
        shapes = list(dict.fromkeys((r["projection"], r["direction"]) for r in rows))
        bf16 = {(r["projection"], r["direction"]): r["bf16_ms"] for r in rows}
        print(f"\nfused kernel per config, {tokens} tokens (ms; bf16 grouped_mm first)")
        head = " ".join(f"{p[:7]}/{d[:3]:>3}" for p, d in shapes)
        print(f"{'config':62} {head}  sum/bf16  max_err")
        print(f"{'bf16_grouped_mm':62} " + " ".join(f"{bf16[s]:11.3f}" for s in shapes))
        best = {}
        for index, config in enumerate(CONFIGS):
            mine = {(r["projection"], r["direction"]): r for r in rows if r["config"] == index}
            ratio = sum(mine[s]["ms"] for s in shapes) / sum(bf16.values())
            error = max(mine[s]["max_rel_error"] for s in shapes)
            label = config_label(config)
            times = " ".join(f"{mine[s]['ms']:11.3f}" for s in shapes)
            print(f"{index:2d} {label:59} {times}  {ratio:8.3f}  {error:7.1e}")
            for s in shapes:
                if s not in best or mine[s]["ms"] < best[s][1]:
                    best[s] = (index, mine[s]["ms"])
        for s in shapes:
            index, ms = best[s]
            print(f"best {s[0]} {s[1]}: config {index}, {ms:.3f} ms = {ms / bf16[s]:.3f} x bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[8192], help="tokens a batch (4 x 2048)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here (one --tokens)")
    parser.add_argument("--json-dir", type=Path, help="write mxfp4_matmul-<tokens>.json here")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--configs", action="store_true", help="time every fused tile config")
    parser.add_argument("--compile-jobs", type=int, default=0, help="compile in N processes first")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := set(methods) - set(METHODS + EXTERNAL_METHODS):
        expected = METHODS + EXTERNAL_METHODS
        parser.error(f"--methods: unknown {sorted(unknown)}; expected some of {expected}")
    if "triton_kernels" in methods:
        try:
            import triton_kernels  # noqa: F401
        except ImportError:
            parser.error("--methods triton_kernels: the triton_kernels package is not importable")
    if args.json and len(args.tokens) != 1:
        parser.error("--json takes one --tokens value; use --json-dir for several")
    if not torch.cuda.is_available():
        print("mxfp4_matmul: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    if args.compile_jobs:
        precompile(args.tokens, args.compile_jobs)
    print(f"{device}: Triton dequantizer bit-exact in bf16: {dequantizer_exact()}")
    per_config = []
    for tokens in args.tokens:
        results, dequantize, swept = run(tokens, methods, args.configs)
        per_config += swept
        print(f"\n{device}, {tokens} tokens x top-4")
        print(
            f"{'projection':13} {'direction':10} {'method':16} {'ms':>8} {'TFLOP/s':>8} {'err':>9}"
        )
        for r in results:
            print(
                f"{r['projection']:13} {r['direction']:10} {r['method']:16} "
                f"{r['ms']:8.3f} {r['tflops']:8.1f} {r['max_rel_error']:9.2e}"
            )
        bf16 = {(r["projection"], r["direction"]): r["ms"] for r in results
                if r["method"] == "bf16_grouped_mm"}  # fmt: skip
        for r in results:
            if r["method"] == "default" and bf16:
                ratio = r["ms"] / bf16[r["projection"], r["direction"]]
                print(f"default / bf16 {r['projection']} {r['direction']}: {ratio:.3f}")
        for d in dequantize:
            print(
                f"dequantize {d['projection']}: {d['ms']:.3f} ms, {d['effective_gb_per_s']:.0f} GB/s"
            )
            print(
                "  " + ", ".join(f"{k}: {v} GB/s" for k, v in d.items() if k.startswith("config"))
            )
        payload = dict(
            device=device,
            tokens=tokens,
            fused_max_rows_per_expert=ops.FUSED_MAX_ROWS_PER_EXPERT,
            results=results,
            dequantize=dequantize,
        )
        paths = [args.json] if args.json else []
        if args.json_dir:
            paths.append(args.json_dir / f"mxfp4_matmul-{tokens}.json")
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2) + "\n")
    if per_config:
        print_configs(per_config)
        if args.json_dir:
            from mxlora.mxfp4.triton_kernels import CONFIGS

            payload = dict(device=device, configs=[str(c) for c in CONFIGS], results=per_config)
            path = args.json_dir / "mxfp4_matmul-configs.json"
            path.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
