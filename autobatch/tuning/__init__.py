"""Tuning, one module per step of the flow.

``prepare`` validates, probes and writes every study-level fact once; ``worker`` runs trials
until the study has its ``n_trials`` (any number of workers, on any machines sharing the
storage); ``scoring`` judges trials as pure functions of their records; ``recommendation``
reads the records back and returns the same ``TuneResult`` to whoever asks. ``study`` puts
them together: ``tune()`` (all three in one process) and ``join_study()`` (a worker on a
prepared study).

Names load on first use, so ``recommend`` (and ``autobatch report``) never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autobatch.lazy import lazy_names

if TYPE_CHECKING:
    from autobatch.tuning.recommendation import recommend
    from autobatch.tuning.study import join_study, tune

_HOMES = {"join_study": "study", "recommend": "recommendation", "tune": "study"}

__all__ = ["join_study", "recommend", "tune"]

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
