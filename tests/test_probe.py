"""find_max_batch_size on steps whose memory is known exactly, and probe() on real training."""

from __future__ import annotations

import copy
import json
import math
import random
import re
import traceback
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import (
    AutobatchError,
    BatchSizeOneDoesNotFit,
    InvalidInputError,
    MemoryMeter,
    ProbeResult,
    Task,
    TrackedMeter,
    find_max_batch_size,
    probe,
)
from autobatch.training import TrainStep, build
from autobatch.units import format_bytes

KiB = 1024
MiB = 1024**2
U8 = torch.uint8


# -- synthetic steps ---------------------------------------------------------------------------


def largest_within(need, budget: int, start: int = 0) -> int:
    """The largest ``b`` with ``start + need(b) <= budget``, for a ``need`` that grows with
    ``b``: doubling, then bisection."""
    lo, hi = 0, 1
    while start + need(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if start + need(mid) <= budget else (lo, mid)
    return lo


class Synthetic:
    """A step whose peak is exactly ``fixed + per_sample * b + quadratic * b * b`` bytes above
    what is in use when it starts; it records the sizes it ran and the usage it started from."""

    def __init__(self, fixed: int, per_sample: int, quadratic: int = 0) -> None:
        self.fixed, self.per_sample, self.quadratic = fixed, per_sample, quadratic
        self.calls: list[int] = []
        self.starts: list[int] = []
        self.meter: TrackedMeter | None = None

    def need(self, b: int) -> int:
        return self.fixed + self.per_sample * b + self.quadratic * b * b

    def largest_within(self, budget: int, baseline: int = 0) -> int:
        return largest_within(self.need, budget, baseline)

    def __call__(self, b: int) -> None:
        self.calls.append(b)
        if self.meter is not None:
            self.starts.append(self.meter.current())
        activations = torch.empty(self.fixed + self.per_sample * b, dtype=U8)
        if self.quadratic:
            workspace = torch.empty(self.quadratic * b * b, dtype=U8)
            del workspace
        del activations


class FlatStart(Synthetic):
    """A step whose fixed phase (an optimizer update, a workspace) sets the peak at small sizes:
    ``max(phase, fixed + per_sample * b + root * sqrt(b))``, the phase freed before the
    batch-sized work starts. The peaks stay flat, or grow sub-linearly, until the growth that
    binds takes over."""

    def __init__(self, phase: int, fixed: int, per_sample: int, root: int = 0) -> None:
        super().__init__(fixed, per_sample)
        self.phase, self.root = phase, root

    def need(self, b: int) -> int:
        return max(self.phase, self.growth(b))

    def growth(self, b: int) -> int:
        return self.fixed + self.per_sample * b + int(self.root * b**0.5)

    def __call__(self, b: int) -> None:
        self.calls.append(b)
        if self.meter is not None:
            self.starts.append(self.meter.current())
        workspace = torch.empty(self.phase, dtype=U8)
        del workspace
        activations = torch.empty(self.growth(b), dtype=U8)
        del activations


def largest_linear(budget: int, fixed: int, per_sample: int) -> int:
    return (budget - fixed) // per_sample


def check_attempts(result, step: Synthetic, baseline: int = 0) -> None:
    """Every attempt is classified by what really happened, and the answer is one that fitted."""
    for attempt in result.attempts:
        need = baseline + step.need(attempt.batch_size)
        assert attempt.fitted == (need <= result.budget_bytes), attempt
        if attempt.oom:
            assert need > result.capacity_bytes, attempt
        elif attempt.peak_bytes is not None:
            assert attempt.peak_bytes == need, attempt
    fitted = [a for a in result.attempts if a.batch_size == result.batch_size and a.fitted]
    assert fitted, "the returned size was never run"
    assert result.steps == len(result.attempts)
    assert step.calls == [a.batch_size for a in result.attempts]


# -- find_max_batch_size -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "fixed", "per_sample", "headroom"),
    [
        (MiB, 0, 1000, 0.05),
        (MiB, 600_000, 37, 0.05),
        (8 * MiB, 1000, 4096, 0.1),
        (MiB, 100_000, 123_457, 0.0),
        (MiB, 10, 3, 0.2),
    ],
)
def test_linear_step_finds_the_largest_size_under_the_budget(capacity, fixed, per_sample, headroom):
    step = Synthetic(fixed, per_sample)
    result = find_max_batch_size(step, meter=TrackedMeter(capacity), headroom=headroom)
    # The headroom is kept of the memory free above what the step needs whatever the batch.
    assert abs(result.budget_bytes - (capacity - headroom * (capacity - fixed))) <= 1
    best = largest_linear(result.budget_bytes, fixed, per_sample)
    assert result.capacity_bytes == capacity
    assert 0.93 * best <= result.batch_size <= best
    check_attempts(result, step)
    assert len(result.attempts) <= 8
    assert result.upper_bound is None


@pytest.mark.parametrize("resident_share", [0.0, 0.5, 0.9, 0.98])
def test_the_headroom_costs_the_same_share_of_the_batch_whatever_the_model_takes(resident_share):
    """5% headroom gives 95% of the largest size that fits the capacity (less the search's
    tolerance), also where parameters and optimizer state fill most of the device: a share of
    the whole capacity would leave such a model a fraction of its batch."""
    capacity, per_sample = 64 * MiB, 1000
    meter = TrackedMeter(capacity)
    resident = int(resident_share * capacity)
    with meter:
        held = torch.empty(resident, dtype=U8)  # the model's parameters and optimizer state
    step = Synthetic(0, per_sample)
    step.meter = meter
    result = find_max_batch_size(step, meter=meter)
    full = largest_linear(capacity - resident, 0, per_sample)
    assert 0.93 * full <= result.batch_size <= 0.951 * full
    assert abs(result.budget_bytes - (capacity - 0.05 * (capacity - resident))) <= 1
    check_attempts(result, step, baseline=resident)
    del held


def test_superlinear_step_runs_out_of_memory_and_leaves_nothing_behind():
    meter = TrackedMeter(MiB)
    with meter:
        resident = torch.empty(50_000, dtype=U8)  # something else living on the device
    step = Synthetic(0, 2000, quadratic=30)  # a workspace that grows with the square
    step.meter = meter
    result = find_max_batch_size(step, meter=meter)
    assert result.ooms > 0  # the linear prediction overshot
    best = step.largest_within(result.budget_bytes, baseline=50_000)
    assert 0.93 * best <= result.batch_size <= best
    check_attempts(result, step, baseline=50_000)
    assert step.starts == [50_000] * len(step.calls)  # no attempt inherits a failed one's memory
    assert meter.current() == 50_000
    del resident


FLAT_STARTS = [
    # phase, fixed and per-sample bytes of a 1 MiB device (budget 996,147 bytes)
    (300_000, 0, 1000, 0),  # the phase binds up to 300 samples, memory at ~996
    (600_000, 0, 1000, 0),
    (900_000, 0, 1000, 0),  # the phase nearly fills the budget
    (600_000, 200_000, 20, 0),  # the max (~39,800) far from where the growth shows
    (800_000, 500_000, 3, 0),  # a large fixed workspace: ~165,000 samples of 3 bytes
    (500_000, 50_000, 211, 30_000),  # sub-linear growth on top
    (0, 100_000, 0, 20_000),  # sub-linear growth alone
    (700_000, 0, 40_000, 0),  # a max of 24 samples
]


@pytest.mark.parametrize(("phase", "fixed", "per_sample", "root"), FLAT_STARTS)
@pytest.mark.parametrize("resident", [0, 50_000])
def test_flat_start_takes_at_most_8_steps(phase, fixed, per_sample, root, resident):
    meter = TrackedMeter(MiB)
    with meter:
        held = torch.empty(resident, dtype=U8)  # something else living on the device
    step = FlatStart(phase, fixed, per_sample, root)
    step.meter = meter
    result = find_max_batch_size(step, meter=meter)
    best = step.largest_within(result.budget_bytes, baseline=resident)
    assert 0.93 * best <= result.batch_size <= best, [a.batch_size for a in result.attempts]
    assert len(result.attempts) <= 8, [a.batch_size for a in result.attempts]
    check_attempts(result, step, baseline=resident)
    assert step.starts == [resident] * len(step.calls)
    del held


@pytest.mark.parametrize(("phase", "fixed", "per_sample", "root"), FLAT_STARTS[:4])
def test_flat_start_with_multiple_of_and_without_memory_counted_before(
    phase, fixed, per_sample, root
):
    step = FlatStart(phase, fixed, per_sample, root)
    result = find_max_batch_size(step, meter=TrackedMeter(MiB), multiple_of=8, min_batch_size=2)
    best = step.largest_within(result.budget_bytes) // 8 * 8
    assert 0.93 * best <= result.batch_size <= best
    assert len(result.attempts) <= 8
    assert all(b % 8 == 0 for b in step.calls)
    check_attempts(result, step)


# -- steps as real training steps allocate ------------------------------------------------------


class CountedMeter(MemoryMeter):
    """A device that only counts: allocations past ``capacity`` raise a CUDA-style
    out-of-memory error and record what was asked for (``refused``), as the tracked meter
    does, without holding memory, so thousands of searches run in seconds."""

    def __init__(self, capacity: int, resident: int = 0) -> None:
        self.device = torch.device("cpu")
        self.limit, self.used, self.top, self.asked = capacity, resident, resident, None

    def capacity(self) -> int:
        return self.limit

    def current(self) -> int:
        return self.used

    def peak(self) -> int:
        return self.top

    def reset_peak(self) -> None:
        self.top, self.asked = self.used, None

    def refused(self) -> int | None:
        return self.asked

    def release(self, full: bool = False) -> None:
        pass

    def take(self, nbytes: int) -> None:
        if self.used + nbytes > self.limit:
            self.asked = self.used + nbytes
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (counted)")
        self.used += nbytes
        self.top = max(self.top, self.used)


@dataclass
class Phased:
    """A training step as its allocations at batch size ``b``: the inputs (``inputs`` bytes a
    sample); per layer, a ``workspace`` freed at once and the activation the forward pass keeps
    (``acts`` bytes a sample, plus ``root * sqrt(b)``); in backward, per layer from the last,
    the input's gradient (the activation's size plus ``transient`` bytes a sample, as an
    embedding's dense gradient of its output) and the layer's weight gradient (``grads``,
    kept until the update); the optimizer ``state`` the first call creates and keeps; the
    update's ``temp`` bytes. Every allocation rounds up to ``grain`` bytes.

    The peak is the largest of these phases: flat where the update or a workspace sets it,
    kinked where the phase that binds changes, stepped by the rounding, higher on the first
    call by the state it creates; an out-of-memory error reports only the allocation that
    failed. So are the real steps of a wide MLP with Adam, an embedding-heavy model, and a
    model with a large fixed workspace (benchmarks/probe_vs_peers.py)."""

    acts: tuple[float, ...]
    grads: tuple[int, ...]
    inputs: float = 0
    workspace: int = 0
    transient: float = 0
    root: float = 0
    state: int = 0
    temp: int = 0
    grain: int = 1
    calls: list[int] = field(default_factory=list, init=False, repr=False)
    meter: CountedMeter | None = field(default=None, init=False, repr=False)

    def size(self, per_sample: float, b: int, root: float = 0) -> int:
        nbytes = int(per_sample * b + root * b**0.5)
        return -(-nbytes // self.grain) * self.grain

    def run(self, meter: CountedMeter, b: int, first: bool) -> None:
        held: list[int] = []  # what was taken, in order; 0 once freed

        def take(nbytes: int) -> int:
            meter.take(nbytes)
            held.append(nbytes)
            return len(held) - 1

        def free(i: int) -> None:
            meter.used -= held[i]
            held[i] = 0

        try:
            take(self.size(self.inputs, b))
            kept = []
            for i, act in enumerate(self.acts):
                if i == 0:
                    free(take(self.workspace))
                kept.append(take(self.size(act, b, self.root)))
            gradient = None
            for act, grad, activation in zip(
                reversed(self.acts), reversed(self.grads), reversed(kept), strict=True
            ):
                new = take(self.size(act + self.transient, b, self.root))
                if gradient is not None:
                    free(gradient)
                gradient = new
                take(grad)  # kept until the update
                free(activation)
            free(gradient)
            if first:
                meter.take(self.state)  # kept: the optimizer state lives on
            free(take(self.temp))
        finally:
            meter.used -= sum(held)

    def __call__(self, b: int) -> None:
        self.calls.append(b)
        self.run(self.meter, b, first=len(self.calls) == 1)

    def need(self, b: int) -> int:
        """The peak above what was in use before a later call (the state kept)."""
        meter = CountedMeter(1 << 62)
        self.run(meter, b, first=False)
        return meter.top

    def largest_within(self, budget: int, start: int, multiple_of: int = 1) -> int:
        return largest_within(self.need, budget, start) // multiple_of * multiple_of


def search_phased(step: Phased, capacity: int, resident: int, **kwargs):
    """The search over ``step`` on a counting device, and the largest size within its budget."""
    step.meter = CountedMeter(capacity, resident)
    result = find_max_batch_size(step, meter=step.meter, **kwargs)
    start = resident + step.state
    best = step.largest_within(result.budget_bytes, start, kwargs.get("multiple_of", 1))
    for attempt in result.attempts[1:]:  # the first call also creates the state
        need = start + step.need(attempt.batch_size)
        assert attempt.fitted == (need <= result.budget_bytes), attempt
    assert result.batch_size in [a.batch_size for a in result.attempts if a.fitted]
    return result, best


# What the real flat-start workloads allocate, in bytes, with the memory in use before the step
# and the device's capacity (as in the benchmark). The old search took 9 to 13 sizes on most of
# them: it stepped through the flat stretch 16x at a time and crept up to the kinks.
REAL_SHAPES = {
    # wide_mlp_adam: 10.6 MiB of parameters, Adam's state and update temporaries twice that;
    # the end of backward (all gradients live) binds until the activations take over.
    "wide_adam": (
        Phased(acts=(6144, 6144, 6144, 6144, 40), grads=(1_575_000, 9_443_000, 61_000, 0, 0),
               inputs=1024, state=22_160_000, temp=22_160_000),
        10_580_000, 80 * MiB,
    ),
    # embedding_heavy: a 24.4 MiB table with a dense gradient and Adam's state; the update's
    # temporaries set a flat peak that backward's per-sample transient (15x what the forward
    # pass keeps) crosses only 10% below the largest size.
    "embedding": (
        Phased(acts=(512, 40), grads=(25_600_000, 5_000), inputs=128, transient=8192,
               state=51_210_000, temp=51_210_000),
        25_605_000, 160 * MiB,
    ),
    # fixed_workspace: a 96 MiB scratch buffer in the forward pass sets the peak up to about
    # two thirds of the largest size.
    "workspace": (
        Phased(acts=(2048, 2048, 40), grads=(525_000, 20_000, 0), inputs=1024,
               workspace=96 * MiB, state=1_090_000, temp=1_090_000),
        545_000, 160 * MiB,
    ),
}  # fmt: skip


def _real_cases():
    """Each shape at four capacities, two headrooms and two grains (512: how CUDA's allocator
    rounds), where batch size 1 fits."""
    for shape, (step, resident, capacity) in REAL_SHAPES.items():
        for scale in (0.8, 1.0, 1.5, 3.0):
            for headroom in (0.05, 0.0):
                for grain in (1, 512):
                    rounded = replace(step, grain=grain)
                    need = resident + rounded.state + rounded.need(1)
                    if need <= int(capacity * scale) * (1 - headroom):
                        yield pytest.param(shape, scale, headroom, grain,
                                           id=f"{shape}-x{scale}-h{headroom}-g{grain}")  # fmt: skip


@pytest.mark.parametrize(("shape", "capacity_scale", "headroom", "grain"), list(_real_cases()))
def test_real_flat_starts_take_at_most_8_sizes(shape, capacity_scale, headroom, grain):
    step, resident, capacity = REAL_SHAPES[shape]
    step = replace(step, grain=grain)
    capacity = int(capacity * capacity_scale)
    result, best = search_phased(step, capacity, resident, headroom=headroom)
    tried = [a.batch_size for a in result.attempts]
    assert 0.93 * best <= result.batch_size <= best, (best, tried)
    assert len(result.attempts) <= 8, (best, tried)


def random_phased(rng: random.Random) -> tuple[Phased, int, int, dict]:
    """A random step, the memory in use before it and the search's options, on a 1 GiB device:
    1 to 4 layers, fixed phases (update temporaries, a workspace, gradients) up to half the
    device, optimizer state, backward transients, square-root terms, allocator rounding up to
    0.5% of the device a piece, ``multiple_of`` 8 and ``max_batch_size``; the largest size
    within the budget lies log-uniformly in 6..300,000."""
    capacity = 1 << 30

    def fixed(most: float, chance: float) -> int:
        return int(rng.uniform(0, most) * capacity) if rng.random() < chance else 0

    while True:
        headroom = rng.choice([0.0, 0.05, 0.05, 0.1])
        budget = int(capacity * (1 - headroom))
        layers = rng.randint(1, 4)
        step = Phased(
            acts=tuple(rng.uniform(0.1, 1) for _ in range(layers)),
            grads=tuple(fixed(0.1, 0.8) for _ in range(layers)),
            inputs=rng.uniform(0, 0.3),
            workspace=fixed(0.5, 0.3),
            transient=rng.uniform(0, 4) if rng.random() < 0.4 else 0,
            root=rng.uniform(0, 30) if rng.random() < 0.3 else 0,
            state=fixed(0.3, 0.6),
            temp=fixed(0.4, 0.6),
        )
        resident = fixed(0.25, 0.8)
        start = resident + step.state
        if start + step.need(0) >= 0.97 * budget:
            continue
        # Scale the per-sample bytes so the largest size lands near the target.
        target = math.exp(rng.uniform(math.log(6), math.log(300_000)))
        scale = step.largest_within(budget, start) / target
        step = replace(
            step,
            acts=tuple(a * scale for a in step.acts),
            inputs=step.inputs * scale,
            transient=step.transient * scale,
            root=step.root * scale,
            grain=rng.choice([1, 1, capacity // 20_000, capacity // 500, capacity // 200]),
        )
        kwargs = {"headroom": headroom, "multiple_of": rng.choice([1, 1, 1, 8])}
        if rng.random() < 0.15:
            kwargs["max_batch_size"] = max(8, int(target * rng.uniform(0.8, 3)))
        if start + step.need(kwargs["multiple_of"]) <= budget:
            return step, capacity, resident, kwargs


def test_simulation_of_random_flat_starts():
    """2,000 random steps: every answer ran, fitted, and is at least 0.93 of the largest size
    within the budget. At most 8 sizes but for about 1 in 60 (9 at most; they are kinks just
    below the answer behind a long flat stretch, or out-of-memory readings that say little:
    the budget lies close to the capacity where the step needs most of the device whatever the
    batch), about 6 on average."""
    rng = random.Random(0)
    sizes = []
    for _ in range(2000):
        step, capacity, resident, kwargs = random_phased(rng)
        result, best = search_phased(step, capacity, resident, **kwargs)
        if "max_batch_size" in kwargs:
            best = min(best, _round(kwargs["max_batch_size"], kwargs["multiple_of"]))
        tried = [a.batch_size for a in result.attempts]
        assert 0.93 * best <= result.batch_size <= best, (best, tried)
        sizes.append(len(tried))
    assert max(sizes) <= 9
    assert sum(n > 8 for n in sizes) <= 0.02 * len(sizes)
    assert sum(sizes) / len(sizes) <= 6.3


def _round(size: int, multiple_of: int) -> int:
    return size // multiple_of * multiple_of


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_max_attempts_stops_the_search_with_the_largest_size_that_ran(max_attempts):
    step = Synthetic(0, 2000, quadratic=30)  # the line overshoots, so the search needs several
    unlimited = find_max_batch_size(Synthetic(0, 2000, quadratic=30), meter=TrackedMeter(MiB))
    assert len(unlimited.attempts) > 3
    result = find_max_batch_size(step, meter=TrackedMeter(MiB), max_attempts=max_attempts)
    assert step.calls == [a.batch_size for a in unlimited.attempts[:max_attempts]]
    assert result.batch_size == max(a.batch_size for a in result.attempts if a.fitted)
    check_attempts(result, step)


def test_max_batch_size_bounds_the_search():
    step = Synthetic(0, 10)
    result = find_max_batch_size(step, meter=TrackedMeter(MiB), max_batch_size=100)
    assert result.batch_size == 100
    assert max(step.calls) == 100
    assert result.upper_bound == 100
    check_attempts(result, step)


@pytest.mark.parametrize("multiple_of", [8, 64])
def test_multiple_of_is_respected(multiple_of):
    step = Synthetic(5000, 777)
    result = find_max_batch_size(step, meter=TrackedMeter(MiB), multiple_of=multiple_of)
    best = largest_linear(result.budget_bytes, 5000, 777) // multiple_of * multiple_of
    assert result.batch_size % multiple_of == 0
    assert 0.93 * best <= result.batch_size <= best
    assert all(b % multiple_of == 0 for b in step.calls)
    check_attempts(result, step)


def test_max_batch_size_that_is_not_a_multiple_rounds_down():
    step = Synthetic(0, 10)
    result = find_max_batch_size(step, meter=TrackedMeter(MiB), max_batch_size=100, multiple_of=8)
    assert result.batch_size == result.upper_bound == 96
    assert all(b % 8 == 0 and b <= 96 for b in step.calls)


class NoPeakMeter(TrackedMeter):
    """A device that reports no peak (like MPS): the probe must search instead of predict."""

    def peak(self):
        return None


@pytest.mark.parametrize("max_batch_size", [None, 300])
def test_without_peak_readings_it_searches_and_returns_a_size_that_ran(max_batch_size):
    step = Synthetic(10_000, 1000)
    result = find_max_batch_size(
        step, meter=NoPeakMeter(MiB), headroom=0.0, max_batch_size=max_batch_size
    )
    best = min(largest_linear(MiB, 10_000, 1000), max_batch_size or 10**9)
    assert 0.93 * best <= result.batch_size <= best
    assert result.memory_model is None
    assert all(a.peak_bytes is None for a in result.attempts)
    check_attempts(result, step)
    if max_batch_size is None:
        assert result.ooms > 0
    else:
        assert result.batch_size == max_batch_size


def test_without_peak_readings_the_budget_is_the_cap():
    """Like MPS: no peak to judge a size by, so the headroom holds by capping the device."""
    step = Synthetic(10_000, 1000)
    meter = NoPeakMeter(MiB)
    result = find_max_batch_size(step, meter=meter, headroom=0.2)
    best = largest_linear(result.budget_bytes, 10_000, 1000)
    assert 0.93 * best <= result.batch_size <= best
    assert meter.capacity() == MiB  # the cap is lifted afterwards
    assert result.capacity_bytes == MiB


def test_a_step_that_needs_most_of_the_device_whatever_the_batch_fits():
    """9,500 of 10,000 bytes at every size: the batch adds nothing, so there is nothing to keep
    the headroom for, and the bound is the answer."""

    def step(b):
        torch.empty(9500, dtype=U8)

    result = find_max_batch_size(step, meter=TrackedMeter(10_000), headroom=0.1, max_batch_size=64)
    assert result.batch_size == 64
    assert result.budget_bytes == 9950


def test_batch_size_one_that_runs_out_of_memory():
    capacity = 64 * KiB

    def step(b):
        held = torch.empty(3000, dtype=U8)
        torch.empty(100 * KiB, dtype=U8)
        del held

    with pytest.raises(BatchSizeOneDoesNotFit) as info:
        find_max_batch_size(step, meter=TrackedMeter(capacity))
    message = str(info.value)
    assert format_bytes(3000) in message  # what it reached before running out
    assert format_bytes(capacity) in message
    assert "memory budget" in message  # and a way out


def test_batch_size_one_over_the_budget():
    """Size 1 runs, but a second size runs out of memory, so nothing tells what the step needs
    whatever the batch: the budget keeps the headroom of the whole free memory."""
    step = Synthetic(8600, 900)  # 9500 bytes at size 1, 10,400 at size 2

    with pytest.raises(BatchSizeOneDoesNotFit) as info:
        find_max_batch_size(step, meter=TrackedMeter(10_000), headroom=0.1)
    assert step.calls == [1, 2]
    message = str(info.value)
    assert format_bytes(9500) in message
    assert format_bytes(9000) in message  # the budget
    assert format_bytes(10_000) in message  # the capacity


def test_other_errors_propagate_unchanged():
    error = ValueError("bad batch")

    def step(b):
        torch.empty(100 * b, dtype=U8)
        if b > 1:
            raise error

    meter = TrackedMeter(MiB)
    with pytest.raises(ValueError) as info:
        find_max_batch_size(step, meter=meter)
    assert info.value is error
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "step"
    torch.empty(1000, dtype=U8)
    assert meter.current() == 0  # the meter was left on the way out


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"step": "train"}, "step"),
        ({"meter": object()}, "meter"),
        ({"headroom": -0.1}, "headroom"),
        ({"headroom": 1.0}, "headroom"),
        ({"headroom": "5%"}, "headroom"),
        ({"headroom": float("nan")}, "headroom"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": -4}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_batch_size": 4, "multiple_of": 8}, "multiple_of"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"multiple_of": True}, "multiple_of"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"tolerance": "2%"}, "tolerance"),
    ],
)
def test_find_max_batch_size_rejects_bad_input(kwargs, field):
    step = Synthetic(0, 1)
    arguments = {"step": step, "meter": TrackedMeter(MiB), **kwargs}
    with pytest.raises(InvalidInputError) as info:
        find_max_batch_size(arguments.pop("step"), **arguments)
    message = str(info.value)
    assert field in message
    assert "must" in message or "raise" in message
    assert step.calls == []


# -- probe: helpers ----------------------------------------------------------------------------


def make_task(samples=256, features=16, classes=4, step=None, model=None, **kwargs) -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return Task(
        model=model
        or (lambda: nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))),
        train_data=(x, y),
        loss=None if step else F.cross_entropy,
        step=step,
        **kwargs,
    )


def gram_step(model, batch):
    """A loss with a batch-by-batch workspace: memory grows with the square of the batch."""
    x, y = batch
    gram = x @ x.T
    return F.cross_entropy(model(x), y) + 0 * gram.mean()


class CountingStep:
    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def __call__(self, model, batch):
        self.sizes.append(len(batch[0]))
        if self.inner is not None:
            return self.inner(model, batch)
        x, y = batch
        return F.cross_entropy(model(x), y)


class Net(nn.Module):
    """Batch norm (buffers that training changes) and dropout (which draws random numbers)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))


def trained(model: nn.Module, steps: int = 3):
    """The model, an AdamW with state after a few updates, and gradients left in place."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model, optimizer


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][name]), name
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None), name
        assert grad is None or torch.equal(grad, other), name
    state_before, state_after = before["optimizer"]["state"], after["optimizer"]["state"]
    assert state_before.keys() == state_after.keys()
    for pid, state in state_before.items():
        assert state.keys() == state_after[pid].keys()
        for key, value in state.items():
            other = state_after[pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    assert before["training"] == after["training"]


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict(keep_vars=True).values())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.untyped_storage().nbytes() for t in tensors)


# -- probe: real training steps ----------------------------------------------------------------


@pytest.mark.slow
def test_probe_builtin_example_returns_a_size_that_really_trains(trains_fresh):
    from autobatch import examples

    task = examples.cnn(samples=256)
    capacity = 8 * MiB
    meter = TrackedMeter(capacity)
    result = probe(task, meter=meter, cache=False)
    assert result.batch_size >= 2
    assert all(a.peak_bytes <= result.budget_bytes for a in result.attempts if a.fitted)
    assert meter.current() == 0
    # The answer trains within the budget on a fresh device, and a clearly larger one does not.
    for batch_size, fits in ((result.batch_size, True), (2 * result.batch_size, False)):
        assert trains_fresh(task, batch_size, capacity, result.budget_bytes) == fits, batch_size


def test_probe_builtin_digits_under_a_memory_budget_string():
    from autobatch import examples

    task = examples.digits()
    result = probe(task, memory_budget="2MiB", cache=False)
    assert result.capacity_bytes == 2 * MiB
    assert 1 <= result.batch_size <= task.train_size
    best = [a for a in result.attempts if a.batch_size == result.batch_size]
    assert best[-1].fitted and best[-1].peak_bytes <= result.budget_bytes


def test_probe_that_runs_out_of_memory_leaves_memory_as_it_found_it():
    task = make_task(samples=2048, step=gram_step)
    meter = TrackedMeter(MiB)
    with meter:
        resident = torch.empty(64 * KiB, dtype=U8)
    result = probe(task, meter=meter, cache=False)
    assert result.ooms > 0
    assert meter.current() == 64 * KiB
    assert result.batch_size >= 1
    assert all(a.peak_bytes <= result.budget_bytes for a in result.attempts if a.fitted)
    assert [a for a in result.attempts if a.batch_size == result.batch_size][-1].fitted
    del resident


def test_probe_restores_model_optimizer_and_random_generators_bit_for_bit():
    torch.manual_seed(0)
    model, optimizer = trained(Net())
    model.head.eval()  # a mode flag the user chose
    param_ids = [id(p) for p in model.parameters()]

    def step(model, batch):
        x, y = batch
        random.random()
        np.random.rand()
        return gram_step(model, (x + 0.01 * torch.randn_like(x), y))

    task = make_task(samples=2048, step=step, model=Net)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = snapshot(model, optimizer)
    held = {name: p.grad for name, p in model.named_parameters()}  # references the user keeps
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    meter = TrackedMeter(MiB)
    # multiple_of=2: batch norm cannot train on a single sample.
    result = probe(task, meter=meter, model=model, optimizer=optimizer, multiple_of=2, cache=False)
    assert result.ooms > 0  # restored across failed attempts too
    assert_same(before, snapshot(model, optimizer))
    # The same gradient tensors, holding what they held before.
    assert all(p.grad is held[name] for name, p in model.named_parameters())
    assert all(torch.equal(held[n], g) for n, g in before["grads"].items() if g is not None)
    assert [id(p) for p in model.parameters()] == param_ids
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == param_ids
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    numpy_now = np.random.get_state()
    assert numpy_now[0] == rng[2][0] and np.array_equal(numpy_now[1], rng[2][1])
    assert numpy_now[2:] == rng[2][2:]
    # What the meter holds afterwards is exactly the user's training state.
    assert meter.current() == state_bytes(model, optimizer)


def test_probe_restores_the_user_model_when_even_batch_size_one_fails():
    calls = []

    def step(model, batch):
        calls.append(1)
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        if len(calls) % 2 == 0:  # the second step of each attempt fills the device
            hold = []
            while True:
                hold.append(torch.empty(64, dtype=U8))
        return loss

    model, optimizer = trained(Net())
    before = snapshot(model, optimizer)
    task = make_task(samples=64, step=step, model=Net)
    with pytest.raises(BatchSizeOneDoesNotFit):
        probe(
            task,
            meter=TrackedMeter(64 * KiB),
            model=model,
            optimizer=optimizer,
            multiple_of=2,
            cache=False,
        )
    assert_same(before, snapshot(model, optimizer))


def test_error_in_the_step_propagates_unchanged_and_the_model_is_restored():
    error = ValueError("labels out of range")
    calls = []

    def step(model, batch):
        calls.append(1)
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        if len(calls) == 3:  # in the second attempt, after the first one trained the model
            raise error
        return loss

    model, optimizer = trained(Net())
    before = snapshot(model, optimizer)
    meter = TrackedMeter(MiB)
    task = make_task(step=step, model=Net)
    with pytest.raises(ValueError) as info:
        probe(task, meter=meter, model=model, optimizer=optimizer, multiple_of=2, cache=False)
    assert info.value is error
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "step"
    assert_same(before, snapshot(model, optimizer))
    held = meter.current()
    torch.empty(10_000, dtype=U8)
    assert meter.current() == held  # the meter is no longer active


class RunningMean(nn.Module):
    """A buffer the forward pass updates and ``state_dict`` leaves out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.register_buffer("mean", torch.zeros(16), persistent=False)

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.body(x)


def test_probe_restores_buffers_left_out_of_the_state_dict():
    torch.manual_seed(0)
    model = RunningMean()
    model(torch.randn(8, 16))
    optimizer = torch.optim.AdamW(model.parameters())
    mean = model.mean
    before = mean.clone()
    meter = TrackedMeter(MiB)
    probe(make_task(model=RunningMean), meter=meter, model=model, optimizer=optimizer, cache=False)
    assert model.mean is mean and torch.equal(mean, before)
    assert meter.current() == state_bytes(model, optimizer) + mean.untyped_storage().nbytes()


class Changing(nn.Module):
    """State a forward pass changes besides its tensors' values: a buffer replaced by one of
    another shape, one registered as None and set, and a random generator of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.register_buffer("last", torch.zeros(0, 16))
        self.register_buffer("seen", None)
        self.noise = torch.Generator().manual_seed(3)

    def forward(self, x):
        if self.training:
            self.last = x.detach().clone()
            self.seen = x.detach().mean(0)
            x = x + 0.01 * torch.randn(x.shape, generator=self.noise)
        return self.body(x)


class GlobalStep(torch.optim.SGD):
    """Optimizer state kept under a key that is not a parameter."""

    def step(self, closure=None):
        self.state["global"]["step"] = self.state["global"].get("step", 0) + 1
        return super().step(closure)


def test_probe_restores_replaced_and_none_buffers_own_generators_and_any_optimizer_key():
    model = Changing()
    optimizer = GlobalStep(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 16), torch.randint(0, 4, (5,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.seen = None
    before, last = snapshot(model, optimizer), model.last.clone()
    noise, step = model.noise.get_state(), optimizer.state["global"]["step"]
    probe(make_task(model=Changing), meter=TrackedMeter(MiB), model=model, optimizer=optimizer)
    assert_same(before, snapshot(model, optimizer))
    assert torch.equal(model.last, last) and model.seen is None and "seen" in model._buffers
    assert torch.equal(model.noise.get_state(), noise)
    assert optimizer.state["global"] == {"step": step}


def _steps_at(task: Task, batch_size: int, capacity: int, steps: int) -> None:
    """Train a fresh model ``steps`` steps at ``batch_size`` under ``capacity`` bytes."""
    meter = TrackedMeter(capacity)
    with meter:
        model, optimizer = build(task)
    step = TrainStep(task, model, optimizer)
    for _ in range(steps):
        with meter:
            step(tuple(t[:batch_size].clone() for t in task.train_data))  # the batch on the device


def test_an_fp16_step_the_loss_scale_would_skip_still_measures_the_optimizer_state():
    """Training's first fp16 steps overflow at a loss scale of 2**16 and are skipped, so Adam's
    state comes only once the scale has come down; the probe's steps must create it."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 256, generator=generator), 100 * torch.randn(2048, 256)
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)),
        train_data=(x, y),
        loss=lambda out, target: F.mse_loss(out.float(), target, reduction="sum") / 10,
        optimizer=torch.optim.Adam,
        precision="fp16",
    )
    result = probe(task, memory_budget="8MiB", cache=False)
    _steps_at(task, result.batch_size, result.capacity_bytes, steps=20)  # the scale drops to 32


def test_a_model_in_eval_mode_is_probed_in_training_mode_and_left_in_eval_mode():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 4))

    task = make_task(samples=2048, model=make)
    sizes = {}
    for mode in ("train", "eval"):
        model = getattr(make(), mode)()
        optimizer = torch.optim.AdamW(model.parameters())
        found = probe(task, memory_budget="2MiB", model=model, optimizer=optimizer, cache=False)
        sizes[mode] = found.batch_size
        assert model.training == (mode == "train") and model[2].training == (mode == "train")
    assert sizes["eval"] == sizes["train"]  # dropout's masks measured either way


def test_fp16_loss_scaling_of_an_fp16_model_is_one_line_with_the_fix():
    task = make_task(model=lambda: nn.Linear(16, 4).half(), precision="fp16")
    with pytest.raises(InvalidInputError, match="keep the model's parameters in float32") as info:
        probe(task, memory_budget="1MiB", cache=False)
    assert "\n" not in str(info.value)


def test_a_compiled_model_is_probed_eagerly_with_a_warning_and_compiles_again_after(caplog):
    graphs = []

    def backend(graph_module, inputs):
        graphs.append(graph_module)
        return graph_module.forward

    class Fresh(nn.Module):  # code dynamo has not met yet in this process
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)

        def forward(self, x):
            return self.b(F.gelu(self.a(x)))

    task = make_task(samples=1024, model=lambda: torch.compile(Fresh(), backend=backend))
    result = probe(task, memory_budget="1MiB", cache=False)
    assert result.batch_size > 1 and "runs torch.compile'd modules eagerly" in caplog.text
    compiled = torch.compile(Fresh(), backend=backend)
    F.cross_entropy(compiled(torch.randn(8, 16)), torch.zeros(8, dtype=torch.long)).backward()
    assert graphs  # the probe's dispatch mode left no "run eagerly" mark on Fresh's code


def lazy_model() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 4))


def test_probe_builds_a_lazy_model_and_refuses_one_it_could_not_hand_back():
    task = make_task(samples=512, model=lazy_model)
    result = probe(task, meter=TrackedMeter(MiB), cache=False)
    eager = probe(make_task(samples=512), meter=TrackedMeter(MiB), cache=False)  # nn.Linear(16, 32)
    assert result.batch_size == eager.batch_size  # the same step once its shapes are known
    model = lazy_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(InvalidInputError, match="run one forward pass") as info:
        probe(task, meter=TrackedMeter(MiB), model=model, optimizer=optimizer, cache=False)
    assert "\n" not in str(info.value)
    assert isinstance(model[0], nn.LazyLinear) and model[0].has_uninitialized_params()


def test_shape_mismatch_propagates_as_the_error_torch_raised():
    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(16, 4)

        def forward(self, x):
            return self.linear(x)

    task = Task(
        model=Narrow,
        train_data=(torch.randn(64, 8), torch.randint(0, 4, (64,))),
        loss=F.cross_entropy,
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        probe(task, memory_budget="1MiB", cache=False)
    assert type(info.value) is RuntimeError
    assert not isinstance(info.value, AutobatchError)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "forward" and f.filename == __file__ for f in frames)


def test_batch_size_one_that_does_not_fit_names_the_memory_it_measured():
    capacity = 6 * KiB  # the model fits, its gradients and optimizer state do not
    meter = TrackedMeter(capacity)
    with pytest.raises(BatchSizeOneDoesNotFit) as info:
        probe(make_task(), meter=meter, cache=False)
    message = str(info.value)
    assert format_bytes(capacity) in message
    sizes = set(re.findall(r"\d+(?:\.\d+)? (?:B|KiB|MiB)", message))
    budget = format_bytes(int(capacity * 0.95))
    measured = sizes - {format_bytes(capacity), budget}
    assert measured, message
    assert meter.current() == 0


def test_model_that_does_not_fit_at_all():
    meter = TrackedMeter(1000)
    task = make_task(model=lambda: nn.Linear(64, 64))
    with pytest.raises(BatchSizeOneDoesNotFit) as info:
        probe(task, meter=meter, cache=False)
    assert "model" in str(info.value)
    assert format_bytes(1000) in str(info.value)
    assert meter.current() == 0


def test_probe_respects_multiple_of_and_the_size_of_the_data():
    step = CountingStep()
    result = probe(make_task(samples=200, step=step), meter=TrackedMeter(MiB), multiple_of=8)
    assert result.batch_size == result.upper_bound == 200
    assert all(size % 8 == 0 and size <= 200 for size in step.sizes)
    step.sizes.clear()
    result = probe(
        make_task(samples=200, step=step), meter=TrackedMeter(MiB), max_batch_size=60, cache=False
    )
    assert result.batch_size == 60
    assert max(step.sizes) == 60


def test_probe_reads_a_torch_dataset():
    class Pairs(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(40, 16)
            self.y = torch.randint(0, 4, (40,))

        def __len__(self):
            return 40

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    task = Task(model=lambda: nn.Linear(16, 4), train_data=Pairs(), loss=F.cross_entropy)
    result = probe(task, meter=TrackedMeter(MiB), cache=False)
    assert result.batch_size == 40


def test_variable_length_samples_are_probed_at_their_longest():
    """Sequences padded to the longest in each batch: the first 400 are short, the last 100
    eight times longer. Probing the first samples would give a size whose batches of long
    sequences run out of memory; the probe measures the longest and says so."""

    class Sequences(torch.utils.data.Dataset):
        def __init__(self) -> None:
            generator = torch.Generator().manual_seed(0)
            lengths = [16] * 400 + [128] * 100
            self.items = [
                (torch.randint(0, 50, (n,), generator=generator), torch.tensor(i % 3))
                for i, n in enumerate(lengths)
            ]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def pad(samples):
        tokens = nn.utils.rnn.pad_sequence([t for t, _ in samples], batch_first=True)
        return tokens, torch.stack([y for _, y in samples])

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.head = nn.Linear(64, 3)

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens)).mean(1))

    data = Sequences()
    task = Task(model=Bag, train_data=data, loss=F.cross_entropy, collate_fn=pad)
    budget = 2 * MiB
    result = probe(task, memory_budget=budget, cache=False)
    assert "largest has 129 elements" in result.extra["samples"]  # 128 tokens and a label

    def long_batch_fits(n: int) -> bool:
        meter = TrackedMeter(result.budget_bytes)
        with meter:
            model, optimizer = build(task)
            step = TrainStep(task, model, optimizer)
            batch = pad([data[i] for i in range(len(data) - n, len(data))])
            try:
                step(batch)
                step(batch)
                return True
            except torch.OutOfMemoryError:
                return False

    assert long_batch_fits(min(result.batch_size, 100))
    # What probing the short first samples alone would have answered does not fit long ones.
    short = Task(model=Bag, train_data=torch.utils.data.Subset(data, range(400)),
                 loss=F.cross_entropy, collate_fn=pad)  # fmt: skip
    naive = probe(short, memory_budget=budget, cache=False)
    assert naive.batch_size > result.batch_size
    assert not long_batch_fits(min(naive.batch_size, 100))


# -- probe: cache ------------------------------------------------------------------------------


def test_second_probe_comes_from_the_cache_after_one_attempt_at_its_size(tmp_path):
    step = CountingStep()
    task = make_task(step=step)
    first = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert not first.cached and step.sizes
    assert len(list(tmp_path.glob("*.json"))) == 1
    step.sizes.clear()
    second = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert second.cached
    # One attempt verifying the cached size; one step (the optimizer state) and one evaluation
    # verifying the cached evaluation size.
    verify = [first.attempts[0].batch_size, first.eval_batch_size]
    assert step.sizes == [first.batch_size] * 2 + verify
    assert second.batch_size == first.batch_size
    assert second.attempts == first.attempts
    assert second.step_time == first.step_time  # the throughput curve comes back too

    third = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path, cache=False)
    assert not third.cached and step.sizes

    step.sizes.clear()
    other_capacity = probe(task, meter=TrackedMeter(2 * MiB), cache_dir=tmp_path)
    assert not other_capacity.cached and step.sizes

    step.sizes.clear()
    wider = make_task(step=step, model=lambda: nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 4)))
    assert not probe(wider, meter=TrackedMeter(MiB), cache_dir=tmp_path).cached
    assert step.sizes

    step.sizes.clear()
    assert not probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path, headroom=0.2).cached
    assert step.sizes


def test_cache_false_writes_nothing(tmp_path):
    probe(make_task(), meter=TrackedMeter(MiB), cache_dir=tmp_path, cache=False)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "env-cache"))
    step = CountingStep()
    task = make_task(step=step)
    probe(task, meter=TrackedMeter(MiB))
    assert len(list((tmp_path / "env-cache").glob("*.json"))) == 1
    step.sizes.clear()
    hit = probe(task, meter=TrackedMeter(MiB))
    assert hit.cached
    assert step.sizes == [hit.batch_size] * 2 + [hit.attempts[0].batch_size, hit.eval_batch_size]


def test_unreadable_cache_entry_is_ignored_and_replaced(tmp_path):
    step = CountingStep()
    task = make_task(step=step)
    first = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text("{not json")
    step.sizes.clear()
    again = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert not again.cached and step.sizes
    assert again.batch_size == first.batch_size
    assert json.loads(entry.read_text())["batch_size"] == first.batch_size


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path, caplog):
    task = make_task(step=CountingStep())
    first = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.unlink()
    entry.mkdir()  # the entry's name is taken: the final rename fails
    again = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert again.batch_size == first.batch_size  # the probe itself did not fail
    assert "could not write the cache" in caplog.text
    assert list(tmp_path.glob(".*.tmp")) == []


class PlannedCardMeter(TrackedMeter):
    """Stands in for a hardware meter planning for a smaller card, like CudaMeter(limit=...)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    @property
    def name(self) -> str:
        return "Fake GPU (85899345920 bytes)"


def test_a_hardware_meter_limit_is_part_of_the_cache_key(tmp_path):
    step = CountingStep()
    task = make_task(step=step)
    probe(task, meter=PlannedCardMeter(MiB), cache_dir=tmp_path)
    step.sizes.clear()
    assert not probe(task, meter=PlannedCardMeter(2 * MiB), cache_dir=tmp_path).cached
    assert step.sizes
    step.sizes.clear()
    hit = probe(task, meter=PlannedCardMeter(2 * MiB), cache_dir=tmp_path)
    assert hit.cached
    assert step.sizes == [hit.batch_size] * 2 + [hit.attempts[0].batch_size, hit.eval_batch_size]


class Repeated(nn.Module):
    """A width kept as a plain attribute, which ``repr`` does not show, and a scratch buffer
    left out of ``state_dict``."""

    def __init__(self, repeats: int = 1, scratch: int = 1) -> None:
        super().__init__()
        self.repeats = repeats
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.register_buffer("scratch", torch.zeros(scratch), persistent=False)

    def forward(self, x):
        return self.body(x.repeat(1, self.repeats).view(-1, self.repeats, 16).mean(1))


def with_model(model: nn.Module) -> dict:
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}


def frozen_first_layer() -> dict:
    model = Repeated()
    model.body[0].requires_grad_(False)  # no gradient, no optimizer state
    return with_model(model)


def step_repeating(times: int):
    def step(model, batch):
        x, y = batch
        return sum(F.cross_entropy(model(x), y) for _ in range(times))

    return step


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Each pair looks the same to repr(model), state_dict and the step's name and bytecode.
        (lambda: {"step": step_repeating(1)}, lambda: {"step": step_repeating(4)}),
        (
            lambda: {"step": lambda m, b: sum(F.cross_entropy(m(b[0]), b[1]) for _ in range(1))},
            lambda: {"step": lambda m, b: sum(F.cross_entropy(m(b[0]), b[1]) for _ in range(4))},
        ),
        (lambda: with_model(Repeated()), frozen_first_layer),
        (lambda: with_model(Repeated(repeats=1)), lambda: with_model(Repeated(repeats=8))),
        (lambda: with_model(Repeated(scratch=1)), lambda: with_model(Repeated(scratch=4096))),
    ],
    ids=["closure", "constant", "requires-grad", "attribute", "non-persistent-buffer"],
)
def test_what_changes_a_steps_memory_is_part_of_the_cache_key(tmp_path, first, second):
    def run(make):
        kwargs = make()
        step = kwargs.pop("step", None) or step_repeating(1)
        counting = CountingStep(step)
        task = make_task(samples=512, step=counting, model=Repeated)
        result = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path, **kwargs)
        return result, counting.sizes

    assert run(first)[0].cached is False
    assert run(first)[0].cached is True  # the same step again: from the cache
    second_result, sizes = run(second)
    assert not second_result.cached and sizes


class Setting:
    """A setting the step reads from an object the cache key describes only by its type."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats


def test_a_cached_size_runs_once_before_it_is_returned(tmp_path):
    setting = Setting(1)

    def step(model, batch):
        x, y = batch
        return sum(F.cross_entropy(model(x), y) for _ in range(setting.repeats))

    counting = CountingStep(step)
    task = make_task(samples=4096, step=counting, model=Repeated)
    first = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    setting.repeats = 8  # eight forward passes' activations: the same key, more memory
    counting.sizes.clear()
    second = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert counting.sizes[0] == first.batch_size  # the cached size, tried first
    assert not second.cached and second.batch_size < first.batch_size
    counting.sizes.clear()
    third = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)  # the entry replaced
    assert third.cached and third.batch_size == second.batch_size
    # Two training steps at the cached size; then, the optimizer state created by one step at
    # the first size tried, the cached evaluation size once.
    smallest = second.attempts[0].batch_size
    assert counting.sizes == [second.batch_size] * 2 + [smallest, second.eval_batch_size]


def test_a_cached_evaluation_size_runs_once_before_it_is_returned(tmp_path):
    setting = Setting(1)

    def step(model, batch):
        x, y = batch
        if torch.is_grad_enabled():
            return F.cross_entropy(model(x), y)
        kept = [model(x) for _ in range(setting.repeats)]  # evaluation only: more each time
        return F.cross_entropy(sum(kept), y)

    task = make_task(samples=4096, step=step, model=Repeated)
    first = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    setting.repeats = 16  # the same key; training unchanged, evaluation needs more
    second = probe(task, meter=TrackedMeter(MiB), cache_dir=tmp_path)
    assert not second.cached and second.eval_batch_size < first.eval_batch_size
    assert second.batch_size == pytest.approx(first.batch_size, rel=0.1)


# -- probe: bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "memory_budget"),  # the CPU has no limit of its own
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"memory_budget": "-1GB"}, "memory_budget"),
        ({"memory_budget": "2XB"}, "memory_budget"),
        ({"memory_budget": "1MiB", "headroom": 1.5}, "headroom"),
        ({"memory_budget": "1MiB", "max_batch_size": 0}, "max_batch_size"),
        ({"memory_budget": "1MiB", "max_batch_size": 4, "multiple_of": 8}, "multiple_of"),
        ({"memory_budget": "1MiB", "multiple_of": 0}, "multiple_of"),
        ({"memory_budget": "1MiB", "multiple_of": 512}, "multiple_of"),  # only 256 samples
        ({"memory_budget": "1MiB", "model": nn.Linear(16, 4)}, "optimizer"),
    ],
)
def test_probe_rejects_bad_input_before_running_anything(kwargs, field):
    step = CountingStep()
    with pytest.raises(InvalidInputError) as info:
        probe(make_task(step=step), cache=False, **kwargs)
    assert field in str(info.value)
    assert step.sizes == []


def test_probe_needs_a_task():
    with pytest.raises(InvalidInputError, match="Task"):
        probe("digits", memory_budget="1MiB")


def test_probe_sizes_evaluation_too():
    """Evaluation (no gradients) fits a larger batch than training. Checked on its own: with
    the model and the optimizer state on a meter of the probe's budget, the validation
    forward pass fits at the size found and runs out of memory 5% above it."""
    from autobatch import examples
    from autobatch.training import TrainStep, build

    task = examples.mlp()
    result = probe(task, memory_budget="40MiB", cache=False)
    val = task.val_data
    assert result.batch_size < result.eval_batch_size < len(val[0])

    def evaluation_fits(n: int) -> bool:
        meter = TrackedMeter(result.budget_bytes)
        with meter:
            model, optimizer = build(task)
            TrainStep(task, model, optimizer)(tuple(t[:1] for t in task.train_data))
            try:
                with torch.no_grad():  # the batch is on the device too, as in training
                    task.batch_loss(model.eval(), tuple(t[:n].clone() for t in val))
                return True
            except torch.OutOfMemoryError:
                return False

    assert evaluation_fits(result.eval_batch_size)
    assert not evaluation_fits(int(result.eval_batch_size * 1.05))


def test_the_probe_fits_step_time_through_its_warm_steps():
    """Each size that fit reports one warm step's seconds; the line through them is the
    throughput curve (``ProbeResult.step_time``). A plan runs no kernels, so it has none."""
    task = make_task(
        samples=2048, model=lambda: nn.Sequential(nn.Linear(16, 512), nn.Linear(512, 4))
    )
    result = probe(task, memory_budget="2MiB", cache=False)
    fitted = [a for a in result.attempts if a.fitted]
    assert len(fitted) >= 2 and all(a.step_seconds > 0 for a in fitted)
    assert all(a.step_seconds is None for a in result.attempts if a.oom)
    timing = result.step_time
    assert timing is not None and timing.fixed >= 0 and timing.per_sample >= 0
    assert ProbeResult.from_dict(result.to_dict()).step_time == timing
    assert probe(task, plan_for="2MiB", cache=False).step_time is None


def test_an_lbfgs_answer_still_fits_once_its_history_is_full():
    # L-BFGS's history grows for many steps after the probe's two: the probe must count it.
    torch.manual_seed(0)
    x, y = torch.randn(2048, 128), torch.randn(2048, 128)
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128)),
        train_data=(x, y),
        loss=nn.functional.mse_loss,
        optimizer=lambda params, lr: torch.optim.LBFGS(params, lr=lr, max_iter=5, history_size=20),
        lr=1.0,
    )
    capacity = 16 * MiB
    result = probe(task, meter=TrackedMeter(capacity), cache=False)
    assert 2 <= result.batch_size < 2048, result.batch_size
    fresh = TrackedMeter(capacity)
    with fresh:
        model, optimizer = build(task)
        step = TrainStep(task, model, optimizer)
        for _ in range(8):  # fresh batches: on one, L-BFGS soon converges and stops adding
            step((torch.randn(result.batch_size, 128), torch.randn(result.batch_size, 128)))
    assert len(optimizer.state[optimizer._params[0]]["old_dirs"]) == 20
    assert fresh.peak() <= result.budget_bytes


def test_probe_restores_an_lbfgs_history_it_grew_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=3, history_size=30)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[optimizer._params[0]]
    history = [t.clone() for t in state["old_dirs"]]
    task = make_task(samples=512, optimizer=torch.optim.LBFGS, lr=1.0)
    probe(task, meter=TrackedMeter(MiB), model=model, optimizer=optimizer, cache=False)
    state = optimizer.state[optimizer._params[0]]
    assert len(state["old_dirs"]) == len(history) > 0
    assert all(torch.equal(a, b) for a, b in zip(state["old_dirs"], history, strict=True))


def test_the_evaluation_batch_goes_up_to_the_validation_data_not_the_training_data():
    """64 training samples beside 4096 for validation: evaluation was capped at 64."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4160, 32, generator=generator), torch.randint(0, 2, (4160,))
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 2)),
        train_data=(x[:64], y[:64]), val_data=(x[64:], y[64:]), loss=F.cross_entropy,
    )  # fmt: skip
    found = probe(task, memory_budget="8MiB", cache=False)
    assert found.batch_size == 64 and 64 < found.eval_batch_size <= 4096
    capped = probe(task, memory_budget="8MiB", max_batch_size=48, cache=False)
    assert capped.eval_batch_size <= 48
