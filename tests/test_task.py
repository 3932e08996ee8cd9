"""Task validation at the boundary: every mistake is named, with the fix, before anything runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import InvalidInputError, Task, probe, tune


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
        ({"max_grad_norm": 0}, "Task.max_grad_norm", "positive number"),
        ({"name": ""}, "Task.name", "non-empty"),
    ],
)
def test_bad_fields_are_rejected_with_the_field_and_a_fix(overrides, names, fix):
    with pytest.raises(InvalidInputError) as info:
        make(**overrides)
    message = str(info.value)
    assert names in message
    assert fix in message


def test_a_metric_a_custom_step_cannot_measure_is_said_to_be_unmeasured(caplog):
    make(metric="accuracy", step=lambda model, batch: model(batch[0]).sum())
    assert "Task(metric='accuracy') is not measured" in caplog.text


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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_step_clips_the_gradients_total_norm_at_their_true_scale(precision):
    """SGD at lr 1 moves the weights by exactly the gradient: clipped, by max_grad_norm, also
    under fp16 loss scaling (unscaled first, or the clip would act on the scaled gradients)."""
    from autobatch.training import TrainStep, build

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    # Gradients above the clip, and below 1: fp16's first loss scale (65536) keeps them finite.
    y = 0.1 * (x @ torch.randn(8, 1))
    moved = {}
    for clip in (None, 0.01):
        task = make(
            model=lambda: nn.Linear(8, 1),
            train_data=(x, y),
            loss=F.mse_loss,
            optimizer=torch.optim.SGD,
            lr=1.0,
            precision=precision,
            max_grad_norm=clip,
        )
        model, optimizer = build(task)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        TrainStep(task, model, optimizer)((x, y))
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((after - before).norm())
    assert moved[None] > 0.05 and moved[0.01] == pytest.approx(0.01, rel=1e-3)


def test_fp16_loss_scaling_with_an_optimizer_that_needs_a_closure_is_refused():
    from autobatch.training import TrainStep, build

    task = make(optimizer=torch.optim.LBFGS, lr=1.0, precision="fp16")
    model, optimizer = build(task)
    with pytest.raises(InvalidInputError, match="use precision='bf16' or 'fp32'"):
        TrainStep(task, model, optimizer)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter((torch.zeros(8), 0) for _ in range(self.n))


class _SizedStream(_Stream):
    def __len__(self) -> int:  # still no __getitem__ of its own: Dataset's only raises
        return self.n


@pytest.mark.parametrize("field", ["train_data", "val_data"])
def test_every_iterable_dataset_is_refused_in_the_same_line(field):
    messages = []
    for data in (_Stream(16), _SizedStream(16)):
        with pytest.raises(InvalidInputError) as info:
            make(**{field: data})
        messages.append(str(info.value).replace(type(data).__name__, "X"))
    assert messages[0] == messages[1]
    assert f"Task.{field}" in messages[0] and "Dataset" in messages[0]


def _accuracy_task(**overrides) -> Task:
    return make(metric="accuracy", loss=lambda outputs, targets: torch.zeros(()), **overrides)


class _Fixed(nn.Module):
    """Returns the logits it was given, whatever the input; wrapped as ``wrap`` says."""

    def __init__(self, logits: torch.Tensor, wrap=lambda logits: logits) -> None:
        super().__init__()
        self.logits, self.wrap = logits, wrap

    def forward(self, x):
        return self.wrap(self.logits)


def test_accuracy_compares_argmax_with_one_hot_targets_and_reads_a_dict_s_logits():
    logits = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [3.0, 0, 0, 0]])
    classes = torch.tensor([0, 1, 2, 3])  # the last sample is wrong: 3 of 4 right
    one_hot = F.one_hot(classes, 4).float()  # as many samples as classes: no shape tells
    soft = one_hot * 0.7 + 0.075
    x = torch.zeros(4, 8)
    for targets in (classes, one_hot, soft):
        _, right = _accuracy_task().evaluate(_Fixed(logits), (x, targets))
        assert int(right) == 3
    task = _accuracy_task()
    _, right = task.evaluate(_Fixed(logits, lambda lo: {"logits": lo}), (x, one_hot))
    assert int(right) == 3


@pytest.mark.parametrize(
    ("logits", "wrap", "targets", "expected"),
    [
        (torch.zeros(4, 3), lambda lo: {"scores": lo}, torch.zeros(4).long(), "a dict"),
        (torch.zeros(4, 3), lambda lo: (lo, lo), torch.zeros(4).long(), "a tuple"),
        (torch.zeros(4, 5, 3), None, torch.zeros(4, 5).long(), r"\(4, 5, 3\)"),  # per token
        (torch.zeros(4), None, torch.zeros(4), r"logits \(4,\)"),  # one logit: no argmax
        (torch.zeros(4, 3), None, torch.zeros(4, 1).long(), r"targets \(4, 1\)"),
    ],
)
def test_accuracy_refuses_outputs_it_cannot_read_in_one_line(logits, wrap, targets, expected):
    model = _Fixed(logits) if wrap is None else _Fixed(logits, wrap)
    with pytest.raises(InvalidInputError, match=expected) as info:
        _accuracy_task().evaluate(model, (torch.zeros(4, 8), targets))
    message = str(info.value)
    assert "metric='accuracy'" in message and "leave metric unset" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("fields", "names", "got"),
    [
        ({"loss": lambda o, t: F.cross_entropy(o, t, reduction="none")}, "Task.loss", "(32,)"),
        ({"loss": lambda o, t: F.cross_entropy(o, t).item()}, "Task.loss", "a float"),
        ({"loss": lambda o, t: F.cross_entropy(o, t).detach()}, "Task.loss", "grad"),
        (
            {"loss": None, "step": lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])},
            None,
            None,
        ),
        ({"loss": lambda o, t: F.cross_entropy(o, t).reshape(1)}, None, None),  # one element
        (
            {"loss": None, "step": lambda model, batch: model(batch[0]).sum(1)},
            "Task.step",
            "(32,)",
        ),
    ],
)
def test_a_loss_that_is_not_a_scalar_tensor_is_one_line_naming_where_it_came_from(
    fields, names, got
):
    from autobatch.training import TrainStep, build

    task = make(**fields)
    model, optimizer = build(task)
    step = TrainStep(task, model, optimizer)
    if names is None:  # a scalar loss from a custom step trains
        assert step(task.train_data).dim() == 0
        return
    with pytest.raises(InvalidInputError) as info:
        step(task.train_data)
    message = str(info.value)
    assert message.startswith(names) and got in message and "\n" not in message
    with pytest.raises(InvalidInputError, match=names):  # the probe's first step says it
        probe(task, memory_budget="1MiB", cache=False)


def _batch_norm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_a_batch_of_one_sample_is_refused_for_a_model_with_batch_norm_in_training_mode():
    from autobatch.training import TrainStep, build, needs_two_samples

    x, y = x_y()
    task = make(model=_batch_norm_net)
    model, optimizer = build(task)
    step = TrainStep(task, model, optimizer)
    assert needs_two_samples(model)
    step((x[:2], y[:2]))  # two samples train
    with pytest.raises(InvalidInputError, match="BatchNorm1d") as info:
        step((x[:1], y[:1]))
    assert "2 or more" in str(info.value)
    model.eval()  # on running statistics, one sample is fine
    assert not needs_two_samples(model)
    step((x[:1], y[:1]))
    plain = make()  # and for a model without batch norm
    TrainStep(plain, *build(plain))((x[:1], y[:1]))


def test_probing_a_batch_norm_model_that_cannot_get_two_samples_names_why():
    one = make(model=_batch_norm_net, train_data=x_y(1))
    with pytest.raises(InvalidInputError, match="training data has 1 sample; give at least 2"):
        probe(one, memory_budget="4MiB", cache=False)
    with pytest.raises(InvalidInputError, match="max_batch_size=1; raise it to 2"):
        probe(make(model=_batch_norm_net), memory_budget="4MiB", cache=False, max_batch_size=1)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=generator), torch.randint(0, 2, (n,))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _time_first(samples):
    """Sequences padded time-first, as pad_sequence does by default: (T, N, 8)."""
    xs, ys = zip(*samples, strict=True)
    steps = torch.nn.utils.rnn.pad_sequence([x.repeat(3, 1) for x in xs])
    return steps, torch.stack(ys)


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor


def _own(samples) -> _Batch:
    xs, ys = zip(*samples, strict=True)
    return _Batch(torch.stack(xs), torch.stack(ys))


def test_a_collate_fn_s_own_batch_type_is_counted_and_a_time_first_batch_refused(tmp_path):
    """A dataclass batch probed, then crashed the study's clock ('cannot tell the batch
    size'); a time-first batch made the clock wait for ever for a batch of the asked size."""
    common = dict(train_data=_Pairs(96), val_data=_Pairs(32), lr=1e-2, batch_size=16)
    own = Task(
        model=lambda: nn.Linear(8, 2), collate_fn=_own,
        step=lambda model, batch: F.cross_entropy(model(batch.x), batch.y), **common,
    )  # fmt: skip
    result = tune(own, n_trials=1, max_epochs=1, mlflow=False, candidates=[16, 32])
    assert result.trials[0].iterations_per_epoch == 96 // result.trials[0].batch_size
    time_first = Task(
        model=lambda: nn.Linear(8, 2), collate_fn=_time_first,
        step=lambda model, batch: F.cross_entropy(model(batch[0]).mean(0), batch[1]), **common,
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"batch_first=True") as info:
        tune(time_first, n_trials=1, max_epochs=1, mlflow=False, candidates=[16, 32])
    assert "from collate_fn has 3 along the first dimension" in str(info.value)


def test_accuracy_reads_one_output_column_as_a_binary_logit_and_refuses_a_regression():
    """One column's argmax is always 0: a regression was scored 100% accurate untrained."""
    from autobatch.task import correct_predictions

    logits = torch.tensor([[2.0], [-1.0], [3.0], [-2.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # the third is wrong
    assert int(correct_predictions(logits, labels)) == 3
    assert int(correct_predictions(logits, labels.reshape(-1).long())) == 3
    with pytest.raises(InvalidInputError, match="not all 0 or 1") as info:
        correct_predictions(logits, torch.tensor([[0.3], [1.7], [2.2], [0.9]]))
    assert "leave metric unset" in str(info.value)


def test_a_dict_batch_without_a_custom_step_is_one_line():
    data = [{"x": torch.randn(8), "y": torch.tensor(0)} for _ in range(32)]
    task = Task(model=lambda: nn.Linear(8, 2), train_data=data, loss=F.cross_entropy)
    with pytest.raises(InvalidInputError, match="a dict batch needs a custom step"):
        probe(task, memory_budget="1MiB", cache=False)


def test_a_model_with_every_parameter_frozen_is_told_so():
    def frozen() -> nn.Module:
        return nn.Linear(8, 2).requires_grad_(False)

    data = (torch.randn(32, 8), torch.randint(0, 2, (32,)))
    with pytest.raises(InvalidInputError, match=r"no parameter of the model does \(all are"):
        probe(Task(model=frozen, train_data=data, loss=F.cross_entropy), memory_budget="1MiB")


def test_a_list_of_samples_with_a_collate_fn_is_a_dataset():
    """A list is a map-style dataset: with a collate_fn it was read as 300 columns of 16
    rows and the collate_fn was never called."""
    samples = [torch.randn(16) for _ in range(300)]

    def collate(batch):
        x = torch.stack(batch)
        return x, x.sum(1, keepdim=True)

    task = Task(
        model=lambda: nn.Linear(16, 1), train_data=samples, val_data=samples[:50],
        collate_fn=collate, loss=F.mse_loss,
    )  # fmt: skip
    assert task.train_size == 300
    found = probe(task, memory_budget="1MiB", cache=False)
    assert 1 < found.batch_size <= 300
    pair = [torch.randn(8, 16), torch.randn(8, 1)]
    columns = Task(model=lambda: nn.Linear(16, 1), train_data=pair, loss=F.mse_loss)
    assert columns.train_size == 8  # without one, a list of tensors is still (inputs, targets)
