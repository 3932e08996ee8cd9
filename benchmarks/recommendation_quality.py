"""Does tune()'s recommendation, retrained from scratch, end near the best loss reachable, and
fast? The check of the "Predict before you train" issue, item 5, on tasks with plain SGD and
with AdamW.

For each task:

1. **grid**: every candidate batch size (tune()'s own default candidates) x every learning-rate
   multiplier, each trained for the full ``--max-epochs`` budget, no pruning. The best
   reachable loss ``L`` is the lowest smoothed validation loss of any grid run; the grid's
   fastest time is the fewest training seconds any grid run needed for its smoothed loss to
   reach ``L x 1.02``;
2. **tune**: ``tune(task, max_epochs=...)`` with its own defaults otherwise (20 trials, the
   target following the best loss found, 2% tolerance), once per ``--repeats`` seed; its
   compute is the sum of its trials' training seconds;
3. **retrain**: the recommended batch size and learning rate, from scratch, in the plain
   training loop, for the recommended number of epochs. Its last smoothed validation loss
   against ``L`` is the quality; its training seconds against the grid's fastest is the time.

Targets (exit status 1 when missed, medians over seeds): final loss <= 1.02 L, time <= 1.1x
the grid's fastest, compute <= 5% of the grid's.

The same figures for the task's own configuration (batch size and learning rate, full budget)
show what the study adds. Timing: one torch thread; the grid's fastest is a single noisy
measurement, biased low.

Run::

    python benchmarks/recommendation_quality.py               # about 15 minutes on 2 cores
    python benchmarks/recommendation_quality.py --quick       # a smoke test
    python benchmarks/recommendation_quality.py --tasks digits-sgd --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable

import optuna
import torch

from autobatch import tune
from autobatch.examples import blobs, digits
from autobatch.task import Task
from autobatch.tuning import curves
from autobatch.tuning.space import default_candidates

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tune_quality import Bench, Run  # noqa: E402  (a sibling script)

QUALITY = 0.02  # the final loss may be this much above the best reachable
MAX_TIME_RATIO = 1.10
MAX_COMPUTE_FRACTION = 0.05


def _sgd(task: Task, lr: float, momentum: float = 0.0) -> Task:
    def optimizer(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    return dataclasses.replace(task, optimizer=optimizer, lr=lr, name=f"{task.name}-sgd")


TASKS: dict[str, Callable[[], tuple[Task, float]]] = {
    # name: (task, max_epochs)
    "digits-sgd": lambda: (_sgd(digits(), lr=0.01, momentum=0.9), 20),
    "blobs-sgd": lambda: (_sgd(blobs(samples=8000), lr=0.005, momentum=0.9), 8),
    "digits-adamw": lambda: (digits(), 12),
}


def run_grid(bench: Bench, sizes: list[int], multipliers: list[float], log) -> list[Run]:
    runs = []
    for size in sizes:
        for multiplier in multipliers:
            run = bench.run(size, bench.lr(size, multiplier))
            runs.append(run)
            log(
                f"  grid bs={size:<5} x{multiplier:<4g} lr={run.lr:.2e} best {run.best_loss:.4f} "
                f"({run.train_seconds:.1f} s){' FAILED' if run.failed else ''}"
            )
    return runs


def first_time(run: Run, level: float) -> float | None:
    """Training seconds until ``run``'s smoothed loss first reached ``level``."""
    return next((seconds for _, seconds, loss in run.curve if loss <= level), None)


def retrain(task: Task, batch_size: int, lr: float, epochs: float, ceiling: int) -> Run:
    bench = Bench(task, epochs, QUALITY, ceiling)
    return bench.run(batch_size, lr)


def one_task(name: str, args, log) -> dict:
    task, max_epochs = TASKS[name]()
    if args.quick:
        max_epochs = min(max_epochs, 3)
    ceiling = task.train_size
    sizes = [s for s in default_candidates(ceiling, task.batch_size) if s >= args.min_batch_size]
    multipliers = [float(m) for m in args.multipliers.split(",")]
    bench = Bench(task, max_epochs, QUALITY, ceiling)
    log(f"{name}: candidates {sizes}, multipliers {multipliers}, {max_epochs:g} epochs")
    grid = run_grid(bench, sizes, multipliers, log)
    finished = [r for r in grid if not r.failed and math.isfinite(r.best_loss)]
    best_loss = min(r.best_loss for r in finished)
    level = curves.threshold(best_loss, QUALITY)
    timed = [(t, r) for r in finished if (t := first_time(r, level)) is not None]
    grid_fastest, fastest = min(timed, key=lambda pair: pair[0])
    grid_compute = sum(r.train_seconds for r in grid)
    log(
        f"  best reachable {best_loss:.4f}; fastest to {level:.4f}: bs={fastest.batch_size} "
        f"lr={fastest.lr:.2e} in {grid_fastest:.2f} s; grid compute {grid_compute:.0f} s"
    )
    own = retrain(task, task.batch_size, task.lr, max_epochs, ceiling)
    rows = []
    for seed in range(args.repeats):
        result = tune(
            task,
            max_epochs=max_epochs,
            seed=seed,
            mlflow=False,
            **({"n_trials": 4} if args.quick else {}),
        )
        compute = sum(t.train_seconds for t in result.trials)
        again = retrain(task, result.batch_size, result.lr, result.epochs, ceiling)
        final = again.curve[-1][2]
        rows.append(
            {
                "seed": seed,
                "batch_size": result.batch_size,
                "lr": result.lr,
                "epochs": result.epochs,
                "loss_ratio": final / best_loss,
                "time_ratio": again.train_seconds / grid_fastest,
                "compute_fraction": compute / grid_compute,
            }
        )
        log(
            f"  tune seed {seed}: bs={result.batch_size} lr={result.lr:.2e} "
            f"{result.epochs} epochs -> final {final:.4f} ({final / best_loss:.3f}x best) in "
            f"{again.train_seconds:.2f} s ({again.train_seconds / grid_fastest:.2f}x grid "
            f"fastest); compute {compute:.0f} s ({compute / grid_compute:.1%} of grid)"
        )
    return {
        "task": name,
        "best_loss": best_loss,
        "grid_fastest": grid_fastest,
        "grid_compute": grid_compute,
        "own_loss_ratio": own.curve[-1][2] / best_loss,
        "own_time_ratio": own.train_seconds / grid_fastest,
        "rows": rows,
    }


def _spread(values: list[float], fmt: str) -> str:
    median = statistics.median(values)
    return f"{median:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--multipliers", default="0.25,0.5,1,2,4")
    parser.add_argument("--min-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.multipliers, args.repeats, args.min_batch_size = "0.5,2", 1, 64
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("autobatch").setLevel(logging.ERROR)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    reports = [one_task(name, args, log) for name in args.tasks.split(",")]
    print(
        f"\n{'task':<14} {'final / best loss':>22} {'time / grid fastest':>22} "
        f"{'compute / grid':>22}  | task default: loss, time"
    )
    ok = True
    for report in reports:
        rows = report["rows"]
        loss = [r["loss_ratio"] for r in rows]
        times = [r["time_ratio"] for r in rows]
        compute = [r["compute_fraction"] for r in rows]
        print(
            f"{report['task']:<14} {_spread(loss, '.3f'):>22} {_spread(times, '.2f'):>22} "
            f"{_spread(compute, '.1%'):>22}  | {report['own_loss_ratio']:.3f}, "
            f"{report['own_time_ratio']:.2f}"
        )
        ok &= statistics.median(loss) <= 1 + QUALITY
        ok &= statistics.median(times) <= MAX_TIME_RATIO
        ok &= statistics.median(compute) <= MAX_COMPUTE_FRACTION
    print(
        f"\ntargets: final loss <= {1 + QUALITY:.2f}x best, time <= {MAX_TIME_RATIO}x grid "
        f"fastest, compute <= {MAX_COMPUTE_FRACTION:.0%} of grid: {'MET' if ok else 'MISSED'} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
