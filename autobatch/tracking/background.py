"""MLflow logging in a process of its own, so that training never waits for the tracking store.

``BackgroundTracker`` is the tracker ``tune`` uses. It hands each study event to a child
process that runs an :class:`~autobatch.tracking.mlflow_tracker.MlflowTracker`, and handing one
over costs a pickle and a pipe write, a few microseconds. Logging inside the training process
cost 60-110 ms per trial on the default SQLite store (creating the run, one ``log_batch`` of a
few hundred metrics, ending the run). A sending thread would not help: it competes with the
training loop for the interpreter lock. A process does neither.

The child is the only writer to MLflow. Events reach it in order over its stdin. What it
learns (run ids, warnings) comes back over its stdout and is applied on the training thread at
the next event. Training waits in three places only:

- at the start, for the store check, so a wrong URI fails before any trial. A SQLite file and
  a server's answer are checked here without MLflow, in milliseconds; other stores wait for
  the child to open them (importing MLflow takes seconds);
- when a trial ends, for that trial's run id (normally already there);
- when the study ends, until everything is sent.

The child runs at the lowest CPU priority (nice 19), so on a machine with no idle core it
takes little time from training. If the training process dies, the child sees its stdin
close, marks the open runs KILLED and exits. It ignores Ctrl-C, so an interrupted study is
still recorded.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from autobatch.errors import InvalidInputError
from autobatch.records import EvalPoint, ProbeResult, StudySettings, TrialRecord
from autobatch.tracking.redact import redact_url
from autobatch.tracking.uri import check_store

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: The events the child acknowledges (with the run ids so far): those the parent may wait for.
#: Every other reply would wake the parent's reading thread, which then takes the interpreter
#: lock from the training loop.
_ANSWERED = frozenset({"open_study_run", "trial_started", "close"})


def _frame(message: tuple) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write(stream: IO[bytes], message: tuple) -> None:
    stream.write(_frame(message))
    stream.flush()


def _read(stream: IO[bytes]) -> tuple | None:
    """The next message, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    return None if len(data) < size else pickle.loads(data)


def _pump(stream: IO[bytes], inbox: queue.Queue) -> None:
    """Move messages from ``stream`` to ``inbox`` until the stream ends; then put None."""
    try:
        while (message := _read(stream)) is not None:
            inbox.put(message)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError):
        pass
    finally:
        inbox.put(None)


class _Child:
    """A logging process and the thread that moves its replies into ``inbox``."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "autobatch.tracking.background"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            # Out of the terminal's process group: Ctrl-C stops training, not the logging.
            start_new_session=os.name == "posix",
        )
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, self.inbox), daemon=True).start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def end(self, kill: bool = False) -> None:
        """Close its stdin, so it exits once done (at once with ``kill``); do not wait."""
        if kill:
            self.process.kill()
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        # Reaped in the background: MLflow's own shutdown takes about a second.
        threading.Thread(target=self.process.wait, daemon=True).start()


#: A started logging process waiting for its next study: pre-started, or kept from the last.
_spare: _Child | None = None


def prestart() -> None:
    """Start a logging process now, for the next BackgroundTracker to take.

    It imports MLflow (seconds) while the caller goes on, e.g. loading torch and its task; the
    CLI calls this first thing.
    """
    global _spare
    if _spare is None or not _spare.alive():
        _keep(_Child())


def _keep(child: _Child) -> None:
    """Keep ``child`` for the next study in this process; it ends when the program does."""
    global _spare
    if _spare is not None and _spare is not child:
        _spare.end()
    _spare = child
    atexit.unregister(_end_spare)
    atexit.register(_end_spare)


def _take_spare() -> _Child | None:
    global _spare
    child, _spare = _spare, None
    return child if child is not None and child.alive() else None


def _end_spare() -> None:
    child = _take_spare()
    if child is not None:
        child.end()


class BackgroundTracker:
    """A TuneObserver that logs to MLflow from a child process; same results as MlflowTracker.

    A wrong URI raises InvalidInputError here when it is cheap to see (a missing folder, a
    server that does not answer). ``wait=True`` also waits until the child has opened the
    store; with ``wait=False`` call :meth:`wait_ready` before the first trial (the tuner lets
    the child start while it probes). The quick check vouches for a SQLite file's path, not
    for its tables (a store left half-created by an interrupted MLflow), so wait whatever
    the store.
    """

    #: Seconds to wait for the child to start and reach the store, for a trial's run id, and
    #: for the last events (the study's charts included) to be sent.
    start_timeout, id_timeout, end_timeout = 120.0, 60.0, 300.0

    def __init__(
        self,
        tracking_uri: str,
        experiment: str | None = None,
        *,
        wait: bool = True,
        flush_interval: float = 5.0,
    ) -> None:
        check_store(tracking_uri)  # first: a wrong URI fails at once
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.flush_interval = flush_interval
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.run_ids: dict[int, str] = {}
        self._stopped = False
        self._child: _Child | None = None
        self._start()
        if wait:
            self.wait_ready()

    @property
    def stopped(self) -> bool:
        """True once logging has stopped for good: the store failed or the child is gone."""
        return self._stopped

    # -- the child process ---------------------------------------------------------------------

    def _start(self) -> None:
        self._child = _take_spare() or _Child()
        self._inbox = self._child.inbox
        self._ready = self._gone = self._closing = self._waiting = False
        self._sent = self._done = 0
        self._trials: dict[int, Any] = {}  # trial number -> Optuna trial, while it runs
        self._started: dict[int, int] = {}  # trial number -> message number of its start
        self._study: Any = None
        self._post("open", self.tracking_uri, self.experiment, self.flush_interval)

    def wait_ready(self) -> None:
        """Block until the child has opened the store; InvalidInputError if it cannot."""
        deadline = time.monotonic() + self.start_timeout
        while not self._ready:
            self._waiting = True
            try:
                message = self._next(deadline)
            finally:
                self._waiting = False
            if message is None or message[0] == "invalid":
                gone = self._gone
                self.close(timeout=5)
                shown = redact_url(self.tracking_uri)
                if message is not None:
                    reason = message[1]
                elif gone:
                    reason = (
                        f"the MLflow logging process for {shown} exited before it opened the "
                        "store (its error is printed above); pass --no-mlflow to tune without it"
                    )
                else:
                    reason = (
                        f"the MLflow logging process did not open {shown} within "
                        f"{self.start_timeout:.0f} s; check --tracking-uri or pass --no-mlflow"
                    )
                raise InvalidInputError(reason)
            self._apply(message)

    def _post(self, *message: Any) -> int:
        """Send a message to the child; its number, or 0 when nothing can be sent any more."""
        if self._gone or self._child is None:
            return 0
        try:
            frame = _frame((self._sent + 1, *message))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("MLflow logging skipped %s: cannot pass it on (%s)", message[0], exc)
            return 0
        try:
            self._child.process.stdin.write(frame)
            self._child.process.stdin.flush()
        except (OSError, ValueError):  # the child is gone
            self._gone = True
            self._end_of_child()
            return 0
        self._sent += 1
        return self._sent

    def _next(self, deadline: float | None) -> tuple | None:
        """The child's next message; None when it has exited or ``deadline`` passed."""
        if self._gone:
            return None
        try:
            if deadline is None:
                message = self._inbox.get_nowait()
            else:
                message = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if message is None:
            self._gone = True
            self._end_of_child()
        return message

    def _drain(self) -> None:
        """Apply whatever the child has said so far, without waiting."""
        while (message := self._next(None)) is not None:
            self._apply(message)

    def _wait_for(self, number: int, timeout: float) -> bool:
        """Apply the child's messages until it has handled message ``number``."""
        deadline = time.monotonic() + timeout
        while self._done < number:
            message = self._next(deadline)
            if message is None:
                return False
            self._apply(message)
        return True

    def _apply(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            self._ready = True
        elif kind == "invalid":  # found by the child while training went on
            log.warning("MLflow logging is off for this study: %s", message[1])
            self._stopped = True
        elif kind == "done":
            _, self._done, state = message
            if state is not None:  # None: unchanged since the last one
                self.parent_run_id = state["parent_run_id"]
                self.experiment_id = state["experiment_id"]
                self.run_ids = state["run_ids"]
                self._stopped = self._stopped or state["stopped"]
        elif kind == "attr":
            _, number, key, value = message
            target = self._study if number is None else self._trials.get(number)
            try:
                if target is not None:
                    target.set_user_attr(key, value)
            except Exception:  # the link is a convenience; the messages after it are not
                log.debug("could not set %s on trial %s", key, number, exc_info=True)
        elif kind == "log":
            _, name, level, text = message
            logging.getLogger(name).log(level, text)

    def _end_of_child(self) -> None:
        code = None if self._child is None else self._child.process.poll()
        # wait_ready raises for what went wrong; when closing, the end is due.
        if not (self._stopped or self._closing or self._waiting):
            log.warning(
                "the MLflow logging process ended unexpectedly (exit code %s); the rest of the "
                "study is not logged to %s. Training goes on, and the trials stay in the Optuna "
                "storage (autobatch report --storage ...)",
                code,
                redact_url(self.tracking_uri),
            )
        self._stopped = True

    def close(self, timeout: float | None = None) -> None:
        """Let the child send what it holds; wait up to ``timeout`` seconds for it. The child
        then waits for this process's next study (MLflow already imported)."""
        child = self._child
        if child is None:
            return
        self._closing = True
        if self._sent <= 1:  # no study event yet, nothing to log: no need to wait for MLflow
            # Not killed: it may be creating a new store's tables, and a migration cut short
            # breaks that store for good. With its input closed it exits once it has opened it.
            self._child = None
            child.end()
            return
        number = self._post("close")
        self._child = None
        finished = self._wait_for(number, self.end_timeout if timeout is None else timeout)
        self._drain()
        if finished and not self._gone:
            _keep(child)
            return
        if child.alive():
            log.warning(
                "MLflow logging is still sending to %s (process %d); it goes on in the "
                "background and exits by itself when done",
                redact_url(self.tracking_uri),
                child.process.pid,
            )
        child.end()

    # -- the study's run -------------------------------------------------------------------

    def open_study_run(
        self, settings: StudySettings, probe: ProbeResult | None, run_id: str | None = None
    ) -> str | None:
        """Open (or reopen) the study's run and wait for its id; None if logging is off."""
        self._ensure_child()
        number = self._post("open_study_run", settings, probe, run_id)
        if number and not self._wait_for(number, self.start_timeout):
            log.warning(
                "MLflow logging did not open the study's run within %.0f s", self.start_timeout
            )
        return self.parent_run_id

    def attach(self, parent_run_id: str, experiment_id: str) -> None:
        """Log this process's trials under a study run another process opened."""
        self._ensure_child()
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id
        self._post("attach", parent_run_id, experiment_id)

    def _ensure_child(self) -> None:
        if self._child is None:  # a second study through the same tracker
            self._start()
            self.wait_ready()

    # -- TuneObserver ------------------------------------------------------------------------

    def study_started(self, settings: StudySettings, probe: ProbeResult | None) -> None:
        self._ensure_child()
        self._post("study_started", settings, probe)

    def trial_abandoned(self, number: int, attrs: dict[str, Any]) -> None:
        self._post("trial_abandoned", number, attrs)

    def trial_started(self, trial: Any, record: TrialRecord) -> None:
        self._trials[record.number] = trial
        self._study = getattr(trial, "study", self._study)
        self._started[record.number] = self._post("trial_started", record.number, record)
        self._drain()

    def evaluated(self, record: TrialRecord, point: EvalPoint) -> None:
        self._post("evaluated", record, point)
        self._drain()

    def trial_finished(self, record: TrialRecord) -> None:
        """Send the trial's end; wait for its run id, so it is on the trial before Optuna
        closes it (the tuner tells Optuna after this)."""
        self._post("trial_finished", record)
        started = self._started.pop(record.number, 0)
        if started and not self._wait_for(started, self.id_timeout) and not self._gone:
            log.warning(
                "MLflow logging is behind: trial %d's run id was not known after %.0f s, so "
                "the trial does not name its MLflow run",
                record.number,
                self.id_timeout,
            )
        self._trials.pop(record.number, None)

    def study_finished(self, result: Any) -> None:
        """Send the recommendation and charts; wait until everything is logged."""
        self._post("study_finished", replace(result, study=None))
        self.close()

    def study_interrupted(self, reason: str) -> None:
        self._post("study_interrupted", reason)
        self.close()

    def study_failed(self, reason: str) -> None:
        self._post("study_failed", reason)
        self.close()

    def study_left(self) -> None:
        self._post("study_left")
        self.close()


# -- the child ---------------------------------------------------------------------------------


class _StudyNotes:
    """Stands in for the Optuna study in the child: user attributes go back to the parent."""

    def __init__(self, reply: Any) -> None:
        self._reply = reply

    def set_user_attr(self, key: str, value: Any) -> None:
        self._reply("attr", None, key, value)


class _TrialNotes:
    """Stands in for an Optuna trial in the child, as _StudyNotes does for the study."""

    def __init__(self, number: int, reply: Any) -> None:
        self.number, self._reply = number, reply
        self.study = _StudyNotes(reply)

    def set_user_attr(self, key: str, value: Any) -> None:
        self._reply("attr", self.number, key, value)


class _Forward(logging.Handler):
    """Log records of the child, re-logged by the parent under the same logger name."""

    def __init__(self, reply: Any) -> None:
        super().__init__(logging.WARNING)
        self._reply = reply

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self._reply("log", record.name, record.levelno, text)


def main() -> int:
    """Run an MlflowTracker on the events arriving on stdin until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(AttributeError, OSError):  # training first, where both want a core
        os.nice(19)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt replies
    lock = threading.Lock()
    parent_gone = False

    def reply(*message: Any) -> None:
        nonlocal parent_gone
        with lock:
            if parent_gone:
                return
            try:
                _write(replies, message)
            except OSError:  # nobody listens any more; the logging itself goes on
                parent_gone = True

    inbox: queue.Queue = queue.Queue()
    # Read stdin continuously, so the parent's writes never block on a full pipe. Through a
    # file of its own: a thread still blocked in sys.stdin at exit makes Python abort.
    events = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    threading.Thread(target=_pump, args=(events, inbox), daemon=True).start()
    ours = logging.getLogger("autobatch")
    ours.addHandler(_Forward(reply))
    ours.setLevel(logging.WARNING)
    ours.propagate = False

    # Before the first message, which may come seconds later from a pre-started process.
    from autobatch.tracking.mlflow_tracker import MlflowTracker

    preloading: threading.Thread | None = None
    tracker: MlflowTracker | None = None
    open_study, last_state = False, None

    def done(number: int) -> None:
        nonlocal last_state
        state = None if tracker is None else _state(tracker)
        reply("done", number, None if state == last_state else state)
        last_state = state

    def abandon(reason: str) -> None:
        nonlocal open_study
        if tracker is not None and open_study:
            tracker.study_interrupted(reason)
        open_study = False

    # One session per study: "open" ... events ... "close"; then the next "open", if any.
    while (message := inbox.get()) is not None:
        number, kind, *args = message
        if kind == "open":
            abandon("the tuning process started another study before this one ended")
            uri, experiment, flush_interval = args
            tracker, last_state = None, None
            try:
                tracker = MlflowTracker(uri, experiment)
            except InvalidInputError as exc:
                reply("invalid", str(exc))
                continue
            except Exception as exc:  # MLflow itself failed to start: say so in one line
                shown = redact_url(f"{type(exc).__name__}: {exc}".splitlines()[0])[:200]
                reply("invalid", f"cannot log to MLflow at {redact_url(uri)} ({shown}); "
                      "pass --no-mlflow")  # fmt: skip
                continue
            tracker.flush_interval = flush_interval
            reply("ready")
            if preloading is None:  # the charts at the end need matplotlib: load it while idle
                preloading = threading.Thread(
                    target=importlib.import_module, args=("autobatch.tracking.plots",)
                )
                preloading.start()
            continue
        if kind == "close":
            abandon("the tuning process stopped logging before the study ended")
        elif tracker is not None:
            try:
                if kind == "trial_started":
                    args = [_TrialNotes(args[0], reply), args[1]]
                getattr(tracker, kind)(*args)
            except Exception:  # a bug of ours: say it, keep logging the rest
                log.warning("MLflow logging of %s failed", kind, exc_info=True)
            ended = ("study_finished", "study_interrupted", "study_failed", "study_left")
            open_study = kind not in ended and (
                open_study or kind in ("open_study_run", "attach", "study_started")
            )
        if kind in _ANSWERED:
            done(number)
    abandon("the tuning process ended before the study did")
    return 0


def _state(tracker: Any) -> dict[str, Any]:
    return {
        "parent_run_id": tracker.parent_run_id,
        "experiment_id": tracker.experiment_id,
        "run_ids": dict(tracker.run_ids),
        "stopped": tracker.stopped,
    }


if __name__ == "__main__":
    sys.exit(main())
