"""Training metrics as they happen: ``metrics.jsonl`` lines, memory peaks and a plain log line.

One JSON object per logging step (train) or evaluation (eval), in the run-folder contract's
fields. Throughput counts only non-pad tokens (the trainer's ``num_input_tokens_seen`` with
``include_num_input_tokens_seen="non_padding"``, i.e. the attention-mask sum) and only time spent
inside optimizer steps (forward, backward, optimizer), so evaluation and checkpoint writes do not
dilute it.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from mxlora.report.trackers import Trackers

# GB here are 10^9 bytes (what `nvidia-smi`-style tables and the figures use).
GB = 1e9


def peak_rss_gb() -> float:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def peak_device_gb(device: torch.device) -> tuple[float | None, float | None]:
    """Peak allocated and reserved CUDA memory since the last reset; ``None`` on the CPU."""
    if device.type != "cuda":
        return None, None
    return (
        torch.cuda.max_memory_allocated(device) / GB,
        torch.cuda.max_memory_reserved(device) / GB,
    )


class MetricsLog:
    """Write ``metrics.jsonl`` rows and keep the run's totals for the report (either engine).

    Args:
        path: the ``metrics.jsonl`` file (appended to, so a resumed run continues it).
        device: the training device, for the memory peaks.
        print_lines: also print one plain line per row (when no progress bar is shown), with
            the step count and an ETA.
        trackers: experiment trackers (``train.report_to``) that get every row too.
    """

    def __init__(
        self,
        path: Path,
        device: torch.device,
        print_lines: bool,
        trackers: Trackers | None = None,
    ) -> None:
        self.path = path
        self.device = device
        self.print_lines = print_lines
        self.trackers = trackers
        self.max_steps: int | None = None  # the run's optimizer steps, for progress lines
        self.step_time_total = 0.0  # seconds inside optimizer steps, this process
        self.steps_timed = 0
        self.tokens_at_start: int | None = None  # tokens already seen when this process began
        self._window_time = 0.0
        self._window_steps = 0
        self._window_tokens_start = 0

    def begin(self, tokens_seen: int, max_steps: int | None = None) -> None:
        """Training (re)starts having seen ``tokens_seen`` non-pad tokens, ``max_steps`` to go
        in all."""
        self.tokens_at_start = tokens_seen
        self.max_steps = max_steps
        self._window_tokens_start = tokens_seen

    def step_done(self, elapsed: float) -> None:
        """One optimizer step took ``elapsed`` seconds (device synchronized)."""
        self._window_time += elapsed
        self._window_steps += 1
        self.step_time_total += elapsed
        self.steps_timed += 1

    def log_train(
        self,
        step: int,
        epoch: float,
        loss: float,
        grad_norm: float | None,
        learning_rate: float | None,
        tokens: int,
    ) -> dict[str, Any]:
        """Write a train row: ``loss`` is the mean over the steps since the last train row."""
        window_tokens = tokens - self._window_tokens_start
        peak_alloc, _ = peak_device_gb(self.device)
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "tokens": tokens,
            "tokens_per_s": window_tokens / self._window_time if self._window_time else None,
            "step_time_s": self._window_time / self._window_steps if self._window_steps else None,
            "peak_alloc_gb": peak_alloc,
            "rss_gb": peak_rss_gb(),
        }
        self._window_time, self._window_steps = 0.0, 0
        self._window_tokens_start = tokens
        self._write(row, self._progress(step))
        return row

    def log_eval(self, step: int, eval_loss: float) -> dict[str, Any]:
        """Write an eval row."""
        row = {"step": step, "eval_loss": eval_loss}
        self._write(row)
        return row

    def _progress(self, step: int) -> str:
        """``12/40 eta 1m05s``: the remaining steps at this process's mean step time."""
        if not self.max_steps:
            return ""
        text = f"{step}/{self.max_steps}"
        if self.steps_timed:
            left = (self.max_steps - step) * self.step_time_total / self.steps_timed
            text += f" eta {format_duration(left)}"
        return text

    def _write(self, row: dict[str, Any], progress: str = "") -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row["step"], row)
        if self.print_lines:
            print(format_line(row, progress), file=sys.stderr, flush=True)


class MetricsCallback(TrainerCallback):
    """Feeds a :class:`MetricsLog` from TRL's trainer: steps timed from ``on_step_begin`` to
    ``on_step_end``, rows from its logs."""

    def __init__(self, log: MetricsLog) -> None:
        self.log = log
        self._step_start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.log.begin(state.num_input_tokens_seen, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.log.device.type == "cuda":
            torch.cuda.synchronize(self.log.device)  # time the work, not its queueing
        self.log.step_done(time.perf_counter() - self._step_start)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.log.log_train(
                state.global_step,
                state.epoch,
                logs["loss"],
                logs.get("grad_norm"),
                logs.get("learning_rate"),
                state.num_input_tokens_seen,
            )
        if "eval_loss" in logs:
            self.log.log_eval(state.global_step, logs["eval_loss"])


def format_duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_line(row: dict[str, Any], progress: str = "") -> str:
    """One metrics row as a plain log line (``step 10/40 eta 1m05s loss 2.3412 ...``).

    Args:
        row: a ``metrics.jsonl`` row.
        progress: ``10/40 eta 1m05s`` in place of the bare step number, when known.
    """
    parts = [f"step {progress or row['step']}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("eval_loss", "{:.4f}"),
        ("grad_norm", "{:.3f}"),
        ("learning_rate", "{:.2e}"),
        ("tokens_per_s", "{:.0f}"),
        ("step_time_s", "{:.2f}"),
        ("peak_alloc_gb", "{:.2f}"),
        ("rss_gb", "{:.2f}"),
    ):
        value = row.get(key)
        if value is not None:
            parts.append(f"{key} {fmt.format(value)}")
    return " ".join(parts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` (missing file: none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after ``last_step`` (a resumed run redoes those steps and logs them again)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
