"""``mxlora compare`` on run folders written here in the run-folder contract's layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mxlora.cli import main
from mxlora.recipes.compare import COLUMNS, RunFolderError, compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path: Path, name: str, report: dict, losses: list[float], evals: list[float]):
    """A run folder as ``mxlora train`` leaves it (only the files compare reads)."""
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps({"name": name, **report}))
    lines = []
    for i, loss in enumerate(losses, start=1):
        lines.append({"step": i * 10, "epoch": i / len(losses), "loss": loss, "grad_norm": 1.0})
    for i, loss in enumerate(evals, start=1):
        lines.append({"step": i * 10 * len(losses) // len(evals), "eval_loss": loss})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


QUOTES = {
    "peak_alloc_gb": 41.8321,
    "peak_reserved_gb": 44.0457,
    "peak_rss_gb": 3.2109,
    "tokens_per_s": 4321.987,
    "train_time_s": 812.35,
    "wall_time_s": 901.06,
    "steps": 200,
    "train_loss_final": 1.234567,
    "eval_loss_final": 1.456789,
    "trainable_params": 7962624,
    "train_tokens": 3456789,
}
REASONING = {
    "peak_alloc_gb": 12.5,
    "peak_reserved_gb": None,  # e.g. a CPU run has no device allocator
    "peak_rss_gb": 2.75,
    "tokens_per_s": 98.76,
    "train_time_s": 33.3,
    "wall_time_s": 40.04,
    "steps": 8,
    "train_loss_final": 0.5,
    "eval_loss_final": None,
    "trainable_params": 123,
    "train_tokens": 4567,
}


def _parse_table(table: str) -> dict[str, dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _pixels_of(path: Path, color: str) -> int:
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(color))).max(axis=-1) < 0.05).sum())


def test_table_numbers_equal_reports_and_png_has_curves(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs / "quotes", "quotes", QUOTES, [3.0, 2.5, 2.0, 1.5, 1.2], [1.9, 1.45])
    _write_run(runs / "reasoning", "reasoning", REASONING, [2.0, 1.0], [])

    assert main(["compare", str(runs / "quotes"), str(runs / "reasoning")]) == 0
    printed = capsys.readouterr().out
    md = (runs / "comparison.md").read_text()  # default: next to the runs
    rows = _parse_table(printed)
    assert rows == _parse_table(md)
    assert set(rows) == {"quotes", "reasoning"}
    for label, report in (("quotes", QUOTES), ("reasoning", REASONING)):
        for header, key, fmt in COLUMNS:
            cell, value = rows[label][header], report[key]
            if value is None:
                assert cell == "n/a"
                continue
            decimals = len(cell.split(".")[1]) if "." in cell else 0
            # Equal to the report at the displayed precision.
            assert abs(float(cell.replace(",", "")) - value) <= 0.5 * 10**-decimals, (label, key)
            assert cell == fmt(value)
    assert rows["quotes"]["trainable params"] == "7,962,624"
    assert rows["quotes"]["eval loss (final)"] == "1.4568"

    exact = json.loads((runs / "comparison.json").read_text())
    assert [r["run"] for r in exact] == ["quotes", "reasoning"]
    assert {k: exact[0][k] for k in QUOTES} == QUOTES

    png = runs / "comparison.png"
    assert _png_size(png) == (800, 500)
    # Each run's curves are drawn in its own colour: count those pixels (a legend swatch alone
    # is a few dozen).
    assert _pixels_of(png, "C0") > 150
    assert _pixels_of(png, "C1") > 150


def test_curves_change_the_png(tmp_path):
    """The plot draws the metrics: different losses give a different image."""
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a / "r", "r", QUOTES, [3.0, 2.0, 1.0], [2.5])
    _write_run(b / "r", "r", QUOTES, [1.0, 2.0, 3.0], [2.5])
    png_a = compare([a / "r"], tmp_path / "out_a")["png"]
    png_b = compare([b / "r"], tmp_path / "out_b")["png"]
    assert png_a.read_bytes() != png_b.read_bytes()


def test_same_run_name_in_two_places_gets_distinct_labels(tmp_path):
    _write_run(tmp_path / "seed1" / "quotes", "quotes", QUOTES, [1.0], [])
    _write_run(tmp_path / "seed2" / "quotes", "quotes", REASONING, [1.0], [])
    result = compare([tmp_path / "seed1" / "quotes", tmp_path / "seed2" / "quotes"])
    assert set(_parse_table(result["table"])) == {"seed1/quotes", "seed2/quotes"}
    assert result["markdown"] == tmp_path / "comparison.md"


def test_not_a_run_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="not a run folder .no report.json"):
        compare([tmp_path / "empty"])
    assert main(["compare", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mxlora compare: error: {tmp_path / 'missing'}: no such run folder"

    _write_run(tmp_path / "bad", "bad", QUOTES, [1.0], [])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{oops\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2: not a JSON line"):
        compare([tmp_path / "bad"])
