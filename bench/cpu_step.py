"""CPU time of one training step of the tiny gpt-oss, ``experts: mxfp4`` against
``experts: dequantize-bf16`` (issue 9's CPU item: the torch path no slower than the seed mode).

The step of ``tests/test_mxfp4_ops.py``'s timed test (``tiny:layers=24``, the seed's LoRA, one
row of 24 tokens, AdamW), both models in one process, steps alternating between them (the order
flipping every round) so that both see the same machine; CPU time of this process
(``time.process_time``), one thread. Prints the fastest step of each and their ratio, and the
median over rounds of the two steps' ratio within a round (less sensitive to a machine whose
speed drifts). ``--time-dequant`` also times the mxfp4 step's dequantizations (wall time
inside the step, per step). Run it from a checkout (``PYTHONPATH=OTHER/src`` times another one)::

    OMP_NUM_THREADS=1 python bench/cpu_step.py --rounds 40 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxlora.config import LoraConfig, ModelConfig
from mxlora.model.load import load_weights
from mxlora.model.lora import apply_lora
from mxlora.mxfp4 import ops

MODES = ("mxfp4", "dequantize-bf16")


def trainer(experts: str, dtype: str, spec: str = "tiny:layers=24"):
    """One training step of the tiny model ``spec`` in ``experts`` mode, as a closure timing
    itself (CPU time of this process, not wall time: other processes sharing the cores do not
    count; CI and development machines are busy)."""
    config = ModelConfig(name_or_path=spec, experts=experts, dtype=dtype)
    model = load_weights(config, "cpu")
    torch.manual_seed(0)
    model = apply_lora(model, LoraConfig())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        start = time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.process_time() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2, help="rounds left out")
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--time-dequant", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dequant = [0.0, 0]  # seconds, calls
    if args.time_dequant:
        untimed = ops._dequantize_torch

        def timed(*a):
            start = time.perf_counter()
            w = untimed(*a)
            dequant[0] += time.perf_counter() - start
            dequant[1] += 1
            return w

        ops._dequantize_torch = timed
    for dtype in args.dtype:
        steps = {mode: trainer(mode, dtype) for mode in MODES}
        dequant[:] = [0.0, 0]
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.rounds):
            for mode in MODES[:: 1 if i % 2 else -1]:
                times[mode].append(steps[mode]())
        mx, dq = (times[mode][args.warmup :] for mode in MODES)
        print(
            f"{dtype}: fastest step mxfp4 {min(mx) * 1e3:.1f} ms, dequantize-bf16 "
            f"{min(dq) * 1e3:.1f} ms, ratio {min(mx) / min(dq):.3f}; median ratio within a "
            f"round {statistics.median(a / b for a, b in zip(mx, dq, strict=True)):.3f}"
        )
        if args.time_dequant:
            print(
                f"  dequantization: {dequant[0] / args.rounds * 1e3:.1f} ms a step, "
                f"{dequant[1] // args.rounds} calls, {dequant[0] / dequant[1] * 1e6:.0f} us each"
            )


if __name__ == "__main__":
    main()
