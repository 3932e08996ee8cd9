"""The learning-rate range test: where the study's multiplier range is centred.

The lr rules carry a rate from one batch size to another; they cannot say whether the task's
own rate was right. On the five tasks of ``benchmarks/recommendation_quality.py`` it was off
by 2x to 20x, and the study found that by walking past the end of its multiplier range one
doubling at a time (full trials that are never pruned), while every sampled trial drew its
rate from a range that did not hold the best one.

Before any trial, a fresh model trains for :data:`STEPS` steps at the baseline's batch size
while the rate rises geometrically from :data:`LOW` to :data:`HIGH` times the task's (Smith,
"Cyclical Learning Rates", 2017; fastai's ``lr_find``, Lightning's ``lr_find``). The smoothed
training loss falls, bottoms out and blows up; a tenth of the rate at its lowest point is a
sound rate to train at. On those five tasks (and the digits example) it lay within 0.4x-3.5x
of the best multiplier the studies found, at the cost of about a tenth of one trial, and
deterministically: a seeded model and data order, no timing.

That is coarse, so the range is centred on it only when it lies past the range's reach, more
than :data:`~autobatch.tuning.space.EDGE` times beyond an end: where the study would
otherwise walk several full trials to get there. Centred there, the CNN and the regression
task of the benchmark (suggestions 35x and 12x) reached the grid's loss level in 0.21x and
0.20x the grid's fastest time instead of 0.34x and 0.32x, at 60% of the compute. Centred on
suggestions within that reach (the SGD tasks, 3x and 7x; sequences, 2x), the studies ended
1-27% above the loss they found on the task's own rate, as their sampled trials left the
rates near it (docs/concepts.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from autobatch.data import BatchSource
from autobatch.training import TrainStep, build, needs_two_samples, seeded
from autobatch.tuning import curves
from autobatch.tuning.space import EDGE
from autobatch.workload import Workload

#: Steps of the test, and the rates it spans, as multiples of the task's.
STEPS = 100
LOW, HIGH = 1e-2, 1e3
#: The smoothed loss this many times its lowest ends the test: the rate is past divergence.
#: Read as a climb above the lowest of ``BLOWUP - 1`` times the loss's size
#: (:func:`blown_up`), so that a loss that can be negative is judged as a positive one is.
BLOWUP = 4.0
#: Smoothing of the training loss (an exponential average, bias-corrected).
BETA = 0.9
#: The rate suggested is the one at the lowest loss divided by this.
BELOW_MINIMUM = 10.0
#: The smoothed loss must fall by this fraction of its first value (of its size, for a
#: negative one) for the test to count: a loss that 100 steps do not move (a hard task, a
#: model that learns slowly) says nothing.
DESCENT = 0.1
#: The centre is kept within these multiples of the task's rate: a test misled by a noisy
#: loss moves the range by at most this much, and the walk past its end does the rest.
CLAMP = (1 / 16, 64.0)


@dataclass(frozen=True)
class RangeTest:
    """What the test measured, in rates and as a multiple of the task's rate (``centre``)."""

    task_lr: float
    batch_size: int
    steps: int
    lr_at_minimum: float  # where the smoothed training loss was lowest
    diverged_lr: float | None  # where it blew up; None when it never did within the span
    suggested: float  # a tenth of the rate at the lowest loss, as a multiple of the task's
    descended: bool  # the loss fell by DESCENT at least: else the test is not used
    centre: float  # the multiplier the search is centred on: ``suggested``, or 1 (see above)
    seconds: float  # the test's training time, counted in the study's compute
    wall_seconds: float | None = None  # where ``seconds`` counts its steps on the study's clock

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggestion(lrs: list[float], losses: list[float], task_lr: float) -> float:
    """The multiplier a tenth of the way below the rate of the lowest loss, clamped."""
    lowest = min(range(len(losses)), key=losses.__getitem__)
    return _clamped(lrs[lowest] / BELOW_MINIMUM / task_lr)


def _clamped(multiplier: float) -> float:
    return min(max(multiplier, CLAMP[0]), CLAMP[1])


def blown_up(smoothed: float, lowest: float, first: float) -> bool:
    """Whether the smoothed loss has climbed past divergence: above its lowest by
    ``BLOWUP - 1`` times the loss's size (:func:`~autobatch.tuning.curves.loss_scale`). For a
    positive loss that has not fallen below a fifth of its first value this is
    ``smoothed > BLOWUP * lowest``; read so for a negative lowest (``4 * lowest`` lies below
    it), it ended the test at its first step."""
    scale = curves.loss_scale(lowest, first)
    return scale > 0 and smoothed - lowest > (BLOWUP - 1) * scale


def descended(losses: list[float]) -> bool:
    """Whether the smoothed loss fell by :data:`DESCENT` of its first value's size."""
    return bool(losses) and min(losses) <= losses[0] - DESCENT * abs(losses[0])


def centre_for(suggested: float, multipliers: tuple[float, float]) -> float:
    """``suggested`` when it lies more than ``EDGE`` times past an end of ``multipliers``;
    else 1: within that reach the study's own search does better than the coarse test."""
    low, high = multipliers
    return suggested if not low / EDGE <= suggested <= high * EDGE else 1.0


def range_test(
    task: Workload, data: BatchSource, batch_size: int, multipliers: tuple[float, float]
) -> RangeTest:
    """Run the test on a fresh model (the workload's seed); the caller's random state, model
    and optimizer are untouched."""
    lrs: list[float] = []
    losses: list[float] = []
    diverged = None
    started = time.perf_counter()
    with seeded(task):
        model, optimizer = build(task, task.lr * LOW)
        # Each group's own rate at task.lr * LOW: the sweep scales them all alike, keeping the
        # ratios the optimizer factory set (a backbone at a tenth of the head's rate).
        starts = [group["lr"] for group in optimizer.param_groups]
        step = TrainStep(task, model, optimizer)
        generator = torch.Generator().manual_seed(task.seed)
        average, lowest = 0.0, math.inf
        try:
            while len(lrs) < STEPS and diverged is None:
                drop = needs_two_samples(model)
                for batch in data.epoch(batch_size, generator, drop_single=drop):
                    i = len(lrs)
                    lr = task.lr * LOW * (HIGH / LOW) ** (i / (STEPS - 1))
                    for group, start in zip(optimizer.param_groups, starts, strict=True):
                        group["lr"] = start * lr / (task.lr * LOW)
                    loss = float(step(batch))
                    if not math.isfinite(loss):
                        diverged = lr
                        break
                    average = BETA * average + (1 - BETA) * loss
                    smoothed = average / (1 - BETA ** (i + 1))
                    lrs.append(lr)
                    losses.append(smoothed)
                    lowest = min(lowest, smoothed)
                    if blown_up(smoothed, lowest, losses[0]):
                        diverged = lr
                        break
                    if len(lrs) >= STEPS:
                        break
        finally:
            del model, optimizer, step
    seconds = time.perf_counter() - started
    suggested = suggestion(lrs, losses, task.lr) if lrs else 1.0
    lr_at_minimum = lrs[min(range(len(losses)), key=losses.__getitem__)] if lrs else task.lr
    fell = descended(losses)
    centre = centre_for(suggested, multipliers) if fell else 1.0
    if not fell and diverged is not None and diverged <= task.lr:
        # Blown up below the task's own rate before the loss fell: that rate is past the
        # stable edge (SGD at 1e4 diverged at the test's first step), so go below it.
        suggested = _clamped(diverged / BELOW_MINIMUM / task.lr)
        centre = centre_for(suggested, multipliers)
    return RangeTest(
        task.lr,
        batch_size,
        len(lrs),
        lr_at_minimum,
        diverged,
        suggested,
        fell,
        centre,
        seconds,
    )
