"""Cross-entropy over the trained positions without the full logits.

gpt-oss's vocabulary has 201,088 tokens: the logits of a 4 x 2048 batch are 3.3 GB in bf16 (twice
that in fp32 for the loss). Only assistant tokens carry loss, so the hidden states of those
positions are selected first, then pushed through ``lm_head`` a chunk at a time; with more than
one chunk each chunk's logits are recomputed in the backward (activation checkpointing per
chunk), so at most one chunk's ``[chunk, vocab]`` logits exist at any time. A single chunk is not
checkpointed: its logits live only from the loss's forward to its own backward, which follows at
once, so recomputing them would save no memory.

Positions may be padded (target ``-100``, cross-entropy's ``ignore_index``: no loss, no
gradient) so that the shapes, and the number of chunks, depend on the packed length alone.

:func:`reference_loss` is the oracle: full logits for every position, then the same selection.
Both return the *sum* of the per-token cross-entropies (fp32); the caller divides by the number of
trained tokens of the optimizer step (TRL's ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Positions per lm_head chunk: [1024, 201088] fp32 logits are 0.8 GB.
CHUNK = 1024


def _chunk_ce(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    # As transformers' ForCausalLMLoss: the logits upcast to fp32 before the cross-entropy.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunked_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    positions: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Summed cross-entropy of ``targets`` predicted from ``hidden[positions]``.

    Args:
        hidden: ``[T, hidden]`` final hidden states (after the final norm).
        lm_head: the output projection (any module, LoRA on it included).
        positions: ``[N]`` positions that carry loss.
        targets: ``[N]`` the tokens they predict; ``-100`` on padding positions (ignored).
        chunk: positions per ``lm_head`` call.

    Returns:
        A 0-dim fp32 tensor.
    """
    selected = hidden.index_select(0, positions)
    if selected.shape[0] <= chunk:
        return _chunk_ce(lm_head, selected, targets)
    # The chunk's recompute must draw the same random numbers only if lm_head has dropout (a
    # LoRA on it); saving the CUDA RNG state cannot be captured in a CUDA graph, so only then.
    random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm_head.modules())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk):
        total = total + checkpoint(
            _chunk_ce,
            lm_head,
            selected[start : start + chunk],
            targets[start : start + chunk],
            use_reentrant=False,
            preserve_rng_state=random,
        )
    return total


def reference_loss(
    hidden: torch.Tensor, lm_head: torch.nn.Module, positions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """:func:`chunked_loss` the plain way: logits of every position, then the selection."""
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits[positions], targets, reduction="sum")
