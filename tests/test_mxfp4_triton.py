"""The Triton MXFP4 grouped GEMM against the pure-PyTorch reference, on the CPU.

The kernel runs in Triton's interpreter, in a child process (tests/mxfp4_triton_worker.py): the
interpreter has to be chosen before Triton is imported and then holds for the whole process, so
it must not leak into the pytest worker that other tests share. This module builds every input,
the child computes the kernel's outputs in one go (once a session), and each test
compares one of them with the reference computed here.

Two limits of the interpreter (Triton 3.9) shape the bf16 checks: its ``tl.dot`` cannot take bf16
operands (triton#11584), so under the interpreter the kernel upcasts them to fp32 (exact
products, fp32 sums: the tensor-core arithmetic bar summation order); and its fp32 -> bf16 cast
truncates where the GPU rounds to nearest even, so bf16 outputs may differ from the reference by
one bf16 ulp. fp32 runs the kernel's own dot in full fp32 and must match to 1e-5.

What the interpreter cannot show (tensor-core dots, real tiling on sm_90) is covered by compiling
the kernel for sm_90 here (Triton's own ptxas, no GPU needed) and by
tests/test_mxfp4_triton_gpu.py on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from transformers import GptOssConfig

from mxlora.model.configs import gpt_oss_20b_config
from mxlora.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from mxlora.mxfp4.experts import Mxfp4Experts, grouped_mxfp4_matmul_reference
from mxlora.mxfp4.kernels import KERNELS_ENV, kernel_available, resolve_backend
from mxlora.paths import cache_dir
from test_mxfp4_experts import CASES as LAYER_CASES
from test_mxfp4_experts import make_pair, routing, run

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("mxfp4_triton_worker.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    experts: int
    n_in: int
    n_out: int
    counts: tuple[int, ...]
    #: Spread of the per-block gains, in powers of two: wide spreads give wide-ranging scales.
    log2_spread: int = 0


# Multiples of 32 (MXFP4 blocks), not of the interpreter's 64-wide tiles; row counts not
# multiples of its 16-row tiles.
SHAPES = {
    "one-token": Shape(3, 64, 96, (0, 1, 0)),
    "all-to-one-expert": Shape(4, 96, 64, (0, 0, 37, 0)),
    "idle-expert-E5": Shape(5, 160, 96, (7, 0, 19, 1, 16)),
    "one-expert-E1": Shape(1, 96, 160, (33,)),
    "wide-scales": Shape(2, 64, 96, (17, 20), log2_spread=40),
    "no-rows": Shape(2, 64, 64, (0, 0)),
}
AUTOGRAD_SHAPES = ("one-token", "idle-expert-E5")
# Every GPU tile config on one shape that is smaller than, and not a multiple of, each tile.
CONFIG_SHAPE = Shape(3, 96, 320, (130, 0, 77))
# Head/tail launches (32-row head tiles, tails of at most 16 rows): experts with a tail only
# (7, 16 rows), none (0, 17: a remainder over 16 takes a head tile, 32), both (33, 50 = 32 + 18:
# two head tiles).
SPLIT_SHAPE = Shape(7, 96, 160, (7, 0, 16, 17, 32, 33, 50))
# Rows past the last expert's (more than one 16- or 32-row tile), and padding tokens after the
# real ones of the layer test.
PAD_ROWS = 37
PADDED_TOKENS, PAD_TOKENS = 9, 5


def weights(shape: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape.experts, shape.n_out, shape.n_in, generator=gen)
    groups = (shape.experts, shape.n_out, shape.n_in // 32, 1)
    gain = torch.randint(-shape.log2_spread, shape.log2_spread + 1, groups, generator=gen)
    return quantize_mxfp4((w.view(*groups[:-1], 32) * torch.exp2(gain.float())).view(w.shape))


def activations(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


def matmul_job(shape: Shape, dtype, transpose: bool, seed: int, config=None) -> dict:
    blocks, scales = weights(shape, seed)
    width = shape.n_out if transpose else shape.n_in
    x = activations(sum(shape.counts), width, dtype, seed + 1)
    return dict(x=x, blocks=blocks, scales=scales, counts=shape.counts, transpose=transpose,
                config=config)  # fmt: skip


def identity_jobs() -> dict[str, dict]:
    """x = I per expert, so the kernel's output is its dequantized weight itself (exactly).

    Every code, and every finite scale byte small enough that 6 * 2**(s - 127) is finite in fp32
    (s <= 252), byte 0 (the subnormal 2**-127) included.
    """
    gen = torch.Generator().manual_seed(7)
    n_experts, n_out, n_in = 2, 96, 64
    blocks = torch.randint(0, 256, (n_experts, n_out, n_in // 32, 16), generator=gen)
    scales = torch.randint(0, 253, (n_experts, n_out, n_in // 32), generator=gen)
    scales.view(-1)[:253] = torch.arange(253)
    blocks, scales = blocks.to(torch.uint8), scales.to(torch.uint8)
    jobs = {}
    for name, dtype in DTYPES.items():
        for transpose, width in ((False, n_in), (True, n_out)):
            x = torch.eye(width, dtype=dtype).repeat(n_experts, 1)
            jobs[f"identity-{name}-{direction(transpose)}"] = dict(
                x=x, blocks=blocks, scales=scales, counts=(width,) * n_experts,
                transpose=transpose, config=None,
            )  # fmt: skip
    return jobs


def direction(transpose: bool) -> str:
    return "transpose" if transpose else "forward"


def build_jobs() -> dict[str, dict]:
    matmul = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        for dname, dtype in DTYPES.items():
            for transpose in (False, True):
                job = matmul_job(shape, dtype, transpose, seed=10 * i)
                matmul[f"{name}-{dname}-{direction(transpose)}"] = job
    # x a column slice of a wider tensor: a row stride that is not the row width.
    for transpose in (False, True):
        job = matmul_job(SHAPES["idle-expert-E5"], torch.float32, transpose, seed=3)
        wide = torch.zeros(job["x"].shape[0], job["x"].shape[1] + 32)
        wide[:, 16 : 16 + job["x"].shape[1]] = job["x"]
        job["x"] = wide[:, 16 : 16 + job["x"].shape[1]]
        matmul[f"strided-x-fp32-{direction(transpose)}"] = job
    # fp16 (the kernel's third input dtype) and counts given as a tensor (no host sync on GPU).
    for transpose in (False, True):
        job = matmul_job(SHAPES["idle-expert-E5"], torch.float16, transpose, seed=4)
        matmul[f"idle-expert-E5-fp16-{direction(transpose)}"] = job
        job = matmul_job(SHAPES["idle-expert-E5"], torch.bfloat16, transpose, seed=4)
        job["counts"] = torch.tensor(job["counts"])
        matmul[f"counts-tensor-bf16-{direction(transpose)}"] = job
    # Each expert's rows split between two launches: head tiles of 32 rows, tails of at most 16.
    for dname, dtype in DTYPES.items():
        for transpose in (False, True):
            job = matmul_job(SPLIT_SHAPE, dtype, transpose, seed=50)
            job["split"] = SPLIT_CONFIGS
            matmul[f"split-{dname}-{direction(transpose)}"] = job
    # Rows past the last expert's (a packed batch's padding the experts skip), one launch and
    # split: the kernel writes them zero. Its output memory is poisoned with NaN first (the
    # worker), so that rows left unwritten would show.
    for dname, dtype in DTYPES.items():
        for transpose in (False, True):
            for split in (None, SPLIT_CONFIGS):
                job = matmul_job(SPLIT_SHAPE, dtype, transpose, seed=60)
                job["x"] = torch.cat(
                    (job["x"], activations(PAD_ROWS, job["x"].shape[1], dtype, 61))
                )
                job["split"], job["poison"] = split, True
                kind = "padding-split" if split else "padding"
                matmul[f"{kind}-{dname}-{direction(transpose)}"] = job
    for i, config, dname in gpu_configs():
        for transpose in (False, True):
            job = matmul_job(CONFIG_SHAPE, DTYPES[dname], transpose, seed=100 + i, config=config)
            matmul[f"config{i}-{dname}-{direction(transpose)}"] = job
    matmul.update(identity_jobs())

    autograd = {}
    for name in AUTOGRAD_SHAPES:
        shape = SHAPES[name]
        for dname, dtype in DTYPES.items():
            blocks, scales = weights(shape, seed=5)
            rows = sum(shape.counts)
            autograd[f"{name}-{dname}"] = dict(
                x=activations(rows, shape.n_in, dtype, 6),
                dy=activations(rows, shape.n_out, dtype, 8),
                blocks=blocks, scales=scales, counts=shape.counts,
            )  # fmt: skip

    layer = {}
    for name, spec in LAYER_CASES.items():
        x, indices, weights_ = routing(spec["tokens"], spec["k"], spec.get("indices"))
        grad_out = activations(spec["tokens"], x.shape[1], torch.float32, 2)
        layer[name] = dict(k=spec["k"], x=x, indices=indices, weights=weights_, grad_out=grad_out)
    # The last tokens are padding that the experts skip (mxlora.mxfp4.experts.padding_skipped):
    # alike, as a packed batch's are, and no gradient reaches them.
    x, indices, weights_ = routing(PADDED_TOKENS + PAD_TOKENS, 2)
    x[PADDED_TOKENS:] = x[PADDED_TOKENS]
    grad_out = activations(x.shape[0], x.shape[1], torch.float32, 2)
    grad_out[PADDED_TOKENS:] = 0
    layer["padding-skipped"] = dict(
        k=2, x=x, indices=indices, weights=weights_, grad_out=grad_out, padding_from=PADDED_TOKENS
    )
    dequantize = {}
    for name, shape in (
        ("idle-expert-E5", SHAPES["idle-expert-E5"]),
        ("wide-scales", SHAPES["wide-scales"]),
    ):
        blocks, scales = weights(shape, seed=11)
        for dname, dtype in DTYPES.items():
            dequantize[f"{name}-{dname}"] = dict(blocks=blocks, scales=scales, dtype=dtype)
    identity = identity_jobs()["identity-fp32-forward"]
    for dname, dtype in DTYPES.items():
        dequantize[f"every-code-and-scale-{dname}"] = dict(
            blocks=identity["blocks"], scales=identity["scales"], dtype=dtype
        )
    gate = {}
    for dname, dtype in DTYPES.items():
        gate[dname] = gate_job(dtype, seed=12)
    combine = {
        f"{dname}-{'weighted' if weighted else 'unweighted'}": combine_job(dtype, weighted, seed=15)
        for dname, dtype in DTYPES.items()
        for weighted in (True, False)
    }
    rotary = {dname: rotary_job(dtype, seed=16) for dname, dtype in DTYPES.items()}
    norm = {}
    for dname, dtype in DTYPES.items():
        norm[dname] = norm_job(dtype, seed=13)
    cross_entropy = {dname: cross_entropy_job(dtype, seed=14) for dname, dtype in DTYPES.items()}
    return {
        "matmul": matmul,
        "autograd": autograd,
        "layer": layer,
        "dequantize": dequantize,
        "gate": gate,
        "combine": combine,
        "rotary": rotary,
        "norm": norm,
        "cross_entropy": cross_entropy,
        "loop": {"batch": loop_batch()},
    }


#: gpt-oss's gate constants.
GATE_ALPHA, GATE_LIMIT = 1.702, 7.0


def gate_job(dtype: torch.dtype, seed: int) -> dict:
    """The gate's inputs on an odd shape (37 rows over 3 experts, I = 45, not multiples of any
    tile), values spread over both clamps, some exactly at +-limit (bounds pass the gradient)."""
    gen = torch.Generator().manual_seed(seed)
    rows, inter, experts = 37, 45, 3
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 6
    gate_up.view(-1)[::17] = GATE_LIMIT
    gate_up.view(-1)[5::19] = -GATE_LIMIT
    bias = torch.randn(experts, 2 * inter, generator=gen)
    bias[0] = 0.0  # expert 0's rows keep the exact bounds above
    expert_ids = torch.sort(torch.randint(0, experts, (rows,), generator=gen)).values
    grad = torch.randn(rows, inter, generator=gen)
    return dict(
        gate_up=gate_up.to(dtype), bias=bias.to(dtype), expert_ids=expert_ids,
        grad=grad.to(dtype), alpha=GATE_ALPHA, limit=GATE_LIMIT,
    )  # fmt: skip


def combine_job(dtype: torch.dtype, weighted: bool, seed: int) -> dict:
    """The combine's inputs on an odd shape: 23 tokens x top-3 over rows 150 wide (not a multiple
    of the interpreter's 64-wide column block: three masked passes), a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    tokens, k, width = 23, 3, 150
    src = torch.randn(tokens * k, width, generator=gen)
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1) if weighted else None
    index = torch.randperm(tokens * k, generator=gen).view(tokens, k)
    grad = torch.randn(tokens, width, generator=gen)
    return dict(
        src=src.to(dtype), weights=None if weights is None else weights.to(dtype), index=index,
        grad=grad.to(dtype),
    )  # fmt: skip


def rotary_job(dtype: torch.dtype, seed: int) -> dict:
    """The rotary embedding's inputs on an odd shape: 5 heads of 12 (halves of 6, not a power of
    two: the masked columns) over 7 tokens, the heads a view of a projection's ``[1, T, 60]``
    output as in transformers' attention; angles of gpt-oss's form, the gradient token-major
    and transposed (the layout the next op hands back)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, heads, dim = 7, 5, 12
    projected = torch.randn(1, tokens, heads * dim, generator=gen)
    angles = torch.randn(1, tokens, dim // 2, generator=gen) * 3
    grad = torch.randn(1, tokens, heads, dim, generator=gen).transpose(1, 2)
    return dict(
        projected=projected.to(dtype), heads=heads, cos=angles.cos().to(dtype),
        sin=angles.sin().to(dtype), grad=grad.to(dtype),
    )  # fmt: skip


def norm_job(dtype: torch.dtype, seed: int) -> dict:
    """RMSNorm inputs on an odd shape: [2, 19, 90] (H not a power of two: the row mask), rows of
    very different scales, a weight around 1 as trained norms have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 19, 90, generator=gen) * torch.logspace(-2, 2, 19)[:, None]
    weight = 1 + 0.3 * torch.randn(90, generator=gen)
    grad = torch.randn(2, 19, 90, generator=gen)
    return dict(x=x.to(dtype), weight=weight.to(dtype), grad=grad.to(dtype), eps=1e-5)


def cross_entropy_job(dtype: torch.dtype, seed: int) -> dict:
    """Loss rows on an odd shape: 7 rows of 1001 logits (not a multiple of the interpreter's
    64-column tile), spread wide as a model's are, targets at both ends, one ignored row."""
    gen = torch.Generator().manual_seed(seed)
    logits = 6 * torch.randn(7, 1001, generator=gen)
    targets = torch.tensor([0, 1000, -100, 63, 64, 500, 999])
    return dict(logits=logits.to(dtype), targets=targets)


@pytest.fixture
def interpreted(tmp_path_factory):
    """``(jobs, results)``: the inputs, and the kernel's outputs from the interpreter.

    The child takes half a minute: it runs once per test session. Kept in this module rather
    than by fixture scope (xdist may tear module fixtures down between batches), and shared
    between xdist workers through their common temp folder, under a lock.
    """
    if not _INTERPRETED:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            shared = tmp_path_factory.getbasetemp().parent / "mxfp4_triton"
            shared.mkdir(exist_ok=True)
            with FileLock(shared / "lock"):
                if not (shared / "results.pt").is_file():
                    _run_worker(shared)
        else:
            shared = tmp_path_factory.mktemp("mxfp4_triton")
            _run_worker(shared)
        jobs = torch.load(shared / "jobs.pt", weights_only=False)
        _INTERPRETED.append((jobs, torch.load(shared / "results.pt", weights_only=False)))
    return _INTERPRETED[0]


_INTERPRETED: list[tuple[dict, dict]] = []


def _run_worker(folder: Path) -> None:
    """Build the jobs and have the child compute the kernel's outputs, both saved in ``folder``."""
    torch.save(build_jobs(), folder / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", KERNELS_ENV)}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(folder / "jobs.pt"), str(folder / "results.tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    os.replace(folder / "results.tmp", folder / "results.pt")


#: Relative tolerance per output dtype: fp32 tight; bf16 one ulp (the interpreter truncates where
#: the GPU rounds to nearest); fp16 one ulp (2**-10 relative, rounded as the reference does).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to the reference up to :data:`RTOL` and fp32 summation order."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = RTOL[expected.dtype]
    # Elements that cancel to near zero: fp32 summation order, relative to the largest output.
    atol = 1e-6 * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_worker_ran_the_interpreter(interpreted):
    _, results = interpreted
    assert results["interpreted"]
    # Under the interpreter CPU tensors take the kernel unless the override says otherwise.
    assert results["available"] == {"default": True, "reference": False, "triton": True}
    assert results["layer_backend"] == "triton"  # the layer tests below ran the kernel


@pytest.mark.parametrize(
    "name", [f"{s}-{d}-{direction(t)}" for s in SHAPES for d in DTYPES for t in (False, True)]
)
def test_kernel_matches_reference(interpreted, name):
    jobs, results = interpreted
    job = jobs["matmul"][name]
    expected = grouped_mxfp4_matmul_reference(
        job["x"], job["blocks"], job["scales"], job["counts"], transpose=job["transpose"]
    )
    assert_matches(results["matmul"][name], expected)
    if expected.numel():
        assert results["matmul"][name].abs().max() > 0  # not an empty result passing by default


@pytest.mark.parametrize(
    "name", [f"split-{d}-{direction(t)}" for d in DTYPES for t in (False, True)]
)
def test_split_launches_match_reference(interpreted, name):
    """Head and tail launches (:func:`split_launches`) together compute every row once: each
    expert's rows up to the last multiple of the head's tile, or all of them when the rest
    exceeds the tail's tile, in one launch, the short rest in the other."""
    jobs, results = interpreted
    job = jobs["matmul"][name]
    expected = grouped_mxfp4_matmul_reference(
        job["x"], job["blocks"], job["scales"], job["counts"], transpose=job["transpose"]
    )
    assert_matches(results["matmul"][name], expected)
    assert (results["matmul"][name].abs().amax(-1) > 0).all()  # no row left unwritten


@pytest.mark.parametrize(
    "name",
    [f"{s}-{d}" for s in ("idle-expert-E5", "wide-scales", "every-code-and-scale") for d in DTYPES],
)
def test_dequantizer_is_exact(interpreted, name):
    """The Triton dequantizer (the large-M path) decodes bit for bit as the reference."""
    jobs, results = interpreted
    job = jobs["dequantize"][name]
    expected = dequantize_mxfp4(job["blocks"], job["scales"], job["dtype"])
    got = results["dequantize"][name]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if job["dtype"] == torch.bfloat16:
        # The interpreter flushes bf16 subnormals (see test_dequantization_is_exact).
        normal = (expected.abs() >= 2.0**-126) | (expected == 0) | expected.isinf()
        got, expected = got[normal], expected[normal]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["idle-expert-E5-fp16", "counts-tensor-bf16"])
@pytest.mark.parametrize("transpose", [False, True], ids=direction)
def test_fp16_and_counts_tensor(interpreted, name, transpose):
    jobs, results = interpreted
    job = jobs["matmul"][f"{name}-{direction(transpose)}"]
    counts = tuple(int(n) for n in job["counts"])
    expected = grouped_mxfp4_matmul_reference(
        job["x"], job["blocks"], job["scales"], counts, transpose=transpose
    )
    assert_matches(results["matmul"][f"{name}-{direction(transpose)}"], expected)


@pytest.mark.parametrize("transpose", [False, True], ids=direction)
def test_strided_rows(interpreted, transpose):
    jobs, results = interpreted
    name = f"strided-x-fp32-{direction(transpose)}"
    job = jobs["matmul"][name]
    assert not job["x"].is_contiguous()
    expected = grouped_mxfp4_matmul_reference(
        job["x"].contiguous(), job["blocks"], job["scales"], job["counts"], transpose=transpose
    )
    assert_matches(results["matmul"][name], expected)


@pytest.mark.parametrize(
    "name",
    [f"{k}-{d}-{direction(t)}" for k in ("padding", "padding-split") for d in DTYPES
     for t in (False, True)],
)  # fmt: skip
def test_rows_past_the_last_expert_come_out_zero(interpreted, name):
    """Offsets ending before the last row: those rows belong to no expert, and the launch of
    the experts' first rows writes them zero (the memory was NaN: nothing is left unwritten);
    the experts' rows are as without them."""
    jobs, results = interpreted
    job = jobs["matmul"][name]
    got, rows = results["matmul"][name], sum(job["counts"])
    assert got.shape[0] == rows + PAD_ROWS
    expected = grouped_mxfp4_matmul_reference(
        job["x"][:rows], job["blocks"], job["scales"], job["counts"], transpose=job["transpose"]
    )
    assert_matches(got[:rows], expected)
    assert torch.equal(got[rows:], torch.zeros_like(got[rows:]))


def test_experts_skip_padding(interpreted, monkeypatch):
    """The experts layer with its last tokens skipped as padding (``padding_skipped``): the
    real tokens' outputs, input and routing-weight gradients and every LoRA gradient are those
    of the full computation; the padding's outputs are finite and get no gradient."""
    monkeypatch.setenv(KERNELS_ENV, "reference")
    jobs, results = interpreted
    job = jobs["layer"]["padding-skipped"]
    _, mine = make_pair(k=job["k"])
    y_ref, dx_ref, dw_ref, grads_ref = run(
        mine, job["x"], job["indices"], job["weights"], job["grad_out"]
    )
    y, dx, dw, grads = results["layer"]["padding-skipped"]
    real = slice(0, job["padding_from"])
    for got, want in ((y[real], y_ref[real]), (dx[real], dx_ref[real]), (dw[real], dw_ref[real])):
        assert_matches(got, want)
    assert grads.keys() == grads_ref.keys() and len(grads) == 4
    for n in grads_ref:
        assert_matches(grads[n], grads_ref[n])
    pad = slice(job["padding_from"], None)
    assert torch.isfinite(y[pad]).all() and not torch.equal(y[pad], y_ref[pad])  # skipped
    assert torch.equal(dx[pad], torch.zeros_like(dx[pad]))
    assert torch.equal(dw[pad], torch.zeros_like(dw[pad]))


def loop_batch():
    """Three rows packed as the engine packs them: 101 tokens in a 128-token bucket."""
    from mxlora.engine.packing import pack

    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (50, 31, 20)]
    return pack(rows, [[0] * 10 + [1] * (len(r) - 10) for r in rows], 0)


def test_packed_step_skips_the_padding_and_trains_the_same(interpreted):
    """The loop's micro-step on a tiny model with the Triton kernels (fp32): with the padding
    skipped (the loop's ``padding_skipped``), every frozen expert matmul ends its experts' rows
    at the real tokens' and the loss and every LoRA gradient are the padding-computed step's."""
    jobs, results = interpreted
    batch, got = jobs["loop"]["batch"], results["loop"]
    assert (batch.tokens, batch.length) == (101, 128)
    loss, grads, seen = got["computed"]
    loss_skipped, grads_skipped, seen_skipped = got["skipped"]
    top_k = 2  # the tiny model's
    assert seen and all(ends == rows == 128 * top_k for rows, ends in seen)
    assert len(seen_skipped) == len(seen)
    assert all(rows == 128 * top_k and ends == 101 * top_k for rows, ends in seen_skipped)
    torch.testing.assert_close(loss_skipped, loss, rtol=1e-6, atol=0)
    assert len(grads) == len(grads_skipped) > 4
    for got_grad, want in zip(grads_skipped, grads, strict=True):
        torch.testing.assert_close(got_grad, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _split_configs():
    from mxlora.mxfp4.triton_kernels import KernelConfig

    return KernelConfig(32, 64, 64), KernelConfig(16, 64, 64)


SPLIT_CONFIGS = _split_configs()


def gpu_configs() -> list:
    """Each tile config (bf16) and the fp32 config, as ``(index, config, dtype)``."""
    from mxlora.mxfp4.triton_kernels import CONFIGS, FP32_CONFIG

    return [(i, c, "bf16") for i, c in enumerate(CONFIGS)] + [(len(CONFIGS), FP32_CONFIG, "fp32")]


@pytest.mark.parametrize("index", [i for i, _, _ in gpu_configs()])
@pytest.mark.parametrize("transpose", [False, True], ids=direction)
def test_every_gpu_config(interpreted, index, transpose):
    """Each GPU tile config computes the same, with masks on every edge of the shape."""
    jobs, results = interpreted
    name = f"config{index}-{gpu_configs()[index][2]}-{direction(transpose)}"
    job = jobs["matmul"][name]
    expected = grouped_mxfp4_matmul_reference(
        job["x"], job["blocks"], job["scales"], job["counts"], transpose=transpose
    )
    assert_matches(results["matmul"][name], expected)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("transpose", [False, True], ids=direction)
def test_dequantization_is_exact(interpreted, dname, transpose):
    """Every e2m1 code and e8m0 scale byte decodes bit for bit as the reference decodes it."""
    jobs, results = interpreted
    name = f"identity-{dname}-{direction(transpose)}"
    job = jobs["matmul"][name]
    w = dequantize_mxfp4(job["blocks"], job["scales"], DTYPES[dname])  # [E, out, in]
    expected = (w if transpose else w.transpose(-1, -2)).flatten(0, 1)
    got = results["matmul"][name]
    assert got.dtype == DTYPES[dname]
    if dname == "bf16":
        # The interpreter's fp32 -> bf16 cast flushes bf16 subnormals (|w| < 2**-126, scale
        # bytes 0 and 1) to zero; the GPU keeps them (tests/test_mxfp4_triton_gpu.py).
        normal = (expected.abs() >= 2.0**-126) | (expected == 0)
        assert normal.float().mean() > 0.99
        got, expected = got[normal], expected[normal]
    assert torch.equal(got, expected)
    assert (expected == 0).float().mean() < 0.2  # the scales span the range, not all underflow


@pytest.mark.parametrize("name", [f"{s}-{d}" for s in AUTOGRAD_SHAPES for d in DTYPES])
def test_frozen_matmul_autograd(interpreted, name, monkeypatch):
    """Through the registered op: the kernel in forward and in backward."""
    monkeypatch.setenv(KERNELS_ENV, "reference")
    jobs, results = interpreted
    job = jobs["autograd"][name]
    y_ref = grouped_mxfp4_matmul_reference(
        job["x"], job["blocks"], job["scales"], job["counts"], transpose=False
    )
    dx_ref = grouped_mxfp4_matmul_reference(
        job["dy"], job["blocks"], job["scales"], job["counts"], transpose=True
    )
    y, dx = results["autograd"][name]
    assert_matches(y, y_ref)
    assert_matches(dx, dx_ref)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_experts_layer_with_lora(interpreted, case, monkeypatch):
    """The whole MXFP4 experts layer with LoRA: output, dx, routing-weight and LoRA gradients."""
    monkeypatch.setenv(KERNELS_ENV, "reference")
    jobs, results = interpreted
    job = jobs["layer"][case]
    _, mine = make_pair(k=job["k"])
    expected = run(mine, job["x"], job["indices"], job["weights"], job["grad_out"])
    y, dx, dw, grads = results["layer"][case]
    y_ref, dx_ref, dw_ref, grads_ref = expected
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), *(
        (grads[n], grads_ref[n]) for n in grads_ref
    )):  # fmt: skip
        assert_matches(got, want)
    assert grads.keys() == grads_ref.keys() and len(grads) == 4


# --- capability detection, in this (non-interpreted) process --------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    return monkeypatch


def test_cpu_takes_the_reference_outside_the_interpreter(clean_env):
    x = torch.zeros(2, 64)
    assert not kernel_available(x)
    clean_env.setenv(KERNELS_ENV, "reference")
    assert not kernel_available(x)
    clean_env.setenv(KERNELS_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_available(x)
    clean_env.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="reference"):
        kernel_available(x)


def test_backend_is_chosen_when_the_module_is_built(clean_env):
    """CPU: the torch path, unless MXLORA_KERNELS says otherwise when the module is built."""
    shape = SHAPES["idle-expert-E5"]
    gate_up = weights(Shape(shape.experts, 64, 64, shape.counts), seed=1)  # [E, 2I, H]
    down = weights(Shape(shape.experts, 32, 64, shape.counts), seed=2)  # [E, H, I]

    def build(**kwargs) -> Mxfp4Experts:
        bias = (torch.zeros(shape.experts, 64), torch.zeros(shape.experts, 64))
        return Mxfp4Experts(*gate_up, bias[0], *down, bias[1], alpha=1.7, limit=7.0, **kwargs)

    assert resolve_backend("cpu") == "torch" and build().backend == "torch"
    assert build(backend="reference").backend == "reference"
    clean_env.setenv(KERNELS_ENV, "reference")
    experts = build()
    assert experts.backend == "reference"
    clean_env.setenv(KERNELS_ENV, "torch")
    assert experts.backend == "reference"  # read when built, not per call
    clean_env.setenv(KERNELS_ENV, "triton")
    with pytest.raises(RuntimeError, match="MXLORA_KERNELS=triton"):
        build()
    with pytest.raises(ValueError, match="backend='cuda'"):
        build(backend="cuda")


def test_meta_skeleton_keeps_the_backend_its_loader_resolved(clean_env):
    """The loader builds experts on the meta device with the backend of the device it fills
    them on: a named ``triton`` must be kept there, not refused because meta has no kernel."""
    e, h, i = 2, 64, 32
    gate_up = [
        torch.empty(e, 2 * i, h // 32, 16, dtype=torch.uint8, device="meta"),
        torch.empty(e, 2 * i, h // 32, dtype=torch.uint8, device="meta"),
    ]
    down = [
        torch.empty(e, h, i // 32, 16, dtype=torch.uint8, device="meta"),
        torch.empty(e, h, i // 32, dtype=torch.uint8, device="meta"),
    ]

    def build(**kwargs) -> Mxfp4Experts:
        bias = (torch.empty(e, 2 * i, device="meta"), torch.empty(e, h, device="meta"))
        return Mxfp4Experts(*gate_up, bias[0], *down, bias[1], alpha=1.7, limit=7.0, **kwargs)

    assert build(backend="triton").backend == "triton"
    assert build().backend == "torch"  # nothing named: meta gets no kernel
    clean_env.setenv(KERNELS_ENV, "triton")
    with pytest.raises(RuntimeError, match="MXLORA_KERNELS=triton"):
        build()  # the variable asks for the kernel on the device itself
    with pytest.raises(ValueError, match="backend='cuda'"):
        build(backend="cuda")


@pytest.mark.parametrize(
    ("capability", "hip", "choice", "expected"),
    [
        ((9, 0), None, "", True),
        ((8, 0), None, "", True),
        ((7, 5), None, "", False),
        ((7, 5), None, "triton", True),
        ((9, 4), "6.4", "", False),
        ((9, 4), "6.4", "triton", True),
        ((9, 0), None, "reference", False),
    ],
)
def test_cuda_capability_detection(clean_env, capability, hip, choice, expected):
    """CUDA >= 8.0 takes the kernel, older GPUs and ROCm the reference, unless overridden."""
    clean_env.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    clean_env.setattr(torch.version, "hip", hip)
    clean_env.setenv(KERNELS_ENV, choice)
    # Only the device is read: a stand-in avoids needing a GPU.
    assert kernel_available(SimpleNamespace(device=torch.device("cuda", 0))) is expected


# --- real compilation for the H100, without a GPU ---------------------------------------------

#: gpt-oss-20b: hidden = intermediate = 2880; gate_up_proj is [2 * 2880, 2880], down_proj
#: [2880, 2880]; 8k tokens x top-4 rows.
GPT_OSS_20B = {"gate_up": (5760, 2880), "down": (2880, 2880)}


def sm90_cubin(kernel, signature: dict, constexprs: dict, aligned, **options):
    """Compile a Triton kernel for sm_90 with Triton's own ptxas (no GPU needed): ``signature``
    the runtime arguments' types, ``aligned`` those a launch specializes as 16-byte aligned
    pointers or integers divisible by 16, ``options`` num_warps and the like."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = signature | dict.fromkeys(constexprs, "constexpr")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.fixture
def sm90(monkeypatch):
    """For tests that compile for sm_90: skipped where this process interprets Triton, the
    compiles cached with the project's cache."""
    from mxlora.mxfp4.triton_kernels import INTERPRETED

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: nothing to compile")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir("triton")))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud


def compile_sm90(config, dtype: str, transpose: bool, n_out: int, n_in: int, launch=None):
    """Compile the kernel for sm_90 as a launch at these shapes would (alignment included):
    ``config`` computing every row, or ``launch`` (a head or tail of a split)."""
    from mxlora.mxfp4.triton_kernels import Launch, edge_flags
    from mxlora.mxfp4.triton_kernels import _grouped_mxfp4_kernel as kernel

    launch = launch or Launch(config)

    red, cols = (n_out, n_in) if transpose else (n_in, n_out)
    ints = dict(
        n_rows=32771, n_experts=32, RED=red, COLS=cols, stride_xm=red, stride_ym=cols,
        stride_be=n_out * n_in // 2, stride_bo=n_in // 2,
        stride_se=n_out * n_in // 32, stride_so=n_in // 32,
    )  # fmt: skip
    signature = {"x_ptr": f"*{dtype}", "b_ptr": "*u8", "s_ptr": "*u8", "y_ptr": f"*{dtype}"}
    signature |= {"offsets_ptr": "*i32"} | dict.fromkeys(ints, "i32")
    # What Triton's launcher specializes: 16-byte aligned pointers, integers divisible by 16.
    aligned = [n for n in signature if n.endswith("_ptr") or ints.get(n, 1) % 16 == 0]
    constexprs = dict(
        TRANSPOSE=transpose, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        DOT_IN_FP32=False, BLOCK_E=32, **edge_flags(red, cols, launch.config),
        **launch.kwargs(),
    )  # fmt: skip
    return sm90_cubin(
        kernel, signature, constexprs, aligned,
        num_warps=launch.config.num_warps, num_stages=launch.config.num_stages,
    )  # fmt: skip


def stack_bytes(cubin: bytes, tmp_path: Path) -> int:
    """Per-thread stack frame (register spills) of a cubin, from cuobjdump's resource usage."""
    from triton import knobs

    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run(
        [knobs.nvidia.cuobjdump.path, "-res-usage", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(usage.split("STACK:")[1].split()[0])


def sm90_cases() -> list:
    return [
        pytest.param(config, dtype, transpose, id=f"config{i}-{dtype}-{direction(transpose)}")
        for i, config, dtype in gpu_configs()
        for transpose in (False, True)
    ]


@pytest.mark.parametrize(("config", "dtype", "transpose"), sm90_cases())
def test_compiles_for_h100(config, dtype, transpose, tmp_path, sm90):
    """Every config compiles to an sm_90 cubin: tensor cores for bf16, pipelined loads, no spills."""
    for n_out, n_in in GPT_OSS_20B.values():
        compiled = compile_sm90(config, dtype, transpose, n_out, n_in)
        ttgir = compiled.asm["ttgir"]
        assert "ttg.async_copy_global_to_local" in ttgir  # loads software-pipelined
        # wgmma for bf16 where the dot's left operand fills a warpgroup's 64 rows (the row tile,
        # or the weight tile when swapped); the others use the mma.sync tensor-core path.
        wgmma = dtype == "bf16" and (config.block_n if config.swap else config.block_m) >= 64
        if wgmma and config.swap:  # the dequantized weights go to the tensor cores from registers
            assert "opIdx = 0, parent = #mma" in ttgir
        assert ("ttng.warp_group_dot" in ttgir) == wgmma
        assert dtype == "fp32" or "ttng.warp_group_dot" in ttgir or "ttg.dot_op" in ttgir
        assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


@pytest.mark.parametrize("transpose", [False, True], ids=direction)
def test_split_launches_compile_for_h100(transpose, tmp_path, sm90):
    """A split's head and tail launches (training's, config 0 and 9) compile for sm_90 to
    tensor cores, no spills, in either direction."""
    from mxlora.mxfp4.triton_kernels import CONFIGS, split_launches

    for launch in split_launches(CONFIGS[0], CONFIGS[9]):
        for n_out, n_in in GPT_OSS_20B.values():
            compiled = compile_sm90(None, "bf16", transpose, n_out, n_in, launch)
            assert "ttng.warp_group_dot" in compiled.asm["ttgir"]
            assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


def test_training_config_follows_the_size_classes():
    """Training picks the table's config by mean rows per expert rounded up to a power of two."""
    from mxlora.mxfp4.triton_kernels import (
        CONFIGS,
        TAIL_SPLITS,
        TRAINING_CONFIGS,
        Launch,
        training_launches,
    )

    table = ((16, 11), (32, 9), (None, 0))  # the table this test reads
    assert TRAINING_CONFIGS[False] == TRAINING_CONFIGS[True] == table

    def config(rows, n_experts, transpose):
        return training_launches(rows, n_experts, transpose)[0].config

    for transpose in (False, True):
        assert config(16 * 32, 32, transpose) is CONFIGS[11]
        assert config(5, 32, transpose) is CONFIGS[11]  # fewer rows than experts
        assert config(17 * 32, 32, transpose) is CONFIGS[9]  # class 32
        assert config(32 * 32, 32, transpose) is CONFIGS[9]
        assert config(33 * 32, 32, transpose) is CONFIGS[0]  # class 64
        assert config(4096 * 32, 32, transpose) is CONFIGS[0]
        assert training_launches(32 * 32, 32, transpose) == (Launch(CONFIGS[9]),)
    # Where config 0 runs forward, it runs as a head launch, config 9 taking the short tails.
    head, tail = training_launches(33 * 32, 32, False)
    assert head == Launch(CONFIGS[0], 1, 128, 64) and tail == Launch(CONFIGS[9], 2, 128, 64)
    assert training_launches(33 * 32, 32, True) == (Launch(CONFIGS[0]),)
    assert TAIL_SPLITS == {False: {0: 9}, True: {}}
    assert CONFIGS[11].swap and not CONFIGS[9].swap and not CONFIGS[0].swap


def test_gpt_oss_shapes_load_weight_tiles_without_masks():
    """At gpt-oss's shapes every training launch reads its weight tiles unmasked (the fast
    path: no reduction mask, the last column tile moved back inside), in both directions; the
    interpreter's shapes take both the unmasked and the masked paths, each checked against the
    reference by the tests above."""
    from mxlora.mxfp4.triton_kernels import (
        CONFIGS,
        INTERPRETER_CONFIG,
        edge_flags,
        training_launches,
    )

    for n_out, n_in in GPT_OSS_20B.values():
        for transpose in (False, True):
            red, cols = (n_out, n_in) if transpose else (n_in, n_out)
            for tokens in (128, 530, 896):
                for launch in training_launches(tokens * 4, 32, transpose):
                    assert edge_flags(red, cols, launch.config) == dict(EVEN_K=True, SHIFT_N=True)
    seen = set()
    for shape in [*SHAPES.values(), CONFIG_SHAPE, SPLIT_SHAPE]:
        for red, cols in ((shape.n_in, shape.n_out), (shape.n_out, shape.n_in)):
            seen.add(tuple(edge_flags(red, cols, INTERPRETER_CONFIG).values()))
            # A shifted last column tile that overlaps the one before it.
            if cols >= INTERPRETER_CONFIG.block_n and cols % INTERPRETER_CONFIG.block_n:
                seen.add("overlap")
    assert {(True, True), (False, True), "overlap"} <= seen
    # Tiles wider than the output take the column masks: CONFIG_SHAPE's input gradient (96
    # columns) under the GPU configs.
    widths = {edge_flags(CONFIG_SHAPE.n_out, CONFIG_SHAPE.n_in, c)["SHIFT_N"] for c in CONFIGS}
    assert widths == {True, False}


def _gate_reference_run(job: dict, dtype: torch.dtype):
    from mxlora.mxfp4.gate import gate_reference

    gate_up = job["gate_up"].to(dtype).clone().requires_grad_()
    out = gate_reference(
        gate_up, job["bias"].to(dtype), job["expert_ids"], job["alpha"], job["limit"]
    )
    out.backward(job["grad"].to(dtype))
    return out.detach(), gate_up.grad


@pytest.mark.parametrize("dname", list(DTYPES))
def test_fused_gate_equals_the_reference_with_gradients(interpreted, dname):
    """The Triton gate (bias added in the kernel, one kernel each way) == transformers' formula
    differentiated by autograd: fp32 to fp32 rounding; bf16/fp16 no further from the fp32 result
    than the formula computed in that dtype, plus two roundings (the interpreter truncates where
    the GPU rounds to nearest: the bias-added input and the output)."""
    jobs, results = interpreted
    job = jobs["gate"][dname]
    out, d_gate_up = results["gate"][dname]
    dtype = DTYPES[dname]
    assert out.dtype == d_gate_up.dtype == dtype
    truth = _gate_reference_run(job, torch.float64)
    if dtype == torch.float32:
        for got, want in zip((out, d_gate_up), truth, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        # the clamps' bounds pass the gradient, as torch's clamp does (checked above too)
        at_bound = (job["gate_up"] + job["bias"][job["expert_ids"]]).abs() == job["limit"]
        assert at_bound.sum() > 10 and (d_gate_up[at_bound] != 0).all()
        return
    eager = _gate_reference_run(job, dtype)
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for got, ref, want in zip((out, d_gate_up), eager, truth, strict=True):
        ours = (got.double() - want).abs().max().item()
        theirs = (ref.double() - want).abs().max().item()
        assert ours <= theirs + 2 * ulp * want.abs().max().item(), (ours, theirs)


def assert_like_eager(got, eager, truth, dtype: torch.dtype) -> None:
    """A fused op's outputs (``got``) against the oracle's in fp64 (``truth``): fp32 to fp32
    rounding; bf16 no further from it than the oracle in bf16 (``eager``) plus one rounding.
    None entries (no such gradient) are skipped."""
    for ours, ref, want in zip(got, eager, truth, strict=True):
        if want is None:
            continue
        assert ours.dtype == dtype and ours.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
            continue
        mine = (ours.double() - want).abs().max().item()
        theirs = (ref.double() - want).abs().max().item()
        assert mine <= theirs + 2.0**-8 * want.abs().max().item(), (mine, theirs)


def _combine_reference_run(job: dict, dtype: torch.dtype):
    from mxlora.mxfp4.combine import combine_reference

    src = job["src"].to(dtype).clone().requires_grad_()  # a leaf of its own each run
    weights = job["weights"]
    weights = None if weights is None else weights.to(dtype).clone().requires_grad_()
    out = combine_reference(src, weights, job["index"])
    out.backward(job["grad"].to(dtype))
    return out.detach(), src.grad, None if weights is None else weights.grad


@pytest.mark.parametrize(
    "name", ["fp32-weighted", "fp32-unweighted", "bf16-weighted", "bf16-unweighted"]
)
def test_fused_combine_equals_the_reference_with_gradients(interpreted, name):
    """The Triton combine (one kernel each way) == the index-multiply-sum in torch ops under
    autograd, output and both gradients: fp32 to fp32 rounding; bf16 no further from the fp64
    result than eager bf16, plus one rounding (the interpreter truncates where the GPU rounds)."""
    jobs, results = interpreted
    job = jobs["combine"][name]
    got = results["combine"][name]
    dtype = job["src"].dtype
    truth = _combine_reference_run(job, torch.float64)
    eager = _combine_reference_run(job, dtype)
    assert (got[2] is None) == (job["weights"] is None)
    assert_like_eager(got, eager, truth, dtype)


def _rotary_reference_run(job: dict, dtype: torch.dtype):
    from mxlora.engine.rotary import rotary_reference

    projected = job["projected"].to(dtype).clone().requires_grad_()  # a leaf of its own each run
    x = projected.view(1, projected.shape[1], job["heads"], -1).transpose(1, 2)
    out = rotary_reference(x, job["cos"].to(dtype), job["sin"].to(dtype))
    out.backward(job["grad"].to(dtype))
    return out.detach(), projected.grad


@pytest.mark.parametrize("dname", list(DTYPES))
def test_fused_rotary_equals_transformers_with_gradients(interpreted, dname):
    """The Triton rotary embedding (one kernel each way) == transformers' apply_rotary_pos_emb
    under autograd, the rotated heads and the projection's gradient: fp32 to fp32 rounding;
    bf16 no further from the fp64 result than transformers' in bf16, plus one rounding. Its
    output is stored token-major (what the varlen attention reads without a copy)."""
    jobs, results = interpreted
    job = jobs["rotary"][dname]
    got = results["rotary"][dname]
    dtype = DTYPES[dname]
    tokens, heads = job["projected"].shape[1], job["heads"]
    assert got[0].transpose(1, 2).is_contiguous() and got[0].shape == (1, heads, tokens, 12)
    truth = _rotary_reference_run(job, torch.float64)
    eager = _rotary_reference_run(job, dtype)
    assert_like_eager(got, eager, truth, dtype)


def test_fused_rotary_is_transformers_function_only_for_the_duration():
    """The swap points transformers' gpt-oss attention at the op only inside the context (and
    only when active), restores it on an error, and leaves what the op does not take (a batch
    of several sequences) to transformers' own function."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    from mxlora.engine.rotary import _TRANSFORMERS_ROTARY, fused_rotary_embeddings

    with fused_rotary_embeddings(False):
        assert modeling_gpt_oss.apply_rotary_pos_emb is _TRANSFORMERS_ROTARY
    with pytest.raises(RuntimeError, match="inside"), fused_rotary_embeddings(True):
        swapped = modeling_gpt_oss.apply_rotary_pos_emb
        assert swapped is not _TRANSFORMERS_ROTARY
        raise RuntimeError("inside")
    assert modeling_gpt_oss.apply_rotary_pos_emb is _TRANSFORMERS_ROTARY
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    cos, sin = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    for got, want in zip(
        swapped(q, k, cos, sin), _TRANSFORMERS_ROTARY(q, k, cos, sin), strict=True
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_rotary_kernel_compiles_for_h100(dtype, tmp_path, sm90):
    """The rotary kernel compiles to sm_90 cubins without spills, for gpt-oss's queries (64
    heads) and keys (8), each way."""
    from mxlora.mxfp4.triton_kernels import _rotary_kernel

    pointers = {"x_ptr": dtype, "cos_ptr": dtype, "sin_ptr": dtype, "y_ptr": dtype}
    ints = {"heads": "i32", "stride_xt": "i32", "stride_xh": "i32", "stride_ct": "i32"}
    signature = {n: f"*{t}" for n, t in pointers.items()} | ints
    for heads in (64, 8):
        for sign in (1, -1):
            constexprs = {"HALF": 32, "BLOCK_H": heads, "BLOCK_D": 32, "SIGN": sign}
            aligned = [*pointers, "stride_xt", "stride_xh", "stride_ct"] + ["heads"] * (heads == 64)
            compiled = sm90_cubin(_rotary_kernel, signature, constexprs, aligned, num_warps=4)
            assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_combine_kernels_compile_for_h100(dtype, tmp_path, sm90):
    """Both combine kernels compile to sm_90 cubins without spills, weighted or not, at
    gpt-oss's width and top-4."""
    from mxlora.mxfp4.triton_kernels import (
        COMBINE_BLOCK,
        COMBINE_WARPS,
        _combine_backward_kernel,
        _combine_kernel,
    )

    for kernel, pointers in (
        (_combine_kernel, {"src_ptr": dtype, "w_ptr": dtype, "idx_ptr": "i64", "y_ptr": dtype}),
        (
            _combine_backward_kernel,
            {
                "g_ptr": dtype, "src_ptr": dtype, "w_ptr": dtype, "idx_ptr": "i64",
                "dsrc_ptr": dtype, "dw_ptr": dtype,
            },
        ),
    ):  # fmt: skip
        for weighted in (True, False):
            signature = {n: f"*{t}" for n, t in pointers.items()} | {"width": "i32"}
            constexprs = {"K": 4, "WEIGHTED": weighted, "BLOCK": COMBINE_BLOCK}
            aligned = [*pointers, "width"]
            compiled = sm90_cubin(kernel, signature, constexprs, aligned, num_warps=COMBINE_WARPS)
            assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gate_kernels_compile_for_h100(dtype, tmp_path, sm90):
    """Both gate kernels compile to sm_90 cubins without spills (the interpreter does not
    compile, so it cannot catch what only the compiler rejects)."""
    from mxlora.mxfp4.triton_kernels import GATE_TILE, _gate_backward_kernel, _gate_forward_kernel

    rows, warps = GATE_TILE[:2], GATE_TILE[2]
    scalars = {"n_rows": "i32", "n_cols": "i32", "alpha": "fp32", "limit": "fp32"}
    constexprs = {"BLOCK_R": rows[0], "BLOCK_C": rows[1]}
    for kernel, pointers in (
        (_gate_forward_kernel, {"y_ptr": dtype, "b_ptr": dtype, "e_ptr": "i64", "out_ptr": dtype}),
        (
            _gate_backward_kernel,
            {"grad_ptr": dtype, "y_ptr": dtype, "b_ptr": dtype, "e_ptr": "i64", "dy_ptr": dtype},
        ),
    ):
        signature = {n: f"*{t}" for n, t in pointers.items()} | scalars
        compiled = sm90_cubin(kernel, signature, constexprs, pointers, num_warps=warps)
        assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


class _Recorder:
    """Stands in for a Triton kernel: records what each launch and each warm-up specializes on
    (pointer dtypes, integers' divisibility by 16 and equality to 1, constexprs, launch options)."""

    def __init__(self, name: str, launched: list, warmed: list) -> None:
        self.name, self.launched, self.warmed = name, launched, warmed

    def key(self, args: tuple, kwargs: dict) -> tuple:
        def one(a):
            if isinstance(a, torch.Tensor | torch.dtype):
                return ("pointer", a.dtype if isinstance(a, torch.Tensor) else a)
            if isinstance(a, bool | str | float):
                return type(a).__name__
            return ("int", a % 16 == 0, a == 1)

        return (self.name, tuple(one(a) for a in args), tuple(sorted(kwargs.items())))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(self.key(args, kwargs))

    def warmup(self, *args, grid, **kwargs) -> None:
        self.warmed.append(self.key(args, kwargs))


def test_precompile_compiles_what_training_launches(monkeypatch):
    """What :func:`precompile` compiles in the background is, kernel for kernel, what the
    launches of a gpt-oss-20b training step specialize on (else the step compiles again)."""
    from mxlora.mxfp4 import triton_kernels as tk

    launched, warmed = [], []
    for name in (
        "_grouped_mxfp4_kernel", "_dequantize_kernel", "_gate_forward_kernel",
        "_gate_backward_kernel", "_combine_kernel", "_combine_backward_kernel", "_rotary_kernel",
        "_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_cross_entropy_rows_kernel",
    ):  # fmt: skip
        monkeypatch.setattr(tk, name, _Recorder(name, launched, warmed))
    monkeypatch.setattr(tk, "_on_device", lambda device, fn, *args: fn(*args))
    monkeypatch.setattr(tk, "_PRECOMPILED", set())
    config = GptOssConfig(**gpt_oss_20b_config())
    experts, hidden, inter, vocab = 32, 2880, 2880, 201088
    tk.precompile(config, torch.bfloat16, torch.device("cuda", 0))
    # Again: started once per model shape.
    tk.precompile(config, torch.bfloat16, torch.device("cuda", 0))
    # The matmul's launches for 64 rows per expert and more (forward: head and tail); 2 gate,
    # 2 combine (the forward weighted and not), the rotary (queries and keys, each way), 2 norm
    # kernels and the loss's.
    assert len(tk._PENDING) == 11
    tk._wait_for_precompile()
    assert not launched

    bf16 = torch.bfloat16
    gate_up = (torch.empty(experts, 2 * inter, hidden // 32, 16, dtype=torch.uint8),)
    gate_up += (torch.empty(experts, 2 * inter, hidden // 32, dtype=torch.uint8),)
    down = (torch.empty(experts, hidden, inter // 32, 16, dtype=torch.uint8),)
    down += (torch.empty(experts, hidden, inter // 32, dtype=torch.uint8),)
    for tokens in (128, 256, 512, 896, 2048):  # packed lengths (multiples of 128), every class
        rows = 4 * tokens  # top-4
        offsets = torch.full((experts,), rows, dtype=torch.int32)
        x = torch.empty(rows, hidden, dtype=bf16)
        mid = tk.grouped_mxfp4_matmul_triton(x, *gate_up, offsets, transpose=False)
        ids = torch.zeros(rows, dtype=torch.int64)
        bias = torch.empty(experts, 2 * inter, dtype=bf16)
        gated = tk.gate_forward_triton(mid, bias, ids, 1.702, 7.0)
        tk.grouped_mxfp4_matmul_triton(gated, *down, offsets, transpose=False)
        tk.grouped_mxfp4_matmul_triton(x, *down, offsets, transpose=True)
        tk.gate_backward_triton(gated, mid, bias, ids, 1.702, 7.0)
        tk.grouped_mxfp4_matmul_triton(mid, *gate_up, offsets, transpose=True)
        index = torch.zeros(tokens, 4, dtype=torch.int64)
        routing = torch.empty(tokens, 4, dtype=bf16)
        y = tk.combine_triton(x, routing, index)
        tk.combine_backward_triton(y, x, routing, index)
        tk.combine_triton(x, None, index)
        angles = torch.empty(1, tokens, 32, dtype=bf16)
        for heads in (64, 8):  # queries, keys: views of the projections' outputs
            projected = torch.empty(1, tokens, heads * 64, dtype=bf16)
            rotated = tk.rotary_triton(
                projected.view(1, tokens, heads, 64).transpose(1, 2), angles, angles
            )
            tk.rotary_triton(rotated, angles, angles, inverse=True)
        hidden_states = torch.empty(1, tokens, hidden, dtype=bf16)
        norm_weight = torch.empty(hidden, dtype=bf16)
        tk.rms_norm_forward_triton(hidden_states, norm_weight, 1e-5)
        tk.rms_norm_backward_triton(hidden_states, hidden_states, norm_weight, 1e-5)
        positions = min(tokens, 1024)  # one chunk of mxlora.engine.loss
        logits = torch.empty(positions, vocab, dtype=bf16)
        tk.cross_entropy_rows_triton(logits, torch.empty(positions, dtype=torch.int64), -100)
    tk.dequantize_mxfp4_triton(*gate_up, bf16)
    tk.dequantize_mxfp4_triton(*down, bf16)
    # 16 launches a length up to 32 rows per expert, 18 from 64 (each forward matmul a head and
    # a tail).
    assert len(launched) == 2 * 16 + 3 * 18 + 2
    # Compiled ahead: every launch of 512 tokens or more (64 rows per expert and more) bar the
    # dequantizer of the dense path; the smaller classes compile on first use.
    big = [key for key in launched[2 * 16 :] if key[0] != "_dequantize_kernel"]
    small = [key for key in launched[: 2 * 16] if key[0] == "_grouped_mxfp4_kernel"]
    assert len(big) == 3 * 18 and not set(big) - set(warmed)
    assert set(small) - set(warmed)


def _norm_reference_run(job: dict, dtype: torch.dtype):
    from mxlora.engine.norm import rms_norm_reference

    x = job["x"].to(dtype).clone().requires_grad_()
    out = rms_norm_reference(x, job["weight"].to(dtype), job["eps"])
    out.backward(job["grad"].to(dtype))
    return out.detach(), x.grad


def test_transformers_norm_is_the_reference():
    """rms_norm_reference is GptOssRMSNorm's forward, bit for bit, in fp32 and bf16."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from mxlora.engine.norm import rms_norm_reference

    for dtype in DTYPES.values():
        job = norm_job(dtype, seed=3)
        module = GptOssRMSNorm(90, eps=job["eps"]).to(dtype)
        module.weight.data.copy_(job["weight"])
        assert torch.equal(module(job["x"]), rms_norm_reference(job["x"], job["weight"], 1e-5))


@pytest.mark.parametrize("dname", list(DTYPES))
def test_fused_norm_equals_the_reference_with_gradients(interpreted, dname):
    """The Triton RMSNorm (one kernel each way) == transformers' formula, output and input
    gradient: fp32 to fp32 rounding, bf16 within one bf16 rounding of the fp64 truth, as eager."""
    dtype = DTYPES[dname]
    jobs, results = interpreted
    job = jobs["norm"][dname]
    out, dx = results["norm"][dname]
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == job["x"].shape
    truth = _norm_reference_run(job, torch.float64)
    eager = _norm_reference_run(job, dtype)
    for got, ref, want in zip((out, dx), eager, truth, strict=True):
        want = want.to(dtype).double()
        scale = want.abs().amax(-1, keepdim=True)  # per row: rows differ by 10^4 in scale
        if dtype == torch.float32:
            assert ((got.double() - want).abs() / scale).max() < 1e-5
        else:
            # Within one bf16 rounding of the truth, as eager bf16 is.
            assert ((got.double() - want).abs() / scale).max() <= 2**-7
            assert ((ref.double() - want).abs() / scale).max() <= 2**-7


@pytest.mark.parametrize("dname", list(DTYPES))
def test_cross_entropy_kernel_equals_autograd(interpreted, dname):
    """The loss's row kernel (mxlora.engine.loss.cross_entropy_rows_, Triton) == F.cross_entropy
    and autograd's gradient of it on the logits in fp64: the losses to fp32 rounding, the
    gradient within one rounding to the logits' dtype; an ignored row gives 0 and zeros."""
    dtype = DTYPES[dname]
    jobs, results = interpreted
    job = jobs["cross_entropy"][dname]
    losses, grad = results["cross_entropy"][dname]
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    logits = job["logits"].double().requires_grad_()
    want = torch.nn.functional.cross_entropy(logits, job["targets"], reduction="none")
    want.sum().backward()
    torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-6, atol=1e-6)
    step = 1e-6 if dtype == torch.float32 else 2**-8  # bf16: one rounding of values <= 1
    assert (grad.double() - logits.grad).abs().max() <= step
    assert losses[2] == 0 and grad[2].abs().sum() == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cross_entropy_kernel_compiles_for_h100(dtype, tmp_path, sm90):
    """The loss's row kernel compiles to an sm_90 cubin without spills, at gpt-oss's vocabulary
    (what the launch specializes: aligned pointers, 201,088 columns divisible by 16)."""
    from mxlora.engine.loss import IGNORE_INDEX
    from mxlora.mxfp4.triton_kernels import CROSS_ENTROPY_TILE, _cross_entropy_rows_kernel

    block, warps = CROSS_ENTROPY_TILE
    signature = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "losses_ptr": "*fp32"}
    signature |= {"n_cols": "i32"}
    constexprs = {"IGNORE": IGNORE_INDEX, "BLOCK": block}
    compiled = sm90_cubin(
        _cross_entropy_rows_kernel, signature, constexprs, [*signature], num_warps=warps
    )
    assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_norm_kernels_compile_for_h100(dtype, tmp_path, sm90):
    """Both RMSNorm kernels compile to sm_90 cubins without spills, at gpt-oss's width."""
    from mxlora.mxfp4.triton_kernels import _rms_norm_backward_kernel, _rms_norm_forward_kernel

    for kernel, pointers in (
        (_rms_norm_forward_kernel, ("x_ptr", "w_ptr", "y_ptr")),
        (_rms_norm_backward_kernel, ("g_ptr", "x_ptr", "w_ptr", "dx_ptr")),
    ):
        signature = dict.fromkeys(pointers, f"*{dtype}") | {"n_cols": "i32", "eps": "fp32"}
        aligned = [*pointers, "n_cols"]  # pointers 16-byte aligned, 2880 divisible by 16
        compiled = sm90_cubin(kernel, signature, {"BLOCK": 4096}, aligned, num_warps=8)
        assert stack_bytes(compiled.asm["cubin"], tmp_path) == 0
