"""Every declared parameter refuses every invalid value it declares, in one line, before any
model is built or any storage is written; and the command line says the same with exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import InvalidInputError, Task, TrackedMeter, find_max_batch_size, probe, tune
from autobatch import validation as v
from autobatch.cli import main
from autobatch.tuning import join_study

BUILT: list[int] = []


def counted_model() -> nn.Module:
    BUILT.append(1)
    return nn.Linear(8, 3)


def task(**fields) -> Task:
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    return Task(
        model=counted_model,
        train_data=(x[:48], y[:48]),
        val_data=(x[48:], y[48:]),
        loss=F.cross_entropy,
        **fields,
    )


def cases(declared: dict[str, v.Spec]) -> list:
    return [
        pytest.param(name, bad, id=f"{name}={bad!r}")
        for name, spec in declared.items()
        for bad in spec.invalid()
    ]


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    BUILT.clear()
    yield
    assert BUILT == [], "a model was built before the bad value was refused"
    assert list(Path(tmp_path).glob("*.db")) == [], "a store was written"


def refused(name: str, call) -> str:
    with pytest.raises(InvalidInputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and name in message, message
    return message


@pytest.mark.parametrize(("name", "bad"), cases(v.TASK))
def test_task(name, bad):
    refused(f"Task.{name}", lambda: task(**{name: bad}))


@pytest.mark.parametrize(("name", "bad"), cases(v.TUNE))
def test_tune(name, bad):
    options = {"n_trials": 1, "max_epochs": 1, "mlflow": False, name: bad}
    refused(name, lambda: tune(task(), **options))


@pytest.mark.parametrize(("name", "bad"), cases(v.PROBE))
def test_probe(name, bad):
    options = {"memory_budget": "64MiB", name: bad}
    refused(name, lambda: probe(task(), **options))


@pytest.mark.parametrize(("name", "bad"), cases(v.FIND_MAX_BATCH_SIZE))
def test_find_max_batch_size(name, bad):
    def step(batch_size: int) -> None:
        BUILT.append(batch_size)

    options = {"meter": TrackedMeter(1 << 20), name: bad}
    refused(name, lambda: find_max_batch_size(step, **options))


@pytest.mark.parametrize(("name", "bad"), cases(v.JOIN_STUDY))
def test_join_study(name, bad):
    options = {"storage": "sqlite:///study.db", "mlflow": False, name: bad}
    refused(name, lambda: join_study(task(), **options))


def test_declarations_accept_their_examples():
    assert v.Real(0, low_open=True).problem(1e-3) is None
    assert v.Integer(1).problem(1) is None and v.Integer(1).problem(True) is not None
    assert v.MultiplierRange().problem((0.25, 4.0)) is None
    assert v.Choice((None, "accuracy")).problem(None) is None
    assert v.Choice(("fp32",)).problem("fp32") is None
    assert v.ByteSize().problem("2GiB") is None and v.ByteSize().problem(1024) is None
    assert v.Optional(v.Real()).problem(None) is None
    assert v.Real(0, 1, high_open=True).problem(math.nextafter(1, 0)) is None
    # NumPy's numbers are numbers (a scikit-learn grid hands out np.int64); its bool is not.
    assert v.Integer(1).problem(np.int64(3)) is None and v.Integer(1).problem(np.bool_(1))
    assert v.Real(0, low_open=True).problem(np.float32(1e-3)) is None


# -- the command line ---------------------------------------------------------------------------


def cli_strings(spec: v.Spec) -> list[str]:
    """The invalid values a shell can type: the numbers the declaration refuses, and words."""
    out = ["x"]
    for bad in spec.invalid():
        if isinstance(bad, int | float) and not isinstance(bad, bool):
            out.append(repr(bad) if isinstance(bad, float) and math.isfinite(bad) else str(bad))
        elif isinstance(bad, str) and bad.strip() and not _numeric(bad):
            out.append(bad)  # "2.5" is how a shell writes a valid number: not a bad value
    return sorted(set(out))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


CLI_FLAGS = {
    "tune": {
        "--n-trials": "n_trials", "--timeout": "timeout", "--max-epochs": "max_epochs",
        "--target-loss": "target_loss", "--seed": "seed", "--headroom": "headroom",
        "--max-batch-size": "max_batch_size", "--memory-budget": "memory_budget",
        "--workers": "workers", "--threads": "threads",
        "--heartbeat-interval": "heartbeat_interval", "--grace-period": "grace_period",
    },
    "probe": {
        "--headroom": "headroom", "--max-batch-size": "max_batch_size",
        "--multiple-of": "multiple_of", "--memory-budget": "memory_budget",
    },
    "worker": {
        "--threads": "threads", "--timeout": "timeout", "--wait": "wait",
        "--heartbeat-interval": "heartbeat_interval", "--grace-period": "grace_period",
    },
}  # fmt: skip
DECLARED = {"tune": v.TUNE, "probe": v.PROBE, "worker": {**v.TUNE, **v.JOIN_STUDY}}
BASE = {
    "tune": ["digits", "--no-mlflow", "--n-trials", "1"],
    "probe": ["digits", "--memory-budget", "4MiB"],
    "worker": ["digits", "--no-mlflow", "--storage", "sqlite:///study.db"],
}


@pytest.mark.parametrize(
    ("command", "flag", "bad"),
    [
        pytest.param(command, flag, bad, id=f"{command} {flag} {bad}")
        for command, flags in CLI_FLAGS.items()
        for flag, name in flags.items()
        for bad in cli_strings(DECLARED[command][name])
    ],
)
def test_cli_bad_flag_is_one_line_exit_2(capsys, command, flag, bad):
    assert main([command, *BASE[command], f"{flag}={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autobatch: error:"), err
    assert "Traceback" not in err
