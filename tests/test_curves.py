"""The epoch-selection rule and time-to-target on constructed learning curves."""

import dataclasses
import math

import pytest

from autobatch.data import BatchSource
from autobatch.examples import digits
from autobatch.tuning import curves
from autobatch.tuning.loop import train


def test_smooth_is_causal_and_debiased():
    values = [4.0, 2.0, 1.0, 1.0, 1.0]
    smoothed = curves.smooth(values)
    assert smoothed[0] == pytest.approx(4.0)  # debiased: the first value is kept, not shrunk
    # causal: changing a later value never changes an earlier smoothed value
    assert curves.smooth([4.0, 2.0, 9.0])[:2] == smoothed[:2]
    assert smoothed == sorted(smoothed, reverse=True)


def test_choose_epochs_first_point_within_tolerance_of_minimum():
    epochs = [0.5 * i for i in range(1, 21)]  # 10 epochs, two evaluations each
    # falls to 0.30 at epoch 4, creeps to 0.29 at epoch 8, then overfits
    losses = [1.0 / (1 + e) + 0.1 for e in epochs]
    losses = [max(0.3, v) for v in losses]
    losses[15] = 0.29
    losses[16:] = [0.31, 0.33, 0.35, 0.37]
    choice = curves.choose_epochs(epochs, losses, max_epochs=10, tolerance=0.05)
    assert losses[choice.best_index] == 0.29
    # 0.29 * 1.05 = 0.3045: the first value at or below it is where the curve reaches 0.30
    assert choice.index == 7
    assert losses[choice.index] <= 0.3045 < losses[choice.index - 1]
    assert choice.epochs == math.ceil(epochs[choice.index])
    assert choice.warning is None


def test_choose_epochs_warns_when_still_falling_at_the_end():
    epochs = [1, 2, 3, 4, 5]
    choice = curves.choose_epochs(epochs, [5, 4, 3, 2, 1], max_epochs=5, tolerance=0.0)
    assert choice.epochs == 5
    assert "raise max_epochs" in choice.warning


def test_choose_epochs_warns_when_done_in_the_first_tenth():
    epochs = [0.5 * i for i in range(1, 41)]  # 20 epochs
    losses = [1.0, 0.2] + [0.2 + 0.001 * i for i in range(38)]
    choice = curves.choose_epochs(epochs, losses, max_epochs=20, tolerance=0.05)
    assert choice.epochs == 1
    assert "lower max_epochs" in choice.warning


def test_choose_epochs_warns_when_whole_epochs_go_past_a_fractional_budget():
    epochs = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    losses = [1.0, 0.8, 0.6, 0.5, 0.4, 0.405]
    choice = curves.choose_epochs(epochs, losses, max_epochs=1.5, tolerance=0.05, level=0.41)
    assert (choice.epochs, choice.at_epoch) == (2, 1.25)
    assert "1.5-epoch budget, and the recommendation rounds it up to 2 epochs: train 1.25" in (
        choice.warning
    )
    # Reached at an epoch end inside the budget: no warning.
    inside = curves.choose_epochs(epochs, losses, max_epochs=1.5, tolerance=0.05, level=0.5)
    assert (inside.epochs, inside.warning) == (1, None)
    # A budget under one epoch has no whole epoch to be past.
    short = curves.choose_epochs([0.1, 0.2, 0.3], [1.0, 0.8, 0.7], max_epochs=0.3, tolerance=0.05)
    assert "0.3 epochs in, under one epoch" in short.warning
    assert "rounds it up to 1 epoch: train 0.3 epochs" in short.warning
    # Training ends at a whole step, which can pass the budget: never "inside" it then.
    over = curves.choose_epochs([0.267, 0.533], [1.0, 0.8], max_epochs=0.5, tolerance=0.05)
    assert "0.533 epochs in, under one epoch" in over.warning and "inside" not in over.warning
    # One step of the batch is the whole training set: an epoch, and nothing to train instead.
    step = curves.choose_epochs([1.0], [0.7], max_epochs=0.01, tolerance=0.05)
    assert (step.epochs, step.warning) == (1, None)


def test_the_loss_must_be_at_the_level_at_the_epoch_training_stops():
    """A digits-SGD trial at a rate near instability dipped under the level mid-epoch (10.53)
    and was back 9% above it at epoch 11, where training stops: 11 epochs do not reach it."""
    epochs = [9.53, 10.0, 10.53, 11.0, 11.53, 12.0, 12.53, 13.0]
    losses = [0.0925, 0.0807, 0.0766, 0.0836, 0.0850, 0.0823, 0.0760, 0.0761]
    choice = curves.choose_epochs(epochs, losses, max_epochs=20, tolerance=0.02, level=0.0769)
    assert choice.at_epoch == 10.53  # where the curve first reached the level
    assert choice.epochs == 13  # the first epoch end at the level
    # An epoch end at the level right after the crossing: the usual rounding up.
    steady = [0.0925, 0.0807, 0.0766, 0.0760, 0.0750, 0.0740, 0.0730, 0.0720]
    assert curves.choose_epochs(epochs, steady, 20, 0.02, level=0.0769).epochs == 11
    # No epoch end at the level: the one nearest it (here the only one: the trial stopped).
    assert curves.choose_epochs(epochs[:5], losses[:5], 20, 0.02, level=0.0769).epochs == 11
    # A regression trial at a high Adam rate: under the level only mid-epoch, 30% above it at
    # epoch 11, 0.2% above at 12. Stopping at 12 ends nearest the level.
    epochs, losses = [10.51, 11.0, 11.51, 12.0], [0.02412, 0.03196, 0.02647, 0.02466]
    assert curves.choose_epochs(epochs, losses, 12, 0.02, level=0.0246).epochs == 12
    # No epoch end after the crossing at all (the trial stopped mid-epoch): rounded up.
    assert curves.choose_epochs(epochs[:1], losses[:1], 12, 0.02, level=0.0246).epochs == 11


def test_a_curve_reaches_the_level_where_an_epoch_ends():
    epochs = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    dips = [0.9, 0.6, 0.5, 0.58, 0.5, 0.57]  # under 0.55 only mid-epoch
    assert curves.reaching(epochs, dips, 0.55, 3) is None
    assert curves.reaching(epochs, [0.9, 0.6, 0.5, 0.54, 0.5, 0.5], 0.55, 3) == 3
    # A budget under one epoch has no epoch end: the first point under the level.
    assert curves.reaching([0.25, 0.5, 0.75], [0.9, 0.5, 0.4], 0.55, 0.75) == 1
    # The end of a fractional budget is a stop too (the recommendation's steps go there).
    assert curves.reaching([0.5, 1.0, 1.5], [0.9, 0.6, 0.5], 0.55, 1.5) == 2
    assert curves.reaching([0.5, 1.0, 1.5], [0.9, 0.6, 0.5], 0.55, 2.0) is None  # cut short
    # The best loss training can stop at: a dip between epoch ends is not one.
    assert curves.best_at_stop(epochs, dips, 3) == 0.57
    assert curves.best_at_stop([0.5, 1.0, 1.5], [0.9, 0.6, 0.5], 1.5) == 0.5
    assert curves.best_at_stop([0.25, 0.5], [0.9, 0.5], 0.5) == 0.5
    # Nothing more to learn only once an epoch end is at the level: a trial stopped on a
    # mid-epoch dip would leave no whole epoch count that reaches it.
    assert not curves.plateaued(epochs, dips, 0.55, 4)
    assert curves.plateaued(epochs + [3.5, 4.0], [0.9, 0.6, 0.5, 0.54, 0.6, 0.6, 0.6, 0.6], 0.55, 4)


def test_a_trial_is_given_up_only_where_even_its_best_pace_ends_far_above_the_level():
    """Past a third of the budget, the best loss so far, projected at the pace it fell
    recently kept up to the end (falling curves slow down, so that is optimistic), must lie
    above 1.5x the level."""
    assert curves.HOPELESS_FACTOR == 1.5
    epochs = [0.5 * i for i in range(1, 17)]  # 8 epochs, two evaluations each
    flat = [2.0 - 0.01 * i for i in range(16)]  # a large batch at a low rate: barely moves
    assert not curves.hopeless(epochs[:5], flat[:5], 0.4, 8)  # 2.5 epochs: too soon
    assert curves.hopeless(epochs[:6], flat[:6], 0.4, 8)
    assert curves.projected_end(epochs[:6], flat[:6], 8) > 1.5
    # Falling by a fifth an epoch at epoch 3: 1.0 x 0.8^5 = 0.33 by the end, under 1.5 x 0.4.
    falling = [1.0 / 0.8 ** (3 - e) for e in epochs[:6]]
    assert curves.projected_end(epochs[:6], falling, 8) == pytest.approx(0.8**5)
    assert not curves.hopeless(epochs[:6], falling, 0.4, 8)
    assert curves.hopeless(epochs[:6], falling, 0.2, 8)  # but above 1.5 x 0.2
    # A high rate's spike is not its pace: the best so far is projected, not the last value.
    # (Its best, 0.8^-0.5 at epoch 2.5, fell 0.8^0.5 since epoch 2: 0.8^-0.5 x 0.8^2.5.)
    spiking = [*falling[:5], 3.0]
    assert curves.projected_end(epochs[:6], spiking, 8) == pytest.approx(0.8**2)
    assert not curves.hopeless(epochs[:6], spiking, 0.45, 8)
    # Leaving a plateau, speeding up: no pace to project yet, whatever the level.
    leaving = [2.3, 2.29, 2.28, 2.27, 2.2, 2.0]
    assert curves.projected_end(epochs[:6], leaving, 8) is None
    assert not curves.hopeless(epochs[:6], leaving, 0.1, 8)
    # Never once at the level, nor for a level or loss that is not positive (no ratio).
    assert not curves.hopeless([1.0, 2.0, 3.0], [0.3, 0.3, 0.3], 0.4, 8)
    assert not curves.hopeless(epochs[:6], [-v for v in flat[:6]], -0.4, 8)
    assert curves.projected_end([3.0], [1.0], 8) is None  # no pace yet


def test_threshold_and_first_reaching():
    level = curves.threshold(0.5, 0.1)
    assert level == pytest.approx(0.55)
    assert curves.first_reaching([0.9, 0.6, 0.55, 0.4], level) == 2
    assert curves.first_reaching([0.9, 0.8], level) is None


def test_area_under_is_mean_loss_over_time():
    assert curves.area_under([0, 1, 3], [2, 2, 2]) == pytest.approx(2.0)
    assert curves.area_under([0, 2], [1, 3]) == pytest.approx(2.0)
    assert curves.area_under([1], [1]) is None


def test_every_epoch_ends_with_an_evaluation():
    """Where training can stop is where the loss must be known, whether or not the evaluation
    interval divides the data (101 samples: 51 between evaluations)."""
    task = digits()
    x, y = task.train_data
    task = dataclasses.replace(task, train_data=(x[:101], y[:101]))
    data = BatchSource(task.train_data, task.device, task.collate_fn)
    val = BatchSource(task.val_data, task.device, task.collate_fn)
    points = []
    train(task, data, val, batch_size=16, lr=task.lr, max_epochs=3, eval_batch_size=64,
          on_eval=points.append)  # fmt: skip
    assert [p.samples for p in points] == [64, 101, 165, 202, 266, 303]
    assert [p.epoch for p in points][1::2] == [1.0, 2.0, 3.0]


def test_still_falling_means_lowest_at_the_end_of_the_whole_budget():
    assert curves.still_falling([1, 2, 3], [0.9, 0.5, 0.4], max_epochs=3)
    assert curves.still_falling([0.5, 1.0, 1.5], [0.9, 0.5, 0.4], max_epochs=1.5)  # fractional
    assert not curves.still_falling([1, 2, 3], [0.9, 0.4, 0.5], max_epochs=3)  # levelled off
    assert not curves.still_falling([1], [0.9], max_epochs=1)  # one point shows no direction
    assert not curves.still_falling([1, 2], [0.9, 0.5], max_epochs=3)  # stopped early
    assert not curves.still_falling([], [], max_epochs=3)
