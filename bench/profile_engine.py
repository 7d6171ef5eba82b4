"""Where a step of mxlora's training loop spends its time: wall, GPU busy, kernel launches.

Loads a bench config's variant as ``mxlora bench`` does, trains ``--warm`` steps of a workload
with :class:`mxlora.engine.loop.Loop` (compilation and, after the second bucket length, the
dynamic-shape graph happen there), times ``--wall`` steps, then runs ``--profiled`` steps under
``torch.profiler``. Several workloads in one call share the model, so later ones run the graph
earlier ones compiled (as a real run with varying lengths does)::

    PYTHONPATH=src python3 bench/profile_engine.py bench/configs/gpt-oss-20b.yaml quotes-epoch 4x2048

GPU busy and launches count kernels only: the profiler also lists each kernel's time under the
op that launched it, and summing both rows would count it twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mxlora.engine.loop import Loop
from mxlora.model.load import default_device, load_model, resolve_dtype
from mxlora.model.lora import apply_lora
from mxlora.recipes.bench import BenchConfig, load_bench_config, variant_config, workload_dataset
from mxlora.report.metrics import MetricsLog


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_workload(
    model, tokenizer, bench: BenchConfig, cfg, name: str, warm: int, wall: int, profiled: int
) -> dict[str, Any]:
    """Train ``warm + wall + profiled`` steps of workload ``name``; the step's figures.

    Returns:
        ``wall_s`` (mean step time of the ``wall`` steps), ``tokens`` (their mean non-pad
        tokens), ``busy_s`` and ``launches`` (per profiled step, kernels only), ``compiled``,
        ``checkpointing``, ``cuda_graphs``, ``peak_gb`` and the profiler's ``table`` (top device time).
    """
    (workload,) = [w for w in bench.workloads if w.name == name]
    device = next(model.parameters()).device
    steps = warm + wall + profiled
    run = dataclasses.replace(
        cfg.train,
        batch_size=workload.batch,
        epochs=1.0,
        max_steps=steps,
        eval="no",
        save_steps=10**9,
        logging_steps=10**9,
    )
    cfg = dataclasses.replace(cfg, train=run)
    rows = workload_dataset(workload, tokenizer, run.max_len, workload.batch * steps, bench.seed)
    dtype = resolve_dtype(cfg.model.dtype, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="mxlora-profile-") as folder:
        metrics = MetricsLog(Path(folder) / "metrics.jsonl", device, print_lines=False)
        loop = Loop(
            cfg,
            model,
            rows.to_dict(),
            None,
            tokenizer.pad_token_id,
            device,
            dtype,
            metrics,
            Path(folder),
        )
        metrics.begin(0)
        with loop.prepared() as setup:
            for step in loop.plan[:warm]:
                loop.train_step(step)
            _sync(device)
            start = time.perf_counter()
            for step in loop.plan[warm : warm + wall]:
                loop.train_step(step)
            _sync(device)
            wall_s = (time.perf_counter() - start) / wall
            with profile(activities=activities) as prof:
                for step in loop.plan[warm + wall :]:
                    loop.train_step(step)
                _sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    return {
        "wall_s": wall_s,
        "tokens": sum(loop.history.tokens[warm : warm + wall]) / wall,
        "busy_s": sum(e.self_device_time_total for e in kernels) / profiled / 1e6,
        "launches": sum(e.count for e in kernels) / profiled,
        "compiled": setup.compiled,
        "checkpointing": f"{setup.checkpointed} of {len(loop.causal_lm.model.layers)}",
        "cuda_graphs": setup.cuda_graphs,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0,
        "table": events.table(
            sort_by="self_device_time_total" if kernels else "self_cpu_time_total", row_limit=30
        ),
        "ops": _by_op(events, profiled),
    }


def _by_op(events, steps: int, rows: int = 40) -> str:
    """The operators that launched the most GPU time (a kernel counted under the op that
    launched it), per step; empty when a graph replay launched the kernels (no op to name)."""
    ops = [e for e in events if e.device_type != DeviceType.CUDA and e.self_device_time_total > 0]
    ops.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"{'op (kernels it launched)':60} {'ms/step':>8} {'calls/step':>10}"]
    for e in ops[:rows]:
        ms = e.self_device_time_total / steps / 1e3
        lines.append(f"{e.key[:60]:60} {ms:8.2f} {e.count / steps:10.0f}")
    return "\n".join(lines) if ops else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="bench config YAML")
    parser.add_argument("workloads", nargs="+", help="workload names of the config")
    parser.add_argument("--variant", default="default", help="variant name (default: default)")
    parser.add_argument("--warm", type=int, default=8, help="untimed steps (default 8)")
    parser.add_argument("--wall", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--profiled", type=int, default=2, help="profiled steps (default 2)")
    args = parser.parse_args(argv)
    bench = load_bench_config(args.config)
    (variant,) = [v for v in bench.variants if v.name == args.variant]
    cfg = variant_config(bench, variant)
    model, tokenizer = load_model(cfg.model, default_device())
    model.config.use_cache = False
    model = apply_lora(model, cfg.lora)
    for name in args.workloads:
        r = profile_workload(
            model, tokenizer, bench, cfg, name, args.warm, args.wall, args.profiled
        )
        busy = f"{r['busy_s'] * 1e3:.0f} ms ({100 * r['busy_s'] / r['wall_s']:.0f} %)"
        print(
            f"=== {name}: step {r['wall_s'] * 1e3:.0f} ms wall, {r['tokens']:.0f} tokens, "
            f"GPU busy {busy}, {r['launches']:.0f} kernel launches, compiled={r['compiled']}, "
            f"checkpointing={r['checkpointing']}, cuda_graphs={r['cuda_graphs']}, peak {r['peak_gb']:.1f} GB",
            flush=True,
        )
        print(r["table"], flush=True)
        print(r["ops"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
