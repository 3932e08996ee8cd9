"""The real training step of a workload: its loss, backward, optimizer step, with autocast."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autobatch.data import batch_length
from autobatch.errors import InvalidInputError
from autobatch.task import Task
from autobatch.workload import Workload, max_grad_norm

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


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's batch-norm layers (``BatchNorm1d/2d/3d``, their lazy forms,
    ``SyncBatchNorm``). In training mode each normalises over the batch, so it cannot train on
    a batch of one sample (torch raises for ``(1, C)`` inputs; on larger ones the statistics
    of one sample are noise). Instance and group norm normalise each sample on its own."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    """Batch norm needs two samples per batch in training mode: the smallest size to probe."""
    return bool(batch_norms(model))


def needs_two_samples(model: nn.Module) -> bool:
    """Whether a batch of one sample cannot train ``model`` as it is now: it has a batch-norm
    layer in training mode. Training epochs then leave out a final one-sample batch
    (``BatchSource.epoch(drop_single=True)``), and a batch size of 1 is refused."""
    return any(m.training for m in batch_norms(model))


class TrainStep:
    """One optimizer update on one batch, exactly as training will run it.

    The returned loss stays on the device (detached): callers accumulate it there and read it
    once per evaluation, so no step waits for the host. An optimizer that needs a closure
    (L-BFGS) gets one that re-evaluates the same batch; its first call hands back the loss and
    gradients already computed, so the phases read between stay those of one step.

    What the workload's loss returns is checked (a tensor of one element that requires grad),
    and a batch of one sample is refused for a model with batch norm in training mode: each
    would otherwise fail inside ``backward`` or batch norm, far from its cause. ``loss_scale``:
    fp16's first loss scale (GradScaler's 2**16 in training).
    """

    def __init__(
        self,
        workload: Workload,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_scale: float = 2.0**16,
    ) -> None:
        self.workload = workload
        self.model = model
        self.optimizer = optimizer
        fp16 = workload.precision == "fp16"
        if fp16 and any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
            raise InvalidInputError(
                "precision='fp16' scales the loss of a float32 model run in fp16 by autocast, "
                "and torch cannot unscale fp16 gradients; keep the model's parameters in "
                "float32, or train the fp16 model as it is with precision='fp32'"
            )
        device = workload.device.type
        self.scaler = torch.amp.GradScaler(device, init_scale=loss_scale) if fp16 else None
        self._autocast = autocast(workload)  # re-entered every step, made once
        self._batch_norms = batch_norms(model)
        self.max_grad_norm = max_grad_norm(workload)
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
        if self._batch_norms and _one_sample(batch) and needs_two_samples(self.model):
            names = sorted({type(m).__name__ for m in self._batch_norms})
            raise InvalidInputError(
                f"a batch of 1 sample cannot train {type(self.model).__name__}: its "
                f"{', '.join(names)} layers need at least 2 samples per batch in training mode; "
                "use batch sizes of 2 or more (Task.batch_size, tune's candidates)"
            )
        with self._autocast:
            loss = self.workload.batch_loss(self.model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
            raise InvalidInputError(_not_a_loss(self.workload, loss, self.model))
        if after_forward is not None:
            after_forward()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward()
            if self.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clipped at the gradients' true scale
                self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if after_backward is not None:
                after_backward()
            self._clip()
            if self.closure:
                self.optimizer.step(self._again(batch, loss.detach()))
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().reshape(())  # a loss of shape (1,) too: losses stack as scalars

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
            self._clip()
            return loss.detach()

        return closure

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)


def _one_sample(batch: Any) -> bool:
    try:
        return batch_length(batch) == 1
    except (TypeError, IndexError, StopIteration):  # a batch type whose size cannot be told
        return False


def _not_a_loss(workload: Workload, loss: Any, model: nn.Module) -> str:
    """Why ``loss`` cannot be trained on, naming where it came from and the fix."""
    source = f"{type(workload).__name__}.batch_loss(model, batch)"
    if isinstance(workload, Task):
        source = "Task.step(model, batch)" if workload.step is not None else "Task.loss"
    if not isinstance(loss, torch.Tensor):
        got = f"a {type(loss).__name__}"
        fix = "return the loss tensor itself (not .item() or a number)"
    elif loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}"
        fix = "reduce it to one value, e.g. .mean() (reduction='mean')"
    elif not any(p.requires_grad for p in model.parameters()):
        return (
            f"{source} returned a loss that does not require grad, because no parameter of the "
            "model does (all are frozen): unfreeze those to train (requires_grad_(True))"
        )
    else:
        got = "a tensor that does not require grad"
        fix = "compute it from the model's output, outside torch.no_grad() and without .detach()"
    return f"{source} must return a scalar loss tensor to backpropagate; it returned {got}: {fix}"


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
