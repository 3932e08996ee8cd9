"""autobatch: the batch size, epochs and learning rate to train with, measured, not guessed.

Names load on first use (``autobatch.tune`` imports the tuning package, and torch, when first
read), so a process that needs only the plain records, such as the MLflow logging process,
starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autobatch.lazy import lazy_names

if TYPE_CHECKING:
    from autobatch.errors import (
        AutobatchError,
        BatchSizeOneDoesNotFit,
        InvalidInputError,
        StudyInterrupted,
    )
    from autobatch.memory import (
        CudaMeter,
        MemoryMeter,
        MpsMeter,
        TrackedMeter,
        XpuMeter,
        meter_for,
    )
    from autobatch.oom import is_oom_error
    from autobatch.probing import find_max_batch_size, probe
    from autobatch.records import (
        EvalPoint,
        MemoryModel,
        ProbeAttempt,
        ProbeResult,
        StudySettings,
        TrialRecord,
        TuneObserver,
        TuneResult,
    )
    from autobatch.task import Task
    from autobatch.tuning import join_study, recommend, tune
    from autobatch.workload import Workload

__version__ = "0.1.0"

_HOMES = {
    "AutobatchError": "errors",
    "BatchSizeOneDoesNotFit": "errors",
    "InvalidInputError": "errors",
    "StudyInterrupted": "errors",
    "CudaMeter": "memory",
    "MemoryMeter": "memory",
    "MpsMeter": "memory",
    "TrackedMeter": "memory",
    "XpuMeter": "memory",
    "meter_for": "memory",
    "is_oom_error": "oom",
    "find_max_batch_size": "probing",
    "probe": "probing",
    "EvalPoint": "records",
    "MemoryModel": "records",
    "ProbeAttempt": "records",
    "ProbeResult": "records",
    "StudySettings": "records",
    "TrialRecord": "records",
    "TuneObserver": "records",
    "TuneResult": "records",
    "Task": "task",
    "join_study": "tuning",
    "recommend": "tuning",
    "tune": "tuning",
    "Workload": "workload",
}

__all__ = [
    "AutobatchError",
    "BatchSizeOneDoesNotFit",
    "CudaMeter",
    "EvalPoint",
    "find_max_batch_size",
    "InvalidInputError",
    "is_oom_error",
    "join_study",
    "MemoryMeter",
    "MemoryModel",
    "meter_for",
    "MpsMeter",
    "probe",
    "ProbeAttempt",
    "ProbeResult",
    "recommend",
    "StudyInterrupted",
    "StudySettings",
    "Task",
    "TrackedMeter",
    "TrialRecord",
    "tune",
    "TuneObserver",
    "TuneResult",
    "Workload",
    "XpuMeter",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
