"""Learning-curve arithmetic: smoothing, the epoch to stop at, time to a target loss.

Pure functions on lists of numbers, so the rules can be tested on constructed curves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Weight of the previous smoothed value in the exponential moving average. Causal (it never
#: looks ahead), so "first reached the target" means the same live and in hindsight.
SMOOTHING = 0.6


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: noisy evaluations stop looking like progress."""
    out: list[float] = []
    average = 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def within(value: float, best: float, tolerance: float) -> bool:
    """``value`` is no worse than ``best`` by more than ``tolerance`` (relative)."""
    return value <= best + tolerance * abs(best)


#: The share of a loss's fall that also counts as its size (:func:`loss_scale`).
FALL_SHARE = 0.25


def loss_scale(lowest: float, first: float) -> float:
    """The size a rise of a loss from its ``lowest`` is measured against: that lowest's size,
    or a share of the fall from ``first``, whichever is larger. For a positive loss that has
    not fallen below a fifth of ``first`` it is the lowest itself (so ``lowest + 3 x scale``
    is ``4 x lowest``); a loss that can be negative (a negative log-likelihood) passes near
    zero, or below it, where its lowest's size says nothing of how much it moves."""
    return max(abs(lowest), FALL_SHARE * (first - lowest))


def threshold(target: float, tolerance: float) -> float:
    """The loss a trial must reach: ``target x (1 + tolerance)`` for positive losses."""
    return target + tolerance * abs(target)


def first_reaching(values: Sequence[float], level: float) -> int | None:
    """Index of the first value at or below ``level``."""
    return next((i for i, v in enumerate(values) if v <= level), None)


def reaching(
    epochs: Sequence[float], smoothed: Sequence[float], level: float, max_epochs: float
) -> int | None:
    """Index of the first point where training can stop (:func:`stops`) at or below ``level``.

    A curve that dips under the level mid-epoch and is back above it at the epoch's end has
    not reached it: on ``classes4-sgd`` of the quality benchmark (SGD at 7.5x the rate) one
    crossed the level a quarter into its fifth epoch, was 1.2% above it at the epoch's end,
    and the recommendation (5 epochs) ended 3.2% above the study's best loss."""
    return next((i for i in stops(epochs, max_epochs) if smoothed[i] <= level), None)


def stops(epochs: Sequence[float], max_epochs: float) -> list[int]:
    """Indices of the points where training can stop: the epoch ends (every epoch ends with
    an evaluation, and a recommendation is in whole epochs) and the end of a fractional
    ``max_epochs`` budget; on a curve with no epoch end (a budget under one epoch), every
    point."""
    ends = [i for i, epoch in enumerate(epochs) if _epoch_end(epoch)]
    if not ends:
        return list(range(len(epochs)))
    last = len(epochs) - 1
    if ends[-1] != last and epochs[last] >= max_epochs - 1e-9:
        ends.append(last)
    return ends


def best_at_stop(epochs: Sequence[float], smoothed: Sequence[float], max_epochs: float) -> float:
    """The lowest smoothed loss at a point where training can stop (:func:`stops`): the best
    a run of whole epochs delivers. A dip between two epoch ends is not: on a noisy SGD
    regression the study's best loss came from one, no epoch end of any trial came within
    the tolerance of it, and the trial recommended as the closest, the dip's own, ended 5%
    above the best epoch end of another."""
    return min(smoothed[i] for i in stops(epochs, max_epochs))


def plateaued(
    epochs: Sequence[float],
    smoothed: Sequence[float],
    level: float,
    max_epochs: float,
    patience: int = 3,
) -> bool:
    """Target reached (:func:`reaching`) and no new best for ``patience`` evaluations:
    nothing left to learn."""
    if reaching(epochs, smoothed, level, max_epochs) is None or len(smoothed) <= patience:
        return False
    best_index = min(range(len(smoothed)), key=smoothed.__getitem__)
    return len(smoothed) - 1 - best_index >= patience


#: A trial is given up (:func:`hopeless`) only past this share of its budget: the best
#: configurations of ``benchmarks/recommendation_quality.py``'s exhaustive grids were up to 7.9x
#: their final best loss at a quarter of the budget (a regression at a small batch), and
#: none was given up from a third on.
HOPELESS_FROM = 1 / 3
#: The pace a curve is projected at: its best loss's ratio over this share of the budget.
HOPELESS_PACE = 1 / 8
#: How far above the level even the optimistic projection must end. Over the grids' curves
#: that went on to reach a level of 1.01-1.1x the best, the highest projection before they
#: reached it, from a third of the budget on, was 1.29x that level; at levels up to 3x the
#: best (a study's target before it finds the right rate), the curves given up that would
#: have reached it all ended 1.56x the best or higher. With 2.0 (before :data:`SPEEDING_UP`),
#: studies spent up to 4.6 points more of the grid's compute on nine of fifteen tasks
#: (blobs-SGD 19.2% against 14.6%), at most 1.2 less on the others but gru-adam.
HOPELESS_FACTOR = 1.5
#: How much faster than over the window before a curve's best must fall to count as speeding
#: up (no pace to project): a loss falling by the same amount each epoch falls a little
#: faster each epoch as a ratio, and is not speeding up in any way that matters.
SPEEDING_UP = 0.25


def projected_end(
    epochs: Sequence[float], smoothed: Sequence[float], max_epochs: float
) -> float | None:
    """An optimistic end for a curve: its best smoothed loss so far, falling for the rest of
    the budget at the pace (ratio per epoch) its best loss fell over the last
    :data:`HOPELESS_PACE` of the budget, as though it never slowed (curves slow down). The
    best so far, not the last: a high rate's curve spikes and comes back.

    None where there is no such pace: before two windows of a curve exist, for a loss that
    is not positive (a ratio means nothing there), or while the best falls faster than it
    did over the window before (by :data:`SPEEDING_UP`). A curve speeding up breaks the
    premise, and early curves do: at a low rate, training leaves its first plateau slowly
    (on digits with Adam at 1e-3, batch 32 fell 12% over the second half of its first epoch
    and 39% over its second)."""
    if not epochs or len(epochs) != len(smoothed):
        return None
    best = list(itertools.accumulate(smoothed, min))  # the best so far, at each point
    window = HOPELESS_PACE * max_epochs

    def window_before(i: int) -> int | None:
        earlier = [j for j in range(i) if epochs[j] <= epochs[i] - window + 1e-9]
        return earlier[-1] if earlier else None

    now = len(epochs) - 1
    start = window_before(now)
    first = None if start is None else window_before(start)
    if start is None or first is None or not (best[now] > 0 and math.isfinite(best[first])):
        return None

    def pace(a: int, b: int) -> float:  # log of the ratio per epoch
        return math.log(best[b] / best[a]) / (epochs[b] - epochs[a])

    if pace(start, now) < (1 + SPEEDING_UP) * pace(first, start):
        return None
    return best[now] * math.exp(pace(start, now) * (max_epochs - epochs[now]))


def hopeless(
    epochs: Sequence[float], smoothed: Sequence[float], level: float, max_epochs: float
) -> bool:
    """Whether a curve that has not reached ``level`` can be given up: past
    :data:`HOPELESS_FROM` of the budget, even :func:`projected_end` lies above
    :data:`HOPELESS_FACTOR` times the level. The level only falls as the study goes on, so
    such a trial would never be the answer; successive halving cannot stop the seeded trials,
    and a trial that passed its rungs early can still end far off."""
    if level <= 0 or not epochs or epochs[-1] < HOPELESS_FROM * max_epochs:
        return False
    if reaching(epochs, smoothed, level, max_epochs) is not None:
        return False
    end = projected_end(epochs, smoothed, max_epochs)
    return end is not None and end > HOPELESS_FACTOR * level


def still_falling(epochs: Sequence[float], smoothed: Sequence[float], max_epochs: float) -> bool:
    """Whether a curve ran its whole budget and was lowest at its last evaluation: the
    budget, not the rate, stopped it. One evaluation shows no direction: not falling."""
    if len(smoothed) < 2 or epochs[-1] < max_epochs * 0.999:
        return False
    return min(range(len(smoothed)), key=smoothed.__getitem__) == len(smoothed) - 1


@dataclass(frozen=True)
class EpochChoice:
    """Where to stop training, read off one smoothed validation curve."""

    epochs: int  # whole epochs to train
    at_epoch: float  # the evaluation point (fractional epoch) the rule picked
    index: int
    best_index: int
    warning: str | None


def choose_epochs(
    epochs: Sequence[float],
    smoothed: Sequence[float],
    max_epochs: float,
    tolerance: float,
    level: float | None = None,
) -> EpochChoice:
    """The first point where the smoothed curve reaches ``level`` (the study's target), or,
    without one or when the curve never gets there, comes within ``tolerance`` of its own
    minimum.

    Stopping there gets the loss asked for at the least cost. A minimum at the very end of
    the budget says the budget was too small to see where training stops helping; a choice
    in the first tenth says most of the budget was wasted.
    """
    if not epochs or len(epochs) != len(smoothed):
        raise ValueError("choose_epochs needs one smoothed value per evaluation point")
    best_index = min(range(len(smoothed)), key=smoothed.__getitem__)
    index = None if level is None else first_reaching(smoothed, level)
    whole = None
    if index is None:
        index = next(
            i for i, v in enumerate(smoothed) if within(v, smoothed[best_index], tolerance)
        )
    else:
        # Training stops at a whole epoch, so that is where the loss must be at the level
        # (:func:`reaching`). If no epoch end is, the one nearest it: rounding the crossing up
        # instead chose, on a regression task at a high Adam rate, the epoch end 30% above
        # the level, with the next one 0.2% above it.
        stop = reaching(epochs, smoothed, level, max_epochs)
        if stop is None:
            ends = [i for i in range(index, len(epochs)) if _epoch_end(epochs[i])]
            stop = min(ends, key=smoothed.__getitem__) if ends else None
        if stop is not None and _epoch_end(epochs[stop]):
            whole = math.ceil(epochs[stop] - 1e-9)
    at = float(epochs[index])
    warning = None
    if still_falling(epochs, smoothed, max_epochs):
        warning = (
            f"the validation loss was still falling at the end of the {max_epochs:g}-epoch "
            "budget: raise max_epochs to see where it levels off"
        )
    elif at <= 0.1 * max_epochs:
        warning = (
            f"the validation loss levelled off within {at:.2g} epochs, the first tenth of the "
            f"{max_epochs:g}-epoch budget: lower max_epochs to save time"
        )
    chosen = max(1, whole if whole is not None else math.ceil(at - 1e-9))
    if chosen > max_epochs + 1e-9 and at < chosen - 1e-9:
        # Only a fractional budget gets here: the stop lies in its last, partial epoch.
        # ``at`` can pass a fractional budget by part of a step: training ends at a whole step.
        where = (
            "under one epoch"
            if max_epochs < 1
            else f"past the last whole epoch of the {max_epochs:g}-epoch budget"
        )
        past = (
            f"the stopping point lies {at:.3g} epochs in, {where}, and the recommendation "
            f"rounds it up to {chosen} epoch{'s' if chosen > 1 else ''}: train {at:.3g} epochs "
            "instead (the result's steps), or give max_epochs in whole epochs"
        )
        warning = past if warning is None else f"{warning}; {past}"
    return EpochChoice(chosen, at, index, best_index, warning)


def _epoch_end(epoch: float) -> bool:
    return epoch >= 1 - 1e-9 and abs(epoch - round(epoch)) < 1e-6


def area_under(seconds: Sequence[float], losses: Sequence[float]) -> float | None:
    """Mean loss over the training time (trapezoids), comparable across trial lengths."""
    if len(seconds) < 2 or seconds[-1] <= seconds[0]:
        return None
    total = sum(
        (seconds[i] - seconds[i - 1]) * (losses[i] + losses[i - 1]) / 2
        for i in range(1, len(seconds))
    )
    return total / (seconds[-1] - seconds[0])
