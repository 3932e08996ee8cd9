"""The workload protocol: the few things probe and tune need from any training setup.

``probe()`` and ``tune()`` never look at how a model is described. They build a fresh model
and optimizer, draw training and validation batches of a size they choose, and ask for one
batch's loss; the step (autocast, backward, optimizer step, fp16 loss scaling) and the
evaluation loop are theirs, so every workload is measured and trained the same way.
:class:`autobatch.Task` implements the protocol for models described by factories; the
integrations implement it for a LightningModule (``LightningWorkload``) and a Hugging Face
``Trainer`` (``TrainerWorkload``); anything else can, in a few lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from autobatch import validation
from autobatch.data import BatchSource
from autobatch.errors import InvalidInputError


@runtime_checkable
class Workload(Protocol):
    """A training setup probe and tune can run.

    Facts: ``name`` (names the study), ``device`` (a ``torch.device``), ``precision``
    (``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast, and loss scaling for fp16), ``lr`` (the
    learning rate known to work at ``batch_size``; the tuner rescales it), ``seed`` (every
    fresh model starts from it), ``train_size`` (training samples). Optional:
    ``max_grad_norm`` (clip the gradients' total norm to it before each optimizer step; absent
    or None: no clipping).
    """

    name: str
    device: torch.device
    precision: str
    lr: float
    batch_size: int
    seed: int

    @property
    def train_size(self) -> int: ...

    def model(self) -> nn.Module:
        """A fresh, untrained model (on any device: it is moved to ``device``), built anew
        on every call. Called with the torch seed set to ``seed``."""
        ...

    def optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer the model trains with, at learning rate ``lr``."""
        ...

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch: the forward pass and the loss, nothing else (the
        caller runs backward and the optimizer step, under autocast as ``precision`` says)."""
        ...

    def evaluate(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One validation batch's mean loss, and how many of its samples the model got right
        (None when the workload measures no accuracy). Runs under ``no_grad`` and autocast."""
        ...

    def training_batches(self) -> BatchSource:
        """The training samples, from which batches of any size are drawn."""
        ...

    def validation_batches(self) -> BatchSource | None:
        """The validation samples (None when there are none: tune needs them, probe does not)."""
        ...


def max_grad_norm(workload: Workload) -> float | None:
    """The workload's gradient clipping, an optional fact of the protocol."""
    value = getattr(workload, "max_grad_norm", None)
    return None if value is None else float(value)


_METHODS = (
    "model",
    "optimizer",
    "batch_loss",
    "evaluate",
    "training_batches",
    "validation_batches",
)

#: The facts a workload declares, checked like Task's own fields.
_FACTS = ("name", "lr", "batch_size", "precision", "seed")


def check(workload: Any, caller: str) -> None:
    """One line when ``workload`` is not a usable :class:`Workload`: what is missing or wrong.
    A Task has checked its own fields when it was made."""
    from autobatch.task import Task

    if isinstance(workload, Task):
        return
    absent = [name for name in (*_FACTS, "device", "train_size") if not hasattr(workload, name)]
    absent += [name for name in _METHODS if not callable(getattr(workload, name, None))]
    if absent:
        raise InvalidInputError(
            f"{caller}() needs an autobatch.Task or another Workload; "
            f"{type(workload).__name__} lacks {', '.join(absent)} (see autobatch.Workload)"
        )
    prefix = f"{type(workload).__name__}."
    validation.check(
        {name: validation.TASK[name] for name in _FACTS},
        {name: getattr(workload, name) for name in _FACTS},
        prefix=prefix,
    )
    if not isinstance(workload.device, torch.device):
        raise InvalidInputError(
            f"{prefix}device={workload.device!r} must be a torch.device, e.g. torch.device('cpu')"
        )
