"""Save and restore, bit for bit, everything a probe's training steps change."""

from __future__ import annotations

import copy
import random
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from autobatch.errors import InvalidInputError


@dataclass
class RngState:
    """The random generators a training step may advance."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, persistent or not: a buffer left out of ``state_dict``
    (a running mean kept for the forward pass) changes in training all the same. A lazy
    parameter not yet initialised holds no value and is left out."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: t for name, t in tensors.items() if not is_lazy(t)}


def lazy_names(model: nn.Module) -> list[str]:
    """The model's parameters and buffers not initialised yet (``nn.LazyLinear``'s)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if is_lazy(t)]


def check_restorable(model: nn.Module) -> None:
    """Refuse a model the probe could not hand back as it found it: a training step initialises
    its lazy parameters (``nn.LazyLinear``) and turns the modules into their eager kind."""
    if lazy := lazy_names(model):
        raise InvalidInputError(
            f"the model's lazy parameters are not initialised yet ({', '.join(lazy[:3])}), and "
            "a probe would initialise them; run one forward pass on a batch first, or pass no "
            "model= so that the probe builds its own"
        )


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


@dataclass(frozen=True)
class _SavedTensor:
    """A tensor's value, copied to the host, and the device it goes back to."""

    value: torch.Tensor
    device: torch.device

    def restored(self) -> torch.Tensor:
        return self.value.to(self.device, copy=True)


def _saved_tensor(tensor: torch.Tensor) -> _SavedTensor:
    return _SavedTensor(_host_copy(tensor), tensor.device)


@dataclass(frozen=True)
class _SavedList:
    """A list in optimizer state (L-BFGS's history: tensors it appends to and pops in place),
    its tensors copied to the host."""

    items: list[Any]


def _saved_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _saved_tensor(value)
    if isinstance(value, list):
        return _SavedList([_saved_value(item) for item in value])
    return copy.deepcopy(value)


def _restored_value(value: Any) -> Any:
    if isinstance(value, _SavedList):
        return [_restored_value(item) for item in value.items]
    if isinstance(value, _SavedTensor):
        return value.restored()
    return copy.deepcopy(value)


class TrainingState:
    """Model parameters, buffers (persistent or not, and those registered as None), gradients,
    train/eval flags, the model's own random generators, the states of the torchmetrics
    metrics it holds (with their update counts and cached results) and optimizer state.

    Copies live in host memory, so saving them costs no accelerator memory. ``restore`` writes
    the saved values back into the same tensors (so references the user holds stay valid) and
    removes optimizer state and buffers that did not exist before; a buffer the forward pass
    replaced with a tensor of another shape gets a new tensor with its saved value. Gradients
    too: the probe's steps set ``p.grad`` to None between steps, and a gradient tensor the
    caller still holds is filled with its saved values and put back as ``p.grad``; one nobody
    holds is freed during the probe and restored as a new tensor with the same values. Lazy
    parameters not yet initialised have no value to save: a model built for the probe skips
    them, and one the user holds is refused first (:func:`check_restorable`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = {
            name: _saved_tensor(p) for name, p in model.named_parameters() if not is_lazy(p)
        }
        # By module, as registered: None entries included, lazy ones kept as they are.
        self.buffers = {
            (owner, name): None if b is None else _LAZY if is_lazy(b) else _saved_tensor(b)
            for owner, module in model.named_modules()
            for name, b in module._buffers.items()
        }
        self.grads = {
            name: None if p.grad is None else _host_copy(p.grad)
            for name, p in model.named_parameters()
        }
        # Weak: holding the tensors would keep their memory busy while the probe measures.
        self.grad_objects = {
            name: weakref.ref(p.grad) for name, p in model.named_parameters() if p.grad is not None
        }
        self.training = {name: m.training for name, m in model.named_modules()}
        self.generators = [(g, g.get_state()) for g in _generators(model)]
        self.metrics = {
            name: {attr: _saved_value(getattr(metric, attr)) for attr in _metric_attributes(metric)}
            for name, metric in _metrics(model)
        }
        # Keyed by the state's own keys: parameters, and whatever else an optimizer keeps.
        self.optimizer_state: list[tuple[Any, dict[str, Any]]] = []
        self.param_groups: list[dict[str, Any]] = []
        if optimizer is not None:
            self.optimizer_state = [
                (key, {name: _saved_value(value) for name, value in state.items()})
                for key, state in optimizer.state.items()
            ]
            self.param_groups = [
                {k: v for k, v in group.items() if k != "params"}
                for group in optimizer.param_groups
            ]

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.params:
                _put_back(param, self.params[name])
        self._restore_buffers()
        for name, param in self.model.named_parameters():
            saved = self.grads[name]
            if saved is None:
                param.grad = None
                continue
            ref = self.grad_objects.get(name)
            target = ref() if ref is not None else None
            if target is None or target.shape != saved.shape:
                target = param.grad if param.grad is not None else None
            if target is None or target.shape != saved.shape:
                param.grad = saved.to(param.device, copy=True)
            else:
                target.copy_(saved)
                param.grad = target
        for name, module in self.model.named_modules():
            module.train(self.training.get(name, module.training))
        for generator, state in self.generators:
            generator.set_state(state)
        self._restore_metrics()
        if self.optimizer is not None:
            self._restore_optimizer(self.optimizer)

    def _restore_buffers(self) -> None:
        for owner, module in self.model.named_modules():
            for name in list(module._buffers):
                if (owner, name) not in self.buffers:  # registered during the probe
                    del module._buffers[name]
        modules = dict(self.model.named_modules())
        for (owner, name), saved in self.buffers.items():
            module = modules.get(owner)
            if module is None or saved is _LAZY:
                continue
            current = module._buffers.get(name)
            if saved is None or current is None or not _put_back(current, saved):
                module._buffers[name] = None if saved is None else _restored_value(saved)

    def _restore_metrics(self) -> None:
        metrics = dict(_metrics(self.model))
        for name, saved_attributes in self.metrics.items():
            metric = metrics.get(name)
            if metric is None:
                continue
            for attr, saved in saved_attributes.items():
                current = getattr(metric, attr, None)
                if isinstance(saved, _SavedList) and isinstance(current, list):
                    current[:] = _restored_value(saved)  # the same list, as reset() clears it
                elif not (
                    isinstance(saved, _SavedTensor)
                    and isinstance(current, torch.Tensor)
                    and _put_back(current, saved)
                ):
                    setattr(metric, attr, _restored_value(saved))

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        saved_keys = {id(key) for key, _ in self.optimizer_state}
        for key in list(optimizer.state):
            if id(key) not in saved_keys:
                del optimizer.state[key]
        for key, saved in self.optimizer_state:
            state = optimizer.state[key]
            for name in list(state):
                if name not in saved:
                    del state[name]
            for name, value in saved.items():
                current = state.get(name)
                if not (
                    isinstance(value, _SavedTensor)
                    and isinstance(current, torch.Tensor)
                    and _put_back(current, value)
                ):
                    state[name] = _restored_value(value)
        for group, saved_group in zip(optimizer.param_groups, self.param_groups, strict=True):
            group.update(saved_group)


#: A lazy buffer not yet initialised: nothing to save, left as it is.
_LAZY = object()


def _put_back(tensor: torch.Tensor, saved: _SavedTensor) -> bool:
    """Write a saved value into the same tensor object (references held stay valid); a
    parameter whose shape changed takes it as new data. False: ``tensor`` cannot hold it."""
    if tensor.shape == saved.value.shape and tensor.dtype == saved.value.dtype:
        tensor.copy_(saved.value)
        return True
    if isinstance(tensor, nn.Parameter):
        tensor.data = saved.restored()
        return True
    return False


def _generators(model: nn.Module) -> list[torch.Generator]:
    """The random generators the model's modules own (``self.gen = torch.Generator()``)."""
    found = {
        id(value): value
        for module in model.modules()
        for value in vars(module).values()
        if isinstance(value, torch.Generator)
    }
    return list(found.values())


#: What a torchmetrics ``Metric`` changes as it updates, computes and syncs, beside the states
#: it lists in ``_defaults``: what ``Metric.reset`` sets back.
_METRIC_COUNTERS = ("_update_count", "_computed", "_forward_cache", "_cache", "_is_synced")


def _metrics(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The torchmetrics ``Metric`` modules in the model. Their states (a running count, a
    list of outputs) are plain attributes, neither parameters nor buffers. Where torchmetrics
    was never imported no module can be one, so it is not imported here."""
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torchmetrics.Metric)]


def _metric_attributes(metric: nn.Module) -> list[str]:
    names = [*getattr(metric, "_defaults", {}), *_METRIC_COUNTERS]
    return [name for name in names if hasattr(metric, name)]


def state_tensors(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()
) -> list[torch.Tensor]:
    """What the device holds before a probe: parameters, buffers, gradients, optimizer state
    (for a tracked meter to count as already there) of a model the user holds, refused where
    the probe could not restore it (:func:`check_restorable`)."""
    check_restorable(model)
    tensors = list(_model_tensors(model).values())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                items = value if isinstance(value, list) else [value]  # L-BFGS's history
                tensors += [v for v in items if isinstance(v, torch.Tensor)]
    return tensors
