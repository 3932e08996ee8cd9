"""The learning-rate range test on a problem whose largest stable rate is known."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from autobatch import Task, tune
from autobatch.examples import digits
from autobatch.records import BASELINE, CEILING, MIDDLE
from autobatch.tuning import lr_range, prior


def _regression(d: int = 8, n: int = 4096) -> tuple[Task, float]:
    """Least squares with SGD: full-batch gradient descent diverges above 1 / lambda_max of
    X^T X / n (the mean squared error's Hessian is twice that). Returns the task and that
    rate."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator) * torch.linspace(0.5, 2.0, d)
    y = x @ torch.randn(d, 1, generator=generator) + 0.1 * torch.randn(n, 1, generator=generator)
    limit = 1.0 / torch.linalg.eigvalsh(x.T @ x / n).max().item()
    task = Task(
        model=lambda: nn.Linear(d, 1), train_data=(x, y), val_data=(x[:256], y[:256]),
        loss=nn.functional.mse_loss, optimizer=torch.optim.SGD, lr=1e-3, batch_size=32,
    )  # fmt: skip
    return task, limit


def test_the_range_test_finds_the_stable_rate_and_centres_below_it() -> None:
    task, limit = _regression()
    state = torch.random.get_rng_state()
    found = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's state untouched
    # The loss blew up within a few times the largest stable rate (mini-batch noise and the
    # smoothing's lag move it a little either way), and the rate suggested lies well below it.
    assert found.diverged_lr is not None and limit / 3 < found.diverged_lr < 3 * limit
    suggested = found.suggested * task.lr
    assert limit / 50 < suggested < limit / 2
    assert found.lr_at_minimum == pytest.approx(suggested * lr_range.BELOW_MINIMUM)
    assert found.descended and found.centre == found.suggested  # 44x: past (0.25, 4)'s reach
    # Deterministic: a seeded model and data order, no timing.
    again = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    assert (again.lr_at_minimum, again.diverged_lr) == (found.lr_at_minimum, found.diverged_lr)


def test_the_range_test_keeps_the_rates_of_the_optimizer_s_groups() -> None:
    """A factory that puts the weights at a tenth of the task's rate: the test sweeps the
    optimizer the trials train with, so the weights never reach the rate that diverges."""
    task, limit = _regression()

    def grouped(params, lr):
        weight, bias = list(params)
        return torch.optim.SGD([{"params": [weight], "lr": lr / 10}, {"params": [bias]}], lr=lr)

    plain = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    task = dataclasses.replace(task, optimizer=grouped)
    found = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    assert plain.diverged_lr is not None and plain.diverged_lr < 3 * limit
    assert found.diverged_lr is None and found.suggested > plain.suggested


def test_the_suggestion_is_clamped_and_moves_the_range_only_past_its_reach() -> None:
    rates = [1e-4, 1e-3, 1e-2]
    # Lowest at the last rate: a tenth of it is 1000x the task's 1e-6, kept at the clamp.
    assert lr_range.suggestion(rates, [3.0, 2.0, 1.0], task_lr=1e-6) == lr_range.CLAMP[1]
    assert lr_range.suggestion(rates, [1.0, 2.0, 3.0], task_lr=1.0) == lr_range.CLAMP[0]
    assert lr_range.suggestion(rates, [3.0, 1.0, 2.0], task_lr=1e-5) == 10.0
    # (0.25, 4) reaches from 1/8 to 8 (one doubling past each end): the range stays put.
    assert lr_range.centre_for(7.9, (0.25, 4.0)) == 1.0
    assert lr_range.centre_for(0.13, (0.25, 4.0)) == 1.0
    assert lr_range.centre_for(12.0, (0.25, 4.0)) == 12.0
    assert lr_range.centre_for(0.1, (0.25, 4.0)) == 0.1


def test_a_study_centres_its_rates_on_a_suggestion_past_the_range_s_reach() -> None:
    task, _ = _regression()
    result = tune(task, n_trials=5, max_epochs=2, candidates=[32, 128, 512], mlflow=False)
    found, centre = result.settings.lr_range_test, result.settings.lr_centre
    assert found is not None and found["suggested"] > 8 and centre == found["suggested"]
    low, high = result.settings.multiplier_range
    assert (low, high) == pytest.approx((0.25 * centre, 4 * centre))
    by_role = {t.role: t.lr_multiplier for t in result.trials}
    # The task's own configuration stays the baseline; the other seeds start at the centre.
    assert by_role[BASELINE] == 1.0
    assert by_role[CEILING] == by_role[MIDDLE] == pytest.approx(centre)
    sampled = [t.lr_multiplier for t in result.trials if t.role is None]
    assert all(low <= m <= high for m in sampled)
    # Its cost is its steps on the study's clock, as the trials' are; the wall clock beside.
    clock = prior.step_clock(result.settings)
    assert found["seconds"] == pytest.approx(found["steps"] * clock(found["batch_size"]))
    assert found["wall_seconds"] > 0
    # Switched off, or with a range that pins the rate, the rates stay where the task put them.
    off = tune(task, n_trials=3, max_epochs=1, candidates=[32, 128, 512], mlflow=False,
               lr_range_test=False)  # fmt: skip
    assert off.settings.lr_centre == 1.0 and off.settings.lr_range_test is None
    pinned = tune(task, n_trials=3, max_epochs=1, candidates=[32, 128, 512], mlflow=False,
                  lr_multiplier_range=(0.5, 1.5))  # fmt: skip
    assert pinned.settings.lr_range_test is None


def _zero() -> nn.Module:
    model = nn.Linear(8, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def test_a_loss_the_test_cannot_move_leaves_the_range_where_it_was() -> None:
    # Labels that are noise, and a model that starts at the best constant: no rate lowers
    # the loss (until one blows it up), so where it was lowest is chance.
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 8, generator=generator), torch.randn(2048, 1, generator=generator)
    task = Task(
        model=_zero, train_data=(x, y), val_data=(x[:256], y[:256]),
        loss=nn.functional.mse_loss, optimizer=torch.optim.SGD, lr=1e-2, batch_size=32,
    )  # fmt: skip
    found = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    assert not found.descended and found.centre == 1.0
    # A loss that blows up below the task's own rate before it fell: that rate is too high.
    task = dataclasses.replace(task, model=lambda: nn.Linear(8, 1), lr=1e4)
    found = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    assert not found.descended and found.diverged_lr <= task.lr
    assert found.centre == lr_range.CLAMP[0]


def test_a_rate_far_too_high_is_found_before_any_trial() -> None:
    """SGD at 2.0 on digits: every multiplier of (0.25, 4) diverges to chance, and the walk
    past the range's end stops at once (no lower loss to follow). The range test moves the
    range down to where training works."""

    def sgd(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    task = dataclasses.replace(digits(), optimizer=sgd, lr=2.0)
    kwargs = dict(n_trials=4, max_epochs=3, candidates=[32, 128, 512], mlflow=False)
    found = tune(task, **kwargs)
    blind = tune(task, lr_range_test=False, **kwargs)
    assert found.settings.lr_centre < 1 / 8 and found.lr < 0.5
    assert _best(found) < 0.5 * _best(blind)  # chance level is ln(10) = 2.3


def _best(result) -> float:
    return min(t.best_val_loss for t in result.trials if t.best_val_loss is not None)


@pytest.mark.parametrize("shift", [-2.0, -10.0])
def test_a_loss_below_zero_is_judged_as_a_positive_one(shift: float) -> None:
    """A negative log-likelihood is a loss plus a constant that may take it below zero: the
    same training, so the same rate. ``4 x lowest`` lies below a negative lowest, and read as
    the blow-up it ended the test at its first step and centred the range 500x too low."""
    task, _ = _regression()
    found = lr_range.range_test(task, task.training_batches(), 32, (0.25, 4.0))
    shifted = dataclasses.replace(task, loss=lambda out, y: nn.functional.mse_loss(out, y) + shift)
    moved = lr_range.range_test(shifted, shifted.training_batches(), 32, (0.25, 4.0))
    assert moved.lr_at_minimum == found.lr_at_minimum
    assert (moved.suggested, moved.descended, moved.centre) == (
        found.suggested, found.descended, found.centre,
    )  # fmt: skip
    assert moved.diverged_lr is not None and moved.diverged_lr > found.lr_at_minimum


def test_the_blow_up_and_descent_rules() -> None:
    # A positive loss: four times its lowest, as it always was.
    assert not lr_range.blown_up(3.9, 1.0, 2.0) and lr_range.blown_up(4.1, 1.0, 2.0)
    # On its way down through zero: a climb to four times a lowest near zero is noise.
    assert not lr_range.blown_up(0.2, 0.05, 1.0) and lr_range.blown_up(0.05 + 0.76, 0.05, 1.0)
    # Below zero: judged by the lowest's size.
    assert not lr_range.blown_up(-1.0, -2.0, 1.0) and lr_range.blown_up(4.1, -2.0, 1.0)
    assert lr_range.descended([2.0, 1.8]) and not lr_range.descended([2.0, 1.81])
    assert lr_range.descended([-2.0, -2.2]) and not lr_range.descended([-2.0, -2.19])
