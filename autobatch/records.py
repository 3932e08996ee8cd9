"""What autobatch produces, as plain data: probe results, evaluation points, trial records,
study settings and the tune result.

The probe and the tuner fill these in; observers (MLflow logging, progress bars) and reports
read them. Nothing here imports torch, Optuna or MLflow, so every consumer sees the same facts
and the MLflow logging process can load them cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import optuna

#: What MemoryModel.largest_under answers when memory does not grow with the batch.
NO_BOUND = 1 << 24

#: Trial states as autobatch reports them.
COMPLETE, PRUNED, FAILED, INFEASIBLE, RUNNING = (
    "complete",
    "pruned",
    "failed",
    "infeasible",
    "running",
)
#: The seeded trials, run before any sampled one: the task's own batch size and learning rate
#: (whose result fixes the target), the ceiling, and the middle candidate.
BASELINE, CEILING, MIDDLE = "baseline", "ceiling", "middle"
#: The trial queued once the seeds have ended: the batch size the noise scale and step time
#: predict fastest, at the rule's learning rate.
PREDICTED = "predicted"
#: A trial queued past an end of the learning-rate multiplier range, when the trial with the
#: best loss sits at that end (:func:`autobatch.tuning.space.past_the_edge`).
BEYOND = "beyond"
#: A trial queued at the predicted fastest batch size with the multiplier of the trial with
#: the best loss, when that is not the rule's own rate
#: (:func:`autobatch.tuning.space.carried_over`).
CARRIED = "carried"
#: A trial queued at the batch size next to the fastest trial's, at its multiplier
#: (:func:`autobatch.tuning.space.neighbour`).
NEIGHBOUR = "neighbour"
#: A trial queued at twice the multiplier of the trial with the best loss, at its batch size,
#: when that trial's loss was still falling as its budget ran out
#: (:func:`autobatch.tuning.space.raised_rate`).
RAISED = "raised"
#: Trials the study queues itself after the seeds (only the predicted one and the neighbours
#: may be pruned: :func:`autobatch.tuning.pruner.prunable`).
STEERED = (PREDICTED, BEYOND, CARRIED, NEIGHBOUR, RAISED)
#: How a completed trial ended against the target.
REACHED, MISSED = "reached", "missed"


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation during a trial. ``samples`` is the step axis everywhere."""

    samples: int  # training samples seen so far
    seconds: float  # training seconds so far, evaluation excluded
    epoch: float  # samples / training-set size
    train_loss: float  # mean training loss since the previous evaluation
    val_loss: float
    val_loss_smoothed: float
    val_accuracy: float | None
    samples_per_second: float  # training throughput since the previous evaluation
    peak_memory_bytes: int | None
    timestamp_ms: int
    grad_noise_scale: float | None = None  # measured on the reference trial only


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its configuration, its learning curve and what was measured on it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAILED, INFEASIBLE or RUNNING
    batch_size: int
    lr: float
    lr_multiplier: float
    lr_rule: str
    iterations_per_epoch: int
    max_epochs: float
    seed: int
    reason: str | None = None
    curve: tuple[EvalPoint, ...] = ()
    train_seconds: float = 0.0  # on the study's clock (its steps), like the curve's seconds
    epoch_seconds: float | None = None
    time_to_target: float | None = None
    samples_to_target: int | None = None
    best_val_loss: float | None = None
    recommended_epochs: float | None = None
    noise_scale: float | None = None  # the gradient noise scale the lr rule used
    beta2: float | None = None  # AdamW's, when scaled with the batch size (scale_adamw)
    weight_decay: float | None = None  # likewise
    auc: float | None = None  # area under validation loss vs training seconds
    value: float | None = None  # the objective value Optuna saw
    mlflow_run_id: str | None = None
    role: str | None = None  # BASELINE, CEILING or MIDDLE for a seeded trial
    worker: str | None = None  # host:pid of the process that ran it
    device_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (1 thread)"
    wall_seconds: float | None = None  # training seconds as the worker's wall clock measured
    throughput: float | None = None  # training samples per wall-clock second over the trial
    started_ms: int | None = None  # wall-clock start and end, ms since the epoch
    ended_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # written by another version
        data["curve"] = tuple(EvalPoint(**p) for p in data.get("curve", ()))
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The record without its curve: one row of the trial table."""
        row = self.to_dict()
        row.pop("curve")
        return row


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars, in it or in its tuples, lists and dicts, as Python
    numbers."""
    if isinstance(value, tuple | list):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _plain_fields(record: Any) -> None:
    """Set a frozen dataclass's fields to :func:`plain` values."""
    for name, value in vars(record).items():
        object.__setattr__(record, name, plain(value))


@dataclass(frozen=True)
class StudySettings:
    """How a study searches: logged once per study, and the key a resumed study must match."""

    study_name: str
    storage: str  # with any password removed
    objective: str
    lr_rule: str
    lr_multiplier_range: tuple[float, float]
    candidates: tuple[int, ...]
    max_epochs: float
    n_trials: int | None
    timeout: float | None
    seed: int
    sampler: str
    pruner: str
    tolerance: float
    target_loss: float | None
    task_name: str
    device: str
    precision: str
    base_lr: float
    base_batch_size: int
    train_size: int
    ceiling: int | None = None  # the largest batch size that fits (or the training set size)
    extra: dict[str, Any] = field(default_factory=dict)
    scale_adamw: bool = False  # scale AdamW's beta2 and weight decay with the batch size
    eval_batch_size: int | None = None  # the probe's largest evaluation batch
    min_trials: int | None = None  # may end before n_trials from here on, once settled
    # The multiplier the sampled range is centred on (the lr range test's suggestion, or 1),
    # and the test's measurements (autobatch.tuning.lr_range.RangeTest.to_dict()).
    lr_centre: float = 1.0
    lr_range_test: dict[str, Any] | None = None
    # Seconds per training step by batch size, the study's clock, and what measuring it cost
    # (autobatch.tuning.clock.measure()); None: trials are timed on the wall clock.
    step_clock: dict[str, Any] | None = None
    max_grad_norm: float | None = None  # the task's gradient clipping, trials included
    # Every worker's heartbeat schedule, seconds (None: a study stored before they were kept).
    heartbeat_interval: int | None = None
    grace_period: int | None = None

    def __post_init__(self) -> None:
        # NumPy numbers (a scikit-learn grid's np.int64) are accepted as numbers, and stored
        # as JSON: Python's own from here on.
        _plain_fields(self)

    @property
    def multiplier_range(self) -> tuple[float, float]:
        """The multipliers sampled trials draw from: the given range about the centre."""
        low, high = self.lr_multiplier_range
        return low * self.lr_centre, high * self.lr_centre

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        data = dict(data)
        data["lr_multiplier_range"] = tuple(data["lr_multiplier_range"])
        data["candidates"] = tuple(data["candidates"])
        return cls(**data)


@dataclass(frozen=True)
class ProbeAttempt:
    """One tried batch size."""

    batch_size: int
    fitted: bool
    oom: bool
    peak_bytes: int | None
    seconds: float
    phase: str  # "measure", "predict", "refine" or "search"
    scaling_peak_bytes: int | None = None
    step_seconds: float | None = None  # one warm training step, synchronised


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step as ``fixed + per_sample x batch size``."""

    fixed: float
    per_sample: float

    def __call__(self, batch_size: int) -> float:
        return self.fixed + self.per_sample * batch_size


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes ~ ``fixed_bytes + bytes_per_sample * batch_size``."""

    fixed_bytes: float
    bytes_per_sample: float

    def predict(self, batch_size: int) -> float:
        return self.fixed_bytes + self.bytes_per_sample * batch_size

    def largest_under(self, budget: int) -> int:
        if self.bytes_per_sample <= 0:
            return NO_BOUND
        return max(int(math.floor((budget - self.fixed_bytes) / self.bytes_per_sample)), 0)


@dataclass(frozen=True)
class ProbeResult:
    """The largest batch size that ran within ``budget_bytes``, and how it was found."""

    batch_size: int
    capacity_bytes: int
    headroom: float
    budget_bytes: int
    memory_model: MemoryModel | None
    attempts: tuple[ProbeAttempt, ...]
    steps: int
    seconds: float
    device: str
    upper_bound: int | None = None
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    planned: bool = False  # predicted on fake tensors (plan_for), never run on the device
    eval_batch_size: int | None = None  # the largest evaluation batch (forward, no gradients)
    step_time: StepTime | None = None  # fitted through the warm steps of the sizes that fit

    def __post_init__(self) -> None:
        _plain_fields(self)  # sizes found with a NumPy multiple_of are NumPy integers

    @property
    def ooms(self) -> int:
        return sum(a.oom for a in self.attempts)

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        data = dict(data)
        model = data.get("memory_model")
        data["memory_model"] = MemoryModel(**model) if model else None
        data["attempts"] = tuple(ProbeAttempt(**a) for a in data["attempts"])
        timing = data.get("step_time")
        data["step_time"] = StepTime(**timing) if timing else None
        return cls(**data)


def outcome(record: TrialRecord) -> str:
    """How a trial ended, as a reviewer sorts trials: reached (the target), missed, pruned,
    failed, infeasible, interrupted, running."""
    if record.reason == "interrupted":
        return "interrupted"
    if record.state == COMPLETE:
        return REACHED if record.time_to_target is not None else MISSED
    return record.state


def trial_label(record: TrialRecord) -> str:
    """``t03 bs=64 lr=5.4e-03``: the trial's configuration, as its MLflow run and the charts
    name it."""
    return f"t{record.number:02d} bs={record.batch_size} lr={record.lr:.1e}"


@dataclass(frozen=True)
class TuneResult:
    """The recommendation and the evidence behind it."""

    batch_size: int
    epochs: int
    lr: float
    lr_multiplier: float
    best_trial: int
    target_loss: float | None
    probe: ProbeResult | None
    trials: tuple[TrialRecord, ...]
    settings: StudySettings
    #: Optimizer steps to train: ``epochs`` times the steps per epoch, or, where the stop lies
    #: in a fractional budget's last, partial epoch (``max_epochs=0.5`` on a large dataset),
    #: the steps up to it: train these where whole epochs would go past the budget.
    steps: int | None = None
    warnings: tuple[str, ...] = ()
    mlflow_run_id: str | None = None
    #: Whether the target is the best loss at an epoch end, not the lowest loss found: no
    #: epoch end came within the tolerance of that (a dip between two evaluations).
    target_at_epoch_end: bool = False
    study: optuna.Study | None = field(default=None, compare=False, repr=False)

    def best(self) -> TrialRecord | None:
        """The record of the trial the recommendation comes from."""
        return next((t for t in self.trials if t.number == self.best_trial), None)

    def partial_steps(self) -> tuple[int, int] | None:
        """(``steps``, steps per epoch) where the steps stop short of ``epochs`` whole epochs:
        the stop lies in a fractional budget's last, partial epoch, so train the steps. None
        where whole epochs are the answer."""
        best = self.best()
        if self.steps is None or best is None:
            return None
        per_epoch = best.iterations_per_epoch
        return (self.steps, per_epoch) if self.steps < self.epochs * per_epoch else None

    def recommendation(self) -> dict[str, Any]:
        """What to train with, and the trial it comes from (with ``scale_adamw``, AdamW's
        ``beta2`` and ``weight_decay`` too)."""
        best = self.best()
        scaled = (
            {}
            if best is None or best.beta2 is None
            else {"beta2": best.beta2, "weight_decay": best.weight_decay}
        )
        return {
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            **({} if self.steps is None else {"steps": self.steps}),
            "lr": self.lr,
            "lr_multiplier": self.lr_multiplier,
            "best_trial": self.best_trial,
            **scaled,
        }

    def target(self) -> str | None:
        """The loss every trial had to reach, with where it came from: the one way the target
        is shown (CLI, MLflow, charts)."""
        if self.target_loss is None:
            return None
        level = self.target_loss + self.settings.tolerance * abs(self.target_loss)
        tolerance = f"{self.settings.tolerance:.0%}"
        if self.settings.target_loss is not None:
            basis = "target_loss"
        elif self.target_at_epoch_end:
            basis = "the best loss at an epoch end"
        else:
            basis = "the best loss found"
        why = (
            f": no epoch end came within {tolerance} of the lowest loss, a dip between evaluations"
            if self.target_at_epoch_end
            else ""
        )
        return (
            f"validation loss <= {level:.4g} ({basis}, {self.target_loss:.4g}, + {tolerance}{why})"
        )

    def table(self) -> list[dict[str, Any]]:
        """One row per trial, without learning curves."""
        return [t.summary() for t in self.trials]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(replace(self, study=None)).items() if k != "study"}
        data["trials"] = self.table()
        return data


class TuneObserver(Protocol):
    """Receives a study's events as they happen. Every method may be called from the thread
    that runs the trials; an observer must not raise for its own failures (log and go on).

    ``trial_finished`` comes before Optuna is told the trial's result, so an observer can
    still set user attributes on the trial it received in ``trial_started``.
    """

    def study_started(self, settings: StudySettings, probe: ProbeResult) -> None: ...

    def trial_started(self, trial: optuna.Trial, record: TrialRecord) -> None: ...

    def evaluated(self, record: TrialRecord, point: EvalPoint) -> None: ...

    def trial_finished(self, record: TrialRecord) -> None: ...

    def study_finished(self, result: Any) -> None: ...  # a TuneResult

    def study_interrupted(self, reason: str) -> None: ...

    def study_failed(self, reason: str) -> None: ...  # ended with nothing to recommend

    def study_left(self) -> None: ...  # this process stops; another reports the study's end
