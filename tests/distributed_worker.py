"""One rank of tests/test_distributed.py, run by torchrun: data-parallel and FSDP2 training steps.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py
OUT``. Every rank builds the same tiny gpt-oss (fp32, MXFP4 experts, the seed-style LoRA) and
trains on its share of the same global batches, once replicated (LoRA gradients all-reduced) and
once FSDP2-sharded with its first decoder block checkpointed as the engine does it; rank 0
saves the global losses, one step's full LoRA gradients and the local shapes of the sharded expert tensors to ``OUT``. The test module computes the one-process
reference with the same :func:`build_model` and :func:`global_batches` and compares.
"""

from __future__ import annotations

import sys

import torch

from mxlora.config import ExpertTargets, LoraConfig, ModelConfig
from mxlora.distributed import (
    all_reduce_grads,
    global_token_count,
    on_main,
    reduce_loss,
    setup,
    shard_batch,
    shard_model,
    teardown,
)
from mxlora.engine.loop import blocks_attached
from mxlora.engine.memory import decoder_layers
from mxlora.model.load import load_weights
from mxlora.model.lora import apply_lora

MODEL = "tiny:layers=2,experts=4,hidden=64,intermediate=64"
STEPS = 3
LR = 1e-2
#: The step whose gradients are compared: the second, when LoRA's B (zero at first) is not zero
#: and every LoRA factor has a gradient.
GRAD_STEP = 1
BATCH, LENGTH = 5, 12  # odd rows: ranks get 2 and 3, the token count must still be global


def build_model() -> torch.nn.Module:
    """The tiny model with the seed's LoRA (all-linear + both projections of layer 1's experts)."""
    model = load_weights(ModelConfig(name_or_path=MODEL, experts="mxfp4", dtype="float32"), "cpu")
    model.config.use_cache = False
    torch.manual_seed(0)
    return apply_lora(model, LoraConfig(experts=ExpertTargets(layers=[1])))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, labels)`` per step: prompts of random length masked out, one row padded,
    so ranks hold different numbers of label tokens."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, 2000, (BATCH, LENGTH), generator=gen)
        labels = ids.clone()
        prompt = torch.randint(1, LENGTH - 2, (BATCH,), generator=gen)
        for row, n in enumerate(prompt.tolist()):
            labels[row, :n] = -100
        labels[-1, LENGTH // 2 :] = -100
        batches.append((ids, labels))
    return batches


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(model, info, sharded: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=LR)
    losses, grads = [], {}
    for step, (ids, labels) in enumerate(global_batches()):
        ids, labels = shard_batch(ids, info), shard_batch(labels, info)
        tokens = global_token_count(labels, info)
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=tokens).loss
        loss.backward()
        if not sharded:
            all_reduce_grads(params.values(), info)
        if step == GRAD_STEP:
            grads = {
                n: (p.grad.full_tensor() if sharded else p.grad).detach().clone()
                for n, p in params.items()
            }
        optimizer.step()
        optimizer.zero_grad()
        losses.append(reduce_loss(loss, info).item())
    return losses, grads


def _fail() -> None:
    raise ValueError("rank 0 failed")


def main(out: str) -> None:
    info = setup("cpu")
    assert info.distributed and info.world_size == 2, info
    # Rank 0's side effect: its result, or its error, reaches every rank.
    assert on_main(lambda: f"rank {info.rank} ran it", info) == "rank 0 ran it"
    try:
        on_main(_fail, info)
        raise AssertionError("on_main swallowed rank 0's error")
    except ValueError as e:
        assert str(e) == "rank 0 failed", e
    dp_losses, dp_grads = train(build_model(), info, sharded=False)
    # Sharded as the training loop runs it: train mode, the first decoder block checkpointed
    # (non-reentrant checkpoint around its forward, inside FSDP2's hooks: the backward's unshard
    # gathers its parameters before the recompute), the others not.
    model = build_model()
    model.train()
    model = shard_model(model, info)
    experts = model.get_base_model().model.layers[0].mlp.experts
    local = {
        name: (tuple(t.to_local().shape), str(t.dtype), type(t).__name__)
        for name, t in experts.named_parameters()
    }
    layers = decoder_layers(model)
    with blocks_attached(layers, 1, compiled=False):
        assert "forward" in vars(layers[0]) and "forward" not in vars(layers[1])
        fsdp_losses, fsdp_grads = train(model, info, sharded=True)
    if info.is_main:
        torch.save(
            {
                "dp_losses": dp_losses,
                "dp_grads": dp_grads,
                "fsdp_losses": fsdp_losses,
                "fsdp_grads": fsdp_grads,
                "local_expert_params": local,
            },
            out,
        )
    teardown(info)


if __name__ == "__main__":
    main(sys.argv[1])
