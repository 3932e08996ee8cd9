"""Many workers on one study, as on a cluster: real PostgreSQL storage, a real MLflow server on
PostgreSQL, real worker processes, one of them SIGKILLed mid-trial.

Each test runs the ``autobatch`` command in subprocesses and checks the study through Optuna
and MLflow's own clients.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from autobatch import InvalidInputError, join_study, tune
from autobatch.examples import digits
from autobatch.records import BASELINE, BEYOND, CARRIED, NEIGHBOUR, STEERED
from autobatch.tuning import recommend
from autobatch.tuning.storage import (
    HOST,
    RECORD,
    ROLE,
    RUN_ID,
    WORKER,
    StaleTrials,
    connection_lost,
    counts,
    heartbeat_of,
    open_storage,
    use_heartbeat,
)
from autobatch.tuning.worker import LOST_REASON

try:  # tests/ on sys.path (pytest's default rootdir import mode)
    from mlflow_server import MlflowServer
    from postgres import postgres_fixture  # noqa: F401  (found by name)
except ImportError:  # pragma: no cover
    from tests.mlflow_server import MlflowServer
    from tests.postgres import postgres_fixture  # noqa: F401

STUDY = "autobatch-digits"
QUICK = ["--max-epochs", "2", "--batch-sizes", "16,32,64,128"]

pytestmark = pytest.mark.slow


def _autobatch(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autobatch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _trials(storage: str, name: str = STUDY) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state.is_finished() and counts(t)]


def _runs(client: MlflowClient, experiment: str = STUDY):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["trial_number"]): r for r in runs if r not in parents}
    return parents, children


def _slow_target(folder: Path) -> str:
    """A TARGET whose trials take a few seconds: digits with a short sleep in every step."""
    (folder / "slow_digits.py").write_text(
        textwrap.dedent(
            """
            import dataclasses, time
            import torch
            from autobatch.examples import digits

            def step(model, batch):
                time.sleep(0.004)
                inputs, targets = batch
                return torch.nn.functional.cross_entropy(model(inputs), targets)

            def task():
                return dataclasses.replace(digits(), step=step, name="slow-digits")
            """
        )
    )
    return "slow_digits.py:task"


def test_workers_share_one_study_and_one_mlflow_run(postgres, tmp_path: Path) -> None:
    """The issue's check: --workers on PostgreSQL ends with exactly n_trials finished, none
    RUNNING, each seeded trial run once, and one MLflow run with a child per trial."""
    storage = postgres()
    server = MlflowServer(tmp_path / "mlflow", backend_store_uri=postgres())
    url = server.start()
    try:
        done = _autobatch(
            "tune", "digits", "--workers", "3", "--n-trials", "8", "--storage", storage,
            "--tracking-uri", url, *QUICK, "--json", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        trials = _trials(storage)
        assert TrialState.RUNNING not in {t.state for t in trials}
        finished = _finished(trials)
        assert len(finished) == 8
        _assert_seeded_once(finished)
        workers = {t.user_attrs[RECORD]["worker"] for t in finished}
        assert len(workers) >= 2  # the trials were shared

        parents, children = _runs(MlflowClient(url))
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(children) == sorted(t.number for t in finished)
        assert "RUNNING" not in {c.info.status for c in children.values()}
        assert parents[0].data.tags["recommended_batch_size"]

        # The same recommendation, whoever reads it.
        printed = json.loads(done.stdout)
        here = recommend(storage, STUDY).recommendation()
        assert here == {key: printed[key] for key in here}
        report = _autobatch("report", "--storage", storage, "--study-name", STUDY, "--json",
                            cwd=tmp_path)  # fmt: skip
        assert report.returncode == 0, report.stderr[-2000:]
        assert json.loads(report.stdout)["recommendation"] == here
    finally:
        server.stop()


def test_a_killed_worker_s_trial_is_failed_and_run_again(postgres, tmp_path: Path) -> None:
    storage = postgres()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = _slow_target(tmp_path)
    study = "autobatch-slow-digits"
    tuning = subprocess.Popen(
        [
            sys.executable, "-m", "autobatch", "tune", target, "--workers", "2",
            "--n-trials", "6", "--storage", storage, "--tracking-uri", tracking,
            "--heartbeat-interval", "1", "--grace-period", "3", "--max-epochs", "3",
            "--batch-sizes", "16,32,64", "--json",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # A trial beside the baseline, once its MLflow run exists: kill its worker.
        victim = _wait_for_running(
            storage,
            study,
            tuning,
            lambda t: t.user_attrs.get(ROLE) != "baseline" and t.user_attrs.get(RUN_ID),
        )
        # Its machine dies: the worker and its MLflow logging process (a session of its own)
        # at once, so only another worker can end the trial's run.
        dying = int(victim.user_attrs[WORKER].rsplit(":", 1)[1])
        for pid in [*_children(dying), dying]:
            os.kill(pid, signal.SIGKILL)
        out, err = tuning.communicate(timeout=300)
    finally:
        if tuning.poll() is None:
            tuning.kill()
    assert tuning.returncode == 0, err[-3000:]
    assert "worker 0 exited with code -9" in out or "worker 1 exited with code -9" in out

    trials = _trials(storage, study)
    assert TrialState.RUNNING not in {t.state for t in trials}
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and RECORD not in killed.user_attrs
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(rerun) == 1 and rerun[0].state.is_finished()
    assert rerun[0].params == killed.params
    assert len(_finished(trials)) == 6

    # Its MLflow run was ended by the survivor, named and tagged for how it ended.
    client = MlflowClient(tracking)
    dead_run = client.get_run(killed.user_attrs[RUN_ID])
    deadline = time.monotonic() + 30
    while dead_run.info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        dead_run = client.get_run(killed.user_attrs[RUN_ID])
    assert dead_run.info.status == "KILLED"
    assert dead_run.data.tags["outcome"] == "abandoned"
    assert dead_run.info.run_name.endswith(" abandoned")
    parents, _ = _runs(client, study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().split()[3]) == pid:
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def _wait_for_running(storage: str, study: str, process: subprocess.Popen, wanted):
    """The first trial seen RUNNING in a worker for which ``wanted(trial)`` holds."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            for trial in _trials(storage, study):
                running = trial.state == TrialState.RUNNING and trial.user_attrs.get(WORKER)
                if running and wanted(trial):
                    return trial
        except KeyError:  # not created yet
            pass
        time.sleep(0.1)
    raise AssertionError("no trial ran")


def test_a_sigkilled_study_rerun_ends_with_no_trial_running(tmp_path: Path) -> None:
    """SIGKILL `autobatch tune` while a seeded trial runs, then run the same command again:
    the dead trial is failed and run again, seeded trials included."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = "autobatch-slow-digits"
    command = [
        sys.executable, "-m", "autobatch", "tune", _slow_target(tmp_path), "--n-trials", "4",
        "--storage", storage, "--no-mlflow", "--heartbeat-interval", "1", "--grace-period", "2",
        "--max-epochs", "3", "--batch-sizes", "16,32,64", "--json",
    ]  # fmt: skip
    doomed = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        victim = _wait_for_running(
            storage, study, doomed, lambda t: t.user_attrs.get(ROLE) == "ceiling"
        )
        doomed.kill()
        doomed.wait()
    finally:
        if doomed.poll() is None:
            doomed.kill()
    assert next(t for t in _trials(storage, study) if t.number == victim.number).state == (
        TrialState.RUNNING
    )  # left behind, as a killed process leaves it
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = _trials(storage, study)
    assert TrialState.RUNNING not in {t.state for t in trials}
    assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
    finished = _finished(trials)
    assert len(finished) == 4
    assert "ceiling" in {t.user_attrs.get(ROLE) for t in finished}  # the seed ran after all


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_tune_with_workers_stops_them_and_leaves_the_study_resumable(
    tmp_path: Path, stop: int
) -> None:
    """SIGTERM (a scheduler's stop, `timeout`) is taken as Ctrl-C, and passed on; a SIGKILLed
    parent's workers see it gone and stop themselves. Either way none trains on as an orphan,
    and each queues its trial again."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = "autobatch-slow-digits"
    command = [
        sys.executable, "-m", "autobatch", "tune", _slow_target(tmp_path), "--n-trials", "4",
        "--storage", storage, "--no-mlflow", "--workers", "2", "--max-epochs", "3",
        "--batch-sizes", "16,32,64",
    ]  # fmt: skip
    parent = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        running = _wait_for_running(storage, study, parent, lambda t: True)
        parent.send_signal(stop)
        assert parent.wait(timeout=60) == (130 if stop == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if parent.poll() is None:
            parent.kill()
    worker = int(running.user_attrs[WORKER].rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)
    trials = _trials(storage, study)
    assert TrialState.RUNNING not in {t.state for t in trials}  # queued again, not left behind
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(_finished(_trials(storage, study))) == 4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too: reaped by init once its parent is gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _assert_seeded_once(finished: list) -> None:
    """Each seed ran once, and the prior's predicted trial (queued by whichever worker ended
    the last seed, when it predicts a size no seed ran) at most once; a trial past the lr
    range's end, carried to the predicted fastest size or next to the fastest trial's (queued
    from the records) never twice at one configuration."""
    roles = sorted(t.user_attrs[ROLE] for t in finished if t.user_attrs.get(ROLE))
    assert [r for r in roles if r not in STEERED] == ["baseline", "ceiling", "middle"]
    assert roles.count("predicted") <= 1
    for role in (BEYOND, CARRIED, NEIGHBOUR):
        queued = [tuple(t.params.values()) for t in finished if t.user_attrs.get(ROLE) == role]
        assert len(queued) == len(set(queued))


def test_two_tunes_at_once_on_a_new_sqlite_study_run_n_trials_in_all(tmp_path: Path) -> None:
    """The first creates the file and the study, the second joins it: nothing breaks and the
    trials are shared, n_trials in all."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [
        sys.executable, "-m", "autobatch", "tune", "digits", "--n-trials", "6",
        "--storage", storage, "--no-mlflow", *QUICK, "--json",
    ]  # fmt: skip
    both = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in both]
    for process, (_, err) in zip(both, results, strict=True):
        assert process.returncode == 0, err.decode()[-3000:]
    trials = _trials(storage)
    assert TrialState.RUNNING not in {t.state for t in trials}
    finished = _finished(trials)
    assert len(finished) == 6
    _assert_seeded_once(finished)
    answers = [json.loads(out)["batch_size"] for out, _ in results]
    assert answers[0] == answers[1]
    # Under the default saturating lr rule every other trial waits for the baseline's noise
    # scale, so the seeds train at the rates one process gives them.
    records = [t.user_attrs[RECORD] for t in finished]
    baseline = next(r for r in records if r["role"] == BASELINE)
    others = [r for r in records if r is not baseline]
    assert all(r["lr_rule"].startswith("saturating-") for r in others)  # with its noise scale
    assert all(r["started_ms"] >= baseline["ended_ms"] for r in others)


def test_processes_opening_a_new_postgres_database_at_once_all_open_it(postgres) -> None:
    """Workers started together on a new database each create Optuna's tables: PostgreSQL
    refuses all but one (a duplicate key in its catalogue), and they are tried again. Four
    processes at once failed in 4 runs of 5 before."""
    script = textwrap.dedent(
        """
        import sys, time
        from autobatch.tuning.storage import open_storage
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
        open_storage(sys.argv[1]).get_all_studies()
        """
    )
    for _ in range(2):
        url, start = postgres(), str(time.time() + 3)
        opening = [
            subprocess.Popen([sys.executable, "-c", script, url, start], stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        for process in opening:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err.decode()[-2000:]
        assert optuna.get_all_study_summaries(url) == []


def test_a_study_storage_outlives_its_server_closing_its_connections(postgres) -> None:
    """A server restart closes every connection: the pooled ones are checked before use and
    replaced (before, a trial's next commit failed on one and took its worker down), and an
    error from a lost server is told apart from a damaged database."""
    import sqlalchemy

    url = postgres()
    opened = open_storage(url)
    optuna.create_study(storage=opened, study_name="kept")
    name = url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(
        url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        closed = connection.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        ).fetchall()
    admin.dispose()
    assert closed  # the storage's pooled connection was among them
    assert [s.study_name for s in opened.get_all_studies()] == ["kept"]
    with opened.engine.connect() as connection, pytest.raises(sqlalchemy.exc.DBAPIError) as lost:
        connection.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
    assert connection_lost(lost.value)
    assert not connection_lost(sqlalchemy.exc.OperationalError("", {}, sqlite3.OperationalError()))


def test_a_new_sqlite_storage_is_in_wal_mode_synced_at_checkpoints(tmp_path: Path) -> None:
    """Write-ahead logging is kept in the file, so every process opening it (another worker,
    ``autobatch report``) uses it; ``synchronous=NORMAL`` is per connection, set on each."""
    path = tmp_path / "study.db"
    opened = open_storage(f"sqlite:///{path}")
    with opened.engine.connect() as connection:
        pragma = connection.exec_driver_sql
        assert pragma("PRAGMA journal_mode").scalar() == "wal"
        assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
    opened.engine.dispose()
    plain = sqlite3.connect(path)
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


def test_a_dead_worker_s_trial_outside_its_sampled_range_is_queued_again(tmp_path: Path) -> None:
    """The baseline's x1 lies outside the range it was suggested from once the range test moved
    the range; Optuna's retry checks a trial's values against its ranges, and refused it."""
    import warnings

    warnings.simplefilter("ignore")  # heartbeats outside optimize(), and a fixed value off range
    storage = open_storage(
        f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(study_name="moved", storage=storage)
    study.enqueue_trial({"lr_multiplier": 1.0}, user_attrs={ROLE: BASELINE})
    trial = study.ask()
    assert trial.suggest_float("lr_multiplier", 2.0, 32.0, log=True) == 1.0
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # its worker dies: no heartbeat past the grace period
    optuna.storages.fail_stale_trials(study)
    again = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert [(t.params, t.user_attrs[ROLE]) for t in again] == [({"lr_multiplier": 1.0}, BASELINE)]


def _claim_queued(url: str, start: object, claimed: object) -> None:
    """Ask for trials until no queued one is left, keeping the numbers this process got."""
    import warnings

    warnings.simplefilter("ignore")  # Optuna's heartbeat-without-optimize warning
    study = optuna.load_study(study_name="claims", storage=open_storage(url))
    start.wait()
    while True:
        trial = study.ask()
        if "fixed_params" not in study._storage.get_trial(trial._trial_id).system_attrs:
            study.tell(trial, state=TrialState.FAIL)  # nothing left in the queue
            return
        claimed.put(trial.number)
        study.tell(trial, 0.0, skip_if_finished=True)


def test_workers_on_one_sqlite_file_never_claim_a_queued_trial_twice(tmp_path: Path) -> None:
    """Optuna reads that a queued trial waits, then marks it running; on SQLite two workers
    could both read "waiting" (seen in CI: two ran one trial and the second's tell failed)."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=open_storage(url))
    for x in range(120):
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("fork")
    start, claimed = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_claim_queued, args=(url, start, claimed)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 4
    numbers = [claimed.get(timeout=10) for _ in range(120)]
    assert sorted(numbers) == list(range(120))  # each once
    assert claimed.empty()


def test_joining_checks_the_study_and_the_task(tmp_path: Path, monkeypatch, caplog) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    task = digits()
    with pytest.raises(InvalidInputError, match="does not exist"):
        join_study(task, storage=storage, study_name="nope", wait=0.5, mlflow=False)
    assert "study.db does not exist: creating it" in caplog.text  # said at once, not after 0.5 s
    tune(task, n_trials=1, max_epochs=1, candidates=[32], storage=storage, mlflow=False)
    other = digits(seed=1)
    other.name = "other"
    with pytest.raises(InvalidInputError, match="not the one study"):
        join_study(other, storage=storage, study_name=STUDY, mlflow=False)
    optuna.load_study(study_name=STUDY, storage=storage).set_user_attr(HOST, "far-away")
    with pytest.raises(InvalidInputError, match="prepared on far-away"):
        join_study(task, storage=storage, mlflow=False)


def test_every_worker_runs_the_study_s_heartbeat(tmp_path: Path) -> None:
    """The heartbeat interval and grace period are the study's: a worker with a shorter grace
    period than another's interval took that worker's live trials for dead (the baseline ran
    twice, and the worker running it crashed)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    task = digits()
    quick = dict(n_trials=1, max_epochs=1, candidates=[32], storage=storage, mlflow=False)
    with pytest.raises(InvalidInputError, match="grace_period=15 is under twice heartbeat_"):
        tune(task, heartbeat_interval=10, grace_period=15, **quick)
    with pytest.raises(InvalidInputError, match="grace_period=3 is under twice heartbeat_"):
        tune(task, grace_period=3, **quick)  # the default interval, 10 s
    assert not (tmp_path / "study.db").exists()  # refused before anything was written
    result = tune(task, heartbeat_interval=2, grace_period=6, **quick)
    assert (result.settings.heartbeat_interval, result.settings.grace_period) == (2, 6)
    with pytest.raises(InvalidInputError, match="every 2 s and takes a trial silent for 6 s"):
        join_study(task, storage=storage, heartbeat_interval=1, grace_period=3, mlflow=False)
    # One given alone is checked against the study's other (6 is under twice the default 10,
    # but not under twice the study's 2).
    assert tune(task, grace_period=6, **quick).settings.grace_period == 6
    # Given nothing (or the same), a process runs the study's.
    settings = result.settings
    assert heartbeat_of(settings, None, None) == heartbeat_of(settings, 2, None) == (2, 6)
    opened = open_storage(storage)
    use_heartbeat(opened, *heartbeat_of(settings, None, None))
    assert (opened.get_heartbeat_interval(), opened.grace_period) == (2, 6)


class _TakenElsewhere:
    """An observer that, at trial 1's first evaluation, does what another worker does with a
    trial whose heartbeat it has not seen for the grace period (this process was paused): it
    fails the trial and queues it again. Then it waits out the grace period."""

    def __init__(self, storage: str) -> None:
        self.storage, self.done = storage, False

    def __getattr__(self, name):
        return lambda *args: None

    def evaluated(self, record, point) -> None:
        if record.number != 1 or self.done:
            return
        self.done = True
        study = optuna.load_study(study_name=STUDY, storage=self.storage)
        frozen = next(t for t in study.get_trials() if t.number == 1)
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
        StaleTrials()(study, frozen)
        time.sleep(2.1)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_taken_from_a_paused_worker_is_left_to_its_rerun(tmp_path: Path, caplog) -> None:
    """A worker paused past the grace period (SIGSTOP, a suspended laptop) finds its trial
    failed by another: it ends it with the reason and goes on, where it crashed on writing
    to the finished trial."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = tune(
        digits(), n_trials=3, max_epochs=1, candidates=[16, 32, 64], storage=storage,
        mlflow=False, heartbeat_interval=1, grace_period=2, observers=[_TakenElsewhere(storage)],
    )  # fmt: skip
    trials = _trials(storage, STUDY)
    taken = next(t for t in trials if t.number == 1)
    assert taken.state == TrialState.FAIL and RECORD not in taken.user_attrs
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(rerun) == 1 and rerun[0].state.is_finished()
    assert len(_finished(trials)) == 3 and TrialState.RUNNING not in {t.state for t in trials}
    assert LOST_REASON in caplog.text and len(result.trials) >= 3
