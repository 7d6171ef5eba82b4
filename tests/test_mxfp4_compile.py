"""The MXFP4 MoE block compiles to one graph, forward and backward, and computes what eager does.

The block is ``model.layers.7.mlp`` of a tiny 24-layer gpt-oss loaded with ``experts: mxfp4``
and given the seed's LoRA (attention ``all-linear``, the experts of layers 7/15/23): router,
:class:`~mxlora.mxfp4.experts.Mxfp4Experts` and the PEFT wrappers of both expert projections.
The torch backend computes the frozen matmul here (the CPU's automatic choice; the Triton one is
checked in the interpreter by tests/test_mxfp4_triton.py).
"""

from __future__ import annotations

import pytest
import torch

from mxlora.config import LoraConfig, ModelConfig
from mxlora.model.load import load_weights
from mxlora.model.lora import apply_lora
from mxlora.mxfp4.experts import Mxfp4Experts, Mxfp4ParamWrapper

TINY = "tiny:layers=24"
TOKENS = (2, 11)  # batch, sequence


@pytest.fixture(scope="module")
def block() -> torch.nn.Module:
    model = load_weights(ModelConfig(name_or_path=TINY, experts="mxfp4", dtype="float32"), "cpu")
    torch.manual_seed(0)
    model = apply_lora(model, LoraConfig())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, so every factor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    mlp = model.get_base_model().model.layers[7].mlp
    experts = mlp.experts.get_base_layer()
    assert isinstance(experts, Mxfp4Experts) and experts.backend == "torch"
    assert sum(isinstance(m, Mxfp4ParamWrapper) for m in mlp.modules()) == 2
    return mlp


def forward_backward(block, run, x: torch.Tensor, grad_out: torch.Tensor):
    """``run`` (the block or its compiled form) forward and backward; grads by ``block``'s names."""
    x = x.clone().requires_grad_()
    block.zero_grad()
    out, scores = run(x)
    (out * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    return out.detach(), scores.detach(), x.grad, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_moe_block_is_one_graph_and_equals_eager(block):
    gen = torch.Generator().manual_seed(2)
    hidden = block.router.hidden_dim
    x = torch.randn(*TOKENS, hidden, generator=gen)
    grad_out = torch.randn(*TOKENS, hidden, generator=gen)

    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got = forward_backward(block, compiled, x, grad_out)
    want = forward_backward(block, block, x, grad_out)
    for a, b in zip(got[:3], want[:3], strict=True):
        assert rel(a, b) < 1e-6
    assert got[3].keys() == want[3].keys() and len(want[3]) == 4  # lora_A/B of both projections
    for name, g in want[3].items():
        assert g.abs().max() > 0, name
        assert rel(got[3][name], g) < 1e-6, name
