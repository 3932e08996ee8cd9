"""Successive halving on training time, its first rung fixed by the reference trial.

Trials report their smoothed validation loss at training milliseconds (on the reference
hardware's clock), so they are compared at equal training time, the axis the objective is
measured on. The first rung is a fifth of the reference trial's training time, read from its
record in storage: every worker derives the same rung, and none is set before the reference
trial has ended. No bootstrap: Optuna's ``bootstrap_count`` prunes the first trials to reach a
rung whatever their curve.

A trial is compared at a rung only with the trials that could still be the answer: a trial
that completed above the target's level cannot, and the target only falls, so its loss at the
rung says nothing against one that may reach it. (Optuna's ``SuccessiveHalvingPruner``
counts every trial. Large-batch seeds fall fastest in the first fifth of a trial and level
off above the target; on the digits example a trial at 3.7x the rate, which ended at
half the baseline's loss, was cut behind one of them by 6% at the first rung, in one run of
three, and the study recommended the baseline.) Everything is read from the trials in
storage, so every worker decides alike and no state is kept between calls.

Every trial, seeded ones included, reports its loss at each rung, and later trials compete
against those reports. The worker asks the pruner only where its answer counts: not where
``prunable`` says no (seeded trials, trials past the lr range's end), nor for a trial that
already reached the target (its score is known), nor for one :func:`ahead_per_sample` whose
whole run costs no more than the reference trial's did.

Equal training time is the right yardstick for speed, not for the loss a trial ends at. A
small batch at a high rate learns the most per sample but is slowest per second early on;
where the budget, not the data, limits the loss, it ends lowest and lowers the target. (On
a GRU regression with Adam the best trial was batch 128; each trial at batch 32 and 4x
the rate was cut at the first rung, behind it on the clock though ahead of it at every
epoch, and the study recommended batch 128, 28% above what batch 32 reaches.) So a trial
that, at its epoch, is among the best of the contenders at that same epoch goes on: the
same halving rule on the other axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from autobatch.records import NEIGHBOUR, PREDICTED, EvalPoint, TrialRecord
from autobatch.tuning import curves, scoring, storage

#: Each rung keeps the best third of the trials that reach it, and lies three times further.
#: (2, twice the rungs each keeping half, spent no less on six tasks of
#: ``benchmarks/recommendation_quality.py``, hastie-adamw 25.5% of the grid's compute from
#: 20.7%, and cut gru-adam's batch-32 trials again: 1.277x its best loss on 2 seeds of 3.)
REDUCTION_FACTOR = 3


def prunable(role: str | None, objective: str) -> bool:
    """Whether halving may stop a trial: a sampled one, the predicted one or a neighbour of
    the fastest (each a bid to be faster, judged on time like the sampled). Never a seeded
    trial (the reference points the others are judged against; the ceiling seed made
    prunable, twice measured, saved no compute: blobs 19.0% of the grid's from 20.0%,
    digits-cnn 16.0% from 14.3%, 3 seeds each), nor a trial past the lr
    range's end (the highest rate yet, so the noisiest early curve; whether the study goes on
    doubling rests on its best loss), nor a carried one (the best trial's rate, often one of
    those, at the size predicted fastest: the recommendation rests on its whole curve), nor
    any under the Pareto objective (no single score). Any of them but the baseline and the
    walk past the range's end is still given up where its curve is hopeless
    (:func:`~autobatch.tuning.curves.hopeless`)."""
    return objective != "pareto" and role in (None, PREDICTED, NEIGHBOUR)


@dataclass
class Rungs:
    """The training times at which a trial is compared: ``first_ms`` times a power of the
    reduction factor. A worker reports and asks the pruner only there."""

    first_ms: int | None
    reduction_factor: int = REDUCTION_FACTOR
    asked_ms: int = 0

    def due(self, step_ms: int) -> bool:
        """True when a rung lies after the last step asked about, at or before ``step_ms``."""
        if self.first_ms is None:
            return False
        rung = self.first_ms
        while rung <= self.asked_ms:
            rung *= self.reduction_factor
        if step_ms < rung:
            return False
        self.asked_ms = step_ms
        return True


def promoted(value: float, others: Sequence[float], reduction_factor: int) -> bool:
    """Whether ``value`` is among the best ``1 / reduction_factor`` of itself and ``others``
    (the best of them, while they are fewer than the factor): Optuna's rule."""
    competing = sorted([*others, value])
    return value <= competing[max(len(competing) // reduction_factor, 1) - 1]


def contending(record: TrialRecord, level: float | None) -> bool:
    """Whether ``record`` could still be the answer: not completed above the target's level
    (the target only falls, so it never will be)."""
    return level is None or not (scoring.completed(record) and record.best_val_loss > level)


def ahead_per_sample(
    epoch: float,
    loss: float,
    rivals: Sequence[Sequence[EvalPoint]],
    reduction_factor: int = REDUCTION_FACTOR,
) -> bool:
    """Whether a trial at smoothed ``loss`` after ``epoch`` epochs is among the best
    ``1 / reduction_factor`` of ``rivals`` (the contenders' curves) at that same epoch: it
    learns at least as much per sample, so it may end below them however slow its steps.
    False where no rival got that far (nothing to go on)."""
    others = [
        next(p.val_loss_smoothed for p in curve if p.epoch >= epoch)
        for curve in rivals
        if curve and curve[-1].epoch >= epoch
    ]
    return bool(others) and promoted(loss, others, reduction_factor)


def value_at(trial: FrozenTrial, rung_ms: int) -> float | None:
    """The loss ``trial`` reported at the rung: its first report at or after it."""
    steps = [step for step in trial.intermediate_values if step >= rung_ms]
    return trial.intermediate_values[min(steps)] if steps else None


class TimeHalvingPruner(optuna.pruners.BasePruner):
    def __init__(self, reduction_factor: int = REDUCTION_FACTOR) -> None:
        self.reduction_factor = reduction_factor
        self.min_resource_ms: int | None = None  # the first rung, once the reference ended

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        trials = study.get_trials(deepcopy=False)
        records = storage.records(trials)
        first = scoring.pruning_scale_ms(records)
        if first is None:
            return False
        self.min_resource_ms = first
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        settings = storage.settings_of(study)
        target = None if settings is None else scoring.target_loss(records, settings)
        level = None if target is None else curves.threshold(target, settings.tolerance)
        out = {r.number for r in records if not contending(r, level)}
        rivals = [t for t in trials if t.number != trial.number and t.number not in out]
        # The rungs between this trial's previous report and this one: it passed the earlier.
        before = max((s for s in trial.intermediate_values if s < step), default=-1)
        rung = first
        while rung <= step:
            if rung > before:
                others = [v for t in rivals if (v := value_at(t, rung)) is not None]
                if not promoted(value, others, self.reduction_factor):
                    return True
            rung *= self.reduction_factor
        return False
