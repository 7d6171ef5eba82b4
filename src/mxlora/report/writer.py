"""The run folder's summary files: ``environment.json``, ``report.json``, ``report.md``,
``loss.png`` (fields as in the run-folder contract)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from mxlora.report.metrics import read_metrics
from mxlora.report.plots import loss_axes, save_loss_figure

# Packages whose versions decide a run's numbers.
VERSIONED = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "mxlora")


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` / ``cpu (x86_64)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device of this process (no host name: run folders get shared)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # The pid shows which process trained (``mxlora run`` gives each run its own).
    env: dict[str, Any] = {"versions": versions, "device": device_name(device), "pid": os.getpid()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["cuda"] = "cpu"
        env["cpu_count"] = os.cpu_count()
    return env


def _nvidia_driver() -> str | None:
    """The driver version from /proc/driver/nvidia/version.

    Its first line varies ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04 ..." or
    "... Open Kernel Module for x86_64  580.159.04 ..."), so take the first dotted version number.
    """
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    return parse_nvidia_driver(text)


def parse_nvidia_driver(text: str) -> str | None:
    """First ``N.N[.N]`` version number on the first line of /proc/driver/nvidia/version."""
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", text.splitlines()[0] if text else "")
    return match.group(1) if match else None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def summarize_losses(metrics_path: Path) -> dict[str, float | None]:
    """First/final train loss, final eval loss and grad norm from ``metrics.jsonl``."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    return {
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_final": train[-1]["loss"] if train else None,
        "eval_loss_final": evals[-1]["eval_loss"] if evals else None,
        "grad_norm_final": train[-1].get("grad_norm") if train else None,
    }


_MD_ROWS = (
    ("model", "model"),
    ("experts", "experts"),
    ("device", "device"),
    ("steps", "steps"),
    ("epochs", "epochs"),
    ("train rows", "train_rows"),
    ("eval rows", "eval_rows"),
    ("trained tokens (non-pad)", "train_tokens"),
    ("tokens/s", "tokens_per_s"),
    ("wall time (s)", "wall_time_s"),
    ("train time (s)", "train_time_s"),
    ("mean step time (s)", "step_time_s_mean"),
    ("peak allocated (GB)", "peak_alloc_gb"),
    ("peak reserved (GB)", "peak_reserved_gb"),
    ("peak RSS (GB)", "peak_rss_gb"),
    ("train loss (first)", "train_loss_first"),
    ("train loss (final)", "train_loss_final"),
    ("eval loss (final)", "eval_loss_final"),
    ("grad norm (final)", "grad_norm_final"),
    ("trainable params", "trainable_params"),
    ("total params", "total_params"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report_markdown(report: dict[str, Any]) -> str:
    """``report.json`` as a readable page (figures table, then the data report)."""
    lines = [f"# Run {report['name']}", "", "| | |", "|---|---:|"]
    lines += [f"| {label} | {_fmt(report.get(key))} |" for label, key in _MD_ROWS]
    lines += ["", "![loss](loss.png)", "", "## Data", ""]
    lines += ["```json", json.dumps(report.get("data", {}), indent=2), "```", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.md``."""
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(report_markdown(report), encoding="utf-8")


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> Path:
    """Train loss (line) and eval loss (dots) against step."""
    rows = read_metrics(metrics_path)
    fig, ax = loss_axes(7, 4.5)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o--", label="eval")
    return save_loss_figure(fig, ax, title, out_png)
