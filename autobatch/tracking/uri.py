"""Where MLflow data goes: the tracking URI made explicit, and how to open it in the UI.

Kept apart from the tracker so the tuner and the CLI can name the store without importing
MLflow.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from autobatch.tracking.redact import redact_url

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use, always explicit and absolute.

    ``None`` means ``sqlite:///<current directory>/mlflow.db``; a relative SQLite path or a
    bare ``*.db`` file name is made absolute, so ``mlflow ui`` finds the store from anywhere.
    """
    if uri is None or not str(uri).strip():
        return f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    uri = str(uri).strip()
    if "://" not in uri and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix) :]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return f"{prefix}{Path(path).resolve()}"
    return uri


def mlflow_ui_command(uri: str) -> str:
    """What to run (or open) to see the study in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_url(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(redact_url(uri))}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory ones."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return None if not path or path.startswith(":memory:") else Path(path)
