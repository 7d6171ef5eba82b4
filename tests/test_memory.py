"""How many decoder blocks the mxlora engine checkpoints (:mod:`mxlora.engine.memory`).

- the per-block estimate equals the bytes a tiny gpt-oss block really saves for its backward
  (``saved_tensors_hooks``, storages counted once, parameters excluded) in the engine's
  configuration: bf16 autocast, packed flex attention with its block masks, LoRA on attention
  and experts, MXFP4 and dequantized experts, eager (default tier) and compiled (slow tier);
- the estimate reproduces the H100's measured peaks (gpt-oss-20b at 4 x 2048 with no and with
  every block checkpointed, gpt-oss-120b at 4 x 1024 with every block), and ``auto`` picks the
  fewest blocks that fit the budget;
- checkpointing the first k of n blocks leaves the loss and LoRA gradients unchanged (fp32) and
  keeps nothing of exactly those blocks.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from peft.helpers import disable_input_dtype_casting

import mxlora.engine.memory as memory_module
import mxlora.engine.norm as norm_module
import mxlora.mxfp4.experts as experts_module
import mxlora.mxfp4.gate as gate_module
from mxlora.config import ExpertTargets, LoraConfig, ModelConfig
from mxlora.engine.attention import build_masks, register
from mxlora.engine.loop import blocks_attached, forward_loss
from mxlora.engine.memory import (
    GB,
    HEADROOM,
    EagerKernels,
    activations_fit,
    all_blocks,
    block_costs,
    checkpointed_blocks,
    experts_transient_bytes,
    loss_bytes,
    peak_bytes,
    trainable_bytes,
)
from mxlora.engine.packing import pack
from mxlora.model.load import load_weights
from mxlora.model.lora import apply_lora
from mxlora.mxfp4.gate import gate_reference

# intermediate != hidden, so a mixed-up width cannot go unnoticed; 3 blocks: 0 sliding (its
# input carries no gradient), 1 full attention with expert LoRA, 2 sliding without.
TINY = "tiny:layers=3,intermediate=96"
# The estimate leaves out per-block constants (LoRA factors cast to bf16, stacked expert
# factors, shared masks): ~2 % of a tiny block at 1024 tokens, nothing at gpt-oss-20b's size.
TOLERANCE = 0.03


def tiny_model(
    experts: str, dtype: str, dropout: float = 0.0, layers: str = TINY, device: str = "cpu"
):
    """A tiny gpt-oss with the seed's LoRA: all-linear attention, both projections of block 1's
    experts (none with dropout: expert LoRA takes no dropout)."""
    torch.manual_seed(0)
    model = load_weights(ModelConfig(name_or_path=layers, experts=experts, dtype=dtype), device)
    lora = LoraConfig(experts=ExpertTargets(layers=[] if dropout else [1]), dropout=dropout)
    peft = apply_lora(model, lora)
    with torch.no_grad():  # B non-zero: every factor gets a gradient
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    lm = peft.get_base_model()
    lm.set_attn_implementation(register())
    lm.train()
    return peft, lm


def batch(lengths: list[int]):
    rows = [[(7 * r + 3 * i) % 1000 + 5 for i in range(n)] for r, n in enumerate(lengths)]
    return pack(rows, [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths], 0)


def saved_bytes_per_block(lm, packed, kind: str, dtype: torch.dtype) -> list[int]:
    """Bytes each decoder block saves for the backward: every storage a saved tensor lives in,
    counted once (views and re-saves share it), parameters excluded, attributed to the block
    whose forward saved it first. As the loop runs it: PEFT's input cast off."""
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    blocks = lm.model.layers
    current: list[int | None] = [None]
    seen: set[int] = set()
    per_block = [0] * len(blocks)

    def on_save(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if current[0] is not None and key not in params and key not in seen:
            seen.add(key)
            per_block[current[0]] += storage.nbytes()
        return t

    hooks = []
    for index, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    masks = build_masks(packed.doc_ids, lm.config.sliding_window, kind, dtype, packed.cu_seqlens)
    try:
        with (
            autocast,
            disable_input_dtype_casting(lm),
            torch.autograd.graph.saved_tensors_hooks(on_save, lambda t: t),
        ):
            lm.model(
                input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=masks
            )
    finally:
        for hook in hooks:
            hook.remove()
    return per_block


@pytest.fixture
def flex_forward_on_cpu(monkeypatch):
    """flex_attention refuses inputs that need a gradient on the CPU (its backward is CUDA
    only); its forward, which saves what it saves on CUDA, runs there. Only the forward runs."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args, **kwargs: None)


class _GateSaving(torch.autograd.Function):
    """The registered Triton gate's saved tensors on the CPU: its own ``setup_context``, the
    output from the formula (the kernel needs a GPU or the interpreter)."""

    @staticmethod
    def forward(ctx, gate_up, bias, expert_ids, alpha, limit):
        with torch.no_grad():
            out = gate_reference(gate_up, bias, expert_ids, alpha, limit)
        gate_module._setup_context(ctx, (gate_up, bias, expert_ids, alpha, limit), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only the forward's saved tensors are measured")


class _NormSaving(torch.autograd.Function):
    """The registered Triton RMSNorm's saved tensors on the CPU, as :class:`_GateSaving`."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.no_grad():
            out = norm_module.rms_norm_reference(x, weight, eps)
        norm_module._setup_context(ctx, (x, weight, eps), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only the forward's saved tensors are measured")


def assert_estimate_matches(
    experts: str,
    compiled: bool,
    dropout: float = 0.0,
    dtype: str = "bfloat16",
    cuda_kernels: bool = False,
    monkeypatch=None,
) -> None:
    """``cuda_kernels``: the eager block as CUDA runs it (flash varlen attention, whose CPU
    stand-in saves what flash does; the Triton gate and norms, which keep their inputs)."""
    if cuda_kernels:
        monkeypatch.setattr(experts_module, "gate_reference", _GateSaving.apply)
        monkeypatch.setattr(norm_module, "fused_rms_norm", _NormSaving.apply)
    peft, lm = tiny_model(experts, dtype, dropout)
    compute = getattr(torch, dtype)
    if compiled:
        # AOTAutograd with the min-cut partitioner inductor uses (what is saved, what is
        # recomputed), without generating code.
        for block in lm.model.layers:
            block.compile(backend="aot_eager_decomp_partition", fullgraph=True, dynamic=True)
    packed = batch([600, 300, 124])  # 1024 tokens, three documents
    tokens = packed.input_ids.numel()
    with norm_module.fused_norms(lm, cuda_kernels):
        kind = "varlen" if cuda_kernels else "flex"
        measured = saved_bytes_per_block(lm, packed, kind, compute)
    # On the CPU, the torch backend's eager blocks run the experts block
    # differentiated by hand (what keeps the gate's input only, as the Triton gate does).
    kernels = EagerKernels(*[cuda_kernels] * 3, torch_block=not compiled)
    costs = block_costs(peft, experts, compute, compiled, kernels)
    if not dropout:
        assert costs[1].per_token > costs[2].per_token  # expert LoRA keeps more
    # Block 0 is left out: its input carries no gradient (frozen embeddings), so its first norm
    # keeps nothing, and the rotary tables and masks all blocks share are saved under it.
    expected = [c.saved(tokens) for c in costs]
    if dropout:
        # The estimate counts CUDA's fused dropout (a one-byte mask); the CPU's composite one
        # keeps its mask in the input's dtype (bf16: the loop turns PEFT's input cast off).
        widths = 3 * lm.config.hidden_size + lm.config.num_attention_heads * lm.config.head_dim
        expected = [e + (2 - 1) * widths * tokens for e in expected]
    for index in (1, 2):
        assert measured[index] == pytest.approx(expected[index], rel=TOLERANCE), index


@pytest.mark.parametrize(
    ("experts", "dropout", "dtype"),
    [
        ("mxfp4", 0.0, "bfloat16"),
        ("dequantize-bf16", 0.0, "bfloat16"),
        ("mxfp4", 0.1, "bfloat16"),
        ("mxfp4", 0.0, "float32"),
    ],
)
def test_estimate_is_what_an_eager_block_saves(flex_forward_on_cpu, experts, dropout, dtype):
    assert_estimate_matches(experts, compiled=False, dropout=dropout, dtype=dtype)


def test_estimate_is_what_an_eager_block_saves_on_cuda_kernels(monkeypatch):
    """Flash varlen attention and the Triton gate and norms keep less than the CPU's paths."""
    assert_estimate_matches("mxfp4", compiled=False, cuda_kernels=True, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_estimate_is_what_a_compiled_block_saves(flex_forward_on_cpu):
    """MXFP4 experts: dequantized ones with expert LoRA do not compile whole (PEFT registers a
    parametrization in their forward), so the engine runs them with ``train.compile=false``."""
    try:
        assert_estimate_matches("mxfp4", compiled=True)
    finally:
        torch._dynamo.reset()


def meta_gpt_oss(name: str, expert_layers: list[int]):
    """A full-size gpt-oss with the seed's LoRA on the meta device, and its weights' bytes."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from mxlora.model import configs
    from mxlora.recipes.dryrun import weights_and_adapter

    raw = getattr(configs, f"gpt_oss_{name}_config")()
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GptOssConfig(**raw), dtype=torch.bfloat16)
    model = apply_lora(model, LoraConfig(experts=ExpertTargets(layers=expert_layers)))
    weights, _, lora = weights_and_adapter(model, "mxfp4", torch.bfloat16)
    return model, (weights + lora) / GB


@pytest.fixture(scope="module")
def gpt_oss_20b():
    return meta_gpt_oss("20b", [7, 15, 23])


def estimated_peak_gb(
    model,
    held_gb: float,
    tokens: int,
    checkpointed: int,
    compiled: bool,
    cuda: bool = False,
    in_place_loss: bool = False,
):
    """The estimate for an H100 run: CUDA's kernels in eager blocks (``cuda``), the loss's
    logits overwritten in place (``in_place_loss``: the Triton loss kernel) or autograd's fp32
    copies (before it), the dense experts path's transient on the Triton backend."""
    costs = block_costs(model, "mxfp4", torch.bfloat16, compiled, EagerKernels(*[cuda] * 3))
    extra = loss_bytes(model.config, tokens, torch.bfloat16, in_place=in_place_loss)
    with mock.patch.object(memory_module, "resolve_backend", lambda device: "triton"):
        transient = experts_transient_bytes(
            model.config, "mxfp4", tokens, torch.bfloat16, torch.device("cuda")
        )
    activations = peak_bytes(costs, checkpointed, tokens, extra, transient)
    return held_gb + (trainable_bytes(model) + activations) / GB


def test_estimate_reproduces_the_h100_peaks_of_4x2048(gpt_oss_20b):
    """docs/BENCHMARKS.md, H100, 4 x 2048 packed (8192 tokens). Compiled blocks, the loss's
    logits overwritten in place (commit 3a6aabf: default, default-20gb): 38.9 GB peak allocated
    without checkpointing, 18.7 GB with 22 of 24 blocks checkpointed; there the dense experts
    path's dequantized gate_up (1.06 GB) outgrows the loss chunk (0.4 GB)."""
    model, held_gb = gpt_oss_20b
    peak = functools.partial(estimated_peak_gb, model, held_gb, 8192, in_place_loss=True)
    assert peak(0, True) == pytest.approx(38.9, rel=0.05)
    assert peak(22, True) == pytest.approx(18.7, rel=0.05)
    # Before, the loss chunk's fp32 copies (2.9 GB) were the larger (the evening's run A):
    # compiled 40.3 / 17.8 GB with no / every block checkpointed; eager blocks on CUDA's
    # kernels (flash varlen, the Triton gate and norms) 38.4 / 17.8 GB.
    assert estimated_peak_gb(model, held_gb, 8192, 0, True) == pytest.approx(40.3, rel=0.05)
    assert estimated_peak_gb(model, held_gb, 8192, 24, True) == pytest.approx(17.8, rel=0.05)
    assert estimated_peak_gb(model, held_gb, 8192, 0, False, True) == pytest.approx(38.4, rel=0.05)
    assert estimated_peak_gb(model, held_gb, 8192, 24, False, True) == pytest.approx(17.8, rel=0.05)


def test_estimate_reproduces_the_h100_peak_of_120b():
    """docs/BENCHMARKS.md, gpt-oss-120b on one H100, 4 x 1024, eager blocks, every block
    checkpointed: 69.4 GB peak allocated."""
    model, held_gb = meta_gpt_oss("120b", [11, 23, 35])
    assert estimated_peak_gb(model, held_gb, 4096, 36, False) == pytest.approx(69.4, rel=0.05)


def test_auto_checkpoints_the_fewest_blocks_that_fit(gpt_oss_20b):
    model, held_gb = gpt_oss_20b
    cpu, bf16 = torch.device("cpu"), torch.bfloat16

    def decide(setting, tokens, budget, compiled=True):
        return checkpointed_blocks(
            setting, model, "mxfp4", tokens, bf16, cpu, budget, compiled, held_gb
        )

    # The seed's quotes step (4 rows, ~640 tokens) fits 20 GB; 4 x 2048 needs every block there.
    assert decide("auto", 640, 20.0) == 0
    assert decide("auto", 8192, 20.0) == 24
    assert decide("auto", 8192, 500.0) == 0
    assert decide(True, 128, 500.0) == 24 and decide(False, 8192, 1.0) == 0
    assert decide("auto", 8192, None) == 0  # CPU without a budget: none, deterministically
    # In between, the fewest that fit: one block fewer would not.
    costs = block_costs(model, "mxfp4", bf16, compiled=True)
    extra = loss_bytes(model.config, 8192, bf16)
    free = HEADROOM * 30.0 - held_gb - trainable_bytes(model) / GB
    k = decide("auto", 8192, 30.0)
    assert 0 < k < 24
    assert peak_bytes(costs, k, 8192, extra) <= free * GB < peak_bytes(costs, k - 1, 8192, extra)
    # Eager blocks keep about twice as much: more of them recompute under the same budget.
    assert decide("auto", 8192, 30.0, compiled=False) > k
    # TRL's padded step takes the loss from full logits: at 4 x 1024 it needs checkpointing
    # (all blocks) under a budget the chunked loss fits without.
    assert decide("auto", 4096, 52.0, compiled=False) == 0
    assert all_blocks("auto", model, "mxfp4", 4096, bf16, cpu, 52.0, held_gb)
    # A larger budget never checkpoints more.
    counts = [decide("auto", 8192, b) for b in (20, 24, 30, 40, 60, 80)]
    assert counts == sorted(counts, reverse=True)


def test_cuda_graphs_ask_whether_two_copies_of_the_activations_fit(gpt_oss_20b):
    """CUDA graphs' ``auto``: the graphs' pool keeps the largest bucket's activations while a
    new bucket's first micro-batch runs eagerly, so twice the peak must fit: quotes-sized
    batches do in 40 GB, 4 x 2048 (eager blocks) not even in 80; no budget on the CPU."""
    model, held_gb = gpt_oss_20b
    cpu, bf16 = torch.device("cpu"), torch.bfloat16

    def fits(tokens, budget):
        return activations_fit(model, "mxfp4", tokens, bf16, cpu, budget, False, 2, held_gb)

    assert fits(640, 40.0) is True
    assert fits(8192, 80.0) is False
    assert fits(640, None) is None
    one = activations_fit(model, "mxfp4", 8192, bf16, cpu, 80.0, False, 1, held_gb)
    assert one is True  # one copy fits where two do not: the test can fail both ways


def test_first_k_blocks_checkpointed_give_the_same_loss_and_gradients():
    peft, lm = tiny_model("mxfp4", "float32", layers="tiny:layers=4,intermediate=96")
    packed = batch([90, 50, 60])
    tokens = packed.input_ids.numel()
    costs = block_costs(peft, "mxfp4", torch.float32, compiled=False)
    blocks = lm.model.layers
    results = {}
    for checkpointed in (0, 2, 4):
        with blocks_attached(blocks, checkpointed, compiled=False):
            kept = saved_bytes_per_block(lm, packed, "reference", torch.float32)
            peft.zero_grad()
            loss = forward_loss(lm, packed, "reference", torch.float32, "torch")
            loss.backward()
        # A checkpointed block keeps its input alone, the others all they save.
        inputs = [c.checkpointed_per_token * tokens for c in costs]
        assert kept[:checkpointed] == inputs[:checkpointed]
        assert all(k > 10 * i for k, i in zip(kept[checkpointed:], inputs, strict=False))
        grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
        results[checkpointed] = (loss.item(), grads)
    assert all(type(b).forward is b.forward.__func__ for b in blocks)  # restored
    loss0, grads0 = results[0]
    assert any("experts" in n for n in grads0) and all(g.abs().sum() > 0 for g in grads0.values())
    for checkpointed in (2, 4):
        loss, grads = results[checkpointed]
        assert loss == pytest.approx(loss0, rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads0[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.gpu
def test_first_k_compiled_blocks_checkpointed_train_alike_on_cuda():
    """On CUDA with compiled blocks and flex_attention (the engine's default path), the first
    k of n blocks checkpointed (checkpoint around the compiled forward) give the loss and LoRA
    gradients of none checkpointed, within bf16 noise; compilation never falls back."""
    from mxlora.engine.loop import loud_compile

    packed = batch([300, 200, 140]).to(torch.device("cuda"))
    results = {}
    for checkpointed in (0, 2, 4):  # a fresh model each: Module.compile stays on a block
        peft, lm = tiny_model(
            "mxfp4", "bfloat16", layers="tiny:layers=4,intermediate=96", device="cuda"
        )
        with blocks_attached(lm.model.layers, checkpointed, compiled=True), loud_compile(True):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward_loss(lm, packed, "flex", torch.bfloat16, "triton")
            loss.backward()
        grads = {n: p.grad.float() for n, p in peft.named_parameters() if p.requires_grad}
        results[checkpointed] = (loss.item(), grads)
    loss0, grads0 = results[0]
    for checkpointed in (2, 4):
        loss, grads = results[checkpointed]
        assert loss == pytest.approx(loss0, rel=1e-2)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads0[name], rtol=5e-2, atol=1e-3, msg=name)


def rank_loop(tmp_path, lengths: list[int], world_size: int, rank: int = 0):
    """The loop of one rank (of ``world_size``) over train rows of these ``lengths``, 4 rows a
    step, on the CPU (nothing trained: the plan and what it derives)."""
    from mxlora.config import TrainingConfig, from_dict
    from mxlora.distributed import DistInfo
    from mxlora.engine.loop import Loop
    from mxlora.report.metrics import MetricsLog

    peft, _ = tiny_model("mxfp4", "float32", layers="tiny:layers=2")
    rows = {"input_ids": [[5] * n for n in lengths], "completion_mask": [[1] * n for n in lengths]}
    cfg = from_dict(TrainingConfig, {"train": {"batch_size": 4, "seed": 0}})
    cpu = torch.device("cpu")
    metrics = MetricsLog(tmp_path / f"metrics-{world_size}-{rank}.jsonl", cpu, print_lines=False)
    args = (cfg, peft, rows, None, 0, cpu, torch.float32, metrics, tmp_path)
    return Loop(*args, info=DistInfo(rank=rank, world_size=world_size))


def test_the_plan_sizes_for_the_longest_share_a_process_packs(tmp_path):
    """Under a launcher each process packs its share of a micro-batch: the memory plan sizes
    for the longest share, not the whole micro-batch (which no process holds)."""
    lengths = [300, 100, 50, 250]  # one micro-batch of 4; shares [300, 100] and [50, 250]
    assert rank_loop(tmp_path, lengths, 1).longest == 768  # 700 tokens, bucketed to 128
    assert rank_loop(tmp_path, lengths, 2).longest == 512  # the larger share: 400 tokens


def test_cuda_graphs_capture_the_lengths_a_process_packs(tmp_path):
    """Under a launcher (data parallel) each process captures the buckets of its own shares of
    the micro-batches, the lengths it replays; the whole micro-batches' buckets (which no
    process packs) would leave every share to run eagerly."""
    from mxlora.engine.packing import bucketed

    def lengths(world_size: int, rank: int) -> set[int]:
        return rank_loop(tmp_path, [100] * 12, world_size, rank).capture_lengths()

    # 3 steps of 4 rows of 100 tokens: one process packs 400 tokens a step, each of two 200.
    assert bucketed(200) != bucketed(400)
    assert lengths(1, 0) == {bucketed(400)}
    assert lengths(2, 0) == lengths(2, 1) == {bucketed(200)}


def test_fused_norms_take_every_frozen_norm_for_the_duration(monkeypatch):
    """Inside ``fused_norms`` every RMSNorm of the model (two a block and the final one) runs the
    registered op, with the same result; after it, transformers' forward again."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    calls = []

    def counted(x, weight, eps):
        calls.append(x.shape)
        return norm_module.rms_norm_reference(x, weight, eps)

    monkeypatch.setattr(norm_module, "fused_rms_norm", counted)
    _, lm = tiny_model("mxfp4", "float32")
    packed = batch([40, 23])
    masks = build_masks(packed.doc_ids, lm.config.sliding_window, "flex", torch.float32)
    kwargs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids)
    with torch.no_grad():
        plain = lm.model(**kwargs, attention_mask=masks).last_hidden_state
        with norm_module.fused_norms(lm, active=True):
            fused = lm.model(**kwargs, attention_mask=masks).last_hidden_state
        with norm_module.fused_norms(lm, active=False):
            lm.model(**kwargs, attention_mask=masks)
    assert len(calls) == 2 * lm.config.num_hidden_layers + 1
    assert torch.equal(plain, fused)
    norms = [m for m in lm.modules() if isinstance(m, GptOssRMSNorm)]
    assert norms and not any("forward" in vars(m) for m in norms)


def test_what_the_experts_dense_path_and_the_loss_add(gpt_oss_20b):
    """The dense experts path holds one layer's gate_up dequantized while it runs: always on the
    torch backend, on Triton's from 192 rows per expert in bf16 on CUDA, never with experts held
    dequantized. The loss keeps one chunk of compute-dtype logits (and the hidden states'
    gradient) where the Triton kernel overwrites them, four times that in fp32 copies else."""
    model, _ = gpt_oss_20b
    c, bf16, cuda = model.config, torch.bfloat16, torch.device("cuda")
    gate_up = 32 * 5760 * 2880 * 2
    cpu = torch.device("cpu")
    assert experts_transient_bytes(c, "mxfp4", 128, bf16, cpu) == gate_up  # torch backend
    assert experts_transient_bytes(c, "dequantize-bf16", 8192, bf16, cpu) == 0
    with mock.patch.object(memory_module, "resolve_backend", lambda device: "triton"):
        # 192 rows per expert: 1536 tokens x top-4 over 32 experts.
        assert experts_transient_bytes(c, "mxfp4", 1535, bf16, cuda) == 0
        assert experts_transient_bytes(c, "mxfp4", 1536, bf16, cuda) == gate_up
        assert experts_transient_bytes(c, "mxfp4", 8192, torch.float32, cuda) == 0
        assert memory_module.loss_in_place(model, cuda)
    assert not memory_module.loss_in_place(model, cpu)
    chunk = 1024 * c.vocab_size
    assert loss_bytes(c, 8192, bf16, in_place=True) == chunk * 2 + 8192 * c.hidden_size * 2
    assert loss_bytes(c, 8192, bf16) == chunk * (2 + 3 * 4)
