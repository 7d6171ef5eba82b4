"""The gpt-oss tokenizer (``o200k_harmony``), rebuilt offline, byte-identical to the Hub's.

Nothing here reaches the network. The pieces come from installed packages:

* the o200k BPE ranks from ``quicktok-v1`` (its bundled data; quicktok's own *encoder* is not
  used, it differs from tiktoken on some Unicode-17 code points), written as the official
  ``o200k_base.tiktoken`` file and checked against OpenAI's published sha256;
* the ``tokenizer.json`` from transformers' ``TikTokenConverter`` with the o200k pre-tokenizer
  pattern and the 21 Harmony special tokens at the Hub ids; the result is byte-identical to
  ``openai/gpt-oss-20b``'s ``tokenizer.json`` (:data:`TOKENIZER_JSON_SHA256`);
* the chat template from ``trl`` (``trl/chat_templates/gptoss.jinja``, gpt-oss's own template).

Two independent references load the same ranks file offline, for tests and for rendering
Harmony conversations: :func:`harmony_encoding` (``openai-harmony``) and
:func:`tiktoken_encoding` (``tiktoken``'s own ``o200k_harmony`` definition).

Special token ids (the Hub's ``added_tokens_decoder``, also ``tiktoken``'s ``o200k_harmony``):

====================  ======  ==============================================================
name                  id      role in the Harmony format
====================  ======  ==============================================================
``STARTOFTEXT``       199998  ``<|startoftext|>``: the tokenizer's ``bos_token``
``ENDOFTEXT``         199999  ``<|endoftext|>``: the tokenizer's ``pad_token``
``RETURN``            200002  ``<|return|>``: ends the final answer; the ``eos_token``
``CONSTRAIN``         200003  ``<|constrain|>``: marks a tool call's argument format
``CHANNEL``           200005  ``<|channel|>``: precedes analysis/commentary/final
``START``             200006  ``<|start|>``: opens a message (followed by the role)
``END``               200007  ``<|end|>``: closes a message
``MESSAGE``           200008  ``<|message|>``: separates the header from the content
``CALL``              200012  ``<|call|>``: ends a tool call
``ENDOFPROMPT``       200018  ``<|endofprompt|>``
====================  ======  ==============================================================

The other 11 ids in 199998..200018 are ``<|reserved_N|>``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from mxlora.paths import cache_dir

# sha256 of OpenAI's o200k_base.tiktoken: the `expected_hash` in tiktoken_ext/openai_public.py
# and in openai-harmony (which refuses a file that does not match).
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# The file's official address; tiktoken caches it under sha1(url) (see tiktoken/load.py).
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
TIKTOKEN_CACHE_KEY = hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
# Number of BPE ranks in o200k_base (ids 0..199997); specials start right after.
N_RANKS = 199_998

# The Hub's openai/gpt-oss-20b tokenizer.json (and openai/gpt-oss-120b's, the same file).
TOKENIZER_JSON_SHA256 = "0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3"
TOKENIZER_JSON_SIZE = 27_868_174
# trl/chat_templates/gptoss.jinja == the Hub's openai/gpt-oss-20b chat_template.jinja.
CHAT_TEMPLATE_SHA256 = "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146"

# The o200k pre-tokenizer regex, from tiktoken_ext/openai_public.py (o200k_base, shared by
# o200k_harmony). Copied rather than imported: tiktoken only exposes it with loaded ranks.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Named Harmony special token ids (see the module docstring).
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
ENDOFPROMPT = 200018

_NAMED_SPECIALS = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
    ENDOFPROMPT: "<|endofprompt|>",
}
#: All 21 special tokens of the Hub tokenizer, string -> id, in id order (199998..200018).
SPECIAL_TOKENS: dict[str, int] = {
    _NAMED_SPECIALS.get(i, f"<|reserved_{i}|>"): i for i in range(N_RANKS, ENDOFPROMPT + 1)
}

# tokenizer_config.json's top-level entries, as in the Hub's openai/gpt-oss-20b
# tokenizer_config.json (a copy lies in ../shared/data/gpt-oss-20b/; a test compares).
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"
TOKENIZER_CONFIG: dict[str, object] = {
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": False,
    "eos_token": EOS_TOKEN,
    "extra_special_tokens": {},
    "model_input_names": ["input_ids", "attention_mask"],
    # int(1e30): transformers' "no limit" sentinel (VERY_LARGE_INTEGER), as written on the Hub.
    "model_max_length": int(1e30),
    "pad_token": PAD_TOKEN,
    "tokenizer_class": "PreTrainedTokenizerFast",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def o200k_ranks_bytes() -> bytes:
    """The ``o200k_base.tiktoken`` file content (``base64(token) rank`` lines), sha256-checked.

    Raises:
        RuntimeError: the ranks quicktok ships do not give OpenAI's published file.
    """
    import quicktok

    enc = quicktok.get_encoding("o200k_base")
    # By rank, not token_byte_values() (which is sorted by bytes).
    data = b"".join(
        base64.b64encode(enc.decode_single_token_bytes(rank)) + b" %d\n" % rank
        for rank in range(N_RANKS)
    )
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise RuntimeError(
            f"o200k_base ranks from quicktok {quicktok.__version__} have sha256 "
            f"{digest}, expected OpenAI's {O200K_BASE_SHA256}: this quicktok build does not ship "
            "the official o200k_base vocabulary"
        )
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_o200k_ranks(path: Path) -> Path:
    """Write the official ``o200k_base.tiktoken`` to ``path`` (see :func:`o200k_ranks_bytes`).

    Returns:
        ``path``.
    """
    path = Path(path)
    _write_atomic(path, o200k_ranks_bytes())
    return path


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (tiktoken/harmony read them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chat_template() -> str:
    """gpt-oss's chat template, as trl ships it (sha256-checked)."""
    text = resources.files("trl").joinpath("chat_templates/gptoss.jinja").read_bytes()
    digest = hashlib.sha256(text).hexdigest()
    if digest != CHAT_TEMPLATE_SHA256:
        raise RuntimeError(
            f"trl's chat_templates/gptoss.jinja has sha256 {digest}, expected {CHAT_TEMPLATE_SHA256}"
        )
    return text.decode("utf-8")


def tokenizer_config_json() -> str:
    """``tokenizer_config.json`` text, laid out as transformers writes it (sorted, indent 2)."""
    decoder = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in SPECIAL_TOKENS.items()
    }
    config = {"added_tokens_decoder": decoder, **TOKENIZER_CONFIG}
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def convert_tiktoken(ranks_file: Path, special_tokens: list[str]):
    """Run transformers' ``TikTokenConverter`` on a ``.tiktoken`` file with o200k's pattern.

    ``special_tokens`` are appended after the ranks in list order, so each one's id is
    ``N_RANKS + its index``: pass them in id order (a ``{token: id}`` dict's keys are not).

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # An empty TIKTOKEN_CACHE_DIR makes tiktoken read the local file without copying it into
    # its /tmp default cache.
    with _environ(TIKTOKEN_CACHE_DIR=""):
        return TikTokenConverter(
            vocab_file=str(ranks_file), pattern=O200K_PATTERN, extra_special_tokens=special_tokens
        ).converted()


def build_tokenizer(out_dir: Path) -> Path:
    """Write the gpt-oss tokenizer folder: tokenizer.json, tokenizer_config.json, chat template.

    Raises:
        RuntimeError: the built ``tokenizer.json`` is not byte-identical to the Hub's.

    Returns:
        ``out_dir``, loadable with ``AutoTokenizer.from_pretrained`` offline.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ranks-") as tmp:
        ranks_file = write_o200k_ranks(Path(tmp) / "o200k_base.tiktoken")
        tokenizer = convert_tiktoken(ranks_file, list(SPECIAL_TOKENS))
        tokenizer.save(str(out_dir / "tokenizer.json"))
    data = (out_dir / "tokenizer.json").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_JSON_SHA256:
        raise RuntimeError(
            f"built tokenizer.json ({len(data)} bytes, sha256 {digest}) differs from the Hub's "
            f"({TOKENIZER_JSON_SIZE} bytes, sha256 {TOKENIZER_JSON_SHA256}); "
            "is the installed tokenizers/transformers serialising differently?"
        )
    (out_dir / "tokenizer_config.json").write_text(tokenizer_config_json(), encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    return out_dir


def ensure_tokenizer() -> Path:
    """The tokenizer folder in the cache (``$MXLORA_CACHE/tokenizer/gpt-oss``), built once.

    Safe when several processes race: each builds into its own temp folder and renames it
    into place; a loser finds the folder complete and uses it.
    """
    final = cache_dir("tokenizer", "gpt-oss")
    if all((final / name).is_file() for name in TOKENIZER_FILES):
        return final
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".gpt-oss-"))
    try:
        build_tokenizer(tmp)
        # rename() replaces an empty target (as cache_dir leaves it) atomically; it fails if
        # another process already put a complete folder there, which we then use.
        with contextlib.suppress(OSError):
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _ranks_dir(name: str) -> Path:
    """A cache folder holding the ranks file under ``name`` (written once, atomically)."""
    folder = cache_dir("tiktoken", "o200k")
    path = folder / name
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != O200K_BASE_SHA256:
        write_o200k_ranks(path)
    return folder


@functools.cache
def harmony_encoding():
    """openai-harmony's ``HARMONY_GPT_OSS`` encoding, loaded offline (harmony checks the hash).

    Returns:
        an ``openai_harmony.HarmonyEncoding``.
    """
    import openai_harmony

    # harmony reads $TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken instead of downloading it.
    with _environ(TIKTOKEN_ENCODINGS_BASE=str(_ranks_dir("o200k_base.tiktoken"))):
        return openai_harmony.load_harmony_encoding(
            openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS
        )


@functools.cache
def tiktoken_encoding():
    """tiktoken's own ``o200k_harmony`` encoding (its pattern and specials), loaded offline.

    The ranks file sits in our cache under the name tiktoken gives the official download, so
    tiktoken finds it there (and checks its hash) instead of fetching it.

    Returns:
        a ``tiktoken.Encoding``.
    """
    import tiktoken

    with _environ(TIKTOKEN_CACHE_DIR=str(_ranks_dir(TIKTOKEN_CACHE_KEY))):
        return tiktoken.get_encoding("o200k_harmony")


def cli_main(args: argparse.Namespace) -> int:
    """``mxlora make-tokenizer OUT``."""
    out = build_tokenizer(Path(args.out))
    print(f"wrote the gpt-oss tokenizer to {out}")
    return 0
