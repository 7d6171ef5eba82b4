"""``mxlora data inspect``: what a data source becomes before anything trains on it.

Prints rows kept and dropped by reason (with row numbers), token-length percentiles of the
prompt (everything before the trained turn) and the completion (the tokens under loss), the
share of tokens under loss, and rendered examples with the loss-carrying tokens marked: green
on a terminal, ``[[...]]`` otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from mxlora.data.adapters import guess_adapter
from mxlora.data.prepare import process_rows, split_report
from mxlora.data.render import Rendered
from mxlora.data.sources import RawRow, read_rows, split_indices
from mxlora.data.spec import DataConfig, parse_source

# The seed notebook's SFTConfig(max_length=2048).
DEFAULT_MAX_LEN = 2048
_GREEN, _RESET = "\033[32m", "\033[0m"


def inspect_rows(
    raw: Sequence[RawRow], cfg: DataConfig, tokenizer: Any, max_len: int
) -> tuple[dict[str, Any], list[Rendered]]:
    """Render the rows a run would select (``cfg.select``, seeded), in source order.

    Returns:
        the report (as one split of :func:`~mxlora.data.prepare.prepare_data`'s report, plus
        source facts) and the kept rows.
    """
    if cfg.select is None:
        selected = list(raw)  # all rows, in order: no need for the seeded shuffle
    else:
        indices, _ = split_indices(len(raw), cfg.select, 0.0, cfg.seed)
        selected = [raw[i] for i in sorted(indices)]
    kept, drops = process_rows(selected, cfg, tokenizer, max_len)
    report = {
        "source": cfg.source,
        "adapter": cfg.adapter,
        "render": cfg.render,
        "max_len": max_len,
        "rows_read": len(raw),
        **split_report(len(selected), kept, drops),
    }
    return report, kept


def mark_loss(item: Rendered, tokenizer: Any, color: bool) -> str:
    """The decoded row with its loss-carrying tokens marked (ANSI green, or ``[[...]]``)."""
    pieces, start = [], 0
    ids, mask = item.input_ids, item.completion_mask
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            if mask[start]:
                text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
            pieces.append(text)
            start = end
    return "".join(pieces)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary of :func:`inspect_rows`' report."""
    dropped = sum(entry["count"] for entry in report["dropped"].values())
    lines = [
        f"source      {report['source']}",
        f"adapter     {report['adapter']}    render {report['render']}    "
        f"max_len {report['max_len']}",
        f"rows        {report['rows_read']} read, {report['rows']} selected, "
        f"{report['kept']} kept, {dropped} dropped",
    ]
    for reason, entry in report["dropped"].items():
        rows = ", ".join(map(str, entry["rows"][:20])) + (" ..." if entry["count"] > 20 else "")
        lines.append(f"  {reason:<19} {entry['count']:>6}  rows {rows}")
    if report["truncated"]["count"]:
        lines.append(f"  truncated to max_len {report['truncated']['count']:>6}")
    lines.append(f"{'tokens':<12}{'p50':>8}{'p95':>8}{'max':>8}")
    for name in ("prompt", "completion", "total"):
        stats = report[f"{name}_tokens"]
        lines.append(f"  {name:<10}{stats['p50']:>8}{stats['p95']:>8}{stats['max']:>8}")
    lines.append(
        f"under loss  {100 * report['loss_share']:.1f} % of tokens "
        f"({report['loss_tokens']} of {report['tokens']})"
    )
    return "\n".join(lines)


def _load_config(args: argparse.Namespace) -> tuple[DataConfig, int, Sequence[RawRow]]:
    """The data config, ``max_len`` and rows to inspect, from a spec or a training YAML."""
    max_len = args.max_len
    if args.spec.lower().endswith((".yaml", ".yml")):
        from mxlora.config import load_config

        run_cfg = load_config(args.spec)
        cfg, max_len = run_cfg.data, max_len or run_cfg.train.max_len
        raw = read_rows(parse_source(cfg.source))
    else:
        raw = read_rows(parse_source(args.spec))
        adapter = args.adapter or _guess(raw)
        cfg = DataConfig(source=args.spec, adapter=adapter, test_size=0.0)
    overrides = {k: getattr(args, k) for k in ("adapter", "render", "select") if getattr(args, k)}
    return dataclasses.replace(cfg, **overrides), max_len or DEFAULT_MAX_LEN, raw


def _guess(raw: Sequence[RawRow]) -> str:
    first = next((r.value for r in raw if r.error is None), None)
    adapter = guess_adapter(first)
    if adapter is None:
        columns = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"cannot tell the adapter from the columns {columns}: pass --adapter")
    return adapter


@functools.cache
def _tokenizer() -> Any:
    """The gpt-oss tokenizer, loaded once per process (loading takes seconds)."""
    from transformers import AutoTokenizer

    from mxlora.model.tokenizer import ensure_tokenizer

    return AutoTokenizer.from_pretrained(ensure_tokenizer())


def cli_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``mxlora data inspect SPEC [--adapter] [--render] [--select] [--max-len] [--show N]``."""
    out = out or sys.stdout
    try:
        cfg, max_len, raw = _load_config(args)
        tokenizer = _tokenizer()
        report, kept = inspect_rows(raw, cfg, tokenizer, max_len)
    except ValueError as e:
        print(f"mxlora data inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    print(format_report(report), file=out)
    color = out.isatty()
    legend = "green" if color else "inside [[ ]]"
    for i, item in enumerate(kept[: args.show], start=1):
        print(f"\n--- example {i}: row {item.row}, tokens under loss {legend} ---", file=out)
        print(mark_loss(item, tokenizer, color), file=out)
    return 0
