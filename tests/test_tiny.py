"""Tiny gpt-oss checkpoints: the Hub layout, loading through transformers' seed path bit for bit,
the bf16 twin, determinism, the cache and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mxlora.model.tiny as tiny_module
from mxlora.cli import main as cli
from mxlora.model.configs import GPT_OSS_20B_CONFIG, layer_types
from mxlora.model.tiny import TinySpec, ensure_tiny, make_tiny, tiny_config
from mxlora.mxfp4 import dequantize_mxfp4_experts

SPEC = TinySpec()  # the make-tiny defaults: 4 layers, 4 experts top-2, hidden 64, inter 64


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _expected_tensors(spec: TinySpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of a gpt-oss checkpoint, with the Hub's names, dtypes and shapes."""
    h, i, e, v = spec.hidden, spec.intermediate, spec.experts, 201088
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    bf16, u8 = torch.bfloat16, torch.uint8
    out = {
        "model.embed_tokens.weight": (bf16, (v, h)),
        "model.norm.weight": (bf16, (h,)),
        "lm_head.weight": (bf16, (v, h)),
    }
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": (bf16, (h,)),
            p + "post_attention_layernorm.weight": (bf16, (h,)),
            p + "self_attn.q_proj.weight": (bf16, (q, h)),
            p + "self_attn.q_proj.bias": (bf16, (q,)),
            p + "self_attn.k_proj.weight": (bf16, (kv, h)),
            p + "self_attn.k_proj.bias": (bf16, (kv,)),
            p + "self_attn.v_proj.weight": (bf16, (kv, h)),
            p + "self_attn.v_proj.bias": (bf16, (kv,)),
            p + "self_attn.o_proj.weight": (bf16, (h, q)),
            p + "self_attn.o_proj.bias": (bf16, (h,)),
            p + "self_attn.sinks": (bf16, (spec.heads,)),
            p + "mlp.router.weight": (bf16, (e, h)),
            p + "mlp.router.bias": (bf16, (e,)),
            p + "mlp.experts.gate_up_proj_bias": (bf16, (e, 2 * i)),
            p + "mlp.experts.down_proj_bias": (bf16, (e, h)),
        }
        if spec.mxfp4:
            out |= {
                p + "mlp.experts.gate_up_proj_blocks": (u8, (e, 2 * i, h // 32, 16)),
                p + "mlp.experts.gate_up_proj_scales": (u8, (e, 2 * i, h // 32)),
                p + "mlp.experts.down_proj_blocks": (u8, (e, h, i // 32, 16)),
                p + "mlp.experts.down_proj_scales": (u8, (e, h, i // 32)),
            }
        else:
            out |= {
                p + "mlp.experts.gate_up_proj": (bf16, (e, h, 2 * i)),
                p + "mlp.experts.down_proj": (bf16, (e, i, h)),
            }
    return out


@pytest.fixture(scope="module")
def mxfp4_dir() -> Path:
    return ensure_tiny()


@pytest.fixture(scope="module")
def bf16_dir() -> Path:
    return ensure_tiny(mxfp4=False)


@pytest.fixture(scope="module")
def seed_path_model(mxfp4_dir):
    """The tiny MXFP4 checkpoint loaded as the seed notebook loads gpt-oss-20b."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model, info = AutoModelForCausalLM.from_pretrained(
        mxfp4_dir,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.bfloat16,
        output_loading_info=True,
    )
    return model, info


@pytest.mark.parametrize("mxfp4", [True, False])
def test_checkpoint_has_the_hub_tensor_names_dtypes_and_shapes(mxfp4, mxfp4_dir, bf16_dir):
    path = (mxfp4_dir if mxfp4 else bf16_dir) / "model.safetensors"
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = f.keys()
        found = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names}
    to_st = {torch.bfloat16: "BF16", torch.uint8: "U8"}
    want = {k: (to_st[d], s) for k, (d, s) in _expected_tensors(TinySpec(mxfp4=mxfp4)).items()}
    assert found == want


def test_config_is_the_real_one_resized(mxfp4_dir, bf16_dir):
    config = json.loads((mxfp4_dir / "config.json").read_text())
    assert config.keys() == GPT_OSS_20B_CONFIG.keys()
    assert config["model_type"] == "gpt_oss" and config["vocab_size"] == 201088
    assert config["quantization_config"] == GPT_OSS_20B_CONFIG["quantization_config"]
    assert config["layer_types"] == layer_types(SPEC.layers)
    sizes = {
        "num_hidden_layers": SPEC.layers,
        "num_local_experts": SPEC.experts,
        "num_experts_per_tok": SPEC.experts_per_token,
        "experts_per_token": SPEC.experts_per_token,
        "hidden_size": SPEC.hidden,
        "intermediate_size": SPEC.intermediate,
        "num_attention_heads": SPEC.heads,
        "num_key_value_heads": SPEC.kv_heads,
        "head_dim": SPEC.head_dim,
        "sliding_window": SPEC.sliding_window,
    }
    assert {k: config[k] for k in sizes} == sizes
    unchanged = set(config) - set(sizes) - {"layer_types"}
    assert {k: config[k] for k in unchanged} == {k: GPT_OSS_20B_CONFIG[k] for k in unchanged}
    bf16_config = json.loads((bf16_dir / "config.json").read_text())
    assert "quantization_config" not in bf16_config
    assert bf16_config == {k: v for k, v in config.items() if k != "quantization_config"}


def test_generation_config_and_tokenizer_are_the_real_ones(mxfp4_dir, shared_data, tokenizer_dir):
    real = shared_data / "gpt-oss-20b"
    assert json.loads((mxfp4_dir / "generation_config.json").read_text()) == json.loads(
        (real / "generation_config.json").read_text()
    )
    for path in tokenizer_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            assert (mxfp4_dir / path.name).read_bytes() == path.read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mxfp4_dir)
    assert tok.convert_tokens_to_ids(["<|start|>", "<|return|>"]) == [200006, 200002]


def test_expert_scales_vary_like_real_ones(mxfp4_dir):
    tensors = load_file(mxfp4_dir / "model.safetensors")
    scales = tensors["model.layers.0.mlp.experts.gate_up_proj_scales"]
    # Normal(0, 0.02) blocks alone would all sit within 2**-8..2**-6; the per-block gains spread
    # them over several powers of two.
    assert len(scales.unique()) >= 5
    dequantized = dequantize_mxfp4_experts(
        tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"], scales, torch.float32
    )
    assert 0.01 < dequantized.std() < 0.1


def test_mxfp4_tiny_loads_through_the_seed_path_bit_for_bit(seed_path_model, mxfp4_dir, tokenizer):
    model, info = seed_path_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tensors = load_file(mxfp4_dir / "model.safetensors")
    params = dict(model.named_parameters())
    for layer in range(SPEC.layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            ours = dequantize_mxfp4_experts(tensors[name + "_blocks"], tensors[name + "_scales"])
            theirs = params[name].detach()
            assert theirs.dtype == torch.bfloat16 and torch.equal(_bits(theirs), _bits(ours)), name
    for name, tensor in tensors.items():
        if name in params:  # every non-expert tensor loads unchanged
            assert torch.equal(params[name].detach(), tensor), name
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 201088) and torch.isfinite(logits).all()
    assert logits.float().std() > 0.01  # not a degenerate constant


def test_seed_path_in_float32_matches_the_reference_in_float32(mxfp4_dir):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(
        mxfp4_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    tensors = load_file(mxfp4_dir / "model.safetensors")
    name = "model.layers.3.mlp.experts.down_proj"
    ours = dequantize_mxfp4_experts(
        tensors[name + "_blocks"], tensors[name + "_scales"], torch.float32
    )
    assert torch.equal(_bits(model.get_parameter(name).detach()), _bits(ours))


def test_bf16_twin_loads_plainly_with_the_dequantized_values(bf16_dir, seed_path_model):
    from transformers import AutoModelForCausalLM

    plain, info = AutoModelForCausalLM.from_pretrained(bf16_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert plain.dtype == torch.bfloat16
    seed_model, _ = seed_path_model
    ours, theirs = plain.state_dict(), seed_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(_bits(ours[name]), _bits(theirs[name])), name
    ids = torch.tensor([[200006, 17360, 200008, 12194, 11, 2375, 0]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, seed_model(ids).logits)


def test_same_seed_same_bytes_and_tensors_independent_of_depth(tmp_path):
    # 24 layers, tiny dims: what tests of the seed's layer 7/15/23 expert targets build.
    spec = TinySpec(layers=24, experts=4, hidden=32, intermediate=32, heads=2, kv_heads=1)
    a = make_tiny(tmp_path / "a", spec)
    b = make_tiny(tmp_path / "b", spec)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = load_file(
        make_tiny(tmp_path / "c", TinySpec(**{**vars(spec), "seed": 1})) / "model.safetensors"
    )
    same = load_file(a / "model.safetensors")
    assert not torch.equal(
        other["model.layers.23.mlp.experts.down_proj_blocks"],
        same["model.layers.23.mlp.experts.down_proj_blocks"],
    )
    # Per-tensor seeds: a shallower model of the same seed has the same first layers.
    shallow = load_file(
        make_tiny(tmp_path / "d", TinySpec(**{**vars(spec), "layers": 2})) / "model.safetensors"
    )
    assert shallow.keys() < same.keys()
    assert all(torch.equal(t, same[k]) for k, t in shallow.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden": 48}, "hidden: must be a positive multiple of 32"),
        ({"intermediate": 0}, "intermediate"),
        ({"experts": 2, "experts_per_token": 3}, "experts_per_token"),
        ({"heads": 4, "kv_heads": 3}, "kv_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"layers": 0}, "layers"),
    ],
)
def test_spec_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        TinySpec(**overrides)


def test_cache_key_names_every_field():
    base = TinySpec()
    keys = {base.cache_key()}
    for name, value in vars(base).items():
        changed = {**vars(base), name: (not value) if isinstance(value, bool) else 2 * value or 1}
        keys.add(TinySpec(**changed).cache_key())
    assert len(keys) == len(vars(base)) + 1


def test_ensure_tiny_reuses_and_survives_a_lost_race(tmp_path, monkeypatch):
    monkeypatch.setenv("MXLORA_CACHE", str(tmp_path))
    builds = []

    def fake_make_tiny(out: Path, spec: TinySpec) -> Path:
        # Meanwhile another process finishes first and renames its complete folder into place.
        final = tmp_path / "tiny" / spec.cache_key()
        (final / "config.json").write_text("winner")
        (out / "config.json").write_text("loser")
        builds.append(out)
        return out

    monkeypatch.setattr(tiny_module, "make_tiny", fake_make_tiny)
    path = ensure_tiny(seed=123)
    assert path == tmp_path / "tiny" / TinySpec(seed=123).cache_key()
    assert (path / "config.json").read_text() == "winner"
    assert not builds[0].exists()  # the loser's temp folder is gone
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [path.name]
    assert ensure_tiny(seed=123) == path and len(builds) == 1  # reused, not rebuilt


def test_tiny_config_for_bf16_has_no_quantization():
    assert "quantization_config" not in tiny_config(TinySpec(mxfp4=False))
    assert tiny_config(TinySpec())["quantization_config"]["quant_method"] == "mxfp4"


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "mxlora.cli", "make-tiny", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--layers", "--experts-per-token", "--head-dim", "--mxfp4", "--bf16", "--seed"):
        assert option in result.stdout
    assert "exact Hub layout" in result.stdout or "Hub layout" in result.stdout


def test_cli_run_writes_the_spec_it_was_given(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["make-tiny", str(out), "--layers", "2", "--experts", "3", "--experts-per-token", "1"]
    assert (
        cli([*args, "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--seed", "7", "--bf16"])
        == 0
    )
    assert str(out) in capsys.readouterr().out
    spec = TinySpec(
        layers=2,
        experts=3,
        experts_per_token=1,
        hidden=32,
        heads=2,
        kv_heads=1,
        seed=7,
        mxfp4=False,
    )
    want = make_tiny(tmp_path / "api", spec)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (want / name).read_bytes()
    assert cli(["make-tiny", str(tmp_path / "bad"), "--hidden", "40"]) == 2
    assert "hidden" in capsys.readouterr().err
