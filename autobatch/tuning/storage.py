"""The study in Optuna storage: how it is opened, where autobatch keeps its facts, and which
trials count.

One source of truth for every worker: study-level facts are user attributes written once by
*prepare*; each trial carries its own record. Nothing here is read, changed and written back by
workers, so any number of them can share a study.

A trial *counts* towards ``n_trials`` while it is queued or running, and once finished with a
record. Trials skipped (queued at a batch size known not to fit, or queued twice at once),
interrupted (queued again), given up by a dead worker (failed by the heartbeat and queued
again) or started past the study's budget do not count.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autobatch import sqlite_store
from autobatch.errors import AutobatchError, InvalidInputError
from autobatch.records import ProbeResult, StudySettings, TrialRecord
from autobatch.tracking.redact import redact_url
from autobatch.tuning import scoring

log = logging.getLogger(__name__)

# Study attributes, written by prepare only.
SETTINGS = "autobatch_settings"  # StudySettings; written last: its presence means "prepared"
SPACE = "autobatch_space"  # written by autobatch before 0.2 only: marks an older study
PROBE = "autobatch_probe"
NOTES = "autobatch_notes"
HOST = "autobatch_prepared_on"
PREPARER = "autobatch_preparer"  # host:pid of the process preparing it
MLFLOW = "autobatch_mlflow"  # {"tracking_uri", "experiment_id", "parent_run_id"}
# Trial attributes, written by the worker running the trial.
RECORD = "autobatch_record"
COUNTED = "autobatch_counted"
ROLE = "autobatch_role"
RUN_ID = "mlflow_run_id"
REASON = "reason"  # why a trial with no record (skipped, given back, broken) ended
WORKER = "autobatch_worker"


#: Seconds between a running trial's heartbeats, and without one before it counts as dead.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 30
#: How often a dead worker's trial is run again before the study gives up on it.
MAX_RETRY = 2


class StaleTrials:
    """Optuna's heartbeat callback for a trial whose worker died: queue it again (Optuna's
    ``RetryHeartbeatStaleTrialCallback``), then tell the listeners (the MLflow tracker ends
    the dead run)."""

    def __init__(self, max_retry: int = MAX_RETRY) -> None:
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.listeners: list[Callable[[FrozenTrial], None]] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning(
            "trial %d stopped sending heartbeats (its worker died); it is failed and queued again",
            trial.number,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry(study, _within_its_ranges(trial))
        for listener in list(self.listeners):
            listener(trial)


def _within_its_ranges(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` with each float range widened to hold its value. A queued trial's fixed
    multiplier may lie outside the range it was suggested from (the baseline's x1 when the range
    test moved the range; a step past the range's end), and Optuna's retry re-creates the trial
    with its values checked against its ranges."""
    widened = {}
    for name, dist in trial.distributions.items():
        value = trial.params.get(name)
        if isinstance(dist, FloatDistribution) and not dist.low <= value <= dist.high:
            dist = FloatDistribution(
                min(dist.low, value), max(dist.high, value), log=dist.log, step=dist.step
            )
        widened[name] = dist
    if widened == trial.distributions:
        return trial
    copied = copy.copy(trial)
    copied.distributions = widened
    return copied


def default_heartbeat(heartbeat_interval: int | None, grace_period: int | None) -> tuple[int, int]:
    """The heartbeat interval and grace period given, each left out (None) the default."""
    interval = HEARTBEAT_INTERVAL if heartbeat_interval is None else heartbeat_interval
    return interval, GRACE_PERIOD if grace_period is None else grace_period


def check_heartbeat(heartbeat_interval: int | None, grace_period: int | None) -> None:
    """Refuse a grace period under twice the heartbeat interval: a live worker whose heartbeat
    comes a little late would be taken for dead, and its trial run twice. One left out (None)
    is the study's, unknown until it is read, so only a pair is checked (a new study's are
    checked with the defaults filled in, :func:`default_heartbeat`)."""
    if heartbeat_interval is None or grace_period is None:
        return
    interval, grace = heartbeat_interval, grace_period
    if grace < 2 * interval:
        raise InvalidInputError(
            f"grace_period={grace} is under twice heartbeat_interval={interval}: a live worker "
            "whose heartbeat came a little late would be taken for dead and its trial run "
            f"twice; give --grace-period {2 * interval} or more (or a shorter "
            "--heartbeat-interval)"
        )


def heartbeat_of(
    settings: StudySettings, heartbeat_interval: int | None, grace_period: int | None
) -> tuple[int, int]:
    """The heartbeat interval and grace period this process runs the study with: the study's,
    the same for every worker. One worker's shorter grace period took the trials of workers
    beating less often for dead. Values given that differ from the study's are refused."""
    stored = (settings.heartbeat_interval, settings.grace_period)
    given = (heartbeat_interval, grace_period)
    if stored[0] is None or stored[1] is None:  # stored before they were kept
        return default_heartbeat(heartbeat_interval, grace_period)
    if any(g is not None and g != s for g, s in zip(given, stored, strict=True)):
        raise InvalidInputError(
            f"study {settings.study_name!r} runs a heartbeat every {stored[0]} s and takes a "
            f"trial silent for {stored[1]} s for dead, the same in every worker: leave "
            f"--heartbeat-interval and --grace-period out, or give {stored[0]} and {stored[1]}"
        )
    return stored[0], stored[1]


def use_heartbeat(opened: optuna.storages.BaseStorage, interval: int, grace: int) -> None:
    """Send this process's heartbeats and judge other workers' by ``interval`` and ``grace``
    (Optuna reads both off the storage when a heartbeat thread starts and when stale trials
    are failed)."""
    if isinstance(opened, optuna.storages.RDBStorage):
        opened.heartbeat_interval, opened.grace_period = interval, grace


def open_storage(
    url: str | None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    read_only: bool = False,
) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``url`` (in memory for None), with heartbeats for databases.

    With ``read_only`` (a report), a SQLite file marked read-only, or in a folder that is, is
    opened as it is: no tables, locks or journal settings written. A database error becomes
    one line that names the store and the fix.
    """
    if url is None:
        return optuna.storages.InMemoryStorage()
    path = sqlite_store.path_of(url)
    if read_only and path is not None and sqlite_store.read_only(path):
        # Immutable, where no write-ahead log holds commits not yet in the file: then not even
        # the log's index is written.
        wal = path.with_name(path.name + "-wal")
        mode = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
        try:
            return optuna.storages.RDBStorage(f"sqlite:///file:{path.resolve()}?{mode}&uri=true")
        except Exception as exc:
            raise AutobatchError(
                f"cannot read the read-only study storage {path} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); it may be damaged: read a copy"
            ) from None
    try:
        if url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
            sqlite = url.startswith("sqlite:")
            if path is not None:
                sqlite_store.check(path, "the study storage")
                sqlite_store.check_kind(path, "the study storage", "study")
            interval, grace = default_heartbeat(heartbeat_interval, grace_period)
            with sqlite_store.creation_lock(path), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                opened = _created(
                    lambda: optuna.storages.RDBStorage(
                        url,
                        # A server's pooled connections are checked before use: one a server
                        # restart closed is replaced, not handed to a trial's commit.
                        engine_kwargs={"connect_args": {"timeout": 30}}
                        if sqlite
                        else {"pool_pre_ping": True},
                        heartbeat_interval=interval,
                        grace_period=grace,
                        heartbeat_stale_trial_callback=StaleTrials(),
                    ),
                    retry=not sqlite,
                )
            if path is not None:
                _fast_sqlite(opened.engine)
            return opened
        return optuna.storages.get_storage(url)
    except InvalidInputError:
        raise
    except OSError as exc:  # the SQLite file or its folder
        raise InvalidInputError(
            f"cannot write the study storage {redact_url(url)} ({exc.strerror or exc}); run "
            "where you can write files, or give --storage a path you can write to"
        ) from None
    except ImportError as exc:
        raise InvalidInputError(
            f"cannot open the study storage {redact_url(url)}: its database driver is not "
            f"installed ({exc.name or exc}); for PostgreSQL: "
            "pip install 'torch-autobatch[postgres]'"
        ) from None
    except Exception as exc:  # SQLAlchemy/driver errors of every kind, all meaning "unusable"
        if _damaged(exc):
            raise AutobatchError(
                f"the study storage {redact_url(url)} is damaged ({str(exc).splitlines()[0][:160]}"
                "); restore it from a copy, or give a new --storage (the trials logged to MLflow "
                "are kept there)"
            ) from None
        raise InvalidInputError(
            f"cannot open the study storage {redact_url(url)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}; check the URL (e.g. sqlite:///autobatch.db) "
            "and that the database server is running"
        ) from None


#: Tries at opening a server database whose tables other processes create at the same moment.
CREATION_TRIES = 5


def _created(
    make: Callable[[], optuna.storages.RDBStorage], retry: bool
) -> optuna.storages.RDBStorage:
    """``make()``, tried again where another process was creating Optuna's tables in the
    same new database: PostgreSQL refuses the second ``CREATE TABLE`` of a name (a duplicate
    key in its catalogue) instead of waiting, and workers started together on a new database
    hit that (SQLite files are created under a lock instead)."""
    import sqlalchemy.exc

    for attempt in range(CREATION_TRIES):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            racing = "duplicate key" in str(exc) or "already exists" in str(exc)
            if not retry or not racing or attempt == CREATION_TRIES - 1:
                raise
            log.debug("another process is creating the study tables; trying again: %s", exc)
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def new_sqlite_file(url: str | None) -> Path | None:
    """The SQLite file ``url`` would create (a Path), or None: not SQLite, or already there."""
    path = None if url is None else sqlite_store.path_of(url)
    return path if path is not None and not path.exists() else None


def remove_if_unused(opened: optuna.storages.BaseStorage, path: Path) -> None:
    """Delete the SQLite file a refused ``tune`` created (``path``, from ``new_sqlite_file``)
    while it holds no study: a leftover empty store would make a worker pointed at a mistyped
    path wait for a study instead of saying the file is missing."""
    try:
        if opened.get_all_studies():
            return
        opened.engine.dispose()
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    except Exception as exc:  # the refusal being raised matters more than this tidying
        log.debug("left %s in place: %s", path, exc)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error under it) is a database server gone away: restarted,
    shut down, or out of reach. The study in it is intact, not damaged."""
    import sqlalchemy.exc

    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            if error.connection_invalidated:
                return True
            driver = type(error.orig).__module__
            if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
                return not driver.startswith("sqlite3")  # SQLite's are the file's
        error = error.__cause__ or error.__context__
    return False


def _damaged(exc: BaseException) -> bool:
    """A SQLite file whose pages are broken, as opposed to a wrong URL or a server down."""
    text = f"{exc} {exc.__cause__ or ''}".lower()
    return "malformed" in text or "file is not a database" in text


def _fast_sqlite(engine: Any) -> None:
    """Write-ahead logging, synced at checkpoints: a commit costs a fraction of a millisecond
    instead of a sync to disk, and readers never block the workers' writes. A crash of the
    process loses nothing; a power cut may lose the last commits.

    Every transaction takes the write lock when it begins (``BEGIN IMMEDIATE``). Optuna claims
    a queued trial by reading that it is waiting and then marking it running; PostgreSQL locks
    the row in between (``SELECT ... FOR UPDATE``), SQLite ignores that lock, and Python's
    driver begins the transaction only at the write, so two workers could both read "waiting"
    and both run the trial. Taken at the start, the lock makes the read and the write one step.
    """
    import sqlalchemy

    def pragmas(connection: Any, _record: Any) -> None:
        connection.isolation_level = None  # the driver's own BEGIN off: ``begin`` below
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", pragmas)
    sqlalchemy.event.listen(engine, "begin", begin)
    engine.dispose()  # connections opened while creating the tables reconnect with them


def stale_listeners(study: optuna.Study) -> list[Callable[[FrozenTrial], None]] | None:
    """Where to register for dead workers' trials; None when the storage has no heartbeat."""
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache
    callback = getattr(storage, "heartbeat_stale_trial_callback", None)
    return callback.listeners if isinstance(callback, StaleTrials) else None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials of dead workers and queue them again (Optuna's heartbeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def hostname() -> str:
    return socket.gethostname()


def worker_name() -> str:
    """This process, as trial records name it."""
    return f"{hostname()}:{os.getpid()}"


# -- study facts -----------------------------------------------------------------------------


def preparer_died(study: optuna.Study) -> bool:
    """Whether the process that created ``study`` and was writing its facts died before it
    marked it prepared (SIGKILL between the two). Known only on the host it ran on."""
    host, _, pid = str(study.user_attrs.get(PREPARER, "")).rpartition(":")
    if host != hostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def settings_of(study: optuna.Study) -> StudySettings | None:
    data = study.user_attrs.get(SETTINGS)
    return None if data is None else StudySettings.from_dict(data)


def probe_of(study: optuna.Study) -> ProbeResult | None:
    data = study.user_attrs.get(PROBE)
    return None if data is None else ProbeResult.from_dict(data)


# -- trials ----------------------------------------------------------------------------------


def counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` counts towards ``n_trials`` (see the module's docstring)."""
    if trial.user_attrs.get(COUNTED) is False:
        return False
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return True
    return RECORD in trial.user_attrs


@dataclass(frozen=True)
class Progress:
    """How far a study is, from its trials."""

    finished: int  # counted and finished
    running: int  # counted and running (here or in another worker)
    waiting: int  # queued
    seeds_waiting: int = 0  # queued seeded trials

    def complete(self, n_trials: int | None) -> bool:
        return n_trials is not None and self.finished >= n_trials


def progress(trials: Sequence[FrozenTrial]) -> Progress:
    finished = running = waiting = seeds = 0
    for trial in trials:
        if not counts(trial):
            continue
        if trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
            seeds += ROLE in trial.user_attrs
        else:
            finished += 1
    return Progress(finished, running, waiting, seeds)


def settled(state: Progress, known: Sequence[TrialRecord], settings: StudySettings) -> str | None:
    """Why the study may end before ``n_trials`` (:func:`scoring.settled` of the records
    ``known``), or None; always None while trials wait in the queue (``state``): what the
    study asked for itself (a neighbour, a rate past the range) runs before it ends."""
    return None if state.waiting else scoring.settled(known, settings)


def claimed_before(trials: Sequence[FrozenTrial], number: int) -> int:
    """Trials numbered below ``number`` that count. A trial runs only if fewer than
    ``n_trials`` did: trial numbers are handed out atomically, so two workers asking at once
    never both take the last place."""
    return sum(1 for t in trials if t.number < number and counts(t))


#: Where Optuna keeps the parameters a trial was enqueued with (a system attribute).
_FIXED_PARAMS = "fixed_params"


def fixed_params(study: optuna.Study, trial: optuna.Trial) -> dict[str, Any] | None:
    """The parameters a queued trial was enqueued with; None for a sampled one."""
    return study._storage.get_trial_system_attrs(trial._trial_id).get(_FIXED_PARAMS)


def configurations(trials: Sequence[FrozenTrial]) -> list[tuple[int, float]]:
    """The batch size and learning-rate multiplier of every queued or running trial: what it
    was enqueued with, or what it has drawn so far."""
    found = []
    for t in trials:
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            params = _configuration(t)
            if "batch_size" in params and "lr_multiplier" in params:
                found.append((int(params["batch_size"]), float(params["lr_multiplier"])))
    return found


def earlier_twin(trials: Sequence[FrozenTrial], number: int) -> FrozenTrial | None:
    """A trial numbered below ``number`` that counts and was queued with the same role and
    parameters as trial ``number``. Reading that no such trial is queued and then queueing one
    are two steps, so two workers ending trials at once can both queue it; the earlier runs."""
    mine = next((t for t in trials if t.number == number), None)
    role = None if mine is None else mine.user_attrs.get(ROLE)
    if mine is None or role is None:
        return None
    wanted = _configuration(mine)
    earlier = (t for t in trials if t.number < number and t.user_attrs.get(ROLE) == role)
    return next((t for t in earlier if counts(t) and _configuration(t) == wanted), None)


def _configuration(trial: FrozenTrial) -> dict[str, Any]:
    """What ``trial`` has drawn so far, or, before it draws, what it was enqueued with."""
    return trial.params or trial.system_attrs.get(_FIXED_PARAMS) or {}


def claim_bound(seen: Sequence[FrozenTrial], number: int) -> int:
    """At most how many trials numbered below ``number`` count, from an earlier read
    ``seen``: those it shows, plus every number it does not show below ``number`` (trials
    created since). Trials only stop counting, never start, so the bound holds."""
    newest = max((t.number for t in seen), default=-1)
    return claimed_before(seen, number) + max(0, number - newest - 1)


def records(trials: Sequence[FrozenTrial]) -> list[TrialRecord]:
    """The records of the finished trials that count, in trial order."""
    out = []
    for trial in trials:
        data = trial.user_attrs.get(RECORD)
        if data is not None and trial.state.is_finished() and counts(trial):
            out.append(TrialRecord.from_dict(data))
    return sorted(out, key=lambda r: r.number)
