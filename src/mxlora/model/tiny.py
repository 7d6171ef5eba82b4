"""Tiny gpt-oss checkpoints in the exact Hub layout, built offline, deterministic from a seed.

A tiny checkpoint is what ``openai/gpt-oss-20b`` is, only small: ``config.json`` (the real config
with the sizes replaced; for MXFP4 the same ``quantization_config``), ``model.safetensors`` with
the Hub's tensor names and dtypes (MXFP4 experts as uint8 ``*_blocks`` / e8m0 ``*_scales``,
everything else bf16), ``generation_config.json`` and the real o200k_harmony tokenizer (vocabulary
201088). It loads through the same transformers code paths as the real model.

Weights are random with small, realistic magnitudes. Each tensor has its own generator seeded
from ``(seed, tensor name)``, so a tensor's values do not depend on the rest of the model, and the
same seed gives byte-identical files. Expert weights go through :func:`mxlora.mxfp4.quantize_mxfp4`
with a random gain per 32-value block, so scales vary as in a real checkpoint; a ``--bf16``
checkpoint holds exactly the values its MXFP4 twin (same spec and seed) dequantizes to.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mxlora.model.configs import GPT_OSS_GENERATION_CONFIG, gpt_oss_20b_config, layer_types
from mxlora.mxfp4 import BLOCK_SIZE, dequantize_mxfp4_experts, quantize_mxfp4
from mxlora.paths import cache_dir
from mxlora.staging import DestinationExists, StagedFolder

# Bump when the bytes a spec produces change, so cached tiny models are rebuilt.
FORMAT_VERSION = 1

# Standard deviations of the random weights. 0.02 is gpt-oss's initializer_range (config.json);
# norms scatter around 1 and attention sinks are logits of order 1, as learned ones are.
_STD = 0.02
_NORM_STD = 0.1
_SINK_STD = 1.0
# Spread (std of log2) of the per-block gain on expert weights: scales then span a few powers of
# two instead of all sitting at the same exponent.
_EXPERT_BLOCK_LOG2_GAIN_STD = 1.0
# e8m0 code of the scale quantize_mxfp4 gives a block of 32 N(0, _STD) values (2^-7: 127 - 7),
# the centre of the scales drawn by random_packed_expert.
_PACKED_SCALE_EXPONENT = 120


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of a tiny gpt-oss (field names are the ``make-tiny`` options).

    Attributes:
        layers: decoder layers (attention alternates sliding/full from layer 0, as in gpt-oss).
        experts: routed experts per layer.
        experts_per_token: router top-k.
        hidden: residual width, a multiple of 32 (MXFP4 blocks run along it).
        intermediate: expert width, a multiple of 32.
        heads: attention (query) heads.
        kv_heads: key/value heads; ``heads`` must be a multiple.
        head_dim: width of one head (even, for rotary embeddings).
        sliding_window: window of the sliding-attention layers.
        seed: random seed of the weights.
        mxfp4: experts as MXFP4 blocks/scales (the Hub layout); else plain bf16 tensors.
    """

    layers: int = 4
    experts: int = 4
    experts_per_token: int = 2
    hidden: int = 64
    intermediate: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 128
    seed: int = 0
    mxfp4: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "experts_per_token", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("hidden", "intermediate"):
            value = getattr(self, name)
            if value < BLOCK_SIZE or value % BLOCK_SIZE:
                raise ValueError(
                    f"{name}: must be a positive multiple of {BLOCK_SIZE}, got {value}"
                )
        if self.experts_per_token > self.experts:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} exceeds experts ({self.experts})"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: {self.kv_heads} does not divide heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even (rotary embeddings), got {self.head_dim}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window: must be at least 1, got {self.sliding_window}")

    def cache_key(self) -> str:
        """A folder name naming every field (and the format version)."""
        return (
            f"v{FORMAT_VERSION}-L{self.layers}-E{self.experts}k{self.experts_per_token}"
            f"-H{self.hidden}-I{self.intermediate}-A{self.heads}kv{self.kv_heads}d{self.head_dim}"
            f"-W{self.sliding_window}-s{self.seed}-{'mxfp4' if self.mxfp4 else 'bf16'}"
        )


def tiny_config(spec: TinySpec) -> dict[str, Any]:
    """The real gpt-oss-20b ``config.json`` with ``spec``'s sizes (and no quantization for bf16)."""
    config = gpt_oss_20b_config()
    config.update(
        num_hidden_layers=spec.layers,
        layer_types=layer_types(spec.layers),
        num_local_experts=spec.experts,
        # The Hub config carries top-k twice: transformers reads num_experts_per_tok,
        # OpenAI's reference code experts_per_token.
        num_experts_per_tok=spec.experts_per_token,
        experts_per_token=spec.experts_per_token,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        sliding_window=spec.sliding_window,
    )
    if not spec.mxfp4:
        del config["quantization_config"]
    return config


def random_weights(
    config: dict[str, Any],
    seed: int,
    *,
    mxfp4: bool = True,
    quantize: bool = True,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, Tensor]]:
    """Random gpt-oss weights for ``config``, one ``(name, tensor)`` at a time, Hub names/dtypes.

    Yields one tensor at a time, so a caller can write shards of a full-size model, or fill a
    model in place, without holding the model twice. Deterministic in ``(seed, name)`` for a
    given device type.

    Args:
        config: a gpt-oss ``config.json`` dict.
        seed: random seed.
        mxfp4: expert weights as ``*_blocks``/``*_scales`` (uint8); else bf16 ``gate_up_proj``
            ``[E, hidden, 2*inter]`` / ``down_proj [E, inter, hidden]``, as transformers holds them.
        quantize: MXFP4 experts quantized from normal weights (a float copy of one expert tensor
            exists while it is made: 8.5 GB for a 120b one); ``False`` draws the packed bytes and
            scales directly (:func:`random_packed_expert`: no float weight, a fraction of the
            time and memory), what building a full-size model in device memory needs. Only
            with ``mxfp4``.
        device: where to generate (tensors are yielded there).
    """
    if not (quantize or mxfp4):
        raise ValueError("quantize=False draws packed MXFP4 experts: it needs mxfp4=True")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_width = config["num_attention_heads"] * config["head_dim"]
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    n_exp, inter = config["num_local_experts"], config["intermediate_size"]

    def normal(name: str, *shape: int, std: float = _STD, mean: float = 0.0) -> Tensor:
        gen = torch.Generator(device).manual_seed(_tensor_seed(seed, name))
        # In place: one float32 temporary (2.3 GB for the embedding table), same values.
        values = torch.randn(*shape, generator=gen, device=device).mul_(std).add_(mean)
        return values.to(torch.bfloat16)

    yield "model.embed_tokens.weight", normal("model.embed_tokens.weight", vocab, hidden)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in (
            ("self_attn.q_proj.weight", (q_width, hidden)),
            ("self_attn.q_proj.bias", (q_width,)),
            ("self_attn.k_proj.weight", (kv_width, hidden)),
            ("self_attn.k_proj.bias", (kv_width,)),
            ("self_attn.v_proj.weight", (kv_width, hidden)),
            ("self_attn.v_proj.bias", (kv_width,)),
            ("self_attn.o_proj.weight", (hidden, q_width)),
            ("self_attn.o_proj.bias", (hidden,)),
            ("mlp.router.weight", (n_exp, hidden)),
            ("mlp.router.bias", (n_exp,)),
            ("mlp.experts.gate_up_proj_bias", (n_exp, 2 * inter)),
            ("mlp.experts.down_proj_bias", (n_exp, hidden)),
        ):
            yield p + name, normal(p + name, *shape)
        sinks = p + "self_attn.sinks"  # one logit per query head
        yield sinks, normal(sinks, config["num_attention_heads"], std=_SINK_STD)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            yield p + name, normal(p + name, hidden, std=_NORM_STD, mean=1.0)
        # Hub orientation [E, out, in]: gate_up maps hidden -> 2*inter, down maps inter -> hidden.
        for proj, out_dim, in_dim in (
            ("gate_up_proj", 2 * inter, hidden),
            ("down_proj", hidden, inter),
        ):
            name = p + "mlp.experts." + proj
            make = _random_expert_weight if quantize else random_packed_expert
            blocks, scales = make(name, seed, (n_exp, out_dim, in_dim), device)
            if mxfp4:
                yield name + "_blocks", blocks
                yield name + "_scales", scales
            else:
                yield name, dequantize_mxfp4_experts(blocks, scales, torch.bfloat16)
    yield "model.norm.weight", normal("model.norm.weight", hidden, std=_NORM_STD, mean=1.0)
    yield "lm_head.weight", normal("lm_head.weight", vocab, hidden)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def _random_expert_weight(
    name: str, seed: int, shape: tuple[int, int, int], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Normal(0, 0.02) expert weights ``[E, out, in]`` times a random power-of-two-ish gain per
    32-value block, quantized: the Hub's ``(blocks, scales)``."""
    gen = torch.Generator(device).manual_seed(_tensor_seed(seed, name))
    w = torch.randn(*shape, generator=gen, device=device) * _STD
    gain_shape = (*shape[:-1], shape[-1] // BLOCK_SIZE, 1)
    log2_gain = torch.randn(*gain_shape, generator=gen, device=device) * _EXPERT_BLOCK_LOG2_GAIN_STD
    w = (w.view(gain_shape[:-1] + (BLOCK_SIZE,)) * torch.exp2(log2_gain)).view(shape)
    return quantize_mxfp4(w)


def random_packed_expert(
    name: str, seed: int, shape: tuple[int, int, int], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """MXFP4 ``(blocks, scales)`` for an expert weight ``[E, out, in]`` drawn packed.

    Every byte uniform (each e2m1 code equally likely: values of RMS 2.9 times the block scale)
    and the block exponents those of :func:`_random_expert_weight`: what ``quantize_mxfp4``
    gives 32 draws of N(0, 0.02), ``2^(floor(log2(max|w|)) - 2)`` with ``max|w|`` near 2.1
    sigma, i.e. ``2^-7``, times the same random power-of-two gain per block. The weights then
    have the magnitude of the quantized ones (RMS about 0.02 before the gain), without a float
    copy of the tensor ever existing.
    """
    gen = torch.Generator(device).manual_seed(_tensor_seed(seed, name))
    n_exp, out_dim, in_dim = shape
    groups = in_dim // BLOCK_SIZE
    blocks = torch.randint(
        0,
        256,
        (n_exp, out_dim, groups, BLOCK_SIZE // 2),
        generator=gen,
        device=device,
        dtype=torch.uint8,
    )
    log2_gain = torch.randn(n_exp, out_dim, groups, generator=gen, device=device)
    exponent = log2_gain.mul_(_EXPERT_BLOCK_LOG2_GAIN_STD).round_().add_(_PACKED_SCALE_EXPONENT)
    return blocks, exponent.clamp_(0, 254).to(torch.uint8)


def make_tiny(out: Path, spec: TinySpec) -> Path:
    """Write a tiny gpt-oss checkpoint for ``spec`` into folder ``out`` (created if missing).

    Writes ``model.safetensors`` and, through :func:`write_model_files`, ``config.json``,
    ``generation_config.json`` and the tokenizer.

    Returns:
        ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(spec)
    weights = random_weights(config, spec.seed, mxfp4=spec.mxfp4)
    tensors = {name: t.contiguous() for name, t in weights}
    # transformers writes this metadata; its loader warns about files without it.
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_model_files(out, config)
    return out


def write_model_files(out: Path, config: dict[str, Any]) -> None:
    """Write a checkpoint folder's files other than weights, as the Hub's gpt-oss has them.

    ``config.json`` (``config``), ``generation_config.json`` (the real one) and the tokenizer
    files of :func:`mxlora.model.tokenizer.ensure_tokenizer` (the real o200k_harmony one).
    """
    from mxlora.model.tokenizer import ensure_tokenizer

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", GPT_OSS_GENERATION_CONFIG)
    for path in sorted(ensure_tokenizer().iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, out / path.name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # As transformers writes config files: sorted keys, 2-space indent, trailing newline.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def ensure_tiny(**spec_overrides: Any) -> Path:
    """The tiny checkpoint for ``TinySpec(**spec_overrides)`` in the cache, built once.

    Lives under ``cache_dir("tiny", spec.cache_key())``. Safe when processes race: each builds
    in its own temp folder beside it and renames it into place; a loser uses the winner's.
    """
    spec = TinySpec(**spec_overrides)
    final = cache_dir("tiny", spec.cache_key())
    if (final / "config.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        make_tiny(tmp, spec)
        # rename() replaces the empty folder cache_dir left; it fails if another process already
        # put a complete one there, which we then use.
        with contextlib.suppress(OSError):
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora make-tiny``: write a tiny checkpoint to ``args.out``."""
    fields = {f.name for f in dataclasses.fields(TinySpec)}
    try:
        spec = TinySpec(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as e:
        print(f"mxlora make-tiny: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        with StagedFolder(out, args.overwrite) as staged:
            make_tiny(staged.path, spec)
    except DestinationExists as e:
        print(f"mxlora make-tiny: error: {e}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size
    kind = "MXFP4" if spec.mxfp4 else "bf16"
    print(f"wrote {out}: {spec.layers} layers, {kind} experts, model.safetensors {size:,} bytes")
    return 0
