"""mxlora's training loop: the seed's semantics, packed rows, no full logits, few launches.

Per optimizer step: the step's micro-batches (the Trainer's rows and order,
:func:`mxlora.engine.packing.plan_steps`) are each packed into one sequence and run through the
decoder with the packed attention (:mod:`mxlora.engine.attention`, registered with transformers'
``AttentionInterface`` and handed the document masks in place of the model's causal masks); the
loss is the chunked cross-entropy over the assistant positions (:mod:`mxlora.engine.loss`),
summed over the step and divided by the step's assistant-token count (TRL's
``num_items_in_batch``), so the step's loss is the mean cross-entropy over its assistant tokens.
A micro-batch's shapes follow its packed length (bucket) alone, so on CUDA its forward, loss and
backward can be captured once per bucket as a CUDA graph and replayed
(:mod:`mxlora.engine.graphs`, ``train.cuda_graphs``). Then, as transformers' ``Trainer``
does: gradient clipping to ``train.max_grad_norm``, fused AdamW (betas 0.9 / 0.999, eps 1e-8: ``TrainingArguments``' defaults; ``train.weight_decay``), the
scheduler from transformers' ``get_scheduler``, gradients zeroed.

Per run (:meth:`Loop.prepared`): gradient checkpointing when the activations would not fit
(:mod:`mxlora.engine.memory`); the decoder blocks compiled when the longest bucket is long enough
for compiled code to pay its compile time (:func:`use_compile`); flex_attention under compiled
blocks on CUDA (block-sparse: pays on long sequences), else flash attention's varlen kernels
(CUDA, bf16) or SDPA with the sink key (no compile either way); in eager blocks on CUDA the
norms and the rotary embeddings as one Triton kernel each way (:mod:`mxlora.engine.norm`,
:mod:`mxlora.engine.rotary`, bf16); CUDA graphs where they can run (:func:`use_cuda_graphs`).

Under a launcher (torchrun, ``mxlora train --nproc N``; :mod:`mxlora.distributed`) the plan is
the same global plan: each rank packs its contiguous share of every micro-batch
(:func:`mxlora.distributed.rank_share`), the loss is divided by the step's *global*
assistant-token count (every rank holds all rows, so it is counted on the host with no
collective), and the LoRA gradients are summed over ranks before clipping (one flat all-reduce;
FSDP2 sums them itself): every rank takes the one-process optimizer step. With data parallel the
micro-steps hold no collective, so each rank replays its CUDA graphs as one process does. Rank 0
alone writes metrics, checkpoints and the ``should_stop`` decision, which it broadcasts.

After every step: a train row every ``logging_steps``, the held-out loss at each epoch end (and
at the last step) or every ``eval_steps``, a checkpoint every ``save_steps``, then the
``should_stop`` hook: when it returns True a complete checkpoint is written and the loop returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.helpers import disable_input_dtype_casting
from torch.utils.checkpoint import checkpoint
from transformers import get_scheduler

from mxlora.config import TrainingConfig
from mxlora.distributed import DistInfo, all_reduce_grads, rank_share, rank_shares, shard_model
from mxlora.engine.attention import Kind, build_masks, flash_varlen_available, register
from mxlora.engine.graphs import GraphedSteps, StepInputs, worth_capturing
from mxlora.engine.loss import chunked_loss
from mxlora.engine.memory import (
    NO_KERNELS,
    EagerKernels,
    activations_fit,
    checkpointed_blocks,
)
from mxlora.engine.norm import fused_norms
from mxlora.engine.packing import (
    PackedBatch,
    Step,
    bucketed,
    longest_packed,
    pack,
    plan_steps,
)
from mxlora.engine.rotary import fused_rotary_embeddings
from mxlora.engine.run_folder import (
    NonFiniteLossError,
    TrainingError,
    is_host_oom,
    mark_complete,
    nonfinite_message,
    oom_message,
)
from mxlora.model.load import held_experts
from mxlora.mxfp4.experts import padding_skipped
from mxlora.mxfp4.kernels import TORCH, TRITON, resolve_backend
from mxlora.report.metrics import MetricsLog
from mxlora.report.writer import write_json

# TrainingArguments' defaults (the seed's optimizer): adamw_torch_fused.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# train.compile=auto compiles the decoder blocks when the run's longest packed micro-batch has at
# least this many tokens. Below it the cold compile (minutes on gpt-oss-20b) costs more than a
# short run's steps can win back: short steps are host-bound, and CUDA graphs remove that host
# time without a compile; long steps are GPU-bound, where inductor's fusions and flex_attention's
# block sparsity pay. To be calibrated from GPU measurements (docs/BENCHMARKS.md).
COMPILE_MIN_TOKENS = 4096


@dataclass
class LoopResult:
    """What the loop leaves for the report.

    Attributes:
        steps: optimizer steps done, whole run (a resumed run counts the earlier ones).
        epoch: the Trainer's ``state.epoch`` at the end (epochs done, fractional).
        tokens: non-pad tokens trained, whole run.
        stopped: ``should_stop`` ended the run early (a checkpoint holds where it stopped).
        compiled: the decoder blocks ran under ``torch.compile``.
        checkpointed: decoder blocks (the first ones) that recomputed their activations in the
            backward (:mod:`mxlora.engine.memory`).
        blocks: decoder blocks of the model.
        longest_tokens: tokens of the longest packed micro-batch a process runs (bucketed).
        cuda_graphs: micro-steps were replayed from CUDA graphs (one per bucket).
        attention: the packed attention's implementation (:data:`mxlora.engine.attention.Kind`).
    """

    steps: int
    epoch: float
    tokens: int
    stopped: bool
    compiled: bool
    checkpointed: int
    blocks: int
    longest_tokens: int
    cuda_graphs: bool = False
    attention: str = "sdpa"

    @property
    def checkpointed_blocks(self) -> str:
        """``"k of n"``, as reports show it."""
        return f"{self.checkpointed} of {self.blocks}"


@dataclass(frozen=True)
class Setup:
    """What a run decided (see :meth:`Loop.prepared`)."""

    checkpointed: int
    compiled: bool
    cuda_graphs: bool
    attention: Kind
    # The fused paths eager blocks run (none for compiled blocks): their norms and rotary
    # embeddings as Triton ops (``fused_norm``: mxlora.engine.norm, .rotary), and what the
    # memory estimate counts.
    kernels: EagerKernels = NO_KERNELS


@dataclass
class History:
    """Per optimizer step of this process: loss, non-pad tokens, packed (bucketed) tokens."""

    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    packed: list[int] = field(default_factory=list)


def use_compile(setting: bool | str, device: torch.device, longest: int) -> bool:
    """Resolve ``train.compile``: ``auto`` compiles on CUDA (CPU runs stay quick to start) when
    the longest packed micro-batch has :data:`COMPILE_MIN_TOKENS` tokens or more."""
    if setting == "auto":
        return device.type == "cuda" and longest >= COMPILE_MIN_TOKENS
    return bool(setting)


def attention_kind(device: torch.device, compiled: bool, dtype: torch.dtype, head_dim: int) -> Kind:
    """flex_attention under compiled blocks on CUDA (it needs compiling; its block sparsity pays
    on long sequences); else flash attention's varlen kernels where they run (CUDA, bf16/fp16:
    no mask, no padded head dimension), else SDPA with the sink key (CPU, fp32)."""
    if device.type == "cuda" and compiled:
        return "flex"
    return "varlen" if flash_varlen_available(device, dtype, head_dim) else "sdpa"


def eager_kernels(
    device: torch.device, dtype: torch.dtype, compiled: bool, head_dim: int, experts: str
) -> EagerKernels:
    """Which fused paths eager blocks run (:class:`mxlora.engine.memory.EagerKernels`, which
    counts what they keep): flash varlen attention, the Triton gate of MXFP4 experts and the
    Triton RMSNorm (:mod:`mxlora.engine.norm`, in bf16/fp16: fp32 runs keep transformers' exact
    formula) on CUDA, the hand-differentiated experts block on the ``torch`` backend; none for
    compiled blocks, which inductor fuses itself."""
    if compiled:
        return NO_KERNELS
    backend = resolve_backend(device)
    triton = backend == TRITON
    return EagerKernels(
        varlen=attention_kind(device, compiled, dtype, head_dim) == "varlen",
        fused_gate=experts == "mxfp4" and triton,
        fused_norm=device.type == "cuda" and dtype != torch.float32 and triton,
        torch_block=experts == "mxfp4" and backend == TORCH,
    )


def use_cuda_graphs(
    setting: bool | str,
    device: torch.device,
    sharded: bool,
    checkpointing: bool,
    compiled: bool,
    dtype: torch.dtype,
    fits_twice: bool | None,
) -> bool:
    """Resolve ``train.cuda_graphs``.

    ``auto`` captures on CUDA without FSDP and without gradient checkpointing, around eager
    blocks (the launch-bound short steps; compiled blocks run the long, GPU-bound ones, where a
    graph saves little), when twice the longest micro-batch's activations fit (``fits_twice``:
    the graphs' memory pool keeps the largest bucket's activations while a new bucket's first
    micro-batch runs eagerly), in bf16. Data parallel is no obstacle: its one collective, the
    gradients' all-reduce, comes after the step's micro-steps, outside what is captured.
    ``true`` (with compiled blocks too, if asked) where it cannot work stops with the reason:
    the CPU has no CUDA graphs; FSDP (``sharded``) gathers and reduces inside the forward and
    backward, collectives between the ranks that a replay could not hold; checkpointing saves
    the CUDA RNG state, which a capture forbids; outside bf16, torch's ``grouped_mm`` on CUDA
    copies its offsets to the host (its non-bf16 fallback), which a capture forbids too.
    """
    if setting == "auto":
        return (
            device.type == "cuda"
            and not sharded
            and not checkpointing
            and not compiled
            and dtype == torch.bfloat16
            and bool(fits_twice)
        )
    if not setting:
        return False
    if device.type != "cuda":
        raise TrainingError(f"train.cuda_graphs: true needs a CUDA device (training on {device})")
    if sharded:
        raise TrainingError(
            "train.cuda_graphs: true cannot run with FSDP (train.fsdp: its gathers run inside "
            "the step); set train.cuda_graphs=false"
        )
    if checkpointing:
        raise TrainingError(
            "train.cuda_graphs: true cannot capture gradient checkpointing (it saves the CUDA "
            "RNG state); set train.gradient_checkpointing=false or train.cuda_graphs=false"
        )
    if dtype != torch.bfloat16:
        raise TrainingError(
            f"train.cuda_graphs: true needs bf16 (model.dtype is {dtype}: torch's grouped_mm "
            "copies its offsets to the host in other dtypes); set train.cuda_graphs=false"
        )
    return True


def plan_step(
    cfg: TrainingConfig,
    model: torch.nn.Module,
    experts: str,
    longest: int,
    dtype: torch.dtype,
    device: torch.device,
    sharded: bool,
    held_gb: float | None = None,
) -> Setup:
    """How the engine runs ``cfg``'s steps (see the module docstring): blocks checkpointed,
    compiled or not, CUDA graphs, attention. ``model``: the PEFT model (meta device is fine);
    ``longest``: tokens of the longest packed micro-batch; ``held_gb``: device memory already
    held (``None``: what CUDA has allocated); ``sharded``: FSDP2 over several processes.
    ``true`` settings that cannot work here raise :class:`TrainingError`."""
    t = cfg.train
    compiled = use_compile(t.compile, device, longest)
    head_dim = model.config.head_dim
    attention = attention_kind(device, compiled, dtype, head_dim)
    kernels = eager_kernels(device, dtype, compiled, head_dim, experts)
    budget = (longest, dtype, device, t.memory_budget_gb, compiled)
    checkpointed = checkpointed_blocks(
        t.gradient_checkpointing, model, experts, *budget, held_gb, kernels=kernels
    )
    fits_twice = activations_fit(
        model, experts, *budget, copies=2, held_gb=held_gb, kernels=kernels
    )
    graphs = use_cuda_graphs(
        t.cuda_graphs, device, sharded, checkpointed > 0, compiled, dtype, fits_twice
    )
    return Setup(checkpointed, compiled, graphs, attention, kernels)


@contextlib.contextmanager
def loud_compile(active: bool) -> Iterator[None]:
    """Make a failing or endlessly recompiling ``torch.compile`` stop the run with a message.

    Inside, the decoder blocks are compiled with ``fullgraph=True`` (a graph break is an error)
    and hitting dynamo's recompile limit raises instead of quietly running eager.
    """
    if not active:
        yield
        return
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        try:
            yield
        except Exception as e:
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise TrainingError(
                    f"train.compile: torch.compile of the decoder blocks failed "
                    f"({type(e).__name__}: {first}); set train.compile=false to train without it"
                ) from e
            raise


def forward_loss(
    model: torch.nn.Module, batch: PackedBatch, attention: Kind, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """Summed cross-entropy of one packed micro-batch (``model``: the ``...ForCausalLM``;
    ``dtype``: the compute dtype, that of the attention's inputs; ``backend``: the loss
    kernel's, :func:`mxlora.engine.loss.chunked_loss`)."""
    masks = build_masks(
        batch.doc_ids, model.config.sliding_window, attention, dtype, batch.cu_seqlens
    )
    # No KV cache: training never reads one, and a checkpointed block's recompute would append
    # its keys and values a second time.
    out = model.model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=masks,
        use_cache=False,
    )
    hidden = out.last_hidden_state[0]
    return chunked_loss(hidden, model.lm_head, batch.loss_positions, batch.loss_targets, backend)


class Loop:
    """One training run of the mxlora engine (see the module docstring).

    Args:
        cfg: the training config.
        model: the PEFT model (LoRA attached).
        train_rows: ``input_ids`` and ``completion_mask`` lists of the train split.
        eval_rows: the same for the eval split, or ``None``.
        pad_id: the tokenizer's pad id (fills the bucket padding).
        device: the training device.
        dtype: the training dtype (bf16 runs under autocast, as the Trainer's ``bf16=True``).
        metrics: where rows go.
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``).
        before_marker: writes what else belongs in each checkpoint before it counts as
            complete (the run's times).
        on_checkpoint: called after each complete checkpoint (publishes a new run folder).
        info: this process's place in a multi-process job (default: one process).
        sharded: FSDP2-shard the model over the job's ranks here, before the optimizer is built
            (:func:`mxlora.distributed.shard_model`): its gradients arrive summed, checkpoints
            gather the full LoRA tensors.
    """

    def __init__(
        self,
        cfg: TrainingConfig,
        model: torch.nn.Module,
        train_rows: dict[str, list[list[int]]],
        eval_rows: dict[str, list[list[int]]] | None,
        pad_id: int,
        device: torch.device,
        dtype: torch.dtype,
        metrics: MetricsLog,
        run_dir: Path,
        before_marker: Callable[[Path], None] | None = None,
        on_checkpoint: Callable[[], None] | None = None,
        info: DistInfo | None = None,
        sharded: bool = False,
    ) -> None:
        self.info = info or DistInfo(device=device)
        self.sharded = sharded
        self.cfg, self.model, self.device, self.dtype = cfg, model, device, dtype
        self.train_rows, self.eval_rows, self.pad_id = train_rows, eval_rows, pad_id
        self.metrics, self.run_dir = metrics, run_dir
        self.before_marker, self.on_checkpoint = before_marker, on_checkpoint
        # The loss's kernels (mxlora.engine.loss), chosen once for the device.
        self.backend = resolve_backend(device)
        t = cfg.train
        self.causal_lm = model.get_base_model()
        self.plan: list[Step] = plan_steps(
            len(train_rows["input_ids"]), t.batch_size, t.grad_accum, t.epochs, t.max_steps, t.seed
        )
        self.longest = longest_packed(
            [len(ids) for ids in train_rows["input_ids"]],
            self.plan,
            lambda rows: rank_shares(rows, self.info.world_size),
        )
        if self.info.world_size > 1 and t.batch_size < self.info.world_size:
            raise TrainingError(
                f"train.batch_size: {t.batch_size} rows per micro-batch cannot give each of "
                f"{self.info.world_size} processes a row"
            )
        self.attention: Kind = "sdpa"  # decided per run (prepared)
        self.graphed: GraphedSteps | None = None
        # A step's first micro-batch, packed by the step before for its capture ahead: step
        # number -> the packed batch, so that no micro-batch is packed twice.
        self._packed_ahead: dict[int, PackedBatch] = {}
        if sharded:
            shard_model(model, self.info)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=t.weight_decay,
            fused=True,
        )
        total = len(self.plan)
        warmup = int(t.warmup) if t.warmup >= 1 else math.ceil(total * t.warmup)
        self.scheduler = get_scheduler(
            t.scheduler,
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=(
                {"min_lr_rate": t.min_lr_rate} if t.scheduler == "cosine_with_min_lr" else None
            ),
        )
        self.step = 0
        self.tokens = 0
        self.grad_norm: float | None = None
        self.learning_rate: float | None = None
        self.history = History()

    # ----------------------------------------------------------------------------------------

    def run(
        self, resume_from: Path | None = None, should_stop: Callable[[], bool] | None = None
    ) -> LoopResult:
        """Train to the end of the plan (or until ``should_stop``); see the module docstring."""
        t = self.cfg.train
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.metrics.begin(self.tokens, len(self.plan))
        stopped = False
        with self.prepared() as setup:
            window: list[float] = []
            steps = self.plan[self.step :]
            for step, upcoming in zip(steps, [*steps[1:], None], strict=True):
                window.append(self.train_step(step, upcoming))
                if step.number % t.logging_steps == 0 and self.info.is_main:
                    self.metrics.log_train(
                        step.number,
                        step.epoch_progress,
                        sum(window) / len(window),
                        self.grad_norm,
                        self.learning_rate,
                        self.tokens,
                    )
                    window = []
                if self.eval_rows is not None and self._eval_due(step):
                    eval_loss = self.evaluate()
                    if self.info.is_main:
                        self.metrics.log_eval(step.number, eval_loss)
                saved = step.number % t.save_steps == 0
                if saved:
                    self.save_checkpoint()
                more = step.number < len(self.plan)  # after the last step the run is done
                if more and should_stop is not None and self._agreed(should_stop):
                    if not saved:
                        self.save_checkpoint()
                    stopped = True
                    break
        last = self.plan[self.step - 1] if self.step else None
        return LoopResult(
            steps=self.step,
            epoch=last.epoch_progress if last else 0.0,
            tokens=self.tokens,
            stopped=stopped,
            compiled=setup.compiled,
            checkpointed=setup.checkpointed,
            blocks=len(self.causal_lm.model.layers),
            longest_tokens=self.longest,
            cuda_graphs=setup.cuda_graphs,
            attention=setup.attention,
        )

    def _agreed(self, should_stop: Callable[[], bool]) -> bool:
        """Rank 0's ``should_stop``, on every rank (all stop after the same step)."""
        if not self.info.distributed:
            return should_stop()
        flag = torch.tensor([int(self.info.is_main and should_stop())], device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def _eval_due(self, step: Step) -> bool:
        """``train.eval``: at each epoch end (and the last step), or every ``eval_steps``."""
        t = self.cfg.train
        if t.eval == "epoch":
            return step.ends_epoch or step.number == len(self.plan)
        return t.eval == "steps" and step.number % t.eval_steps == 0

    def decide(self) -> Setup:
        """The run's checkpointing, compile, CUDA graphs and attention (:func:`plan_step`)."""
        return plan_step(
            self.cfg,
            self.model,
            held_experts(self.model),
            self.longest,
            self.dtype,
            self.device,
            self.sharded,
        )

    @contextlib.contextmanager
    def prepared(self) -> Iterator[Setup]:
        """For the loop's duration: the packed attention, the first blocks checkpointed, the
        blocks compiled (a failing compile stops the run with a message) and, with CUDA graphs,
        the graphed micro-step, gradients allocated once and everything on the graphs' stream."""
        setup = self.decide()
        lm = self.causal_lm
        before = lm.config._attn_implementation
        lm.set_attn_implementation(register())
        self.attention = setup.attention
        stream = contextlib.nullcontext()
        if setup.cuda_graphs:
            self.graphed = GraphedSteps(self._micro_step, self.device, self.capture_lengths())
            stream = self.graphed.on_stream()
        try:
            # PEFT casts each LoRA layer's input to its fp32 factors' dtype, and autocast casts
            # it back to bf16 for the matmul: an exact round trip of two copies a layer, each
            # way. Off while the loop runs (under autocast only; without it nothing is cast).
            with (
                blocks_attached(lm.model.layers, setup.checkpointed, setup.compiled),
                stream,
                loud_compile(setup.compiled),
                disable_input_dtype_casting(self.model, active=self.dtype != torch.float32),
                fused_norms(lm, setup.kernels.fused_norm),
                fused_rotary_embeddings(setup.kernels.fused_norm),
            ):
                if setup.cuda_graphs:
                    for p in self.params:  # the captured backward accumulates into these
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                yield setup
        finally:
            self.graphed = None
            lm.set_attn_implementation(before)

    def capture_lengths(self) -> set[int]:
        """The packed lengths (buckets) worth a CUDA graph (:func:`worth_capturing`) among this
        process's shares of the micro-batches still to run: what it packs and runs, not the
        global micro-batches (several processes each pack a part of one)."""
        rows = self.train_rows["input_ids"]
        return worth_capturing(
            bucketed(sum(len(rows[i]) for i in self._share(indices)[0]))
            for step in self.plan[self.step :]
            for indices in step.micro_batches
        )

    def _autocast(self):
        # No cast cache: a cast cached during a CUDA graph capture would be replayed stale.
        return torch.autocast(
            self.device.type,
            dtype=self.dtype,
            enabled=self.dtype != torch.float32,
            cache_enabled=False,
        )

    def _micro_step(self, inputs: StepInputs) -> torch.Tensor:
        """Forward, loss and backward of one packed micro-batch, what a CUDA graph captures
        (no host sync): its summed cross-entropy times its weight over the step's assistant
        tokens, backpropagated into the ``.grad``s; returns that loss, detached."""
        # The bucket's padding (from cu_seqlens[-2] on) takes no expert work, in the forward
        # and in a checkpointed block's recompute alike.
        with padding_skipped(self.causal_lm, inputs.batch.cu_seqlens[-2]):
            with self._autocast():
                total = forward_loss(
                    self.causal_lm, inputs.batch, self.attention, self.dtype, self.backend
                )
                loss = total * inputs.weight / inputs.items
            loss.backward()
        return loss.detach()

    def _pack(self, rows: dict[str, list[list[int]]], indices: list[int]) -> PackedBatch:
        return pack(
            [rows["input_ids"][i] for i in indices],
            [rows["completion_mask"][i] for i in indices],
            self.pad_id,
        )

    def _counts(self, rows: dict[str, list[list[int]]], indices: list[int]) -> tuple[int, int]:
        """Loss tokens and non-pad tokens of rows ``indices`` (as :func:`pack` counts them), on
        the host: every rank holds every row, so the global count needs no collective."""
        loss = sum(sum(rows["completion_mask"][i][1:]) for i in indices)
        return loss, sum(len(rows["input_ids"][i]) for i in indices)

    def _share(self, indices: list[int], info: DistInfo | None = None) -> tuple[list[int], int]:
        """A rank's rows of a global (micro-)batch and their weight (:func:`rank_share`);
        ``info``: which rank (default this one)."""
        return rank_share(indices, info or self.info)

    def _packed_over_ranks(self, indices: list[int]) -> int:
        """Packed (bucketed) tokens of a micro-batch summed over the ranks' weighted shares (on
        the host: every rank holds every row)."""
        lengths = self.train_rows["input_ids"]
        total = 0
        for rank in range(self.info.world_size):
            here, scale = self._share(indices, dataclasses.replace(self.info, rank=rank))
            if scale:
                total += bucketed(sum(len(lengths[i]) for i in here))
        return total

    def train_step(self, step: Step, upcoming: Step | None = None) -> float:
        """One optimizer step; its loss (mean cross-entropy over its assistant tokens).
        ``upcoming``: the step after it. With CUDA graphs, each micro-batch's successor (the
        next step's first, after the last) has its new bucket captured while the device runs
        the micro-batch (:meth:`GraphedSteps.ahead`)."""
        self.model.train()
        counts = [self._counts(self.train_rows, rows) for rows in step.micro_batches]
        items = max(sum(c[0] for c in counts), 1)  # the global batch's assistant tokens
        step_tokens = sum(c[1] for c in counts)
        shares = [self._share(rows) for rows in step.micro_batches]
        first = self._packed_ahead.pop(step.number, None)
        batches = [
            first if i == 0 and first is not None else self._pack(self.train_rows, here)
            for i, (here, _) in enumerate(shares)
        ]
        coming = batches[1:]  # each micro-batch's successor, the next step's first included
        if self.graphed is not None and upcoming is not None:
            following = self._pack(self.train_rows, self._share(upcoming.micro_batches[0])[0])
            self._packed_ahead = {upcoming.number: following}
            coming.append(following)
        start = time.perf_counter()
        try:
            losses = []
            for index, (batch, (_, scale)) in enumerate(zip(batches, shares, strict=True)):
                if self.graphed is not None:
                    losses.append(self.graphed(batch, scale, items))
                    if index < len(coming):  # its bucket captured while the device runs this
                        self.graphed.ahead(coming[index])
                else:
                    inputs = StepInputs.create(batch, scale, items, self.device)
                    losses.append(self._micro_step(inputs))
            stacked = torch.stack(losses)
            if self.info.distributed:
                # Each rank's loss is its share of the global mean: the sum is the step's loss.
                torch.distributed.all_reduce(stacked)
                # FSDP2 reduce-scatters the sharded ones' summed gradients itself.
                all_reduce_grads([p for p in self.params if not _is_dtensor(p)], self.info)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
            grad_norm = _full(grad_norm)
            values = stacked.tolist()  # the step's one host sync
        except torch.OutOfMemoryError:
            raise TrainingError(oom_message(self.cfg, self.device, f"step {step.number}")) from None
        except RuntimeError as e:
            if is_host_oom(e):
                raise TrainingError(
                    oom_message(self.cfg, self.device, f"step {step.number}")
                ) from None
            raise
        for index, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    nonfinite_message(value, step.number, index, self.cfg.train.grad_accum)
                )
        self.learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        # Kept allocated under CUDA graphs: the captured backward adds into these tensors.
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the work, not its queueing
        self.metrics.step_done(time.perf_counter() - start)
        self.grad_norm = float(grad_norm)
        self.step = step.number
        self.tokens += step_tokens
        self.history.losses.append(sum(values))
        self.history.tokens.append(step_tokens)
        self.history.packed.append(
            sum(self._packed_over_ranks(rows) for rows in step.micro_batches)
        )
        return sum(values)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out loss as the Trainer computes it: per batch of ``batch_size`` rows (in order)
        the mean cross-entropy over its assistant tokens, averaged over rows."""
        assert self.eval_rows is not None
        self.model.eval()
        rows = len(self.eval_rows["input_ids"])
        size = self.cfg.train.batch_size
        weighted, count = [], 0
        for first in range(0, rows, size):
            indices = list(range(first, min(first + size, rows)))
            items = max(self._counts(self.eval_rows, indices)[0], 1)  # the global batch's
            here, scale = self._share(indices)
            batch = self._pack(self.eval_rows, here).to(self.device)
            with padding_skipped(self.causal_lm, batch.cu_seqlens[-2]), self._autocast():
                total = forward_loss(
                    self.causal_lm, batch, self.attention, self.dtype, self.backend
                )
            weighted.append(total * scale / items * len(indices))
            count += len(indices)
        self.model.train()
        mean = torch.stack(weighted).sum()
        if self.info.distributed:
            torch.distributed.all_reduce(mean)
        return (mean / count).item()

    # ----------------------------------------------------------------------------------------
    # Checkpoints: adapter (PEFT format), optimizer, scheduler, RNG, step; marker last.

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` and mark it complete (rank 0; a sharded
        model's LoRA tensors and optimizer state are gathered whole first, on every rank)."""
        folder = self.run_dir / "checkpoints" / f"checkpoint-{self.step}"
        adapter = full_adapter_state(self.model) if self.sharded else None
        optimizer = self._optimizer_state()
        if not self.info.is_main:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        if adapter is None:
            self.model.save_pretrained(folder)
        else:
            self.model.save_pretrained(folder, state_dict=adapter)
        torch.save(optimizer, folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(_rng_state(), folder / "rng_state.pth")
        state = {"step": self.step, "tokens": self.tokens, "engine": "mxlora"}
        write_json(folder / "engine_state.json", state)
        mark_complete(folder, self.step, self.cfg.train.save_total_limit, self.before_marker)
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from a checkpoint :meth:`save_checkpoint` wrote."""
        state_file = folder / "engine_state.json"
        if not state_file.is_file():
            raise TrainingError(f"--resume: {folder} was not written by train.engine=mxlora")
        state = json.loads(state_file.read_text())
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            load_full_adapter_state(self.model, folder)
            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                optimizer,
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.model.load_adapter(str(folder), self.model.active_adapter, is_trainable=True)
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        # Our own file: numpy's RNG state is not a plain tensor, hence weights_only=False.
        _set_rng_state(torch.load(folder / "rng_state.pth", weights_only=False))
        self.step, self.tokens = state["step"], state["tokens"]

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state (the same on every rank in data parallel); sharded, the full
        state gathered to rank 0 (keyed by parameter name: it loads back at any rank count)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )


@contextlib.contextmanager
def blocks_attached(
    blocks: torch.nn.ModuleList, checkpointed: int, compiled: bool
) -> Iterator[None]:
    """Checkpoint the first ``checkpointed`` decoder blocks and compile them all, for the
    duration.

    A checkpointed block's forward is set on the instance: non-reentrant
    ``torch.utils.checkpoint`` around the (compiled) class forward. Module hooks (FSDP2's) stay
    outside the recompute, and the recompute runs the same compiled graph. The other blocks
    compile whole (``Module.compile``). ``fullgraph=True``: a graph break is an error
    (:func:`loud_compile`).
    """
    for index, block in enumerate(blocks):
        if index < checkpointed:
            forward = block.forward
            if compiled:
                forward = torch.compile(forward, fullgraph=True, dynamic=True)
            block.forward = functools.partial(recomputed, forward)
        elif compiled:
            block.compile(fullgraph=True, dynamic=True)
    try:
        yield
    finally:
        for index, block in enumerate(blocks):
            if index < checkpointed:
                del block.forward  # the class's forward again
            elif compiled:
                # Undo Module.compile, so that a later run on this model (bench workloads share
                # it) decides for itself and never runs SDPA inside blocks compiled for flex.
                block._compiled_call_impl = None


def recomputed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)`` keeping only its inputs; the backward runs it again
    (non-reentrant ``torch.utils.checkpoint``, which takes keyword arguments and non-tensor
    inputs such as block masks)."""
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors of a FSDP2-sharded PEFT model, whole, on every rank (each
    gathered with ``DTensor.full_tensor``; the frozen weights are never gathered), by their
    state-dict names: what ``PeftModel.save_pretrained(state_dict=...)`` takes."""
    return {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_full_adapter_state(model: torch.nn.Module, folder: Path) -> None:
    """Load the adapter saved in ``folder`` into the LoRA parameters of a FSDP2-sharded PEFT
    model: each rank keeps its shard of each whole tensor."""
    from peft.utils import load_peft_weights
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = load_peft_weights(str(folder), device="cpu")
    tag = f".{model.active_adapter}"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = name.replace(tag, "")  # PEFT saves the names without the adapter's
        if key not in saved:
            raise TrainingError(f"--resume: {folder} holds no {key}")
        value = saved[key].to(param.device, param.dtype)
        with torch.no_grad():
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(value, param.device_mesh, param.placements))
            else:
                param.copy_(value)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
