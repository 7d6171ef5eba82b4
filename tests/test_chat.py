"""``mxlora chat``: Harmony prompt, stop tokens, parsing into analysis/final, CLI output."""

from __future__ import annotations

import io
import json

import peft
import pytest
import torch
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)
from transformers import AutoModelForCausalLM, GptOssConfig

from mxlora.cli import main
from mxlora.data.spec import DEFAULT_DATE
from mxlora.model.tiny import TinySpec, ensure_tiny, tiny_config
from mxlora.model.tokenizer import CALL, END, ENDOFTEXT, RETURN, harmony_encoding
from mxlora.recipes.chat import (
    STOP_TOKEN_IDS,
    ChatModel,
    format_reply,
    generate,
    parse_completion,
    prompt_ids,
)

# One worker runs the whole module, so its module-scoped model fixtures are built once.
pytestmark = pytest.mark.xdist_group("chat")

REPLY_KEYS = {"analysis", "final", "raw", "valid", "reason", "stop", "new_tokens"}


def _tokens(text: str) -> list[int]:
    return harmony_encoding().encode(text, allowed_special="all")


# --- stop tokens and parsing (no model) -------------------------------------------------------


def test_stop_tokens_are_gpt_oss_generation_config_plus_call(shared_data):
    generation = json.loads((shared_data / "gpt-oss-20b" / "generation_config.json").read_text())
    harmony_stops = harmony_encoding().stop_tokens_for_assistant_actions()
    assert set(STOP_TOKEN_IDS) == set(generation["eos_token_id"]) | set(harmony_stops)
    assert set(STOP_TOKEN_IDS) == {RETURN, CALL, ENDOFTEXT}
    assert END not in STOP_TOKEN_IDS  # <|end|> closes the analysis; the final message follows


def test_parse_analysis_and_final():
    reply = parse_completion(
        _tokens(
            "<|channel|>analysis<|message|>Der Nutzer fragt nach 2+2.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
        )
    )
    assert set(reply) == REPLY_KEYS
    assert reply["analysis"] == "Der Nutzer fragt nach 2+2."
    assert reply["final"] == "2 + 2 = 4."
    assert reply["valid"] and reply["reason"] is None
    assert reply["stop"] == "<|return|>"
    assert reply["raw"].endswith("<|channel|>final<|message|>2 + 2 = 4.<|return|>")


def test_parse_final_only():
    reply = parse_completion(_tokens("<|channel|>final<|message|>Hallo!<|return|>"))
    assert (reply["analysis"], reply["final"], reply["valid"]) == (None, "Hallo!", True)


@pytest.mark.parametrize(
    ("text", "analysis", "final", "reason"),
    [
        # Cut by max_new_tokens inside the analysis: what there is is kept, but not valid.
        ("<|channel|>analysis<|message|>Ich denke", "Ich denke", None, "cut at max_new_tokens"),
        ("Hello there, no header at all", None, None, "not Harmony: Unexpected EOS"),
        (
            "<|channel|>final<|message|>Hallo<|endoftext|>",
            None,
            "Hallo",
            "ended with <|endoftext|>",
        ),
        ("<|channel|>weird<|message|>x<|return|>", None, None, "on channel 'weird'"),
        ("<|channel|>analysis<|message|>hm<|return|>", "hm", None, "no final-channel message"),
        (
            "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
            None,
            None,
            "no final-channel message",
        ),
    ],
    ids=["truncated", "garbage", "endoftext", "unknown-channel", "no-final", "tool-call"],
)
def test_parse_invalid_output_is_reported_raw(text, analysis, final, reason):
    tokens = _tokens(text)
    reply = parse_completion(tokens)
    assert not reply["valid"]
    assert (
        reply["reason"].startswith(reason)
        if reason.startswith("not")
        else reason in reply["reason"]
    )
    assert (reply["analysis"], reply["final"]) == (analysis, final)
    assert reply["raw"] == text and reply["new_tokens"] == len(tokens)
    shown = format_reply(reply)
    assert "=== raw output (not a valid Harmony answer: " in shown and shown.endswith(text)


def test_parse_ids_outside_the_harmony_vocabulary():
    # A tiny random model can emit any of its 201,088 ids; the vocabulary ends at 200,018.
    reply = parse_completion([201_000, 200_500, 17])
    assert not reply["valid"] and reply["raw"].startswith("<|reserved_201000|>")
    assert parse_completion([])["reason"].startswith("not Harmony")


def test_format_reply_labels_the_channels():
    reply = parse_completion(
        _tokens(
            "<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>final"
            "<|message|>B<|return|>"
        )
    )
    assert format_reply(reply) == "=== analysis ===\nA\n=== final ===\nB"


# --- the prompt -------------------------------------------------------------------------------


def _harmony_prompt(user: str, language: str | None, effort: str) -> list[int]:
    system = (
        SystemContent.new()
        .with_conversation_start_date(DEFAULT_DATE)
        .with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    )
    messages = [Message.from_role_and_content(Role.SYSTEM, system)]
    if language is not None:
        developer = DeveloperContent.new().with_instructions(f"reasoning language: {language}")
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    messages.append(Message.from_role_and_content(Role.USER, user))
    return harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(messages), Role.ASSISTANT
    )


@pytest.mark.parametrize(
    ("language", "effort"), [("German", "medium"), (None, "low"), ("Français", "high")]
)
def test_prompt_ids_equal_openai_harmony(tokenizer, language, effort):
    user = "Wie viele „r“ hat das Wort Erdbeere? Antworte kurz 🍓"
    ids = prompt_ids(tokenizer, user, language, effort)
    assert ids == _harmony_prompt(user, language, effort)
    assert ids[-2:] == _tokens("<|start|>assistant")


# --- generation on the tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(ensure_tiny())


@pytest.fixture(scope="module")
def session(tiny_dir) -> ChatModel:
    return ChatModel(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def ids(session) -> list[int]:
    return prompt_ids(session.tokenizer, "What is 2+2?", "German")


def test_generation_stops_at_max_new_tokens(session, ids):
    out = generate(session.model, ids, max_new_tokens=8, temperature=0)
    assert len(out) == 8 and not set(out) & set(STOP_TOKEN_IDS)
    assert generate(session.model, ids, max_new_tokens=3, temperature=0) == out[:3]  # greedy
    sampled = generate(session.model, ids, max_new_tokens=4, temperature=1.0, seed=1)
    assert generate(session.model, ids, max_new_tokens=4, temperature=1.0, seed=1) == sampled
    assert generate(session.model, ids, max_new_tokens=4, temperature=1.0, seed=2) != sampled


@pytest.mark.parametrize("token", [RETURN, CALL, ENDOFTEXT, END])
def test_generation_stops_on_gpt_oss_stop_tokens(session, ids, token):
    """Make ``token`` the greedy first choice: a stop token ends generation right there,
    ``<|end|>`` (which closes an analysis message) does not."""
    head = session.model.lm_head.weight
    with torch.no_grad():
        hidden = session.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        first = int((hidden @ head.T).argmax())
        assert float(hidden @ head[first]) > 0  # so doubling its row makes a clear winner
        saved = head[token].clone()
        head[token] = 2 * head[first]
    try:
        out = generate(session.model, ids, max_new_tokens=6, temperature=0)
    finally:
        with torch.no_grad():
            head[token] = saved
    assert out[0] == token
    assert len(out) == (6 if token == END else 1)


def test_cli_json_schema_and_same_reply_as_the_api(session, tiny_dir, capsys):
    args = ["chat", "--model", tiny_dir, "--prompt", "What is 2+2?", "--reasoning-language"]
    args += ["German", "--max-new-tokens", "7", "--temperature", "0", "--json"]
    assert main(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    reply = json.loads(line)
    assert set(reply) == REPLY_KEYS
    assert isinstance(reply["raw"], str) and isinstance(reply["valid"], bool)
    assert reply["new_tokens"] == 7 and reply["stop"] is None
    assert not reply["valid"] and reply["reason"]  # a random tiny model does not speak Harmony
    expected = session.ask("What is 2+2?", "German", max_new_tokens=7, temperature=0, seed=0)
    assert reply == expected


def test_cli_reads_prompts_from_stdin(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\n"))
    args = ["chat", "--model", tiny_dir, "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("=== raw output (not a valid Harmony answer: ") == 2


def _random_adapter(path) -> None:
    """A PEFT adapter with random non-zero B for the tiny model's shapes (on a fresh copy)."""
    raw = tiny_config(TinySpec(mxfp4=False))
    model = AutoModelForCausalLM.from_config(GptOssConfig(**raw), dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(path)


def test_adapter_is_applied(session, tiny_dir, ids, tmp_path):
    _random_adapter(tmp_path / "adapter")
    adapted = ChatModel(tiny_dir, adapter=str(tmp_path / "adapter"), device="cpu")
    x = torch.tensor([ids])
    with torch.no_grad():
        plain, tuned = session.model(input_ids=x).logits, adapted.model(input_ids=x).logits
    assert (plain - tuned).abs().max().item() > 1e-2


def test_bad_adapter_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    assert main(["chat", "--model", tiny_dir, "--adapter", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mxlora chat: error: adapter {tmp_path / 'broken'}: no adapter_config.json " + (
        "(not a PEFT adapter folder)"
    )


# --- --stream ---------------------------------------------------------------------------------


def test_token_printer_prints_each_token_and_holds_back_split_characters():
    """A character split over tokens prints only once complete; the whole equals decode()."""
    from mxlora.recipes.chat import TokenPrinter

    text = "<|channel|>final<|message|>🦜 ok🦩<|return|>"
    tokens = _tokens(text)
    out = io.StringIO()
    printer = TokenPrinter(out)
    printer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    seen = []
    for t in tokens:
        printer.put(torch.tensor([t]))
        seen.append(out.getvalue())
    printer.end()
    assert out.getvalue() == text + "\n"
    assert all("\ufffd" not in s for s in seen)
    assert len(set(seen)) < len(tokens)  # the emoji's partial tokens printed nothing new
    assert seen[0] == "<|channel|>"  # the first token is printed before the rest exists


def test_cli_stream_prints_the_completion_as_generated(session, tiny_dir, capsys, monkeypatch):
    from mxlora.recipes import chat as chat_module

    puts = []
    original = chat_module.TokenPrinter.put

    def counting_put(self, value):
        puts.append(value.numel())
        original(self, value)

    monkeypatch.setattr(chat_module.TokenPrinter, "put", counting_put)
    args = ["chat", "--model", tiny_dir, "--prompt", "What is 2+2?", "--max-new-tokens", "6"]
    assert main([*args, "--temperature", "0", "--stream"]) == 0
    out = capsys.readouterr().out
    reply = session.ask("What is 2+2?", max_new_tokens=6, temperature=0, seed=0)
    assert out.startswith(f"=== generating ===\n{reply['raw']}\n")
    assert out.endswith(f"=== not a valid Harmony answer: {reply['reason']} ===\n")
    assert puts[1:] == [1] * 6  # after the prompt, one token at a time
    assert main([*args, "--stream", "--json"]) == 2


def test_version_is_the_packages():
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run(
        [sys.executable, "-m", "mxlora.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == f"mxlora {version}\n"
