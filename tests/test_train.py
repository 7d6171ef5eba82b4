"""`mxlora train` on a tiny gpt-oss (CPU, fp32): what LoRA touches, what it must not, the run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxlora.config import ExpertTargets, LoraConfig, ModelConfig, TrainingConfig, from_dict
from mxlora.model.load import load_model, resolve_model_path
from mxlora.model.lora import apply_lora, load_adapter
from mxlora.model.tiny import TinySpec, make_tiny
from mxlora.recipes.train import NonFiniteLossError, TrainingError, fit, save_adapter

TINY = "tiny:layers=4"
TARGET_LAYERS = [1, 3]  # layers 0 and 2 keep plain experts


def tiny_config(root: Path, **sections) -> TrainingConfig:
    raw = {
        "model": {"name_or_path": TINY},
        "lora": {"experts": {"layers": TARGET_LAYERS}},
        "data": {"source": "example:quotes", "select": 16, "test_size": 0.25, "seed": 42},
        "train": {
            "lr": 1e-3,
            "batch_size": 4,
            "max_len": 256,
            "logging_steps": 1,
            "save_steps": 100,
        },
        "output": {"root": str(root), "name": "quotes"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return from_dict(TrainingConfig, raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run, plus the base weights and the LoRA initialisation before it."""
    cfg = tiny_config(tmp_path_factory.mktemp("runs"))
    base, _ = load_model(cfg.model)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(cfg.train.seed)  # fit() seeds the same way before attaching LoRA
    from transformers import set_seed

    set_seed(cfg.train.seed)
    init = apply_lora(base, cfg.lora)
    lora_init = {k: v.clone() for k, v in init.state_dict().items() if "lora_" in k}
    del base, init
    result = fit(cfg)
    return cfg, result, base_state, lora_init


def _base_name(peft_name: str) -> str:
    """PEFT's name of a base tensor -> the plain model's name."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_every_lora_tensor_changed_and_no_base_weight_did(trained):
    _, result, base_state, lora_init = trained
    state = result.model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora.keys() == lora_init.keys() and lora
    unchanged = [k for k, v in lora.items() if torch.equal(v, lora_init[k])]
    assert not unchanged, unchanged
    base = {_base_name(k): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == base_state.keys()
    changed = [k for k, v in base.items() if not torch.equal(v, base_state[k])]
    assert not changed, changed


def test_lora_sits_exactly_on_the_targets(trained):
    """all-linear = q/k/v/o of every layer (no router, no lm_head); experts only where asked."""
    cfg, result, _, _ = trained
    names = [k for k in result.model.state_dict() if "lora_A" in k]
    layers = range(4)
    attention = {
        f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "k_proj", "v_proj")
    } | {f"model.layers.{i}.self_attn.o_proj" for i in layers}
    got_attention = {
        n.removeprefix("base_model.model.").split(".lora_A")[0] for n in names if "self_attn" in n
    }
    assert got_attention == attention
    expert_layers = {int(n.split("layers.")[1].split(".")[0]) for n in names if ".experts." in n}
    assert expert_layers == set(TARGET_LAYERS)
    # Two expert parameters (gate_up_proj, down_proj) per targeted layer.
    assert sum(".experts." in n for n in names) == 2 * len(TARGET_LAYERS)
    assert not [n for n in names if "router" in n or "lm_head" in n or "embed" in n]


def test_expert_lora_gets_nonzero_gradients(trained):
    _, result, _, _ = trained
    model = result.model
    batch = result.data.train[:2]
    ids = torch.tensor([row[:64] for row in batch["input_ids"]])
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(experts) == 4 * len(TARGET_LAYERS)  # A and B of two parameters per layer
    for name, p in experts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()


def test_run_folder_follows_the_contract(trained):
    cfg, result, _, _ = trained
    run = result.run_dir
    assert run == Path(cfg.output.root) / "quotes"
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "report.json", "report.md"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run / "report.json").read_text())
    for key in [
        "name",
        "model",
        "experts",
        "steps",
        "epochs",
        "train_rows",
        "eval_rows",
        "train_tokens",
        "tokens_per_s",
        "wall_time_s",
        "train_time_s",
        "step_time_s_mean",
        "peak_alloc_gb",
        "peak_reserved_gb",
        "peak_rss_gb",
        "train_loss_first",
        "train_loss_final",
        "eval_loss_final",
        "grad_norm_final",
        "trainable_params",
        "total_params",
        "data",
        "device",
    ]:
        assert key in report, key
    # 12 train rows, batch 4, one epoch.
    assert (report["steps"], report["train_rows"], report["eval_rows"]) == (3, 12, 4)
    # Trained tokens count every non-pad token of every train row exactly once.
    assert report["train_tokens"] == sum(len(ids) for ids in result.data.train["input_ids"])
    assert report["trainable_params"] == sum(
        p.numel() for p in result.model.parameters() if p.requires_grad
    )
    assert report["peak_alloc_gb"] is None and report["peak_rss_gb"] > 0.1  # CPU run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert train_rows[-1]["tokens"] == report["train_tokens"]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r for r in rows if "eval_loss" in r][-1]["eval_loss"] == report["eval_loss_final"]
    assert report["train_loss_final"] == train_rows[-1]["loss"]
    # The resolved config reads back as the config that ran.
    from mxlora.config import load_config

    assert load_config(run / "config.yaml") == cfg


def test_saved_adapter_reproduces_the_trained_model(trained):

    cfg, result, _, _ = trained
    adapter = result.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"{layer}.mlp.experts.{p}" for layer in TARGET_LAYERS for p in ("gate_up_proj", "down_proj")
    )
    base, _ = load_model(cfg.model)
    loaded = load_adapter(base, adapter).eval()
    ids = torch.tensor([result.data.eval[0]["input_ids"][:48]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_adapter_is_replaced_in_one_rename(trained, tmp_path):
    _, result, _, _ = trained
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    save_adapter(result.model, dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind


def test_nan_loss_stops_naming_step_and_batch(tmp_path):
    """A checkpoint whose embedding is NaN gives a NaN loss on the very first batch."""
    folder = make_tiny(tmp_path / "nan-model", TinySpec(layers=2))
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"] = torch.full_like(
        weights["model.embed_tokens.weight"], float("nan")
    )
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = tiny_config(
        tmp_path / "runs", model={"name_or_path": str(folder)}, lora={"experts": {"layers": [1]}}
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1, batch 0 "):
        fit(cfg)
    assert not (tmp_path / "runs" / "quotes" / "adapter").exists()


def test_missing_expert_layer_is_a_config_error(tmp_path):
    from mxlora.config import ConfigError

    model, _ = load_model(ModelConfig(name_or_path=TINY))
    with pytest.raises(ConfigError, match=r"lora.experts.layers: layer\(s\) \[7\] do not exist"):
        apply_lora(model, LoraConfig(experts=ExpertTargets(layers=[1, 7])))


def test_resume_without_checkpoint_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(TrainingError, match="holds no run"):
        fit(cfg, resume=True)
    assert resolve_model_path(TINY)  # the tiny model exists (built by the fixtures above)


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    """An OOM inside a step ends with one message naming what lowers memory, with values."""
    from mxlora.recipes.train import GuardedSFTTrainer

    def step_out_of_memory(self, model, inputs, num_items_in_batch=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GuardedSFTTrainer, "training_step", step_out_of_memory)
    cfg = tiny_config(tmp_path, train={"engine": "trl"})
    with pytest.raises(TrainingError) as info:
        fit(cfg)
    message = str(info.value)
    assert message.startswith("out of memory while step 1 (cpu)")
    for knob in (
        "train.batch_size (now 4",
        "train.grad_accum, now 1",
        "train.max_len (now 256)",
        "lora.target_modules, now ['all-linear']",
        "lora.experts.layers, now [1, 3]",
        "model.experts, now 'auto'",
    ):
        assert knob in message, knob
    assert not (tmp_path / "quotes" / "adapter").exists()


def test_seed_lora_on_gpt_oss_20b_has_the_notebooks_parameter_count():
    """The seed's adapter on the real 20b shape (meta device): the cookbook's printed
    ``trainable params: 15,040,512 || all params: 20,929,797,696``."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from mxlora.model.configs import gpt_oss_20b_config
    from mxlora.model.lora import count_parameters

    raw = {k: v for k, v in gpt_oss_20b_config().items() if k != "quantization_config"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GptOssConfig(**raw))
    assert count_parameters(apply_lora(model, LoraConfig())) == (15_040_512, 20_929_797_696)


def test_parameter_count_is_the_same_with_mxfp4_experts():
    """MXFP4 experts count as the weights they hold (two a packed byte), so the run's log and
    report give the dequantized model's count whichever way the experts are held."""
    from mxlora.model.load import load_weights
    from mxlora.model.lora import count_parameters

    counts = {}
    for experts in ("mxfp4", "dequantize-bf16"):
        config = ModelConfig(name_or_path="tiny:layers=8", experts=experts, dtype="float32")
        model = load_weights(config, "cpu")
        lora = LoraConfig(experts=ExpertTargets(layers=[3]))
        counts[experts] = count_parameters(apply_lora(model, lora))
    assert counts["mxfp4"] == counts["dequantize-bf16"]
    assert counts["mxfp4"][1] > counts["mxfp4"][0] > 0


def test_sft_config_carries_the_seed_hyperparameters(tmp_path):
    from mxlora.recipes.train import sft_config

    cfg = tiny_config(tmp_path, train={"lr": 2e-4, "max_len": 2048, "logging_steps": 10})
    # fp32: transformers refuses bf16=True on a machine without bf16 support (this CPU).
    args = sft_config(
        cfg,
        tmp_path / "run",
        torch.float32,
        has_eval=True,
        show_bar=False,
        gradient_checkpointing=True,
    )
    assert args.learning_rate == 2e-4 and args.num_train_epochs == 1.0
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 1)
    assert args.max_length == 2048 and args.logging_steps == 10
    # transformers 5: warmup_steps below 1 is a ratio, the seed's warmup_ratio=0.03.
    assert args.get_warmup_steps(200) == 6
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert not args.bf16 and not args.fp16 and args.eval_strategy == "epoch"
    assert args.completion_only_loss and args.include_num_input_tokens_seen == "non_padding"
    assert args.router_aux_loss_coef == 0.0  # the seed's loss: cross-entropy alone
    no_eval_rows = sft_config(
        cfg,
        tmp_path / "run",
        torch.float32,
        has_eval=False,
        show_bar=False,
        gradient_checkpointing=False,
    )
    assert no_eval_rows.eval_strategy == "no" and not no_eval_rows.gradient_checkpointing
    constant = tiny_config(tmp_path, train={"scheduler": "constant", "eval": "no"})
    args = sft_config(
        constant, tmp_path / "run", torch.float32, True, False, gradient_checkpointing=True
    )
    assert args.lr_scheduler_kwargs == {} and args.eval_strategy == "no"


def test_rank_pattern_sets_per_target_ranks():
    model, _ = load_model(ModelConfig(name_or_path=TINY))
    cfg = LoraConfig(
        r=8,
        experts=ExpertTargets(layers=[1]),
        rank_pattern={"q_proj": 4, "1.mlp.experts.down_proj": 2},
    )
    shapes = {k: tuple(v.shape) for k, v in apply_lora(model, cfg).state_dict().items()}
    experts = model.config.num_local_experts
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"][0] == 4
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"][0] == 8
    # PEFT's expert LoRA stacks one rank-r factor per expert: A is (r * experts, in).
    down = "base_model.model.model.layers.1.mlp.experts.lora_A.default.weight"
    gate_up = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.default.weight"
    assert shapes[down][0] == 2 * experts and shapes[gate_up][0] == 8 * experts
