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
    rank_share,
    rank_shares,
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
    # The packed experts are sharded along the expert dimension (4 experts: 2 a rank), as the
    # same bytes under a 1-byte float dtype (torch 2.11's fully_shard refuses integer tensors).
    local = ranks["local_expert_params"]
    assert local["gate_up_proj_blocks"] == ((2, 128, 2, 16), "torch.float8_e5m2", "DTensor")
    assert local["down_proj_scales"] == ((2, 64, 2), "torch.float8_e5m2", "DTensor")
    assert local["gate_up_proj_bias"][0] == (2, 128)


def test_rank_shares_cover_every_row_once_or_give_rank_0_a_short_batch():
    """Each rank's rows of a global micro-batch: contiguous shares covering it once; a batch with
    fewer rows than ranks goes whole to rank 0, the others running one of its rows at weight 0
    (so that every rank joins the same collectives)."""
    assert rank_shares([7, 8, 9, 10, 11], 2) == [[7, 8], [9, 10, 11]]
    assert rank_shares([7, 8, 9], 1) == [[7, 8, 9]]
    assert rank_shares([7], 3) == [[7], [7], [7]]
    weights = [rank_share([7], DistInfo(rank=r, world_size=3))[1] for r in range(3)]
    assert weights == [1, 0, 0]
    assert rank_share([7, 8, 9], DistInfo(rank=1, world_size=2)) == ([8, 9], 1)


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


def _train_cli(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """``mxlora train configs/tiny/quotes.yaml`` (fp32, 3 steps, a checkpoint at step 2) in a
    fresh interpreter (``--nproc 2`` re-runs it under torchrun with gloo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mxlora.cli", "train", str(ROOT / "configs/tiny/quotes.yaml"),
           *TRAIN_ARGS, f"output.root={tmp_path}", f"output.name={name}", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


TRAIN_ARGS = ["model.dtype=float32", "train.max_steps=3", "train.logging_steps=1",
              "train.save_steps=2", "train.eval=steps", "train.eval_steps=3"]  # fmt: skip


def _losses(run: Path) -> tuple[list[float], list[float]]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r["loss"] for r in rows if "loss" in r], [
        r["eval_loss"] for r in rows if "eval_loss" in r
    ]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        # fp32, deterministic sums: what differs is the order of one sum of two halves, which
        # Adam's normalisation amplifies in the smallest gradients: measured up to 1.07e-4 of a
        # tensor's largest value in a fresh install (transformers 5.24), where 1e-4 had passed
        # before. A rank's data lost changes the gradients themselves, and the values by a
        # sizeable fraction of an update, far above this bound.
        assert (got[key] - value).abs().max() <= 1e-3 * value.abs().max(), key


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The tiny quotes run in one process (in this interpreter: no second start-up)."""
    from mxlora.cli import main

    root = tmp_path_factory.mktemp("one")
    argv = ["train", str(ROOT / "configs/tiny/quotes.yaml"), *TRAIN_ARGS, f"output.root={root}"]
    assert main([*argv, "output.name=one"]) == 0
    return root / "one"


def test_train_nproc_2_is_the_one_process_run(one_process_run, tmp_path):
    """``mxlora train --nproc 2`` (mxlora engine, gloo, re-launched under torchrun): the same
    per-step losses and held-out loss as one process on the same global batches, the same
    adapter, one run folder written by rank 0; its step-2 checkpoint resumed in ONE process ends
    with the same adapter (checkpoints and --resume work across process counts)."""
    from mxlora.cli import main

    _train_cli(tmp_path, "two", "--nproc=2")
    run = tmp_path / "two"
    train, held_out = _losses(run)
    want_train, want_held_out = _losses(one_process_run)
    assert len(want_train) == 3 and len(want_held_out) == 1
    assert train == pytest.approx(want_train, rel=1e-4)
    assert held_out == pytest.approx(want_held_out, rel=1e-4)
    _assert_same_adapter(_adapter(run), _adapter(one_process_run))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no second folder, no staging
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]

    # Back to step 2 (as a kill after its checkpoint leaves it), resumed by one process.
    import shutil

    for leftover in ("report.json", "report.md", "adapter", "loss.png"):
        target = run / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert _losses(run)[0] == pytest.approx(want_train, rel=1e-4)
    _assert_same_adapter(_adapter(run), _adapter(one_process_run))


@pytest.mark.slow
def test_train_fsdp_nproc_2_is_the_one_process_run(one_process_run, tmp_path):
    """``train.fsdp=true --nproc 2``: the model FSDP2-sharded over 2 CPU ranks (MXFP4 blocks/
    scales sharded along the experts) trains the one-process losses and adapter; its
    checkpoint holds the whole LoRA tensors (gathered) and resumes to the same end."""
    from safetensors.torch import load_file

    _train_cli(tmp_path, "fsdp", "train.fsdp=true", "--nproc=2")
    run = tmp_path / "fsdp"
    train, held_out = _losses(run)
    want_train, want_held_out = _losses(one_process_run)
    assert train == pytest.approx(want_train, rel=1e-4)
    assert held_out == pytest.approx(want_held_out, rel=1e-4)
    _assert_same_adapter(_adapter(run), _adapter(one_process_run))
    saved = load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in _adapter(one_process_run).items()
    }

    # Back to step 2 and resumed (the sharded checkpoint's whole tensors re-sharded).
    import shutil

    for leftover in ("report.json", "report.md", "adapter", "loss.png"):
        target = run / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mxlora.cli", "train", "--resume", str(run), "--nproc=2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(run)[0] == pytest.approx(want_train, rel=1e-4)
    _assert_same_adapter(_adapter(run), _adapter(one_process_run))


def test_fsdp_and_trl_refused_where_they_cannot_run(capsys):
    from mxlora.cli import main

    quotes = str(ROOT / "configs/tiny/quotes.yaml")
    assert main(["train", quotes, "train.fsdp=true", "--dry-run"]) == 0  # a plan is fine
    capsys.readouterr()
    assert main(["train", quotes, "train.fsdp=true", "output.root=/nonexistent/x"]) == 2
    assert "train.fsdp: shards the model over processes" in capsys.readouterr().err
    assert main(["train", quotes, "train.engine=trl", "train.fsdp=true"]) == 2
    assert "fsdp: true needs engine mxlora" in capsys.readouterr().err
    from mxlora.config import ConfigError, load_config
    from mxlora.recipes.train import check_processes

    two = DistInfo(rank=1, world_size=2, distributed=True)
    check_processes(load_config(quotes, []), two)  # the mxlora engine shares the batch
    with pytest.raises(ConfigError, match="train.engine: 'trl' trains in one process"):
        check_processes(load_config(quotes, ["train.engine=trl"]), two)
