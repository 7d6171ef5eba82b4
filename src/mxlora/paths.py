"""Where mxlora keeps what it builds (tokenizer files, tiny models, encodings caches).

Everything lives under one directory of ours, ``$MXLORA_CACHE`` or ``~/.cache/mxlora``, never
a library's /tmp default, so a run is reproducible and a CI clone builds each artefact once.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$MXLORA_CACHE/<parts...>``."""
    root = Path(os.environ.get("MXLORA_CACHE") or Path.home() / ".cache" / "mxlora")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The real data beside a checkout (``../shared/data``), if present.

    Only tests, benchmarks and the demo look here; the product never needs it.
    """
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    env = os.environ.get("MXLORA_SHARED_DATA")
    return Path(env) if env and Path(env).is_dir() else None
