"""mxlora.distributed: 2 CPU ranks (gloo, under torchrun) train exactly as one process does.

One torchrun job (tests/distributed_worker.py) trains the tiny gpt-oss (fp32, MXFP4 experts,
seed-style LoRA) for a few AdamW steps on a global batch of 5 rows split 2/3, replicated with the
LoRA gradients all-reduced and FSDP2-sharded (train mode, gradient checkpointing); this module
trains the same model on the whole batch in one process and compares losses and the gradients
of a step. The job also checks that rank 0's side effects (``on_main``) hand every rank its
result or its error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import distributed_worker as worker
from mxlora.distributed import (
    DistInfo,
    all_reduce_grads,
    decoder_layers,
    global_token_count,
    label_token_count,
    launched,
    reduce_loss,
    setup,
    shard_batch,
    shard_bounds,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """What rank 0 of the 2-process job saved."""
    from mxlora.model.load import resolve_model_path

    resolve_model_path(worker.MODEL)  # build the tiny checkpoint once, before two ranks race
    out = tmp_path_factory.mktemp("dist") / "ranks.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The same steps in one process on the whole global batch (the plain mean loss)."""
    model = worker.build_model()
    params = worker.trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=worker.LR)
    losses, grads = [], {}
    for step, (ids, labels) in enumerate(worker.global_batches()):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if step == worker.GRAD_STEP:
            grads = {n: p.grad.detach().clone() for n, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


def test_batches_split_unevenly():
    """The ranks hold different numbers of label tokens: a per-rank mean would be wrong."""
    ids, labels = worker.global_batches()[0]
    counts = [
        label_token_count(shard_batch(labels, DistInfo(rank=r, world_size=2))).item()
        for r in range(2)
    ]
    assert [len(shard_batch(ids, DistInfo(rank=r, world_size=2))) for r in range(2)] == [2, 3]
    assert counts[0] * 3 != counts[1] * 2  # unequal tokens per row between the shares


def test_data_parallel_equals_one_process(ranks, one_process):
    """LoRA gradients all-reduced over 2 ranks = the 1-process gradient (1e-5 relative)."""
    assert ranks["dp_grads"].keys() == one_process["grads"].keys()
    assert any(".experts." in n for n in one_process["grads"])
    for name, want in one_process["grads"].items():
        assert want.norm() > 0, name
        assert rel_err(ranks["dp_grads"][name], want) < 1e-5, name
    assert ranks["dp_losses"] == pytest.approx(one_process["losses"], rel=1e-5)


def test_fsdp2_equals_one_process(ranks, one_process):
    """FSDP2 over 2 ranks: same loss and LoRA gradients, same losses over AdamW steps."""
    for name, want in one_process["grads"].items():
        assert rel_err(ranks["fsdp_grads"][name], want) < 1e-5, name
    assert ranks["fsdp_losses"] == pytest.approx(one_process["losses"], rel=1e-4)
    # The packed experts are sharded along the expert dimension (4 experts: 2 a rank), as uint8.
    local = ranks["local_expert_params"]
    assert local["gate_up_proj_blocks"] == ((2, 128, 2, 16), "torch.uint8", "DTensor")
    assert local["down_proj_scales"] == ((2, 64, 2), "torch.uint8", "DTensor")
    assert local["gate_up_proj_bias"][0] == (2, 128)


def test_shard_bounds_cover_the_batch():
    for n in (2, 5, 8, 13):
        for world in (1, 2, 3):
            if n < world:
                continue
            bounds = [shard_bounds(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="train.batch_size: a global batch of 1 rows"):
        shard_batch([1], DistInfo(rank=0, world_size=2))


def test_one_process_without_launcher(monkeypatch):
    """No launcher: one process, every collective a no-op on the tensors."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()
    info = setup("cpu")
    assert info == DistInfo() and info.is_main and not info.distributed
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, -100, 3]])
    assert label_token_count(labels).item() == 4  # the first column never counts
    assert global_token_count(labels, info).item() == 4
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_grads([p], info)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert reduce_loss(torch.tensor(1.5), info).item() == 1.5
    assert shard_batch([1, 2, 3], info) == [1, 2, 3]


def test_mxfp4_blocks_are_frozen_parameters():
    """FSDP2 shards parameters and only moves buffers: the packed blocks/scales are frozen uint8
    parameters (so they shard along the expert dim); the decoder layers are found."""
    model = worker.build_model()
    assert not [n for n, _ in model.named_buffers() if n.endswith(("_blocks", "_scales"))]
    params = dict(model.named_parameters())
    packed = [n for n in params if n.endswith(("_blocks", "_scales"))]
    assert len(packed) == 2 * 4 and all(params[n].dtype == torch.uint8 for n in packed)
    assert not any(params[n].requires_grad for n in packed)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["GptOssDecoderLayer"] * 2


def test_nproc_must_be_positive(capsys):
    from mxlora.cli import main

    assert main(["train", "configs/tiny/quotes.yaml", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


def test_torchrun_command():
    cmd = torchrun_command(4, ["train", "configs/tiny/quotes.yaml", "train.lr=1e-4"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd
    assert cmd[-5:] == ["-m", "mxlora.cli", "train", "configs/tiny/quotes.yaml", "train.lr=1e-4"]


@pytest.mark.slow
def test_train_nproc_2_logs_the_one_process_losses(tmp_path):
    """``mxlora train --nproc 2`` (gloo, re-launched under torchrun): the same per-step losses as
    one process on the same global batches, and one run folder written by rank 0."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    losses = {}
    for nproc in (1, 2):
        name = f"nproc{nproc}"
        cmd = [sys.executable, "-m", "mxlora.cli", "train", str(ROOT / "configs/tiny/quotes.yaml"),
               "model.dtype=float32", "train.max_steps=3", "train.logging_steps=1",
               "train.eval=no", f"output.root={tmp_path}", f"output.name={name}",
               f"--nproc={nproc}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        losses[nproc] = [r["loss"] for r in rows if "loss" in r]
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
    assert len(losses[1]) == 3
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nproc1", "nproc2"]
