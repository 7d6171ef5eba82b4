"""Experiment trackers (``train.report_to``): the same metrics as ``metrics.jsonl``, elsewhere.

Every tracker writes locally and none needs the network:

* ``tensorboard``: event files in ``<run folder>/tensorboard/`` (``torch.utils.tensorboard``,
  which needs the ``tensorboard`` package: ``pip install 'mxlora[tensorboard]'``); view them
  with ``tensorboard --logdir <run folder>``.
* ``wandb``: an offline run in ``<run folder>/wandb/`` (``mode="offline"``); upload it later
  with ``wandb sync`` if wanted.
* ``trackio``: trackio's local database (``TRACKIO_DIR``, by default under the Hugging Face
  cache), project ``mxlora``, run named after the run folder; ``trackio show`` opens it.

The interface is two calls, so a hand-written training loop uses it as the Trainer does::

    trackers = open_trackers(cfg.train.report_to, run_dir, name="quotes", config=to_dict(cfg))
    trackers.log(step, {"loss": 2.31, "learning_rate": 2e-4})   # eval_* keys go to eval/
    trackers.close()

Metric names follow transformers' trackers: ``eval_loss`` becomes ``eval/loss``, any other
key ``train/<key>`` (``train/loss``, ``train/learning_rate``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mxlora.config import ConfigError

#: The project name runs are filed under in wandb and trackio.
PROJECT = "mxlora"
#: The run folder's subfolder that holds TensorBoard's event files.
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    """One experiment tracker."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar ``metrics`` (already tagged, ``train/loss``) at optimizer ``step``."""

    def close(self) -> None:
        """Flush and release the tracker."""


def tagged(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics under their tracker names: ``eval_loss`` -> ``eval/loss``, ``loss`` ->
    ``train/loss``; non-numbers (and booleans) are left out, as is ``step`` (the x axis)."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith("eval_"):
            out[f"eval/{key.removeprefix('eval_')}"] = float(value)
        else:
            out[f"train/{key}"] = float(value)
    return out


def _import(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"train.report_to: {tracker!r} needs the {module} package (pip install {module})"
        ) from None


#: The package each tracker needs (its import name is its pip name).
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def check_trackers(names: Sequence[str]) -> None:
    """Fail early (before a long model load) when a named tracker's package is missing.

    Raises:
        ConfigError: ``train.report_to: 'wandb' needs the wandb package (pip install wandb)``,
            or an unknown tracker name.
    """
    for tracker in names:
        if tracker not in PACKAGES:
            raise ConfigError(
                f"train.report_to: unknown tracker {tracker!r} ({', '.join(PACKAGES)})"
            )
        _import(PACKAGES[tracker], tracker)


class TensorBoardTracker:
    """Event files under ``<run_dir>/tensorboard``.

    Args:
        run_dir: the run folder.
        start_step: a resumed run's checkpoint step: events logged after it by the interrupted
            process are purged (those steps are trained again).
    """

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(
            log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline wandb run in ``<run_dir>/wandb`` (never contacts a server)."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(
            project=PROJECT, name=name, dir=str(run_dir), config=dict(config), mode="offline"
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run in trackio's local database (no Space, no server)."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.trackio = _import("trackio", "trackio")
        self.trackio.init(project=PROJECT, name=name, config=dict(config))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.trackio.log(dict(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


class Trackers:
    """Several trackers behind one ``log``/``close``; metric names are tagged here, once.

    Args:
        trackers: the open trackers (none is fine: every call is then a no-op).
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log the scalar entries of ``metrics`` (``metrics.jsonl``/Trainer names) at ``step``."""
        values = {k: v for k, v in tagged(metrics).items() if math.isfinite(v)}
        if values:
            for tracker in self.trackers:
                tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(
    names: Sequence[str],
    run_dir: Path,
    name: str,
    config: Mapping[str, Any],
    start_step: int = 0,
) -> Trackers:
    """Open the trackers ``train.report_to`` names.

    Args:
        names: tracker names (``tensorboard``, ``trackio``, ``wandb``).
        run_dir: the run folder (TensorBoard and wandb write inside it).
        name: the run's name in wandb/trackio (``output.name``).
        config: the resolved config, recorded by wandb/trackio.
        start_step: the checkpoint step a resumed run starts from (0 for a fresh run).

    Raises:
        ConfigError: an unknown name, or a tracker whose package is not installed.
    """
    check_trackers(names)
    opened: list[Tracker] = []
    try:
        for tracker in names:
            if tracker == "tensorboard":
                opened.append(TensorBoardTracker(run_dir, start_step))
            elif tracker == "wandb":
                opened.append(WandbTracker(run_dir, name, config))
            else:
                opened.append(TrackioTracker(name, config))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
