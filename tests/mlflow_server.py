"""A real MLflow tracking server for tests: ``mlflow server`` on a free loopback port.

Fixtures:

- ``mlflow_server``: the server's URL (``http://127.0.0.1:<port>``), started once per test
  session and started again if a test killed it.
- ``mlflow_server_process``: the :class:`MlflowServer` itself, for tests that kill it.

A test module gets them by importing the two fixture functions (pytest finds fixtures by the
``name=`` given here, whatever they are imported as; see tests/test_tracking.py), or
``tests/conftest.py`` can register the whole module with ``pytest_plugins = ["mlflow_server"]``.
A test that kills the server should run last among its users; the next one restarts it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 120.0  # seconds; a cold start imports MLflow twice and creates the database


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    """``mlflow server`` with artifacts uploaded over HTTP, in ``directory``, and its runs in
    ``backend_store_uri`` (by default a SQLite file there)."""

    def __init__(
        self, directory: Path, port: int | None = None, backend_store_uri: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.directory / 'mlflow.db'}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.directory / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the server and wait until ``/health`` answers; return its URL."""
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with self.log_path.open("ab") as log:
            # A session of its own, so kill() reaches the uvicorn worker it spawns as well.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self._log_tail()}")
            if _healthy(self.url):
                return self.url
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self._log_tail()}")

    def ensure_running(self) -> str:
        if not self.running():
            self.start()
        return self.url

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as a crash would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """Shut the server down cleanly, killing it if it takes more than 10 s."""
        self._signal(signal.SIGTERM, grace=10.0)

    def _signal(self, sig: signal.Signals, grace: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session", name="mlflow_server_process")
def mlflow_server_process_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="mlflow_server")
def mlflow_server_fixture(mlflow_server_process: MlflowServer) -> str:
    return mlflow_server_process.ensure_running()
