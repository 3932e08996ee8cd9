"""Optuna trials over batch sizes up to the probed ceiling: batch size, epochs and learning rate.

Each trial trains a fresh model (same seed, same data order) at one batch size and learning
rate, and is scored by how many training seconds its smoothed validation loss needs to reach
a target, the baseline's best loss unless the user gives one. The epoch count comes from each
trial's learning curve, not from separate trials.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from autobatch import curves
from autobatch.data import BatchSource
from autobatch.errors import AutobatchError, InvalidInputError, StudyInterrupted
from autobatch.lr_rules import check_rule, rule_for, scale_lr
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.oom import drop_failed_attempt, is_oom_error
from autobatch.probing import DEFAULT_HEADROOM, probe
from autobatch.records import (
    COMPLETE,
    FAILED,
    INFEASIBLE,
    PRUNED,
    RUNNING,
    EvalPoint,
    ProbeResult,
    StudySettings,
    TrialRecord,
    TuneObserver,
    TuneResult,
)
from autobatch.task import Task
from autobatch.tracking.redact import redact_url
from autobatch.trial_loop import StopTrial, TrialFailed, train

log = logging.getLogger(__name__)

OBJECTIVES = ("time", "loss", "pareto")
#: A trial that never reaches the target scores its whole training time times this.
MISS_PENALTY = 2.0
_INFEASIBLE_VALUE = 1e12
_SPACE_KEYS = ("objective", "lr_rule", "lr_multiplier_range", "candidates", "max_epochs", "seed")


def default_candidates(ceiling: int, base: int) -> list[int]:
    """Powers of two up to the ceiling, the ceiling itself, and the task's own batch size."""
    sizes = {2**k for k in range(int(math.log2(ceiling)) + 1)} | {ceiling}
    if base <= ceiling:
        sizes.add(base)
    return sorted(sizes)


def _check_candidates(
    candidates: Sequence[int] | None, ceiling: int, base: int, notes: list[str]
) -> list[int]:
    if candidates is None:
        return default_candidates(ceiling, base)
    values = list(candidates)
    if not values or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in values):
        raise InvalidInputError(
            f"candidates={values!r} must be a list of positive integers, e.g. [16, 32, 64]"
        )
    too_big = sorted(c for c in values if c > ceiling)
    kept = sorted({c for c in values if c <= ceiling})
    if too_big:
        notes.append(
            f"dropped candidate batch sizes {too_big}: above the ceiling of {ceiling} "
            "(what fits in memory, or the training set size)"
        )
    if not kept:
        raise InvalidInputError(
            f"no candidate batch size is at or below the ceiling of {ceiling}; give smaller ones"
        )
    return kept


def _storage(url: str | None) -> Any:
    if url is None:
        return None
    try:
        return optuna.storages.get_storage(url)
    except Exception as exc:  # SQLAlchemy/driver errors of every kind, all meaning "unusable"
        raise InvalidInputError(
            f"cannot open the study storage {redact_url(url)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}; check the URL (e.g. sqlite:///autobatch.db) "
            "and that the database server is running"
        ) from None


class _LazyHalvingPruner(optuna.pruners.BasePruner):
    """Successive halving on training milliseconds, its first rung set from the baseline.

    Trials are compared at equal training time, the axis the objective is measured on; the
    first rung at a fifth of the baseline's run and a bootstrap of two trials per rung keep it
    from judging noisy curves too early.
    """

    def __init__(self, reduction_factor: int = 3) -> None:
        self.reduction_factor = reduction_factor
        self._inner: optuna.pruners.BasePruner | None = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self._inner is None:
            base_ms = study.user_attrs.get("autobatch_baseline_ms")
            if not base_ms:
                return False
            self._inner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=max(1, int(base_ms / 5)),
                reduction_factor=self.reduction_factor,
                bootstrap_count=2,
            )
        return self._inner.prune(study, trial)


def _resolve_probe(
    task: Task,
    given: ProbeResult | None,
    memory_budget: str | int | None,
    meter: MemoryMeter | None,
    headroom: float,
    max_batch_size: int | None,
    notes: list[str],
) -> tuple[ProbeResult | None, int]:
    train_size = task.train_size
    if given is not None:
        if not isinstance(given, ProbeResult):
            raise InvalidInputError("probe= must be a ProbeResult from autobatch.probe()")
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
    )
    return result, result.batch_size


class _Observers:
    """Fan-out to observers; one observer's failure never stops training."""

    def __init__(self, observers: Sequence[TuneObserver]) -> None:
        self.observers = list(observers)

    def __getattr__(self, name: str):
        def call(*args: Any) -> None:
            for observer in self.observers:
                try:
                    getattr(observer, name)(*args)
                except Exception:  # an observer must never stop the study
                    log.warning(
                        "observer %s failed in %s", type(observer).__name__, name, exc_info=True
                    )

        return call


def tune(
    task: Task,
    *,
    n_trials: int | None = 20,
    timeout: float | None = None,
    max_epochs: float = 10,
    candidates: Sequence[int] | None = None,
    objective: str = "time",
    lr_rule: str = "auto",
    lr_multiplier_range: tuple[float, float] = (0.25, 4.0),
    target_loss: float | None = None,
    tolerance: float = 0.05,
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
) -> TuneResult:
    """Recommend a batch size, epoch count and learning rate for ``task``.

    Probes the memory ceiling (or takes ``probe_result``), then runs an Optuna study over
    batch sizes up to it and learning-rate multipliers around the rule-scaled rate. The
    baseline (the task's own batch size and learning rate), the ceiling and the middle of the
    range run first. ``objective="time"`` minimises training seconds until the smoothed
    validation loss reaches ``target_loss x (1 + tolerance)``; ``"loss"`` minimises the best
    validation loss; ``"pareto"`` keeps both (no pruning). With ``storage`` (any Optuna URL,
    e.g. ``sqlite:///autobatch.db``) the study is resumable: rerunning the same
    ``study_name`` continues it up to ``n_trials`` trials in total.

    With ``mlflow`` (the default) the study, every trial and the recommendation are logged to
    ``tracking_uri`` (default ``sqlite:///mlflow.db`` in the working directory) into
    ``experiment`` (default: the study's name), from a separate process, so logging does not
    slow the trials; ``result.mlflow_run_id`` is the study's run. ``observers`` receive every
    event as it happens (see :class:`TuneObserver`).

    Example::

        from autobatch.examples import digits
        result = tune(digits(), n_trials=8, max_epochs=5, mlflow=False)
        print(result.batch_size, result.epochs, result.lr)
    """
    if not isinstance(task, Task):
        raise InvalidInputError(f"tune() needs an autobatch.Task; got {type(task).__name__}")
    if task.val_data is None:
        raise InvalidInputError(
            "Task.val_data is missing; the tuner scores trials on validation loss, so give "
            "val_data=(inputs, targets) or a Dataset (e.g. hold out 10-20% of the training set)"
        )
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    check_rule(lr_rule)
    if target_loss is not None and (
        isinstance(target_loss, bool)
        or not isinstance(target_loss, int | float)
        or not math.isfinite(target_loss)
    ):
        raise InvalidInputError(f"target_loss={target_loss!r} must be a finite number, e.g. 0.25")
    low, high = lr_multiplier_range
    if not 0 < low <= 1 <= high:
        raise InvalidInputError(
            f"lr_multiplier_range={lr_multiplier_range!r} must satisfy 0 < low <= 1 <= high"
        )
    if n_trials is None and timeout is None:
        raise InvalidInputError("give n_trials, timeout or both, so the study ends")
    if n_trials is not None and n_trials < 1:
        raise InvalidInputError(f"n_trials={n_trials} must be >= 1")
    if not max_epochs > 0:
        raise InvalidInputError(f"max_epochs={max_epochs} must be > 0")
    notes: list[str] = []
    if task.train_size < 2:
        raise InvalidInputError(
            f"Task.train_data has {task.train_size} sample(s); tuning needs at least 2"
        )
    # Everything that can be unreachable is contacted before any trial. The MLflow logging
    # process starts now and imports MLflow while the probe and the first trial run.
    opened_storage = _storage(storage)
    all_observers = list(observers)
    tracker = None
    if mlflow:
        from autobatch.tracking import BackgroundTracker, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        tracker = BackgroundTracker(uri, experiment=experiment, wait=False)
        all_observers.append(tracker)
    try:
        probed, ceiling = _resolve_probe(
            task, probe_result, memory_budget, meter, headroom, max_batch_size, notes
        )
        sizes = _check_candidates(candidates, ceiling, task.batch_size, notes)
        if objective == "pareto":
            notes.append("objective 'pareto' has two objectives, so pruning is off")
        if lr_rule == "auto":
            lr_rule = rule_for(task.optimizer([torch.nn.Parameter(torch.zeros(1))], task.lr))

        name = study_name or f"autobatch-{task.name}"
        settings = StudySettings(
            study_name=name,
            storage=redact_url(storage) if storage else "in-memory",
            objective=objective,
            lr_rule=lr_rule,
            lr_multiplier_range=(float(low), float(high)),
            candidates=tuple(sizes),
            max_epochs=float(max_epochs),
            n_trials=n_trials,
            timeout=timeout,
            seed=seed,
            sampler="TPESampler",
            pruner="none" if objective == "pareto" else "SuccessiveHalving(training ms)",
            tolerance=tolerance,
            target_loss=target_loss,
            task_name=task.name,
            device=str(task.device),
            precision=task.precision,
            base_lr=task.lr,
            base_batch_size=task.batch_size,
            train_size=task.train_size,
        )
        if tracker is not None:
            tracker.ensure_usable()
        study = _open_study(settings, opened_storage, seed)
        # Trials read peak memory from the device's own meter; the simulated one would slow every
        # operation, so trials on the CPU run unmetered.
        if meter is not None and not isinstance(meter, TrackedMeter):
            trial_meter = meter
        else:
            trial_meter = None if task.device.type == "cpu" else meter_for(task.device)
        runner = _StudyRunner(
            task=task,
            study=study,
            settings=settings,
            ceiling=ceiling,
            probe=probed,
            observers=_Observers(all_observers),
            progress=progress,
            meter=trial_meter,
        )
        for note in notes:
            log.warning(note)
        runner.notes.extend(notes)
        result = runner.run()
    finally:
        if tracker is not None:
            tracker.close()  # however the study ended; a no-op once it has closed itself
    if tracker is not None:
        result = replace(result, mlflow_run_id=tracker.parent_run_id)
    return result


def _open_study(settings: StudySettings, storage: Any, seed: int) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Random start-up trials on top of the three seeded ones: a quarter of the budget, so
        # a short study still spends most of its trials guided.
        startup = min(8, max(2, (settings.n_trials or 20) // 4))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    pruner = optuna.pruners.NopPruner() if settings.objective == "pareto" else _LazyHalvingPruner()
    kwargs: dict[str, Any] = {}
    if settings.objective == "pareto":
        kwargs["directions"] = ["minimize", "minimize"]
    else:
        kwargs["direction"] = "minimize"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=settings.study_name,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
            **kwargs,
        )
    space = {k: v for k, v in settings.to_dict().items() if k in _SPACE_KEYS}
    space["lr_multiplier_range"] = list(space["lr_multiplier_range"])
    space["candidates"] = list(space["candidates"])
    stored = study.user_attrs.get("autobatch_space")
    if stored is None:
        study.set_user_attr("autobatch_space", space)
    elif stored != space:
        changed = sorted(k for k in space if stored.get(k) != space[k])
        raise InvalidInputError(
            f"study {settings.study_name!r} already exists in {settings.storage} with a "
            f"different search space ({', '.join(changed)}); use a new --study-name, or the "
            "same settings to continue it"
        )
    return study


class _StudyRunner:
    def __init__(
        self,
        *,
        task: Task,
        study: optuna.Study,
        settings: StudySettings,
        ceiling: int,
        probe: ProbeResult | None,
        observers: _Observers,
        progress: bool,
        meter: MemoryMeter | None,
    ) -> None:
        self.task = task
        self.study = study
        self.settings = settings
        self.ceiling = ceiling
        self.probe = probe
        self.observers = observers
        self.progress = progress
        self.meter = meter
        self.notes: list[str] = []
        self.train = BatchSource(task.train_data, task.device, task.collate_fn).to_device()
        self.val = BatchSource(task.val_data, task.device, task.collate_fn).to_device()
        self.distributions = {
            "batch_size": CategoricalDistribution(list(settings.candidates)),
            "lr_multiplier": FloatDistribution(*settings.lr_multiplier_range, log=True),
        }

    # -- study-level state kept in Optuna storage, so a resumed study sees it --------------

    @property
    def target(self) -> float | None:
        if self.settings.target_loss is not None:
            return float(self.settings.target_loss)
        return self.study.user_attrs.get("autobatch_target_loss")

    @property
    def infeasible(self) -> set[int]:
        return set(self.study.user_attrs.get("autobatch_infeasible", []))

    def _records(self) -> list[TrialRecord]:
        records = []
        for trial in self.study.get_trials(deepcopy=False):
            data = trial.user_attrs.get("autobatch_record")
            if data is not None and trial.user_attrs.get("autobatch_counted", True):
                records.append(TrialRecord.from_dict(data))
        return records

    def _seed_queue(self) -> None:
        if self.study.get_trials(deepcopy=False):
            return
        sizes = self.settings.candidates
        base = min(sizes, key=lambda s: abs(s - self.task.batch_size))
        middle = sizes[len(sizes) // 2]
        seeds = [base, max(sizes), middle]
        for size in dict.fromkeys(seeds):
            self.study.enqueue_trial(
                {"batch_size": size, "lr_multiplier": 1.0}, user_attrs={"autobatch_seed": True}
            )

    def _finished_count(self) -> int:
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("autobatch_counted", True)
        )

    def run(self) -> TuneResult:
        import time

        self._seed_queue()
        self.observers.study_started(self.settings, self.probe)
        start = time.monotonic()
        n_trials, timeout = self.settings.n_trials, self.settings.timeout
        bar = _Progress(n_trials, self._finished_count()) if self.progress else None
        try:
            while True:
                done = self._finished_count()
                if n_trials is not None and done >= n_trials:
                    break
                if timeout is not None and time.monotonic() - start >= timeout:
                    break
                if not self._one_trial(bar):
                    self.notes.append("every candidate batch size is infeasible; stopped early")
                    break
        except KeyboardInterrupt:
            self.observers.study_interrupted("interrupted by the user")
            raise StudyInterrupted(
                f"{self._finished_count()} finished trial(s) are kept in "
                f"{self.settings.storage}; run the same command (same study name and storage) "
                "to resume"
            ) from None
        finally:
            if bar is not None:
                bar.close()
        result = self._result()
        self.study.set_user_attr("autobatch_recommendation", result.recommendation())
        self.observers.study_finished(result)
        return result

    def _ask(self) -> optuna.Trial | None:
        """The next trial whose batch size is not known to be infeasible."""
        for _ in range(50):
            trial = self.study.ask(self.distributions)
            size = trial.params["batch_size"]
            if size not in self.infeasible:
                return trial
            # Known not to fit: no training, not counted as a trial. Told as the worst possible
            # result, with its constraint violated, so the sampler learns to avoid the size (a
            # failed trial would be ignored by TPE and proposed again and again).
            trial.set_user_attr("autobatch_counted", False)
            trial.set_user_attr("reason", f"batch size {size} is known to be infeasible")
            trial.set_constraint("final_loss", _INFEASIBLE_VALUE)
            worst = [_INFEASIBLE_VALUE] * (2 if self.settings.objective == "pareto" else 1)
            self.study.tell(trial, worst if len(worst) > 1 else worst[0])
        return None

    def _one_trial(self, bar: Any) -> bool:
        trial = self._ask()
        if trial is None:
            return False
        size = int(trial.params["batch_size"])
        multiplier = float(trial.params["lr_multiplier"])
        rule = self.settings.lr_rule
        lr = scale_lr(self.task.lr, self.task.batch_size, size, rule) * multiplier
        record = TrialRecord(
            number=trial.number,
            state=RUNNING,
            batch_size=size,
            lr=lr,
            lr_multiplier=multiplier,
            lr_rule=rule,
            iterations_per_epoch=math.ceil(self.settings.train_size / size),
            max_epochs=self.settings.max_epochs,
            seed=self.task.seed,
        )
        self.observers.trial_started(trial, record)
        if bar is not None:
            bar.start_trial(record, int(self.settings.max_epochs * self.settings.train_size))
        points: list[EvalPoint] = []
        objective = self.settings.objective
        level = (
            None if self.target is None else curves.threshold(self.target, self.settings.tolerance)
        )
        pruned = False
        # Seeded trials are the reference points every other trial is judged against.
        prunable = objective != "pareto" and not trial.user_attrs.get("autobatch_seed", False)

        def on_eval(point: EvalPoint) -> None:
            nonlocal pruned
            points.append(point)
            self.observers.evaluated(record, point)
            if bar is not None:
                bar.evaluated(point)
            if objective == "pareto":
                return
            trial.report(point.val_loss_smoothed, step=max(1, int(point.seconds * 1000)))
            if prunable and trial.should_prune():
                pruned = True
                raise StopTrial
            if objective == "time" and level is not None and _plateaued(points, level):
                raise StopTrial

        state, reason = COMPLETE, None
        run = None
        try:
            run = train(
                self.task,
                self.train,
                self.val,
                batch_size=size,
                lr=lr,
                max_epochs=self.settings.max_epochs,
                eval_batch_size=min(self.ceiling, max(size, 256), len(self.val)),
                on_eval=on_eval,
                meter=self.meter,
            )
        except TrialFailed as exc:
            state, reason = FAILED, str(exc)
        except KeyboardInterrupt:
            # Not counted, and queued again, so the resumed study runs it from the start.
            record = replace(record, state=FAILED, reason="interrupted", curve=tuple(points))
            trial.set_user_attr("autobatch_counted", False)
            self.study.enqueue_trial(
                trial.params,
                user_attrs={"autobatch_seed": trial.user_attrs.get("autobatch_seed", False)},
            )
            self._finish(trial, record)
            if bar is not None:
                bar.end_trial(record)
            raise
        except BaseException as exc:
            if not is_oom_error(exc):
                trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:500])
                self.study.tell(trial, state=TrialState.FAIL)
                self.observers.study_interrupted(f"error in trial {trial.number}: {exc!r}"[:500])
                raise
            drop_failed_attempt(exc)
            state, reason = INFEASIBLE, f"out of memory at batch size {size}"
            self.study.set_user_attr("autobatch_infeasible", sorted(self.infeasible | {size}))
        if pruned:
            state, reason = PRUNED, "successive halving: behind other trials at equal training time"
        record = self._measure(record, points, run, state, reason)
        self._tell(trial, record)
        if bar is not None:
            bar.end_trial(record)
        return True

    def _measure(self, record, points, run, state, reason) -> TrialRecord:
        seconds = [p.seconds for p in points]
        smoothed = [p.val_loss_smoothed for p in points]
        updates: dict[str, Any] = {"state": state, "reason": reason, "curve": tuple(points)}
        if run is not None:
            updates["train_seconds"] = run.train_seconds
            updates["epoch_seconds"] = run.epoch_seconds
        if points:
            choice = curves.choose_epochs(
                [p.epoch for p in points],
                smoothed,
                self.settings.max_epochs,
                self.settings.tolerance,
            )
            updates["best_val_loss"] = min(smoothed)
            updates["recommended_epochs"] = float(choice.epochs)
            updates["auc"] = curves.area_under(seconds, smoothed)
            if choice.warning and state == COMPLETE:
                updates["reason"] = choice.warning
        return replace(record, **updates)

    def _tell(self, trial: optuna.Trial, record: TrialRecord) -> None:
        objective = self.settings.objective
        if record.state == COMPLETE and record.best_val_loss is not None:
            # The first completed trial (the baseline) sets the pruner's first rung, and the
            # target everyone must reach unless the user gave one.
            if "autobatch_baseline_ms" not in self.study.user_attrs:
                self.study.set_user_attr("autobatch_baseline_ms", int(record.train_seconds * 1000))
            if self.target is None:
                self.study.set_user_attr("autobatch_target_loss", record.best_val_loss)
        target = self.target
        if record.state == COMPLETE and target is not None:
            level = curves.threshold(target, self.settings.tolerance)
            hit = curves.first_reaching([p.val_loss_smoothed for p in record.curve], level)
            if hit is not None:
                point = record.curve[hit]
                record = replace(
                    record, time_to_target=point.seconds, samples_to_target=point.samples
                )
            score = {
                "time": record.time_to_target
                if record.time_to_target is not None
                else record.train_seconds * MISS_PENALTY,
                "loss": record.best_val_loss,
            }
            values: Any = (
                [score["time"], score["loss"]] if objective == "pareto" else score[objective]
            )
            trial.set_constraint("final_loss", record.best_val_loss - level)
            record = replace(record, value=values if objective != "pareto" else values[0])
            self._finish(trial, record, values)
        else:
            self._finish(trial, record)

    def _finish(self, trial: optuna.Trial, record: TrialRecord, values: Any = None) -> None:
        """Tell the observers, keep the record on the trial, and tell Optuna ``values`` (or,
        without them, that the trial was pruned or failed).

        Observers come first: until Optuna is told, an observer can still set the trial's user
        attributes, which is how the MLflow tracker links the trial to its run. A Ctrl-C while
        they are told still records the trial in Optuna, then stops the study.
        """
        interrupted = False
        try:
            self.observers.trial_finished(record)
        except KeyboardInterrupt:
            interrupted = True
        run_id = trial.user_attrs.get("mlflow_run_id")
        trial.set_user_attr("autobatch_record", replace(record, mlflow_run_id=run_id).to_dict())
        if values is not None:
            self.study.tell(trial, values)
        else:
            if record.reason:
                trial.set_user_attr("reason", record.reason)
            state = TrialState.PRUNED if record.state == PRUNED else TrialState.FAIL
            self.study.tell(trial, state=state)
        if interrupted:
            raise KeyboardInterrupt

    def _result(self) -> TuneResult:
        records = self._records()
        target = self.target
        level = None if target is None else curves.threshold(target, self.settings.tolerance)
        complete = [r for r in records if r.state == COMPLETE and r.value is not None]
        if not complete:
            raise AutobatchError(
                "no trial completed, so there is nothing to recommend; see the trial reasons "
                "(e.g. a learning rate that diverges: narrow lr_multiplier_range) and rerun"
            )
        feasible = [
            r
            for r in complete
            if level is None or (r.best_val_loss is not None and r.best_val_loss <= level)
        ] or complete
        if self.settings.objective == "loss":
            best = min(feasible, key=lambda r: r.best_val_loss)
        else:
            best = min(feasible, key=lambda r: (r.value, r.best_val_loss))
        notes = list(self.notes)
        choice = (
            curves.choose_epochs(
                [p.epoch for p in best.curve],
                [p.val_loss_smoothed for p in best.curve],
                self.settings.max_epochs,
                self.settings.tolerance,
            )
            if best.curve
            else None
        )
        if choice is not None and choice.warning:
            notes.append(f"trial {best.number}: {choice.warning}")
        return TuneResult(
            batch_size=best.batch_size,
            epochs=int(best.recommended_epochs or 1),
            lr=best.lr,
            lr_multiplier=best.lr_multiplier,
            best_trial=best.number,
            target_loss=target,
            probe=self.probe,
            trials=tuple(records),
            settings=self.settings,
            warnings=tuple(notes),
            study=self.study,
        )


def _plateaued(points: list[EvalPoint], level: float, patience: int = 3) -> bool:
    """Target reached and no new best for ``patience`` evaluations: nothing left to learn."""
    smoothed = [p.val_loss_smoothed for p in points]
    if curves.first_reaching(smoothed, level) is None or len(smoothed) <= patience:
        return False
    best_index = min(range(len(smoothed)), key=smoothed.__getitem__)
    return len(smoothed) - 1 - best_index >= patience


class _Progress:
    """A bar over trials and one over the running trial's samples (stderr, via tqdm)."""

    def __init__(self, total: int | None, initial: int) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.trials = tqdm(total=total, initial=initial, desc="trials", unit="trial")
        self.trial = None

    def start_trial(self, record: TrialRecord, total_samples: int) -> None:
        self.trial = self._tqdm(
            total=total_samples,
            desc=f"trial {record.number} (batch {record.batch_size})",
            unit="sample",
            unit_scale=True,
            leave=False,
            position=1,
            disable=None,  # nested bars only where a terminal can redraw them
        )

    def evaluated(self, point: EvalPoint) -> None:
        if self.trial is not None:
            self.trial.update(point.samples - self.trial.n)
            self.trial.set_postfix(val_loss=f"{point.val_loss_smoothed:.4f}")

    def end_trial(self, record: TrialRecord) -> None:
        if self.trial is not None:
            self.trial.close()
            self.trial = None
        self.trials.update(1)
        self.trials.set_postfix(last=f"{record.state}")

    def close(self) -> None:
        if self.trial is not None:
            self.trial.close()
        self.trials.close()
