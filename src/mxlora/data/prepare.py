"""From a ``data:`` config to the tokenized train/eval sets the trainer consumes, plus a report.

Order of work (so that which row lands in which split never depends on the tokenizer or
``max_len``): read all rows -> seeded shuffle, select, train/eval split on row indices ->
per split: adapt + check each row, render, drop (or cut) rows over ``max_len``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mxlora.data.adapters import adapt, expected_fields
from mxlora.data.render import Rendered, render
from mxlora.data.sources import RawRow, read_rows, split_indices
from mxlora.data.spec import DataConfig, parse_source
from mxlora.data.validate import BadRow, DropLog


@dataclass
class PreparedData:
    """Tokenized splits and what happened to every row.

    Attributes:
        train: ``datasets.Dataset`` with columns ``input_ids`` and ``completion_mask`` (lists of
            int; the mask is 1 exactly on the tokens that carry loss).
        eval: the same for the eval split, ``None`` when ``test_size`` is 0.
        report: JSON-able: rows read/selected/kept, dropped rows by reason with row numbers
            (in all and per split), token statistics per split.
        train_rows: source row numbers of ``train``'s rows, in order.
        eval_rows: source row numbers of ``eval``'s rows, in order.
    """

    train: Any
    eval: Any | None
    report: dict[str, Any]
    train_rows: list[int]
    eval_rows: list[int]


def process_rows(
    raw: Sequence[RawRow], cfg: DataConfig, tokenizer: Any, max_len: int
) -> tuple[list[Rendered], DropLog]:
    """Adapt, check and render rows; drop (or, with ``cfg.truncate``, cut) those over ``max_len``.

    Returns:
        the kept rows (in the given order) and the log of dropped ones.
    """
    drops = DropLog()
    convs, numbers = [], []
    for r in raw:
        if r.error is not None:
            drops.add(r.number, *r.error)
            continue
        try:
            convs.append(adapt(r.value, cfg))
            numbers.append(r.number)
        except BadRow as e:
            drops.add(r.number, e.reason, e.detail)
    kept = []
    for item in render(convs, numbers, tokenizer, cfg):
        length = len(item.input_ids)
        if length <= max_len:
            kept.append(item)
        elif cfg.truncate and item.prompt_len < max_len:
            ids, mask = item.input_ids[:max_len], item.completion_mask[:max_len]
            kept.append(Rendered(item.row, ids, mask, truncated=True))
        else:
            why = "prompt alone fills" if cfg.truncate else "is longer than"
            drops.add(item.row, "too_long", f"{length} tokens: {why} max_len {max_len}")
    return kept, drops


def percentiles(values: list[int]) -> dict[str, int]:
    """p50, p95 (nearest rank: always a value that occurs) and max; zeros when empty."""
    if not values:
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return {"p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1]}


def split_report(selected: int, kept: list[Rendered], drops: DropLog) -> dict[str, Any]:
    """Counts, drops by reason and token statistics of one split."""
    tokens = sum(len(r.input_ids) for r in kept)
    loss_tokens = sum(r.completion_len for r in kept)
    truncated = [r.row for r in kept if r.truncated]
    return {
        "rows": selected,
        "kept": len(kept),
        "dropped": drops.to_dict(),
        "truncated": {"count": len(truncated), "rows": sorted(truncated)},
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_share": round(loss_tokens / tokens, 4) if tokens else 0.0,
        "prompt_tokens": percentiles([r.prompt_len for r in kept]),
        "completion_tokens": percentiles([r.completion_len for r in kept]),
        "total_tokens": percentiles([len(r.input_ids) for r in kept]),
    }


def drop_summary(drops: DropLog | dict[str, dict[str, Any]]) -> str:
    """``"too_long 3 (rows 4, 9, 12), empty_field 1 (row 2)"``, rows capped at 10 per reason.

    ``drops`` is a log or its :meth:`~mxlora.data.validate.DropLog.to_dict` form (a report's).
    """
    parts = []
    by_reason = drops.to_dict() if isinstance(drops, DropLog) else drops
    for reason, entry in by_reason.items():
        rows = entry["rows"]
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        parts.append(f"{reason} {entry['count']} (row{'s' if len(rows) > 1 else ''} {shown})")
    return ", ".join(parts) or "none"


def describe_data(report: dict[str, Any]) -> str:
    """The console summary of :func:`prepare_data`'s report: rows kept per split and every drop
    by reason with its first row numbers."""
    splits = ", ".join(
        f"{name} {split['kept']} of {split['rows']} kept"
        for name, split in report["splits"].items()
    )
    dropped = sum(entry["count"] for entry in report["dropped"].values())
    line = (
        f"data {report['source']} ({report['adapter']}, max_len {report['max_len']}): "
        f"{report['rows_read']} rows read, {report['rows_selected']} selected; {splits}"
    )
    if dropped:
        line += f"; dropped {dropped}: {drop_summary(report['dropped'])} (details in report.json)"
    truncated = sum(split["truncated"]["count"] for split in report["splits"].values())
    if truncated:
        line += f"; {truncated} cut to max_len (data.truncate)"
    return line


def columns_hint(raw: Sequence[RawRow], cfg: DataConfig) -> str:
    """What the adapter reads against what the rows hold, for a missing-field error."""
    found: dict[str, None] = {}  # ordered set
    for r in (raw[i] for i in range(min(len(raw), 20))):
        if isinstance(r.value, dict):
            found.update(dict.fromkeys(r.value))
    columns = ", ".join(found) or "none (no readable row)"
    return (
        f"The {cfg.adapter!r} adapter (data.adapter) reads the field(s) "
        f"{', '.join(expected_fields(cfg))}; the rows have the columns {columns}. Choose the "
        "adapter that fits (quotes, messages, fields, chat) or name the columns "
        "(data.question_field, data.answer_field, data.messages_field, data.*_template)."
    )


def _raise_first_bad(drops: DropLog, source: str, hint: str) -> None:
    first = drops.first()
    if first is not None:
        row, reason, detail = first
        raise ValueError(
            f"data: row {row} of {source}: {reason}: {detail} "
            f"(data.on_bad_row is 'error'; {len(drops)} bad row(s) in the selection)"
            + (f". {hint}" if reason == "missing_field" else "")
        )


def prepare_data(cfg: DataConfig, tokenizer: Any, max_len: int) -> PreparedData:
    """Read, select, split, adapt, check and render the data a run trains on.

    Args:
        cfg: the ``data:`` config.
        tokenizer: the gpt-oss tokenizer (``AutoTokenizer`` of the model or
            ``mxlora.model.tokenizer.ensure_tokenizer()``).
        max_len: the training's maximum sequence length in tokens.

    Raises:
        ValueError: a bad config field (``data.<field>: ...``), an unreadable source, a bad
            row under ``on_bad_row: error`` (naming the first one), or a split left empty.
    """
    import datasets

    cfg.validate()
    if max_len < 1:
        raise ValueError(f"max_len: must be a positive token count, got {max_len}")
    spec = parse_source(cfg.source)
    raw = read_rows(spec)
    if len(raw) == 0:
        raise ValueError(f"data.source: {spec} has no rows")
    train_idx, eval_idx = split_indices(len(raw), cfg.select, cfg.test_size, cfg.seed)

    results = {}
    for name, indices in (("train", train_idx), ("eval", eval_idx)):
        if indices:
            results[name] = process_rows([raw[i] for i in indices], cfg, tokenizer, max_len)
    all_drops = DropLog()
    for _, drops in results.values():
        all_drops.merge(drops)
    hint = columns_hint(raw, cfg)
    if cfg.on_bad_row == "error":
        _raise_first_bad(all_drops, str(spec), hint)
    for name, (kept, drops) in results.items():
        if not kept:
            missing = "missing_field" in drops.to_dict()
            raise ValueError(
                f"data: no {name} rows left from {spec}: all {len(drops)} selected rows were "
                f"dropped: {drop_summary(drops)}" + (f". {hint}" if missing else "")
            )

    def to_dataset(kept: list[Rendered]):
        return datasets.Dataset.from_dict(
            {
                "input_ids": [r.input_ids for r in kept],
                "completion_mask": [r.completion_mask for r in kept],
            }
        )

    train_kept = results["train"][0]
    eval_kept = results["eval"][0] if "eval" in results else []
    report = {
        "source": str(spec),
        "adapter": cfg.adapter,
        "render": cfg.render,
        "date": cfg.date,
        "reasoning_effort": cfg.reasoning_effort,
        "max_len": max_len,
        "rows_read": len(raw),
        "rows_selected": len(train_idx) + len(eval_idx),
        "kept": len(train_kept) + len(eval_kept),
        "dropped": all_drops.to_dict(),
        "splits": {
            name: split_report(len(idx), results[name][0], results[name][1])
            for name, idx in (("train", train_idx), ("eval", eval_idx))
            if name in results
        },
    }
    return PreparedData(
        train=to_dataset(train_kept),
        eval=to_dataset(eval_kept) if "eval" in results else None,
        report=report,
        train_rows=[r.row for r in train_kept],
        eval_rows=[r.row for r in eval_kept],
    )
