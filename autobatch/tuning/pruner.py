"""Successive halving on training time, its first rung fixed by the reference trial.

Trials report their smoothed validation loss at training milliseconds (on the reference
hardware's clock), so they are compared at equal training time, the axis the objective is
measured on. The first rung is a fifth of the reference trial's training time, read from its
record in storage: every worker derives the same rung, and none is set before the reference
trial has ended. No bootstrap: Optuna's ``bootstrap_count`` prunes the first trials to reach a
rung whatever their curve.

The worker asks every trial, seeded ones included, so each registers its loss at each rung and
later trials compete against it; the worker ignores the answer where ``prunable`` says so
(seeded trials, trials past the lr range's end) and for a trial that already reached the
target (its score is known).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from autobatch.records import NEIGHBOUR, PREDICTED
from autobatch.tuning import scoring, storage

#: Each rung keeps the best third of the trials that reach it, and lies three times further.
REDUCTION_FACTOR = 3


def prunable(role: str | None, objective: str) -> bool:
    """Whether halving may stop a trial: a sampled one, the predicted one or a neighbour of
    the fastest (each a bid to be faster, judged on time like the sampled). Never a seeded
    trial (the reference points the others are judged against), nor a trial past the lr
    range's end (the highest rate yet, so the noisiest early curve; whether the study goes on
    doubling rests on its best loss), nor a carried one (the best trial's rate, often one of
    those, at the size predicted fastest: the recommendation rests on its whole curve), nor
    any under the Pareto objective (no single score)."""
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


class TimeHalvingPruner(optuna.pruners.BasePruner):
    def __init__(self, reduction_factor: int = REDUCTION_FACTOR) -> None:
        self.reduction_factor = reduction_factor
        self._inner: optuna.pruners.SuccessiveHalvingPruner | None = None

    @property
    def min_resource_ms(self) -> int | None:
        return None if self._inner is None else self._inner._min_resource

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self._inner is None:
            # Fixed once known: the reference trial's record never changes.
            scale = scoring.pruning_scale_ms(storage.records(study.get_trials(deepcopy=False)))
            if scale is None:
                return False
            self._inner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=scale, reduction_factor=self.reduction_factor, bootstrap_count=0
            )
        return self._inner.prune(study, trial)
