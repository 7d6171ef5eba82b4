"""Which implementation computes the frozen MXFP4 grouped matmul: Triton, torch or the reference.

Capability detection for :class:`mxlora.mxfp4.experts.Mxfp4Experts`, which picks its backend
once, when it is built (:func:`resolve_backend`), and passes it to the registered op
(:func:`mxlora.mxfp4.ops.mxfp4_grouped_mm`) on every call:

* ``triton`` (:mod:`mxlora.mxfp4.triton_kernels`) where it was validated: CUDA (not ROCm)
  devices of compute capability 8.0 or newer (bf16 tensor cores) with Triton installed. CPU
  tensors take it only under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is
  imported), which is how the tests check it;
* ``torch`` everywhere else (CPU, ROCm, older GPUs): the whole projection dequantized with torch
  ops, then torch's ``grouped_mm``;
* ``reference``: the per-expert loop, the oracle the others are tested against (never chosen
  automatically).

One environment variable overrides the detection, ``MXLORA_KERNELS``, read when a module is
built (not per call): unset or empty detects as above; ``reference``/``torch`` force those;
``triton`` forces the kernel, skipping the capability check (e.g. to try it on ROCm), and is an
error where it cannot run at all (no Triton, or a CPU tensor outside the interpreter).

This module does not import Triton unless a device could take the kernel.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

#: The override's name and values.
KERNELS_ENV = "MXLORA_KERNELS"
REFERENCE, TORCH, TRITON = "reference", "torch", "triton"
BACKENDS = (REFERENCE, TORCH, TRITON)
#: bf16 ``tl.dot`` (tensor cores) needs Ampere or newer.
MIN_CAPABILITY = (8, 0)


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend a module on ``device`` uses: ``backend`` if given, else ``MXLORA_KERNELS``,
    else detection (``triton`` where it can run, ``torch`` elsewhere).

    Raises:
        ValueError: an unknown backend name (argument or ``MXLORA_KERNELS``).
        RuntimeError: ``triton`` asked for where the kernel cannot run.
    """
    device = torch.device(device)
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(KERNELS_ENV, "").strip().lower(), KERNELS_ENV
    if backend not in ("", *BACKENDS):
        raise ValueError(f"{source}={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend in (REFERENCE, TORCH) or (
        backend == TRITON and source == "backend" and device.type == "meta"
    ):
        # A meta-device skeleton is filled on the device its loader resolved the named
        # backend for: kept as is (no kernel runs on meta).
        return backend
    reason = _why_not(device, check_capability=backend != TRITON)
    if reason is not None and backend == TRITON:
        raise RuntimeError(f"{source}=triton, but {reason}")
    return TORCH if reason else TRITON


def kernel_available(x: Tensor) -> bool:
    """Whether a module built for ``x``'s device now runs the Triton kernel."""
    return resolve_backend(x.device) == TRITON


def _why_not(device: torch.device, *, check_capability: bool) -> str | None:
    """Why the kernel cannot run on ``device``, or None if it can."""
    if device.type == "cpu":
        # Cheap test first: without the variable, Triton is not even imported.
        if not os.environ.get("TRITON_INTERPRET"):
            return "the tensor is on the CPU and TRITON_INTERPRET is not set"
        module = _triton_kernels()
        if module is None:
            return "triton is not installed"
        if not module.INTERPRETED:
            return "mxlora's Triton kernels were imported before TRITON_INTERPRET was set"
        return None
    if device.type != "cuda":
        return f"the tensor is on {device.type}, the kernel runs on CUDA"
    if _triton_kernels() is None:
        return "triton is not installed"
    if check_capability:
        if torch.version.hip is not None:
            return "ROCm: the kernel is validated on CUDA only"
        capability = torch.cuda.get_device_capability(device)
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
