"""What a run trains on: the ``data:`` block of a run config, and the source spec syntax.

A *source spec* is one string for both kinds of source:

* a local file: any spec ending in ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` (relative
  to the working directory, ``~`` expanded), e.g. ``../shared/data/gsm8k_train.jsonl``;
* a packaged example of ours: ``example:NAME`` (``src/mxlora/examples/NAME.jsonl``, the small
  data sets the demo uses when ``../shared`` is absent), e.g. ``example:quotes``;
* a Hugging Face Hub data set: ``OWNER/NAME[:SPLIT]`` or ``OWNER/NAME:CONFIG:SPLIT``, e.g.
  ``Abirate/english_quotes`` (split ``train``), ``HuggingFaceH4/Multilingual-Thinking:train``,
  ``openai/gsm8k:main:test``. The split may carry ``datasets``' slicing, ``train[:10%]``.

See docs/DATA.md for the whole story (adapters, rendering, validation).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

ADAPTERS = ("quotes", "messages", "fields", "chat")
RENDERERS = ("harmony", "chat-template")
REASONING_EFFORTS = ("low", "medium", "high")
BAD_ROW_POLICIES = ("drop", "error")
# Which tokens carry loss: the trained assistant turn (default), or every token of the row as
# TRL's defaults gave the seed notebook (system prompt, user turn and assistant turn alike).
LOSS_ON = ("assistant", "all")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# The date OpenAI's own Harmony examples pin (openai/harmony README and its test suite:
# `with_conversation_start_date("2025-06-28")`). Any fixed date works; a wall-clock date would
# change the system message, hence the token ids, from one day to the next.
DEFAULT_DATE = "2025-06-28"
# gpt-oss's default identity: the Hub chat template's `model_identity` default and
# openai-harmony's `SystemContent.model_identity` default.
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
# The seed notebook's prompt/completion mapping for english_quotes.
DEFAULT_PROMPT_TEMPLATE = "Give me a quote about: {tags}"
DEFAULT_COMPLETION_TEMPLATE = "{quote} - {author}"
QUOTE_FIELDS = ("quote", "author", "tags")

# OWNER/NAME[:CONFIG][:SPLIT] plus datasets' slice syntax on the split, "test[:10%]" (whose
# ':' is not a separator).
_HUB_SPEC = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<first>[^:\[\]]+))?(?::(?P<second>[^:\[\]]+))?"
    r"(?P<slice>(?:\[[^\]]*\])?)"
)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: a local file, or a Hub data set with config and split."""

    kind: Literal["local", "hub"]
    path: Path | None = None
    repo_id: str | None = None
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        if self.kind == "local":
            return str(self.path)
        config = f":{self.config}" if self.config else ""
        return f"{self.repo_id}{config}:{self.split}"


def example_path(name: str) -> Path:
    """The packaged example data set ``src/mxlora/examples/NAME.jsonl``."""
    return Path(str(resources.files("mxlora").joinpath("examples", f"{name}.jsonl")))


def parse_source(spec: str) -> SourceSpec:
    """Parse a source spec (module docstring) without touching the file system or network.

    Raises:
        ValueError: ``data.source: ...`` when the spec fits neither form.
    """
    spec = spec.strip()
    if spec.startswith("example:"):
        return SourceSpec(kind="local", path=example_path(spec.removeprefix("example:")))
    if spec.lower().endswith(LOCAL_SUFFIXES):
        return SourceSpec(kind="local", path=Path(spec).expanduser())
    m = _HUB_SPEC.fullmatch(spec)
    if not m or (m["slice"] and not m["first"]):
        raise ValueError(
            f"data.source: {spec!r} is neither a local file ending in "
            f"{'/'.join(LOCAL_SUFFIXES)} nor a Hub id OWNER/NAME[:SPLIT] or OWNER/NAME:CONFIG:SPLIT"
        )
    if m["second"]:
        return SourceSpec(
            "hub", repo_id=m["repo"], config=m["first"], split=m["second"] + m["slice"]
        )
    return SourceSpec("hub", repo_id=m["repo"], split=(m["first"] or "train") + m["slice"])


@dataclass
class DataConfig:
    """The ``data:`` block of a run config. Validated on construction (:meth:`validate`).

    Attributes:
        source: source spec (module docstring): local file, ``example:NAME`` or Hub id.
        adapter: how a row becomes a conversation: ``quotes`` (quote/author/tags),
            ``messages`` (a ``messages`` list whose assistant turn has ``thinking``, e.g.
            Multilingual-Thinking), ``fields`` (question/answer with ``####``, e.g. GSM8K),
            ``chat`` (a ``messages`` list, thinking optional).
        select: keep this many rows after the seeded shuffle (all if ``None``, or if fewer).
        test_size: share of the selected rows held out for eval (0 means no eval split).
        seed: seed of the shuffle and of the train/eval split.
        render: ``harmony`` (our renderer, token-identical to openai-harmony) or
            ``chat-template`` (the Hub chat template via ``apply_chat_template``).
        date: ``Current date`` of the Harmony system message, ``YYYY-MM-DD``; never the clock.
        reasoning_effort: ``Reasoning:`` line of the system message.
        model_identity: first line of the system message.
        on_bad_row: ``drop`` (count by reason, with row numbers, in the report) or ``error``
            (stop at the first bad row).
        loss_on: ``assistant`` (the last assistant turn, thinking included) or ``all`` (every
            token of the row: what the seed notebook's TRL defaults trained on; see docs/DATA.md).
        truncate: cut rows longer than ``max_len`` instead of dropping them (a cut reasoning
            trace loses its final answer and ``<|return|>``, so dropping is the default).
        prompt_template: quotes: user message; fields ``{quote}``, ``{author}``, ``{tags}``.
        completion_template: quotes: assistant message; same fields.
        messages_field: messages/chat: the column holding the message list.
        question_field: fields: the column that becomes the user message.
        answer_field: fields: the column with the reasoning, ``####``, then the final answer.
        strip_calculator: fields: remove GSM8K's ``<<48/2=24>>`` calculator annotations from
            the reasoning (they were written for a calculator tool gpt-oss does not have).
    """

    source: str = "Abirate/english_quotes"
    adapter: str = "quotes"
    select: int | None = None
    test_size: float = 0.2
    seed: int = 42
    render: str = "harmony"
    date: str = DEFAULT_DATE
    reasoning_effort: str = "medium"
    model_identity: str = DEFAULT_MODEL_IDENTITY
    on_bad_row: str = "drop"
    loss_on: str = "assistant"
    truncate: bool = False
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    completion_template: str = DEFAULT_COMPLETION_TEMPLATE
    messages_field: str = "messages"
    question_field: str = "question"
    answer_field: str = "answer"
    strip_calculator: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; the error names it (``data.<field>: ...``).

        Raises:
            ValueError: on the first invalid field.
        """
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _one_of("adapter", self.adapter, ADAPTERS)
        _one_of("render", self.render, RENDERERS)
        _one_of("reasoning_effort", self.reasoning_effort, REASONING_EFFORTS)
        _one_of("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        _one_of("loss_on", self.loss_on, LOSS_ON)
        parse_source(self.source)
        if self.select is not None and self.select < 1:
            raise ValueError(
                f"data.select: must be a positive row count or null, got {self.select}"
            )
        if not 0.0 <= self.test_size < 1.0:
            raise ValueError(f"data.test_size: must be in [0, 1), got {self.test_size}")
        try:
            datetime.date.fromisoformat(self.date)
        except ValueError:
            raise ValueError(f"data.date: must be a date YYYY-MM-DD, got {self.date!r}") from None
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            raise ValueError(f"data.date: must be written YYYY-MM-DD, got {self.date!r}")
        if not self.model_identity.strip():
            raise ValueError("data.model_identity: must not be empty")
        for name in ("prompt_template", "completion_template"):
            _check_template(name, getattr(self, name))


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "int | None": (int, None)}


def _check_type(name: str, value: object, annotation: str) -> None:
    expected = _TYPES[annotation]
    allowed = expected if isinstance(expected, tuple) else (expected,)
    ok = any(value is None if t is None else isinstance(value, t) for t in allowed)
    # bool is an int subclass: `select: true` must not pass as 1.
    if not ok or (isinstance(value, bool) and bool not in allowed):
        raise ValueError(f"data.{name}: expected {annotation}, got {value!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name}: must be one of {', '.join(allowed)}; got {value!r}")


def _check_template(name: str, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"data.{name}: not a valid format string: {e}") from None
    unknown = fields - set(QUOTE_FIELDS)
    if unknown:
        raise ValueError(
            f"data.{name}: unknown field(s) {sorted(unknown)}; use {{quote}}, {{author}}, {{tags}}"
        )
