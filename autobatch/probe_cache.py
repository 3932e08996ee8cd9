"""Probe results on disk, keyed by everything that decides a training step's memory."""

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
    """A digest of the model's structure and parameter shapes, one sample's shapes, precision,
    optimizer, device and capacity, torch version and the search settings."""
    parts = {
        "model": repr(model),
        "tensors": [[name, list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()],
        "sample": _shapes(source.largest(1)),
        "precision": task.precision,
        "optimizer": [type(optimizer).__qualname__, repr(optimizer.defaults)],
        "loss": _loss_id(task),
        "device": meter.name,
        # A hardware meter's capacity moves with free memory; its limit (a planned smaller
        # card) does not, and decides the result just as a simulated capacity does.
        "capacity": (
            meter.capacity() if meter.name.startswith("tracked") else getattr(meter, "limit", None)
        ),
        "torch": torch.__version__,
        "search": [headroom, bound, multiple_of, tolerance],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load(digest: str, directory: str | os.PathLike | None = None) -> ProbeResult | None:
    from autobatch.records import ProbeResult

    path = Path(directory or default_dir()) / f"{digest}.json"
    try:
        data = json.loads(path.read_text())
        result = ProbeResult.from_dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring unreadable probe cache entry %s: %s", path, exc)
        return None
    log.info("probe result from cache %s", path)
    return dataclasses.replace(result, cached=True, seconds=0.0)


def store(digest: str, result: ProbeResult, directory: str | os.PathLike | None = None) -> None:
    path = Path(directory or default_dir())
    tmp = path / f".{digest}.{os.getpid()}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result.to_dict(), indent=1))
        tmp.replace(path / f"{digest}.json")
    except OSError as exc:  # a read-only home or a full disk must not fail the probe
        log.warning("could not write the probe cache in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
