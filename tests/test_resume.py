"""Runs that stop early: SIGKILL, Ctrl-C/SIGTERM, failures; resuming them ends like the
uninterrupted run, and nothing a user made is lost on the way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mxlora.cli import main
from mxlora.config import dump_config, load_config, with_absolute_paths
from mxlora.data.spec import example_path
from mxlora.recipes.train import COMPLETE_MARKER, TrainingError, fit, resume_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
CONFIG = """
model:
  name_or_path: "tiny:layers=4"
lora:
  experts: {layers: [1, 3]}
data:
  source: example:quotes
  select: 16
  test_size: 0.0
train:
  lr: 1.0e-3
  batch_size: 2
  max_len: 256
  logging_steps: 1
  save_steps: 2
output:
  name: quotes
"""


def _train_cmd(config: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mxlora.cli", "train", str(config), f"output.root={root}", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_to_the_same_end(tmp_path):
    config = tmp_path / "quotes.yaml"
    config.write_text(CONFIG)

    # The uninterrupted run, for reference.
    whole = fit(load_config(config, [f"output.root={tmp_path / 'whole'}"])).run_dir
    whole_report = json.loads((whole / "report.json").read_text())
    assert whole_report["steps"] == STEPS

    # The same run, SIGKILLed as soon as its first checkpoint is complete.
    killed_root = tmp_path / "killed"
    run = killed_root / "quotes"
    marker = run / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER
    proc = subprocess.Popen(
        _train_cmd(config, killed_root), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"train exited ({proc.returncode}) before its first checkpoint")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 600 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "report.json").exists(), "the run finished before it was killed"
    adapter = run / "adapter"
    if adapter.exists():  # absent or complete, never partial
        assert load_file(adapter / "adapter_model.safetensors")
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert not list(run.glob(".adapter.tmp-*")) or not adapter.exists()

    # A checkpoint cut off mid-write (no completion marker) must be ignored and cleared.
    partial = run / "checkpoints" / f"checkpoint-{STEPS - 1}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")

    result = subprocess.run(
        [sys.executable, "-m", "mxlora.cli", "train", "--resume", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not partial.exists()
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == STEPS and report["resumed_from_step"] >= 2
    assert report["train_tokens"] == whole_report["train_tokens"]
    assert report["train_loss_final"] == pytest.approx(whole_report["train_loss_final"], rel=1e-4)
    # metrics.jsonl continues without duplicated or missing steps, and its losses match.
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    resumed = [r["loss"] for r in _metrics(run) if "loss" in r]
    reference = [r["loss"] for r in _metrics(whole) if "loss" in r]
    assert resumed == pytest.approx(reference, rel=1e-4)


def test_resume_refuses_a_changed_config(tmp_path):
    config = tmp_path / "quotes.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "quotes"
    run.mkdir()
    started = load_config(config, [f"output.root={tmp_path}", "train.lr=2e-3"])
    (run / "config.yaml").write_text(dump_config(started))
    with pytest.raises(TrainingError, match=r"train.lr: 0.002 -> 0.001: changes what .* computes"):
        fit(load_config(config, [f"output.root={tmp_path}"]), resume=True)
    # From the run folder alone: math-changing overrides are refused naming the field ...
    with pytest.raises(TrainingError, match=r"^--resume: train.max_steps: -1 -> 9: changes"):
        fit(resume_config(run, ["train.max_steps=9"]), resume=True)
    # ... cadence ones pass the check (and then find no checkpoint in this fake run).
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        safe = ["train.logging_steps=7", "train.save_steps=3", "train.save_total_limit=2"]
        safe += ["train.eval=steps", "train.eval_steps=4", "train.report_to=[tensorboard]"]
        fit(resume_config(run, [*safe, "train.cuda_graphs=false"]), resume=True)
    assert resume_config(run).train.lr == 2e-3  # the saved config, not the YAML


def test_saved_config_has_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text("{}\n")
    cfg = load_config_text(tmp_path, CONFIG.replace("example:quotes", "rows.jsonl"))
    saved = with_absolute_paths(cfg)
    assert saved.data.source == str(tmp_path / "rows.jsonl")
    assert saved.model.name_or_path == "tiny:layers=4"  # not a path
    assert with_absolute_paths(load_config_text(tmp_path, CONFIG)).data.source == "example:quotes"


def load_config_text(folder: Path, text: str):
    path = folder / "c.yaml"
    path.write_text(text)
    return load_config(path)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_failed_run_leaves_the_earlier_run_byte_identical(tmp_path, capsys):
    config = tmp_path / "quotes.yaml"
    config.write_text(CONFIG)
    root = tmp_path / "runs"
    earlier = root / "quotes"
    (earlier / "adapter").mkdir(parents=True)
    (earlier / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (earlier / "report.json").write_text('{"steps": 30}\n')
    before = tree_digest(earlier)
    train = ["train", str(config), f"output.root={root}"]
    # The same name again is refused at once, naming the way out.
    assert main([*train, "data.source=/nonexistent.jsonl"]) == 1
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "Traceback" not in err
    # With --overwrite the run starts, fails on its data, and the earlier run stays as it was.
    assert main([*train, "--overwrite", "data.source=/nonexistent.jsonl"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "mxlora train: error: data.source: no such file /nonexistent.jsonl"
    )
    assert tree_digest(earlier) == before
    assert sorted(p.name for p in root.iterdir()) == ["quotes"]  # no staging left behind


# A 3-step-then-Ctrl-C run must leave enough to resume into; the default tier runs a short
# run, the slow tier the 40 steps of the acceptance test.
@pytest.mark.parametrize(
    "steps", [10, pytest.param(40, marks=pytest.mark.slow)], ids=["10-steps", "40-steps"]
)
def test_ctrl_c_saves_and_resume_ends_like_the_uninterrupted_run(tmp_path, steps, caplog):
    # One malformed line among the rows: the run trains and the console names the drop.
    rows = example_path("quotes").read_text(encoding="utf-8").splitlines()
    rows.insert(4, '{"quote": "cut off in the mid')
    data = tmp_path / "quotes.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = tmp_path / "quotes.yaml"
    config.write_text(
        CONFIG.replace("example:quotes", str(data))
        .replace("select: 16", "select: null")
        .replace("batch_size: 2", "batch_size: 1")
        .replace("save_steps: 2", f"save_steps: 1000\n  max_steps: {steps}")
        .replace("max_len: 256", "max_len: 256\n  gradient_checkpointing: false")
    )

    whole = fit(load_config(config, [f"output.root={tmp_path / 'whole'}"])).run_dir
    reference = [r["loss"] for r in _metrics(whole) if "loss" in r]
    assert len(reference) == steps

    # An earlier run of the same name, replaced (--overwrite) only once the new one has a
    # complete checkpoint: here, the one Ctrl-C writes.
    root = tmp_path / "runs"
    run = root / "quotes"
    run.mkdir(parents=True)
    (run / "mine.txt").write_text("earlier run")
    proc = subprocess.Popen(
        [*_train_cmd(config, root), "--overwrite"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging = root / f"quotes.staging-{proc.pid}"
    try:
        deadline = time.monotonic() + 600
        while not any(r.get("step", 0) >= 2 for r in _metrics_or_none(staging)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"train exited ({proc.returncode}) or hung before step 2")
            time.sleep(0.05)
        assert (run / "mine.txt").is_file()  # no checkpoint yet: the earlier run is all there
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "dropped 1: invalid_json 1 (row 5)" in err  # the data summary names the drop
    # The console: resolved config, data, model load, then progress lines with an ETA ...
    assert "config (what differs from the defaults):\n  data.source: " in err
    assert re.search(r"model tiny:layers=4 loaded in [\d.]+ s .* GB of weights", err)
    assert re.search(rf"^step 2/{steps} eta [0-9hms]+ loss ", err, re.MULTILINE)
    # ... and none of the libraries' notices that tell a user nothing.
    for noise in ("PAD/BOS/EOS", "Warning", "MXFP4 inference on CPU", "%|"):
        assert noise not in err, noise
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"mxlora train: stopped by SIGINT at step (\d+) of {steps}; saved "
        rf"{re.escape(str(run.resolve()))}/checkpoints/checkpoint-\1; resume with: "
        rf"mxlora train --resume {re.escape(str(run.resolve()))}",
        last,
    ), last
    stopped = int(re.search(r"at step (\d+)", last)[1])
    assert 2 <= stopped < steps
    assert (run / "checkpoints" / f"checkpoint-{stopped}" / COMPLETE_MARKER).is_file()
    assert not (run / "mine.txt").exists() and not (run / "report.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["quotes"]  # the staging link is gone

    # Resume from the run folder alone; a cadence override may come first.
    assert main(["train", "train.save_steps=100", "--resume", str(run)]) == 0
    metrics = _metrics(run)
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, steps + 1))
    assert [r["loss"] for r in metrics if "loss" in r] == pytest.approx(reference, rel=1e-4)
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == steps and report["resumed_from_step"] == stopped
    # Times cover both processes: every step's time, once.
    step_times = sum(r["step_time_s"] for r in metrics if "loss" in r)
    assert report["train_time_s"] == pytest.approx(step_times, rel=1e-6)
    assert report["step_time_s_mean"] * steps == pytest.approx(step_times, rel=1e-6)
    assert report["wall_time_s"] > report["train_time_s"]

    # --resume on a finished run changes nothing and says so.
    adapter = run / "adapter" / "adapter_model.safetensors"
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--resume", str(run)]) == 0
    assert "finished already" in caplog.text
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == digest


def _metrics_or_none(run: Path) -> list[dict]:
    try:
        return _metrics(run)
    except (OSError, json.JSONDecodeError):  # not there yet, or a line half-written
        return []
