"""``mxlora bench``: the whole flow on a tiny checkpoint built by make-random, on the CPU.

One bench run, with four variants that compute the same function (the seed on TRL with
transformers' default experts implementation, mxlora train's default on mxlora's own engine, the
per-expert loop, and the MXFP4 experts mode) on a random-token, a real-data and an epoch
workload, checked
against itself and against what its figures must be. It is one test, not a module fixture shared
by several: under pytest 9 + xdist 3.8 ``xdist_group`` no longer keeps a module on one worker,
so a shared fixture would run the bench once per worker.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mxlora.cli import main
from mxlora.config import ConfigError
from mxlora.model.configs import parameter_counts
from mxlora.model.load import load_model
from mxlora.model.lora import apply_lora
from mxlora.model.tiny import TinySpec, tiny_config
from mxlora.recipes.bench import load_bench_config, markdown, variant_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "bench" / "configs" / "tiny.yaml"


def run_tiny_bench(tmp: Path, shared_data: Path):
    """Run a cut-down bench/configs/tiny.yaml through the CLI (1 step per workload)."""
    spec = tiny_config(TinySpec(layers=24, hidden=64, intermediate=64))
    (tmp / "tiny-config.json").write_text(json.dumps(spec))
    raw = yaml.safe_load(TINY.read_text())
    raw["workloads"] = [
        {"name": "1x24", "batch": 1, "length": 24},
        {
            "name": "quotes",
            "batch": 2,
            "data": {"source": str(shared_data / "english_quotes.jsonl"), "select": 12},
        },
        {
            "name": "quotes-epoch",
            "batch": 2,
            "epoch": True,
            "data": {"source": str(shared_data / "english_quotes.jsonl"), "select": 4},
        },
    ]
    config = tmp / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    overrides = [
        f"model={tmp / 'ckpt'}",
        f"make_random={tmp / 'tiny-config.json'}",
        "warmup_steps=0",
        "steps=1",
        f"results={tmp / 'results'}",
    ]
    # One thread per child: on a busy 2-core machine (pytest -n 2) two OpenMP threads per
    # process wait on each other and a tiny step takes 20 s instead of 1.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        code = main(["bench", str(config), *overrides])
    result = json.loads((tmp / "results" / "tiny.json").read_text())
    return code, result, tmp


def rows_by(result):
    return {(r["variant"], r["workload"]): r for r in result["rows"]}


def test_bench_flow_on_a_make_random_checkpoint(tmp_path, shared_data):
    bench_run = run_tiny_bench(tmp_path, shared_data)
    check_every_variant_and_workload_measured(bench_run)
    check_variants_train_the_same_model(bench_run)
    check_derived_figures(bench_run)


def check_every_variant_and_workload_measured(bench_run):
    code, result, tmp = bench_run
    assert code == 0
    rows = rows_by(result)
    variants = ("seed", "default", "seed-eager-experts", "mxfp4")
    assert set(rows) == {(v, w) for v in variants for w in ("1x24", "quotes", "quotes-epoch")}
    for (_, workload), row in rows.items():
        assert "error" not in row, row
        # The epoch workload: 4 rows at batch 2 is 2 steps, all timed.
        assert row["steps"] == (2 if workload == "quotes-epoch" else 1)
        assert row["warmup_steps"] == 0
        # tokens/s is tokens over time, step by step; train time is every step's time.
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(row["tokens_per_step"])
        assert row["train_time_s"] == pytest.approx(row["step_time_s"] * row["steps"])
        assert len(row["step_times_s"]) == row["steps"] + row["warmup_steps"]
        assert sum(row["step_times_s"]) == pytest.approx(row["train_time_s"], abs=1e-4)
        assert row["load_s"] > 0 and math.isfinite(row["train_loss"])
        assert row["peak_alloc_gb"] is None  # no device memory on the CPU
        assert row["attn_implementation"] == "eager"
    assert {rows[("seed", "quotes")]["experts_implementation"]} == {"grouped_mm"}
    assert rows[("seed-eager-experts", "quotes")]["experts_implementation"] == "eager"
    assert rows[("mxfp4", "quotes")]["experts_implementation"] == "mxfp4-torch"
    # Random tokens: every token trained, no padding.
    fixed = rows[("seed", "1x24")]
    assert fixed["tokens_per_step"] == fixed["padded_tokens_per_step"] == 24
    # Real rows: the trainer pads a batch of 2 to its longer row.
    quotes = rows[("seed", "quotes")]
    assert 0 < quotes["tokens_per_step"] <= quotes["padded_tokens_per_step"]
    assert quotes["padded_tokens_per_step"] % 2 == 0
    # mxlora's engine packs a step's rows into one sequence bucketed to a multiple of 128.
    packed = rows[("default", "quotes")]
    assert packed["tokens_per_step"] == quotes["tokens_per_step"]
    assert packed["padded_tokens_per_step"] % 128 == 0
    assert packed["padded_tokens_per_step"] - packed["tokens_per_step"] < 128
    assert (packed["compiled"], packed["checkpointed_blocks"]) == (False, "0 of 24")  # CPU
    assert (quotes["compiled"], quotes["checkpointed_blocks"]) == (False, "24 of 24")


def check_variants_train_the_same_model(bench_run):
    """grouped_mm / default experts, the per-expert loop and the MXFP4 experts: same data, same
    init, same loss."""
    _, result, _ = bench_run
    rows = rows_by(result)
    for workload in ("1x24", "quotes", "quotes-epoch"):
        seed = rows[("seed", workload)]
        for variant in ("default", "seed-eager-experts", "mxfp4"):
            other = rows[(variant, workload)]
            assert other["train_loss"] == pytest.approx(seed["train_loss"], rel=1e-4), variant
            assert other["tokens_per_step"] == seed["tokens_per_step"]


def check_derived_figures(bench_run):
    _, result, tmp = bench_run
    setup = result["setup"]
    # The checkpoint came from make-random, in the Hub layout.
    assert setup["make_random_s"] > 0
    assert (tmp / "ckpt" / "model.safetensors.index.json").is_file()
    counts = parameter_counts(json.loads((tmp / "ckpt" / "config.json").read_text()))
    assert setup["active_params"] == counts["active"] < setup["total_params"] == counts["total"]
    assert setup["matmul_dtype"] == "float32" and setup["matmul_tflops"] > 0
    assert result["baseline"] == "seed"
    rows = rows_by(result)
    for (_variant, workload), row in rows.items():
        mfu = 6 * counts["active"] * row["tokens_per_s"] / (setup["matmul_tflops"] * 1e12)
        assert row["mfu"] == pytest.approx(mfu)
        base = rows[("seed", workload)]["tokens_per_s"]
        assert row["ratio"] == pytest.approx(row["tokens_per_s"] / base)
    assert result["command"].startswith(f"mxlora bench {tmp / 'bench.yaml'} model=")
    text = (tmp / "results" / "tiny.md").read_text()
    assert text == markdown(result)
    assert "| seed-eager-experts | quotes |" in text
    assert setup["environment"]["versions"]["transformers"] in text


def test_shipped_configs_load():
    no_triton = load_bench_config(ROOT / "bench" / "configs" / "gpt-oss-20b-no-triton.yaml")
    cfgs = {v.name: variant_config(no_triton, v) for v in no_triton.variants}
    assert {name: c.model.experts for name, c in cfgs.items()} == {
        "seed": "dequantize-bf16",
        "auto": "auto",
        "mxfp4-torch": "mxfp4",
    }
    assert [w.name for w in no_triton.workloads] == ["quotes", "gsm8k"]
    tiny = load_bench_config(TINY)
    assert [v.name for v in tiny.variants] == ["seed", "default", "seed-eager-experts", "mxfp4"]
    assert tiny.variants[1].overrides == []  # exactly what mxlora train runs by default
    assert [w.name for w in tiny.workloads if w.epoch] == ["quotes-epoch", "gsm8k-epoch"]
    big = load_bench_config(ROOT / "bench" / "configs" / "gpt-oss-20b.yaml", ["steps=1"])
    assert [v.name for v in big.variants] == [
        "seed",
        "default",
        "default-20gb",
        "default-24gb",
        "graphs-eager",
        "graphs-compiled",
        "eager",
        "hf-best",
        "seed-eager-experts",
        "mxfp4",
        "mxfp4-flex",
    ]
    assert [w.name for w in big.workloads] == [
        "4x512",
        "4x1024",
        "4x2048",
        "quotes",
        "gsm8k",
        "quotes-epoch",
        "gsm8k-epoch",
    ]
    assert big.variants[1].overrides == []
    assert big.variants[2].overrides == ["train.memory_budget_gb=20"]
    assert variant_config(big, big.variants[2]).train.memory_budget_gb == 20
    assert variant_config(big, big.variants[3]).train.memory_budget_gb == 24
    graphs = {v.name: variant_config(big, v).train for v in big.variants[4:7]}
    assert {n: (t.compile, t.cuda_graphs) for n, t in graphs.items()} == {
        "graphs-eager": (False, True),
        "graphs-compiled": (True, True),
        "eager": (False, False),
    }
    epochs = {w.name: w for w in big.workloads if w.epoch}
    assert {name: (w.batch, w.data.select, w.data.test_size) for name, w in epochs.items()} == {
        "quotes-epoch": (4, 1000, 0.2),  # 800 train rows, as the notebook's quotes run
        "gsm8k-epoch": (4, 1000, 0.0),
    }
    seed, default = (variant_config(big, v) for v in big.variants[:2])
    assert (seed.train.engine, default.train.engine) == ("trl", "mxlora")
    assert default == variant_config(big, type(big.variants[0])(name="plain"))
    assert big.make_random == "20b" and big.steps == 1
    two = load_bench_config(ROOT / "bench" / "configs" / "gpt-oss-20b-2gpu.yaml")
    assert [(v.name, v.gpus) for v in two.variants] == [("eager", 1), ("eager-2gpu", 2)]
    assert [(w.batch, w.length) for w in two.workloads] == [(4, 2048)]
    huge = load_bench_config(ROOT / "bench" / "configs" / "gpt-oss-120b.yaml")
    assert huge.model == "random:120b" and huge.make_random is None
    assert [w.name for w in huge.workloads] == ["4x1024", "4x2048", "quotes"]
    for variant in huge.variants:
        cfg = variant_config(huge, variant)
        assert cfg.model.experts == "mxfp4" and cfg.lora.experts.layers == [11, 23, 35]
    sharded = [(v.name, v.gpus) for v in huge.variants if variant_config(huge, v).train.fsdp]
    assert sharded == [("fsdp-2gpu", 2)]


def test_bad_configs(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["variants"][2]["overrides"] = ["model.attn = sdpa"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="variants.seed-eager-experts"):
        load_bench_config(tmp_path / "bad.yaml")
    raw = yaml.safe_load(TINY.read_text())
    raw["workloads"][0]["data"] = {"source": "x.jsonl"}
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="exactly one of length and data"):
        load_bench_config(tmp_path / "both.yaml")
    raw = yaml.safe_load(TINY.read_text())
    raw["workloads"][0]["epoch"] = True  # random tokens: no rows to make an epoch of
    (tmp_path / "epoch.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="2x64: epoch needs data"):
        load_bench_config(tmp_path / "epoch.yaml")
    assert main(["bench", str(TINY), "--only", "nope"]) == 1


def test_profile_engine_times_and_counts_the_loop_steps(tmp_path):
    """bench/profile_engine.py on tiny (CPU): the timed steps' tokens are the workload's rows,
    and with no CUDA kernels nothing is counted as GPU work (kernels only, never their ops)."""
    path = ROOT / "bench" / "profile_engine.py"
    spec = importlib.util.spec_from_file_location("profile_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "profile",
                "model": "tiny:layers=24,hidden=64,intermediate=64",
                "variants": [{"name": "default"}],
                "workloads": [{"name": "3x16", "batch": 3, "length": 16}],
            }
        )
    )
    bench = load_bench_config(config)
    cfg = variant_config(bench, bench.variants[0])
    model, tokenizer = load_model(cfg.model, torch.device("cpu"))
    model = apply_lora(model, cfg.lora)
    figures = module.profile_workload(model, tokenizer, bench, cfg, "3x16", 1, 2, 1)
    assert figures["tokens"] == 3 * 16
    assert figures["wall_s"] > 0
    assert figures["busy_s"] == 0 and figures["launches"] == 0
    assert not figures["compiled"] and figures["checkpointing"] == "0 of 24"
    assert "aten::" in figures["table"]


def test_padding_script_counts_the_quotes_epoch(shared_data, tokenizer_dir, capsys):
    """bench/padding.py on the bench's quotes epoch (199 micro-batches of 4 rows, as the seed run's steps): every micro-batch
    is counted once in the packed lengths, and the padding it reports is what packing adds."""
    path = ROOT / "bench" / "padding.py"
    spec = importlib.util.spec_from_file_location("padding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (
        module.forward_tiles(128 + 64) == pytest.approx(1.64)
        and module.forward_tiles(128 + 65) == 2
    )
    assert module.gradient_tiles(129) == 2 and module.gradient_tiles(0) == 0
    assert (
        module.main([str(ROOT / "bench/configs/gpt-oss-20b.yaml"), "--workloads", "quotes-epoch"])
        == 0
    )
    out = capsys.readouterr().out
    first, tokens = out.splitlines()[:2]
    assert first.startswith("quotes-epoch: 199 micro-batches")
    uses = [int(u.split("(")[1].rstrip(")")) for u in first.split(": ", 2)[2].split(", ")]
    assert sum(uses) == 199  # the seed run's 199 steps
    real, pad = (float(w) for w in tokens.split()[3:6:2])
    assert 0 < pad < 128 and 300 < real < 1000
    assert "fewer" in out


@pytest.mark.slow
def test_gpus_runs_the_variant_under_torchrun(tmp_path):
    """``gpus: 2`` (gloo on the CPU): the variant's child runs as 2 processes, each workload's
    batch is per process (global batch twice the rows), rank 0 reports the global tokens."""
    raw = {
        "name": "tiny-2",
        "model": "tiny:layers=2,hidden=64,intermediate=64",
        "warmup_steps": 0,
        "steps": 2,
        "results": str(tmp_path / "results"),
        "variants": [
            {"name": "one", "overrides": ["model.dtype=float32", "lora.experts.layers=[1]"]},
            {
                "name": "two",
                "gpus": 2,
                "overrides": ["model.dtype=float32", "lora.experts.layers=[1]"],
            },
        ],
        "workloads": [{"name": "2x24", "batch": 2, "length": 24}],
    }
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        assert main(["bench", str(config)]) == 0
    result = json.loads((tmp_path / "results" / "tiny-2.json").read_text())
    rows = rows_by(result)
    one, two = rows[("one", "2x24")], rows[("two", "2x24")]
    assert (one["gpus"], two["gpus"]) == (1, 2)
    assert one["tokens_per_step"] == 2 * 24 and two["tokens_per_step"] == 4 * 24
    assert two["padded_tokens_per_step"] >= two["tokens_per_step"]
    assert math.isfinite(two["train_loss"]) and two["tokens_per_s"] > 0
    rate = result["setup"]["matmul_tflops"] * 1e12  # one process's
    for row in (one, two):  # MFU per GPU: the global tokens/s over the processes' rates
        flops = 6 * result["setup"]["active_params"] * row["tokens_per_s"]
        assert row["mfu"] == pytest.approx(flops / (rate * row["gpus"]))


def test_mfu_of_a_multi_gpu_row_is_per_gpu():
    """Rows report global tokens/s; MFU divides by the GPUs that produced them (a 2-GPU row
    at twice one GPU's tokens/s has the same MFU), and the ratio stays global."""
    from mxlora.recipes.bench import _finish

    result = {
        "setup": {"active_params": 1e9, "matmul_tflops": 600.0},
        "rows": [
            {"variant": "one", "workload": "w", "tokens_per_s": 10_000.0, "gpus": 1},
            {"variant": "two", "workload": "w", "tokens_per_s": 20_000.0, "gpus": 2},
        ],
    }
    _finish(result)
    one, two = result["rows"]
    assert one["mfu"] == pytest.approx(6e9 * 10_000 / 600e12) == pytest.approx(two["mfu"])
    assert (one["ratio"], two["ratio"]) == (1.0, 2.0)


def test_a_variant_holds_its_experts_as_mxlora_train_would_for_every_workload(monkeypatch):
    """``model.experts: auto`` is resolved per variant as ``mxlora train`` resolves it for each
    workload (the decision of mxlora.recipes.dryrun.training_experts, given each workload's
    batch and rows); the model is loaded once, so MXFP4 if any workload needs it. Explicit
    modes pass through."""
    from mxlora.recipes import dryrun
    from mxlora.recipes.bench import variant_experts

    bench = load_bench_config(TINY, ["model=tiny:layers=24"])
    cpu = torch.device("cpu")
    default = variant_config(bench, bench.variants[1])
    assert variant_experts(bench, default, cpu) == "mxfp4"  # the CPU: no budget, no decision
    default.train.memory_budget_gb = 1000.0
    assert variant_experts(bench, default, cpu) == "dequantize-bf16"
    seen = []

    def longest_needs_mxfp4(cfg, device, lengths):
        lengths = lengths()
        seen.append((cfg.train.batch_size, len(lengths), max(lengths)))
        return ("mxfp4" if max(lengths) > 64 else "dequantize-bf16"), ""

    monkeypatch.setattr(dryrun, "training_experts", longest_needs_mxfp4)
    assert variant_experts(bench, default, cpu) == "mxfp4"
    assert seen[0] == (2, 2 * (bench.warmup_steps + bench.steps), 64)  # the 2x64 workload
    assert len(seen) == len(bench.workloads)
    bench.workloads = bench.workloads[:1]
    assert variant_experts(bench, default, cpu) == "dequantize-bf16"
    assert variant_experts(bench, variant_config(bench, bench.variants[0]), cpu) == (
        "dequantize-bf16"
    )


def test_matmul_bench_refuses_methods_it_cannot_time(capsys):
    """bench/mxfp4_matmul.py: an unknown method is refused with the list of known ones (the
    optional ``triton_kernels`` among them), and ``triton_kernels`` where the package does not
    import, before any GPU is looked for."""
    import runpy

    bench = runpy.run_path(str(ROOT / "bench" / "mxfp4_matmul.py"), run_name="bench")
    with pytest.raises(SystemExit) as exit_:
        bench["main"](["--methods", "default,bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown ['bogus']" in err and "triton_kernels" in err
    if importlib.util.find_spec("triton_kernels") is None:
        with pytest.raises(SystemExit) as exit_:
            bench["main"](["--methods", "default,triton_kernels"])
        assert exit_.value.code == 2 and "not importable" in capsys.readouterr().err
