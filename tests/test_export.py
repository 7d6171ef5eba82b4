"""``mxlora export`` on the tiny MXFP4 gpt-oss (CPU): bytes kept, PEFT's merge as the oracle,
loading through transformers and mxlora, logits against the bf16 merge, refusals."""

from __future__ import annotations

import filecmp
import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from mxlora.cli import main
from mxlora.config import ModelConfig
from mxlora.model.load import load_model, load_weights
from mxlora.model.random import make_random, make_random_adapter
from mxlora.model.tiny import TinySpec, ensure_tiny, tiny_config
from mxlora.mxfp4 import dequantize_mxfp4_experts, quantize_mxfp4_experts
from mxlora.mxfp4.experts import PROJECTIONS
from mxlora.mxfp4.load import INDEX_FILE, load_mxfp4_adapter, load_mxfp4_model
from mxlora.recipes import export as export_module
from mxlora.recipes.export import EXPERT_ADAPTER, EXPORT_REPORT, export
from mxlora.recipes.merge import MERGE_INFO, MergeError, attach_adapter

pytestmark = pytest.mark.xdist_group("export")

# Attention everywhere; experts of layer 1 (both projections: two nested PEFT wrappers) and of
# layer 2 (down_proj only: one wrapper). Layers 0 and 3 and layer 2's gate_up_proj stay as they are.
EXPERT_TARGETS = [
    "1.mlp.experts.gate_up_proj",
    "1.mlp.experts.down_proj",
    "2.mlp.experts.down_proj",
]
ADAPTED_EXPERTS = {
    "model.layers.1.mlp.experts.gate_up_proj",
    "model.layers.1.mlp.experts.down_proj",
    "model.layers.2.mlp.experts.down_proj",
}
TEXT = "Give me a quote about: hope, courage. <|start|>assistant"
# lora_B's spread: a clear update (the base's logits are far from the merge's), of the relative
# size of a trained adapter's rather than one that rewrites the weights.
B_STD = 0.005


def _lora() -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=EXPERT_TARGETS
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().flatten()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _merged(base: Path, adapter: Path, dtype: str) -> torch.nn.Module:
    """What ``mxlora merge --dtype`` saves, in memory: PEFT's merge into the dequantized base."""
    cfg = ModelConfig(name_or_path=str(base), dtype=dtype, experts="dequantize-bf16")
    return attach_adapter(load_weights(cfg, "cpu"), adapter).merge_and_unload()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny base, a random adapter, its export (with the logit check) and both merges."""
    root = tmp_path_factory.mktemp("export")
    base = ensure_tiny()
    adapter = make_random_adapter(base, root / "adapter", _lora(), b_std=B_STD)
    report = export(str(base), adapter, root / "export", device="cpu")
    m16 = _merged(base, adapter, "bfloat16")
    m32 = _merged(base, adapter, "float32")
    return {
        "root": root,
        "base": base,
        "adapter": adapter,
        "report": report,
        "out": root / "export",
        "tensors": _tensors(root / "export"),
        "base_tensors": _tensors(base),
        "m16": m16,
        # The export's tokenizer files are the base's (checked below): one load serves all.
        "ids": torch.tensor([AutoTokenizer.from_pretrained(base)(TEXT)["input_ids"]]),
        "m16_state": m16.state_dict(),
        "m32_state": m32.state_dict(),
    }


def test_untouched_tensors_keep_their_bytes_and_the_hub_layout(exported):
    out, base = exported["out"], exported["base"]
    got, before = exported["tensors"], exported["base_tensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert got.keys() == before.keys()
    for name, tensor in got.items():
        stem = name.removesuffix("_blocks").removesuffix("_scales")
        adapted = name.endswith("self_attn.q_proj.weight") or stem in ADAPTED_EXPERTS
        for proj in ("k_proj", "v_proj", "o_proj"):
            adapted |= name.endswith(f"self_attn.{proj}.weight")
        assert tensor.dtype == before[name].dtype and tensor.shape == before[name].shape, name
        # Adapted tensors changed (the update is not zero anywhere), all others kept their bytes.
        assert _same_bytes(tensor, before[name]) != adapted, name
    # config.json as the base's: still declares MXFP4; the tokenizer, template and generation
    # config travel with it.
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "mxfp4"
    )
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    (record,) = json.loads((out / MERGE_INFO).read_text())["merges"]
    assert record["adapter"] == str(exported["adapter"].resolve())
    assert record["export"] == {"format": "mxfp4", "experts": "merge"}
    saved = json.loads((out / EXPORT_REPORT).read_text())
    assert saved["adapter_sha256"] == record["adapter_sha256"]


def test_attention_is_bit_for_bit_the_bf16_merge(exported):
    got, m16 = exported["tensors"], exported["m16_state"]
    attention = [n for n in got if ".self_attn." in n]
    assert len(attention) == 4 * 9  # q/k/v/o weights and biases, sinks
    for name in attention:
        assert _same_bytes(got[name], m16[name]), name


def test_experts_are_the_float32_merge_requantized(exported):
    """PEFT's fp32 merge of the dequantized model, quantized (OCP MX), is the oracle: it fixes
    the delta's semantics and the [E, in, out] -> [E, out, in] transpose (down_proj is square
    here, so a wrong transpose would keep every shape)."""
    got, m32 = exported["tensors"], exported["m32_state"]
    for stem in ADAPTED_EXPERTS:
        want = dequantize_mxfp4_experts(*quantize_mxfp4_experts(m32[stem]), torch.float32)
        have = dequantize_mxfp4_experts(got[f"{stem}_blocks"], got[f"{stem}_scales"], torch.float32)
        assert torch.equal(have, want), stem
    fidelity = {w.name: w for w in exported["report"].weights if w.format == "mxfp4"}
    assert fidelity.keys() == ADAPTED_EXPERTS
    for w in fidelity.values():
        print(w)
        assert w.delta_norm > 0 and 0.5 < w.realized_ratio < 1.5 and w.cosine > 0.5


def test_export_loads_in_transformers_and_mxlora_close_to_the_bf16_merge(exported):
    out, ids = exported["out"], exported["ids"]
    reference = _logits(exported["m16"].float(), ids)
    hf = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    ours, _ = load_model(ModelConfig(name_or_path=str(out), experts="mxfp4", dtype="float32"))
    base = load_mxfp4_model(exported["base"], dtype=torch.float32)
    base_cos = _cos(_logits(base, ids), reference)
    for model in (hf, ours):
        cos = _cos(_logits(model, ids), reference)
        print(f"cosine with the bf16 merge: export {cos:.5f}, base {base_cos:.5f}")
        assert cos >= 0.99
        assert 1 - cos < (1 - base_cos) / 3  # most of the way from the base to the merge
    # The export's own logit check says the same on its rendered rows.
    logits = exported["report"].logits
    assert logits["rows"] == 4 and logits["compute_dtype"] == "float32"
    assert logits["export"]["cosine_min"] >= 0.99
    assert 1 - logits["export"]["cosine_mean"] < (1 - logits["base"]["cosine_mean"]) / 3


def test_zero_update_exports_the_base_byte_for_byte(exported, tmp_path, capsys):
    """A fresh PEFT adapter (every lora_B zero): every file is the base's, byte for byte."""
    adapter = make_random_adapter(exported["base"], tmp_path / "zero", _lora(), b_std=0.0)
    code = main(
        ["export", "--base", str(exported["base"]), "--adapter", str(adapter)]
        + ["--out", str(tmp_path / "out"), "--no-logit-check"]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "logit check: skipped" in printed, printed
    assert filecmp.cmp(
        tmp_path / "out" / "model.safetensors", exported["base"] / "model.safetensors", False
    )
    report = json.loads((tmp_path / "out" / EXPORT_REPORT).read_text())
    assert report["logits"] is None
    assert all(w["delta_norm"] == 0 and w["changed_share"] == 0 for w in report["weights"])


def test_requantizing_values_on_the_grid_is_exact(exported, tmp_path, monkeypatch):
    """An update far below float32's resolution of the weights: W + ΔW == W, every block is
    re-quantized, and each value comes back exactly (on the grid already)."""
    adapter = make_random_adapter(exported["base"], tmp_path / "eps", _lora(), b_std=1e-30)
    # The logit check's default: off above the size limit (here: for every model).
    monkeypatch.setattr(export_module, "LOGIT_CHECK_AUTO_BYTES", 1000)
    report = export(str(exported["base"]), adapter, tmp_path / "out", device="cpu")
    assert report.logits is None
    got, before = _tensors(tmp_path / "out"), exported["base_tensors"]
    for stem in ADAPTED_EXPERTS:
        have = dequantize_mxfp4_experts(got[f"{stem}_blocks"], got[f"{stem}_scales"])
        want = dequantize_mxfp4_experts(before[f"{stem}_blocks"], before[f"{stem}_scales"])
        assert torch.equal(have, want), stem
    experts = [w for w in report.weights if w.format == "mxfp4"]
    assert all(w.delta_norm > 0 and w.realized_ratio == 0 for w in experts)


def test_keep_adapter_keeps_the_experts_and_writes_their_lora(exported, tmp_path):
    out = tmp_path / "keep"
    export(
        str(exported["base"]),
        exported["adapter"],
        out,
        experts="keep-adapter",
        logit_check=False,
        device="cpu",
    )
    got, merged = _tensors(out), exported["tensors"]
    for name, tensor in got.items():
        if ".mlp.experts." in name:
            assert _same_bytes(tensor, exported["base_tensors"][name]), name
        else:  # the non-expert LoRA is merged as in the full export
            assert _same_bytes(tensor, merged[name]), name
    # The expert adapter holds exactly the adapter's expert tensors, same bytes.
    with safe_open(str(exported["adapter"] / "adapter_model.safetensors"), "pt") as f:
        expert_keys = {k for k in f.keys() if ".mlp.experts." in k}  # noqa: SIM118
        originals = {k: f.get_tensor(k) for k in expert_keys}
    kept = _tensors(out / EXPERT_ADAPTER)
    assert kept.keys() == expert_keys and len(expert_keys) == 6
    assert all(_same_bytes(kept[k], originals[k]) for k in expert_keys)
    assert json.loads((out / MERGE_INFO).read_text())["merges"][0]["export"]["experts"] == (
        "keep-adapter"
    )

    # It loads with PEFT on transformers' dequantized model and with mxlora on MXFP4 experts;
    # both are the bf16 merge up to its roundings.
    ids = exported["ids"]
    hf = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    hf_logits = _logits(peft.PeftModel.from_pretrained(hf, out / EXPERT_ADAPTER), ids)
    ours = load_mxfp4_adapter(load_mxfp4_model(out, dtype=torch.float32), out / EXPERT_ADAPTER)
    ours_logits = _logits(ours, ids)
    assert (hf_logits - ours_logits).abs().max() < 1e-4
    reference = _logits(exported["m16"].float(), ids)
    assert _cos(ours_logits, reference) > 0.999


def test_refuses_a_non_empty_out_and_leaves_nothing_on_failure(
    exported, tmp_path, monkeypatch, capsys
):
    base, adapter = str(exported["base"]), exported["adapter"]
    with pytest.raises(MergeError, match="already exists; export never overwrites"):
        export(base, adapter, exported["out"], logit_check=False)
    code = main(
        ["export", "--base", base, "--adapter", str(adapter), "--out", str(exported["out"])]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"mxlora export: error: output {exported['out']} already exists; export never "
        "overwrites (remove it or pick another --out)"
    )

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    # Fails after the shards are copied and the attention weights written.
    monkeypatch.setattr(export_module, "_merge_expert", fail)
    with pytest.raises(RuntimeError, match="injected"):
        export(base, adapter, tmp_path / "out", logit_check=False, device="cpu")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp twin


def test_sharded_base_keeps_its_shards_and_gives_the_same_tensors(exported, tmp_path):
    # The tiny model in the Hub's sharded layout (same tensors: same generator and seed); the
    # shard limit lies just above one layer's gate_up_proj_blocks, which then sits alone.
    sharded = make_random(tmp_path / "base", tiny_config(TinySpec()), max_shard_bytes=16_900).path
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    # Some adapted expert weight has its blocks and scales in different shards.
    assert any(index[f"{s}_blocks"] != index[f"{s}_scales"] for s in ADAPTED_EXPERTS)
    out = tmp_path / "out"
    export(str(sharded), exported["adapter"], out, logit_check=False, device="cpu")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards and len(shards) > 3
    assert (out / INDEX_FILE).read_bytes() == (sharded / INDEX_FILE).read_bytes()
    got = _tensors(out)
    assert got.keys() == exported["tensors"].keys()
    for name, tensor in got.items():
        assert _same_bytes(tensor, exported["tensors"][name]), name
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert all(index[k] == shard for k in f.keys()), shard  # noqa: SIM118


def test_bench_script_runs_on_tiny(exported, tmp_path, capsys):
    """bench/export_20b.py's own code path (seed-shaped random adapter, figures, CLI) on tiny."""
    path = Path(__file__).parents[1] / "bench" / "export_20b.py"
    spec = importlib.util.spec_from_file_location("export_20b", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(exported["base"], tmp_path / "out", adapter=exported["adapter"])
    assert {w["name"] for w in result["weights"]} == ADAPTED_EXPERTS
    assert all(w["delta_norm"] > 0 for w in result["weights"])
    assert result["output_bytes"] > result["tensor_bytes"] > 0 and result["peak_rss_bytes"] > 0

    # The CLI with its seed-shaped random adapter, on expert layers the tiny model has.
    json_path = tmp_path / "figures.json"
    code = bench.main(
        ["--base", str(exported["base"]), "--out", str(tmp_path / "again")]
        + ["--expert-layers", "0,3", "--json", str(json_path)]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "host peak RSS" in printed and "layers.3.mlp.experts.down_proj" in printed
    assert (tmp_path / "again-adapter" / "adapter_config.json").is_file()
    names = {w["name"] for w in json.loads(json_path.read_text())["weights"]}
    assert names == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 3) for p in PROJECTIONS}


def _config_only(folder: Path, spec: TinySpec) -> Path:
    """A folder holding only a tiny spec's config.json (all an adapter or the checks read)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config(spec)))
    return folder


def test_wrong_adapter_or_base_is_a_one_line_error(exported, tmp_path, capsys):
    other = _config_only(tmp_path / "six", TinySpec(layers=6))
    foreign = make_random_adapter(other, tmp_path / "foreign", _lora())
    bf16 = _config_only(tmp_path / "bf16", TinySpec(mxfp4=False))
    cases = [
        (
            exported["base"],
            foreign,
            "does not fit this model: 16 adapter tensor(s) have no place in it",
        ),
        (bf16, exported["adapter"], "its experts are not MXFP4"),
    ]
    for base, adapter, message in cases:
        code = main(
            ["export", "--base", str(base), "--adapter", str(adapter)]
            + ["--out", str(tmp_path / "out")]
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith("mxlora export: error: ") and message in err, err
        assert not (tmp_path / "out").exists()
