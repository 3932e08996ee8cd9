"""One study, one worker against two: what a second worker buys, and what the storage costs.

1. The same 12-trial study of the ``blobs`` example (trials of about a second), run by
   ``autobatch tune --workers 1`` and by ``--workers 2`` (one torch thread per worker), on
   SQLite and on PostgreSQL. The figure is
   the study's wall-clock time from its first trial's start to its last trial's end, read from
   the storage, and its ratio 1 worker / 2 workers (target >= 1.7 on a 2-core machine). The
   command's own wall time (process starts, the task's loading and imports) is shown beside it.
2. Storage time per trial: one worker in this process, with every call into Optuna's RDB
   storage timed, on the training thread and on the heartbeat thread; as a share of a
   1-second trial (target <= 1%).

PostgreSQL comes from ``--postgres URL`` or ``AUTOBATCH_TEST_POSTGRES_URL`` (as ``.ci/run``
sets it); each run gets a database of its own.

    python benchmarks/scale_out.py [--repeats 3] [--n-trials 12] [--postgres URL]
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
            "--threads", "1", "--n-trials", str(n_trials), "--storage", storage, *OPTIONS,
        ],
        cwd=folder, capture_output=True, text=True,
    )  # fmt: skip
    command = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"autobatch tune failed:\n{done.stderr[-3000:]}")
    span, trials, median = study_span(storage)
    return {"span": span, "command": command, "trials": trials, "median_trial": median}


class StorageClock:
    """Adds up the seconds spent in every public method of RDBStorage, per thread kind."""

    def __init__(self) -> None:
        self.seconds = {"training": 0.0, "heartbeat": 0.0}
        self.calls = {"training": 0, "heartbeat": 0}
        self._saved: dict[str, object] = {}

    def __enter__(self) -> StorageClock:
        cls = optuna.storages.RDBStorage
        for name in dir(cls):
            method = getattr(cls, name)
            # Every public method, and the private ones that read the database for the cache
            # in front of it (Optuna's _CachedStorage calls them, not the public ones).
            private_reads = name in ("_get_trials", "_get_stale_trial_ids")
            if (name.startswith("_") and not private_reads) or not callable(method):
                continue
            self._saved[name] = method
            setattr(cls, name, self._timed(method))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, method in self._saved.items():
            setattr(optuna.storages.RDBStorage, name, method)

    def _timed(self, method):
        clock = self

        @functools.wraps(method)
        def timed(*args, **kwargs):
            kind = (
                "training" if threading.current_thread() is threading.main_thread() else "heartbeat"
            )
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                clock.seconds[kind] += time.perf_counter() - start
                clock.calls[kind] += 1

        return timed


def storage_cost(storage: str, n_trials: int) -> dict[str, float]:
    import torch

    from autobatch import tune
    from autobatch.examples import blobs

    torch.set_num_threads(1)
    with StorageClock() as clock:
        result = tune(
            blobs(),
            n_trials=n_trials,
            max_epochs=EPOCHS,
            candidates=SIZES,
            storage=storage,
            study_name=STUDY,
            mlflow=False,
        )
    trials = len(result.trials)
    train = sum(t.train_seconds for t in result.trials)
    return {
        "training_ms": 1000 * clock.seconds["training"] / trials,
        "heartbeat_ms": 1000 * clock.seconds["heartbeat"] / trials,
        "calls": clock.calls["training"] / trials,
        "trial_seconds": train / trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--postgres", default=os.environ.get("AUTOBATCH_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    backends = ["sqlite"] + (["postgresql"] if args.postgres else [])
    print(
        f"{os.cpu_count()} CPU cores; {args.n_trials}-trial blobs study, {args.repeats} runs each"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
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
            print(
                f"{backend:<11} speed-up of 2 workers: {one / two:.2f}x (target >= 1.7): {verdict}"
            )

        print(f"\n{'storage':<11} {'trial s':>8} {'storage ms/trial':>17} {'calls':>6} "
              f"{'heartbeat ms':>13} {'of a 1 s trial':>15}")  # fmt: skip
        for backend in backends:
            if backend == "sqlite":
                storage = f"sqlite:///{folder / 'cost.db'}"
            else:
                storage = new_postgres_database(args.postgres)
            cost = storage_cost(storage, args.n_trials)
            share = cost["training_ms"] / 1000
            print(
                f"{backend:<11} {cost['trial_seconds']:>8.2f} {cost['training_ms']:>17.1f} "
                f"{cost['calls']:>6.0f} {cost['heartbeat_ms']:>13.1f} {share:>15.2%}  "
                f"(target <= 1%): {'MET' if share <= 0.01 else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
