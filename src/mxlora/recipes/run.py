"""``mxlora run CONFIG``: the seed notebook's whole flow as one command.

1. train every run of the config, each in its own child process (``mxlora train``): its own
   memory scope, so nothing leaks between runs and each report shows that run's own peak;
2. merge the chosen run's adapter into the base model (``mxlora merge``);
3. ask the merged model the chat question (``mxlora chat --json``), reply parsed into the
   analysis and final channels;
4. compare the runs (``mxlora compare``): table and overlaid loss curves.

Every step is a child process running the step's own subcommand, so this module depends on
their command lines only. Everything lands in ``<output.root>/<output.name>/``: one folder per
training run, ``merged/``, ``chat.json``, ``compare/`` and ``run.json`` (where everything is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mxlora.config import ConfigError, RunConfig, load_run_config, run_entry_config
from mxlora.report.writer import write_json
from mxlora.staging import DestinationExists, StagedFolder

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A step of the flow failed (its own output, above, says why)."""


def run(
    config_path: str | Path, overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False
) -> Path:
    """Run the flow of a run config.

    The output folder is built beside its final place and takes it once the first training run
    is complete (from then on the build path is a link to it), so a flow that fails early
    leaves an earlier output of the same name as it was (:mod:`mxlora.staging`).

    Args:
        config_path: the run config YAML (e.g. ``configs/tiny/seed.yaml``).
        overrides: ``key=value`` overrides of the run config (e.g. ``chat.max_new_tokens=64``).
        overwrite: replace an existing output folder (else it is refused).

    Returns:
        The comparison report (``compare/comparison.md``).

    Raises:
        ConfigError: the run config or one of its training configs is invalid.
        RunError: a step failed, or the output folder exists.
    """
    cfg = load_run_config(config_path, overrides)
    final = cfg.output.run_dir
    try:
        staged = StagedFolder(final, overwrite)
    except DestinationExists as e:
        raise RunError(f"output {e}") from None
    with staged:
        out = staged.path
        run_dirs = train_all(config_path, cfg, out, on_first=lambda: staged.publish(True))
        merged = merge(config_path, cfg, run_dirs, out / "merged")
        reply = chat(cfg, merged)
        write_json(out / "chat.json", reply)
        compare(list(run_dirs.values()), out / "compare")
        write_json(
            out / "run.json",
            {
                "config": str(config_path),
                "runs": {name: str(final / name) for name in run_dirs},
                "merged": str(final / "merged"),
                "chat": str(final / "chat.json"),
                "comparison": str(final / "compare" / "comparison.md"),
            },
        )
    return final / "compare" / "comparison.md"


def train_all(
    config_path: str | Path, cfg: RunConfig, out: Path, on_first: Callable[[], None]
) -> dict[str, Path]:
    """Train each run in a child process; returns run name -> run folder.

    ``on_first`` is called once the first run is complete (something worth keeping).
    """
    run_dirs: dict[str, Path] = {}
    for entry in cfg.runs:
        name = run_entry_config(config_path, entry).output.name
        config = Path(config_path).parent / entry.config
        print(f"== training {name} ({config}) in its own process", flush=True)
        _child(["train", str(config), *entry.overrides, f"output.root={out}"], f"training {name}")
        run_dirs[name] = out / name
        if len(run_dirs) == 1:
            on_first()
    return run_dirs


def merge(config_path: str | Path, cfg: RunConfig, run_dirs: dict[str, Path], dest: Path) -> Path:
    """Merge the adapter of run ``cfg.merge.run`` into its base model."""
    entry = next(
        e for e in cfg.runs if run_entry_config(config_path, e).output.name == cfg.merge.run
    )
    model = run_entry_config(config_path, entry).model
    print(f"== merging the {cfg.merge.run} adapter into {model.name_or_path}", flush=True)
    _child(
        [
            "merge",
            "--base",
            model.name_or_path,
            "--adapter",
            str(run_dirs[cfg.merge.run] / "adapter"),
            "--out",
            str(dest),
            "--dtype",
            model.dtype,
        ],
        "merge",
    )
    return dest


def chat(cfg: RunConfig, model: Path) -> dict[str, Any]:
    """Ask the merged model the configured question; the reply as ``mxlora chat --json`` gives."""
    c = cfg.chat
    print(f"== chat with {model} (reasoning language: {c.reasoning_language})", flush=True)
    stdout = _child(
        [
            "chat",
            "--model",
            str(model),
            "--prompt",
            c.prompt,
            "--reasoning-language",
            c.reasoning_language,
            "--max-new-tokens",
            str(c.max_new_tokens),
            "--json",
        ],
        "chat",
        capture=True,
    )
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        reply = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RunError(f"chat: expected one JSON line, got {stdout[-500:]!r}") from None
    if reply.get("valid"):
        print(f"analysis: {reply.get('analysis')!r}\nfinal:    {reply.get('final')!r}", flush=True)
    else:  # e.g. a tiny random model: say so instead of printing two empty channels
        print(f"not a complete Harmony answer ({reply.get('reason')}); raw reply:", flush=True)
        print(f"  {reply.get('raw')!r}", flush=True)
    return {"prompt": c.prompt, "reasoning_language": c.reasoning_language, **reply}


def compare(run_dirs: list[Path], dest: Path) -> Path:
    """Write the comparison of the runs; returns its markdown report."""
    print("== comparing the runs", flush=True)
    _child(["compare", *map(str, run_dirs), "--out", str(dest)], "compare")
    return dest / "comparison.md"


def _child(args: list[str], what: str, capture: bool = False) -> str:
    """Run ``mxlora ARGS`` in a fresh Python process; its stderr (and stdout) pass through.

    Unless the caller chose otherwise, OpenMP threads sleep instead of spinning when idle
    (``OMP_WAIT_POLICY=PASSIVE``): on a CPU whose cores other processes share, spinning torch
    threads made a tiny training step about 9x slower (measured on the 2-core dev machine:
    43 s against 4.8 s wall at load 8). Sleeping threads cost only their wake-up latency.
    """
    command = [sys.executable, "-m", "mxlora.cli", *args]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    result = subprocess.run(
        command, stdout=subprocess.PIPE if capture else None, text=True, env=env
    )
    if result.returncode != 0:
        raise RunError(f"{what} failed (exit {result.returncode}); its output is above")
    return result.stdout or ""


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora run CONFIG [key=value ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = run(args.config, args.overrides, overwrite=args.overwrite)
    except (ConfigError, RunError) as e:
        print(f"mxlora run: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(f"comparison report: {report}")
    return 0
