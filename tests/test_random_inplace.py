"""``random:CONFIG``: a gpt-oss generated in place on the device (no checkpoint), and host memory
of the MXFP4 loader: neither the random model nor a streamed checkpoint is ever held twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mxlora.config import ConfigError, ExpertTargets, LoraConfig, ModelConfig
from mxlora.model.configs import gpt_oss_120b_config
from mxlora.model.load import ModelLoadError, checkpoint_config, load_tokenizer, load_weights
from mxlora.model.lora import apply_lora
from mxlora.model.random import RandomSpec, make_random, parse_random
from mxlora.model.tiny import TinySpec, _random_expert_weight, random_packed_expert, tiny_config
from mxlora.mxfp4 import dequantize_mxfp4
from mxlora.mxfp4.experts import Mxfp4Experts
from mxlora.mxfp4.load import load_mxfp4_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"layers": 2, "experts": 4, "hidden": 64, "intermediate": 96}


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("random-spec") / "config.json"
    path.write_text(json.dumps(tiny_config(TinySpec(**SPEC))))
    return path


def test_parse_random_spec(tiny_json):
    assert parse_random("openai/gpt-oss-120b") is None and parse_random("tiny:layers=2") is None
    assert parse_random("random:120b") == RandomSpec(gpt_oss_120b_config(), 0)
    assert parse_random("random:gpt-oss-120b, seed=7") == RandomSpec(gpt_oss_120b_config(), 7)
    assert parse_random(f"random:{tiny_json}").config == tiny_config(TinySpec(**SPEC))
    assert checkpoint_config("random:120b") == gpt_oss_120b_config()
    for bad, match in (
        ("random:", "expected random:20b"),
        ("random:20b,seed=x", "expected seed=N"),
        ("random:20b,layers=2", "expected seed=N"),
        ("random:13b", "not 20b, 120b or a readable config.json"),
    ):
        with pytest.raises(ConfigError, match=f"^model.name_or_path: .*{match}"):
            parse_random(bad)


def test_packed_experts_look_like_quantized_ones():
    """Drawn packed, the scales and magnitudes are those of quantizing normal weights."""
    shape = (4, 128, 256)
    quantized = _random_expert_weight("w", 0, shape, "cpu")
    packed = random_packed_expert("w", 0, shape, "cpu")
    assert [t.shape for t in packed] == [t.shape for t in quantized]
    assert all(t.dtype == torch.uint8 for t in packed)
    q_scales, p_scales = quantized[1].float(), packed[1].float()
    assert p_scales.mean().item() == pytest.approx(q_scales.mean().item(), abs=0.2)
    assert p_scales.std().item() == pytest.approx(q_scales.std().item(), abs=0.2)
    q_rms, p_rms = (
        dequantize_mxfp4(*t, torch.float32).pow(2).mean().sqrt() for t in (quantized, packed)
    )
    assert 0.8 < (p_rms / q_rms).item() < 1.6
    # Every byte value occurs: uniform codes, not a constant fill.
    assert packed[0].unique().numel() == 256
    assert torch.equal(random_packed_expert("w", 0, shape, "cpu")[0], packed[0])  # seeded


def test_random_model_is_the_checkpoint_model_with_packed_experts(tiny_json, tmp_path):
    """Same names, shapes and dtypes as the loaded make-random checkpoint of the same config;
    every non-expert tensor identical (the same generators); experts drawn packed."""
    ckpt = make_random(tmp_path / "ckpt", tiny_config(TinySpec(**SPEC)), seed=3).path
    loaded = load_mxfp4_model(ckpt, dtype=torch.float32).state_dict()
    cfg = ModelConfig(name_or_path=f"random:{tiny_json},seed=3", dtype="float32")
    model = load_weights(cfg, "cpu")
    made = model.state_dict()
    assert made.keys() == loaded.keys()
    for name, tensor in made.items():
        assert (tensor.shape, tensor.dtype) == (loaded[name].shape, loaded[name].dtype), name
        packed = name.endswith(("_blocks", "_scales"))
        assert torch.equal(tensor, loaded[name]) != packed, name
    assert isinstance(model.model.layers[1].mlp.experts, Mxfp4Experts)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.name_or_path == cfg.name_or_path
    assert model.generation_config.eos_token_id == [200002, 199999]
    assert len(load_tokenizer(cfg)) == 200019  # the gpt-oss tokenizer
    with pytest.raises(ModelLoadError, match="needs a checkpoint"):
        load_weights(ModelConfig(name_or_path="random:20b", experts="dequantize-bf16"), "cpu")


def test_random_model_trains_with_lora(tiny_json):
    """The seed-style LoRA (all-linear + experts of one layer) learns on the in-place model."""
    cfg = ModelConfig(name_or_path=f"random:{tiny_json}", dtype="float32")
    torch.manual_seed(0)
    model = apply_lora(load_weights(cfg, "cpu"), LoraConfig(experts=ExpertTargets(layers=[1])))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trainable) and any("q_proj" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# Host memory: a child process loads a model whose packed experts dominate its size (vocabulary
# cut to 1024 so the embeddings do not) and reports its peak RSS over what it held before.
RSS_CONFIG = {"layers": 8, "experts": 64, "hidden": 512, "intermediate": 512, "heads": 8,
              "kv_heads": 2, "head_dim": 64}  # fmt: skip
RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from mxlora.mxfp4.load import load_mxfp4_model, random_mxfp4_model

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    kind, arg = sys.argv[1], sys.argv[2]
    before = rss()
    if kind == "random":
        model = random_mxfp4_model(json.loads(open(arg).read()), dtype=torch.bfloat16)
    else:
        model = load_mxfp4_model(arg, dtype=torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"growth": peak - before, "model": size}))
    """
)


def _peak_growth(kind: str, arg: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, kind, str(arg)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rss_config() -> dict:
    config = tiny_config(TinySpec(**RSS_CONFIG))
    config.update(vocab_size=1024, pad_token_id=0)
    return config


@pytest.mark.slow
def test_random_model_host_peak_is_the_model(rss_config, tmp_path):
    """On the CPU the model *is* host memory: the peak grows by it and one tensor's making."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(rss_config))
    got = _peak_growth("random", path)
    largest = 64 * 1024 * 16 * 16  # one gate_up_proj_blocks tensor
    assert got["model"] > 200e6
    assert got["growth"] < got["model"] + 3 * largest + 80e6, got


@pytest.mark.slow
def test_checkpoint_streams_shard_by_shard(rss_config, tmp_path):
    """A sharded checkpoint loads with the host holding the model plus about one shard.

    On the CPU the loaded tensors may stay views of the mapped files (safetensors maps each
    shard), so this bounds the peak rather than measuring the model; on a GPU only the shard
    being read is mapped.
    """
    from mxlora.model.tiny import random_weights, write_model_files

    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight_map, shard, shards = {}, {}, []

    def flush():
        name = f"model-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shards.append(name)
        shard.clear()

    for name, tensor in random_weights(rss_config, 0, quantize=False):
        shard[name] = tensor.contiguous()
        if name.endswith("down_proj_scales"):  # a layer a shard: ~27 MB
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_model_files(folder, rss_config)
    shard_bytes = max((folder / s).stat().st_size for s in shards)
    got = _peak_growth("checkpoint", folder)
    assert got["model"] > 200e6 and len(shards) == 9
    assert got["growth"] < got["model"] + 2 * shard_bytes + 80e6, got


def test_loader_keeps_no_source_tensor(tiny_json):
    """Each tensor handed to the loader is released before the next is asked for (cast to the
    model dtype, the float ones are copies: the source must be gone), so the host holds one."""
    import weakref

    from transformers import GptOssConfig

    from mxlora.model.tiny import random_weights
    from mxlora.mxfp4.load import mxfp4_model_from_tensors

    config = json.loads(tiny_json.read_text())
    alive: list[weakref.ref] = []

    def tensors():
        for name, tensor in random_weights(config, 0, quantize=False):
            assert all(ref() is None for ref in alive), name
            if tensor.is_floating_point():
                alive.append(weakref.ref(tensor))
            yield name, tensor

    model = mxfp4_model_from_tensors(
        GptOssConfig.from_dict(config), tensors(), dtype=torch.float32, device="cpu",
        attn_implementation="eager", where="test",
    )  # fmt: skip
    assert len(alive) > 20 and all(ref() is None for ref in alive)
    assert model.lm_head.weight.dtype == torch.float32
