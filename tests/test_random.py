"""``mxlora make-random``: the Hub's sharded layout, the same tensors as the tiny builder, and a
checkpoint transformers' seed path loads with experts equal to mxlora.mxfp4's reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mxlora.cli import main
from mxlora.model.configs import gpt_oss_20b_config
from mxlora.model.random import INDEX_FILE, make_random, resolve_config, shard_name
from mxlora.model.tiny import TinySpec, ensure_tiny, tiny_config
from mxlora.mxfp4 import dequantize_mxfp4_experts

SPEC = {"layers": 2, "experts": 4, "hidden": 64, "intermediate": 96}
LIMIT = 60_000  # shard bytes: a few layer tensors each


def read_shards(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_FILE).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[name] = f.get_tensor(name)
    return tensors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny-dims random checkpoint cut into several shards."""
    out = tmp_path_factory.mktemp("random") / "ckpt"
    done = make_random(out, tiny_config(TinySpec(**SPEC)), seed=3, max_shard_bytes=LIMIT)
    return out, done


def test_hub_layout_and_index(sharded):
    out, done = sharded
    n = len(done.shards)
    assert n >= 3
    # The Hub's naming: three 20b shards are model-00000-of-00002 .. model-00002-of-00002.
    assert done.shards == [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    assert shard_name(2, 3) == "model-00002-of-00002.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    tensors = read_shards(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert done.total_size == index["metadata"]["total_size"]
    for shard in done.shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            assert all(index["weight_map"][name] == shard for name in names)
            size = sum(tensors[name].numel() * tensors[name].element_size() for name in names)
        # Only a tensor larger than the limit (the 201088-row embedding) gets a shard alone.
        assert size <= LIMIT or len(names) == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text()) == tiny_config(TinySpec(**SPEC))
    # Nothing left behind by the atomic write.
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]


def test_same_tensors_as_the_tiny_builder(sharded):
    """Layer-by-layer sharded writing gives exactly the tensors make-tiny writes in one file."""
    out, _ = sharded
    tiny = ensure_tiny(**SPEC, seed=3)
    with safe_open(tiny / "model.safetensors", "pt") as f:
        reference = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors = read_shards(out)
    assert tensors.keys() == reference.keys()
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name
    scales = tensors["model.layers.1.mlp.experts.down_proj_scales"]
    assert scales.dtype == torch.uint8 and scales.unique().numel() >= 4  # scales vary


def test_seed_path_dequantizes_to_the_reference(sharded):
    """transformers' Mxfp4Config(dequantize=True) loads the shards; experts equal ours bit for bit."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    out, _ = sharded
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )
    tensors = read_shards(out)
    for layer in range(SPEC["layers"]):
        experts = model.model.layers[layer].mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            expected = dequantize_mxfp4_experts(tensors[key + "_blocks"], tensors[key + "_scales"])
            got = getattr(experts, proj)
            assert got.dtype == torch.bfloat16 and got.shape == expected.shape
            assert torch.equal(got, expected), key
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, tensors["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[200006, 1000, 2000, 200007]])).logits
    assert logits.shape == (1, 4, 201088) and torch.isfinite(logits).all()


def test_cli_from_config_file(tmp_path):
    config = tiny_config(TinySpec(**SPEC))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["make-random", str(tmp_path / "m"), "--config", str(tmp_path / "config.json"),
                 "--device", "cpu", "--seed", "3"]) == 0  # fmt: skip
    # One shard under the 5 GB default, named as the Hub would.
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {"model-00000-of-00000.safetensors"}
    with safe_open(tmp_path / "m" / "model-00000-of-00000.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.experts.down_proj_blocks")
    with safe_open(ensure_tiny(**SPEC, seed=3) / "model.safetensors", "pt") as f:
        assert torch.equal(down, f.get_tensor("model.layers.0.mlp.experts.down_proj_blocks"))


def test_resolve_config(tmp_path):
    assert resolve_config("20b") == gpt_oss_20b_config()
    big = resolve_config("120b")
    assert (big["num_hidden_layers"], big["num_local_experts"]) == (36, 128)
    assert len(big["layer_types"]) == 36
    with pytest.raises(ValueError, match="not 20b, 120b or a readable config.json"):
        resolve_config(tmp_path / "missing.json")
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not gpt_oss"):
        resolve_config(tmp_path / "llama.json")
    bf16 = tiny_config(TinySpec(**SPEC, mxfp4=False))
    (tmp_path / "bf16.json").write_text(json.dumps(bf16))
    with pytest.raises(ValueError, match="no mxfp4 quantization_config"):
        resolve_config(tmp_path / "bf16.json")
    assert main(["make-random", str(tmp_path / "x"), "--config", "13b"]) == 2
