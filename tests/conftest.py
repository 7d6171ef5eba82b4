"""Shared fixtures. Tests never touch the Hub; everything they need is built locally and cached
under the project's own ``.cache/`` (one build per CI clone, shared by xdist workers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MXLORA_CACHE", str(ROOT / ".cache" / "mxlora"))
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real data no one here wrote. Required in CI, skipped elsewhere."""
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the clone")
        pytest.skip("../shared/data not present")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The offline-built gpt-oss tokenizer folder (built once, cached)."""
    from mxlora.model.tokenizer import ensure_tokenizer

    return ensure_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
