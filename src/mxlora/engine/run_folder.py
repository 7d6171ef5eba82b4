"""Run-folder pieces both training engines share: errors, checkpoints, the adapter folder.

A checkpoint counts only once its completion marker is written (after every file of it), so
``--resume`` never loads a half-written one; the adapter folder appears by one rename of a
finished temp folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mxlora.report.metrics import peak_device_gb
from mxlora.staging import fsync_tree, swap_in

if TYPE_CHECKING:
    from mxlora.config import TrainingConfig

# Written into checkpoint-N/ after everything else of it: a checkpoint without it is partial.
COMPLETE_MARKER = "mxlora-complete"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on (one-line message)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or Inf."""


def nonfinite_message(loss: float, step: int, micro_index: int, accum: int) -> str:
    """The NaN/Inf stop message, naming the optimizer step and the micro-batch."""
    batch = (step - 1) * accum + micro_index
    return (
        f"loss is {loss} at step {step}, batch {batch} (0-based, counted from the "
        f"start of training; micro-batch {micro_index} of {accum} in that step). "
        "Lower train.lr, check the data rows of that batch, or use model.dtype=float32."
    )


def oom_message(cfg: TrainingConfig, device: torch.device, when: str) -> str:
    """What ran out, and the knobs that lower memory, with their current values."""
    peak, _ = peak_device_gb(device)
    where = f"{device}" + (f", peak {peak:.1f} GB allocated" if peak is not None else "")
    t, lora = cfg.train, cfg.lora
    return (
        f"out of memory while {when} ({where}). To lower memory: train.batch_size "
        f"(now {t.batch_size}; raise train.grad_accum, now {t.grad_accum}, to keep the effective "
        f"batch), train.max_len (now {t.max_len}), fewer LoRA targets (lora.target_modules, "
        f"now {lora.target_modules}; lora.experts.layers, now {lora.experts.layers}), or hold "
        f"the experts more compactly (model.experts, now {cfg.model.experts!r})."
    )


def is_host_oom(error: RuntimeError) -> bool:
    """A CPU allocation failure (PyTorch raises a plain RuntimeError for it)."""
    text = str(error)
    return "DefaultCPUAllocator" in text and "memory" in text


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """N of ``checkpoint-N``."""
    return int(path.name.rsplit("-", 1)[1])


def mark_complete(
    folder: Path,
    step: int,
    keep: int | None,
    before_marker: Callable[[Path], None] | None = None,
) -> None:
    """Flush a written checkpoint, write its marker, then drop all but the newest complete ones.

    Args:
        folder: the written ``checkpoint-N``.
        step: N.
        keep: complete checkpoints kept (``train.save_total_limit``); ``None`` keeps all.
        before_marker: writes what else belongs in the checkpoint (the run's times) before it
            counts as complete.
    """
    if before_marker is not None:
        before_marker(folder)
    marker = folder / COMPLETE_MARKER
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(f"{step}\n")
    fsync_tree(folder)
    tmp.replace(marker)
    rotate_checkpoints(folder.parent, keep)


def rotate_checkpoints(folder: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``None``: keep all).

    Only complete checkpoints count and only they are deleted: a partial one (being written,
    or left by a kill) never pushes a complete one out.

    Returns:
        The deleted folders.
    """
    if keep is None:
        return []
    old = complete_checkpoints(folder)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def save_adapter(
    model: torch.nn.Module, dest: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the PEFT adapter so that ``dest`` is either absent or complete, never partial.

    It is written into a temp folder beside ``dest`` and renamed into place in one step.
    ``state_dict``: the adapter's tensors when the model's own are shards (FSDP2), gathered.
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    fsync_tree(tmp)
    swap_in(tmp, dest)
