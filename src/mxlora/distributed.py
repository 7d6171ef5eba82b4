"""Training over several processes: torch.distributed building blocks for the training loop.

One process per device, started by ``torchrun`` (``python -m torch.distributed.run``),
``accelerate launch`` or ``mxlora train CONFIG --nproc N`` (which re-runs itself under torchrun,
:func:`relaunch`). Each process calls :func:`setup` once; it reads the launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process
group: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on the CPU. Without a launcher it returns
a one-process :class:`DistInfo` and every helper here is a no-op, so one loop serves both.

``train.batch_size`` stays the *global* rows per optimizer step. A step, data parallel::

    info = setup()
    rows = shard_batch(global_rows, info)            # this rank's contiguous share
    batch = collate(rows)
    tokens = global_token_count(batch["labels"], info)
    loss = model(**batch, num_items_in_batch=tokens).loss   # sum of CE / global label tokens
    loss.backward()
    all_reduce_grads(trainable_params, info)         # summed: the 1-process gradient
    optimizer.step(); optimizer.zero_grad()
    logged = reduce_loss(loss, info)                 # the 1-process loss of the global batch

Each rank's loss is its sum of token cross-entropies over the *global* count of label tokens, so
the per-rank gradients add up to exactly the one-process gradient of the mean loss, however
unevenly the label tokens fall across ranks. transformers' causal-LM loss divides by
``num_items_in_batch`` when it is given (reduction ``sum``), as its Trainer uses it.

Sharded (FSDP2) instead of replicated: ``model = shard_model(model, info)`` after LoRA is
attached; every decoder layer becomes its own ``fully_shard`` unit (parameters sharded along dim
0, all-gathered for its forward/backward), the decoder stack (embeddings, final norm) one more;
the output layer stays replicated (frozen, called apart by the loss). The MXFP4 expert blocks
and scales are frozen uint8 parameters, so they are sharded along the expert dimension and
all-gathered packed, never as floats. FSDP sums the LoRA gradients itself (reduce-scatter with
divide factor 1): do not call :func:`all_reduce_grads` on a sharded model. The rest of the step
is the same; the optimizer runs on the shards.

Only rank 0 writes files (run folder, checkpoints, adapter, report): run such side effects
through :func:`on_main` (every rank gets the result, or the error), or guard them with
``info.is_main`` and :func:`barrier` where other ranks must wait for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Labels transformers' loss ignores (prompt and padding tokens).
IGNORE_INDEX = -100
#: Environment every launcher (torchrun, accelerate launch) sets for each process.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

Rows = TypeVar("Rows", bound=Sequence)
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: this process's rank, 0 .. world_size - 1.
        world_size: processes in the job (1 without a launcher).
        local_rank: rank on this host (the CUDA device index).
        device: the device this process trains on.
        distributed: a process group is joined (launched, even with one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def setup(device_type: str | None = None) -> DistInfo:
    """Join the process group the launcher set up (once per process), or run alone.

    Args:
        device_type: ``cuda`` or ``cpu``; default: ``cuda`` when there is a GPU. With CUDA the
            process uses ``cuda:LOCAL_RANK`` and NCCL, on the CPU gloo.

    Returns:
        This process's :class:`DistInfo`.
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if not launched():
        return DistInfo(device=torch.device(device_type))  # the current CUDA device, or the CPU
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            device_id=device if device_type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, device, distributed=True)


def teardown(info: DistInfo) -> None:
    """Leave the process group (after the last collective of the job)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file all read)."""
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (picklable; e.g. the checkpoint rank 0 found to resume)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 only (a side effect: create the run folder, write a file); every rank
    gets its return value, or raises the exception it raised, so no rank waits forever on a
    rank 0 that failed. ``fn``'s result and exceptions must pickle."""
    if not info.distributed:
        return fn()
    outcome: tuple[bool, object] | None = None
    if info.is_main:
        try:
            outcome = (True, fn())
        except Exception as e:  # handed to every rank, raised there
            outcome = (False, e)
    ok, value = broadcast_object(outcome, info)  # type: ignore[misc]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def shard_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """``[start, end)`` of this rank's contiguous share of ``n`` global rows (sizes differ by at
    most one; the global token count keeps the gradient exact when they differ)."""
    return n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size


def shard_batch(rows: Rows, info: DistInfo) -> Rows:
    """This rank's rows of a global batch (a list of rows, or a tensor along dim 0).

    Raises:
        ValueError: fewer rows than ranks (a rank would get none).
    """
    if len(rows) < info.world_size:
        raise ValueError(
            f"train.batch_size: a global batch of {len(rows)} rows cannot give each of "
            f"{info.world_size} processes a row"
        )
    start, end = shard_bounds(len(rows), info)
    return rows[start:end]


def rank_share(indices: list[int], info: DistInfo) -> tuple[list[int], int]:
    """A rank's rows of a global (micro-)batch of row ``indices``, and their weight (1).

    A batch with fewer rows than ranks (an epoch's last) goes whole to rank 0; the others run
    one of its rows at weight 0, so every rank joins the same collectives (FSDP2's gathers, the
    gradient all-reduce) with gradients of the same layout.
    """
    if info.world_size == 1:
        return indices, 1
    if len(indices) < info.world_size:
        return (indices, 1) if info.is_main else (indices[:1], 0)
    return shard_batch(indices, info), 1


def rank_shares(indices: list[int], world_size: int) -> list[list[int]]:
    """Every rank's rows of a global (micro-)batch (:func:`rank_share`), rank 0 first."""
    return [
        rank_share(indices, DistInfo(rank=r, world_size=world_size))[0] for r in range(world_size)
    ]


def label_token_count(labels: Tensor) -> Tensor:
    """Tokens the causal-LM loss counts in ``labels [B, T]``: each label predicts the next token,
    so the first position never counts (transformers shifts the labels by one)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def global_token_count(labels: Tensor, info: DistInfo) -> Tensor:
    """Label tokens of the whole global batch (summed over ranks), an int64 tensor on
    ``labels.device``: the ``num_items_in_batch`` that makes each rank's loss its share of the
    one-process mean."""
    count = label_token_count(labels).to(torch.int64)
    if info.distributed:
        dist.all_reduce(count)
    return count


def reduce_loss(loss: Tensor, info: DistInfo) -> Tensor:
    """The global batch's loss from each rank's share (a sum: each is already over the global
    token count). A detached scalar, the same on every rank."""
    total = loss.detach().clone()
    if info.distributed:
        dist.all_reduce(total)
    return total


def all_reduce_grads(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Sum the gradients of ``params`` over ranks, in place (data parallel, replicated model).

    One flat bucket per dtype, one all-reduce each: the LoRA gradients are small, so one
    collective beats one per tensor. Parameters without a gradient are skipped (the same on
    every rank: they are the frozen ones).
    """
    if not info.distributed:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) transformers model: the modules of the classes
    its ``_no_split_modules`` names (``GptOssDecoderLayer``), outermost first."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def decoder_stack(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The module that holds the decoder layers' list (``GptOssModel``: embeddings, layers,
    final norm) in ``model``."""
    name = next(n for n, m in model.named_modules() if m is layer)
    return model.get_submodule(name.rsplit(".", 2)[0])


def shard_model(
    model: nn.Module,
    info: DistInfo,
    *,
    mp_policy: object | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2-shard ``model`` over all ranks: one ``fully_shard`` unit per decoder layer, then the
    decoder stack that holds them (embeddings, final norm): the unit whose forward the training
    loop calls (it runs the stack and ``lm_head`` apart, :mod:`mxlora.engine.loop`). The output
    layer stays replicated (frozen; it is called in chunks, outside any unit).

    Call after LoRA is attached and before the optimizer is built (it must see the sharded
    parameters). Gradients are summed across ranks, not averaged: with the loss over the global
    token count that is the one-process gradient.

    Args:
        model: the model, on ``info.device``.
        info: from :func:`setup`.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (default: none, every
            parameter computes in its own dtype, as the unsharded model does).
        reshard_after_forward: free each layer's gathered parameters after its forward (and
            gather again for backward): the least memory; ``False`` keeps them until backward.

    Returns:
        ``model``, its parameters now ``DTensor`` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return model  # sharded already (a bench times several workloads on one model)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    _bytes_as_float8(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(decoder_stack(model, layers[0]), **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average; plain SUM collectives (gloo has no pre-multiplied sum).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _bytes_as_float8(model: nn.Module) -> None:
    """Re-register every uint8 parameter (the MXFP4 blocks and scales) as the same bytes viewed
    as ``float8_e5m2``, frozen.

    torch 2.11's ``fully_shard`` wraps each shard in ``nn.Parameter(...)`` (which defaults to
    ``requires_grad=True``) before copying the original flag, and integer tensors cannot require
    gradients; a 1-byte float dtype shards, gathers and frees the same bytes. The experts read
    them back with ``view(torch.uint8)``; nothing casts a sharded model's dtype afterwards.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == torch.uint8:
                as_float = param.detach().view(torch.float8_e5m2)
                module.register_parameter(name, nn.Parameter(as_float, requires_grad=False))


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "mxlora.cli") -> list[str]:
    """The command that runs ``python -m MODULE ARGV`` (default: ``mxlora ARGV``) in ``nproc``
    processes on this host under torchrun (its public entry, ``python -m torch.distributed.run``;
    ``--standalone`` picks a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *argv,
    ]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mxlora ARGV`` under torchrun with ``nproc`` processes; its exit code."""
    return subprocess.run(torchrun_command(nproc, argv), check=False).returncode
