"""Load a gpt-oss checkpoint with the experts kept in MXFP4 (``experts: mxfp4``), and adapters.

:func:`load_mxfp4_model` builds the transformers model on the meta device (no memory), swaps
every ``GptOssExperts`` for an empty :class:`~mxlora.mxfp4.experts.Mxfp4Experts`, and then puts
each checkpoint tensor, read one at a time with ``safe_open``, into the model tensor of the same
name: with the experts swapped, the model's state-dict names *are* the Hub's
(``...mlp.experts.gate_up_proj_blocks``), so the packed uint8 blocks and e8m0 scales go in as they
are and everything else is cast to the model dtype. No floating-point copy of an expert weight
ever exists, on the host or on the device; the host holds at most one checkpoint tensor beyond
the model.

:func:`load_mxfp4_adapter` loads a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it on the dequantized model
or here) into such a model.

:func:`random_mxfp4_model` builds the same model with random weights drawn on the device, tensor
by tensor, in place of a checkpoint (``model.name_or_path: random:120b``): a full-size model for
measurements without the disk or host memory to hold its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssRotaryEmbedding

from mxlora.mxfp4.experts import Mxfp4Experts, get_mxfp4_peft_model
from mxlora.mxfp4.kernels import TRITON, resolve_backend

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a Hub snapshot needs for load_mxfp4_model and `mxlora export` (the tokenizer and chat
# template travel with an export): gpt-oss repos also hold original/ and metal/ copies of the
# weights, which these patterns (matched from the repo root) leave out.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model*.safetensors*",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
]


def load_mxfp4_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """A gpt-oss model whose experts stay MXFP4, everything else in ``dtype``.

    The checkpoint streams to ``device`` one tensor at a time (each shard memory-mapped while it
    is read): the host never holds the model, whatever its size.

    Args:
        name_or_path: a checkpoint folder in the Hub layout (``config.json``, ``model.safetensors``
            or sharded with ``model.safetensors.index.json``), or a Hub id (see
            :func:`local_checkpoint`).
        dtype: dtype of every non-expert weight and of the expert biases; the experts compute
            in it.
        device: where the model goes.
        attn_implementation: transformers' attention backend.

    Returns:
        The ``GptOssForCausalLM`` in eval mode (as ``from_pretrained`` returns it), no gradients.

    Raises:
        ValueError: not a gpt-oss checkpoint with MXFP4 experts, or tensors missing/unexpected/
            misshapen.
    """
    path = local_checkpoint(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "gpt_oss" or not is_mxfp4(config):
        raise ValueError(f"{path}: not a gpt-oss checkpoint with MXFP4 experts")
    model = mxfp4_model_from_tensors(
        config,
        _checkpoint_tensors(path),
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        where=str(path),
    )
    # As from_pretrained: the name given (a Hub id stays a Hub id in adapter configs).
    model.name_or_path = model.config.name_or_path = str(name_or_path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def random_mxfp4_model(
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attn_implementation: str = "eager",
    name: str = "random",
) -> PreTrainedModel:
    """A gpt-oss model with random weights made in place on ``device``, experts in MXFP4.

    What :func:`load_mxfp4_model` builds from a checkpoint of ``config``'s shape, with the
    tensors drawn on ``device`` one at a time instead of read (the generators of ``make-tiny``
    and ``make-random``, :func:`mxlora.model.tiny.random_weights`, with the experts drawn as
    packed bytes and plausible e8m0 scales, :func:`mxlora.model.tiny.random_packed_expert`).
    Nothing of
    the model passes through host memory and nothing is written to disk: a full-size gpt-oss-120b
    (~61 GB) exists only on the device. Speed and memory of training do not depend on the values.

    Args:
        config: a gpt-oss ``config.json`` dict with an MXFP4 ``quantization_config``.
        seed: random seed (values depend on it, the tensor name and the device type).
        dtype: dtype of everything but the packed experts.
        device: where the model is made.
        attn_implementation: transformers' attention backend.
        name: the model's ``name_or_path`` (what adapter configs record as the base).

    Returns:
        The ``GptOssForCausalLM`` in eval mode, no gradients.
    """
    from transformers import GptOssConfig

    from mxlora.model.configs import GPT_OSS_GENERATION_CONFIG
    from mxlora.model.tiny import random_weights

    hf_config = GptOssConfig.from_dict(config)
    if not is_mxfp4(hf_config):
        raise ValueError(f"{name}: the config has no MXFP4 quantization_config")
    tensors = random_weights(config, seed, mxfp4=True, quantize=False, device=device)
    model = mxfp4_model_from_tensors(
        hf_config,
        tensors,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        where=name,
    )
    model.name_or_path = model.config.name_or_path = name
    model.generation_config = GenerationConfig.from_dict(GPT_OSS_GENERATION_CONFIG)
    return model


def mxfp4_model_from_tensors(
    config: PretrainedConfig,
    tensors: Iterable[tuple[str, Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_implementation: str,
    where: str,
) -> PreTrainedModel:
    """Build the model on the meta device and move each ``(name, tensor)`` into it, in turn.

    ``tensors`` are the checkpoint's, with the Hub's names; packed ones keep their dtype, float
    ones are cast to ``dtype``. Each goes to ``device`` as it comes, so memory outside the model
    is one tensor (plus what ``tensors`` itself holds, e.g. a mapped shard).

    Raises:
        ValueError: a tensor unexpected, misshapen or missing, naming ``where``.
    """
    device = torch.device(device)
    backend = resolve_backend(device)
    if backend == TRITON and device.type == "cuda":
        from mxlora.mxfp4 import triton_kernels

        # The kernels compile while the weights load (instead of on the first step).
        triton_kernels.precompile(config, dtype, device)
    model = mxfp4_skeleton(config, dtype, attn_implementation, backend)
    expected = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    for name, tensor in tensors:
        target = expected.get(name)
        if target is None:
            raise ValueError(f"{where}: unexpected tensor {name}")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        del tensor  # a host copy goes now, not when the next one has been read
        _set_tensor(model, name, value)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{where}: tensors missing from the checkpoint: {missing[:8]}")

    # Non-persistent buffers (the rotary frequencies) are computed, not stored: build them now.
    for name, module in list(model.named_modules()):
        if isinstance(module, GptOssRotaryEmbedding):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, type(module)(model.config).to(device))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"{where}: tensors left unset: {on_meta[:8]}")
    model.requires_grad_(False)
    return model.eval()


def mxfp4_skeleton(
    config: PretrainedConfig,
    dtype: torch.dtype,
    attn_implementation: str = "eager",
    backend: str | None = None,
) -> PreTrainedModel:
    """The gpt-oss model of ``config`` on the meta device, experts as empty :class:`Mxfp4Experts`.

    Costs no memory: every tensor is on the meta device, with the checkpoint's names, shapes and
    dtypes (uint8 blocks/scales, ``dtype`` elsewhere). :func:`load_mxfp4_model` fills it; an
    adapter can be attached to it to learn its layout without loading any weight. ``backend``
    is the experts' matmul backend (default: what the CPU gets).
    """
    backend = backend or resolve_backend(torch.device("cpu"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    for name, module in list(model.named_modules()):
        if isinstance(module, GptOssExperts):
            parent_name, _, child = name.rpartition(".")
            experts = _empty_mxfp4_experts(module, dtype, backend)
            setattr(model.get_submodule(parent_name), child, experts)
    return model


def local_checkpoint(name_or_path: str | Path) -> Path:
    """The folder of a checkpoint: ``name_or_path`` itself, or a Hub id's snapshot.

    A Hub id resolves through ``huggingface_hub`` (only from the local cache when
    ``HF_HUB_OFFLINE=1``), fetching just the config and the model's own safetensors, not
    ``original/`` or ``metal/``.

    Raises:
        ValueError: not a folder, and not a Hub id available here.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except (OSError, HFValidationError) as e:
        raise ValueError(
            f"{name_or_path}: no such folder, and not a Hub checkpoint available here "
            f"(offline: it must be in the Hugging Face cache): {type(e).__name__}"
        ) from None


def is_mxfp4(config: PretrainedConfig) -> bool:
    """Whether a checkpoint's config declares MXFP4 experts (``quantization_config``).

    Read from ``config.json`` the block is a dict; transformers may have turned it into an
    ``Mxfp4Config`` whose ``quant_method`` is an enum.
    """
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method
    return str(getattr(method, "value", method)) == "mxfp4"


def _empty_mxfp4_experts(experts: GptOssExperts, dtype: torch.dtype, backend: str) -> Mxfp4Experts:
    """A meta-device :class:`Mxfp4Experts` shaped like ``experts`` (filled by the loader), with
    the matmul backend of the device it is loaded onto."""
    n, hidden, inter = experts.num_experts, experts.hidden_size, experts.intermediate_size

    def packed(out: int, inp: int) -> tuple[Tensor, Tensor]:
        blocks = torch.empty(n, out, inp // 32, 16, dtype=torch.uint8, device="meta")
        return blocks, torch.empty(n, out, inp // 32, dtype=torch.uint8, device="meta")

    gate_up_blocks, gate_up_scales = packed(2 * inter, hidden)
    down_blocks, down_scales = packed(hidden, inter)
    return Mxfp4Experts(
        gate_up_blocks,
        gate_up_scales,
        torch.empty(n, 2 * inter, dtype=dtype, device="meta"),
        down_blocks,
        down_scales,
        torch.empty(n, hidden, dtype=dtype, device="meta"),
        alpha=experts.alpha,
        limit=experts.limit,
        backend=backend,
    )


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the checkpoint, one at a time (single file or sharded with an index)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    for shard in shards:
        with safe_open(path / shard, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_mxfp4_adapter(
    model: PreTrainedModel,
    adapter_dir: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a PEFT LoRA adapter into a model from :func:`load_mxfp4_model`.

    The MXFP4 counterpart of ``PeftModel.from_pretrained``: same files, same keys. Every adapter
    tensor must land in the model and every LoRA tensor of the model must be in the file.
    On a :func:`mxfp4_skeleton` (meta device) the LoRA tensors are loaded on the CPU (in the
    dtype PEFT gives them, float32) while the base weights stay on meta: the adapter's layout and
    values without any base weight in memory.

    Args:
        model: the MXFP4-expert model (or its meta skeleton).
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: PEFT adapter name.
        is_trainable: keep the LoRA weights trainable (else inference mode, as PEFT's default).

    Returns:
        The ``PeftModel``.
    """
    adapter_dir = Path(adapter_dir)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = not is_trainable
    peft_model = get_mxfp4_peft_model(model, config, adapter_name=adapter_name)
    device = next(model.parameters()).device
    if device.type == "meta":
        # LoRA tensors are small: they go to the CPU, the base weights stay on meta.
        device = torch.device("cpu")
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for attr in module.adapter_layer_names:
                    container = getattr(module, attr)
                    if isinstance(container, nn.ModuleDict) and adapter_name in container:
                        container[adapter_name].to_empty(device=device)
    state = load_file(adapter_dir / ADAPTER_WEIGHTS, device=str(device))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys:
        raise ValueError(
            f"{adapter_dir}: adapter does not fit the model: {len(result.unexpected_keys)} adapter "
            f"tensor(s) have no place in it (e.g. {result.unexpected_keys[0]})"
        )
    if missing:
        raise ValueError(
            f"{adapter_dir}: adapter does not fit the model: {len(missing)} LoRA tensor(s) of the "
            f"model are not in the adapter (e.g. {missing[0]})"
        )
    return peft_model
