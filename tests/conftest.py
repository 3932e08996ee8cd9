"""Shared test setup: no test writes to the user's cache, and garbage collection stays cheap."""

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
