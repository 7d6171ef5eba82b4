"""The embedded gpt-oss configs: equal to the published file, and the published parameter counts."""

from __future__ import annotations

import json

import pytest

from mxlora.model.configs import (
    GPT_OSS_20B_CONFIG,
    GPT_OSS_GENERATION_CONFIG,
    gpt_oss_20b_config,
    gpt_oss_120b_config,
    layer_types,
    parameter_counts,
)


def _count_by_formula(c: dict) -> int:
    """gpt-oss parameters from the architecture, independent of transformers' modules."""
    h, v, n_exp, inter = (
        c["hidden_size"],
        c["vocab_size"],
        c["num_local_experts"],
        c["intermediate_size"],
    )
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    attention = (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + c["num_attention_heads"]  # + sinks
    router = n_exp * h + n_exp
    experts = n_exp * (h * 2 * inter + 2 * inter + inter * h + h)
    layer = attention + router + experts + 2 * h  # two RMSNorms
    return c["num_hidden_layers"] * layer + 2 * v * h + h  # embed, lm_head (untied), final norm


def test_embedded_20b_config_is_the_published_file(shared_data):
    published = json.loads((shared_data / "gpt-oss-20b" / "config.json").read_text())
    assert published == GPT_OSS_20B_CONFIG
    generation = json.loads((shared_data / "gpt-oss-20b" / "generation_config.json").read_text())
    assert generation == GPT_OSS_GENERATION_CONFIG


def test_copies_are_independent():
    config = gpt_oss_20b_config()
    config["quantization_config"]["modules_to_not_convert"].append("x")
    assert "x" not in GPT_OSS_20B_CONFIG["quantization_config"]["modules_to_not_convert"]


def test_120b_differs_only_in_depth_and_experts():
    c20, c120 = gpt_oss_20b_config(), gpt_oss_120b_config()
    changed = {k for k in c20 if c20[k] != c120[k]}
    assert changed == {"num_hidden_layers", "num_local_experts", "layer_types"}
    assert (c120["num_hidden_layers"], c120["num_local_experts"]) == (36, 128)
    assert c120["layer_types"] == layer_types(36)
    assert c120["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert c20["layer_types"] == layer_types(24)


@pytest.mark.parametrize(
    ("make_config", "total", "active"),
    [
        # Published: 20.91 B total / 3.61 B active, 116.83 B / 5.13 B (gpt-oss model card, table 1).
        (gpt_oss_20b_config, 20_914_757_184, 3.61e9),
        (gpt_oss_120b_config, 116_829_156_672, 5.13e9),
    ],
)
def test_parameter_counts_on_the_meta_device(make_config, total, active):
    config = make_config()
    # Meta device: in fp32 the 20b would need 84 GB of RAM, far beyond this machine's.
    counts = parameter_counts(config)
    assert counts["total"] == total == _count_by_formula(config)
    assert round(counts["active"] / 1e9, 2) == round(active / 1e9, 2)
    n_exp, inter, h = (
        config["num_local_experts"],
        config["intermediate_size"],
        config["hidden_size"],
    )
    assert counts["experts"] == config["num_hidden_layers"] * n_exp * (
        3 * h * inter + 2 * inter + h
    )
