"""``experts: mxfp4`` against the seed path on a tiny gpt-oss checkpoint in the Hub layout (CPU, fp32).

The seed path: the same checkpoint through ``Mxfp4Config(dequantize=True)`` plus PEFT
(``all-linear`` attention + ``target_parameters`` experts). Ours: :func:`load_mxfp4_model` plus
:func:`get_mxfp4_peft_model`. Both get the same LoRA values (B non-zero, so both factors get
gradients); loss, logits and every LoRA gradient must agree to 1e-5 relative (L2 norm of the
difference over the norm), in every layer: layer 0 has no expert LoRA, so its attention gradients
only match if dx through the frozen MXFP4 experts above it is right.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config

from mxlora.model.tiny import ensure_tiny
from mxlora.mxfp4.experts import Mxfp4Experts, get_mxfp4_peft_model
from mxlora.mxfp4.load import load_mxfp4_adapter, load_mxfp4_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 201088
# Layer 0: attention LoRA only (below every adapted expert); 1: both projections; 2: gate_up
# only; 3: down only, with its own rank through rank_pattern.
TARGETS = [
    "1.mlp.experts.gate_up_proj",
    "1.mlp.experts.down_proj",
    "2.mlp.experts.gate_up_proj",
    "3.mlp.experts.down_proj",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    # intermediate != hidden, so a transposed expert weight cannot go unnoticed.
    return ensure_tiny(intermediate=96)


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        target_parameters=list(TARGETS),
        rank_pattern={"3.mlp.experts.down_proj": 2},
    )


def seed_model(path, experts_implementation: str | None = None):
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation=experts_implementation,
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def same_lora(*models, seed: int = 1) -> None:
    """Give every model the same random LoRA values (B too), by parameter name."""
    gen = torch.Generator().manual_seed(seed)
    params = [trainable(m) for m in models]
    shapes = [{n: tuple(p.shape) for n, p in ps.items()} for ps in params]
    assert all(s == shapes[0] for s in shapes), "LoRA parameter names/shapes differ"
    with torch.no_grad():
        for name, p in params[0].items():
            value = torch.randn(p.shape, generator=gen) * 0.05
            for ps in params:
                ps[name].copy_(value)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def step(model, ids: torch.Tensor, targets: torch.Tensor):
    """Cross entropy against ``targets`` at every position (no shift: works for one token)."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    return loss.item(), logits.detach(), grads


def pair(path, experts_implementation: str | None = None):
    seed = get_peft_model(seed_model(path, experts_implementation), lora_config())
    mx = get_mxfp4_peft_model(load_mxfp4_model(path, dtype=torch.float32), lora_config())
    same_lora(seed, mx)
    return seed, mx


def assert_parity(seed, mx, ids, targets) -> dict[str, float]:
    loss_s, logits_s, grads_s = step(seed, ids, targets)
    loss_m, logits_m, grads_m = step(mx, ids, targets)
    errors = {"loss": abs(loss_m - loss_s) / abs(loss_s), "logits": rel(logits_m, logits_s)}
    assert grads_m.keys() == grads_s.keys()
    errors.update({name: rel(grads_m[name], grads_s[name]) for name in grads_s})
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, bad
    return errors


@pytest.mark.parametrize("experts_implementation", [None, "eager"])
def test_gradient_parity_with_seed_path(tiny, experts_implementation):
    seed, mx = pair(tiny, experts_implementation)
    names = set(trainable(mx))
    # Every layer's attention, the expert LoRA exactly where targeted (nested as PEFT nests).
    for layer in range(4):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert (
                f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_A.default.weight"
                in names
            )
    expert_names = sorted(n for n in names if ".experts." in n)
    prefix = "base_model.model.model.layers."
    assert expert_names == [
        f"{prefix}{layer}.mlp.experts.{nest}lora_{ab}.default.weight"
        for layer, nest in ((1, "base_layer."), (1, ""), (2, ""), (3, ""))
        for ab in "AB"
    ]
    ids = tokens(2, 12)
    # The model's own shifted loss too (what the trainer uses).
    with torch.no_grad():
        assert rel(mx(input_ids=ids, labels=ids).loss, seed(input_ids=ids, labels=ids).loss) < TOL
    errors = assert_parity(seed, mx, ids, tokens(2, 12, seed=3))
    assert len(errors) == 2 + 4 * 4 * 2 + 8


def test_parity_one_token_and_idle_experts(tiny):
    seed, mx = pair(tiny)
    assert_parity(seed, mx, tokens(1, 1), tokens(1, 1, seed=3))
    # Push every token of layers 1 and 3 onto experts 0 and 1 (top-2): experts 2 and 3 get none.
    for model in (seed, mx):
        for layer in (1, 3):
            router = model.get_base_model().model.layers[layer].mlp.router
            with torch.no_grad():
                router.bias.copy_(torch.tensor([50.0, 40.0, -50.0, -50.0]))
    assert_parity(seed, mx, tokens(2, 9), tokens(2, 9, seed=3))


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    mx = get_mxfp4_peft_model(load_mxfp4_model(tiny, dtype=torch.float32), lora_config())
    same_lora(mx)
    ids, targets = tokens(2, 10), tokens(2, 10, seed=3)
    mx.train()
    loss, _, grads = step(mx, ids, targets)
    mx.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    assert mx.get_base_model().model.gradient_checkpointing
    loss_ckpt, _, grads_ckpt = step(mx, ids, targets)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name in grads:
        assert rel(grads_ckpt[name], grads[name]) < 1e-6, name


def test_adapter_files_round_trip_both_ways(tiny, tmp_path):
    ids = tokens(2, 8)
    mx = get_mxfp4_peft_model(load_mxfp4_model(tiny, dtype=torch.float32), lora_config())
    same_lora(mx, seed=5)
    mx.save_pretrained(tmp_path / "from_mx")

    # mxfp4 -> dequantized, with PEFT's own loader.
    seed = PeftModel.from_pretrained(seed_model(tiny), tmp_path / "from_mx")
    with torch.no_grad():
        logits_mx, logits_seed = mx(input_ids=ids).logits, seed(input_ids=ids).logits
    assert rel(logits_mx, logits_seed) < TOL
    base = seed_model(tiny)
    with torch.no_grad():
        assert rel(base(input_ids=ids).logits, logits_seed) > 1e-3  # the adapter is not a no-op

    # dequantized -> mxfp4: the seed's files load into mxfp4 mode with the same logits.
    seed.save_pretrained(tmp_path / "from_seed")
    mx2 = load_mxfp4_adapter(load_mxfp4_model(tiny, dtype=torch.float32), tmp_path / "from_seed")
    with torch.no_grad():
        assert rel(mx2(input_ids=ids).logits, logits_seed) < TOL
    assert not any(p.requires_grad for p in mx2.parameters())  # inference mode by default

    # Identical files: same keys, shapes and values, and the same adapter config.
    a = load_file(tmp_path / "from_mx" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from_seed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a = json.loads((tmp_path / "from_mx" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "from_seed" / "adapter_config.json").read_text())
    for config in (config_a, config_b):
        config["target_modules"] = sorted(config["target_modules"])
    assert config_a == config_b


def test_expert_only_adapter(tiny, tmp_path):
    config = lora_config()
    config.target_modules = None
    mx = get_mxfp4_peft_model(load_mxfp4_model(tiny, dtype=torch.float32), config)
    assert all(".experts." in n for n in trainable(mx))
    same_lora(mx, seed=6)
    mx.save_pretrained(tmp_path)
    seed = PeftModel.from_pretrained(seed_model(tiny), tmp_path)
    ids = tokens(1, 6)
    with torch.no_grad():
        assert rel(mx(input_ids=ids).logits, seed(input_ids=ids).logits) < TOL


def test_no_dequantized_expert_tensor_in_the_model(tiny):
    model = load_mxfp4_model(tiny, dtype=torch.float32)
    cfg = model.config
    mx = get_mxfp4_peft_model(model, lora_config())
    hidden, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    expert_shapes = {(hidden, 2 * inter), (2 * inter, hidden), (hidden, inter), (inter, hidden)}
    experts = [m for m in mx.modules() if isinstance(m, Mxfp4Experts)]
    assert len(experts) == cfg.num_hidden_layers
    float_in_experts = 0
    for name, t in [*mx.named_parameters(), *mx.named_buffers()]:
        if not t.is_floating_point():
            assert t.dtype == torch.uint8 and "_proj_" in name, name
            continue
        assert tuple(t.shape[-2:]) not in expert_shapes, name
        if ".experts." in name:
            float_in_experts += t.numel()
    packed_params = [p for e in experts for p in e.parameters() if p.dtype == torch.uint8]
    # Frozen uint8 parameters (FSDP2 shards parameters), not buffers; never trainable.
    assert len(packed_params) == 4 * len(experts)
    assert not [b for e in experts for b in e.buffers()]
    assert not any(p.requires_grad for p in packed_params)
    packed = sum(p.numel() for p in packed_params)
    dequantized = cfg.num_hidden_layers * n * 3 * hidden * inter
    assert packed * 8 == dequantized * 4.25  # MXFP4: 4 bits a weight + an 8-bit scale per 32
    # Biases and LoRA factors only: far below the dequantized experts.
    assert float_in_experts < 0.25 * dequantized
    mx.to(torch.bfloat16)  # casts floating-point tensors only: the packed weights stay packed
    assert all(p.dtype == torch.uint8 for p in packed_params)


def test_optimizer_step_leaves_the_frozen_weights_alone(tiny):
    mx = get_mxfp4_peft_model(load_mxfp4_model(tiny, dtype=torch.float32), lora_config())
    same_lora(mx)
    frozen = {
        n: t.clone()
        for n, t in [*mx.named_buffers(), *mx.named_parameters()]
        if not t.requires_grad
    }
    lora = {n: p.clone() for n, p in trainable(mx).items()}
    optimizer = torch.optim.AdamW(trainable(mx).values(), lr=1e-2)
    mx.train()
    ids = tokens(2, 8)
    mx(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    now = dict([*mx.named_buffers(), *mx.named_parameters()])
    assert all(torch.equal(now[n], t) for n, t in frozen.items())
    assert any(n.endswith("_blocks") for n in frozen) and any(n.endswith("_scales") for n in frozen)
    assert all(not torch.equal(now[n], p) for n, p in lora.items())


def test_load_refuses_a_bf16_checkpoint():
    from mxlora.config import ModelConfig
    from mxlora.model.load import ModelLoadError, load_weights

    with pytest.raises(ValueError, match="MXFP4"):
        load_mxfp4_model(ensure_tiny(mxfp4=False))
    with pytest.raises(ModelLoadError, match="experts: mxfp4 needs a checkpoint with MXFP4"):
        load_weights(ModelConfig(name_or_path="tiny:mxfp4=false", experts="mxfp4"), "cpu")


def test_bf16_gradients_agree_with_the_seed_path_in_bf16(tiny):
    """The issue's GPU criterion (cosine >= 0.999 per LoRA gradient, bf16), on the tiny model.

    Not bit-equal: the seed folds ``W + s * lhs @ rhs`` into one bf16 weight, we keep the LoRA
    branch separate. Measured: worst cosine 0.99979 (layer 3 q_proj lora_A).
    """
    seed = get_peft_model(
        AutoModelForCausalLM.from_pretrained(
            tiny,
            quantization_config=Mxfp4Config(dequantize=True),
            dtype=torch.bfloat16,
            attn_implementation="eager",
        ),
        lora_config(),
    )
    mx = get_mxfp4_peft_model(load_mxfp4_model(tiny, dtype=torch.bfloat16), lora_config())
    assert all(p.dtype == torch.float32 for p in trainable(mx).values())  # PEFT's upcast, both
    same_lora(seed, mx)
    ids, targets = tokens(2, 16), tokens(2, 16, seed=3)
    loss_s, _, grads_s = step(seed, ids, targets)
    loss_m, _, grads_m = step(mx, ids, targets)
    assert loss_m == pytest.approx(loss_s, rel=1e-2)
    for name, g in grads_s.items():
        cos = F.cosine_similarity(grads_m[name].double().flatten(), g.double().flatten(), dim=0)
        assert cos >= 0.999, (name, cos.item())


def _batches(shared_data, tokenizer, steps: int, batch: int):
    """``steps`` batches of english_quotes rows rendered as the trainer sees them (padded right,
    labels only on the assistant turn)."""
    from mxlora.data import DataConfig, prepare_data

    cfg = DataConfig(
        # A few selected rows get dropped (too long, empty, undecodable): select some spare.
        source=str(shared_data / "english_quotes.jsonl"),
        select=steps * batch + 32,
        test_size=0.0,
    )
    rows = prepare_data(cfg, tokenizer, max_len=256).train
    assert len(rows) >= steps * batch
    for start in range(0, steps * batch, batch):
        chunk = rows[start : start + batch]
        width = max(len(ids) for ids in chunk["input_ids"])
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        attention = torch.zeros(batch, width, dtype=torch.long)
        for i, (row, mask) in enumerate(
            zip(chunk["input_ids"], chunk["completion_mask"], strict=True)
        ):
            n = len(row)
            ids[i, :n] = torch.tensor(row)
            attention[i, :n] = 1
            labels[i, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(row), -100)
        yield ids, attention, labels


def _completion_loss(model, ids, attention, labels):
    """The model's causal-LM loss, with the 201088-wide logits computed only at positions that
    predict a labelled token (in any row): the same number for a third of the CPU time."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero().squeeze(1)
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=-100
    )


@pytest.mark.slow
def test_loss_curve_matches_seed_path_on_english_quotes(tiny, shared_data, tokenizer):
    """50 AdamW steps on real rows, same init and batches, gradient checkpointing on (the seed's
    setting), batch 4 as the seed: the two loss curves coincide to fp32 rounding. Measured (2
    busy CPU cores, 7.4 min): 12.191147 -> 12.099686 (seed) and 12.099687 (mxfp4), max
    |difference| over the 50 steps 1.05e-5, the curve's own step-to-step std 3.9e-2."""
    steps, batch = 50, 4  # the seed's batch size
    seed, mx = pair(tiny)
    curves = {}
    for name, model in (("seed", seed), ("mxfp4", mx)):
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-3)
        losses = []
        for i, (ids, attention, labels) in enumerate(
            _batches(shared_data, tokenizer, steps, batch)
        ):
            loss = _completion_loss(model, ids, attention, labels)
            if i == 0:  # the very loss the trainer computes (model's own shifted CE)
                with torch.no_grad():
                    full = model(input_ids=ids, attention_mask=attention, labels=labels).loss
                assert loss.item() == pytest.approx(full.item(), rel=1e-6)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
    seed_curve, mx_curve = torch.tensor(curves["seed"]), torch.tensor(curves["mxfp4"])
    print(f"seed  first/last: {seed_curve[0]:.6f} {seed_curve[-1]:.6f}")
    print(f"mxfp4 first/last: {mx_curve[0]:.6f} {mx_curve[-1]:.6f}")
    print(f"max |difference|: {(seed_curve - mx_curve).abs().max():.3e}")
    print(f"loss spread over the steps (std): {seed_curve.std():.3e}")
    # The random tiny model starts at ln(vocab) ~ 12.2 and moves slowly: what matters is that the
    # gap between the paths is far below the batch-to-batch variation of either curve.
    assert torch.allclose(mx_curve, seed_curve, rtol=1e-5, atol=0)
    assert (seed_curve - mx_curve).abs().max() < 1e-2 * seed_curve.std()


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
    """A checkpoint split over two shards with an index loads to the same tensors."""
    tensors = load_file(tiny / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    single = load_mxfp4_model(tiny, dtype=torch.float32).state_dict()
    sharded = load_mxfp4_model(tmp_path, dtype=torch.float32).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_hub_id_resolves_from_the_local_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "models--someone--tiny-gpt-oss"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in tiny.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_mxfp4_model("someone/tiny-gpt-oss", dtype=torch.float32)
    assert model.name_or_path == "someone/tiny-gpt-oss"  # what PEFT writes as the base model
    direct = load_mxfp4_model(tiny, dtype=torch.float32).state_dict()
    assert all(torch.equal(t, direct[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="Hugging Face cache"):
        load_mxfp4_model("someone/not-cached")


def test_loading_dequantizes_nothing(tiny):
    """No floating-point tensor shaped like an expert weight is created while loading."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # Meta tensors (the model skeleton) hold no memory; real ones do.
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                    self.seen.add(tuple(t.shape[-2:]))
            return out

    with Shapes() as mode:
        model = load_mxfp4_model(tiny, dtype=torch.float32)
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    assert mode.seen  # the hook did see the float casts of the other tensors
    assert not mode.seen & {
        (hidden, 2 * inter),
        (2 * inter, hidden),
        (hidden, inter),
        (inter, hidden),
    }


def test_mxlora_train_in_mxfp4_mode_trains_the_seed_modes_adapter(tmp_path):
    """``mxlora train configs/tiny/quotes.yaml model.experts=mxfp4`` against the same command in
    the seed's mode: same losses, same adapter, and its files load with ``PeftModel`` on the
    dequantized model with the logits of the mxfp4 model. The seed's mode is reached as
    ``model.experts: auto`` takes it on the CPU (no Triton kernel) under a budget it fits,
    which the run's report records."""
    from mxlora.cli import main
    from mxlora.model.load import resolve_model_path

    tiny_spec = "tiny:layers=4,intermediate=96"
    for mode in ("dequantize-bf16", "mxfp4"):
        experts = ["model.experts=auto", "train.memory_budget_gb=100"]
        code = main(
            [
                "train",
                str(ROOT / "configs" / "tiny" / "quotes.yaml"),
                *(experts if mode == "dequantize-bf16" else ["model.experts=mxfp4"]),
                f"model.name_or_path={tiny_spec}",
                "lora.experts.layers=[1,3]",
                "data.select=12",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.logging_steps=1",
                "train.eval=no",
                f"output.root={tmp_path}",
                f"output.name={mode}",
            ]
        )
        assert code == 0
    seed_dir, mx_dir = tmp_path / "dequantize-bf16", tmp_path / "mxfp4"
    for run, mode in ((mx_dir, "mxfp4"), (seed_dir, "dequantize-bf16")):
        assert json.loads((run / "report.json").read_text())["experts"] == mode

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert len(losses(mx_dir)) == 2
    assert losses(mx_dir) == pytest.approx(losses(seed_dir), rel=1e-5)
    a = load_file(mx_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(seed_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for key in a:
        assert rel(a[key], b[key]) < 1e-4, key

    path = resolve_model_path(tiny_spec)
    ids = tokens(2, 8)
    seed = PeftModel.from_pretrained(seed_model(path), mx_dir / "adapter")
    mx = load_mxfp4_adapter(load_mxfp4_model(path, dtype=torch.float32), mx_dir / "adapter")
    with torch.no_grad():
        logits = seed(input_ids=ids).logits
        assert rel(mx(input_ids=ids).logits, logits) < TOL
        assert rel(seed_model(path)(input_ids=ids).logits, logits) > 1e-4  # it did train


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would
# report the (large) pytest parent's peak.
_RSS_SCRIPT = """
import sys, torch
from mxlora.mxfp4.load import load_mxfp4_model
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
start = status("VmRSS")
model = load_mxfp4_model(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    for t in model.state_dict().values():
        t.amax()  # touch every page of every tensor (CPU tensors map the file lazily)
print(status("VmHWM") - start)
"""


@pytest.mark.slow
def test_host_peak_rss_stays_near_the_checkpoint_size():
    """Loading a 467 MB checkpoint (32 experts of 512 x 512 in 4 layers; their bf16 copy would
    add 148 MB) raises the process's peak RSS by about the checkpoint's size. Measured: 475 MB
    (the seed path: 716 MB)."""
    import subprocess
    import sys

    path = ensure_tiny(hidden=512, intermediate=512, experts=32, layers=4)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    growth = int(out.stdout.split()[-1])
    assert growth < 1.1 * size, (growth, size)
