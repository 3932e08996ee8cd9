"""The study's sampler: Optuna's TPE, kept off the batch sizes not worth a trial.

A worker knows, from the records, batch sizes that ran out of memory and sizes the prior
predicts at least twice as slow to the target as the fastest. Drawing such a size and then not
running it would leave a trial in the study that is not one (Optuna would show more finished
trials than ``n_trials``), and telling it as the worst result to teach TPE adds one each time.
Instead, a draw of such a size becomes the nearest size still worth a trial, before the trial
starts: TPE then learns from what actually ran. Queued trials keep the parameters they were
queued with: Optuna never asks the sampler for those.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Collection
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from autobatch.records import StudySettings

#: The parameter that is steered.
BATCH_SIZE = "batch_size"


class AvoidingSampler(BaseSampler):
    """``inner``'s draws, with a batch size in :attr:`avoid` moved to the nearest other
    candidate (in ratio; the larger of two as near). The worker sets :attr:`avoid` before each
    ``ask``."""

    def __init__(self, inner: BaseSampler) -> None:
        self.inner = inner
        self.avoid: frozenset[int] = frozenset()

    def steer(self, sizes: Collection[int]) -> None:
        self.avoid = frozenset(sizes)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.inner.sample_relative(study, trial, search_space)
        if BATCH_SIZE in params and BATCH_SIZE in search_space:
            params[BATCH_SIZE] = self._instead(params[BATCH_SIZE], search_space[BATCH_SIZE])
        return params

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        value = self.inner.sample_independent(study, trial, param_name, param_distribution)
        if param_name == BATCH_SIZE:
            value = self._instead(value, param_distribution)
        return value

    def _instead(self, size: Any, distribution: BaseDistribution) -> Any:
        if size not in self.avoid or not isinstance(distribution, CategoricalDistribution):
            return size
        allowed = [c for c in distribution.choices if c not in self.avoid]
        if not allowed:  # nothing is worth a trial: the worker stops the study itself
            return size
        return min(allowed, key=lambda c: (abs(math.log(float(c) / float(size))), -float(c)))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: list[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def sampler_for(settings: StudySettings, worker: str | None = None) -> AvoidingSampler:
    """TPE, seeded by the study's seed; a joining ``worker`` draws its own stream, so two
    workers never propose the same trial. Running trials count as losses (constant liar), so
    parallel workers spread out."""
    n = settings.n_trials or 20
    # Random start-up trials on top of the seeded ones: a quarter of the budget, so a short
    # study still spends most of its trials guided.
    startup = min(8, max(2, n // 4))
    seed = settings.seed if worker is None else zlib.crc32(f"{settings.seed}:{worker}".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True
        )
    return AvoidingSampler(tpe)
