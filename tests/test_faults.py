"""Stores that cannot work are named in one line before any trial; damaged ones after, in one
line too; two first runs in a new folder at once break nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autobatch.cli import main

QUICK = ["--n-trials", "2", "--max-epochs", "1", "--batch-sizes", "32,64"]


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("autobatch: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("store", ["autobatch.db", "mlflow.db"])
def test_a_file_that_is_not_a_database_is_named_before_any_trial(capsys, tmp_path, store):
    (tmp_path / store).write_bytes(b"not a database at all")
    start = time.perf_counter()
    assert main(["tune", "digits", *QUICK]) == 2
    line = one_line_error(capsys)
    assert f"{tmp_path / store} is not a SQLite database" in line and "move it away" in line
    assert time.perf_counter() - start < 30  # no retries, no trial
    assert (tmp_path / store).read_bytes() == b"not a database at all"  # left as it was


def test_one_store_given_as_the_other_is_one_line_and_left_untouched(capsys, tmp_path):
    import sqlite3

    import optuna
    from mlflow import MlflowClient

    optuna.create_study(study_name="s", storage="sqlite:///study.db")
    MlflowClient("sqlite:///mlflow.db").search_experiments()

    def tables(name: str) -> set[str]:
        with sqlite3.connect(tmp_path / name) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master")}

    before = tables("mlflow.db"), tables("study.db")
    assert main(["tune", "digits", *QUICK, "--storage", "sqlite:///mlflow.db", "--no-mlflow"]) == 2
    assert f"the study storage {tmp_path / 'mlflow.db'} is an MLflow store" in one_line_error(
        capsys
    )
    assert main(["report", "--storage", "sqlite:///mlflow.db"]) == 2
    assert "is an MLflow store" in one_line_error(capsys)
    assert main(["report", "--tracking-uri", "sqlite:///study.db", "--experiment", "s"]) == 2
    assert "is a study storage" in one_line_error(capsys)
    assert (tables("mlflow.db"), tables("study.db")) == before
    same = ["--storage", "sqlite:///same.db", "--tracking-uri", "sqlite:///same.db"]
    assert main(["tune", "digits", *QUICK, *same]) == 2
    assert "name the same file" in one_line_error(capsys)
    assert not (tmp_path / "same.db").exists()


def test_a_missing_folder_is_named(capsys, tmp_path):
    assert main(["tune", "digits", *QUICK, "--storage", "sqlite:///nowhere/study.db"]) == 2
    line = one_line_error(capsys)
    assert "folder" in line and "does not exist" in line
    assert main(["tune", "digits", *QUICK, "--tracking-uri", "sqlite:///nowhere/m.db"]) == 2
    assert "does not exist" in one_line_error(capsys)


@pytest.mark.slow
def test_a_damaged_study_storage_is_one_line_exit_1(capsys, tmp_path):
    # In a process of its own, whose end writes everything into the file itself.
    first = [sys.executable, "-m", "autobatch", "tune", "digits", *QUICK, "--no-mlflow"]
    assert subprocess.run(first, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    database = tmp_path / "autobatch.db"
    assert not Path(f"{database}-wal").exists()
    size = database.stat().st_size
    with database.open("r+b") as handle:  # torn writes: half of the pages are garbage
        handle.seek(size // 4)
        handle.write(os.urandom(size // 2))
    assert main(["tune", "digits", *QUICK[:1], "3", *QUICK[2:], "--no-mlflow"]) == 1
    line = one_line_error(capsys)
    assert "study storage failed" in line and "restore it" in line
    # Damaged where opening it reads: the same one line, exit 1, not a wrong URL's advice.
    with database.open("r+b") as handle:
        handle.truncate(size // 2)
    url = f"sqlite:///{database}"
    for command in (["tune", "digits", *QUICK, "--no-mlflow"], ["report", "--storage", url]):
        assert main(command) == 1
        line = one_line_error(capsys)
        assert "damaged" in line and "restore it from a copy" in line and "server" not in line


@pytest.mark.slow
def test_two_first_runs_in_a_new_folder_at_once_share_the_stores(tmp_path):
    """Both create autobatch.db and mlflow.db at the same moment: both finish, the study has
    its trials, and MLflow still answers afterwards."""
    command = [sys.executable, "-m", "autobatch", "tune", "digits", *QUICK, "--json"]
    both = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in both]
    for process, (_, err) in zip(both, outputs, strict=True):
        assert process.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0]["batch_size"] == results[1]["batch_size"]
    report = subprocess.run(
        [sys.executable, "-m", "autobatch", "report", "--experiment", "autobatch-digits", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert len(json.loads(report.stdout)["trials"]) == 2
    assert Path(tmp_path / "mlflow.db").stat().st_size > 0
