"""Source specs, the data config's checks, file formats and the seeded select/split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mxlora.data import DataConfig, prepare_data
from mxlora.data.sources import read_rows, split_indices
from mxlora.data.spec import SourceSpec, example_path, parse_source


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Abirate/english_quotes", SourceSpec("hub", repo_id="Abirate/english_quotes")),
        (
            "HuggingFaceH4/Multilingual-Thinking:train",
            SourceSpec("hub", repo_id="HuggingFaceH4/Multilingual-Thinking", split="train"),
        ),
        (
            "openai/gsm8k:main:test[:10%]",
            SourceSpec("hub", repo_id="openai/gsm8k", config="main", split="test[:10%]"),
        ),
        ("data/rows.jsonl", SourceSpec("local", path=Path("data/rows.jsonl"))),
        ("../x/y.PARQUET", SourceSpec("local", path=Path("../x/y.PARQUET"))),
        ("rows.csv", SourceSpec("local", path=Path("rows.csv"))),
        ("example:gsm8k", SourceSpec("local", path=example_path("gsm8k"))),
    ],
)
def test_parse_source(spec, expected):
    assert parse_source(spec) == expected
    assert parse_source(str(expected)) == expected  # str() gives a spec back


@pytest.mark.parametrize(
    "spec", ["english_quotes", "a/b:c:d:e", "a/b:", "a/b[:10]", "rows.txt", "/abs/dir/"]
)
def test_parse_source_rejects(spec):
    with pytest.raises(ValueError, match=r"^data\.source: "):
        parse_source(spec)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("adapter", "sharegpt", r"data\.adapter: must be one of quotes, messages, fields, chat"),
        ("render", "jinja", r"data\.render: must be one of harmony, chat-template"),
        ("reasoning_effort", "max", r"data\.reasoning_effort: must be one of low"),
        ("on_bad_row", "skip", r"data\.on_bad_row: must be one of drop, error"),
        ("date", "28/06/2025", r"data\.date: must be a date YYYY-MM-DD"),
        ("date", "2025-02-30", r"data\.date: must be a date YYYY-MM-DD"),
        ("test_size", 1.0, r"data\.test_size: must be in \[0, 1\)"),
        ("select", 0, r"data\.select: must be a positive row count"),
        ("select", True, r"data\.select: expected int \| None"),
        ("seed", "42", r"data\.seed: expected int"),
        ("truncate", "yes", r"data\.truncate: expected bool"),
        (
            "prompt_template",
            "About {topic}",
            r"data\.prompt_template: unknown field\(s\) \['topic'\]",
        ),
        ("completion_template", "{quote", r"data\.completion_template: not a valid format"),
        ("source", "nonsense", r"data\.source: "),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value})


def test_config_defaults_are_the_seed_notebook():
    cfg = DataConfig()
    assert (cfg.test_size, cfg.seed, cfg.render, cfg.date) == (0.2, 42, "harmony", "2025-06-28")
    assert cfg.prompt_template == "Give me a quote about: {tags}"
    assert cfg.completion_template == "{quote} - {author}"


ROWS = [
    {"quote": "“One.”", "author": "A", "tags": ["x"]},
    {"quote": "“Two.”", "author": "B", "tags": ["y", "z"]},
]


def test_json_array_csv_and_parquet_read_like_jsonl(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["quote", "author", "tags"])
        writer.writeheader()
        for r in ROWS:  # CSV has no lists: tags as already-readable text
            writer.writerow({**r, "tags": " and ".join(r["tags"])})
    results = {}
    for suffix in ("jsonl", "json", "parquet", "csv"):
        rows = read_rows(parse_source(str(tmp_path / f"rows.{suffix}")))
        assert [r.number for r in rows] == [1, 2]
        cfg = DataConfig(source=str(tmp_path / f"rows.{suffix}"), test_size=0.0)
        data = prepare_data(cfg, tokenizer, max_len=512)
        results[suffix] = sorted(zip(data.train_rows, data.train["input_ids"], strict=True))
    assert results["jsonl"] == results["json"] == results["parquet"] == results["csv"]


def test_json_lines_under_json_suffix_and_broken_array(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [r.number for r in read_rows(parse_source(str(path)))] == [1, 3]  # line numbers
    path.write_text(json.dumps(ROWS)[:-5])
    with pytest.raises(ValueError, match=r"data\.source: .* is not a valid JSON array"):
        read_rows(parse_source(str(path)))
    with pytest.raises(ValueError, match=r"data\.source: no such file"):
        read_rows(parse_source(str(tmp_path / "missing.jsonl")))


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    """Hub ids go through datasets.load_dataset; offline, that fails with a message, not a trace."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"^data\.source: cannot load mxlora-test/absent:train from"
    ):
        read_rows(parse_source("mxlora-test/absent"))


def test_select_and_split_match_the_seed_notebook_pipeline(shared_data):
    """1000 quotes, seed 42, 20 % test, exactly as `datasets` does it on the rows themselves."""
    import datasets

    path = shared_data / "english_quotes.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    train, test = split_indices(len(rows), select=1000, test_size=0.2, seed=42)
    ds = datasets.Dataset.from_list(rows).shuffle(seed=42).select(range(1000))
    parts = ds.train_test_split(test_size=0.2, seed=42)
    assert [rows[i]["quote"] for i in train] == parts["train"]["quote"]
    assert [rows[i]["quote"] for i in test] == parts["test"]["quote"]
    assert (len(train), len(test)) == (800, 200) and not set(train) & set(test)
    assert split_indices(len(rows), 1000, 0.2, 42) == (train, test)
    assert split_indices(len(rows), 1000, 0.2, 43)[0] != train


def test_prepare_quotes_like_the_seed(shared_data, tokenizer):
    cfg = DataConfig(source=str(shared_data / "english_quotes.jsonl"), select=1000)
    data = prepare_data(cfg, tokenizer, max_len=2048)
    report = data.report
    assert (report["rows_read"], report["rows_selected"]) == (2508, 1000)
    train, evals = report["splits"]["train"], report["splits"]["eval"]
    assert (train["rows"], evals["rows"]) == (800, 200)
    for split, dataset, rows in (
        (train, data.train, data.train_rows),
        (evals, data.eval, data.eval_rows),
    ):
        dropped = sum(e["count"] for e in split["dropped"].values())
        assert split["kept"] == len(dataset) == len(rows) == split["rows"] - dropped
        assert split["tokens"] == sum(map(len, dataset["input_ids"]))
        assert split["loss_tokens"] == sum(map(sum, dataset["completion_mask"]))
    assert not set(data.train_rows) & set(data.eval_rows)
    assert set(report["dropped"]) <= {"undecodable_text", "empty_field"}
    assert list(data.train.features) == ["input_ids", "completion_mask"]


def test_select_larger_than_source_uses_all_rows(tokenizer):
    cfg = DataConfig(source="example:quotes", select=1000, test_size=0.25)
    data = prepare_data(cfg, tokenizer, max_len=512)
    n = len(read_rows(parse_source("example:quotes")))
    assert data.report["rows_selected"] == n == len(data.train) + len(data.eval)


@pytest.mark.parametrize(
    ("name", "adapter"),
    [("quotes", "quotes"), ("gsm8k", "fields"), ("multilingual_thinking", "messages")],
)
def test_packaged_examples_are_clean(tokenizer, name, adapter):
    """The demo's fallback rows (written for this project) render with no row dropped."""
    cfg = DataConfig(source=f"example:{name}", adapter=adapter, test_size=0.0)
    data = prepare_data(cfg, tokenizer, max_len=1024)
    assert data.report["dropped"] == {}
    assert len(data.train) >= 6
