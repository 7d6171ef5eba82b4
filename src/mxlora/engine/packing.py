"""Which rows each optimizer step trains on, and how they are packed into one sequence.

Row order is the one transformers' ``Trainer`` feeds TRL's ``SFTTrainer`` (the seed's): in epoch
``e`` a permutation ``torch.randperm(n)`` drawn from a generator seeded ``seed + e`` (accelerate's
``SeedableRandomSampler`` with ``data_seed``), cut into micro-batches of ``batch_size`` rows (the
last one shorter), ``grad_accum`` micro-batches per optimizer step (the epoch's last step takes
what is left). tests/test_engine.py checks the order against the Trainer's own dataloader.

A micro-batch's rows are concatenated into one sequence with positions restarting at 0 per row
(padding-free), then padded to a multiple of ``bucket`` tokens so compiled code sees few shapes.
The loss positions are those whose next token is an assistant (completion) token of the same
row: the hidden state at position ``p`` predicts token ``p + 1``. They are padded to the packed
length (target :data:`IGNORE`, which the cross-entropy skips), so every tensor a micro-batch
feeds the model and the loss has a shape set by its bucket alone: one packed length, one set of
shapes (what a CUDA graph per bucket needs, and what keeps compiled code from recompiling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Packed lengths are rounded up to a multiple of this (flex_attention's block size).
BUCKET = 128
# The target of a padding loss position: cross-entropy's ``ignore_index`` (no loss, no gradient).
IGNORE = -100


@dataclass
class Step:
    """One optimizer step: its micro-batches (row indices) and where it sits in the run.

    Attributes:
        number: 1-based optimizer step.
        epoch: 0-based epoch it belongs to.
        micro_batches: row indices of each micro-batch, in the Trainer's order.
        epoch_progress: the Trainer's ``state.epoch`` after this step (epoch + fraction done).
        ends_epoch: the last step of its epoch.
    """

    number: int
    epoch: int
    micro_batches: list[list[int]]
    epoch_progress: float
    ends_epoch: bool


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The Trainer's shuffled row order of ``epoch`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(rows, generator=generator).tolist()


def steps_per_epoch(rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (the Trainer's ``num_update_steps_per_epoch``)."""
    batches = math.ceil(rows / batch_size)
    return max(math.ceil(batches / grad_accum), 1)


def total_steps(rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set, else ``ceil(epochs x steps/epoch)``."""
    if max_steps > 0:
        return max_steps
    return math.ceil(epochs * steps_per_epoch(rows, batch_size, grad_accum))


def plan_steps(
    rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int, seed: int
) -> list[Step]:
    """Every optimizer step of the run, in order."""
    total = total_steps(rows, batch_size, grad_accum, epochs, max_steps)
    steps: list[Step] = []
    epoch = 0
    while len(steps) < total:
        order = epoch_order(rows, seed, epoch)
        batches = [order[i : i + batch_size] for i in range(0, rows, batch_size)]
        groups = [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
        done = 0
        for k, group in enumerate(groups):
            if len(steps) == total:
                break
            done += len(group)
            steps.append(
                Step(
                    number=len(steps) + 1,
                    epoch=epoch,
                    micro_batches=group,
                    epoch_progress=epoch + done / len(batches),
                    ends_epoch=k == len(groups) - 1,
                )
            )
        epoch += 1
    return steps


@dataclass
class PackedBatch:
    """Rows concatenated into one padded sequence (batch dimension 1).

    Attributes:
        input_ids: ``[1, L]`` token ids, ``L`` a multiple of the bucket; padding is ``pad_id``.
        position_ids: ``[1, L]`` positions restarting at 0 for every row (0 on padding).
        doc_ids: ``[L]`` int32 row index within the batch, ``-1`` on padding.
        loss_positions: ``[L]`` positions whose next token carries loss, then ``0`` up to ``L``.
        loss_targets: ``[L]`` those next tokens, then :data:`IGNORE` up to ``L``.
        cu_seqlens: int32 ``[rows + 2]``: where each row starts, where the padding starts, and
            ``L`` (the padding a sequence of its own, empty when there is none).
        tokens: non-pad tokens.
        rows: rows packed.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    loss_positions: torch.Tensor
    loss_targets: torch.Tensor
    cu_seqlens: torch.Tensor
    tokens: int
    rows: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> PackedBatch:
        move = {"non_blocking": True}
        return PackedBatch(
            self.input_ids.to(device, **move),
            self.position_ids.to(device, **move),
            self.doc_ids.to(device, **move),
            self.loss_positions.to(device, **move),
            self.loss_targets.to(device, **move),
            self.cu_seqlens.to(device, **move),
            self.tokens,
            self.rows,
        )


def bucketed(length: int, bucket: int = BUCKET) -> int:
    """``length`` rounded up to a multiple of ``bucket``."""
    return max(math.ceil(length / bucket), 1) * bucket


def longest_packed(
    lengths: Sequence[int],
    plan: Sequence[Step],
    split: Callable[[list[int]], list[list[int]]] | None = None,
) -> int:
    """Tokens of the plan's longest micro-batch once packed (bucketed): what the memory plan
    (:mod:`mxlora.engine.memory`) sizes for.

    Args:
        lengths: each train row's token count.
        plan: the run's steps (:func:`plan_steps`).
        split: the rows each process packs of a micro-batch (several processes); default: one
            process packs them all.
    """
    split = split or (lambda rows: [rows])
    return max(
        bucketed(sum(lengths[i] for i in share))
        for step in plan
        for rows in step.micro_batches
        for share in split(rows)
    )


def pack(
    input_ids: Sequence[Sequence[int]],
    completion_masks: Sequence[Sequence[int]],
    pad_id: int,
    bucket: int = BUCKET,
) -> PackedBatch:
    """Concatenate rows into one sequence padded to a multiple of ``bucket``.

    Args:
        input_ids: token ids per row.
        completion_masks: 1 on the tokens that carry loss (assistant tokens), per row.
        pad_id: the tokenizer's pad id.
        bucket: pad the packed length up to a multiple of this.
    """
    ids: list[int] = []
    positions: list[int] = []
    docs: list[int] = []
    starts: list[int] = []
    loss_pos: list[int] = []
    targets: list[int] = []
    for row, (row_ids, mask) in enumerate(zip(input_ids, completion_masks, strict=True)):
        start = len(ids)
        starts.append(start)
        ids.extend(row_ids)
        positions.extend(range(len(row_ids)))
        docs.extend([row] * len(row_ids))
        for i in range(1, len(row_ids)):
            if mask[i]:
                loss_pos.append(start + i - 1)
                targets.append(row_ids[i])
    tokens = len(ids)
    length = bucketed(tokens, bucket)
    pad = length - tokens
    unused = length - len(loss_pos)
    return PackedBatch(
        input_ids=torch.tensor([ids + [pad_id] * pad]),
        position_ids=torch.tensor([positions + [0] * pad]),
        doc_ids=torch.tensor(docs + [-1] * pad, dtype=torch.int32),
        loss_positions=torch.tensor(loss_pos + [0] * unused, dtype=torch.long),
        loss_targets=torch.tensor(targets + [IGNORE] * unused, dtype=torch.long),
        cu_seqlens=torch.tensor(starts + [tokens, length], dtype=torch.int32),
        tokens=tokens,
        rows=len(input_ids),
    )
