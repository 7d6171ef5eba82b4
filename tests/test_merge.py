"""``mxlora merge`` on the tiny MXFP4 gpt-oss (fp32, CPU): logits, files, refusals, errors."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig

from mxlora.cli import main
from mxlora.config import ModelConfig
from mxlora.model.load import load_model
from mxlora.model.tiny import TinySpec, ensure_tiny, tiny_config
from mxlora.recipes.merge import MERGE_INFO, MergeError, merge

# One worker runs the whole module, so its module-scoped model fixtures are built once.
pytestmark = pytest.mark.xdist_group("merge")

# Attention (all-linear) everywhere plus the experts of layer 1 only, as the seed targets a few
# expert layers: layer 0's experts must come out of the merge unchanged.
EXPERT_TARGETS = ["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"]
TEXT = "Give me a quote about: hope, courage. <|start|>assistant"


def _lora(model: torch.nn.Module, seed: int = 0) -> peft.PeftModel:
    """PEFT LoRA with random non-zero B (a fresh adapter's B is zero: it would change nothing)."""
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=EXPERT_TARGETS
    )
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return pm


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Base (MXFP4 tiny, dequantized to fp32), a PEFT adapter saved from it, and the merge."""
    root = tmp_path_factory.mktemp("merge")
    base_dir = str(ensure_tiny())
    base, tokenizer = load_model(
        # The adapter is built with plain PEFT target_parameters: the seed's dequantized model.
        ModelConfig(name_or_path=base_dir, dtype="float32", experts="dequantize-bf16"),
        "cpu",
    )
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    base_logits = _logits(base, ids)
    base_experts = {
        n: p.detach().clone() for n, p in base.named_parameters() if ".mlp.experts." in n
    }
    pm = _lora(base)
    peft_logits = _logits(pm, ids)
    pm.save_pretrained(root / "adapter")
    out = merge(base_dir, root / "adapter", root / "merged", dtype="float32", device="cpu")
    return {
        "root": root,
        "base": base_dir,
        "ids": ids,
        "base_logits": base_logits,
        "peft_logits": peft_logits,
        "base_experts": base_experts,
        "out": out,
    }


def test_merged_logits_equal_peft_logits(merged):
    model = AutoModelForCausalLM.from_pretrained(
        merged["out"], dtype=torch.float32, attn_implementation="eager"
    )
    logits = _logits(model, merged["ids"])
    diff = (logits - merged["peft_logits"]).abs().max().item()
    print(f"max |merged - PeftModel| logits: {diff:.3g}")
    assert diff < 1e-4
    # The adapter matters: the base's logits are far from both.
    assert (logits - merged["base_logits"]).abs().max().item() > 1e-2

    # Expert LoRA went into layer 1's expert tensors only.
    params = dict(model.named_parameters())
    for name, before in merged["base_experts"].items():
        changed = not torch.equal(params[name], before)
        assert changed == (name.startswith("model.layers.1.") and not name.endswith("_bias")), name


def test_merged_folder_is_a_plain_honest_checkpoint(merged):
    out: Path = merged["out"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the weights are floats: nothing claims MXFP4
    assert config["dtype"] == "float32"
    (weights,) = out.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_dtype() == "F32"
    assert not any(k.endswith(("_blocks", "_scales")) for k in keys)
    assert not any("lora" in k for k in keys)
    # gpt-oss's stop tokens travel with the model.
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 199999]
    assert AutoTokenizer.from_pretrained(out)("<|return|>")["input_ids"] == [200002]
    (record,) = json.loads((out / MERGE_INFO).read_text())["merges"]
    assert record["base"] == merged["base"]
    assert record["adapter"] == str((merged["root"] / "adapter").resolve())


def test_merging_twice_is_refused(merged, capsys):
    root, adapter = merged["root"], merged["root"] / "adapter"
    # Same output again.
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge(merged["base"], adapter, merged["out"], dtype="float32", device="cpu")
    # The same adapter into its own merge result: it would be added twice.
    with pytest.raises(MergeError, match="already merged into"):
        merge(str(merged["out"]), adapter, root / "twice", dtype="float32", device="cpu")
    assert not (root / "twice").exists()
    # The CLI says so on one line, without a traceback.
    code = main(
        ["merge", "--base", str(merged["out"]), "--adapter", str(adapter)]
        + ["--out", str(root / "twice"), "--dtype", "float32"]
    )
    assert code == 2
    assert _error_line(capsys.readouterr().err).startswith("mxlora merge: error: adapter ")


def _error_line(stderr: str) -> str:
    """The CLI's error: one line, the last on stderr (after any loading progress bars)."""
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


def _foreign_adapter(path: Path, **overrides) -> Path:
    """A PEFT adapter made on a tiny gpt-oss of another shape (built in memory, never saved)."""
    raw = tiny_config(TinySpec(mxfp4=False, **overrides))
    model = AutoModelForCausalLM.from_config(GptOssConfig(**raw), dtype=torch.float32)
    _lora(model).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such folder"),
        (lambda p: (p.mkdir(), p)[1], "no adapter_config.json"),
        (lambda p: _foreign_adapter(p, hidden=32), "does not fit this model: size mismatch for"),
        # PEFT itself would load this one silently, dropping layers 4-5's tensors.
        (lambda p: _foreign_adapter(p, layers=6), "does not fit this model: 16 adapter tensor"),
    ],
    ids=["missing", "not-an-adapter", "other-shapes", "other-depth"],
)
def test_bad_adapter_is_a_one_line_error(merged, tmp_path, capsys, make, message):
    adapter = make(tmp_path / "adapter")
    code = main(
        ["merge", "--base", merged["base"], "--adapter", str(adapter), "--out", str(tmp_path / "o")]
    )
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_base_is_a_one_line_error(merged, tmp_path, capsys):
    code = main(
        ["merge", "--base", str(tmp_path / "nope"), "--adapter", str(merged["root"] / "adapter")]
        + ["--out", str(tmp_path / "o")]
    )
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and err == f"mxlora merge: error: model {tmp_path / 'nope'}: no such folder"
