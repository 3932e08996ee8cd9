"""Memory meters: one small interface, one implementation per kind of device."""

from __future__ import annotations

import torch

from autobatch.errors import InvalidInputError
from autobatch.memory.base import MemoryMeter
from autobatch.memory.cuda import CudaMeter, MpsMeter, XpuMeter
from autobatch.memory.tracked import TrackedMeter
from autobatch.units import parse_bytes

__all__ = ["CudaMeter", "MemoryMeter", "MpsMeter", "TrackedMeter", "XpuMeter", "meter_for"]


def meter_for(device: str | torch.device, memory_budget: str | int | None = None) -> MemoryMeter:
    """The meter for ``device``; ``memory_budget`` caps it (and is required on the CPU)."""
    device = torch.device(device)
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    if device.type == "cpu":
        if budget is None:
            raise InvalidInputError(
                "device 'cpu' has no memory limit to probe against; give a budget to simulate "
                "an accelerator, e.g. memory_budget='4GiB' (CLI: --memory-budget 4GiB), or use "
                "--device cuda"
            )
        return TrackedMeter(budget, device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                "device 'cuda' was asked for but torch sees no CUDA device; use --device cpu "
                "with --memory-budget to simulate one"
            )
        return CudaMeter(device, limit=budget)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise _unavailable("mps")
        return MpsMeter(limit=budget)
    if device.type == "xpu" and hasattr(torch, "xpu"):
        if not torch.xpu.is_available():
            raise _unavailable("xpu")
        return XpuMeter(device, limit=budget)
    raise InvalidInputError(
        f"no memory meter for device {str(device)!r}; use cpu (with memory_budget), cuda, mps "
        "or xpu"
    )


def _unavailable(kind: str) -> InvalidInputError:
    return InvalidInputError(
        f"device {kind!r} was asked for but torch sees no {kind.upper()} device; use device "
        "'cpu' with memory_budget='4GiB' to simulate one (CLI: --device cpu --memory-budget 4GiB)"
    )
