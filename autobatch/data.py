"""Batches from a task's data: tensors are sliced in place, a Dataset goes through a DataLoader."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from autobatch.errors import InvalidInputError


def to_device(obj: Any, device: torch.device, *, copy: bool = False) -> Any:
    """Move every tensor inside ``obj`` (tuples, lists, dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True, copy=copy)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device, copy=copy) for key, value in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(value, device, copy=copy) for value in obj)
    return obj


def is_tensor_data(data: Any, collate_fn: Callable[[list[Any]], Any] | None = None) -> bool:
    """Whether ``data`` is columns of tensors, one row per sample: ``(inputs, targets)``. A
    list of tensors given with a ``collate_fn`` is samples instead (a map-style dataset), which
    the collate_fn batches."""
    if collate_fn is not None and isinstance(data, list):
        return False
    return (
        isinstance(data, Sequence) and bool(data) and all(isinstance(t, torch.Tensor) for t in data)
    )


class BatchSource:
    """Draws batches of a given size from one dataset, already on the training device.

    Tensors held in memory are moved to the device once and indexed per batch: no DataLoader,
    no per-sample Python, no host round trip. A ``Dataset`` is read through a ``DataLoader``.
    """

    def __init__(
        self,
        data: Any,
        device: torch.device,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.device = device
        self._tensors: tuple[torch.Tensor, ...] | None = None
        self._dataset = None
        self._sample_sizes: list[int] | None = None
        if is_tensor_data(data, collate_fn):
            self._tensors = tuple(data)
        else:
            self._dataset = data
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        if self._tensors is not None:
            return int(self._tensors[0].shape[0])
        return len(self._dataset)

    def to_device(self) -> BatchSource:
        """Place in-memory tensors on the device once, so epochs do not copy them again."""
        if self._tensors is not None:
            self._tensors = tuple(t.to(self.device) for t in self._tensors)
        return self

    def first(self, n: int) -> Any:
        """The first ``n`` samples as one freshly allocated batch on the device."""
        if self._tensors is not None:
            return tuple(t[:n].to(self.device, copy=True) for t in self._tensors)
        samples = [self._dataset[i] for i in range(n)]
        return to_device(_counted(self.collate_fn(samples), n), self.device)

    def largest(self, n: int) -> Any:
        """The ``n`` largest samples (by element count) as one batch on the device: the batch
        that needs the most memory when samples differ in size (sequences padded to the
        longest, images of several sizes). Tensors in memory share one shape: the first."""
        if self._tensors is not None or not self.varies():
            return self.first(n)
        order = sorted(range(len(self)), key=lambda i: -self._sizes()[i])
        samples = [self._dataset[i] for i in order[:n]]
        return to_device(_counted(self.collate_fn(samples), n), self.device)

    def varies(self) -> bool:
        """Whether the samples differ in size (a pass over the dataset, made once)."""
        return self._tensors is None and len(set(self._sizes())) > 1

    def largest_sample_elements(self) -> int:
        """The elements of the largest sample (of the first, for tensors in memory)."""
        if self._tensors is not None:
            return sum(int(t[0].numel()) for t in self._tensors)
        return max(self._sizes())

    def _sizes(self) -> list[int]:
        if self._sample_sizes is None:
            self._sample_sizes = [_elements(self._dataset[i]) for i in range(len(self))]
        return self._sample_sizes

    def epoch(
        self,
        batch_size: int,
        generator: torch.Generator,
        *,
        shuffle: bool = True,
        drop_single: bool = False,
    ) -> Iterator[Any]:
        """One pass over the data in batches; the order comes from ``generator`` alone.

        ``drop_single`` leaves out a final batch of one sample (see :func:`epoch_samples`):
        batch norm cannot train on one sample. The order is drawn anew each epoch, so the
        sample left out is a different one each time."""
        n = len(self)
        batches = steps_per_epoch(n, batch_size, drop_single)
        if self._tensors is not None:
            order = (torch.randperm(n, generator=generator) if shuffle else torch.arange(n)).to(
                self._tensors[0].device
            )
            for start in range(0, batches * batch_size, batch_size):
                index = order[start : start + batch_size]
                yield tuple(t[index] for t in self._tensors)
            return
        loader = DataLoader(
            self._dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
        )
        for i, batch in enumerate(itertools.islice(loader, batches)):
            yield to_device(_counted(batch, min(batch_size, n - i * batch_size)), self.device)


def epoch_samples(size: int, batch_size: int, drop_single: bool = False) -> int:
    """Samples one training epoch trains on: all ``size``, or, with ``drop_single``, one
    fewer where the last batch would hold a single sample (``size % batch_size == 1``, for a
    batch size of 2 or more). Epochs, evaluation points and steps are counted on it."""
    single = drop_single and batch_size > 1 and size % batch_size == 1
    return size - 1 if single else size


def steps_per_epoch(size: int, batch_size: int, drop_single: bool = False) -> int:
    """Optimizer steps (batches) in one training epoch, as :meth:`BatchSource.epoch` draws
    them: ``ceil(size / batch_size)``, one fewer where ``drop_single`` leaves out a final
    one-sample batch."""
    return -(-epoch_samples(size, batch_size, drop_single) // batch_size)


def non_finite(obj: Any, chunk_elements: int = 1 << 24) -> str | None:
    """``"nan"`` or ``"inf"`` when a floating tensor inside ``obj`` (tuples, lists, dicts)
    holds one, else None. Row blocks of about ``chunk_elements`` at a time, so a large
    dataset needs no second copy of itself."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, tuple | list):
        return next((bad for v in obj if (bad := non_finite(v, chunk_elements))), None)
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point() or obj.numel() == 0:
        return None
    if obj.dim() == 0:
        obj = obj.reshape(1)
    rows = max(1, chunk_elements // max(1, obj[0].numel()))
    for start in range(0, obj.shape[0], rows):
        block = obj[start : start + rows]
        if not bool(torch.isfinite(block).all()):
            return "nan" if bool(torch.isnan(block).any()) else "inf"
    return None


def _elements(sample: Any) -> int:
    """Elements in all the tensors (and arrays) of one sample."""
    if isinstance(sample, torch.Tensor):
        return int(sample.numel())
    if isinstance(sample, Mapping):
        return sum(_elements(v) for v in sample.values())
    if isinstance(sample, tuple | list):
        return sum(_elements(v) for v in sample)
    size = getattr(sample, "size", None)  # numpy arrays
    return int(size) if isinstance(size, int) else 0


def batch_length(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor, in a tuple,
    list, dict, dataclass or plain object (a collate_fn's own batch type)."""
    found = _first_tensor(batch)
    if found is None:
        raise TypeError(f"cannot tell the batch size of {type(batch).__name__}: it holds no tensor")
    return int(found.shape[0]) if found.dim() else 1


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, tuple | list):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return None
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _counted(batch: Any, n: int) -> Any:
    """``batch``, made of ``n`` samples, checked to hold them along its first dimension: a
    batch laid out otherwise (sequences first, as ``pad_sequence`` makes them by default)
    would be measured, timed and counted at the wrong size."""
    found = batch_length(batch)
    if found != n:
        raise InvalidInputError(
            f"a batch of {n} sample{'s' * (n != 1)} from collate_fn has {found} along the first "
            "dimension of "
            "its first tensor, where autobatch counts samples: put the batch dimension first "
            "(pad_sequence(..., batch_first=True)), or lead with a tensor that has it first"
        )
    return batch
