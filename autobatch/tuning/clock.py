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
:data:`WINDOW_SECONDS` each): noise only ever adds time. Timed four times in a row on the blobs
task (eleven sizes, 0.4-45 ms a step), each size's times lay within about 5% of each other at
small sizes and 10% at large ones (the median of the windows: 10-15%), for under a second.
That is still enough to move the prior's choice where two sizes are predicted within a few
percent of each other, so the table is kept on disk, and a rerun on the same machine reads it
back and does the same study.
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
from autobatch.training import TrainStep, build
from autobatch.tuning.loop import synchronizer
from autobatch.workload import Workload

#: Untimed steps at each size before its windows: the first pays for allocation and kernels.
WARMUP = 2
#: Untimed seconds of steps before the first size.
SETTLE_SECONDS = 0.1
#: Timed windows per size; the fastest counts (another process only ever slows one down).
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
    devices = [task.device] if task.device.type == "cuda" else []
    seconds: dict[int, float] = {}
    try:
        with torch.random.fork_rng(devices=devices):
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
                for size in timed_sizes:
                    timed = _time(step, _batches(source, size), sync)
                    if timed is not None:
                        seconds[size] = timed
            finally:
                del model, optimizer, step
    finally:
        if threads:
            torch.set_num_threads(previous)
    if cache and seconds:
        probe_cache.write(key, {"step_seconds": {str(b): s for b, s in seconds.items()}}, cache_dir)
    return {"seconds": seconds, "cost": time.perf_counter() - started, "cached": False}


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
    while time.perf_counter() < deadline:
        step(next(batches))
        sync()


def _time(step: TrainStep, batches: Iterator[Any], sync: Any) -> float | None:
    """Seconds per step in the fastest window; None when the size runs out of memory. The
    first window is one step, and sets the others' length."""
    try:
        for _ in range(WARMUP):
            step(next(batches))
        sync()
        windows: list[float] = []
        per_window = 1
        while len(windows) < WINDOWS:
            start = time.perf_counter()
            for _ in range(per_window):
                step(next(batches))
            sync()
            windows.append((time.perf_counter() - start) / per_window)
            wanted = math.ceil(WINDOW_SECONDS / max(windows[0], 1e-9))
            per_window = max(1, min(MAX_WINDOW_STEPS, wanted))
        return min(windows)
    except BaseException as exc:
        if not is_oom_error(exc):
            raise
        drop_failed_attempt(exc)
        return None
