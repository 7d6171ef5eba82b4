"""Reading rows from a source, with the row numbers a person finds them under.

Local files are read by us, not by ``datasets``, so that a broken line is one bad row (with its
number) instead of an exception that loses the rest of the file:

* ``.jsonl``: one JSON object per line; the row number is the line number (1-based); blank
  lines are skipped (not rows). A line that is not valid UTF-8 or not valid JSON (e.g. cut off)
  becomes a bad row.
* ``.json``: a JSON array of objects (row number = position, 1-based), or JSON Lines.
* ``.csv``: a header line, then one row per record (row number = record number, 1-based,
  header not counted). Every value is a string.
* ``.parquet``: row number = position, 1-based.

Hub data sets go through ``datasets.load_dataset``; row number = position in the split, 1-based.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxlora.data.spec import SourceSpec


@dataclass(frozen=True)
class RawRow:
    """One row as read: its 1-based number in the source, and its value or why it is unreadable.

    Attributes:
        number: 1-based row number (the line number for JSON Lines).
        value: the decoded row (normally a dict); ``None`` when ``error`` is set.
        error: ``(reason, detail)`` when the row could not be read at all.
    """

    number: int
    value: Any = None
    error: tuple[str, str] | None = None


def read_rows(spec: SourceSpec) -> Sequence[RawRow]:
    """All rows of a source, in source order.

    Raises:
        ValueError: ``data.source: ...`` when the file is missing or unreadable as a whole.
    """
    if spec.kind == "hub":
        return _HubRows(spec)
    path = spec.path
    assert path is not None
    if not path.is_file():
        raise ValueError(f"data.source: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_parquet(path)


def _read_jsonl(path: Path) -> list[RawRow]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                rows.append(_parse_json_line(number, raw))
    return rows


def _parse_json_line(number: int, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRow(number, error=("undecodable_text", f"not valid UTF-8 at byte {e.start}"))
    try:
        return RawRow(number, json.loads(text))
    except json.JSONDecodeError as e:
        return RawRow(number, error=("invalid_json", f"{e.msg} at column {e.colno}"))


def _read_json(path: Path) -> list[RawRow]:
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        return _read_jsonl(path)  # `datasets` also accepts JSON Lines under .json
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        # A broken array has no rows to point at: the whole file is unusable.
        raise ValueError(f"data.source: {path} is not a valid JSON array: {e}") from None
    return [RawRow(number, item) for number, item in enumerate(items, start=1)]


def _read_csv(path: Path) -> list[RawRow]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return [RawRow(n, dict(r)) for n, r in enumerate(csv.DictReader(f), start=1)]
    except UnicodeDecodeError as e:
        raise ValueError(f"data.source: {path} is not valid UTF-8: {e}") from None


def _read_parquet(path: Path) -> list[RawRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [RawRow(number, row) for number, row in enumerate(table.to_pylist(), start=1)]


class _HubRows(Sequence[RawRow]):
    """A Hub split, read lazily row by row (only the selected rows are ever converted)."""

    def __init__(self, spec: SourceSpec):
        import datasets

        try:
            self._ds = datasets.load_dataset(spec.repo_id, name=spec.config, split=spec.split)
        except (ConnectionError, FileNotFoundError) as e:  # offline, or no such data set
            raise ValueError(f"data.source: cannot load {spec} from the Hub: {e}") from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index):  # Sequence protocol; slices are not needed here
        return RawRow(index + 1, self._ds[index])


def split_indices(
    n_rows: int, select: int | None, test_size: float, seed: int
) -> tuple[list[int], list[int]]:
    """0-based row indices of the train and eval splits.

    The same steps as the seed notebook, through ``datasets``' own functions so the selection
    is exactly what ``ds.shuffle(seed).select(range(select)).train_test_split(test_size,
    seed=seed)`` gives on the same rows: a seeded shuffle, the first ``select`` rows, then a
    seeded split with ``ceil(test_size * n)`` eval rows.

    Returns:
        ``(train, eval)``; ``eval`` is empty when ``test_size`` is 0.
    """
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(n_rows))}).shuffle(seed=seed)
    if select is not None and select < n_rows:
        ds = ds.select(range(select))
    if test_size == 0 or len(ds) == 0:
        return list(ds["i"]), []
    try:
        parts = ds.train_test_split(test_size=test_size, seed=seed)
    except ValueError as e:  # e.g. 2 rows with test_size 0.2 leave no train row
        raise ValueError(f"data.test_size: {e}") from None
    return list(parts["train"]["i"]), list(parts["test"]["i"])
