"""How trials are judged: pure functions of trial records and the study's settings.

A worker calls them when its trial ends, for the value Optuna is told; the recommendation calls
them again on every stored record, so whichever process reads a study gets the same answer, and
an early trial is judged by the same target as a late one.

Seconds are training seconds on the study's clock (``autobatch.tuning.clock``): every trial's
steps counted at the step times measured where the study was prepared, whichever worker ran it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from autobatch.errors import AutobatchError
from autobatch.records import (
    BASELINE,
    COMPLETE,
    INFEASIBLE,
    ProbeResult,
    StudySettings,
    TrialRecord,
    TuneResult,
)
from autobatch.tuning import curves

#: What a trial that never reached the target scores, before its distance to the target is
#: added: more seconds than any trial that reached it can take, so a miss never ranks above a
#: hit, for the sampler or in a sorted table.
MISS_OFFSET = 1e9
#: What a trial that ran out of memory scores, for the sampler (never a recommendation).
INFEASIBLE_VALUE = 1e12
#: How far above the best loss found the target lies, by default. The study's best is one
#: seed's curve, and the best reachable (an exhaustive grid's) lies about 1% lower on tasks
#: where the study cannot beat the grid: aimed at 2%, the recommendation, retrained, ended
#: over 2% above the best reachable on 4 of 27 task-seeds of ``recommendation_quality.py``
#: and two tasks built to check it; aimed at 1%, on 2 (one, at 5%, in both: a study whose
#: pruning timing sent it elsewhere). It costs compute: docs/concepts.md.
TOLERANCE = 0.01
#: Finished trials in a row that must leave the answer where it stood before a study may end
#: before ``n_trials`` (:func:`settled`).
PATIENCE = 5
#: The trials a study runs, by default, before it may end settled: the seeds, the predicted
#: trial and the steered ones have had their say by then. Cut after 12 trials, 20-trial
#: studies ended at the same loss on 11 of 12 task-seeds of ``recommendation_quality.py``
#: (the twelfth: 0.94x the grid's best loss, not 0.82x); with 8, studies rarely settled
#: sooner, and sequences ended 2.4% above the grid's best in one run of two
#: (docs/concepts.md, "When the study ends").
MIN_TRIALS = 12
#: How far the answer may still move over those trials: the best loss by this fraction of the
#: tolerance, the fastest cost to the target by this fraction of itself.
LOSS_MOVE = 0.25
COST_MOVE = 0.05


@dataclass(frozen=True)
class Score:
    """A finished trial judged against a target."""

    values: tuple[float, ...]  # what Optuna is told: one value, or (time, loss) for pareto
    time_to_target: float | None  # seconds on the reference hardware
    samples_to_target: int | None

    @property
    def reached(self) -> bool:
        return self.time_to_target is not None


def reference(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The trial that fixes the target and the pruner's time scale.

    The baseline when it completed. When it ended otherwise (diverged, out of memory), the
    first trial that completed. None while the baseline has not ended.
    """
    baseline = [r for r in records if r.role == BASELINE]
    for record in baseline:
        if completed(record):
            return record
    if not baseline:
        return None
    done = sorted((r for r in records if completed(r)), key=lambda r: r.number)
    return done[0] if done else None


def target_loss(records: Sequence[TrialRecord], settings: StudySettings) -> float | None:
    """The loss every trial must reach (times ``1 + tolerance``): the user's, or else the best
    smoothed validation loss any completed trial has reached so far.

    The target follows the best loss, so a study whose baseline trains poorly does not
    optimise speed to a poor loss: what is recommended is the fastest configuration that
    ends near the best loss the study found. Trials told while the best was higher were
    judged by an easier target; :func:`rescore` judges every stored curve again by the final
    one. None until the reference trial has ended: no trial has a target before it.

    Trials reach the target only where training can stop (:func:`curves.reaching`), so when
    no epoch end of any trial comes within the tolerance of the lowest loss (a dip between two
    evaluations, on a loss noisier than the tolerance), the target is the lowest loss at an
    epoch end instead. Aimed at the dip, every trial missed: the study recommended the closest
    whatever its speed, and nothing predicted a time to a target no trial reached (the
    built-in ``blobs`` example: 20 trials, all missed, 1% above a dip of 0.2948).
    """
    if settings.target_loss is not None:
        return float(settings.target_loss)
    if reference(records) is None:
        return None
    lowest = best_loss(records)
    at_stops = min((_best_at_stop(r) for r in stable(records)), default=None)
    if lowest is None or at_stops is None:
        return lowest
    return lowest if at_stops <= curves.threshold(lowest, settings.tolerance) else at_stops


def _best_at_stop(record: TrialRecord) -> float:
    """``record``'s lowest smoothed loss where training can stop (:func:`curves.best_at_stop`)."""
    return curves.best_at_stop(
        [p.epoch for p in record.curve], [p.val_loss_smoothed for p in record.curve],
        record.max_epochs,
    )  # fmt: skip


def score(record: TrialRecord, settings: StudySettings, target: float | None) -> Score | None:
    """``record`` judged against ``target``; None when it did not complete or no target is
    known yet (the ``loss`` objective needs none)."""
    if not completed(record):
        return None
    best = float(record.best_val_loss)
    if target is None:
        if settings.objective != "loss":
            return None
        return Score((best,), None, None)
    level = curves.threshold(target, settings.tolerance)
    smoothed = [p.val_loss_smoothed for p in record.curve]
    epochs = [p.epoch for p in record.curve]
    hit = curves.reaching(epochs, smoothed, level, record.max_epochs)
    time = samples = None
    if hit is not None:
        time = record.curve[hit].seconds
        samples = record.curve[hit].samples
        speed = time
    else:
        # Among misses, the one whose training can stop closer to the level ranks first (a
        # dip between epoch ends is not where it can); every miss ranks after every hit.
        stop = curves.best_at_stop(epochs, smoothed, record.max_epochs)
        speed = MISS_OFFSET + (stop - level) / max(abs(level), 1e-12)
    values = {"time": (speed,), "loss": (best,), "pareto": (speed, best)}[settings.objective]
    return Score(values, time, samples)


def epochs(
    record: TrialRecord, settings: StudySettings, target: float | None
) -> curves.EpochChoice:
    """Where ``record``'s configuration should stop: where its curve first reached the target
    (for ``objective="loss"``, or a curve that never got there: within the tolerance of its
    own minimum)."""
    level = None
    if target is not None and settings.objective != "loss":
        level = curves.threshold(target, settings.tolerance)
    return curves.choose_epochs(
        [p.epoch for p in record.curve],
        [p.val_loss_smoothed for p in record.curve],
        settings.max_epochs,
        settings.tolerance,
        level=level,
    )


def cost_seconds(record: TrialRecord) -> float:
    """Training seconds for the record's recommended whole epochs: read off its curve where
    it trained that far, extrapolated at its own pace where it stopped earlier."""
    epochs = record.recommended_epochs or record.max_epochs
    last = record.curve[-1]
    at = next((p.seconds for p in record.curve if p.epoch >= epochs - 1e-9), None)
    return at if at is not None else last.seconds * epochs / max(last.epoch, 1e-12)


def rescore(records: Sequence[TrialRecord], settings: StudySettings) -> list[TrialRecord]:
    """Every record judged by the final target: its value, time to target and epochs."""
    target = target_loss(records, settings)
    out = []
    for record in records:
        judged = score(record, settings, target)
        if judged is not None:
            record = replace(
                record,
                value=judged.values[0],
                time_to_target=judged.time_to_target,
                samples_to_target=judged.samples_to_target,
                recommended_epochs=float(epochs(record, settings, target).epochs),
            )
        out.append(record)
    return out


def settled(records: Sequence[TrialRecord], settings: StudySettings) -> str | None:
    """Why the study may end before ``n_trials``, or None: it has ``settings.min_trials``
    finished trials and the last :data:`PATIENCE` of them (in trial order) left the answer
    where it stood. Judged by the final target, they lowered neither the best loss by more than
    :data:`LOSS_MOVE` of the tolerance nor the fastest cost to the target by more than
    :data:`COST_MOVE`.

    Computed from the records alone, so every worker agrees on when the study ends; more
    trials cannot unsettle it (a rerun adds none unless ``min_trials`` is raised past them).
    """
    if settings.min_trials is None or settings.objective == "pareto":
        return None
    if len(records) < max(settings.min_trials, PATIENCE + 1):
        return None
    judged = sorted(rescore(records, settings), key=lambda r: r.number)
    earlier = judged[:-PATIENCE]
    loss_then, loss_now = best_loss(earlier), best_loss(judged)
    if loss_then is None or loss_now is None:
        return None
    if loss_then - loss_now > LOSS_MOVE * settings.tolerance * abs(loss_now):
        return None
    if settings.objective == "time":
        cost_then, cost_now = _fastest_cost(earlier), _fastest_cost(judged)
        if cost_then is None or cost_now is None or cost_then - cost_now > COST_MOVE * cost_then:
            return None
    return (
        f"settled after {len(records)} trials: the last {PATIENCE} lowered neither the best "
        f"loss by more than {LOSS_MOVE * settings.tolerance:.1%} nor the fastest time to the "
        f"target by more than {COST_MOVE:.0%}"
    )


def best_trial(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The completed record with the lowest best loss (the earlier of two as low), stable
    ones first (:func:`stable`); None when none completed."""
    done = stable(records)
    return min(done, key=lambda r: (r.best_val_loss, r.number)) if done else None


def best_loss(records: Sequence[TrialRecord]) -> float | None:
    """The lowest best loss of the completed records; None when none completed."""
    best = best_trial(records)
    return None if best is None else float(best.best_val_loss)


def _fastest_cost(records: Sequence[TrialRecord]) -> float | None:
    """The fewest seconds, in whole epochs, any record needs to reach the target it was judged
    by (:func:`rescore`'s)."""
    best = fastest(records)
    return None if best is None else cost_seconds(best)


def fastest(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The completed record that reached the target it was judged by (:func:`rescore`'s) at
    the least cost: what the user will pay, whole epochs (:func:`cost_seconds`), not the
    moment the target was crossed. None when none reached it."""
    reached = [r for r in stable(records) if r.time_to_target is not None]
    return min(reached, key=lambda r: (cost_seconds(r), r.number)) if reached else None


def pruning_scale_ms(records: Sequence[TrialRecord]) -> int | None:
    """The pruner's first rung, in training milliseconds: a fifth of the reference trial's
    training time, so a trial is first judged once it has trained that long. (A tenth cut a
    study's compute from 18% to 14% of the exhaustive grid's on the sequences task of
    ``benchmarks/recommendation_quality.py``, but its final loss rose from 1.019x to 1.025x
    the best reachable, 4 seeds: past the 2% a recommendation must keep. Tried again once
    the pruner compared only trials that can still reach the target: a point or two less
    compute on four tasks, but the regression task ended at 1.88x on 2 seeds of 3.)"""
    ref = reference(records)
    if ref is None or ref.train_seconds <= 0:
        return None
    return max(1, int(ref.train_seconds * 1000 / 5))


def infeasible_sizes(records: Sequence[TrialRecord]) -> set[int]:
    """Batch sizes that ran out of memory in some trial."""
    return {r.batch_size for r in records if r.state == INFEASIBLE}


def recommend(
    records: Sequence[TrialRecord],
    settings: StudySettings,
    probe: ProbeResult | None = None,
    notes: Sequence[str] = (),
) -> TuneResult:
    """The configuration to train with, from every finished trial's record.

    Among the completed trials that reached the target, the one whose recommended epochs
    (the first epoch end, from where its curve first reached the target, at the target too)
    train fastest (the lowest best loss for ``objective="loss"``); when none did, the one
    that came closest.
    """
    records = sorted(rescore(records, settings), key=lambda r: r.number)
    if not records:
        raise AutobatchError(
            "no trial has finished yet, so there is nothing to recommend: the study is running "
            "its first trials, or was stopped in them (run the same command to go on)"
        )
    target = target_loss(records, settings)
    complete = [r for r in stable(records) if r.value is not None]
    if not complete:
        reasons = [f"trial {r.number} {r.state}: {r.reason}" for r in records if r.reason]
        why = "; ".join(reasons[:SHOWN_REASONS])
        if len(reasons) > SHOWN_REASONS:
            why += f"; {len(reasons) - SHOWN_REASONS} more"
        ended = {r.state for r in records}
        fix = (
            "every trial ran out of memory: give batch sizes that fit (candidates, "
            "--batch-sizes; memory_budget, --memory-budget, probes for them) or a smaller model"
            if ended == {INFEASIBLE}
            else "fix what the trials say (a learning rate that diverges: lower Task.lr or "
            "narrow lr_multiplier_range, --lr-multiplier-range; a loss that is nan at every "
            "rate: nan or inf in the data)"
        )
        raise AutobatchError(
            "no trial completed, so there is nothing to recommend"
            + (f" ({why})" if why else "")
            + f"; {fix} and rerun"
        )
    reached = [r for r in complete if r.time_to_target is not None]
    pool = reached or complete
    if settings.objective == "loss":
        best = best_trial(pool)
    elif settings.objective == "time" and reached:
        best = fastest(records)
    else:
        best = min(pool, key=lambda r: (r.value, r.best_val_loss, r.number))
    warnings = list(notes)
    if unstable(best):  # every completed trial is (:func:`stable`)
        warnings.append(
            f"every completed trial went unstable (trial {best.number}'s training loss ended "
            f"{climb(best):.3g}x its lowest): the rates tried are past the stable edge, so this "
            "recommendation is not one to train with; lower the task's learning rate (Task.lr) "
            "and rerun"
        )
    trained = [abs(p.train_loss) for p in best.curve if math.isfinite(p.train_loss)]
    if trained and best.best_val_loss > EVAL_GAP * max(max(trained), 1e-12):
        warnings.append(
            f"trial {best.number}'s validation loss ({best.best_val_loss:.3g}) is over "
            f"{EVAL_GAP:g}x its training loss (at most {max(trained):.3g}): its evaluation "
            "diverged (at a rate past the stable edge, say), so this recommendation is not one "
            "to train with; lower the task's learning rate (Task.lr) and rerun"
        )
    if not any(_learned(r, settings.tolerance) for r in complete) and any(
        len(r.curve) > 1 for r in complete
    ):
        warnings.append(
            "no trial's validation loss fell below its first evaluation by more than the "
            "tolerance: the model does not learn at any rate tried; check that its parameters "
            "train (requires_grad, the optimizer's parameters) and the loss it is given"
        )
    passed = [r for r in records if unstable(r) and r.best_val_loss < best.best_val_loss]
    if passed:
        lowest = min(passed, key=lambda r: (r.best_val_loss, r.number))
        warnings.append(
            f"trial {lowest.number} reached a lower loss ({lowest.best_val_loss:.4g}), but its "
            f"training loss ended {climb(lowest):.1f}x its lowest: a rate past the stable edge, "
            "so it was not recommended"
        )
    choice = epochs(best, settings, target)
    if choice.warning:
        warnings.append(f"trial {best.number}: {choice.warning}")
    return TuneResult(
        batch_size=best.batch_size,
        epochs=choice.epochs,
        steps=steps_to_train(choice, best, settings.max_epochs),
        lr=best.lr,
        lr_multiplier=best.lr_multiplier,
        best_trial=best.number,
        target_loss=target,
        target_at_epoch_end=settings.target_loss is None and target != best_loss(records),
        probe=probe,
        trials=tuple(records),
        settings=settings,
        warnings=tuple(warnings),
    )


def _learned(record: TrialRecord, tolerance: float) -> bool:
    """Whether ``record``'s validation loss fell below its first evaluation's, by more than
    ``tolerance``; a one-point curve shows nothing either way (counted as learned)."""
    if len(record.curve) < 2:
        return True
    first = record.curve[0].val_loss_smoothed
    return min(p.val_loss_smoothed for p in record.curve) < first - tolerance * abs(first)


def steps_to_train(choice: curves.EpochChoice, record: TrialRecord, max_epochs: float) -> int:
    """Optimizer steps for ``choice`` on ``record``'s curve: its whole epochs, or, where those
    go past a fractional budget, the steps the trial took to the point it picked (counted in
    samples: an epoch's last batch may be short, so epochs times steps per epoch overshoots)."""
    per_epoch = record.iterations_per_epoch
    if choice.epochs <= max_epochs + 1e-9:
        return choice.epochs * per_epoch
    point = record.curve[choice.index]
    whole = math.floor(point.epoch + 1e-9)
    into = point.samples - round(whole * point.samples / point.epoch) if point.epoch else 0
    return max(1, whole * per_epoch + math.ceil(into / record.batch_size - 1e-9))


#: A recommended trial's best validation loss this many times its highest training loss (its
#: first, near the loss at the start) is an evaluation gone wrong: overfitting drives the
#: training loss down, never the validation loss up this far.
EVAL_GAP = 1000.0
#: Trials whose failure a study with none completed names, whole, in its error.
SHOWN_REASONS = 3
#: How many times its lowest a trial's training loss may end at before the trial counts as
#: unstable (:func:`unstable`).
UNSTABLE = 2.0


def unstable(record: TrialRecord) -> bool:
    """Whether ``record`` completed with its training loss ending at least :data:`UNSTABLE`
    times its lowest: its rate took it past the stable edge, and a low validation loss it
    passed on the way is one seed's luck. (On a batch-norm CNN with SGD, a study recommended
    the epoch of such a dip, 0.39x the grid's best loss on its seed; on another seed the
    configuration ended 3.3x.) Overfitting is not this: it leaves the training loss falling
    while the validation loss climbs."""
    return completed(record) and climb(record) >= UNSTABLE


def climb(record: TrialRecord) -> float:
    """How many times its lowest ``record``'s training loss ended at (1 without a curve).
    For a loss that reached zero or below (a negative log-likelihood), where a ratio means
    nothing, one plus its rise from the lowest in units of the loss's size
    (:func:`curves.loss_scale`): the ratio, had the loss been positive."""
    losses = [p.train_loss for p in record.curve if math.isfinite(p.train_loss)]
    if not losses:
        return 1.0
    lowest = min(losses)
    if lowest > 0:
        return losses[-1] / lowest
    scale = curves.loss_scale(lowest, losses[0])
    return 1.0 + (losses[-1] - lowest) / scale if scale > 0 else 1.0


def stable(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The completed records that are not :func:`unstable` (all the completed ones, where
    every one is): the ones that may set the target and be recommended."""
    done = [r for r in records if completed(r)]
    return [r for r in done if not unstable(r)] or done


def completed(record: TrialRecord) -> bool:
    """Whether ``record`` completed with a curve and a best loss: the records scoring judges."""
    return record.state == COMPLETE and record.best_val_loss is not None and bool(record.curve)
