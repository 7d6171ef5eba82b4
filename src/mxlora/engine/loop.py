"""mxlora's training loop: the seed's semantics, packed rows, no full logits, compiled blocks.

Per optimizer step: the step's micro-batches (the Trainer's rows and order,
:func:`mxlora.engine.packing.plan_steps`) are each packed into one sequence and run through the
decoder with the packed attention (:mod:`mxlora.engine.attention`, registered with transformers'
``AttentionInterface`` and handed the document masks in place of the model's causal masks); the
loss is the chunked cross-entropy over the assistant positions (:mod:`mxlora.engine.loss`),
summed over the step and divided by the step's assistant-token count (TRL's
``num_items_in_batch``), so the step's loss is the mean cross-entropy over its assistant tokens.
Then, as transformers' ``Trainer`` does: gradient clipping to ``train.max_grad_norm``, fused AdamW
(betas 0.9 / 0.999, eps 1e-8: ``TrainingArguments``' defaults; ``train.weight_decay``), the
scheduler from transformers' ``get_scheduler``, gradients zeroed.

After every step: a train row every ``logging_steps``, the held-out loss at each epoch end (and
at the last step) or every ``eval_steps``, a checkpoint every ``save_steps``, then the
``should_stop`` hook: when it returns True a complete checkpoint is written and the loop returns.
"""

from __future__ import annotations

import contextlib
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
from transformers import get_scheduler

from mxlora.config import TrainingConfig
from mxlora.engine.attention import build_masks, register
from mxlora.engine.loss import chunked_loss
from mxlora.engine.memory import use_gradient_checkpointing
from mxlora.engine.packing import PackedBatch, Step, bucketed, pack, plan_steps
from mxlora.engine.run_folder import (
    NonFiniteLossError,
    TrainingError,
    is_host_oom,
    mark_complete,
    nonfinite_message,
    oom_message,
)
from mxlora.report.metrics import MetricsLog
from mxlora.report.writer import write_json

# TrainingArguments' defaults (the seed's optimizer): adamw_torch_fused.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class LoopResult:
    """What the loop leaves for the report.

    Attributes:
        steps: optimizer steps done, whole run (a resumed run counts the earlier ones).
        epoch: the Trainer's ``state.epoch`` at the end (epochs done, fractional).
        tokens: non-pad tokens trained, whole run.
        stopped: ``should_stop`` ended the run early (a checkpoint holds where it stopped).
        compiled: the decoder blocks ran under ``torch.compile``.
        gradient_checkpointing: activations were recomputed in the backward.
        longest_tokens: tokens of the longest packed micro-batch (bucketed).
    """

    steps: int
    epoch: float
    tokens: int
    stopped: bool
    compiled: bool
    gradient_checkpointing: bool
    longest_tokens: int


@dataclass
class History:
    """Per optimizer step of this process: loss, non-pad tokens, packed (bucketed) tokens."""

    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    packed: list[int] = field(default_factory=list)


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """Resolve ``train.compile``: ``auto`` compiles on CUDA only (CPU runs stay quick to start)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


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


def forward_loss(model: torch.nn.Module, batch: PackedBatch, use_flex: bool) -> torch.Tensor:
    """Summed cross-entropy of one packed micro-batch (``model``: the ``...ForCausalLM``)."""
    masks = build_masks(batch.doc_ids, model.config.sliding_window, use_flex)
    out = model.model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=masks
    )
    hidden = out.last_hidden_state[0]
    return chunked_loss(hidden, model.lm_head, batch.loss_positions, batch.loss_targets)


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
    ) -> None:
        self.cfg, self.model, self.device, self.dtype = cfg, model, device, dtype
        self.train_rows, self.eval_rows, self.pad_id = train_rows, eval_rows, pad_id
        self.metrics, self.run_dir = metrics, run_dir
        self.before_marker, self.on_checkpoint = before_marker, on_checkpoint
        t = cfg.train
        self.causal_lm = model.get_base_model()
        self.plan: list[Step] = plan_steps(
            len(train_rows["input_ids"]), t.batch_size, t.grad_accum, t.epochs, t.max_steps, t.seed
        )
        self.longest = max(
            bucketed(sum(len(train_rows["input_ids"][i]) for i in rows))
            for step in self.plan
            for rows in step.micro_batches
        )
        # flex_attention has no backward on the CPU: the dense reference runs there.
        self.use_flex = device.type == "cuda"
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
        checkpointing = use_gradient_checkpointing(
            t.gradient_checkpointing,
            self.causal_lm.config,
            self.longest,
            self.dtype,
            self.device,
            t.memory_budget_gb,
        )
        compiled = use_compile(t.compile, self.device)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.metrics.begin(self.tokens, len(self.plan))
        stopped = False
        with self._attached(checkpointing, compiled), loud_compile(compiled):
            window: list[float] = []
            for step in self.plan[self.step :]:
                window.append(self.train_step(step))
                if step.number % t.logging_steps == 0:
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
                    self.metrics.log_eval(step.number, self.evaluate())
                saved = step.number % t.save_steps == 0
                if saved:
                    self.save_checkpoint()
                more = step.number < len(self.plan)  # after the last step the run is done
                if more and should_stop is not None and should_stop():
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
            compiled=compiled,
            gradient_checkpointing=checkpointing,
            longest_tokens=self.longest,
        )

    def _eval_due(self, step: Step) -> bool:
        """``train.eval``: at each epoch end (and the last step), or every ``eval_steps``."""
        t = self.cfg.train
        if t.eval == "epoch":
            return step.ends_epoch or step.number == len(self.plan)
        return t.eval == "steps" and step.number % t.eval_steps == 0

    @contextlib.contextmanager
    def _attached(self, checkpointing: bool, compiled: bool) -> Iterator[None]:
        """The packed attention, checkpointing and compiled blocks for the loop's duration."""
        lm = self.causal_lm
        before = lm.config._attn_implementation
        lm.set_attn_implementation(register())
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compiled:
            for block in lm.model.layers:
                block.compile(fullgraph=True, dynamic=True)
        try:
            yield
        finally:
            lm.set_attn_implementation(before)
            if checkpointing:
                lm.gradient_checkpointing_disable()

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def _pack(self, rows: dict[str, list[list[int]]], indices: list[int]) -> PackedBatch:
        return pack(
            [rows["input_ids"][i] for i in indices],
            [rows["completion_mask"][i] for i in indices],
            self.pad_id,
        )

    def train_step(self, step: Step) -> float:
        """One optimizer step; its loss (mean cross-entropy over its assistant tokens)."""
        self.model.train()
        batches = [self._pack(self.train_rows, rows) for rows in step.micro_batches]
        items = max(sum(b.loss_targets.numel() for b in batches), 1)
        start = time.perf_counter()
        try:
            losses = []
            for batch in batches:
                with self._autocast():
                    loss = forward_loss(self.causal_lm, batch.to(self.device), self.use_flex)
                    loss = loss / items
                loss.backward()
                losses.append(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
            values = torch.stack(losses).tolist()  # the step's one host sync
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
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the work, not its queueing
        self.metrics.step_done(time.perf_counter() - start)
        self.grad_norm = float(grad_norm)
        self.step = step.number
        self.tokens += sum(b.tokens for b in batches)
        self.history.losses.append(sum(values))
        self.history.tokens.append(sum(b.tokens for b in batches))
        self.history.packed.append(sum(b.length for b in batches))
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
            batch = self._pack(self.eval_rows, list(range(first, min(first + size, rows))))
            with self._autocast():
                total = forward_loss(self.causal_lm, batch.to(self.device), self.use_flex)
            weighted.append(total / max(batch.loss_targets.numel(), 1) * batch.rows)
            count += batch.rows
        self.model.train()
        return (torch.stack(weighted).sum() / count).item()

    # ----------------------------------------------------------------------------------------
    # Checkpoints: adapter (PEFT format), optimizer, scheduler, RNG, step; marker last.

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` and mark it complete."""
        folder = self.run_dir / "checkpoints" / f"checkpoint-{self.step}"
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
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
        self.model.load_adapter(str(folder), self.model.active_adapter, is_trainable=True)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        # Our own file: numpy's RNG state is not a plain tensor, hence weights_only=False.
        _set_rng_state(torch.load(folder / "rng_state.pth", weights_only=False))
        self.step, self.tokens = state["step"], state["tokens"]


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
