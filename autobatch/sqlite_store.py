"""SQLite files as stores (the study's and MLflow's): checked before they are used, and locked
while a new one is created.

Two processes creating the same store's tables at once break it for good (a duplicate
``alembic_version`` row, a half-applied migration), and a file that is not a database fails
deep inside SQLAlchemy with a long traceback. Both are caught here, in one line that names
the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from autobatch.errors import InvalidInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; creation races stay possible there
    fcntl = None

_HEADER = b"SQLite format 3\x00"


def path_of(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL; None for other stores and in-memory ones."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix) :].split("?", 1)[0]
    return None if not path or path.startswith(":memory:") else Path(path)


def absolute(url: str) -> str:
    """``url`` with a relative SQLite path made absolute, so the store is the same file from
    whichever folder a worker, ``mlflow ui`` or a report starts in; other URLs unchanged."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path, mark, query = url[len(prefix) :].partition("?")
    if not path or path.startswith((":memory:", "/")):
        return url
    return f"{prefix}{Path(path).resolve()}{mark}{query}"


def check(path: Path, what: str) -> None:
    """InvalidInputError when ``path`` cannot serve as a SQLite store: its folder is missing
    or read-only, or the file is not a SQLite database. ``what`` names the store."""
    folder = path.absolute().parent
    if not folder.is_dir():
        raise InvalidInputError(f"cannot create {what} {path}: folder {folder} does not exist")
    # SQLite writes a journal beside the file, so the folder must be writable too.
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidInputError(
            f"cannot write {what} {path}: {'it' if path.exists() else 'its folder'} is "
            "read-only; run where you can write files, or give a path you can write to"
        )
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            header = handle.read(len(_HEADER))
        if header != _HEADER:
            raise InvalidInputError(
                f"{what} {path} is not a SQLite database (damaged, or another kind of file); "
                "move it away, or give another path"
            )


def read_only(path: Path) -> bool:
    """Whether an existing ``path`` is marked read-only, or sits in a folder that is: by its
    permission bits too, which even root reads as meant."""
    if not path.is_file():
        return False
    folder = path.absolute().parent
    writable = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return any(
        not os.access(place, os.W_OK) or not place.stat().st_mode & writable
        for place in (path, folder)
    )


#: Tables that mark a file as one store or the other.
_MARKS = {"study": {"studies", "version_info"}, "MLflow": {"experiments", "runs"}}


def check_kind(path: Path, what: str, kind: str) -> None:
    """InvalidInputError when ``path`` holds the other store's tables and not ``kind``'s
    ("study" or "MLflow"): opening it would add tables to it and fail with a schema error."""
    if not (path.is_file() and path.stat().st_size):
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:  # damaged: opening it says so
        return
    other = next(name for name in _MARKS if name != kind)
    if _MARKS[other] <= tables and not _MARKS[kind] <= tables:
        raise InvalidInputError(
            f"{what} {path} is {'an MLflow store' if other == 'MLflow' else 'a study storage'}"
            f"; give each store a file of its own (e.g. --storage sqlite:///autobatch.db, "
            "--tracking-uri sqlite:///mlflow.db)"
        )


@contextlib.contextmanager
def creation_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created empty if missing: an empty file is an
    empty database) while a store opens it; no-op for None."""
    if path is None or fcntl is None:
        yield
        return
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
