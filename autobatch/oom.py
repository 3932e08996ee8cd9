"""Tell an out-of-memory error from every other error, and drop what a failed attempt held."""

from __future__ import annotations

import gc
import traceback

import torch

# Messages of allocators and libraries that report exhaustion without a dedicated type. Each
# names its allocator: a bare "out of memory" may be the user's own error ("a bank out of
# memory slots"), which must propagate.
_OOM_MESSAGES = (
    "cuda out of memory",
    "cuda error: out of memory",
    "hip out of memory",
    "hip error: out of memory",
    "xpu out of memory",
    "cudnn_status_not_supported",  # cuDNN fails this way when its workspace does not fit
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "cufft_internal_error",  # cuFFT plan allocation failure
    "mps backend out of memory",
    "defaultcpuallocator: not enough memory",
    "defaultcpuallocator: can't allocate memory",
)


def is_oom_error(exc: BaseException) -> bool:
    """True if ``exc`` means the device ran out of memory.

    The exception type decides first (``torch.OutOfMemoryError``, and ``torch.AcceleratorError``
    whose message says out of memory); known messages of CUDA, cuDNN, cuBLAS, MPS and the CPU
    allocator are the fallback for libraries that raise a plain ``RuntimeError``. Anything else
    is a real error and must propagate.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(pattern in message for pattern in _OOM_MESSAGES)


def drop_failed_attempt(exc: BaseException) -> None:
    """Free what the frames of a failed attempt still hold.

    The traceback keeps every frame of the failed step alive, and with them its activations;
    clearing the frames before the next attempt returns that memory.
    """
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    exc.__context__ = None
    gc.collect(1)


def release_if_oom(exc: BaseException) -> None:
    """Before restoring state after a failed step (which allocates): free the failed step's
    frames if it ran out of memory. Other errors keep their traceback for the user."""
    if is_oom_error(exc):
        traceback.clear_frames(exc.__traceback__)
