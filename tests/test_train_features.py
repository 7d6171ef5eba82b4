"""Training knobs users of TRL/torchtune expect: trackers, eval every N steps, weight decay,
gradient clipping, checkpoint rotation, loss on every token; each checked by its effect."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mxlora.config import ConfigError, TrainingConfig, from_dict
from mxlora.data import DataConfig
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
    args = sft_config(cfg, tmp_path / "run", torch.float32, has_eval=True, show_bar=False)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 3)
    assert (args.weight_decay, args.max_grad_norm) == (0.01, 0.5)
    assert args.report_to == [] or args.report_to == "none"  # our trackers, not transformers'
    no_rows = sft_config(cfg, tmp_path / "run", torch.float32, has_eval=False, show_bar=False)
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


class _Spy(TrainerCallback):
    """Records the optimizer's weight decay per parameter and the clipped gradient norms."""

    def __init__(self):
        self.decay: dict[str, float] = {}
        self.clipped: list[float] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.decay[names[id(p)]] = group["weight_decay"]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.clipped.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mxlora.recipes import train as train_module

    spy = _Spy()
    original = train_module.GuardedSFTTrainer.__init__

    def with_spy(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], spy]
        original(self, *args, **kwargs)

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
        },
    )
    mp = pytest.MonkeyPatch()
    mp.setattr(train_module.GuardedSFTTrainer, "__init__", with_spy)
    try:
        result = fit(cfg)
    finally:
        mp.undo()
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rows, spy


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
    _, rows, spy = run
    lora = {n: d for n, d in spy.decay.items() if "lora_" in n}
    assert lora and set(lora.values()) == {WEIGHT_DECAY}
    # Every step's gradient was clipped to max_grad_norm (the logged norm is the pre-clip one).
    pre_clip = [r["grad_norm"] for r in rows if "loss" in r]
    assert len(spy.clipped) == 4 and all(g > 2 * MAX_GRAD_NORM for g in pre_clip)
    assert spy.clipped == pytest.approx([MAX_GRAD_NORM] * 4, rel=1e-3)


def test_report_records_resolved_values(run):
    result, _, _ = run
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["experts"] == "mxfp4"  # model.experts: auto on an MXFP4 checkpoint
    assert report["dtype"] == "float32"


# --------------------------------------------------------------------------------------------
# data.loss_on


def test_loss_on_all_puts_every_non_pad_token_under_loss(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mxlora.data import prepare_data

    base = {"source": "example:gsm8k", "adapter": "fields", "select": 6, "test_size": 0.0}
    assistant = prepare_data(DataConfig(**base), tokenizer, 1024).train
    every = prepare_data(DataConfig(**base, loss_on="all"), tokenizer, 1024).train
    assert every["input_ids"] == assistant["input_ids"]  # the same tokens, another mask
    for ids, mask, narrow in zip(
        every["input_ids"], every["completion_mask"], assistant["completion_mask"], strict=True
    ):
        assert mask == [1] * len(ids)
        assert 0 < sum(narrow) < len(ids)  # the default leaves system and user out
    # As the trainer batches them: SFTTrainer turns completion_mask into labels (-100 where 0;
    # tests/test_data_trl.py), TRL's collator pads rows of unequal length. Labels are then the
    # token ids on every non-pad position and -100 on padding only.
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def batch(data):
        return collate(
            [
                {
                    "input_ids": ids,
                    "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)],
                }
                for ids, mask in zip(data["input_ids"], data["completion_mask"], strict=True)
            ]
        )

    wide, narrow = batch(every), batch(assistant)
    real = wide["attention_mask"].bool()
    assert (~real).any()  # there is padding to leave out
    assert torch.equal(wide["labels"][real], wide["input_ids"][real])
    assert (wide["labels"][~real] == -100).all()
    assert (narrow["labels"][real] == -100).any()


# --------------------------------------------------------------------------------------------
# Trackers without a network: what each is asked to do (fakes stand in for wandb/trackio).


class _FakeTrackerModule:
    """Records calls made to a module-level tracker API (wandb's and trackio's)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def init(self, *args, **kwargs):
        self.calls.append(("init", args, kwargs))
        return self  # wandb returns a run with .log/.finish; trackio's module has them too

    def log(self, *args, **kwargs):
        self.calls.append(("log", args, kwargs))

    def finish(self, *args, **kwargs):
        self.calls.append(("finish", args, kwargs))


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_wandb_and_trackio_log_offline_with_tagged_names(tracker, tmp_path, monkeypatch):
    import sys

    from mxlora.report.trackers import open_trackers

    fake = _FakeTrackerModule()
    monkeypatch.setitem(sys.modules, tracker, fake)
    trackers = open_trackers([tracker], tmp_path, "quotes", {"train": {"lr": 1e-3}})
    trackers.log(3, {"loss": 2.5, "eval_loss": 2.75, "epoch": 0.5, "note": "text", "x": math.nan})
    trackers.close()
    (kind, _, init), (_, log_args, log_kwargs), (last, _, _) = fake.calls
    assert (kind, last, len(fake.calls)) == ("init", "finish", 3)
    assert init["project"] == "mxlora" and init["name"] == "quotes"
    assert init["config"] == {"train": {"lr": 1e-3}}
    if tracker == "wandb":
        assert init["mode"] == "offline" and init["dir"] == str(tmp_path)
    else:
        assert "space_id" not in init or init["space_id"] is None  # local database only
    assert log_args == ({"train/loss": 2.5, "eval/loss": 2.75, "train/epoch": 0.5},)
    assert log_kwargs == {"step": 3}


def test_a_missing_tracker_package_is_a_config_error(monkeypatch):
    import sys

    from mxlora.report.trackers import check_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"^train\.report_to: 'wandb' needs the wandb package"):
        check_trackers(["tensorboard", "wandb"])


def test_tensorboard_on_resume_drops_the_steps_trained_again(tmp_path):
    """A resumed run (from checkpoint step 2) logs steps 3 and 4 again: TensorBoard's reader
    shows the new values only, as a purge marker tells it to drop the interrupted ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mxlora.report.trackers import open_trackers

    first = open_trackers(["tensorboard"], tmp_path, "quotes", {})
    for step in (1, 2, 3, 4):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = open_trackers(["tensorboard"], tmp_path, "quotes", {}, start_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
    ]
