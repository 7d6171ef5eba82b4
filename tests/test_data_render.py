"""Rendering: our Harmony ids against openai-harmony's own renderer, the chat-template option
against transformers + the Hub template, the loss mask, and the pinned date."""

from __future__ import annotations

import datetime
import difflib
import json
from pathlib import Path

import pytest
from openai_harmony import RenderConversationConfig

from mxlora.data.adapters import adapt
from mxlora.data.render import render_chat_template, render_harmony, to_harmony_conversation
from mxlora.data.spec import DataConfig
from mxlora.data.validate import BadRow
from mxlora.model.tokenizer import END, RETURN, START, harmony_encoding

SETS = {
    "english_quotes": "quotes",
    "gsm8k_test": "fields",
    "multilingual_thinking_sample4": "messages",
}
NO_AUTO_DROP = RenderConversationConfig(auto_drop_analysis=False)


def _conversations(path: Path, cfg: DataConfig) -> tuple[list, list[int]]:
    """Every row the adapter keeps, with its line number (bad rows are tested elsewhere)."""
    convs, rows = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            convs.append(adapt(json.loads(line), cfg))
            rows.append(number)
        except BadRow:
            pass
    return convs, rows


@pytest.fixture(scope="module")
def rendered(shared_data, tokenizer):
    """Per data set: config, conversations, row numbers, harmony and chat-template renderings."""
    out = {}
    for name, adapter in SETS.items():
        cfg = DataConfig(source=str(shared_data / f"{name}.jsonl"), adapter=adapter)
        convs, rows = _conversations(shared_data / f"{name}.jsonl", cfg)
        out[name] = (
            cfg,
            convs,
            rows,
            render_harmony(convs, rows, tokenizer, cfg),
            render_chat_template(convs, rows, tokenizer, cfg),
        )
    return out


def _trained_turn_start(ids: list[int], tokenizer) -> int:
    """Index of the <|start|> right after the last user message (single-turn rows)."""
    user = tokenizer.encode("user", add_special_tokens=False)
    starts = [i for i, t in enumerate(ids) if t == START and ids[i + 1 : i + 1 + len(user)] == user]
    return ids.index(END, starts[-1]) + 1


@pytest.mark.parametrize("name", list(SETS))
def test_harmony_ids_equal_openai_harmony_on_every_kept_row(rendered, name):
    cfg, convs, rows, ours, _ = rendered[name]
    enc = harmony_encoding()
    expected_rows = {"english_quotes": 2474, "gsm8k_test": 1319, "multilingual_thinking_sample4": 4}
    assert len(convs) == expected_rows[name]  # 25 U+FFFD + 9 empty-tags quotes are dropped
    mismatched = [
        row
        for row, conv, item in zip(rows, convs, ours, strict=True)
        if item.input_ids
        != enc.render_conversation_for_training(to_harmony_conversation(conv, cfg), NO_AUTO_DROP)
    ]
    assert mismatched == []


@pytest.mark.parametrize("name", list(SETS))
def test_mask_covers_exactly_the_trained_assistant_turn(rendered, tokenizer, name):
    _, convs, _, ours, _ = rendered[name]
    for conv, item in zip(convs, ours, strict=True):
        start = _trained_turn_start(item.input_ids, tokenizer)
        assert item.completion_mask == [0] * start + [1] * (len(item.input_ids) - start)
        assert item.input_ids[-1] == RETURN
        trained = tokenizer.decode(item.input_ids[start:])
        thinking, content = conv[-1]["thinking"], conv[-1]["content"]
        expected = f"<|start|>assistant<|channel|>final<|message|>{content}<|return|>"
        if thinking is not None:  # the reasoning is trained, in the analysis channel
            expected = (
                f"<|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>{expected}"
            )
        assert trained == expected
    if name != "english_quotes":
        assert all(conv[-1]["thinking"] for conv in convs)


def test_openai_harmony_default_would_drop_the_reasoning(rendered):
    """Why auto_drop_analysis=False: harmony's default renders no analysis for these rows."""
    cfg, convs, _, ours, _ = rendered["multilingual_thinking_sample4"]
    enc = harmony_encoding()
    default = enc.render_conversation_for_training(to_harmony_conversation(convs[0], cfg))
    assert len(default) < len(ours[0].input_ids)
    assert "<|channel|>analysis" not in enc.decode(default)


def _hub_template_ids(tokenizer, template: str, conv: list, day: datetime.date, monkeypatch):
    """transformers' apply_chat_template with the Hub template, the clock set to ``day``."""
    import transformers.utils.chat_template_utils as ctu

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(day.year, day.month, day.day, 12, 0, 0)

    monkeypatch.setattr(ctu, "datetime", Clock)
    messages = [{k: v for k, v in m.items() if v is not None} for m in conv]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def test_chat_template_ids_equal_hub_template_with_date_pinned(
    rendered, tokenizer, shared_data, monkeypatch
):
    """Ours (TRL's training template, date written in) == the Hub's own template file rendered
    by transformers on the pinned day, on every kept row; masks == the harmony renderer's."""
    hub_template = (shared_data / "gpt-oss-20b" / "chat_template.jinja").read_text()
    day = datetime.date.fromisoformat(DataConfig().date)
    for name in SETS:
        _, convs, _, _, ct = rendered[name]
        texts = [_hub_template_ids(tokenizer, hub_template, c, day, monkeypatch) for c in convs]
        hub_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert [item.input_ids for item in ct] == hub_ids, name


def _messages(ids: list[int]) -> list[list[int]]:
    """Split ids into Harmony messages at each <|start|>."""
    starts = [i for i, t in enumerate(ids) if t == START] + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]


def test_chat_template_differs_only_by_the_blank_line_after_instructions(rendered, tokenizer):
    seen_developer = 0
    for name in SETS:
        _, convs, _, ours, ct = rendered[name]
        for conv, h, c in zip(convs, ours, ct, strict=True):
            loss_h = [t for t, m in zip(h.input_ids, h.completion_mask, strict=True) if m]
            loss_c = [t for t, m in zip(c.input_ids, c.completion_mask, strict=True) if m]
            assert loss_h == loss_c
            if conv[0]["role"] not in ("system", "developer"):
                assert h.input_ids == c.input_ids
                continue
            seen_developer += 1
            mh, mc = _messages(h.input_ids), _messages(c.input_ids)
            assert len(mh) == len(mc)
            # Message 1 is the developer message; every other message is identical.
            assert [m for i, m in enumerate(mh) if i != 1] == [
                m for i, m in enumerate(mc) if i != 1
            ]
            dev_h, dev_c = tokenizer.decode(mh[1]), tokenizer.decode(mc[1])
            assert dev_h.endswith("<|end|>")
            assert dev_c == dev_h.removesuffix("<|end|>") + "\n\n<|end|>"
    assert seen_developer == 4


def test_training_template_is_the_hub_template_plus_generation_marks(shared_data):
    """What `chat-template` renders with is the Hub's template: TRL only added a comment and
    the {% generation %} marks, and we only wrote the date in place of the clock."""
    from mxlora.data.render import training_chat_template

    hub = (shared_data / "gpt-oss-20b" / "chat_template.jinja").read_text().splitlines()
    ours = training_chat_template("2025-06-28").replace('"2025-06-28"', 'strftime_now("%Y-%m-%d")')
    diff = list(difflib.unified_diff(hub, ours.splitlines(), lineterm="", n=0))
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert not [line for line in changed if line.startswith("-")]  # nothing removed
    added = [line[1:] for line in changed]
    marks = [line.strip() for line in added if line.strip().startswith("{%-")]
    assert marks == ["{%- generation %}", "{%- endgeneration %}"]
    comment_end = hub.index(" #}")  # the rest was added inside the template's first comment
    hunks = [line for line in diff if line.startswith("@@")]
    assert hunks[0].startswith("@@ -1,0 +2,5 @@") and comment_end > 1
    assert len(hunks) == 3


@pytest.mark.parametrize("render", ["harmony", "chat-template"])
def test_same_row_on_two_days_gives_same_ids(shared_data, tokenizer, monkeypatch, render):
    """Our renderers never read the clock; the unpinned Hub template does (the control)."""
    from mxlora.data.prepare import prepare_data

    cfg = DataConfig(
        source=str(shared_data / "multilingual_thinking_sample4.jsonl"),
        adapter="messages",
        render=render,
        test_size=0.0,
    )
    hub_template = (shared_data / "gpt-oss-20b" / "chat_template.jinja").read_text()
    conv = adapt(
        json.loads((shared_data / "multilingual_thinking_sample4.jsonl").open().readline()), cfg
    )
    runs, controls = [], []
    for day in (datetime.date(2025, 8, 5), datetime.date(2026, 1, 31)):
        controls.append(_hub_template_ids(tokenizer, hub_template, conv, day, monkeypatch))
        runs.append(prepare_data(cfg, tokenizer, max_len=2048).train["input_ids"])
    assert controls[0] != controls[1]  # the patched clock does reach the template
    assert "Current date: 2026-01-31" in controls[1]
    assert runs[0] == runs[1]
    assert "Current date: 2025-06-28" in tokenizer.decode(runs[0][0])


def test_multi_turn_trains_only_the_last_assistant_turn(tokenizer):
    cfg = DataConfig(source="x.jsonl", adapter="chat", reasoning_effort="high")
    row = {
        "messages": [
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue.", "thinking": "Earlier reasoning, not shown."},
            {"role": "user", "content": "And grass?"},
            {"role": "assistant", "content": "Green.", "thinking": "Grass is green."},
        ]
    }
    conv = adapt(row, cfg)
    (ours,) = render_harmony([conv], [1], tokenizer, cfg)
    oracle = harmony_encoding().render_conversation_for_training(
        to_harmony_conversation(conv, cfg), NO_AUTO_DROP
    )
    assert ours.input_ids == oracle
    text = tokenizer.decode(ours.input_ids)
    assert "Earlier reasoning" not in text  # past turns' thinking is dropped, as at inference
    assert "Reasoning: high" in text
    assert "<|channel|>final<|message|>Blue.<|end|>" in text
    trained = tokenizer.decode(
        [t for t, m in zip(ours.input_ids, ours.completion_mask, strict=True) if m]
    )
    assert trained == (
        "<|start|>assistant<|channel|>analysis<|message|>Grass is green.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Green.<|return|>"
    )
    (ct,) = render_chat_template([conv], [1], tokenizer, cfg)
    ct_trained = [t for t, m in zip(ct.input_ids, ct.completion_mask, strict=True) if m]
    assert tokenizer.decode(ct_trained) == trained  # the template's mask, last turn only


def test_config_identity_and_effort_reach_both_renderers(tokenizer):
    cfg = DataConfig(
        source="x.jsonl",
        adapter="chat",
        model_identity="You are a careful tutor.",
        reasoning_effort="low",
        date="2024-12-31",
    )
    conv = adapt(
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        cfg,
    )
    (h,) = render_harmony([conv], [1], tokenizer, cfg)
    (c,) = render_chat_template([conv], [1], tokenizer, cfg)
    oracle = harmony_encoding().render_conversation_for_training(
        to_harmony_conversation(conv, cfg), NO_AUTO_DROP
    )
    assert h.input_ids == oracle == c.input_ids  # no instructions: identical ids
    text = tokenizer.decode(h.input_ids)
    assert text.startswith("<|start|>system<|message|>You are a careful tutor.\n")
    assert "Current date: 2024-12-31\n\nReasoning: low\n\n" in text


def test_generation_prompt_equals_openai_harmony_completion_render(tokenizer):
    """The inference prompt (used by `mxlora chat`) is rendered as in training."""
    from openai_harmony import Conversation, Role

    from mxlora.data.adapters import message
    from mxlora.data.render import generation_prompt

    cfg = DataConfig(source="x.jsonl", adapter="chat", reasoning_effort="high")
    conv = [
        message("developer", "reasoning language: German"),
        message("user", "Hi"),
        message("assistant", "Hallo!", thinking="Greeting back."),
        message("user", "What is 2+2?"),
    ]
    text = generation_prompt(conv, cfg)
    full = to_harmony_conversation([*conv, message("assistant", "placeholder")], cfg)
    oracle = harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(full.messages[:-1]), Role.ASSISTANT
    )
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == oracle
    assert text.endswith("<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")
    assert "Greeting back." not in text
