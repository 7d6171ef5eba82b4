"""LoRA targets of a config as PEFT sees them, and attaching them to a loaded gpt-oss.

The seed's adapter is ``peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
target_parameters=["7.mlp.experts.gate_up_proj", "7.mlp.experts.down_proj", ...])``.
What ``"all-linear"`` selects on gpt-oss (PEFT 0.21, transformers 5): every ``nn.Linear`` except
the output layer, i.e. ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` of every decoder layer.
``lm_head`` is excluded by PEFT; the router (``GptOssTopKRouter``) holds a plain weight parameter
used through ``F.linear``, not an ``nn.Linear``, so it gets no LoRA; the experts are 3-D
parameters, reached only through ``target_parameters``.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch

from mxlora.config import ConfigError, ExpertTargets, LoraConfig

# PEFT's shorthand for "every linear layer but the output layer".
ALL_LINEAR = "all-linear"


def expert_target_parameters(targets: ExpertTargets) -> list[str]:
    """PEFT ``target_parameters`` names, e.g. ``["7.mlp.experts.gate_up_proj", ...]``."""
    return [
        f"{layer}.mlp.experts.{proj}" for layer in targets.layers for proj in targets.projections
    ]


def peft_config(cfg: LoraConfig) -> peft.LoraConfig:
    """The PEFT adapter config for our LoRA section."""
    # Our list ["all-linear"] is PEFT's shorthand string; [] means experts only.
    all_linear = cfg.target_modules == [ALL_LINEAR]
    modules = ALL_LINEAR if all_linear else (list(cfg.target_modules) or None)
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules,
        target_parameters=expert_target_parameters(cfg.experts) or None,
        rank_pattern=dict(cfg.rank_pattern),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model: torch.nn.Module, cfg: LoraConfig) -> None:
    """Refuse expert layers the model does not have (PEFT would silently skip or fail late).

    Raises:
        ConfigError: naming ``lora.experts.layers``.
    """
    n_layers = model.config.num_hidden_layers
    missing = [layer for layer in cfg.experts.layers if not 0 <= layer < n_layers]
    if missing:
        raise ConfigError(
            f"lora.experts.layers: layer(s) {missing} do not exist (the model has {n_layers} "
            f"layers, 0..{n_layers - 1}); pick layers it has, or a deeper model (the demo's "
            "tiny one is model.name_or_path=tiny:layers=24)"
        )


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> peft.PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the LoRA tensors are trainable.

    The LoRA initialisation draws from torch's global RNG: seed it first for reproducibility.
    """
    check_targets(model, cfg)
    # Imported here: the mxfp4 module pulls in PEFT internals only this mode needs.
    from mxlora.mxfp4.experts import Mxfp4Experts, get_mxfp4_peft_model

    if any(isinstance(m, Mxfp4Experts) for m in model.modules()):
        # experts: mxfp4. Same PEFT config, names, shapes and saved files as the seed path.
        return get_mxfp4_peft_model(model, peft_config(cfg))
    return peft.get_peft_model(model, peft_config(cfg))


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> peft.PeftModel:
    """Load a saved PEFT adapter onto ``model`` for inference, whichever way its experts are held.

    The counterpart of :func:`apply_lora`: MXFP4-expert models (``experts: mxfp4``) go through
    :func:`mxlora.mxfp4.load.load_mxfp4_adapter`, others through ``PeftModel.from_pretrained``;
    the adapter files are the same either way.
    """
    from mxlora.mxfp4.experts import Mxfp4Experts
    from mxlora.mxfp4.load import load_mxfp4_adapter

    if any(isinstance(m, Mxfp4Experts) for m in model.modules()):
        return load_mxfp4_adapter(model, adapter_dir)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, the same whichever way the experts are held.

    The packed MXFP4 experts (``experts: mxfp4``) count as the weights they hold: two a byte of
    their blocks, none for their scales (block metadata, which the dequantized model does not
    have). Other non-float tensors are not weights and do not count.
    """
    from mxlora.mxfp4.experts import PROJECTIONS, Mxfp4Experts

    # Weights per element of each packed tensor (by identity: under FSDP2 the bytes may be
    # held in a 1-byte float dtype, see mxlora.distributed.shard_model).
    per_element: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, Mxfp4Experts):
            for proj in PROJECTIONS:
                per_element[id(getattr(m, f"{proj}_blocks"))] = 2
                per_element[id(getattr(m, f"{proj}_scales"))] = 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(
        p.numel() * per_element.get(id(p), 1)
        for p in model.parameters()
        if id(p) in per_element or p.is_floating_point()
    )
    return trainable, total
