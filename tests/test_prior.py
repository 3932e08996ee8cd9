"""The batch-size physics on constructed problems: the noise-scale estimator against a known
answer, the learning-rate rules' documented values, step time and the prediction."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from autobatch.data import BatchSource
from autobatch.records import BASELINE, COMPLETE, INFEASIBLE, PRUNED, EvalPoint, TrialRecord
from autobatch.task import Task
from autobatch.tracking.report import format_why
from autobatch.tuning import prior
from autobatch.tuning.noise_probe import NoiseProbe
from autobatch.tuning.space import adamw_scaling, applied_rule, rule_for, scale_lr


class _Lion(torch.optim.Optimizer):
    """Another library's adaptive optimizer: Adam's ``betas``, not torch's class."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99)):
        super().__init__(params, {"lr": lr, "betas": betas})


def _regression(d: int = 10, n: int = 100_000, sigma: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=generator)
    x = torch.randn(n, d, generator=generator)
    y = x @ w_star + sigma * torch.randn(n, generator=generator)
    return x, y, w_star


def _half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y).pow(2).mean()


def _linear_at(w: torch.Tensor) -> nn.Module:
    model = nn.Linear(len(w), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.unsqueeze(0))
    return model


def test_two_batch_estimates_invert_the_expected_norms() -> None:
    grad_sq, trace = 2.0, 300.0
    small, big = 16, 128
    expected = [grad_sq + trace / b for b in (small, big)]
    assert prior.two_batch_estimates(*expected, small, big) == pytest.approx((grad_sq, trace))
    with pytest.raises(ValueError):
        prior.two_batch_estimates(1.0, 1.0, 64, 64)


def test_the_estimator_recovers_a_known_noise_scale() -> None:
    """Linear regression with x ~ N(0, I) and label noise sigma, at weights w* + delta:
    |G|^2 = |delta|^2 and tr(Sigma) = sigma^2 d + (d + 1) |delta|^2, so B_noise is known."""
    d, sigma = 10, 1.0
    x, y, w_star = _regression(d=d, sigma=sigma)
    delta = torch.full((d,), math.sqrt(0.1 / d))  # |delta|^2 = 0.1
    truth = (sigma**2 * d + (d + 1) * 0.1) / 0.1  # 111
    task = Task(model=lambda: nn.Linear(d, 1), train_data=(x, y), loss=_half_mse)
    model = _linear_at(w_star + delta)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = NoiseProbe(task, BatchSource((x, y), task.device), batch_size=16, seed=1)
    probe.estimate.beta = 0.995  # a long average: the weights do not move here
    for _ in range(400):
        value = probe(model, optimizer)
    assert value == pytest.approx(truth, rel=0.2)
    assert model.weight.grad is None  # nothing left behind


def test_adam_preconditioning_and_nothing_disturbed() -> None:
    """A uniform Adam scale changes both norms alike: the same noise scale. The probe leaves
    batch-norm statistics, gradients and the random generators as it found them."""
    x, y, _ = _regression(d=6, n=4096)
    task = Task(model=lambda: nn.Linear(6, 1), train_data=(x, y), loss=_half_mse)

    def measure(optimizer_kind: type) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 1))
        optimizer = optimizer_kind(model.parameters(), lr=0.1)
        if optimizer_kind is torch.optim.Adam:
            for p in model.parameters():
                optimizer.state[p] = {
                    "step": torch.tensor(10.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.full_like(p, 4.0),
                }
        stats = model[0].running_mean.clone()
        rng = torch.get_rng_state()
        probe = NoiseProbe(task, BatchSource((x, y), task.device), batch_size=32, seed=3)
        small, big = probe.norms(model, optimizer)
        assert torch.equal(model[0].running_mean, stats)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in model.parameters())
        return small / big

    assert measure(torch.optim.Adam) == pytest.approx(measure(torch.optim.SGD), rel=1e-3)


def test_the_noise_probe_reads_datasets_smaller_than_its_chunks() -> None:
    """Seven samples hold fewer than CHUNKS batches: the chunks run on into the next pass.
    A batch-norm model gets small batches of two, never a last batch of one."""
    x, y = torch.randn(9, 6), torch.randn(9, 1)
    task = Task(model=lambda: nn.Linear(6, 1), train_data=(x, y), loss=nn.functional.mse_loss)
    normed = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 1))
    for model, data, two in ((nn.Linear(6, 1), (x[:7], y[:7]), False), (normed, (x, y), True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = NoiseProbe(task, BatchSource(data, task.device), 4, seed=0, two_samples=two)
        assert probe.batch_size == (2 if two else 1)
        small, big = probe.norms(model, optimizer)
        assert small > 0 and big > 0


def test_noise_scale_is_none_until_the_gradient_shows() -> None:
    estimate = prior.NoiseScale(small=8, big=64)
    assert estimate.value is None
    assert estimate.update(1.0, 1.5) is None  # big norm above small: |G|^2 estimate negative
    assert estimate.update(10.0, 2.0) is not None


@pytest.mark.parametrize(
    ("rule", "noise", "size", "expected"),
    [
        # Plain rules, and the saturating ones before the noise scale is known.
        ("linear", None, 128, 4.0),
        ("sqrt", None, 128, 2.0),
        ("none", 100.0, 128, 1.0),
        ("saturating-linear", None, 128, 4.0),
        ("saturating-sqrt", None, 128, 2.0),
        # Well below B_noise: close to the plain rule.
        ("saturating-linear", 1e9, 128, 4.0),
        ("saturating-sqrt", 1e9, 128, 2.0),
        # At B = B_noise (base 32, B_noise 128): gain (1 + 4) / (1 + 1) = 2.5.
        ("saturating-linear", 128.0, 128, 2.5),
        ("saturating-sqrt", 128.0, 128, math.sqrt(2.5)),
        # Far above: flat at 1 + B_noise / B_base = 5.
        ("saturating-linear", 128.0, 10**9, 5.0),
        ("saturating-sqrt", 128.0, 10**9, math.sqrt(5.0)),
    ],
)
def test_learning_rate_rules(rule: str, noise: float | None, size: int, expected: float) -> None:
    assert scale_lr(1.0, 32, size, rule, noise) == pytest.approx(expected, rel=1e-5)


def test_rule_names() -> None:
    assert rule_for(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)) == "saturating-linear"
    assert rule_for(torch.optim.AdamW([nn.Parameter(torch.zeros(1))])) == "saturating-sqrt"
    assert rule_for(torch.optim.Rprop([nn.Parameter(torch.zeros(1))])) == "none"
    for adaptive in (torch.optim.Adafactor, torch.optim.SparseAdam, _Lion):
        assert rule_for(adaptive([nn.Parameter(torch.zeros(2, 2))])) == "saturating-sqrt"
    assert rule_for(torch.optim.LBFGS([nn.Parameter(torch.zeros(1))])) == "none"
    assert applied_rule("saturating-sqrt", None) == "sqrt"
    assert applied_rule("saturating-sqrt", 300.0) == "saturating-sqrt"
    assert applied_rule("linear", 300.0) == "linear"


def _record(number: int, size: int, throughput: float, samples_to_target: int | None = None):
    point = EvalPoint(
        samples=1000, seconds=1.0, epoch=1.0, train_loss=1.0, val_loss=1.0,
        val_loss_smoothed=1.0, val_accuracy=None, samples_per_second=throughput,
        peak_memory_bytes=None, timestamp_ms=0, grad_noise_scale=200.0,
    )  # fmt: skip
    return TrialRecord(
        number=number, state=COMPLETE, batch_size=size, lr=0.1, lr_multiplier=1.0,
        lr_rule="sqrt", iterations_per_epoch=1, max_epochs=1.0, seed=0, curve=(point,),
        throughput=throughput, samples_to_target=samples_to_target, best_val_loss=1.0,
    )  # fmt: skip


def test_step_time_and_prediction() -> None:
    # Step time 0.01 + 0.001 B: throughput B / (0.01 + 0.001 B).
    records = [_record(i, b, b / (0.01 + 0.001 * b), 6400 if b == 32 else None)
               for i, b in enumerate((32, 128, 512))]  # fmt: skip
    timing = prior.step_time(records)
    assert timing.fixed == pytest.approx(0.01) and timing.per_sample == pytest.approx(0.001)
    assert prior.step_time(records[:1]) is None
    assert prior.noise_scale(records[0]) == 200.0
    predictions = {p.batch_size: p for p in prior.predict(records, 200.0, timing, [32, 64])}
    # The one trial that reached the target, 200 steps at B = 32: S_min = 200 / (1 + 200 / 32).
    assert predictions[32].steps == pytest.approx(200.0)
    s_min = 200 / (1 + 200 / 32)
    assert predictions[64].steps == pytest.approx(s_min * (1 + 200 / 64))
    assert predictions[64].seconds == pytest.approx(predictions[64].steps * (0.01 + 0.064))


def test_explain_and_its_chart() -> None:
    from autobatch.tracking import plots

    records = [_record(i, b, b / (0.01 + 0.001 * b), 6400 if b == 32 else None)
               for i, b in enumerate((32, 128, 512))]  # fmt: skip
    records[0] = replace(records[0], role=BASELINE, time_to_target=12.0)
    explanation = prior.explain(records, [32, 64, 128, 512])
    rows = {r.batch_size: r for r in explanation.rows}
    assert rows[32].measured_seconds == 12.0 and rows[32].trials == 1
    assert rows[64].trials == 0 and rows[64].measured_seconds is None
    assert all(r.predicted_seconds > 0 for r in rows.values())  # every candidate predicted
    assert explanation.noise == 200.0
    assert explanation.fastest == min(explanation.predictions, key=lambda p: p.seconds)
    figure = plots.prediction_figure(explanation, 32)
    labels = [h.get_label() for h in figure.legends[0].legend_handles]
    assert any("predicted" in label for label in labels)
    assert any("recommended: batch size 32" in label for label in labels)
    # Without a noise scale nothing is predicted, and the table says why.
    plain = [replace(r, curve=(replace(r.curve[0], grad_noise_scale=None),)) for r in records]
    unexplained = prior.explain(plain, [32, 64])
    assert all(r.predicted_seconds is None for r in unexplained.rows)
    assert unexplained.fastest is None
    # A size that ran out of memory is not predicted, nor the fastest, and the table says so.
    oom = replace(records[2], number=3, batch_size=1024, state=INFEASIBLE, curve=())
    explained = prior.explain([*records, oom], [32, 64, 128, 512, 1024])
    row = next(r for r in explained.rows if r.batch_size == 1024)
    assert row.out_of_memory and row.predicted_seconds is None
    assert all(p.batch_size != 1024 for p in explained.predictions)
    assert "1024" in format_why(explained, 32).splitlines()[-1]
    assert format_why(explained, 32).splitlines()[-1].endswith("out of memory")


def test_step_time_is_fitted_on_relative_errors() -> None:
    """Measured on a CPU: 0.5 ms + 0.02 ms per sample, the largest size 10% slower than the
    line (caches). Fitted on absolute errors that one point sets the line and the per-step
    cost vanishes, so the smallest batch would look fastest; relative errors keep it."""
    line = {32: 0.5e-3 + 32 * 2e-5, 256: 0.5e-3 + 256 * 2e-5}
    points = {**{b: [t] for b, t in line.items()}, 3200: [1.1 * (0.5e-3 + 3200 * 2e-5)]}
    fit = prior.fit_step_time(points)
    assert 0.3e-3 < fit.fixed < 0.6e-3
    for size, seconds in line.items():
        assert fit(size) == pytest.approx(seconds, rel=0.1)
    # The time to target, S (1 + B_noise / B) fit(B), is then least near sqrt(a B_noise / b).
    noise = 200.0
    best = min((8, 16, 32, 64, 128, 256, 512), key=lambda b: (1 + noise / b) * fit(b))
    assert best in (32, 64, 128)
    # No growth measured: a constant; two sizes: the line through them.
    assert prior.fit_step_time({8: [1.0], 64: [0.9]}).per_sample == 0.0
    two = prior.fit_step_time({10: [2.0], 20: [3.0]})
    assert two.fixed == pytest.approx(1.0) and two.per_sample == pytest.approx(0.1)


def test_step_time_reads_the_typical_window_not_warm_up_or_interference() -> None:
    """A trial's first window pays for warm-up and another process may slow one down; the
    median window is the batch size's speed."""

    def trial(number: int, size: int, step: float) -> TrialRecord:
        rate = size / step
        record = _record(number, size, rate / 4)  # the whole trial's throughput: 4x too low
        windows = (rate / 20, rate, 1.02 * rate, rate / 50, 0.98 * rate)
        curve = tuple(replace(record.curve[0], samples_per_second=w) for w in windows)
        return replace(record, curve=curve)

    timing = prior.step_time([trial(0, 32, 1e-3 + 32e-5), trial(1, 256, 1e-3 + 256e-5)])
    assert timing.fixed == pytest.approx(1e-3, rel=0.05)
    assert timing.per_sample == pytest.approx(1e-5, rel=0.05)


def test_a_pruned_trial_s_pace_counts_once_it_has_three_windows() -> None:
    """Why a trial ended says nothing about its steps' speed: a pruned one counts where its
    windows show the typical speed past warm-up (a seed given up as hopeless is often the
    only trial at the largest size)."""

    def trial(number: int, size: int, windows: int, state: str = COMPLETE) -> TrialRecord:
        record = _record(number, size, size / (0.01 + 0.001 * size))
        curve = (record.curve[0],) * windows
        return replace(record, curve=curve, state=state)

    done = [trial(0, 32, 3), trial(1, 128, 3)]
    slow = replace(
        trial(2, 512, 3, PRUNED), curve=(replace(done[0].curve[0], samples_per_second=1.0),) * 3
    )
    assert prior.step_time([*done, slow]) != prior.step_time(done)  # counted
    assert prior.step_time(
        [
            *done,
            slow,
        ]
    ) == prior.step_time([*done, replace(slow, state=COMPLETE)])
    assert prior.step_time([*done, replace(slow, curve=slow.curve[:2])]) == prior.step_time(done)


def test_candidates_predicted_twice_as_slow_are_dropped() -> None:
    """With B_noise 200 and step time 0.01 + 0.001 B, time to target is S_min (1 + 200 / B)
    (0.01 + 0.001 B) seconds: fastest near sqrt(0.01 x 200 / 0.001) = 45, more than twice as
    slow at 4 and at 2048. Never the reference trial's size, nor one a trial measured fast."""
    records = [_record(i, b, b / (0.01 + 0.001 * b), 6400 if b == 32 else None)
               for i, b in enumerate((32, 128, 512))]  # fmt: skip
    records[0] = replace(records[0], role=BASELINE)  # the reference: its noise scale counts
    candidates = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    explanation = prior.explain(records, candidates)
    seconds = {p.batch_size: p.seconds for p in explanation.predictions}
    fastest = min(seconds.values())
    expected = {b for b, t in seconds.items() if t >= prior.TOO_SLOW * fastest}
    assert {4, 2048} <= expected and {16, 32, 64, 128} & expected == set()
    assert set(prior.too_slow(explanation)) == expected
    assert 4 not in prior.too_slow(explanation, keep=4)
    # A trial that reached the target at 2048 within twice the fastest prediction keeps it.
    measured = [*records, replace(_record(9, 2048, 2048 / 2.058), time_to_target=fastest)]
    assert 2048 not in prior.too_slow(prior.explain(measured, candidates))
    # Nothing reached the target: nothing is predicted, nothing dropped.
    unreached = [replace(r, samples_to_target=None) for r in records]
    assert prior.too_slow(prior.explain(unreached, candidates)) == {}


def test_adamw_scaling_keeps_the_timescales() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    scaling = adamw_scaling(optimizer.param_groups, 32, 128, base_lr=1e-3, lr=2e-3)
    assert scaling.beta2 == pytest.approx(0.999**4)  # the same number of samples averaged
    # B / (lr x wd x N) unchanged: 32 / (1e-3 x 0.01) == 128 / (2e-3 x wd')
    assert pytest.approx(128 / (2e-3 * scaling.weight_decay)) == 32 / (1e-3 * 0.01)
    scaling.apply(optimizer)
    assert optimizer.param_groups[0]["betas"] == (0.9, scaling.beta2)
    assert optimizer.param_groups[0]["weight_decay"] == scaling.weight_decay
    assert adamw_scaling(torch.optim.SGD(params, lr=0.1).param_groups, 32, 128, 0.1, 0.4) is None
    # Each group scales its own values: biases without weight decay stay without it.
    groups = [{"params": params, "weight_decay": 0.0}, {"params": [nn.Parameter(torch.ones(2))]}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    optimizer.param_groups[0]["betas"] = (0.9, 0.99)
    scaling = adamw_scaling(optimizer.param_groups, 32, 128, base_lr=1e-3, lr=2e-3)
    assert scaling.weight_decay == pytest.approx(0.2)  # the group with weight decay's
    scaling.apply(optimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, pytest.approx(0.2)]
    betas = [g["betas"][1] for g in optimizer.param_groups]
    assert betas == [pytest.approx(0.99**4), pytest.approx(0.999**4)]
