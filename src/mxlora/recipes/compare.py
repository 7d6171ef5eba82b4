"""``mxlora compare``: one table and one loss plot for several training runs.

Reads what ``mxlora train`` leaves in each run folder (``report.json`` and ``metrics.jsonl``, the
layout in the run-folder contract) and writes, next to the runs unless told otherwise:

- ``comparison.md``: a markdown table of the figures users choose a fine-tuning setup by (peak
  memory, throughput, time, final losses, trainable parameters, tokens trained) and the plot;
- ``comparison.png``: every run's train loss (solid) and eval loss (dashed, dots) against step;
- ``comparison.json``: the same rows with the reports' exact numbers, for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxlora.report.plots import loss_axes, save_loss_figure

MD_NAME = "comparison.md"
PNG_NAME = "comparison.png"
JSON_NAME = "comparison.json"


class RunFolderError(ValueError):
    """A path given to ``compare`` is not a readable run folder."""


@dataclass(frozen=True)
class Run:
    """What ``compare`` needs from one run folder.

    Attributes:
        path: The run folder.
        label: Short unique name used in the table and legend (path below the runs' common parent).
        report: ``report.json`` as written by ``mxlora train``.
        train_loss: ``(step, loss)`` of every train log line of ``metrics.jsonl``.
        eval_loss: ``(step, eval_loss)`` of every eval line.
    """

    path: Path
    label: str
    report: dict[str, Any]
    train_loss: list[tuple[int, float]]
    eval_loss: list[tuple[int, float]]


def _gb(v: float) -> str:
    return f"{v:.2f}"


def _one_decimal(v: float) -> str:
    return f"{v:,.1f}"


def _loss(v: float) -> str:
    return f"{v:.4f}"


def _count(v: float) -> str:
    return f"{int(v):,}"


# (header, report.json key, formatter). Keys are the run-folder contract's report fields.
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("peak alloc (GB)", "peak_alloc_gb", _gb),
    ("peak reserved (GB)", "peak_reserved_gb", _gb),
    ("peak RSS (GB)", "peak_rss_gb", _gb),
    ("tokens/s", "tokens_per_s", _one_decimal),
    ("train time (s)", "train_time_s", _one_decimal),
    ("wall time (s)", "wall_time_s", _one_decimal),
    ("steps", "steps", _count),
    ("train loss (final)", "train_loss_final", _loss),
    ("eval loss (final)", "eval_loss_final", _loss),
    ("trainable params", "trainable_params", _count),
    ("tokens trained", "train_tokens", _count),
)
MISSING = "n/a"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(step, loss)`` train and ``(step, eval_loss)`` eval points, errors named by line.

    Not ``mxlora.report.metrics.read_metrics``: that module imports torch and transformers
    (seconds), which a table of JSON numbers has no need for.
    """
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable ({e})") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{path}:{number}: not a JSON line ({e})") from e
        if not isinstance(row, dict) or "step" not in row:
            continue
        if row.get("loss") is not None:
            train.append((int(row["step"]), float(row["loss"])))
        if row.get("eval_loss") is not None:
            evals.append((int(row["step"]), float(row["eval_loss"])))
    return train, evals


def load_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Read run folders written by ``mxlora train``.

    Args:
        run_dirs: Run folders (each holding ``report.json`` and ``metrics.jsonl``).

    Returns:
        One :class:`Run` per distinct folder, in the order given.

    Raises:
        RunFolderError: A path is missing, not a folder, or lacks a readable report/metrics file.
    """
    paths: list[Path] = []
    for given in run_dirs:
        path = Path(given).resolve()
        if not path.is_dir():
            raise RunFolderError(f"{given}: no such run folder")
        for required in ("report.json", "metrics.jsonl"):
            if not (path / required).is_file():
                raise RunFolderError(
                    f"{given}: not a run folder (no {required}; expected a folder written by "
                    "`mxlora train`)"
                )
        if path not in paths:
            paths.append(path)
    if not paths:
        raise RunFolderError("no run folders given")
    parent = Path(os.path.commonpath([p.parent for p in paths]))
    runs = []
    for path in paths:
        train, evals = _read_metrics(path / "metrics.jsonl")
        runs.append(
            Run(
                path=path,
                label=path.relative_to(parent).as_posix(),
                report=_read_json(path / "report.json"),
                train_loss=train,
                eval_loss=evals,
            )
        )
    return runs


def _cell(report: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    value = report.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return fmt(value)


def markdown_table(runs: Sequence[Run]) -> str:
    """The comparison table in GitHub markdown, one row per run, numbers as in the reports."""
    header = ["run", *(h for h, _, _ in COLUMNS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|",
    ]
    for run in runs:
        cells = [run.label, *(_cell(run.report, key, fmt) for _, key, fmt in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(runs: Sequence[Run], out_png: Path) -> Path:
    """Overlay every run's train loss (solid) and eval loss (dashed) against step in one PNG."""
    fig, ax = loss_axes(8, 5)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        if run.train_loss:
            steps, losses = zip(*run.train_loss, strict=True)
            ax.plot(steps, losses, color=color, linestyle="-", label=f"{run.label} train")
        if run.eval_loss:
            steps, losses = zip(*run.eval_loss, strict=True)
            ax.plot(
                steps, losses, color=color, linestyle="--", marker="o", label=f"{run.label} eval"
            )
    return save_loss_figure(fig, ax, "Loss curves", out_png)


def _json_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [
        {"run": run.label, "path": str(run.path), **{k: run.report.get(k) for _, k, _ in COLUMNS}}
        for run in runs
    ]


def compare(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Write the comparison table, plot and JSON of several runs.

    Args:
        run_dirs: Run folders written by ``mxlora train``.
        out_dir: Where to write; default the runs' common parent folder ("next to the runs").

    Returns:
        ``{"table": markdown table, "markdown": path, "png": path, "json": path}``.

    Raises:
        RunFolderError: A path is not a readable run folder.
    """
    runs = load_runs(run_dirs)
    if out_dir is None:
        out = Path(os.path.commonpath([r.path.parent for r in runs]))
    else:
        out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    png = plot_loss_curves(runs, out / PNG_NAME)
    md = out / MD_NAME
    md.write_text(
        f"# Run comparison\n\n{table}\n\nLoss curves (train solid, eval dashed):\n\n"
        f"![loss curves]({PNG_NAME})\n",
        encoding="utf-8",
    )
    js = out / JSON_NAME
    js.write_text(json.dumps(_json_rows(runs), indent=2) + "\n", encoding="utf-8")
    return {"table": table, "markdown": md, "png": png, "json": js}


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora compare RUN... [--out DIR]``: print the table, say where the files went."""
    try:
        result = compare(args.runs, args.out)
    except RunFolderError as e:
        print(f"mxlora compare: error: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"\nwrote {result['markdown']}, {result['png']} and {result['json']}")
    return 0
