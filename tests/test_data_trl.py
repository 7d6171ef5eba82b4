"""TRL's SFTTrainer consumes prepare_data's columns as the loss mask (with the flag it needs)."""

from __future__ import annotations

import pytest

from mxlora.data import DataConfig, prepare_data


@pytest.fixture(scope="module")
def prepared(tokenizer):
    cfg = DataConfig(source="example:multilingual_thinking", adapter="messages", test_size=0.0)
    return prepare_data(cfg, tokenizer, max_len=512)


def _trainer_labels(prepared, tokenizer, tmp_path, **sft_kwargs) -> list[list[int]]:
    """The labels SFTTrainer builds from our dataset (on a tiny random causal LM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_length=512,
        report_to="none",
        shuffle_dataset=False,
        bf16=False,  # SFTConfig defaults to bf16, which a CPU run refuses
        **sft_kwargs,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=prepared.train, processing_class=tokenizer
    )
    assert trainer.train_dataset["input_ids"] == prepared.train["input_ids"]
    return trainer.train_dataset["labels"]


def test_completion_only_loss_makes_the_mask_the_labels(prepared, tokenizer, tmp_path):
    labels = _trainer_labels(prepared, tokenizer, tmp_path, completion_only_loss=True)
    for ids, mask, lab in zip(
        prepared.train["input_ids"], prepared.train["completion_mask"], labels, strict=True
    ):
        assert lab == [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def test_without_the_flag_trl_trains_every_token(prepared, tokenizer, tmp_path):
    """The pitfall the training recipe must avoid: TRL's default ignores completion_mask."""
    labels = _trainer_labels(prepared, tokenizer, tmp_path)
    assert labels == prepared.train["input_ids"]
