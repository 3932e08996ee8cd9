"""Telling out-of-memory errors from every other error, and freeing what a failed attempt held."""

from __future__ import annotations

import pytest
import torch

from autobatch import TrackedMeter, is_oom_error
from autobatch.oom import drop_failed_attempt

OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input.",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, max "
    "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool.",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
    "tried to allocate 8589934592 bytes.",
    "HIP out of memory. Tried to allocate 20.00 MiB",
    "XPU out of memory. Tried to allocate 2.00 GiB (GPU 0; 64.00 GiB total capacity)",
]


def test_out_of_memory_error_type():
    assert is_oom_error(torch.OutOfMemoryError("anything at all"))


@pytest.mark.parametrize("message", OOM_MESSAGES)
def test_runtime_errors_with_allocator_messages(message):
    assert is_oom_error(RuntimeError(message))


def test_accelerator_error_that_says_out_of_memory():
    try:
        oom = torch.AcceleratorError("CUDA error: out of memory")
        other = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    except (AttributeError, TypeError) as exc:
        pytest.skip(f"torch.AcceleratorError cannot be constructed here: {exc}")
    assert is_oom_error(oom)
    assert not is_oom_error(other)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("out of memory"),  # the type decides: only runtime errors carry these messages
        KeyError("out of memory"),
        RuntimeError("shape mismatch"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
        RuntimeError("the feature bank is out of memory slots (128); raise bank_size"),
        TypeError("unsupported operand"),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_oom_error(exc)


def test_drop_failed_attempt_frees_what_the_failed_frames_held():
    meter = TrackedMeter(10_000)

    def failing_step():
        activations = torch.empty(6000, dtype=torch.uint8)  # noqa: F841 (held by the frame)
        torch.empty(6000, dtype=torch.uint8)

    try:
        with meter:
            failing_step()
    except torch.OutOfMemoryError as exc:
        caught = exc
    assert meter.current() == 6000  # the traceback keeps the failed frame alive
    drop_failed_attempt(caught)
    assert meter.current() == 0
    assert caught.__traceback__ is None
