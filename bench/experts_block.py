"""One MXFP4 experts layer of gpt-oss-20b, forward + backward, on the ``torch`` backend (what
ROCm, GPUs without Triton and CPUs run): the block differentiated by hand (what eager training
runs) against the same block composed of autograd-differentiated ops, without expert LoRA and
with the seed's (rank 8, alpha 16, fp32 factors, both projections).

Random MXFP4 weights at gpt-oss-20b's layer shapes (``--small``: the tiny model's, 4 experts of
64), rows routed top-k by random logits, bf16 on CUDA (fp32 on the CPU). Prints the median
milliseconds of ``--repeat`` forward + backward passes of each and, on CUDA, the kernels one
pass launches (``torch.profiler``)::

    python bench/experts_block.py --tokens 128 530 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mxlora.model.configs import gpt_oss_20b_config
from mxlora.mxfp4 import quantize_mxfp4
from mxlora.mxfp4.experts import Mxfp4Experts


def layer(device: torch.device, dtype: torch.dtype, small: bool) -> Mxfp4Experts:
    config = gpt_oss_20b_config()
    h, i, e = (64, 64, 4) if small else (config["hidden_size"], config["intermediate_size"], 32)
    gen = torch.Generator(device).manual_seed(0)
    gate_up = quantize_mxfp4(torch.randn(e, 2 * i, h, generator=gen, device=device) * 0.02)
    down = quantize_mxfp4(torch.randn(e, h, i, generator=gen, device=device) * 0.02)
    biases = [torch.randn(e, n, generator=gen, device=device).to(dtype) * 0.02 for n in (2 * i, h)]
    return Mxfp4Experts(
        *gate_up, biases[0], *down, biases[1], alpha=1.702, limit=7.0, backend="torch"
    )


def seed_lora(experts: Mxfp4Experts, rank: int = 8, alpha: int = 16) -> dict:
    """The ``lora`` argument of the experts' forward: fp32 factors needing gradients."""
    device = experts.down_proj_blocks.device
    gen = torch.Generator(device).manual_seed(2)
    lora = {}
    for proj in ("gate_up_proj", "down_proj"):
        n_in, n_out = experts.weight_spec(proj).shape[1:]
        lhs = torch.randn(experts.num_experts, n_in, rank, generator=gen, device=device) * 0.02
        rhs = torch.randn(experts.num_experts, rank, n_out, generator=gen, device=device) * 0.02
        lora[proj] = [(lhs.requires_grad_(), rhs.requires_grad_(), alpha / rank)]
    return lora


def pass_of(fn, experts: Mxfp4Experts, tokens: int, top_k: int, dtype: torch.dtype, lora):
    device = experts.down_proj_blocks.device
    gen = torch.Generator(device).manual_seed(1)
    logits = torch.randn(tokens, experts.num_experts, generator=gen, device=device)
    top, indices = logits.topk(top_k, dim=-1)
    weights = top.softmax(-1).to(dtype).requires_grad_()
    x = torch.randn(tokens, experts.hidden_size, generator=gen, device=device)
    x = x.to(dtype).requires_grad_()
    grad = torch.randn(tokens, experts.hidden_size, generator=gen, device=device).to(dtype)

    def one() -> None:
        fn(x, indices, weights, lora).backward(grad)

    return one


def timed(one, device: torch.device, repeat: int) -> float:
    for _ in range(3):
        one()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def launches(one) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 530, 8192])
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--small", action="store_true", help="the tiny model's layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    experts = layer(device, dtype, args.small)
    top_k = min(args.top_k, experts.num_experts)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {dtype}, experts layer fwd + bwd, torch backend")
    for tokens in args.tokens:
        for lora in (None, seed_lora(experts)):
            row = []
            for label, fn in (("by hand", experts), ("composed", experts.forward_composed)):
                one = pass_of(fn, experts, tokens, top_k, dtype, lora)
                text = f"{label} {timed(one, device, args.repeat):.3f} ms"
                if device.type == "cuda":
                    text += f" ({launches(one)} kernels)"
                row.append(text)
            print(f"{tokens} tokens, {'LoRA' if lora else 'no LoRA'}: " + ", ".join(row))


if __name__ == "__main__":
    main()
