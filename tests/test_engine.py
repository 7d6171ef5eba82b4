"""mxlora's own training step (``train.engine: mxlora``) against its oracles and the TRL path.

- the whole step: on a tiny gpt-oss in fp32 and real english_quotes rows, both engines log the
  same per-step losses, gradient norms, learning rates, token counts and eval losses, and end
  with the same adapter (rows over two micro-batches per step, a short last accumulation group,
  three epochs);
- the row order is the Trainer's own dataloader order;
- packed attention (one sequence, document mask, sinks) equals the padded batch through
  transformers' eager attention, outputs and LoRA/sink gradients, sliding and full layers;
- the sink formulation through the log-sum-exp equals the dense softmax with sinks, gradients
  included (and a detached LSE would not); so does SDPA with the sink key;
- CUDA graphs' bookkeeping (static buffers per bucket, refilled and "replayed") trains exactly
  what plain steps train (on the CPU, replays are eager calls on the static buffers);
- chunked cross-entropy equals the full-logits one, forward and backward;
- ``should_stop``, ``--resume``, OOM and compile decisions (checkpointing: test_memory.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mxlora.config import ConfigError, ModelConfig, TrainingConfig, from_dict
from mxlora.engine import loss as loss_module
from mxlora.engine.attention import (
    VarlenMask,
    apply_sinks,
    block_mask,
    dense_mask,
    flex_sink_attention,
    reference_attention,
    register,
    sdpa_mask,
    sdpa_sink_attention,
    varlen_sink_attention,
)
from mxlora.engine.loss import chunked_loss, reference_loss
from mxlora.engine.packing import epoch_order, pack, plan_steps
from mxlora.engine.run_folder import COMPLETE_MARKER, TrainingError
from mxlora.recipes.train import fit

ROOT = Path(__file__).resolve().parents[1]
QUOTES = [str(ROOT.parent / "shared" / "data" / "english_quotes.jsonl"), "example:quotes"]
TINY = "tiny:layers=2"  # layer 0 sliding, layer 1 full attention


def quotes_config(root: Path, engine: str, **train) -> TrainingConfig:
    """8 real quotes rows (6 train, 2 eval), batch 2 x 2 accumulation: steps of 2 + 1
    micro-batches, 2 steps an epoch, 3 epochs = 6 steps, eval at each epoch end."""
    from mxlora.config import first_existing_source

    raw = {
        "model": {"name_or_path": TINY, "dtype": "float32"},
        "lora": {"experts": {"layers": [1]}},
        "data": {
            "source": first_existing_source(QUOTES),
            "adapter": "quotes",
            "select": 8,
            "test_size": 0.25,
            "seed": 42,
        },
        "train": {
            "engine": engine,
            "lr": 1e-3,
            "epochs": 3,
            "batch_size": 2,
            "grad_accum": 2,
            "max_len": 256,
            "logging_steps": 1,
            "save_steps": 100,
            **train,
        },
        "output": {"root": str(root), "name": engine},
    }
    return from_dict(TrainingConfig, raw)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("trl", "mxlora"):
        result = fit(quotes_config(root, engine))
        out[engine] = (result.run_dir, lora_state(result.model))
    return out


# --------------------------------------------------------------------------------------------
# The whole step against TRL's.


def test_mxlora_engine_trains_what_trl_trains(both_engines):
    (trl_run, trl_lora), (our_run, our_lora) = both_engines["trl"], both_engines["mxlora"]
    theirs, ours = metrics(trl_run), metrics(our_run)
    train_theirs = [r for r in theirs if "loss" in r]
    train_ours = [r for r in ours if "loss" in r]
    assert [r["step"] for r in train_ours] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in train_theirs] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(train_theirs, train_ours, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6, abs=1e-12)
        assert (b["tokens"], b["epoch"]) == (a["tokens"], pytest.approx(a["epoch"]))
    eval_theirs = [(r["step"], r["eval_loss"]) for r in theirs if "eval_loss" in r]
    eval_ours = [(r["step"], r["eval_loss"]) for r in ours if "eval_loss" in r]
    assert [s for s, _ in eval_ours] == [s for s, _ in eval_theirs] == [2, 4, 6]
    assert [v for _, v in eval_ours] == pytest.approx([v for _, v in eval_theirs], rel=1e-4)
    # The learning rate moved the adapter (lr 1e-3), and both engines moved it alike.
    assert trl_lora.keys() == our_lora.keys()
    for name, theirs_t in trl_lora.items():
        torch.testing.assert_close(our_lora[name], theirs_t, rtol=0, atol=1e-4, msg=name)
    report = json.loads((our_run / "report.json").read_text())
    assert report["engine"] == "mxlora" and report["steps"] == 6
    assert report["compiled"] is False and report["checkpointed_blocks"] == "0 of 2"
    assert report["train_time_s"] > 0 and report["tokens_per_s"] > 0
    assert report["train_tokens"] == train_ours[-1]["tokens"]
    assert (our_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (our_run / "loss.png").is_file()


def test_row_order_is_the_trainers(tmp_path):
    """The plan's micro-batches are what transformers' Trainer dataloader yields, epoch by
    epoch (accelerate's seeded sampler), including the short last batch."""
    import datasets
    from transformers import Trainer, TrainingArguments

    rows, batch, accum, epochs, seed = 11, 2, 2, 3, 42
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
    )
    dataset = datasets.Dataset.from_dict({"index": list(range(rows))})
    trainer = Trainer(
        model=torch.nn.Linear(1, 1),
        args=args,
        train_dataset=dataset,
        data_collator=lambda items: [item["index"] for item in items],
    )
    loader = trainer.get_train_dataloader()
    theirs = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)  # as the Trainer's epoch loop does
        theirs.extend(list(loader))
    plan = plan_steps(rows, batch, accum, epochs, -1, seed)
    ours = [mb for step in plan for mb in step.micro_batches]
    assert ours == theirs
    assert [len(step.micro_batches) for step in plan[:3]] == [2, 2, 2]
    assert len(plan[2].micro_batches[1]) == 1 and plan[2].ends_epoch  # 11 rows: 6 batches
    assert plan[-1].epoch_progress == 3.0 and len(plan) == 9
    assert epoch_order(rows, seed, 1) != epoch_order(rows, seed, 0)


def test_pack_restarts_positions_and_selects_assistant_targets():
    batch = pack([[5, 6, 7], [8, 9]], [[0, 1, 1], [0, 1]], pad_id=0, bucket=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert batch.doc_ids.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    # Position p predicts token p + 1 of the same row, only where that token is trained.
    # Padded to the packed length (ignored targets), so the shapes follow the bucket alone.
    assert batch.loss_positions.tolist() == [0, 1, 3, 0, 0, 0, 0, 0]
    assert batch.loss_targets.tolist() == [6, 7, 9, -100, -100, -100, -100, -100]
    assert (batch.tokens, batch.rows, batch.length) == (5, 2, 8)


# --------------------------------------------------------------------------------------------
# Attention.


def _qkv(heads=4, kv=2, length=40, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=gen, dtype=dtype)
    k = torch.randn(1, kv, length, dim, generator=gen, dtype=dtype)
    v = torch.randn(1, kv, length, dim, generator=gen, dtype=dtype)
    sinks = torch.randn(heads, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, sinks)]


DOCS = torch.tensor([0] * 13 + [1] * 20 + [2] * 7, dtype=torch.int32)


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_through_the_lse_equal_the_dense_softmax_with_gradients(window):
    """apply_sinks(attention without sinks, its LSE) == attention with sinks, fwd and bwd; the
    gradient has to flow through the LSE: with it detached the q/k/sink gradients go wrong."""
    mask = dense_mask(DOCS, window)
    q, k, v, sinks = _qkv()
    grad = torch.randn(1, 4, 40, 8, generator=torch.Generator().manual_seed(1))

    def without_sinks(detach_lse: bool):
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.softmax(scores, dim=-1) @ vv
        return apply_sinks(out, lse.detach() if detach_lse else lse, sinks)

    def grads(out):
        for t in (q, k, v, sinks):
            t.grad = None
        (out * grad).sum().backward()
        return [t.grad.clone() for t in (q, k, v, sinks)]

    reference = reference_attention(q, k, v, mask, sinks, 0.3)
    ours = without_sinks(detach_lse=False)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    expected = grads(reference)
    for got, want in zip(grads(ours), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    wrong = grads(without_sinks(detach_lse=True))
    assert not torch.allclose(wrong[0], expected[0], rtol=1e-3, atol=1e-4)  # q's gradient


def _attention_and_grads(fn, mask, q, k, v, sinks, grad):
    """``fn``'s output and the q/k/v/sink gradients of ``(out * grad).sum()``."""
    for t in (q, k, v, sinks):
        t.grad = None
    out = fn(q, k, v, mask, sinks, 0.3)
    (out * grad).sum().backward()
    return [out.detach(), *(t.grad.clone() for t in (q, k, v, sinks))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_with_the_sink_key_equals_the_reference_with_gradients(window, dtype):
    """SDPA with the sink as an extra key/dimension == dense softmax with sinks: output and the
    q, k, v and sink gradients; GQA (4 query heads on 2 kv heads), documents of unequal length,
    padding (doc -1), head dim 8 (padded to 16 with the sink dimension)."""
    docs = torch.cat([DOCS, torch.full((24,), -1, dtype=torch.int32)])
    q, k, v, sinks = (t.detach().to(dtype).requires_grad_() for t in _qkv(length=64))
    grad = torch.randn(1, 4, 64, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = _attention_and_grads(
        sdpa_sink_attention, sdpa_mask(docs, window, dtype), q, k, v, sinks, grad
    )
    want = _attention_and_grads(reference_attention, dense_mask(docs, window), q, k, v, sinks, grad)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2)}[dtype]
    for name, got, expected in zip(("out", "q", "k", "v", "sinks"), ours, want, strict=True):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, expected, rtol=tol[0], atol=tol[1], msg=name)


def _varlen(q, k, v, mask, sinks, scaling):
    """:func:`varlen_sink_attention` in the reference's ``[B, H, T, D]`` layout."""
    return varlen_sink_attention(q, k, v, mask, sinks, scaling).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pad", [24, 0])
def test_varlen_with_sinks_equals_the_reference_with_gradients(window, dtype, pad):
    """The varlen path (sinks folded into flash's output and log-sum-exp, flash's backward
    handed both; here the dense CPU stand-in of the two flash calls) == dense softmax with
    sinks: output and q, k, v, sink gradients; GQA, rows of unequal length, with and without
    padding (an empty last sequence)."""
    docs = torch.cat([DOCS, torch.full((pad,), -1, dtype=torch.int32)])
    length = docs.numel()
    cu = torch.tensor([0, 13, 33, 40, length], dtype=torch.int32)
    q, k, v, sinks = (t.detach().to(dtype).requires_grad_() for t in _qkv(length=length))
    grad = torch.randn(1, 4, length, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = VarlenMask(cu, length, window)
    ours = _attention_and_grads(_varlen, mask, q, k, v, sinks, grad)
    want = _attention_and_grads(reference_attention, dense_mask(docs, window), q, k, v, sinks, grad)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2)}[dtype]
    for name, got, expected in zip(("out", "q", "k", "v", "sinks"), ours, want, strict=True):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, expected, rtol=tol[0], atol=tol[1], msg=name)


def test_pack_bounds_every_row_and_the_padding():
    """cu_seqlens: each row's start, the padding's start, the packed length; an empty padding
    sequence when the rows fill the bucket exactly."""
    batch = pack([[5] * 13, [6] * 20, [7] * 7], [[1] * 13, [1] * 20, [1] * 7], pad_id=0, bucket=64)
    assert batch.cu_seqlens.tolist() == [0, 13, 33, 40, 64]
    assert batch.cu_seqlens.dtype == torch.int32
    full = pack([[5] * 60, [6] * 4], [[1] * 60, [1] * 4], pad_id=0, bucket=64)
    assert full.cu_seqlens.tolist() == [0, 60, 64, 64]


@pytest.mark.parametrize("window", [None, 5])
def test_flex_forward_equals_the_reference_on_cpu(window):
    """flex_attention + block mask + sinks == dense reference (forward; flex has no CPU
    backward, the CUDA test below checks it), documents of unequal length, padding included."""
    docs = torch.cat([DOCS, torch.full((128 - DOCS.numel(),), -1, dtype=torch.int32)])
    q, k, v, sinks = (t.detach() for t in _qkv(length=128))
    with torch.no_grad():
        flex = flex_sink_attention(q, k, v, block_mask(docs, window), sinks, 0.3)
        reference = reference_attention(q, k, v, dense_mask(docs, window), sinks, 0.3)
    torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 128])
def test_sdpa_on_cuda_equals_the_reference_in_linear_memory(window, dtype):
    """On CUDA the SDPA path runs the memory-efficient kernel (only it is allowed: another
    would raise): equal to the reference forward and backward at 640 tokens with gpt-oss-20b's
    heads (64 query, 8 kv, dim 64), and at 4096 tokens its peak memory stays far below one
    ``[heads, T, T]`` score tensor."""
    length = 640
    docs = torch.tensor([0] * 300 + [1] * 200 + [2] * 77 + [-1] * 63, dtype=torch.int32).cuda()
    base = [t.detach().cuda() for t in _qkv(64, 8, length, 64)]
    grad = torch.randn(1, 64, length, 64, device="cuda")

    def run(fn, mask, precision):
        q, k, v, sinks = (t.detach().to(precision).requires_grad_() for t in base)
        return _attention_and_grads(fn, mask, q, k, v, sinks, grad.to(precision))

    ours = run(sdpa_sink_attention, sdpa_mask(docs, window, dtype), dtype)
    exact = run(reference_attention, dense_mask(docs, window), torch.float32)
    names = ("out", "q", "k", "v", "sinks")
    if dtype == torch.float32:
        for name, got, expected in zip(names, ours, exact, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4, msg=name)
    else:
        # bf16: against the fp32 oracle, no further off than the reference itself in bf16
        # (two bf16 computations differ from each other by about their own rounding).
        rounded = run(reference_attention, dense_mask(docs, window), dtype)
        for name, got, ref, expected in zip(names, ours, rounded, exact, strict=True):
            ours_err = (got.float() - expected).norm() / expected.norm()
            ref_err = (ref.float() - expected).norm() / expected.norm()
            assert ours_err <= 2 * ref_err + 1e-3, (name, ours_err.item(), ref_err.item())

    length, heads = 4096, 64
    docs = torch.tensor([0] * 1500 + [1] * 2000 + [2] * 500 + [-1] * 96, dtype=torch.int32).cuda()
    q, k, v, sinks = (
        t.detach().cuda().to(dtype).requires_grad_() for t in _qkv(heads, 8, length, 64)
    )
    mask = sdpa_mask(docs, window, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = sdpa_sink_attention(q, k, v, mask, sinks, 0.125)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    scores = heads * length * length * q.element_size()  # one [H, T, T] tensor: 2.1 GB in bf16
    assert peak < scores / 4, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_varlen_on_cuda_equals_the_reference_in_linear_memory(window):
    """Flash attention's varlen kernels with the sinks folded in (what bf16 training on CUDA
    runs with eager blocks): against the fp32 oracle no further off than the reference in bf16,
    forward and every gradient, at 640 tokens with gpt-oss-20b's heads (64 query, 8 kv, dim 64)
    and rows of unequal length, a 128-token window or none; at 4096 tokens the peak memory stays
    far below one ``[heads, T, T]`` score tensor."""
    from mxlora.engine.attention import flash_varlen_available

    assert flash_varlen_available(torch.device("cuda"), torch.bfloat16, 64)
    length = 640
    docs = torch.tensor([0] * 300 + [1] * 200 + [2] * 77 + [-1] * 63, dtype=torch.int32).cuda()
    cu = torch.tensor([0, 300, 500, 577, 640], dtype=torch.int32).cuda()
    base = [t.detach().cuda() for t in _qkv(64, 8, length, 64)]
    grad = torch.randn(1, 64, length, 64, device="cuda")

    def run(fn, mask, precision):
        q, k, v, sinks = (t.detach().to(precision).requires_grad_() for t in base)
        return _attention_and_grads(fn, mask, q, k, v, sinks, grad.to(precision))

    ours = run(_varlen, VarlenMask(cu, length, window), torch.bfloat16)
    exact = run(reference_attention, dense_mask(docs, window), torch.float32)
    rounded = run(reference_attention, dense_mask(docs, window), torch.bfloat16)
    names = ("out", "q", "k", "v", "sinks")
    for name, got, ref, expected in zip(names, ours, rounded, exact, strict=True):
        ours_err = (got.float() - expected).norm() / expected.norm()
        ref_err = (ref.float() - expected).norm() / expected.norm()
        assert ours_err <= 2 * ref_err + 1e-3, (name, ours_err.item(), ref_err.item())

    length, heads = 4096, 64
    cu = torch.tensor([0, 1500, 3500, 4000, 4096], dtype=torch.int32).cuda()
    q, k, v, sinks = (
        t.detach().cuda().to(torch.bfloat16).requires_grad_() for t in _qkv(heads, 8, length, 64)
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = varlen_sink_attention(q, k, v, VarlenMask(cu, length, window), sinks, 0.125)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    scores = heads * length * length * q.element_size()
    assert peak < scores / 4, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 128])
def test_flex_forward_and_backward_equal_the_reference_on_cuda(window, dtype):
    length = 640
    docs = torch.tensor([0] * 300 + [1] * 200 + [2] * 77 + [-1] * 63, dtype=torch.int32).cuda()
    q, k, v, sinks = (t.detach().cuda().to(dtype).requires_grad_() for t in _qkv(16, 4, length, 64))
    grad = torch.randn(1, 16, length, 64, device="cuda", dtype=dtype)
    results = []
    for fn, mask in (
        (flex_sink_attention, block_mask(docs, window)),
        (reference_attention, dense_mask(docs, window)),
    ):
        out = fn(q, k, v, mask, sinks, 0.125)
        for t in (q, k, v, sinks):
            t.grad = None
        (out * grad).sum().backward()
        results.append([out.detach(), *(t.grad.clone() for t in (q, k, v, sinks))])
    tol = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (5e-2, 5e-2)}[dtype]
    for name, got, want in zip(("out", "q", "k", "v", "sinks"), *results, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1], msg=name)


def _lora_model(folder, seed=0):
    from mxlora.config import ExpertTargets, LoraConfig
    from mxlora.model.load import load_model
    from mxlora.model.lora import apply_lora

    model, _ = load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))
    model = apply_lora(model, LoraConfig(experts=ExpertTargets(layers=[1])))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B, so every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.base_model.model.model.layers[0].self_attn.sinks.requires_grad_(True)
    return model


@pytest.mark.parametrize("kind", ["reference", "sdpa", "varlen"])
def test_packed_attention_equals_padded_attention(tmp_path, kind):
    """Rows of 37, 9 and 21 tokens: packed (one sequence, document mask, sinks) vs a padded
    batch through transformers' eager attention: same hidden states on every real token, same
    gradients of every LoRA factor and of layer 0's sinks; a 6-token window on layer 0."""
    from mxlora.model.tiny import ensure_tiny

    folder = ensure_tiny(layers=2, sliding_window=6)
    model = _lora_model(folder)
    lm = model.get_base_model()
    gen = torch.Generator().manual_seed(3)
    lengths = [37, 9, 21]
    rows = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in lengths]
    weights = torch.randn(sum(lengths), lm.config.hidden_size, generator=gen)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    # Padded: right padding, transformers' own masks (eager attention, sliding window).
    longest = max(lengths)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    hidden = lm.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    padded = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    (padded * weights).sum().backward()
    padded_grads = grads()

    batch = pack(rows, [[1] * n for n in lengths], pad_id=0)
    before = lm.config._attn_implementation
    lm.set_attn_implementation(register())
    try:
        from mxlora.engine.attention import build_masks

        masks = build_masks(
            batch.doc_ids, lm.config.sliding_window, kind, torch.float32, batch.cu_seqlens
        )
        packed = lm.model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=masks
        ).last_hidden_state[0, : batch.tokens]
    finally:
        lm.set_attn_implementation(before)
    (packed * weights).sum().backward()
    packed_grads = grads()

    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert any("experts" in n for n in packed_grads) and any("sinks" in n for n in packed_grads)
    for name, want in padded_grads.items():
        assert want.abs().sum() > 0, name
        err = (packed_grads[name] - want).norm() / want.norm()
        assert err < 1e-5, (name, err.item())


# --------------------------------------------------------------------------------------------
# Loss.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 1024])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
def test_chunked_loss_equals_full_logits_loss(dtype, chunk, frozen, monkeypatch):
    """Several chunks, or one; a frozen ``lm_head`` (the gradient computed in the forward) or a
    trained one (autograd, chunks checkpointed); positions padded as pack pads them (position 0,
    target -100) change neither the loss nor any gradient."""
    calls = []
    original = loss_module.cross_entropy_rows_
    monkeypatch.setattr(
        loss_module, "cross_entropy_rows_", lambda *a: calls.append(a) or original(*a)
    )
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen).to(dtype).requires_grad_()
    head = torch.nn.Linear(16, 999).to(dtype).requires_grad_(not frozen)
    positions = torch.tensor([0, 3, 4, 5, 17, 18, 30, 31, 32, 33, 48])
    targets = torch.randint(0, 999, (positions.numel(),), generator=gen)
    padded_positions = torch.cat([positions, torch.zeros(7, dtype=torch.long)])
    padded_targets = torch.cat([targets, torch.full((7,), -100)])
    results = []
    for fn, pos, tgt in (
        (reference_loss, positions, targets),
        (lambda *a: chunked_loss(*a, "torch", chunk=chunk), padded_positions, padded_targets),
    ):
        loss = fn(hidden, head, pos, tgt)
        hidden.grad, head.weight.grad = None, None
        loss.backward(torch.tensor(0.37))  # as the loop scales it: by the step's token count
        grads = (hidden.grad.clone(), head.weight.grad)
        results.append((loss.detach(), *grads))
    (ref_loss, ref_h, ref_w), (loss, h, w) = results
    assert len(calls) == (math.ceil(18 / chunk) if frozen else 0)
    assert loss.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(h.float(), ref_h.float(), rtol=tol, atol=tol)
    if frozen:
        assert w is None and ref_w is None
    else:
        torch.testing.assert_close(w.float(), ref_w.float(), rtol=tol, atol=tol)
    # Only selected positions get a gradient.
    unselected = torch.ones(50, dtype=torch.bool)
    unselected[positions] = False
    assert h[unselected].abs().sum() == 0
    # Without gradients (evaluation) the same loss, and no gradient is computed.
    with torch.no_grad():
        again = chunked_loss(hidden, head, padded_positions, padded_targets, "torch", chunk=chunk)
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=1e-6)


def test_cross_entropy_rows_torch_is_autograds():
    """The torch path of the loss's row op: per-row losses and, in place, their gradient with
    respect to the logits, as F.cross_entropy and autograd give them (fp32; an ignored row:
    0 and zeros)."""
    gen = torch.Generator().manual_seed(1)
    logits = (8 * torch.randn(6, 1001, generator=gen)).requires_grad_()
    targets = torch.tensor([0, 1000, -100, 7, 500, 3])
    want = F.cross_entropy(logits, targets, reduction="none")
    want.sum().backward()
    got_logits = logits.detach().clone()
    got = loss_module.cross_entropy_rows_(got_logits, targets, "torch")
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_logits, logits.grad, rtol=1e-6, atol=1e-7)
    assert got[2] == 0 and got_logits[2].abs().sum() == 0


# --------------------------------------------------------------------------------------------
# Stop, resume, errors, decisions.


def test_should_stop_checkpoints_and_resume_continues_exactly(both_engines, tmp_path):
    """Stopped by the hook after step 3: a complete checkpoint, no adapter or report; --resume
    ends with the uninterrupted run's losses and adapter."""
    whole_run, whole_lora = both_engines["mxlora"]
    cfg = quotes_config(tmp_path, "mxlora")
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) == 3

    stopped = fit(cfg, should_stop=stop_after_three)
    run = stopped.run_dir
    assert stopped.stopped and (run / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert not (run / "adapter").exists() and not (run / "report.json").exists()
    resumed = fit(cfg, resume=True)
    assert not resumed.stopped
    ours, whole = metrics(run), metrics(whole_run)
    assert [(r["step"], "loss" in r) for r in ours] == [(r["step"], "loss" in r) for r in whole]
    values = [r.get("loss", r.get("eval_loss")) for r in ours]
    assert values == pytest.approx([r.get("loss", r.get("eval_loss")) for r in whole], rel=1e-5)
    report = json.loads((run / "report.json").read_text())
    assert report["resumed_from_step"] == 3 and report["steps"] == 6
    for name, want in whole_lora.items():
        torch.testing.assert_close(lora_state(resumed.model)[name], want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_should_stop_on_the_trl_engine_checkpoints_and_stops(tmp_path):
    calls = []
    result = fit(
        quotes_config(tmp_path, "trl", epochs=1),
        should_stop=lambda: calls.append(1) or len(calls) == 1,
    )
    run = result.run_dir
    assert result.stopped and len(calls) == 1
    assert (run / "checkpoints" / "checkpoint-1" / COMPLETE_MARKER).is_file()
    assert not (run / "adapter").exists() and not (run / "report.json").exists()
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1]


def test_out_of_memory_in_a_step_names_the_knobs(tmp_path, monkeypatch):
    import mxlora.engine.loop as loop

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "forward_loss", out_of_memory)
    with pytest.raises(TrainingError, match=r"^out of memory while step 1 \(cpu\)\. .*"):
        fit(quotes_config(tmp_path, "mxlora", epochs=1))


def test_compile_failure_stops_the_run_with_a_message():
    from mxlora.engine.loop import COMPILE_MIN_TOKENS, loud_compile, use_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("auto", cpu, 10**6) is False
    # auto: compiled only where the longest bucket makes the compile pay.
    assert use_compile("auto", cuda, COMPILE_MIN_TOKENS) is True
    assert use_compile("auto", cuda, COMPILE_MIN_TOKENS - 128) is False
    assert use_compile(True, cpu, 128) and not use_compile(False, cuda, 10**6)

    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1

    compiled = torch.compile(breaks, fullgraph=True, backend="eager")
    message = r"^train.compile: torch.compile .* train.compile=false"
    with pytest.raises(TrainingError, match=message), loud_compile(True):
        compiled(torch.ones(2))


def test_engine_fields_parse_and_validate():
    def train(**values):
        return from_dict(TrainingConfig, {"train": values}).train

    default = train()
    assert (default.engine, default.gradient_checkpointing, default.compile) == (
        "mxlora",
        "auto",
        "auto",
    )
    assert train(gradient_checkpointing="true").gradient_checkpointing is True
    assert train(compile="false").compile is False
    assert train(memory_budget_gb="20").memory_budget_gb == 20.0
    with pytest.raises(ConfigError, match="train.engine: expected one of 'mxlora', 'trl'"):
        train(engine="fast")
    with pytest.raises(ConfigError, match="train.compile"):
        train(compile="sometimes")
    with pytest.raises(ConfigError, match="train.compile: true needs engine mxlora"):
        train(engine="trl", compile=True)
    with pytest.raises(ConfigError, match="train.memory_budget_gb: must be > 0"):
        train(memory_budget_gb=0)
    assert default.cuda_graphs == "auto" and train(cuda_graphs="false").cuda_graphs is False
    with pytest.raises(ConfigError, match="train.cuda_graphs: true needs engine mxlora"):
        train(engine="trl", cuda_graphs=True)
    with pytest.raises(ConfigError, match="train.cuda_graphs: true cannot run with fsdp"):
        train(cuda_graphs=True, fsdp=True)


def test_cuda_graphs_decision_and_refusals():
    from mxlora.engine.loop import use_cuda_graphs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp32 = torch.bfloat16, torch.float32
    # auto: CUDA without FSDP (data parallel is fine), eager blocks, no checkpointing, bf16,
    # when twice the activations fit.
    assert use_cuda_graphs("auto", cuda, False, False, False, bf16, True) is True
    assert use_cuda_graphs("auto", cpu, False, False, False, bf16, None) is False
    assert use_cuda_graphs("auto", cuda, True, False, False, bf16, True) is False
    assert use_cuda_graphs("auto", cuda, False, True, False, bf16, True) is False
    assert use_cuda_graphs("auto", cuda, False, False, True, bf16, True) is False  # compiled
    assert use_cuda_graphs("auto", cuda, False, False, False, fp32, True) is False
    assert use_cuda_graphs("auto", cuda, False, False, False, bf16, False) is False
    assert use_cuda_graphs(True, cuda, False, False, True, bf16, False) is True  # the user's call
    assert use_cuda_graphs(False, cuda, False, False, False, bf16, True) is False
    for args, reason in (
        ((cpu, False, False, False, bf16), "needs a CUDA device"),
        ((cuda, True, False, False, bf16), "cannot run with FSDP"),
        ((cuda, False, True, False, bf16), "gradient checkpointing"),
        ((cuda, False, False, False, fp32), "needs bf16"),
    ):
        with pytest.raises(TrainingError, match=f"^train.cuda_graphs: true .*{reason}"):
            use_cuda_graphs(True, *args, True)


def test_only_lengths_met_often_enough_are_captured():
    from mxlora.engine.graphs import MIN_USES, worth_capturing

    lengths = [512] * MIN_USES + [640] * (MIN_USES - 1) + [1152] + [768] * (MIN_USES + 5)
    assert worth_capturing(lengths) == {512, 768}


def _counted_steps(monkeypatch):
    """``GraphedSteps`` on the CPU for buckets 128/256/384 over a step that records each packed
    length it computes; 384's first capture fails. Returns the steps, the computed lengths, the
    failures and a one-row batch of ``n`` tokens."""
    from mxlora.engine.graphs import GraphedSteps
    from mxlora.engine.packing import pack

    calls, failed = [], []

    def step(inputs):
        calls.append(inputs.batch.length)
        ids = inputs.batch.input_ids.float()
        return (ids.sum() * inputs.weight / inputs.items).detach()

    real_capture = GraphedSteps._capture

    def capture(self, inputs, loss):
        if inputs.batch.length == 384 and not failed:
            failed.append(384)
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_capture(self, inputs, loss)

    monkeypatch.setattr(GraphedSteps, "_capture", capture)

    def batch(n):
        return pack([list(range(1, n + 1))], [[1] * n], pad_id=0)

    return GraphedSteps(step, torch.device("cpu"), lengths={128, 256, 384}), calls, failed, batch


def _run_counted(graphed, batch, plan, ahead):
    """Each micro-batch of ``plan`` (its length) through ``graphed``, its loss checked against
    the plain step's; with ``ahead``, the next one's bucket captured ahead after each."""
    for n, upcoming in zip(plan, [*plan[1:], None], strict=True):
        want = torch.arange(1, n + 1).sum().float() * 2 / 7
        assert graphed(batch(n), 2.0, 7).item() == pytest.approx(want.item(), rel=1e-6), n
        if ahead and upcoming is not None:
            graphed.ahead(batch(upcoming))


def test_new_buckets_are_captured_without_an_eager_run_once_warm(monkeypatch):
    """The run's first micro-batch runs eagerly (the warm-up) before its capture; a later new
    bucket is captured straight away and replayed, and one whose capture fails falls back to
    the eager run and a second capture. Each micro-step's loss is the plain step's either way,
    and every micro-batch is computed exactly once (on the CPU a "replay" is the call)."""
    graphed, calls, failed, batch = _counted_steps(monkeypatch)
    _run_counted(graphed, batch, [100, 200, 120, 300, 210, 310], ahead=False)
    assert set(graphed.buckets) == {128, 256, 384} and failed == [384]
    assert graphed.captured_cold == 1  # 256; 128 warmed up the run, 384's capture failed
    assert calls == [128, 256, 128, 384, 256, 384]


def test_buckets_are_captured_a_step_ahead(monkeypatch):
    """``ahead`` captures a coming micro-batch's new bucket (the run warm, the length one to
    capture) before its turn, which then fills and replays it: every micro-batch is computed
    exactly once, with its own values. Nothing is captured ahead before the warm-up, for a
    length met too rarely, or twice; a bucket whose capture ahead failed takes the eager run
    and capture at its turn."""
    graphed, calls, failed, batch = _counted_steps(monkeypatch)
    graphed.ahead(batch(200))  # the run is not warm yet
    assert graphed.buckets == {}
    _run_counted(graphed, batch, [100, 200, 520, 300, 220, 120, 310], ahead=True)
    # 128: the warm-up's eager run; 256 captured ahead; 640 met too rarely; 384's capture
    # ahead failed, so its turn ran it eagerly and captured it then.
    assert set(graphed.buckets) == {128, 256, 384} and failed == [384]
    assert graphed.captured_ahead == graphed.captured_cold == 1
    assert graphed.refused == {384}
    assert calls == [128, 256, 640, 384, 256, 128, 384]


def test_graphed_steps_train_exactly_what_plain_steps_train(both_engines, tmp_path, monkeypatch):
    """CUDA graphs' bookkeeping on the CPU (replays are eager calls on the static buffers):
    each bucket's first micro-batch runs on fresh buffers, later ones are copied into them
    and "replayed", gradients stay allocated and are zeroed in place: the same losses, eval
    losses and adapter, bit for bit, as the plain run."""
    import mxlora.engine.loop as loop_module
    from mxlora.engine.graphs import GraphedSteps

    made = []

    class Recorded(GraphedSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    packed = []  # (loop, rows) of every packing
    real_pack = loop_module.Loop._pack

    def pack(self, rows, indices):
        packed.append((self, rows))
        return real_pack(self, rows, indices)

    monkeypatch.setattr(loop_module, "use_cuda_graphs", lambda *args: True)
    monkeypatch.setattr(loop_module, "GraphedSteps", Recorded)
    monkeypatch.setattr(loop_module.Loop, "_pack", pack)
    result = fit(quotes_config(tmp_path, "mxlora"))
    plain_run, plain_lora = both_engines["mxlora"]
    (graphed,) = made
    # Only lengths met often enough are "captured"; the others ran plain eager steps. All but
    # the run's first captured bucket went without an eager run of their own.
    assert graphed.replays > 0 and set(graphed.buckets) == graphed.lengths
    assert graphed.captured_cold >= len(graphed.buckets) - 1 >= 1
    assert graphed.captured_ahead == graphed.captured_cold  # each one micro-step early
    # Each training micro-batch packed once (the next step's first, packed for its capture
    # ahead, is not packed again at its turn).
    loop = packed[0][0]
    train_packs = sum(rows is loop.train_rows for _, rows in packed)
    assert train_packs == sum(len(step.micro_batches) for step in loop.plan)
    ours, theirs = metrics(result.run_dir), metrics(plain_run)
    keys = ("step", "loss", "grad_norm", "eval_loss")
    assert [{k: r.get(k) for k in keys} for r in ours] == [
        {k: r.get(k) for k in keys} for r in theirs
    ]
    assert json.loads((result.run_dir / "report.json").read_text())["cuda_graphs"] is True
    for name, want in plain_lora.items():
        torch.testing.assert_close(lora_state(result.model)[name], want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_mxlora_engine_matches_trl_on_cuda_in_bf16(tmp_path, compile_blocks):
    """On CUDA the engine runs SDPA with the sink key and CUDA graphs (auto), or with
    train.compile=true compiled decoder blocks with flex_attention (block mask, sinks through the
    LSE) under CUDA graphs: same losses as TRL within bf16 noise. With compile on, a block that
    cannot compile fails this test loudly (never a silent eager run)."""
    runs = {}
    for engine in ("trl", "mxlora"):
        extra = {"compile": compile_blocks} if engine == "mxlora" else {}
        cfg = quotes_config(tmp_path / engine, engine, **extra)
        cfg.model.dtype = "bfloat16"
        runs[engine] = [r["loss"] for r in metrics(fit(cfg).run_dir) if "loss" in r]
    assert len(runs["mxlora"]) == 6
    assert runs["mxlora"] == pytest.approx(runs["trl"], rel=2e-2)
    report = json.loads((tmp_path / "mxlora" / "mxlora" / "report.json").read_text())
    assert report["compiled"] is compile_blocks


@pytest.mark.slow
def test_compiled_blocks_train_what_eager_blocks_train(tmp_path):
    """``train.compile=true`` (every decoder block under ``torch.compile(fullgraph=True,
    dynamic=True)``, MoE with expert LoRA included) logs the eager run's losses and eval loss.
    On the CPU the first step pays the inductor compile (minutes), hence the slow tier."""
    eager = fit(quotes_config(tmp_path / "eager", "mxlora", compile=False, epochs=1))
    compiled = fit(quotes_config(tmp_path / "compiled", "mxlora", compile=True, epochs=1))
    ours, theirs = metrics(compiled.run_dir), metrics(eager.run_dir)
    assert json.loads((compiled.run_dir / "report.json").read_text())["compiled"] is True
    assert [r["loss"] for r in ours if "loss" in r] == pytest.approx(
        [r["loss"] for r in theirs if "loss" in r], rel=1e-5
    )
    assert [r["eval_loss"] for r in ours if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in theirs if "eval_loss" in r], rel=1e-5
    )


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [False, True])
def test_buckets_captured_without_warm_up_compute_what_eager_steps_compute_on_cuda(ahead):
    """On CUDA, buckets after the first are captured with no eager run of their own and
    replayed (a bf16 linear layer into the MXFP4 grouped matmul's Triton kernel, whose backward
    gives the layer's gradients): per micro-step losses and the accumulated gradients equal
    plain eager steps'. ``ahead``: each is captured at the micro-step before, while the
    device still runs that one's work and more queued behind it (no sync before a capture)."""
    from mxlora.engine.graphs import GraphedSteps, StepInputs
    from mxlora.mxfp4 import ops, quantize_mxfp4

    torch.manual_seed(0)
    cuda, experts, width = torch.device("cuda"), 4, 64
    embed = torch.nn.Embedding(512, width, device=cuda, dtype=torch.bfloat16).requires_grad_(False)
    layer = torch.nn.Linear(width, width, device=cuda, dtype=torch.bfloat16)
    blocks, scales = quantize_mxfp4(torch.randn(experts, width, width, device=cuda) * 0.05)

    def step(inputs):
        ids = inputs.batch.input_ids[0]
        share = ids.shape[0] // experts  # equal rows per expert, offsets made on the device
        offsets = torch.arange(1, experts + 1, device=cuda, dtype=torch.int32) * share
        y = ops.mxfp4_grouped_mm(layer(embed(ids)), blocks, scales, offsets, False, "triton")
        loss = y.float().square().mean() * inputs.weight / inputs.items
        loss.backward()
        return loss.detach()

    batches = [pack([list(range(1, n + 1))], [[1] * n], pad_id=0) for n in (100, 200, 120, 300)]
    batches += [pack([list(range(3, n + 3))], [[1] * n], pad_id=0) for n in (210, 310)]
    runs = []
    for graphs in (True, False):
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
        graphed = GraphedSteps(step, cuda, lengths={128, 256, 384})
        busy = torch.randn(4096, 4096, device=cuda, dtype=torch.bfloat16)
        losses = []
        with graphed.on_stream():
            for b, upcoming in zip(batches, [*batches[1:], None], strict=True):
                if not graphs:
                    losses.append(step(StepInputs.create(b, 1.0, 3, cuda)))
                    continue
                losses.append(graphed(b, 1.0, 3))
                if ahead and upcoming is not None:
                    for _ in range(20):  # milliseconds of work queued behind the replay
                        busy = (busy @ busy).clamp_(-1, 1)
                    graphed.ahead(upcoming)
        torch.cuda.synchronize()
        runs.append(([x.item() for x in losses], [p.grad.clone() for p in layer.parameters()]))
        if graphs:  # 128 ran eagerly first (the warm-up); 256 and 384 were captured cold
            assert set(graphed.buckets) == {128, 256, 384} and graphed.captured_cold == 2
            assert graphed.captured_ahead == (2 if ahead else 0)
    (g_losses, g_grads), (losses, grads) = runs
    assert g_losses == pytest.approx(losses, rel=1e-3)
    for got, want in zip(g_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_cuda_graphs_train_what_eager_steps_train_on_cuda(
    tmp_path, dtype, compile_blocks, monkeypatch
):
    """train.cuda_graphs=true (each bucket's micro-step captured once, then replayed; buckets
    after the first captured without an eager run) against false, eager blocks (flash varlen
    attention) or compiled ones (flex_attention): the same per-step losses, eval losses and
    adapter within bf16's noise (graphs need bf16: outside it torch's grouped_mm syncs with the
    host, which failed a float32 capture on the H100)."""
    import mxlora.engine.loop as loop_module
    from mxlora.engine.graphs import GraphedSteps

    made = []

    class Recorded(GraphedSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loop_module, "GraphedSteps", Recorded)
    monkeypatch.setattr(loop_module, "worth_capturing", set)  # every length met is captured
    runs = {}
    for graphs in (False, True):
        cfg = quotes_config(
            tmp_path / str(graphs), "mxlora", cuda_graphs=graphs, compile=compile_blocks
        )
        cfg.model.dtype = dtype
        result = fit(cfg)
        report = json.loads((result.run_dir / "report.json").read_text())
        assert (report["cuda_graphs"], report["compiled"]) == (graphs, compile_blocks)
        assert report["attention"] == ("flex" if compile_blocks else "varlen")
        rows = metrics(result.run_dir)
        runs[graphs] = (
            [r["loss"] for r in rows if "loss" in r],
            [r["eval_loss"] for r in rows if "eval_loss" in r],
            lora_state(result.model),
        )
    (losses, evals, lora), (g_losses, g_evals, g_lora) = runs[False], runs[True]
    (graphed,) = made
    if not compile_blocks:  # compiled blocks may compile a new shape's graph first: no promise
        assert graphed.captured_cold == len(graphed.buckets) - 1
    rel = 1e-5 if dtype == "float32" else 1e-2
    assert len(g_losses) == 6
    assert g_losses == pytest.approx(losses, rel=rel)
    assert g_evals == pytest.approx(evals, rel=rel)
    for name, want in lora.items():
        err = ((g_lora[name] - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == "float32" else 2e-2), (name, err)
