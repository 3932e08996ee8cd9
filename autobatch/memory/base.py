"""The one interface every memory meter implements: capacity, current, peak, reset."""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from types import TracebackType

import torch


class MemoryMeter(ABC):
    """Reads how much accelerator memory a process uses and may use.

    A meter is also a context manager: the probe runs every attempt inside ``with meter:``.
    Hardware meters need no setup; the tracked meter starts counting there.
    """

    device: torch.device

    @property
    def name(self) -> str:
        """A stable device description, part of the probe cache key."""
        return str(self.device)

    @abstractmethod
    def capacity(self) -> int:
        """Bytes this process can hold at most: what is in use now plus what is free."""

    @abstractmethod
    def current(self) -> int:
        """Bytes held by live tensors now."""

    @abstractmethod
    def peak(self) -> int | None:
        """Most bytes held since the last ``reset_peak``; ``None`` where the device cannot tell."""

    @abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak window at the current usage."""

    def release(self) -> None:
        """Give cached memory back after an attempt, so the next one starts clean."""
        gc.collect()

    def synchronize(self) -> None:
        """Wait for queued device work, so wall times and peaks are complete."""

    def __enter__(self) -> MemoryMeter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
