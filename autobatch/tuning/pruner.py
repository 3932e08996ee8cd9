"""Successive halving on training time, its first rung fixed by the reference trial.

Trials report their smoothed validation loss at training milliseconds (on the reference
hardware's clock), so they are compared at equal training time, the axis the objective is
measured on. The first rung is a fifth of the reference trial's training time, read from its
record in storage: every worker derives the same rung, and none is set before the reference
trial has ended. No bootstrap: Optuna's ``bootstrap_count`` prunes the first trials to reach a
rung whatever their curve.

The worker asks every trial, seeded ones included, so each registers its loss at each rung and
later trials compete against it; the worker ignores the answer for seeded trials and for a
trial that already reached the target (its score is known).
"""

from __future__ import annotations

import optuna

from autobatch.tuning import scoring, storage


class TimeHalvingPruner(optuna.pruners.BasePruner):
    def __init__(self, reduction_factor: int = 3) -> None:
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
