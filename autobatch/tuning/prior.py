"""What batch-size physics predicts before trials do: the gradient noise scale and step time.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") show that the optimizer
steps needed to reach a loss fall as ``S = S_min (1 + B_noise / B)``: below the gradient noise
scale ``B_noise`` a larger batch saves steps almost in proportion, above it hardly at all. It
is measured from gradient norms at two batch sizes (their appendix A, the estimator used by
gpt-neox and by AdaptDL): for batches of ``b`` and ``B`` samples,

    E|G_b|^2 = |G|^2 + tr(Sigma) / b

so two norms give ``|G|^2`` and ``tr(Sigma)`` without bias, and ``B_noise = tr(Sigma) / |G|^2``
is the ratio of their moving averages (the two noisy estimates are smoothed apart, then
divided). With a step time ``a + b B`` the time to a loss is predicted for every batch size.

Pure functions of numbers and trial records (no torch: the MLflow logging process draws the
prediction chart from them). The measurement itself, on a training model, is
:class:`autobatch.tuning.noise_probe.NoiseProbe`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from autobatch.records import COMPLETE, PRUNED, StepTime, StudySettings, TrialRecord

#: Weight of the old value in the moving averages of ``|G|^2`` and ``tr(Sigma)``.
EMA = 0.9


def two_batch_estimates(
    small_norm_sq: float, big_norm_sq: float, small: int, big: int
) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from the squared gradient norms of a batch of ``small``
    samples and one of ``big`` samples."""
    if not 0 < small < big:
        raise ValueError(f"need 0 < small < big batch sizes, got {small} and {big}")
    grad_sq = (big * big_norm_sq - small * small_norm_sq) / (big - small)
    trace = (small_norm_sq - big_norm_sq) / (1 / small - 1 / big)
    return grad_sq, trace


@dataclass
class NoiseScale:
    """Moving averages of the two estimates, and their ratio: the noise scale in samples."""

    small: int
    big: int
    beta: float = EMA
    grad_sq: float = 0.0
    trace: float = 0.0
    updates: int = 0

    def update(self, small_norm_sq: float, big_norm_sq: float) -> float | None:
        """Add one reading; the current estimate of ``B_noise`` (None while ``|G|^2`` is not
        yet positive, early, when noise swamps it)."""
        grad_sq, trace = two_batch_estimates(small_norm_sq, big_norm_sq, self.small, self.big)
        self.updates += 1
        self.grad_sq = self.beta * self.grad_sq + (1 - self.beta) * grad_sq
        self.trace = self.beta * self.trace + (1 - self.beta) * trace
        return self.value

    @property
    def value(self) -> float | None:
        if self.updates == 0 or self.grad_sq <= 0 or self.trace <= 0:
            return None
        return self.trace / self.grad_sq  # the bias corrections of the two averages cancel


# -- from trial records ------------------------------------------------------------------------


def noise_scale(record: TrialRecord | None) -> float | None:
    """The gradient noise scale a trial measured last (it grows as the loss falls, and the
    last reading is the one nearest the target)."""
    if record is None:
        return None
    readings = [p.grad_noise_scale for p in record.curve if p.grad_noise_scale is not None]
    return readings[-1] if readings else None


#: Evaluation windows a pruned trial needs before its throughput counts: the median of three
#: leaves out the first, which pays for warm-up.
PACED_WINDOWS = 3


def step_time(records: Sequence[TrialRecord]) -> StepTime | None:
    """The line through the seconds per step of trials at two or more batch sizes; None with
    fewer. A trial's seconds per step come from the median of its evaluation windows'
    throughput: the first window pays for warm-up, and a window another process slowed down
    says nothing about the batch size, but over a whole trial both weigh in. A completed
    trial counts, and a pruned one with :data:`PACED_WINDOWS` windows or more (a seed given up
    as hopeless is often the one at the largest size)."""
    points: dict[int, list[float]] = {}
    for r in records:
        rates = [p.samples_per_second for p in r.curve if p.samples_per_second > 0]
        if rates and (r.state == COMPLETE or (r.state == PRUNED and len(rates) >= PACED_WINDOWS)):
            points.setdefault(r.batch_size, []).append(r.batch_size / statistics.median(rates))
    return fit_step_time(points)


def fit_step_time(points: Mapping[int, Sequence[float]]) -> StepTime | None:
    """The line ``fixed + per_sample x B`` through seconds per step by batch size (the mean
    where a size has several), fitted on relative errors; None with fewer than two sizes. The
    probe fits its warm steps with it too.

    Step times span orders of magnitude across the candidates (0.3 ms at 32, 40 ms at 6400):
    fitted on absolute errors the largest sizes set the line alone, and its intercept, the
    per-step cost that makes small batches slow, comes out near zero, so the smallest batch
    looks fastest. Relative errors weigh every size alike."""
    if len(points) < 2:
        return None
    sizes = sorted(points)
    times = [sum(points[b]) / len(points[b]) for b in sizes]
    if min(times) <= 0:
        return None
    weights = [1 / (t * t) for t in times]
    s0 = sum(weights)
    s1 = sum(w * b for w, b in zip(weights, sizes, strict=True))
    s2 = sum(w * b * b for w, b in zip(weights, sizes, strict=True))
    t0 = sum(w * t for w, t in zip(weights, times, strict=True))
    t1 = sum(w * b * t for w, b, t in zip(weights, sizes, times, strict=True))
    per_sample = (s0 * t1 - s1 * t0) / (s0 * s2 - s1 * s1)
    fixed = (t0 - per_sample * s1) / s0
    if per_sample < 0:  # no growth measured: a constant
        return StepTime(fixed=t0 / s0, per_sample=0.0)
    if fixed < 0:  # through the origin
        return StepTime(fixed=0.0, per_sample=t1 / s2)
    return StepTime(fixed=fixed, per_sample=per_sample)


@dataclass(frozen=True)
class StepClock:
    """The study's clock: seconds per training step by batch size, as measured once before the
    first trial (``autobatch.tuning.clock.measure``); other sizes from the line through them.
    A trial's training time is its steps counted on it."""

    seconds: Mapping[int, float]

    @cached_property
    def line(self) -> StepTime | None:
        """``fixed + per_sample x B`` through the table; None below two sizes."""
        return fit_step_time({size: [s] for size, s in self.seconds.items()})

    def __call__(self, batch_size: int) -> float:
        """Seconds per step at ``batch_size``."""
        measured = self.seconds.get(batch_size)
        if measured is not None:
            return measured
        if self.line is not None:
            return self.line(batch_size)
        nearest = min(self.seconds, key=lambda s: abs(math.log(s / batch_size)))
        return self.seconds[nearest] * batch_size / nearest

    def for_batch_size(self, batch_size: int) -> Callable[[int], float]:
        """Seconds for one step of so many samples in a run at ``batch_size``: the size's own
        time, less in proportion to the line for an epoch's smaller last batch."""
        full, line = self(batch_size), self.line
        if line is None or line(batch_size) <= 0:
            per_sample = full / batch_size
            return lambda samples: full if samples >= batch_size else per_sample * samples
        scale = full / line(batch_size)  # computed once: this runs at every training step
        return lambda samples: full if samples >= batch_size else scale * line(samples)


def format_step_times(seconds: Mapping[Any, float]) -> str:
    """A clock's table as ``size: ms`` pairs, for logs and reports (sizes as stored: ints, or
    strings once read back from storage)."""
    return ", ".join(f"{size}: {s * 1e3:.3g}" for size, s in seconds.items())


def step_clock(settings: StudySettings) -> StepClock | None:
    """The study's clock; None for a study prepared without one (timed on the wall clock)."""
    found = settings.step_clock
    return clock_of(found.get("seconds") or {}) if found else None


def clock_of(seconds: Mapping[Any, float]) -> StepClock | None:
    """A clock from its table (sizes as ints, or strings once read back from storage); None
    for an empty one."""
    if not seconds:
        return None
    return StepClock({int(size): float(s) for size, s in seconds.items()})


@dataclass(frozen=True)
class Prediction:
    """Predicted training seconds to the target at one batch size."""

    batch_size: int
    seconds: float
    steps: float


def predict(
    records: Sequence[TrialRecord],
    noise: float,
    timing: Callable[[int], float],
    candidates: Sequence[int],
) -> list[Prediction]:
    """Time to target for each candidate: ``S(B) = S_min (1 + B_noise / B)`` steps of
    ``timing(B)`` seconds each. ``S_min`` is calibrated on the trials that reached the target:
    the fewest any of them implies, since the model assumes a learning rate tuned for each
    size and the trials' rates are not all tuned. Empty when no trial reached the target."""
    implied = [
        r.samples_to_target / r.batch_size / (1 + noise / r.batch_size)
        for r in records
        if r.state == COMPLETE and r.samples_to_target
    ]
    if not implied:
        return []
    s_min = min(implied)
    out = []
    for size in sorted(candidates):
        steps = s_min * (1 + noise / size)
        out.append(Prediction(size, steps * timing(size), steps))
    return out


def saturating_gain(batch_size: int, base_batch_size: int, noise: float) -> float:
    """How much a larger batch may scale the learning rate (AdaScale's gain in noise-scale
    terms): about ``B / B_base`` while both are well below ``B_noise``, levelling off at
    ``1 + B_noise / B_base`` above it, where more samples no longer average away noise."""
    if noise <= 0 or not math.isfinite(noise):
        raise ValueError(f"the noise scale must be positive and finite, got {noise}")
    return (1 + noise / base_batch_size) / (1 + noise / batch_size)


@dataclass(frozen=True)
class Explained:
    """One batch size: what the prior predicted and what the trials measured."""

    batch_size: int
    predicted_seconds: float | None  # to the target, from the noise scale and step time
    measured_seconds: float | None  # the fastest trial at this size that reached the target
    trials: int  # completed or pruned trials at this size
    out_of_memory: bool = False  # a trial at this size ran out of memory: no prediction


@dataclass(frozen=True)
class Explanation:
    """What the prior knows from a study's records: the noise scale, the step time, the
    predictions they make, and the "why this batch size" rows."""

    noise: float | None
    timing: StepTime | None
    predictions: tuple[Prediction, ...]
    rows: tuple[Explained, ...]

    @property
    def fastest(self) -> Prediction | None:
        """The batch size predicted to reach the target soonest."""
        return min(self.predictions, key=lambda p: p.seconds, default=None)


def explain(
    records: Sequence[TrialRecord], candidates: Sequence[int], clock: StepClock | None = None
) -> Explanation:
    """Predicted against measured time to target per batch size. ``records`` judged by the
    final target (:func:`scoring.rescore`); there are no predictions where the reference
    trial measured no noise scale or no trial reached the target. Step times come from the
    study's ``clock`` (its measured table), or, for a study without one, from the trials."""
    from autobatch.tuning import scoring

    noise = noise_scale(scoring.reference(records))
    timing = step_time(records) if clock is None else clock.line
    per_step = clock or timing
    infeasible = scoring.infeasible_sizes(records)
    feasible = [size for size in candidates if size not in infeasible]
    predictions = []
    if noise is not None and per_step is not None and feasible:
        predictions = predict(records, noise, per_step, feasible)
    predicted = {p.batch_size: p.seconds for p in predictions}
    rows = []
    for size in sorted(candidates):
        tried = [r for r in records if r.batch_size == size and r.curve]
        times = [r.time_to_target for r in tried if r.time_to_target is not None]
        rows.append(
            Explained(
                size, predicted.get(size), min(times, default=None), len(tried), size in infeasible
            )
        )
    return Explanation(noise, timing, tuple(predictions), tuple(rows))


#: A candidate predicted at least this many times slower to the target than the fastest is
#: dropped: no sampled trial runs there.
TOO_SLOW = 2.0


def too_slow(explanation: Explanation, keep: int | None = None) -> dict[int, float]:
    """The candidates predicted at least ``TOO_SLOW`` times slower to the target than the
    fastest, with their predicted seconds; never ``keep`` (the reference trial's batch size),
    nor a size a trial already measured within that factor (the measurement wins)."""
    fastest = explanation.fastest
    if fastest is None:
        return {}
    limit = TOO_SLOW * fastest.seconds
    measured = {
        row.batch_size: row.measured_seconds
        for row in explanation.rows
        if row.measured_seconds is not None
    }
    return {
        p.batch_size: p.seconds
        for p in explanation.predictions
        if p.seconds >= limit
        and p.batch_size != keep
        and measured.get(p.batch_size, math.inf) >= limit
    }
