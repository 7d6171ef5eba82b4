"""``mxlora export``: fold a LoRA adapter into a gpt-oss checkpoint and keep it MXFP4, Hub layout.

``mxlora merge`` writes a plain bf16 model (42 GB for gpt-oss-20b); this writes what the Hub
serves (13.8 GB): the base's shards with the same names, tensor names, dtypes, shapes and
``model.safetensors.index.json``, ``config.json`` unchanged (its mxfp4 ``quantization_config``
included), and the base's other top-level files (tokenizer, chat template, generation config).

How, tensor by tensor:

- Every tensor the adapter does not touch keeps its exact bytes: each shard file is copied as is,
  and only the byte ranges of adapted tensors are rewritten in place. The header stays valid
  because an adapted tensor keeps its dtype and shape. A weight whose update is exactly zero (a
  fresh PEFT adapter, whose ``lora_B`` is zero) is left alone too.
- Attention (and any other float ``nn.Linear``) LoRA merges as PEFT's ``merge_and_unload`` does:
  ``ΔW = scaling · B @ A`` by PEFT's own ``get_delta_weight`` (float32, the dtype PEFT autocasts
  adapter weights to), then ``W += ΔW`` in the weight's dtype, the float32 sum rounded once. A
  bf16 export's attention weights are therefore bit for bit those of a bf16 ``mxlora merge`` on
  the CPU (ΔW is computed on the CPU here; a GPU matmul may round it differently).
- Adapted expert weights (``target_parameters``), one expert at a time: dequantize the Hub's
  ``[out, in]`` MXFP4 weight to float32 (exact), add ``ΔW_eᵀ`` (PEFT's ``ParamWrapper`` delta
  ``scaling · A_e @ B_e`` is ``[in, out]``, ``GptOssExperts``' orientation), and re-quantize with
  :func:`mxlora.mxfp4.quantize_mxfp4` (OCP MX v1.0). Blocks where ``ΔW`` is zero keep their
  bytes (re-quantizing them would give the same values; values on the grid round-trip exactly).

The scale choice. Each 32-value block gets the OCP MX v1.0 scale ``2**(floor(log2(amax)) - 2)``
(2 is e2m1's largest exponent; :func:`~mxlora.mxfp4.quantize_mxfp4`, the quantizer the tiny and
random checkpoints are made with), elements round to the nearest e2m1 value, ties to even, and
saturate at ±6. So ``amax / scale`` lies in ``[4, 8)``, and the block maximum saturates only
above ``6 · scale``, by less than ``amax / 4``. The other common rule rounds the scale up,
``2**ceil(log2(amax / 6))``, so that nothing saturates. It is not used because of what an export
quantizes: a base block already on the grid, usually with its maximum at ``6 · scale``, plus a
small update. When the update nudges that maximum up, the OCP rule keeps the scale (the maximum
saturates back, an error no larger than the nudge), while the round-up rule would double the
scale and re-round all 32 values on a grid twice as coarse, an error far larger than the update.
With the OCP rule a block's scale changes only when its maximum crosses a power of two, so the
export keeps the base's scales almost everywhere and the update lands on the base's own grid.

The fidelity report (printed, and written to :data:`EXPORT_REPORT`) says how much of each
adapted weight's update survived the format: ``‖ΔW‖``, ``‖Q(W+ΔW) − W‖ / ‖ΔW‖`` and the cosine
of the realized update ``Q(W+ΔW) − W`` with ``ΔW``. LoRA updates are small next to a block's
quantization step, so much of ``ΔW`` can round away: the report makes that visible instead of
silent. With the logit check (default for checkpoints up to :data:`LOGIT_CHECK_AUTO_BYTES`), it
also compares the export's logits on a few rendered rows with the bf16 ``mxlora merge``'s (and,
for scale, the base's).

``--experts keep-adapter`` merges only the non-expert LoRA, keeps the base's expert bytes, and
writes the expert part of the adapter (a PEFT adapter with only the expert keys) to
``<out>/expert_adapter`` for engines that apply LoRA on MXFP4 experts themselves.

Memory: the host holds one adapted tensor (or one layer's packed expert weight) plus one
expert's float32 temporaries; shards are copied by the OS. The output folder appears atomically
(built beside ``--out``, renamed at the end, removed on failure); a non-empty ``--out`` is
refused, and the provenance (:data:`~mxlora.recipes.merge.MERGE_INFO`) is written as merge
writes it, with the export options.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mxlora.config import ConfigError
from mxlora.model.load import ModelLoadError, default_device, read_config, resolve_model_path
from mxlora.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4
from mxlora.mxfp4.load import INDEX_FILE, SINGLE_FILE, is_mxfp4, local_checkpoint
from mxlora.recipes.merge import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_INFO,
    MergeError,
    adapter_provenance,
    atomic_folder,
    check_out,
    write_merge_info,
)
from mxlora.report.metrics import GB, peak_rss_gb

#: The fidelity report, written into the export folder.
EXPORT_REPORT = "export.json"
#: ``--experts keep-adapter``: the expert LoRA as a PEFT adapter, inside the export folder.
EXPERT_ADAPTER = "expert_adapter"
#: ``logit_check=None`` (auto) compares logits only for checkpoints up to this size: the check
#: holds the bf16 merge in memory (three times the MXFP4 size for gpt-oss).
LOGIT_CHECK_AUTO_BYTES = 2 * 10**9
#: Rendered rows the logit check runs (from the bundled quotes examples).
LOGIT_CHECK_ROWS = 4

ExpertsMode = Literal["merge", "keep-adapter"]
EXPERTS_MODES: tuple[str, ...] = ("merge", "keep-adapter")
_ADAPTER_NAME = "default"
# Files of a checkpoint folder that are weights; everything else at the top level is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
}


@dataclass
class WeightFidelity:
    """How much of one adapted weight's update ``ΔW`` the stored export carries.

    Attributes:
        name: the weight (``model.layers.7.mlp.experts.gate_up_proj``, ``...q_proj.weight``).
        format: ``mxfp4`` (re-quantized expert weight) or the stored float dtype (``bfloat16``).
        delta_norm: ``‖ΔW‖`` (Frobenius).
        realized_ratio: ``‖Q(W+ΔW) − W‖ / ‖ΔW‖`` (1 and cosine 1: all of it; it can exceed 1 when
            rounding adds noise).
        cosine: cosine of the realized update ``Q(W+ΔW) − W`` with ``ΔW``.
        changed_share: share of stored units rewritten: 32-value blocks (mxfp4) or elements.
    """

    name: str
    format: str
    delta_norm: float
    realized_ratio: float
    cosine: float
    changed_share: float


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured (the content of :data:`EXPORT_REPORT`).

    Attributes:
        out: the export folder.
        base: the base checkpoint as given; ``adapter`` the adapter folder, ``adapter_sha256``
            its weights' hash; ``experts`` the mode.
        shards: shard files written (the base's names).
        bytes_written: size of the tensor files.
        seconds: wall time of writing (without the logit check).
        peak_rss_gb: the process's peak resident memory after writing (before the logit check).
        weights: fidelity per adapted weight, in checkpoint order.
        logits: the logit check (``None`` when skipped): per-row cosines and top-1 agreement of
            the export and of the base with the bf16 merge.
        copied_files: non-weight files copied from the base.
    """

    out: str
    base: str
    adapter: str
    adapter_sha256: str
    experts: str
    shards: list[str]
    bytes_written: int
    seconds: float
    peak_rss_gb: float
    weights: list[WeightFidelity] = field(default_factory=list)
    logits: dict[str, Any] | None = None
    copied_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export(
    base: str,
    adapter: str | Path,
    out: str | Path,
    *,
    experts: ExpertsMode = "merge",
    logit_check: bool | None = None,
    device: torch.device | str | None = None,
    log: bool = False,
) -> ExportReport:
    """Export ``base`` + ``adapter`` as an MXFP4 gpt-oss checkpoint in the Hub layout at ``out``.

    Args:
        base: MXFP4 gpt-oss checkpoint: folder, Hub id (cached when offline) or ``tiny[:...]``.
        adapter: PEFT LoRA adapter folder (a run's ``adapter/``), made on this base (its
            dequantized or ``experts: mxfp4`` form: the files are the same).
        out: output folder; must not exist yet (or be empty).
        experts: ``merge`` (expert LoRA re-quantized into the experts) or ``keep-adapter``
            (experts kept, their LoRA written to ``out/expert_adapter``).
        logit_check: compare logits with the bf16 merge (``None``: when the base's tensors take
            at most :data:`LOGIT_CHECK_AUTO_BYTES`).
        device: where the update math (and the logit check) runs; default the first GPU, else
            the CPU. Files are always streamed through the host.
        log: print a line per adapted weight.

    Returns:
        The report, also written to ``out/export.json``.

    Raises:
        MergeError: bad adapter or one for another model, unsupported LoRA features, output
            exists, or the adapter is already merged into the base.
        ModelLoadError: the base cannot be read, is not gpt-oss, or its experts are not MXFP4.
    """
    if experts not in EXPERTS_MODES:
        raise MergeError(f"--experts: must be one of {', '.join(EXPERTS_MODES)}, got {experts!r}")
    start = time.perf_counter()
    out = Path(out)
    check_out(out, "export")
    base_dir = _mxfp4_checkpoint(base)
    adapter_dir, adapter_sha, chain = adapter_provenance(str(base_dir), adapter)
    device = torch.device(device) if device is not None else default_device()
    peft_model, plan = _plan(base_dir, adapter_dir)
    shards = _shards(base_dir)
    located = _locate(base_dir, shards)
    missing = sorted(n for n in plan.tensor_names() if n not in located)
    if missing:
        raise MergeError(f"adapter {adapter} does not fit {base}: no tensor {missing[0]} in it")

    with atomic_folder(out) as tmp:
        for shard in shards:
            shutil.copyfile(base_dir / shard, tmp / shard)
        copied = _copy_model_files(base_dir, tmp)
        fidelity: list[WeightFidelity] = []
        with torch.no_grad():
            for name, layer in plan.linear.items():
                result = _merge_linear(base_dir, tmp, located, name, layer)
                _note(result, fidelity, log)
            if experts == "merge":
                for stem, wrapper in plan.experts.items():
                    result = _merge_expert(base_dir, tmp, located, stem, wrapper, device)
                    _note(result, fidelity, log)
            else:
                _write_expert_adapter(adapter_dir, tmp / EXPERT_ADAPTER, plan, out)
        record = {
            "base": base,
            "adapter": str(adapter_dir),
            "adapter_sha256": adapter_sha,
            "export": {"format": "mxfp4", "experts": experts},
        }
        write_merge_info(tmp, chain, record)
        report = ExportReport(
            out=str(out),
            base=base,
            adapter=str(adapter_dir),
            adapter_sha256=adapter_sha,
            experts=experts,
            shards=shards,
            bytes_written=sum((tmp / s).stat().st_size for s in shards),
            seconds=time.perf_counter() - start,
            peak_rss_gb=peak_rss_gb(),
            weights=fidelity,
            copied_files=copied,
        )
        del peft_model, plan
        if logit_check is None:
            logit_check = sum(s.end - s.begin for s in located.values()) <= LOGIT_CHECK_AUTO_BYTES
        if logit_check:
            report.logits = logit_agreement(str(base_dir), adapter_dir, tmp, experts, device)
        (tmp / EXPORT_REPORT).write_text(
            json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8"
        )
    return report


# --- the adapter's layout ---------------------------------------------------------------------


@dataclass
class _Plan:
    """The adapted weights: checkpoint weight name -> PEFT LoRA layer holding its factors."""

    linear: dict[str, Any]
    experts: dict[str, Any]  # "model.layers.7.mlp.experts.gate_up_proj" -> Mxfp4ParamWrapper

    def tensor_names(self) -> list[str]:
        names = list(self.linear)
        for stem in self.experts:
            names += [f"{stem}_blocks", f"{stem}_scales"]
        return names


def _mxfp4_checkpoint(base: str) -> Path:
    """The base's local folder; a one-line ModelLoadError unless it is gpt-oss with MXFP4 experts."""
    try:
        path = resolve_model_path(base)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    config = read_config(path)
    if not is_mxfp4(config):
        raise ModelLoadError(
            f"model {base}: its experts are not MXFP4 (no mxfp4 quantization_config); export "
            "writes MXFP4 checkpoints, use `mxlora merge` for this one"
        )
    try:
        return local_checkpoint(path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _plan(base_dir: Path, adapter_dir: Path) -> tuple[Any, _Plan]:
    """Attach the adapter to the base's meta skeleton (no weight loaded) and map its layers.

    PEFT's own injection decides which weights the adapter targets, their ranks, alphas and
    scalings; the LoRA factors are loaded (float32, as PEFT autocasts them).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from transformers import AutoConfig

    from mxlora.mxfp4.experts import Mxfp4ParamWrapper
    from mxlora.mxfp4.load import load_mxfp4_adapter, mxfp4_skeleton

    config = AutoConfig.from_pretrained(base_dir)
    skeleton = mxfp4_skeleton(config, torch.bfloat16)
    try:
        peft_model = load_mxfp4_adapter(skeleton, adapter_dir)
    except (ValueError, RuntimeError, KeyError) as e:
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        reason = reason.rpartition("adapter does not fit the model: ")[2]
        if "size mismatch" in text:
            reason = next(line.strip() for line in text.splitlines() if "size mismatch" in line)
        raise MergeError(f"adapter {adapter_dir} does not fit this model: {reason}") from None
    lora_config = peft_model.peft_config[_ADAPTER_NAME]
    if lora_config.modules_to_save or getattr(lora_config, "trainable_token_indices", None):
        raise MergeError(
            f"adapter {adapter_dir}: modules_to_save/trainable tokens are not LoRA; export merges "
            "plain LoRA only (use `mxlora merge`)"
        )
    linear: dict[str, Any] = {}
    experts: dict[str, Any] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.lora_variant or any(module.lora_bias.values()):
            raise MergeError(
                f"adapter {adapter_dir}: {name} uses a LoRA variant or lora_bias; export merges "
                "plain LoRA only"
            )
        if isinstance(module, Mxfp4ParamWrapper):
            experts_name = name.replace(".base_layer", "")
            experts[f"{experts_name}.{module.parameter_name}"] = module
        elif type(module) is LoraLinear:
            linear[f"{name}.weight"] = module
        else:
            raise MergeError(
                f"adapter {adapter_dir}: {name} is a {type(module).__name__} LoRA layer; export "
                "merges LoRA on linear layers and MXFP4 experts only"
            )
    return peft_model, _Plan(linear, dict(sorted(experts.items())))


# --- safetensors files: where each tensor's bytes are -----------------------------------------


def _shards(base_dir: Path) -> list[str]:
    """The base's weight files, sorted (as the index names them, or the single file)."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    if (base_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise ModelLoadError(f"model {base_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


class _Span(NamedTuple):
    """Where a tensor's bytes are: its shard file and absolute byte range, dtype and shape."""

    shard: str
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def _locate(base_dir: Path, shards: list[str]) -> dict[str, _Span]:
    """Every tensor's shard and byte range, from the safetensors headers.

    A safetensors file is an 8-byte little-endian header length, a JSON header naming each
    tensor's ``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then
    the data.
    """
    located: dict[str, _Span] = {}
    for shard in shards:
        with (base_dir / shard).open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        start = 8 + length
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                located[name] = _Span(
                    shard, start + begin, start + end, info["dtype"], tuple(info["shape"])
                )
    return located


def _read(base_dir: Path, located: dict[str, _Span], name: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(base_dir / located[name].shard), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _write(folder: Path, located: dict[str, _Span], name: str, tensor: Tensor) -> None:
    """Overwrite ``name``'s bytes in its shard under ``folder`` (same dtype and shape)."""
    shard, begin, end, dtype, shape = located[name]
    if _SAFETENSORS_DTYPES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
        raise MergeError(
            f"internal: {name} would change from {dtype} {list(shape)} to {tensor.dtype} "
            f"{list(tensor.shape)}"
        )
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    if raw.nbytes != end - begin:
        raise MergeError(f"internal: {name} has {raw.nbytes} bytes, its range {end - begin}")
    with (folder / shard).open("r+b") as f:
        f.seek(begin)
        f.write(memoryview(raw))


def _copy_model_files(base_dir: Path, folder: Path) -> list[str]:
    """Copy the base's top-level non-weight files (config, tokenizer, chat template, ...).

    Weight files in other formats and subfolders (the Hub's ``original/`` and ``metal/`` hold
    the unmerged weights again) are left out; so is the base's merge record, rewritten later.
    """
    copied = []
    for path in sorted(base_dir.iterdir()):
        name = path.name
        weights = name.endswith(_WEIGHT_SUFFIXES) or name == INDEX_FILE
        if path.is_file() and not name.startswith(".") and name != MERGE_INFO and not weights:
            shutil.copyfile(path, folder / name)
            copied.append(name)
    if (base_dir / INDEX_FILE).is_file():
        # Same tensors, names, dtypes and shards: the base's index is the export's, byte for byte.
        shutil.copyfile(base_dir / INDEX_FILE, folder / INDEX_FILE)
    return copied


# --- the updates ------------------------------------------------------------------------------


class _Fidelity:
    """Sums (float64) behind :class:`WeightFidelity`, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.delta_sq = self.realized_sq = self.dot = 0.0
        self.changed = self.units = 0

    def add(self, delta: Tensor, realized: Tensor, changed: Tensor) -> None:
        d, r = delta.double(), realized.double()
        self.delta_sq += float((d * d).sum())
        self.realized_sq += float((r * r).sum())
        self.dot += float((d * r).sum())
        self.changed += int(changed.sum())
        self.units += changed.numel()

    def result(self, name: str, fmt: str) -> WeightFidelity:
        delta_norm, realized_norm = math.sqrt(self.delta_sq), math.sqrt(self.realized_sq)
        denom = delta_norm * realized_norm
        return WeightFidelity(
            name=name,
            format=fmt,
            delta_norm=delta_norm,
            realized_ratio=realized_norm / delta_norm if delta_norm else 0.0,
            cosine=self.dot / denom if denom else 0.0,
            changed_share=self.changed / self.units if self.units else 0.0,
        )


def _merge_linear(
    base_dir: Path, folder: Path, located: dict[str, _Span], name: str, layer: Any
) -> WeightFidelity:
    """``W += ΔW`` as PEFT's ``Linear.merge`` does (ΔW float32, one rounding to W's dtype)."""
    weight = _read(base_dir, located, name)
    delta = layer.get_delta_weight(_ADAPTER_NAME)  # PEFT's: scaling * B @ A, float32 on the CPU
    stats = _Fidelity()
    if delta.any():
        merged = weight.clone()
        merged += delta
        _write(folder, located, name, merged)
    else:
        merged = weight  # W + 0 is W: keep the bytes (signed zeros included)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    changed = merged.view(bits) != weight.view(bits)
    stats.add(delta, merged.float() - weight.float(), changed)
    return stats.result(name, str(weight.dtype).removeprefix("torch."))


def expert_delta(wrapper: Any, expert: int, adapter_name: str = _ADAPTER_NAME) -> Tensor:
    """One expert's ``ΔW_e`` ``[in, out]`` float32, as PEFT's ``ParamWrapper.get_delta_weight``.

    The same einsum over the same reshaped factors as PEFT (``lora_A [r·E, in]`` ->
    ``[E, r, in]``, ``lora_B [out, r·E]`` -> ``[out, r, E]``), restricted to expert ``expert`` so
    that only one expert's update exists at a time; without PEFT's final cast to the weight dtype.
    """
    if wrapper._did_swap_in_out_features:
        raise MergeError("internal: expert LoRA on a [E, out, in] parameter is not gpt-oss's")
    a = wrapper.lora_A[adapter_name].weight
    b = wrapper.lora_B[adapter_name].weight
    n = wrapper.num_experts
    a = a.reshape(n, -1, a.shape[-1])[expert : expert + 1]
    b = b.reshape(b.shape[0], -1, n)[..., expert : expert + 1]
    delta = torch.einsum("o r e, e r i -> e i o", b, a) * wrapper.scaling[adapter_name]
    return delta[0]


def _merge_expert(
    base_dir: Path,
    folder: Path,
    located: dict[str, _Span],
    stem: str,
    wrapper: Any,
    device: torch.device,
) -> WeightFidelity:
    """Dequantize, add ``ΔW`` in float32 and re-quantize one expert weight, expert by expert."""
    blocks = _read(base_dir, located, f"{stem}_blocks")  # [E, out, in / 32, 16]
    scales = _read(base_dir, located, f"{stem}_scales")  # [E, out, in / 32]
    new_blocks, new_scales = blocks.clone(), scales.clone()
    stats = _Fidelity()
    for e in range(blocks.shape[0]):
        b, s = blocks[e].to(device), scales[e].to(device)
        w = dequantize_mxfp4(b, s, torch.float32)  # [out, in], exact
        delta = expert_delta(wrapper, e).to(device).T  # [in, out] -> the Hub's [out, in]
        qb, qs = quantize_mxfp4(w + delta)
        # Blocks with no update keep their bytes: same values, and no needless re-encoding.
        touched = delta.reshape(*s.shape, BLOCK_SIZE).ne(0).any(-1)
        qb = torch.where(touched.unsqueeze(-1), qb, b)
        qs = torch.where(touched, qs, s)
        realized = dequantize_mxfp4(qb, qs, torch.float32) - w
        stats.add(delta, realized, (qb != b).any(-1) | (qs != s))
        new_blocks[e], new_scales[e] = qb.cpu(), qs.cpu()
    if not torch.equal(new_blocks, blocks) or not torch.equal(new_scales, scales):
        _write(folder, located, f"{stem}_blocks", new_blocks)
        _write(folder, located, f"{stem}_scales", new_scales)
    return stats.result(stem, "mxfp4")


def _note(result: WeightFidelity, fidelity: list[WeightFidelity], log: bool) -> None:
    fidelity.append(result)
    if log:
        print(f"  {_fidelity_line(result)}", flush=True)


def _write_expert_adapter(adapter_dir: Path, folder: Path, plan: _Plan, out: Path) -> None:
    """The expert part of the adapter as a PEFT adapter of its own (``keep-adapter``).

    Same keys and tensors (bytes) as in the full adapter; the config drops ``target_modules``
    (the attention LoRA is merged into the export) and names the export as its base.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not plan.experts:
        return
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["target_modules"] = None
    config["base_model_name_or_path"] = str(out)
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
        # PEFT saves wrapper keys as ``...mlp.experts[.base_layer].lora_A.weight``.
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." in k}  # noqa: SIM118
    folder.mkdir()
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --- logit agreement --------------------------------------------------------------------------


def _rows(tokenizer: Any) -> list[list[int]]:
    """A few rendered training rows (Harmony, the bundled quotes examples)."""
    from mxlora.data.prepare import process_rows
    from mxlora.data.sources import read_rows
    from mxlora.data.spec import DataConfig, parse_source

    cfg = DataConfig(source="example:quotes", adapter="quotes")
    raw = list(read_rows(parse_source(cfg.source)))[:LOGIT_CHECK_ROWS]
    kept, _ = process_rows(raw, cfg, tokenizer, max_len=512)
    return [item.input_ids for item in kept]


def _all_logits(model: torch.nn.Module, rows: list[list[int]], device: torch.device) -> list:
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
            for ids in rows
        ]


def logit_agreement(
    base: str, adapter_dir: Path, export_dir: Path, experts: str, device: torch.device
) -> dict[str, Any]:
    """Logits of the export against the bf16 merge's, on a few rendered rows.

    The reference is ``mxlora merge`` in bf16, in memory: the base dequantized
    (``Mxfp4Config(dequantize=True)``), the adapter merged by PEFT. The export loads through
    :func:`mxlora.mxfp4.load.load_mxfp4_model` (plus its expert adapter with ``keep-adapter``);
    the base the same way, for scale.

    Returns:
        ``rows``, ``tokens``, ``compute_dtype``; for ``export`` and ``base``: the minimum and mean
        per-row cosine of the logits with the merge's, and the share of positions with the same
        top-1 token.
    """
    from mxlora.config import ModelConfig
    from mxlora.model.load import load_model
    from mxlora.mxfp4.load import load_mxfp4_adapter, load_mxfp4_model
    from mxlora.recipes.merge import attach_adapter

    # bf16 weights either way; computed in bf16 on a GPU, in float32 (exact upcast) on the CPU,
    # where bf16 matmuls are emulated and many times slower.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(
        ModelConfig(name_or_path=base, dtype="bfloat16", experts="dequantize-bf16"), device
    )
    rows = _rows(tokenizer)
    merged = attach_adapter(model, adapter_dir).merge_and_unload().to(compute)
    reference = _all_logits(merged, rows, device)
    del model, merged
    exported = load_mxfp4_model(export_dir, dtype=compute, device=device)
    if experts == "keep-adapter" and (export_dir / EXPERT_ADAPTER).is_dir():
        exported = load_mxfp4_adapter(exported, export_dir / EXPERT_ADAPTER)
    result: dict[str, Any] = {
        "rows": len(rows),
        "tokens": sum(map(len, rows)),
        "compute_dtype": str(compute).removeprefix("torch."),
    }
    result["export"] = _agreement(_all_logits(exported, rows, device), reference)
    del exported
    base_model = load_mxfp4_model(base, dtype=compute, device=device)
    result["base"] = _agreement(_all_logits(base_model, rows, device), reference)
    return result


def _agreement(logits: list[Tensor], reference: list[Tensor]) -> dict[str, float]:
    def cosine(x: Tensor, r: Tensor) -> float:
        x, r = x.flatten().double(), r.flatten().double()
        return float(x @ r / (x.norm() * r.norm()))

    cosines = [cosine(x, r) for x, r in zip(logits, reference, strict=True)]
    same = sum(
        int((x.argmax(-1) == r.argmax(-1)).sum()) for x, r in zip(logits, reference, strict=True)
    )
    total = sum(r.shape[0] for r in reference)
    return {
        "cosine_min": min(cosines),
        "cosine_mean": sum(cosines) / len(cosines),
        "top1_agreement": same / total,
    }


# --- the command ------------------------------------------------------------------------------


def _fidelity_line(w: WeightFidelity) -> str:
    return (
        f"{w.name:<48} {w.format:>8}  |ΔW| {w.delta_norm:9.3e}  kept {w.realized_ratio:6.3f}  "
        f"cos {w.cosine:6.3f}  changed {w.changed_share:6.1%}"
    )


def format_report(report: ExportReport) -> str:
    """The report as printed: the expert weights' fidelity, the rest summarized, the logits."""
    lines = [
        f"exported {report.adapter} into {report.base} (experts: {report.experts}): {report.out}",
        f"  {len(report.shards)} shard(s), {report.bytes_written / GB:.3f} GB, "
        f"{report.seconds:.1f} s, peak host RSS {report.peak_rss_gb:.2f} GB",
    ]
    mxfp4 = [w for w in report.weights if w.format == "mxfp4"]
    floats = [w for w in report.weights if w.format != "mxfp4"]
    if mxfp4:
        lines.append("  adapted expert weights (kept: |Q(W+ΔW) - W| / |ΔW|, cos with ΔW):")
        lines += [f"    {_fidelity_line(w)}" for w in mxfp4]
    if floats:
        worst = min(floats, key=lambda w: w.cosine)
        lines.append(
            f"  {len(floats)} float weight(s) merged in their dtype; lowest cosine "
            f"{worst.cosine:.4f} ({worst.name})"
        )
    if report.logits is None:
        lines.append("  logit check: skipped")
    else:
        lg = report.logits
        for who in ("export", "base"):
            a = lg[who]
            lines.append(
                f"  logits vs bf16 merge ({lg['rows']} rows, {lg['tokens']} tokens): {who:<6} "
                f"cosine min {a['cosine_min']:.4f} mean {a['cosine_mean']:.4f}, "
                f"top-1 agreement {a['top1_agreement']:.1%}"
            )
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora export --base M --adapter A --out D [--experts] [--logit-check/--no-...]``."""
    try:
        report = export(
            args.base, args.adapter, args.out, experts=args.experts, logit_check=args.logit_check
        )
    except (MergeError, ModelLoadError, ConfigError) as e:
        print(f"mxlora export: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
