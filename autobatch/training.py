"""The real training step of a workload: its loss, backward, optimizer step, with autocast."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autobatch.errors import InvalidInputError
from autobatch.workload import Workload

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(workload: Workload) -> contextlib.AbstractContextManager:
    """Autocast as the workload's precision asks, or nothing for fp32."""
    dtype = _AUTOCAST_DTYPES.get(workload.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=workload.device.type, dtype=dtype)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure that evaluates the loss again
    (L-BFGS: it re-evaluates the batch during its line search)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


class TrainStep:
    """One optimizer update on one batch, exactly as training will run it.

    The returned loss stays on the device (detached): callers accumulate it there and read it
    once per evaluation, so no step waits for the host. An optimizer that needs a closure
    (L-BFGS) gets one that re-evaluates the same batch; its first call hands back the loss and
    gradients already computed, so the phases read between stay those of one step.
    """

    def __init__(
        self, workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        self.workload = workload
        self.model = model
        self.optimizer = optimizer
        fp16 = workload.precision == "fp16"
        self.scaler = torch.amp.GradScaler(workload.device.type) if fp16 else None
        self._autocast = autocast(workload)  # re-entered every step, made once
        self.closure = needs_closure(optimizer)
        if self.closure and fp16:
            raise InvalidInputError(
                f"{type(optimizer).__name__} needs a closure, which fp16 loss scaling cannot "
                "drive (torch's GradScaler does not support one); use precision='bf16' or "
                "'fp32'"
            )

    def __call__(
        self,
        batch: Any,
        after_forward: Callable[[], None] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """``after_forward``/``after_backward`` let the probe read memory between phases."""
        with self._autocast:
            loss = self.workload.batch_loss(self.model, batch)
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
            if self.closure:
                self.optimizer.step(self._again(batch, loss.detach()))
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _again(self, batch: Any, first: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The closure: the loss and gradients just computed, then a fresh evaluation of
        ``batch`` at each later call."""
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return first
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast:
                loss = self.workload.batch_loss(self.model, batch)
            loss.backward()
            return loss.detach()

        return closure


#: The last model each factory returned, while it lives: a factory that hands back the same
#: object is caught at its second call. Keyed by the function (and, for a method, its object).
_built: weakref.WeakValueDictionary[tuple[int, int], nn.Module] = weakref.WeakValueDictionary()


def forked(workload: Workload) -> contextlib.AbstractContextManager:
    """The global random generators (the CPU's and the workload's GPU's) given back to their
    states at entry once the block ends: draws inside leave the caller's stream as it was."""
    devices = [workload.device] if workload.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def seeded(workload: Workload) -> Iterator[None]:
    """The global random generators seeded with the workload's seed inside (:func:`forked`):
    the same draws on every run, and the caller's states back after."""
    with forked(workload):
        torch.manual_seed(workload.seed)
        yield


def build(workload: Workload, lr: float | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model on the workload's device and its optimizer, from the workload's seed."""
    owner = type(workload).__name__
    with seeded(workload):
        model = workload.model()
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"{owner}.model() returned {type(model).__name__}; it must return a torch.nn.Module"
        )
    factory = workload.model  # a factory function, or a method: its object and function
    key = (id(getattr(factory, "__self__", None)), id(getattr(factory, "__func__", factory)))
    if _built.get(key) is model:
        raise InvalidInputError(
            f"{owner}.model() returned the same module object twice; it must build a fresh one "
            "on every call (model=lambda: MyNet(), not model=lambda: net), or each trial would "
            "go on from the weights the previous one left"
        )
    _built[key] = model
    model = model.to(workload.device)
    optimizer = workload.optimizer(model.parameters(), workload.lr if lr is None else lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidInputError(
            f"{owner}.optimizer(params, lr) returned {type(optimizer).__name__}; it must return "
            "a torch.optim.Optimizer"
        )
    return model, optimizer
