"""Training data: sources, adapters, Harmony rendering with the loss mask, validation.

Public entry points: :class:`DataConfig` (the ``data:`` block of a run config) and
:func:`prepare_data` (config + tokenizer + ``max_len`` -> tokenized train/eval + report).
See docs/DATA.md.
"""

from mxlora.data.prepare import PreparedData, prepare_data
from mxlora.data.spec import DataConfig

__all__ = ["DataConfig", "PreparedData", "prepare_data"]
