"""The study's clock: step times measured once per study, on which every trial's training time
is counted, so that timing noise does not steer the study."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from autobatch import tune
from autobatch.data import BatchSource
from autobatch.examples import digits
from autobatch.tuning import clock
from autobatch.tuning.loop import train
from autobatch.tuning.prior import StepClock, step_clock


def test_the_clock_reads_its_table_and_the_line_through_it() -> None:
    steps = StepClock({32: 0.002, 64: 0.003, 128: 0.005})
    line = steps.line
    assert line is not None and line.per_sample > 0
    assert steps(64) == 0.003  # measured: as measured
    assert steps(96) == pytest.approx(line(96))  # not measured: the line
    at_64 = steps.for_batch_size(64)
    assert at_64(64) == 0.003
    # An epoch's last, smaller batch costs less, in proportion to the line.
    assert at_64(16) == pytest.approx(0.003 * line(16) / line(64)) and at_64(16) < 0.003
    one = StepClock({64: 0.004})  # one size: no line, proportional
    assert one.for_batch_size(64)(16) == pytest.approx(0.001) and one(128) == pytest.approx(0.008)


def test_no_size_is_timed_slower_per_step_than_a_larger_one() -> None:
    # Timed while another process ran: batch 8 came out slower than 32. Noise only adds time.
    timed = {8: 0.66e-3, 16: 0.55e-3, 32: 0.46e-3, 64: 0.50e-3, 128: 0.48e-3}
    assert clock._never_slower_below(timed) == {
        8: 0.46e-3,
        16: 0.46e-3,
        32: 0.46e-3,
        64: 0.48e-3,
        128: 0.48e-3,
    }


def test_a_trial_s_training_time_is_its_steps_on_the_clock() -> None:
    task = digits()
    data = BatchSource(task.train_data, task.device, task.collate_fn)
    val = BatchSource(task.val_data, task.device, task.collate_fn)
    points = []
    # 1438 samples in batches of 500: steps of 500, 500 and 438; evaluated after 1000 and 1438.
    run = train(task, data, val, batch_size=500, lr=task.lr, max_epochs=1, eval_batch_size=512,
                on_eval=points.append, clock=lambda n: 1.0 + n / 1000)  # fmt: skip
    assert [p.samples for p in points] == [1000, 1438]
    assert [p.seconds for p in points] == pytest.approx([3.0, 4.438])
    assert run.train_seconds == pytest.approx(4.438) and run.epoch_seconds == pytest.approx(4.438)
    assert 0 < run.wall_seconds < 4.0  # what the wall clock measured, kept beside it


def test_measuring_times_every_size_as_the_workers_will_run_and_changes_nothing() -> None:
    task = digits()
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    timed = clock.measure(task, task.training_batches().to_device(), [128, 16, 1024], threads=1)
    assert sorted(timed["seconds"]) == [16, 128, 1024]
    assert all(s > 0 for s in timed["seconds"].values()) and timed["cost"] > 0
    assert timed["seconds"][1024] > timed["seconds"][16]  # 64x the samples
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads


def _jittery(task):
    """``task`` whose every step waits up to 3 ms more, at random: a machine other processes
    slow down, or a worker on a busier GPU."""
    jitter = random.Random()

    def step(model, batch):
        time.sleep(jitter.uniform(0.0, 0.003))
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    return dataclasses.replace(task, step=step)


@pytest.mark.slow
def test_a_rerun_on_this_machine_does_the_same_study_however_the_steps_are_timed() -> None:
    """Two runs with one seed run the same trials, prune the same ones and recommend the same,
    though every step's wall time differed at random: the second reads the first's step
    times from the cache. ``cache=False`` times the steps again."""
    task = _jittery(digits())
    settings = dict(max_epochs=3, n_trials=8, candidates=[16, 32, 64, 128], mlflow=False)
    first = tune(task, **settings)
    second = tune(task, **settings)
    assert not first.settings.step_clock["cached"] and second.settings.step_clock["cached"]
    assert step_clock(second.settings) == step_clock(first.settings)
    assert sorted(step_clock(first.settings).seconds) == [16, 32, 64, 128]

    def study(result):
        return [
            (t.batch_size, t.lr_multiplier, t.state, t.train_seconds, t.time_to_target)
            for t in result.trials
        ]

    assert study(second) == study(first)
    assert (second.batch_size, second.lr, second.epochs) == (first.batch_size, first.lr,
                                                             first.epochs)  # fmt: skip
    walls = [[t.wall_seconds for t in r.trials] for r in (first, second)]
    assert walls[0] != walls[1]  # the wall clock did differ
    timed_again = tune(task, **{**settings, "n_trials": 3}, cache=False)
    assert not timed_again.settings.step_clock["cached"]


def test_the_step_times_are_cached_per_machine_and_an_unreadable_entry_is_timed_again(
    tmp_path, caplog
) -> None:
    task = digits()
    source = task.training_batches().to_device()
    first = clock.measure(task, source, [16, 64], cache_dir=tmp_path)
    again = clock.measure(task, source, [16, 64], cache_dir=tmp_path)
    assert not first["cached"] and again["cached"] and again["seconds"] == first["seconds"]
    other = clock.measure(task, source, [16, 128], cache_dir=tmp_path)  # other sizes: timed
    assert not other["cached"]
    entries = sorted(tmp_path.glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(entries) == 2
    entries[0].write_text("{not json")
    timed = clock.measure(task, source, [16, 64], cache_dir=tmp_path)
    assert not timed["cached"] and "ignoring unreadable cache entry" in caplog.text
    assert clock.measure(task, source, [16, 64], cache_dir=tmp_path)["cached"]  # replaced
