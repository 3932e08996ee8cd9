"""Measurements on disk: probe results, keyed by everything that decides a training step's
memory, and a study's step times (``autobatch.tuning.clock``), keyed by what decides its speed."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from autobatch.data import BatchSource

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


def _function_id(fn: Any) -> Any:
    """A name and a digest of the code, so two different lambdas do not share a key."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    digest = hashlib.sha256(code.co_code).hexdigest()[:12] if code is not None else None
    return [getattr(fn, "__qualname__", type(fn).__name__), digest]


def _loss_id(workload: Workload) -> Any:
    """What computes a batch's loss: a Task's step or loss function, or the workload's own
    ``batch_loss``."""
    from autobatch.task import Task

    if isinstance(workload, Task):
        return [_function_id(workload.step), _function_id(workload.loss)]
    return [type(workload).__qualname__, _function_id(workload.batch_loss)]


def fingerprint(
    task: Workload, model: nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource
) -> dict[str, Any]:
    """What the training step is: the model's structure and parameter shapes, one sample's
    shapes, precision, optimizer, loss and torch version."""
    return {
        "model": repr(model),
        # A lazy module's parameters have no shape until its first forward pass.
        "tensors": [
            [name, "lazy" if is_lazy(t) else list(t.shape), str(t.dtype)]
            for name, t in model.state_dict().items()
        ],
        "sample": _shapes(source.largest(1)),
        "precision": task.precision,
        "optimizer": [type(optimizer).__qualname__, repr(optimizer.defaults)],
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
