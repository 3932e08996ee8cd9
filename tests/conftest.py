"""Shared test setup: no test writes to the user's cache, and garbage collection stays cheap;
one check that a probed answer really trains."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path, monkeypatch):
    """Probe results go to a per-test folder, never to ~/.cache."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "autobatch-cache"))


@pytest.fixture(scope="session", autouse=True)
def _cheap_gc():
    """The probe collects garbage between attempts. Freezing the objects of the libraries loaded
    so far (torch loads torch._dynamo on first use of a dispatch mode) keeps each collection to
    what the tests themselves create, which makes it hundreds of times faster."""
    import torch._dynamo  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def trains_fresh():
    """``check(task, batch_size, capacity, budget)``: whether two real steps at ``batch_size``
    run on a fresh simulated device of ``capacity`` bytes with their peak within ``budget``:
    what a probe's answer promises, checked apart from the probe."""
    import torch

    from autobatch import TrackedMeter
    from autobatch.training import TrainStep, build

    def check(task, batch_size: int, capacity: int, budget: int) -> bool:
        fresh = TrackedMeter(capacity)
        try:
            with fresh:
                model, optimizer = build(task)
                step = TrainStep(task, model, optimizer)
                batch = tuple(t[:batch_size].clone() for t in task.train_data)
                step(batch)
                step(batch)
        except torch.OutOfMemoryError:
            return False
        return fresh.peak() <= budget

    return check
