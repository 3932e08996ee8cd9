"""What a study produces, as plain data: evaluation points, trial records, study settings.

The tuner fills these in; observers (MLflow logging, progress bars) read them. Nothing here
knows about Optuna's or MLflow's objects, so every consumer sees the same facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import optuna

    from autobatch.probe import ProbeResult

#: Trial states as autobatch reports them.
COMPLETE, PRUNED, FAILED, INFEASIBLE, RUNNING = (
    "complete",
    "pruned",
    "failed",
    "infeasible",
    "running",
)


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
    train_seconds: float = 0.0
    epoch_seconds: float | None = None
    time_to_target: float | None = None
    samples_to_target: int | None = None
    best_val_loss: float | None = None
    recommended_epochs: float | None = None
    auc: float | None = None  # area under validation loss vs training seconds
    value: float | None = None  # the objective value Optuna saw
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        data = dict(data)
        data["curve"] = tuple(EvalPoint(**p) for p in data.get("curve", ()))
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The record without its curve: one row of the trial table."""
        row = self.to_dict()
        row.pop("curve")
        return row


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TuneObserver(Protocol):
    """Receives a study's events as they happen. Every method may be called from the thread
    that runs the trials; an observer must not raise for its own failures (log and go on)."""

    def study_started(self, settings: StudySettings, probe: ProbeResult) -> None: ...

    def trial_started(self, trial: optuna.Trial, record: TrialRecord) -> None: ...

    def evaluated(self, record: TrialRecord, point: EvalPoint) -> None: ...

    def trial_finished(self, record: TrialRecord) -> None: ...

    def study_finished(self, result: Any) -> None: ...  # a TuneResult

    def study_interrupted(self, reason: str) -> None: ...
