"""Which implementation computes the frozen MXFP4 grouped matmul: the Triton kernel or the reference.

Capability detection for :func:`mxlora.mxfp4.experts.grouped_mxfp4_matmul`. The Triton kernel
(:mod:`mxlora.mxfp4.triton_kernels`) runs where it was validated: CUDA (not ROCm) devices of
compute capability 8.0 or newer (bf16 tensor cores) with Triton installed. CPU tensors take it
only under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported), which is
how the tests check it; everything else takes the pure-PyTorch reference.

One environment variable overrides the choice, ``MXLORA_KERNELS``:

* unset or empty: detect, as above;
* ``reference``: always the reference;
* ``triton``: always the kernel, skipping the capability check (e.g. to try it on ROCm);
  an error where it cannot run at all (no Triton, or a CPU tensor outside the interpreter).

This module does not import Triton unless a tensor could take the kernel.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

#: The override's name and values.
KERNELS_ENV = "MXLORA_KERNELS"
REFERENCE, TRITON = "reference", "triton"
#: bf16 ``tl.dot`` (tensor cores) needs Ampere or newer.
MIN_CAPABILITY = (8, 0)


def kernel_available(x: Tensor) -> bool:
    """Whether the grouped MXFP4 matmul of ``x`` runs the Triton kernel.

    Args:
        x: the activations (their device decides).

    Returns:
        True for the Triton kernel, False for the reference.

    Raises:
        ValueError: ``MXLORA_KERNELS`` holds something other than ``reference``/``triton``.
        RuntimeError: ``MXLORA_KERNELS=triton`` where the kernel cannot run.
    """
    choice = os.environ.get(KERNELS_ENV, "").strip().lower()
    if choice == REFERENCE:
        return False
    if choice not in ("", TRITON):
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected {REFERENCE!r} or {TRITON!r}")
    reason = _why_not(x, check_capability=choice != TRITON)
    if reason is not None and choice == TRITON:
        raise RuntimeError(f"{KERNELS_ENV}=triton, but {reason}")
    return reason is None


def _why_not(x: Tensor, *, check_capability: bool) -> str | None:
    """Why the kernel cannot take ``x``, or None if it can."""
    if x.device.type == "cpu":
        # Cheap test first: without the variable, Triton is not even imported.
        if not os.environ.get("TRITON_INTERPRET"):
            return "the tensor is on the CPU and TRITON_INTERPRET is not set"
        module = _triton_kernels()
        if module is None:
            return "triton is not installed"
        if not module.INTERPRETED:
            return "mxlora's Triton kernels were imported before TRITON_INTERPRET was set"
        return None
    if x.device.type != "cuda":
        return f"the tensor is on {x.device.type}, the kernel runs on CUDA"
    if _triton_kernels() is None:
        return "triton is not installed"
    if check_capability:
        if torch.version.hip is not None:
            return "ROCm: the kernel is validated on CUDA only"
        capability = torch.cuda.get_device_capability(x.device)
        if capability < MIN_CAPABILITY:
            return f"compute capability {capability} is below {MIN_CAPABILITY}"
    return None


@functools.cache
def _triton_kernels() -> ModuleType | None:
    try:
        from mxlora.mxfp4 import triton_kernels
    except ImportError:
        return None
    return triton_kernels
