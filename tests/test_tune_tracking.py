"""``tune`` logging to MLflow through its logging process, checked through MLflow's own client.

Against a real ``mlflow server`` over HTTP (tests/mlflow_server.py) and a local SQLite store:
what lands in MLflow, what the Optuna trials link to, and what happens when the server or the
training process dies.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from autobatch import InvalidInputError, tune
from autobatch.examples import digits
from autobatch.records import COMPLETE
from autobatch.tracking.uri import check_store

try:  # tests/ on sys.path (pytest's default rootdir import mode)
    from mlflow_server import (  # noqa: F401  (fixtures are found by name)
        MlflowServer,
        free_port,
        mlflow_server_fixture,
        mlflow_server_process_fixture,
    )
except ImportError:  # pragma: no cover
    from tests.mlflow_server import (  # noqa: F401
        MlflowServer,
        free_port,
        mlflow_server_fixture,
        mlflow_server_process_fixture,
    )

FAST = dict(max_epochs=2, candidates=[16, 32, 64, 128], n_trials=4, progress=False)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task():
    return digits()


def _runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["trial_number"]): r for r in runs if r not in parents}
    return parents, children


@pytest.mark.slow
def test_tune_against_a_real_server(task, mlflow_server: str, tmp_path: Path, capfd) -> None:
    result = tune(task, tracking_uri=mlflow_server, experiment="tune-over-http", **FAST)
    printed = "".join(capfd.readouterr())
    assert "View run" not in printed  # MLflow's own links, two per trial: not on the terminal
    client = MlflowClient(mlflow_server)
    parents, children = _runs(client, "tune-over-http")

    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == result.mlflow_run_id
    assert parent.info.status == "FINISHED"
    assert sorted(children) == [t.number for t in result.trials]
    for number, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        record = next(t for t in result.trials if t.number == number)
        assert record.mlflow_run_id == child.info.run_id  # linked both ways
        assert child.data.tags["state"] == record.state
        history = client.get_metric_history(child.info.run_id, "curve/val_loss")
        assert [m.step for m in history] == [p.samples for p in record.curve]
        assert [m.value for m in history] == pytest.approx([p.val_loss for p in record.curve])
    trials = {t.number: t for t in result.study.get_trials()}
    assert {n: trials[n].user_attrs["mlflow_run_id"] for n in children} == {
        n: c.info.run_id for n, c in children.items()
    }

    assert parent.data.tags["recommended_batch_size"] == str(result.batch_size)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    charts = {"probe_memory.png"} if result.probe else set()
    charts |= {"learning_curves.png", "batch_size_tradeoff.png"}
    assert artifacts >= charts | {"trials.csv", "recommendation.json"}
    for name in charts:
        path = client.download_artifacts(parent.info.run_id, name, str(tmp_path))
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE


def test_unreachable_server_fails_before_any_trial(task) -> None:
    started = []

    class Count:
        def __getattr__(self, name):
            return lambda *args: started.append(name) if name == "trial_started" else None

    url = f"http://admin:secret@127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match="--no-mlflow") as error:
        tune(task, tracking_uri=url, observers=[Count()], **FAST)
    assert time.perf_counter() - start < 5
    assert "secret" not in str(error.value) and "127.0.0.1" in str(error.value)
    assert started == []


@pytest.mark.slow
def test_store_only_mlflow_can_check_is_checked_before_any_trial(task) -> None:
    # No quick check for PostgreSQL: the tuner waits for the logging process to open it.
    url = "postgresql://optuna:secret@127.0.0.1:1/mlflow"
    with pytest.raises(InvalidInputError, match="--no-mlflow") as error:
        tune(task, tracking_uri=url, **FAST)
    message = str(error.value)  # the driver missing or the server refusing: both name the store
    assert "postgresql://optuna:***@127.0.0.1:1/mlflow" in message
    assert "secret" not in message and "\n" not in message


@pytest.mark.slow
def test_a_refused_folder_store_leaves_no_study_behind(task, tmp_path: Path) -> None:
    """MLflow 3 refuses its folder store when the logging process opens it: one line with the
    fix, and the study storage holds nothing a rerun would wait for."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    folder = f"file://{tmp_path / 'mlruns'}"
    with pytest.raises(InvalidInputError, match="MLFLOW_ALLOW_FILE_STORE=true") as error:
        tune(task, storage=storage, tracking_uri=folder, **FAST)
    assert "\n" not in str(error.value)
    assert optuna.get_all_study_names(storage) == []
    assert len(tune(task, storage=storage, mlflow=False, **FAST).trials) == 4


@pytest.mark.slow
def test_a_store_mlflow_cannot_open_stops_tune_before_any_trial(task, tmp_path: Path) -> None:
    """A SQLite file passes the quick check whatever its tables hold: the tuner still waits
    for MLflow to open it, and a new study file the refusal leaves empty is taken away."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:  # tables from an MLflow this one does not know
        db.execute("create table alembic_version (version_num varchar(32) not null)")
        db.execute("insert into alembic_version values ('0a0b0c0d0e0f')")
    study_file = tmp_path / "study.db"
    started = []

    class Count:
        def __getattr__(self, name):
            return lambda *args: started.append(name) if name == "trial_started" else None

    uri = f"sqlite:///{store}"
    with pytest.raises(InvalidInputError, match="--no-mlflow") as error:
        tune(task, storage=f"sqlite:///{study_file}", tracking_uri=uri, observers=[Count()], **FAST)
    assert "0a0b0c0d0e0f" in str(error.value) and "\n" not in str(error.value)
    assert started == [] and not study_file.exists()


@pytest.mark.slow
def test_a_tracker_closed_while_its_store_is_created_lets_the_creation_finish(
    tmp_path: Path,
) -> None:
    """A tune refused during its probe closes the logging process while it may be creating a
    new store's tables: cut short, that leaves the store half-created for good."""
    from autobatch.tracking import BackgroundTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = BackgroundTracker(uri, wait=False)
    process = tracker._child.process
    tracker.close()
    assert process.wait(timeout=120) == 0
    assert MlflowClient(uri).search_experiments()  # the whole store, its default experiment


@pytest.mark.slow
def test_a_study_with_no_completed_trial_ends_its_run_failed_saying_why(
    task, tmp_path, capsys
) -> None:
    import dataclasses

    import torch.nn.functional as F

    from autobatch import AutobatchError
    from autobatch.cli import main

    def nan_loss(outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")

    broken = dataclasses.replace(task, loss=nan_loss)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(AutobatchError, match="no trial completed") as error:
        tune(broken, tracking_uri=uri, lr_range_test=False, **{**FAST, "n_trials": 2})
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(f"autobatch-{task.name}").experiment_id]
    )
    study = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert study.info.status == "FAILED"
    assert study.data.tags["failed"] == str(error.value)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert main(["report", "--tracking-uri", uri, "--run-id", study.info.run_id]) == 0
    assert "Warning: no trial completed" in capsys.readouterr().out


@pytest.mark.slow
def test_rerunning_a_complete_study_whose_run_was_killed_logs_its_recommendation(
    task, tmp_path
) -> None:
    """Stopped as its last trial was recorded, a study is complete in the storage while its
    MLflow run ended KILLED without the recommendation; the same command again logs it."""
    from autobatch.tracking.report import recommendation_tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=uri, **FAST)
    first = tune(task, **kwargs)
    client = MlflowClient(uri)
    parent = first.mlflow_run_id
    for key in ("batch_size", "epochs", "lr"):
        client.delete_tag(parent, recommendation_tag(key))
    client.set_terminated(parent, "KILLED")

    again = tune(task, **kwargs)
    run = client.get_run(parent)
    assert again.mlflow_run_id == parent and run.info.status == "FINISHED"
    assert run.data.tags[recommendation_tag("batch_size")] == str(first.batch_size)
    once_more = tune(task, **kwargs)  # a finished run is left as it is
    assert once_more.mlflow_run_id == parent
    assert client.get_run(parent).info.end_time == run.info.end_time


@pytest.mark.slow
def test_a_process_whose_study_another_completes_leaves_its_run_to_that_worker(
    task, tmp_path
) -> None:
    """A `tune` that joined a study (reopening its MLflow run) and stops because another
    worker completed the study leaves the run to that worker: marked interrupted on its way
    out, the run was KILLED while that worker was still logging the recommendation."""
    from autobatch.tracking import BackgroundTracker
    from autobatch.tuning.worker import Worker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tune(task, storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=uri, **FAST)
    client = MlflowClient(uri)
    parent = first.mlflow_run_id
    client.update_run(parent, status="RUNNING")  # its finisher still logging the end
    tracker = BackgroundTracker(uri)
    assert tracker.open_study_run(first.settings, None, parent) == parent
    outcome = Worker(task, first.study, observers=[tracker]).run()
    tracker.close()
    assert outcome.complete and outcome.result is None  # the end is the other worker's
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and "interrupted" not in run.data.tags


@pytest.mark.slow
def test_a_rerun_repairs_what_an_mlflow_outage_left(task, tmp_path, monkeypatch, caplog) -> None:
    """A tracking server down as the study ended leaves its run RUNNING without the answer, a
    trial's run RUNNING and another trial never logged. Once the study's last trial is long
    past, the same command logs the end: the missing trial from its stored record, the one
    left running ended as its record says, stale tags gone; a run someone deleted stays so."""
    from autobatch.tracking.report import recommendation_tag
    from autobatch.tuning import prepare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=uri, **FAST)
    first = tune(task, **kwargs)
    client = MlflowClient(uri)
    parent = first.mlflow_run_id

    def children() -> dict[int, object]:
        experiment = client.get_run(parent).info.experiment_id
        found = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
        return {int(r.data.tags["trial_number"]): r for r in found}

    before = children()
    assert sorted(before) == [0, 1, 2, 3]
    client.update_run(parent, status="RUNNING")
    client.delete_tag(parent, recommendation_tag("batch_size"))
    client.set_tag(parent, "interrupted", "the tuning process stopped logging")
    client.update_run(before[1].info.run_id, status="RUNNING")
    client.set_tag(before[2].info.run_id, "mlflow.parentRunId", "another-store")  # never logged
    client.delete_run(before[3].info.run_id)  # a reviewer's choice

    # Right after the study's end a worker may still be logging it: left alone, and said.
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        tune(task, **kwargs)
    assert "its MLflow run is still RUNNING" in caplog.text
    assert "run the same command again in" in caplog.text
    assert client.get_run(parent).info.status == "RUNNING"
    monkeypatch.setattr(prepare, "LOGGING_GRACE", 0.0)
    again = tune(task, **kwargs)
    run = client.get_run(parent)
    assert again.mlflow_run_id == parent and run.info.status == "FINISHED"
    assert run.data.tags[recommendation_tag("batch_size")] == str(first.batch_size)
    assert "interrupted" not in run.data.tags
    after = children()
    assert sorted(after) == [0, 1, 2]  # the deleted run is not logged again
    assert all(r.info.status != "RUNNING" for r in after.values())
    record = next(t for t in first.trials if t.number == 2)
    logged = after[2]
    assert logged.info.run_id != before[2].info.run_id
    history = client.get_metric_history(logged.info.run_id, "curve/val_loss")
    assert [m.value for m in history] == [p.val_loss for p in record.curve]
    assert logged.data.params["batch_size"] == str(record.batch_size)


@pytest.mark.slow
def test_a_study_keeps_its_experiment_and_says_another_given_is_ignored(
    task, tmp_path, caplog
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=uri, **FAST)
    first = tune(task, experiment="first", **kwargs)
    caplog.set_level(logging.WARNING)
    again = tune(task, experiment="second", **{**kwargs, "n_trials": 5})
    assert again.mlflow_run_id == first.mlflow_run_id and len(again.trials) == 5
    assert "experiment 'second' ignored" in caplog.text and "in experiment 'first'" in caplog.text
    assert MlflowClient(uri).get_experiment_by_name("second") is None


def test_quick_check_accepts_any_answer_and_ignores_credentials(mlflow_server: str) -> None:
    with_credentials = mlflow_server.replace("http://", "http://user:pass@")
    assert check_store(with_credentials) is True
    assert check_store(f"{mlflow_server}/some/prefix") is True  # answered (404): reachable
    # A database server gets one connection attempt (MLflow would retry for ~100 s).
    with pytest.raises(InvalidInputError, match="--no-mlflow") as error:
        check_store("postgresql://u:hunter2@db.invalid/mlflow")
    assert "hunter2" not in str(error.value)


@pytest.mark.slow
def test_killed_training_process_leaves_runs_killed(tmp_path: Path) -> None:
    """SIGKILL the tuning process mid-trial: its logging process still ends the runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "doomed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            from autobatch import tune
            from autobatch.examples import digits

            class KillAt:
                def __getattr__(self, name):
                    return lambda *args: None

                def evaluated(self, record, point):
                    if record.number == 1:
                        os.kill(os.getpid(), signal.SIGKILL)

            tune(digits(), tracking_uri={uri!r}, observers=[KillAt()], max_epochs=2,
                 candidates=[16, 32, 64], n_trials=3, progress=False)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while True:  # the logging process finishes on its own after its parent died
        parents, children = _runs(client, "autobatch-digits")
        statuses = [r.info.status for r in [*parents, *children.values()]]
        if "RUNNING" not in statuses or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert children[0].info.status == "FINISHED"
    assert children[1].info.status == "KILLED"
    assert parents[0].info.status == "KILLED"
    assert "ended before the study did" in parents[0].data.tags["interrupted"]


@pytest.mark.slow
def test_logging_process_dying_mid_study_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import optuna

    from autobatch.records import EvalPoint, StudySettings, TrialRecord
    from autobatch.tracking import BackgroundTracker

    settings = StudySettings(
        "dies", "in-memory", "time", "sqrt", (0.25, 4.0), (32,), 2.0, 3, None, 0,
        "TPESampler", "none", 0.05, None, "t", "cpu", "fp32", 0.01, 32, 100,
    )  # fmt: skip
    tracker = BackgroundTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.study_started(settings, None)
    study = optuna.create_study()
    caplog.set_level(logging.WARNING, logger="autobatch.tracking")
    for number in range(3):
        trial = study.ask()
        record = TrialRecord(trial.number, "running", 32, 0.01, 1.0, "sqrt", 4, 2.0, 0)
        tracker.trial_started(trial, record)
        if number == 1:
            tracker._child.process.kill()
            tracker._child.process.wait()
        for i in range(3):
            point = EvalPoint(32 * i, 0.1 * i, 0.5, 1.0, 1.0, 1.0, None, 1e3, None, 0)
            tracker.evaluated(record, point)
        start = time.perf_counter()
        tracker.trial_finished(record)
        assert time.perf_counter() - start < 5  # no waiting for a process that is gone
        study.tell(trial, 1.0)
    tracker.study_interrupted("over")
    assert tracker.stopped
    assert study.trials[0].user_attrs.get("mlflow_run_id")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("autobatch.tracking")]
    assert len(warnings) == 1 and "ended unexpectedly" in warnings[0], warnings


# -- kills the shared server: keep last ---


@pytest.mark.slow
def test_server_killed_mid_tune_warns_once_and_the_study_completes(
    task, mlflow_server_process: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = mlflow_server_process.ensure_running()

    class KillServerAt:
        def __getattr__(self, name):
            return lambda *args: None

        def evaluated(self, record, point):
            if record.number == 1 and mlflow_server_process.running():
                mlflow_server_process.kill()

    caplog.set_level(logging.WARNING, logger="autobatch.tracking")
    result = tune(
        task, tracking_uri=url, experiment="doomed-tune", observers=[KillServerAt()], **FAST
    )
    assert len(result.trials) == FAST["n_trials"]
    assert all(t.state != "failed" for t in result.trials)
    assert any(t.state == COMPLETE for t in result.trials)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("autobatch.tracking")]
    assert len(warnings) == 1, warnings
    assert url in warnings[0] and "not logged" in warnings[0]
    assert result.study.get_trials()[0].user_attrs.get("mlflow_run_id")


@pytest.mark.slow
def test_a_report_from_mlflow_is_the_named_study_s_with_all_it_recommends(task, tmp_path):
    """Two studies in one experiment: --study-name picks its own (the latest study run was
    reported whatever the name); AdamW's scaled beta2 and weight decay are in it, as in the
    Optuna report."""
    from autobatch.tracking.report import load_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quick = dict(FAST, n_trials=1, tracking_uri=uri, experiment="shared")
    scaled = tune(task, study_name="sA", scale_adamw=True, **quick)
    tune(task, study_name="sB", **quick)
    report = load_report(tracking_uri=uri, experiment="shared", study_name="sA")
    assert report.study_name == "sA" and report.parent_run_id == scaled.mlflow_run_id
    assert report.recommendation["beta2"] == pytest.approx(scaled.recommendation()["beta2"])
    assert "weight_decay" in report.recommendation
    with pytest.raises(InvalidInputError, match="has no run of study 'sC'"):
        load_report(tracking_uri=uri, experiment="shared", study_name="sC")
