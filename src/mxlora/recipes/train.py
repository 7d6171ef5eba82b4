"""``mxlora train CONFIG``: one LoRA fine-tune of gpt-oss, the seed notebook's recipe, measured.

Top to bottom: set up the run folder -> render the data -> load the model and attach LoRA ->
train with the engine ``train.engine`` names (``mxlora``: :mod:`mxlora.engine`'s own loop;
``trl``: TRL's SFTTrainer, the seed's, kept as the reference) -> save the adapter atomically ->
write the report.
The run folder layout is the run-folder contract (config.yaml, environment.json, metrics.jsonl,
report.json/.md, loss.png, adapter/, checkpoints/).

Reliability: a new run is built in a staging folder and becomes the run folder at its first
complete checkpoint, so a failed run never costs an earlier one of the same name (which is
refused anyway unless ``--overwrite``); a checkpoint counts only once its completion marker is
written (after every file of it), so ``--resume`` never loads a half-written one; Ctrl-C or
SIGTERM ends the current step, saves a checkpoint and prints the resume command; the adapter
folder appears by one rename of a finished temp folder; a NaN/Inf loss stops the run naming
the step and batch; an out-of-memory error ends with the knobs that lower memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from mxlora.config import (
    RESUME_SAFE_FIELDS,
    ConfigError,
    TrainingConfig,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
    with_absolute_paths,
)
from mxlora.data import PreparedData, prepare_data
from mxlora.data.prepare import describe_data
from mxlora.distributed import DistInfo, barrier, launched, on_main, relaunch, setup, teardown
from mxlora.engine.memory import all_blocks, decoder_layers
from mxlora.engine.run_folder import (
    COMPLETE_MARKER,
    NonFiniteLossError,
    TrainingError,
    checkpoint_step,
    complete_checkpoints,
    is_host_oom,
    mark_complete,
    nonfinite_message,
    oom_message,
    rotate_checkpoints,
    save_adapter,
)
from mxlora.interrupt import Interrupted, StopRequests, exit_code
from mxlora.model.load import (
    ModelLoadError,
    default_device,
    held_experts,
    load_tokenizer,
    load_weights,
    resolve_dtype,
)
from mxlora.model.lora import apply_lora, count_parameters
from mxlora.recipes.dryrun import training_experts
from mxlora.report.metrics import (
    GB,
    MetricsCallback,
    MetricsLog,
    peak_device_gb,
    peak_rss_gb,
    truncate_metrics,
)
from mxlora.report.trackers import check_trackers, open_trackers
from mxlora.report.writer import environment, plot_loss, summarize_losses, write_json, write_report
from mxlora.staging import DestinationExists, StagedFolder, is_occupied, remove_stale_staging

log = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingError",
    "complete_checkpoints",
    "fit",
    "oom_message",
    "rotate_checkpoints",
    "save_adapter",
    "train",
]

# The run's summed times up to checkpoint-N (RunTotals), inside it.
TOTALS_FILE = "mxlora-totals.json"
# transformers 5.2x renamed the trainer's gradient_checkpointing(_kwargs) to
# activation_checkpointing(_kwargs) and warns on every run given the old name; 5.17 (the GPU
# machine's) knows only the old one. Passing the name this version has keeps both quiet.
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    else "gradient_checkpointing"
)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a complete checkpoint was written.

    Attributes:
        signum: the signal.
        exit_code: what the command exits with (130 SIGINT, 143 SIGTERM).
    """

    def __init__(self, signum: int, folder: RunFolder, step: int, max_steps: int):
        where = f"stopped by {signal.Signals(signum).name} at step {step}"
        checkpoints = complete_checkpoints(folder.dest / "checkpoints") if folder.kept else []
        if checkpoints:
            message = (
                f"{where} of {max_steps}; saved {checkpoints[-1]}; resume with: "
                f"mxlora train --resume {shlex.quote(str(folder.dest.resolve()))}"
            )
        else:  # a second signal before the first checkpoint was complete
            message = f"{where}, before a complete checkpoint; nothing was saved"
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


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
    max_steps: int
    epoch: float
    tokens: int
    stopped: bool
    checkpointed_blocks: str
    compiled: bool
    cuda_graphs: bool = False
    attention: str = ""


def train(
    cfg: TrainingConfig,
    resume: bool = False,
    overwrite: bool = False,
    info: DistInfo | None = None,
) -> Path:
    """Fine-tune with LoRA as ``cfg`` says and write the run folder.

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in the run folder; a finished
            run is left as it is.
        overwrite: replace an existing run folder of the same name (only once the new run has
            a complete checkpoint).
        info: this process's place in a multi-process job (default:
            :func:`mxlora.distributed.setup`: one process unless a launcher started this one).

    Returns:
        The run folder.

    Raises:
        ConfigError, ModelLoadError: bad config or model path.
        TrainingError: bad data, NaN/Inf loss, out of memory, nothing to resume, run exists.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved.
        Interrupted: SIGINT/SIGTERM before anything was worth saving.
    """
    run_dir = cfg.output.run_dir
    if resume and is_finished(run_dir):
        log.info("%s finished already (report.json is written): nothing to resume", run_dir)
        return run_dir
    return fit(cfg, resume, overwrite, info=info).run_dir


def fit(
    cfg: TrainingConfig,
    resume: bool = False,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    info: DistInfo | None = None,
) -> TrainResult:
    """:func:`train`, also handing back the trained model in memory (for tests and notebooks).

    A new run is built in a staging folder beside the run folder and swapped in at its first
    complete checkpoint (see :func:`open_run_folder`); a failure before that leaves an earlier
    run of the same name untouched.

    Under a launcher (torchrun, ``accelerate launch``, ``mxlora train --nproc N``) every process
    trains on its share of each global batch of ``train.batch_size`` rows (the mxlora engine's
    data parallel, or FSDP2 with ``train.fsdp``), and rank 0 alone writes the run folder; its
    stop decision (Ctrl-C, ``should_stop``) is every rank's.

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in the run folder.
        overwrite: replace an existing run folder of the same name.
        should_stop: checked after every optimizer step (rank 0's answer counts); when it
            returns True a complete checkpoint is written and training stops
            (``TrainResult.stopped``).
        info: this process's place in a multi-process job (default: :func:`setup`).
    """
    wall_start = time.perf_counter()
    info = info or setup()
    check_processes(cfg, info)
    with StopRequests() as stops, open_run_folder_on_main(cfg, resume, overwrite, info) as folder:
        run_dir = folder.path  # where this process writes (the staging folder, then a link)
        main = info.is_main
        if main:
            log.info("%s", describe_config(cfg))
        tokenizer = load_tokenizer(cfg.model)
        device = info.device if info.distributed else default_device()
        if main:
            write_json(run_dir / "environment.json", environment(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        check_trackers(cfg.train.report_to)  # a missing package fails before the long model load

        # Data: rendered and validated before the (possibly huge) model is loaded.
        try:
            data = prepare_data(cfg.data, tokenizer, cfg.train.max_len)
        except ValueError as e:  # the data module's errors name the field or the bad row
            raise TrainingError(str(e)) from None
        if main:
            log.info("%s", describe_data(data.report))

        # Model: the LoRA initialisation draws from the global RNG, hence the seed first.
        lengths = [len(ids) for ids in data.train["input_ids"]]
        chosen, why = training_experts(cfg, device, lambda: lengths)
        if main:
            log.info("%s", why)
        load_start = time.perf_counter()
        try:
            model = load_weights(dataclasses.replace(cfg.model, experts=chosen), device)
        except torch.OutOfMemoryError:
            raise TrainingError(oom_message(cfg, device, "loading the model")) from None
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
        declare_bos(model, tokenizer)
        experts = held_experts(model)  # what the report records (never auto)
        set_seed(cfg.train.seed)
        model = apply_lora(model, cfg.lora)
        trainable, total = count_parameters(model)
        if main:
            log.info("%s", describe_model(cfg, model, device, time.perf_counter() - load_start))

        # Train; Ctrl-C / SIGTERM from here on ends the current step and saves a checkpoint.
        dtype = resolve_dtype(cfg.model.dtype, device)
        has_eval = data.eval is not None and len(data.eval) > 0
        checkpoint = folder.checkpoint
        start_step = checkpoint_step(checkpoint) if checkpoint else 0
        trackers = open_trackers(
            cfg.train.report_to if main else [], run_dir, cfg.output.name, to_dict(cfg), start_step
        )
        metrics = MetricsLog(
            run_dir / "metrics.jsonl",
            device,
            print_lines=not sys.stderr.isatty(),
            trackers=trackers,
        )
        clock = RunClock(wall_start, metrics, _read_totals(checkpoint))
        run = Engine(
            cfg, model, tokenizer, data, device, dtype, metrics, run_dir, clock, folder, info
        )
        engine = run.trl if cfg.train.engine == "trl" else run.mxlora

        def stop() -> bool:
            return stops.requested or (should_stop is not None and should_stop())

        try:
            with stops.stoppable():
                stats = engine(checkpoint, stop)
        except Interrupted as e:  # a second signal: stop at once, mid-step
            raise TrainingInterrupted(e.signum, folder, *run.progress()) from None
        finally:
            trackers.close()  # also on failure: what was logged stays readable
        if stats.stopped:
            if stops.requested:
                raise TrainingInterrupted(
                    stops.signum or signal.SIGINT, folder, stats.steps, stats.max_steps
                )
            log.info("stopped after step %d; continue with --resume", stats.steps)
            return TrainResult(run_dir=folder.dest, model=model, data=data, stopped=True)

        # Save: a sharded model's LoRA tensors are gathered whole (every rank takes part).
        if cfg.train.fsdp:
            from mxlora.engine.loop import full_adapter_state

            adapter = full_adapter_state(model)
        else:
            adapter = None
        if not main:
            barrier(info)  # until rank 0 has written the adapter and the report
            return TrainResult(run_dir=folder.dest, model=model, data=data)
        save_adapter(model, run_dir / "adapter", adapter)

        # Report: times are summed over every process that trained this run (resumes).
        totals = clock.totals()
        peak_alloc, peak_reserved = peak_device_gb(device)
        report: dict[str, Any] = {
            "name": cfg.output.name,
            "model": cfg.model.name_or_path,
            "engine": cfg.train.engine,
            "experts": experts,
            "dtype": str(dtype).removeprefix("torch."),
            "checkpointed_blocks": stats.checkpointed_blocks,
            "compiled": stats.compiled,
            "cuda_graphs": stats.cuda_graphs,
            "attention": stats.attention,
            "steps": stats.steps,
            "epochs": stats.epoch,
            "train_rows": len(data.train),
            "eval_rows": len(data.eval) if has_eval else 0,
            "train_tokens": stats.tokens,
            "tokens_per_s": stats.tokens / totals.train_time_s if totals.train_time_s else None,
            "wall_time_s": totals.wall_time_s,
            "train_time_s": totals.train_time_s,
            "step_time_s_mean": (
                totals.train_time_s / totals.steps_timed if totals.steps_timed else None
            ),
            "peak_alloc_gb": peak_alloc,
            "peak_reserved_gb": peak_reserved,
            "peak_rss_gb": peak_rss_gb(),
            **summarize_losses(run_dir / "metrics.jsonl"),
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from_step": start_step or None,
            "data": data.report,
            "device": environment(device)["device"],
        }
        write_report(run_dir, report)
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.output.name} loss")
    barrier(info)
    return TrainResult(run_dir=folder.dest, model=model, data=data)


def check_processes(cfg: TrainingConfig, info: DistInfo) -> None:
    """Refuse what a multi-process job cannot do, naming the field.

    Raises:
        ConfigError: ``train.fsdp`` without a launcher, or ``train.engine: trl`` under one.
    """
    if cfg.train.fsdp and info.world_size < 2:
        raise ConfigError(
            "train.fsdp: shards the model over processes; start with --nproc N (N >= 2) or "
            "under torchrun"
        )
    if info.world_size > 1 and cfg.train.engine != "mxlora":
        raise ConfigError(
            f"train.engine: {cfg.train.engine!r} trains in one process; --nproc / torchrun "
            "need train.engine=mxlora"
        )


# --------------------------------------------------------------------------------------------
# The two engines: same rows, order, loss, optimizer, schedule and run folder.


class Engine:
    """Runs the training of :func:`fit` with ``train.engine``'s step; both write checkpoints
    with the run's times in them and publish a new run folder at the first one."""

    def __init__(
        self, cfg, model, tokenizer, data, device, dtype, metrics, run_dir, clock, folder, info
    ) -> None:
        self.cfg, self.model, self.tokenizer, self.data = cfg, model, tokenizer, data
        self.device, self.dtype, self.metrics, self.run_dir = device, dtype, metrics, run_dir
        self.clock, self.folder, self.info = clock, folder, info
        self.has_eval = data.eval is not None and len(data.eval) > 0
        self.step, self.max_steps = 0, 0  # where training is, for an interrupt's message

    def progress(self) -> tuple[int, int]:
        """The last optimizer step done and the run's number of steps."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.state.global_step, trainer.state.max_steps
        return self.step, self.max_steps

    def write_totals(self, checkpoint: Path) -> None:
        write_json(checkpoint / TOTALS_FILE, dataclasses.asdict(self.clock.totals()))

    def mxlora(self, checkpoint: Path | None, should_stop: Callable[[], bool]) -> EngineStats:
        """mxlora's own loop (:class:`mxlora.engine.loop.Loop`)."""
        from mxlora.engine.loop import Loop

        loop = Loop(
            self.cfg,
            self.model,
            train_rows=self.data.train.to_dict(),
            eval_rows=self.data.eval.to_dict() if self.has_eval else None,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            dtype=self.dtype,
            metrics=self.metrics,
            run_dir=self.run_dir,
            before_marker=self.write_totals,
            on_checkpoint=self.folder.publish,
            info=self.info,
            sharded=self.cfg.train.fsdp,
        )
        self.max_steps = len(loop.plan)

        def stop() -> bool:
            self.step = loop.step
            return should_stop()

        result = loop.run(resume_from=checkpoint, should_stop=stop)
        return EngineStats(
            steps=result.steps,
            max_steps=len(loop.plan),
            epoch=result.epoch,
            tokens=result.tokens,
            stopped=result.stopped,
            checkpointed_blocks=result.checkpointed_blocks,
            compiled=result.compiled,
            cuda_graphs=result.cuda_graphs,
            attention=result.attention,
        )

    def trl(self, checkpoint: Path | None, should_stop: Callable[[], bool]) -> EngineStats:
        """TRL's SFTTrainer (the seed's step), with our metrics, checkpoints and NaN guard."""
        cfg, model, device, dtype = self.cfg, self.model, self.device, self.dtype
        show_bar = not self.metrics.print_lines
        checkpointing = padded_checkpointing(
            cfg, model, self.data.train["input_ids"], dtype, device
        )
        trainer = GuardedSFTTrainer(
            model=model,
            args=sft_config(cfg, self.run_dir, dtype, self.has_eval, show_bar, checkpointing),
            train_dataset=self.data.train,
            eval_dataset=self.data.eval if self.has_eval else None,
            processing_class=self.tokenizer,
            callbacks=[
                MetricsCallback(self.metrics),
                CheckpointCallback(self, cfg.train.save_total_limit),
                StopCallback(should_stop),
            ],
        )
        if not show_bar:
            trainer.remove_callback(PrinterCallback)  # our plain lines replace its raw dicts
        self.trainer = trainer
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
        return EngineStats(
            steps=state.global_step,
            max_steps=state.max_steps,
            epoch=state.epoch,
            tokens=state.num_input_tokens_seen,
            stopped=state.global_step < state.max_steps,
            checkpointed_blocks=all_or_none(checkpointing, model),
            compiled=False,
            attention=self.cfg.model.attn_implementation,
        )


# --------------------------------------------------------------------------------------------
# Pieces of the recipe.


def declare_bos(model: torch.nn.Module, tokenizer: Any) -> None:
    """Copy the tokenizer's BOS id into a model config that declares none.

    gpt-oss's config.json has no ``bos_token_id`` while its tokenizer has ``<|startoftext|>``
    (never used in Harmony rendering). The Trainer copies it over itself, with a warning about
    "new PAD/BOS/EOS tokens" on every run; doing the same copy first keeps the values and drops
    the noise.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or model.config.bos_token_id is not None:
        return
    model.config.bos_token_id = bos
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.bos_token_id = bos


def describe_config(cfg: TrainingConfig) -> str:
    """The run folder and every config value that differs from the defaults (one per line)."""
    default = to_dict(TrainingConfig())
    mine = to_dict(cfg)
    lines = [f"run {cfg.output.run_dir}; config (what differs from the defaults):"]
    for key, (_, value) in sorted(_diff(default, mine, "").items()):
        lines.append(f"  {key}: {value!r}")
    return "\n".join(lines)


def describe_model(
    cfg: TrainingConfig, model: torch.nn.Module, device: torch.device, seconds: float
) -> str:
    """Model load time, where it lives and how much memory it takes, and the LoRA share."""
    trainable, total = count_parameters(model)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if device.type == "cuda":
        memory = f"{torch.cuda.memory_allocated(device) / GB:.2f} GB allocated on {device}"
    else:
        memory = f"peak RSS {peak_rss_gb():.2f} GB"
    return (
        f"model {cfg.model.name_or_path} loaded in {seconds:.1f} s (experts {held_experts(model)}, "
        f"{str(resolve_dtype(cfg.model.dtype, device)).removeprefix('torch.')} on {device}; "
        f"{weights / GB:.2f} GB of weights, "
        f"{memory}); LoRA trains {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.3f} %)"
    )


def padded_checkpointing(
    cfg: TrainingConfig,
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device,
) -> bool:
    """``train.gradient_checkpointing`` resolved for TRL's padded batches, whose worst
    micro-batch is ``batch_size`` rows of the longest row's length. TRL checkpoints every
    block or none: on when ``auto`` would checkpoint any block of the (eager) model."""
    longest = cfg.train.batch_size * max(len(ids) for ids in input_ids)
    return all_blocks(
        cfg.train.gradient_checkpointing,
        model,
        held_experts(model),
        longest,
        dtype,
        device,
        cfg.train.memory_budget_gb,
    )


def all_or_none(checkpointing: bool, model: torch.nn.Module) -> str:
    """The report's ``checkpointed_blocks`` (``"k of n"``) of an all-or-nothing setting."""
    blocks = len(decoder_layers(model))
    return f"{blocks if checkpointing else 0} of {blocks}"


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
    depends on the data and device: :func:`padded_checkpointing`).
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
        **{
            CHECKPOINTING: gradient_checkpointing,
            f"{CHECKPOINTING}_kwargs": {"use_reentrant": False},
        },
        bf16=dtype == torch.bfloat16,
        fp16=False,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy=t.eval if has_eval else "no",
        eval_steps=t.eval_steps,
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


@dataclass
class RunTotals:
    """Time a run took, summed over every process that trained it (a resumed run has several).

    Saved with each checkpoint (:data:`TOTALS_FILE`), so a resume continues from the totals of
    the checkpoint it starts from (work after that checkpoint is redone and counted once).
    """

    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    steps_timed: int = 0


class RunClock:
    """This process's times on top of the totals of the checkpoint it resumed from."""

    def __init__(self, wall_start: float, metrics: MetricsLog, before: RunTotals):
        self.wall_start = wall_start
        self.metrics = metrics
        self.before = before

    def totals(self) -> RunTotals:
        return RunTotals(
            wall_time_s=self.before.wall_time_s + time.perf_counter() - self.wall_start,
            train_time_s=self.before.train_time_s + self.metrics.step_time_total,
            steps_timed=self.before.steps_timed + self.metrics.steps_timed,
        )


def _read_totals(checkpoint: Path | None) -> RunTotals:
    path = checkpoint / TOTALS_FILE if checkpoint else None
    if path is None or not path.is_file():
        return RunTotals()
    return RunTotals(**json.loads(path.read_text(encoding="utf-8")))


class CheckpointCallback(TrainerCallback):
    """Mark each checkpoint complete once written (with the run's times in it), keep the newest
    ``keep`` complete ones, and publish a new run folder at the first.

    Args:
        engine: the run's :class:`Engine` (times, run folder).
        keep: complete checkpoints kept (``train.save_total_limit``); ``None`` keeps all.
    """

    def __init__(self, engine: Engine, keep: int | None):
        self.engine = engine
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's state comes from the checkpoint, cadences included; the ones given on
        # resume (RESUME_SAFE_FIELDS) win, as the user asked for them.
        state.compute_steps(args, state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        mark_complete(folder, state.global_step, self.keep, self.engine.write_totals)
        self.engine.folder.publish()


class StopCallback(TrainerCallback):
    """After the step during which Ctrl-C/SIGTERM arrived: save a checkpoint, stop training."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop():
            control.should_save = True
            control.should_training_stop = True


class RunFolder:
    """Where a run writes, and when the run folder appears.

    A new run writes into a staging folder beside the run folder (:mod:`mxlora.staging`) and
    is swapped in at its first complete checkpoint (:meth:`publish`, called by
    :class:`CheckpointCallback`), or at the end; from then on the staging path is a link to the
    run folder, so the trainer keeps writing where it started. An earlier run of the same name
    (allowed only with ``overwrite``) is deleted only at that swap, and a run that fails or is
    stopped before it leaves the earlier one untouched. A resumed run writes in place.

    Attributes:
        dest: the run folder.
        path: where this process writes.
        checkpoint: the checkpoint a resumed run starts from.
    """

    def __init__(self, dest: Path, staged: StagedFolder | None, checkpoint: Path | None):
        self.dest = dest
        self.staged = staged
        self.checkpoint = checkpoint
        self.path = staged.path if staged else dest

    @property
    def kept(self) -> bool:
        """The run folder holds this run (resumed, or published)."""
        return self.staged is None or self.staged.published

    def publish(self) -> None:
        if self.staged is not None:
            self.staged.publish(keep_link=True)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staged is not None:
            self.staged.__exit__(exc_type, exc, tb)


def open_run_folder_on_main(
    cfg: TrainingConfig, resume: bool, overwrite: bool, info: DistInfo
) -> RunFolder:
    """:func:`open_run_folder` on rank 0; the other ranks get a :class:`RunFolder` that only
    knows the checkpoint to resume from (they write nothing) or rank 0's error."""
    if not info.distributed:
        return open_run_folder(cfg, resume, overwrite)
    opened: list[RunFolder] = []

    def open_on_main() -> Path | None:
        opened.append(open_run_folder(cfg, resume, overwrite))
        return opened[0].checkpoint

    checkpoint = on_main(open_on_main, info)
    return opened[0] if opened else RunFolder(cfg.output.run_dir, None, checkpoint)


def open_run_folder(cfg: TrainingConfig, resume: bool, overwrite: bool) -> RunFolder:
    """Check (resuming) or stage (new run) the run folder; see :class:`RunFolder`.

    A new run's ``config.yaml`` holds absolute data and model paths, so that ``--resume``
    works from any directory.

    Raises:
        TrainingError: the run folder exists (without ``overwrite``), or there is nothing to
            resume, or the config changes what the run computes.
    """
    run_dir = cfg.output.run_dir
    if resume:
        return RunFolder(run_dir, None, _resume_checkpoint(cfg))
    try:
        staged = StagedFolder(run_dir, overwrite)
    except DestinationExists as e:
        hint = f" (or continue it: mxlora train --resume {run_dir})" if _resumable(run_dir) else ""
        raise TrainingError(f"run folder {e}{hint}") from None
    if is_occupied(run_dir):
        log.info("%s stays as it is until this run has its first complete checkpoint", run_dir)
    (staged.path / "config.yaml").write_text(
        dump_config(with_absolute_paths(cfg)), encoding="utf-8"
    )
    return RunFolder(run_dir, staged, None)


def _resumable(run_dir: Path) -> bool:
    return not is_finished(run_dir) and bool(complete_checkpoints(run_dir / "checkpoints"))


def is_finished(run_dir: Path) -> bool:
    """The run ended (its report is written last)."""
    return (run_dir / "report.json").is_file()


def _resume_checkpoint(cfg: TrainingConfig) -> Path:
    """The newest complete checkpoint of ``cfg``'s run; partial ones and later metrics cleared."""
    run_dir = cfg.output.run_dir
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise TrainingError(f"--resume: {run_dir} holds no run (no config.yaml)")
    if is_finished(run_dir):
        raise TrainingError(f"--resume: {run_dir} finished already; nothing to resume")
    changed = config_changes(from_dict(TrainingConfig, read_yaml(saved)), cfg)
    refused = [c for c in changed if c.split(":", 1)[0] not in RESUME_SAFE_FIELDS]
    if refused:
        raise TrainingError(
            f"--resume: {'; '.join(refused)}: changes what {run_dir} computes; on resume only "
            f"{', '.join(sorted(RESUME_SAFE_FIELDS))} may change"
        )
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise TrainingError(
            f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; start it again "
            "with --overwrite"
        )
    checkpoint = checkpoints[-1]
    for partial in (run_dir / "checkpoints").glob("checkpoint-*"):
        if not (partial / COMPLETE_MARKER).is_file():
            shutil.rmtree(partial)  # killed mid-write: never loaded, redone by this run
    truncate_metrics(run_dir / "metrics.jsonl", checkpoint_step(checkpoint))
    remove_stale_staging(run_dir)  # the link a killed run left behind
    log.info("resuming %s from %s", run_dir, checkpoint)
    return checkpoint


def resume_config(run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainingConfig:
    """The config a run was started with (its ``config.yaml``), for ``--resume RUN_DIR``.

    The run folder is ``run_dir`` wherever it now is; ``overrides`` may change only
    :data:`~mxlora.config.RESUME_SAFE_FIELDS` (checked when the run resumes).

    Raises:
        ConfigError: a malformed override.
        TrainingError: ``run_dir`` holds no run.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise TrainingError(f"--resume: {run_dir} holds no run (no config.yaml)")
    raw = apply_overrides(read_yaml(saved), list(overrides))
    raw["output"] = {"root": str(run_dir.resolve().parent), "name": run_dir.resolve().name}
    return from_dict(TrainingConfig, raw)


def config_changes(before: TrainingConfig, after: TrainingConfig) -> list[str]:
    """``field: old -> new`` for every leaf that differs (paths compared made absolute; the
    ``output`` section is left out: a run folder may be moved)."""
    a, b = to_dict(with_absolute_paths(before)), to_dict(with_absolute_paths(after))
    a.pop("output"), b.pop("output")
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(_diff(a, b, "").items())]


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

    transformers 5.2x deprecates the model's ``is_gradient_checkpointing`` for
    ``is_activation_checkpointing``; PEFT and TRL still read the old name (not our code, so it
    cannot be fixed where it is called), hence the filter.
    """
    import datasets

    transformers.logging.set_verbosity_warning()
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    if not progress_bars:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config path (the one positional without ``=``) and the ``key=value`` overrides, in
    whatever order they were typed.

    Raises:
        ConfigError: more than one config path.
    """
    items = [a for a in (args.config, *args.overrides) if a is not None]
    paths = [a for a in items if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(f"one training config expected, got {', '.join(paths)}")
    return (paths[0] if paths else None), [a for a in items if "=" in a]


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora train CONFIG [key=value ...] [--overwrite] [--nproc N]`` or
    ``mxlora train --resume RUN_DIR [key=value ...] [--nproc N]``.

    ``--nproc N`` (N > 1) re-runs the same command under torchrun with N processes on this
    host; started by a launcher already (torchrun, ``accelerate launch``), the command trains
    as one process of that job (rank 0 prints).
    """
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print("mxlora train: error: --nproc must be at least 1", file=sys.stderr)
        return 2
    if nproc > 1 and not launched() and not getattr(args, "dry_run", False):
        return relaunch(nproc, relaunch_argv(args))
    info = setup()
    try:
        return _train_cli(args, info)
    finally:
        teardown(info)


def relaunch_argv(args: argparse.Namespace) -> list[str]:
    """The ``mxlora`` arguments that run ``args``' training again (in each torchrun process)."""
    argv = ["train", *([args.config] if args.config else []), *args.overrides]
    if args.resume is not None:
        argv += ["--resume", str(args.resume)]
    if args.overwrite:
        argv.append("--overwrite")
    return argv


def _train_cli(args: argparse.Namespace, info: DistInfo) -> int:
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING, format="%(message)s"
    )
    quiet_libraries(progress_bars=sys.stderr.isatty())
    resume = args.resume is not None
    try:
        config, overrides = config_and_overrides(args)
        if resume:
            if config is not None:
                raise ConfigError(
                    f"--resume reads {args.resume}/config.yaml; drop {config} (only key=value "
                    "overrides may follow)"
                )
            cfg = resume_config(args.resume, overrides)
        elif config is None:
            raise ConfigError("a training config is needed (or --resume RUN_DIR)")
        else:
            cfg = load_config(config, overrides)
        if getattr(args, "dry_run", False):
            from mxlora.recipes.dryrun import dry_run, format_dry_run

            try:
                result = dry_run(cfg, processes=max(getattr(args, "nproc", 1), info.world_size))
            except ConfigError:
                raise
            except ValueError as e:  # the data module's errors name the field or the bad row
                raise TrainingError(str(e)) from None
            print(format_dry_run(result))
            return 0
        run_dir = train(cfg, resume=resume, overwrite=args.overwrite, info=info)
        if not info.is_main:
            return 0
    except (ConfigError, ModelLoadError, TrainingError) as e:
        print(f"mxlora train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except TrainingInterrupted as e:
        print(f"mxlora train: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        unchanged = "the run is as it was" if resume else "nothing was saved"
        print(f"mxlora train: stopped by {e} before training started; {unchanged}", file=sys.stderr)
        return e.exit_code
    print(
        f"run folder: {run_dir} (adapter: {run_dir / 'adapter'}, report: {run_dir / 'report.md'})"
    )
    return 0
