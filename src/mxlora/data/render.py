"""Conversations -> gpt-oss token ids and the loss mask, in the Harmony format.

Two renderers, chosen per run by ``data.render`` (never mixed within a run):

``harmony`` (default) builds the Harmony text itself and tokenizes it with the gpt-oss tokenizer.
Its ids equal openai-harmony's ``render_conversation_for_training`` with
``RenderConversationConfig(auto_drop_analysis=False)`` on the same conversation
(:func:`to_harmony_conversation` builds that conversation; the tests compare on real data)::

    <|start|>system<|message|>{identity}
    Knowledge cutoff: 2024-06
    Current date: {date}

    Reasoning: {effort}

    # Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
    <|start|>developer<|message|># Instructions

    {instructions}<|end|>
    <|start|>user<|message|>{user}<|end|>
    <|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>
    <|start|>assistant<|channel|>final<|message|>{content}<|return|>

(no line breaks between messages). The system message comes from the config (date pinned,
never the clock); a leading ``system`` or ``developer`` message of the data becomes the
developer instructions (the developer message is left out when there is none).

``chat-template`` runs ``tokenizer.apply_chat_template`` with TRL's ``gptoss_training.jinja``
(the Hub's gpt-oss template plus ``{% generation %}`` marks), its one clock read
``strftime_now("%Y-%m-%d")`` replaced by the configured date. Its only difference from
``harmony``: when there are developer instructions, the Hub template ends them with a blank
line (``{instructions}\\n\\n<|end|>``), openai-harmony does not. Without instructions both give
the same ids.

Which tokens carry loss (both renderers): the *last* assistant turn, from its first
``<|start|>assistant`` through the closing ``<|return|>``, thinking (analysis) included.
Earlier assistant turns are context: rendered as final-channel messages ending in ``<|end|>``,
their thinking left out, exactly as gpt-oss sees a past turn at inference (the Hub template and
openai-harmony drop earlier analysis the same way), and carry no loss.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mxlora.data.spec import DataConfig
from mxlora.data.validate import INSTRUCTION_ROLES, Message

# Both the Hub chat template and openai-harmony's SystemContent default write this cutoff.
KNOWLEDGE_CUTOFF = "2024-06"
# The channel line of the Hub template's system message (openai-harmony writes the same for
# its default ChannelConfig.require_channels(["analysis", "commentary", "final"])).
VALID_CHANNELS = (
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)


@dataclass
class Rendered:
    """One rendered row: token ids and the loss mask (1 on the tokens trained on).

    Attributes:
        row: the source row number.
        input_ids: token ids.
        completion_mask: 1 on each token of the trained assistant turn, 0 elsewhere.
        truncated: the row was cut to ``max_len`` (only with ``data.truncate``).
    """

    row: int
    input_ids: list[int]
    completion_mask: list[int]
    truncated: bool = False

    @property
    def prompt_len(self) -> int:
        """Tokens before the trained turn."""
        return self.completion_mask.index(1) if 1 in self.completion_mask else len(self.input_ids)

    @property
    def completion_len(self) -> int:
        """Tokens under loss."""
        return sum(self.completion_mask)


def system_content(cfg: DataConfig) -> str:
    """The Harmony system message's text, from the config only."""
    return (
        f"{cfg.model_identity}\n"
        f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}\n"
        f"Current date: {cfg.date}\n\n"
        f"Reasoning: {cfg.reasoning_effort}\n\n"
        f"{VALID_CHANNELS}"
    )


def split_turns(conv: list[Message]) -> tuple[str | None, list[Message], Message]:
    """``(instructions, context messages, trained assistant message)`` of a checked conversation."""
    instructions = conv[0]["content"] if conv[0]["role"] in INSTRUCTION_ROLES else None
    turns = conv[1:] if instructions is not None else conv
    return instructions, turns[:-1], turns[-1]


def _message(role: str, content: str, channel: str | None = None, end: str = "<|end|>") -> str:
    header = f"<|start|>{role}" + (f"<|channel|>{channel}" if channel else "")
    return f"{header}<|message|>{content}{end}"


def harmony_text(conv: list[Message], cfg: DataConfig) -> tuple[str, str]:
    """The Harmony text of a conversation, split where the loss starts.

    Returns:
        ``(prompt, completion)``: everything before the trained assistant turn, and that turn
        (analysis if it has thinking, then final ending in ``<|return|>``).
    """
    instructions, context, trained = split_turns(conv)
    parts = [_message("system", system_content(cfg))]
    if instructions is not None:
        parts.append(_message("developer", f"# Instructions\n\n{instructions}"))
    for m in context:
        channel = "final" if m["role"] == "assistant" else None
        parts.append(_message(m["role"], m["content"], channel))
    completion = ""
    if trained["thinking"] is not None:
        completion = _message("assistant", trained["thinking"], "analysis")
    completion += _message("assistant", trained["content"], "final", end="<|return|>")
    return "".join(parts), completion


def render_harmony(
    convs: list[list[Message]], rows: list[int], tokenizer: Any, cfg: DataConfig
) -> list[Rendered]:
    """Render conversations with our Harmony renderer (batch tokenization).

    Text is tokenized in pieces that start or end at special tokens, where the tokenizer
    splits anyway, so the ids equal those of the whole text: the system message (the same in
    every row, tokenized once), the rest of the prompt, and the completion.
    """
    system = _message("system", system_content(cfg))
    system_ids = tokenizer(system, add_special_tokens=False)["input_ids"]
    texts = [harmony_text(conv, cfg) for conv in convs]
    rests = [prompt.removeprefix(system) for prompt, _ in texts]
    prompts = tokenizer(rests, add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
    return [
        Rendered(row, system_ids + p + c, [0] * (len(system_ids) + len(p)) + [1] * len(c))
        for row, p, c in zip(rows, prompts, completions, strict=True)
    ]


# The one clock read in the Hub gpt-oss template (its system message's "Current date:" line).
_TEMPLATE_CLOCK = 'strftime_now("%Y-%m-%d")'


def training_chat_template(date: str) -> str:
    """TRL's ``gptoss_training.jinja`` (the Hub gpt-oss template with ``{% generation %}``
    marks), with its clock read replaced by the literal ``date``.

    Replacing the expression in the text (rather than passing a ``strftime_now`` override)
    works on every transformers version: 5.24 turns callables passed to the template into
    placeholder strings.
    """
    text = (
        resources.files("trl").joinpath("chat_templates/gptoss_training.jinja").read_text("utf-8")
    )
    if text.count(_TEMPLATE_CLOCK) != 1:
        raise RuntimeError(f"trl's gptoss_training.jinja no longer reads {_TEMPLATE_CLOCK} once")
    datetime.date.fromisoformat(date)  # a validated date cannot inject template code
    return text.replace(_TEMPLATE_CLOCK, f'"{date}"')


def template_messages(conv: list[Message]) -> list[dict[str, str]]:
    """Messages as the Hub template reads them: ``thinking`` only where there is some (the
    template concatenates it, so a null would fail)."""
    return [{k: v for k, v in m.items() if k != "thinking" or v is not None} for m in conv]


def render_chat_template(
    convs: list[list[Message]], rows: list[int], tokenizer: Any, cfg: DataConfig
) -> list[Rendered]:
    """Render conversations with ``apply_chat_template`` and TRL's gpt-oss training template.

    The mask is the template's ``{% generation %}`` mask restricted to its last span (the last
    assistant turn), the same tokens the ``harmony`` renderer trains on.
    """
    out = tokenizer.apply_chat_template(
        [template_messages(c) for c in convs],
        chat_template=training_chat_template(cfg.date),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        reasoning_effort=cfg.reasoning_effort,
        model_identity=cfg.model_identity,
    )
    return [
        Rendered(row, list(ids), last_span(list(mask)))
        for row, ids, mask in zip(rows, out["input_ids"], out["assistant_masks"], strict=True)
    ]


def last_span(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones: ``[1,1,0,1,1,0]`` -> ``[0,0,0,1,1,0]``."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


def render(
    convs: list[list[Message]], rows: list[int], tokenizer: Any, cfg: DataConfig
) -> list[Rendered]:
    """Render with the renderer ``cfg.render`` names; the loss mask as ``cfg.loss_on`` says."""
    if not convs:
        return []
    if cfg.render == "chat-template":
        rendered = render_chat_template(convs, rows, tokenizer, cfg)
    else:
        rendered = render_harmony(convs, rows, tokenizer, cfg)
    if cfg.loss_on == "all":
        # The seed notebook's loss: TRL's defaults on `messages` rows put every token of the
        # row under loss, the system prompt (with its date) and the user turn included.
        for r in rendered:
            r.completion_mask = [1] * len(r.input_ids)
    return rendered


def to_harmony_conversation(conv: list[Message], cfg: DataConfig):
    """The same conversation as an ``openai_harmony.Conversation`` (the reference renderer's
    input): system content from the config, developer instructions, earlier assistant turns as
    final-only messages, the trained turn as analysis + final.

    Returns:
        an ``openai_harmony.Conversation``; render it with ``render_conversation_for_training``
        and ``RenderConversationConfig(auto_drop_analysis=False)``.
    """
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        ReasoningEffort,
        Role,
        SystemContent,
    )
    from openai_harmony import (
        Message as HarmonyMessage,
    )

    system = (
        SystemContent.new()
        .with_model_identity(cfg.model_identity)
        .with_knowledge_cutoff(KNOWLEDGE_CUTOFF)
        .with_conversation_start_date(cfg.date)
        .with_reasoning_effort(ReasoningEffort(cfg.reasoning_effort.capitalize()))
    )
    instructions, context, trained = split_turns(conv)
    out = [HarmonyMessage.from_role_and_content(Role.SYSTEM, system)]
    if instructions is not None:
        developer = DeveloperContent.new().with_instructions(instructions)
        out.append(HarmonyMessage.from_role_and_content(Role.DEVELOPER, developer))
    for m in context:
        msg = HarmonyMessage.from_role_and_content(Role(m["role"]), m["content"])
        out.append(msg.with_channel("final") if m["role"] == "assistant" else msg)
    if trained["thinking"] is not None:
        analysis = HarmonyMessage.from_role_and_content(Role.ASSISTANT, trained["thinking"])
        out.append(analysis.with_channel("analysis"))
    final = HarmonyMessage.from_role_and_content(Role.ASSISTANT, trained["content"])
    out.append(final.with_channel("final"))
    return Conversation.from_messages(out)


def generation_prompt(conv: list[Message], cfg: DataConfig) -> str:
    """The Harmony text that asks for the next assistant turn (for generation, e.g. ``mxlora chat``).

    Same system/developer/turn rendering as :func:`harmony_text`, then ``<|start|>assistant``: the
    text of openai-harmony's ``render_conversation_for_completion(..., Role.ASSISTANT)``.

    Args:
        conv: optional system/developer instructions, then the turns, ending with a user message.
        cfg: the data config (system message date, reasoning effort, model identity).
    """
    # harmony_text's prompt half is everything before the last (trained) assistant turn; an
    # empty assistant turn stands in for the reply the model is to write.
    placeholder: Message = {"role": "assistant", "content": "", "thinking": None}
    prompt, _ = harmony_text([*conv, placeholder], cfg)
    return prompt + "<|start|>assistant"
