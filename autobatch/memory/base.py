"""The one interface every memory meter implements: capacity, current, peak, reset."""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from collections.abc import Iterator
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

    def refused(self) -> int | None:
        """Bytes in use plus the request that ran out of memory, at the last refusal since
        ``reset_peak``: a lower bound of what the failed work needed, which ``peak`` (what it
        held before failing) understates. ``None`` where the device cannot tell."""
        return None

    @contextlib.contextmanager
    def capped(self, limit: int) -> Iterator[None]:
        """Make allocations past ``limit`` bytes fail while inside, where the device allows it.

        A meter that keeps no peak cannot tell a size that ran over the budget from one that
        stayed within it; the probe then treats the budget as the device's cap, so the headroom
        still holds.
        """
        yield

    def release(self, full: bool = False) -> None:
        """Give cached memory back after an attempt, so the next one starts clean.

        A young-generation collection frees what an attempt left in reference cycles at a
        tiny cost; a full one (``full=True``) takes a good fraction of a second in a process
        that has imported torch, so it runs once, at the end of a probe.
        """
        gc.collect() if full else gc.collect(1)

    def synchronize(self) -> None:  # noqa: B027 - a no-op for devices that run eagerly
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
