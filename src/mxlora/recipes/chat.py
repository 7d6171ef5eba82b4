"""``mxlora chat``: Harmony generation with gpt-oss, the reply split into analysis and final.

The prompt is rendered as in training (:func:`mxlora.data.render.generation_prompt`: the system
message with the pinned date and the reasoning effort, the seed's ``reasoning language: X``
instruction as the developer message, the user message, then ``<|start|>assistant``). Generation
stops on gpt-oss's stop tokens (:data:`STOP_TOKEN_IDS`) or after ``max_new_tokens``. The
completion is parsed with openai-harmony's ``parse_messages_from_completion_tokens``; anything
that is not a complete, well-formed Harmony answer (a tiny random model's output, a reply cut
at ``max_new_tokens``, no ``final`` message) is reported raw with ``valid: false`` and the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from mxlora.config import ConfigError, ModelConfig
from mxlora.data.render import generation_prompt
from mxlora.data.spec import DataConfig
from mxlora.data.validate import Message
from mxlora.model.load import ModelLoadError, load_model
from mxlora.model.tokenizer import CALL, ENDOFTEXT, RETURN, harmony_encoding
from mxlora.recipes.merge import MergeError, attach_adapter, check_adapter_dir

#: Tokens that end generation: ``eos_token_id`` of openai/gpt-oss-20b's generation_config.json
#: (``[200002 <|return|>, 199999 <|endoftext|>]``) plus ``<|call|>`` (200012), which with
#: ``<|return|>`` is openai-harmony's ``stop_tokens_for_assistant_actions()``. ``<|end|>`` is not
#: one: it closes the analysis message and the final message follows.
STOP_TOKEN_IDS: tuple[int, ...] = (RETURN, CALL, ENDOFTEXT)
# The assistant channels of the Harmony system message ("# Valid channels: ...").
CHANNELS = ("analysis", "commentary", "final")
# The seed notebook's generation settings: max_new_tokens=512, do_sample=True, temperature=0.6.
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TEMPERATURE = 0.6


def conversation(prompt: str, reasoning_language: str | None = None) -> list[Message]:
    """The messages of one chat turn: the seed's instruction (if any) and the user's prompt.

    The seed sends ``reasoning language: German`` as the system message; gpt-oss's template (and
    our renderer) turns it into the developer instructions.
    """
    messages: list[Message] = []
    if reasoning_language:
        messages.append(
            {
                "role": "system",
                "content": f"reasoning language: {reasoning_language}",
                "thinking": None,
            }
        )
    messages.append({"role": "user", "content": prompt, "thinking": None})
    return messages


def prompt_ids(
    tokenizer: Any, prompt: str, reasoning_language: str | None = None, effort: str = "medium"
) -> list[int]:
    """Token ids of the Harmony generation prompt, ending in ``<|start|>assistant``.

    Raises:
        ValueError: ``effort`` is not low, medium or high.
    """
    text = generation_prompt(
        conversation(prompt, reasoning_language), DataConfig(reasoning_effort=effort)
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reply(
    tokens: Sequence[int],
    raw: str,
    reason: str | None,
    analysis: str | None = None,
    final: str | None = None,
) -> dict[str, Any]:
    stop = tokens[-1] if tokens and tokens[-1] in STOP_TOKEN_IDS else None
    return {
        "analysis": analysis,
        "final": final,
        "raw": raw,
        "valid": reason is None,
        "reason": reason,
        "stop": harmony_encoding().decode([stop]) if stop is not None else None,
        "new_tokens": len(tokens),
    }


def parse_completion(tokens: Sequence[int]) -> dict[str, Any]:
    """Split generated tokens (after ``<|start|>assistant``) into analysis and final.

    Returns:
        ``{"analysis", "final", "raw", "valid", "reason", "stop", "new_tokens"}``: the analysis
        and final texts (``None`` when absent; several messages of a channel are joined by a
        blank line), the whole completion decoded with its special tokens, whether it is a
        complete Harmony answer, why not (``None`` when valid), the stop token that ended it
        (``None`` if cut at ``max_new_tokens``) and the number of tokens.
    """
    from openai_harmony import HarmonyError, Role

    tokens = list(tokens)
    encoding = harmony_encoding()
    raw = encoding.decode(tokens)
    # The parser knows <|return|> and <|call|>; <|endoftext|> would be read as content.
    body = tokens[:-1] if tokens and tokens[-1] == ENDOFTEXT else tokens
    try:
        messages = encoding.parse_messages_from_completion_tokens(body, Role.ASSISTANT)
    except HarmonyError as e:
        return _reply(tokens, raw, f"not Harmony: {e}")
    texts: dict[str, list[str]] = {channel: [] for channel in CHANNELS}
    reason = None
    for m in messages:
        if m.author.role != Role.ASSISTANT or m.channel not in CHANNELS:
            reason = f"not Harmony: a {m.author.role.value} message on channel {m.channel!r}"
        else:
            texts[m.channel].append("".join(c.text for c in m.content))
    analysis = "\n\n".join(texts["analysis"]) or None
    final = "\n\n".join(texts["final"]) or None
    if reason is None:
        if not tokens or tokens[-1] not in STOP_TOKEN_IDS:
            reason = "cut at max_new_tokens before a stop token"
        elif tokens[-1] == ENDOFTEXT:
            reason = "ended with <|endoftext|> instead of <|return|>"
        elif final is None:
            reason = "no final-channel message"
    return _reply(tokens, raw, reason, analysis, final)


class TokenPrinter(BaseStreamer):
    """Print a completion as ``generate`` makes it, token by token, in the raw Harmony text
    (special tokens such as ``<|channel|>`` shown, as in the reply's ``raw``).

    A character split over several tokens (an emoji, a rare CJK character) decodes to U+FFFD
    until its last byte arrives, so text ending in U+FFFD is held back until it completes.

    Args:
        out: where to print (flushed after each piece).
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tokens: list[int] = []
        self.printed = 0  # characters of the decoded completion already printed
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = harmony_encoding().decode(self.tokens)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self) -> None:
        self._write(harmony_encoding().decode(self.tokens))  # whatever is left, as decoded
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    ids: Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    stop_token_ids: Sequence[int] = STOP_TOKEN_IDS,
    streamer: BaseStreamer | None = None,
) -> list[int]:
    """Generate after ``ids`` until a stop token or ``max_new_tokens``; return the new tokens.

    ``temperature`` 0 decodes greedily; above 0 it samples from the whole distribution (no
    top-k/top-p cut), reproducibly from ``seed`` without touching the caller's RNG state.
    A ``streamer`` (e.g. :class:`TokenPrinter`) receives the tokens as they are made.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        # top_k=0 / top_p=1.0 switch off transformers' default top-k 50 cut.
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_token_ids),
            pad_token_id=ENDOFTEXT,
            streamer=streamer,
            **sampling,
        )
    return out[0, input_ids.shape[1] :].tolist()


class ChatModel:
    """A model (and optional adapter) loaded once, for several prompts.

    Args:
        model: Hub id, folder or ``tiny[:...]`` (as ``model.name_or_path`` in configs).
        adapter: PEFT LoRA adapter folder applied on top (not merged).
        device: where to run (default: the first GPU, else the CPU).

    Raises:
        ModelLoadError: unreadable or non-gpt-oss model.
        MergeError: unreadable adapter, or one made for another model.
    """

    def __init__(
        self, model: str, adapter: str | None = None, device: torch.device | str | None = None
    ):
        if adapter is not None:
            check_adapter_dir(adapter)  # fail before the (long) model load
        self.model, self.tokenizer = load_model(
            # Inference on the dequantized model, where PEFT applies any adapter as usual.
            ModelConfig(name_or_path=model, experts="dequantize-bf16"),
            device,
        )
        if adapter is not None:
            self.model = attach_adapter(self.model, adapter)
        self.model.eval()

    def ask(
        self,
        prompt: str,
        reasoning_language: str | None = None,
        effort: str = "medium",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int = 0,
        stream: TextIO | None = None,
    ) -> dict[str, Any]:
        """One turn: render the prompt, generate, parse (see :func:`parse_completion`).

        With ``stream``, the raw completion is also printed there as it is generated.
        """
        ids = prompt_ids(self.tokenizer, prompt, reasoning_language, effort)
        streamer = TokenPrinter(stream) if stream is not None else None
        tokens = generate(self.model, ids, max_new_tokens, temperature, seed, streamer=streamer)
        return parse_completion(tokens)


def chat(
    model: str,
    prompt: str,
    adapter: str | None = None,
    reasoning_language: str | None = None,
    effort: str = "medium",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Load ``model`` (+ ``adapter``), answer ``prompt`` once, return the parsed reply.

    Returns:
        ``{"analysis", "final", "raw", "valid", "reason", "stop", "new_tokens"}`` as
        :func:`parse_completion` describes.
    """
    session = ChatModel(model, adapter, device)
    return session.ask(prompt, reasoning_language, effort, max_new_tokens, temperature, seed)


def format_reply(reply: dict[str, Any], show_raw: bool = True) -> str:
    """The reply as labelled sections: analysis, final, and the raw text when not valid
    (only the reason with ``show_raw=False``, when the raw text was streamed already)."""
    parts = []
    if reply["analysis"] is not None:
        parts.append(f"=== analysis ===\n{reply['analysis']}")
    if reply["final"] is not None:
        parts.append(f"=== final ===\n{reply['final']}")
    if not reply["valid"]:
        why = f"not a valid Harmony answer: {reply['reason']}"
        parts.append(
            f"=== raw output ({why}) ===\n{reply['raw']}" if show_raw else f"=== {why} ==="
        )
    return "\n".join(parts)


def _print_reply(reply: dict[str, Any], as_json: bool, out: TextIO, streamed: bool = False) -> None:
    if as_json:
        text = json.dumps(reply, ensure_ascii=False)
    else:
        text = format_reply(reply, show_raw=not streamed)
    print(text, file=out, flush=True)


def _repl(session: ChatModel, args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """One prompt per stdin line, each answered as a fresh conversation, until end of input."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("one prompt per line, each a new conversation; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            _ask_and_print(session, line.strip(), args, settings)


def _ask_and_print(
    session: ChatModel, prompt: str, args: argparse.Namespace, settings: dict[str, Any]
) -> None:
    """One turn on the console; with ``--stream`` the raw completion is printed as it comes,
    then the parsed sections."""
    stream = sys.stdout if args.stream else None
    if stream is not None:
        print("=== generating ===", file=stream, flush=True)
    reply = session.ask(prompt, **settings, stream=stream)
    _print_reply(reply, args.json, sys.stdout, streamed=args.stream)


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora chat --model M [--adapter A] [--prompt P] ...``; reads stdin without --prompt."""
    if args.max_new_tokens < 1 or args.temperature < 0:
        print(
            "mxlora chat: error: --max-new-tokens must be >= 1, --temperature >= 0", file=sys.stderr
        )
        return 2
    if args.stream and args.json:
        print("mxlora chat: error: --stream prints text; leave out --json", file=sys.stderr)
        return 2
    try:
        session = ChatModel(args.model, args.adapter)
    except (ModelLoadError, MergeError, ConfigError) as e:
        print(f"mxlora chat: error: {e}", file=sys.stderr)
        return 2
    settings = {
        "reasoning_language": args.reasoning_language,
        "effort": args.effort,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.prompt is not None:
        _ask_and_print(session, args.prompt, args, settings)
    else:
        _repl(session, args, settings)
    return 0
