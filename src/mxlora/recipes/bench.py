"""``mxlora bench CONFIG``: training speed and memory of configuration variants, measured alike.

Each variant is the training config ``mxlora train`` would run (the seed's defaults plus the
variant's ``key=value`` overrides). In a fresh child process per variant (its own device memory,
nothing cached from another variant) the bench loads the checkpoint with
:func:`mxlora.model.load.load_model`, attaches LoRA with :func:`mxlora.model.lora.apply_lora`, and
for each workload runs the engine ``mxlora train`` runs for that config (``train.engine``:
mxlora's own loop, :class:`mxlora.engine.loop.Loop`, or TRL's ``SFTTrainer`` built from the same
:func:`mxlora.recipes.train.sft_config`) for warm-up steps, then timed steps. A step is timed as
training runs time it (batch already collated or packed: forward, backward, clipping, optimizer,
zero_grad, with the device synchronized). An ``epoch`` workload trains one epoch over its rows end
to end, every step timed (compilation included): its ``train_time_s`` is what a user waits.

Workloads: ``length`` rows of random ordinary tokens (every token trained), or ``data`` rows
rendered by :func:`mxlora.data.prepare_data` exactly as for training, batched as the engine
batches them (TRL: right padding to the batch's longest row; mxlora: packed, bucketed).

Figures per variant and workload: trained (non-pad) tokens/s, step time, ``train_time_s`` (the
sum of every step's time, warm-up included; each step's in ``step_times_s``), peak allocated and
reserved device memory (since the workload started, warm-up included), load time, MFU and the
ratio of tokens/s to the baseline (the first variant). MFU counts ``6 x active parameters x
tokens``: 2 for the forward, 2 for its recomputation under gradient checkpointing, 2 for the
backward's input gradients (frozen weights get no weight gradient; LoRA's own work is
negligible); attention's sequence-length term is left out, so long rows do a little more work
than counted. The rate it is divided by is a bf16 (the training dtype) matrix product measured
on the device at the start of the bench.

Results: ``<results>/<name>.json`` (every number, environment, command) and ``<name>.md`` (the
table), rewritten after each variant so a cut-short run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mxlora.config import (
    ConfigError,
    TrainingConfig,
    apply_overrides,
    first_existing_source,
    from_dict,
    read_yaml,
    to_dict,
)
from mxlora.data import DataConfig
from mxlora.report.metrics import MetricsLog

# Random-token workloads draw from the o200k ranks below the Harmony specials (199998 and up):
# ordinary text tokens, and never the pad id, so every token counts as trained.
ORDINARY_TOKENS = 199998
# The device's matmul rate: a square product large enough to fill an H100 (8192^3 reaches the
# rate KINDS.md reports for these machines); a small one on the CPU keeps the CPU test fast.
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}
MATMUL_REPEATS = 20


class BenchError(RuntimeError):
    """The bench cannot run as configured (one-line message)."""


# --------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class Workload:
    """One kind of batch to time.

    Attributes:
        name: label in the table (``4x1024``, ``quotes``).
        batch: rows per step.
        length: every row this many random ordinary tokens (all trained), or
        data: real rows, rendered for training by :func:`mxlora.data.prepare_data` (the train
            split; rows over the training ``max_len`` are dropped as in training).
        warmup_steps: steps before timing (default: the bench's).
        steps: timed steps (default: the bench's).
        epoch: train one epoch over the ``data`` rows instead (every step timed, none warm-up;
            ``warmup_steps`` and ``steps`` do not apply).
    """

    name: str
    batch: int = 4
    length: int | None = None
    data: DataConfig | None = None
    warmup_steps: int | None = None
    steps: int | None = None
    epoch: bool = False

    def __post_init__(self) -> None:
        if (self.length is None) == (self.data is None):
            raise ConfigError(f"{self.name}: give exactly one of length and data")
        if self.epoch and (self.data is None or self.warmup_steps or self.steps):
            raise ConfigError(f"{self.name}: epoch needs data and no warmup_steps / steps")
        if self.batch < 1 or (self.length is not None and self.length < 1):
            raise ConfigError(f"{self.name}: batch and length must be >= 1")


@dataclass
class Variant:
    """A training configuration to measure: ``mxlora train``'s config with these overrides.

    Attributes:
        name: label in the table.
        overrides: ``key=value`` training-config overrides, e.g.
            ``model.attn_implementation=flex_attention``.
        note: one line saying what the variant is, printed under the table.
        gpus: processes (one per GPU) the variant's child runs in, under torchrun: each
            workload's ``batch`` is then per GPU (the global batch is ``batch * gpus`` rows),
            tokens/s are global, peak memory the largest of any GPU. Data parallel, or FSDP2
            with the override ``train.fsdp=true``.
    """

    name: str
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"variants.{self.name}.gpus: must be >= 1, got {self.gpus}")


@dataclass
class BenchConfig:
    """A bench run (``bench/configs/*.yaml``).

    Attributes:
        name: results are written to ``<results>/<name>.json`` and ``.md``.
        model: checkpoint folder (or Hub id, ``tiny:...``, or ``random:120b``: generated in
            device memory by each variant, no files) every variant loads.
        make_random: if ``model`` is a folder without a checkpoint, build it first with
            ``mxlora make-random`` from this config (``20b``, ``120b`` or a config.json path).
        variants: measured in order; the first is the baseline of the ratio column.
        workloads: run by every variant, in order.
        warmup_steps: untimed steps per workload (compilation, allocator warm-up).
        steps: timed steps per workload.
        seed: seed of the random tokens and of the checkpoint make-random writes.
        results: folder of the result files.
    """

    name: str
    model: str
    variants: list[Variant]
    workloads: list[Workload]
    make_random: str | None = None
    warmup_steps: int = 2
    steps: int = 4
    seed: int = 0
    results: str = "bench/results"

    def __post_init__(self) -> None:
        if not self.variants or not self.workloads:
            raise ConfigError("variants and workloads: at least one of each is needed")
        for kind, items in (("variants", self.variants), ("workloads", self.workloads)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ConfigError(f"{kind}: names must be unique, got {names}")
        if self.warmup_steps < 0 or self.steps < 1:
            raise ConfigError("warmup_steps must be >= 0 and steps >= 1")


def load_bench_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """Read a bench config; ``key=value`` overrides apply to its top-level fields.

    A workload's ``data.source`` may list alternatives; the first that exists is used (as in
    training configs), so one config finds ``../shared/data`` or a copy carried elsewhere.

    Raises:
        ConfigError: unreadable file, unknown key or wrong value, naming the field.
    """
    raw = apply_overrides(read_yaml(path), overrides)
    for item in raw.get("workloads") or []:
        data = item.get("data") if isinstance(item, dict) else None
        if isinstance(data, dict) and isinstance(data.get("source"), list):
            data["source"] = first_existing_source(data["source"])
    bench = from_dict(BenchConfig, raw)
    for variant in bench.variants:
        variant_config(bench, variant)  # a bad override fails now, not in a child
    return bench


def variant_config(bench: BenchConfig, variant: Variant) -> TrainingConfig:
    """The training config of ``variant``: the seed's defaults, the bench's model, its overrides."""
    overrides = [f"model.name_or_path={bench.model}", *variant.overrides]
    try:
        return from_dict(TrainingConfig, apply_overrides({}, overrides))
    except ConfigError as e:
        raise ConfigError(f"variants.{variant.name}: {e}") from None


# --------------------------------------------------------------------------------------------
# Parent: one child process per job, results gathered and written.


def run_bench(bench: BenchConfig, only: list[str] | None = None, command: str = "") -> dict:
    """Run the bench: setup child (checkpoint, matmul rate), then one child per variant.

    Args:
        bench: the bench config.
        only: names of the variants to run (default: all).
        command: the command line, recorded in the results.

    Returns:
        The results (also written to ``<results>/<name>.json`` and ``.md``).
    """
    variants = [v for v in bench.variants if only is None or v.name in only]
    unknown = sorted(set(only or []) - {v.name for v in bench.variants})
    if unknown or not variants:
        known = ", ".join(v.name for v in bench.variants)
        raise BenchError(f"--only: no variant named {unknown or only} (known: {known})")
    results_dir = Path(bench.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "name": bench.name,
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": to_dict(bench),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="mxlora-bench-") as scratch:
        result["setup"] = _run_child({"kind": "setup", "bench": to_dict(bench)}, Path(scratch))
        if "error" in result["setup"]:
            raise BenchError(f"setup failed: {result['setup']['error']}")
        for variant in variants:
            job = {"kind": "variant", "bench": to_dict(bench), "variant": variant.name}
            out = _run_child(job, Path(scratch), variant.gpus)
            rows = out.get("rows") or [
                {"variant": variant.name, "workload": w.name, "error": out.get("error")}
                for w in bench.workloads
            ]
            for row in rows:
                row.setdefault("load_s", out.get("load_s"))
            result["rows"].extend(rows)
            _finish(result)
            write_results(result, results_dir)
    return result


def _run_child(job: dict[str, Any], scratch: Path, gpus: int = 1) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (``gpus`` > 1: that many under torchrun, rank 0
    answers); its JSON answer, or ``{"error": ...}``."""
    from mxlora.distributed import LAUNCHER_ENV, torchrun_command

    tag = job.get("variant") or job["kind"]
    job_path, out_path = scratch / f"{tag}.job.json", scratch / f"{tag}.out.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = [str(job_path), str(out_path)]
    if gpus > 1:
        for name in LAUNCHER_ENV:  # a fresh job, not a member of one this process is in
            env.pop(name, None)
        cmd = torchrun_command(gpus, argv, module="mxlora.recipes.bench")
    else:
        cmd = [sys.executable, "-m", "mxlora.recipes.bench", *argv]
    proc = subprocess.run(cmd, env=env)
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return {"error": f"child process for {tag} exited with code {proc.returncode} and no result"}


def _finish(result: dict[str, Any]) -> None:
    """Add MFU and the ratio to the baseline (first variant measured) to every row. A row's
    tokens/s are global (every process's), so its MFU is per GPU: against ``gpus`` times one
    GPU's measured matmul rate."""
    setup = result["setup"]
    flops_per_token = 6 * setup["active_params"]
    rate = setup["matmul_tflops"] * 1e12
    baseline: dict[str, float] = {}
    for row in result["rows"]:
        tps = row.get("tokens_per_s")
        if tps is None:
            continue
        row["mfu"] = flops_per_token * tps / (rate * row.get("gpus", 1))
        base = baseline.setdefault(row["workload"], tps)
        row["ratio"] = tps / base
    if result["rows"]:
        result["baseline"] = result["rows"][0]["variant"]


def write_results(result: dict[str, Any], folder: Path) -> None:
    """``<name>.json`` and ``<name>.md``, each written atomically."""
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
        path = folder / f"{result['name']}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one row per variant and workload."""
    baseline = result.get("baseline", "the first variant")
    lines = [
        f"| variant | workload | tokens/s | x {baseline} | step s | train s | tokens/step | pad % "
        "| peak alloc GB | peak reserved GB | load s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row.get("error"):
            lines.append(f"| {row['variant']} | {row['workload']} | failed: {row['error']} |")
            continue
        padded = row.get("padded_tokens_per_step")
        pad = 100 * (1 - row["tokens_per_step"] / padded) if padded else None
        lines.append(
            f"| {row['variant']} | {row['workload']} | {row['tokens_per_s']:,.0f} "
            f"| {_fmt(row.get('ratio'), '.2f')} | {row['step_time_s']:.3f} "
            f"| {_fmt(row.get('train_time_s'), '.1f')} "
            f"| {row['tokens_per_step']:,.0f} | {_fmt(pad, '.0f')} "
            f"| {_fmt(row.get('peak_alloc_gb'), '.1f')} | {_fmt(row.get('peak_reserved_gb'), '.1f')} "
            f"| {_fmt(row.get('load_s'), '.0f')} | {_fmt(row.get('mfu'), '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    """Table plus what it was measured on and with: device, versions, date, command."""
    setup = result["setup"]
    env = setup["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    notes = [
        f"- `{v['name']}`: {v['note'] or ' '.join(v['overrides']) or 'the seed configuration'}"
        for v in result["config"]["variants"]
    ]
    made = setup.get("make_random_s")
    lines = [
        f"## {result['name']}",
        "",
        f"- date: {result['date']}",
        f"- device: {env['device']}"
        + (f" (CUDA {env['cuda']}, driver {env['driver']})" if env.get("cuda") != "cpu" else "")
        + f"; measured {setup['matmul_dtype']} matmul rate {setup['matmul_tflops']:.3g} TFLOP/s",
        f"- versions: {versions}",
        f"- model: `{result['config']['model']}`: {setup['total_params'] / 1e9:.2f} B parameters, "
        f"{setup['active_params'] / 1e9:.2f} B active"
        + (f"; built by make-random in {made:.0f} s" if made is not None else ""),
        f"- command: `{result['command']}`",
        f"- steps: {result['config']['warmup_steps']} warm-up + {result['config']['steps']} timed "
        "per workload unless the workload says otherwise",
        "",
        table(result),
        "Variants:",
        *notes,
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Child: setup (checkpoint, matmul rate, environment) and one variant.


def _child_main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    bench = from_dict(BenchConfig, job["bench"])
    if job["kind"] == "setup":
        out = setup_job(bench)
    else:
        from mxlora.distributed import setup, teardown

        (variant,) = [v for v in bench.variants if v.name == job["variant"]]
        info = setup()  # several processes when the parent started it under torchrun
        try:
            out = variant_job(bench, variant, info)
        finally:
            teardown(info)
        if not info.is_main:
            return 0
    Path(out_path).write_text(json.dumps(out))
    return 0


def setup_job(bench: BenchConfig) -> dict[str, Any]:
    """Build the checkpoint if asked, count its parameters, measure the matmul rate."""
    import torch

    from mxlora.model.configs import parameter_counts
    from mxlora.model.load import checkpoint_config, default_device, resolve_dtype
    from mxlora.report.writer import environment

    device = default_device()
    out: dict[str, Any] = {"environment": environment(device)}
    folder = Path(bench.model)
    if bench.make_random is not None and not (folder / "config.json").is_file():
        from mxlora.model.random import make_random, resolve_config

        print(f"bench: building {folder} with make-random ({bench.make_random})", flush=True)
        done = make_random(
            folder, resolve_config(bench.make_random), seed=bench.seed, device=device, log=True
        )
        out["make_random_s"] = done.seconds
        print(f"bench: make-random took {done.seconds:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    counts = parameter_counts(checkpoint_config(bench.model))
    out.update(total_params=counts["total"], active_params=counts["active"])
    dtype = resolve_dtype(variant_config(bench, bench.variants[0]).model.dtype, device)
    out["matmul_dtype"] = str(dtype).removeprefix("torch.")
    out["matmul_tflops"] = measure_matmul_tflops(device, dtype)
    print(f"bench: {out['matmul_dtype']} matmul {out['matmul_tflops']:.1f} TFLOP/s", flush=True)
    return out


def measure_matmul_tflops(device, dtype) -> float:
    """Median rate of a square matrix product on ``device`` (TFLOP/s), on random data."""
    import torch

    n = MATMUL_SIZE[device.type]
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    times = []
    for i in range(MATMUL_REPEATS + 3):  # the first 3 warm up (library load, heuristics)
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_job(bench: BenchConfig, variant: Variant, info=None) -> dict[str, Any]:
    """Load the model as ``variant`` says, attach LoRA, time every workload (``info``: this
    process's place in the variant's torchrun job, when ``gpus`` > 1)."""
    import torch
    from transformers import set_seed

    from mxlora.distributed import DistInfo
    from mxlora.model.load import default_device, load_model
    from mxlora.model.lora import apply_lora

    cfg = variant_config(bench, variant)
    info = info or DistInfo(device=default_device())
    device = info.device if info.distributed else default_device()
    print(f"bench: {variant.name}: loading {bench.model}", flush=True)
    try:
        experts = variant_experts(bench, cfg, device, info.world_size)
    except Exception as e:  # as a load failure: the variant cannot run
        return {"error": f"load: {_one_line(e)}"}
    start = time.perf_counter()
    try:
        model, tokenizer = load_model(dataclasses.replace(cfg.model, experts=experts), device)
        _sync(device)
    except Exception as e:  # a variant that cannot load is a result, not a crash of the bench
        return {"error": f"load: {_one_line(e)}"}
    load_s = time.perf_counter() - start
    # What transformers actually chose (a requested backend it cannot use may fall back).
    backends = {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": model.config._experts_implementation,
    }
    from mxlora.mxfp4.experts import Mxfp4Experts

    if any(isinstance(m, Mxfp4Experts) for m in model.modules()):
        # experts: mxfp4 (explicit or auto): our layer replaced transformers': name its path.
        backend = next(m.backend for m in model.modules() if isinstance(m, Mxfp4Experts))
        backends["experts_implementation"] = f"mxfp4-{backend}"
    print(f"bench: {variant.name}: loaded in {load_s:.1f} s; {backends}", flush=True)
    model.config.use_cache = False  # as mxlora train: the KV cache is useless in training
    set_seed(cfg.train.seed)
    model = apply_lora(model, cfg.lora)
    rows = []
    for workload in bench.workloads:
        row = {"variant": variant.name, "workload": workload.name, **backends}
        try:
            row.update(time_workload(model, tokenizer, cfg, bench, workload, device, info))
            row["gpus"] = info.world_size
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # record and go on with the next workload
            row["error"] = _one_line(e)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"bench: {variant.name}: {_row_line(row)}", flush=True)
        rows.append(row)
    return {"load_s": load_s, "rows": rows}


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['workload']}: failed: {row['error']}"
    return (
        f"{row['workload']}: {row['tokens_per_s']:,.0f} tokens/s, step {row['step_time_s']:.3f} s, "
        f"train {row['train_time_s']:.1f} s, "
        f"peak {_fmt(row['peak_alloc_gb'], '.1f')} / {_fmt(row['peak_reserved_gb'], '.1f')} GB"
    )


def workload_dataset(workload: Workload, tokenizer: Any, max_len: int, rows: int, seed: int):
    """The rows a workload trains on: ``input_ids`` + ``completion_mask``, as training's are."""
    import datasets
    import torch

    from mxlora.data import prepare_data

    if workload.data is not None:
        return prepare_data(workload.data, tokenizer, max_len).train
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ORDINARY_TOKENS, (rows, workload.length), generator=gen)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "completion_mask": [[1] * workload.length] * rows}
    )


def workload_config(
    cfg: TrainingConfig, bench: BenchConfig, workload: Workload
) -> tuple[TrainingConfig, int, int | None]:
    """The variant's config as ``workload`` trains it (its batch, its steps or one epoch, no
    evaluation, checkpoint or metrics line inside the measured steps), its warm-up steps and
    its timed steps (``None``: the epoch's)."""
    if workload.epoch:
        warmup, steps = 0, None
        run = dataclasses.replace(
            cfg.train, batch_size=workload.batch, epochs=1.0, max_steps=-1, eval="no"
        )
    else:
        warmup = bench.warmup_steps if workload.warmup_steps is None else workload.warmup_steps
        steps = bench.steps if workload.steps is None else workload.steps
        run = dataclasses.replace(
            cfg.train, batch_size=workload.batch, max_steps=warmup + steps, eval="no"
        )
    run = dataclasses.replace(run, save_steps=10**9, logging_steps=10**9)
    return dataclasses.replace(cfg, train=run), warmup, steps


def variant_experts(bench: BenchConfig, cfg: TrainingConfig, device, world_size: int = 1) -> str:
    """``model.experts`` as ``mxlora train`` resolves it for every workload of the bench
    (:func:`mxlora.recipes.dryrun.training_experts`): the model is loaded once per variant, so
    ``mxfp4`` if any workload would hold its experts so."""
    from mxlora.model.load import load_tokenizer
    from mxlora.recipes.dryrun import training_experts

    if cfg.model.experts != "auto":
        return cfg.model.experts
    tokenizer = functools.cache(lambda: load_tokenizer(cfg.model))  # only if rows are asked for
    chosen = set()
    for workload in bench.workloads:
        workload = dataclasses.replace(workload, batch=workload.batch * world_size)
        run, warmup, steps = workload_config(cfg, bench, workload)

        def lengths(workload=workload, run=run, rows=workload.batch * (warmup + (steps or 0))):
            dataset = workload_dataset(workload, tokenizer(), run.train.max_len, rows, bench.seed)
            return [len(ids) for ids in dataset["input_ids"]]

        chosen.add(training_experts(run, device, lengths)[0])
    return "mxfp4" if "mxfp4" in chosen else chosen.pop()


def time_workload(
    model, tokenizer, cfg: TrainingConfig, bench: BenchConfig, workload: Workload, device, info=None
) -> dict[str, Any]:
    """Train ``workload`` with mxlora train's engine for ``cfg``; the figures.

    Under torchrun (``info``, a variant's ``gpus``) ``workload.batch`` rows per process: the
    global batch is ``batch * world_size`` rows, tokens are global, the memory peaks the
    largest of any process.
    """
    import torch

    from mxlora.distributed import DistInfo
    from mxlora.report.metrics import peak_device_gb

    info = info or DistInfo(device=device)
    if info.world_size > 1 and cfg.train.engine != "mxlora":
        raise BenchError("gpus > 1 needs train.engine=mxlora")
    workload = dataclasses.replace(workload, batch=workload.batch * info.world_size)
    cfg, warmup, steps = workload_config(cfg, bench, workload)
    rows = workload.batch * (warmup + (steps or 0))
    dataset = workload_dataset(workload, tokenizer, cfg.train.max_len, rows, bench.seed)
    if cfg.train.fsdp:
        from mxlora.distributed import shard_model

        # Sharded before the peaks are reset (the loop's own call is then a no-op): the peak is
        # training's, not that of sharding a model each rank generated whole.
        shard_model(model, info)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timed = _time_mxlora if cfg.train.engine == "mxlora" else _time_trl
    with tempfile.TemporaryDirectory(prefix="mxlora-bench-run-") as run_dir:
        times, tokens, padded, loss, extra = timed(
            model, tokenizer, cfg, dataset, device, run_dir, info
        )
    peak_alloc, peak_reserved = _max_over_ranks(peak_device_gb(device), info)
    steps = len(times) if steps is None else steps
    if len(times) != warmup + steps:
        raise BenchError(f"{workload.name}: timed {len(times)} steps, expected {warmup + steps}")
    timed_times, timed_tokens = times[warmup:], tokens[warmup:]
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "tokens_per_s": sum(timed_tokens) / sum(timed_times),
        "step_time_s": sum(timed_times) / steps,
        "step_time_s_median": statistics.median(timed_times),
        # Every step's time, warm-up included: where one-time costs (kernel compiles, graph
        # captures) land in a run.
        "step_times_s": [round(t, 5) for t in times],
        "tokens_per_step": sum(timed_tokens) / steps,
        "padded_tokens_per_step": sum(padded[warmup:]) / steps,
        "train_time_s": sum(times),
        "peak_alloc_gb": peak_alloc,
        "peak_reserved_gb": peak_reserved,
        "train_loss": loss,
        **extra,
    }


def _max_over_ranks(
    values: tuple[float | None, float | None], info
) -> tuple[float | None, float | None]:
    """The largest of each value over the job's processes (per-GPU memory peaks)."""
    if not info.distributed or values[0] is None:
        return values
    import torch

    box = torch.tensor(values, dtype=torch.float64, device=info.device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return tuple(box.tolist())


def _time_mxlora(model, tokenizer, cfg, dataset, device, run_dir, info=None):
    """mxlora's loop, each step's time and tokens recorded as it reports them."""
    from mxlora.engine.loop import Loop
    from mxlora.model.load import resolve_dtype

    recorder = StepRecorder(Path(run_dir) / "metrics.jsonl", device, print_lines=False)
    loop = Loop(
        cfg,
        model,
        train_rows=dataset.to_dict(),
        eval_rows=None,
        pad_id=tokenizer.pad_token_id,
        device=device,
        dtype=resolve_dtype(cfg.model.dtype, device),
        metrics=recorder,
        run_dir=Path(run_dir),
        info=info,
        sharded=cfg.train.fsdp,
    )
    result = loop.run()
    extra = {
        "compiled": result.compiled,
        "cuda_graphs": result.cuda_graphs,
        "checkpointed_blocks": result.checkpointed_blocks,
        "attention": result.attention,
    }
    loss = statistics.fmean(loop.history.losses)
    return recorder.times, loop.history.tokens, loop.history.packed, loss, extra


def _time_trl(model, tokenizer, cfg, dataset, device, run_dir, info=None):
    """TRL's SFTTrainer as mxlora train builds it, timed by a callback."""
    from transformers import PrinterCallback

    from mxlora.model.load import resolve_dtype
    from mxlora.recipes.train import all_or_none, padded_checkpointing, sft_config

    dtype = resolve_dtype(cfg.model.dtype, device)
    checkpointing = padded_checkpointing(cfg, model, dataset["input_ids"], dtype, device)
    timer = StepTimer(device)
    args = sft_config(cfg, Path(run_dir), dtype, False, False, checkpointing)
    trainer = _bench_trainer()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)
    output = trainer.train()
    padded = trainer.padded_tokens_per_step()
    extra = {
        "compiled": False,
        "cuda_graphs": False,
        "checkpointed_blocks": all_or_none(checkpointing, model),
    }
    return timer.times, timer.tokens, padded, output.training_loss, extra


def _bench_trainer():
    """mxlora train's trainer, also counting the padded tokens of each step's batches."""
    from mxlora.recipes.train import GuardedSFTTrainer

    class BenchTrainer(GuardedSFTTrainer):
        padded_tokens: list[tuple[int, int]]

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not hasattr(self, "padded_tokens"):
                self.padded_tokens = []
            step = self.state.global_step
            self.padded_tokens.append((step, int(inputs["input_ids"].numel())))
            return super().training_step(model, inputs, num_items_in_batch)

        def padded_tokens_per_step(self) -> list[int]:
            per_step: dict[int, int] = {}
            for step, count in self.padded_tokens:
                per_step[step] = per_step.get(step, 0) + count
            return [per_step[k] for k in sorted(per_step)]

    return BenchTrainer


class StepRecorder(MetricsLog):
    """A :class:`mxlora.report.metrics.MetricsLog` that also keeps every step's time."""

    def __init__(self, path: Path, device, print_lines: bool) -> None:
        super().__init__(path, device, print_lines)
        self.times: list[float] = []

    def step_done(self, elapsed: float) -> None:
        super().step_done(elapsed)
        self.times.append(elapsed)


class StepTimer(TrainerCallback):
    """Per optimizer step: wall time with the device synchronized, and non-pad tokens trained
    (the trainer's ``num_input_tokens_seen``, attention-mask sums, grows inside the step)."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._start = 0.0
        self._seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._seen = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen


# --------------------------------------------------------------------------------------------
# Command line.


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora bench CONFIG [key=value ...] [--only a,b]``."""
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    command = shlex.join(["mxlora", "bench", args.config, *args.overrides]) + (
        f" --only {args.only}" if args.only else ""
    )
    try:
        bench = load_bench_config(args.config, args.overrides)
        result = run_bench(bench, only, command)
    except (ConfigError, BenchError) as e:
        print(f"mxlora bench: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print()
    print(markdown(result))
    print(f"results: {Path(bench.results) / (bench.name + '.json')}")
    return 0 if all("error" not in row for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:]))
