"""``mxlora eval RUN_OR_MODEL --data SPEC``: held-out loss and, for data with a final answer,
generation-based exact match of the ``final`` channel.

What is evaluated: a run folder (``config.yaml`` + ``adapter/``, as ``mxlora train`` writes it)
resolves to its base model plus its adapter, and its data settings (renderer, date, reasoning
effort, templates, ``max_len``) are reused for the eval rows; a model (Hub id, folder, merge,
``tiny``) is evaluated as it is, with the default data settings. The model is loaded for
inference as ``mxlora chat`` loads it (experts dequantized, adapter applied unmerged).

The rows: SPEC is a source spec as in ``data.source`` (a file, ``example:NAME`` or a Hub id);
its adapter is guessed from the columns (GSM8K's question/answer: ``fields``). The rows are
rendered exactly as for training (:func:`mxlora.data.inspect.inspect_rows`: ``--select`` rows
of the seeded shuffle, bad and over-long rows dropped and counted), with the loss on the
assistant turn.

* **loss**: the mean cross-entropy over every assistant-turn token of every row (token
  weighted, so long rows weigh more, as in training), with its perplexity.
* **exact match** (rows whose answer is a final answer, GSM8K's ``#### 72``; the ``fields``
  adapter): the model answers each prompt greedily (the rendered row up to
  ``<|start|>assistant``, stop tokens as in ``mxlora chat``); its completion and the rendered
  reference completion are parsed as Harmony (:func:`mxlora.recipes.chat.parse_completion`)
  and their ``final`` texts compared after :func:`normalize_answer`. A completion without a
  ``final`` message scores 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from mxlora.config import ConfigError, TrainingConfig, from_dict, read_yaml
from mxlora.data.inspect import DEFAULT_MAX_LEN, inspect_rows
from mxlora.data.render import Rendered
from mxlora.data.sources import read_rows
from mxlora.data.spec import DataConfig, parse_source
from mxlora.model.load import ModelLoadError
from mxlora.recipes.chat import ChatModel, generate, parse_completion
from mxlora.recipes.merge import MergeError

#: Adapters whose rows end in a final answer that exact match can score (GSM8K's ``#### N``).
FINAL_ANSWER_ADAPTERS = ("fields",)
# The tokens of "<|start|>assistant" that open the trained turn: a generation prompt is the
# rendered row up to and including them.
_TURN_HEADER = 2


@dataclasses.dataclass
class Target:
    """What to evaluate: base model, optional adapter, and the run's config if it is a run."""

    model: str
    adapter: str | None
    run: TrainingConfig | None


def resolve_target(run_or_model: str, adapter: str | None = None) -> Target:
    """A run folder (``config.yaml`` + ``adapter/``) -> its base model and adapter; anything
    else is a model name or folder, with ``adapter`` applied if given.

    Raises:
        ConfigError: a run folder whose ``config.yaml`` does not load.
        MergeError: a run folder without a finished adapter.
    """
    folder = Path(run_or_model)
    if (folder / "config.yaml").is_file() and not (folder / "config.json").is_file():
        cfg = from_dict(TrainingConfig, read_yaml(folder / "config.yaml"))
        run_adapter = folder / "adapter"
        if adapter is None and not run_adapter.is_dir():
            raise MergeError(f"run {folder}: no adapter/ (the run has not finished)")
        return Target(cfg.model.name_or_path, adapter or str(run_adapter), cfg)
    return Target(run_or_model, adapter, None)


def eval_data_config(spec: str, run: TrainingConfig | None, select: int | None) -> DataConfig:
    """The ``data:`` settings for the eval rows: the run's (renderer, date, effort, templates)
    with ``source`` = ``spec``, its adapter guessed from the columns, no split, loss on the
    assistant turn.

    Raises:
        ValueError: an unreadable source, or columns no adapter fits.
    """
    from mxlora.data.adapters import guess_adapter

    base = run.data if run is not None else DataConfig()
    raw = read_rows(parse_source(spec))
    first = next((r.value for r in raw if r.error is None), None)
    adapter = guess_adapter(first) or base.adapter
    # Rows over max_len are dropped, never cut: a cut reference has lost its final answer.
    return dataclasses.replace(
        base,
        source=spec,
        adapter=adapter,
        select=select,
        test_size=0.0,
        loss_on="assistant",
        truncate=False,
    )


# --------------------------------------------------------------------------------------------
# Scoring (pure functions).

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def normalize_answer(text: str) -> str:
    """A final answer in a comparable form: surrounding space, ``$``, ``%`` and a trailing
    period dropped, thousands separators removed, numbers in canonical form (``72.0`` ->
    ``72``, ``1,000`` -> ``1000``), other text lower-cased."""
    text = text.strip().rstrip(".").strip()
    text = text.removeprefix("$").removesuffix("%").strip()
    plain = text.replace(",", "")
    if _NUMBER.fullmatch(plain):
        try:
            number = Decimal(plain).normalize()
        except InvalidOperation:
            return text.lower()
        return format(number, "f") if number != 0 else "0"
    return " ".join(text.lower().split())


def final_text(completion: Sequence[int]) -> str | None:
    """The ``final`` channel text of a Harmony completion's tokens, ``None`` if it has none."""
    return parse_completion(completion)["final"]


def exact_match(completion: Sequence[int], reference: Sequence[int]) -> int:
    """1 if the completion's ``final`` answer equals the reference completion's, else 0.

    Args:
        completion: generated tokens after ``<|start|>assistant``.
        reference: the rendered reference completion's tokens, from the same point.
    """
    got, want = final_text(completion), final_text(reference)
    if got is None or want is None:
        return 0
    return int(normalize_answer(got) == normalize_answer(want))


def split_row(row: Rendered) -> tuple[list[int], list[int]]:
    """A rendered row as ``(generation prompt, reference completion)`` token ids: the prompt
    ends in ``<|start|>assistant``, as :func:`mxlora.data.render.generation_prompt` does."""
    cut = row.prompt_len + _TURN_HEADER
    return row.input_ids[:cut], row.input_ids[cut:]


# --------------------------------------------------------------------------------------------
# Model passes.


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, rows: Sequence[Rendered], batch_size: int = 4
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the loss-mask tokens of ``rows``.

    Returns:
        ``{"loss", "perplexity", "loss_tokens"}``.
    """
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(batch):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            attention[i, :n] = 1
            mask = torch.tensor(r.completion_mask, dtype=torch.bool)
            labels[i, :n] = torch.where(mask, ids[i, :n], -100)
        ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        # Token t predicts token t + 1.
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        ).double()
        count += sum(sum(r.completion_mask[1:]) for r in batch)
    loss = float(total / count) if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if count else math.nan, "loss_tokens": count}


def generated_exact_match(
    model: torch.nn.Module, rows: Sequence[Rendered], max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to each row's prompt, scored by :func:`exact_match`.

    Returns:
        ``{"exact_match", "correct", "scored", "answers"}``; ``answers`` lists per row the
        source row number, the reference and generated ``final`` texts and the score.
    """
    answers = []
    for row in rows:
        prompt, reference = split_row(row)
        completion = generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0)
        answers.append(
            {
                "row": row.row,
                "reference": final_text(reference),
                "final": final_text(completion),
                "correct": exact_match(completion, reference),
            }
        )
    correct = sum(a["correct"] for a in answers)
    return {
        "exact_match": correct / len(answers) if answers else math.nan,
        "correct": correct,
        "scored": len(answers),
        "answers": answers,
    }


def evaluate(
    target: Target,
    data: DataConfig,
    max_len: int,
    max_new_tokens: int,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Held-out loss and (for final-answer data) exact match of ``target`` on ``data``'s rows.

    Returns:
        ``{"model", "adapter", "data", "loss", "perplexity", "loss_tokens"}`` plus, for
        final-answer data, ``{"exact_match", "correct", "scored", "answers"}``; ``data`` is the
        rows' report (kept and dropped counts, token statistics).

    Raises:
        ModelLoadError, MergeError: unreadable model or adapter.
        ValueError: unreadable data, or no row left to evaluate.
    """
    session = ChatModel(target.model, target.adapter, device)
    report, rows = inspect_rows(
        read_rows(parse_source(data.source)), data, session.tokenizer, max_len
    )
    if not rows:
        raise ValueError(
            f"data {data.source}: no row left to evaluate (dropped: {report['dropped']})"
        )
    result: dict[str, Any] = {"model": target.model, "adapter": target.adapter, "data": report}
    result.update(heldout_loss(session.model, rows, batch_size))
    if data.adapter in FINAL_ANSWER_ADAPTERS:
        result.update(generated_exact_match(session.model, rows, max_new_tokens))
    return result


def format_result(result: dict[str, Any]) -> str:
    """The summary lines of :func:`evaluate`'s result."""
    data = result["data"]
    adapter = f" + adapter {result['adapter']}" if result["adapter"] else ""
    lines = [
        f"model       {result['model']}{adapter}",
        f"data        {data['source']} ({data['adapter']}): {data['kept']} rows evaluated, "
        f"{data['rows'] - data['kept']} dropped",
        f"loss        {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over "
        f"{result['loss_tokens']} assistant tokens",
    ]
    if "exact_match" in result:
        lines.append(
            f"exact match {result['exact_match']:.3f} ({result['correct']} of {result['scored']} "
            "final answers, greedy)"
        )
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora eval RUN_OR_MODEL --data SPEC [--adapter] [--select] [--max-new-tokens] ...``."""
    if (
        args.max_new_tokens < 1
        or args.batch_size < 1
        or (args.select is not None and args.select < 1)
    ):
        print(
            "mxlora eval: error: --max-new-tokens, --batch-size and --select must be >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        target = resolve_target(args.target, args.adapter)
        data = eval_data_config(args.data, target.run, args.select)
        max_len = target.run.train.max_len if target.run is not None else DEFAULT_MAX_LEN
        result = evaluate(target, data, max_len, args.max_new_tokens, args.batch_size)
    except (ConfigError, ModelLoadError, MergeError, ValueError) as e:
        print(f"mxlora eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False) if args.json else format_result(result))
    return 0
