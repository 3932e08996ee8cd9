"""Meters for real accelerators, read from torch's own allocator statistics."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch

from autobatch.memory.base import MemoryMeter


class CudaMeter(MemoryMeter):
    """CUDA (and ROCm) memory from the caching allocator and ``cudaMemGetInfo``.

    Capacity is what this process can reach: the free device memory plus what torch already
    holds in its cache. ``limit`` caps it, to plan for a smaller card than the one at hand.
    """

    def __init__(self, device: str | torch.device = "cuda", limit: int | None = None) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.limit = limit

    @property
    def name(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return f"{props.name} ({props.total_memory} bytes)"

    def capacity(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        reachable = free + torch.cuda.memory_reserved(self.device)
        return min(reachable, self.limit) if self.limit else reachable

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def release(self, full: bool = False) -> None:
        gc.collect() if full else gc.collect(1)
        torch.cuda.empty_cache()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class XpuMeter(MemoryMeter):
    """Intel XPU memory, through ``torch.xpu``'s allocator statistics."""

    def __init__(self, device: str | torch.device = "xpu", limit: int | None = None) -> None:
        self.device = torch.device(device)
        self.limit = limit

    def capacity(self) -> int:
        total = torch.xpu.get_device_properties(self.device).total_memory
        return min(total, self.limit) if self.limit else total

    def current(self) -> int:
        return torch.xpu.memory_allocated(self.device)

    def peak(self) -> int | None:
        return torch.xpu.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.xpu.reset_peak_memory_stats(self.device)

    def release(self, full: bool = False) -> None:
        gc.collect() if full else gc.collect(1)
        torch.xpu.empty_cache()

    def synchronize(self) -> None:
        torch.xpu.synchronize(self.device)


class MpsMeter(MemoryMeter):
    """Apple MPS. It reports current usage but keeps no peak, so the probe searches instead."""

    def __init__(self, limit: int | None = None) -> None:
        self.device = torch.device("mps")
        self.limit = limit

    def capacity(self) -> int:
        total = torch.mps.recommended_max_memory()
        return min(total, self.limit) if self.limit else total

    def current(self) -> int:
        return torch.mps.current_allocated_memory()

    def peak(self) -> int | None:
        return None

    def reset_peak(self) -> None:
        return None

    @contextlib.contextmanager
    def capped(self, limit: int) -> Iterator[None]:
        # MPS keeps no peak: the allocator's own limit makes a size over the budget fail.
        total = torch.mps.recommended_max_memory()
        torch.mps.set_per_process_memory_fraction(min(limit / total, 2.0))
        try:
            yield
        finally:
            default = float(os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.7"))
            torch.mps.set_per_process_memory_fraction(min(max(default, 0.0), 2.0))

    def release(self, full: bool = False) -> None:
        gc.collect() if full else gc.collect(1)
        torch.mps.empty_cache()

    def synchronize(self) -> None:
        torch.mps.synchronize()
