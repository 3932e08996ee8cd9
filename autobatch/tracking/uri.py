"""Where MLflow data goes: the tracking URI made explicit, checked, and opened in the UI.

Kept apart from the tracker so the tuner and the CLI can name and check the store without
importing MLflow (seconds).
"""

from __future__ import annotations

import shlex
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from autobatch import sqlite_store
from autobatch.errors import InvalidInputError
from autobatch.tracking.redact import redact_url

DEFAULT_DB = "mlflow.db"
#: Database servers MLflow can use as a tracking store (SQLAlchemy URL schemes).
_DATABASES = ("postgresql", "postgres", "mysql", "mssql")


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
    return sqlite_store.absolute(uri)


def mlflow_ui_command(uri: str) -> str:
    """What to run (or open) to see the study in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_url(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(redact_url(uri))}"


#: Where ``mlflow ui`` serves a local store by default.
LOCAL_UI = "http://127.0.0.1:5000"


def study_run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The study run's page in the MLflow UI (for a local store, as ``mlflow ui`` serves it
    by default), in the Model-training view: its description holds the recommendation.

    MLflow 3.17's UI opens a fresh browser on its GenAI view whatever the experiment's
    ``mlflow.experimentKind`` tag says; the ``workflowType`` parameter picks the view."""
    base = redact_url(uri) if uri.startswith(("http://", "https://")) else LOCAL_UI
    return (
        f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning"
    )


def unreachable(uri: str, detail: str) -> InvalidInputError:
    """The error for a tracking server that does not answer: what, where, and the fixes."""
    return InvalidInputError(
        f"cannot reach MLflow tracking server at {redact_url(uri)} ({redact_url(detail)}); "
        "start it (mlflow server --host 127.0.0.1 --port <port>), fix --tracking-uri, "
        "or pass --no-mlflow"
    )


def check_store(uri: str, *, create: bool = True, timeout: float = 5.0) -> bool:
    """Fail fast, without MLflow, on what is cheap to see; True when that settles it.

    A SQLite store that cannot work (its folder missing or read-only, a file that is not a
    database, or, with ``create=False``, no file at all) and a server that does not answer
    raise InvalidInputError. True for a SQLite file and for a server that answered at all;
    False for other stores, which only MLflow itself can check.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInputError(
            f"tracking_uri={uri!r} must be an MLflow URI such as sqlite:///mlflow.db or "
            "http://127.0.0.1:5000"
        )
    path = sqlite_store.path_of(uri)
    if path is not None:
        if not create and not path.exists():
            raise InvalidInputError(f"no MLflow store at {redact_url(uri)}: {path} does not exist")
        sqlite_store.check(path, "the MLflow store")
        sqlite_store.check_kind(path, "the MLflow store", "MLflow")
        return True
    if uri.split(":", 1)[0].split("+", 1)[0] in _DATABASES:
        _check_database(uri, timeout)
        return False  # reachable; whether MLflow's tables are there, MLflow tells
    if not uri.startswith(("http://", "https://")):
        return False
    parts = urllib.parse.urlsplit(uri)
    try:
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError as exc:  # a port that is not a number
        raise unreachable(uri, str(exc)) from None
    # No credentials: /health needs none, and urllib would take them for part of the host.
    health = urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
    )
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; whether it is MLflow, the tracker's first request tells
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise unreachable(uri, f"{type(exc).__name__}: {reason}"[:160]) from None
    return True


def _check_database(uri: str, timeout: float) -> None:
    """One connection attempt: MLflow itself retries a database that does not answer for
    about 100 s before it gives up."""
    import sqlalchemy

    connect_args = {} if uri.startswith("mssql") else {"connect_timeout": max(1, int(timeout))}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as exc:
        raise InvalidInputError(
            f"cannot open the MLflow tracking store {redact_url(uri)}: its database driver is "
            f"not installed (pip install {(exc.name or 'psycopg').split('.')[0]}), or pass "
            "--no-mlflow"
        ) from None
    except Exception as exc:  # SQLAlchemy/driver errors of every kind: unreachable or refused
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidInputError(
            f"cannot open the MLflow tracking store {redact_url(uri)} "
            f"({redact_url(f'{type(exc).__name__}: {first}')[:160]}); fix --tracking-uri or "
            "pass --no-mlflow"
        ) from None
