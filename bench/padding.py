"""How much of the engine's packed epochs is bucket padding, and what it cost the experts (CPU).

    python bench/padding.py [bench/configs/gpt-oss-20b.yaml] [--workloads quotes-epoch,gsm8k-epoch]

For each epoch workload of a bench config: the packed lengths (buckets of 128 tokens) with how
often each occurs (each bucket used at least three times is one CUDA-graph capture), the real
and padding tokens per micro-batch, and a *model* of the MXFP4 expert kernel's 128-row tiles per
matmul with the padding computed (before the experts skipped it) and skipped: the padding tokens
are identical, so all of them route to the same ``k`` experts; the real tokens are routed top-k
over random logits with per-layer expert shares drawn from Dirichlet(3) (gpt-oss's trained
router is not available here). Forward tiles count a rest of at most 64 rows as 0.64 of a tile
(the forward's tail launch, mxlora.mxfp4.triton_kernels.TAIL_SPLITS); input-gradient tiles are
whole. It times nothing: what the GPU gains is measured by the bench.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch
from transformers import AutoTokenizer

from mxlora.data import prepare_data
from mxlora.engine.packing import bucketed, plan_steps
from mxlora.model.configs import gpt_oss_20b_config
from mxlora.model.tokenizer import ensure_tokenizer
from mxlora.recipes.bench import load_bench_config

HEAD, TAIL, TAIL_COST = 128, 64, 0.64


def forward_tiles(rows: int) -> float:
    full, rest = divmod(rows, HEAD)
    return full + (0 if rest == 0 else TAIL_COST if rest <= TAIL else 1)


def gradient_tiles(rows: int) -> float:
    return math.ceil(rows / HEAD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="bench/configs/gpt-oss-20b.yaml")
    parser.add_argument("--workloads", default="quotes-epoch,gsm8k-epoch")
    args = parser.parse_args(argv)
    bench = load_bench_config(args.config)
    model = gpt_oss_20b_config()
    experts, k = model["num_local_experts"], model["num_experts_per_tok"]
    layers = model["num_hidden_layers"]
    tokenizer = AutoTokenizer.from_pretrained(ensure_tokenizer())
    gen = torch.Generator().manual_seed(0)
    share_prior = torch.distributions.Dirichlet(torch.full((experts,), 3.0))
    for workload in (w for w in bench.workloads if w.name in args.workloads.split(",")):
        data = prepare_data(workload.data, tokenizer, 2048).train
        lengths = [len(ids) for ids in data["input_ids"]]
        plan = plan_steps(len(lengths), workload.batch, 1, 1.0, -1, 42)
        batches = [sum(lengths[i] for i in mb) for step in plan for mb in step.micro_batches]
        buckets = Counter(bucketed(t) for t in batches)
        padding = sum(bucketed(t) - t for t in batches)
        tiles = Counter()
        for real in batches:
            pad = bucketed(real) - real
            for _ in range(layers):
                logits = share_prior.sample().log() + torch.randn(real, experts, generator=gen)
                counts = torch.bincount(logits.topk(k, -1).indices.flatten(), minlength=experts)
                skipped = counts.tolist()
                computed = list(skipped)
                for e in torch.randperm(experts, generator=gen)[:k].tolist():
                    computed[e] += pad
                for name, rows in (("computed", computed), ("skipped", skipped)):
                    tiles[f"forward {name}"] += sum(map(forward_tiles, rows))
                    tiles[f"gradient {name}"] += sum(map(gradient_tiles, rows))
        n = len(batches)
        print(
            f"{workload.name}: {n} micro-batches; packed lengths (uses): "
            + ", ".join(f"{b} ({c})" for b, c in sorted(buckets.items()))
        )
        print(
            f"  tokens per micro-batch: {sum(batches) / n:.0f} real, {padding / n:.0f} padding "
            f"({100 * padding / (sum(batches) + padding):.1f} % of the packed tokens)"
        )
        for direction in ("forward", "gradient"):
            before, after = tiles[f"{direction} computed"], tiles[f"{direction} skipped"]
            print(
                f"  model, {direction} row tiles per matmul: {before / n / layers:.1f} with the "
                f"padding, {after / n / layers:.1f} without ({100 * (1 - after / before):.1f} % fewer)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
