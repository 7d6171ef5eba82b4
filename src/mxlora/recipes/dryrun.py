"""``mxlora train CONFIG ... --dry-run``: what a run would do, without training or writing.

Prints the resolved config (every field, after overrides), the data summary (rows kept and
dropped by reason, token statistics: the data is read and rendered exactly as a run does), the
parameter counts of the model with its LoRA adapter, and an estimate of the training memory.
The model is built on the meta device from its ``config.json``: no weight is read or allocated,
so a dry run of gpt-oss-120b takes seconds on any machine. Nothing is written.

The memory estimate comes from sizes alone, for the device a run would use:

* weights: every non-expert tensor in the run's dtype; the experts as held (``mxfp4``: 4.25 bits
  a weight, 16 bytes of FP4 values plus one e8m0 scale per 32; ``dequantize-bf16``: the dtype);
* adapter: LoRA weights and their gradients in the dtype, AdamW's two float32 moments;
* activations, per engine, with ``train.gradient_checkpointing`` resolved by the same decision
  the run takes (:mod:`mxlora.engine.memory`; ``auto`` plans against ``memory_budget_gb``, or
  the device's memory, after these weights):

  - ``mxlora``: the longest micro-batch once packed (the run's own plan of rows), each decoder
    block's saved tensors (checkpointed blocks: their input) plus the loss chunk
    (:func:`mxlora.engine.memory.peak_bytes`), compiled or eager as ``train.compile`` resolves;
  - ``trl``: ``batch_size`` rows padded to the longest kept row, the full logits in the compute
    dtype and, checkpointed (all blocks or none), one hidden state per layer; attention scores,
    the recomputed layer, the loss's float32 temporaries and allocator slack come on top. For
    gpt-oss-20b at 4 x 2048 in bf16 this gives 46.4 GB (seed, dequantized experts) and 18.4 GB
    (MXFP4 experts) against 52.4 GB (eager attention) and 18.2 GB (flex_attention) measured
    allocated on the H100 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mxlora.config import Engine, TrainingConfig, dump_config
from mxlora.data import prepare_data
from mxlora.distributed import rank_shares
from mxlora.engine.memory import (
    HEADROOM,
    NO_KERNELS,
    EagerKernels,
    all_blocks,
    block_costs,
    decoder_layers,
    memory_budget,
    peak_bytes,
    step_extras,
)
from mxlora.engine.packing import longest_packed, plan_steps
from mxlora.model.load import (
    checkpoint_config,
    default_device,
    load_tokenizer,
    parse_random,
    read_config,
    resolve_dtype,
    resolve_experts,
    resolve_model_path,
)
from mxlora.model.lora import apply_lora, count_parameters
from mxlora.mxfp4.kernels import TRITON, resolve_backend

GB = 1e9
# MXFP4: 32 FP4 values in 16 bytes plus one e8m0 scale byte.
MXFP4_BYTES_PER_WEIGHT = 17 / 32
# Expert weight tensors (3-D, [experts, ...]); their biases stay in the compute dtype.
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def meta_model(name_or_path: str) -> torch.nn.Module:
    """The checkpoint's architecture on the meta device (shapes only, nothing allocated).

    Raises:
        ModelLoadError: unreadable or non-gpt-oss checkpoint.
    """
    from transformers import AutoModelForCausalLM, GptOssConfig

    raw = checkpoint_config(name_or_path)
    raw.pop("quantization_config", None)  # shapes of the dequantized model; nothing to load
    config = GptOssConfig.from_dict(raw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _is_expert_weight(name: str) -> bool:
    # PEFT renames adapted ones (``mlp.experts.base_layer.base_layer.gate_up_proj``).
    return ".mlp.experts." in name and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS


def weights_and_adapter(
    model: torch.nn.Module, experts: str, dtype: torch.dtype
) -> tuple[float, float, float]:
    """Bytes of the frozen weights, of the LoRA tensors (weights, gradients, AdamW moments) and
    of the LoRA weights alone (held before the first step), from sizes (module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = adapter = lora = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:  # LoRA: weight + gradient in dtype, AdamW's exp_avg and exp_avg_sq
            adapter += p.numel() * (2 * size + 8)
            lora += p.numel() * size
        elif _is_expert_weight(name) and experts == "mxfp4":
            weights += p.numel() * MXFP4_BYTES_PER_WEIGHT
        else:
            weights += p.numel() * size
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return weights, adapter, lora


def estimate_memory(
    model: torch.nn.Module,
    experts: str,
    dtype: torch.dtype,
    tokens: int,
    engine: Engine = "trl",
    checkpointed: int = 0,
    compiled: bool = False,
    kernels: EagerKernels = NO_KERNELS,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Training memory in GB (10^9 bytes) from sizes alone (module docstring).

    Args:
        model: the LoRA-wrapped model (meta device is fine).
        experts: resolved expert holding, ``mxfp4`` or ``dequantize-bf16``.
        dtype: the run's compute dtype.
        tokens: tokens of the largest micro-batch: packed (``mxlora``) or batch size x longest
            row (``trl``).
        engine: ``train.engine``.
        checkpointed: decoder blocks checkpointed (``trl``: all or none).
        compiled: the blocks run compiled (``mxlora``).
        kernels: the CUDA kernels eager blocks run (:func:`mxlora.engine.loop.eager_kernels`).
        device: the training device (``None``: the CPU); its kernels set what the loss and the
            experts' dense path hold (:func:`mxlora.engine.memory.step_extras`).

    Returns:
        ``{"weights_gb", "adapter_gb", "activations_gb", "total_gb"}``.
    """
    weights, adapter, _ = weights_and_adapter(model, experts, dtype)
    c = model.config
    if engine == "mxlora":
        costs = block_costs(model, experts, dtype, compiled, kernels)
        extras = step_extras(model, experts, tokens, dtype, device or torch.device("cpu"))
        activations = peak_bytes(costs, checkpointed, tokens, *extras)
    else:
        size = torch.empty((), dtype=dtype).element_size()
        logits = tokens * c.vocab_size * size
        hidden = c.num_hidden_layers * tokens * c.hidden_size * size
        activations = logits + (hidden if checkpointed else 0)
    return {
        "weights_gb": weights / GB,
        "adapter_gb": adapter / GB,
        "activations_gb": activations / GB,
        "total_gb": (weights + adapter + activations) / GB,
    }


def largest_micro_batch(cfg: TrainingConfig, lengths: list[int], processes: int = 1) -> int:
    """Tokens of the run's largest micro-batch in one process: packed by its own plan of rows
    (``mxlora``; with several ``processes`` each packs its share), or ``batch_size`` rows padded
    to the longest kept row (``trl``)."""
    t = cfg.train
    if t.engine == "mxlora":
        plan = plan_steps(len(lengths), t.batch_size, t.grad_accum, t.epochs, t.max_steps, t.seed)
        return longest_packed(lengths, plan, lambda rows: rank_shares(rows, processes))
    return t.batch_size * max(lengths)


def training_experts(
    cfg: TrainingConfig, device: torch.device, lengths: Callable[[], list[int]]
) -> tuple[str, str]:
    """How a training run on ``device`` holds its experts (``model.experts`` resolved), and why.

    Explicit modes stay. ``auto`` holds MXFP4 experts as ``mxfp4`` where the Triton kernel runs.
    Elsewhere (the ``torch`` backend: CPU, ROCm such as Strix Halo, CUDA before 8.0) the
    ``mxfp4`` path dequantizes each projection every time it is used, on top of the matmul the
    seed mode runs on its ready weights, so it is slower at every size; there ``auto`` takes
    ``dequantize-bf16`` when the run fits the memory budget (``train.memory_budget_gb``, else
    the device's memory) that way with as few activations as it can keep (every block
    checkpointed unless ``gradient_checkpointing`` is false; no fused kernels), by the dry
    run's estimate within :data:`~mxlora.engine.memory.HEADROOM`, and keeps ``mxfp4`` when it
    does not fit or there is no budget to read (the CPU without ``train.memory_budget_gb``). The
    estimate is one process's whole model: under FSDP2 the shards would need less.

    Args:
        cfg: the run's config.
        device: the training device.
        lengths: each kept train row's token count, asked for only where the decision needs
            the data (no Triton kernel, a budget to read): the bench would otherwise prepare
            every workload's rows twice on every GPU.

    Raises:
        ModelLoadError, ConfigError: bad model path or LoRA targets.
    """
    if parse_random(cfg.model.name_or_path) is not None:
        # Generated in MXFP4 only: auto holds it so; another mode fails to load, saying why.
        mode = "mxfp4" if cfg.model.experts == "auto" else cfg.model.experts
        return mode, f"model.experts: {cfg.model.experts} (a random: model is MXFP4)"
    config = read_config(resolve_model_path(cfg.model.name_or_path))
    experts = resolve_experts(cfg.model.experts, config)
    if cfg.model.experts != "auto" or experts != "mxfp4":
        return experts, f"model.experts: {cfg.model.experts}"
    if resolve_backend(device) == TRITON:
        return experts, "model.experts: auto (MXFP4 experts, the Triton kernel runs here)"
    budget = memory_budget(device, cfg.train.memory_budget_gb)
    if budget is None:
        return experts, "model.experts: auto (MXFP4 experts; no memory budget to plan with)"
    model = apply_lora(meta_model(cfg.model.name_or_path), cfg.lora)
    blocks = len(decoder_layers(model))
    checkpointed = 0 if cfg.train.gradient_checkpointing is False else blocks
    need = estimate_memory(
        model,
        "dequantize-bf16",
        resolve_dtype(cfg.model.dtype, device),
        largest_micro_batch(cfg, lengths()),
        cfg.train.engine,
        checkpointed,
        device=device,
    )["total_gb"]
    usable = HEADROOM * budget
    if need <= usable:
        return "dequantize-bf16", (
            f"model.experts: auto -> dequantize-bf16 (no Triton MXFP4 kernel on {device.type}, "
            f"where dequantized experts train faster; they fit: about {need:.3g} GB of the "
            f"{usable:.3g} GB usable of a {budget:.3g} GB budget)"
        )
    return "mxfp4", (
        f"model.experts: auto -> mxfp4 (no Triton MXFP4 kernel on {device.type}, but dequantized "
        f"experts would need about {need:.3g} GB, more than the {usable:.3g} GB usable of a "
        f"{budget:.3g} GB budget)"
    )


def dry_run(
    cfg: TrainingConfig, device: torch.device | None = None, processes: int = 1
) -> dict[str, Any]:
    """Everything a run would start from, computed without training or writing anything.

    ``processes``: how many processes the run would train in (``--nproc``).

    Returns:
        ``{"config", "device", "dtype", "experts", "experts_reason", "data", "parameters",
        "memory", "step"}``; ``step`` (the mxlora engine's decisions: ``compiled``,
        ``cuda_graphs``, ``attention``) is ``None`` for the TRL engine.

    Raises:
        ModelLoadError, ConfigError: bad model path or LoRA targets.
        ValueError: bad data (naming the field or row).
    """
    device = device or default_device()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.train.max_len)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    experts, why = training_experts(cfg, device, lambda: lengths)
    model = meta_model(cfg.model.name_or_path)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = apply_lora(model, cfg.lora)
    trainable, total = count_parameters(model)
    t = cfg.train
    weights, _, lora = weights_and_adapter(model, experts, dtype)
    held_gb = (weights + lora) / GB  # what the run holds when it decides
    blocks = len(decoder_layers(model))
    compiled = False
    kernels = NO_KERNELS
    tokens = largest_micro_batch(cfg, lengths, processes)
    step = None
    if t.engine == "mxlora":
        from mxlora.engine.loop import plan_step

        setup = plan_step(cfg, model, experts, tokens, dtype, device, t.fsdp, held_gb)
        checkpointed, compiled, kernels = setup.checkpointed, setup.compiled, setup.kernels
        step = {
            "compiled": compiled,
            "cuda_graphs": setup.cuda_graphs,
            "attention": setup.attention,
        }
    else:
        on = all_blocks(
            t.gradient_checkpointing,
            model,
            experts,
            tokens,
            dtype,
            device,
            t.memory_budget_gb,
            held_gb,
        )
        checkpointed = blocks if on else 0
    memory = estimate_memory(
        model, experts, dtype, tokens, t.engine, checkpointed, compiled, kernels, device
    )
    memory["tokens"] = tokens
    memory["checkpointed_blocks"] = f"{checkpointed} of {blocks}"
    return {
        "config": dump_config(cfg),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "experts": experts,
        "experts_reason": why,
        "data": data.report,
        "parameters": {"trainable": trainable, "total": total},
        "memory": memory,
        "step": step,
    }


def format_dry_run(result: dict[str, Any]) -> str:
    """The dry run for the console."""
    data = result["data"]
    lines = ["resolved config:", result["config"].rstrip(), "", "data:"]
    lines.append(
        f"  source {data['source']} ({data['adapter']}): {data['rows_read']} rows read, "
        f"{data['rows_selected']} selected, {data['kept']} kept"
    )
    dropped = sum(entry["count"] for entry in data["dropped"].values())
    lines.append(f"  dropped {dropped}: {_drops(data['dropped'])}")
    for name, split in data["splits"].items():
        total = split["total_tokens"]
        lines.append(
            f"  {name}: {split['kept']} rows, {split['tokens']} tokens ({split['loss_tokens']} under "
            f"loss), length p50 {total['p50']} p95 {total['p95']} max {total['max']}"
        )
    p, m = result["parameters"], result["memory"]
    lines += [
        "",
        f"model: experts {result['experts']}, dtype {result['dtype']} on {result['device']}",
        f"  {result['experts_reason']}",
        f"  parameters: {p['trainable']:,} trainable of {p['total']:,} "
        f"({100 * p['trainable'] / p['total']:.4f} %)",
        f"  memory estimate: {m['total_gb']:.2f} GB = weights {m['weights_gb']:.2f} + "
        f"adapter and AdamW {m['adapter_gb']:.2f} + activations {m['activations_gb']:.2f} "
        f"({m['tokens']} tokens a micro-batch, checkpointed blocks {m['checkpointed_blocks']})",
    ]
    if result["step"] is not None:
        s = result["step"]
        lines.append(
            f"  step: {'compiled' if s['compiled'] else 'eager'} blocks, {s['attention']} "
            f"attention, CUDA graphs {'on' if s['cuda_graphs'] else 'off'}"
        )
    lines += ["", "dry run: nothing trained, nothing written"]
    return "\n".join(lines)


def _drops(dropped: dict[str, Any]) -> str:
    """``too_long 3 (rows 4, 9, 12)`` per reason, from the report's ``dropped`` block."""
    parts = [
        f"{reason} {entry['count']} (rows {', '.join(map(str, entry['rows'][:10]))})"
        for reason, entry in dropped.items()
    ]
    return ", ".join(parts) or "none"
