"""Runs mxlora's Triton kernel in Triton's CPU interpreter for tests/test_mxfp4_triton.py.

``python tests/mxfp4_triton_worker.py JOBS.pt RESULTS.pt``. The interpreter must be chosen before
Triton is imported (``triton.jit`` decides at decoration), and once chosen it holds for the whole
process: so the tests run it here, in a process of its own, rather than in a pytest worker that
other tests share. ``JOBS.pt`` holds the inputs (built and checked by the test module); this
script only computes and saves the kernel's outputs.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("MXLORA_KERNELS", None)

import torch  # noqa: E402

from mxlora.mxfp4.kernels import KERNELS_ENV, kernel_available, resolve_backend  # noqa: E402
from mxlora.mxfp4.ops import mxfp4_grouped_mm, offsets_from_counts  # noqa: E402
from mxlora.mxfp4.triton_kernels import (  # noqa: E402
    INTERPRETED,
    dequantize_mxfp4_triton,
    grouped_mxfp4_matmul_triton,
)


def matmul(job: dict) -> torch.Tensor:
    if job.get("poison"):
        # The output's allocation is likely to reuse this freed one: rows the kernel leaves
        # unwritten would read NaN.
        cols = job["blocks"].shape[2] * 32 if job["transpose"] else job["blocks"].shape[1]
        torch.full((job["x"].shape[0], cols), float("nan"), dtype=job["x"].dtype)
    return grouped_mxfp4_matmul_triton(
        job["x"],
        job["blocks"],
        job["scales"],
        offsets_from_counts(job["counts"], "cpu"),
        transpose=job["transpose"],
        config=job["config"],
        split=job.get("split"),
    )


def autograd(job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered op forward and backward with the backend detected here (the kernel)."""
    x = job["x"].clone().requires_grad_()
    offsets = offsets_from_counts(job["counts"], "cpu")
    backend = resolve_backend("cpu")
    y = mxfp4_grouped_mm(x, job["blocks"], job["scales"], offsets, False, backend)
    y.backward(job["dy"])
    return y.detach(), x.grad


def dequantize(job: dict) -> torch.Tensor:
    return dequantize_mxfp4_triton(job["blocks"], job["scales"], job["dtype"])


def layer(job: dict):
    """The experts layer with LoRA (tests/test_mxfp4_experts.py's pair), forward and backward."""
    from mxlora.mxfp4.experts import padding_skipped
    from test_mxfp4_experts import make_pair, run

    _, mine = make_pair(k=job["k"])
    if "padding_from" not in job:
        return run(mine, job["x"], job["indices"], job["weights"], job["grad_out"])
    with padding_skipped(mine, torch.tensor(job["padding_from"])):
        return run(mine, job["x"], job["indices"], job["weights"], job["grad_out"])


def gate(job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered gate op (the Triton kernels here), forward and its gradient."""
    from mxlora.mxfp4.gate import fused_gate

    gate_up = job["gate_up"].clone().requires_grad_()
    out = fused_gate(gate_up, job["bias"], job["expert_ids"], job["alpha"], job["limit"])
    out.backward(job["grad"])
    return out.detach(), gate_up.grad


def combine(job: dict) -> tuple[torch.Tensor, ...]:
    """The registered combine op (the Triton kernels here): output, then the gradients of the
    rows and (when weighted) of the weights."""
    from mxlora.mxfp4.combine import fused_combine

    src = job["src"].clone().requires_grad_()
    weights = None if job["weights"] is None else job["weights"].clone().requires_grad_()
    out = fused_combine(src, weights, job["index"])
    out.backward(job["grad"])
    return out.detach(), src.grad, None if weights is None else weights.grad


def rotary(job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered rotary op (the Triton kernels here) on a view of a projection's output:
    the rotated heads and the projection's gradient."""
    from mxlora.engine.rotary import fused_rotary

    projected = job["projected"].clone().requires_grad_()
    tokens, heads = projected.shape[1], job["heads"]
    x = projected.view(1, tokens, heads, -1).transpose(1, 2)
    out = fused_rotary(x, job["cos"], job["sin"])
    out.backward(job["grad"])
    return out.detach(), projected.grad


def norm(job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered RMSNorm op (the Triton kernels here), forward and its input gradient."""
    from mxlora.engine.norm import fused_rms_norm

    x = job["x"].clone().requires_grad_()
    out = fused_rms_norm(x, job["weight"], job["eps"])
    out.backward(job["grad"])
    return out.detach(), x.grad


def cross_entropy(job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's row op with the Triton backend: per-row losses, and the logits overwritten by
    their gradient."""
    from mxlora.engine.loss import cross_entropy_rows_

    logits = job["logits"].clone()
    return cross_entropy_rows_(logits, job["targets"], "triton"), logits


def loop_step(job: dict) -> dict:
    """The engine's packed micro-step (forward, loss, backward) on a tiny model with the Triton
    kernels, the padding computed and then skipped as the loop skips it; the rows each frozen
    matmul took and where its experts' rows ended."""
    from mxlora.config import ExpertTargets, LoraConfig, ModelConfig
    from mxlora.engine.attention import register
    from mxlora.engine.loop import forward_loss
    from mxlora.model.load import load_weights
    from mxlora.model.lora import apply_lora
    from mxlora.mxfp4 import experts

    spec = ModelConfig(name_or_path="tiny:layers=1", experts="mxfp4", dtype="float32")
    torch.manual_seed(0)
    model = apply_lora(load_weights(spec, "cpu"), LoraConfig(experts=ExpertTargets(layers=[0])))
    lm = model.get_base_model()
    lm.set_attn_implementation(register())
    params = [p for p in model.parameters() if p.requires_grad]
    batch, seen = job["batch"], []
    matmul = experts.frozen_mxfp4_matmul

    def spy(x, blocks, scales, offsets, *args):
        seen.append((x.shape[0], int(offsets[-1])))
        return matmul(x, blocks, scales, offsets, *args)

    experts.frozen_mxfp4_matmul = spy
    out = {}
    for name in ("computed", "skipped"):
        for p in params:
            p.grad = None
        seen.clear()
        skip = name == "skipped"
        with (
            experts.padding_skipped(lm, batch.cu_seqlens[-2]) if skip else contextlib.nullcontext()
        ):
            loss = forward_loss(lm, batch, "reference", torch.float32, "torch")
            loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in params], list(seen))
    experts.frozen_mxfp4_matmul = matmul
    return out


def availability() -> dict[str, bool]:
    cpu = torch.zeros(1)
    found = {"default": kernel_available(cpu)}
    for choice in ("reference", "triton"):
        os.environ[KERNELS_ENV] = choice
        found[choice] = kernel_available(cpu)
    del os.environ[KERNELS_ENV]
    return found


def main(jobs_path: str, results_path: str) -> None:
    jobs = torch.load(jobs_path, weights_only=False)
    results = {
        "interpreted": INTERPRETED,
        "available": availability(),
        "matmul": {name: matmul(job) for name, job in jobs["matmul"].items()},
        "autograd": {name: autograd(job) for name, job in jobs["autograd"].items()},
        "layer": {name: layer(job) for name, job in jobs["layer"].items()},
        "dequantize": {name: dequantize(job) for name, job in jobs["dequantize"].items()},
        "gate": {name: gate(job) for name, job in jobs["gate"].items()},
        "combine": {name: combine(job) for name, job in jobs["combine"].items()},
        "rotary": {name: rotary(job) for name, job in jobs["rotary"].items()},
        "norm": {name: norm(job) for name, job in jobs["norm"].items()},
        "cross_entropy": {n: cross_entropy(job) for n, job in jobs["cross_entropy"].items()},
        "loop": loop_step(jobs["loop"]),
        "layer_backend": resolve_backend("cpu"),
    }
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
