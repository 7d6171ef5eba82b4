"""The Triton MXFP4 kernel on a CUDA GPU at gpt-oss-20b layer shapes, in bf16.

* kernel vs an fp32 computation of the same product (bf16 inputs, the same MXFP4 weights): every
  output within half a bf16 ulp (the one rounding of an fp32 accumulator), and no worse than the
  reference; also on odd routings (1 token, all on one expert, idle experts), in fp32 against
  the reference, and exact dequantization of every code and scale;
* issue 6's gradient acceptance for the experts layer: with the same weights, routing and LoRA
  values, each LoRA gradient (and dx) of the MXFP4 layer has cosine similarity >= 0.9999 with the
  seed path's (GptOssExperts holding the dequantized bf16 weights, transformers' default
  ``grouped_mm`` experts, PEFT ``target_parameters``), for the reference and the Triton path;
* the torch backend's hand-differentiated experts block against the composed one, with and
  without LoRA, and its compiled dequantizer under the global states training calls it in;
* bench/mxfp4_matmul.py runs and reports a Triton result that agrees with torch's bf16 grouped
  GEMM.

Self-contained (random weights, no files). Run on the GPU machine:
``pytest -m gpu tests/test_mxfp4_triton_gpu.py -s`` (``-s`` shows the measured errors).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from mxlora.model.configs import gpt_oss_20b_config
from mxlora.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_experts, quantize_mxfp4
from mxlora.mxfp4.experts import (
    Mxfp4Experts,
    grouped_mxfp4_matmul_reference,
    inject_expert_lora,
    padding_skipped,
)
from mxlora.mxfp4.kernels import kernel_available
from mxlora.mxfp4.ops import dequantize_mxfp4_torch, mxfp4_grouped_mm, offsets_from_counts
from test_mxfp4_experts import Holder, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = gpt_oss_20b_config()
H, I = CONFIG["hidden_size"], CONFIG["intermediate_size"]  # noqa: E741 (gpt-oss's names)
E, K = CONFIG["num_local_experts"], CONFIG["num_experts_per_tok"]
TOKENS = 8192  # a 4 x 2048 batch
PROJECTIONS = {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}  # (out, in), the Hub's [out, in]
# The seed's expert LoRA (configs/gpt-oss-20b/quotes.yaml).
LORA = dict(r=8, lora_alpha=16)


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator("cuda").manual_seed(seed)


def mxfp4_weight(n_out: int, n_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_mxfp4(
        torch.randn(E, n_out, n_in, generator=cuda_gen(seed), device="cuda") * 0.02
    )


@pytest.fixture(scope="module")
def weights() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: mxfp4_weight(*shape, seed=i) for i, (name, shape) in enumerate(PROJECTIONS.items())
    }


def routing(tokens: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts and their softmax weights for random router logits."""
    logits = torch.randn(tokens, E, generator=cuda_gen(seed), device="cuda")
    top, indices = logits.topk(K, dim=-1)
    return indices, top.softmax(-1)


def routed_counts(tokens: int) -> tuple[int, ...]:
    indices, _ = routing(tokens)
    return tuple(torch.bincount(indices.flatten(), minlength=E).tolist())


def triton_matmul(x, blocks, scales, counts, *, transpose: bool) -> torch.Tensor:
    """The fused kernel (at any size)."""
    from mxlora.mxfp4.triton_kernels import grouped_mxfp4_matmul_triton

    offsets = offsets_from_counts(counts, x.device)
    return grouped_mxfp4_matmul_triton(x, blocks, scales, offsets, transpose=transpose)


def max_error(y: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest |error| relative to the largest |truth|."""
    return ((y.float() - truth).abs().max() / truth.abs().max()).item()


def check_bf16(y: torch.Tensor, y_ref: torch.Tensor, truth: torch.Tensor, label: str) -> None:
    """Every output within half a bf16 ulp of the fp32 truth, and no worse than the reference."""
    print(f"{label}: max rel error triton {max_error(y, truth):.2e}, reference "
          f"{max_error(y_ref, truth):.2e}, triton vs reference {max_error(y, y_ref.float()):.2e}")  # fmt: skip
    # Half an ulp is at most 2**-8 of the value; fp32 summation order adds ~1e-6 of the largest.
    torch.testing.assert_close(y.float(), truth, rtol=2.0**-8, atol=1e-4 * truth.abs().max().item())
    l2 = lambda a: ((a.float() - truth).norm() / truth.norm()).item()  # noqa: E731
    assert l2(y) <= 1.05 * l2(y_ref) + 1e-6


def test_the_kernel_is_what_runs_here():
    assert kernel_available(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "input_grad"])
@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_20b_shapes_bf16(weights, projection, transpose):
    blocks, scales = weights[projection]
    n_out, n_in = PROJECTIONS[projection]
    counts = routed_counts(TOKENS)
    x = torch.randn(sum(counts), n_out if transpose else n_in, generator=cuda_gen(4), device="cuda")
    x = x.bfloat16()
    y = triton_matmul(x, blocks, scales, counts, transpose=transpose)
    y_ref = grouped_mxfp4_matmul_reference(x, blocks, scales, counts, transpose=transpose)
    truth = grouped_mxfp4_matmul_reference(x.float(), blocks, scales, counts, transpose=transpose)
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    check_bf16(y, y_ref, truth, f"{projection} {'input_grad' if transpose else 'forward'}")
    # What training runs at this size (the triton backend: dequantize + grouped_mm at 8k
    # tokens), and the torch backend: the same bound.
    offsets = offsets_from_counts(counts, "cuda")
    for backend in ("triton", "torch"):
        y = mxfp4_grouped_mm(x, blocks, scales, offsets, transpose, backend)
        check_bf16(y, y_ref, truth, f"{projection} {backend} op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantizers_are_exact(weights, dtype):
    """The Triton dequantizer and the compiled torch one, bit for bit the reference's."""
    from mxlora.mxfp4.ops import _dequantize_torch
    from mxlora.mxfp4.triton_kernels import dequantize_mxfp4_triton

    blocks, scales = weights["down_proj"]
    expected = dequantize_mxfp4(blocks, scales, dtype)
    assert torch.equal(dequantize_mxfp4_triton(blocks, scales, dtype), expected)
    assert torch.equal(_dequantize_torch(blocks, scales, dtype), expected)
    assert torch.equal(dequantize_mxfp4_torch(blocks, scales, dtype), expected)


def test_torch_dequantizer_compiles_once_whatever_the_global_state():
    """The torch backend's compiled dequantizer runs under the states training puts it in
    (grad on and off, autocast with and without its cache, as CUDA-graph capture sets it):
    after the first call, none of them recompiles it (dynamo gives up after eight), and each
    gives the reference's values."""
    import contextlib

    from mxlora.mxfp4.ops import _dequantize_torch

    blocks, scales = mxfp4_weight(64, 96, seed=12)
    expected = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(_dequantize_torch(blocks, scales, torch.bfloat16), expected)
    states = [
        contextlib.nullcontext,
        torch.no_grad,
        lambda: torch.autocast("cuda", dtype=torch.bfloat16),
        lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False),
        lambda: torch.autocast("cuda", dtype=torch.float16),
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for state in states:
            with state():
                assert torch.equal(_dequantize_torch(blocks, scales, torch.bfloat16), expected)


ODD_COUNTS = {
    "one-token": (0,) * (E - 1) + (1,),
    "all-to-one-expert": (0,) * 7 + (3001,) + (0,) * (E - 8),
    "idle-experts": tuple((i * 37) % 211 if i % 3 else 0 for i in range(E)),
}


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "input_grad"])
@pytest.mark.parametrize("case", list(ODD_COUNTS))
def test_odd_routings_bf16(weights, case, transpose):
    blocks, scales = weights["gate_up_proj"]
    counts = ODD_COUNTS[case]
    n_out, n_in = PROJECTIONS["gate_up_proj"]
    x = torch.randn(sum(counts), n_out if transpose else n_in, generator=cuda_gen(5), device="cuda")
    x = x.bfloat16()
    y = triton_matmul(x, blocks, scales, counts, transpose=transpose)
    y_ref = grouped_mxfp4_matmul_reference(x, blocks, scales, counts, transpose=transpose)
    truth = grouped_mxfp4_matmul_reference(x.float(), blocks, scales, counts, transpose=transpose)
    check_bf16(y, y_ref, truth, f"{case} {'input_grad' if transpose else 'forward'}")
    # Counts already on the device (no host synchronisation): the very same result.
    on_device = torch.tensor(counts, device="cuda")  # offsets summed on the device
    assert torch.equal(triton_matmul(x, blocks, scales, on_device, transpose=transpose), y)


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "input_grad"])
@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_fp32_matches_reference(weights, projection, transpose):
    assert torch.get_float32_matmul_precision() == "highest"  # the reference is true fp32 (no TF32)
    blocks, scales = weights[projection]
    n_out, n_in = PROJECTIONS[projection]
    counts = ODD_COUNTS["idle-experts"]
    x = torch.randn(sum(counts), n_out if transpose else n_in, generator=cuda_gen(6), device="cuda")
    y = triton_matmul(x, blocks, scales, counts, transpose=transpose)
    y_ref = grouped_mxfp4_matmul_reference(x, blocks, scales, counts, transpose=transpose)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "input_grad"])
def test_dequantization_is_exact(dtype, transpose):
    """x = I per expert: the output is the dequantized weight, every code and scale byte."""
    gen = cuda_gen(7)
    n_experts, n_out, n_in = 2, 192, 128
    blocks = torch.randint(0, 256, (n_experts, n_out, n_in // 32, 16), generator=gen, device="cuda")
    scales = torch.randint(0, 253, (n_experts, n_out, n_in // 32), generator=gen, device="cuda")
    scales.view(-1)[:253] = torch.arange(253, device="cuda")  # 6 * 2**(252 - 127) is finite
    blocks, scales = blocks.to(torch.uint8), scales.to(torch.uint8)
    width = n_out if transpose else n_in
    x = torch.eye(width, dtype=dtype, device="cuda").repeat(n_experts, 1)
    got = triton_matmul(x, blocks, scales, (width,) * n_experts, transpose=transpose)
    w = dequantize_mxfp4(blocks, scales, dtype)
    expected = (w if transpose else w.transpose(-1, -2)).flatten(0, 1)
    subnormal = (expected != 0) & (expected.abs() < torch.finfo(dtype).tiny)
    print(f"{dtype} subnormal weights: {int(subnormal.sum())}, "
          f"mismatched: {int((got != expected)[subnormal].sum())}")  # fmt: skip
    assert torch.equal(got[~subnormal], expected[~subnormal])
    if dtype == torch.float32:  # CUDA-core FMA keeps subnormals (bf16 goes through tensor cores)
        assert torch.equal(got, expected)


# --- issue 6's gradient acceptance, one experts layer at full size --------------------------


def experts_pair(weights) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(seed: GptOssExperts + PEFT, ours: Mxfp4Experts + our LoRA), bf16 on the GPU, same values.

    As tests/test_mxfp4_experts.py's ``make_pair``, at gpt-oss-20b's sizes.
    """
    gen = cuda_gen(8)
    gate_up, down = weights["gate_up_proj"], weights["down_proj"]
    gate_up_bias = (torch.randn(E, 2 * I, generator=gen, device="cuda") * 0.02).bfloat16()
    down_bias = (torch.randn(E, H, generator=gen, device="cuda") * 0.02).bfloat16()
    config = GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
        experts_implementation="grouped_mm",
    )  # fmt: skip
    with torch.device("cuda"):
        seed = GptOssExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        seed.gate_up_proj.copy_(dequantize_mxfp4_experts(*gate_up, torch.bfloat16))
        seed.down_proj.copy_(dequantize_mxfp4_experts(*down, torch.bfloat16))
        seed.gate_up_proj_bias.copy_(gate_up_bias)
        seed.down_proj_bias.copy_(down_bias)
    seed.requires_grad_(False)
    mine = Mxfp4Experts(
        *gate_up, gate_up_bias, *down, down_bias, alpha=seed.alpha, limit=seed.limit
    )

    lora = LoraConfig(
        **LORA, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    seed_holder = inject_adapter_in_model(lora, Holder(seed))
    mine_holder = Holder(mine)
    inject_expert_lora(mine_holder, lora)
    params = []
    for holder in (seed_holder, mine_holder):
        cast_adapter_dtype(holder, "default", True)  # fp32 LoRA, as get_peft_model makes it
        params.append({n: p for n, p in holder.named_parameters() if p.requires_grad})
    assert {n: p.shape for n, p in params[0].items()} == {n: p.shape for n, p in params[1].items()}
    with torch.no_grad():  # B != 0, so both factors get gradients
        for name, p in params[0].items():
            value = torch.randn(p.shape, generator=gen, device="cuda") * 0.02
            p.copy_(value)
            params[1][name].copy_(value)
    return seed_holder, mine_holder


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_layer_gradients_match_the_seed_path(weights):
    seed, mine = experts_pair(weights)
    indices, routing_weights = routing(TOKENS)
    gen = cuda_gen(9)
    x = torch.randn(TOKENS, H, generator=gen, device="cuda").bfloat16()
    grad_out = torch.randn(TOKENS, H, generator=gen, device="cuda").bfloat16()
    inputs = (x, indices, routing_weights.bfloat16(), grad_out)
    y_s, dx_s, dw_s, grads_s = run(seed, *inputs)
    assert len(grads_s) == 4
    experts = mine.experts.get_base_layer()
    assert experts.backend == "triton"  # chosen when built, on this GPU
    for path in ("reference", "torch", "triton"):
        experts.backend = path
        y, dx, dw, grads = run(mine, *inputs)
        found = {"y": cosine(y, y_s), "dx": cosine(dx, dx_s), "d_routing": cosine(dw, dw_s)}
        found |= {name: cosine(grads[name], grads_s[name]) for name in grads_s}
        print(path, {k: f"{v:.6f}" for k, v in found.items()})
        low = {k: v for k, v in found.items() if not v >= 0.9999}
        assert not low, (path, low)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("tokens", [530, TOKENS])
def test_torch_block_is_the_composed_block_at_20b_size(weights, tokens, lora, monkeypatch):
    """The torch backend (what ROCm and GPUs without Triton run) differentiates the block by
    hand: on the GPU, in bf16, at gpt-oss-20b's layer size, with and without the seed's expert
    LoRA, its output and every gradient are those of the composed block within a bf16 rounding
    (the test prints whether each is bit-identical) and within the seed path's cosine bound."""
    seed, mine = experts_pair(weights)
    experts = mine.experts.get_base_layer()
    experts.backend = "torch"
    if not lora:
        seed, mine = seed.experts.get_base_layer(), experts
    indices, routing_weights = routing(tokens)
    gen = cuda_gen(11)
    x = torch.randn(tokens, H, generator=gen, device="cuda").bfloat16()
    grad_out = torch.randn(tokens, H, generator=gen, device="cuda").bfloat16()
    inputs = (x, indices, routing_weights.bfloat16(), grad_out)
    by_hand, from_seed = run(mine, *inputs), run(seed, *inputs)
    monkeypatch.setattr(Mxfp4Experts, "forward", Mxfp4Experts.forward_composed)
    composed = run(mine, *inputs)
    names = ("y", "dx", "d_routing")
    pairs = dict(
        zip(names, zip(by_hand[:3], composed[:3], from_seed[:3], strict=True), strict=True)
    )
    pairs |= {n: (g, composed[3][n], from_seed[3][n]) for n, g in by_hand[3].items()}
    assert len(pairs) == (7 if lora else 3)
    for name, (got, want, s) in pairs.items():
        print(name, "bit-identical" if torch.equal(got, want) else cosine(got, want))
        atol = 2**-7 * want.abs().max().item()  # a bf16 rounding of the largest value
        torch.testing.assert_close(got, want, rtol=2**-7, atol=atol, msg=name)
        assert cosine(got, s) >= 0.9999, name


@pytest.mark.parametrize(
    ("real", "padding"), [(530, 110), (1921, 127)], ids=["fused-kernel", "dense-path"]
)
def test_skipping_padding_changes_no_real_token_at_20b_size(weights, real, padding):
    """A packed step's bucket padding (identical tokens, routed alike) skipped by the experts
    (``padding_skipped``), at gpt-oss-20b's layer size in bf16, in a short and a long bucket:
    the real tokens' outputs, input and routing-weight gradients equal the full computation's,
    and so does every LoRA gradient (the padding's output gradient is zero, as a packed step's
    is), within a bf16 rounding (the kernel's tiles and the LoRA's last group change; the test
    prints which are bit-identical)."""
    _, mine = experts_pair(weights)
    # A quotes step's tokens and its bucket's padding (640, the fused kernel), or a long
    # bucket's (2048: the dequantize + grouped_mm path, which computes the skipped rows).
    indices, routing_weights = routing(real + padding)
    gen = cuda_gen(10)
    x = torch.randn(real + padding, H, generator=gen, device="cuda").bfloat16()
    x[real:] = x[real]
    indices[real:], routing_weights[real:] = indices[real], routing_weights[real]
    grad_out = torch.randn(real + padding, H, generator=gen, device="cuda").bfloat16()
    grad_out[real:] = 0
    inputs = (x, indices, routing_weights.bfloat16(), grad_out)
    y_full, dx_full, dw_full, grads_full = run(mine, *inputs)
    with padding_skipped(mine, torch.tensor(real, device="cuda")):
        y, dx, dw, grads = run(mine, *inputs)
    pairs = {"y": (y[:real], y_full[:real]), "dx": (dx[:real], dx_full[:real])}
    pairs |= {"d_routing": (dw[:real], dw_full[:real])}
    pairs |= {name: (grad, grads_full[name]) for name, grad in grads.items()}
    assert len(pairs) == 3 + 4
    for name, (got, want) in pairs.items():
        print(name, "bit-identical" if torch.equal(got, want) else cosine(got, want))
        atol = 2**-7 * want.abs().max().item()  # a bf16 rounding of the largest value
        torch.testing.assert_close(got, want, rtol=2**-7, atol=atol, msg=name)
    assert not torch.equal(y[real:], y_full[real:]) and torch.isfinite(y).all()
    assert not dx[real:].any() and not dw[real:].any()


def test_bench_script(tmp_path):
    out = tmp_path / "bench.json"
    bench = runpy.run_path(str(ROOT / "bench" / "mxfp4_matmul.py"), run_name="bench")
    assert bench["main"](["--tokens", "512", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    combos = {(r["projection"], r["direction"], r["method"]) for r in rows}
    assert len(combos) == len(rows) == 2 * 2 * 5
    assert all(r["ms"] > 0 and r["rows"] == 512 * K for r in rows)
    assert all(r["max_rel_error"] < 2.0**-7 for r in rows)


def assert_near_fp64(fused, eager, truth, largest: float = 2**-7, mean_over_eager: float = 1.5):
    """A fused op's bf16 results against fp64 ``truth``, each error relative to its row's largest
    true value: at most ``largest``, and on average at most ``mean_over_eager`` times eager
    bf16's error."""
    for got, ref, want in zip(fused, eager, truth, strict=True):
        scale = want.abs().amax(-1, keepdim=True)
        assert ((got - want).abs() / scale).max() <= largest
        mean = ((got - want).abs() / scale).mean()
        assert mean <= mean_over_eager * ((ref - want).abs() / scale).mean()


def test_fused_rms_norm_at_20b_width():
    """The Triton RMSNorm on the GPU, bf16, gpt-oss-20b's width and a short step's tokens:
    output and input gradient within one bf16 rounding of fp64, as eager bf16 is. Launched
    after the background precompile of every training kernel, whose failures (warned about
    at the first launch) are errors here."""
    import warnings

    from mxlora.engine.norm import fused_rms_norm, rms_norm_reference
    from mxlora.mxfp4 import triton_kernels

    triton_kernels.precompile(
        GptOssConfig(**gpt_oss_20b_config()), torch.bfloat16, torch.device("cuda")
    )
    gen = torch.Generator().manual_seed(0)
    # Inputs exact in bf16, so that the fp64 truth sees the values the bf16 runs see.
    x = (torch.randn(1, 754, 2880, generator=gen) * 3).bfloat16().cuda()
    weight = (1 + 0.3 * torch.randn(2880, generator=gen)).bfloat16().cuda()
    grad = torch.randn(1, 754, 2880, generator=gen).bfloat16().cuda()

    def run(fn, dtype):
        xi = x.to(dtype).clone().requires_grad_()  # a leaf of its own each run
        out = fn(xi, weight.to(dtype), 1e-5)
        out.backward(grad.to(dtype))
        return out.detach().double(), xi.grad.double()

    truth = run(rms_norm_reference, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = run(fused_rms_norm, torch.bfloat16)
    eager = run(rms_norm_reference, torch.bfloat16)
    assert_near_fp64(fused, eager, truth)


def test_fused_combine_at_20b_width():
    """The Triton combine on the GPU, bf16, gpt-oss-20b's width and top-4 over a short step's
    tokens, weighted (the experts' outputs) and not (the gradient gather): output and both
    gradients within one bf16 rounding of fp64, and on average no further than eager bf16."""
    from mxlora.mxfp4.combine import combine_reference, fused_combine

    gen = torch.Generator().manual_seed(0)
    tokens, k = 754, 4
    src = torch.randn(tokens * k, 2880, generator=gen).bfloat16().cuda()
    routing = torch.softmax(torch.randn(tokens, k, generator=gen), -1).bfloat16().cuda()
    index = torch.randperm(tokens * k, generator=gen).view(tokens, k).cuda()
    grad = torch.randn(tokens, 2880, generator=gen).bfloat16().cuda()
    for weights in (routing, None):

        def run(fn, dtype, weights=weights):
            s = src.to(dtype).clone().requires_grad_()
            w = None if weights is None else weights.to(dtype).clone().requires_grad_()
            out = fn(s, w, index)
            out.backward(grad.to(dtype))
            grads = (s.grad,) if w is None else (s.grad, w.grad)
            return [t.double() for t in (out.detach(), *grads)]

        truth = run(combine_reference, torch.float64)
        fused = run(fused_combine, torch.bfloat16)
        eager = run(combine_reference, torch.bfloat16)
        assert_near_fp64(fused, eager, truth)


def test_fused_rotary_in_20b_attention():
    """The Triton rotary embedding on the GPU inside transformers' gpt-oss attention (20b's
    heads, bf16, a short step's tokens, the packed varlen attention): the attention's output and
    the gradients of its input and q/k projections within one bf16 rounding of fp64 (relative
    to each row's largest), and on average no further than transformers' own rotary in bf16."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

    from mxlora.engine.attention import build_masks, register
    from mxlora.engine.rotary import fused_rotary_embeddings

    config = GptOssConfig(**gpt_oss_20b_config())
    config._attn_implementation = register()
    torch.manual_seed(0)
    # Weights and inputs exact in bf16, so that the fp64 truth sees the values bf16 runs see.
    attention = GptOssAttention(config, layer_idx=0).cuda()  # a sliding layer
    torch.nn.init.normal_(attention.sinks)
    attention.bfloat16()
    tokens = 754
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 254, 200])).cuda()
    positions = torch.cat([torch.arange(n) for n in (300, 254, 200)])[None].cuda()
    cu_seqlens = torch.tensor([0, 300, 554, 754, 754], dtype=torch.int32).cuda()  # no padding
    x = (torch.randn(1, tokens, config.hidden_size) * 0.5).bfloat16().cuda()
    grad = torch.randn(1, tokens, config.hidden_size).bfloat16().cuda()

    def run(dtype, fused):
        module = attention.to(dtype)
        rotary = GptOssRotaryEmbedding(config).cuda()
        xi = x.to(dtype).clone().requires_grad_()
        cos_sin = rotary(xi, positions)
        kind = "varlen" if dtype != torch.float64 else "reference"
        masks = build_masks(doc_ids, config.sliding_window, kind, dtype, cu_seqlens)
        mask = masks[config.layer_types[0]]
        module.zero_grad()
        with fused_rotary_embeddings(fused):
            out = module(xi, cos_sin, mask)[0]
        out.backward(grad.to(dtype))
        return [
            t.double() for t in (out, xi.grad, module.q_proj.weight.grad, module.k_proj.weight.grad)
        ]

    truth = run(torch.float64, False)
    fused = run(torch.bfloat16, True)
    eager = run(torch.bfloat16, False)
    assert_near_fp64(fused, eager, truth, largest=2**-5, mean_over_eager=1.1)


def test_fused_linear_cross_entropy_at_20b_vocabulary():
    """The loss with a frozen lm_head (gradient computed in the forward, the Triton row kernel)
    on the GPU, bf16, gpt-oss-20b's vocabulary, 1,500 positions (two chunks, the last one
    ragged, some ignored): the loss within 1e-4 of autograd's full-logits loss and the hidden
    states' gradient within bf16 noise of it."""
    from mxlora.engine.loss import chunked_loss, reference_loss

    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 1600, 2880, 201088
    head = torch.nn.Linear(hidden_size, vocab, bias=False).bfloat16().cuda().requires_grad_(False)
    head.weight.copy_((torch.randn(vocab, hidden_size, generator=gen) * 0.02).bfloat16())
    hidden = torch.randn(tokens, hidden_size, generator=gen).bfloat16().cuda().requires_grad_()
    positions = torch.randperm(tokens, generator=gen)[:1500].cuda()
    targets = torch.randint(0, vocab, (1500,), generator=gen).cuda()
    targets[::97] = -100
    results = []
    for fn in (reference_loss, lambda *a: chunked_loss(*a, "triton")):
        hidden.grad = None
        loss = fn(hidden, head, positions, targets)
        loss.backward(torch.tensor(1 / 1500, device="cuda"))
        results.append((loss.detach(), hidden.grad.float()))
    (want, want_grad), (got, grad) = results
    assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item())
    cosine = F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0)
    assert cosine > 0.9999
    assert (grad - want_grad).abs().max() <= 2**-7 * want_grad.abs().max()
