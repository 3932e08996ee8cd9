"""A worker: runs trials of a prepared study until the study has its ``n_trials``.

Any number of workers, in processes on any machines that reach the study's storage, share one
study. Each trial trains a fresh model (same seed, same data order) at one batch size and
learning rate. Workers coordinate only through Optuna: ``study.ask`` hands out trials (queued
ones first), a heartbeat thread marks each running trial alive, and before each trial a worker
fails the trials of dead workers and queues them again (Optuna's heartbeat machinery). Every
shared fact is read from trial records or was written once by *prepare*.

Until the reference trial (the baseline) has ended, only seeded trials start: its result fixes
the target and the pruner's first rung that every other trial is judged by. Training time is
counted on the study's clock (``autobatch.tuning.clock``), the same for every worker. A seed
that ends first stays RUNNING in Optuna until then, and its worker goes on. Then workers run
sampled trials in parallel. A worker that finds the last trials running elsewhere waits for
them, failing and rerunning any whose worker dies, so a study never ends with a trial of a dead
worker still RUNNING.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's own, as optimize() uses
from optuna.trial import FrozenTrial, TrialState

from autobatch.data import epoch_samples, steps_per_epoch
from autobatch.errors import AutobatchError, StudyInterrupted
from autobatch.memory import MemoryMeter
from autobatch.oom import drop_failed_attempt, is_oom_error
from autobatch.records import (
    BASELINE,
    BEYOND,
    CARRIED,
    COMPLETE,
    FAILED,
    INFEASIBLE,
    NEIGHBOUR,
    PREDICTED,
    PRUNED,
    RAISED,
    RUNNING,
    STEERED,
    EvalPoint,
    ProbeResult,
    StudySettings,
    TrialRecord,
    TuneObserver,
    TuneResult,
)
from autobatch.training import build, needs_two_samples, seeded
from autobatch.tuning import clock, curves, prior, pruner, scoring, space, storage
from autobatch.tuning.loop import StopTrial, TrialFailed, train
from autobatch.tuning.noise_probe import NoiseProbe
from autobatch.tuning.progress import Progress
from autobatch.tuning.pruner import REDUCTION_FACTOR, Rungs
from autobatch.tuning.recommendation import recommend
from autobatch.tuning.sampler import AvoidingSampler
from autobatch.tuning.space import AdamWScaling, adamw_scaling, applied_rule, scale_lr
from autobatch.workload import Workload

log = logging.getLogger(__name__)

PRUNED_REASON = "successive halving: behind other trials at equal training time"
#: (Short enough for the report's "why" column: :func:`curves.hopeless` says the rest.)
HOPELESS_REASON = f"given up: even its best pace ends above {curves.HOPELESS_FACTOR:g}x the target"
#: A trial another worker failed as its worker's: this one sent no heartbeat for the grace
#: period (paused, suspended, or too busy to send one), and the trial runs again.
LOST_REASON = "taken for a dead worker's: no heartbeat within the grace period; it runs again"
#: How much dearer than the reference trial a trial may be and still go on for its lead per
#: sample (:meth:`_Yardstick.keeps_on`). The rule was measured with this margin when trials were
#: timed on the wall clock, where a trial at the reference's own batch size cost the same give
#: or take its timing noise; on the study's clock it costs exactly the same.
TIMING_NOISE = 0.15


class Observers:
    """Fan-out to observers; one observer's failure never stops training."""

    def __init__(self, observers: Sequence[TuneObserver]) -> None:
        self.observers = list(observers)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for observer in self.observers:
                method = getattr(observer, name, None)
                if method is None:  # an observer written before this event existed
                    continue
                try:
                    method(*args)
                except Exception:  # an observer must never stop the study
                    log.warning(
                        "observer %s failed in %s", type(observer).__name__, name, exc_info=True
                    )

        return call


@dataclass(frozen=True)
class _Yardstick:
    """What a running trial is measured against, from the study's records: the reference
    trial (None until it has ended), the target level, the rungs."""

    records: list[TrialRecord]
    reference: TrialRecord | None
    level: float | None
    rungs: Rungs
    rivals: list[tuple[EvalPoint, ...]]  # the contenders' curves, for ahead_per_sample

    @classmethod
    def of(cls, records: list[TrialRecord], settings: StudySettings) -> _Yardstick:
        ref = scoring.reference(records)
        target = scoring.target_loss(records, settings)
        level = None if target is None else curves.threshold(target, settings.tolerance)
        return cls(
            records=records,
            reference=ref,
            level=level,
            rungs=Rungs(scoring.pruning_scale_ms(records), REDUCTION_FACTOR),
            rivals=[r.curve for r in records if r.curve and pruner.contending(r, level)],
        )

    def keeps_on(self, point: EvalPoint, max_epochs: float) -> bool:
        """Whether a lead per sample keeps the trial going past a rung it lost on time: where
        :func:`~autobatch.tuning.pruner.ahead_per_sample`, and finishing costs no more than
        the reference trial did (timing noise aside). Smaller batches always lead per sample
        early on, and most end no lower; below the task's own batch size that lead would buy
        the dearest trials of the study."""
        ref = self.reference
        if ref is None or point.epoch <= 0:
            return False
        projected = point.seconds * max_epochs / point.epoch
        if projected > ref.train_seconds * (1 + TIMING_NOISE):
            return False
        return pruner.ahead_per_sample(point.epoch, point.val_loss_smoothed, self.rivals)


@dataclass(frozen=True)
class WorkerOutcome:
    """How a worker's run ended."""

    trials: int  # trials this worker finished that count
    complete: bool  # the study has its n_trials
    result: TuneResult | None  # the recommendation, when this worker ended the study
    stopped: str  # why it stopped: "complete", "timeout" or "infeasible"


class Worker:
    """Runs trials of ``study`` (prepared: its settings are stored on it) for ``task``."""

    def __init__(
        self,
        task: Workload,
        study: optuna.Study,
        *,
        observers: Sequence[TuneObserver] = (),
        meter: MemoryMeter | None = None,
        progress: bool = False,
        timeout: float | None = None,
        poll_seconds: float = 0.25,
        notes: Sequence[str] = (),
        reports_end: bool = False,
    ) -> None:
        settings = storage.settings_of(study)
        if settings is None:
            raise ValueError(f"study {study.study_name!r} is not prepared")
        self.task = task
        self.study = study
        self.settings: StudySettings = settings
        self.probe: ProbeResult | None = storage.probe_of(study)
        self.observers = Observers(observers)
        self.meter = meter
        self.progress = progress
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        # Report the study's end even where another worker's trial completed it: its own
        # report never reached MLflow (a study stopped at its last trial, run again).
        self.reports_end = reports_end
        # Dead workers' trials are looked for between trials, at most this often: a trial is
        # only found dead after the grace period anyway.
        self.stale_check_seconds = 5.0
        self.name = storage.worker_name()
        self.device_name = clock.describe_device(task.device)
        self.train_data = task.training_batches().to_device()
        self.val_data = task.validation_batches().to_device()
        # Whether trials leave out a final one-sample batch (batch norm: loop.train), so the
        # steps per epoch recorded are those trained; one model built to look.
        with seeded(task):
            self.drop_single = needs_two_samples(task.model().train())
        self.notes: list[str] = list(notes)  # for this run's result, beside the stored ones
        self.clock = prior.step_clock(settings)
        self._bar: Progress | None = None
        # Seeded trials that finished before the reference trial: still RUNNING in Optuna
        # (their heartbeat goes on) until the target they are judged by exists.
        self._deferred: list[tuple[optuna.Trial, TrialRecord, Any]] = []
        self._adamw_groups: list[dict[str, Any]] | None = None  # scale_adamw's base values

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> WorkerOutcome:
        """Run trials until the study has its ``n_trials``, or has settled
        (:func:`scoring.settled`), or ``timeout`` passes."""
        listeners = storage.stale_listeners(self.study)
        if listeners is not None:
            listeners.append(self._abandoned)
        self.observers.study_started(self.settings, self.probe)
        start = time.monotonic()
        done, stopped = 0, "complete"
        ran_last = False  # this worker's trial ended since it last read the study
        recheck = False  # read n_trials again: a rerun of ``tune`` may have raised it
        looked = -math.inf
        waiting_for: tuple[int, ...] = ()
        try:
            while True:
                if time.monotonic() - looked >= self.stale_check_seconds:
                    storage.fail_stale_trials(self.study)
                    looked = time.monotonic()
                trials = self.study.get_trials(deepcopy=False)
                if self._settle(trials):
                    ran_last = True
                    trials = self.study.get_trials(deepcopy=False)
                state = storage.progress(trials)
                self._show(state)
                if state.complete(self.settings.n_trials) or recheck:
                    self.settings = storage.settings_of(self.study) or self.settings
                    recheck = False
                    if state.complete(self.settings.n_trials):
                        break
                if self.timeout is not None and time.monotonic() - start >= self.timeout:
                    stopped = "timeout"
                    break
                records = storage.records(trials)
                settled = storage.settled(state, records, self.settings)
                if settled is not None and not state.running:
                    log.info("the study %s", settled)
                    break
                if set(self.settings.candidates) <= scoring.infeasible_sizes(records):
                    self.notes.append("every candidate batch size is infeasible; stopped early")
                    stopped = "infeasible"
                    break
                reason = self._wait_reason(state, records, settled)
                if reason is not None:
                    running = tuple(t.number for t in trials if t.state == TrialState.RUNNING)
                    if running != waiting_for:
                        waiting_for = running
                        log.info("waiting for trial(s) %s of other workers (%s)",
                                 ", ".join(map(str, running)), reason)  # fmt: skip
                    ran_last, recheck = False, True
                    time.sleep(self.poll_seconds)
                    continue
                ran_last = bool(self._one_trial(trials))
                done += ran_last
        except KeyboardInterrupt:
            self._settle(self.study.get_trials(deepcopy=False), force=True)
            self.observers.study_interrupted("interrupted by the user")
            finished = storage.progress(self.study.get_trials(deepcopy=False)).finished
            raise StudyInterrupted(
                f"{finished} finished trial(s) are kept in {self.settings.storage}; run the same "
                "command (same study name and storage) to resume"
            ) from None
        finally:
            if self._deferred:  # stopped before the reference ended: keep them, scored for now
                self._settle(self.study.get_trials(deepcopy=False), force=True)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if listeners is not None and self._abandoned in listeners:
                listeners.remove(self._abandoned)
        complete = stopped == "complete"
        if not complete:
            state = storage.progress(self.study.get_trials(deepcopy=False))
        # The study's end is reported once: by the worker whose trial completed it (two, if
        # two ended at the same moment: the report is the same) or, when workers stop on
        # their own (timeout), by whichever stops last.
        result = None
        if (complete and (ran_last or self.reports_end)) or (
            not complete and state.running == 0 and state.finished
        ):
            try:
                result = recommend(self.study, notes=self.notes)
            except AutobatchError as exc:  # no trial completed: the study ends, failed
                self.observers.study_failed(str(exc))
                raise
            self.observers.study_finished(result)
        elif complete or state.running:  # another worker reports the end, or will
            self.observers.study_left()
        return WorkerOutcome(done, complete, result, stopped)

    def _wait_reason(
        self, state: storage.Progress, records: list[TrialRecord], settled: str | None
    ) -> str | None:
        """Why this worker should not start a trial now, or None. Until the reference trial
        has ended, only seeded trials start: a sampled one would run with no target to stop
        at and no rung to be pruned at. Under a saturating lr rule none does: every other
        trial's rate needs the noise scale the reference trial measures (started beside it,
        the seeds trained at the plain rule's rate, unlike the same study in one process). A
        settled study starts none, and its last trials are waited for (a dead worker's is
        failed meanwhile)."""
        settings = self.settings
        if settled is not None or (
            settings.n_trials is not None and state.finished + state.running >= settings.n_trials
        ):
            return "the study's last trials"
        # This worker's seeds waiting for the reference to be judged are Optuna's RUNNING
        # trials too, but nothing is left to wait for in them.
        if state.running <= len(self._deferred) or scoring.reference(records):
            return None
        if settings.lr_rule.startswith("saturating-"):
            return "the reference trial, which measures the gradient noise scale"
        if not state.seeds_waiting and settings.target_loss is None:
            return "the reference trial, which fixes the target"
        return None

    def _show(self, state: storage.Progress) -> None:
        if self.progress and self._bar is None:
            self._bar = Progress(self.settings.n_trials, state.finished)
        if self._bar is not None:
            self._bar.finished_elsewhere(state.finished)

    def _abandoned(self, trial: FrozenTrial) -> None:
        self.observers.trial_abandoned(trial.number, dict(trial.user_attrs))

    # -- one trial ----------------------------------------------------------------------------

    def _one_trial(self, seen: list[FrozenTrial]) -> int:
        """Ask for a trial and run it; 1 if it counts towards ``n_trials``. ``seen``: the
        study's trials as this worker last read them."""
        study, settings = self.study, self.settings
        self._steer(storage.records(seen))
        with warnings.catch_warnings():
            # The pieces of optimize(), used directly: Optuna warns that heartbeats are meant
            # for optimize(), and they work the same here.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        heartbeat = get_heartbeat_thread(trial._trial_id, study._storage)
        heartbeat.start()
        try:
            trials = seen
            n_trials = settings.n_trials
            # Read the study again only when the last read cannot settle the claim.
            if n_trials is not None and storage.claim_bound(seen, trial.number) >= n_trials:
                trials = study.get_trials(deepcopy=False)
                if storage.claimed_before(trials, trial.number) >= n_trials:
                    self._give_back(trial)
                    return 0
            if self._baseline_waits(trial, seen):
                return 0
            if trial.user_attrs.get(storage.ROLE) in STEERED:  # queued by a worker, not prepare
                trials = study.get_trials(deepcopy=False)
                if (twin := storage.earlier_twin(trials, trial.number)) is not None:
                    self._skip(trial, f"not run: queued twice at once, as trial {twin.number}")
                    return 0
            records = storage.records(trials)
            size = int(trial.suggest_categorical("batch_size", list(settings.candidates)))
            with warnings.catch_warnings():  # a trial queued past the range's end
                warnings.filterwarnings("ignore", "Fixed parameter .* is out of range")
                multipliers = space.sampling_range(records, settings)
                multiplier = float(trial.suggest_float("lr_multiplier", *multipliers, log=True))
            if size in scoring.infeasible_sizes(records):  # queued, or found by another worker
                self._skip(trial, f"not run: batch size {size} is known to be infeasible")
                return 0
            return self._train(trial, size, multiplier, records, heartbeat)
        finally:
            if not any(t is trial for t, _, _ in self._deferred):
                heartbeat.join()

    def _baseline_waits(self, trial: optuna.Trial, seen: list[FrozenTrial]) -> bool:
        """Give back a seed popped while the baseline waits in the queue behind it (queued
        again after an interruption), so that the baseline runs first, as in the study before
        the interruption: the other seeds train at rates and are judged by a target that its
        noise scale and its loss fix. True if given back."""
        if trial.user_attrs.get(storage.ROLE) in (None, BASELINE, *STEERED):
            return False
        if scoring.reference(storage.records(seen)) is not None:
            return False

        def baseline_waits(trials: list[FrozenTrial]) -> bool:
            return any(
                t.state == TrialState.WAITING and t.user_attrs.get(storage.ROLE) == BASELINE
                for t in trials
            )

        # Read again before giving it back: workers started together all read the baseline
        # waiting, and one of them has just taken it.
        if not baseline_waits(seen) or not baseline_waits(self.study.get_trials(deepcopy=False)):
            return False
        self._give_back(trial, "not run yet: queued again behind the baseline")
        return True

    def _adamw_scaling(self, size: int, lr: float) -> AdamWScaling | None:
        """AdamW's beta2 and weight decay at ``size`` and ``lr``, with ``scale_adamw``."""
        if not self.settings.scale_adamw:
            return None
        settings = self.settings
        if self._adamw_groups is None:
            # The groups the factory makes of the real parameters: one given a stand-in
            # parameter leaves out a group of matrices only (weight decay on weights, none on
            # biases), and the values reported were another group's.
            _, optimizer = build(self.task, settings.base_lr)
            self._adamw_groups = [
                {key: value for key, value in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
            del optimizer
        return adamw_scaling(
            self._adamw_groups, settings.base_batch_size, size, settings.base_lr, lr
        )

    def _train(
        self,
        trial: optuna.Trial,
        size: int,
        multiplier: float,
        records: list[TrialRecord],
        heartbeat: Any,
    ) -> int:
        """Train the trial; ``records``: the study's finished trials when it started."""
        settings = self.settings
        if trial.user_attrs.get(storage.RUN_ID):  # a rerun of a dead worker's trial
            trial.set_user_attr(storage.RUN_ID, None)
        trial.set_user_attr(storage.WORKER, self.name)  # who runs it, while it runs
        noise = prior.noise_scale(scoring.reference(records))
        rate = scale_lr(settings.base_lr, settings.base_batch_size, size, settings.lr_rule, noise)
        scaling = self._adamw_scaling(size, rate * multiplier)
        record = TrialRecord(
            number=trial.number,
            state=RUNNING,
            batch_size=size,
            lr=rate * multiplier,
            lr_multiplier=multiplier,
            lr_rule=applied_rule(settings.lr_rule, noise),
            noise_scale=noise if settings.lr_rule.startswith("saturating-") else None,
            beta2=None if scaling is None else scaling.beta2,
            weight_decay=None if scaling is None else scaling.weight_decay,
            iterations_per_epoch=steps_per_epoch(settings.train_size, size, self.drop_single),
            max_epochs=settings.max_epochs,
            seed=self.task.seed,
            role=trial.user_attrs.get(storage.ROLE),
            worker=self.name,
            device_name=self.device_name,
            started_ms=int(time.time() * 1000),
        )
        judge = _Yardstick.of(records, settings)
        self.observers.trial_started(trial, record)
        bar = self._bar
        if bar is not None:
            epoch = epoch_samples(settings.train_size, size, self.drop_single)
            bar.start_trial(record, int(settings.max_epochs * epoch))
        points: list[EvalPoint] = []
        pruned: str | None = None  # why, once halving or the hopeless rule stopped it
        last_step = 0
        objective = settings.objective
        prunable = pruner.prunable(record.role, objective)

        def on_eval(point: EvalPoint) -> None:
            nonlocal pruned, last_step, judge
            points.append(point)
            self.observers.evaluated(record, point)
            if bar is not None:
                bar.evaluated(point)
            if objective == "pareto":
                return
            if judge.reference is None and record.role != BASELINE:
                # A trial started beside the reference trial: look again until it has ended.
                fresh = storage.records(self.study.get_trials(deepcopy=False))
                judge = _Yardstick.of(fresh, settings)
            smoothed = [p.val_loss_smoothed for p in points]
            epochs = [p.epoch for p in points]
            level = judge.level
            step = max(last_step + 1, int(point.seconds * 1000))
            # Reported at the rungs only, where halving compares trials, and by every trial:
            # the report is what later trials are compared against. Asked only where the
            # answer counts.
            if judge.rungs.due(step):
                last_step = step
                trial.report(point.val_loss_smoothed, step=step)
                reached = (
                    level is not None
                    and curves.reaching(epochs, smoothed, level, settings.max_epochs) is not None
                )
                if (
                    prunable
                    and not reached
                    and not judge.keeps_on(point, settings.max_epochs)
                    and trial.should_prune()
                ):
                    pruned = PRUNED_REASON
                    raise StopTrial
            if (
                objective == "time"
                and level is not None
                and curves.plateaued(epochs, smoothed, level, settings.max_epochs)
            ):
                raise StopTrial
            # Never the reference, nor a step up the rate (past the range's end, or raised):
            # whether the walk goes on rests on its best loss, and its rate is the highest yet.
            if (
                record.role not in (BASELINE, BEYOND, RAISED)
                and level is not None
                and curves.hopeless(epochs, smoothed, level, settings.max_epochs)
            ):
                if step > last_step:  # the sampler ranks a stopped trial by its last report
                    last_step = step
                    trial.report(point.val_loss_smoothed, step=step)
                pruned = HOPELESS_REASON
                raise StopTrial

        state, reason, run = COMPLETE, None, None
        try:
            run = train(
                self.task,
                self.train_data,
                self.val_data,
                batch_size=size,
                lr=record.lr,
                max_epochs=settings.max_epochs,
                # The probe's evaluation size where it measured one: evaluation is off the
                # clock, but a larger batch makes it shorter. Else what training showed fits.
                eval_batch_size=min(
                    settings.eval_batch_size
                    or min(settings.ceiling or max(settings.candidates), max(size, 256)),
                    len(self.val_data),
                ),
                on_eval=on_eval,
                meter=self.meter,
                # The reference trial measures the gradient noise scale the lr rules and
                # predictions use.
                noise=NoiseProbe(
                    self.task, self.train_data, size, self.task.seed, two_samples=self.drop_single
                )
                if record.role == BASELINE
                else None,
                configure=None if scaling is None else scaling.apply,
                clock=None if self.clock is None else self.clock.for_batch_size(size),
            )
        except TrialFailed as exc:
            state, reason = FAILED, str(exc)
        except KeyboardInterrupt:
            # Not counted, and queued again, so the resumed study runs it from the start.
            record = replace(record, state=FAILED, reason="interrupted", curve=tuple(points))
            trial.set_user_attr(storage.COUNTED, False)
            self._queue_again(trial)
            self._finish(trial, record)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # at a report: failed elsewhere
            self._lost(trial, replace(record, curve=tuple(points)))
            return 0
        except BaseException as exc:
            if not is_oom_error(exc):
                why = f"{type(exc).__name__}: {exc}"[:500]
                trial.set_user_attr(storage.REASON, why)
                self.study.tell(trial, state=TrialState.FAIL)
                # Queued again, as an interrupted trial is: the rerun after the fix runs it
                # (a seeded one first of all; without the baseline, the rerun waited for it).
                self._queue_again(trial)
                # The trial failed (its run FAILED, saying why); the study stops, resumable.
                failed = replace(record, state=FAILED, reason=why, curve=tuple(points))
                self.observers.trial_finished(replace(failed, ended_ms=int(time.time() * 1000)))
                self.observers.study_interrupted(f"error in trial {trial.number}: {exc!r}"[:500])
                raise
            drop_failed_attempt(exc)
            state, reason = INFEASIBLE, f"out of memory at batch size {size}"
        if pruned is not None:
            state, reason = PRUNED, pruned
        record = _measured(record, points, run, state, reason, settings)
        if state != COMPLETE:
            self._finish(trial, record)
        elif judge.reference is not None or record.role == BASELINE:
            self._tell_complete(trial, record, judge.records)
        else:  # a seed run beside the reference trial: judged once that has ended
            self._deferred.append((trial, record, heartbeat))
            self._settle(self.study.get_trials(deepcopy=False))
        if record.role not in (None, *STEERED):
            self._queue_prediction()
        # After any end, not only a completed one: a pruned trial can be the one a rule waits
        # for (the second sampled trial to end, before the walk along the batch size starts;
        # a step of the walk, before the step the other way). Asked only after completed
        # trials, a gru-adam study of the quality benchmark never walked, and recommended
        # 1.081x the grid's best loss; walking, 1.009x.
        self._queue_steered([*judge.records, record])
        return 1

    def _queue_prediction(self) -> None:
        """Once every seeded trial has ended, queue the batch size the prior predicts fastest
        (the noise scale the baseline measured, the seeds' step times), at the rule's rate
        times the range's centre, unless a seed already ran it. Whichever worker ends the last
        seed queues it; two ending seeds at the same moment may both queue it, and the later
        copy is not run (see :func:`storage.earlier_twin`)."""
        settings = self.settings
        trials = self.study.get_trials(deepcopy=False)
        if any(t.user_attrs.get(storage.ROLE) == PREDICTED for t in trials):
            return
        records = storage.records(trials)
        if not space.seeds_ended(records, settings):
            return
        if self._free(trials) < 1:
            return
        fastest = self._explained(records).fastest
        if fastest is None:
            return
        best = fastest.batch_size
        if any(
            size == best for _, size in space.seeds(settings.candidates, settings.base_batch_size)
        ):
            return
        log.info("queued the predicted fastest batch size, %d", best)
        self.study.enqueue_trial(
            {"batch_size": best, "lr_multiplier": settings.lr_centre},
            user_attrs={storage.ROLE: PREDICTED},
            skip_if_exists=True,
        )

    def _free(self, trials: Sequence[FrozenTrial]) -> float:
        """How many trials queued now would have a place within ``n_trials``: the last places
        go to the trials already queued or running (a dead worker's, queued again, among
        them)."""
        state = storage.progress(trials)
        n_trials = self.settings.n_trials
        taken = state.finished + state.running + state.waiting
        return math.inf if n_trials is None else n_trials - taken

    def _queue_steered(self, known: list[TrialRecord]) -> None:
        """Queue the trials the records ask for: past the multiplier range's end
        (:func:`space.past_the_edge`), the best trial's multiplier at the predicted fastest
        batch size (:func:`space.carried_over`), and the fastest trial's at the size next to
        its own (:func:`space.neighbour`). The records this worker already holds (its own
        trial's among them) say whether any is asked for at all, so the study is read
        only when one is; the answer then comes from a fresh read, with the queued and running
        trials, so workers agree on it; of two copies queued at the same moment, the later is
        not run."""
        if all(propose(known, []) is None for _, propose, _ in self._steering()):
            return
        trials = self.study.get_trials(deepcopy=False)
        records, taken = storage.records(trials), storage.configurations(trials)
        free = self._free(trials)
        for role, propose, why in self._steering():
            proposal = propose(records, taken)
            if proposal is None or free < 1:
                continue
            size, multiplier = proposal
            log.info("%s: queued batch size %d at x%.3g", why, size, multiplier)
            self.study.enqueue_trial(
                {"batch_size": size, "lr_multiplier": multiplier},
                user_attrs={storage.ROLE: role},
                skip_if_exists=True,
            )
            taken, free = [*taken, proposal], free - 1

    def _steering(self) -> list[tuple[str, Callable[..., tuple[int, float] | None], str]]:
        """The rules that queue trials from the records: (role, proposal from the records and
        the queued and running configurations, why, for the log)."""
        settings = self.settings

        def fastest(records: list[TrialRecord]) -> int | None:
            predicted = self._explained(records).fastest
            if predicted is None or predicted.batch_size in scoring.infeasible_sizes(records):
                return None
            return predicted.batch_size

        return [
            (
                BEYOND,
                lambda records, taken: space.past_the_edge(records, settings, taken),
                "the best trial's learning rate is at the range's end",
            ),
            (
                CARRIED,
                lambda records, taken: space.carried_over(
                    records, settings, fastest(records), taken
                ),
                "the best trial's learning-rate multiplier, at the predicted fastest size",
            ),
            (
                NEIGHBOUR,
                lambda records, taken: space.neighbour(records, settings, taken),
                "the fastest trial's multiplier, at the batch size next to its own",
            ),
            (
                RAISED,
                lambda records, taken: space.raised_rate(records, settings, taken),
                "the best trial's loss was still falling at the end: twice its rate",
            ),
        ]

    def _settle(self, trials: list[FrozenTrial], force: bool = False) -> bool:
        """Tell Optuna the deferred trials' scores once the reference trial has ended (or,
        with ``force``, provisional ones: the recommendation judges them again at the end).
        True if any was told."""
        if not self._deferred:
            return False
        records = storage.records(trials)
        waiting = [record for _, record, _ in self._deferred]
        if scoring.reference([*records, *waiting]) is None and not force:
            return False
        deferred, self._deferred = self._deferred, []
        for trial, record, heartbeat in deferred:
            try:
                self._tell_complete(trial, record, [*records, *waiting])
            finally:
                heartbeat.join()
        return True

    def _tell_complete(
        self, trial: optuna.Trial, record: TrialRecord, records: list[TrialRecord]
    ) -> None:
        """Judge the trial by the target and tell Optuna."""
        records = [*records, record]
        target = scoring.target_loss(records, self.settings)
        judged = scoring.score(record, self.settings, target)
        if judged is None:  # no target yet: a provisional score (see _settle)
            judged = scoring.Score(
                (scoring.MISS_OFFSET,) * (2 if self.settings.objective == "pareto" else 1),
                None,
                None,
            )
        record = replace(
            record,
            value=judged.values[0],
            time_to_target=judged.time_to_target,
            samples_to_target=judged.samples_to_target,
        )
        self._finish(trial, record, judged.values)

    def _finish(
        self, trial: optuna.Trial, record: TrialRecord, values: Sequence[float] | None = None
    ) -> None:
        """Tell the observers, keep the record on the trial, and tell Optuna ``values`` (or,
        without them, that the trial was pruned or failed).

        Observers come first: until Optuna is told, an observer can still set the trial's user
        attributes, which is how the MLflow tracker links the trial to its run. A Ctrl-C while
        they are told still records the trial in Optuna, then stops the study.
        """
        record = replace(record, ended_ms=int(time.time() * 1000))
        if not self._still_ours(trial, record):
            self._lost(trial, record)
            return
        interrupted = False
        try:
            self.observers.trial_finished(record)
        except KeyboardInterrupt:
            interrupted = True
        run_id = trial.user_attrs.get(storage.RUN_ID)
        if values is None and record.state == INFEASIBLE:
            # The worst result rather than a failure, which TPE ignores: it learns the size
            # is bad instead of proposing it again (the sampler is kept off it anyway).
            values = [scoring.INFEASIBLE_VALUE] * (2 if self.settings.objective == "pareto" else 1)
        try:
            trial.set_user_attr(storage.RECORD, replace(record, mlflow_run_id=run_id).to_dict())
            if values is not None:
                self.study.tell(trial, list(values) if len(values) > 1 else values[0])
            else:  # why is in the record
                state = TrialState.PRUNED if record.state == PRUNED else TrialState.FAIL
                self.study.tell(trial, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed elsewhere just now
            log.warning("trial %d: %s", trial.number, LOST_REASON)
        if self._bar is not None:
            self._bar.end_trial(record)
        if interrupted:
            raise KeyboardInterrupt

    def _still_ours(self, trial: optuna.Trial, record: TrialRecord) -> bool:
        """Whether ``trial`` still runs in the storage: another worker fails a trial whose
        heartbeat it has not seen for the grace period, so only one that has lasted that long
        is read back."""
        grace = self.settings.grace_period or storage.GRACE_PERIOD
        if record.ended_ms is None or record.ended_ms - record.started_ms < 1000 * grace:
            return True
        return self.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING

    def _lost(self, trial: optuna.Trial, record: TrialRecord) -> None:
        """End a trial another worker failed as a dead worker's (this process sent no
        heartbeat for the grace period: paused or suspended): it runs again there or here,
        and this worker goes on with the next one."""
        log.warning(
            "trial %d: %s (this process was paused or too busy to send one); going on",
            trial.number,
            LOST_REASON,
        )
        lost = replace(record, state=FAILED, reason=LOST_REASON, ended_ms=int(time.time() * 1000))
        self.observers.trial_finished(lost)  # its MLflow run ends with the reason
        if self._bar is not None:
            self._bar.end_trial(lost)

    def _explained(self, records: list[TrialRecord]) -> prior.Explanation:
        """The prior's predictions from ``records`` judged by the current target: what the
        queued prediction, the carried trial and the sizes kept from the sampler all read."""
        judged = scoring.rescore(records, self.settings)
        return prior.explain(judged, self.settings.candidates, self.clock)

    def _steer(self, records: list[TrialRecord]) -> None:
        """Keep the sampler off the batch sizes that ran out of memory and those the prior
        predicts at least ``prior.TOO_SLOW`` times slower to the target than the fastest (never
        the reference trial's size; judged by the current target, as the queued prediction
        is). Queued trials keep their size."""
        steered = self.study.sampler
        if not isinstance(steered, AvoidingSampler):
            return
        infeasible = scoring.infeasible_sizes(records)
        reference = scoring.reference(records)
        explanation = self._explained(records)
        slow = prior.too_slow(explanation, keep=None if reference is None else reference.batch_size)
        avoid = infeasible | set(slow)
        if set(self.settings.candidates) <= avoid:
            avoid = infeasible  # the fastest prediction ran out of memory: trust the trials
        if avoid != steered.avoid and (slow.keys() - infeasible):
            fastest = explanation.fastest
            assert fastest is not None
            log.info(
                "not drawn any more: batch size(s) %s, predicted at least %gx slower to the "
                "target than batch size %d",
                ", ".join(map(str, sorted(slow.keys() - infeasible))),
                prior.TOO_SLOW,
                fastest.batch_size,
            )
        steered.steer(avoid)

    def _skip(self, trial: optuna.Trial, reason: str) -> None:
        """A trial not worth running, for ``reason``: at a batch size known not to fit (queued,
        or drawn before this worker read another's out-of-memory trial; the sampler is kept
        off known ones, see :meth:`_steer`), or a copy of a trial queued twice at once. Not
        run, not counted, failed, not queued again."""
        trial.set_user_attr(storage.COUNTED, False)
        trial.set_user_attr(storage.REASON, reason)
        self.study.tell(trial, state=TrialState.FAIL)

    def _give_back(
        self, trial: optuna.Trial, reason: str = "not run: the study already had its n_trials"
    ) -> None:
        """A trial not to run now, for ``reason`` (by default: asked for past the study's
        budget, another worker having taken the last place at the same moment): not counted;
        a queued one goes back in the queue (after this one stops counting, so no worker sees
        both count)."""
        trial.set_user_attr(storage.COUNTED, False)
        trial.set_user_attr(storage.REASON, reason)
        if storage.fixed_params(self.study, trial) is not None:
            self._queue_again(trial)
        self.study.tell(trial, state=TrialState.FAIL)

    def _queue_again(self, trial: optuna.Trial) -> None:
        role = trial.user_attrs.get(storage.ROLE)
        params = storage.fixed_params(self.study, trial) or trial.params
        self.study.enqueue_trial(params, user_attrs={storage.ROLE: role} if role else None)


def _measured(
    record: TrialRecord,
    points: list[EvalPoint],
    run: Any,
    state: str,
    reason: str | None,
    settings: StudySettings,
) -> TrialRecord:
    """The record with what its run measured: curve, times, best loss and epochs."""
    updates: dict[str, Any] = {"state": state, "reason": reason, "curve": tuple(points)}
    if run is not None:
        updates["train_seconds"] = run.train_seconds
        updates["wall_seconds"] = run.wall_seconds
        updates["epoch_seconds"] = run.epoch_seconds
        if run.wall_seconds > 0:
            updates["throughput"] = run.samples / run.wall_seconds
    elif points:  # a trial that failed: trained as far as its last evaluation
        updates["train_seconds"] = points[-1].seconds
    if points:
        smoothed = [p.val_loss_smoothed for p in points]
        choice = curves.choose_epochs(
            [p.epoch for p in points], smoothed, settings.max_epochs, settings.tolerance
        )
        updates["best_val_loss"] = min(smoothed)
        updates["recommended_epochs"] = float(choice.epochs)
        updates["auc"] = curves.area_under([p.seconds for p in points], smoothed)
        if choice.warning and state == COMPLETE:
            updates["reason"] = choice.warning
    return replace(record, **updates)
