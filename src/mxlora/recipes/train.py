"""``mxlora train CONFIG``: one LoRA fine-tune of gpt-oss, the seed notebook's recipe, measured.

Top to bottom: set up the run folder -> render the data -> load the model and attach LoRA ->
train with the engine ``train.engine`` names (``mxlora``: :mod:`mxlora.engine`'s own loop;
``trl``: TRL's SFTTrainer, the seed's, kept as the reference) -> save the adapter atomically ->
write the report.
The run folder layout is the run-folder contract (config.yaml, environment.json, metrics.jsonl,
report.json/.md, loss.png, adapter/, checkpoints/).

Reliability: a checkpoint counts only once its completion marker is written (after every file
of it), so ``--resume`` never loads a half-written one; the adapter folder appears by one
rename of a finished temp folder; a NaN/Inf loss stops the run naming the step and batch; an
out-of-memory error ends with the knobs that lower memory.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from mxlora.config import (
    ConfigError,
    TrainingConfig,
    dump_config,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)
from mxlora.data import PreparedData, prepare_data
from mxlora.engine.memory import use_gradient_checkpointing
from mxlora.engine.run_folder import (
    COMPLETE_MARKER,
    KEEP_CHECKPOINTS,
    NonFiniteLossError,
    TrainingError,
    checkpoint_step,
    complete_checkpoints,
    is_host_oom,
    mark_complete,
    nonfinite_message,
    oom_message,
    save_adapter,
)
from mxlora.model.load import (
    ModelLoadError,
    default_device,
    load_tokenizer,
    load_weights,
    resolve_dtype,
)
from mxlora.model.lora import apply_lora, count_parameters
from mxlora.report.metrics import (
    MetricsCallback,
    MetricsLog,
    peak_device_gb,
    peak_rss_gb,
    truncate_metrics,
)
from mxlora.report.writer import environment, plot_loss, summarize_losses, write_json, write_report

log = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "KEEP_CHECKPOINTS",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingError",
    "complete_checkpoints",
    "fit",
    "oom_message",
    "save_adapter",
    "train",
]


# --------------------------------------------------------------------------------------------
# The recipe.


@dataclass
class TrainResult:
    """What :func:`fit` leaves: the run folder, the trained PEFT model and the data it saw.

    ``stopped``: the ``should_stop`` hook ended the run early; its newest checkpoint holds
    where it stopped (``--resume`` continues), and no adapter or report was written.
    """

    run_dir: Path
    model: torch.nn.Module
    data: PreparedData
    stopped: bool = False


@dataclass
class EngineStats:
    """What an engine reports back to the recipe (for ``report.json``)."""

    steps: int
    epoch: float
    tokens: int
    stopped: bool
    gradient_checkpointing: bool
    compiled: bool


def train(cfg: TrainingConfig, resume: bool = False) -> Path:
    """Fine-tune with LoRA as ``cfg`` says and write the run folder.

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in the run folder.

    Returns:
        The run folder.

    Raises:
        ConfigError, ModelLoadError: bad config or model path.
        TrainingError: bad data, NaN/Inf loss, out of memory, nothing to resume.
    """
    return fit(cfg, resume).run_dir


def fit(
    cfg: TrainingConfig, resume: bool = False, should_stop: Callable[[], bool] | None = None
) -> TrainResult:
    """:func:`train`, also handing back the trained model in memory (for tests and notebooks).

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in the run folder.
        should_stop: checked after every optimizer step; when it returns True a complete
            checkpoint is written and training stops (``TrainResult.stopped``).
    """
    wall_start = time.perf_counter()
    # The tokenizer first: it checks the model path before an earlier run folder is replaced.
    tokenizer = load_tokenizer(cfg.model)
    run_dir = cfg.output.run_dir
    checkpoint = _setup_run_dir(cfg, resume)
    device = default_device()
    write_json(run_dir / "environment.json", environment(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Data: rendered and validated before the (possibly huge) model is loaded.
    try:
        data = prepare_data(cfg.data, tokenizer, cfg.train.max_len)
    except ValueError as e:  # the data module's errors name the field or the bad row
        raise TrainingError(str(e)) from None

    # Model: the LoRA initialisation draws from the global RNG, hence the seed first.
    try:
        model = load_weights(cfg.model, device)
    except torch.OutOfMemoryError:
        raise TrainingError(oom_message(cfg, device, "loading the model")) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    set_seed(cfg.train.seed)
    model = apply_lora(model, cfg.lora)
    trainable, total = count_parameters(model)

    # Train.
    dtype = resolve_dtype(cfg.model.dtype, device)
    has_eval = data.eval is not None and len(data.eval) > 0
    show_bar = sys.stderr.isatty()
    metrics = MetricsLog(run_dir / "metrics.jsonl", device, print_lines=not show_bar)
    engine = _train_trl if cfg.train.engine == "trl" else _train_mxlora
    stats = engine(cfg, model, tokenizer, data, device, dtype, metrics, checkpoint, should_stop)
    if stats.stopped:
        log.info("stopped after step %d; continue with --resume", stats.steps)
        return TrainResult(run_dir=run_dir, model=model, data=data, stopped=True)

    # Save.
    save_adapter(model, run_dir / "adapter")

    # Report.
    peak_alloc, peak_reserved = peak_device_gb(device)
    tokens_here = stats.tokens - (metrics.tokens_at_start or 0)
    report: dict[str, Any] = {
        "name": cfg.output.name,
        "model": cfg.model.name_or_path,
        "engine": cfg.train.engine,
        "experts": cfg.model.experts,
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": stats.gradient_checkpointing,
        "compiled": stats.compiled,
        "steps": stats.steps,
        "epochs": stats.epoch,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval) if has_eval else 0,
        "train_tokens": stats.tokens,
        "tokens_per_s": tokens_here / metrics.step_time_total if metrics.step_time_total else None,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_time_s": metrics.step_time_total,
        "step_time_s_mean": (
            metrics.step_time_total / metrics.steps_timed if metrics.steps_timed else None
        ),
        "peak_alloc_gb": peak_alloc,
        "peak_reserved_gb": peak_reserved,
        "peak_rss_gb": peak_rss_gb(),
        **summarize_losses(run_dir / "metrics.jsonl"),
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from_step": checkpoint_step(checkpoint) if checkpoint else None,
        "data": data.report,
        "device": environment(device)["device"],
    }
    write_report(run_dir, report)
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.output.name} loss")
    return TrainResult(run_dir=run_dir, model=model, data=data)


# --------------------------------------------------------------------------------------------
# The two engines: same rows, order, loss, optimizer, schedule and run folder.


def _train_mxlora(
    cfg, model, tokenizer, data, device, dtype, metrics, checkpoint, should_stop
) -> EngineStats:
    """mxlora's own loop (:class:`mxlora.engine.loop.Loop`)."""
    from mxlora.engine.loop import Loop

    has_eval = data.eval is not None and len(data.eval) > 0
    loop = Loop(
        cfg,
        model,
        train_rows=data.train.to_dict(),
        eval_rows=data.eval.to_dict() if has_eval else None,
        pad_id=tokenizer.pad_token_id,
        device=device,
        dtype=dtype,
        metrics=metrics,
        run_dir=cfg.output.run_dir,
    )
    result = loop.run(resume_from=checkpoint, should_stop=should_stop)
    return EngineStats(
        steps=result.steps,
        epoch=result.epoch,
        tokens=result.tokens,
        stopped=result.stopped,
        gradient_checkpointing=result.gradient_checkpointing,
        compiled=result.compiled,
    )


def _train_trl(
    cfg, model, tokenizer, data, device, dtype, metrics, checkpoint, should_stop
) -> EngineStats:
    """TRL's SFTTrainer (the seed's step), with our metrics, checkpoint markers and NaN guard."""
    has_eval = data.eval is not None and len(data.eval) > 0
    show_bar = not metrics.print_lines
    # Rows are padded to the batch's longest: the worst micro-batch is batch_size x longest row.
    longest = cfg.train.batch_size * max(len(ids) for ids in data.train["input_ids"])
    checkpointing = use_gradient_checkpointing(
        cfg.train.gradient_checkpointing,
        model.get_base_model().config,
        longest,
        dtype,
        device,
        cfg.train.memory_budget_gb,
    )
    callbacks: list[TrainerCallback] = [MetricsCallback(metrics), CheckpointCallback()]
    if should_stop is not None:
        callbacks.append(StopCallback(should_stop))
    trainer = GuardedSFTTrainer(
        model=model,
        args=sft_config(cfg, cfg.output.run_dir, dtype, has_eval, show_bar, checkpointing),
        train_dataset=data.train,
        eval_dataset=data.eval if has_eval else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not show_bar:
        trainer.remove_callback(PrinterCallback)  # our plain lines replace its raw dicts
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        raise TrainingError(
            oom_message(cfg, device, f"step {trainer.state.global_step + 1}")
        ) from None
    except RuntimeError as e:
        if is_host_oom(e):
            raise TrainingError(
                oom_message(cfg, device, f"step {trainer.state.global_step + 1}")
            ) from None
        raise
    state = trainer.state
    stopped = should_stop is not None and state.global_step < state.max_steps
    return EngineStats(
        steps=state.global_step,
        epoch=state.epoch,
        tokens=state.num_input_tokens_seen,
        stopped=stopped,
        gradient_checkpointing=checkpointing,
        compiled=False,
    )


# --------------------------------------------------------------------------------------------
# Pieces of the recipe.


def sft_config(
    cfg: TrainingConfig,
    run_dir: Path,
    dtype: torch.dtype,
    has_eval: bool,
    show_bar: bool,
    gradient_checkpointing: bool,
) -> SFTConfig:
    """TRL's ``SFTConfig`` from our training section (the seed's hyperparameters).

    ``gradient_checkpointing`` is the resolved ``train.gradient_checkpointing`` (its ``auto``
    depends on the data and device: :func:`mxlora.engine.memory.use_gradient_checkpointing`).
    """
    t = cfg.train
    # TRL 1.x adds gpt-oss's router load-balancing loss (coefficient 0.9 from the model config)
    # unless told not to; the seed (TRL of its day, output_router_logits false) trained on the
    # cross-entropy alone, and so does the mxlora engine.
    no_aux_loss = (
        {"router_aux_loss_coef": 0.0}
        if "router_aux_loss_coef" in SFTConfig.__dataclass_fields__
        else {}
    )
    return SFTConfig(
        **no_aux_loss,
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_len,
        # transformers 5: a value < 1 is a ratio of all steps (the seed's warmup_ratio=0.03).
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=(
            {"min_lr_rate": t.min_lr_rate} if t.scheduler == "cosine_with_min_lr" else {}
        ),
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=False,
        logging_steps=t.logging_steps,
        eval_strategy="epoch" if has_eval and t.eval == "epoch" else "no",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointCallback rotates, counting only complete ones
        seed=t.seed,
        data_seed=t.seed,
        # The data set is pre-tokenized: labels come from its completion_mask (assistant only).
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not show_bar,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
    )


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that stops at the first non-finite loss, naming the step and batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._micro_step = 0  # optimizer step (1-based) of the last micro-batch seen
        self._micro_index = 0  # its index within that step's gradient accumulation

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if self._micro_step != step:
            self._micro_step, self._micro_index = step, 0
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            accum = self.args.gradient_accumulation_steps
            raise NonFiniteLossError(nonfinite_message(loss.item(), step, self._micro_index, accum))
        self._micro_index += 1
        return loss


class CheckpointCallback(TrainerCallback):
    """Mark each checkpoint complete once written, then keep only the newest complete ones."""

    def on_save(self, args, state, control, **kwargs):
        mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class StopCallback(TrainerCallback):
    """The ``should_stop`` hook for the TRL engine: checked after every optimizer step; when
    it returns True the step's checkpoint is written and training ends."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop():
            control.should_save = True
            control.should_training_stop = True
        return control


def _setup_run_dir(cfg: TrainingConfig, resume: bool) -> Path | None:
    """Create (or, resuming, check) the run folder; returns the checkpoint to resume from.

    A fresh run replaces an earlier run folder of the same name.
    """
    run_dir = cfg.output.run_dir
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise TrainingError(f"--resume: {run_dir} holds no run (no config.yaml)")
        changed = _config_changes(from_dict(TrainingConfig, read_yaml(saved)), cfg)
        if changed:
            raise TrainingError(
                f"--resume: the config differs from the one {run_dir} was started with "
                f"({'; '.join(changed)}); resume with the same config and overrides"
            )
        checkpoints = complete_checkpoints(run_dir / "checkpoints")
        if not checkpoints:
            raise TrainingError(
                f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; run without "
                "--resume to start over"
            )
        checkpoint = checkpoints[-1]
        for partial in (run_dir / "checkpoints").glob("checkpoint-*"):
            if not (partial / COMPLETE_MARKER).is_file():
                shutil.rmtree(partial)  # killed mid-write: never loaded, redone by this run
        truncate_metrics(run_dir / "metrics.jsonl", checkpoint_step(checkpoint))
        log.info("resuming %s from %s", run_dir, checkpoint)
        return checkpoint
    if run_dir.exists():
        log.warning("replacing the earlier run in %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return None


def _config_changes(before: TrainingConfig, after: TrainingConfig) -> list[str]:
    """``field: old -> new`` for every leaf that differs."""
    return [
        f"{key}: {old!r} -> {new!r}"
        for key, (old, new) in _diff(to_dict(before), to_dict(after), "").items()
    ]


def _diff(a: Any, b: Any, where: str) -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for key in a.keys() | b.keys():
            out.update(_diff(a.get(key), b.get(key), f"{where}.{key}" if where else key))
        return out
    return {} if a == b else {where: (a, b)}


# --------------------------------------------------------------------------------------------
# Command line.


def quiet_libraries(progress_bars: bool) -> None:
    """Keep the log readable: library warnings only, no per-map progress bars in plain logs.

    transformers 5.2x deprecates ``gradient_checkpointing`` for ``activation_checkpointing``,
    which 5.17 (the GPU machine's) does not know yet; we keep the old name and its warning quiet.
    """
    import datasets

    transformers.logging.set_verbosity_warning()
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    if not progress_bars:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora train CONFIG [key=value ...] [--resume]``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries(progress_bars=sys.stderr.isatty())
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = train(cfg, resume=args.resume)
    except (ConfigError, ModelLoadError, TrainingError) as e:
        print(f"mxlora train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(
        f"run folder: {run_dir} (adapter: {run_dir / 'adapter'}, report: {run_dir / 'report.md'})"
    )
    return 0
