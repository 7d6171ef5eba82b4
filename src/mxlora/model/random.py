"""Full-size gpt-oss checkpoints with random weights, in the exact Hub layout (``make-random``).

Speed and memory of training do not depend on weight values, so a checkpoint shaped exactly like
``openai/gpt-oss-20b`` (or ``-120b``) but filled with random weights measures what users of the
real one would see, without downloading it. The files are what the Hub serves:

- ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``). The Hub's gpt-oss-20b
  has three shards named ``model-00000-of-00002`` .. ``model-00002-of-00002``: the number after
  ``of`` is the last index, not the count, and we copy that quirk.
- MXFP4 experts (uint8 ``*_blocks`` / e8m0 ``*_scales``) quantized by :mod:`mxlora.mxfp4` from
  normal weights with a random gain per 32-value block, so scales vary as real ones do; every
  other tensor bf16 (the tensor names, shapes, dtypes and magnitudes of
  :func:`mxlora.model.tiny.random_weights`, which this module drives layer by layer).
- ``config.json``, ``generation_config.json`` and the real o200k_harmony tokenizer.

Weights are generated and quantized on ``device`` one layer at a time and written shard by shard,
so host memory stays near one shard (at most :data:`MAX_SHARD_BYTES`) whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mxlora.model.configs import gpt_oss_20b_config, gpt_oss_120b_config
from mxlora.model.tiny import random_weights, write_model_files
from mxlora.staging import DestinationExists, StagedFolder, check_destination

if TYPE_CHECKING:
    import peft

#: Largest shard written (bytes). 5 GB was transformers' ``max_shard_size`` default for years
#: and gives the Hub's three shards for gpt-oss-20b (13.8 GB).
MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"
#: Names ``make-random --config`` accepts besides a config.json path.
NAMED_CONFIGS = {"20b": gpt_oss_20b_config, "120b": gpt_oss_120b_config}


def shard_name(index: int, count: int) -> str:
    """Shard file name as the Hub's gpt-oss repos write it (``of`` the last index)."""
    return f"model-{index:05d}-of-{count - 1:05d}.safetensors"


def resolve_config(spec: str | Path) -> dict[str, Any]:
    """``20b`` / ``120b`` (the embedded configs) or the path of a gpt-oss ``config.json``.

    Raises:
        ValueError: the file is missing, unreadable or not a gpt-oss MXFP4 config.
    """
    if str(spec) in NAMED_CONFIGS:
        return NAMED_CONFIGS[str(spec)]()
    path = Path(spec)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--config {spec}: not 20b, 120b or a readable config.json ({e})"
        ) from None
    if config.get("model_type") != "gpt_oss":
        raise ValueError(
            f"--config {spec}: model_type is {config.get('model_type')!r}, not gpt_oss"
        )
    if (config.get("quantization_config") or {}).get("quant_method") != "mxfp4":
        raise ValueError(
            f"--config {spec}: has no mxfp4 quantization_config (experts would be bf16)"
        )
    return config


#: ``model.name_or_path`` values starting with this word name a model made in memory.
RANDOM = "random"


@dataclass(frozen=True)
class RandomSpec:
    """A ``random:CONFIG[,seed=N]`` model: random weights generated on the training device.

    Attributes:
        config: the gpt-oss ``config.json`` dict (see :func:`resolve_config`).
        seed: random seed of the weights.
    """

    config: dict[str, Any]
    seed: int = 0


def parse_random(name_or_path: str) -> RandomSpec | None:
    """``random:120b``, ``random:gpt-oss-20b,seed=3``, ``random:path/config.json`` -> the spec.

    CONFIG is what ``make-random --config`` takes (``20b``, ``120b``, a gpt-oss ``config.json``
    path), ``gpt-oss-`` prefix allowed. Anything not starting with ``random:`` -> None.

    Raises:
        ConfigError: naming ``model.name_or_path``: no config, an unknown key, a bad seed, or a
            config :func:`resolve_config` refuses.
    """
    from mxlora.config import ConfigError

    head, sep, rest = name_or_path.partition(":")
    if head != RANDOM or not sep:
        return None
    where = "model.name_or_path"
    name, *options = (part.strip() for part in rest.split(","))
    if not name:
        raise ConfigError(
            f"{where}: expected random:20b|120b|CONFIG.json[,seed=N], got {name_or_path!r}"
        )
    seed = 0
    for option in options:
        key, eq, value = option.partition("=")
        if key.strip() != "seed" or not eq or not value.strip().isdigit():
            raise ConfigError(
                f"{where}: {name_or_path!r}: expected seed=N after the config, got {option!r}"
            )
        seed = int(value)
    try:
        short = name.removeprefix("gpt-oss-")
        config = resolve_config(short if short in NAMED_CONFIGS else name)
    except ValueError as e:
        raise ConfigError(f"{where}: {name_or_path!r}: {e}") from None
    return RandomSpec(config, seed)


@dataclass
class RandomCheckpoint:
    """What :func:`make_random` wrote.

    Attributes:
        path: the checkpoint folder.
        shards: shard file names, in order.
        total_size: tensor bytes over all shards (the index's ``total_size``).
        seconds: wall time of generation and writing.
    """

    path: Path
    shards: list[str]
    total_size: int
    seconds: float


def make_random(
    out: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log: bool = False,
    overwrite: bool = False,
) -> RandomCheckpoint:
    """Write a random gpt-oss checkpoint for ``config`` into ``out`` (Hub layout, MXFP4 experts).

    The folder appears complete or not at all: everything is written into a staging folder
    beside ``out`` and renamed into place (:mod:`mxlora.staging`). An existing ``out`` is
    refused unless ``overwrite``; then it is replaced only once the new checkpoint is complete.

    Args:
        out: checkpoint folder to create.
        config: a gpt-oss ``config.json`` dict with an mxfp4 ``quantization_config``.
        seed: random seed; tensor values depend on (seed, tensor name) and the device type.
        device: where weights are generated and quantized (``cuda`` takes minutes for 20b).
        max_shard_bytes: shard size limit (a shard holds at least one tensor).
        log: print a line per shard written.
        overwrite: replace an existing ``out``.

    Returns:
        What was written.

    Raises:
        DestinationExists: ``out`` exists and ``overwrite`` is false.
    """
    start = time.perf_counter()
    out = Path(out)
    with StagedFolder(out, overwrite) as staged:
        tmp = staged.path
        shards, weight_map, total = _write_shards(tmp, config, seed, device, max_shard_bytes, log)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_model_files(tmp, config)
    return RandomCheckpoint(out, shards, total, time.perf_counter() - start)


def _write_shards(
    folder: Path,
    config: dict[str, Any],
    seed: int,
    device: torch.device | str,
    max_shard_bytes: int,
    log: bool,
) -> tuple[list[str], dict[str, str], int]:
    """Stream the weights into shards; returns shard names, the weight map and total bytes.

    The shard count is known only at the end, so shards are written under provisional names
    and renamed once all exist.
    """
    provisional: list[Path] = []
    owner: dict[str, int] = {}  # tensor name -> shard number
    pending: dict[str, Tensor] = {}
    pending_bytes = total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = folder / f".shard-{len(provisional):05d}.safetensors"
        # transformers writes this metadata; its loader warns about files without it.
        save_file(pending, path, metadata={"format": "pt"})
        if log:
            print(
                f"  shard {len(provisional)}: {len(pending)} tensors, {pending_bytes / 1e9:.2f} GB",
                flush=True,
            )
        provisional.append(path)
        pending, pending_bytes = {}, 0

    for name, tensor in random_weights(config, seed, mxfp4=True, device=device):
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.to("cpu").contiguous()
        owner[name] = len(provisional)
        pending_bytes += size
        total += size
    flush()

    names = [shard_name(i, len(provisional)) for i in range(len(provisional))]
    for path, name in zip(provisional, names, strict=True):
        path.rename(folder / name)
    return names, {tensor: names[i] for tensor, i in sorted(owner.items())}, total


def default_device() -> str:
    """``cuda`` when there is a GPU (minutes for 20b), else ``cpu`` (fine for small configs)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora make-random OUT --config 20b|120b|config.json [--device] [--seed]``."""
    try:
        config = resolve_config(args.config)
    except ValueError as e:
        print(f"mxlora make-random: error: {e}", file=sys.stderr)
        return 2
    try:
        check_destination(args.out, args.overwrite)  # before minutes of work, not after
    except DestinationExists as e:
        print(f"mxlora make-random: error: {e}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    print(f"generating {layers} layers x {experts} experts on {device} into {args.out}", flush=True)
    done = make_random(
        args.out, config, seed=args.seed, device=device, log=True, overwrite=args.overwrite
    )
    print(
        f"wrote {done.path}: {len(done.shards)} shards, {done.total_size / 1e9:.2f} GB of tensors "
        f"in {done.seconds:.0f} s",
        flush=True,
    )
    return 0


def make_random_adapter(
    base: str | Path,
    out: str | Path,
    lora: peft.LoraConfig,
    *,
    seed: int = 0,
    b_std: float = 0.01,
) -> Path:
    """Write a PEFT LoRA adapter for the MXFP4 checkpoint ``base`` with random factors.

    What a trained adapter is, without training: the adapter files PEFT writes for ``lora`` on
    this model (names, shapes, ``adapter_config.json``), built on the meta skeleton, so no weight
    of ``base`` is read (instant for 120b too). ``lora_A ~ N(0, 1/in)``, ``lora_B ~ N(0, b_std)``
    in float32; ``b_std=0`` gives the zero update of a fresh PEFT adapter.

    Args:
        base: checkpoint folder (its ``config.json`` is read).
        out: adapter folder to write (created).
        lora: the PEFT config, e.g. :func:`mxlora.model.lora.peft_config` of a run config.
        seed: random seed of the factors.
        b_std: standard deviation of ``lora_B``.

    Returns:
        ``out``.
    """
    from peft import get_peft_model_state_dict
    from transformers import AutoConfig

    from mxlora.mxfp4.experts import get_mxfp4_peft_model
    from mxlora.mxfp4.load import ADAPTER_WEIGHTS, mxfp4_skeleton

    out = Path(out)
    config = AutoConfig.from_pretrained(base)
    peft_model = get_mxfp4_peft_model(mxfp4_skeleton(config, torch.bfloat16), lora)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in sorted(get_peft_model_state_dict(peft_model).items()):
        std = b_std if ".lora_B." in name else meta.shape[-1] ** -0.5
        tensors[name] = torch.randn(meta.shape, generator=gen) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    saved = peft_model.peft_config["default"]
    saved.base_model_name_or_path = str(base)
    saved.save_pretrained(str(out))
    return out
