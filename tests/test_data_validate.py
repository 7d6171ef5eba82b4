"""Bad rows: each reason planted in a file, counted with its row number, never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxlora.data import DataConfig, prepare_data
from mxlora.data.prepare import describe_data
from mxlora.data.validate import REASONS, DropLog

MAX_LEN = 256


def _write(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(data)
    return path


def _quote(quote="“Good row.”", author="Someone", tags=("a", "b")) -> str:
    return json.dumps({"quote": quote, "author": author, "tags": list(tags)}, ensure_ascii=False)


# Line number -> (line, reason); None marks a good row. Line 8 is blank: not a row at all.
QUOTE_LINES: dict[int, tuple[str | bytes, str | None]] = {
    1: (_quote("“Keep one.”"), None),
    2: (json.dumps({"quote": "“No author.”", "tags": ["x"]}), "missing_field"),
    3: (_quote(quote="   "), "empty_field"),
    4: (json.dumps({"quote": "“Number author.”", "author": 42, "tags": ["x"]}), "wrong_type"),
    5: ('{"quote": "“Cut off', "invalid_json"),
    6: (_quote("“Keep two.”", tags=("love", "life", "hope")), None),
    7: (_quote(tags=()), "empty_field"),
    8: ("", None),
    9: ('{"quote": "\\ud800 lone surrogate", "author": "A", "tags": ["x"]}', "undecodable_text"),
    10: (_quote("“Lost byte: \ufffd.”"), "undecodable_text"),
    11: (_quote("“Forged <|end|> token.”"), "special_token_text"),
    12: (_quote("“" + "word " * 400 + "”"), "too_long"),
    13: (b'{"quote": "\xff\xfe not utf-8", "author": "A", "tags": ["x"]}', "undecodable_text"),
    14: ('["a", "list", "not", "an", "object"]', "wrong_type"),
    15: (json.dumps({"quote": "“Tags as number.”", "author": "A", "tags": 7}), "wrong_type"),
    16: (_quote("“Keep three.”"), None),
}


def _msgs(*turns, key="messages") -> str:
    return json.dumps(
        {key: [dict(zip(("role", "content", "thinking"), t, strict=False)) for t in turns]}
    )


CHAT_LINES: dict[int, tuple[str, str | None]] = {
    1: (_msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello", "greet")), None),
    2: (_msgs(("user", "Hi"), ("tool", "{}"), ("assistant", "ok", "t")), "unknown_role"),
    3: (_msgs(("system", "Be brief."), ("user", "Hi")), "no_assistant_turn"),
    4: (
        _msgs(("assistant", "I start", "t"), ("user", "Hi"), ("assistant", "x", "t")),
        "turn_order",
    ),
    5: (_msgs(("user", "Hi"), ("system", "late"), ("assistant", "x", "t")), "turn_order"),
    6: (_msgs(("user", "Hi"), ("assistant", "a", "t"), ("user", "more?")), "turn_order"),
    7: (_msgs(("user", "Hi", "user thoughts"), ("assistant", "x", "t")), "misplaced_thinking"),
    8: (json.dumps({"messages": "not a list"}), "wrong_type"),
    9: (_msgs(("user", 5), ("assistant", "x", "t")), "wrong_type"),
    10: (_msgs(("user", "Hi"), ("assistant", "no thinking")), "missing_field"),
    11: (_msgs(("user", "Hi"), ("assistant", "   ", "t")), "empty_field"),
    12: (_msgs(("user", "Hi"), ("assistant", "x", "t"), key="conversation"), "missing_field"),
    13: (_msgs(("developer", "Be kind."), ("user", "Q"), ("assistant", "A", "why")), None),
}


def _expected(lines: dict) -> tuple[dict, list[int]]:
    dropped: dict[str, list[int]] = {}
    good = []
    for number, (line, reason) in lines.items():
        if reason:
            dropped.setdefault(reason, []).append(number)
        elif line:
            good.append(number)
    report = {r: {"count": len(dropped[r]), "rows": dropped[r]} for r in REASONS if r in dropped}
    return report, good


def _prepare(path: Path, tokenizer, **kw):
    cfg = DataConfig(source=str(path), test_size=0.0, **kw)
    return prepare_data(cfg, tokenizer, MAX_LEN)


@pytest.mark.parametrize(
    ("lines", "adapter"),
    [(QUOTE_LINES, "quotes"), (CHAT_LINES, "messages")],
    ids=["quotes", "chat"],
)
def test_planted_bad_rows_counted_with_row_numbers_and_never_trained(
    tmp_path, tokenizer, lines, adapter
):
    path = _write(tmp_path / "planted.jsonl", [line for line, _ in lines.values()])
    data = _prepare(path, tokenizer, adapter=adapter)
    expected, good = _expected(lines)
    assert data.report["dropped"] == expected
    assert data.report["splits"]["train"]["dropped"] == expected
    assert data.report["rows_read"] == len(good) + sum(e["count"] for e in expected.values())
    assert sorted(data.train_rows) == good
    assert data.eval is None
    texts = [tokenizer.decode(ids) for ids in data.train["input_ids"]]
    if adapter == "quotes":
        assert sorted(t.split("<|message|>")[-1] for t in texts) == [
            "“Keep one.” - Someone<|return|>",
            "“Keep three.” - Someone<|return|>",
            "“Keep two.” - Someone<|return|>",
        ]
        assert "love, life and hope" in "".join(texts)  # tags as a readable list
    else:
        assert "# Instructions\n\nBe brief.<|end|>" in texts[good.index(1)]
        assert "<|channel|>analysis<|message|>why<|end|>" in texts[good.index(13)]
    for ids, mask in zip(data.train["input_ids"], data.train["completion_mask"], strict=True):
        assert len(ids) == len(mask) <= MAX_LEN and set(mask) == {0, 1}


def test_chat_adapter_allows_missing_thinking(tmp_path, tokenizer):
    path = _write(tmp_path / "chat.jsonl", [CHAT_LINES[1][0], CHAT_LINES[10][0]])
    data = _prepare(path, tokenizer, adapter="chat")
    assert sorted(data.train_rows) == [1, 2]
    assert data.report["dropped"] == {}


def test_error_policy_stops_naming_the_first_bad_row(tmp_path, tokenizer):
    path = _write(tmp_path / "planted.jsonl", [line for line, _ in QUOTE_LINES.values()])
    with pytest.raises(
        ValueError, match=r"^data: row 2 of .*planted\.jsonl: missing_field: 'author'"
    ):
        _prepare(path, tokenizer, on_bad_row="error")
    # The first bad row may be one only rendering finds (too long): still named first.
    lines = [QUOTE_LINES[1][0], QUOTE_LINES[12][0], QUOTE_LINES[2][0]]
    path = _write(tmp_path / "long_first.jsonl", lines)
    with pytest.raises(ValueError, match=r"row 2 of .*: too_long: \d+ tokens"):
        _prepare(path, tokenizer, on_bad_row="error")


def test_empty_data_set_is_an_error_saying_why(tmp_path, tokenizer):
    path = _write(tmp_path / "bad.jsonl", [QUOTE_LINES[n][0] for n in (2, 3, 12)])
    with pytest.raises(ValueError) as info:
        _prepare(path, tokenizer)
    message = str(info.value)
    assert "no train rows left" in message and "all 3 selected rows were dropped" in message
    assert "missing_field 1 (row 1)" in message and "too_long 1 (row 3)" in message


def test_wrong_columns_name_the_expected_fields_and_the_columns_found(tmp_path, tokenizer):
    rows = [json.dumps({"text": f"t{i}", "label": i}) for i in range(4)]
    path = _write(tmp_path / "other.jsonl", rows)
    with pytest.raises(ValueError) as info:
        _prepare(path, tokenizer)
    message = str(info.value)
    assert "missing_field 4 (rows 1, 2, 3, 4)" in message
    assert (
        "The 'quotes' adapter (data.adapter) reads the field(s) author, quote, tags; the rows "
        "have the columns text, label." in message
    )
    with pytest.raises(ValueError, match=r"reads the field\(s\) question, answer; the rows "):
        _prepare(path, tokenizer, adapter="fields", on_bad_row="error")


def test_console_summary_names_every_drop_with_row_numbers(tmp_path, tokenizer):
    path = _write(tmp_path / "planted.jsonl", [line for line, _ in QUOTE_LINES.values()])
    data = _prepare(path, tokenizer)
    expected, good = _expected(QUOTE_LINES)
    line = describe_data(data.report)
    dropped = sum(e["count"] for e in expected.values())
    assert f"{len(good) + dropped} rows read" in line
    assert f"train {len(good)} of {len(good) + dropped} kept" in line
    assert f"dropped {dropped}: " in line
    for reason, entry in expected.items():
        rows = ", ".join(map(str, entry["rows"]))
        assert f"{reason} {entry['count']} (row{'s' if entry['count'] > 1 else ''} {rows})" in line


def test_truncate_cuts_long_rows_only_when_asked(tmp_path, tokenizer):
    long_answer = _quote("“" + "word " * 400 + "”")
    long_prompt = _quote("“short”", tags=["tag"] * 300)
    path = _write(tmp_path / "long.jsonl", [QUOTE_LINES[1][0], long_answer, long_prompt])
    data = _prepare(path, tokenizer, truncate=True)
    split = data.report["splits"]["train"]
    assert split["truncated"] == {"count": 1, "rows": [2]}
    # A prompt alone over max_len leaves nothing to train: dropped even when truncating.
    assert data.report["dropped"] == {"too_long": {"count": 1, "rows": [3]}}
    cut = data.train_rows.index(2)
    ids, mask = data.train["input_ids"][cut], data.train["completion_mask"][cut]
    assert len(ids) == MAX_LEN and mask[-1] == 1 and 0 in mask
    assert split["total_tokens"]["max"] == MAX_LEN


def test_drop_log_reports_by_reason_in_row_order():
    log = DropLog()
    log.add(9, "too_long", "x")
    log.add(3, "invalid_json", "y")
    log.add(4, "too_long", "z")
    assert log.to_dict() == {
        "invalid_json": {"count": 1, "rows": [3]},
        "too_long": {"count": 2, "rows": [4, 9]},
    }
    assert log.first() == (3, "invalid_json", "y")
