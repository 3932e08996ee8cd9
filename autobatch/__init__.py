"""autobatch: the batch size, epochs and learning rate to train with, measured, not guessed."""

from autobatch.errors import (
    AutobatchError,
    BatchSizeOneDoesNotFit,
    InvalidInputError,
    StudyInterrupted,
)
from autobatch.memory import CudaMeter, MemoryMeter, MpsMeter, TrackedMeter, XpuMeter, meter_for
from autobatch.oom import is_oom_error
from autobatch.probe import MemoryModel, ProbeAttempt, ProbeResult, find_max_batch_size, probe
from autobatch.records import EvalPoint, StudySettings, TrialRecord, TuneObserver
from autobatch.task import Task
from autobatch.tuner import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "AutobatchError",
    "BatchSizeOneDoesNotFit",
    "CudaMeter",
    "InvalidInputError",
    "MemoryMeter",
    "MemoryModel",
    "MpsMeter",
    "ProbeAttempt",
    "ProbeResult",
    "EvalPoint",
    "StudySettings",
    "TrialRecord",
    "TuneObserver",
    "TuneResult",
    "tune",
    "StudyInterrupted",
    "Task",
    "TrackedMeter",
    "XpuMeter",
    "find_max_batch_size",
    "is_oom_error",
    "meter_for",
    "probe",
]
