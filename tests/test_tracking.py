"""MLflow tracking, driven through the observer protocol with synthetic trials.

The tracker never sees the tuner here: records are built from autobatch.records, trials come
from a real in-memory Optuna study, and everything is read back through MLflow's REST API
from a real ``mlflow server`` (tests/mlflow_server.py) or from a SQLite store.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.image
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from autobatch.errors import InvalidInputError
from autobatch.records import (
    COMPLETE,
    INFEASIBLE,
    PRUNED,
    EvalPoint,
    MemoryModel,
    ProbeAttempt,
    ProbeResult,
    StudySettings,
    TrialRecord,
    TuneResult,
)
from autobatch.tracking import (
    MlflowTracker,
    format_report,
    load_report,
    mlflow_ui_command,
    plots,
    redact_url,
    resolve_tracking_uri,
)
from autobatch.tuning import recommend

try:  # tests/ on sys.path (pytest's default rootdir import mode)
    from mlflow_server import (  # noqa: F401  (fixtures are found by name)
        MlflowServer,
        free_port,
        mlflow_server_fixture,
        mlflow_server_process_fixture,
    )
except ImportError:  # tests/ imported as a package
    from tests.mlflow_server import (  # noqa: F401
        MlflowServer,
        free_port,
        mlflow_server_fixture,
        mlflow_server_process_fixture,
    )

MiB, GiB = 2**20, 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = {
    "probe.json",
    "probe_memory.png",
    "learning_curves.png",
    "batch_size_tradeoff.png",
    "search_space.png",
    "optimization_history.png",
    "why_batch_size.png",
    "trials.csv",
    "recommendation.json",
}
TRAIN_SIZE = 1600
TARGET = 0.30


# -- synthetic study ---


def make_probe() -> ProbeResult:
    model = MemoryModel(fixed_bytes=300 * MiB, bytes_per_sample=3.5 * MiB)
    peak = model.predict
    attempts = (
        ProbeAttempt(1, True, False, int(peak(1)), 0.05, "measure"),
        ProbeAttempt(256, True, False, int(peak(256)), 0.10, "measure"),
        ProbeAttempt(1100, False, True, None, 0.20, "predict"),
        ProbeAttempt(1050, False, False, int(peak(1050)), 0.18, "refine"),
        ProbeAttempt(1000, True, False, int(peak(1000)), 0.17, "refine"),
    )
    return ProbeResult(
        batch_size=1000,
        capacity_bytes=4 * GiB,
        headroom=0.05,
        budget_bytes=int(4 * GiB * 0.95),
        memory_model=model,
        attempts=attempts,
        steps=10,
        seconds=0.7,
        device="cuda:0",
    )


def make_settings(name: str) -> StudySettings:
    return StudySettings(
        study_name=name,
        storage="postgresql://optuna:hunter2@db:5432/studies",  # the tracker must redact it
        objective="time",
        lr_rule="sqrt",
        lr_multiplier_range=(0.25, 4.0),
        candidates=(32, 256, 1000, 2048),
        max_epochs=4.0,
        n_trials=4,
        timeout=None,
        seed=0,
        sampler="TPESampler",
        pruner="SuccessiveHalving(training ms)",
        tolerance=0.05,
        target_loss=None,
        task_name="synthetic",
        device="cuda:0",
        precision="fp32",
        base_lr=0.01,
        base_batch_size=32,
        train_size=TRAIN_SIZE,
        extra={"note": "synthetic trials", "weird key!": 1},
        lr_centre=12.0,
        lr_range_test={"lr_at_minimum": 1.2, "diverged_lr": None, "suggested": 12.0},
        step_clock={"seconds": {32: 0.0012, 2048: 0.0315}, "cost": 0.4, "cached": False},
    )


def make_curve(batch_size: int, points: int, speed: float) -> tuple[EvalPoint, ...]:
    """A decaying loss: ``speed`` sets how fast it falls per training second."""
    curve, start_ms = [], 1_800_000_000_000
    per_eval = TRAIN_SIZE // 2
    for i in range(1, points + 1):
        samples = i * per_eval
        seconds = samples / (400.0 * math.sqrt(batch_size))
        loss = 0.25 + 2.0 * math.exp(-speed * seconds)
        curve.append(
            EvalPoint(
                samples=samples,
                seconds=seconds,
                epoch=samples / TRAIN_SIZE,
                train_loss=loss * 0.9,
                val_loss=loss,
                val_loss_smoothed=loss * 1.01,
                val_accuracy=None if batch_size == 32 else 1 - loss / 3,
                samples_per_second=400.0 * math.sqrt(batch_size),
                peak_memory_bytes=None if batch_size == 32 else 300 * MiB + batch_size * 3 * MiB,
                timestamp_ms=start_ms + int(seconds * 1000),
            )
        )
    return tuple(curve)


# batch size, final state, evaluations, speed (loss decay per second)
PLAN = (
    (32, COMPLETE, 8, 2.0),
    (256, COMPLETE, 8, 6.0),
    (1000, PRUNED, 3, 1.0),
    (2048, INFEASIBLE, 0, 0),
)


def run_trial(tracker: MlflowTracker, study: optuna.Study, plan: tuple) -> TrialRecord:
    size, state, points, speed = plan
    trial = study.ask()
    record = TrialRecord(
        number=trial.number,
        state="running",
        batch_size=size,
        lr=0.01 * math.sqrt(size / 32),
        lr_multiplier=1.0,
        lr_rule="sqrt",
        iterations_per_epoch=math.ceil(TRAIN_SIZE / size),
        max_epochs=4.0,
        seed=0,
    )
    tracker.trial_started(trial, record)
    record = replace(record, mlflow_run_id=trial.user_attrs.get("mlflow_run_id"))
    curve = make_curve(size, points, speed)
    for point in curve:
        tracker.evaluated(record, point)
    level = TARGET * 1.05
    hit = next((p for p in curve if p.val_loss_smoothed <= level), None)
    record = replace(
        record,
        state=state,
        reason={PRUNED: "successive halving", INFEASIBLE: f"out of memory at {size}"}.get(state),
        curve=curve,
        train_seconds=curve[-1].seconds if curve else 0.0,
        epoch_seconds=curve[1].seconds if len(curve) > 1 else None,
        time_to_target=None if hit is None or state != COMPLETE else hit.seconds,
        samples_to_target=None if hit is None or state != COMPLETE else hit.samples,
        best_val_loss=min(p.val_loss_smoothed for p in curve) if curve else None,
        recommended_epochs=3.0 if state == COMPLETE else None,
        auc=1.5 if curve else None,
        value=(hit.seconds if hit else 9.9) if state == COMPLETE else None,
    )
    tracker.trial_finished(record)
    if state == COMPLETE:
        study.tell(trial, record.value)
    else:
        study.tell(trial, state=TrialState.PRUNED if state == PRUNED else TrialState.FAIL)
    return record


def run_study(tracker: MlflowTracker, name: str, plan=PLAN) -> tuple[optuna.Study, TuneResult]:
    settings = make_settings(name)
    study = optuna.create_study(study_name=name)
    tracker.study_started(settings, make_probe())
    records = tuple(run_trial(tracker, study, step) for step in plan)
    # The final target is harder than the one trial 0 was told against: judged again, it
    # missed (the tracker must say so on its run).
    records = tuple(
        replace(r, time_to_target=None, samples_to_target=None, value=1e9 + 0.1)
        if r.number == 0
        else r
        for r in records
    )
    best = min((r for r in records if r.value is not None), key=lambda r: r.value)
    result = TuneResult(
        batch_size=best.batch_size,
        epochs=3,
        steps=3 * best.iterations_per_epoch,
        lr=best.lr,
        lr_multiplier=best.lr_multiplier,
        best_trial=best.number,
        target_loss=TARGET,
        probe=make_probe(),
        trials=records,
        settings=settings,
        warnings=("dropped candidate batch sizes [4096]: above the ceiling",),
    )
    tracker.study_finished(result)
    return study, result


def is_png(path: str | Path) -> bool:
    return Path(path).read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- a whole study against a real server ---


@dataclass
class LoggedStudy:
    url: str
    client: MlflowClient
    study: optuna.Study
    result: TuneResult
    tracker: MlflowTracker
    parent: Any
    children: dict[int, Any]


@pytest.fixture(scope="module")
def logged(mlflow_server_process: MlflowServer) -> LoggedStudy:
    url = mlflow_server_process.ensure_running()
    tracker = MlflowTracker(url)
    study, result = run_study(tracker, "synthetic-study")
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("synthetic-study")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {int(r.data.tags["trial_number"]): r for r in runs if r not in parents}
    return LoggedStudy(url, client, study, result, tracker, parents[0], children)


@pytest.mark.slow
def test_one_parent_run_and_a_child_run_per_trial(logged: LoggedStudy) -> None:
    parent = logged.parent
    assert parent.info.run_name == "synthetic-study"
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == logged.tracker.parent_run_id
    assert sorted(logged.children) == [0, 1, 2, 3]
    for number, child in logged.children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name.startswith(f"t{number:02d} bs={PLAN[number][0]} lr=")
        assert child.data.params["batch_size"] == str(PLAN[number][0])
        assert child.data.params["device"] == "cuda:0"
        assert child.data.params["iterations_per_epoch"] == str(
            math.ceil(TRAIN_SIZE / PLAN[number][0])
        )
    states = {n: (c.data.tags["state"], c.info.status) for n, c in logged.children.items()}
    assert states == {
        0: ("complete", "FINISHED"),
        1: ("complete", "FINISHED"),
        2: ("pruned", "FINISHED"),
        3: ("infeasible", "FAILED"),
    }
    assert logged.children[3].data.tags["reason"] == "out of memory at 2048"
    assert logged.children[1].data.metrics["summary/time_to_target"] > 0
    assert logged.result.best_trial == 1
    assert "summary/time_to_target" not in logged.children[2].data.metrics
    # At a glance: the outcome in the name (the winner marked best), a 0/1 metric, a line.
    names = {n: c.info.run_name.split()[-1] for n, c in logged.children.items()}
    assert names == {0: "missed", 1: "best", 2: "pruned", 3: "infeasible"}
    reached = {n: c.data.metrics["summary/reached_target"] for n, c in logged.children.items()}
    assert reached == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
    # Trial 0 reached the target it was told against, not the final one: its run says so.
    missed = logged.children[0].data
    assert missed.tags["outcome"] == "missed" and math.isnan(
        missed.metrics["summary/time_to_target"]
    )
    objective = "summary/objective_value"
    assert missed.metrics[objective] > logged.children[1].data.metrics[objective]
    assert "never reached the target" in missed.tags["mlflow.note.content"]
    assert "reached the target after" in logged.children[1].data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_settings_and_probe_are_parameters_the_recommendation_tags(logged: LoggedStudy) -> None:
    params, tags = logged.parent.data.params, logged.parent.data.tags
    assert params["storage"] == "postgresql://optuna:***@db:5432/studies"
    assert "hunter2" not in json.dumps(params)
    assert params["candidates"] == "[32, 256, 1000, 2048]"
    assert params["objective"] == "time"
    assert params["extra.weird key_"] == "1"
    assert params["lr_centre"] == "12.0" and params["lr_range_test.suggested"] == "12.0"
    assert params["lr_range_test.diverged_lr"] == "None" and "lr_range_test" not in params
    assert params["step_seconds.32"] == "0.0012" and params["step_seconds.2048"] == "0.0315"
    assert params["step_seconds.cost"] == "0.4" and params["step_seconds.cached"] == "False"
    assert "step_clock" not in params
    assert params["probe.batch_size"] == "1000"
    assert params["probe.capacity_bytes"] == str(4 * GiB)
    assert params["probe.bytes_per_sample"] == str(int(3.5 * MiB))
    # Tags, which a study extended later can update; no one-point metrics.
    assert tags["recommended_batch_size"] == str(logged.result.batch_size)
    assert tags["best_trial"] == str(logged.result.best_trial)
    assert tags["recommended_epochs"] == "3"
    assert tags["recommended_steps"] == str(logged.result.steps)
    assert f"({logged.result.steps} steps)" in tags["mlflow.note.content"]
    assert set(logged.parent.data.metrics) == {"probe/peak_mib"}  # no one-point summaries
    assert "recommended_batch_size" not in params
    assert "above the ceiling" in tags["warnings"]
    assert "Recommendation" in tags["mlflow.note.content"]


@pytest.mark.slow
def test_metric_histories_use_samples_as_step(logged: LoggedStudy) -> None:
    for number, child in logged.children.items():
        curve = logged.result.trials[number].curve
        history = logged.client.get_metric_history(child.info.run_id, "curve/val_loss")
        assert [m.step for m in history] == [p.samples for p in curve]
        assert [m.value for m in history] == pytest.approx([p.val_loss for p in curve])
        assert [m.timestamp for m in history] == [p.timestamp_ms for p in curve]
    metrics = logged.children[0].data.metrics
    assert "curve/val_accuracy" not in metrics and "curve/peak_memory_mib" not in metrics
    assert "curve/val_accuracy" in logged.children[1].data.metrics
    # Every metric sits in a section the UI groups by.
    sections = {name.split("/")[0] for c in logged.children.values() for name in c.data.metrics}
    assert sections == {"curve", "summary"}
    probe = logged.client.get_metric_history(logged.parent.info.run_id, "probe/peak_mib")
    assert sorted(m.step for m in probe) == [1, 256, 1000, 1050]  # the OOM left no reading
    peaks = {m.step: m.value for m in probe}
    attempt = next(a for a in logged.result.probe.attempts if a.batch_size == 1000)
    assert peaks[1000] == pytest.approx(attempt.peak_bytes / 2**20)  # in MiB


@pytest.mark.slow
def test_artifacts_are_uploaded_and_readable(logged: LoggedStudy, tmp_path: Path) -> None:
    run_id = logged.parent.info.run_id
    names = {a.path for a in logged.client.list_artifacts(run_id)}
    assert names >= ARTIFACTS
    for name in sorted(ARTIFACTS):
        logged.client.download_artifacts(run_id, name, str(tmp_path))
    for name in sorted(n for n in ARTIFACTS if n.endswith(".png")):
        assert is_png(tmp_path / name)
        height, width = matplotlib.image.imread(tmp_path / name).shape[:2]
        assert width > 600 and height > 400
    with (tmp_path / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["batch_size"]) for r in rows] == [32, 256, 1000, 2048]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "infeasible"]
    assert "curve" not in rows[0]
    recommendation = json.loads((tmp_path / "recommendation.json").read_text())
    assert recommendation["batch_size"] == logged.result.batch_size
    assert recommendation["settings"]["storage"] == "postgresql://optuna:***@db:5432/studies"
    assert json.loads((tmp_path / "probe.json").read_text())["batch_size"] == 1000


@pytest.mark.slow
def test_run_ids_are_stored_on_the_optuna_trials(logged: LoggedStudy) -> None:
    for trial in logged.study.trials:
        assert trial.user_attrs["mlflow_run_id"] == logged.children[trial.number].info.run_id


@pytest.mark.slow
def test_report_from_mlflow(logged: LoggedStudy) -> None:
    report = load_report(tracking_uri=logged.url, experiment="synthetic-study")
    assert report.source == "mlflow"
    assert report.parent_run_id == logged.parent.info.run_id
    assert report.recommendation["batch_size"] == logged.result.batch_size
    assert report.recommendation["best_trial"] == logged.result.best_trial
    assert [r["number"] for r in report.trials] == [0, 1, 2, 3]
    assert [r["state"] for r in report.trials] == ["complete", "complete", "pruned", "infeasible"]
    by_number = {r["number"]: r for r in report.trials}
    expected = logged.result.trials[1].summary()
    for key in ("batch_size", "iterations_per_epoch", "lr_rule", "seed", "samples_to_target"):
        assert by_number[1][key] == expected[key]
    for key in ("lr", "time_to_target", "best_val_loss", "train_seconds", "value"):
        assert by_number[1][key] == pytest.approx(expected[key])
    assert by_number[1]["mlflow_run_id"] == logged.children[1].info.run_id
    again = load_report(tracking_uri=logged.url, run_id=logged.parent.info.run_id)
    assert again.trials == report.trials
    # A trial's run leads to its study's report.
    from_trial = load_report(tracking_uri=logged.url, run_id=logged.children[2].info.run_id)
    assert from_trial.parent_run_id == logged.parent.info.run_id
    assert from_trial.trials == report.trials and from_trial.recommendation
    text = format_report(report)
    assert f"batch size {logged.result.batch_size}" in text
    assert "time-to-target" in text and "lr x" in text
    rows = {line.split()[0]: line for line in text.splitlines()[4:8]}
    assert rows["1"].split()[1] == "best" and rows["0"].split()[1] == "missed"
    assert "pruned" in rows["2"] and "successive halving" in rows["2"]
    assert "infeasible" in rows["3"] and "out of memory at 2048" in rows["3"]


@pytest.mark.slow
def test_metrics_are_sent_in_few_batches(mlflow_server: str) -> None:
    tracker = MlflowTracker(mlflow_server)
    calls = []
    send = tracker._client.log_batch
    tracker._client.log_batch = lambda *a, **k: (
        calls.append(len(k.get("metrics", ()))) or send(*a, **k)
    )
    study = optuna.create_study()
    tracker.study_started(make_settings("many-evaluations"), None)
    trial = study.ask()
    record = TrialRecord(0, "running", 8, 0.01, 1.0, "sqrt", 200, 1.0, 0)
    tracker.trial_started(trial, record)
    calls.clear()
    points = [replace(make_curve(8, 1, 1.0)[0], samples=8 * i) for i in range(1, 401)]
    start = time.perf_counter()
    for point in points:
        tracker.evaluated(record, point)
    buffering = time.perf_counter() - start
    tracker.trial_finished(replace(record, state=COMPLETE, curve=tuple(points)))
    metric_batches = [n for n in calls if n]
    # The first evaluation goes out at once, the rest at the end of the trial (in chunks of
    # at most 800 metrics): a handful of requests for 400 evaluations.
    assert len(metric_batches) <= 6, metric_batches
    assert buffering < 2.0
    history = MlflowClient(mlflow_server).get_metric_history(
        tracker.run_ids[0], "curve/samples_per_second"
    )
    assert len(history) == 400


@pytest.mark.slow
def test_interrupted_study_marks_runs_killed(mlflow_server: str) -> None:
    tracker = MlflowTracker(mlflow_server, experiment="interrupted-studies")
    study = optuna.create_study()
    tracker.study_started(make_settings("interrupted"), make_probe())
    run_trial(tracker, study, PLAN[0])
    trial = study.ask()
    record = TrialRecord(trial.number, "running", 256, 0.01, 1.0, "sqrt", 7, 4.0, 0)
    tracker.trial_started(trial, record)
    for point in make_curve(256, 3, 1.0):
        tracker.evaluated(record, point)
    tracker.study_interrupted("interrupted by the user")
    client = MlflowClient(mlflow_server)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["interrupted"] == "interrupted by the user"
    assert client.get_run(tracker.run_ids[0]).info.status == "FINISHED"
    open_trial = client.get_run(tracker.run_ids[1])
    assert open_trial.info.status == "KILLED"
    assert len(client.get_metric_history(tracker.run_ids[1], "curve/val_loss")) == 3
    report = load_report(tracking_uri=mlflow_server, run_id=tracker.parent_run_id)
    assert report.recommendation == {}
    assert "without a recommendation" in report.warnings[-1]


# -- local store, unreachable server ---


@pytest.mark.slow
def test_default_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow_ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    tracker = MlflowTracker(uri)
    study, result = run_study(tracker, "local-study", plan=PLAN[:2])
    client = MlflowClient(uri)
    run = client.get_run(tracker.parent_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= ARTIFACTS
    assert is_png(client.download_artifacts(run.info.run_id, "learning_curves.png", str(tmp_path)))
    report = load_report(study_name="local-study")  # default URI, experiment = study name
    assert len(report.trials) == 2
    assert report.recommendation["batch_size"] == result.batch_size


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    url = f"http://admin:secret@127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(InvalidInputError) as error:
        MlflowTracker(url)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert f"http://admin:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "secret" not in message
    assert "--no-mlflow" in message
    assert "\n" not in message


def test_bad_tracking_uri_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        MlflowTracker(f"sqlite:///{tmp_path}/missing/folder/mlflow.db")
    with pytest.raises(InvalidInputError, match="tracking_uri"):
        MlflowTracker("")


def test_redact_url() -> None:
    assert redact_url("postgresql://optuna:s3cret@db:5432/x") == "postgresql://optuna:***@db:5432/x"
    assert redact_url("mysql+pymysql://u:p@ss/w@host/db") == "mysql+pymysql://u:***@host/db"
    assert (
        redact_url("https://user:tok@mlflow.example.com") == "https://user:***@mlflow.example.com"
    )
    assert redact_url("sqlite:////tmp/a:b/mlflow.db") == "sqlite:////tmp/a:b/mlflow.db"
    assert redact_url("http://host:5000/") == "http://host:5000/"
    assert redact_url("https://user@host/x") == "https://user@host/x"
    assert redact_url("postgresql://h/db?password=pw&sslmode=x") == (
        "postgresql://h/db?password=***&sslmode=x"
    )
    assert redact_url("from a:b to redis://:pw@cache:6379") == "from a:b to redis://:***@cache:6379"


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mlflow_ui_command("http://u:p@h:5000") == "open http://u:***@h:5000 in a browser"


# -- Optuna storage report ---


def test_report_from_optuna_storage(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="offline", storage=storage)
    study.set_user_attr("autobatch_settings", make_settings("offline").to_dict())
    records = []
    for number, plan in enumerate(PLAN):
        size, state, points, speed = plan
        trial = study.ask()
        record = TrialRecord(
            trial.number, state, size, 0.01, 1.0, "sqrt", math.ceil(TRAIN_SIZE / size), 4.0, 0,
            curve=make_curve(size, points, speed),
            best_val_loss=min(p.val_loss_smoothed for p in make_curve(size, points, speed))
            if points else None,
            role="baseline" if number == 0 else None,
        )  # fmt: skip
        trial.set_user_attr("autobatch_record", record.to_dict())
        if state == COMPLETE:
            study.tell(trial, 1.0)
        else:
            study.tell(trial, state=TrialState.FAIL)
        records.append(record)
    # Recomputed from the records: the baseline (32) fixes the target, 256 reaches it first.
    result = recommend(study)
    recommendation = result.recommendation()
    assert recommendation["batch_size"] == 256 and recommendation["best_trial"] == 1

    report = load_report(storage=storage)  # the only study in the storage
    assert report.source == "optuna"
    assert report.study_name == "offline"
    assert report.recommendation == recommendation
    assert report.trials == tuple(r.summary() for r in result.trials)
    text = format_report(report)
    assert f"Recommendation: batch size 256, {result.epochs} epochs" in text
    # header, blank, columns, rule, a row per trial, blank, recommendation, one warning
    assert len(text.splitlines()) == 4 + len(records) + 2 + len(result.warnings)
    with pytest.raises(InvalidInputError, match="no study 'other'"):
        load_report(storage=storage, study_name="other")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_report(storage=f"sqlite:///{tmp_path / 'missing.db'}")
    # MLflow has nothing (no store in tmp_path): the Optuna storage answers instead.
    fallback = load_report(
        tracking_uri=f"sqlite:///{tmp_path / 'no-mlflow.db'}", storage=storage, study_name="offline"
    )
    assert fallback.source == "optuna"


# -- plots on their own ---


def test_plots_render_without_a_display(tmp_path: Path) -> None:
    records = []
    for number, (size, state, points, speed) in enumerate(PLAN):
        records.append(
            TrialRecord(
                number, state, size, 0.01, 1.0, "sqrt", 1, 4.0, 0,
                curve=make_curve(size, points, speed),
                best_val_loss=0.3 if points else None,
                time_to_target=1.0 if state == COMPLETE else None,
                train_seconds=2.0 if points else 0.0,
            )
        )  # fmt: skip
    figures = {
        "probe": plots.probe_memory_figure(make_probe()),
        "probe-no-model": plots.probe_memory_figure(replace(make_probe(), memory_model=None)),
        "curves": plots.learning_curves_figure(records, target=0.32, best_trial=1),
        "curves-empty": plots.learning_curves_figure([]),
        "tradeoff": plots.batch_size_tradeoff_figure(records, best_trial=1, target=0.32),
        "tradeoff-one": plots.batch_size_tradeoff_figure(records[:1]),
    }
    for name, figure in figures.items():
        assert figure.axes[0].get_title() or name.endswith("empty")
        path = plots.save_png(figure, tmp_path / f"{name}.png")
        assert is_png(path)
    curves_axes = figures["curves"].axes[0]
    assert "seconds" in curves_axes.get_xlabel()
    assert figures["tradeoff"].axes[1].get_xscale() == "log"


# -- the server dies mid-study (kills the shared server: keep this test last) ---


@pytest.mark.slow
def test_server_killed_mid_study_warns_once_and_goes_on(
    mlflow_server_process: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = mlflow_server_process.ensure_running()
    tracker = MlflowTracker(url)
    study = optuna.create_study()
    tracker.study_started(make_settings("doomed"), make_probe())
    trial = study.ask()
    record = TrialRecord(trial.number, "running", 256, 0.01, 1.0, "sqrt", 7, 4.0, 0)
    tracker.trial_started(trial, record)
    mlflow_server_process.kill()
    caplog.set_level(logging.WARNING, logger="autobatch.tracking")
    curve = make_curve(256, 6, 1.0)
    start = time.perf_counter()
    tracker.evaluated(record, curve[0])  # the first evaluation is sent at once, and fails
    handed_over = time.perf_counter() - start
    failed_after = time.perf_counter() - start
    assert tracker.stopped
    start = time.perf_counter()
    for point in curve[1:]:
        tracker.evaluated(record, point)
    tracker.trial_finished(replace(record, state=COMPLETE, curve=curve))
    next_trial = study.ask()
    tracker.trial_started(next_trial, replace(record, number=next_trial.number))
    tracker.study_finished(
        TuneResult(256, 3, 0.01, 1.0, 0, TARGET, None, (record,), make_settings("doomed"))
    )
    tracker.study_interrupted("interrupted by the user")
    later = time.perf_counter() - start
    warnings = [r for r in caplog.records if r.name.startswith("autobatch.tracking")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "training metrics" in message and url in message
    assert handed_over < 0.05  # the training thread never waits for the dead server
    assert failed_after < 10  # one quick retry, no exponential backoff
    assert later < 0.1
    assert "mlflow_run_id" not in next_trial.user_attrs
