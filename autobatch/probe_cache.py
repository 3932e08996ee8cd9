"""Measurements on disk: probe results, keyed by everything that decides a training step's
memory, and a study's step times (``autobatch.tuning.clock``), keyed by what decides its speed."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import logging
import numbers
import os
from argparse import Namespace
from pathlib import Path
from types import CodeType, SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from autobatch.data import BatchSource
from autobatch.workload import max_grad_norm

if TYPE_CHECKING:
    from autobatch.memory import MemoryMeter
    from autobatch.records import ProbeResult
    from autobatch.workload import Workload

log = logging.getLogger(__name__)


def default_dir() -> Path:
    """``$AUTOBATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/autobatch/probes``."""
    if env := os.environ.get("AUTOBATCH_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autobatch" / "probes"


def _shapes(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return [list(obj.shape[1:]), str(obj.dtype)]
    if isinstance(obj, dict):
        return {k: _shapes(v) for k, v in sorted(obj.items())}
    if isinstance(obj, tuple | list):
        return [_shapes(v) for v in obj]
    return type(obj).__name__


#: How deep a description follows values inside values, and functions a function refers to:
#: far enough for a config in a closure, or a helper the step calls, and no further, to stay
#: cheap.
_DEPTH = 3
#: Containers larger than this are described by their type alone.
_ITEMS = 64
#: What ``nn.Module`` itself keeps in an instance's ``__dict__`` (hooks, the tensor tables):
#: the rest, ``training`` among it, is the module's own.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _value(value: Any, depth: int = 0) -> Any:
    """A value that can change a step's memory, as far as it can be read cheaply and the same
    way in every process: numbers, strings, shapes and tuples as themselves, a tensor's shape,
    a config (dataclass, namespace, dict of names) field by field, a function by
    :func:`_callable_id`; anything else by its type's name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, numbers.Number | torch.dtype | torch.device | torch.layout | enum.Enum):
        return str(value)
    if isinstance(value, torch.Tensor):
        shape = "lazy" if is_lazy(value) else list(value.shape)
        return ["tensor", shape, str(value.dtype), str(value.layout)]
    if isinstance(value, type):
        return ["class", value.__module__, value.__qualname__]
    if isinstance(value, nn.Module):
        return ["module", repr(value)]  # a teacher model, a loss module and its settings
    if callable(value):
        return _callable_id(value, depth + 1)
    if depth >= _DEPTH:
        return type(value).__qualname__
    if isinstance(value, tuple) and len(value) <= _ITEMS:
        return [_value(v, depth + 1) for v in value]
    if isinstance(value, dict) and len(value) <= _ITEMS and all(isinstance(k, str) for k in value):
        return {k: _value(v, depth + 1) for k, v in value.items()}
    if dataclasses.is_dataclass(value) or isinstance(value, SimpleNamespace | Namespace):
        return [type(value).__qualname__, _attributes(value, depth + 1)]
    return type(value).__qualname__


def _attributes(obj: Any, depth: int = 0) -> Any:
    """An object's own attributes, described by :func:`_value` (by its type's name past
    ``_DEPTH``: objects that refer to each other's methods end there)."""
    items = getattr(obj, "__dict__", None)
    if depth >= _DEPTH or not isinstance(items, dict) or len(items) > _ITEMS:
        return type(obj).__qualname__
    return {str(k): _value(v, depth) for k, v in items.items()}


def _code_id(code: CodeType) -> str:
    """A digest of what a function's code does: its bytecode, and the constants and names it
    uses (``range(8)`` and ``F.gelu`` differ from ``range(1)`` and ``F.relu`` only there),
    nested functions and generator expressions included."""
    constants = [_code_id(c) if isinstance(c, CodeType) else _value(c) for c in code.co_consts]
    text = json.dumps([code.co_code.hex(), constants, code.co_names], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _names(code: CodeType) -> set[str]:
    """The global names a function's code (nested code included) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _callable_id(fn: Any, depth: int = 0) -> Any:
    """A function as the key sees it: its name, a digest of its code, and the values it reads
    that are not arguments (closure cells, defaults, the globals its code names), so that two
    functions from one factory with different settings do not share a key. A bound method adds
    its object's attributes, a callable object its class's ``__call__`` and its attributes, a
    ``functools.partial`` its bound arguments."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return ["partial", _callable_id(fn.func, depth), _value((fn.args, fn.keywords), depth)]
    if inspect.ismethod(fn):
        owner = fn.__self__
        described = _value(owner) if isinstance(owner, nn.Module) else _attributes(owner, depth + 1)
        return [_callable_id(fn.__func__, depth), described]
    if isinstance(fn, type):
        return _value(fn)
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, CodeType):
        call = type(fn).__call__
        if isinstance(getattr(call, "__code__", None), CodeType) and depth < _DEPTH:
            return [name, _callable_id(call, depth + 1), _attributes(fn, depth + 1)]
        return name  # a builtin: its name says what it does
    if depth >= _DEPTH:
        return [name, _code_id(code)]
    cells = [_cell(c, depth + 1) for c in getattr(fn, "__closure__", None) or ()]
    given = getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None)
    defaults = _value(given, depth)
    namespace = getattr(fn, "__globals__", {})
    read = {n: _value(namespace[n], depth + 1) for n in sorted(_names(code)) if n in namespace}
    return [name, _code_id(code), cells, defaults, read]


def _cell(cell: Any, depth: int) -> Any:
    try:
        return _value(cell.cell_contents, depth)
    except ValueError:  # a cell not yet filled
        return None


def _loss_id(workload: Workload) -> Any:
    """What computes a batch's loss: a Task's step or loss function (and collate function), or
    the workload's own ``batch_loss``."""
    from autobatch.task import Task

    if isinstance(workload, Task):
        return [_callable_id(f) for f in (workload.step, workload.loss, workload.collate_fn)]
    return [type(workload).__qualname__, _callable_id(workload.batch_loss)]


def _modules_id(model: nn.Module) -> list[Any]:
    """What each module keeps outside its parameters, buffers and submodules (a width, a number
    of repeats, the training flag), its class's settings and its hooks (one may keep
    activations): the forward pass may read them, and ``repr`` shows only what the module
    chooses to."""
    described = []
    for name, module in model.named_modules():
        own = {k: _value(v, 1) for k, v in vars(module).items() if k not in _MODULE_INTERNALS}
        settings = {
            k: _value(v, 1)
            for cls in type(module).__mro__
            if cls not in (nn.Module, object)
            for k, v in vars(cls).items()
            if not k.startswith("__") and not callable(v) and not isinstance(v, property)
        }
        hooks = {k: [_callable_id(h, 1) for h in vars(module)[k].values()] for k in _HOOKS}
        described.append([name, own, settings, hooks])
    return described


def _tensors_id(model: nn.Module) -> list[Any]:
    """Each parameter's and buffer's shape and dtype (tied parameters once), whether a
    parameter trains (a frozen one has no gradient nor optimizer state) and the gradient it
    holds now."""
    described: list[Any] = [
        [name, "lazy" if is_lazy(t) else list(t.shape), str(t.dtype)]
        for name, t in model.named_buffers()
    ]
    for name, p in model.named_parameters():
        shape = "lazy" if is_lazy(p) else list(p.shape)
        grad = None if p.grad is None else _value(p.grad)
        described.append([name, shape, str(p.dtype), p.requires_grad, grad])
    return described


def _optimizer_id(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Any]:
    """The optimizer's kind and settings, which parameters each group updates (one left out
    has no state), and the state it holds now (L-BFGS's history grows over steps)."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        [
            [names.get(id(p), "?") for p in group["params"]],
            _value({k: v for k, v in group.items() if k != "params"}),
        ]
        for group in optimizer.param_groups
    ]
    state = [
        [names.get(id(p), "?"), {str(k): _state_value(v) for k, v in optimizer.state[p].items()}]
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    ]
    return [type(optimizer).__qualname__, repr(optimizer.defaults), groups, state]


def _state_value(value: Any) -> Any:
    """Optimizer state by the memory it takes: a tensor's shape, a list's items."""
    if isinstance(value, torch.Tensor):
        return _value(value)
    if isinstance(value, list | tuple):
        return [_state_value(v) for v in value]
    return type(value).__qualname__


def fingerprint(
    task: Workload, model: nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource
) -> dict[str, Any]:
    """What the training step is: the model's structure, settings and tensors (which train, the
    gradients held), one sample's shapes, precision, optimizer and its state, the functions
    that build the model and compute the loss with the values they read, and torch version.

    What it cannot read (a setting kept in an object it only names by type) is why a cached
    result still runs once before it is trusted."""
    return {
        "model": repr(model),
        "factory": _callable_id(task.model),
        "modules": _modules_id(model),
        "tensors": _tensors_id(model),
        "sample": _shapes(source.largest(1)),
        "precision": task.precision,
        "max_grad_norm": max_grad_norm(task),
        "optimizer": _optimizer_id(model, optimizer),
        "loss": _loss_id(task),
        "torch": torch.__version__,
    }


def digest(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def key(
    task: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    meter: MemoryMeter,
    headroom: float,
    bound: int,
    multiple_of: int,
    tolerance: float,
) -> str:
    """A digest of the step's :func:`fingerprint`, device and capacity, and the search
    settings."""
    parts = fingerprint(task, model, optimizer, source)
    parts.update(
        {
            "device": meter.name,
            # A hardware meter's capacity moves with free memory; its limit (a planned smaller
            # card) does not, and decides the result just as a simulated capacity does.
            "capacity": (
                meter.capacity()
                if meter.name.startswith("tracked")
                else getattr(meter, "limit", None)
            ),
            "search": [headroom, bound, multiple_of, tolerance],
        }
    )
    return digest(parts)


def read(digest: str, directory: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The entry ``digest`` as stored; None when there is none, or it cannot be read."""
    path = Path(directory or default_dir()) / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache entry %s: %s", path, exc)
        return None


def write(digest: str, data: dict[str, Any], directory: str | os.PathLike | None = None) -> None:
    """Store ``data`` as the entry ``digest``, atomically; a failure is a warning."""
    path = Path(directory or default_dir())
    tmp = path / f".{digest}.{os.getpid()}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path / f"{digest}.json")
    except OSError as exc:  # a read-only home or a full disk must not fail the caller
        log.warning("could not write the cache in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load(digest: str, directory: str | os.PathLike | None = None) -> ProbeResult | None:
    from autobatch.records import ProbeResult

    data = read(digest, directory)
    if data is None:
        return None
    try:
        result = ProbeResult.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring unreadable probe cache entry %s: %s", digest, exc)
        return None
    log.info("probe result from cache %s", digest)
    return dataclasses.replace(result, cached=True, seconds=0.0)


def store(digest: str, result: ProbeResult, directory: str | os.PathLike | None = None) -> None:
    write(digest, result.to_dict(), directory)
