"""``mxlora data inspect``: the numbers it prints, the marked examples, and its speed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from mxlora.cli import main
from mxlora.data.inspect import mark_loss
from mxlora.data.prepare import percentiles
from mxlora.data.render import Rendered

SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|>"
)
PROBLEMS = [
    ("2+2?", "Two and two.", "4"),
    ("10*3?", "Ten threes.", "30"),
    ("7-5?", "Take away.", "2"),
]


def _table(out: str) -> dict[str, list[int]]:
    """The p50/p95/max rows of the printed token table."""
    rows = re.findall(r"^  (prompt|completion|total)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    return {name: [int(x) for x in nums] for name, *nums in rows}


def test_inspect_prints_exact_lengths_and_marks_loss(tmp_path, tokenizer, capsys):
    path = tmp_path / "math.jsonl"
    lines = [json.dumps({"question": q, "answer": f"{t}\n#### {a}"}) for q, t, a in PROBLEMS]
    path.write_text("\n".join([*lines, '{"question": "cut']) + "\n")
    assert main(["data", "inspect", str(path), "--show", "1"]) == 0
    out = capsys.readouterr().out

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Independent of the renderer: the Harmony text written out here, tokenized.
    prompts = [n_tokens(f"{SYSTEM}<|start|>user<|message|>{q}<|end|>") for q, _, _ in PROBLEMS]
    completions = [
        n_tokens(
            f"<|start|>assistant<|channel|>analysis<|message|>{t}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{a}<|return|>"
        )
        for _, t, a in PROBLEMS
    ]
    table = _table(out)
    assert table["prompt"] == list(percentiles(prompts).values())
    assert table["completion"] == list(percentiles(completions).values())
    assert "adapter     fields" in out  # guessed from the columns
    assert "4 read, 4 selected, 3 kept, 1 dropped" in out
    assert re.search(r"^  invalid_json\s+1  rows 4$", out, re.M)
    share = 100 * sum(completions) / (sum(prompts) + sum(completions))
    assert f"under loss  {share:.1f} % of tokens" in out
    # Not a terminal: the loss span is bracketed, and it is exactly the trained turn.
    assert out.count("[[<|start|>") == 1 and out.count("--- example") == 1
    assert (
        "<|start|>user<|message|>2+2?<|end|>[[<|start|>assistant<|channel|>analysis<|message|>"
        "Two and two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>]]"
    ) in out


def test_mark_loss_colours_on_a_terminal(tokenizer):
    ids = tokenizer("<|start|>user<|message|>hi<|end|><|start|>assistant", add_special_tokens=False)
    ids = ids["input_ids"]
    item = Rendered(1, ids, [0] * 5 + [1] * (len(ids) - 5))
    assert mark_loss(item, tokenizer, color=True) == (
        "<|start|>user<|message|>hi<|end|>\033[32m<|start|>assistant\033[0m"
    )


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p95": 95, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p95": 7, "max": 7}
    assert percentiles([]) == {"p50": 0, "p95": 0, "max": 0}


def test_inspect_training_yaml_uses_its_data_block_and_max_len(tmp_path, tokenizer, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n  source: example:gsm8k\n  adapter: fields\n  select: 5\n  strip_calculator: false\n"
        "train:\n  max_len: 300\n"
    )
    assert main(["data", "inspect", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["adapter"], report["max_len"], report["rows"], report["kept"]) == (
        "fields",
        300,
        5,
        5,
    )
    total_max = report["total_tokens"]["max"]
    assert (
        main(["data", "inspect", str(config), "--max-len", str(total_max - 1), "--show", "5"]) == 0
    )
    out = capsys.readouterr().out
    assert f"max_len {total_max - 1}" in out
    assert re.search(r"^  too_long\s+[1-4]  rows", out, re.M)  # the longest row(s), not all
    assert "<<" in out  # calculator annotations kept, as the YAML says
    assert main(["data", "inspect", str(config), "--select", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3  # the flag wins over the YAML


def test_inspect_unknown_columns_asks_for_an_adapter(tmp_path, tokenizer, capsys):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"text": "hello"}\n')
    assert main(["data", "inspect", str(path)]) == 2
    assert "pass --adapter" in capsys.readouterr().err


def test_inspect_gsm8k_train_under_60_s(shared_data, tokenizer_dir):
    """The acceptance timing: a fresh process, imports and tokenizer load included."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxlora.cli",
            "data",
            "inspect",
            str(shared_data / "gsm8k_train.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "7473 read, 7473 selected, 7473 kept, 0 dropped" in proc.stdout
    table = _table(proc.stdout)
    assert set(table) == {"prompt", "completion", "total"}
    for p50, p95, top in table.values():
        assert 0 < p50 <= p95 <= top
    assert elapsed < 60, f"took {elapsed:.1f} s"
    print(f"mxlora data inspect gsm8k_train.jsonl: {elapsed:.1f} s")


def test_inspect_both_renderers_train_the_same_tokens(shared_data, tokenizer, capsys):
    path = shared_data / "multilingual_thinking_sample4.jsonl"
    reports = {}
    for render in ("harmony", "chat-template"):
        assert main(["data", "inspect", str(path), "--render", render, "--json"]) == 0
        reports[render] = json.loads(capsys.readouterr().out)
    h, c = reports["harmony"], reports["chat-template"]
    assert (h["adapter"], h["kept"], h["dropped"]) == ("messages", 4, {})
    assert h["completion_tokens"] == c["completion_tokens"] and h["loss_tokens"] == c["loss_tokens"]
    # Only the prompt differs: the Hub template's blank line after the 4 developer messages.
    assert c["tokens"] > h["tokens"]
