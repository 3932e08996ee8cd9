"""`autobatch tune` and `autobatch report` end to end, in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from autobatch.cli import main

QUICK = ["--n-trials", "3", "--max-epochs", "1", "--batch-sizes", "16,32,64"]


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # autobatch.db and mlflow.db land in the test's folder


@pytest.mark.slow
def test_tune_prints_table_and_recommendation_and_report_rebuilds_it(capsys, tmp_path):
    assert main(["tune", "digits", *QUICK]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(("Recommendation:", "Warning:"))
    recommendation = next(line for line in out if line.startswith("Recommendation:"))
    assert "batch size" in recommendation and "epochs" in recommendation
    ui = next(line for line in out if line.startswith("MLflow:"))
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in ui
    assert "http://127.0.0.1:5000/#/experiments/" in ui  # the study run's page
    assert (tmp_path / "autobatch.db").exists() and (tmp_path / "mlflow.db").exists()
    study = next(line for line in out if line.startswith("Study:"))
    assert f"sqlite:///{tmp_path}/autobatch.db" in study  # where it is, from anywhere
    rates = next(line for line in out if line.startswith("Learning rates:"))
    assert "range test at batch size 32" in rates and "suggesting x6.14" in rates
    assert rates.endswith("(unused: within the multiplier range's reach)")  # 6.14 < 8
    clock = next(line for line in out if line.startswith("Clock:"))
    assert "timed before trial 0" in clock and all(f" {b}: " in clock for b in (16, 32, 64))
    why = next(i for i, line in enumerate(out) if line.startswith("Why batch size"))
    table = [line for line in out[:why] if line.strip()[:1].isdigit()]
    assert len(table) == 3  # one row per trial
    chosen = [line for line in out[why:] if line.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].split()[0] in recommendation

    # the same study, read back from MLflow alone and from the Optuna storage alone
    assert main(["report", "--experiment", "autobatch-digits"]) == 0
    from_mlflow = capsys.readouterr().out
    assert recommendation in from_mlflow
    assert (
        main(["report", "--storage", "sqlite:///autobatch.db", "--study-name", "autobatch-digits"])
        == 0
    )
    assert recommendation in capsys.readouterr().out

    # running it again resumes the study: 3 more trials, 6 in all, in the same MLflow run
    assert main(["tune", "digits", *QUICK[:1], "6", *QUICK[2:], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["trials"]) == 6

    # the same command once more adds nothing, opens no run, and says how to add trials
    assert main(["tune", "digits", *QUICK[:1], "6", *QUICK[2:]]) == 0
    out = capsys.readouterr().out
    assert "already has 6 finished trials" in out and "--n-trials" in out
    # a worker joining the finished study adds nothing either, and names the command that can
    assert main(["worker", "digits", "--storage", "sqlite:///autobatch.db", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "run autobatch tune (same TARGET, --storage, --study-name) with a larger" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("autobatch-digits")
    runs = client.search_runs([experiment.experiment_id])
    studies = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    assert len(runs) == 1 + 6


@pytest.mark.slow
def test_a_study_its_timeout_stopped_says_the_same_command_goes_on(capsys):
    assert main(["tune", "digits", *QUICK, "--no-mlflow", "--timeout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "stopped short (--timeout, or an interruption): the same command goes on" in out
    assert "larger --n-trials" not in out


@pytest.mark.slow
def test_tune_without_mlflow_writes_no_mlflow_store(capsys, tmp_path):
    assert (
        main(["tune", "digits", *QUICK, "--no-mlflow", "--storage", f"sqlite:///{tmp_path}/s.db"])
        == 0
    )
    out = capsys.readouterr().out
    assert "MLflow:" not in out and not (tmp_path / "mlflow.db").exists()
    # A new study of the same task on this machine runs on the step times timed for the first,
    # and --no-cache times them again.
    for flags, how in (([], "from the cache"), (["--no-cache"], "timed before trial 0")):
        new = ["--study-name", f"again{len(flags)}", "--no-mlflow", *flags]
        assert main(["tune", "digits", *QUICK, *new]) == 0
        clock = next(line for line in capsys.readouterr().out.splitlines() if "Clock:" in line)
        assert how in clock


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "fastest"], "invalid choice"),
        (["--target-loss", "low"], "invalid float"),
        (["--batch-sizes", "a,b"], "batch sizes"),
        (["--storage", "postgresql://u:hunter2@127.0.0.1:1/db"], "cannot open the study storage"),
        (["--tracking-uri", "http://127.0.0.1:1"], "127.0.0.1:1"),
        (["--n-trials", "0"], "n_trials"),
        (["--lr-multiplier-range", "0.5"], "0.25,4"),
        (["--lr-multiplier-range", "2,4"], "lr_multiplier_range"),
        (["--tolerance", "2"], "tolerance=2"),
    ],
)
def test_tune_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main(["tune", "digits", *QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert "Traceback" not in err and "hunter2" not in err


@pytest.mark.slow
def test_report_reads_a_study_storage_marked_read_only_and_writes_nothing(capsys, tmp_path):
    # In a process of its own, whose end writes everything into the file itself.
    command = [sys.executable, "-m", "autobatch", "tune", "digits", *QUICK, "--no-mlflow", "--json"]
    out = subprocess.run(command, capture_output=True, check=True).stdout
    answer = json.loads(out)["batch_size"]
    database = tmp_path / "autobatch.db"
    before = database.read_bytes()
    database.chmod(0o444)
    try:
        assert main(["report", "--storage", "sqlite:///autobatch.db"]) == 0
        assert f"Recommendation: batch size {answer}," in capsys.readouterr().out
        assert database.read_bytes() == before
        assert not list(tmp_path.glob("autobatch.db-*"))  # no journal, log or index
    finally:
        database.chmod(0o644)


def test_report_needs_a_study(capsys):
    assert main(["report"]) == 2
    assert "--run-id" in capsys.readouterr().err


def test_report_on_a_missing_sqlite_file_says_so_and_creates_nothing(capsys, tmp_path):
    missing = tmp_path / "typo.db"
    assert main(["report", "--storage", f"sqlite:///{missing}", "--study-name", "s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert not missing.exists()


@pytest.mark.slow
def test_tune_takes_the_multiplier_range_and_the_tolerance(capsys, tmp_path):
    # narrower than 4x: pinned, so no range test moves it and no trial walks past it
    options = ["--lr-multiplier-range", "0.8,1.25", "--tolerance", "0.05", "--no-mlflow"]
    assert main(["tune", "digits", *QUICK, *options, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["lr_multiplier_range"] == [0.8, 1.25]
    assert result["settings"]["tolerance"] == 0.05
    assert result["settings"]["lr_range_test"] is None
    multipliers = [t["lr_multiplier"] for t in result["trials"]]
    assert all(0.8 <= m <= 1.25 for m in multipliers), multipliers
    assert result["target_loss"] is not None
