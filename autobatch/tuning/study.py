"""The two ways into a study: ``tune()`` prepares it, runs trials and recommends, in one
process; ``join_study()`` adds a worker to a study prepared elsewhere.

Any number of processes, on any machines that reach the storage (a PostgreSQL server, say), can
call either on the same study: the first to arrive prepares it, the others join, and all of them
run trials until the study has its ``n_trials``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from autobatch import sqlite_store, validation, workload
from autobatch.errors import InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.probing import DEFAULT_HEADROOM
from autobatch.records import ProbeResult, TuneObserver, TuneResult
from autobatch.task import Task
from autobatch.tracking.redact import redact_url
from autobatch.tuning import prepare as preparing
from autobatch.tuning.recommendation import recommend
from autobatch.tuning.scoring import MIN_TRIALS
from autobatch.tuning.storage import (
    MLFLOW,
    check_heartbeat,
    heartbeat_of,
    open_storage,
    settings_of,
    use_heartbeat,
    worker_name,
)
from autobatch.tuning.worker import Worker
from autobatch.workload import Workload

log = logging.getLogger(__name__)


def tune(
    task: Workload,
    *,
    n_trials: int | None = 20,
    min_trials: int | None = MIN_TRIALS,
    timeout: float | None = None,
    max_epochs: float = 10,
    candidates: Sequence[int] | None = None,
    objective: str = "time",
    lr_rule: str = "auto",
    lr_multiplier_range: tuple[float, float] = (0.25, 4.0),
    scale_adamw: bool = False,
    lr_range_test: bool = True,
    target_loss: float | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    probe_result: ProbeResult | None = None,
    memory_budget: str | int | None = None,
    meter: MemoryMeter | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int | None = None,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    observers: Sequence[TuneObserver] = (),
    progress: bool = False,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    workers: int = 1,
    target: str | None = None,
    devices: Sequence[str] | None = None,
    threads: int | None = None,
    verbose: int = 0,
    cache: bool = True,
) -> TuneResult:
    """Recommend a batch size, epoch count and learning rate for ``task``: a :class:`Task`,
    or any :class:`~autobatch.workload.Workload` (a LightningModule's, a Trainer's).

    Probes the memory ceiling (or takes ``probe_result``), then runs an Optuna study over
    batch sizes up to it and learning-rate multipliers around the rule-scaled rate, centred
    where a learning-rate range test (100 steps, before any trial) finds a sound rate
    (``lr_range_test=False``: on the task's own rate). The baseline (the task's own batch
    size and learning rate), the ceiling and the middle of the range run first.
    Training time is counted in steps, at step times measured once for every candidate
    before the first trial (the study's clock, :mod:`autobatch.tuning.clock`), so timing
    noise does not steer the study; with ``cache`` (the default) the probe's result and the
    step times are kept on disk and a rerun on this machine with the same ``seed`` runs the
    same trials to the same answer (``cache=False`` measures both again).
    ``objective="time"`` minimises training seconds until the smoothed validation loss
    reaches ``target x (1 + tolerance)``, the target being ``target_loss`` or, by default,
    the best loss any trial reached (``tolerance``: 1% for a new study, so that seed noise
    leaves the answer within 2% of the best reachable; a stored study keeps its own);
    ``"loss"`` minimises the best validation loss; ``"pareto"`` keeps both (no pruning).
    ``scale_adamw`` (opt-in) also moves AdamW's ``beta2`` and weight decay with the batch
    size (:func:`autobatch.tuning.space.adamw_scaling`).

    The study runs at most ``n_trials`` trials. It ends sooner once it has ``min_trials`` and
    its answer has settled: its last five trials lowered neither the best loss nor the fastest
    time to the target by more than seed noise (:func:`autobatch.tuning.scoring.settled`). On
    the recommendation-quality benchmark that saves a fifth of a study's compute for the same
    answer (docs/concepts.md, "When the study ends"); ``min_trials=None`` runs every trial.

    With ``storage`` (any Optuna URL, e.g. ``sqlite:///autobatch.db`` or
    ``postgresql://user@host/db``) the study is resumable and shareable: calling ``tune`` again
    with the same ``study_name`` continues it up to ``n_trials`` trials in total, and other
    processes may run trials of it at the same time (``join_study``, ``autobatch worker``).
    A running trial whose process dies is failed after ``grace_period`` seconds without a
    heartbeat (one every ``heartbeat_interval`` seconds) and run again; both are the study's,
    set when it is made (30 and 10 by default) and the same in every worker.

    With ``mlflow`` (the default) the study, every trial and the recommendation are logged to
    ``tracking_uri`` (default ``sqlite:///mlflow.db`` in the working directory) into
    ``experiment`` (default: the study's name), from a separate process, so logging does not
    slow the trials; ``result.mlflow_run_id`` is the study's run. ``observers`` receive every
    event as it happens (see :class:`TuneObserver`).

    With ``workers`` > 1 the trials run in that many ``autobatch worker`` processes on this
    machine, sharing the study through ``storage``; each builds the task from ``target`` (as
    the CLI names it, e.g. ``"mypackage.tasks:make_task"``) on its device (``devices`` in
    turn; by default every visible GPU in turn, or the task's device with ``threads`` torch
    threads each, 1 on the CPU).

    Example::

        from autobatch.examples import digits
        result = tune(digits(), n_trials=8, max_epochs=5, mlflow=False)
        print(result.batch_size, result.epochs, result.lr)
    """
    validation.check(validation.TUNE, locals())
    if workers > 1 and not target:
        raise InvalidInputError(
            f"workers={workers} needs target='package.module:function' (or a built-in "
            "example's name), so that each worker process can build the task"
        )
    if workers > 1 and devices and not isinstance(task, Task):
        raise InvalidInputError(
            f"devices= (--devices) moves an autobatch.Task; this task is a "
            f"{type(task).__name__}, whose "
            "workers each build it where target builds it: drop devices (each worker is then "
            "shown one visible GPU in turn as cuda:0)"
        )
    if workers > 1 and (storage is None or ":memory:" in storage):
        raise InvalidInputError(
            f"workers={workers} needs a study storage the workers share, e.g. "
            "storage='sqlite:///autobatch.db' (this machine) or 'postgresql://user@host/db'"
        )
    if storage is not None:
        storage = sqlite_store.absolute(storage)
    prepared = preparing.prepare(
        task,
        n_trials=n_trials,
        min_trials=min_trials,
        timeout=timeout,
        max_epochs=max_epochs,
        candidates=candidates,
        objective=objective,
        lr_rule=lr_rule,
        lr_multiplier_range=lr_multiplier_range,
        scale_adamw=scale_adamw,
        lr_range_test=lr_range_test,
        target_loss=target_loss,
        tolerance=tolerance,
        seed=seed,
        storage_url=storage,
        study_name=study_name,
        probe_result=probe_result,
        memory_budget=memory_budget,
        meter=meter,
        headroom=headroom,
        max_batch_size=max_batch_size,
        mlflow=mlflow,
        tracking_uri=tracking_uri,
        experiment=experiment,
        observers=observers,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        # The clock is timed as the trials will run: in this process, or in the workers.
        threads=_worker_threads(task, threads) if workers > 1 else None,
        cache=cache,
    )
    try:
        for note in prepared.notes:
            log.warning(note)
        if workers > 1:
            from autobatch.tuning.launch import run_workers, worker_devices

            return run_workers(
                target,
                prepared,
                storage_url=storage,
                devices=worker_devices(task.device, workers, devices),
                threads=_worker_threads(task, threads),
                mlflow=mlflow,
                tracking_uri=tracking_uri,
                timeout=timeout,
                progress=progress,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                verbose=verbose,
                movable=isinstance(task, Task),
            )
        worker = Worker(
            task,
            prepared.study,
            observers=prepared.observers,
            meter=_trial_meter(task, meter),
            progress=progress,
            timeout=timeout,
            notes=prepared.notes,
            reports_end=prepared.unlogged,
        )
        outcome = worker.run()
        return outcome.result or recommend(prepared.study, notes=worker.notes)
    finally:
        prepared.close()


def _worker_threads(task: Workload, threads: int | None) -> int | None:
    """Torch threads per worker process: one on the CPU unless told otherwise."""
    return threads or (1 if task.device.type == "cpu" else None)


def join_study(
    task: Workload,
    *,
    storage: str,
    study_name: str | None = None,
    timeout: float | None = None,
    wait: float = 600.0,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    observers: Sequence[TuneObserver] = (),
    progress: bool = False,
    meter: MemoryMeter | None = None,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
) -> TuneResult:
    """Run trials of the study ``study_name`` in ``storage`` until it has its ``n_trials``;
    return its recommendation.

    The study must have been (or, within ``wait`` seconds, be) prepared by ``tune`` for the
    same task; its settings come from the storage. Trials are logged to the study's MLflow run
    (``tracking_uri`` is the study's unless given; it must name the same store).

    Example (on every machine of a cluster, with the study started by ``autobatch tune``)::

        result = join_study(my_task(), storage="postgresql://tuner@db/studies",
                            study_name="autobatch-my-task")
    """
    workload.check(task, "join_study")
    validation.check(validation.JOIN_STUDY, locals())
    name = study_name or f"autobatch-{task.name}"
    storage = sqlite_store.absolute(storage)
    path = sqlite_store.path_of(storage)
    if path is not None and not path.exists():  # a mistyped path would wait out ``wait``
        log.warning(
            "%s does not exist: creating it and waiting for `autobatch tune` to prepare study "
            "%r in it (check --storage if the study runs with another file)",
            path,
            name,
        )
    check_heartbeat(heartbeat_interval, grace_period)
    opened = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = preparing.wait_prepared(opened, name, wait, worker_name())
    preparing.check_shareable(study, storage)
    settings = settings_of(study)
    assert settings is not None
    preparing.check_same_task(settings, task)
    use_heartbeat(opened, *heartbeat_of(settings, heartbeat_interval, grace_period))
    tracker = _attach_tracker(study, tracking_uri) if mlflow else None
    try:
        worker = Worker(
            task,
            study,
            observers=[*observers, *([tracker] if tracker is not None else [])],
            meter=_trial_meter(task, meter),
            progress=progress,
            timeout=timeout,
        )
        outcome = worker.run()
        return outcome.result or recommend(study, notes=worker.notes)
    finally:
        if tracker is not None:
            tracker.close()


def _trial_meter(task: Workload, meter: MemoryMeter | None) -> MemoryMeter | None:
    """Trials read peak memory from the device's own meter; the simulated one would slow every
    operation, so trials on the CPU run unmetered."""
    if meter is not None and not isinstance(meter, TrackedMeter):
        return meter
    return None if task.device.type == "cpu" else meter_for(task.device)


def _attach_tracker(study, tracking_uri: str | None):
    """A logging process attached to the study's MLflow run; None when the study has none."""
    from autobatch.tracking import BackgroundTracker, resolve_tracking_uri

    known = study.user_attrs.get(MLFLOW)
    if not known:
        log.warning(
            "study %r logs no MLflow runs (it was prepared with --no-mlflow); this worker "
            "logs none either",
            study.study_name,
        )
        return None
    uri = resolve_tracking_uri(tracking_uri) if tracking_uri else known["tracking_uri"]
    if redact_url(uri) != known["tracking_uri"]:
        raise InvalidInputError(
            f"study {study.study_name!r} logs to MLflow at {known['tracking_uri']}, not "
            f"{redact_url(uri)}: give --tracking-uri {known['tracking_uri']} or --no-mlflow"
        )
    if "***" in uri:
        raise InvalidInputError(
            f"study {study.study_name!r} logs to MLflow at {known['tracking_uri']}, whose "
            "password is not stored: give --tracking-uri with it, or --no-mlflow"
        )
    tracker = BackgroundTracker(uri)
    tracker.attach(known["parent_run_id"], known["experiment_id"])
    return tracker
