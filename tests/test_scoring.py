"""How trials are judged, on constructed records: misses against hits, the reference trial,
hardware of different speeds, and the pruner's rungs."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest

from autobatch.records import (
    BASELINE,
    BEYOND,
    CARRIED,
    CEILING,
    COMPLETE,
    FAILED,
    INFEASIBLE,
    MIDDLE,
    NEIGHBOUR,
    PREDICTED,
    PRUNED,
    RAISED,
    EvalPoint,
    StudySettings,
    TrialRecord,
)
from autobatch.tuning import curves, pruner, scoring, space, storage
from autobatch.tuning.pruner import TimeHalvingPruner, prunable
from autobatch.tuning.storage import RECORD, SETTINGS


def settings(**changes) -> StudySettings:
    values = dict(
        study_name="s", storage="in-memory", objective="time", lr_rule="sqrt",
        lr_multiplier_range=(0.25, 4.0), candidates=(16, 64, 256), max_epochs=4.0, n_trials=10,
        timeout=None, seed=0, sampler="TPESampler", pruner="SuccessiveHalving(training ms)",
        tolerance=0.05, target_loss=None, task_name="t", device="cpu", precision="fp32",
        base_lr=0.01, base_batch_size=16, train_size=1000,
    )  # fmt: skip
    values.update(changes)
    return StudySettings(**values)


def record(
    number: int,
    losses: list[float],
    seconds_per_eval: float,
    *,
    batch_size: int = 64,
    state: str = COMPLETE,
    role: str | None = None,
    max_epochs: float = 4.0,
) -> TrialRecord:
    """A trial whose smoothed validation loss takes ``losses``, one evaluation every
    ``seconds_per_eval`` training seconds."""
    curve = tuple(
        EvalPoint(
            samples=500 * (i + 1),
            seconds=seconds_per_eval * (i + 1),
            epoch=0.5 * (i + 1),
            train_loss=loss,
            val_loss=loss,
            val_loss_smoothed=loss,
            val_accuracy=None,
            samples_per_second=1.0,
            peak_memory_bytes=None,
            timestamp_ms=0,
        )  # fmt: skip
        for i, loss in enumerate(losses)
    )
    best = min(losses) if losses else None
    return TrialRecord(
        number=number, state=state, batch_size=batch_size, lr=0.01, lr_multiplier=1.0,
        lr_rule="sqrt", iterations_per_epoch=1, max_epochs=max_epochs, seed=0, curve=curve,
        train_seconds=seconds_per_eval * len(losses), best_val_loss=best, role=role,
    )  # fmt: skip


BASE = record(0, [2.0, 1.0, 0.5, 0.4], 10.0, batch_size=16, role=BASELINE)  # target 0.4


def test_a_miss_never_scores_better_than_a_hit() -> None:
    slow_hit = record(1, [1.5, 0.8, 0.5, 0.41], 30.0)  # reaches 0.42 after 120 s
    fast_miss = record(2, [1.2, 0.9], 0.5, batch_size=256)  # 1 s of training, never gets there
    records = [BASE, slow_hit, fast_miss]
    target = scoring.target_loss(records, settings())
    hit = scoring.score(slow_hit, settings(), target)
    miss = scoring.score(fast_miss, settings(), target)
    assert hit.reached and not miss.reached
    assert miss.values[0] > hit.values[0] > 0
    # Among misses, the one that came closer ranks first.
    closer = scoring.score(record(3, [0.6], 0.5), settings(), target)
    assert hit.values[0] < closer.values[0] < miss.values[0]
    result = scoring.recommend(records, settings())
    assert result.best_trial in (0, 1)  # a trial that reached the target, never the miss
    rescored = {r.number: r for r in result.trials}
    assert rescored[2].value > rescored[1].value and rescored[2].time_to_target is None


def test_the_baseline_is_the_reference_and_a_failed_one_hands_over() -> None:
    later = record(1, [1.0, 0.3], 5.0)
    assert scoring.reference([BASE, later]) is BASE
    assert scoring.target_loss([BASE], settings()) == 0.4
    assert scoring.target_loss([later], settings()) is None  # nothing before the reference
    assert scoring.target_loss([BASE, later], settings()) == 0.3  # follows the best loss
    assert scoring.target_loss([BASE], settings(target_loss=0.7)) == 0.7
    assert scoring.reference([later]) is None  # the baseline has not ended
    diverged = record(0, [2.0, math.inf], 10.0, batch_size=16, state=FAILED, role=BASELINE)
    assert scoring.reference([diverged, later]) is later
    assert scoring.pruning_scale_ms([BASE]) == int(40.0 * 1000 / 5)


def test_the_target_follows_the_best_loss_and_the_recommendation_ends_near_it() -> None:
    """A poor baseline (0.4) must not make speed to a poor loss the goal: the fast trial that
    only gets to the baseline's loss loses to the one that gets near the best loss found,
    and the epochs recommended are where the winner's curve first reached it."""
    fast_to_poor = record(1, [0.6, 0.41, 0.40, 0.40], 2.0, batch_size=256)  # 4 s to 0.41
    slow_to_best = record(2, [0.9, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2], 5.0)  # 0.2 at 20 s
    near_best = record(3, [0.8, 0.4, 0.204, 0.203, 0.2035, 0.204], 4.0)  # 0.204 at 12 s
    records = [BASE, fast_to_poor, slow_to_best, near_best]
    result = scoring.recommend(records, settings(tolerance=0.02))
    assert result.target_loss == 0.2
    assert result.best_trial == 3  # within 2% of 0.2, and the fastest to get there
    assert result.epochs == 2  # under the level from epoch 1.5, and at the end of epoch 2
    judged = {r.number: r for r in result.trials}
    assert judged[1].time_to_target is None and judged[1].value > judged[2].value
    assert judged[3].time_to_target == pytest.approx(16.0)  # at that epoch's end
    # A target the user gave is kept as given.
    mine = scoring.recommend(records, settings(tolerance=0.02, target_loss=0.4))
    assert mine.target_loss == 0.4 and mine.best_trial == 1


def test_the_recommendation_gives_steps_and_a_fractional_budget_its_partial_epoch() -> None:
    # 300 samples in batches of 16: 19 steps an epoch, the last of 12 samples; evaluated after
    # 6, 12 and 25 steps.
    trial = record(0, [2.0, 1.0, 0.5], 10.0, batch_size=16)
    points = [dataclasses.replace(p, samples=n, epoch=n / 300) for p, n in zip(
        trial.curve, (96, 192, 396), strict=True)]  # fmt: skip
    trial = dataclasses.replace(trial, curve=tuple(points), iterations_per_epoch=19)
    whole = curves.EpochChoice(epochs=2, at_epoch=1.32, index=2, best_index=2, warning=None)
    assert scoring.steps_to_train(whole, trial, max_epochs=3) == 38
    # Not 2 whole epochs, nor ceil(1.32 x 19) = 26: the 96 samples into epoch 2 are 6 steps.
    assert scoring.steps_to_train(whole, trial, max_epochs=1.5) == 25
    # A budget of 1.5 epochs whose best loss lies at its end: 2 whole epochs would overrun it.
    base = dataclasses.replace(
        record(0, [2.0, 1.0, 0.5], 10.0, batch_size=25, role=BASELINE, max_epochs=1.5),
        iterations_per_epoch=40,
    )
    result = scoring.recommend([base], settings(max_epochs=1.5))
    assert (result.epochs, result.steps) == (2, 60)
    assert result.recommendation()["steps"] == 60
    assert any("train 1.5 epochs instead (the result's steps)" in w for w in result.warnings)
    inside = scoring.recommend([base], settings(max_epochs=3.0))
    assert (inside.epochs, inside.steps) == (2, 80)


def test_a_study_where_no_trial_learned_says_so() -> None:
    flat = [record(n, [1.0986, 1.0986, 1.0985], 1.0, role=BASELINE if n == 0 else None)
            for n in range(3)]  # fmt: skip
    assert any("does not learn" in w for w in scoring.recommend(flat, settings()).warnings)
    learning = [*flat, record(3, [1.0986, 0.9, 0.8], 1.0)]
    assert not any("does not learn" in w for w in scoring.recommend(learning, settings()).warnings)


def test_a_recommendation_whose_evaluation_diverged_says_so() -> None:
    """Trained to 1.15 but evaluated at 1.6e16 (a sweep's other trials nan): broken, not
    overfitting."""
    base = record(0, [1.6e16, 1.7e16], 1.0, role=BASELINE)
    base = dataclasses.replace(
        base, curve=tuple(dataclasses.replace(p, train_loss=1.15) for p in base.curve)
    )
    warnings = scoring.recommend([base], settings()).warnings
    assert any("over 1000x its training loss" in w for w in warnings)
    fine = scoring.recommend([record(0, [1.0, 0.9], 1.0, role=BASELINE)], settings())
    assert not any("training loss" in w for w in fine.warnings)
    # Overfitting: a training loss near 0 under a validation loss 5000x higher is no alarm.
    overfit = dataclasses.replace(
        fine.trials[0],
        curve=tuple(
            dataclasses.replace(p, train_loss=t)
            for p, t in zip(fine.trials[0].curve, (1.2, 1e-4), strict=True)
        ),  # fmt: skip
    )
    assert not any("training loss" in w for w in scoring.recommend([overfit], settings()).warnings)


def test_the_winner_is_the_fastest_in_whole_epochs() -> None:
    """The user trains whole epochs: a trial that crosses the target early in an epoch pays
    for the rest of it."""
    early_in_epoch = record(1, [0.8, 0.5, 0.2, 0.2], 4.0)  # under it at epoch 1.5 (12 s); 2 = 16 s
    at_epoch_end = record(2, [0.8, 0.5, 0.3, 0.2], 3.5)  # target at epoch 2.0, 14 s
    result = scoring.recommend([BASE, early_in_epoch, at_epoch_end], settings(tolerance=0.02))
    judged = {r.number: r for r in result.trials}
    assert judged[1].time_to_target == pytest.approx(16.0)  # paid to the epoch's end
    assert judged[2].time_to_target == pytest.approx(14.0)
    assert (result.best_trial, result.epochs) == (2, 2)
    assert scoring.cost_seconds(judged[1]) == pytest.approx(16.0)


def test_a_dip_under_the_level_between_epoch_ends_is_not_reaching_it() -> None:
    """Training stops at an epoch's end: a curve under the level only between two is a miss,
    and is not recommended over a slower trial that ends an epoch at the level."""
    dips = record(1, [0.8, 0.5, 0.2, 0.26, 0.25, 0.25], 1.0)  # 0.2 at epoch 1.5 only
    steady = record(2, [0.8, 0.5, 0.3, 0.2, 0.2, 0.2], 5.0)  # 0.2 at the end of epoch 2
    result = scoring.recommend([BASE, dips, steady], settings(tolerance=0.02))
    judged = {r.number: r for r in result.trials}
    assert judged[1].time_to_target is None and judged[1].value > judged[2].value
    assert (result.best_trial, result.epochs) == (2, 2)


def _trained(trial: TrialRecord, train: list[float]) -> TrialRecord:
    """``trial`` with these training losses at its evaluations."""
    curve = tuple(
        dataclasses.replace(p, train_loss=t) for p, t in zip(trial.curve, train, strict=True)
    )
    return dataclasses.replace(trial, curve=curve)


def test_a_trial_whose_training_blew_up_neither_sets_the_target_nor_is_recommended() -> None:
    steady = record(1, [1.0, 0.6, 0.45, 0.4], 10.0)
    # A dip to 0.3, then the training loss itself climbs to 3x its lowest: past the edge.
    dip = _trained(record(2, [0.9, 0.3, 0.5, 0.9], 5.0), [1.0, 0.3, 0.5, 0.9])
    assert scoring.unstable(dip) and not scoring.unstable(steady)
    # Overfitting is not instability: the validation loss climbs, the training loss falls.
    overfit = _trained(record(3, [0.9, 0.3, 0.5, 0.9], 5.0), [1.0, 0.5, 0.3, 0.2])
    assert not scoring.unstable(overfit)
    # A loss that goes below zero (a negative log-likelihood), where a ratio means nothing,
    # is judged by its rise in units of its size: from -1 back up to 2.5 is past the edge.
    blown = _trained(record(4, [0.9, 0.3, 0.5, 0.9], 5.0), [0.5, -1.0, 0.0, 2.5])
    calm = _trained(record(5, [0.9, 0.3, 0.5, 0.9], 5.0), [0.5, -1.0, -1.2, -1.1])
    assert scoring.unstable(blown) and not scoring.unstable(calm)
    base = record(0, [1.2, 0.9, 0.7, 0.6], 10.0, role=BASELINE)
    records = [base, steady, dip]
    assert scoring.best_loss(records) == 0.4
    result = scoring.recommend(records, settings())
    assert result.best_trial == 1 and result.target_loss == 0.4
    assert any(w.startswith("trial 2 reached a lower loss (0.3)") for w in result.warnings)
    # Where every completed trial is unstable, they are judged as they are, and the
    # recommendation says it is not one to train with.
    blown = [_trained(base, [1.0, 0.5, 1.2, 1.5]), dip]
    assert scoring.best_loss(blown) == 0.3
    assert not any("every completed trial went unstable" in w for w in result.warnings)
    warnings = scoring.recommend(blown, settings()).warnings
    assert any(w.startswith("every completed trial went unstable (trial 2's") for w in warnings)
    # A step of the walk past the range that went unstable lost, whatever its best loss: it is
    # not taken again from a new best at another batch size.
    origin = _at(3, 3.0, 0.35, batch_size=256)
    step = _trained(_at(4, 6.0, 0.2, batch_size=256, role=BEYOND), [2.0, 1.5, 0.2, 0.9])
    moved = _at(5, 3.0, 0.3)
    assert space.past_the_edge([*_seeds(), origin, step, moved], settings()) is None
    calm = _at(4, 6.0, 0.32, batch_size=256, role=BEYOND)  # won, and stayed stable
    assert space.past_the_edge([*_seeds(), origin, calm, moved], settings()) == (64, 6.0)


def test_where_no_epoch_end_comes_near_the_lowest_loss_the_target_is_the_best_epoch_end() -> None:
    """A trial reaches the target only at an epoch end. Where the lowest loss is a dip between
    two epoch ends (0.30) that no epoch end comes within the tolerance of, the target is the
    lowest loss at an epoch end (0.38): the trials are judged by a level some reach, and the
    fastest of those is recommended, not the dip's own (it ends an epoch at 0.45, worse than
    the baseline) nor merely the closest."""
    dip = record(1, [0.8, 0.5, 0.30, 0.45], 1.0)
    steady = record(2, [0.9, 0.6, 0.42, 0.38], 5.0)
    result = scoring.recommend([BASE, dip, steady], settings(tolerance=0.02))
    assert result.target_loss == 0.38 and "the best loss at an epoch end, 0.38" in result.target()
    assert (result.best_trial, result.epochs) == (2, 2)
    judged = {r.number: r for r in result.trials}
    assert judged[2].time_to_target == 20.0 and judged[0].time_to_target is None
    assert judged[2].value < judged[0].value < judged[1].value  # reached; 0.40, 0.45 missed
    # A faster trial that ends within the tolerance of the best epoch end is recommended.
    quick = record(3, [0.8, 0.385], 2.0)
    result = scoring.recommend([BASE, dip, steady, quick], settings(tolerance=0.02))
    assert (result.target_loss, result.best_trial, result.epochs) == (0.38, 3, 1)
    # Where an epoch end comes within the tolerance of the dip, the dip stays the target.
    near = record(4, [0.8, 0.305], 2.0)
    assert (
        scoring.recommend([BASE, dip, steady, near], settings(tolerance=0.02)).target_loss == 0.30
    )


def test_objectives_and_infeasible_sizes() -> None:
    hit = record(1, [1.0, 0.41], 10.0)
    target = 0.4
    assert scoring.score(hit, settings(objective="loss"), target).values == (0.41,)
    pareto = scoring.score(hit, settings(objective="pareto"), target)
    assert pareto.values == (pytest.approx(20.0), 0.41)
    oom = record(2, [], 0.0, batch_size=256, state=INFEASIBLE)
    assert scoring.score(oom, settings(), target) is None
    assert scoring.infeasible_sizes([hit, oom]) == {256}
    with pytest.raises(Exception, match="no trial has finished yet.*run the same command"):
        scoring.recommend([], settings())
    with pytest.raises(Exception, match="no trial completed.*every trial ran out of memory"):
        scoring.recommend([oom], settings())
    diverged = record(3, [], 0.0, state=FAILED)
    with pytest.raises(Exception, match="no trial completed") as error:
        scoring.recommend([oom, diverged], settings())
    assert "ran out of memory" not in str(error.value) and "lower Task.lr" in str(error.value)


def _pruned_at_first_rung(study: optuna.Study, loss: float, step: int) -> bool:
    trial = study.ask()
    trial.report(loss, step=step)
    decision = trial.should_prune()
    if decision:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, loss)
    return decision


def test_the_pruner_waits_for_the_reference_and_keeps_a_leading_trial() -> None:
    study = optuna.create_study(pruner=TimeHalvingPruner())
    # Before the reference trial has ended, nothing is pruned.
    assert not _pruned_at_first_rung(study, 5.0, step=100_000)
    done = study.ask()
    done.set_user_attr(RECORD, BASE.to_dict())
    study.tell(done, 0.4)
    rung = scoring.pruning_scale_ms([BASE])
    # The first sampled trial to reach the rung, ahead of everyone: kept (Optuna's
    # bootstrap_count=2 pruned the first two whatever their loss).
    assert not _pruned_at_first_rung(study, 0.9, step=rung)
    assert not _pruned_at_first_rung(study, 0.8, step=rung)
    # One far behind the trials already at that rung: pruned.
    assert _pruned_at_first_rung(study, 3.0, step=rung)


def _finished(study: optuna.Study, rec: TrialRecord, at_rung: float, step: int) -> None:
    """A trial that reported ``at_rung`` at the first rung (its report alone makes it a rival
    there), then completed as ``rec``."""
    trial = study.ask()
    trial.report(at_rung, step=step)
    trial.set_user_attr(RECORD, dataclasses.replace(rec, number=trial.number).to_dict())
    study.tell(trial, rec.best_val_loss)


def test_a_trial_is_not_pruned_behind_one_that_ended_above_the_target() -> None:
    """A large-batch seed falls fastest early and levels off above the target: being behind it
    at the first rung says nothing against a trial that may reach the target."""
    study = optuna.create_study(pruner=TimeHalvingPruner())
    study.set_user_attr(SETTINGS, settings().to_dict())
    rung = scoring.pruning_scale_ms([BASE])
    _finished(study, BASE, 1.5, step=rung)  # target 0.4, level 0.42
    early_leader = record(0, [0.5, 0.45, 0.45, 0.45], 10.0, batch_size=256, role=CEILING)
    _finished(study, early_leader, 0.5, step=rung)
    assert not _pruned_at_first_rung(study, 0.55, step=rung)  # Optuna's own rule pruned it
    # Behind one that reached the target (and behind the baseline), it is pruned.
    _finished(study, record(0, [0.5, 0.41], 10.0), 0.5, step=rung)
    assert _pruned_at_first_rung(study, 1.6, step=rung)


def test_a_trial_ahead_per_sample_goes_on_where_it_costs_no_more_than_the_reference() -> None:
    """A small batch at a high rate is behind a large batch on the clock but ahead of it at
    every epoch: where the budget limits the loss, it ends lowest. Halving on time alone cut
    it; its lead per sample keeps it, unless finishing it costs more than the reference."""
    from autobatch.tuning.worker import _Yardstick

    base = record(0, [2.0, 1.0, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45], 10.0, batch_size=16, role=BASELINE)
    # Batch 64: four times cheaper per epoch, best so far (target 0.3).
    fast = record(1, [1.2, 0.8, 0.6, 0.5, 0.42, 0.36, 0.32, 0.3], 2.5, batch_size=64)
    done = [base, fast]
    assert pruner.contending(fast, 0.31) and not pruner.contending(base, 0.31)
    # At epoch 1 (its second evaluation), 0.7 against the leader's 0.8 at that epoch: ahead.
    assert pruner.ahead_per_sample(1.0, 0.7, [fast.curve])
    assert not pruner.ahead_per_sample(1.0, 0.9, [fast.curve])
    assert not pruner.ahead_per_sample(9.0, 0.1, [fast.curve])  # no rival got that far
    # Among the best third at that epoch, as halving keeps on time: 0.7 is not, of four.
    rivals = [fast.curve, *(record(n, [0.6, 0.5], 2.5).curve for n in (2, 3))]
    assert not pruner.ahead_per_sample(1.0, 0.7, rivals)

    def point(epoch: float, seconds: float, loss: float) -> EvalPoint:
        return dataclasses.replace(
            fast.curve[0], epoch=epoch, seconds=seconds, val_loss_smoothed=loss
        )

    at = settings(max_epochs=4.0, tolerance=0.05)
    judge = _Yardstick.of(done, at)
    assert judge.rivals == [fast.curve]  # the baseline ended above the level: no rival
    # At the baseline's batch size: it costs what the reference did. Ahead at epoch 1: kept.
    assert judge.keeps_on(point(1.0, 20.0, 0.7), at.max_epochs)
    assert not judge.keeps_on(point(1.0, 20.0, 0.9), at.max_epochs)  # behind per sample too
    # A smaller batch, twice the reference's cost to finish: its lead buys nothing.
    assert not judge.keeps_on(point(1.0, 40.0, 0.7), at.max_epochs)


def _study(later: list[TrialRecord]) -> list[TrialRecord]:
    """The baseline and three trials that set the answer (best loss 0.3, reached by trial 3
    at 30 s), then ``later``."""
    first = [
        BASE,
        record(1, [1.2, 0.6, 0.5, 0.45], 10.0),
        record(2, [1.0, 0.5, 0.35, 0.32], 10.0),
        record(3, [0.9, 0.4, 0.3, 0.3], 10.0),
    ]
    return first + later


def _worse(number: int) -> TrialRecord:
    return record(number, [1.5, 1.0, 0.8, 0.7], 10.0)


LATER = list(range(4, 4 + scoring.PATIENCE))  # the trials after the answer was set
ENOUGH = 4 + scoring.PATIENCE  # trials in a study that has stood still long enough


def test_a_study_settles_once_its_answer_stands_still() -> None:
    standing = _study([_worse(n) for n in LATER])
    assert scoring.settled(standing[:-1], settings(min_trials=6)) is None  # one trial short
    reason = scoring.settled(standing, settings(min_trials=6))
    assert reason is not None and reason.startswith(f"settled after {ENOUGH} trials")
    # Not before min_trials, and never without it (or for pareto, which has no one answer).
    assert scoring.settled(standing, settings(min_trials=ENOUGH + 1)) is None
    assert scoring.settled(standing, settings(min_trials=None)) is None
    assert scoring.settled(standing, settings(min_trials=6, objective="pareto")) is None
    # The loss objective looks at the loss alone.
    assert scoring.settled(standing, settings(min_trials=6, objective="loss")) is not None


def test_a_settled_study_first_runs_the_trials_it_queued() -> None:
    study = optuna.create_study()
    for rec in _study([_worse(n) for n in LATER]):
        trial = study.ask()
        trial.set_user_attr(RECORD, rec.to_dict())
        study.tell(trial, rec.best_val_loss)

    def settled(trials):
        return storage.settled(
            storage.progress(trials), storage.records(trials), settings(min_trials=6)
        )

    assert settled(study.get_trials()) is not None
    study.enqueue_trial({"batch_size": 128, "lr_multiplier": 2.0})  # e.g. a neighbour
    assert settled(study.get_trials()) is None


@pytest.mark.parametrize(
    ("late", "why"),
    [
        ([0.9, 0.4, 0.28, 0.27], "the best loss fell 10%"),
        ([0.5, 0.3, 0.3, 0.3], "the target reached twice as fast"),
    ],
)
def test_a_study_whose_answer_moved_in_its_last_trials_goes_on(late, why) -> None:
    later = [_worse(n) for n in LATER]
    later[1] = record(LATER[1], late, 10.0)
    assert scoring.settled(_study(later), settings(min_trials=6)) is None, why


def test_small_moves_do_not_keep_a_study_going() -> None:
    """A best loss 0.5% lower (a quarter of a 5% tolerance is 1.25%) and a cost 2.5% lower are
    seed noise, not progress."""
    later = [_worse(n) for n in LATER]
    later[1] = record(LATER[1], [0.9, 0.4, 0.3, 0.2985], 9.75)
    assert scoring.settled(_study(later), settings(min_trials=6)) is not None


def _at(number: int, multiplier: float, best: float, batch_size: int = 64, **kw) -> TrialRecord:
    curve = [2.0, 1.5, 1.0, best]  # its best at the end of epoch 2
    return dataclasses.replace(
        record(number, curve, 10.0, batch_size=batch_size, **kw), lr_multiplier=multiplier
    )


def _seeds() -> list[TrialRecord]:
    """The three seeded trials of ``settings()``'s candidates, ended, at the rule's rate."""
    return [
        _at(-3, 1.0, 0.5, batch_size=16, role=BASELINE),
        _at(-2, 1.0, 0.95, batch_size=256, role=CEILING),
        _at(-1, 1.0, 0.9, role=MIDDLE),
    ]


def test_a_best_trial_at_the_end_of_the_lr_range_asks_for_the_next_rate_past_it() -> None:
    # Not before every seed has ended: the baseline alone may lie outside a centred range.
    assert space.past_the_edge([_at(0, 0.3, 0.1, role=BASELINE)], settings()) is None
    inside = [*_seeds(), _at(1, 1.5, 0.4)]
    assert space.past_the_edge(inside, settings()) is None  # x1.5 is inside (0.25, 4)
    top = [*inside, _at(2, 3.0, 0.3)]  # within 2x of the top: the range may be the limit
    assert space.past_the_edge(top, settings()) == (64, 6.0)
    # Once that ran (or is queued), nothing more unless it became the best.
    assert space.past_the_edge([*top, _at(3, 6.0, 0.35)], settings()) is None
    assert space.past_the_edge(top, settings(), taken=[(64, 6.1)]) is None
    assert space.past_the_edge(top, settings(), taken=[(32, 6.0)]) == (64, 6.0)
    assert space.past_the_edge([*top, _at(3, 6.0, 0.2)], settings()) == (64, 12.0)
    # A diverged trial counts as having run there: the search stops at the rate that fails.
    failed = _at(3, 6.0, 0.2, state=FAILED)
    assert space.past_the_edge([*top, failed], settings()) is None
    # The bottom end likewise, halving.
    bottom = [*inside, _at(2, 0.3, 0.1, batch_size=256)]
    assert space.past_the_edge(bottom, settings()) == (256, 0.15)
    # A range that pins the rate stays pinned.
    assert space.past_the_edge(top, settings(lr_multiplier_range=(2.5, 3.0))) is None


def test_a_study_about_to_settle_with_its_best_still_falling_asks_for_twice_its_rate() -> None:
    # Inside the range, but the budget, not the rate, stopped it: a higher rate may get further.
    def best(losses: list[float], multiplier: float = 1.5, **kw) -> TrialRecord:
        return dataclasses.replace(record(3, losses, 10.0, **kw), lr_multiplier=multiplier)

    def study(top: TrialRecord, *more: TrialRecord) -> list[TrialRecord]:
        later = [dataclasses.replace(_worse(n), lr_multiplier=1.0) for n in LATER]
        return [*_seeds(), top, *later, *more]

    ending = settings(min_trials=6)
    falling = best([2.0, 1.5, 1.0, 0.8, 0.6, 0.5, 0.45, 0.4])
    assert space.raised_rate(study(falling), ending) == (64, 3.0)
    # Only as the study's last question: not while it would go on anyway.
    assert space.raised_rate(study(falling)[:-1], ending) is None  # one trial short
    assert space.raised_rate(study(falling), settings()) is None  # it runs every trial
    # Once that ran (or is queued), nothing more unless it became the best, falling still.
    assert space.raised_rate(study(falling, _at(9, 3.0, 0.45)), ending) is None
    assert space.raised_rate(study(falling), ending, taken=[(64, 3.1)]) is None
    # A step that lost at one batch size is not taken again from a best at another.
    lost = dataclasses.replace(_at(10, 3.0, 0.47, batch_size=256), role=RAISED)
    was = dataclasses.replace(_at(9, 1.5, 0.44, batch_size=256), role=RAISED)
    assert space.raised_rate(study(falling, was), ending) == (64, 3.0)
    assert space.raised_rate(study(falling, was, lost), ending) is None  # x3 lost at 256
    # Lowest before the end: it levelled off within the budget, and the rate stays.
    levelled = best([2.0, 1.5, 1.0, 0.8, 0.6, 0.4, 0.45, 0.5])
    assert space.raised_rate(study(levelled), ending) is None
    # Stopped early (plateaued at the target): not the budget's doing either.
    assert space.raised_rate(study(best([2.0, 1.5, 1.0, 0.4])), ending) is None
    # A best at the range's end walks past it instead (past_the_edge), not both.
    top = best([2.0, 1.5, 1.0, 0.8, 0.6, 0.5, 0.45, 0.4], multiplier=3.0)
    assert space.raised_rate(study(top), ending) is None
    assert (
        space.raised_rate(study(falling), settings(min_trials=6, lr_multiplier_range=(1.2, 2.0)))
        is None
    )


def test_a_step_of_the_walk_that_lost_at_one_batch_size_is_not_taken_at_another() -> None:
    top = [*_seeds(), _at(1, 1.5, 0.4), _at(2, 3.0, 0.3)]
    lost = [*top, _at(3, 6.0, 0.35, role=BEYOND)]  # x6 ended above x3, at batch size 64
    moved = [*lost, _at(4, 3.0, 0.2, batch_size=256)]  # the best moves to 256, still at x3
    assert space.past_the_edge(moved, settings()) is None
    # A step that won (or one not taken) is taken from the new best.
    won = [*top, _at(3, 6.0, 0.25, role=BEYOND), _at(4, 3.0, 0.2, batch_size=256)]
    assert space.past_the_edge(won, settings()) == (256, 6.0)
    fresh = [*top, _at(4, 3.0, 0.2, batch_size=256)]
    assert space.past_the_edge(fresh, settings()) == (256, 6.0)
    # A step that diverged lost; one that ran out of memory says nothing about the rate.
    diverged = [*top, _at(3, 6.0, 0.1, role=BEYOND, state=FAILED), moved[-1]]
    assert space.past_the_edge(diverged, settings()) is None
    oom = [*top, _at(3, 6.0, 0.1, role=BEYOND, state=INFEASIBLE), moved[-1]]
    assert space.past_the_edge(oom, settings()) == (256, 6.0)


def test_pruned_trials_steer_nothing_but_count_as_tried() -> None:
    """A pruned trial's curve was cut where halving compared it, so its loss is no end result:
    however low, it moves neither the best trial the walks start from nor the sampled range.
    It still ran where it ran, so no walk queues its configuration again."""

    def pruned(trial: TrialRecord) -> TrialRecord:
        return dataclasses.replace(trial, state=PRUNED)

    inside = [*_seeds(), _at(1, 1.5, 0.4)]
    # Lower than any completed loss, near the range's top and far past it: the best stays x1.5.
    low = [*inside, pruned(_at(2, 3.0, 0.1)), pruned(_at(3, 40.0, 0.05, batch_size=256))]
    assert scoring.best_trial(low).number == 1
    assert space.past_the_edge(low, settings()) is None
    assert space.sampling_range(low, settings()) == (0.25, 4.0)
    assert space.carried_over(low, settings(), fastest=256) == (256, 1.5)  # not x40
    # The walk along the batch size starts from the fastest completed trial; a neighbour
    # pruned above it ends the walk on that side, and it turns down.
    fast = [*_seeds(), _at(2, 1.5, 0.3), pruned(_at(3, 0.5, 0.9, batch_size=16))]
    assert space.neighbour(fast, settings()) == (256, 1.5)  # the pruned one counts as sampled
    cut = pruned(dataclasses.replace(_at(4, 1.5, 0.2, batch_size=256), role=NEIGHBOUR))
    assert space.neighbour([*fast, cut], settings()) == (16, 1.5)
    # A step past the range's end given up as hopeless lost: it is not taken again.
    top = [*inside, _at(2, 3.0, 0.3)]
    step = pruned(_at(3, 6.0, 0.1, role=BEYOND))
    assert space.past_the_edge([*top, step, _at(4, 3.0, 0.2, batch_size=256)], settings()) is None


def test_sampled_trials_draw_from_a_range_moved_to_a_best_trial_outside_it() -> None:
    """The range test centred the range on x16 (4-64); the best rate lies lower."""
    centred = settings(lr_centre=16.0)
    seeds = [  # the baseline at the task's own rate, the other seeds at the centre
        _at(-3, 1.0, 0.5, batch_size=16, role=BASELINE),
        _at(-2, 16.0, 0.95, batch_size=256, role=CEILING),
        _at(-1, 16.0, 0.9, role=MIDDLE),
    ]
    # Not before every seed has ended: the baseline alone says nothing against the centre.
    assert space.sampling_range(seeds[:1], centred) == (4.0, 64.0)
    # The baseline, at x1, is the best: the range moves down, same width, one doubling below.
    assert space.sampling_range(seeds, centred) == pytest.approx((0.5, 8.0))
    # A best trial far past the top moves it up alike. One inside, or within 2x of an end
    # (the walk past the end goes there, one doubling at a time), leaves it where it was.
    assert space.sampling_range([*_seeds(), _at(1, 12.0, 0.3)], settings()) == (
        pytest.approx((1.5, 24.0))
    )
    for near in (3.0, 6.0, 0.15):
        assert space.sampling_range([*_seeds(), _at(1, near, 0.3)], settings()) == (0.25, 4.0)
    # A range that pins the rate stays pinned.
    pinned = settings(lr_multiplier_range=(2.5, 3.0))
    assert space.sampling_range([*_seeds(), _at(1, 12.0, 0.3)], pinned) == (2.5, 3.0)


def test_the_best_multiplier_is_carried_to_the_predicted_fastest_size() -> None:
    def carried(records, fastest, taken=()):
        return space.carried_over(records, settings(), fastest, taken)

    inside = [*_seeds(), _at(1, 1.1, 0.45, batch_size=256)]
    # The best trial runs at the rule's own rate (within 1.25x): nothing to carry.
    assert carried(inside, 512) is None
    # The task's rate is about 3x too low, at the range's top: not while the search past the
    # range goes on (x6 asked for), only once it has stopped (x6 was worse).
    off = [*inside, _at(2, 3.0, 0.3)]
    assert carried(off, 512) is None
    off = [*off, _at(3, 6.0, 0.32, role=BEYOND)]
    assert carried(off, 512) == (512, 3.0)
    assert carried(off, None) is None  # nothing predicted yet
    assert carried(off, 64) is None  # the best trial already runs there
    # Once it ran there, or is queued, near that multiplier: nothing more.
    assert carried([*off, _at(4, 2.6, 0.35, batch_size=512)], 512) is None
    assert carried(off, 512, taken=[(512, 3.5)]) is None
    assert carried(off, 512, taken=[(512, 1.0)]) == (512, 3.0)
    # A new best at another multiplier, inside the range, is carried again.
    again = [*off, _at(4, 3.0, 0.35, batch_size=512), _at(5, 0.6, 0.2)]
    assert carried(again, 512) == (512, 0.6)


def test_the_fastest_trial_is_tried_at_the_next_batch_size_up_then_down() -> None:
    def next_to(records, taken=()):
        return space.neighbour(records, settings(), taken)

    seeds = _seeds()
    # Not before two sampled trials have ended: the search has not had its say on the rate.
    assert next_to(seeds) is None
    assert next_to([*seeds, _at(2, 1.0, 0.3, role=PREDICTED), _at(3, 2.2, 0.9)]) is None
    fast = [*seeds, _at(2, 1.5, 0.3), _at(3, 0.5, 0.9, batch_size=16)]  # 2 is the fastest
    assert next_to(fast) == (256, 1.5)
    # Above it ran, is queued near that multiplier, or ran out of memory: below it instead.
    assert next_to(fast, taken=[(256, 1.6)]) == (16, 1.5)
    assert next_to(fast, taken=[(256, 3.0)]) == (256, 1.5)  # another rate is another trial
    oom = dataclasses.replace(_at(4, 0.5, 0.9, batch_size=256), state=INFEASIBLE)
    assert next_to([*fast, oom]) == (16, 1.5)
    assert next_to(fast, taken=[(256, 1.5), (16, 1.5)]) is None
    # A neighbour that won is walked on from; one that lost ends the walk on that side.
    quicker = record(4, [1.0, 0.3], 10.0, batch_size=256, role=NEIGHBOUR)
    quicker = dataclasses.replace(quicker, lr_multiplier=1.5)
    assert next_to([*fast, quicker]) is None  # 256 is the top, and 64 at x1.5 ran
    lost = record(4, [1.5, 1.0, 0.9], 10.0, batch_size=256, role=NEIGHBOUR)
    assert next_to([*fast, dataclasses.replace(lost, lr_multiplier=1.5)]) == (16, 1.5)
    # Not while the search past the range's end goes on.
    edge = [*seeds, _at(2, 3.0, 0.3), _at(3, 0.5, 0.9, batch_size=16)]
    assert space.past_the_edge(edge, settings()) is not None and next_to(edge) is None


def test_which_trials_halving_may_stop() -> None:
    """Sampled trials and the predicted one; never a seed, a trial past the lr range's end (its
    early curve is the noisiest, and the study's next doubling rests on its best loss) or a
    carried one (the best rate at the size predicted fastest), and none under the Pareto
    objective."""
    assert prunable(None, "time") and prunable(PREDICTED, "time") and prunable(None, "loss")
    assert prunable(NEIGHBOUR, "time")
    steered = (BASELINE, CEILING, MIDDLE, BEYOND, CARRIED)
    assert not any(prunable(role, "time") for role in steered)
    assert not prunable(None, "pareto")
