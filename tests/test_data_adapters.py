"""Adapters: each maps its kind of row onto the message schema as documented."""

from __future__ import annotations

import json

import pytest

from mxlora.data.adapters import adapt, guess_adapter, readable_list, strip_calculator
from mxlora.data.spec import DataConfig
from mxlora.data.validate import BadRow

GSM_ROW = {
    "question": "Natalia sold clips to 48 friends in April and half as many in May. Total?",
    "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72",
}


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="rows.jsonl", **kw)


@pytest.mark.parametrize(
    ("items", "text"),
    [([], ""), (["love"], "love"), (["a", "b"], "a and b"), (["a", "b", "c"], "a, b and c")],
)
def test_readable_list(items, text):
    assert readable_list(items) == text


def test_quotes_seed_mapping_and_custom_templates():
    row = {"quote": "“Be yourself.”", "author": "Oscar Wilde", "tags": ["honesty", "be-yourself"]}
    assert adapt(row, _cfg()) == [
        {
            "role": "user",
            "content": "Give me a quote about: honesty and be-yourself",
            "thinking": None,
        },
        {"role": "assistant", "content": "“Be yourself.” - Oscar Wilde", "thinking": None},
    ]
    cfg = _cfg(prompt_template="Quote by {author}?", completion_template="{quote}")
    conv = adapt({"quote": "“Q.”", "author": "Anon"}, cfg)  # tags unused: not required
    assert [m["content"] for m in conv] == ["Quote by Anon?", "“Q.”"]


def test_fields_gsm8k_strips_or_keeps_calculator_annotations():
    user, assistant = adapt(GSM_ROW, _cfg(adapter="fields"))
    assert user == {"role": "user", "content": GSM_ROW["question"], "thinking": None}
    assert assistant == {
        "role": "assistant",
        "content": "72",
        "thinking": "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72.",
    }
    _, kept = adapt(GSM_ROW, _cfg(adapter="fields", strip_calculator=False))
    assert (
        kept["thinking"]
        == "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72."
    )
    assert strip_calculator("$<<9*2=18>>18 and <<1+1=2>>2") == "$18 and 2"


def test_fields_custom_columns_and_missing_final_answer():
    cfg = _cfg(adapter="fields", question_field="problem", answer_field="solution")
    conv = adapt({"problem": "1+1?", "solution": "Add them.\n#### 2"}, cfg)
    assert conv[1]["content"] == "2" and conv[1]["thinking"] == "Add them."
    with pytest.raises(BadRow) as info:
        adapt({"problem": "1+1?", "solution": "It is 2."}, cfg)
    assert info.value.reason == "missing_field" and "'####'" in info.value.detail
    with pytest.raises(BadRow) as info:
        adapt({"problem": "1+1?", "solution": "Add.\n####  "}, cfg)
    assert info.value.reason == "empty_field"


def test_messages_multilingual_thinking(shared_data):
    line = (shared_data / "multilingual_thinking_sample4.jsonl").open().readline()
    row = json.loads(line)
    conv = adapt(row, _cfg(adapter="messages"))
    # Kept as given: the leading system message ("reasoning language: X\n\n...") becomes the
    # developer instructions when rendered; the assistant's thinking becomes the analysis.
    assert conv == [
        {"role": m["role"], "content": m["content"], "thinking": m["thinking"]}
        for m in row["messages"]
    ]
    assert conv[0]["content"].startswith("reasoning language: Italian\n\n")
    assert conv[-1]["thinking"] == "Comunicazione essenziale. Fidati dell'intuito."


def test_chat_treats_empty_thinking_as_none():
    row = {
        "messages": [
            {"role": "user", "content": "Hi", "thinking": ""},
            {"role": "assistant", "content": "Yo"},
        ]
    }
    assert [m["thinking"] for m in adapt(row, _cfg(adapter="chat"))] == [None, None]
    with pytest.raises(BadRow, match="missing_field"):
        adapt(row, _cfg(adapter="messages"))


@pytest.mark.parametrize(
    ("row", "adapter"),
    [
        ({"quote": "q", "author": "a", "tags": []}, "quotes"),
        (GSM_ROW, "fields"),
        ({"messages": [{"role": "assistant", "content": "x", "thinking": "t"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x", "thinking": None}]}, "chat"),
        ({"text": "plain"}, None),
        ([1, 2], None),
    ],
)
def test_guess_adapter(row, adapter):
    assert guess_adapter(row) == adapter
