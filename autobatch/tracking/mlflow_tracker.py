"""Log a study to MLflow: one parent run per study, one child run per trial.

Everything goes through ``mlflow.MlflowClient`` with explicit run ids, never the fluent
``mlflow.start_run`` API: its process-wide active-run stack would tangle with the user's own
runs. Metrics are buffered and sent with ``log_batch`` on the calling thread: at an evaluation
(at most every ``flush_interval`` seconds, so a long trial shows up live) and when a trial
ends.

``tune`` runs this tracker in a process of its own (``background.BackgroundTracker``), where
its requests cost training nothing; inside the training process each trial would pay 40-110 ms
for them. Used directly, as below, it logs from the calling process.

If the tracking server goes away mid-study, the tracker logs one warning saying what was not
logged and stops talking to MLflow; the study itself goes on.

Example::

    tracker = MlflowTracker(resolve_tracking_uri(None))   # sqlite:///<cwd>/mlflow.db
    result = tune(task, mlflow=False, observers=[tracker])
    print(mlflow_ui_command(tracker.tracking_uri))
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException

from autobatch import sqlite_store
from autobatch.errors import InvalidInputError
from autobatch.records import (
    COMPLETE,
    FAILED,
    INFEASIBLE,
    EvalPoint,
    ProbeResult,
    StudySettings,
    TrialRecord,
    outcome,
    trial_label,
)
from autobatch.tracking.redact import redact_url
from autobatch.tracking.report import recommendation_tag
from autobatch.tracking.uri import check_store, unreachable
from autobatch.tuning import curves

log = logging.getLogger(__name__)

#: Tags that tell autobatch's runs apart from anything else in the experiment.
ROLE_TAG, STUDY_TAG, TRIAL_TAG = "autobatch_role", "autobatch_study", "trial_number"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Columns of trials.csv and of a report: a TrialRecord without its curve.
TRIAL_COLUMNS = tuple(f.name for f in fields(TrialRecord) if f.name != "curve")
#: Metric names carry a section prefix, which the MLflow UI groups charts by: ``curve/`` for
#: each evaluation (step = training samples seen), ``summary/`` for one value per trial,
#: ``probe/`` for the memory probe (step = batch size, memory in MiB).
CURVE, SUMMARY, PROBE = "curve/", "summary/", "probe/"
#: Trial-record fields logged as ``summary/`` metrics, and the name each is logged under.
SUMMARY_METRICS = {
    "best_val_loss": "best_val_loss",
    "auc": "mean_loss_over_time",  # the smoothed loss averaged over training time
    "epoch_seconds": "epoch_seconds",
    "throughput": "samples_per_second",
    "train_seconds": "train_seconds",
    "wall_seconds": "wall_seconds",
    "value": "objective_value",
    "time_to_target": "time_to_target",
    "samples_to_target": "samples_to_target",
    "recommended_epochs": "recommended_epochs",
}
_MIB = 2**20
_PARAM_LIMIT = 6000  # MLflow's limit on a parameter value
_TAG_LIMIT = 5000  # below MLflow's 8000, leaving room for multi-byte characters
# MLflow's limits on one log_batch request: 100 params, 100 tags, 1000 entities in all.
_BATCH_PARAMS = 100
_BATCH_METRICS = 800
# Everything a broken tracking store can raise at us: the REST client wraps HTTP failures in
# MlflowException, the SQL store lets some driver errors through, file stores raise OSError.
_STORE_ERRORS = (
    MlflowException,
    requests.RequestException,
    OSError,
    sqlalchemy.exc.SQLAlchemyError,
)
# Opening a store can also fail for want of its database driver (psycopg, pymysql).
_OPEN_ERRORS = (*_STORE_ERRORS, ImportError)


@contextlib.contextmanager
def http_limits(retries: int, timeout: int) -> Iterator[None]:
    """Bound MLflow's HTTP retries and timeout for the calls inside the block, and keep its
    artifact progress bars and its "View run" links off the terminal (two lines per trial,
    each after one more request; the study's own link is printed once, at the end).

    MLflow reads these settings from the environment at every request; its defaults (7
    retries with exponential backoff, 120 s timeout) would stall training for minutes when
    the server is gone. The previous values come back afterwards.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return redact_url(f"{type(exc).__name__}: {text[0] if text else ''}")[:limit]


def open_client(tracking_uri: str, *, timeout: int = 5, create: bool = True) -> MlflowClient:
    """A client for ``tracking_uri`` that has answered one request, or InvalidInputError.

    Checked before any training starts, with no retries and a short timeout, so a wrong URL
    or a stopped server costs seconds, not a study. With ``create=False`` a SQLite file that
    does not exist is an error instead of a new empty store.
    """
    check_store(tracking_uri, create=create, timeout=timeout)
    try:
        # The first use of a SQLite store creates and migrates its tables: one process at a
        # time, or two first runs in a new folder leave it half-migrated for good.
        with (
            sqlite_store.creation_lock(sqlite_store.path_of(tracking_uri)),
            http_limits(retries=0, timeout=timeout),
        ):
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)
    except _OPEN_ERRORS as exc:
        if tracking_uri.startswith(("http://", "https://")):
            raise unreachable(tracking_uri, _first_line(exc, 160)) from None
        if isinstance(exc, ImportError) and exc.name:
            raise InvalidInputError(
                f"cannot open the MLflow tracking store {redact_url(tracking_uri)}: its database "
                f"driver is not installed (pip install {exc.name.split('.')[0]}), or pass "
                "--no-mlflow"
            ) from None
        if "MLFLOW_ALLOW_FILE_STORE" in str(exc):  # MLflow 3 refuses its folder store
            raise InvalidInputError(
                f"MLflow refuses the folder store {redact_url(tracking_uri)} (in maintenance "
                "mode since MLflow 3): use a database store, e.g. --tracking-uri "
                "sqlite:///mlflow.db (`mlflow migrate-filestore` moves existing runs), or set "
                "MLFLOW_ALLOW_FILE_STORE=true to keep the folder"
            ) from None
        if "_alembic_tmp_" in str(exc):  # a table MLflow's migrations drop when they finish
            raise InvalidInputError(
                f"the MLflow store {redact_url(tracking_uri)} was left half-created (an MLflow "
                "process was stopped while it created or upgraded the tables) and MLflow "
                "cannot open it: move it away and run again, or give another --tracking-uri"
            ) from None
        raise InvalidInputError(
            f"cannot open the MLflow tracking store {redact_url(tracking_uri)} "
            f"({_first_line(exc, 160)}); fix --tracking-uri (e.g. sqlite:///mlflow.db) or pass "
            "--no-mlflow"
        ) from None
    return client


def _param_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        value = list(value)
    return str(value)[:_PARAM_LIMIT]


def _param_key(key: str) -> str:
    # MLflow keys allow letters, digits and "_-. /"; anything else from user extras becomes "_".
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(key))[:250]


def settings_params(settings: StudySettings) -> dict[str, str]:
    """The study's settings as MLflow parameters; ``extra`` entries as ``extra.<key>``, the lr
    range test's as ``lr_range_test.<key>``, the study's clock as ``step_seconds.<batch
    size>``, ``step_seconds.cost`` (what timing it took) and ``step_seconds.cached``."""
    data = settings.to_dict()
    extra = data.pop("extra", {}) or {}
    found = data.pop("lr_range_test", None) or {}
    timed = data.pop("step_clock", None) or {}
    if data.get("target_loss") is None:
        data["target_loss"] = "the best loss found"
    params = {key: _param_value(value) for key, value in data.items()}
    params["storage"] = redact_url(params["storage"])
    params.update({_param_key(f"extra.{k}"): _param_value(v) for k, v in extra.items()})
    params.update({f"lr_range_test.{k}": _param_value(v) for k, v in found.items()})
    steps = timed.get("seconds", {})
    params.update({f"step_seconds.{size}": f"{s:.6g}" for size, s in steps.items()})
    if timed:
        params["step_seconds.cost"] = f"{timed['cost']:.3g}"
        params["step_seconds.cached"] = str(bool(timed.get("cached")))
    return params


def probe_params(probe: ProbeResult | None) -> dict[str, str]:
    """The probe's outcome as ``probe.*`` parameters (``probe.skipped`` when there was none)."""
    if probe is None:
        return {"probe.skipped": "True"}
    model, timing = probe.memory_model, probe.step_time
    params = {
        "probe.batch_size": probe.batch_size,
        "probe.eval_batch_size": probe.eval_batch_size,
        "probe.capacity_bytes": probe.capacity_bytes,
        "probe.headroom": probe.headroom,
        "probe.budget_bytes": probe.budget_bytes,
        "probe.fixed_bytes": None if model is None else int(model.fixed_bytes),
        "probe.bytes_per_sample": None if model is None else int(model.bytes_per_sample),
        "probe.device": probe.device,
        "probe.attempts": len(probe.attempts),
        "probe.ooms": probe.ooms,
        "probe.steps": probe.steps,
        "probe.seconds": round(probe.seconds, 3),
        "probe.upper_bound": probe.upper_bound,
        "probe.cached": probe.cached,
        "probe.step_seconds_fixed": None if timing is None else f"{timing.fixed:.6g}",
        "probe.step_seconds_per_sample": None if timing is None else f"{timing.per_sample:.6g}",
    }
    return {key: _param_value(value) for key, value in params.items()}


def probe_metrics(probe: ProbeResult, timestamp_ms: int) -> list[Metric]:
    """``probe/peak_mib`` for each attempt that measured a peak, with step = batch size
    (which sizes fitted is in ``probe.json`` and the chart)."""
    return [
        Metric(f"{PROBE}peak_mib", a.peak_bytes / _MIB, timestamp_ms, a.batch_size)
        for a in probe.attempts
        if a.peak_bytes is not None
    ]


def point_metrics(point: EvalPoint) -> list[Metric]:
    """One evaluation as ``curve/`` metrics, with step = samples seen and its own timestamp."""
    peak = point.peak_memory_bytes
    values = {
        "train_loss": point.train_loss,
        "val_loss": point.val_loss,
        "val_loss_smoothed": point.val_loss_smoothed,
        "val_accuracy": point.val_accuracy,
        "samples_per_second": point.samples_per_second,
        "epoch": point.epoch,
        "train_seconds": point.seconds,
        "peak_memory_mib": None if peak is None else peak / _MIB,
        "grad_noise_scale": point.grad_noise_scale,  # the reference trial's
    }
    return [
        Metric(CURVE + key, float(value), int(point.timestamp_ms), int(point.samples))
        for key, value in values.items()
        if value is not None
    ]


def trial_params(record: TrialRecord, settings: StudySettings) -> dict[str, str]:
    """A trial run's parameters: its configuration and where it ran."""
    params = {
        "batch_size": record.batch_size,
        "lr": record.lr,
        "lr_multiplier": record.lr_multiplier,
        "lr_rule": record.lr_rule,
        "noise_scale": record.noise_scale,  # what a saturating lr rule used
        "beta2": record.beta2,  # with scale_adamw
        "weight_decay": record.weight_decay,
        "max_epochs": record.max_epochs,
        "seed": record.seed,
        "iterations_per_epoch": record.iterations_per_epoch,
        "device": settings.device,
        "device_name": record.device_name,
        "worker": record.worker,
        "precision": settings.precision,
        "max_grad_norm": settings.max_grad_norm,
    }
    return {k: _param_value(v) for k, v in params.items() if v is not None}


def run_name(record: TrialRecord, label: str | None = None) -> str:
    """``t03 bs=64 lr=5.4e-03 pruned``: the configuration and how it ended, at a glance (while
    it runs, the configuration alone)."""
    name = trial_label(record)
    return f"{name} {label}" if label else name


#: Said in every trial's description, since MLflow's charts call it only "step".
STEP_NOTE = " The curve/ charts' step is training samples seen."


def trial_summary(record: TrialRecord) -> str:
    """One line describing the trial, and what the charts' step means: the run's description
    in the MLflow UI."""
    return _trial_line(record) + STEP_NOTE


def _trial_line(record: TrialRecord) -> str:
    config = (
        f"Batch size {record.batch_size}, learning rate {record.lr:.3g} "
        f"(x{record.lr_multiplier:.3g} of the {record.lr_rule}-rule rate)"
    )
    best = "-" if record.best_val_loss is None else f"{record.best_val_loss:.4g}"
    if record.time_to_target is not None:
        return (
            f"{config}: reached the target after {record.time_to_target:.3g} s of training "
            f"({record.samples_to_target} samples); best loss {best}."
        )
    if record.state == COMPLETE:
        return f"{config}: never reached the target; best loss {best}."
    return f"{config}: {outcome(record)}" + (f" ({record.reason})." if record.reason else ".")


#: The summary values the target decides: logged when a trial ends, and again by the final
#: target when the study ends.
_VERDICT = ("value", "time_to_target", "samples_to_target", "recommended_epochs")


def summary_metrics(
    record: TrialRecord,
    timestamp_ms: int,
    *,
    only: Sequence[str] | None = None,
    final: bool = False,
) -> list[Metric]:
    """The trial's ``summary/`` metrics (``only`` these record fields, when given) and
    ``summary/reached_target`` (0/1). With ``final``, a time to target the final target took
    away is logged as NaN, so the UI's latest value no longer shows it."""
    step = record.curve[-1].samples if record.curve else 0
    metrics = []
    for field, name in SUMMARY_METRICS.items():
        if only is not None and field not in only:
            continue
        value = getattr(record, field)
        if value is None and final and field in _VERDICT:
            value = math.nan
        if isinstance(value, int | float) and (math.isfinite(value) or final):
            metrics.append(Metric(SUMMARY + name, float(value), timestamp_ms, step))
    reached = float(record.time_to_target is not None)
    return [*metrics, Metric(f"{SUMMARY}reached_target", reached, timestamp_ms, step)]


def verdict_tags(record: TrialRecord) -> dict[str, str]:
    """What the target decides about a trial, as tags: its outcome and one-line description."""
    return {"outcome": outcome(record), "mlflow.note.content": trial_summary(record)}


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, non-finite floats as None and unknown objects as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return str(value)


def write_trials_csv(trials: Sequence[TrialRecord], path: str | Path) -> Path:
    """One row per trial: ``TrialRecord.summary()``, in trial order."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TRIAL_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for record in sorted(trials, key=lambda r: r.number):
            row = record.summary()
            if row.get("reason"):
                row["reason"] = redact_url(row["reason"])
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in TRIAL_COLUMNS})
    return path


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker:
    """A TuneObserver that logs the study, its trials and the recommendation to MLflow.

    ``tracking_uri``: any MLflow tracking URI (``sqlite:///...``, ``http://host:5000``).
    ``experiment``: the experiment to log into; by default the study's name. It is created
    when missing. The server is contacted once here, so a wrong URI fails before training.

    Requests run in order on the calling thread, between training steps, never during them.
    """

    #: Seconds between mid-trial metric flushes at least; and at least this many times the
    #: last flush's duration, which keeps sending near 1% of the wall time at most.
    flush_interval = 30.0
    cost_factor = 100.0
    #: HTTP settings after the first contact: one quick retry for a blip, then give up.
    retries, timeout = 1, 15
    #: ``log_batch`` waits for the store; False queues it on MLflow's own logging thread
    #: (measured against the logging process in benchmarks/loop_overhead.py --mlflow).
    synchronous = True

    def __init__(self, tracking_uri: str, experiment: str | None = None) -> None:
        self._client = open_client(tracking_uri)  # first: a wrong URI fails at once
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.run_ids: dict[int, str] = {}  # trial number -> child run id, for every trial
        self._open: dict[int, str] = {}  # child runs not yet terminated
        self._buffer: dict[str, list[Metric]] = {}  # metrics not yet sent, by run id
        self._params: dict[str, dict[str, str]] = {}  # trial parameters not yet sent
        self._names: dict[str, str] = {}  # run id -> its name while the trial runs
        self._last_flush = 0.0
        self._flush_cost = 0.0
        self._settings: StudySettings | None = None
        self.owns_parent = False  # opened (or reopened) here: ends with this process's study
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a failure made the tracker stop sending anything."""
        return self._stopped

    # -- sending and failure handling ---------------------------------------------------------

    def _send(self, what: str, work: Callable[[], Any]) -> Any:
        """Run ``work`` (MLflow calls) now; its result, or None once logging has stopped."""
        return None if self._stopped else self._run(what, work)

    def _run(self, what: str, work: Callable[[], Any]) -> Any:
        if self._stopped:
            return None
        try:
            with http_limits(self.retries, self.timeout):
                return work()
        except _STORE_ERRORS as exc:
            self._stop(what, exc)
            return None
        except Exception:  # a bug of ours must not stop the study: say it, go on
            log.warning("MLflow logging of %s failed", what, exc_info=True)
            return None

    def _stop(self, what: str, exc: BaseException) -> None:
        """Warn once, then send nothing more: retrying a dead server would slow training."""
        first, self._stopped = not self._stopped, True
        if first:
            log.warning(
                "MLflow logging to %s failed while logging %s (%s); that and everything after "
                "it is not logged to MLflow. Training goes on, and the trials stay in the "
                "Optuna storage (autobatch report --storage ...)",
                redact_url(self.tracking_uri),
                what,
                _first_line(exc),
            )

    # -- TuneObserver -----------------------------------------------------------------------

    def open_study_run(
        self, settings: StudySettings, probe: ProbeResult | None, run_id: str | None = None
    ) -> str | None:
        """The study's run: ``run_id`` marked running again when it is in this store, else a
        new one with the settings and the probe. One per study, whatever joins it later."""
        if self._stopped:
            return None
        self._settings = settings

        def reopen() -> str | None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException:
                return None  # logged to another store before
            if run.info.lifecycle_stage == "deleted":
                return None
            if run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            self.experiment_id = run.info.experiment_id
            if self.experiment is not None:
                kept = self._client.get_experiment(run.info.experiment_id).name
                if kept != self.experiment:
                    log.warning(
                        "experiment %r ignored: study %r logs to its run in experiment %r, "
                        "where it started (a new --study-name starts one in %r)",
                        self.experiment, settings.study_name, kept, self.experiment,
                    )  # fmt: skip
            return run_id

        def start() -> str:
            experiment_id = self._experiment_id(self.experiment or settings.study_name)
            run = self._client.create_run(
                experiment_id,
                run_name=settings.study_name,
                tags={
                    ROLE_TAG: "study",
                    STUDY_TAG: settings.study_name,
                    "task": settings.task_name,
                },
            )
            self.experiment_id = experiment_id
            return run.info.run_id

        found = self._send("the study's run", reopen) if run_id else None
        if found is not None:
            self.parent_run_id, self.owns_parent = found, True
            return found
        self.parent_run_id = self._send(f"the start of study {settings.study_name!r}", start)
        if self.parent_run_id is None:
            return None
        self.owns_parent = True
        parent = self.parent_run_id
        params = {**settings_params(settings), **probe_params(probe)}
        metrics = probe_metrics(probe, _now_ms()) if probe is not None else []
        self._send(
            "the study's settings", lambda: self._log(parent, params=params, metrics=metrics)
        )
        if probe is not None:
            self._send(
                "the probe's chart",
                lambda: self._log_probe_artifacts(parent, probe, settings.train_size),
            )
        return parent

    def attach(self, parent_run_id: str, experiment_id: str) -> None:
        """Log this process's trials under a study run another process opened."""
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id

    def study_started(self, settings: StudySettings, probe: ProbeResult | None) -> None:
        """This process starts running trials of the study; opens the study's run unless
        :meth:`open_study_run` or :meth:`attach` named it."""
        if self._stopped:
            return
        self._settings = settings
        self.run_ids, self._open, self._buffer, self._params = {}, {}, {}, {}
        if self.parent_run_id is None:
            self.open_study_run(settings, probe)

    def trial_started(self, trial: Any, record: TrialRecord) -> None:
        """Create the trial's child run and store its id on the Optuna trial."""
        if self._stopped or self.parent_run_id is None:
            return
        settings = self._settings
        tags = {
            PARENT_TAG: self.parent_run_id,
            TRIAL_TAG: str(record.number),
            ROLE_TAG: "trial",
            STUDY_TAG: settings.study_name,
            "state": "running",
        }
        run = self._send(
            f"the start of trial {record.number}",
            lambda: self._client.create_run(
                self.experiment_id,
                start_time=record.started_ms,
                run_name=run_name(record),
                tags=tags,
            ),
        )
        if run is None:
            return
        run_id = run.info.run_id
        # Sent with the trial's first metrics: one request fewer per trial.
        self._params[run_id] = trial_params(record, settings)
        self.run_ids[record.number] = run_id
        self._open[record.number] = run_id
        self._names[run_id] = run_name(record)
        # On the Optuna trial, so its record and a rerun of a dead worker's trial find it.
        trial.set_user_attr("mlflow_run_id", run_id)

    def evaluated(self, record: TrialRecord, point: EvalPoint) -> None:
        """Buffer the evaluation; send what is buffered at most every ``flush_interval`` s."""
        run_id = self._open.get(record.number)
        if self._stopped or run_id is None:
            return
        self._buffer.setdefault(run_id, []).extend(point_metrics(point))
        wait = max(self.flush_interval, self.cost_factor * self._flush_cost)
        if time.monotonic() - self._last_flush >= wait:
            self.flush()

    def flush(self) -> None:
        """Send every buffered metric (and trial parameters not yet sent)."""
        if self._stopped or not (self._buffer or self._params):
            return
        metrics, self._buffer = self._buffer, {}
        params, self._params = self._params, {}
        self._last_flush = time.monotonic()

        def send() -> None:
            start = time.monotonic()
            for run_id in {**params, **metrics}:
                self._log(run_id, params=params.get(run_id), metrics=metrics.get(run_id, ()))
            self._flush_cost = time.monotonic() - start

        self._send("training metrics", send)

    def trial_finished(self, record: TrialRecord) -> None:
        """Log the trial's summary metrics and state, and end its child run."""
        run_id = self._open.pop(record.number, None)
        if self._stopped or run_id is None:
            return
        # What is still buffered for this run goes out with the summary, in one request.
        buffered = self._buffer.pop(run_id, [])
        params = self._params.pop(run_id, None)
        now = _now_ms()

        def finish() -> None:
            self._ended(run_id, record, params=params, earlier=buffered, summary_ms=now)

        self._send(f"the end of trial {record.number}", finish)

    def trial_abandoned(self, number: int, attrs: dict[str, Any]) -> None:
        """Another worker died running trial ``number``: end its run, if it is still open."""
        run_id = attrs.get("mlflow_run_id")
        if self._stopped or not run_id:
            return

        def end() -> None:
            run = self._client.get_run(run_id)
            if run.info.status != "RUNNING":
                return  # its own logging process ended it
            tags = {"state": "abandoned", "outcome": "abandoned"}
            tags["reason"] = "its worker stopped; the trial runs again"
            self._log(run_id, tags=tags)
            self._client.update_run(run_id, name=f"{run.info.run_name} abandoned")
            self._client.set_terminated(run_id, "KILLED")

        self._send(f"the end of trial {number}'s abandoned run", end)

    def study_finished(self, result: Any) -> None:
        """Log the recommendation and the study's charts and tables; end the parent run."""
        if self._stopped or self.parent_run_id is None:
            return
        self.flush()
        self._end_open_runs("KILLED", "the study ended before this trial did")
        parent = self.parent_run_id
        # Tags, not parameters: a study given more trials later gets a new recommendation.
        tags = {
            recommendation_tag(key): _param_value(value)
            for key, value in result.recommendation().items()
        }
        if result.target_loss is not None and math.isfinite(result.target_loss):
            level = curves.threshold(result.target_loss, result.settings.tolerance)
            tags["target_loss"] = _param_value(level)  # the loss to reach, as the charts draw it
            tags["target"] = result.target()
        tags["warnings"] = "\n".join(result.warnings)[:_TAG_LIMIT]
        tags["mlflow.note.content"] = self._summary(result)[:_TAG_LIMIT]
        tags["n_trials"] = _param_value(result.settings.n_trials)  # a parameter goes stale

        def finish() -> None:
            runs = self._trial_runs(parent, result.trials)
            if (best_run := runs.get(result.best_trial)) is not None:
                tags["best_run_id"] = best_run
            for trial in result.trials:
                with self._each(f"trial {trial.number}'s run"):
                    self._judged(trial, runs.get(trial.number), trial.number == result.best_trial)
            self._clear_tags(parent, ("interrupted", "failed"))  # of an earlier session's end
            self._log(parent, tags=tags)
            self._log_result_artifacts(parent, result)
            self._client.set_terminated(parent, "FINISHED")

        self._send("the study's recommendation and charts", finish)

    def _trial_runs(self, parent: str, trials: Sequence[TrialRecord]) -> dict[int, str | None]:
        """The run of each finished trial in this store, by trial number: the one under the
        study's run, else one logged now from its record (its worker logged none: the
        tracking server was down, or the worker ran without MLflow); None for a run someone
        deleted. A trial's stored run id can name another store's run (the study ran with
        another tracking URI before), so the store is asked."""
        found: dict[int, Any] = {}
        for run in self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
            run_view_type=ViewType.ALL,
            max_results=50000,
        ):
            number = run.data.tags.get(TRIAL_TAG)
            if number is not None and number.isdigit():
                known = found.get(int(number))
                # A dead worker's trial run again keeps its number: the latest run is it.
                if known is None or run.info.start_time > known.info.start_time:
                    found[int(number)] = run
        runs: dict[int, str | None] = {}
        for trial in trials:
            run = found.get(trial.number)
            if run is not None and run.info.lifecycle_stage == "deleted":
                runs[trial.number] = None
            elif run is not None:
                runs[trial.number] = run.info.run_id
                if run.info.status == "RUNNING" and trial.number not in self._open:
                    with self._each(f"trial {trial.number}'s run left running"):
                        self._ended(run.info.run_id, trial)
            else:
                with self._each(f"trial {trial.number}'s missing run"):
                    runs[trial.number] = self._logged_afterwards(parent, trial)
        return runs

    def _logged_afterwards(self, parent: str, record: TrialRecord) -> str:
        """Log a finished trial's run from its stored record, curve included."""
        tags = {PARENT_TAG: parent, TRIAL_TAG: str(record.number), ROLE_TAG: "trial"}
        tags[STUDY_TAG] = self._settings.study_name if self._settings else ""
        run = self._client.create_run(
            self.experiment_id, start_time=record.started_ms, run_name=run_name(record), tags=tags
        )
        metrics = [m for point in record.curve for m in point_metrics(point)]
        params = trial_params(record, self._settings) if self._settings else {}
        self._log(run.info.run_id, params=params, metrics=metrics)
        self._ended(run.info.run_id, record)
        return run.info.run_id

    def _ended(
        self,
        run_id: str,
        record: TrialRecord,
        *,
        params: dict[str, str] | None = None,
        earlier: Sequence[Metric] = (),
        summary_ms: int | None = None,
    ) -> None:
        """End a trial's run as its record ended: the metrics still to send (``earlier``) and
        its summary (stamped ``summary_ms``, else its end), its state and outcome, its name
        and status."""
        tags = {"state": record.state, **verdict_tags(record)}
        if record.reason:
            tags["reason"] = record.reason
        end = record.ended_ms or _now_ms()
        metrics = [*earlier, *summary_metrics(record, summary_ms or end)]
        self._log(run_id, params=params, metrics=metrics, tags=tags)
        self._client.update_run(run_id, name=run_name(record, outcome(record)))
        self._client.set_terminated(run_id, self._final_status(record), end_time=end)

    def _judged(self, trial: TrialRecord, run_id: str | None, best: bool) -> None:
        """Judge a completed trial's run again by the final target (it was told while the
        target was easier): its outcome, objective value and name follow, so no screen
        contradicts the answer."""
        if run_id is None or trial.state != COMPLETE:
            return
        marks = {**verdict_tags(trial), **({"outcome": "best"} if best else {})}
        metrics = summary_metrics(trial, _now_ms(), only=_VERDICT, final=True)
        self._log(run_id, metrics=metrics, tags=marks)
        self._client.update_run(run_id, name=run_name(trial, "best" if best else outcome(trial)))

    @contextlib.contextmanager
    def _each(self, what: str) -> Iterator[None]:
        """One trial's run that cannot be written (deleted meanwhile) is skipped: the study's
        end is still logged."""
        try:
            yield
        except MlflowException as exc:
            log.debug("skipped %s: %s", what, exc)

    def _clear_tags(self, run_id: str, names: Sequence[str]) -> None:
        held = self._client.get_run(run_id).data.tags
        for name in names:
            if name in held:
                self._client.delete_tag(run_id, name)

    def study_failed(self, reason: str) -> None:
        """End the study run FAILED, saying why: every trial ended and none completed."""
        if self._stopped or self.parent_run_id is None:
            return
        self.flush()
        self._end_open_runs("KILLED", "the study ended before this trial did")
        parent = self.parent_run_id

        def finish() -> None:
            text = str(reason)[:_TAG_LIMIT]
            self._clear_tags(parent, ("interrupted",))
            self._log(parent, tags={"failed": text, "mlflow.note.content": text})
            self._client.set_terminated(parent, "FAILED")

        self._send("the failure of the study", finish)

    def study_left(self) -> None:
        """This process stops with the study complete or running on elsewhere: another worker
        logs its end, so the study run is left as it is (marked interrupted, it was KILLED
        under the worker still logging the recommendation)."""
        if self._stopped or self.parent_run_id is None:
            return
        self.flush()
        self._end_open_runs("KILLED", "its worker stopped before it ended")

    def study_interrupted(self, reason: str) -> None:
        """Mark the open trial runs KILLED, and the study run too if this process opened it
        (other workers may still be adding trials to a run opened elsewhere)."""
        if self._stopped or self.parent_run_id is None:
            return
        self.flush()
        self._end_open_runs("KILLED", reason)
        if not self.owns_parent:
            return
        parent = self.parent_run_id

        def finish() -> None:
            if self._client.get_run(parent).info.status != "RUNNING":
                return  # a worker elsewhere ended the study
            self._log(parent, tags={"interrupted": str(reason)[:_TAG_LIMIT]})
            self._client.set_terminated(parent, "KILLED")

        self._send("the interruption of the study", finish)

    # -- helpers ----------------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            db = sqlite_store.path_of(self.tracking_uri)
            if db is not None:
                # Next to the database rather than MLflow's default ./mlruns under whatever
                # directory the study happens to run in.
                location = (db.parent / "mlartifacts").resolve().as_uri()
            # The tag makes the MLflow UI open the experiment in its model-training view.
            return self._client.create_experiment(
                name,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
            )
        if experiment.lifecycle_stage == "deleted":
            self._client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _log(
        self,
        run_id: str,
        *,
        params: dict[str, str] | None = None,
        metrics: Sequence[Metric] = (),
        tags: dict[str, str] | None = None,
    ) -> None:
        """As few ``log_batch`` requests as MLflow's limits allow, every text value redacted."""
        param_list = [Param(k, redact_url(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, redact_url(v)) for k, v in (tags or {}).items()]
        metric_list = list(metrics)
        requests_needed = max(
            math.ceil(len(param_list) / _BATCH_PARAMS),
            math.ceil(len(tag_list) / _BATCH_PARAMS),
            math.ceil(len(metric_list) / _BATCH_METRICS),
        )
        for i in range(requests_needed):
            self._client.log_batch(
                run_id,
                metrics=metric_list[i * _BATCH_METRICS : (i + 1) * _BATCH_METRICS],
                params=param_list[i * _BATCH_PARAMS : (i + 1) * _BATCH_PARAMS],
                tags=tag_list[i * _BATCH_PARAMS : (i + 1) * _BATCH_PARAMS],
                synchronous=self.synchronous,
            )

    def _final_status(self, record: TrialRecord) -> str:
        if record.reason == "interrupted":
            return RunStatus.to_string(RunStatus.KILLED)
        if record.state in (FAILED, INFEASIBLE):
            return RunStatus.to_string(RunStatus.FAILED)
        return RunStatus.to_string(RunStatus.FINISHED)

    def _end_open_runs(self, status: str, reason: str) -> None:
        open_runs, self._open = self._open, {}
        for number, run_id in open_runs.items():
            params = self._params.pop(run_id, None)
            tags = {"state": "interrupted", "outcome": "interrupted"}
            tags["reason"] = str(reason)[:_TAG_LIMIT]
            name = self._names.get(run_id)

            def end(
                run_id: str = run_id, params: Any = params, tags: Any = tags, name: Any = name
            ) -> None:
                self._log(run_id, params=params, tags=tags)
                if name:
                    self._client.update_run(run_id, name=f"{name} interrupted")
                self._client.set_terminated(run_id, status)

            self._send(f"the end of trial {number}", end)

    def _log_probe_artifacts(
        self, run_id: str, probe: ProbeResult, train_size: int | None = None
    ) -> None:
        from autobatch.tracking import plots  # matplotlib: loaded when a chart is due

        with tempfile.TemporaryDirectory(prefix="autobatch-mlflow-") as folder:
            directory = Path(folder)
            text = redact_url(json.dumps(json_safe(probe.to_dict()), indent=2))
            (directory / "probe.json").write_text(text)
            figure = plots.probe_memory_figure(probe, train_size=train_size)
            plots.save_png(figure, directory / "probe_memory.png")
            self._client.log_artifacts(run_id, folder)

    def _log_result_artifacts(self, run_id: str, result: Any) -> None:
        from autobatch.tracking import plots
        from autobatch.tuning import prior

        settings = result.settings
        trials = list(result.trials)
        level = (
            None
            if result.target_loss is None
            else curves.threshold(result.target_loss, settings.tolerance)
        )
        best = result.best_trial
        charts = {
            "learning_curves.png": plots.learning_curves_figure(trials, level, best),
            "batch_size_tradeoff.png": plots.batch_size_tradeoff_figure(trials, best, level),
            "search_space.png": plots.search_space_figure(trials, best, level),
            "optimization_history.png": plots.optimization_history_figure(trials, best),
            "why_batch_size.png": plots.prediction_figure(
                prior.explain(trials, settings.candidates, prior.step_clock(settings)),
                result.batch_size,
            ),
        }
        with tempfile.TemporaryDirectory(prefix="autobatch-mlflow-") as folder:
            directory = Path(folder)
            for name, figure in charts.items():
                plots.save_png(figure, directory / name)
            write_trials_csv(trials, directory / "trials.csv")
            data = json_safe(result.to_dict())
            data.pop("study", None)
            (directory / "recommendation.json").write_text(redact_url(json.dumps(data, indent=2)))
            self._client.log_artifacts(run_id, folder)

    def _summary(self, result: Any) -> str:
        """The recommendation as Markdown: the run description in the MLflow UI."""
        lines = [
            f"**Recommendation** for study `{result.settings.study_name}`: batch size "
            f"**{result.batch_size}**, **{result.epochs}** epochs"
            + ("" if result.steps is None else f" ({result.steps} steps)")
            + ", learning rate "
            f"**{result.lr:.4g}** (x{result.lr_multiplier:.3g} of the rule-scaled rate), "
            f"from trial {result.best_trial}.",
        ]
        if result.target_loss is not None:
            lines.append(f"\nTarget: {result.target()}.")
        if result.warnings:
            lines.append("\n**Warnings**\n")
            lines += [f"- {w}" for w in result.warnings]
        lines.append(
            "\nWhy: `search_space.png` (every trial by batch size and learning rate, coloured "
            "by seconds to target), `optimization_history.png` (the search, best so far), "
            "`learning_curves.png` and `batch_size_tradeoff.png` on the Artifacts tab. The "
            "child runs (`tNN bs=... lr=... outcome`) compare on `curve/val_loss_smoothed` "
            "(step = training samples seen) and sort by `summary/objective_value`."
        )
        return "\n".join(lines)
