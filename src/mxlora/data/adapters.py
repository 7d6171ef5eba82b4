"""Adapters: one small function per kind of data set, from a row to a conversation.

Every adapter returns the common message schema (:class:`~mxlora.data.validate.Message`:
``role``, ``content``, ``thinking``) or raises :class:`~mxlora.data.validate.BadRow`.
:func:`adapt` then checks the conversation (roles, order, texts) the same way for all of them.

* ``quotes``: ``{quote, author, tags}`` -> user ``Give me a quote about: a, b and c``,
  assistant ``{quote} - {author}`` (both templates configurable).
* ``messages``: a ``messages`` list whose trained assistant turn carries ``thinking``
  (HuggingFaceH4/Multilingual-Thinking). Its leading ``system`` message (``reasoning language:
  X\\n\\n<instructions>``) becomes the Harmony developer instructions at render time.
* ``fields``: ``{question, answer}`` with ``answer = <steps>\\n#### <final>`` (GSM8K): question
  -> user, steps -> thinking (analysis), final -> content (final channel).
* ``chat``: any ``messages`` list, thinking optional.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any

from mxlora.data.spec import DataConfig
from mxlora.data.validate import BadRow, Message, check_conversation

# GSM8K's calculator annotations, e.g. "48/2 = <<48/2=24>>24": the part in << >>.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
# GSM8K's final-answer marker, "#### 72" on the last line of `answer`.
FINAL_ANSWER_MARK = "####"


def message(role: str, content: str, thinking: str | None = None) -> Message:
    """A message of the common schema."""
    return {"role": role, "content": content, "thinking": thinking}


def readable_list(items: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"`` (no Python list syntax in a prompt)."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``$<<9*2=18>>18`` -> ``$18``."""
    return _CALCULATOR.sub("", text)


def _text(row: dict[str, Any], name: str) -> str:
    """The string field ``name`` of a row."""
    value = row.get(name)
    if value is None:
        raise BadRow("missing_field", f"{name!r} is absent or null")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{name!r} is {type(value).__name__}, expected text")
    if not value.strip():
        raise BadRow("empty_field", f"{name!r} is empty")
    return value


def _tags(row: dict[str, Any]) -> str:
    """english_quotes' ``tags`` list as readable text (a plain string, e.g. from CSV, as is)."""
    tags = row.get("tags")
    if tags is None:
        raise BadRow("missing_field", "'tags' is absent or null")
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRow("wrong_type", f"'tags' must be a list of text, got {tags!r:.80}")
    tags = [t for t in tags if t.strip()]
    if not tags:
        raise BadRow("empty_field", "'tags' is empty")
    return readable_list(tags)


def _template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def quotes(row: dict[str, Any], cfg: DataConfig) -> list[Message]:
    """english_quotes: tags -> user prompt, quote and author -> assistant answer."""
    used = _template_fields(cfg.prompt_template) | _template_fields(cfg.completion_template)
    values = {name: _tags(row) if name == "tags" else _text(row, name) for name in sorted(used)}
    return [
        message("user", cfg.prompt_template.format(**values)),
        message("assistant", cfg.completion_template.format(**values)),
    ]


def fields(row: dict[str, Any], cfg: DataConfig) -> list[Message]:
    """GSM8K-style: question -> user; answer's steps -> thinking, its ``#### N`` -> final."""
    question = _text(row, cfg.question_field)
    answer = _text(row, cfg.answer_field)
    steps, mark, final = answer.rpartition(FINAL_ANSWER_MARK)
    if not mark:
        raise BadRow(
            "missing_field", f"{cfg.answer_field!r} has no {FINAL_ANSWER_MARK!r} final answer"
        )
    if cfg.strip_calculator:
        steps = strip_calculator(steps)
    steps, final = steps.strip(), final.strip()
    if not final:
        raise BadRow("empty_field", f"{cfg.answer_field!r} has nothing after {FINAL_ANSWER_MARK!r}")
    if not steps:
        raise BadRow(
            "empty_field", f"{cfg.answer_field!r} has no steps before {FINAL_ANSWER_MARK!r}"
        )
    return [message("user", question), message("assistant", final, thinking=steps)]


def _message_list(row: dict[str, Any], name: str) -> list[Message]:
    """A ``messages`` column as the common schema (types checked, values as given)."""
    items = row.get(name)
    if items is None:
        raise BadRow("missing_field", f"{name!r} is absent or null")
    if not isinstance(items, list):
        raise BadRow("wrong_type", f"{name!r} is {type(items).__name__}, expected a list")
    if not items:
        raise BadRow("empty_field", f"{name!r} is an empty list")
    conv = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise BadRow("wrong_type", f"{where} is {type(item).__name__}, expected an object")
        for key in ("role", "content"):
            if item.get(key) is None:
                raise BadRow("missing_field", f"{where}.{key} is absent or null")
            if not isinstance(item[key], str):
                raise BadRow("wrong_type", f"{where}.{key} is {type(item[key]).__name__}")
        thinking = item.get("thinking")
        if thinking is not None and not isinstance(thinking, str):
            raise BadRow("wrong_type", f"{where}.thinking is {type(thinking).__name__}")
        # "" and null both mean "no thinking" (data sets write either on non-assistant turns).
        conv.append(message(item["role"], item["content"], thinking or None))
    return conv


def messages(row: dict[str, Any], cfg: DataConfig) -> list[Message]:
    """Multilingual-Thinking-style ``messages``: the trained assistant turn must have thinking."""
    conv = _message_list(row, cfg.messages_field)
    last = conv[-1]
    if last["role"] == "assistant" and last["thinking"] is None:
        raise BadRow(
            "missing_field", f"{cfg.messages_field}[{len(conv) - 1}].thinking (assistant) is absent"
        )
    return conv


def chat(row: dict[str, Any], cfg: DataConfig) -> list[Message]:
    """Generic chat ``messages``, with or without thinking."""
    return _message_list(row, cfg.messages_field)


ADAPTERS: dict[str, Callable[[dict[str, Any], DataConfig], list[Message]]] = {
    "quotes": quotes,
    "messages": messages,
    "fields": fields,
    "chat": chat,
}


def adapt(row: Any, cfg: DataConfig) -> list[Message]:
    """A row as a checked conversation, by ``cfg.adapter``.

    Raises:
        BadRow: the row cannot be trained on (see :data:`~mxlora.data.validate.REASONS`).
    """
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is {type(row).__name__}, expected an object")
    conv = ADAPTERS[cfg.adapter](row, cfg)
    check_conversation(conv)
    return conv


def expected_fields(cfg: DataConfig) -> list[str]:
    """The columns ``cfg.adapter`` reads (with the configured field names and templates)."""
    if cfg.adapter == "quotes":
        used = _template_fields(cfg.prompt_template) | _template_fields(cfg.completion_template)
        return sorted(used)
    if cfg.adapter == "fields":
        return [cfg.question_field, cfg.answer_field]
    return [cfg.messages_field]


def guess_adapter(row: Any) -> str | None:
    """The adapter a row's columns call for, or ``None`` (used by ``mxlora data inspect``)."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("messages"), list):
        items = [m for m in row["messages"] if isinstance(m, dict)]
        has_thinking = any(m.get("role") == "assistant" and m.get("thinking") for m in items)
        return "messages" if has_thinking else "chat"
    if {"quote", "author", "tags"} <= row.keys():
        return "quotes"
    if {"question", "answer"} <= row.keys():
        return "fields"
    return None
