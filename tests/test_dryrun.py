"""``mxlora train ... --dry-run``: the resolved config, data summary, parameter counts and a
memory estimate, with the model on the meta device; nothing trained, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from mxlora.cli import main
from mxlora.config import TrainingConfig, from_dict, load_config
from mxlora.data import prepare_data
from mxlora.engine.loop import eager_kernels
from mxlora.engine.memory import HEADROOM, block_costs, loss_bytes, peak_bytes, trainable_bytes
from mxlora.engine.packing import bucketed, longest_packed, plan_steps
from mxlora.model.load import load_tokenizer, load_weights
from mxlora.model.lora import apply_lora, count_parameters
from mxlora.mxfp4.kernels import TRITON
from mxlora.recipes import dryrun
from mxlora.recipes.dryrun import (
    dry_run,
    estimate_memory,
    largest_micro_batch,
    meta_model,
    training_experts,
    weights_and_adapter,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny:layers=4"


def tiny_config(root: Path, experts: str = "auto") -> TrainingConfig:
    return from_dict(
        TrainingConfig,
        {
            "model": {"name_or_path": TINY, "experts": experts},
            "lora": {"experts": {"layers": [1, 3]}},
            "data": {"source": "example:quotes", "select": 16, "test_size": 0.25},
            "train": {"max_len": 256, "batch_size": 4},
            "output": {"root": str(root), "name": "quotes"},
        },
    )


def test_cli_dry_run_prints_everything_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's data paths are relative to the project root
    config = ROOT / "configs" / "tiny" / "quotes.yaml"
    overrides = [f"output.root={tmp_path}", f"model.name_or_path={TINY}", "lora.experts.layers=[1]"]
    overrides += ["data.source=example:quotes", "data.select=16"]
    assert main(["train", str(config), *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # no run folder, nothing else
    cfg = load_config(config, overrides)
    # The resolved config, as YAML that loads back to the config that would run.
    text = out.split("resolved config:\n", 1)[1].split("\n\ndata:\n", 1)[0]
    assert from_dict(TrainingConfig, yaml.safe_load(text)) == cfg
    # The data summary: 16 rows selected, a 12/4 split.
    assert re.search(r"16 selected, 16 kept", out) and "\n  train: 12 rows," in out
    assert "\n  eval: 4 rows," in out
    # The parameter counts of the real model with its adapter.
    model = apply_lora(load_weights(cfg.model, "cpu"), cfg.lora)
    trainable, _ = count_parameters(model)
    assert f"parameters: {trainable:,} trainable of " in out
    assert "memory estimate: " in out and "experts mxfp4" in out  # resolved, not auto
    assert out.rstrip().endswith("dry run: nothing trained, nothing written")


@pytest.mark.parametrize("experts", ["mxfp4", "dequantize-bf16"])
def test_weights_estimate_is_the_loaded_models_bytes(tmp_path, experts):
    """The meta-device estimate of the frozen weights equals the bytes the loaded model holds
    (parameters and buffers), for either way of holding the experts."""
    cfg = tiny_config(tmp_path, experts)
    real = apply_lora(load_weights(cfg.model, "cpu"), cfg.lora)
    held = sum(p.numel() * p.element_size() for p in real.parameters() if not p.requires_grad)
    held += sum(b.numel() * b.element_size() for b in real.buffers())
    meta = apply_lora(meta_model(TINY), cfg.lora)
    estimate = estimate_memory(meta, experts, torch.float32, tokens=0)
    assert estimate["weights_gb"] * 1e9 == pytest.approx(held, rel=1e-9)
    # Same trainable and logical total parameter counts as the real (dequantized) model.
    if experts == "dequantize-bf16":
        assert count_parameters(meta) == count_parameters(real)
    # Adapter: LoRA weight and gradient (float32) plus AdamW's two moments, 16 bytes each.
    trainable, _ = count_parameters(real)
    assert estimate["adapter_gb"] * 1e9 == pytest.approx(16 * trainable, rel=1e-9)


def cpu_kernels(model):
    """What the CPU's eager blocks run (the torch backend's experts block keeps less)."""
    return eager_kernels(torch.device("cpu"), torch.float32, False, model.config.head_dim, "mxfp4")


def test_dry_run_activations_follow_the_longest_batch(tmp_path):
    """engine=mxlora: the run's longest packed micro-batch through the engine's own block
    estimate, checkpointing resolved as the run resolves it (CPU, no budget: none)."""
    cfg = tiny_config(tmp_path)
    result = dry_run(cfg, torch.device("cpu"))
    meta = apply_lora(meta_model(TINY), cfg.lora)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.train.max_len)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    t = cfg.train
    tokens = longest_packed(
        lengths, plan_steps(len(lengths), t.batch_size, t.grad_accum, t.epochs, -1, t.seed)
    )
    memory = result["memory"]
    assert (memory["tokens"], memory["checkpointed_blocks"]) == (tokens, "0 of 4")
    assert tokens % 128 == 0  # packed and bucketed
    costs = block_costs(meta, "mxfp4", torch.float32, False, cpu_kernels(meta))
    activations = peak_bytes(costs, 0, tokens, loss_bytes(meta.config, tokens, torch.float32))
    assert memory["activations_gb"] * 1e9 == pytest.approx(activations)
    assert (result["experts"], result["dtype"]) == ("mxfp4", "float32")
    assert result["step"] == {"compiled": False, "cuda_graphs": False, "attention": "sdpa"}
    assert not (tmp_path / "quotes").exists()


def test_dry_run_step_is_decided_as_the_run_decides(tmp_path, capsys, monkeypatch):
    """The engine's plan (compiled blocks, CUDA graphs, attention) comes from the function the
    run's loop calls (``plan_step``): a setting that cannot work stops the dry run as it would
    stop the run, and the plan is printed."""
    cfg = tiny_config(tmp_path)
    cfg.train.compile = True
    assert dry_run(cfg, torch.device("cpu"))["step"]["compiled"] is True
    monkeypatch.chdir(ROOT)
    args = ["train", str(ROOT / "configs" / "tiny" / "quotes.yaml"), f"model.name_or_path={TINY}"]
    args += ["lora.experts.layers=[1]", "data.source=example:quotes", "data.select=16"]
    assert main([*args, "--dry-run"]) == 0
    assert "  step: eager blocks, sdpa attention, CUDA graphs off\n" in capsys.readouterr().out
    assert main([*args, "train.cuda_graphs=true", "--dry-run"]) == 1
    assert "train.cuda_graphs: true needs a CUDA device" in capsys.readouterr().err


def test_dry_run_sizes_one_process_share_of_the_micro_batch(tmp_path):
    """Under ``--nproc N`` each process packs its share of every micro-batch (as the loop's
    ``rank_shares``), so the dry run plans for the largest share, not the global micro-batch."""
    cfg = tiny_config(tmp_path)
    cfg.train.batch_size = 4
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.train.max_len)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    one, two = (largest_micro_batch(cfg, lengths, n) for n in (1, 2))
    t = cfg.train
    plan = plan_steps(len(lengths), t.batch_size, t.grad_accum, t.epochs, -1, t.seed)
    halves = [
        bucketed(sum(lengths[i] for i in share))
        for step in plan
        for rows in step.micro_batches
        for share in (rows[: len(rows) // 2], rows[len(rows) // 2 :])
    ]
    assert two == max(halves) < one


def test_dry_run_trl_pads_and_checkpoints_every_block_or_none(tmp_path):
    """engine=trl: batch_size rows padded to the longest, full logits, and the same decision
    as the run (``auto``: all blocks when any would need it)."""
    cfg = tiny_config(tmp_path)
    cfg.train.engine = "trl"
    result = dry_run(cfg, torch.device("cpu"))
    longest = result["data"]["splits"]["train"]["total_tokens"]["max"]
    c = meta_model(TINY).config
    memory = result["memory"]
    assert (memory["tokens"], memory["checkpointed_blocks"]) == (4 * longest, "0 of 4")
    assert memory["activations_gb"] * 1e9 == pytest.approx(4 * longest * c.vocab_size * 4)
    assert result["step"] is None  # TRL's trainer runs the step
    cfg.train.memory_budget_gb = 0.01  # far below the weights: every block
    memory = dry_run(cfg, torch.device("cpu"))["memory"]
    assert memory["checkpointed_blocks"] == "4 of 4"
    per_token = (c.vocab_size + c.num_hidden_layers * c.hidden_size) * 4
    assert memory["activations_gb"] * 1e9 == pytest.approx(4 * longest * per_token)


def test_dry_run_mxlora_plans_partial_checkpointing_under_a_budget(tmp_path):
    """A budget that fits the activations with exactly two of the four blocks checkpointed:
    the dry run reports the run's own count (one place decides). MXFP4 experts named: under
    this budget ``auto`` would dequantize them on the CPU (no Triton kernel)."""
    cfg = tiny_config(tmp_path, "mxfp4")
    first = dry_run(cfg, torch.device("cpu"))["memory"]
    meta = apply_lora(meta_model(TINY), cfg.lora)
    weights, _, lora = weights_and_adapter(meta, "mxfp4", torch.float32)
    tokens = first["tokens"]
    costs = block_costs(meta, "mxfp4", torch.float32, False, cpu_kernels(meta))
    extra = loss_bytes(meta.config, tokens, torch.float32)
    two = peak_bytes(costs, 2, tokens, extra)
    assert peak_bytes(costs, 1, tokens, extra) > two > peak_bytes(costs, 3, tokens, extra)
    cfg.train.memory_budget_gb = (weights + lora + trainable_bytes(meta) + two) / HEADROOM / 1e9
    memory = dry_run(cfg, torch.device("cpu"))["memory"]
    assert memory["checkpointed_blocks"] == "2 of 4"
    assert memory["activations_gb"] * 1e9 == pytest.approx(two)
    cfg.train.memory_budget_gb = 1e-4
    assert dry_run(cfg, torch.device("cpu"))["memory"]["checkpointed_blocks"] == "4 of 4"


def test_auto_experts_dequantize_where_no_triton_kernel_runs_and_they_fit(tmp_path, monkeypatch):
    """``model.experts: auto`` for training: MXFP4 where the Triton kernel runs; elsewhere (the
    CPU here) the dequantized experts when the run fits its budget that way, with every block
    checkpointed (unless checkpointing is off), by the dry run's estimate: the boundary is that
    estimate within HEADROOM of the budget. Without a budget (the CPU's default) MXFP4 stays,
    and so does an explicit mode. The dry run reports the same choice."""
    cpu = torch.device("cpu")
    cfg = tiny_config(tmp_path)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.train.max_len)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    meta = apply_lora(meta_model(TINY), cfg.lora)
    tokens = largest_micro_batch(cfg, lengths)

    def need(checkpointed: int) -> float:
        estimate = estimate_memory(
            meta, "dequantize-bf16", torch.float32, tokens, "mxlora", checkpointed, device=cpu
        )
        return estimate["total_gb"]

    def unread() -> list[int]:
        raise AssertionError("the rows were asked for where the decision needs no data")

    assert training_experts(cfg, cpu, unread)[0] == "mxfp4"  # no budget
    at_least = need(4)
    for budget, expected in ((1.001, "dequantize-bf16"), (0.999, "mxfp4")):
        cfg.train.memory_budget_gb = budget * at_least / HEADROOM
        experts, why = training_experts(cfg, cpu, lambda: lengths)
        assert experts == expected and why.startswith(f"model.experts: auto -> {expected}")
        assert dry_run(cfg, cpu)["experts"] == expected
    cfg.train.memory_budget_gb = 1.001 * at_least / HEADROOM
    cfg.train.gradient_checkpointing = False  # the run keeps every block's activations
    assert need(0) > at_least
    assert training_experts(cfg, cpu, lambda: lengths)[0] == "mxfp4"
    cfg.train.memory_budget_gb = 1.001 * need(0) / HEADROOM
    assert training_experts(cfg, cpu, lambda: lengths)[0] == "dequantize-bf16"
    cfg.train.memory_budget_gb = 1000.0
    monkeypatch.setattr(dryrun, "resolve_backend", lambda device: TRITON)
    assert training_experts(cfg, cpu, unread)[0] == "mxfp4"
    monkeypatch.undo()
    for explicit in ("mxfp4", "dequantize-bf16"):
        cfg.model.experts = explicit
        assert training_experts(cfg, cpu, lambda: lengths) == (
            explicit,
            f"model.experts: {explicit}",
        )


def test_cli_dry_run_reports_bad_data_in_one_line(tmp_path, capsys):
    """Bad data fails the dry run as it fails a run: one line naming the field, exit code 1,
    no traceback."""
    config = ROOT / "configs" / "tiny" / "quotes.yaml"
    overrides = [f"output.root={tmp_path}", f"data.source={tmp_path / 'missing.jsonl'}"]
    assert main(["train", str(config), *overrides, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxlora train: error: data.source: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_dry_run_of_a_random_model_needs_no_checkpoint(tmp_path):
    """``random:20b`` (generated in MXFP4 when a run loads it) dry-runs from its config alone,
    with gpt-oss-20b's parameter count (the seed's, less its adapter: tests/test_train.py), its
    experts as a random model holds them."""
    cfg = tiny_config(tmp_path)
    cfg.model.name_or_path = "random:20b"
    result = dry_run(cfg, torch.device("cpu"))
    base = result["parameters"]["total"] - result["parameters"]["trainable"]
    assert result["experts"] == "mxfp4" and base == 20_929_797_696 - 15_040_512
    cfg.train.memory_budget_gb = 1000.0  # a dequantized run would fit, but there is no checkpoint
    assert dry_run(cfg, torch.device("cpu"))["experts"] == "mxfp4"
    cfg.model.experts = "dequantize-bf16"  # kept: loading it then says it needs a checkpoint
    assert training_experts(cfg, torch.device("cpu"), lambda: [24])[0] == "dequantize-bf16"
