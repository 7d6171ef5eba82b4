"""mxlora's own training step (``train.engine: mxlora``): packed rows, document-masked attention
with sinks, chunked cross-entropy without full logits, compiled decoder blocks.

Modules: :mod:`~mxlora.engine.packing` (row order, packing), :mod:`~mxlora.engine.attention`,
:mod:`~mxlora.engine.loss`, :mod:`~mxlora.engine.memory` (when to checkpoint),
:mod:`~mxlora.engine.loop` (the loop), :mod:`~mxlora.engine.run_folder` (what both engines share).
"""
