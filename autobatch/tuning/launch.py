"""Worker processes on this machine for one study: what ``autobatch tune --workers N`` runs.

Each worker is an ``autobatch worker`` process on the prepared study, with a device of its own
(one per visible GPU by default, round robin) or, on the CPU, one torch thread each. They meet
only in the study's storage, exactly as workers on other machines do; this process shows the
study's progress from the storage and reads the recommendation back when they are done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from autobatch.errors import AutobatchError, StudyInterrupted
from autobatch.records import TuneResult
from autobatch.tracking.redact import redact_url
from autobatch.tuning import storage
from autobatch.tuning.prepare import Prepared
from autobatch.tuning.recommendation import recommend

#: Names the process that started a worker, so the worker stops with it (:func:`follow_parent`).
PARENT = "AUTOBATCH_PARENT_PID"


def worker_devices(device: torch.device, workers: int, devices: Sequence[str] | None) -> list[str]:
    """The device of each of ``workers`` workers: ``devices`` in turn, else every visible GPU
    in turn for a CUDA task, else the task's device."""
    if devices:
        pool = list(devices)
    elif device.type == "cuda" and torch.cuda.device_count() > 0:
        pool = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        pool = [str(device)]
    return [pool[i % len(pool)] for i in range(workers)]


def _only_gpu(device: str) -> dict[str, str]:
    """The environment that shows a worker only ``device`` (``cuda:N``), the N-th of the GPUs
    this process sees; nothing for another device."""
    if not device.startswith("cuda:"):
        return {}
    index = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = [v.strip() for v in visible.split(",")] if visible else None
    return {"CUDA_VISIBLE_DEVICES": seen[index] if seen else str(index)}


def run_workers(
    target: str,
    prepared: Prepared,
    *,
    storage_url: str,
    devices: Sequence[str],
    threads: int | None,
    mlflow: bool,
    tracking_uri: str | None,
    timeout: float | None,
    progress: bool,
    heartbeat_interval: int | None,
    grace_period: int | None,
    verbose: int = 0,
    movable: bool = True,
) -> TuneResult:
    """Start a worker process per entry of ``devices`` on ``prepared``'s study, wait for them,
    and return the study's recommendation. ``movable``: the target builds an
    :class:`~autobatch.Task`, which ``--device`` moves; any other workload chooses its device
    where it is built, so each worker is shown only its own GPU instead (as ``cuda:0``)."""
    study = prepared.study
    name = study.study_name
    base = [sys.executable, "-m", "autobatch", "worker", target, "--storage", storage_url]
    base += ["--study-name", name, "--wait", "60", "--quiet"]
    base += ["--tracking-uri", tracking_uri] if mlflow and tracking_uri else []
    base += [] if mlflow else ["--no-mlflow"]
    base += ["--timeout", str(timeout)] if timeout is not None else []
    base += ["--threads", str(threads)] if threads else []
    base += ["-" + "v" * verbose] if verbose else []
    base += ["--heartbeat-interval", str(heartbeat_interval)] if heartbeat_interval else []
    base += ["--grace-period", str(grace_period)] if grace_period else []
    env = {**os.environ, PARENT: str(os.getpid())}
    processes = [
        # A session of their own: the terminal's Ctrl-C reaches this process, which passes it
        # on once, so no worker is interrupted twice while it queues its trial again.
        subprocess.Popen(
            [*base, "--device", device] if movable else base,
            stdout=subprocess.DEVNULL,
            start_new_session=os.name == "posix",
            env=env if movable else {**env, **_only_gpu(device)},
        )
        for device in devices
    ]
    bar = _bar(prepared, progress)
    try:
        while any(p.poll() is None for p in processes):
            if bar is not None:
                finished = storage.progress(study.get_trials(deepcopy=False)).finished
                bar.update(max(0, finished - bar.n))
            time.sleep(1.0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: passed on as SIGTERM, which no shell ignores
        _stop(processes)
        finished = storage.progress(study.get_trials(deepcopy=False)).finished
        raise StudyInterrupted(
            f"{finished} finished trial(s) are kept in {redact_url(storage_url)}; run the same "
            "command to resume"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    failed = [(i, p.returncode) for i, p in enumerate(processes) if p.returncode != 0]
    try:
        result = recommend(study, notes=prepared.notes)
    except AutobatchError:
        if failed:
            raise AutobatchError(_failures(failed)) from None
        raise
    if failed:
        result = replace(result, warnings=(*result.warnings, _failures(failed)))
    return result


def follow_parent() -> None:
    """In a worker ``tune --workers`` started: a SIGTERM when that process dies, even by
    SIGKILL, so that no worker trains on as an orphan (the CLI stops on SIGTERM as on Ctrl-C:
    its trial is queued again). Not SIGINT: a shell starts background jobs with it ignored,
    and workers inherit that."""
    parent = os.environ.get(PARENT)
    if parent:
        threading.Thread(target=_stop_without, args=(parent,), daemon=True).start()


def _stop_without(parent: str) -> None:
    """Watch for the parent's end; then stop this process, again every
    :data:`STOP_AGAIN_SECONDS` while it runs on (an interruption raised inside a garbage
    collector's callback is printed and dropped by Python)."""
    while str(os.getppid()) == parent:
        time.sleep(0.2)
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_AGAIN_SECONDS)


#: Seconds a stopped worker has to end before it is stopped again.
STOP_AGAIN_SECONDS = 30.0


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """Stop the workers as Ctrl-C stops one, and wait for them; again every
    :data:`STOP_AGAIN_SECONDS` for one that runs on (see :func:`_stop_without`)."""
    while any(p.poll() is None for p in processes):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_AGAIN_SECONDS
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)


def _failures(failed: list[tuple[int, int]]) -> str:
    codes = ", ".join(f"worker {i} exited with code {code}" for i, code in failed)
    return f"{codes}; its error is printed above"


def _bar(prepared: Prepared, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    finished = storage.progress(prepared.study.get_trials(deepcopy=False)).finished
    return tqdm(total=prepared.settings.n_trials, initial=finished, desc="trials", unit="trial")
