"""Timing the study's clock: seconds per training step at every candidate batch size, measured
once where the study is prepared (:class:`~autobatch.tuning.prior.StepClock` reads it), so that
a trial's training time is its steps counted on it.

Timed on the wall clock, the same study run twice with the same seed did not do the same
thing: a few percent of timing noise moved which trials the pruner cut, the values TPE was
told and so what it proposed next, and the batch sizes the prior dropped. On the blobs task
of ``benchmarks/recommendation_quality.py`` four reruns gave two recommendations and three
trial sequences. Counted in steps, every decision depends on the learning curves (the same
on every run) and on this one table. The table also puts every worker of a shared study on
one clock, whatever device it runs on: a trial's time is what it would have taken where the
study was prepared.

Each size is timed over real batches from the training data (loading included), after
warm-up, synchronised, as the fastest of :data:`WINDOWS` windows (one step, then at least
:data:`WINDOW_SECONDS` each) taken in rounds over the sizes: noise only ever adds time, and a
slow spell of the machine then spoils one window of a size rather than all of them. No size
is allowed a longer step than a larger one. Timed five times in a row on the blobs task
(eleven sizes, 0.4-45 ms a step, about a second each time), a size's time varied by about
5-10% in a quiet spell of this 2-core machine; in a busy one whole tables came out 20-40%
slower, which moved the ratios between sizes by up to 15%. That is enough to move the
prior's choice where two sizes are predicted within a few percent of each other, so the
table is kept on disk, and a rerun on the same machine reads it back and does the same study.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from autobatch import probe_cache
from autobatch.data import BatchSource, batch_length
from autobatch.oom import drop_failed_attempt, is_oom_error
from autobatch.training import TrainStep, build, forked
from autobatch.tuning.loop import synchronizer
from autobatch.workload import Workload

#: Untimed steps at each size before its first window (the first pays for allocation and
#: kernels); one more before each of its later windows.
WARMUP = 2
#: Untimed seconds of steps before the first size.
SETTLE_SECONDS = 0.1
#: Timed windows per size, one per round over the sizes; the fastest counts (another process
#: only ever slows one down).
WINDOWS = 3
#: A window is at least this long (and one step), so the clock's resolution does not show.
WINDOW_SECONDS = 0.01
#: And at most this many steps.
MAX_WINDOW_STEPS = 200


def describe_device(device: torch.device) -> str:
    """What decides a device's speed, as a name (the GPU model; the CPU's torch threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type


def measure(
    task: Workload,
    source: BatchSource,
    sizes: Sequence[int],
    threads: int | None = None,
    *,
    cache: bool = True,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Time the training step at every size in ``sizes`` (see the module docstring), with
    ``threads`` torch threads (the workers' count) where given. Sizes that do not fit, or
    exceed the training set, are left out (the line through the others stands in). Returns
    ``{"seconds": {size: seconds per step}, "cost": seconds spent, "cached": bool}``;
    random generators are left as they were.

    With ``cache``, the table is kept on disk (beside the probe's results) under the step's
    fingerprint, the sizes, the device and this host's name, and read back on the next call:
    a rerun on the same machine then runs on the same clock and does the same study."""
    started = time.perf_counter()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = synchronizer(task.device)
    seconds: dict[int, float] = {}
    try:
        with forked(task):
            model, optimizer = build(task)
            step = TrainStep(task, model, optimizer)
            model.train()
            try:
                key = probe_cache.digest(
                    {
                        **probe_cache.fingerprint(task, model, optimizer, source),
                        "clock": sorted(set(sizes)),
                        "device": describe_device(task.device),
                        "host": socket.gethostname(),
                    }
                )
                if cache and (hit := _cached(key, cache_dir)) is not None:
                    return {"seconds": hit, "cost": time.perf_counter() - started, "cached": True}
                timed_sizes = sorted(s for s in set(sizes) if s <= len(source))
                if timed_sizes:
                    _settle(step, _batches(source, timed_sizes[0]), sync)
                seconds = _time_in_rounds(step, source, timed_sizes, sync)
            finally:
                del model, optimizer, step
    finally:
        if threads:
            torch.set_num_threads(previous)
    seconds = _never_slower_below(seconds)
    if cache and seconds:
        probe_cache.write(key, {"step_seconds": {str(b): s for b, s in seconds.items()}}, cache_dir)
    return {"seconds": seconds, "cost": time.perf_counter() - started, "cached": False}


def _never_slower_below(seconds: dict[int, float]) -> dict[int, float]:
    """Each size's time capped at the least of the larger sizes': a step of fewer samples
    does no more work, and what makes one slower (another process, the first sizes timed in
    a process) is noise. Two processes timing at once on two cores put batch 16 of the hastie
    task at 0.85 ms against 0.50 ms for batch 8, and batch 8 of the moons task at 0.66 ms
    against 0.46 ms for batch 32."""
    capped, least = {}, math.inf
    for size in sorted(seconds, reverse=True):
        least = min(least, seconds[size])
        capped[size] = least
    return dict(sorted(capped.items()))


def _cached(key: str, cache_dir: str | None) -> dict[int, float] | None:
    """The table stored under ``key``; None when there is none, or it is not one."""
    data = probe_cache.read(key, cache_dir)
    try:
        found = {int(b): float(s) for b, s in data["step_seconds"].items()}  # type: ignore[index]
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return found if found and all(s > 0 for s in found.values()) else None


def _batches(source: BatchSource, size: int) -> Iterator[Any]:
    """Full batches of ``size``, in a seeded random order, epoch after epoch."""
    generator = torch.Generator().manual_seed(0)
    while True:
        for batch in source.epoch(size, generator):
            if batch_length(batch) == size:
                yield batch


def _settle(step: TrainStep, batches: Iterator[Any], sync: Any) -> None:
    """Steps for :data:`SETTLE_SECONDS`, untimed: the first sizes timed in a fresh process
    came out up to 1.4x slow without them (caches, allocator, clock frequency)."""
    deadline = time.perf_counter() + SETTLE_SECONDS
    try:
        while time.perf_counter() < deadline:
            step(next(batches))
            sync()
    except BaseException as exc:  # the size is left out when it is timed, as every size is
        if not is_oom_error(exc):
            raise
        drop_failed_attempt(exc)


def _time_in_rounds(
    step: TrainStep, source: BatchSource, sizes: Sequence[int], sync: Any
) -> dict[int, float]:
    """Seconds per step at each size, in the fastest of :data:`WINDOWS` windows taken in
    rounds over the sizes, so that a slow spell of the machine spoils one window of a size,
    not all of them. A size's first window is one step and sets the length of the others;
    each window follows an untimed step at its size. Sizes that run out of memory are left
    out."""
    batches = {size: _batches(source, size) for size in sizes}
    windows: dict[int, list[float]] = {size: [] for size in sizes}
    lengths: dict[int, int] = {}
    for round_ in range(WINDOWS):
        for size in [s for s in sizes if s in windows]:
            try:
                for _ in range(WARMUP if round_ == 0 else 1):
                    step(next(batches[size]))
                sync()
                length = lengths.get(size, 1)
                start = time.perf_counter()
                for _ in range(length):
                    step(next(batches[size]))
                sync()
            except BaseException as exc:
                if not is_oom_error(exc):
                    raise
                drop_failed_attempt(exc)
                del windows[size], batches[size]
                continue
            windows[size].append((time.perf_counter() - start) / length)
            wanted = math.ceil(WINDOW_SECONDS / max(windows[size][0], 1e-9))
            lengths[size] = max(1, min(MAX_WINDOW_STEPS, wanted))
    return {size: min(times) for size, times in windows.items()}
