"""Typed configuration: the single source of truth for a training run and for the seed flow.

A training config is YAML with five sections (``model``, ``lora``, ``data``, ``train``,
``output``); every field is a dataclass field below (``data`` is :class:`mxlora.data.DataConfig`).
Command-line overrides ``key=value`` (``train.lr=1e-4 data.select=200``) win over the YAML.
Every value, from YAML or the command line, is checked against its field's type; a wrong one
raises :class:`ConfigError` naming the field (``train.lr: expected float, got 'abc'``).

The defaults are the seed notebook's (OpenAI cookbook, "Fine-tuning gpt-oss with Hugging Face
Transformers"): LoRA r=8, alpha=16 on all linear layers plus the experts of layers 7/15/23, lr 2e-4,
1 epoch, batch 4, max length 2048, 3 % warmup, cosine schedule down to 10 % of the peak lr,
non-reentrant gradient checkpointing when the activations would not fit (`auto`), bf16 where the
device has it. `train.engine` picks who runs the step: mxlora's own (default) or TRL's SFTTrainer.

A run config (``mxlora run``) lists training configs to run one after another, which run's
adapter to merge and the chat check to do on the merged model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mxlora.data import DataConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message starts with the field's dotted name."""


# How the MXFP4 experts of a checkpoint are held in memory during training.
# "dequantize-bf16" is the seed's `Mxfp4Config(dequantize=True)`: every expert expanded to bf16.
# "mxfp4": the experts stay packed as shipped (uint8 blocks + e8m0 scales) and LoRA trains on
# them with exact gradients (mxlora.mxfp4.experts); no float copy of an expert weight is made.
# "auto" (the default): "mxfp4" for a checkpoint whose experts are MXFP4, the stored weights
# otherwise. mxfp4 became the default once its acceptance held (gradient parity with the seed
# path; on the H100 at 4x2048 with flex_attention 18.2 GB peak and 1.84x the seed's tokens/s:
# docs/BENCHMARKS.md). For training on a device without the Triton kernel, where the torch
# path's dequantizing makes mxfp4 the slower mode, auto dequantizes when that fits the memory
# budget (mxlora.recipes.dryrun.training_experts).
ExpertsMode = Literal["auto", "dequantize-bf16", "mxfp4"]
# "auto": bf16 where the device supports it (the seed's choice), float32 elsewhere (CPU).
DtypeName = Literal["auto", "bfloat16", "float32"]
Scheduler = Literal["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup"]
ExpertProjection = Literal["gate_up_proj", "down_proj"]
# Experiment trackers a run can log to, besides metrics.jsonl (mxlora.report.trackers); each
# writes locally (TensorBoard event files and wandb's offline run inside the run folder,
# trackio's local database), none needs the network.
Tracker = Literal["tensorboard", "trackio", "wandb"]
# "mxlora": mxlora's own training step (mxlora.engine: packed rows, document-masked attention
# with sinks, chunked loss, compiled blocks); "trl": TRL's SFTTrainer, the seed's, the reference.
Engine = Literal["mxlora", "trl"]
Auto = Literal["auto"]


@dataclass
class ModelConfig:
    """Which model to load and how.

    Attributes:
        name_or_path: a Hub id (``openai/gpt-oss-20b``), a local folder, or ``tiny`` /
            ``tiny:layers=24,hidden=64`` for a small gpt-oss built locally (the embedded default;
            keys are :class:`mxlora.model.tiny.TinySpec` fields), or ``random:120b`` /
            ``random:20b,seed=1`` / ``random:CONFIG.json`` for a full-size model with random
            weights generated straight into device memory (MXFP4 experts; for measuring).
        experts: how the MXFP4 experts are held (see ``ExpertsMode``).
        attn_implementation: transformers' attention backend; the seed uses ``eager``.
        experts_implementation: transformers' MoE experts backend (``from_pretrained``'s
            ``experts_implementation``): ``None`` keeps transformers' default (``grouped_mm``
            in transformers 5, what the seed ran), ``eager`` is the per-expert Python loop of
            the notebook's era, ``grouped_mm`` / ``batched_mm`` name the fused ones.
        dtype: weight dtype of the non-quantized parameters.
    """

    name_or_path: str = "openai/gpt-oss-20b"
    experts: ExpertsMode = "auto"
    attn_implementation: str = "eager"
    experts_implementation: str | None = None
    dtype: DtypeName = "auto"


@dataclass
class ExpertTargets:
    """Expert weights that get LoRA (PEFT ``target_parameters``).

    Attributes:
        layers: decoder layer indices; the seed adapts layers 7, 15 and 23 of gpt-oss-20b.
        projections: which expert weights of those layers.
    """

    layers: list[int] = field(default_factory=lambda: [7, 15, 23])
    projections: list[ExpertProjection] = field(
        default_factory=lambda: ["gate_up_proj", "down_proj"]
    )


@dataclass
class LoraConfig:
    """LoRA adapter shape and targets.

    Attributes:
        r: rank.
        alpha: scaling numerator (``alpha / r`` multiplies the update).
        dropout: dropout on the LoRA input.
        target_modules: PEFT ``target_modules``. ``["all-linear"]`` (the seed) means every
            ``nn.Linear`` but the output layer; on gpt-oss that is q/k/v/o_proj of every layer
            (the router is not an ``nn.Linear`` and the experts are 3-D parameters).
            ``[]`` adapts no module, only the experts below.
        experts: expert parameters to adapt.
        rank_pattern: per-target rank, PEFT's ``rank_pattern`` (key: regex or name suffix,
            e.g. ``{"q_proj": 16, "7.mlp.experts.gate_up_proj": 4}``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    experts: ExpertTargets = field(default_factory=ExpertTargets)
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules and not (self.experts.layers and self.experts.projections):
            raise ConfigError("target_modules: no LoRA target at all (and no expert targets)")


@dataclass
class TrainConfig:
    """Trainer settings (TRL ``SFTConfig``), the seed's values by default.

    Attributes:
        lr: peak learning rate.
        epochs: passes over the training rows.
        max_steps: stop after this many optimizer steps (-1: run all epochs).
        batch_size: rows per batch, global: under a launcher (``--nproc N``, torchrun) each of the
            N processes trains on its share of every batch.
        grad_accum: batches per optimizer step.
        max_len: longest row in tokens; longer rows are handled by the data policy.
        warmup: warmup as a ratio of all steps when < 1, else a step count (transformers 5's
            ``warmup_steps``; the seed's ``warmup_ratio=0.03`` is ``0.03`` here).
        scheduler: learning-rate schedule.
        min_lr_rate: floor of ``cosine_with_min_lr`` as a fraction of ``lr``.
        engine: who runs the training step (see ``Engine``); same data, order, loss, optimizer
            and schedule either way.
        gradient_checkpointing: recompute decoder blocks' activations in backward (always
            non-reentrant): ``true`` every block, ``false`` none; ``auto`` decides per run from
            the longest micro-batch and ``memory_budget_gb`` (:mod:`mxlora.engine.memory`): the
            mxlora engine checkpoints the fewest (first) blocks that fit, TRL every block or
            none. Reports name the count (``checkpointed_blocks: "k of n"``).
        memory_budget_gb: device memory ``auto`` checkpointing plans for (peak allocated, less
            a margin: ``mxlora.engine.memory.HEADROOM``); ``None``: the whole device (on the
            CPU: checkpointing off).
        compile: ``torch.compile`` each decoder block (mxlora engine); ``auto``: on CUDA when the
            run's longest packed micro-batch is long enough for the compile to pay
            (:data:`mxlora.engine.loop.COMPILE_MIN_TOKENS`). A block that fails to compile stops
            the run with a message, never a silent eager run.
        cuda_graphs: capture each packed length's forward + loss + backward as a CUDA graph and
            replay it (mxlora engine; :mod:`mxlora.engine.graphs`): short steps stop paying
            thousands of kernel launches. ``auto``: on CUDA without FSDP (one process, or each
            process of a data-parallel run) with eager blocks (the short, launch-bound steps)
            and no gradient checkpointing, when the memory allows; ``true`` where it cannot run
            stops the run saying why.
        logging_steps: log train metrics every N optimizer steps.
        eval: evaluate on the held-out rows at each epoch end (``epoch``), every
            ``eval_steps`` optimizer steps (``steps``), or never (``no``).
        eval_steps: with ``eval: steps``, the interval in optimizer steps (required there).
        weight_decay: AdamW's decoupled weight decay on the LoRA weights (the seed's 0).
        max_grad_norm: clip the global gradient norm to this before each optimizer step.
        save_steps: write a resumable checkpoint every N optimizer steps.
        save_total_limit: complete checkpoints kept, the newest ones (``null``: all).
        report_to: experiment trackers to log to besides ``metrics.jsonl`` (``tensorboard``,
            ``trackio``, ``wandb``; all local/offline). Empty: none.
        seed: seed for LoRA init, shuffling and dropout.
        fsdp: under a launcher, shard the model over the processes with FSDP2 (one unit per
            decoder layer, MXFP4 blocks/scales sharded along the expert dimension and gathered
            packed) instead of replicating it (data parallel): for models that do not fit one
            GPU. Needs ``engine: mxlora`` and more than one process.
    """

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 2048
    warmup: float = 0.03
    scheduler: Scheduler = "cosine_with_min_lr"
    min_lr_rate: float = 0.1
    engine: Engine = "mxlora"
    gradient_checkpointing: Auto | bool = "auto"
    memory_budget_gb: float | None = None
    compile: Auto | bool = "auto"
    cuda_graphs: Auto | bool = "auto"
    logging_steps: int = 10
    eval: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 500
    save_total_limit: int | None = 2
    report_to: list[Tracker] = field(default_factory=list)
    seed: int = 42
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_len", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")
        if self.eval == "steps" and self.eval_steps is None:
            raise ConfigError("eval_steps: required with eval: steps (evaluate every N steps)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"report_to: names a tracker twice: {self.report_to}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError(f"warmup: must be >= 0, got {self.warmup}")
        if self.compile is True and self.engine != "mxlora":
            raise ConfigError(f"compile: true needs engine mxlora (engine is {self.engine!r})")
        if self.cuda_graphs is True and self.engine != "mxlora":
            raise ConfigError(f"cuda_graphs: true needs engine mxlora (engine is {self.engine!r})")
        if self.cuda_graphs is True and self.fsdp:
            raise ConfigError(
                "cuda_graphs: true cannot run with fsdp: true (FSDP gathers inside the step)"
            )
        if self.fsdp and self.engine != "mxlora":
            raise ConfigError(f"fsdp: true needs engine mxlora (engine is {self.engine!r})")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ConfigError(f"memory_budget_gb: must be > 0, got {self.memory_budget_gb}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be -1 or >= 1, got {self.max_steps}")


# Fields that `mxlora train --resume RUN_DIR key=value` may change: they decide what is logged,
# evaluated, saved and kept, or whether the same kernels are replayed from CUDA graphs, never
# what the optimizer computes, so the resumed run ends exactly as the uninterrupted one would.
# Any other change is refused, naming the field.
RESUME_SAFE_FIELDS = frozenset(
    {
        "train.logging_steps",
        "train.save_steps",
        "train.save_total_limit",
        "train.eval",
        "train.eval_steps",
        "train.report_to",
        "train.cuda_graphs",
    }
)


@dataclass
class OutputConfig:
    """Where the run folder goes: ``<root>/<name>``."""

    root: str = "runs"
    name: str = "run"

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class TrainingConfig:
    """Everything one ``mxlora train`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class RunEntry:
    """One training run of a run config.

    Attributes:
        config: path of a training config, relative to the run config's folder.
        overrides: ``key=value`` overrides applied on top of it (same syntax as the CLI).
    """

    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class MergeSpec:
    """Which run's adapter is merged into the base model (by its ``output.name``)."""

    run: str = "reasoning"


@dataclass
class ChatSpec:
    """The chat check on the merged model (the seed's: a Spanish question, reasoning in German).

    Attributes:
        prompt: the user message.
        reasoning_language: the language the model should reason in (developer instructions).
        max_new_tokens: generation budget.
    """

    prompt: str = "¿Cuál es el capital de Australia?"
    reasoning_language: str = "German"
    max_new_tokens: int = 512


@dataclass
class RunConfig:
    """The seed flow (``mxlora run``): train each entry, merge one adapter, chat, compare.

    Each training run's folder is ``<output.root>/<output.name>/<its own output.name>``.
    """

    runs: list[RunEntry]
    merge: MergeSpec = field(default_factory=MergeSpec)
    chat: ChatSpec = field(default_factory=ChatSpec)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(name="seed"))

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("runs: at least one run is needed")


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the field.


def from_dict(cls: type[T], raw: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and value types.

    Args:
        cls: the dataclass type.
        raw: a mapping (from YAML); ``None`` means all defaults.
        where: dotted name of this section, used in error messages.

    Raises:
        ConfigError: an unknown key, a missing required field or a value of the wrong type.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, str(unknown[0]))}: unknown field (known: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(where, str(e))) from None
    except ValueError as e:
        # Sections owned by other modules (``data``) validate themselves and already name
        # the field in full (``data.select: ...``).
        message = str(e)
        if where and not message.startswith(f"{where}."):
            message = _join(where, message)
        raise ConfigError(message) from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; strings (from the command line) are parsed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None or (
            type(None) in args and isinstance(value, str) and value.lower() in ("null", "none")
        ):
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be empty")
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{where}: {' / '.join(errors)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_list(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {
            _coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()
        }
    return _coerce_scalar(value, tp, where)


def _parse_list(text: str) -> list[Any]:
    """``[7, 15]`` (YAML) or ``7,15`` or ``a,b``; an empty string is an empty list."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        return yaml.safe_load(text)
    return [part.strip() for part in text.split(",")]


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    name = getattr(tp, "__name__", str(tp))
    bad = ConfigError(f"{where}: expected {name}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string, so parse it here.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise bad
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


# --------------------------------------------------------------------------------------------
# Overrides and files.


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set ``key.sub=value`` pairs into a nested mapping (a copy); types are checked later.

    Values stay strings: :func:`from_dict` parses them by the field's type, so ``1e-4`` is a
    float for a float field and a string for a string field.
    """
    out = _deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deepcopy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deepcopy(v) for v in raw]
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a mapping; an empty file is ``{}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read a training config YAML and apply ``key=value`` overrides.

    ``data.source`` may be a list of alternatives: the first local file that exists is used (a
    Hub id or ``example:`` source always counts as existing). The tiny configs use it to take
    the real rows in ``../shared/data`` when present and the packaged examples otherwise.

    Raises:
        ConfigError: unreadable file, unknown key or wrong value, naming the field.
    """
    raw = apply_overrides(read_yaml(path), overrides)
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), list):
        data["source"] = first_existing_source(data["source"])
    return from_dict(TrainingConfig, raw)


def first_existing_source(sources: list[Any]) -> str:
    """The first source spec whose data is there (local files are checked on disk)."""
    from mxlora.data.spec import parse_source

    if not sources or not all(isinstance(s, str) for s in sources):
        raise ConfigError(f"data.source: expected a source or a list of sources, got {sources!r}")
    for spec in sources:
        try:
            parsed = parse_source(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if parsed.kind == "hub" or parsed.path.exists():
            return spec
    raise ConfigError(f"data.source: none of {sources} exists")


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config (``mxlora run``) and check that every listed training config loads."""
    cfg = from_dict(RunConfig, apply_overrides(read_yaml(path), overrides))
    names: list[str] = []
    for i, entry in enumerate(cfg.runs):
        try:
            name = run_entry_config(path, entry).output.name
        except ConfigError as e:
            raise ConfigError(f"runs[{i}] ({entry.config}): {e}") from None
        if name in names:
            raise ConfigError(f"runs[{i}]: output.name {name!r} is used by an earlier run")
        names.append(name)
    if cfg.merge.run not in names:
        raise ConfigError(f"merge.run: no run named {cfg.merge.run!r} (runs: {', '.join(names)})")
    return cfg


def run_entry_config(run_config_path: str | Path, entry: RunEntry) -> TrainingConfig:
    """The training config of one run entry (its path is relative to the run config)."""
    return load_config(Path(run_config_path).parent / entry.config, entry.overrides)


def with_absolute_paths(cfg: TrainingConfig) -> TrainingConfig:
    """``cfg`` with a local data file and a local model folder as absolute paths (a copy).

    A run's saved ``config.yaml`` holds these, so ``--resume`` works from any directory.
    ``example:`` sources, Hub ids and ``tiny`` specs stay as they are.
    """
    from mxlora.data.spec import parse_source

    source = cfg.data.source
    if not source.startswith("example:") and parse_source(source).kind == "local":
        source = str(Path(source).expanduser().resolve())
    model = cfg.model.name_or_path
    if model.partition(":")[0] != "tiny" and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, source=source),
        model=dataclasses.replace(cfg.model, name_or_path=model),
    )


def dump_config(cfg: Any) -> str:
    """A config as YAML (all fields, after overrides), loadable again with the same class."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
