"""Load a gpt-oss checkpoint (Hub id, local folder or the locally built tiny one) for training.

``random:120b`` (``random:20b``, ``random:CONFIG.json``, ``,seed=N``) names no checkpoint: the
model is generated with random weights straight into device memory
(:func:`mxlora.mxfp4.load.random_mxfp4_model`), for measuring full-size models without their files.

The expert holding mode decides how the MXFP4 expert weights land in memory:

- ``dequantize-bf16``: the seed notebook's path, ``Mxfp4Config(dequantize=True)``: transformers
  expands every expert to the model dtype while loading (41.8 GB of experts for gpt-oss-20b).
- ``mxfp4``: the experts stay packed (:func:`mxlora.mxfp4.load.load_mxfp4_model`), 4.25 bits a
  weight; LoRA on them goes through :func:`mxlora.model.lora.apply_lora` as usual.

Everything that can go wrong with the path (missing folder, not cached offline, not a gpt-oss
checkpoint, broken files) raises :class:`ModelLoadError` with a one-line message, which the CLI
prints without a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from mxlora.config import ConfigError, DtypeName, ModelConfig, from_dict
from mxlora.model.random import RandomSpec, parse_random
from mxlora.mxfp4.load import is_mxfp4, load_mxfp4_model, random_mxfp4_model

log = logging.getLogger(__name__)


class _DropNotice(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# transformers' MXFP4 quantizer announces on every CPU load that it "will dequantize the model to
# bf16", also when the caller asked for exactly that (Mxfp4Config(dequantize=True), our
# `dequantize-bf16` mode and `mxlora merge`); MXFP4 kept packed goes through our own loader, never
# through that quantizer. So the notice never tells an mxlora user anything.
logging.getLogger("transformers.quantizers.quantizer_mxfp4").addFilter(
    _DropNotice("MXFP4 inference on CPU requires use_kernels")
)

# ``model.name_or_path`` values starting with this word name the locally built tiny gpt-oss.
TINY = "tiny"
# Layers of ``tiny`` when the spec does not say: the demo's model, deep enough for the seed's
# expert LoRA layers 7/15/23 (TinySpec's own default is the tests' smaller model).
TINY_LAYERS = 24


class ModelLoadError(RuntimeError):
    """The model path cannot be read or is not a gpt-oss checkpoint (one-line message)."""


def default_device() -> torch.device:
    """The device training runs on: the first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: DtypeName, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where the device computes in it natively (CUDA with bf16), else float32.

    On the CPU float32 is the default: bf16 there is emulated in part and slower for the tiny
    model, and float32 keeps the CPU tests' numerics tight.
    """
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_tiny(name_or_path: str) -> dict[str, Any] | None:
    """``tiny`` / ``tiny:layers=24,hidden=64`` -> the spec overrides; anything else -> None.

    Keys and value types are checked against :class:`mxlora.model.tiny.TinySpec`. Without
    ``layers`` the model has :data:`TINY_LAYERS` (the demo's), so ``tiny`` alone takes the
    seed's LoRA targets.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    head, sep, rest = name_or_path.partition(":")
    if head != TINY:
        return None
    from mxlora.model.tiny import TinySpec

    raw: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))) if sep else ():
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"model.name_or_path: expected tiny:key=value,..., got {item!r}")
        raw[key.strip()] = value.strip()
    raw.setdefault("layers", str(TINY_LAYERS))
    spec = from_dict(TinySpec, raw, where="model.name_or_path")
    return {key: getattr(spec, key) for key in raw}


def resolve_model_path(name_or_path: str) -> str:
    """The folder or Hub id to load: builds (or reuses from the cache) a tiny model if named."""
    tiny = parse_tiny(name_or_path)
    if tiny is None:
        return name_or_path
    from mxlora.model.tiny import ensure_tiny

    return str(ensure_tiny(**tiny))


def read_config(path: str):
    """The checkpoint's transformers config, or a one-line :class:`ModelLoadError`."""
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"model {path}: folder has no config.json (not a model checkpoint)")
    looks_local = local.is_absolute() or path.startswith(".") or path.count("/") != 1
    if looks_local and not local.exists():
        raise ModelLoadError(f"model {path}: no such folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"model {path}: cannot read its config ({_first_line(e)}). A Hub id must be in the local "
            "Hugging Face cache when offline (HF_HUB_OFFLINE=1)."
        ) from None
    if config.model_type != "gpt_oss":
        raise ModelLoadError(
            f"model {path}: is a {config.model_type!r} model; mxlora trains gpt-oss "
            "(model_type 'gpt_oss')"
        )
    return config


def load_model(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> tuple[torch.nn.Module, Any]:
    """Load the model and its tokenizer as ``cfg`` says.

    Args:
        cfg: the model section of the config.
        device: where the weights go (default: :func:`default_device`).

    Returns:
        ``(model, tokenizer)``; see :func:`load_weights` and :func:`load_tokenizer`.

    Raises:
        ModelLoadError: unreadable, missing or non-gpt-oss checkpoint.
        ConfigError: a malformed ``tiny:...`` spec.
    """
    return load_weights(cfg, device), load_tokenizer(cfg)


def load_weights(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """Load the model alone (experts held as ``cfg.experts`` says), in eval mode.

    Raises:
        ModelLoadError: unreadable, missing or non-gpt-oss checkpoint.
        ConfigError: a malformed ``tiny:...`` spec.
    """
    device = torch.device(device) if device is not None else default_device()
    random = parse_random(cfg.name_or_path)
    if random is not None:
        return _make_random(cfg, random, device)
    path = resolve_model_path(cfg.name_or_path)
    config = read_config(path)
    dtype = resolve_dtype(cfg.dtype, device)
    experts = resolve_experts(cfg.experts, config)
    if experts == "mxfp4":
        return _load_mxfp4(cfg, path, config, dtype, device)
    kwargs: dict[str, Any] = {
        "attn_implementation": cfg.attn_implementation,
        "dtype": dtype,
        "device_map": {"": device},
    }
    if cfg.experts_implementation is not None:
        kwargs["experts_implementation"] = cfg.experts_implementation
    if experts == "dequantize-bf16":
        if is_mxfp4(config):
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        else:
            log.info("model %s: experts are not MXFP4, loading them as stored", path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise ModelLoadError(f"model {path}: cannot load ({_first_line(e)})") from None


def resolve_experts(mode: str, config: Any) -> str:
    """``auto`` -> ``mxfp4`` for a checkpoint with MXFP4 experts, else ``dequantize-bf16``
    (which loads unquantized experts as stored); explicit modes pass through."""
    if mode != "auto":
        return mode
    return "mxfp4" if is_mxfp4(config) else "dequantize-bf16"


def held_experts(model: torch.nn.Module) -> str:
    """How a loaded model holds its experts, as ``model.experts`` would name it resolved:
    ``mxfp4`` (packed :class:`~mxlora.mxfp4.experts.Mxfp4Experts`) or ``dequantize-bf16``
    (plain float tensors, dequantized or stored so). Reports record this, never ``auto``."""
    from mxlora.mxfp4.experts import Mxfp4Experts

    return (
        "mxfp4" if any(isinstance(m, Mxfp4Experts) for m in model.modules()) else "dequantize-bf16"
    )


def _load_mxfp4(
    cfg: ModelConfig, path: str, config: Any, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """``experts: mxfp4``: our own loader; transformers' experts backend does not apply."""
    if not is_mxfp4(config):
        raise ModelLoadError(
            f"model {path}: experts: mxfp4 needs a checkpoint with MXFP4 experts; this one "
            "stores them unquantized (use experts: dequantize-bf16)"
        )
    if cfg.experts_implementation is not None:
        log.info("model.experts_implementation is ignored with experts: mxfp4")
    try:
        return load_mxfp4_model(
            path, dtype=dtype, device=device, attn_implementation=cfg.attn_implementation
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {path}: cannot load ({_first_line(e)})") from None


def _make_random(cfg: ModelConfig, spec: RandomSpec, device: torch.device) -> torch.nn.Module:
    """``random:...``: the model generated in place on ``device`` (MXFP4 experts only)."""
    if resolve_experts(cfg.experts, _config_object(spec.config)) != "mxfp4":
        raise ModelLoadError(
            f"model {cfg.name_or_path}: is generated with MXFP4 experts in memory; "
            f"experts: {cfg.experts} needs a checkpoint (write one with mxlora make-random)"
        )
    if cfg.experts_implementation is not None:
        log.info("model.experts_implementation is ignored with experts: mxfp4")
    return random_mxfp4_model(
        spec.config,
        seed=spec.seed,
        dtype=resolve_dtype(cfg.dtype, device),
        device=device,
        attn_implementation=cfg.attn_implementation,
        name=cfg.name_or_path,
    )


def _config_object(config: dict[str, Any]) -> Any:
    from transformers import GptOssConfig

    return GptOssConfig.from_dict(config)


def checkpoint_config(name_or_path: str) -> dict[str, Any]:
    """The ``config.json`` dict of a model spec (folder, Hub id in the cache, ``tiny:``,
    ``random:``).

    Raises:
        ModelLoadError: no readable gpt-oss config.
        ConfigError: a malformed ``tiny:``/``random:`` spec.
    """
    random = parse_random(name_or_path)
    if random is not None:
        return random.config
    return read_config(resolve_model_path(name_or_path)).to_dict()


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The checkpoint's own tokenizer (every gpt-oss folder, tiny ones included, carries it).

    Raises:
        ModelLoadError: the folder or Hub id has no readable tokenizer.
    """
    if parse_random(cfg.name_or_path) is not None:
        # Every gpt-oss uses the same tokenizer (o200k_harmony), the one checkpoints ship.
        from mxlora.model.tokenizer import ensure_tokenizer

        return AutoTokenizer.from_pretrained(ensure_tokenizer())
    path = resolve_model_path(cfg.name_or_path)
    read_config(path)  # the clear errors for a missing or non-gpt-oss path
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model {path}: cannot load its tokenizer ({_first_line(e)})"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
