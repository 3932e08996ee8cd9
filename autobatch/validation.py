"""One declaration per public parameter: its type, its range, the strings it allows.

``Task``, ``probe``, ``find_max_batch_size``, ``tune``, ``join_study`` and the CLI check their
arguments here, at the boundary, before any model is built or any storage is written, and a
bad value is one line naming the parameter, the value and what is allowed. Each declaration
also produces the invalid values the tests try on every parameter, so a new parameter is
tested as soon as it is declared (in the spirit of scikit-learn's ``_parameter_constraints``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from autobatch.errors import InvalidInputError
from autobatch.memory.base import MemoryMeter
from autobatch.records import ProbeResult
from autobatch.units import parse_bytes

NAN, INF = float("nan"), float("inf")


class Spec(Protocol):
    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` ("must be ..."), or None when it is valid."""

    def invalid(self) -> list[Any]:
        """Values that must be refused: for the tests."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    """A Python or NumPy integer (scikit-learn's grids hand out ``np.int64``), not a bool."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_number(value: Any) -> bool:
    """A real number of Python's or NumPy's, not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


@dataclass(frozen=True)
class Integer:
    low: int | None = None
    example: int = 1

    def problem(self, value: Any) -> str | None:
        wanted = "an integer" if self.low is None else f"an integer >= {self.low}"
        if not _is_int(value) or (self.low is not None and value < self.low):
            return f"must be {wanted}, e.g. {self.example}"
        return None

    def invalid(self) -> list[Any]:
        bad: list[Any] = [str(self.example), self.example + 0.5, True, NAN]
        return bad + ([self.low - 1] if self.low is not None else [])


@dataclass(frozen=True)
class Real:
    """A finite number in [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: float = 1.0
    unit: str = ""

    def _range(self) -> str:
        if self.low == 0 and self.low_open and self.high is None:
            return "a positive number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a finite number" + (f" {' and '.join(parts)}" if parts else "")

    def problem(self, value: Any) -> str | None:
        ok = _is_number(value) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        return None if ok else f"must be {self._range()}, e.g. {self.example:g}{self.unit}"

    def invalid(self) -> list[Any]:
        bad: list[Any] = [str(self.example), True, NAN, INF, -INF]
        if self.low is not None:
            bad.append(self.low - 1 if not self.low_open else self.low)
        if self.high is not None:
            bad.append(self.high + 1 if not self.high_open else self.high)
        return bad


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        if any(value is option or (value == option and type(value) is type(option))
               for option in self.options):  # fmt: skip
            return None
        return "must be one of " + ", ".join(repr(o) for o in self.options)

    def invalid(self) -> list[Any]:
        return ["no-such-option", 3]


@dataclass(frozen=True)
class Flag:
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "must be True or False"

    def invalid(self) -> list[Any]:
        return ["yes", 1]


@dataclass(frozen=True)
class Text:
    example: str = "name"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value.strip():
            return None
        return f"must be a non-empty string, e.g. {self.example!r}"

    def invalid(self) -> list[Any]:
        return ["", 3]


@dataclass(frozen=True)
class Folder:
    def problem(self, value: Any) -> str | None:
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
            return None
        return "must be a folder's path, e.g. '/tmp/probes'"

    def invalid(self) -> list[Any]:
        return ["", 3]


@dataclass(frozen=True)
class Texts:
    example: str = "cuda:0"

    def problem(self, value: Any) -> str | None:
        if (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and value
            and all(isinstance(v, str) and v.strip() for v in value)
        ):
            return None
        return f"must be a non-empty list of strings, e.g. [{self.example!r}]"

    def invalid(self) -> list[Any]:
        return [[], "cuda:0", [0]]


@dataclass(frozen=True)
class ByteSize:
    def problem(self, value: Any) -> str | None:
        try:
            parse_bytes(value)
        except InvalidInputError:
            return "must be a positive size in bytes or a string such as '2GiB' or '512MB'"
        return None

    def invalid(self) -> list[Any]:
        return ["two gigs", -5, 0, True, INF]


@dataclass(frozen=True)
class BatchSizes:
    def problem(self, value: Any) -> str | None:
        if (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and value
            and all(_is_int(v) and v >= 1 for v in value)
        ):
            return None
        return "must be a list of positive integers, e.g. [16, 32, 64]"

    def invalid(self) -> list[Any]:
        return [[], [0, 8], [8.5], "16,32", [True]]


@dataclass(frozen=True)
class MultiplierRange:
    def problem(self, value: Any) -> str | None:
        ok = (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) == 2
            and all(_is_number(v) and math.isfinite(v) for v in value)
            and 0 < value[0] <= 1 <= value[1]
        )
        return None if ok else "must be a pair (low, high) of finite numbers, 0 < low <= 1 <= high"

    def invalid(self) -> list[Any]:
        return [(0.5,), (0.5, INF), (2.0, 4.0), (0.5, 0.9), (0, 4), "0.25,4", (0.5, 2, 4)]


@dataclass(frozen=True)
class Instance:
    """An object of one of ``kinds``, named by ``wanted`` in the message."""

    kinds: tuple[type, ...]
    wanted: str

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, self.kinds) else f"must be {self.wanted}"

    def invalid(self) -> list[Any]:
        return ["x", 3]


@dataclass(frozen=True)
class Observers:
    def problem(self, value: Any) -> str | None:
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return None
        return "must be a list of observers (objects with the TuneObserver methods)"

    def invalid(self) -> list[Any]:
        return ["tracker", 3]


@dataclass(frozen=True)
class Optional:
    inner: Any

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        found = self.inner.problem(value)
        return None if found is None else f"{found} (or None)"

    def invalid(self) -> list[Any]:
        return [v for v in self.inner.invalid() if v is not None]


# -- the declarations ---------------------------------------------------------------------------

FRACTION = Real(0, 1, high_open=True, example=0.05)
METER = Instance((MemoryMeter,), "a MemoryMeter, e.g. TrackedMeter(capacity=2**30)")

TASK: dict[str, Spec] = {
    "lr": Real(0, low_open=True, example=1e-3),
    "batch_size": Integer(1, example=32),
    "precision": Choice(("fp32", "bf16", "fp16")),  # Task.Precision
    "metric": Choice((None, "accuracy")),
    "name": Text("my-task"),
    "seed": Integer(example=0),
    "max_grad_norm": Optional(Real(0, low_open=True, example=1.0)),
}

FIND_MAX_BATCH_SIZE: dict[str, Spec] = {
    "meter": METER,
    "max_batch_size": Optional(Integer(1, example=4096)),
    "headroom": FRACTION,
    "multiple_of": Integer(1, example=8),
    "tolerance": Real(0, 1, high_open=True, example=0.02),
    "steps_per_call": Integer(1),
    "min_batch_size": Optional(Integer(1)),
    "max_attempts": Optional(Integer(1, example=25)),
}

PROBE: dict[str, Spec] = {
    "meter": Optional(METER),
    "model": Optional(Instance((nn.Module,), "a torch.nn.Module")),
    "optimizer": Optional(Instance((torch.optim.Optimizer,), "a torch.optim.Optimizer")),
    "memory_budget": Optional(ByteSize()),
    "headroom": FRACTION,
    "max_batch_size": Optional(Integer(1, example=4096)),
    "multiple_of": Integer(1, example=8),
    "tolerance": Real(0, 1, high_open=True, example=0.02),
    "cache": Flag(),
    "cache_dir": Optional(Folder()),
    "plan_for": Optional(ByteSize()),
}

#: What a worker needs, whether it prepared the study or joins one.
_WORKER: dict[str, Spec] = {
    "timeout": Optional(Real(0, low_open=True, example=3600, unit=" (seconds)")),
    "mlflow": Flag(),
    "tracking_uri": Optional(Text("sqlite:///mlflow.db")),
    "observers": Observers(),
    "meter": Optional(METER),
    "progress": Flag(),
    "heartbeat_interval": Optional(Integer(1, example=10)),
    "grace_period": Optional(Integer(1, example=30)),
}

TUNE: dict[str, Spec] = {
    **_WORKER,
    "n_trials": Optional(Integer(1, example=20)),
    "min_trials": Optional(Integer(1, example=8)),
    "max_epochs": Real(0, low_open=True, example=10),
    "candidates": Optional(BatchSizes()),
    "objective": Choice(("time", "loss", "pareto")),
    "lr_rule": Choice(("auto", "saturating-linear", "saturating-sqrt", "linear", "sqrt", "none")),
    "lr_multiplier_range": MultiplierRange(),
    "scale_adamw": Flag(),
    "lr_range_test": Flag(),
    "cache": Flag(),
    "target_loss": Optional(Real(example=0.25)),
    "tolerance": Optional(FRACTION),
    "seed": Integer(example=0),
    "storage": Optional(Text("sqlite:///autobatch.db")),
    "study_name": Optional(Text("my-study")),
    "memory_budget": Optional(ByteSize()),
    "probe_result": Optional(Instance((ProbeResult,), "a ProbeResult from autobatch.probe()")),
    "headroom": FRACTION,
    "max_batch_size": Optional(Integer(1, example=4096)),
    "experiment": Optional(Text("my-experiment")),
    "workers": Integer(1, example=2),
    "target": Optional(Text("my_package.tasks:make_task")),
    "devices": Optional(Texts()),
    "threads": Optional(Integer(1)),
    "verbose": Integer(0, example=1),
}

JOIN_STUDY: dict[str, Spec] = {
    **_WORKER,
    "storage": Text("postgresql://user@host/db"),
    "study_name": Optional(Text("my-study")),
    "wait": Real(0, example=600, unit=" (seconds)"),
}


def check(declared: Mapping[str, Spec], values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise InvalidInputError for the first value in ``values`` that its declaration
    refuses; names without a declaration are not looked at."""
    for name, spec in declared.items():
        if name not in values:
            continue
        value = values[name]
        found = spec.problem(value)
        if found is not None:
            raise InvalidInputError(f"{prefix}{name}={_show(value)} {found}")
