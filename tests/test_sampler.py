"""The study's sampler keeps its draws off the batch sizes not worth a trial."""

from __future__ import annotations

import optuna

from autobatch.tuning.sampler import AvoidingSampler

SIZES = [8, 16, 32, 64, 128]


def _draw(study: optuna.Study) -> int:
    trial = study.ask()
    size = trial.suggest_categorical("batch_size", SIZES)
    trial.suggest_float("lr_multiplier", 0.25, 4.0, log=True)
    study.tell(trial, float(size))
    return size


def test_avoided_sizes_become_the_nearest_other_candidate() -> None:
    sampler = AvoidingSampler(optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(sampler=sampler)
    free = [_draw(study) for _ in range(40)]
    assert set(free) == set(SIZES)  # nothing avoided: the inner sampler's draws
    sampler.steer({8, 16, 128})
    steered = [_draw(study) for _ in range(40)]
    assert set(steered) == {32, 64}
    # 8 and 16 move to 32, 128 to 64: as often as the inner sampler drew them
    inner = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    raw = [_draw(inner) for _ in range(80)][40:]
    assert steered.count(32) == sum(s in (8, 16, 32) for s in raw)


def test_tpe_draws_are_steered_and_queued_trials_keep_their_size() -> None:
    tpe = optuna.samplers.TPESampler(seed=1, n_startup_trials=2, multivariate=True)
    sampler = AvoidingSampler(tpe)
    study = optuna.create_study(sampler=sampler)
    sampler.steer({8, 16})
    # TPE is drawn to the small sizes (they score best) and never gets them
    assert all(_draw(study) in (32, 64, 128) for _ in range(15))
    study.enqueue_trial({"batch_size": 8, "lr_multiplier": 1.0})
    assert _draw(study) == 8
    sampler.steer(set(SIZES))  # everything avoided: the inner draw stands
    assert _draw(study) in SIZES
