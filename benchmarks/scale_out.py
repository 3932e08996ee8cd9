"""One study, one worker against two: what a second worker buys, and what the storage costs.

1. The same 12-trial study of the ``blobs`` example (trials of about a second), run by
   ``autobatch tune --workers 1`` and by ``--workers 2`` (one torch thread per worker), on
   SQLite and on PostgreSQL. The figure is
   the study's wall-clock time from its first trial's start to its last trial's end, read from
   the storage, and its ratio 1 worker / 2 workers (target >= 1.7 on a 2-core machine). The
   command's own wall time (process starts, the task's loading and imports) is shown beside it.
2. Storage time per trial: one worker in this process, with every call into Optuna's RDB
   storage (and the cache in front of it) timed and its SQL statements counted, on the
   training thread and on the heartbeat thread; as a share of a 1-second trial (target <= 1%).
   ``--detail`` splits a trial's storage time by the Optuna call that led there.

PostgreSQL comes from ``--postgres URL`` or ``AUTOBATCH_TEST_POSTGRES_URL`` (as ``.ci/run``
sets it); each run gets a database of its own.

    python benchmarks/scale_out.py [--repeats 3] [--n-trials 12] [--postgres URL]
        [--only speed-up|storage] [--detail]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna

STUDY = "autobatch-blobs"
EPOCHS, SIZES = 8, [32, 64, 128, 256]  # trials of about a second on one thread here
OPTIONS = ["--max-epochs", str(EPOCHS), "--batch-sizes", ",".join(map(str, SIZES))]
OPTIONS += ["--no-mlflow", "--json"]


def new_postgres_database(server: str) -> str:
    import sqlalchemy

    base = server.rstrip("/").replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{base}/{name}"


def study_span(storage: str) -> tuple[float, int, float]:
    """(first start to last end in seconds, trials, median trial seconds) of the study."""
    trials = [
        t
        for t in optuna.load_study(study_name=STUDY, storage=storage).get_trials()
        if t.datetime_start and t.datetime_complete and "autobatch_record" in t.user_attrs
    ]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    lengths = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return (end - start).total_seconds(), len(trials), statistics.median(lengths)


def run_study(workers: int, storage: str, n_trials: int, folder: Path) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable, "-m", "autobatch", "tune", "blobs", "--workers", str(workers),
            "--threads", "1", "--n-trials", str(n_trials), "--min-trials", str(n_trials),
            "--storage", storage, *OPTIONS,
        ],
        cwd=folder, capture_output=True, text=True,
    )  # fmt: skip
    command = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"autobatch tune failed:\n{done.stderr[-3000:]}")
    span, trials, median = study_span(storage)
    return {"span": span, "command": command, "trials": trials, "median_trial": median}


class StorageClock:
    """Adds up the seconds spent in the study's storage and the SQL statements it sends, per
    thread kind (the training thread, the heartbeat thread), and, on the training thread, per
    Optuna call that led there (``ask``, ``suggest_*``, ``tell``, ``report``, ...).

    Every public method of RDBStorage and of Optuna's ``_CachedStorage`` in front of it (and of
    any subclass, such as autobatch's) is timed, and the private RDBStorage methods the cache
    calls instead of public ones; a call made inside another timed call is counted in the
    outer one only."""

    CACHE_CALLS = ("_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id",
                   "_get_stale_trial_ids")  # fmt: skip
    #: The Optuna calls a worker makes, as the per-call breakdown names them.
    API = {
        optuna.Study: ("ask", "tell", "enqueue_trial", "get_trials", "trials", "user_attrs",
                       "set_user_attr"),
        optuna.Trial: ("suggest_categorical", "suggest_float", "report", "should_prune",
                       "set_user_attr", "user_attrs", "params"),
    }  # fmt: skip

    def __init__(self) -> None:
        self.seconds = {"training": 0.0, "heartbeat": 0.0}
        self.calls = {"training": 0, "heartbeat": 0}
        self.statements = {"training": 0, "heartbeat": 0}
        self.by_call: dict[str, list[float]] = {}  # Optuna call: [seconds, statements, calls]
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> StorageClock:
        import sqlalchemy
        from optuna.storages import _CachedStorage

        classes = [optuna.storages.RDBStorage, _CachedStorage]
        for cls in classes:
            classes += [sub for sub in cls.__subclasses__() if sub not in classes]
            for name, method in vars(cls).items():
                public = not name.startswith("_") and name not in ("upgrade", "remove_session")
                if callable(method) and (public or name in self.CACHE_CALLS):
                    self._patch(cls, name, self._timed(method))
        for cls, names in self.API.items():
            for name in names:
                self._patch(cls, name, self._labelled(cls.__name__, name, vars(cls)[name]))
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", self._sql)
        return self

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy

        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", self._sql)
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def _patch(self, owner: object, name: str, replacement: object) -> None:
        self._saved.append((owner, name, vars(owner)[name]))
        setattr(owner, name, replacement)

    @staticmethod
    def _kind() -> str:
        return "training" if threading.current_thread() is threading.main_thread() else "heartbeat"

    def _sql(self, *args: object) -> None:
        self.statements[self._kind()] += 1
        if self._kind() == "training":
            self.by_call.setdefault(self._label(), [0.0, 0, 0])[1] += 1

    def _label(self) -> str:
        return getattr(self._local, "api", None) or "autobatch (storage directly)"

    def _labelled(self, owner: str, name: str, member):
        local = self._local
        label = f"{owner}.{name}"

        def wrap(function):
            @functools.wraps(function)
            def call(*args, **kwargs):
                if getattr(local, "api", None):
                    return function(*args, **kwargs)
                local.api = label
                try:
                    return function(*args, **kwargs)
                finally:
                    local.api = None

            return call

        if isinstance(member, property):
            return property(wrap(member.fget), member.fset)
        return wrap(member)

    def _timed(self, method):
        clock, local = self, self._local

        @functools.wraps(method)
        def timed(*args, **kwargs):
            if getattr(local, "inside", False):
                return method(*args, **kwargs)
            kind = clock._kind()
            local.inside = True
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                local.inside = False
                seconds = time.perf_counter() - start
                clock.seconds[kind] += seconds
                clock.calls[kind] += 1
                if kind == "training":
                    row = clock.by_call.setdefault(clock._label(), [0.0, 0, 0])
                    row[0] += seconds
                    row[2] += 1

        return timed


def storage_cost(storage: str, n_trials: int) -> tuple[dict[str, float], StorageClock]:
    import torch

    from autobatch import tune
    from autobatch.examples import blobs

    torch.set_num_threads(1)
    with StorageClock() as clock:
        result = tune(
            blobs(),
            n_trials=n_trials,
            min_trials=None,  # all of them: the same study every run
            max_epochs=EPOCHS,
            candidates=SIZES,
            storage=storage,
            study_name=STUDY,
            mlflow=False,
        )
    trials = len(result.trials)
    train = sum(t.wall_seconds or t.train_seconds for t in result.trials)
    return {
        "training_ms": 1000 * clock.seconds["training"] / trials,
        "heartbeat_ms": 1000 * clock.seconds["heartbeat"] / trials,
        "calls": clock.calls["training"] / trials,
        "statements": clock.statements["training"] / trials,
        "trial_seconds": train / trials,
        "trials": trials,
    }, clock


def print_breakdown(backend: str, clock: StorageClock, trials: int) -> None:
    """Where a trial's storage time goes: per Optuna call, ms and SQL statements per trial."""
    print(f"\n{backend}: per trial, by the Optuna call that reached the storage")
    print(f"  {'call':<36} {'ms':>6} {'statements':>10} {'storage calls':>13}")
    rows = sorted(clock.by_call.items(), key=lambda item: -item[1][0])
    for label, (seconds, statements, calls) in rows:
        print(f"  {label:<36} {1000 * seconds / trials:>6.2f} {statements / trials:>10.1f} "
              f"{calls / trials:>13.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--postgres", default=os.environ.get("AUTOBATCH_TEST_POSTGRES_URL"))
    parser.add_argument("--only", choices=["speed-up", "storage"], help="run one part only")
    parser.add_argument(
        "--detail", action="store_true", help="storage time per Optuna call, per trial"
    )
    args = parser.parse_args()
    backends = ["sqlite"] + (["postgresql"] if args.postgres else [])
    print(
        f"{os.cpu_count()} CPU cores; {args.n_trials}-trial blobs study, {args.repeats} runs each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only != "storage":
            speed_up(backends, args, folder)
        if args.only != "speed-up":
            storage_share(backends, args, folder)


def speed_up(backends: list[str], args: argparse.Namespace, folder: Path) -> None:
    rows = []
    for backend in backends:
        spans: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for i in range(args.repeats):
            for workers in (1, 2) if i % 2 == 0 else (2, 1):  # alternate who goes first
                if backend == "sqlite":
                    storage = f"sqlite:///{folder / f'{uuid.uuid4().hex}.db'}"
                else:
                    storage = new_postgres_database(args.postgres)
                spans[workers].append(run_study(workers, storage, args.n_trials, folder))
        one = statistics.median(r["span"] for r in spans[1])
        two = statistics.median(r["span"] for r in spans[2])
        rows.append((backend, spans, one, two))
    print(f"\n{'storage':<11} {'workers':>7} {'study s':>8} {'command s':>9} {'trial s':>8}")
    for backend, spans, one, two in rows:
        for workers in (1, 2):
            runs = spans[workers]
            span = statistics.median(r["span"] for r in runs)
            print(
                f"{backend:<11} {workers:>7} {span:>8.1f} "
                f"{statistics.median(r['command'] for r in runs):>9.1f} "
                f"{statistics.median(r['median_trial'] for r in runs):>8.2f}"
            )
        verdict = "MET" if one / two >= 1.7 else "MISSED"
        print(f"{backend:<11} speed-up of 2 workers: {one / two:.2f}x (target >= 1.7): {verdict}")


def storage_share(backends: list[str], args: argparse.Namespace, folder: Path) -> None:
    """The median of ``--repeats`` runs per storage (the first run in a process also pays for
    imports and the first connection, so it runs once more, unmeasured, first)."""
    print(f"\n{'storage':<11} {'trial s':>8} {'storage ms/trial':>17} {'calls':>6} "
          f"{'statements':>10} {'heartbeat ms':>13} {'of a 1 s trial':>15}")  # fmt: skip
    for backend in backends:
        runs = []
        for _ in range(args.repeats + 1):
            if backend == "sqlite":
                storage = f"sqlite:///{folder / f'cost-{uuid.uuid4().hex}.db'}"
            else:
                storage = new_postgres_database(args.postgres)
            runs.append(storage_cost(storage, args.n_trials))
        runs = runs[1:]
        cost, clock = sorted(runs, key=lambda run: run[0]["training_ms"])[len(runs) // 2]
        share = cost["training_ms"] / 1000
        print(
            f"{backend:<11} {cost['trial_seconds']:>8.2f} {cost['training_ms']:>17.1f} "
            f"{cost['calls']:>6.0f} {cost['statements']:>10.0f} {cost['heartbeat_ms']:>13.1f} "
            f"{share:>15.2%}  (target <= 1%): {'MET' if share <= 0.01 else 'MISSED'}"
        )
        if args.detail:
            print_breakdown(backend, clock, int(cost["trials"]))


if __name__ == "__main__":
    main()
