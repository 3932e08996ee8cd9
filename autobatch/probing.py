"""Find the largest batch size whose real training step fits in accelerator memory.

Peak memory grows close to linearly with the batch size: a fixed part (parameters, gradients,
optimizer state, workspaces) plus a part per sample (inputs and activations). Two measured
sizes fix that line, which predicts the largest size under the budget; that size is then run to
verify it, and refined by bisection if the prediction misses. Every size returned has run.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autobatch import probe_cache, validation
from autobatch.data import BatchSource
from autobatch.errors import BatchSizeOneDoesNotFit, InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.oom import drop_failed_attempt, is_oom_error
from autobatch.records import NO_BOUND, MemoryModel, ProbeAttempt, ProbeResult
from autobatch.snapshot import RngState, TrainingState
from autobatch.task import Task
from autobatch.training import TrainStep, build
from autobatch.units import format_bytes

log = logging.getLogger(__name__)

DEFAULT_HEADROOM = 0.05
DEFAULT_TOLERANCE = 0.02


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


def _check_bounds(max_batch_size: int | None, multiple_of: int) -> None:
    if max_batch_size is not None and max_batch_size < multiple_of:
        raise InvalidInputError(
            f"max_batch_size={max_batch_size} is below the smallest allowed size "
            f"(multiple_of={multiple_of}); raise max_batch_size or lower multiple_of"
        )


class _OutOfAttempts(Exception):
    """The search ran as many sizes as it was allowed: it stops with what it has."""


class _Search:
    """The state of one search: what ran, what fitted, what failed."""

    def __init__(
        self,
        step: Callable[[int], Any],
        meter: MemoryMeter,
        budget: int,
        steps_per_call: int,
        max_attempts: int | None = None,
    ) -> None:
        self.step = step
        self.meter = meter
        self.budget = budget
        self.steps_per_call = steps_per_call
        self.max_attempts = max_attempts
        self.attempts: list[ProbeAttempt] = []
        self.best: ProbeAttempt | None = None  # largest that fitted
        self.smallest_failure: int | None = None
        self.base: int | None = None
        self.activation: int | None = None

    def run(self, batch_size: int, phase: str) -> ProbeAttempt:
        if self.max_attempts is not None and len(self.attempts) >= self.max_attempts:
            raise _OutOfAttempts
        meter = self.meter
        meter.release()
        meter.reset_peak()
        before = meter.current()
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
        meter.release()
        if isinstance(reading, StepReading):
            peak = max(peak or 0, reading.peak_bytes or 0)
            scaling = reading.scaling_peak_bytes
            self.base = reading.base_bytes
            self.activation = reading.activation_bytes
        else:
            scaling = peak
        fitted = not oom and (peak is None or peak <= self.budget)
        attempt = ProbeAttempt(batch_size, fitted, oom, peak, seconds, phase, scaling)
        self.attempts.append(attempt)
        log.debug(
            "batch size %d: %s, peak %s (before %s)",
            batch_size,
            "fits" if fitted else ("OOM" if oom else "over budget"),
            format_bytes(peak),
            format_bytes(before),
        )
        if fitted:
            if self.best is None or batch_size > self.best.batch_size:
                self.best = attempt
        elif self.smallest_failure is None or batch_size < self.smallest_failure:
            self.smallest_failure = batch_size
        return attempt


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
    ``min_batch_size`` (default ``multiple_of``). A size counts as fitting
    when it ran and its peak stayed within ``capacity * (1 - headroom)``. The search stops when
    the largest fitting size is within ``tolerance`` of the smallest failing one, or when
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
    capacity = meter.capacity()
    budget = int(capacity * (1 - headroom))
    upper = _round_down(max_batch_size or NO_BOUND, multiple_of)
    search = _Search(step, meter, budget, steps_per_call, max_attempts)
    smallest = -(-(min_batch_size or multiple_of) // multiple_of) * multiple_of
    if smallest > upper:
        raise InvalidInputError(
            f"the smallest batch size to try ({smallest}) is above max_batch_size={upper}"
        )

    first = search.run(smallest, "measure")
    if not first.fitted:
        raise BatchSizeOneDoesNotFit(
            f"batch size {smallest} does not fit: its step "
            + (
                f"ran out of memory after reaching {format_bytes(first.peak_bytes)}"
                if first.oom
                else f"peaked at {format_bytes(first.peak_bytes)}"
            )
            + f", and the budget is {format_bytes(budget)} of {format_bytes(capacity)} capacity "
            f"(headroom {headroom:.0%}). Use a smaller model or input, precision='bf16', lower "
            "headroom, or a larger memory budget"
        )
    model: MemoryModel | None = None
    if upper > smallest:
        try:
            if first.peak_bytes is None:
                _search_without_peaks(search, upper, multiple_of, tolerance)
            else:
                model = _search_with_model(search, upper, multiple_of, tolerance)
        except _OutOfAttempts:
            log.info("probe stopped after max_attempts=%d sizes", max_attempts)
    assert search.best is not None and search.best.fitted
    return ProbeResult(
        batch_size=search.best.batch_size,
        capacity_bytes=capacity,
        headroom=float(headroom),
        budget_bytes=budget,
        memory_model=model,
        attempts=tuple(search.attempts),
        steps=len(search.attempts) * steps_per_call,
        seconds=time.perf_counter() - start,
        device=meter.name,
        upper_bound=None if max_batch_size is None else upper,
    )


def _round_down(value: float, multiple_of: int) -> int:
    return int(value) // multiple_of * multiple_of


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


def _search_with_model(
    search: _Search, upper: int, multiple_of: int, tolerance: float
) -> MemoryModel | None:
    first = search.attempts[0]
    base = search.meter.current() if search.base is None else search.base
    # Second size: where the per-sample growth seen at the first size would fill a quarter of
    # the remaining budget. Backward transients add to what the forward pass keeps, so this
    # lands well inside the budget, yet far out enough to see the growth that binds.
    if search.activation:
        per_sample = search.activation / first.batch_size
    else:
        per_sample = (first.peak_bytes - base) / first.batch_size
    b2 = _round_down((search.budget - base) / (4 * max(per_sample, 1.0)), multiple_of)
    b2 = min(max(b2, first.batch_size + multiple_of), upper)
    second = search.run(b2, "measure")
    if not second.fitted or second.peak_bytes is None:
        _bisect(search, multiple_of, tolerance)
        return None
    if b2 == upper:
        return None
    # The line from the base through the second peak is steeper than the true one (the fixed
    # part is at least the base), so its prediction fits: verify it, then step up once along
    # the chord of the two large sizes if that promises more than the tolerance.
    model = MemoryModel(base, (second.peak_bytes - base) / b2)
    for phase in ("predict", "extend"):
        guess = min(_round_down(model.largest_under(search.budget), multiple_of), upper)
        best = search.best.batch_size
        if guess <= best * (1 + tolerance) or guess <= best:
            break
        if not search.run(guess, phase).fitted:
            _refine(search, multiple_of, tolerance)
            break
        model = _fit_attempts([second, search.best])
    return model


def _refine(search: _Search, multiple_of: int, tolerance: float) -> None:
    """Close the gap after a missed prediction, steered by the line through the best size and
    a failure that left a peak reading (it ran, but over budget)."""
    _close_gap(search, multiple_of, tolerance, "refine", steer=True)


def _search_without_peaks(search: _Search, upper: int, multiple_of: int, tolerance: float) -> None:
    """No peak readings: double until a size fails or the bound is reached, then bisect."""
    size = search.best.batch_size
    while size < upper:
        size = min(size * 2, upper)
        if not search.run(size, "search").fitted:
            break
    _bisect(search, multiple_of, tolerance)


def _open_gap(search: _Search, multiple_of: int, tolerance: float) -> bool:
    if search.smallest_failure is None:
        return False
    lo, hi = search.best.batch_size, search.smallest_failure
    return hi - lo > multiple_of and lo < (1 - tolerance) * hi


def _bisect(search: _Search, multiple_of: int, tolerance: float) -> None:
    _close_gap(search, multiple_of, tolerance, "search", steer=False)


def _close_gap(
    search: _Search, multiple_of: int, tolerance: float, phase: str, *, steer: bool
) -> None:
    """Try sizes between the largest success and the smallest failure until they are within
    ``tolerance``: the midpoint, or where the refitted line points when ``steer`` allows."""
    while _open_gap(search, multiple_of, tolerance):
        lo, hi = search.best.batch_size, search.smallest_failure
        mid = _round_down((lo + hi) / 2, multiple_of)
        last = search.attempts[-1]
        if steer and not last.fitted and not last.oom and last.peak_bytes is not None:
            refit = _fit_attempts([search.best, last])
            target = _round_down(refit.largest_under(search.budget), multiple_of)
            if lo < target < hi:
                mid = target
        if mid <= lo:
            break
        search.run(mid, phase)


def probe(
    task: Task,
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
) -> ProbeResult:
    """Largest batch size whose real training step fits on ``task.device``.

    Runs two full training steps (forward, loss, backward, optimizer step, autocast as the task
    says) per tried size, on the first samples of the training data. Pass ``model`` and
    ``optimizer`` to probe objects you already hold: their parameters, buffers, gradients and
    optimizer state are restored bit for bit afterwards, as are all random generators. On the
    CPU, give ``memory_budget`` (e.g. ``"2GiB"``) to probe under a simulated accelerator.
    """
    if not isinstance(task, Task):
        raise InvalidInputError(f"probe() needs an autobatch.Task; got {type(task).__name__}")
    validation.check(validation.PROBE, locals())
    if (model is None) != (optimizer is None):
        raise InvalidInputError("pass both model= and optimizer=, or neither")
    _check_bounds(max_batch_size, multiple_of)
    meter = meter or meter_for(task.device, memory_budget)
    source = BatchSource(task.train_data, task.device, task.collate_fn)
    bound = min(len(source), max_batch_size or len(source))
    if bound < multiple_of:
        raise InvalidInputError(
            f"the training data has {len(source)} samples, fewer than multiple_of={multiple_of}"
        )
    rng = RngState.capture()
    owned = model is None
    state: TrainingState | None = None
    train_step: TrainStep | None = None
    try:
        if owned:
            model, optimizer = _build_on(task, meter)
        if isinstance(meter, TrackedMeter) and not owned:
            meter.track(_state_tensors(model, optimizer))
        key = probe_cache.key(
            task, model, optimizer, source, meter, headroom, bound, multiple_of, tolerance
        )
        if cache and (hit := probe_cache.load(key, cache_dir)) is not None:
            return hit
        state = TrainingState(model, optimizer)
        train_step = TrainStep(task, model, optimizer)

        def attempt(batch_size: int) -> StepReading:
            # Step 1 creates the optimizer state; step 2, with that state live, is read phase
            # by phase.
            batch = source.first(batch_size)
            readings: list[int] = []
            try:
                train_step(batch)
                first_peak = meter.peak()
                meter.reset_peak()
                base = meter.current()
                train_step(
                    batch,
                    after_forward=lambda: readings.append(meter.current()),
                    after_backward=lambda: readings.append(meter.peak() or 0),
                )
                after_forward, scaling = readings
                return StepReading(scaling, base, after_forward - base, peak_bytes=first_peak)
            except BaseException as exc:
                if is_oom_error(exc):
                    # Free what the failed step still holds before restoring, which allocates.
                    traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                del batch
                state.restore()
                rng.restore()

        result = find_max_batch_size(
            attempt,
            meter=meter,
            max_batch_size=bound,
            headroom=headroom,
            multiple_of=multiple_of,
            tolerance=tolerance,
            steps_per_call=2,
            # Batch norm cannot train on a single sample.
            min_batch_size=2 if _has_batch_norm(model) else 1,
        )
        if cache:
            probe_cache.store(key, result, cache_dir)
        return result
    finally:
        # An exception keeps this frame alive: let go of the model built here (and of the
        # host copies) now, not when the caller drops the exception.
        state = train_step = None
        if owned:
            model = optimizer = None
        rng.restore()
        meter.release(full=True)


def _build_on(task: Task, meter: MemoryMeter) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The task's model and optimizer, built under ``meter``; a model that alone does not fit
    is reported like a batch size of one that does not fit, not as a bare allocator error."""
    meter.reset_peak()
    try:
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


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.state_dict(keep_vars=True).values())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors
