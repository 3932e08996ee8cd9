"""The recommendation, read from a study's storage: the same ``TuneResult`` for whoever asks,
while workers still run or long after.

Example::

    result = recommend("postgresql://tuner@db/studies", "autobatch-digits")
    print(result.batch_size, result.epochs, result.lr)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import optuna

from autobatch import sqlite_store
from autobatch.errors import AutobatchError, InvalidInputError
from autobatch.records import TuneResult
from autobatch.tracking.redact import redact_url
from autobatch.tuning import scoring, storage


def recommend(
    study: optuna.Study | str, study_name: str | None = None, *, notes: Sequence[str] = ()
) -> TuneResult:
    """The recommendation from every finished trial of ``study`` (an Optuna study, or a
    storage URL with ``study_name``); ``notes`` are added to the result's warnings."""
    if isinstance(study, str):
        study = load_study(study, study_name)
    settings = storage.settings_of(study)
    if settings is None:
        raise AutobatchError(
            f"study {study.study_name!r} was not prepared by autobatch (no settings stored on it)"
        )
    records = storage.records(study.get_trials(deepcopy=False))
    stored_notes = list(study.user_attrs.get(storage.NOTES, []))
    result = scoring.recommend(
        records,
        settings,
        storage.probe_of(study),
        notes=list(dict.fromkeys([*stored_notes, *notes])),
    )
    mlflow = study.user_attrs.get(storage.MLFLOW) or {}
    return replace(result, study=study, mlflow_run_id=mlflow.get("parent_run_id"))


def load_study(url: str, study_name: str | None) -> optuna.Study:
    """An existing study; one line naming what exists when it does not (a SQLite file that
    does not exist is not created)."""
    path = sqlite_store.path_of(url)
    if path is not None and not path.exists():  # Optuna would create an empty database
        raise InvalidInputError(
            f"no Optuna storage at {redact_url(url)}: {path} does not exist; give the URL the "
            "study ran with (autobatch tune's default: sqlite:///autobatch.db, in its folder)"
        )
    opened = storage.open_storage(url, read_only=True)
    names = [s.study_name for s in opened.get_all_studies()]
    if study_name is None:
        if len(names) != 1:
            raise InvalidInputError(
                f"{redact_url(url)} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                "give --study-name"
            )
        study_name = names[0]
    if study_name not in names:
        raise InvalidInputError(
            f"no study {study_name!r} in {redact_url(url)}; it holds: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=opened)
