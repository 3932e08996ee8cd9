"""A simulated accelerator: counts the bytes of live tensor storages and enforces a capacity.

Every aten operation run under the meter passes through a dispatch mode. Before an operation
runs, the size of the storages it will create is worked out on the ``meta`` device (cached per
operation and input shapes); if they do not fit, ``torch.OutOfMemoryError`` is raised with the
message a CUDA allocator gives and the allocation never happens. Storages are uncounted when
they are freed (a weak reference to each one), so the count is the live bytes, like
``torch.cuda.memory_allocated``. A sparse tensor has no storage of its own: its indices and
values are counted, those the operation made (a sparse gradient may hold the batch's ids).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Container, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from autobatch.memory.base import MemoryMeter
from autobatch.units import format_bytes

_META = torch.device("meta")
_SIZE_CACHE_ENTRIES = 8192


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype)
    if isinstance(value, list | tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    if value is None or isinstance(
        value, bool | int | float | str | torch.dtype | torch.device | torch.layout
    ):
        return value
    if isinstance(value, torch.memory_format):
        return str(value)
    return type(value).__name__


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(_META)
    if isinstance(value, torch.device):
        return _META
    if isinstance(value, torch.Generator):
        return None
    return value


def _fresh_outputs(func: Any, out: Any) -> list[torch.Tensor]:
    """Output tensors that own new storage (not views of, or in-place updates to, an input)."""
    returns = func._schema.returns
    several = len(returns) > 1 and isinstance(out, tuple | list)
    outs = list(out) if several else [out]
    fresh: list[torch.Tensor] = []
    for ret, value in zip(returns, outs, strict=False):
        if ret.alias_info is not None:
            continue
        flat, _ = tree_flatten(value)
        fresh.extend(t for t in flat if isinstance(t, torch.Tensor))
    return fresh


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an operation writes into (``self`` of an in-place op, ``out=``): their
    storage may grow in place (``resize_``, an ``out=`` tensor of the wrong size)."""
    written: list[torch.Tensor] = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        flat, _ = tree_flatten(value)
        written.extend(t for t in flat if isinstance(t, torch.Tensor))
    return written


_COMPRESSED = {
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}


def dense_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The dense tensors whose storages hold a tensor's memory: a sparse tensor (a sparse
    embedding's gradient) has no storage of its own, only its indices and values."""
    if tensor.layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    if (names := _COMPRESSED.get(tensor.layout)) is not None:
        return [getattr(tensor, name)() for name in names] + [tensor.values()]
    return [tensor]


def _any_sparse(value: Any) -> bool:
    flat, _ = tree_flatten(value)
    return any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in flat)


def _storages(value: Any) -> dict[int, torch.UntypedStorage]:
    """The storages behind the tensors in ``value``, by id."""
    flat, _ = tree_flatten(value)
    parts = [p for t in flat if isinstance(t, torch.Tensor) for p in dense_parts(t)]
    return {id(s): s for s in (p.untyped_storage() for p in parts)}


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class TrackedMeter(MemoryMeter):
    """Memory meter for a device with an explicit ``capacity`` in bytes, enforced on allocation.

    Use it to probe on the CPU (``memory_budget="2GiB"``), to plan for a smaller card than the
    one at hand, and in tests as a deterministic stand-in for a GPU.
    """

    def __init__(self, capacity: int, device: str | torch.device = "cpu") -> None:
        self._capacity = int(capacity)
        self.device = torch.device(device)
        self._current = 0
        self._peak = 0
        self._refused: int | None = None
        self._lock = threading.Lock()
        self._tracked: dict[int, weakref.ref] = {}
        self._nbytes: dict[int, int] = {}  # per tracked storage, as last counted
        self._sizes: dict[Any, int | None] = {}
        self._mode: _TrackingMode | None = None
        self._depth = 0

    @property
    def name(self) -> str:
        return f"tracked:{self.device}"

    def capacity(self) -> int:
        return self._capacity

    def current(self) -> int:
        return self._current

    def peak(self) -> int | None:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._current
        self._refused = None

    def refused(self) -> int | None:
        return self._refused

    @contextlib.contextmanager
    def capped(self, limit: int) -> Iterator[None]:
        capacity = self._capacity
        self._capacity = min(capacity, int(limit))
        try:
            yield
        finally:
            self._capacity = capacity

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors created before the meter was entered (a model built elsewhere)."""
        for tensor in tensors:
            self._register(tensor)

    def __enter__(self) -> TrackedMeter:
        if self._depth == 0:
            self._mode = _TrackingMode(self)
            self._mode.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None

    # -- accounting ------------------------------------------------------------------------

    def _register(self, tensor: torch.Tensor, given: Container[int] = ()) -> None:
        """Count ``tensor``'s storage, or a sparse tensor's indices and values, except those
        in ``given`` (an operation's inputs, which a sparse output may hold)."""
        if tensor.layout != torch.strided:
            for part in dense_parts(tensor):
                if id(part.untyped_storage()) not in given:
                    self._register(part)
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = id(storage)
        if nbytes == 0 or not self._counts(storage):
            return
        with self._lock:
            if key in self._tracked and self._tracked[key]() is storage:
                return
            self._tracked[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
            self._nbytes[key] = nbytes
            self._current += nbytes
            self._peak = max(self._peak, self._current)

    def _counts(self, storage: torch.UntypedStorage) -> bool:
        """Whether a storage holds device memory: meta tensors hold none."""
        return storage.device.type != "meta"

    def _free(self, key: int) -> None:
        with self._lock:
            self._tracked.pop(key, None)
            self._current -= self._nbytes.pop(key, 0)

    def _grown(self, tensor: torch.Tensor, before: int, given: Container[int] = ()) -> None:
        """Count what ``resize_`` or an ``out=`` operation added to a storage in place; refuse
        (shrinking it back) what does not fit. An in-place operation on a sparse tensor (a
        gradient accumulated into) gives it new indices and values: those not in ``given``
        (what it held before) are counted, or refused."""
        if tensor.layout != torch.strided:
            self._check_fits(self._untracked_bytes([tensor], given))
            self._register(tensor, given)
            return
        storage = tensor.untyped_storage()
        added = storage.nbytes() - before
        if added <= 0 or not self._counts(storage):
            return
        key = id(storage)
        tracked = key in self._tracked and self._tracked[key]() is storage
        if self._current + added > self._capacity:
            storage.resize_(before)
            self._check_fits(added)
        if not tracked:
            self._register(tensor)  # it became device memory here
            return
        with self._lock:
            self._nbytes[key] += added
            self._current += added
            self._peak = max(self._peak, self._current)

    def _untracked_bytes(self, tensors: Iterable[torch.Tensor], given: Container[int]) -> int:
        """Bytes of the device storages behind ``tensors`` (a sparse tensor's indices and
        values) that are neither counted yet nor in ``given``."""
        new = {}
        for part in (p for t in tensors for p in dense_parts(t)):
            storage = part.untyped_storage()
            key = id(storage)
            tracked = key in self._tracked and self._tracked[key]() is storage
            if not tracked and key not in given and self._counts(storage):
                new[key] = storage.nbytes()
        return sum(new.values())

    def _check_fits(self, nbytes: int) -> None:
        if self._current + nbytes <= self._capacity:
            return
        free = max(self._capacity - self._current, 0)
        self._refused = max(self._refused or 0, self._current + nbytes)
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {format_bytes(nbytes)}. Simulated accelerator "
            f"(autobatch TrackedMeter on {self.device}) has a total capacity of "
            f"{format_bytes(self._capacity)} of which {format_bytes(free)} is free. "
            f"{format_bytes(self._current)} is allocated by PyTorch."
        )

    def _planned_bytes(self, func: Any, args: tuple, kwargs: dict, sparse: bool) -> int | None:
        """Bytes of new storage ``func`` will create, worked out on the meta device; ``sparse``:
        a sparse tensor is among its inputs."""
        returns = func._schema.returns
        if not returns or all(r.alias_info is not None for r in returns):
            return 0
        if sparse:
            return None  # on meta, a sparse tensor loses its entries (nnz 0): measure after
        key = (func, _signature(args), _signature(kwargs))
        try:
            return self._sizes[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable argument: work it out every time
            key = None
        try:
            meta_out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
            fresh = _fresh_outputs(func, meta_out)
            # A sparse output may hold its inputs as its indices and values: measure after.
            planned: int | None = None if _any_sparse(fresh) else _storage_bytes(fresh)
        except Exception:  # no meta kernel: measured after the fact instead
            planned = None
        if key is not None:
            if len(self._sizes) >= _SIZE_CACHE_ENTRIES:
                # Float arguments (an optimizer's bias correction) make new keys every step.
                self._sizes.clear()
            self._sizes[key] = planned
        return planned


class _TrackingMode(TorchDispatchMode):
    def __init__(self, meter: TrackedMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        meter = self.meter
        sparse = _any_sparse((args, kwargs))
        planned = meter._planned_bytes(func, args, kwargs, sparse)
        if planned:
            meter._check_fits(planned)
        # A sparse tensor's indices and values may be an input's storage (a sparse embedding's
        # gradient holds the batch's ids): only storages the operation made are new. Held, not
        # only their ids, while it runs, so no storage it makes takes the id of one it frees.
        given = _storages((args, kwargs)) if sparse else {}
        written = [(t, _nbytes(t)) for t in _written(func, args, kwargs)]
        out = func(*args, **kwargs)
        for tensor, before in written:
            meter._grown(tensor, before, given)
        fresh = _fresh_outputs(func, out) if planned is None or planned else []
        if not given and _any_sparse(fresh):
            given = _storages((args, kwargs))  # dense inputs, as they were before it ran
        if planned is None and fresh:
            # No meta kernel: the bytes are known only now. Free them before raising, so the
            # count never passes the capacity.
            nbytes = meter._untracked_bytes(fresh, given)
            if meter._current + nbytes > meter._capacity:
                del out, fresh
                meter._check_fits(nbytes)
        for tensor in fresh:
            meter._register(tensor, given)
        return out


def _nbytes(tensor: torch.Tensor) -> int:
    """A dense tensor's storage bytes (a sparse one's are counted part by part instead)."""
    return tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0
