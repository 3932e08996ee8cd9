"""What the user hands autobatch to train, validated once at the boundary."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from autobatch import validation
from autobatch.data import BatchSource, is_tensor_data, non_finite
from autobatch.errors import InvalidInputError

log = logging.getLogger(__name__)

#: Custom steps whose task's metric was said to go unmeasured (see ``Task``).
_UNMEASURED: weakref.WeakSet = weakref.WeakSet()


def _first_time(step: Any) -> bool:
    """Whether ``step`` is new to :data:`_UNMEASURED` (added now); True for one it cannot
    hold (unhashable, or without weak references)."""
    try:
        if step in _UNMEASURED:
            return False
        _UNMEASURED.add(step)
    except TypeError:
        pass
    return True


Precision = Literal["fp32", "bf16", "fp16"]
ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
#: A custom step computes the loss of one batch; autobatch does backward and the optimizer step.
StepFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Task:
    """A training job: everything that decides how much memory a step takes and how it learns.
    The :class:`~autobatch.workload.Workload` for models described by factories.

    ``train_data``/``val_data`` are a torch ``Dataset`` or, for the in-memory fast path, a tuple
    of tensors that share their first dimension (``(inputs, targets)``); batches are then
    sliced without a DataLoader. A list of samples (any map-style data) given with a
    ``collate_fn`` is a dataset that the collate_fn batches. ``lr`` is the learning rate
    known to work at ``batch_size``: the tuner rescales it for other batch sizes.
    ``max_grad_norm``: clip the gradients' total norm to it before each optimizer step, as
    training will (the rate that works depends on it).

    Example::

        task = Task(
            model=lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
            train_data=(x_train, y_train),
            val_data=(x_val, y_val),
            loss=nn.functional.cross_entropy,
            optimizer=torch.optim.AdamW,
            lr=1e-3,
            batch_size=32,
        )
    """

    model: ModelFactory
    train_data: Any
    loss: Callable[..., torch.Tensor] | None = None
    val_data: Any = None
    optimizer: OptimizerFactory = torch.optim.AdamW
    lr: float = 1e-3
    batch_size: int = 32
    device: str | torch.device = "cpu"
    precision: Precision = "fp32"
    collate_fn: Callable[[list[Any]], Any] | None = None
    step: StepFn | None = None
    metric: Literal["accuracy"] | None = None
    name: str = "task"
    seed: int = 0
    max_grad_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model, nn.Module) or not callable(self.model):
            raise InvalidInputError(
                "Task.model must be a factory that returns a fresh model, e.g. "
                "model=lambda: MyNet(); got " + type(self.model).__name__
            )
        if not callable(self.optimizer):
            raise InvalidInputError(
                "Task.optimizer must be a factory taking (params, lr), e.g. torch.optim.AdamW; got "
                + type(self.optimizer).__name__
            )
        if self.loss is None and self.step is None:
            raise InvalidInputError(
                "Task needs a loss (e.g. loss=torch.nn.functional.cross_entropy) or a custom "
                "step(model, batch) that returns the loss"
            )
        if self.loss is not None and not callable(self.loss):
            raise InvalidInputError("Task.loss must be callable as loss(outputs, targets)")
        if self.step is not None and not callable(self.step):
            raise InvalidInputError("Task.step must be callable as step(model, batch) -> loss")
        if self.step is not None and self.metric is not None and _first_time(self.step):
            # A warning, not a refusal: a task's step is often replaced on a copy of one with
            # a metric (dataclasses.replace(digits(), step=...)).
            log.warning(
                "Task(metric=%r) is not measured: it reads the model's outputs, which a custom "
                "step keeps to itself (it returns the loss only); give loss= instead of step= "
                "to measure it",
                self.metric,
            )
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise InvalidInputError("Task.collate_fn must be callable on a list of samples")
        validation.check(validation.TASK, vars(self), prefix="Task.")
        self.lr = float(self.lr)
        self.batch_size, self.seed = int(self.batch_size), int(self.seed)  # NumPy's too
        if self.max_grad_norm is not None:
            self.max_grad_norm = float(self.max_grad_norm)
        try:
            self.device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(
                f"Task.device={self.device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1', "
                "'mps' or 'xpu'"
            ) from exc
        _check_data(self.train_data, "train_data", self.collate_fn)
        if self.val_data is not None:
            _check_data(self.val_data, "val_data", self.collate_fn)

    @property
    def train_size(self) -> int:
        return _length(self.train_data, self.collate_fn)

    # The Workload protocol; ``model`` and ``optimizer`` are the factories above.

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The custom step's loss, or ``loss(model(*inputs), targets)``."""
        if self.step is not None:
            return self.step(model, batch)
        if isinstance(batch, dict):
            raise InvalidInputError(
                "a dict batch needs a custom step: Task(step=lambda model, batch: ...) that "
                "returns the loss"
            )
        *inputs, targets = batch
        return self.loss(model(*inputs), targets)

    def evaluate(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's loss, and its correct predictions when ``metric="accuracy"`` (see
        :func:`correct_predictions`)."""
        if self.metric != "accuracy" or self.step is not None:
            return self.batch_loss(model, batch), None
        *inputs, targets = batch
        outputs = model(*inputs)
        return self.loss(outputs, targets), correct_predictions(outputs, targets)

    def training_batches(self) -> BatchSource:
        return BatchSource(self.train_data, self.device, self.collate_fn)

    def validation_batches(self) -> BatchSource | None:
        if self.val_data is None:
            return None
        return BatchSource(self.val_data, self.device, self.collate_fn)


def correct_predictions(outputs: Any, targets: Any) -> torch.Tensor:
    """How many samples the model classified right: the argmax of its logits ``(N, classes)``
    (a tensor, or a dict's ``"logits"``) against class indices ``(N,)``, or against the argmax
    of targets shaped like the logits (one-hot or probabilities); one logit column ``(N, 1)``
    read at 0 against 0/1 targets. Any other shape is refused:
    a count over tokens or pixels, divided by the samples, would be a wrong accuracy."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        outputs = outputs["logits"]
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise InvalidInputError(
            "Task(metric='accuracy') reads the model's output as logits of shape (N, classes) "
            f"and the targets as a tensor; got {_described(outputs)} and targets "
            f"{_described(targets)}; return the logits from forward (or a dict with 'logits'), "
            "or leave metric unset"
        )
    n = outputs.shape[0] if outputs.dim() else 0
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        # One column: one binary logit, read at 0, against 0/1 targets. An argmax over it is
        # always right, so a regression read that way scored 100%.
        labels = targets.reshape(-1) if targets.numel() == n else None
        if labels is None or not bool(((labels == 0) | (labels == 1)).all()):
            raise InvalidInputError(
                "Task(metric='accuracy') reads one output column as a binary logit against "
                f"0/1 targets; got targets {_described(targets)} that are not all 0 or 1 (a "
                "regression?): leave metric unset"
            )
        return ((outputs.reshape(-1) > 0) == (labels > 0.5)).sum()
    if outputs.dim() == 2 and targets.shape == outputs.shape:
        return (outputs.argmax(-1) == targets.argmax(-1)).sum()
    if outputs.dim() == 2 and targets.shape == (n,):
        return (outputs.argmax(-1) == targets).sum()
    raise InvalidInputError(
        "Task(metric='accuracy') counts one prediction per sample: it needs logits of shape "
        "(N, classes) and targets of shape (N,) (class indices) or (N, classes) (one-hot or "
        f"probabilities); got logits {tuple(outputs.shape)} and targets "
        f"{tuple(targets.shape)}; leave metric unset for other outputs"
    )


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _length(data: Any, collate_fn: Any = None) -> int:
    if is_tensor_data(data, collate_fn):
        return int(data[0].shape[0])
    return len(data)


def _check_data(data: Any, name: str, collate_fn: Any = None) -> None:
    if isinstance(data, torch.Tensor):
        raise InvalidInputError(
            f"Task.{name} is a single tensor; pass (inputs, targets) as a tuple of tensors, or a "
            "torch Dataset"
        )
    if is_tensor_data(data, collate_fn):
        sizes = {int(t.shape[0]) if t.dim() else -1 for t in data}
        if len(sizes) != 1 or -1 in sizes:
            raise InvalidInputError(
                f"Task.{name}: the tensors have different first dimensions "
                f"{[tuple(t.shape) for t in data]}; every tensor needs one row per sample"
            )
        if sizes == {0}:
            raise InvalidInputError(f"Task.{name} is empty; give at least one sample")
        for tensor in data:
            bad = non_finite(tensor)
            if bad:
                raise InvalidInputError(
                    f"Task.{name} holds {bad} values (in a tensor of shape "
                    f"{tuple(tensor.shape)}); remove or impute those samples"
                )
        return
    samples = collate_fn is not None and isinstance(data, list)  # a list of samples
    if (
        not samples
        and isinstance(data, tuple | list)
        and any(isinstance(t, torch.Tensor | np.ndarray) for t in data)
    ):
        # (inputs, targets) with an array or list among them would pass as a 2-sample Dataset.
        kind = type(data).__name__
        raise InvalidInputError(
            f"Task.{name} is a {kind} of {', '.join(type(t).__name__ for t in data[:4])}; every "
            "element must be a torch tensor (convert with torch.as_tensor), or pass a torch Dataset"
        )
    # An IterableDataset inherits Dataset.__getitem__, which only raises: batches are drawn
    # by index, so it is refused whether or not it defines __len__.
    if (
        isinstance(data, IterableDataset)
        or not hasattr(data, "__getitem__")
        or not hasattr(data, "__len__")
    ):
        raise InvalidInputError(
            f"Task.{name} must be a torch Dataset (with __len__ and __getitem__) or a tuple of "
            f"tensors (inputs, targets); got {type(data).__name__}"
        )
    if len(data) == 0:
        raise InvalidInputError(f"Task.{name} is empty; give at least one sample")
