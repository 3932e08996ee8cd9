"""Task validation at the boundary: every mistake is named, with the fix, before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import InvalidInputError, Task, probe


def x_y(samples: int = 32, features: int = 8):
    return torch.randn(samples, features), torch.randint(0, 3, (samples,))


def make(**overrides) -> Task:
    fields = {
        "model": lambda: nn.Linear(8, 3),
        "train_data": x_y(),
        "loss": F.cross_entropy,
    }
    fields.update(overrides)
    return Task(**fields)


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(8), 0


def test_a_valid_task_is_normalised():
    task = make(lr=1, device="cpu", val_data=x_y(10))
    assert task.lr == 1.0 and isinstance(task.lr, float)
    assert task.device == torch.device("cpu")
    assert task.train_size == 32
    assert make(train_data=Samples(7)).train_size == 7
    assert make(train_data=[torch.randn(5, 8), torch.randint(0, 3, (5,))]).train_size == 5


def test_a_custom_step_replaces_the_loss():
    task = make(loss=None, step=lambda model, batch: model(batch[0]).sum())
    assert task.loss is None and callable(task.step)


@pytest.mark.parametrize(
    ("overrides", "names", "fix"),
    [
        ({"model": nn.Linear(8, 3)}, "Task.model", "lambda"),
        ({"model": "resnet18"}, "Task.model", "lambda"),
        ({"optimizer": "adamw"}, "Task.optimizer", "torch.optim.AdamW"),
        ({"loss": None}, "loss", "cross_entropy"),
        ({"loss": "cross_entropy"}, "Task.loss", "callable"),
        ({"step": 3}, "Task.step", "callable"),
        ({"collate_fn": "default"}, "Task.collate_fn", "callable"),
        ({"lr": 0}, "Task.lr", "positive"),
        ({"lr": -1e-3}, "Task.lr", "positive"),
        ({"lr": float("nan")}, "Task.lr", "positive"),
        ({"lr": float("inf")}, "Task.lr", "positive"),
        ({"lr": "1e-3"}, "Task.lr", "positive"),
        ({"lr": True}, "Task.lr", "positive"),
        ({"batch_size": 0}, "Task.batch_size", ">= 1"),
        ({"batch_size": 1.5}, "Task.batch_size", "integer"),
        ({"batch_size": True}, "Task.batch_size", "integer"),
        ({"precision": "fp8"}, "Task.precision", "bf16"),
        ({"precision": "float32"}, "Task.precision", "fp32"),
        ({"metric": "f1"}, "Task.metric", "accuracy"),
        ({"device": "gpu"}, "Task.device", "cuda"),
        ({"train_data": torch.randn(32, 8)}, "Task.train_data", "tuple"),
        ({"val_data": torch.randn(32, 8)}, "Task.val_data", "tuple"),
        (
            {"train_data": (torch.randn(32, 8), torch.randint(0, 3, (31,)))},
            "Task.train_data",
            "one row per sample",
        ),
        ({"train_data": (torch.randn(32, 8), torch.tensor(1))}, "Task.train_data", "per sample"),
        ({"train_data": (torch.randn(0, 8), torch.zeros(0))}, "Task.train_data", "at least one"),
        ({"train_data": ()}, "Task.train_data", "at least one"),
        ({"train_data": []}, "Task.train_data", "at least one"),
        ({"train_data": Samples(0)}, "Task.train_data", "at least one"),
        ({"val_data": Samples(0)}, "Task.val_data", "at least one"),
        ({"train_data": 42}, "Task.train_data", "Dataset"),
        ({"train_data": (i for i in range(3))}, "Task.train_data", "Dataset"),
        (
            {"train_data": (torch.randn(32, 8), [0, 1, 2] * 10 + [0, 1])},
            "Task.train_data",
            "torch.as_tensor",
        ),
        (
            {"train_data": (np.zeros((32, 8)), np.zeros(32))},
            "Task.train_data",
            "torch.as_tensor",
        ),
        (  # a list of arrays, like a tuple of them: not a 2-sample Dataset
            {"train_data": [np.zeros((32, 8)), np.zeros(32)]},
            "Task.train_data",
            "torch.as_tensor",
        ),
        (
            {"val_data": (torch.tensor([[0.0], [float("nan")]]), torch.zeros(2))},
            "Task.val_data",
            "nan",
        ),
        (
            {"train_data": (torch.tensor([[1.0], [float("inf")]]), torch.zeros(2))},
            "Task.train_data",
            "inf",
        ),
        ({"seed": "x"}, "Task.seed", "integer"),
        ({"name": ""}, "Task.name", "non-empty"),
    ],
)
def test_bad_fields_are_rejected_with_the_field_and_a_fix(overrides, names, fix):
    with pytest.raises(InvalidInputError) as info:
        make(**overrides)
    message = str(info.value)
    assert names in message
    assert fix in message


def test_invalid_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        make(lr=-1)


def test_a_model_factory_that_returns_no_module_is_rejected_at_build():
    task = make(model=lambda: "not a module")
    with pytest.raises(InvalidInputError, match=r"Task\.model\(\) returned str"):
        probe(task, memory_budget="1MiB", cache=False)


def test_an_optimizer_factory_that_returns_no_optimizer_is_rejected_at_build():
    task = make(optimizer=lambda params, lr: {"lr": lr})
    with pytest.raises(InvalidInputError) as info:
        probe(task, memory_budget="1MiB", cache=False)
    assert "Task.optimizer" in str(info.value)
    assert "torch.optim.Optimizer" in str(info.value)


def test_a_model_factory_that_returns_the_same_module_is_refused():
    net = nn.Linear(8, 3)
    task = make(model=lambda: net)
    with pytest.raises(InvalidInputError, match="same module object twice") as info:
        probe(task, memory_budget="1MiB", cache=False)
        probe(task, memory_budget="1MiB", cache=False)
    assert "lambda: MyNet()" in str(info.value)
    fresh = make(model=lambda: nn.Linear(8, 3))
    for _ in range(2):
        probe(fresh, memory_budget="1MiB", cache=False)


def test_an_optimizer_that_needs_a_closure_gets_one_that_reuses_the_first_evaluation():
    from autobatch.training import TrainStep, build

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    forwards = []

    def loss(out, target):
        forwards.append(1)
        return F.mse_loss(out, target)

    task = make(
        model=lambda: nn.Linear(8, 1),
        train_data=(x, y),
        loss=loss,
        optimizer=lambda params, lr: torch.optim.LBFGS(params, lr=lr, max_iter=4),
        lr=1.0,
    )
    model, optimizer = build(task)
    step = TrainStep(task, model, optimizer)
    first = float(step((x, y)))
    # One evaluation by the step, the rest by L-BFGS's own iterations: none twice over.
    assert len(forwards) == optimizer.state[optimizer._params[0]]["func_evals"] > 1
    assert float(step((x, y))) < first / 10
    assert all(p.grad is None for p in model.parameters())


def test_fp16_loss_scaling_with_an_optimizer_that_needs_a_closure_is_refused():
    from autobatch.training import TrainStep, build

    task = make(optimizer=torch.optim.LBFGS, lr=1.0, precision="fp16")
    model, optimizer = build(task)
    with pytest.raises(InvalidInputError, match="use precision='bf16' or 'fp32'"):
        TrainStep(task, model, optimizer)
