"""`--resume`: a run SIGKILLed after a checkpoint and resumed ends like the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mxlora.config import dump_config, load_config
from mxlora.recipes.train import COMPLETE_MARKER, TrainingError, fit

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
        _train_cmd(config, killed_root, "--resume"), cwd=ROOT, capture_output=True, text=True
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
    with pytest.raises(TrainingError, match=r"train.lr: 0.002 -> 0.001"):
        fit(load_config(config, [f"output.root={tmp_path}"]), resume=True)
