"""Training knobs users of TRL/torchtune expect: trackers, eval every N steps, weight decay,
gradient clipping, checkpoint rotation, loss on every token; each checked by its effect."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mxlora.config import ConfigError, TrainingConfig, from_dict
from mxlora.recipes.train import COMPLETE_MARKER, fit, rotate_checkpoints, sft_config

TINY = "tiny:layers=4"
MAX_GRAD_NORM = 0.05  # far below the tiny model's gradient norms, so every step is clipped
WEIGHT_DECAY = 0.1


def tiny_config(root: Path, **sections) -> TrainingConfig:
    raw = {
        "model": {"name_or_path": TINY},
        "lora": {"experts": {"layers": [1, 3]}},
        "data": {"source": "example:quotes", "select": 16, "test_size": 0.25, "seed": 42},
        "train": {"lr": 1e-3, "batch_size": 2, "max_len": 256, "logging_steps": 1},
        "output": {"root": str(root), "name": "quotes"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return from_dict(TrainingConfig, raw)


# --------------------------------------------------------------------------------------------
# Config fields: validation names the field.


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"eval": "steps"}, r"^train\.eval_steps: required with eval: steps"),
        ("train", {"eval": "sometimes"}, r"^train\.eval: expected one of 'epoch', 'steps'"),
        ("train", {"eval_steps": 0}, r"^train\.eval_steps: must be >= 1 or null, got 0"),
        ("train", {"weight_decay": -0.1}, r"^train\.weight_decay: must be >= 0"),
        ("train", {"max_grad_norm": 0}, r"^train\.max_grad_norm: must be > 0"),
        ("train", {"save_total_limit": 0}, r"^train\.save_total_limit: must be >= 1 or null"),
        ("train", {"report_to": ["mlflow"]}, r"^train\.report_to\[0\]: expected one of"),
        ("train", {"report_to": "tensorboard,tensorboard"}, r"^train\.report_to: names a tracker"),
        ("data", {"loss_on": "prompt"}, r"^data\.loss_on: must be one of assistant, all"),
    ],
)
def test_new_fields_are_validated_naming_the_field(tmp_path, section, values, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **{section: values})


def test_new_fields_defaults_and_overrides(tmp_path):
    cfg = tiny_config(tmp_path)
    t = cfg.train
    assert (t.eval, t.eval_steps, t.weight_decay, t.max_grad_norm) == ("epoch", None, 0.0, 1.0)
    assert (t.save_total_limit, t.report_to, cfg.data.loss_on) == (2, [], "assistant")
    from mxlora.config import apply_overrides

    raw = apply_overrides(
        {},
        [
            "train.report_to=[tensorboard, wandb]",
            "train.eval=steps",
            "train.eval_steps=5",
            "train.save_total_limit=null",
            "data.loss_on=all",
        ],
    )
    cfg = from_dict(TrainingConfig, raw)
    assert cfg.train.report_to == ["tensorboard", "wandb"] and cfg.train.eval_steps == 5
    assert cfg.train.save_total_limit is None and cfg.data.loss_on == "all"


def test_sft_config_carries_the_new_knobs(tmp_path):
    cfg = tiny_config(
        tmp_path,
        train={"eval": "steps", "eval_steps": 3, "weight_decay": 0.01, "max_grad_norm": 0.5},
    )
    args = sft_config(
        cfg,
        tmp_path / "run",
        torch.float32,
        has_eval=True,
        show_bar=False,
        gradient_checkpointing=True,
    )
    assert (args.eval_strategy, args.eval_steps) == ("steps", 3)
    assert (args.weight_decay, args.max_grad_norm) == (0.01, 0.5)
    assert args.report_to == [] or args.report_to == "none"  # our trackers, not transformers'
    no_rows = sft_config(
        cfg,
        tmp_path / "run",
        torch.float32,
        has_eval=False,
        show_bar=False,
        gradient_checkpointing=True,
    )
    assert no_rows.eval_strategy == "no"


# --------------------------------------------------------------------------------------------
# Checkpoint rotation.


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def test_rotation_keeps_the_newest_complete_and_never_counts_partial_ones(tmp_path):
    for step in (2, 4, 10, 6):
        _checkpoint(tmp_path, step)
    partial = _checkpoint(tmp_path, 12, complete=False)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-4"]  # numeric order
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-10", "checkpoint-12", "checkpoint-6"]
    assert partial.is_dir()  # a partial one is neither counted nor deleted here
    assert rotate_checkpoints(tmp_path, keep=None) == []
    assert len(list(tmp_path.iterdir())) == 3


# --------------------------------------------------------------------------------------------
# One short run with every new training knob set.


@pytest.fixture(scope="module", params=["mxlora", "trl"])
def run(request, tmp_path_factory):
    """A 4-step run with every knob of this module set, on each engine.

    ``clip_grad_norm_`` (which both engines call, TRL's through accelerate) is wrapped to record
    the gradient norm right after clipping.
    """
    clipped: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        grads = [p.grad.norm() for p in parameters if p.grad is not None]
        clipped.append(torch.linalg.vector_norm(torch.stack(grads)).item())
        return total

    cfg = tiny_config(
        tmp_path_factory.mktemp("runs"),
        train={
            "max_steps": 4,
            "eval": "steps",
            "eval_steps": 2,
            "save_steps": 1,
            "save_total_limit": 2,
            "weight_decay": WEIGHT_DECAY,
            "max_grad_norm": MAX_GRAD_NORM,
            "report_to": ["tensorboard"],
            "engine": request.param,
        },
    )
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    try:
        result = fit(cfg)
    finally:
        mp.undo()
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rows, clipped


def test_tensorboard_event_file_holds_the_logged_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, rows, _ = run
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    train = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    logged = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in train] == [1, 2, 3, 4] == [s for s, _ in logged]
    assert [v for _, v in train] == pytest.approx([v for _, v in logged], rel=1e-6)  # float32
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    logged_eval = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert evals == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged_eval]


def test_eval_steps_writes_eval_rows_every_n_steps(run):
    _, rows, _ = run
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)


def test_save_total_limit_keeps_the_newest_complete_checkpoints(run):
    result, _, _ = run
    left = sorted(p.name for p in (result.run_dir / "checkpoints").glob("checkpoint-*"))
    assert left == ["checkpoint-3", "checkpoint-4"]
    assert all((result.run_dir / "checkpoints" / n / COMPLETE_MARKER).is_file() for n in left)


def test_weight_decay_and_max_grad_norm_reach_the_optimizer(run):
    result, rows, clipped = run
    # The optimizer state saved with the last checkpoint: every group that holds parameters
    # (LoRA weights only) decays with train.weight_decay.
    saved = torch.load(result.run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    decays = {g["weight_decay"] for g in saved["param_groups"] if g["params"]}
    assert decays == {WEIGHT_DECAY}
    # Every step's gradient was clipped to max_grad_norm (the logged norm is the pre-clip one).
    pre_clip = [r["grad_norm"] for r in rows if "loss" in r]
    assert len(clipped) == 4 and all(g > 2 * MAX_GRAD_NORM for g in pre_clip)
    assert clipped == pytest.approx([MAX_GRAD_NORM] * 4, rel=1e-3)
