"""A real PostgreSQL server for tests, as ``.ci/run`` starts one.

``.ci/run`` installs Debian's PostgreSQL when it is missing, starts a throwaway cluster and
exports its URL as ``AUTOBATCH_TEST_POSTGRES_URL`` (``postgresql://postgres@127.0.0.1:PORT``).
The ``postgres`` fixture makes databases of a test's own on that server. Without the
variable the tests that need it are skipped on a developer's machine and fail under CI, so a
CI run never passes without them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

ENV = "AUTOBATCH_TEST_POSTGRES_URL"


def server_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        message = f"{ENV} is not set: start PostgreSQL as .ci/run does"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url.rstrip("/")


@pytest.fixture(name="postgres")
def postgres_fixture() -> Iterator[Callable[[], str]]:
    """A function that makes a new, empty database on the server and returns its URL
    (``postgresql+psycopg://...``); the databases are dropped afterwards."""
    import sqlalchemy

    base = _driver(server_url())
    admin = sqlalchemy.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def database() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return f"{base}/{name}"

    try:
        yield database
    finally:
        with admin.connect() as connection:
            for name in made:
                drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                connection.execute(sqlalchemy.text(drop))
        admin.dispose()


def _driver(url: str) -> str:
    """psycopg 3, the driver the ``postgres`` extra installs."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url
