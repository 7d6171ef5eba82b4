"""What makes a row bad, how a conversation is checked, and how dropped rows are counted.

Every bad row is dropped for exactly one reason (the first problem found), counted with its
row number; with ``on_bad_row: error`` the first bad row (lowest row number) stops the run.
"""

from __future__ import annotations

import re
from typing import TypedDict

from mxlora.model.tokenizer import SPECIAL_TOKENS

ROLES = ("system", "developer", "user", "assistant")
INSTRUCTION_ROLES = ("system", "developer")

#: Why a row is dropped (report key -> meaning). docs/DATA.md lists the same.
REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON (e.g. cut off)",
    "wrong_type": "a field or message has the wrong type (e.g. a number where text belongs)",
    "missing_field": "a required field is absent or null",
    "empty_field": "a required field is empty or only whitespace",
    "unknown_role": "a message role other than system, developer, user, assistant",
    "no_assistant_turn": "no assistant message to train on",
    "turn_order": "messages out of order (instructions first, then user/assistant "
    "alternating, starting with user and ending with assistant)",
    "misplaced_thinking": "thinking on a message that is not the assistant's",
    "undecodable_text": "text that is not valid UTF-8, has lone surrogates or U+FFFD "
    "(the mark of text already lost in an earlier decode)",
    "special_token_text": "text containing a Harmony special token such as <|end|>",
    "too_long": "the rendered row is longer than max_len tokens",
}

# Lone UTF-16 surrogates (JSON "\ud800" decodes to one; no UTF-8 encoding exists for it) and
# U+FFFD REPLACEMENT CHARACTER (a decoder already replaced bytes it could not read).
_UNDECODABLE = re.compile("[\ud800-\udfff\ufffd]")
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class Message(TypedDict):
    """One message of the common schema every adapter produces."""

    role: str
    content: str
    thinking: str | None


class BadRow(Exception):
    """A row that cannot be trained on; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_text(where: str, text: str) -> None:
    """Reject text the tokenizer cannot faithfully encode, or that would forge Harmony tokens.

    Raises:
        BadRow: ``undecodable_text`` or ``special_token_text``.
    """
    bad = _UNDECODABLE.search(text)
    if bad:
        what = "U+FFFD" if bad.group() == "\ufffd" else f"lone surrogate U+{ord(bad.group()):04X}"
        raise BadRow("undecodable_text", f"{where}: {what} at character {bad.start()}")
    special = _SPECIAL.search(text)
    if special:
        raise BadRow("special_token_text", f"{where}: contains {special.group()}")


def check_conversation(conv: list[Message]) -> None:
    """Check roles, turn order and texts of an adapted conversation.

    Raises:
        BadRow: the first problem found.
    """
    for i, m in enumerate(conv):
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"message {i}: role {m['role']!r}")
    roles = [m["role"] for m in conv]
    if "assistant" not in roles:
        raise BadRow("no_assistant_turn", f"roles {roles}")
    _check_order(roles)
    for i, m in enumerate(conv):
        where = f"message {i} ({m['role']})"
        if not m["content"].strip():
            raise BadRow("empty_field", f"{where}: content is empty")
        check_text(f"{where} content", m["content"])
        if m["thinking"] is None:
            continue
        if m["role"] != "assistant":
            raise BadRow("misplaced_thinking", f"{where}: has thinking")
        if not m["thinking"].strip():
            raise BadRow("empty_field", f"{where}: thinking is only whitespace")
        check_text(f"{where} thinking", m["thinking"])


def _check_order(roles: list[str]) -> None:
    offset = 1 if roles[0] in INSTRUCTION_ROLES else 0
    for i, role in enumerate(roles[offset:]):
        expected = "assistant" if i % 2 else "user"
        if role != expected:
            raise BadRow(
                "turn_order", f"roles {roles}: message {i + offset} is {role}, expected {expected}"
            )
    if roles[-1] != "assistant":
        raise BadRow("turn_order", f"roles {roles}: must end with the assistant turn")


class DropLog:
    """Dropped rows by reason, with their row numbers and what was wrong."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[str, str]] = {}  # row -> (reason, detail)

    def add(self, row: int, reason: str, detail: str) -> None:
        """Record that ``row`` was dropped for ``reason``."""
        self._entries[row] = (reason, detail)

    def merge(self, other: DropLog) -> None:
        """Add every row of ``other`` to this log."""
        self._entries.update(other._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def first(self) -> tuple[int, str, str] | None:
        """``(row, reason, detail)`` of the lowest-numbered dropped row, if any."""
        if not self._entries:
            return None
        row = min(self._entries)
        return (row, *self._entries[row])

    def to_dict(self) -> dict[str, dict[str, object]]:
        """``{reason: {"count": n, "rows": [sorted row numbers]}}``, reasons in REASONS order."""
        by_reason: dict[str, list[int]] = {}
        for row, (reason, _) in sorted(self._entries.items()):
            by_reason.setdefault(reason, []).append(row)
        return {
            reason: {"count": len(by_reason[reason]), "rows": by_reason[reason]}
            for reason in REASONS
            if reason in by_reason
        }
