"""The MXFP4 experts layer against transformers' GptOssExperts + PEFT target_parameters, one layer.

The reference is the seed's computation: ``GptOssExperts`` (transformers' own per-expert loop)
holding the weights transformers would dequantize, with PEFT's ``target_parameters`` LoRA on
``gate_up_proj`` and ``down_proj``. Our layer holds the same weights packed and the same LoRA
values; outputs and the gradients of the input, the routing weights and every LoRA factor must
agree, on the routings that stress the grouping: one token, every token on one expert, experts
with no token at all, no token at all.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from mxlora.mxfp4 import dequantize_mxfp4_experts, ops, quantize_mxfp4
from mxlora.mxfp4.experts import (
    Mxfp4Experts,
    Mxfp4ParamWrapper,
    grouped_mxfp4_matmul_reference,
    inject_expert_lora,
)
from mxlora.mxfp4.ops import mxfp4_grouped_mm, offsets_from_counts

E, H, I = 4, 64, 96  # noqa: E741 (gpt-oss's names); I != H so a swapped orientation fails
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


class Holder(nn.Module):
    """A parent for the experts module, as ``GptOssMLP`` is in the model."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x, indices, weights):
        return self.experts(x, indices, weights)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_pair(k: int = 2, r: int = 4, targets=TARGETS, seed: int = 0):
    """(reference Holder with PEFT LoRA, MXFP4 Holder with ours), same weights and LoRA values."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=gen) * 0.1)
    down = quantize_mxfp4(torch.randn(E, H, I, generator=gen) * 0.1)
    gate_up_bias = torch.randn(E, 2 * I, generator=gen) * 0.1
    down_bias = torch.randn(E, H, generator=gen) * 0.1

    config = GptOssConfig(
        hidden_size=H,
        intermediate_size=I,
        num_local_experts=E,
        num_experts_per_tok=k,
        experts_implementation="eager",
    )
    ref = GptOssExperts(config)
    with torch.no_grad():
        ref.gate_up_proj.copy_(dequantize_mxfp4_experts(*gate_up, torch.float32))
        ref.down_proj.copy_(dequantize_mxfp4_experts(*down, torch.float32))
        ref.gate_up_proj_bias.copy_(gate_up_bias)
        ref.down_proj_bias.copy_(down_bias)
    ref.requires_grad_(False)
    mine = Mxfp4Experts(*gate_up, gate_up_bias, *down, down_bias, alpha=ref.alpha, limit=ref.limit)

    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=list(targets))
    ref_holder = inject_adapter_in_model(lora, Holder(ref))
    mx_holder = Holder(mine)
    inject_expert_lora(mx_holder, lora)
    ref_params = {n: p for n, p in ref_holder.named_parameters() if p.requires_grad}
    mx_params = {n: p for n, p in mx_holder.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in ref_params.items()} == {n: p.shape for n, p in mx_params.items()}
    with torch.no_grad():  # B != 0 so gradients flow through both factors
        for name, p in ref_params.items():
            value = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(value)
            mx_params[name].copy_(value)
    return ref_holder, mx_holder


def routing(tokens: int, k: int, indices: torch.Tensor | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    top, top_idx = torch.topk(logits, k, dim=-1)
    return x, (top_idx if indices is None else indices), top.softmax(-1)


def run(holder: nn.Module, x, indices, weights, grad_out):
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    holder.zero_grad()
    y = holder(x, indices, weights)
    y.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in holder.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, weights.grad, grads


CASES = {
    "random": dict(tokens=13, k=2),
    "one-token": dict(tokens=1, k=2),
    "all-to-one-expert": dict(tokens=9, k=1, indices=torch.full((9, 1), 2)),
    "two-experts-idle": dict(tokens=11, k=2, indices=torch.tensor([[3, 0]] * 6 + [[0, 3]] * 5)),
    "no-tokens": dict(tokens=0, k=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_gptoss_experts_with_peft_lora(case):
    spec = CASES[case]
    ref, mine = make_pair(k=spec["k"])
    x, indices, weights = routing(spec["tokens"], spec["k"], spec.get("indices"))
    grad_out = torch.randn(spec["tokens"], H, generator=torch.Generator().manual_seed(2))
    y, dx, dw, g = run(mine, x, indices, weights, grad_out)
    if spec["tokens"] == 0:  # GptOssExperts' output then has no graph at all; ours is empty
        assert y.shape == (0, H) and dx.shape == (0, H)
        assert len(g) == 4 and all(not t.any() for t in g.values())
        return
    y_ref, dx_ref, dw_ref, g_ref = run(ref, x, indices, weights, grad_out)
    assert rel(y, y_ref) < 1e-6
    assert rel(dx, dx_ref) < 1e-6
    assert rel(dw, dw_ref) < 1e-6
    assert g.keys() == g_ref.keys() and len(g) == 4
    for name in g:
        assert rel(g[name], g_ref[name]) < 1e-6, name


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_block_is_the_composed_block(case, dtype, lora, monkeypatch):
    """The torch backend's eager block is differentiated by hand (one autograd node): with and
    without expert LoRA on both projections (through PEFT's wrappers), its output and every
    gradient (input, routing weights, each LoRA factor) are bit for bit what the composed block
    and autograd give on the CPU, in fp32 and bf16 (the same ops, the gradients' parts summed in
    autograd's order); without LoRA, in fp32, what GptOssExperts gives."""
    spec = CASES[case]
    ref, mine = make_pair(k=spec["k"])
    mine.to(dtype)
    experts = mine.experts.get_base_layer()
    assert experts.backend == "torch"
    module = mine if lora else experts
    x, indices, weights = routing(spec["tokens"], spec["k"], spec.get("indices"))
    grad_out = torch.randn(spec["tokens"], H, generator=torch.Generator().manual_seed(2))
    args = (x.to(dtype), indices, weights.to(dtype), grad_out.to(dtype))
    by_hand = run(module, *args)
    node = module(args[0].clone().requires_grad_(), *args[1:3]).grad_fn
    assert type(node).__name__ == "_TorchBlockBackward"  # one node, not the composed graph
    if dtype == torch.float32 and spec["tokens"] and not lora:
        seed = run(ref.experts.get_base_layer(), *args)
        for got, want in zip(by_hand[:3], seed[:3], strict=True):
            assert rel(got, want) < 1e-6
    monkeypatch.setattr(Mxfp4Experts, "forward", Mxfp4Experts.forward_composed)
    composed = run(module, *args)
    for got, want in zip(by_hand[:3], composed[:3], strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    assert by_hand[3].keys() == composed[3].keys() and len(by_hand[3]) == (4 if lora else 0)
    for name, grad in by_hand[3].items():
        assert torch.equal(grad, composed[3][name]), name


def test_torch_block_without_gradients():
    """Inference (no autograd) and a routing weight that needs no gradient take the same
    block: the same output, and only the gradients asked for."""
    _, mine = make_pair()
    experts = mine.experts.get_base_layer()
    x, indices, weights = routing(6, 2)
    with torch.no_grad():
        y = experts(x, indices, weights)
    assert torch.equal(y, experts.forward_composed(x, indices, weights).detach())
    x = x.clone().requires_grad_()
    experts(x, indices, weights).sum().backward()
    assert x.grad is not None and weights.grad is None


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ["experts.down_proj"]])
def test_single_projection_targets(targets):
    ref, mine = make_pair(targets=targets)
    assert [type(m) for m in mine.modules()].count(Mxfp4ParamWrapper) == 1
    x, indices, weights = routing(10, 2)
    grad_out = torch.randn(10, H, generator=torch.Generator().manual_seed(3))
    y_ref, dx_ref, _, g_ref = run(ref, x, indices, weights, grad_out)
    y, dx, _, g = run(mine, x, indices, weights, grad_out)
    assert rel(y, y_ref) < 1e-6 and rel(dx, dx_ref) < 1e-6
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < 1e-6, name


def test_disabled_adapter_gives_base_output():
    ref, mine = make_pair()
    x, indices, weights = routing(7, 2)
    with torch.no_grad():
        with_lora = mine(x, indices, weights)
        for m in mine.modules():
            if isinstance(m, Mxfp4ParamWrapper):
                m.enable_adapters(False)
        base = mine(x, indices, weights)
        plain = mine.experts.get_base_layer()(x, indices, weights)
    assert torch.equal(base, plain)
    assert rel(with_lora, base) > 1e-3  # the LoRA does change the output when enabled


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_input_gradient_is_exact_transpose(backend):
    """dx of the frozen matmul equals dy @ W on each expert's rows (W dequantized separately)."""
    gen = torch.Generator().manual_seed(4)
    blocks, scales = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=gen))
    counts = (3, 0, 5, 1)
    x = torch.randn(sum(counts), H, generator=gen, requires_grad=True)
    dy = torch.randn(sum(counts), 2 * I, generator=gen)
    offsets = offsets_from_counts(counts, "cpu")
    mxfp4_grouped_mm(x, blocks, scales, offsets, False, backend).backward(dy)
    w = dequantize_mxfp4_experts(blocks, scales, torch.float32)  # [E, in, out]
    rows = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    expected = torch.einsum("no,nio->ni", dy, w[rows])
    assert rel(x.grad, expected) < 1e-6


@pytest.mark.parametrize(
    ("backend", "lora"), [("reference", True), ("torch", True), ("torch", False)]
)
def test_dequantized_memory_is_bounded_and_nothing_dequantized_saved(backend, lora, monkeypatch):
    """reference: one expert's weight at a time; torch: one projection of the layer at a time
    (freed inside the op; without LoRA in the block differentiated by hand). Nothing
    dequantized is saved for backward either way."""
    sizes: list[int] = []
    for name in ("dequantize_mxfp4", "dequantize_mxfp4_torch"):
        original = getattr(ops, name)

        def recording(*args, original=original):
            w = original(*args)
            sizes.append(w.numel())
            return w

        monkeypatch.setattr(ops, name, recording)
    _, mine = make_pair()
    mine.experts.get_base_layer().backend = backend
    if not lora:
        mine = mine.experts.get_base_layer()
    x, indices, weights = routing(5, 2)
    x.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mine(x, indices, weights).backward(torch.ones(5, H))
    one_expert = 2 * I * H  # the larger of the two projections of one expert
    assert max(sizes) == (one_expert if backend == "reference" else E * one_expert)
    expert_shapes = {(2 * I, H), (H, 2 * I), (H, I), (I, H)}
    for t in saved:
        if t.is_floating_point():
            assert tuple(t.shape[-2:]) not in expert_shapes, tuple(t.shape)
            assert t.numel() < one_expert


def test_weight_spec_is_a_zero_storage_descriptor():
    _, mine = make_pair()
    experts = mine.experts.get_base_layer()
    spec = experts.weight_spec("gate_up_proj")
    assert spec.shape == (E, H, 2 * I) and spec.dtype == torch.float32
    assert spec.untyped_storage().nbytes() == 4
    assert experts.weight_spec("down_proj").shape == (E, I, H)


def test_bf16_close_to_fp32():
    _, mine = make_pair()
    x, indices, weights = routing(16, 2)
    grad_out = torch.randn(16, H, generator=torch.Generator().manual_seed(5))
    y32, dx32, _, g32 = run(mine, x, indices, weights, grad_out)
    mine.to(torch.bfloat16)
    y16, dx16, _, g16 = run(mine, x.bfloat16(), indices, weights.bfloat16(), grad_out.bfloat16())
    assert y16.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity
    assert cos(y16.float().flatten(), y32.flatten(), dim=0) > 0.999
    assert cos(dx16.float().flatten(), dx32.flatten(), dim=0) > 0.999
    for name in g32:
        assert cos(g16[name].float().flatten(), g32[name].flatten(), dim=0) > 0.999, name


def test_merge_is_refused():
    _, mine = make_pair()
    with pytest.raises(NotImplementedError, match="dequantized"):
        mine.experts.merge()


def test_reference_matmul_shapes():
    gen = torch.Generator().manual_seed(6)
    blocks, scales = quantize_mxfp4(torch.randn(2, 64, 32, generator=gen))
    x = torch.randn(3, 32, generator=gen)
    y = grouped_mxfp4_matmul_reference(x, blocks, scales, (3, 0), transpose=False)
    w = dequantize_mxfp4_experts(blocks, scales, torch.float32)[0]  # [in, out]
    assert y.shape == (3, 64) and torch.allclose(y, x @ w, rtol=1e-6, atol=1e-6)
    back = grouped_mxfp4_matmul_reference(y, blocks, scales, (0, 3), transpose=True)
    w1 = dequantize_mxfp4_experts(blocks, scales, torch.float32)[1]
    assert back.shape == (3, 32) and torch.allclose(back, y @ w1.T, rtol=1e-6, atol=1e-5)
