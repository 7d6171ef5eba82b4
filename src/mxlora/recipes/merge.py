"""``mxlora merge``: fold a LoRA adapter into its base model and save a plain checkpoint.

The base loads through :func:`mxlora.model.load.load_model` (an MXFP4 checkpoint is dequantized
as the seed does, ``Mxfp4Config(dequantize=True)``), the adapter through PEFT, and PEFT's
``merge_and_unload`` adds ``scale * B @ A`` into every adapted weight: attention projections
(``target_modules``) and expert tensors (``target_parameters``; PEFT 0.21's ``ParamWrapper`` merges
them too). The output folder holds safetensors weights, ``config.json`` without any
``quantization_config`` (the weights are plain floats now, so nothing may claim MXFP4),
``generation_config.json`` (gpt-oss's stop tokens), the tokenizer, and :data:`MERGE_INFO`.

Merging twice is refused, never silently repeated: the output folder must not exist (or be
empty), and an adapter whose weights (by sha256) are already recorded in the base's
:data:`MERGE_INFO` is not merged into it again (that would add its update a second time).
Merging a *different* adapter into a merged model is allowed and recorded in the chain.
The folder appears atomically: it is written beside the target and renamed into place, so a
killed merge leaves no half-written model under the requested name.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mxlora.config import ConfigError, DtypeName, ModelConfig
from mxlora.model.load import ModelLoadError, load_model

#: Written into every merged folder: what was merged into what (the whole chain).
MERGE_INFO = "mxlora_merge.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MergeError(RuntimeError):
    """The adapter cannot be read or applied, or the merge would repeat or overwrite (one line)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_adapter_dir(adapter: str | os.PathLike[str]) -> Path:
    """A readable PEFT LoRA adapter folder, or a one-line :class:`MergeError`.

    Returns:
        The folder, resolved.
    """
    path = Path(adapter).resolve()
    if not path.is_dir():
        raise MergeError(f"adapter {adapter}: no such folder")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise MergeError(f"adapter {adapter}: no {name} (not a PEFT adapter folder)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"adapter {adapter}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise MergeError(f"adapter {adapter}: not a LoRA adapter (peft_type {kind!r})")
    return path


def attach_adapter(model: torch.nn.Module, adapter: str | os.PathLike[str]):
    """Load a PEFT LoRA adapter onto ``model`` and check that all of it landed.

    PEFT loads adapter tensors non-strictly: tensors for modules the model lacks (an adapter of
    another architecture or depth) are dropped with at most a warning. Here every tensor of the
    adapter file must have a place in the model, and the model's LoRA tensors must all come from
    the file; otherwise the adapter does not belong to this model.

    Args:
        model: a loaded base model.
        adapter: a PEFT adapter folder.

    Returns:
        The ``peft.PeftModel`` wrapping ``model``.

    Raises:
        MergeError: unreadable adapter, or one made for a different model (shapes or modules).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    path = check_adapter_dir(adapter)
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
            in_file = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise MergeError(
            f"adapter {adapter}: unreadable {ADAPTER_WEIGHTS} ({_first_line(e)})"
        ) from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        reason = _first_line(e)
        if "size mismatch" in str(e):
            # The first mismatch line names a tensor and both shapes.
            reason = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise MergeError(f"adapter {adapter} does not fit this model: {reason}") from None
    in_model = set(get_peft_model_state_dict(peft_model).keys())
    unused, missing = sorted(in_file - in_model), sorted(in_model - in_file)
    if unused or missing:
        if unused:
            what = f"{len(unused)} adapter tensor(s) have no place in the model (e.g. {unused[0]})"
        else:
            what = f"{len(missing)} LoRA tensor(s) of the model are not in the adapter"
        raise MergeError(f"adapter {adapter} does not fit this model: {what}")
    return peft_model


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _previous_merges(base: str) -> list[dict[str, Any]]:
    """The merge chain recorded in a local base folder (empty for a Hub id or an unmerged model)."""
    info = Path(base) / MERGE_INFO
    if not info.is_file():
        return []
    try:
        return list(json.loads(info.read_text(encoding="utf-8"))["merges"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeError(f"model {base}: unreadable {MERGE_INFO} ({e})") from None


def adapter_provenance(
    base: str, adapter: str | os.PathLike[str]
) -> tuple[Path, str, list[dict[str, Any]]]:
    """Check the adapter folder and that it is not merged into ``base`` already.

    Returns:
        ``(adapter folder, sha256 of its weights, the base's merge chain)``.

    Raises:
        MergeError: not a LoRA adapter folder, or its weights (by sha256) are already recorded in
            the base's :data:`MERGE_INFO` (merging again would apply the update twice).
    """
    adapter_dir = check_adapter_dir(adapter)
    adapter_sha = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
    chain = _previous_merges(base)
    if any(m.get("adapter_sha256") == adapter_sha for m in chain):
        raise MergeError(
            f"adapter {adapter} is already merged into {base} (same weights, see {MERGE_INFO}); "
            "merging it again would apply it twice"
        )
    return adapter_dir, adapter_sha, chain


def write_merge_info(folder: Path, chain: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Write :data:`MERGE_INFO` into ``folder``: the base's chain plus this merge's ``record``."""
    (folder / MERGE_INFO).write_text(
        json.dumps({"merges": [*chain, record]}, indent=2) + "\n", encoding="utf-8"
    )


def check_out(out: Path, command: str = "merge") -> None:
    """Refuse an output path that exists and is not an empty folder (one-line MergeError)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(
            f"output {out} already exists; {command} never overwrites (remove it or pick another "
            "--out)"
        )


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temp folder beside ``out`` that becomes ``out`` when the block completes.

    On any exception (or interrupt) the temp folder is removed and ``out`` is left as it was, so
    a killed or failed run leaves no half-written folder under the requested name. ``out`` must
    be missing or empty (:func:`check_out`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked by the caller; rename() needs the name free
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _strip_quantization(model: torch.nn.Module) -> None:
    """Drop the MXFP4 quantization state of a dequantized model so its config stays honest.

    transformers 5.24 already drops it when it dequantizes; 5.17 may keep the quantizer (and its
    ``quantization_config``) on the model, which save_pretrained would write out.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def merge(
    base: str,
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: DtypeName = "auto",
    device: torch.device | str | None = None,
) -> Path:
    """Merge ``adapter`` into ``base`` and save the result to ``out``.

    Args:
        base: Hub id, local folder or ``tiny[:...]`` (as ``model.name_or_path`` in configs).
        adapter: PEFT LoRA adapter folder (e.g. a run's ``adapter/``).
        out: output folder; must not exist yet (or be empty).
        dtype: weight dtype to load and save in (``auto``: bf16 on a bf16 GPU, else float32).
        device: where to merge (default: the first GPU, else the CPU).

    Returns:
        The output folder.

    Raises:
        MergeError: bad adapter, adapter for another model, output exists, or already merged.
        ModelLoadError: the base cannot be read or is not gpt-oss.
    """
    out = Path(out)
    check_out(out)
    adapter_dir, adapter_sha, chain = adapter_provenance(base, adapter)
    model, tokenizer = load_model(
        # Merging folds ΔW into dense weights: the seed's dequantized model.
        ModelConfig(name_or_path=base, dtype=dtype, experts="dequantize-bf16"),
        device,
    )
    merged = attach_adapter(model, adapter_dir).merge_and_unload()
    _strip_quantization(merged)
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"base": base, "adapter": str(adapter_dir), "adapter_sha256": adapter_sha}
        write_merge_info(tmp, chain, record)
        _check_saved(tmp)
    return out


def _check_saved(folder: Path) -> None:
    """The saved folder must be a plain checkpoint: float weights and no quantization claim."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise MergeError(
            f"internal: {folder}/config.json still claims {config['quantization_config']}"
        )
    if not any(folder.glob("*.safetensors")):
        raise MergeError(f"internal: no safetensors weights written to {folder}")


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora merge --base MODEL --adapter DIR --out DIR [--dtype]``."""
    try:
        out = merge(args.base, args.adapter, args.out, dtype=args.dtype)
    except (MergeError, ModelLoadError, ConfigError) as e:
        print(f"mxlora merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0
