"""``mxlora train CONFIG``: one LoRA fine-tune of gpt-oss, the seed notebook's recipe, measured.

Top to bottom: set up the run folder -> render the data -> load the model and attach LoRA ->
build TRL's SFTTrainer -> train -> save the adapter atomically -> write the report.
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
import os
import shutil
import sys
import time
import warnings
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
from mxlora.distributed import DistInfo, barrier, launched, on_main, relaunch, setup, teardown
from mxlora.model.load import (
    ModelLoadError,
    load_tokenizer,
    load_weights,
    resolve_dtype,
)
from mxlora.model.lora import apply_lora, count_parameters
from mxlora.report.metrics import (
    MetricsCallback,
    peak_device_gb,
    peak_rss_gb,
    truncate_metrics,
)
from mxlora.report.writer import environment, plot_loss, summarize_losses, write_json, write_report

log = logging.getLogger(__name__)

# Written into checkpoint-N/ after everything else of it: a checkpoint without it is partial.
COMPLETE_MARKER = "mxlora-complete"
# Resumable checkpoints kept (the newest complete ones); older ones are deleted.
KEEP_CHECKPOINTS = 2


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on (one-line message)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or Inf."""


# --------------------------------------------------------------------------------------------
# The recipe.


@dataclass
class TrainResult:
    """What :func:`fit` leaves: the run folder, the trained PEFT model and the data it saw."""

    run_dir: Path
    model: torch.nn.Module
    data: PreparedData


def train(cfg: TrainingConfig, resume: bool = False, info: DistInfo | None = None) -> Path:
    """Fine-tune with LoRA as ``cfg`` says and write the run folder.

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in the run folder.
        info: this process's place in a multi-process job (default: :func:`mxlora.distributed.
            setup`, one process unless a launcher started this one).

    Returns:
        The run folder.

    Raises:
        ConfigError, ModelLoadError: bad config or model path.
        TrainingError: bad data, NaN/Inf loss, out of memory, nothing to resume.
    """
    return fit(cfg, resume, info).run_dir


def fit(cfg: TrainingConfig, resume: bool = False, info: DistInfo | None = None) -> TrainResult:
    """:func:`train`, also handing back the trained model in memory (for tests and notebooks).

    Under a launcher (torchrun, ``accelerate launch``, ``--nproc``) every process trains on its
    share of each global batch of ``train.batch_size`` rows (data parallel, the trainer's DDP)
    and only rank 0 writes the run folder.
    """
    wall_start = time.perf_counter()
    info = info or setup()
    # The tokenizer first: it checks the model path before an earlier run folder is replaced.
    tokenizer = load_tokenizer(cfg.model)
    run_dir = cfg.output.run_dir
    if cfg.train.batch_size % info.world_size:
        raise TrainingError(
            f"train.batch_size: {cfg.train.batch_size} rows per step do not split evenly over "
            f"{info.world_size} processes"
        )
    checkpoint = on_main(lambda: _setup_run_dir(cfg, resume), info)
    device = info.device
    on_main(lambda: write_json(run_dir / "environment.json", environment(device)), info)
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

    # Trainer.
    dtype = resolve_dtype(cfg.model.dtype, device)
    has_eval = data.eval is not None and len(data.eval) > 0
    show_bar = sys.stderr.isatty()
    metrics = MetricsCallback(run_dir / "metrics.jsonl", device, print_lines=not show_bar)
    trainer = GuardedSFTTrainer(
        model=model,
        args=sft_config(cfg, run_dir, dtype, has_eval, show_bar, processes=info.world_size),
        train_dataset=data.train,
        eval_dataset=data.eval if has_eval else None,
        processing_class=tokenizer,
        # Rank 0 alone writes metrics.jsonl (its losses are the global batch's: the trainer
        # gathers them).
        callbacks=[metrics, CheckpointCallback()] if info.is_main else [CheckpointCallback()],
    )
    if not show_bar:
        trainer.remove_callback(PrinterCallback)  # our plain lines replace its raw dicts

    # Train.
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        raise TrainingError(
            oom_message(cfg, device, f"step {trainer.state.global_step + 1}")
        ) from None
    except RuntimeError as e:
        if _is_host_oom(e):
            raise TrainingError(
                oom_message(cfg, device, f"step {trainer.state.global_step + 1}")
            ) from None
        raise

    if not info.is_main:
        barrier(info)  # rank 0 saves and reports
        return TrainResult(run_dir=run_dir, model=trainer.model, data=data)

    # Save.
    save_adapter(trainer.model, run_dir / "adapter")

    # Report.
    peak_alloc, peak_reserved = peak_device_gb(device)
    state = trainer.state
    tokens_here = state.num_input_tokens_seen - (metrics.tokens_at_start or 0)
    report: dict[str, Any] = {
        "name": cfg.output.name,
        "model": cfg.model.name_or_path,
        "experts": cfg.model.experts,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": state.global_step,
        "epochs": state.epoch,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval) if has_eval else 0,
        "train_tokens": state.num_input_tokens_seen,
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
        "resumed_from_step": _checkpoint_step(checkpoint) if checkpoint else None,
        "data": data.report,
        "device": environment(device)["device"],
    }
    write_report(run_dir, report)
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.output.name} loss")
    barrier(info)
    return TrainResult(run_dir=run_dir, model=trainer.model, data=data)


# --------------------------------------------------------------------------------------------
# Pieces of the recipe.


def sft_config(
    cfg: TrainingConfig,
    run_dir: Path,
    dtype: torch.dtype,
    has_eval: bool,
    show_bar: bool,
    processes: int = 1,
) -> SFTConfig:
    """TRL's ``SFTConfig`` from our training section (the seed's hyperparameters).

    ``train.batch_size`` is the global batch: each of ``processes`` gets its share.
    """
    t = cfg.train
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size // processes,
        per_device_eval_batch_size=t.batch_size // processes,
        gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_len,
        # transformers 5: a value < 1 is a ratio of all steps (the seed's warmup_ratio=0.03).
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=(
            {"min_lr_rate": t.min_lr_rate} if t.scheduler == "cosine_with_min_lr" else {}
        ),
        gradient_checkpointing=t.gradient_checkpointing,
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
        # Several CPU processes: accelerate's multi-CPU (gloo) DDP is chosen only when asked for.
        use_cpu=processes > 1 and not torch.cuda.is_available(),
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
            batch = (step - 1) * accum + self._micro_index
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {step}, batch {batch} (0-based, counted from the "
                f"start of training; micro-batch {self._micro_index} of {accum} in that step). "
                "Lower train.lr, check the data rows of that batch, or use model.dtype=float32."
            )
        self._micro_index += 1
        return loss


class CheckpointCallback(TrainerCallback):
    """Mark each checkpoint complete once written, then keep only the newest complete ones."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return  # rank 0 marks and rotates
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        marker = folder / COMPLETE_MARKER
        tmp = folder / f".{COMPLETE_MARKER}.tmp"
        tmp.write_text(f"{state.global_step}\n")
        _fsync_tree(folder)
        tmp.replace(marker)
        for old in complete_checkpoints(Path(args.output_dir))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk, so the marker never outlives their contents."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_adapter(model: torch.nn.Module, dest: Path) -> None:
    """Write the PEFT adapter so that ``dest`` is either absent or complete, never partial.

    It is written into a temp folder beside ``dest`` and renamed into place in one step.
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _fsync_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)


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
        truncate_metrics(run_dir / "metrics.jsonl", _checkpoint_step(checkpoint))
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


def _is_host_oom(error: RuntimeError) -> bool:
    text = str(error)
    return "DefaultCPUAllocator" in text and "memory" in text


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
    """``mxlora train CONFIG [key=value ...] [--resume] [--nproc N]``.

    ``--nproc N`` (N > 1) re-runs the same command under torchrun with N processes on this host;
    started by a launcher already (torchrun, ``accelerate launch``), the command trains as one
    process of that job.
    """
    if args.nproc < 1:
        print("mxlora train: error: --nproc must be at least 1", file=sys.stderr)
        return 2
    if args.nproc > 1 and not launched():
        argv = ["train", args.config, *args.overrides, *(["--resume"] if args.resume else [])]
        return relaunch(args.nproc, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries(progress_bars=sys.stderr.isatty())
    info = setup()
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = train(cfg, resume=args.resume, info=info)
    except (ConfigError, ModelLoadError, TrainingError) as e:
        print(f"mxlora train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        teardown(info)
    if not info.is_main:
        return 0
    print(
        f"run folder: {run_dir} (adapter: {run_dir / 'adapter'}, report: {run_dir / 'report.md'})"
    )
    return 0
