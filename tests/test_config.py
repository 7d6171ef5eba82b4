"""Config: shipped YAMLs validate, overrides are typed by their field, errors name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mxlora.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainingConfig,
    dump_config,
    from_dict,
    load_config,
    load_run_config,
    read_yaml,
    to_dict,
)
from mxlora.model.load import ModelLoadError, load_model, parse_tiny

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    for name in ("quotes", "reasoning", "seed"):
        assert f"gpt-oss-20b/{name}.yaml" in names
        assert f"tiny/{name}.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in configs are relative to the project root
    if "runs" in read_yaml(path):
        cfg = load_run_config(path)
        assert isinstance(cfg, RunConfig) and len(cfg.runs) == 2
        assert cfg.merge.run == "reasoning" and cfg.chat.reasoning_language == "German"
    else:
        cfg = load_config(path)
        assert isinstance(cfg, TrainingConfig)
        # The resolved config (what config.yaml of a run holds) reads back unchanged.
        assert from_dict(TrainingConfig, yaml.safe_load(dump_config(cfg))) == cfg


def test_seed_configs_keep_the_seed_hyperparameters():
    for name in ("quotes", "reasoning"):
        cfg = load_config(ROOT / "configs" / "gpt-oss-20b" / f"{name}.yaml")
        t, lora = cfg.train, cfg.lora
        assert cfg.model.name_or_path == "openai/gpt-oss-20b"
        assert cfg.model.attn_implementation == "eager"
        assert (t.lr, t.epochs, t.batch_size, t.grad_accum, t.max_len) == (2e-4, 1, 4, 1, 2048)
        assert (t.warmup, t.scheduler, t.min_lr_rate) == (0.03, "cosine_with_min_lr", 0.1)
        assert t.logging_steps == 10 and t.eval == "epoch"
        # How the job runs is mxlora's choice (the notebook's dequantize-bf16 and checkpointing
        # of every block are several times slower, the same updates up to rounding):
        # docs/BENCHMARKS.md, "The shipped configs".
        assert (cfg.model.experts, t.gradient_checkpointing) == ("auto", "auto")
        assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
            8,
            16,
            0.0,
            ["all-linear"],
        )
        assert lora.experts.layers == [7, 15, 23]
        assert lora.experts.projections == ["gate_up_proj", "down_proj"]
    quotes = load_config(ROOT / "configs" / "gpt-oss-20b" / "quotes.yaml").data
    assert (quotes.source, quotes.select, quotes.seed, quotes.test_size) == (
        "Abirate/english_quotes",
        1000,
        42,
        0.2,
    )
    reasoning = load_config(ROOT / "configs" / "gpt-oss-20b" / "reasoning.yaml").data
    assert reasoning.source == "HuggingFaceH4/Multilingual-Thinking"
    assert reasoning.adapter == "messages"


def test_overrides_are_parsed_by_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n")
    cfg = load_config(
        path,
        [
            "train.lr=1e-4",  # PyYAML alone would read this as a string
            "data.select=200",
            "data.source=example:quotes",
            "train.gradient_checkpointing=false",
            "lora.experts.layers=1,3",
            "lora.target_modules=[q_proj, v_proj]",
            "lora.rank_pattern={q_proj: 16}",
            "output.name=007",  # a string field keeps the text, leading zeros included
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.select == 200 and cfg.data.source == "example:quotes"
    assert cfg.train.gradient_checkpointing is False
    assert cfg.lora.experts.layers == [1, 3]
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.rank_pattern == {"q_proj": 16}
    assert cfg.output.name == "007"
    # Untouched values come from the YAML or the seed's defaults.
    assert cfg.train.batch_size == 4 and cfg.data.select == 200
    assert load_config(path, ["data.select=null"]).data.select is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=abc", "train.lr: expected float, got 'abc'"),
        ("train.batch_size=2.5", "train.batch_size: expected int, got '2.5'"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("train.lrr=1", "train.lrr: unknown field"),
        ("trian.lr=1", "trian: unknown field"),
        (
            "model.experts=nf4",
            "model.experts: expected one of 'auto', 'dequantize-bf16', 'mxfp4', got 'nf4'",
        ),
        ("model.dtype=fp8", "model.dtype: expected one of"),
        ("lora.experts.layers=7,x", "lora.experts.layers[1]: expected int, got 'x'"),
        ("lora.experts.projections=up_proj", "lora.experts.projections[0]: expected one of"),
        (
            "train.gradient_checkpointing=maybe",
            "train.gradient_checkpointing: expected one of 'auto', got 'maybe' / expected bool",
        ),
        ("train.engine=unsloth", "train.engine: expected one of 'mxlora', 'trl'"),
        ("train=3", "train: expected a mapping"),
        ("train.lr", "override 'train.lr': expected key=value"),
        ("data.select=0", "data.select: must be a positive row count"),  # the data module's check
        ("data.adapter=csv", "data.adapter: must be one of"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(info.value).startswith(message), str(info.value)


def test_yaml_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: eight\n")
    with pytest.raises(ConfigError, match=r"^lora\.r: expected int, got 'eight'$"):
        load_config(path)
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^train: expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_source_alternatives_take_the_first_that_exists(tmp_path):
    present = tmp_path / "rows.jsonl"
    present.write_text('{"quote": "q", "author": "a", "tags": ["t"]}\n')
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  source: [{tmp_path / 'absent.jsonl'}, {present}, example:quotes]\n")
    assert load_config(path).data.source == str(present)
    path.write_text(f"data:\n  source: [{tmp_path / 'absent.jsonl'}, example:quotes]\n")
    assert load_config(path).data.source == "example:quotes"
    path.write_text(f"data:\n  source: [{tmp_path / 'absent.jsonl'}]\n")
    with pytest.raises(ConfigError, match="data.source: none of"):
        load_config(path)


def test_run_config_checks_its_runs(tmp_path):
    train = tmp_path / "a.yaml"
    train.write_text("output:\n  name: a\n")
    run = tmp_path / "run.yaml"
    run.write_text("runs:\n  - config: a.yaml\nmerge:\n  run: a\n")
    cfg = load_run_config(run)
    assert cfg.runs[0].config == "a.yaml" and cfg.output.name == "seed"
    run.write_text("runs:\n  - config: a.yaml\nmerge:\n  run: b\n")
    with pytest.raises(ConfigError, match=r"^merge.run: no run named 'b' \(runs: a\)"):
        load_run_config(run)
    run.write_text("runs:\n  - config: a.yaml\n    overrides: [train.lr=x]\nmerge:\n  run: a\n")
    with pytest.raises(ConfigError, match=r"^runs\[0\] \(a.yaml\): train.lr: expected float"):
        load_run_config(run)
    run.write_text("runs:\n  - config: a.yaml\n  - config: a.yaml\nmerge:\n  run: a\n")
    with pytest.raises(ConfigError, match=r"^runs\[1\]: output.name 'a' is used"):
        load_run_config(run)
    run.write_text("runs: []\n")
    with pytest.raises(ConfigError, match=r"^runs: at least one run"):
        load_run_config(run)


def test_tiny_model_spec():
    assert parse_tiny("openai/gpt-oss-20b") is None
    assert parse_tiny("tiny") == {"layers": 24}  # the demo's model: the seed's layers exist
    assert parse_tiny("tiny:hidden=96") == {"hidden": 96, "layers": 24}
    assert parse_tiny("tiny:layers=24, hidden=96,mxfp4=false") == {
        "layers": 24,
        "hidden": 96,
        "mxfp4": False,
    }
    with pytest.raises(ConfigError, match=r"^model.name_or_path.layerz: unknown field"):
        parse_tiny("tiny:layerz=3")
    with pytest.raises(ConfigError, match=r"^model.name_or_path.layers: expected int"):
        parse_tiny("tiny:layers=many")
    with pytest.raises(ConfigError, match=r"^model.name_or_path.hidden: must be a positive"):
        parse_tiny("tiny:hidden=33")


def test_unreadable_or_foreign_model_paths_give_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="is a 'llama' model; mxlora trains gpt-oss"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read its config"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="Hugging Face cache"):
        load_model(ModelConfig(name_or_path="nobody-here/no-such-model"))


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    cfg = ROOT / "configs" / "tiny" / "quotes.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxlora.cli",
            "train",
            str(cfg),
            f"model.name_or_path={tmp_path / 'nope'}",
            f"output.root={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"mxlora train: error: model {tmp_path / 'nope'}: no such folder"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written before the path was checked


def test_120b_configs_are_the_20b_seed_scaled_to_36_layers():
    """Same recipe as the 20b seed; only the model, the expert holding (MXFP4: the bf16 experts
    of 120b fit no GPU), the expert layers (7/15/23 of 24 -> 11/23/35 of 36) and the run root."""
    for name in ("quotes", "reasoning"):
        small = to_dict(load_config(ROOT / "configs" / "gpt-oss-20b" / f"{name}.yaml"))
        big = to_dict(load_config(ROOT / "configs" / "gpt-oss-120b" / f"{name}.yaml"))
        assert big["model"]["name_or_path"] == "openai/gpt-oss-120b"
        assert big["model"]["experts"] == "mxfp4"
        assert big["lora"]["experts"]["layers"] == [11, 23, 35]
        assert big["output"]["root"] == "runs/gpt-oss-120b"
        for key, value in (
            ("model", {**small["model"], "name_or_path": big["model"]["name_or_path"],
                       "experts": "mxfp4"}),
            ("lora", {**small["lora"], "experts": {**small["lora"]["experts"],
                                                   "layers": [11, 23, 35]}}),
            ("data", small["data"]),
            ("train", small["train"]),
        ):  # fmt: skip
            assert big[key] == value, key
