"""Time ``mxlora export`` on a full-size gpt-oss and print what docs/BENCHMARKS.md records.

Wall time, output size, host peak RSS (``VmHWM`` of this process, read right after the write,
before any logit check) and the fidelity figures of every adapted expert weight. Needs only
torch, transformers, peft and safetensors, with this repository's ``src/`` on ``PYTHONPATH``
(no trl, no datasets). On the GPU machine, after ``mxlora make-random /data/gpt-oss-20b
--config 20b``::

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/export_20b.py \\
        --base /data/gpt-oss-20b --out /data/export-20b [--adapter DIR] [--logit-check] \\
        [--experts merge|keep-adapter] [--json bench/results/export-20b.json]

Without ``--adapter`` a random adapter shaped like the seed's (r=8, alpha=16, attention
``all-linear``, the experts of ``--expert-layers``, by default 7, 15 and 23;
``lora_B ~ N(0, --b-std)``) is written to
``<out>-adapter`` first (reused when it is there). ``--logit-check`` also compares logits with the
bf16 merge (holds the bf16 merge, 42 GB for 20b, on the GPU). Run it in a fresh process: the
peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

SEED_EXPERT_LAYERS = (7, 15, 23)


def peak_rss_bytes() -> int:
    """This process's peak resident set size, ``VmHWM`` from ``/proc/self/status`` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def run(
    base: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    expert_layers: tuple[int, ...] = SEED_EXPERT_LAYERS,
    experts: str = "merge",
    logit_check: bool = False,
    b_std: float = 0.01,
) -> dict[str, Any]:
    """Export ``base`` + ``adapter`` (or a seed-shaped random one) to ``out``; return the figures.

    Returns:
        JSON-able: ``seconds`` (the export's write), ``output_bytes`` (all files of ``out``),
        ``peak_rss_bytes`` (``VmHWM`` after writing), ``weights`` (fidelity per adapted weight),
        ``logits`` (or ``None``), and what ran (``base``, ``adapter``, ``experts``, ``device``).
    """
    import torch

    from mxlora.config import ExpertTargets, LoraConfig
    from mxlora.model.lora import peft_config
    from mxlora.model.random import make_random_adapter
    from mxlora.recipes.export import export

    out = Path(out)
    if adapter is None:
        adapter = out.parent / f"{out.name}-adapter"
        if not (adapter / "adapter_config.json").is_file():
            lora = LoraConfig(experts=ExpertTargets(layers=list(expert_layers)))
            make_random_adapter(base, adapter, peft_config(lora), b_std=b_std)
    report = export(str(base), adapter, out, experts=experts, logit_check=False, log=True)
    rss = peak_rss_bytes()  # the write's peak: before the logit check loads whole models
    logits = None
    if logit_check:
        from mxlora.recipes.export import logit_agreement

        start = time.perf_counter()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logits = logit_agreement(str(base), Path(adapter).resolve(), out, experts, device)
        logits["seconds"] = time.perf_counter() - start
    return {
        "base": str(base),
        "adapter": str(adapter),
        "experts": experts,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "seconds": report.seconds,
        "output_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "tensor_bytes": report.bytes_written,
        "peak_rss_bytes": rss,
        "weights": [w.__dict__ for w in report.weights if w.format == "mxfp4"],
        "logits": logits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="MXFP4 gpt-oss folder (make-random 20b)")
    parser.add_argument("--out", required=True, help="export folder (must not exist)")
    parser.add_argument(
        "--adapter", default=None, help="PEFT adapter (default: seed-shaped random)"
    )
    parser.add_argument(
        "--expert-layers",
        default=",".join(map(str, SEED_EXPERT_LAYERS)),
        help="expert layers of the random adapter (default 7,15,23, the seed's)",
    )
    parser.add_argument("--experts", choices=("merge", "keep-adapter"), default="merge")
    parser.add_argument("--logit-check", action="store_true", help="logits vs the bf16 merge")
    parser.add_argument("--b-std", type=float, default=0.01, help="random adapter's lora_B std")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(
        args.base,
        args.out,
        adapter=args.adapter,
        expert_layers=tuple(int(x) for x in args.expert_layers.split(",")),
        experts=args.experts,
        logit_check=args.logit_check,
        b_std=args.b_std,
    )
    print(
        f"export {result['experts']} on {result['device']}: {result['seconds']:.1f} s, output "
        f"{result['output_bytes'] / 1e9:.2f} GB, host peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB"
    )
    for w in result["weights"]:
        print(
            f"  {w['name']:<44} |ΔW| {w['delta_norm']:.3e}  kept {w['realized_ratio']:.3f}  "
            f"cos {w['cosine']:.3f}  changed {w['changed_share']:.1%}"
        )
    if result["logits"] is not None:
        print("  logits vs bf16 merge:", json.dumps(result["logits"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
