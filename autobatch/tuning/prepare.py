"""Prepare a study: check the inputs, probe, and write every study-level fact once, before any
worker runs a trial.

The facts: the settings (search space, budget, the task it was made for, the step times that
are the study's clock), the probe result, the notes a user should see, the seeded trials in the
queue, where the study logs to MLflow and on which host it was prepared. Workers only read them
and add trials, so nothing shared is ever read, changed and written back.

A study that already exists is joined as it is: its facts win over a new probe (on a machine
with another GPU, say); a search space that differs from the stored one is an error, a larger
``n_trials`` adds trials. Two processes preparing the same new study at once are safe: the study
is created atomically, and the one that loses the race joins the winner's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from autobatch import sqlite_store, workload
from autobatch.data import BatchSource
from autobatch.errors import InvalidInputError
from autobatch.memory import MemoryMeter
from autobatch.oom import drop_failed_attempt, is_oom_error
from autobatch.probing import probe
from autobatch.records import BASELINE, ProbeResult, StudySettings, TuneObserver
from autobatch.tracking.redact import redact_url
from autobatch.tuning import clock, lr_range, prior, sampler, scoring, space, storage
from autobatch.tuning.pruner import TimeHalvingPruner
from autobatch.workload import Workload, max_grad_norm

log = logging.getLogger(__name__)

#: Seconds to wait for another process that is creating the same study to finish preparing it.
PREPARE_WAIT = 60.0


@dataclass
class Prepared:
    """A study ready for workers, and what this process set up for it."""

    study: optuna.Study
    settings: StudySettings
    probe: ProbeResult | None
    observers: list[TuneObserver]
    tracker: Any = None  # the BackgroundTracker, when logging to MLflow
    notes: list[str] = field(default_factory=list)  # for this run only, beside the stored ones
    # A study complete in the storage whose MLflow run was stopped before the recommendation
    # reached it (interrupted as its last trial was recorded): log the recommendation now.
    unlogged: bool = False

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()  # however the study ended; a no-op once it has closed itself


def check_tune_inputs(task: Workload, *, n_trials: int | None, timeout: float | None) -> None:
    """What a tune call's parameters say together, beyond each one's declaration (checked by
    ``tune()`` against ``validation.TUNE``), before anything is built or opened."""
    workload.check(task, "tune")
    if task.validation_batches() is None:
        raise InvalidInputError(
            f"{type(task).__name__} {task.name!r} has no validation data; the tuner scores "
            "trials on validation loss, so give val_data=(inputs, targets) or a Dataset (e.g. "
            "hold out 10-20% of the training set)"
        )
    if n_trials is None and timeout is None:
        raise InvalidInputError("give n_trials, timeout or both, so the study ends")
    if task.train_size < 2:
        raise InvalidInputError(
            f"the training data of {task.name!r} has {task.train_size} sample(s); tuning needs "
            "at least 2"
        )


def prepare(
    task: Workload,
    *,
    n_trials: int | None,
    min_trials: int | None,
    timeout: float | None,
    max_epochs: float,
    candidates: Sequence[int] | None,
    objective: str,
    lr_rule: str,
    lr_multiplier_range: tuple[float, float],
    scale_adamw: bool,
    lr_range_test: bool,
    target_loss: float | None,
    tolerance: float | None,
    seed: int,
    storage_url: str | None,
    study_name: str | None,
    probe_result: ProbeResult | None,
    memory_budget: str | int | None,
    meter: MemoryMeter | None,
    headroom: float,
    max_batch_size: int | None,
    mlflow: bool,
    tracking_uri: str | None,
    experiment: str | None,
    observers: Sequence[TuneObserver],
    heartbeat_interval: int | None,
    grace_period: int | None,
    threads: int | None = None,
    cache: bool = True,
) -> Prepared:
    """A study for ``task`` with its facts written (see the module docstring); its clock is
    timed with ``threads`` torch threads, the workers' count, where given; ``cache``: the
    probe and the clock may be read from the disk cache."""
    check_tune_inputs(task, n_trials=n_trials, timeout=timeout)
    storage.check_heartbeat(heartbeat_interval, grace_period)
    # Everything that can be unreachable is contacted before any trial. The MLflow logging
    # process starts now and imports MLflow while the probe runs.
    if mlflow and storage_url is not None:
        _check_separate_files(storage_url, tracking_uri)
    new_file = storage.new_sqlite_file(storage_url)
    opened = storage.open_storage(
        storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period
    )
    name = study_name or f"autobatch-{task.name}"
    tracker = None
    try:
        tracker = _start_tracker(tracking_uri, experiment) if mlflow else None
        if lr_rule == "auto":
            lr_rule = space.rule_for(task.optimizer([torch.nn.Parameter(torch.zeros(1))], task.lr))
        wanted = {
            "objective": objective,
            "lr_rule": lr_rule,
            "lr_multiplier_range": [float(lr_multiplier_range[0]), float(lr_multiplier_range[1])],
            "scale_adamw": bool(scale_adamw),
            "max_epochs": float(max_epochs),
            "seed": seed,
            "target_loss": target_loss,
        }
        if tolerance is not None:  # None: the stored study's, or the default for a new one
            wanted["tolerance"] = tolerance
        study = _existing(opened, name, storage_url)
        if (
            study is not None
            and storage.settings_of(study) is None
            and storage.preparer_died(study)
        ):
            log.warning(
                "study %r was left half-prepared by a process that died: prepared anew", name
            )
            optuna.delete_study(study_name=name, storage=opened)
            study = None
        notes: list[str] = []
        created = False
        if study is None:
            interval, grace = storage.default_heartbeat(heartbeat_interval, grace_period)
            storage.check_heartbeat(interval, grace)
            # The trials hold tensor data on the device; so does the probe, whose ceiling then
            # leaves room for it on an accelerator (moved once, for the clock and range test).
            source = task.training_batches().to_device()
            validation = task.validation_batches()
            held = None if validation is None else validation.to_device()
            probed, ceiling = _resolve_probe(
                task, probe_result, memory_budget, meter, headroom, max_batch_size, notes, cache
            )
            del held
            sizes = space.check_candidates(candidates, ceiling, own_batch_size(task), notes)
            timed = clock.measure(task, source, sizes, threads, cache=cache)
            found = _lr_range_test(
                task, source, sizes, lr_multiplier_range, lr_range_test, timed["seconds"], notes
            )
            log.info(
                "the study's clock, ms per step: %s (%s)",
                prior.format_step_times(timed["seconds"]),
                "from the cache" if timed["cached"] else f"{timed['cost']:.1f} s to measure",
            )
            if objective == "pareto":
                notes.append("objective 'pareto' has two objectives, so pruning is off")
            settings = StudySettings(
                study_name=name,
                storage=redact_url(storage_url) if storage_url else "in-memory",
                objective=objective,
                lr_rule=lr_rule,
                lr_multiplier_range=tuple(wanted["lr_multiplier_range"]),
                candidates=tuple(sizes),
                max_epochs=float(max_epochs),
                n_trials=n_trials,
                min_trials=min_trials,
                timeout=timeout,
                seed=seed,
                sampler="TPESampler",
                pruner="none" if objective == "pareto" else "SuccessiveHalving(training ms)",
                tolerance=scoring.TOLERANCE if tolerance is None else tolerance,
                target_loss=target_loss,
                task_name=task.name,
                device=str(task.device),
                precision=task.precision,
                max_grad_norm=max_grad_norm(task),
                base_lr=task.lr,
                base_batch_size=own_batch_size(task),
                train_size=task.train_size,
                ceiling=ceiling,
                scale_adamw=bool(scale_adamw),
                eval_batch_size=None if probed is None else probed.eval_batch_size,
                lr_centre=1.0 if found is None else found.centre,
                lr_range_test=None if found is None else found.to_dict(),
                step_clock=timed if timed["seconds"] else None,
                heartbeat_interval=interval,
                grace_period=grace,
            )
            if tracker is not None:  # refused before the study exists: a rerun starts anew
                tracker.wait_ready()
            study = _create(opened, settings, probed, notes)
            if study is not None:
                try:
                    # The study's MLflow run before the mark "prepared": whoever joins finds it.
                    if tracker is not None:
                        _open_study_run(study, tracker, settings)
                    study.set_user_attr(storage.SETTINGS, settings.to_dict())
                except BaseException:
                    # Never marked prepared, it would hold up every rerun: take it away.
                    optuna.delete_study(study_name=name, storage=opened)
                    raise
                created = True
        elif storage.settings_of(study) is None:
            study = None  # another process is preparing it: wait for its facts
        if study is None:
            study = wait_prepared(opened, name, PREPARE_WAIT)
        settings = _joined(study, task, wanted, candidates, n_trials, min_trials, max_batch_size)
        beats = storage.heartbeat_of(settings, heartbeat_interval, grace_period)
        storage.use_heartbeat(opened, *beats)
        for note in study.user_attrs.get(storage.NOTES, []):
            log.warning(note)
        prepared = Prepared(
            study=study,
            settings=settings,
            probe=storage.probe_of(study),
            observers=list(observers),
            tracker=tracker,
        )
        trials = study.get_trials(deepcopy=False)
        state = storage.progress(trials)
        finished = state.finished
        done = None
        if settings.n_trials is not None and finished >= settings.n_trials:
            done = (
                f"the study already has {finished} finished trials (n_trials={settings.n_trials}); "
                "raise n_trials (--n-trials) to add trials"
            )
        elif (why := storage.settled(state, storage.records(trials), settings)) is not None:
            done = (
                f"the study {why}; raise min_trials (--min-trials) above {finished} to add trials"
            )
        if done is not None:
            prepared.notes.append(done)
            prepared.unlogged = tracker is not None and _unended_run(
                study, tracker.tracking_uri, trials
            )
            if tracker is not None and not prepared.unlogged:  # nothing to log: no run opened
                tracker.close()
                prepared.tracker = tracker = None
        if tracker is not None:
            if not created:
                tracker.wait_ready()
                _open_study_run(study, tracker, settings)
            prepared.observers.append(tracker)
        return prepared
    except BaseException:
        if tracker is not None:
            tracker.close()
        if new_file is not None:
            storage.remove_if_unused(opened, new_file)
        raise


def _lr_range_test(
    task: Workload,
    source: BatchSource,
    sizes: Sequence[int],
    multipliers: tuple[float, float],
    wanted: bool,
    step_seconds: Mapping[Any, float],
    notes: list[str],
) -> lr_range.RangeTest | None:
    """The range test at the baseline's batch size, where asked for and the multiplier range
    is wide enough to search (a narrower one pins the rate: see ``space.past_the_edge``). Its
    steps are counted on the study's clock (``step_seconds``), as the trials' are, so the
    study's compute is the same on every rerun, however busy the machine was."""
    if not wanted or space.pinned(multipliers):
        return None
    base = next(size for role, size in space.seeds(sizes, own_batch_size(task)) if role == BASELINE)
    try:
        found = lr_range.range_test(task, source, base, multipliers)
    except BaseException as exc:
        if not is_oom_error(exc):
            raise
        drop_failed_attempt(exc)
        notes.append(
            f"the learning-rate range test ran out of memory at batch size {base}, so it was "
            "skipped: the multipliers are centred on x1"
        )
        return None
    if (timing := prior.clock_of(step_seconds)) is not None:
        found = replace(found, seconds=found.steps * timing(base), wall_seconds=found.seconds)
    log.info(
        "learning-rate range test: lowest loss at rate %.3g, a tenth of which is x%.3g of the "
        "task's; the multipliers are centred on x%.3g",
        found.lr_at_minimum,
        found.suggested,
        found.centre,
    )
    return found


def pruner_for(settings: StudySettings) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner() if settings.objective == "pareto" else TimeHalvingPruner()


def load(opened: optuna.storages.BaseStorage, name: str, worker: str | None = None) -> optuna.Study:
    """The prepared study ``name``, with this process's sampler and pruner."""
    study = optuna.load_study(study_name=name, storage=opened)
    settings = storage.settings_of(study)
    if settings is not None:
        study.sampler = sampler.sampler_for(settings, worker)
        study.pruner = pruner_for(settings)
    return study


def wait_prepared(
    opened: optuna.storages.BaseStorage, name: str, seconds: float, worker: str | None = None
) -> optuna.Study:
    """The study ``name`` once its facts are written; waits up to ``seconds`` for it."""
    deadline = time.monotonic() + seconds
    announced = False
    while True:
        try:
            study = load(opened, name, worker)
        except KeyError:
            study = None
        if study is not None and storage.settings_of(study) is not None:
            return study
        if time.monotonic() >= deadline:
            state = "exists but was never prepared" if study is not None else "does not exist"
            raise InvalidInputError(
                f"study {name!r} {state} after {seconds:.0f} s; start it with "
                "`autobatch tune` (same --storage and --study-name), or, if the process that "
                f"created it died, delete it (optuna delete-study --study-name {name} "
                "--storage URL) and run again"
            )
        if not announced:
            log.warning("waiting for study %r to be prepared by `autobatch tune`", name)
            announced = True
        time.sleep(0.5)


# -- helpers --------------------------------------------------------------------------------


def _check_separate_files(storage_url: str, tracking_uri: str | None) -> None:
    """The study and MLflow in one SQLite file break each other's schema: refuse it first."""
    from autobatch.tracking import resolve_tracking_uri

    study_file = sqlite_store.path_of(storage_url)
    mlflow_file = sqlite_store.path_of(resolve_tracking_uri(tracking_uri))
    if study_file and mlflow_file and study_file.resolve() == mlflow_file.resolve():
        raise InvalidInputError(
            f"--storage and --tracking-uri name the same file, {study_file}; give each store a "
            "file of its own (e.g. sqlite:///autobatch.db and sqlite:///mlflow.db)"
        )


def _start_tracker(tracking_uri: str | None, experiment: str | None) -> Any:
    from autobatch.tracking import BackgroundTracker, resolve_tracking_uri

    return BackgroundTracker(resolve_tracking_uri(tracking_uri), experiment=experiment, wait=False)


def _existing(
    opened: optuna.storages.BaseStorage, name: str, url: str | None
) -> optuna.Study | None:
    """The study ``name`` if it exists, checked to be usable from this machine."""
    try:
        opened.get_study_id_from_name(name)
    except KeyError:
        return None
    study = load(opened, name, storage.worker_name())
    check_shareable(study, url)
    if storage.settings_of(study) is None and study.user_attrs.get(storage.SPACE) is not None:
        raise InvalidInputError(
            f"study {name!r} in {redact_url(url or 'memory')} was made by an older autobatch; "
            "give a new --study-name"
        )
    return study


def check_shareable(study: optuna.Study, url: str | None) -> None:
    """A SQLite study is for the machine that prepared it; one line saying so elsewhere."""
    host = study.user_attrs.get(storage.HOST)
    if url and url.startswith("sqlite") and host and host != storage.hostname():
        raise InvalidInputError(
            f"study {study.study_name!r} in {redact_url(url)} was prepared on {host}: a SQLite "
            "file is for one machine; workers on several machines share a database server "
            "(e.g. --storage postgresql://user@host/db, see docs/scale-out.md)"
        )


def _create(
    opened: optuna.storages.BaseStorage,
    settings: StudySettings,
    probed: ProbeResult | None,
    notes: list[str],
) -> optuna.Study | None:
    """Create the study and write its facts but the settings, which mark it prepared; None
    if another process created it first."""
    kwargs: dict[str, Any] = (
        {"directions": ["minimize", "minimize"]}
        if settings.objective == "pareto"
        else {"direction": "minimize"}
    )
    try:
        study = optuna.create_study(
            storage=opened,
            study_name=settings.study_name,
            sampler=sampler.sampler_for(settings),
            pruner=pruner_for(settings),
            load_if_exists=False,
            **kwargs,
        )
    except optuna.exceptions.DuplicatedStudyError:
        return None
    study.set_user_attr(storage.HOST, storage.hostname())
    study.set_user_attr(storage.PREPARER, storage.worker_name())
    study.set_user_attr(storage.PROBE, None if probed is None else probed.to_dict())
    study.set_user_attr(storage.NOTES, list(notes))
    for role, size in space.seeds(settings.candidates, settings.base_batch_size):
        # The baseline is the task's own configuration; the others start from the centre.
        multiplier = 1.0 if role == BASELINE else settings.lr_centre
        study.enqueue_trial(
            {"batch_size": size, "lr_multiplier": multiplier}, user_attrs={storage.ROLE: role}
        )
    return study


def _joined(
    study: optuna.Study,
    task: Workload,
    wanted: dict[str, Any],
    candidates: Sequence[int] | None,
    n_trials: int | None,
    min_trials: int | None,
    max_batch_size: int | None = None,
) -> StudySettings:
    """The stored settings, checked against this call's; a larger ``n_trials`` or
    ``min_trials`` is stored, a smaller one ignored with a warning."""
    settings = storage.settings_of(study)
    assert settings is not None
    check_same_task(settings, task)
    stored = settings.to_dict()
    stored["lr_multiplier_range"] = list(stored["lr_multiplier_range"])
    changed = sorted(key for key, value in wanted.items() if stored[key] != value)
    ceiling = settings.ceiling
    if candidates is not None and ceiling is not None:
        kept = sorted({c for c in candidates if c <= ceiling})
        if kept != list(settings.candidates):
            changed.append("candidates")
    if max_batch_size is not None and max(settings.candidates) > max_batch_size:
        changed.append(f"candidates up to {max(settings.candidates)}, above max_batch_size")
    if changed:
        raise InvalidInputError(
            f"study {settings.study_name!r} already exists in {settings.storage} with a "
            f"different search space ({', '.join(changed)}); use a new --study-name, or the "
            "same settings to continue it"
        )
    # Only ever raised: other workers may be running the study to the stored counts, and a
    # lower one would end this process's share early with another's answer (None: no limit).
    counts = (
        ("n_trials", n_trials, settings.n_trials),
        ("min_trials", min_trials, settings.min_trials),
    )
    raised = {name: given for name, given, now in counts if _more(given, now)}
    lower = [f"{name}={given} (it has {now})" for name, given, now in counts if _more(now, given)]
    if lower:
        log.warning(
            "study %r keeps its counts, which are only ever raised: ignored %s; stop it with "
            "Ctrl-C to end it sooner",
            settings.study_name,
            ", ".join(lower),
        )
    if raised:
        settings = replace(settings, **raised)
        study.set_user_attr(storage.SETTINGS, settings.to_dict())
    return settings


def _more(count: int | None, than: int | None) -> bool:
    """Whether the trial count ``count`` is larger than ``than`` (None: no limit)."""
    return count != than and (count is None or (than is not None and count > than))


def own_batch_size(task: Workload) -> int:
    """The batch size the task's rate was set for, as it trains: a batch larger than the
    training set is the whole set, so its rate is carried from there, not scaled down to it."""
    return min(task.batch_size, task.train_size)


def check_same_task(settings: StudySettings, task: Workload) -> None:
    """A worker's task must be the one the study was prepared for."""
    pairs = (
        ("task", task.name, settings.task_name),
        ("training samples", task.train_size, settings.train_size),
        ("learning rate", task.lr, settings.base_lr),
        ("batch size", own_batch_size(task), settings.base_batch_size),
        ("precision", task.precision, settings.precision),
        ("max_grad_norm", max_grad_norm(task), settings.max_grad_norm),
    )
    differ = [f"{label} {mine!r} here, {theirs!r} in the study" for label, mine, theirs in pairs
              if mine != theirs]  # fmt: skip
    if differ:
        raise InvalidInputError(
            f"this task is not the one study {settings.study_name!r} was prepared for "
            f"({'; '.join(differ)}); give the same TARGET, or a new --study-name"
        )


#: A complete study's MLflow run still RUNNING this long after its last trial ended was never
#: told the end (the tracking server was down then), rather than being told it now.
LOGGING_GRACE = 120.0


def _unended_run(study: optuna.Study, tracking_uri: str, trials: Sequence[FrozenTrial]) -> bool:
    """Whether the complete study's MLflow run in this store was never told its end: ended
    KILLED (stopped at its last trial), or still RUNNING :data:`LOGGING_GRACE` seconds after
    the last trial ended (its logging cut off by a tracking server that was down). Read only
    on a rerun of a complete study (MLflow's import costs seconds)."""
    run_id = _study_run_id(study, tracking_uri)
    if run_id is None:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    if run.info.status == "KILLED":
        return True
    if run.info.status != "RUNNING" or storage.progress(trials).running:
        return False
    ended = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    wait = LOGGING_GRACE - (time.time() - max(ended)) if ended else 0.0
    if wait > 0:
        log.warning(
            "study %r is complete but its MLflow run is still RUNNING: a worker may still be "
            "logging its end; if none is (the tracking server was down), run the same command "
            "again in %.0f s to log it",
            study.study_name,
            math.ceil(wait),
        )
        return False
    return True


def _open_study_run(study: optuna.Study, tracker: Any, settings: StudySettings) -> None:
    """One MLflow run per study: reopened when the study has one in this store, else made and
    its id stored on the study for every worker."""
    run_id = _study_run_id(study, tracker.tracking_uri)
    parent = tracker.open_study_run(settings, storage.probe_of(study), run_id)
    if parent is not None and parent != run_id:
        study.set_user_attr(
            storage.MLFLOW,
            {
                "tracking_uri": redact_url(tracker.tracking_uri),
                "experiment_id": tracker.experiment_id,
                "parent_run_id": parent,
            },
        )


def _study_run_id(study: optuna.Study, tracking_uri: str) -> str | None:
    """The id of the study's MLflow run in the store at ``tracking_uri``, if it has one."""
    known = study.user_attrs.get(storage.MLFLOW) or {}
    if known.get("tracking_uri") != redact_url(tracking_uri):
        return None  # logged to another store before
    return known.get("parent_run_id")


def _resolve_probe(
    task: Workload,
    given: ProbeResult | None,
    memory_budget: str | int | None,
    meter: MemoryMeter | None,
    headroom: float,
    max_batch_size: int | None,
    notes: list[str],
    cache: bool = True,
) -> tuple[ProbeResult | None, int]:
    train_size = task.train_size
    if given is not None:  # checked at the boundary
        return given, min(given.batch_size, train_size)
    if task.device.type == "cpu" and memory_budget is None and meter is None:
        ceiling = min(train_size, max_batch_size or train_size)
        notes.append(
            f"probe skipped: the CPU has no accelerator memory to probe, so batch sizes go up to "
            f"{ceiling} (give memory_budget to simulate an accelerator)"
        )
        return None, ceiling
    result = probe(
        task,
        memory_budget=memory_budget,
        meter=meter,
        headroom=headroom,
        max_batch_size=max_batch_size,
        cache=cache,
    )
    return result, result.batch_size
