"""``mxlora eval``: final-answer exact match scored on rendered reference completions (never a
tiny model's gibberish), the held-out loss against transformers' own, run-folder resolution."""

from __future__ import annotations

import json

import pytest
import torch

from mxlora.cli import main
from mxlora.config import TrainingConfig, dump_config, from_dict
from mxlora.data.inspect import inspect_rows
from mxlora.data.sources import RawRow, read_rows
from mxlora.data.spec import DataConfig, parse_source
from mxlora.recipes.evaluate import (
    exact_match,
    final_text,
    heldout_loss,
    normalize_answer,
    split_row,
)

GSM8K = DataConfig(source="example:gsm8k", adapter="fields", test_size=0.0)


def _render(rows: list[dict], tokenizer):
    raw = [RawRow(i, row, None) for i, row in enumerate(rows)]
    _, kept = inspect_rows(raw, GSM8K, tokenizer, 1024)
    assert len(kept) == len(rows)
    return kept


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return [r.value for r in read_rows(parse_source("example:gsm8k"))]


def test_reference_completion_scores_1_and_a_wrong_final_answer_0(gsm8k_rows, tokenizer):
    references = [split_row(r)[1] for r in _render(gsm8k_rows, tokenizer)]
    finals = [row["answer"].rpartition("####")[2].strip() for row in gsm8k_rows]
    assert [final_text(ref) for ref in references] == finals  # parsed from the rendered turn
    assert all(exact_match(ref, ref) == 1 for ref in references)
    # The same rows with another final answer (reasoning unchanged) score 0 against them.
    wrong = [
        {**row, "answer": f"{row['answer'].rpartition('####')[0]}#### 1{f}"}
        for row, f in zip(gsm8k_rows, finals, strict=True)
    ]
    for bad, ref in zip(_render(wrong, tokenizer), references, strict=True):
        assert exact_match(split_row(bad)[1], ref) == 0
    # Only the final answer counts: other reasoning, same answer written differently, scores 1.
    row = gsm8k_rows[0]
    final = int(finals[0])
    restated = {"question": row["question"], "answer": f"Think again.\n#### ${final:,}.0"}
    assert exact_match(split_row(_render([restated], tokenizer)[0])[1], references[0]) == 1


def test_a_completion_without_a_final_message_scores_0(gsm8k_rows, tokenizer):
    reference = split_row(_render(gsm8k_rows[:1], tokenizer)[0])[1]
    analysis_only = reference[: reference.index(tokenizer.convert_tokens_to_ids("<|end|>")) + 1]
    assert final_text(analysis_only) is None and exact_match(analysis_only, reference) == 0
    assert exact_match([], reference) == 0


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("72", "72"),
        (" 72. ", "72"),
        ("$1,000", "1000"),
        ("72.0", "72"),
        ("0.50", "0.5"),
        ("-3", "-3"),
        ("100", "100"),
        ("50%", "50"),
        ("Canberra", "canberra"),
        ("  The   Answer ", "the answer"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


# --- the model passes, on the tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    from mxlora.model.tiny import ensure_tiny

    return str(ensure_tiny())


@pytest.fixture(scope="module")
def base_model(tiny_dir):
    from mxlora.recipes.chat import ChatModel

    return ChatModel(tiny_dir, device="cpu").model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    """A run folder as `mxlora train` leaves it (config.yaml + adapter/), with a random
    non-zero adapter, so the adapter visibly changes the loss."""
    from mxlora.model.load import load_weights
    from mxlora.model.lora import apply_lora

    run = tmp_path_factory.mktemp("runs") / "gsm8k"
    cfg = from_dict(
        TrainingConfig,
        {
            "model": {"name_or_path": tiny_dir, "experts": "dequantize-bf16"},
            "lora": {"experts": {"layers": [1]}},
            "data": {"source": "example:quotes"},
            "train": {"max_len": 512},
        },
    )
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    model = apply_lora(load_weights(cfg.model, "cpu"), cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(run / "adapter")
    return run


def test_heldout_loss_is_transformers_loss_and_batch_invariant(base_model, gsm8k_rows, tokenizer):
    model = base_model
    rows = _render(gsm8k_rows[:3], tokenizer)
    one = heldout_loss(model, rows[:1])
    ids = torch.tensor([rows[0].input_ids])
    labels = torch.where(torch.tensor([rows[0].completion_mask]).bool(), ids, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss.item()
    assert one["loss"] == pytest.approx(reference, rel=1e-5)
    assert one["loss_tokens"] == sum(rows[0].completion_mask)  # the first token is never masked
    # Padding rows to a common length changes nothing: per-row sums add up.
    whole, single = heldout_loss(model, rows, batch_size=3), heldout_loss(model, rows, batch_size=1)
    assert whole["loss"] == pytest.approx(single["loss"], rel=1e-5)
    per_row = [heldout_loss(model, [r]) for r in rows]
    weighted = sum(p["loss"] * p["loss_tokens"] for p in per_row) / whole["loss_tokens"]
    assert whole["loss"] == pytest.approx(weighted, rel=1e-5)


def test_cli_evaluates_a_run_folder_as_base_plus_adapter(
    run_dir, tiny_dir, base_model, tokenizer, capsys
):
    from mxlora.recipes.chat import ChatModel

    args = ["eval", str(run_dir), "--data", "example:gsm8k", "--select", "2"]
    assert main([*args, "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == tiny_dir and result["adapter"] == str(run_dir / "adapter")
    assert result["data"]["adapter"] == "fields" and result["data"]["kept"] == 2
    assert result["scored"] == 2 and len(result["answers"]) == 2
    finals = {r["reference"] for r in result["answers"]}
    assert finals <= {
        r["answer"].rpartition("####")[2].strip()
        for r in (x.value for x in read_rows(parse_source("example:gsm8k")))
    }
    # The loss is the adapted model's on those rows, not the base model's.
    data = DataConfig(source="example:gsm8k", adapter="fields", select=2, test_size=0.0)
    _, rows = inspect_rows(read_rows(parse_source("example:gsm8k")), data, tokenizer, 512)
    adapted = ChatModel(tiny_dir, str(run_dir / "adapter"), device="cpu").model
    assert result["loss"] == pytest.approx(heldout_loss(adapted, rows)["loss"], rel=1e-5)
    assert abs(result["loss"] - heldout_loss(base_model, rows)["loss"]) > 1e-3
    # The plain summary names both numbers.
    assert main([*args, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"loss        {result['loss']:.4f}" in out and "exact match 0.000 (0 of 2" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {lr: 1.0e-3}\n")
    assert main(["eval", str(tmp_path / "run"), "--data", "example:gsm8k"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mxlora eval: error: run {tmp_path / 'run'}: no adapter/ (the run has not finished)"
    )


def test_eval_rows_take_the_runs_rendering_but_never_cut_or_widen_the_loss():
    from mxlora.recipes.evaluate import eval_data_config

    run = from_dict(
        TrainingConfig,
        {
            "data": {
                "source": "example:quotes",
                "date": "2024-01-02",
                "reasoning_effort": "high",
                "truncate": True,
                "loss_on": "all",
                "test_size": 0.3,
            }
        },
    )
    data = eval_data_config("example:gsm8k", run, select=5)
    assert (data.source, data.adapter, data.select, data.test_size) == (
        "example:gsm8k",
        "fields",
        5,
        0.0,
    )
    assert (data.date, data.reasoning_effort) == ("2024-01-02", "high")  # the run's rendering
    assert (data.truncate, data.loss_on) == (False, "assistant")
    assert eval_data_config("example:gsm8k", None, None).date == DataConfig().date


def test_resolve_target(tmp_path):
    from mxlora.recipes.evaluate import Target, resolve_target

    assert resolve_target("openai/gpt-oss-20b") == Target("openai/gpt-oss-20b", None, None)
    assert resolve_target("tiny", "a/adapter") == Target("tiny", "a/adapter", None)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: 'tiny:layers=4'}\n")
    target = resolve_target(str(run))
    assert (target.model, target.adapter) == ("tiny:layers=4", str(run / "adapter"))
    assert target.run is not None and target.run.model.name_or_path == "tiny:layers=4"
    assert resolve_target(str(run), "other").adapter == "other"  # an explicit adapter wins
