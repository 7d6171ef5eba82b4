"""The offline gpt-oss tokenizer: byte-identical to the Hub's, and agreeing with openai-harmony
and tiktoken (two independent implementations) token for token on real and hand-made text."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mxlora.model import tokenizer as T

# Hand-written text set: scripts, emoji sequences, code, whitespace and digit runs, the places
# where pre-tokenizer regexes and byte-level BPE implementations tend to disagree.
HANDMADE_TEXTS = [
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "مرحبا بالعالم! هذا نص عربي مع أرقام ١٢٣٤٥ و 67890.",
    "नमस्ते दुनिया, यह हिन्दी में लिखा गया वाक्य है।",
    "Grüße aus Köln: Äpfel, Öl, Übermaß und die Straße.",
    "Ελληνικά και Русский текст, ÇĞİÖŞÜ çğıöşü.",
    "Family: 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵, skin tones 👍🏽👋🏿, keycap 1️⃣, ❤️‍🔥 and 🏳️‍🌈.",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n",
    "for (int i = 0; i < n; ++i) {\r\n    a[i] = b[i] << 3;\r\n}\r\n",
    "    leading spaces, trailing spaces    ",
    "\n\n\nblank lines\n\n  \n\t\n",
    "3141592653589793238462643383279502884197169399375105820974944592307816406286",
    "1,000,000.00 vs 1000000 vs 0.000001 vs 1e-9 vs 12:34:56 vs 2024-06-01",
    "I'm sure they'll say you've DONE IT'S WHAT WE'D do, isn't it?",
    "URLs https://example.com/a/b?c=d&e=f#g and paths /usr/local/bin/ and C:\\Windows\\",
    "Mixed: naïve café résumé coöperate façade 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ𝔢𝔩𝔩𝔬 ∑∫∂√∞ ≤≥≠",
    "Zero-width: a\u200bb\u200cc\u200dd\ufeffe and combining e\u0301 a\u0308 n\u0303.",
    "tabs\tand\t\ttabs\t\t\tand a NUL-free control \x07 bell",
    " ",
    "",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _real_texts(shared_data: Path) -> list[str]:
    texts = []
    for row in _jsonl(shared_data / "english_quotes.jsonl"):
        texts += [row["quote"], row["author"], ", ".join(row["tags"])]
    for row in _jsonl(shared_data / "gsm8k_test.jsonl"):
        texts += [row["question"], row["answer"]]
    for row in _jsonl(shared_data / "multilingual_thinking_sample4.jsonl"):
        texts += [m.get("content") or "" for m in row["messages"]]
        texts += [m.get("thinking") or "" for m in row["messages"]]
    return texts


def test_ranks_file_is_openais(tmp_path):
    path = T.write_o200k_ranks(tmp_path / "o200k_base.tiktoken")
    assert _sha256(path) == T.O200K_BASE_SHA256
    lines = path.read_bytes().splitlines()
    assert len(lines) == T.N_RANKS
    assert lines[0] == b"IQ== 0"  # rank 0 is the byte "!"
    assert lines[-1].endswith(b" 199997")


def test_ranks_mismatch_raises_clearly(monkeypatch, tmp_path):
    import quicktok

    real = quicktok.get_encoding("o200k_base")

    class OneRankOff:
        def decode_single_token_bytes(self, rank: int) -> bytes:
            return b"?" if rank == 1000 else real.decode_single_token_bytes(rank)

    monkeypatch.setattr(quicktok, "get_encoding", lambda name: OneRankOff())
    with pytest.raises(RuntimeError, match="expected OpenAI's 446a9538"):
        T.write_o200k_ranks(tmp_path / "bad.tiktoken")
    assert not (tmp_path / "bad.tiktoken").exists()


def test_tokenizer_json_is_the_hubs(tokenizer_dir):
    path = tokenizer_dir / "tokenizer.json"
    assert path.stat().st_size == T.TOKENIZER_JSON_SIZE == 27_868_174
    assert _sha256(path) == T.TOKENIZER_JSON_SHA256


def test_specials_at_hub_ids(tokenizer):
    assert len(T.SPECIAL_TOKENS) == 21
    assert sorted(T.SPECIAL_TOKENS.values()) == list(range(199998, 200019))
    named = {
        "<|startoftext|>": T.STARTOFTEXT,
        "<|endoftext|>": T.ENDOFTEXT,
        "<|return|>": T.RETURN,
        "<|constrain|>": T.CONSTRAIN,
        "<|channel|>": T.CHANNEL,
        "<|start|>": T.START,
        "<|end|>": T.END,
        "<|message|>": T.MESSAGE,
        "<|call|>": T.CALL,
        "<|endofprompt|>": T.ENDOFPROMPT,
    }
    assert named == {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|endofprompt|>": 200018,
    }
    assert all(T.SPECIAL_TOKENS[tok] == i for tok, i in named.items())
    for tok, i in T.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(tok) == i
        assert tokenizer.convert_ids_to_tokens(i) == tok
        assert tokenizer.encode(tok, add_special_tokens=False) == [i]
    assert len(tokenizer) == 200019
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        T.STARTOFTEXT,
        T.RETURN,
        T.ENDOFTEXT,
    )


def test_naive_special_dict_misplaces_ids(tmp_path):
    """tiktoken's own o200k_harmony specials dict has the right ids, but the converter ignores
    them and appends the keys in dict order, so '<|endoftext|>' (first key) lands on 199998."""
    ranks = T.write_o200k_ranks(tmp_path / "o200k_base.tiktoken")
    tiktoken_specials = T.tiktoken_encoding()._special_tokens
    assert tiktoken_specials["<|endoftext|>"] == 199999

    naive = T.convert_tiktoken(ranks, list(tiktoken_specials))
    assert naive.token_to_id("<|endoftext|>") == 199998
    wrong = {t: naive.token_to_id(t) for t, i in T.SPECIAL_TOKENS.items()}
    assert sum(wrong[t] != i for t, i in T.SPECIAL_TOKENS.items()) >= 19


def _hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _assert_all_equal(tokenizer, texts: list[str]) -> None:
    hf = _hf_ids(tokenizer, texts)
    tk = T.tiktoken_encoding().encode_ordinary_batch(texts)
    harmony = T.harmony_encoding()
    # disallowed_special=() skips harmony's per-call special-token scan (40x faster); the
    # texts hold no special-token strings, or the HF ids (which would have specials) differ.
    hm = [harmony.encode(t, disallowed_special=()) for t in texts]
    for text, a, b, c in zip(texts, hf, tk, hm, strict=True):
        assert a == b == c, text
    assert sum(map(len, hf)) > len(texts)  # not vacuous: real tokens came out


def test_ids_equal_references_on_real_data(tokenizer, shared_data):
    texts = _real_texts(shared_data)
    assert len(texts) == 2508 * 3 + 1319 * 2 + sum(
        2 * len(r["messages"]) for r in _jsonl(shared_data / "multilingual_thinking_sample4.jsonl")
    )
    _assert_all_equal(tokenizer, texts)


def test_ids_equal_references_on_handmade_text(tokenizer):
    _assert_all_equal(tokenizer, HANDMADE_TEXTS)
    # decoding gives the text back, bytes for bytes
    for text, ids in zip(HANDMADE_TEXTS, _hf_ids(tokenizer, HANDMADE_TEXTS), strict=True):
        assert tokenizer.decode(ids) == text


def test_special_strings_encode_as_specials_when_allowed(tokenizer):
    text = (
        "<|start|>user<|message|>What is 2+2?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Easy.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.calc <|constrain|>json"
        '<|message|>{"x": 1}<|call|>'
        "<|start|>assistant<|channel|>final<|message|>4<|return|>"
        "<|startoftext|><|endoftext|><|reserved_200000|><|reserved_200017|>"
    )
    hf = _hf_ids(tokenizer, [text])[0]
    assert hf == T.tiktoken_encoding().encode(text, allowed_special="all")
    assert hf == T.harmony_encoding().encode(text, allowed_special="all")
    assert [i for i in hf if i >= 199998] == [
        T.START, T.MESSAGE, T.END,
        T.START, T.CHANNEL, T.MESSAGE, T.END,
        T.START, T.CHANNEL, T.CONSTRAIN, T.MESSAGE, T.CALL,
        T.START, T.CHANNEL, T.MESSAGE, T.RETURN,
        T.STARTOFTEXT, T.ENDOFTEXT, 200000, 200017,
    ]  # fmt: skip
    # not allowed: the references encode them as ordinary text
    plain = T.tiktoken_encoding().encode_ordinary("<|start|>")
    assert len(plain) > 1 and max(plain) < T.N_RANKS


def test_endofprompt_is_reserved_in_harmony(tokenizer):
    """Id 200018 is '<|endofprompt|>' on the Hub and in tiktoken, but openai-harmony calls it
    '<|reserved_200018|>' (and encodes '<|endofprompt|>' as plain text). Same id, other name."""
    assert tokenizer.encode("<|endofprompt|>", add_special_tokens=False) == [T.ENDOFPROMPT]
    assert T.tiktoken_encoding().encode("<|endofprompt|>", allowed_special="all") == [200018]
    harmony = T.harmony_encoding()
    assert harmony.decode([T.ENDOFPROMPT]) == "<|reserved_200018|>"
    assert harmony.encode("<|reserved_200018|>", allowed_special="all") == [T.ENDOFPROMPT]
    assert harmony.encode("<|endofprompt|>", allowed_special="all") == (
        T.tiktoken_encoding().encode_ordinary("<|endofprompt|>")
    )


def test_tokenizer_config_matches_hub(tokenizer_dir, shared_data):
    hub_path = shared_data / "gpt-oss-20b" / "tokenizer_config.json"
    hub = json.loads(hub_path.read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        assert T.TOKENIZER_CONFIG[key] == hub[key]
    assert {k: v for k, v in hub.items() if k != "added_tokens_decoder"} == T.TOKENIZER_CONFIG
    assert {v["content"]: int(k) for k, v in hub["added_tokens_decoder"].items()} == (
        T.SPECIAL_TOKENS
    )
    # what we write is the Hub file byte for byte
    assert (tokenizer_dir / "tokenizer_config.json").read_bytes() == hub_path.read_bytes()


def test_chat_template_is_gpt_oss(tokenizer_dir, shared_data):
    path = tokenizer_dir / "chat_template.jinja"
    assert _sha256(path) == T.CHAT_TEMPLATE_SHA256
    assert path.read_bytes() == (shared_data / "gpt-oss-20b" / "chat_template.jinja").read_bytes()


def test_autotokenizer_loads_offline_with_template(tokenizer_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        tokenize=True,
        return_dict=False,
    )
    text = tok.decode(ids)
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final"
                         "<|message|>Hello!<|return|>")  # fmt: skip
    assert ids[-1] == T.RETURN and ids.count(T.START) == 3  # system, user, assistant


def test_ensure_tokenizer_reuses_complete_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MXLORA_CACHE", str(tmp_path))
    final = tmp_path / "tokenizer" / "gpt-oss"
    final.mkdir(parents=True)
    for name in T.TOKENIZER_FILES:
        (final / name).write_text("theirs")

    def no_build(out_dir):
        raise AssertionError("rebuilt a complete cached folder")

    monkeypatch.setattr(T, "build_tokenizer", no_build)
    assert T.ensure_tokenizer() == final


def test_ensure_tokenizer_loses_race_cleanly(monkeypatch, tmp_path):
    """Another process renames its complete folder into place while we build: we use theirs
    and leave no temp folder behind."""
    monkeypatch.setenv("MXLORA_CACHE", str(tmp_path))
    final = tmp_path / "tokenizer" / "gpt-oss"

    def racing_build(out_dir: Path) -> Path:
        other = tmp_path / "tokenizer" / ".other"
        other.mkdir()
        for name in T.TOKENIZER_FILES:
            (other / name).write_text("theirs")
            (out_dir / name).write_text("ours")
        other.rename(final)  # the other worker wins
        return out_dir

    monkeypatch.setattr(T, "build_tokenizer", racing_build)
    assert T.ensure_tokenizer() == final
    assert {p.read_text() for p in final.iterdir()} == {"theirs"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["gpt-oss"]


def test_cli_make_tokenizer_reproduces_cache(tmp_path, tokenizer_dir):
    from mxlora.cli import main

    out = tmp_path / "tok"
    assert main(["make-tokenizer", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(T.TOKENIZER_FILES)
    for name in T.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
