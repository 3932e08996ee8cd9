"""The tuner end to end on the digits example: seeding, failures, resumption, reproducibility."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import optuna
import pytest
import torch

from autobatch import InvalidInputError, StudyInterrupted, Task, probe, tune
from autobatch.examples import digits
from autobatch.records import BEYOND, COMPLETE, FAILED, INFEASIBLE, PRUNED
from autobatch.tuning import prior, scoring
from autobatch.tuning.scoring import infeasible_sizes, pruning_scale_ms
from autobatch.tuning.storage import REASON, ROLE, counts
from autobatch.tuning.worker import HOPELESS_REASON

FAST = dict(max_epochs=2, mlflow=False, candidates=[16, 32, 64, 128])


@pytest.fixture(scope="module")
def task() -> Task:
    return digits()


def _step_failing_at(batch_size: int, error: Exception | None):
    """A custom step that behaves like the default one, but fails at one batch size."""

    def step(model, batch):
        inputs, targets = batch
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        if inputs.shape[0] == batch_size:
            if error is None:
                return loss * float("nan")
            raise error
        return loss

    return step


@pytest.mark.slow
def test_seeded_trials_run_first_and_recommendation_is_a_complete_trial(task):
    result = tune(task, n_trials=4, **FAST)
    first = result.trials[:3]
    assert [t.batch_size for t in first] == [32, 128, 64]  # baseline, ceiling, middle
    assert all(t.lr_multiplier == 1.0 for t in first)
    assert first[0].lr == task.lr  # the baseline runs the task's own learning rate
    # Adam family: the square-root rule from the task's batch size, saturating above the
    # gradient noise scale the baseline measured (one worker: the baseline ends first).
    noise = prior.noise_scale(first[0])
    assert noise is not None and first[1].noise_scale == noise
    assert first[1].lr_rule == "saturating-sqrt"
    gain = prior.saturating_gain(128, 32, noise)
    assert first[1].lr == pytest.approx(task.lr * gain**0.5)
    assert gain < 128 / 32  # never more than the plain rule
    # The target follows the best loss any trial reached.
    assert result.target_loss == min(t.best_val_loss for t in result.trials if t.state == COMPLETE)
    best = next(t for t in result.trials if t.number == result.best_trial)
    assert best.state == COMPLETE and best.time_to_target is not None
    assert (result.batch_size, result.lr) == (best.batch_size, best.lr)
    assert result.epochs == best.recommended_epochs
    assert all(t.iterations_per_epoch == -(-task.train_size // t.batch_size) for t in result.trials)
    assert result.to_dict()["batch_size"] == result.batch_size


@pytest.mark.slow
def test_nan_loss_fails_that_trial_and_the_study_goes_on(task):
    broken = dataclasses.replace(task, step=_step_failing_at(128, None))
    result = tune(broken, n_trials=3, **FAST)
    states = {t.batch_size: t for t in result.trials}
    assert states[128].state == FAILED and "nan" in states[128].reason
    assert states[32].state == COMPLETE and states[64].state == COMPLETE
    # Failing after some evaluations, it counts the training time it spent, as its curve does.
    calls, seen = [], _Recorder()  # counted from the first trial on

    def late_nan(model, batch):
        calls.append(bool(seen.events) and batch[0].shape[0] == 128)
        return _step_failing_at(128 if sum(calls) > 12 else 0, None)(model, batch)

    broken = dataclasses.replace(task, step=late_nan)
    late = tune(broken, n_trials=3, observers=[seen], **FAST)
    failed = next(t for t in late.trials if t.batch_size == 128)
    assert failed.state == FAILED and failed.curve
    assert failed.train_seconds == failed.curve[-1].seconds > 0


@pytest.mark.slow
def test_oom_marks_the_batch_size_infeasible_and_it_is_not_sampled_again(task):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    broken = dataclasses.replace(task, step=_step_failing_at(128, oom))
    result = tune(broken, n_trials=8, seed=3, **FAST)
    at_128 = [t for t in result.trials if t.batch_size == 128]
    assert len(at_128) == 1 and at_128[0].state == INFEASIBLE
    assert infeasible_sizes(result.trials) == {128}
    others = [t for t in result.trials if t.batch_size != 128]
    assert len(others) == 7  # the study went on to its full budget
    assert {t.state for t in others} <= {COMPLETE, PRUNED}
    assert result.batch_size != 128
    assert len(result.study.get_trials()) == 8  # the size is never drawn, not drawn and skipped


@pytest.mark.slow
def test_out_of_memory_before_the_first_trial_marks_nothing_and_the_study_goes_on(task):
    """Out of memory at the smallest size (the clock settles on it) and at the baseline's (the
    range test runs there), on a CPU with no probe to have found it: prepare goes on."""

    def step(model, batch):
        inputs, targets = batch
        if inputs.shape[0] in (16, 32):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    result = tune(dataclasses.replace(task, step=step), n_trials=4, cache=False, **FAST)
    assert any("range test ran out of memory at batch size 32" in w for w in result.warnings)
    assert result.settings.lr_range_test is None
    assert sorted(result.settings.step_clock["seconds"]) == [64, 128]
    assert infeasible_sizes(result.trials) <= {16, 32} and result.batch_size in (64, 128)


@pytest.mark.slow
def test_other_errors_stop_the_study_with_the_original_error(task):
    broken = dataclasses.replace(task, step=_step_failing_at(32, KeyError("labels")))
    with pytest.raises(KeyError, match="labels"):
        tune(broken, n_trials=3, **FAST)
    # In a trial: the trial failed, saying why (its MLflow run FAILED, not "interrupted"),
    # and the study stopped.
    seen = _Recorder()
    failing = _step_failing_at(64, KeyError("labels"))

    def in_trials(model, batch):
        return (failing if seen.events else _step_failing_at(0, None))(model, batch)

    with pytest.raises(KeyError, match="labels"):
        tune(dataclasses.replace(task, step=in_trials), n_trials=3, observers=[seen], **FAST)
    ended = [args[0] for name, args in seen.events if name == "trial_finished"]
    assert (ended[-1].batch_size, ended[-1].state) == (64, FAILED)
    assert ended[-1].reason == "KeyError: 'labels'"
    assert seen.events[-1][0] == "study_interrupted"


@pytest.mark.slow
def test_a_study_stopped_by_an_error_in_its_baseline_resumes_once_it_is_fixed(task, tmp_path):
    """The failed trial is queued again, as an interrupted one is: the rerun after the fix
    runs the baseline first. It was not, and the rerun waited for it for ever."""
    kwargs = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", n_trials=3, **FAST)
    seen = _Recorder()
    failing = _step_failing_at(32, KeyError("labels"))  # the baseline's size

    def in_trials(model, batch):
        return (failing if seen.events else _step_failing_at(0, None))(model, batch)

    with pytest.raises(KeyError, match="labels"):
        tune(dataclasses.replace(task, step=in_trials), observers=[seen], **kwargs)
    fixed = tune(task, timeout=120, **kwargs)  # a hang would end at the timeout
    assert len(fixed.trials) == 3 and all(t.state != FAILED for t in fixed.trials)
    assert next(t for t in fixed.trials if t.role == "baseline").batch_size == 32


class _Recorder:
    """An observer that keeps every event it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        return lambda *args: self.events.append((name, args))


class _InterruptAt:
    """An observer that presses Ctrl-C during trial ``number``."""

    def __init__(self, number: int) -> None:
        self.number = number

    def __getattr__(self, name):
        return lambda *args: None

    def evaluated(self, record, point):
        if record.number == self.number:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_study_resumes_and_keeps_finished_trials(task, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(n_trials=5, storage=storage, study_name="resume", **FAST)
    with pytest.raises(StudyInterrupted, match="resume"):
        tune(task, observers=[_InterruptAt(2)], **kwargs)
    before = optuna.load_study(study_name="resume", storage=storage).get_trials()
    finished = {t.number: t.values for t in before if t.state.is_finished() and t.values}
    assert set(finished) == {0, 1}
    assert before[2].state == optuna.trial.TrialState.FAIL  # not left RUNNING

    result = tune(task, **kwargs)
    after = {t.number: t.values for t in result.study.get_trials() if t.values}
    assert {n: after[n] for n in finished} == finished  # nothing finished was lost or redone
    counted = [t for t in result.study.get_trials() if t.user_attrs.get("autobatch_counted", True)]
    assert len(counted) == 5
    # the interrupted seed (the middle size) is run again by the resumed study
    assert any(t.batch_size == 64 and t.state == COMPLETE for t in result.trials)


@pytest.mark.slow
def test_a_study_s_counts_are_only_ever_raised(task, tmp_path, caplog):
    """Another worker may be running the study to its stored n_trials: a call with fewer
    keeps them (and says so), one with more extends the study."""
    kwargs = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="counts", **FAST)
    tune(task, n_trials=2, min_trials=None, **kwargs)
    with caplog.at_level("WARNING", logger="autobatch"):
        fewer = tune(task, n_trials=1, min_trials=1, **kwargs)
    assert (fewer.settings.n_trials, fewer.settings.min_trials) == (2, None)
    assert "ignored n_trials=1 (it has 2), min_trials=1 (it has None)" in caplog.text
    more = tune(task, n_trials=3, min_trials=None, **kwargs)
    assert more.settings.n_trials == 3 and len(more.trials) == 3


@pytest.mark.slow
def test_a_study_interrupted_in_its_baseline_resumes_with_the_baseline_first(task, tmp_path):
    """The interrupted baseline is queued again behind the other seeds; under a saturating rule
    they wait for the noise scale it measures, so a rerun that ran them first waited for a trial
    only it could run, for ever. It runs the baseline first, as the study would have."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(n_trials=4, storage=storage, study_name="again", **FAST)
    with pytest.raises(StudyInterrupted):
        tune(task, observers=[_InterruptAt(0)], **kwargs)
    result = tune(task, timeout=120, **kwargs)  # it used to wait for ever
    assert result.settings.lr_rule.startswith("saturating-")
    assert len(result.trials) == 4
    trials = result.study.get_trials()
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert min(ran, key=lambda t: t.number).user_attrs["autobatch_role"] == "baseline"
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


@pytest.mark.slow
def test_a_study_whose_preparer_died_before_marking_it_prepared_is_prepared_anew(task, tmp_path):
    """SIGKILL between creating a study and writing its settings left it for every rerun to
    wait for, then refuse; the process that created it is known to be gone: start again."""
    import subprocess
    import sys

    from autobatch.tuning import storage as study_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    half = optuna.create_study(study_name="half", storage=study_storage.open_storage(url))
    half.set_user_attr(study_storage.PREPARER, f"{study_storage.hostname()}:{gone}")
    result = tune(task, n_trials=3, storage=url, study_name="half", **FAST)
    assert len(result.trials) == 3 and result.settings is not None


def test_a_model_with_dropout_trains_the_same_at_the_same_seed_and_leaves_the_rng_alone(task):
    from autobatch.data import BatchSource
    from autobatch.tuning.loop import train

    dropout = dataclasses.replace(
        task,
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)
        ),
    )
    data = BatchSource(dropout.train_data, dropout.device)
    val = BatchSource(dropout.val_data, dropout.device)

    def curve(seed: int) -> list[float]:
        points = []
        trained = dataclasses.replace(dropout, seed=seed)
        train(trained, data, val, batch_size=64, lr=1e-2, max_epochs=1, eval_batch_size=256,
              on_eval=points.append)  # fmt: skip
        return [p.val_loss for p in points]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = curve(0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's draws are its own
    torch.rand(7)  # whatever the caller drew in between
    assert curve(0) == first
    assert curve(1) != first


@pytest.mark.slow
def test_same_seed_gives_the_same_study(task):
    a = tune(task, n_trials=5, objective="loss", seed=7, **FAST)
    b = tune(task, n_trials=5, objective="loss", seed=7, **FAST)
    # The seeded trials are the same; what follows may not be (the predicted batch size comes
    # from measured step times, and pruning from wall time: docs/concepts.md).
    seeds = [(t.role, t.batch_size, t.lr) for t in a.trials[:3]]
    assert seeds == [(t.role, t.batch_size, t.lr) for t in b.trials[:3]]
    # The same configuration gives the same learning curve (where pruning stops a trial may
    # differ, so compare the prefix).
    same = [
        (ta, tb)
        for ta in a.trials
        for tb in b.trials
        if (ta.batch_size, ta.lr) == (tb.batch_size, tb.lr)
    ]
    assert len(same) >= 3
    for ta, tb in same:
        n = min(len(ta.curve), len(tb.curve))
        assert n > 0
        assert [p.val_loss for p in ta.curve[:n]] == [p.val_loss for p in tb.curve[:n]]
        assert [p.samples for p in ta.curve[:n]] == [p.samples for p in tb.curve[:n]]


@pytest.mark.slow
def test_changed_search_space_on_an_existing_study_is_refused(task, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = tune(task, n_trials=1, storage=storage, study_name="s", **FAST)
    with pytest.raises(InvalidInputError, match="different search space"):
        tune(task, n_trials=2, storage=storage, study_name="s", objective="loss", **FAST)
    with pytest.raises(InvalidInputError, match=r"\(candidates up to 128, above max_batch_size"):
        tune(task, n_trials=2, storage=storage, study_name="s", max_batch_size=64, **FAST)
    # the first study is intact
    stored = optuna.load_study(study_name="s", storage=storage).trials
    finished = [t for t in stored if t.state.is_finished()]
    assert [t.values for t in finished] == [[first.trials[0].value]]


def test_a_stored_study_keeps_its_tolerance_unless_another_is_given(task, tmp_path):
    """A study made before the default changed (or with its own) continues as it was made;
    only a tolerance given on purpose is checked against it."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert tune(task, n_trials=1, **FAST).settings.tolerance == 0.01  # the default
    tune(task, n_trials=1, storage=storage, study_name="s", tolerance=0.02, **FAST)
    again = tune(task, n_trials=2, storage=storage, study_name="s", **FAST)
    assert again.settings.tolerance == 0.02 and len(again.trials) == 2
    with pytest.raises(InvalidInputError, match=r"different search space \(tolerance\)"):
        tune(task, n_trials=3, storage=storage, study_name="s", tolerance=0.05, **FAST)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(objective="fastest"), "objective"),
        (dict(lr_rule="cubic"), "lr_rule"),
        (dict(target_loss="low"), "target_loss"),
        (dict(target_loss=float("nan")), "target_loss"),
        (dict(candidates=[0, 8]), "candidates"),
        (dict(candidates=[5000]), "ceiling"),
        (dict(storage="postgresql://u:hunter2@127.0.0.1:1/none"), "cannot open"),
    ],
)
def test_bad_input_is_one_clear_error(task, kwargs, message):
    options = {**FAST, **kwargs}
    with pytest.raises(InvalidInputError, match=message) as info:
        tune(task, n_trials=1, **options)
    assert "hunter2" not in str(info.value)


@pytest.mark.slow
def test_candidates_above_the_ceiling_are_dropped_with_a_note(task):
    options = {**FAST, "candidates": [32, 64, 100_000]}
    result = tune(task, n_trials=1, **options)
    assert result.settings.candidates == (32, 64)
    assert any("100000" in w for w in result.warnings)


def test_missing_validation_set_and_tiny_data_are_refused(task):
    with pytest.raises(InvalidInputError, match="val_data"):
        tune(dataclasses.replace(task, val_data=None), n_trials=1, mlflow=False)
    x, y = task.train_data
    tiny = dataclasses.replace(task, train_data=(x[:1], y[:1]))
    with pytest.raises(InvalidInputError, match="at least 2"):
        tune(tiny, n_trials=1, mlflow=False)


class _InterruptWhileTold(_InterruptAt):
    """Presses Ctrl-C while observers hear that trial ``number`` ended (as while waiting for
    its MLflow run id)."""

    def evaluated(self, record, point):
        pass

    def trial_finished(self, record):
        if record.number == self.number:
            raise KeyboardInterrupt


def test_ctrl_c_as_a_trial_ends_still_records_it(task, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(FAST, n_trials=3, storage=storage, study_name="told")
    with pytest.raises(StudyInterrupted, match="1 finished trial"):
        tune(task, observers=[_InterruptWhileTold(0)], **kwargs)
    trials = optuna.load_study(study_name="told", storage=storage).get_trials()
    assert trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].user_attrs["autobatch_record"]["state"] == COMPLETE
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in trials}


@pytest.mark.slow
def test_interrupted_tune_leaves_mlflow_runs_killed_not_running(task, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = {**FAST, "mlflow": True, "storage": f"sqlite:///{tmp_path / 'study.db'}"}
    with pytest.raises(StudyInterrupted):
        tune(task, n_trials=4, tracking_uri=uri, observers=[_InterruptAt(1)], **options)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("autobatch-digits")
    runs = client.search_runs([experiment.experiment_id])
    statuses = {r.data.tags.get("trial_number"): r.info.status for r in runs}
    names = {r.data.tags.get("trial_number"): r.info.run_name for r in runs}
    assert statuses["0"] == "FINISHED"
    assert statuses["1"] == "KILLED" and names["1"].endswith(" interrupted")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    assert "RUNNING" not in statuses.values()
    # Resumed: the report from MLflow has the study's trials, not the interrupted one too.
    from autobatch.tracking.report import load_report

    resumed = tune(task, n_trials=4, tracking_uri=uri, **options)
    report = load_report(tracking_uri=uri, run_id=resumed.mlflow_run_id)
    assert [row["number"] for row in report.trials] == [t.number for t in resumed.trials]


@pytest.mark.slow
def test_a_given_target_still_prunes(task):
    result = tune(
        task, n_trials=10, min_trials=None, target_loss=0.3, seed=1, **{**FAST, "max_epochs": 4}
    )
    assert result.target_loss == 0.3
    baseline = next(t for t in result.trials if t.role == "baseline")
    # The pruner's first rung comes from the baseline. Whether a trial then falls behind at it
    # depends on timing; the pruner learns its rung from the first trial that asks it (one
    # under the target at its first evaluation never asks), so it may not have been asked.
    assert result.study.pruner.min_resource_ms in (None, pruning_scale_ms(result.trials))
    assert pruning_scale_ms(result.trials) == max(1, int(baseline.train_seconds * 1000 / 5))
    if any(t.state == PRUNED for t in result.trials):
        assert result.study.pruner.min_resource_ms == pruning_scale_ms(result.trials)


@pytest.mark.slow
def test_a_trial_that_reached_the_target_is_never_pruned(task):
    # Every trial is under this target at its first evaluation: its score is known, so
    # halving never stops it (it ends when its curve levels off).
    result = tune(task, n_trials=8, target_loss=5.0, seed=1, **{**FAST, "max_epochs": 4})
    assert len(result.trials) == 8
    assert all(t.state == COMPLETE and t.time_to_target is not None for t in result.trials)


@pytest.mark.slow
def test_a_trial_far_from_the_target_is_given_up_past_a_third_of_its_budget(task):
    # No trial gets near this target: every seeded one but the reference is given up once a
    # third of its budget is spent (halving never stops a seeded trial); the baseline runs on.
    result = tune(task, n_trials=3, target_loss=0.001, seed=1, **{**FAST, "max_epochs": 3})
    baseline, *seeds = result.trials
    assert baseline.role == "baseline" and baseline.state == COMPLETE
    assert baseline.curve[-1].epoch == 3
    for trial in seeds:
        assert (trial.state, trial.reason) == (PRUNED, HOPELESS_REASON)
        assert 1 <= trial.curve[-1].epoch < 3  # past a third, before the end
    assert result.best_trial == baseline.number  # a stopped trial is never the answer


def _decay_on_matrices(params, lr: float) -> torch.optim.AdamW:
    """The usual recipe: weight decay on weight matrices, none on biases, no empty group."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.99))


@pytest.mark.slow
def test_scale_adamw_moves_beta2_and_weight_decay_with_the_batch(task):
    result = tune(task, n_trials=3, scale_adamw=True, **FAST)
    for trial in result.trials:
        ratio = trial.batch_size / task.batch_size
        assert trial.beta2 == pytest.approx(0.999**ratio)
        assert trial.weight_decay == pytest.approx(0.01 * ratio * task.lr / trial.lr)
    # The values reported are those of the group with weight decay, as the factory builds it
    # for the model's parameters.
    grouped = dataclasses.replace(task, optimizer=_decay_on_matrices)
    for trial in tune(grouped, n_trials=2, scale_adamw=True, **FAST).trials:
        ratio = trial.batch_size / task.batch_size
        assert trial.beta2 == pytest.approx(0.99**ratio)
        assert trial.weight_decay == pytest.approx(0.05 * ratio * task.lr / trial.lr)
    assert result.recommendation()["beta2"] == next(
        t.beta2 for t in result.trials if t.number == result.best_trial
    )
    plain = tune(task, n_trials=1, **FAST)
    assert plain.trials[0].beta2 is None and "beta2" not in plain.recommendation()


@pytest.mark.slow
def test_the_predicted_fastest_batch_size_is_queued_after_the_seeds(task):
    result = tune(task, n_trials=5, **FAST)
    seeds, rest = result.trials[:3], result.trials[3:]
    records = scoring.rescore(list(seeds), result.settings)
    noise = prior.noise_scale(scoring.reference(records))
    predictions = prior.predict(records, noise, prior.step_time(records), FAST["candidates"])
    assert (
        prior.explain(records, FAST["candidates"]).fastest.batch_size
        == min(predictions, key=lambda p: p.seconds).batch_size
    )
    # The worker predicts on the study's step clock (measured, so it can differ from the
    # line through the seeds' times on a busy machine).
    clock = prior.step_clock(result.settings)
    fastest = prior.explain(records, FAST["candidates"], clock).fastest.batch_size
    queued = [t for t in rest if t.role == "predicted"]
    if fastest in [t.batch_size for t in seeds]:
        assert not queued  # nothing new to try
    else:
        assert [(t.number, t.batch_size, t.lr_multiplier) for t in queued] == [(3, fastest, 1.0)]


@pytest.mark.slow
def test_a_study_whose_answer_stands_still_ends_before_n_trials(task, tmp_path):
    """Two batch sizes and one learning rate: once both seeds have run no trial can move the
    answer, so the study settles PATIENCE trials later. A rerun adds nothing and says what
    would; a larger min_trials adds trials."""
    storage = f"sqlite:///{tmp_path}/s.db"
    settings = dict(
        **{**FAST, "candidates": [16, 64]}, objective="loss", lr_multiplier_range=(1.0, 1.001),
        lr_rule="sqrt", storage=storage, study_name="still",
    )  # fmt: skip
    settles = 2 + scoring.PATIENCE
    result = tune(task, n_trials=12, min_trials=settles, **settings)
    assert len(result.trials) == settles
    why = scoring.settled(result.trials, result.settings)
    assert why is not None and why.startswith(f"settled after {settles} trials")
    again = tune(task, n_trials=12, min_trials=settles, **settings)
    assert len(again.trials) == settles
    assert any(f"raise min_trials (--min-trials) above {settles}" in w for w in again.warnings)
    more = tune(task, n_trials=12, min_trials=settles + 2, **settings)
    assert len(more.trials) == settles + 2
    # min_trials=None (or n_trials) runs them all.
    everything = tune(task, n_trials=7, min_trials=None, **{**settings, "study_name": "all"})
    assert len(everything.trials) == 7


@pytest.mark.slow
def test_a_trial_queued_twice_at_once_runs_once(task, tmp_path):
    """Two workers ending trials at the same moment can both queue the same steered trial;
    the second copy is given back unrun and does not count."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(storage=storage, study_name="twins", min_trials=None, **FAST)
    tune(task, n_trials=3, **kwargs)
    study = optuna.load_study(study_name="twins", storage=storage)
    for _ in range(2):
        study.enqueue_trial({"batch_size": 16, "lr_multiplier": 2.0}, user_attrs={ROLE: BEYOND})
    result = tune(task, n_trials=5, **kwargs)
    assert len(result.trials) == 5
    ran = [t for t in result.trials if t.role == BEYOND and t.batch_size == 16]
    assert [(t.number, t.lr_multiplier) for t in ran] == [(3, 2.0)]
    twin = result.study.get_trials()[4]
    assert twin.state == optuna.trial.TrialState.FAIL
    assert twin.user_attrs[REASON] == "not run: queued twice at once, as trial 3"
    assert not counts(twin)


class _Rows(torch.utils.data.Dataset):
    """Rows of tensors as a Dataset: batches come through a DataLoader, and nothing checks the
    values up front."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _rows(samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=generator)
    return x, x[:, :4].argmax(1)


def _batch_norm_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_a_batch_norm_model_never_trains_on_a_final_batch_of_one_sample():
    from autobatch.data import BatchSource, steps_per_epoch
    from autobatch.tuning.loop import train

    x, y = _rows(513)  # 513 = 32 x 16 + 1: the last batch of 16 holds one sample
    val = BatchSource(_rows(100, seed=1), torch.device("cpu"))
    for data in ((x, y), _Rows(x, y)):
        for factory, drops in ((_batch_norm_net, True), (_mlp, False)):
            trained: list[int] = []

            def model(factory=factory, trained=trained) -> torch.nn.Module:
                net = factory()
                net[0].register_forward_pre_hook(
                    lambda m, args: trained.append(len(args[0])) if m.training else None
                )
                return net

            task = Task(model=model, train_data=data, loss=torch.nn.functional.cross_entropy)
            points = []
            run = train(
                task, BatchSource(data, task.device), val, batch_size=16, lr=1e-3, max_epochs=2,
                eval_batch_size=100, on_eval=points.append,
            )  # fmt: skip
            per_epoch = 32 if drops else 33
            assert run.iterations_per_epoch == per_epoch == steps_per_epoch(513, 16, drops)
            assert len(trained) == 2 * per_epoch
            assert min(trained) == (16 if drops else 1)
            assert run.samples == 2 * (512 if drops else 513)
            assert [p.epoch for p in points][1::2] == [1.0, 2.0]  # whole epochs at their ends


@pytest.mark.slow
def test_tune_trains_batch_norm_at_sizes_that_leave_one_sample_and_refuses_size_1():
    x, y = _rows(713)
    task = Task(
        model=_batch_norm_net, train_data=(x[:513], y[:513]), val_data=(x[513:], y[513:]),
        loss=torch.nn.functional.cross_entropy, batch_size=24,
    )  # fmt: skip
    options = dict(max_epochs=1, mlflow=False, memory_budget="4MiB", cache=False)
    # The baseline at 24, then the ceiling at 64: 513 = 8 x 64 + 1.
    result = tune(task, n_trials=2, candidates=[16, 24, 64], **options)
    assert [(t.batch_size, t.state) for t in result.trials] == [(24, COMPLETE), (64, COMPLETE)]
    refused = "BatchNorm1d layers need at least 2 samples.*2 or more"
    with pytest.raises(InvalidInputError, match=refused):
        tune(task, n_trials=1, candidates=[1, 32], **options)
    with pytest.raises(InvalidInputError, match=refused):
        tune(dataclasses.replace(task, batch_size=1), n_trials=1, **options)


def test_a_nan_in_a_training_dataset_names_the_batch_that_holds_it():
    from autobatch.data import BatchSource, non_finite
    from autobatch.tuning.loop import TrialFailed, train

    x, y = _rows(200)
    x[37, 2] = float("nan")
    task = Task(model=_mlp, train_data=_Rows(x, y), loss=torch.nn.functional.cross_entropy)
    val = BatchSource(_rows(50, seed=1), task.device)
    # The trial's first epoch, as it draws it: which batch holds sample 37.
    order = BatchSource(_Rows(x, y), task.device).epoch(16, torch.Generator().manual_seed(0))
    bad = next(i for i, batch in enumerate(order) if non_finite(batch))
    options = dict(batch_size=16, lr=1e-3, max_epochs=1, eval_batch_size=50, on_eval=lambda p: None)
    with pytest.raises(TrialFailed) as info:
        train(task, BatchSource(_Rows(x, y), task.device), val, **options)
    assert f"batch at samples {16 * bad + 1}-{16 * bad + 16} (epoch 1) contains nan" in str(
        info.value
    )
    assert "train_data" in str(info.value)
    # A loss that turns nan on clean data is not blamed on the data.
    clean = dataclasses.replace(
        task,
        train_data=_Rows(*_rows(200)),
        loss=lambda out, target: torch.nn.functional.cross_entropy(out, target) * float("nan"),
    )
    with pytest.raises(TrialFailed, match="loss became nan after"):
        train(clean, BatchSource(clean.train_data, task.device), val, **options)


def test_a_batch_larger_than_the_training_set_is_the_whole_set_at_the_task_s_rate():
    """Batch 64 on 37 samples trains on batches of 37: the task's rate was set there, so the
    baseline keeps it instead of scaling it by 37/64."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(45, 5, generator=generator), torch.randint(0, 2, (45,), generator=generator)
    task = Task(
        model=lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 2)),
        train_data=(x[:37], y[:37]), val_data=(x[37:], y[37:]),
        loss=torch.nn.functional.cross_entropy, optimizer=torch.optim.SGD, lr=0.1, batch_size=64,
    )  # fmt: skip
    result = tune(task, n_trials=1, max_epochs=1, mlflow=False, lr_range_test=False)
    (baseline,) = result.trials
    assert result.settings.base_batch_size == baseline.batch_size == 37
    assert (baseline.role, baseline.lr) == ("baseline", 0.1)


def test_numpy_numbers_are_taken_and_stored_as_python_ones(tmp_path):
    task = dataclasses.replace(digits(), batch_size=np.int64(32), lr=np.float32(1e-3))
    assert (type(task.batch_size), type(task.lr)) == (int, float)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = tune(
        task, n_trials=np.int64(1), max_epochs=np.int64(1), candidates=list(np.array([16, 32])),
        tolerance=np.float64(0.01), seed=np.int64(0), mlflow=False, storage=storage,
    )  # fmt: skip
    assert result.settings.candidates == (16, 32) and type(result.settings.n_trials) is int
    # A probe's sizes found with a NumPy multiple_of are cached (as JSON) and stored alike.
    found = probe(task, memory_budget="2MiB", multiple_of=np.int64(8), cache_dir=tmp_path)
    assert type(found.batch_size) is int and found.batch_size % 8 == 0
    assert json.loads(json.dumps(found.to_dict()))["batch_size"] == found.batch_size
