"""Find the largest batch size whose real training step fits in accelerator memory.

Peak memory grows close to linearly with the batch size: a fixed part (parameters, gradients,
optimizer state, workspaces) plus a part per sample (inputs and activations). Two measured
sizes fix that line, which predicts the largest size under the budget; that size is then run to
verify it. Real peaks are the largest of several phases (forward, backward, the optimizer
update, workspaces), so they are piecewise linear: flat where a fixed phase sets them (a flat
start), kinked where the phase that binds changes, higher on the first step (which creates the
optimizer state); an out-of-memory error reports only the allocation that failed. The search
therefore keeps bounds that hold for any such peak (lines from the memory in use before the
step), grows geometrically while the readings are flat, aims short of chords that may span a
kink, and after a failure closes the gap with secant steps kept within the bounds. Every size
returned has run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from autobatch import probe_cache, validation, workload
from autobatch.data import BatchSource
from autobatch.errors import AutobatchError, BatchSizeOneDoesNotFit, InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.memory.plan import PlanMeter, build_fake
from autobatch.oom import drop_failed_attempt, is_oom_error, release_if_oom
from autobatch.records import NO_BOUND, MemoryModel, ProbeAttempt, ProbeResult, StepTime
from autobatch.snapshot import RngState, TrainingState, check_restorable, state_tensors
from autobatch.training import TrainStep, autocast, build, has_batch_norm
from autobatch.tuning.prior import fit_step_time
from autobatch.units import format_bytes, parse_bytes
from autobatch.workload import Workload

log = logging.getLogger(__name__)

DEFAULT_HEADROOM = 0.05
DEFAULT_TOLERANCE = 0.02
#: How far one step may reach past the largest size that fitted while the readings show little
#: growth (a fixed phase sets the peaks): flat starts are crossed in a few geometric steps, and
#: an overshoot lands within this factor of a size that fitted.
GROWTH = 128
#: What a plan for a CUDA card keeps back for what a simulation cannot see: the CUDA context
#: (621 MiB measured on an H100 with torch 2.13), cuBLAS's workspace (32 MiB) and cuDNN's,
#: rounded up; and the share of the peak that fake tensors miss (they read 0.93-1.00 of the real
#: peaks of cnn and transformer steps on that H100). See docs/planning.md.
CUDA_RESERVE = 1 << 30
UNSEEN = 0.07
#: Where the search aims while nothing has failed, as a fraction of the size the chord through
#: the two largest readings predicts: a kink past them (a phase that grows faster takes over)
#: makes the chord reach too far.
AIM = 0.97
#: How far short of the secant's crossing the search aims after a failure, as a fraction of the
#: tolerance: past the crossing by a hair (rounding, a slight curve), it would need one more try.
SHORT = 0.4
#: Slopes within this fraction of each other are one line's.
LINE = 0.05
#: A chord less than this fraction as steep as the next one says the growth steepens between
#: them: a fixed phase set the smaller reading.
KINK = 0.25
#: After this many tried sizes, a gap within LATE_TOLERANCE ends the search (if ``tolerance``
#: asks for less): each try costs real steps, and the last percents rarely pay for more tries.
LATE = 7
LATE_TOLERANCE = 0.06


@dataclass(frozen=True)
class StepReading:
    """What a training step can report about its memory, beyond the meter's overall peak.

    A step's peak is the larger of several phases: the optimizer update and the end of
    backward (all gradients live) barely depend on the batch, the start of backward (all
    activations live) grows with it. At small sizes the fixed phases set the peak, so peaks
    alone say little about the growth near the limit. ``activation_bytes``, what the forward
    pass leaves alive, grows exactly in proportion to the batch and places the second
    measurement; ``base_bytes`` (in use before the forward pass) anchors the line.
    """

    scaling_peak_bytes: int
    base_bytes: int
    activation_bytes: int
    peak_bytes: int | None = None  # the whole attempt's peak, where the step reset the meter
    step_seconds: float | None = None  # one warm step (the optimizer state live), synchronised


def _check_bounds(max_batch_size: int | None, multiple_of: int) -> None:
    if max_batch_size is not None and max_batch_size < multiple_of:
        raise InvalidInputError(
            f"max_batch_size={max_batch_size} is below the smallest allowed size "
            f"(multiple_of={multiple_of}); raise max_batch_size or lower multiple_of"
        )


class _OutOfAttempts(Exception):
    """The search ran as many sizes as it was allowed: it stops with what it has."""


def budget_for(capacity: int, headroom: float, fixed: float) -> int:
    """The memory a step may peak at: its peak may grow past ``fixed`` (what it needs whatever
    the batch: parameters, optimizer state, gradients, the update's temporaries) by at most
    ``1 - headroom`` of the memory free above it.

    What grows with the batch (activations, backward's transients, workspaces sized by the
    batch) is what changes with the data and fragments an allocator; the rest is allocated
    the same way every step. A share of the whole card would instead cost a model whose weights
    fill most of it a large part of its batch: here the answer is about ``1 - headroom`` of the
    largest size that fits the capacity, whatever the model takes, like a batch-size margin
    (Lightning's ``margin``).
    """
    fixed = min(max(fixed, 0), capacity)
    return int(capacity - headroom * (capacity - fixed))


@dataclass(frozen=True)
class _Reading:
    """What one size's attempt read: the peak the budget judges, and the peak that grows with
    the batch (the scaling peak where the step reports one; for an out-of-memory error a lower
    bound, the memory it asked for), with the memory in use when the attempt started."""

    batch_size: int
    peak: int
    level: int
    oom: bool
    start: int


@dataclass(frozen=True)
class _Point:
    """A size's reading as the search uses it, clamped to its side of the current budget: exact
    where the size ran (within the budget or past it); a lower bound for an out-of-memory
    error."""

    batch_size: int
    level: int
    fitted: bool
    exact: bool
    start: int


class _Search:
    """The state of one search: what ran, what fitted, what failed.

    The budget (see ``budget_for``) keeps the most free until two sizes have run, then follows
    what they say the step needs whatever the batch; every attempt is judged again against the
    latest budget.
    """

    def __init__(
        self,
        step: Callable[[int], Any],
        meter: MemoryMeter,
        headroom: float,
        steps_per_call: int,
        max_attempts: int | None = None,
    ) -> None:
        self.step = step
        self.meter = meter
        self.capacity = meter.capacity()
        self.headroom = headroom
        self.steps_per_call = steps_per_call
        self.max_attempts = max_attempts
        self.attempts: list[ProbeAttempt] = []
        self.readings: dict[int, _Reading] = {}
        self.best: ProbeAttempt | None = None  # largest that fitted
        self.smallest_failure: int | None = None
        self.before = meter.current() or 0  # memory in use before the latest attempt
        self.bases: list[int] = []
        self.activation: float | None = None  # bytes per sample the forward pass keeps
        self.budget = budget_for(self.capacity, headroom, self.before)

    def run(self, batch_size: int, phase: str) -> ProbeAttempt:
        if self.max_attempts is not None and len(self.attempts) >= self.max_attempts:
            raise _OutOfAttempts
        meter = self.meter
        meter.release()
        meter.reset_peak()
        before = self.before = meter.current() or 0
        start = time.perf_counter()
        oom = False
        reading = None
        try:
            with meter:
                reading = self.step(batch_size)
            meter.synchronize()
        except BaseException as exc:
            if not is_oom_error(exc):
                raise
            oom = True
            drop_failed_attempt(exc)
            del exc
        seconds = time.perf_counter() - start
        peak = meter.peak()
        refused = meter.refused() if oom else None
        meter.release()
        if isinstance(reading, StepReading):
            peak = max(peak or 0, reading.peak_bytes or 0)
            scaling = reading.scaling_peak_bytes
            self.bases.append(reading.base_bytes)
            self.activation = reading.activation_bytes / batch_size
        else:
            scaling = peak
        step_seconds = reading.step_seconds if isinstance(reading, StepReading) else None
        attempt = ProbeAttempt(batch_size, False, oom, peak, seconds, phase, scaling, step_seconds)
        self.attempts.append(attempt)
        if peak is not None:
            # An out-of-memory error needed more than the device had, and at least what it
            # asked for.
            level = max(peak, refused or 0, self.capacity + 1) if oom else scaling
            self.readings[batch_size] = _Reading(batch_size, peak, level, oom, before)
        self._judge()
        attempt = self.attempts[-1]
        log.debug(
            "batch size %d: %s, peak %s (before %s, budget %s)",
            batch_size,
            "fits" if attempt.fitted else ("OOM" if oom else "over budget"),
            format_bytes(peak),
            format_bytes(before),
            format_bytes(self.budget),
        )
        return attempt

    def _judge(self) -> None:
        """Set the budget from the readings so far, and judge every attempt against it. Without
        peak readings the budget stays as it was set: the device's cap."""
        if self.readings:
            self.budget = budget_for(self.capacity, self.headroom, self.fixed_level())
        self.attempts = [
            replace(a, fitted=not a.oom and (a.peak_bytes is None or a.peak_bytes <= self.budget))
            for a in self.attempts
        ]
        fits = [a for a in self.attempts if a.fitted]
        self.best = max(fits, key=lambda a: a.batch_size, default=None)
        self.smallest_failure = min(
            (a.batch_size for a in self.attempts if not a.fitted), default=None
        )

    def fixed_level(self) -> float:
        """What the step needs whatever the batch: the line through the two smallest sizes
        that ran, taken to an empty batch (a flat start's fixed phase where both are on it),
        and no less than the memory in use before the step. That memory alone until two sizes
        have run."""
        fixed = self.base_level()
        ran = sorted((r for r in self.readings.values() if not r.oom), key=lambda r: r.batch_size)
        if len(ran) >= 2:
            a, b = ran[:2]
            slope = max((b.peak - a.peak) / (b.batch_size - a.batch_size), 0.0)
            fixed = max(fixed, a.peak - slope * a.batch_size)
        return fixed

    def _point(self, reading: _Reading) -> _Point:
        """``reading`` as the search uses it, clamped to its side of the budget."""
        if reading.oom:
            return _Point(reading.batch_size, reading.level, False, False, reading.start)
        fitted = reading.peak <= self.budget
        level = min(reading.level, self.budget) if fitted else max(reading.level, self.budget + 1)
        return _Point(reading.batch_size, level, fitted, True, reading.start)

    @property
    def points(self) -> dict[int, _Point]:
        return {size: self._point(r) for size, r in self.readings.items()}

    def fitted_points(self) -> list[_Point]:
        return sorted((self.now(p) for p in self.points.values() if p.fitted), key=_size)

    def failed_points(self) -> list[_Point]:
        return sorted((self.now(p) for p in self.points.values() if not p.fitted), key=_size)

    def now(self, point: _Point) -> _Point:
        """``point`` as the step would read now: memory that became resident since it ran (the
        optimizer state a first step creates) adds to its peak."""
        grown = self.before - point.start
        if grown <= 0:
            return point
        return replace(point, level=point.level + grown, start=self.before)

    def base_level(self) -> int:
        """Memory in use before the step's batch-sized work: no phase's peak line starts below
        it. Where the step reports it, the least seen (larger batches add their inputs)."""
        return min(self.bases) if self.bases else self.before


def _size(point: _Point) -> int:
    return point.batch_size


def find_max_batch_size(
    step: Callable[[int], Any],
    *,
    meter: MemoryMeter,
    max_batch_size: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    multiple_of: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    steps_per_call: int = 1,
    min_batch_size: int | None = None,
    max_attempts: int | None = None,
) -> ProbeResult:
    """Largest batch size for which ``step(batch_size)`` runs within memory.

    ``step`` runs the work at a given size (for training: forward, backward, optimizer step);
    it must leave no state behind that grows with the size. Out-of-memory errors are caught and
    mark a size as too large; every other error propagates unchanged. The search starts at
    ``min_batch_size`` (default ``multiple_of``). A size counts as fitting when it ran and its
    peak stayed within the budget: ``headroom`` of the memory free above what the step needs
    whatever the batch stays free (see ``budget_for``), so the answer is about
    ``1 - headroom`` of the largest size that fits the capacity, whatever share of it the model
    takes. The search stops when
    the largest fitting size is within ``tolerance`` of the smallest failing one (within 6%
    once 7 sizes have run) or of where the readings say the budget is reached, or when
    ``max_attempts`` sizes have run (then with the largest that fitted).

    Example::

        meter = TrackedMeter(capacity=256 * 2**20)
        result = find_max_batch_size(lambda b: model(torch.randn(b, 64)).sum().backward(),
                                     meter=meter, max_batch_size=4096)
    """
    if not callable(step):
        raise InvalidInputError(
            f"step must be callable as step(batch_size); got {type(step).__name__}"
        )
    validation.check(validation.FIND_MAX_BATCH_SIZE, locals())
    _check_bounds(max_batch_size, multiple_of)
    start = time.perf_counter()
    upper = _round_down(max_batch_size or NO_BOUND, multiple_of)
    search = _Search(step, meter, headroom, steps_per_call, max_attempts)
    smallest = -(-(min_batch_size or multiple_of) // multiple_of) * multiple_of
    if smallest > upper:
        raise InvalidInputError(
            f"the smallest batch size to try ({smallest}) is above max_batch_size={upper}"
        )

    # Without peak readings, a size over the budget would pass for one that fits: the budget
    # becomes the device's cap instead.
    with meter.capped(search.budget) if meter.peak() is None else contextlib.nullcontext():
        model = _run_search(search, smallest, upper, multiple_of, tolerance)
    assert search.best is not None and search.best.fitted
    return ProbeResult(
        batch_size=search.best.batch_size,
        capacity_bytes=search.capacity,
        headroom=float(headroom),
        budget_bytes=search.budget,
        memory_model=model,
        attempts=tuple(search.attempts),
        steps=len(search.attempts) * steps_per_call,
        seconds=time.perf_counter() - start,
        device=meter.name,
        upper_bound=None if max_batch_size is None else upper,
    )


def _run_search(
    search: _Search,
    smallest: int,
    upper: int,
    multiple_of: int,
    tolerance: float,
) -> MemoryModel | None:
    first = search.run(smallest, "measure")
    if (
        not first.fitted
        and not first.oom
        and first.peak_bytes is not None
        and first.peak_bytes <= search.capacity
        and upper >= 2 * smallest
    ):
        # Within the device, but over the budget kept while one size cannot tell what the step
        # needs whatever the batch: a second size tells it.
        with contextlib.suppress(_OutOfAttempts):
            search.run(2 * smallest, "measure")
    _check_fits(search, first)
    if upper <= smallest:
        return None
    try:
        if first.peak_bytes is None:
            _search_without_peaks(search, upper, multiple_of, tolerance)
            return None
        model = _search_with_model(search, upper, multiple_of, tolerance)
    except _OutOfAttempts:
        log.info("probe stopped after max_attempts=%d sizes", search.max_attempts)
        model = None
    _check_fits(search, first)
    return model


def _check_fits(search: _Search, first: ProbeAttempt) -> None:
    """BatchSizeOneDoesNotFit where nothing that ran is within the budget (the smallest size,
    or, as the readings moved the budget, no longer)."""
    if search.best is None:
        smallest = first.batch_size
        raise BatchSizeOneDoesNotFit(
            f"batch size {smallest} does not fit: its step "
            + (
                f"ran out of memory after reaching {format_bytes(first.peak_bytes)}"
                if first.oom
                else f"peaked at {format_bytes(first.peak_bytes)}"
            )
            + f", and the budget is {format_bytes(search.budget)} of "
            f"{format_bytes(search.capacity)} capacity (headroom {search.headroom:.0%}). Use a "
            "smaller model or input, precision='bf16', lower headroom, or a larger memory budget"
        )


def _round_down(value: float, multiple_of: int) -> int:
    return int(value) // multiple_of * multiple_of


def _round_up(value: float, multiple_of: int) -> int:
    return -(-math.ceil(value) // multiple_of) * multiple_of


def _fit(points: list[tuple[int, int]]) -> MemoryModel:
    """The line through the two largest measured sizes (closest to where it will be used)."""
    (b1, p1), (b2, p2) = sorted(points)[-2:]
    slope = (p2 - p1) / (b2 - b1)
    return MemoryModel(fixed_bytes=p1 - slope * b1, bytes_per_sample=slope)


def _fit_attempts(attempts: list[ProbeAttempt]) -> MemoryModel:
    """The steeper of the lines through overall and through forward/backward peaks.

    Where the optimizer update sets the overall peak, that line is nearly flat and would
    predict far too much; the steeper line is the one that binds at large sizes.
    """
    overall = _fit([(a.batch_size, a.peak_bytes) for a in attempts])
    scaling = _fit([(a.batch_size, a.scaling_peak_bytes) for a in attempts])
    return max(overall, scaling, key=lambda m: m.bytes_per_sample)


def _crossing(a: _Point, b: _Point, budget: int) -> float:
    """Where the line through two readings reaches the budget (NO_BOUND where it never does)."""
    if a.batch_size == b.batch_size or b.level <= a.level:
        return NO_BOUND
    slope = (b.level - a.level) / (b.batch_size - a.batch_size)
    # A hair above: a crossing computed as 9.9999998 means 10.
    return min(a.batch_size + (budget - a.level) / slope + 1e-6, NO_BOUND)


def _search_with_model(
    search: _Search, upper: int, multiple_of: int, tolerance: float
) -> MemoryModel | None:
    """Grow from the sizes that fitted until one fails or the readings say it is the largest,
    then close the gap to the smallest failure."""
    while search.best is not None and (
        (target := _next_size(search, upper, multiple_of, tolerance)) is not None
    ):
        if search.smallest_failure is not None:
            phase = "refine"
        else:
            phase = "predict" if len(search.attempts) > 1 else "measure"
        search.run(target, phase)
    fitted = sorted(
        {a.batch_size: a for a in search.attempts if a.fitted}.values(), key=lambda a: a.batch_size
    )
    return _fit_attempts(fitted[-2:]) if len(fitted) >= 2 else None


def _next_size(search: _Search, upper: int, multiple_of: int, tolerance: float) -> int | None:
    """The next size to try; None once the largest that fitted is within ``tolerance`` of the
    smallest failure, or the readings say it is (about) the answer."""
    aim = tolerance
    if len(search.attempts) >= LATE:
        tolerance = max(tolerance, LATE_TOLERANCE)
    lo, hi = search.best.batch_size, search.smallest_failure
    ceiling = upper if hi is None else hi - 1
    if lo >= ceiling or (hi is not None and lo >= (1 - tolerance) * hi):
        return None
    low, high = _bounds(search)
    if high <= lo or (hi is not None and low >= hi):
        low, high = 0.0, NO_BOUND  # a size that ran contradicts them: faster than linear growth
    if high <= lo * (1 + tolerance):
        return None
    if hi is None:
        target = _grow(search, low, high, tolerance)
    else:
        target = _narrow(search, low, high, tolerance)
        if target is not None:
            # Not within the asked tolerance of either end: a fit there ends the search, as
            # does a failure here. (Late, a fit within the wider tolerance of the failure ends
            # it too, so the aim need not fall that far short.)
            target = min(target, _round_up((1 - aim) * hi, multiple_of))
            target = max(target, lo * (1 + aim))
    if target is None:
        return None
    target = _round_down(min(target, ceiling), multiple_of)
    if target <= lo:
        target = lo + multiple_of
    return target if target <= ceiling else None


def _bounds(search: _Search) -> tuple[float, float]:
    """Sizes the answer lies between, for a peak that is the largest of several phases (the
    forward pass, backward, the optimizer update, a workspace), each growing at most linearly
    from at least the memory in use before the step.

    Such a phase reaches a fitted size's reading at most along the line from the base through
    it, so it crosses the budget no sooner than that line does; a failed size's reading (an
    out-of-memory error's is a lower bound) was reached by some phase, which crosses the budget
    no later than the line from the base through it. Where the step reports the bytes its
    forward pass keeps, those alone bound the answer from above.
    """
    base = _Point(0, search.base_level(), True, True, 0)
    budget = search.budget
    low = max((_crossing(base, p, budget) for p in search.fitted_points()), default=0.0)
    high = min((_crossing(base, p, budget) for p in search.failed_points()), default=NO_BOUND)
    if search.activation:
        high = min(high, (budget - base.level) / search.activation)
    return low, high


def _grow(search: _Search, low: float, high: float, tolerance: float) -> float | None:
    """The next size while nothing has failed; None where the readings say the largest that
    fitted is (about) the answer.

    The chord through the two largest readings predicts the crossing where the growth shows
    between them; a kink past them (a phase whose peak grows faster takes over) makes it reach
    too far, so the search aims a little short (``AIM``) unless a third reading lies on the
    same line, and no further than the lower bound where the step reports its phases. While the
    readings show little growth a fixed phase sets them, and the step is capped at ``GROWTH``
    times the largest fitting size, so a flat start is crossed in a few geometric steps instead
    of one far extrapolation. It never aims below the lower bound.
    """
    fitted = search.fitted_points()
    best = fitted[-1]
    reach = GROWTH * best.batch_size
    close = best.batch_size * (1 + tolerance)
    if len(fitted) == 1 and search.activation:
        # What the forward pass keeps grows exactly with the batch: place the second size where
        # that growth would fill a quarter of the remaining budget. Backward transients add to
        # it, so this lands inside the budget, yet far enough out to see the growth that binds.
        crossing = guess = (search.budget - search.base_level()) / (4 * search.activation)
        reach = max(reach, guess)
    elif (rise := _rise(fitted)) is not None:
        crossing = _crossing(rise, best, search.budget)
        guess = crossing if _linear(fitted, rise, best) else _short(crossing, 1 - AIM)
        if search.activation and low > close:
            # The step reports the memory before its forward pass, where the growth that binds
            # (all activations live) starts: the line from there is close, and safe.
            guess = min(guess, low)
    else:
        crossing = guess = NO_BOUND
    if crossing <= close and low <= close:
        return None
    return min(max(min(guess, reach), min(low, reach), close), high)


def _narrow(search: _Search, low: float, high: float, tolerance: float) -> float | None:
    """The next size between the largest that fitted and the smallest failure; None where the
    readings on one line say the largest that fitted is (about) the answer.

    Where the failure ran (its reading is exact), the secant through it and the largest fit is
    exact if the peak grows linearly between them; the search aims a hair short of it, as a
    size past it by a hair would cost one more try. Where the failure was kept through two
    fitting sizes in a row, its excess over the budget is halved for each (the Illinois rule),
    so a curved peak does not make the secant creep. Where the fitting size sits on a flat
    stretch (a chord much flatter than the secant), the growth that binds starts past it: the
    secant only says how far the answer is at least, and the search tries halfway to the bound
    above. An out-of-memory reading is a lower bound, so the secant through it reaches too far
    or not far enough: the chord through the fitting sizes says more where it shows the growth
    (halfway to it where a kink lies below, as it then reaches too far), else the bounds are
    halved. Where four tries have not halved the gap, the search halves it.
    """
    lo, hi = search.best.batch_size, search.smallest_failure
    if _stalled(search):
        return _midpoint(lo, hi)
    lower = max(lo, low) if low < hi else lo
    upper = min(hi, high) if high > lo else hi
    fitted = search.fitted_points()
    below, above = fitted[-1], search.now(search.points[hi])
    rise = _rise(fitted)
    chord = NO_BOUND if rise is None else _crossing(rise, below, search.budget)
    if chord <= lo * (1 + tolerance) and (
        _linear(fitted, rise, below) or _same_slope(_slope(rise, below), _slope(below, above))
    ):
        return None
    if not above.exact:
        if chord >= upper:
            return _midpoint(lower, upper)
        if _kinked(fitted, rise, below):
            return _midpoint(lower, min(chord, _crossing(below, above, search.budget)))
        return max(chord, lower)
    if _plateau(search.failed_points()):
        return _midpoint(lower, upper)
    kept = _kept_through(search, hi)
    if kept >= 2:
        excess = (above.level - search.budget) / 2 ** (kept - 1)
        above = replace(above, level=search.budget + max(int(excess), 1))
    crossing = _crossing(below, above, search.budget)
    secant = min(max(_short(crossing, SHORT * tolerance), lower), upper)
    if rise is None or _slope(rise, below) < KINK * _slope(below, above):
        return _midpoint(secant, upper)
    return secant


def _rise(fitted: list[_Point]) -> _Point | None:
    """The largest fitting size that peaked lower than the largest: the chord from it to the
    largest shows the growth, also where the peak rises in steps (allocator rounding)."""
    best = fitted[-1]
    return next((p for p in reversed(fitted[:-1]) if p.level < best.level), None)


def _linear(fitted: list[_Point], rise: _Point, best: _Point) -> bool:
    """True where the reading before ``rise`` lies on the line through ``rise`` and ``best``."""
    before = _rise(fitted[: fitted.index(rise) + 1])
    return before is not None and _same_slope(_slope(before, rise), _slope(rise, best))


def _kinked(fitted: list[_Point], rise: _Point, best: _Point) -> bool:
    """True where the growth steepens at ``rise``: the chord before it is much flatter (a
    fixed phase set the smaller reading), so the chord from it to ``best`` reaches too far."""
    index = fitted.index(rise)
    return index > 0 and _slope(fitted[index - 1], rise) < KINK * _slope(rise, best)


def _plateau(failed: list[_Point]) -> bool:
    """True where the two smallest failures ran and read the same: the peak rises in steps
    (allocator rounding) as wide as the gap between them, and the secant says little."""
    if len(failed) < 2 or not (failed[0].exact and failed[1].exact):
        return False
    return failed[1].level <= failed[0].level


def _slope(a: _Point, b: _Point) -> float:
    return (b.level - a.level) / (b.batch_size - a.batch_size)


def _same_slope(a: float, b: float) -> bool:
    return abs(a - b) <= LINE * max(abs(a), abs(b))


def _short(size: float, fraction: float) -> float:
    """``fraction`` short of ``size``, where that is more than a sample or two."""
    return size * (1 - fraction) if size * fraction >= 2 else size


def _stalled(search: _Search) -> bool:
    """True where the last four tries did not halve the gap between fit and failure."""
    gaps = _gaps(search)
    return len(gaps) >= 5 and gaps[-1] > gaps[-5] / 2


def _gaps(search: _Search) -> list[float]:
    """How far apart (log ratio) the largest fit and the smallest failure were after each try
    since the first failure."""
    lo, hi, gaps = 0, None, []
    for attempt in search.attempts:
        if attempt.fitted:
            lo = max(lo, attempt.batch_size)
        elif hi is None or attempt.batch_size < hi:
            hi = attempt.batch_size
        if hi is not None and lo:
            gaps.append(math.log(hi / lo))
    return gaps


def _search_without_peaks(search: _Search, upper: int, multiple_of: int, tolerance: float) -> None:
    """No peak readings: double until a size fails or the bound is reached, then bisect."""
    size = search.best.batch_size
    while size < upper:
        size = min(size * 2, upper)
        if not search.run(size, "search").fitted:
            break
    while search.smallest_failure is not None:
        lo, hi = search.best.batch_size, search.smallest_failure
        if hi - lo <= multiple_of or lo >= (1 - tolerance) * hi:
            break
        target = _round_down(min(_midpoint(lo, hi), hi - 1), multiple_of)
        if target <= lo:
            break
        search.run(target, "search")


def _midpoint(lo: float, hi: float) -> float:
    # Far apart (a flat start overshot), the scale is what is unknown: halve it in log space.
    return math.sqrt(lo * hi) if hi >= 4 * lo else (lo + hi) / 2


def _kept_through(search: _Search, batch_size: int) -> int:
    """How many sizes fitted in a row since ``batch_size`` last failed."""
    kept = 0
    for attempt in reversed(search.attempts):
        if attempt.batch_size == batch_size and not attempt.fitted:
            return kept
        kept = kept + 1 if attempt.fitted else 0
    return kept


def probe(
    task: Workload,
    *,
    memory_budget: str | int | None = None,
    meter: MemoryMeter | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    cache: bool = True,
    cache_dir: str | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    plan_for: str | int | None = None,
) -> ProbeResult:
    """Largest batch size whose real training step fits on ``task.device``, for a
    :class:`Task` or any :class:`~autobatch.workload.Workload`.

    Runs two full training steps (forward, loss, backward, optimizer step, autocast as the task
    says) per tried size, on the first samples of the training data. Pass ``model`` and
    ``optimizer`` to probe objects you already hold: their parameters, buffers, gradients and
    optimizer state are restored bit for bit afterwards, as are all random generators. On the
    CPU, give ``memory_budget`` (e.g. ``"2GiB"``) to probe under a simulated accelerator.

    ``plan_for`` (e.g. ``"80GiB"``) answers for a card you do not have: the same steps run on
    fake tensors (shapes, no data), counted like the simulated accelerator, in seconds and with
    no memory. The result is a prediction (``planned=True``, device ``plan:80.00GiB``), and its
    ``extra["cuda_card_batch_size"]`` keeps a margin for what a simulation cannot see; see
    docs/planning.md.
    """
    workload.check(task, "probe")
    validation.check(validation.PROBE, locals())
    if (model is None) != (optimizer is None):
        raise InvalidInputError("pass both model= and optimizer=, or neither")
    if plan_for is not None and (memory_budget, meter, model) != (None, None, None):
        raise InvalidInputError(
            "plan_for plans with a fresh model on fake tensors: give plan_for alone, not with "
            "memory_budget, meter or model"
        )
    _check_bounds(max_batch_size, multiple_of)
    if plan_for is not None:
        if task.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError(
                "device 'cuda' was asked for but torch sees no CUDA device; a plan needs no "
                "card: plan on --device cpu"
            )
        meter = PlanMeter(parse_bytes(plan_for, name="plan_for"), task.device)
    meter = meter or meter_for(task.device, memory_budget)
    source = task.training_batches()
    bound = min(len(source), max_batch_size or len(source))
    if bound < multiple_of:
        raise InvalidInputError(
            f"the training data has {len(source)} samples, fewer than multiple_of={multiple_of}"
        )
    rng = RngState.capture()
    owned = model is None
    compiled = False
    state: TrainingState | None = None
    train_step: TrainStep | None = None
    try:
        if owned and isinstance(meter, PlanMeter):
            model, optimizer = _build_on(
                task, meter, lambda: build_fake(task.model, task.optimizer, task.lr, meter)
            )
        elif owned:
            model, optimizer = _build_on(task, meter)
        if not owned:
            check_restorable(model)  # before a step initialises lazy parameters for good
        if isinstance(meter, TrackedMeter) and not owned:
            meter.track(state_tensors(model, [optimizer]))
        compiled = isinstance(meter, TrackedMeter) and _compiled(model)
        if compiled:
            log.warning(
                "the simulated accelerator runs torch.compile'd modules eagerly: the probe "
                "measures the eager step, which usually needs more memory than the compiled one"
            )
        state = TrainingState(model, optimizer)
        # A model in eval mode (just validated, say) trains in training mode, as training will
        # run it; each attempt switches it, and the restore after it puts the flags back.
        to_train = not model.training
        key = probe_cache.key(
            task, model, optimizer, source, meter, headroom, bound, multiple_of, tolerance
        )
        ranks = distributed_ranks()
        cache = cache and ranks == 1  # each rank's answer depends on the others'
        hit = probe_cache.load(key, cache_dir) if cache else None
        try:
            # No loss scale to overflow: a step fp16 scaling skips creates no optimizer state,
            # and the measured step would run without it. Memory is the same at any scale.
            train_step = TrainStep(
                task, _with_ddp_buckets(model, meter, ranks), optimizer, loss_scale=1.0
            )
        except BaseException:
            if ranks > 1:  # the other ranks wait for this one's answer: tell them, then raise
                _min_over_ranks([0, 0], task.device)
            raise

        def attempt(batch_size: int) -> StepReading:
            # Step 1 creates the optimizer state; step 2, with that state live, is read phase
            # by phase.
            batch = source.largest(batch_size)
            readings: list[int] = []
            history: torch.Tensor | None = None
            if to_train:
                model.train()
            try:
                train_step(batch)
                history = _history_to_come(optimizer)
                first_peak = meter.peak()
                meter.reset_peak()
                base = meter.current()
                meter.synchronize()
                start = time.perf_counter()
                train_step(
                    batch,
                    after_forward=lambda: readings.append(meter.current()),
                    after_backward=lambda: readings.append(meter.peak() or 0),
                )
                meter.synchronize()
                seconds = time.perf_counter() - start
                after_forward, scaling = readings
                return StepReading(
                    scaling, base, after_forward - base, peak_bytes=first_peak, step_seconds=seconds
                )
            except BaseException as exc:
                release_if_oom(exc)
                raise
            finally:
                del batch, history
                state.restore()
                rng.restore()

        if hit is not None:
            if _still_fits(hit, attempt, meter) and _evaluation_still_fits(
                hit, task, model, train_step, state, rng, meter
            ):
                return hit
            log.info("the cached batch sizes no longer fit: probing again")
        # Batch norm cannot train on a single sample.
        smallest = 2 if has_batch_norm(model) else 1
        try:
            if bound < smallest:
                limit = (
                    f"max_batch_size={max_batch_size}; raise it to 2 or more"
                    if bound < len(source)
                    else f"the training data has {len(source)} sample; give at least 2"
                )
                raise InvalidInputError(
                    f"{type(model).__name__} has batch norm, which needs at least 2 samples per "
                    f"batch to train, but {limit}"
                )
            result = find_max_batch_size(
                attempt,
                meter=meter,
                max_batch_size=bound,
                headroom=headroom,
                multiple_of=multiple_of,
                tolerance=tolerance,
                steps_per_call=2,
                min_batch_size=smallest,
            )
            evaluation = _probe_evaluation(
                task, model, train_step, state, rng, meter, headroom, multiple_of, tolerance,
                result, max_batch_size,
            )  # fmt: skip
        except BaseException:
            if ranks > 1:  # the other ranks wait for this one's answer: tell them, then raise
                _min_over_ranks([0, 0], task.device)
            raise
        result = replace(result, eval_batch_size=evaluation, step_time=_step_time(result, meter))
        if source.varies():  # say which shape the answer assumed
            result = replace(
                result,
                extra={
                    **result.extra,
                    "samples": "the largest training samples (samples differ in size; the "
                    f"largest has {source.largest_sample_elements()} elements)",
                },
            )
        if isinstance(meter, PlanMeter):
            result = _as_plan(result, multiple_of)
        if ranks > 1:
            result = _agreed_over_ranks(result, task.device)
        if cache:
            probe_cache.store(key, result, cache_dir)
        return result
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        if not isinstance(meter, PlanMeter):
            raise
        raise InvalidInputError(_unplannable(task, exc)) from None
    finally:
        # An exception keeps this frame alive: let go of the model built here (and of the
        # host copies) now, not when the caller drops the exception.
        state = train_step = None
        if owned:
            model = optimizer = None
        rng.restore()
        meter.release(full=True)
        if compiled:
            # Code dynamo met under the meter's dispatch mode stays marked "run eagerly" for
            # good: without a reset, later compiled models of the same class (the trials, the
            # user's training) would never compile.
            torch._dynamo.reset()


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``torch.compile``'d module."""
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


def _still_fits(hit: ProbeResult, attempt: Callable[[int], Any], meter: MemoryMeter) -> bool:
    """Whether a cached result's batch size runs here within the budget it was judged by: one
    real attempt, so that a cached answer is never a size that did not run, whatever the cache
    key could not see (a setting the step reads from an object it names only by type)."""
    return _runs_within(hit.budget_bytes, lambda: attempt(hit.batch_size).peak_bytes, meter)


def _runs_within(
    budget: int,
    run: Callable[[], int | None],
    meter: MemoryMeter,
    after: Callable[[], None] | None = None,
) -> bool:
    """Whether ``run`` (which may return a peak it read itself) runs within ``budget`` bytes,
    out of memory counting as not; ``after`` undoes what it changed."""
    meter.release()
    meter.reset_peak()
    capped = meter.capped(budget) if meter.peak() is None else contextlib.nullcontext()
    try:
        with capped, meter:
            read = run()
        meter.synchronize()
    except BaseException as exc:
        if not is_oom_error(exc):
            raise
        drop_failed_attempt(exc)
        return False
    finally:
        if after is not None:
            after()
        meter.release()
    return max(meter.peak() or 0, read or 0) <= budget


def distributed_ranks() -> int:
    """How many processes train together (``torch.distributed`` started, e.g. by torchrun)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _with_ddp_buckets(model: nn.Module, meter: MemoryMeter, ranks: int) -> nn.Module:
    """Under torch.distributed, the model in ``DistributedDataParallel``, so its gradient
    buckets are on the device when the probe measures, as in training.

    Each rank gets a process group of its own: its search tries its own sizes, in its own
    order, and a collective across ranks in the middle of a step would wait forever for a
    rank that tried another size or ran out of memory. The ranks agree once, at the end."""
    if ranks == 1:
        return model
    rank = torch.distributed.get_rank()
    groups = [torch.distributed.new_group([r]) for r in range(ranks)]  # every rank makes all
    try:
        with meter:
            return nn.parallel.DistributedDataParallel(model, process_group=groups[rank])
    except BaseException as exc:
        if not is_oom_error(exc):
            raise
        raise BatchSizeOneDoesNotFit(
            f"the model's DistributedDataParallel gradient buckets do not fit in "
            f"{format_bytes(meter.capacity())} on {meter.name} (rank {rank}); use a smaller "
            "model, precision='bf16', or a larger memory budget"
        ) from None


def _agreed_over_ranks(result: ProbeResult, device: torch.device) -> ProbeResult:
    """The smallest answer of all ranks (all_reduce MIN): one batch size every rank fits.
    This rank's own answer stays in ``extra``."""
    size, evaluation = _min_over_ranks(
        [result.batch_size, result.eval_batch_size or result.batch_size], device
    )
    if size == 0:
        raise AutobatchError(
            f"the probe failed on another rank (its error is raised there); this rank fits "
            f"{result.batch_size}"
        )
    extra = {
        **result.extra,
        "this_rank_batch_size": result.batch_size,
        "ranks": distributed_ranks(),
    }
    return replace(result, batch_size=size, eval_batch_size=evaluation, extra=extra)


def _min_over_ranks(values: list[int], device: torch.device) -> list[int]:
    found = torch.tensor(values, device=device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    return [int(v) for v in found.tolist()]


def _probe_evaluation(
    task: Workload,
    model: nn.Module,
    train_step: TrainStep,
    state: TrainingState,
    rng: RngState,
    meter: MemoryMeter,
    headroom: float,
    multiple_of: int,
    tolerance: float,
    trained: ProbeResult,
    max_batch_size: int | None,
) -> int:
    """The largest evaluation batch (the validation data's forward pass and loss, no
    gradients, in the task's precision), with the optimizer state live as it is during
    training, up to the validation data's size (not the training data's). Starts at the
    training size, which nearly always fits; the training step that creates the optimizer
    state is undone afterwards."""
    source = _evaluation_batches(task)
    bound = min(len(source), max_batch_size or len(source))
    if bound < multiple_of:
        return trained.batch_size
    evaluate = _evaluator(task, model, source)
    try:
        smallest = trained.attempts[0].batch_size  # what the training search ran first
        with meter:  # the optimizer state it creates is on the device, counted
            train_step(task.training_batches().first(smallest))
        start = min(trained.batch_size, bound)
        start = max(multiple_of, start // multiple_of * multiple_of)
        try:
            found = find_max_batch_size(
                evaluate, meter=meter, max_batch_size=bound, headroom=headroom,
                multiple_of=multiple_of, tolerance=tolerance, min_batch_size=start,
            )  # fmt: skip
        except BatchSizeOneDoesNotFit:  # evaluation needs more than training at that size
            found = find_max_batch_size(
                evaluate, meter=meter, max_batch_size=bound, headroom=headroom,
                multiple_of=multiple_of, tolerance=tolerance,
            )  # fmt: skip
        return found.batch_size
    finally:
        state.restore()
        rng.restore()


def _evaluation_batches(task: Workload) -> BatchSource:
    source = task.validation_batches()
    return task.training_batches() if source is None else source


def _evaluator(task: Workload, model: nn.Module, source: BatchSource) -> Callable[[int], None]:
    """One evaluation batch's forward pass and loss at a size: no gradients, the task's
    precision, the model in eval mode and back in training mode after."""

    def evaluate(batch_size: int) -> None:
        batch = source.largest(batch_size)
        model.eval()
        try:
            with torch.no_grad(), autocast(task):
                task.batch_loss(model, batch)
        except BaseException as exc:
            release_if_oom(exc)
            raise
        finally:
            del batch
            model.train()

    return evaluate


def _evaluation_still_fits(
    hit: ProbeResult,
    task: Workload,
    model: nn.Module,
    train_step: TrainStep,
    state: TrainingState,
    rng: RngState,
    meter: MemoryMeter,
) -> bool:
    """Whether a cached result's evaluation size runs here within its budget, with the
    optimizer state live, as :func:`_still_fits` asks of its training size."""
    if hit.eval_batch_size is None or not hit.attempts:
        return True
    evaluate = _evaluator(task, model, _evaluation_batches(task))

    def evaluation() -> None:
        train_step(task.training_batches().first(hit.attempts[0].batch_size))  # its state
        evaluate(hit.eval_batch_size)

    def undo() -> None:
        state.restore()
        rng.restore()

    return _runs_within(hit.budget_bytes, evaluation, meter, undo)


def _step_time(result: ProbeResult, meter: MemoryMeter) -> StepTime | None:
    """Seconds per step against batch size, through the warm steps of the sizes that fit; the
    throughput curve the prior predicts with. None on fake tensors (a plan runs no kernels).
    Under the simulated accelerator the times include its bookkeeping, so they only rank."""
    if isinstance(meter, PlanMeter):
        return None
    points = {
        a.batch_size: [a.step_seconds] for a in result.attempts if a.fitted and a.step_seconds
    }
    return fit_step_time(points)


def _as_plan(result: ProbeResult, multiple_of: int) -> ProbeResult:
    """Mark a result as predicted, and add the size a CUDA card of that capacity would take
    after the margin for what the simulation cannot see (``CUDA_RESERVE``, ``UNSEEN``)."""
    # The card's budget (see budget_for) with the reserve taken from the free memory.
    usable = (result.budget_bytes - CUDA_RESERVE * (1 - result.headroom)) * (1 - UNSEEN)
    card: int | None = None
    fitted = [a for a in result.attempts if a.fitted and a.peak_bytes is not None]
    if usable > 0 and result.memory_model is not None:
        card = min(
            _round_down(result.memory_model.largest_under(int(usable)), multiple_of),
            result.batch_size,
        )
    elif usable > 0 and fitted:
        card = max((a.batch_size for a in fitted if a.peak_bytes <= usable), default=0)
    extra = {
        **result.extra,
        "cuda_card_batch_size": card or None,
        "cuda_reserve_bytes": CUDA_RESERVE,
        "unseen_fraction": UNSEEN,
    }
    return dataclasses.replace(result, planned=True, extra=extra)


def _history_to_come(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The memory L-BFGS's curvature history will still take, allocated now (None for other
    optimizers). The history grows by up to two flat copies of the parameters per iteration
    until it holds ``history_size`` pairs, long after the probe's two steps; held through the
    measured step, it counts as it will in training (the pairs that step adds count twice: on
    the safe side)."""
    if not isinstance(optimizer, torch.optim.LBFGS):
        return None
    group = optimizer.param_groups[0]
    params = [p for p in group["params"] if p.requires_grad]
    held = len(optimizer.state[group["params"][0]].get("old_dirs", []))
    missing = 2 * (group["history_size"] - held) * sum(p.numel() for p in params)
    if missing <= 0 or not params:
        return None
    return torch.empty(missing, dtype=params[0].dtype, device=params[0].device)


def _unplannable(task: Workload, exc: Exception) -> str:
    """Why fake tensors could not run the step, and what to do instead."""
    if task.precision == "fp16":
        return (
            "plan_for cannot run fp16 loss scaling on fake tensors (the gradient scaler reads "
            "whether gradients overflowed); plan with precision 'bf16', whose step holds the "
            "same tensors but the scaler's few bytes, or probe with memory_budget= instead"
        )
    op = getattr(exc, "func", None)
    return (
        "plan_for cannot plan a step whose work depends on tensor values "
        f"({op or type(exc).__name__}: a boolean mask, nonzero, .item() or a branch on a "
        "value); probe with memory_budget= instead"
    )


def _build_on(
    task: Workload, meter: MemoryMeter, make: Callable[[], Any] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The task's model and optimizer (or what ``make`` builds), built under ``meter``; a model
    that alone does not fit is reported like a batch size of one that does not fit, not as a
    bare allocator error."""
    meter.reset_peak()
    try:
        if make is not None:
            return make()  # it enters the meter itself
        with meter:
            return build(task)
    except BaseException as exc:
        if not is_oom_error(exc):
            raise
        drop_failed_attempt(exc)
    raise BatchSizeOneDoesNotFit(
        f"the model itself does not fit: building it ran out of memory after reaching "
        f"{format_bytes(meter.peak())} of {format_bytes(meter.capacity())} capacity on "
        f"{meter.name}. Use a smaller model or a larger memory budget"
    )
