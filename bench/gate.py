"""Micro-benchmark of gpt-oss's expert gate (bias + clamped SwiGLU), forward + backward (CUDA).

At gpt-oss-20b's width (``I = 2880``) for the rows one batch routes (``--tokens`` x top-4), times
transformers' formula in eager torch (what the ``torch`` backend runs), the same under
``torch.compile`` (what compiled decoder blocks would fuse it into) and the registered op
``mxlora::gpt_oss_gate`` (one Triton kernel each way, the ``triton`` backend)::

    python bench/gate.py --tokens 896 8192
"""

from __future__ import annotations

import argparse
import sys

import torch

from mxlora.mxfp4.gate import fused_gate, gate_reference

ALPHA, LIMIT, EXPERTS, INTER = 1.702, 7.0, 32, 2880


def run(tokens: int) -> dict[str, float]:
    """Median milliseconds of forward + backward per implementation at ``tokens`` tokens."""
    from triton.testing import do_bench

    rows = tokens * 4
    gen = torch.Generator("cuda").manual_seed(0)
    gate_up = (torch.randn(rows, 2 * INTER, generator=gen, device="cuda") * 4).bfloat16()
    bias = torch.randn(EXPERTS, 2 * INTER, generator=gen, device="cuda").bfloat16()
    expert_ids = torch.sort(torch.randint(0, EXPERTS, (rows,), device="cuda")).values
    grad = torch.randn(rows, INTER, generator=gen, device="cuda").bfloat16()
    x = gate_up.clone().requires_grad_()
    compiled = torch.compile(gate_reference)
    times = {}
    for name, fn in (("eager", gate_reference), ("compiled", compiled), ("fused", fused_gate)):

        def step(fn=fn):
            x.grad = None
            fn(x, bias, expert_ids, ALPHA, LIMIT).backward(grad)

        step()
        times[name] = do_bench(step, warmup=25, rep=200, return_mode="median")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[896, 8192])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gate: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name())
    for tokens in args.tokens:
        times = run(tokens)
        print(f"{tokens} tokens: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
