"""The real training step of a task: forward, loss, backward, optimizer step, with autocast."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autobatch.errors import InvalidInputError
from autobatch.task import Task

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def forward_loss(task: Task, model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss of one batch: the task's custom step, or ``loss(model(*inputs), targets)``."""
    if task.step is not None:
        return task.step(model, batch)
    if isinstance(batch, dict):
        raise TypeError(
            "a dict batch needs a custom step: Task(step=lambda model, batch: ...) that returns "
            "the loss"
        )
    *inputs, targets = batch
    return task.loss(model(*inputs), targets)


def autocast(task: Task) -> contextlib.AbstractContextManager:
    """Autocast as the task's precision asks, or nothing for fp32."""
    dtype = _AUTOCAST_DTYPES.get(task.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=task.device.type, dtype=dtype)


class TrainStep:
    """One optimizer update on one batch, exactly as training will run it.

    The returned loss stays on the device (detached): callers accumulate it there and read it
    once per evaluation, so no step waits for the host.
    """

    def __init__(self, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(task.device.type) if task.precision == "fp16" else None
        self._autocast = autocast(task)  # re-entered every step, made once

    def __call__(
        self,
        batch: Any,
        after_forward: Callable[[], None] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """``after_forward``/``after_backward`` let the probe read memory between phases."""
        with self._autocast:
            loss = forward_loss(self.task, self.model, batch)
        if after_forward is not None:
            after_forward()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if after_backward is not None:
                after_backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


#: The last model each factory returned, while it lives: a factory that hands back the same
#: object is caught at its second call.
_built: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def build(task: Task, lr: float | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model on the task's device and its optimizer, from the task's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        model = task.model()
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"Task.model() returned {type(model).__name__}; it must return a torch.nn.Module"
        )
    if _built.get(id(task.model)) is model:
        raise InvalidInputError(
            "Task.model() returned the same module object twice; it must build a fresh one on "
            "every call (model=lambda: MyNet(), not model=lambda: net), or each trial would go "
            "on from the weights the previous one left"
        )
    _built[id(task.model)] = model
    model = model.to(task.device)
    optimizer = task.optimizer(model.parameters(), task.lr if lr is None else lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidInputError(
            f"Task.optimizer(params, lr) returned {type(optimizer).__name__}; it must return a "
            "torch.optim.Optimizer"
        )
    return model, optimizer
