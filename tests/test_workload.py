"""The Workload protocol: probe() and tune() run any training setup that implements it, a Task
or not, and say in one line what a setup lacks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import InvalidInputError, Task, Workload, probe, tune
from autobatch.cli import main
from autobatch.data import BatchSource


def _data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=generator)
    return x, (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 3))


class Classifier:
    """A workload written from scratch, no Task inside: the classes of a generated problem,
    with a dict batch (as a Hugging Face collator makes) and its own accuracy count."""

    name = "from-scratch"
    device = torch.device("cpu")
    precision = "fp32"
    lr = 3e-3
    batch_size = 16
    seed = 0

    def __init__(self) -> None:
        self.train = _data(1024, 1)
        self.val = _data(256, 2)

    @property
    def train_size(self) -> int:
        return len(self.train[0])

    def model(self) -> nn.Module:
        return _net()

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr)

    def batch_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])

    def evaluate(self, model: nn.Module, batch):
        outputs = model(batch["x"])
        return F.cross_entropy(outputs, batch["y"]), (outputs.argmax(-1) == batch["y"]).sum()

    def training_batches(self) -> BatchSource:
        return BatchSource(_Pairs(*self.train), self.device)

    def validation_batches(self) -> BatchSource:
        return BatchSource(_Pairs(*self.val), self.device)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _same_as_task() -> Task:
    workload = Classifier()
    return Task(
        model=_net,
        train_data=workload.train,
        val_data=workload.val,
        loss=F.cross_entropy,
        optimizer=torch.optim.AdamW,
        lr=workload.lr,
        batch_size=workload.batch_size,
        name="as-a-task",
    )


def test_task_is_a_workload():
    assert isinstance(_same_as_task(), Workload)
    assert isinstance(Classifier(), Workload)


def test_probe_runs_any_workload_and_measures_what_a_task_measures():
    """The same model, data and optimizer, written as a Task and from scratch: the same
    training step, so the same memory and the same answer under the same budget."""
    mine = probe(Classifier(), memory_budget="4MiB", cache=False)
    theirs = probe(_same_as_task(), memory_budget="4MiB", cache=False)
    assert mine.batch_size == theirs.batch_size
    assert mine.eval_batch_size == theirs.eval_batch_size
    assert 1 < mine.batch_size < 1024
    assert [a.peak_bytes for a in mine.attempts] == [a.peak_bytes for a in theirs.attempts]


@pytest.mark.slow
def test_tune_runs_any_workload_to_a_recommendation():
    result = tune(Classifier(), n_trials=4, max_epochs=2, mlflow=False, candidates=[8, 32, 128])
    assert result.batch_size in (8, 32, 128)
    assert result.lr > 0 and result.epochs >= 1
    trained = [r for r in result.trials if r.curve]
    assert len(trained) >= 3
    # Its own accuracy count reached the records, and the model learnt something.
    best = min(trained, key=lambda r: r.best_val_loss)
    assert all(p.val_accuracy is not None for p in best.curve)
    assert max(p.val_accuracy for p in best.curve) > 0.5
    assert math.isfinite(result.target_loss)


class _Lacking:
    name = "half-done"

    def model(self) -> nn.Module:
        return _net()


def test_a_setup_that_is_not_a_workload_is_one_line_naming_what_it_lacks():
    with pytest.raises(InvalidInputError, match=r"probe\(\) needs .*Workload.*_Lacking lacks "):
        probe(_Lacking(), memory_budget="4MiB")
    with pytest.raises(InvalidInputError, match="batch_loss") as info:
        tune(_Lacking(), n_trials=1, mlflow=False)
    assert "\n" not in str(info.value)
    assert "model," not in str(info.value)  # what it has is not listed


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("lr", -1.0, "Classifier.lr=-1.0"),
        ("batch_size", 0, "Classifier.batch_size=0"),
        ("precision", "fp8", "Classifier.precision='fp8'"),
        ("device", "cpu", "Classifier.device='cpu' must be a torch.device"),
        ("batch_loss", None, "Classifier lacks batch_loss (see autobatch.Workload)"),
    ],
)
def test_a_workload_with_a_bad_fact_is_one_line(name, value, expected):
    workload = Classifier()
    setattr(workload, name, value)
    with pytest.raises(InvalidInputError, match=re.escape(expected)) as info:
        probe(workload, memory_budget="4MiB")
    assert "\n" not in str(info.value)


def test_tune_without_validation_data_is_one_line():
    workload = Classifier()
    workload.validation_batches = lambda: None
    with pytest.raises(InvalidInputError, match="'from-scratch' has no validation data"):
        tune(workload, n_trials=1, mlflow=False)


WORKLOAD_FILE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_workload import Classifier


def make():
    return Classifier()
"""


def test_the_cli_takes_a_target_that_returns_a_workload(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(WORKLOAD_FILE)
    assert main(["probe", f"{path}:make", "--memory-budget", "4MiB", "--json"]) == 0
    assert '"batch_size"' in capsys.readouterr().out
    # --device rebuilds a Task; a workload chooses its device itself.
    assert main(["probe", f"{path}:make", "--device", "cpu", "--memory-budget", "4MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autobatch: error: --device moves an autobatch.Task") and "\n" not in err


@pytest.mark.slow
def test_tune_with_workers_runs_a_workload_target(tmp_path, capsys):
    """Each worker builds the workload where the target builds it: no --device is passed to
    it (which only a Task takes; every worker refused it before), and --devices is refused."""
    path = tmp_path / "mine.py"
    path.write_text(WORKLOAD_FILE)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [f"{path}:make", "--storage", storage, "--no-mlflow", "--memory-budget", "4MiB"]
    common += ["--n-trials", "2", "--max-epochs", "1", "--json"]
    assert main(["tune", *common, "--workers", "2"]) == 0, capsys.readouterr().err[-2000:]
    assert '"batch_size"' in capsys.readouterr().out
    assert main(["tune", *common, "--workers", "2", "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--devices) moves an autobatch.Task" in err and "\n" not in err


def test_a_workload_whose_loss_is_not_a_scalar_tensor_is_one_line_naming_its_batch_loss():
    workload = Classifier()
    workload.batch_loss = lambda model, batch: F.cross_entropy(  # one loss per sample
        model(batch["x"]), batch["y"], reduction="none"
    )
    with pytest.raises(InvalidInputError) as info:
        probe(workload, memory_budget="4MiB", cache=False)
    message = str(info.value)
    assert message.startswith("Classifier.batch_loss(model, batch) must return a scalar loss")
    assert "a tensor of shape (" in message and ".mean()" in message and "\n" not in message
