"""How much a trial's training loop costs over a plain hand-written PyTorch loop.

Both loops train the same model from the same seed on the same in-memory data in the same
order; the trial loop also sums the loss on the device and evaluates twice or four times per
epoch (evaluation time is excluded from its training seconds, as the tuner does). The figure
is throughput (training samples per second) relative to the plain loop: target >= 0.95.

With ``--mlflow`` it also measures what MLflow logging adds to a trial's wall time, every
evaluation logged to a local SQLite store, for the tracker ``tune`` uses (a background
process) and for logging inside the training process: target <= 2%. Then whole ``tune``
calls with and without MLflow, which adds the logging process's start and the final charts.

    python benchmarks/loop_overhead.py [--repeats 9] [--epochs 3] [--mlflow]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from autobatch.data import BatchSource
from autobatch.examples import blobs, digits
from autobatch.training import build
from autobatch.tuning.loop import train


def plain_loop(task, batch_size: int, epochs: int) -> float:
    """The loop a user writes by hand; returns samples per second."""
    model, optimizer = build(task)
    x, y = task.train_data
    generator = torch.Generator().manual_seed(task.seed)
    loss_fn = task.loss
    n = len(x)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            index = order[i : i + batch_size]
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return epochs * n / (time.perf_counter() - start)


def trial_loop(
    task, batch_size: int, epochs: int, on_eval=lambda point: None
) -> tuple[float, float]:
    """autobatch's trial loop; returns (samples per training second, wall seconds)."""
    source = BatchSource(task.train_data, task.device).to_device()
    val = BatchSource(task.val_data, task.device).to_device()
    start = time.perf_counter()
    run = train(
        task,
        source,
        val,
        batch_size=batch_size,
        lr=task.lr,
        max_epochs=epochs,
        eval_batch_size=512,
        on_eval=on_eval,
    )
    wall = time.perf_counter() - start
    return run.samples / run.train_seconds, wall


def measure_loop(repeats: int, epochs: int) -> list[dict]:
    rows = []
    for name, task, batch_size in (
        ("digits", digits(), 32),
        ("blobs", blobs(), 32),
        ("blobs", blobs(), 256),
    ):
        plain, ours = [], []
        for i in range(repeats):  # interleaved, each first half the time: drift hits both alike
            if i % 2:
                ours.append(trial_loop(task, batch_size, epochs)[0])
            plain.append(plain_loop(task, batch_size, epochs))
            if not i % 2:
                ours.append(trial_loop(task, batch_size, epochs)[0])
        p, o = statistics.median(plain), statistics.median(ours)
        rows.append(dict(workload=name, batch_size=batch_size, plain=p, trial=o, ratio=o / p))
    return rows


class _Timed:
    """Forwards a tracker's hooks and adds up the seconds the training thread spends in them."""

    def __init__(self, tracker) -> None:
        self.tracker, self.seconds = tracker, 0.0

    def __getattr__(self, name: str):
        hook = getattr(self.tracker, name)

        def timed(*args):
            start = time.perf_counter()
            try:
                return hook(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _settings(task, batch_size: int, epochs: int, n_trials: int):
    from autobatch.records import StudySettings

    return StudySettings(
        study_name="overhead",
        storage="in-memory",
        objective="time",
        lr_rule="sqrt",
        lr_multiplier_range=(0.25, 4.0),
        candidates=(batch_size,),
        max_epochs=epochs,
        n_trials=n_trials,
        timeout=None,
        seed=0,
        sampler="TPESampler",
        pruner="none",
        tolerance=0.05,
        target_loss=None,
        task_name=task.name,
        device="cpu",
        precision="fp32",
        base_lr=task.lr,
        base_batch_size=32,
        train_size=task.train_size,
    )


def measure_mlflow(repeats: int, epochs: int) -> dict:
    """Trial wall time with each tracker against none, in rotating order; time in hooks."""
    import optuna

    from autobatch.records import TrialRecord
    from autobatch.tracking import BackgroundTracker, MlflowTracker

    task, batch_size = blobs(), 64
    modes = ("none", "in-process", "in-process async", "background process")
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    hooks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        background = BackgroundTracker(f"sqlite:///{tmp}/background.db", experiment="overhead")
        startup = time.perf_counter() - start
        # MLflow's own asynchronous logging: log_batch queued on its logging thread; creating
        # and ending a run stay synchronous (MLflow has no asynchronous form of them).
        queued = MlflowTracker(f"sqlite:///{tmp}/async.db", "overhead")
        queued.synchronous = False
        trackers = {
            "in-process": _Timed(MlflowTracker(f"sqlite:///{tmp}/inprocess.db", "overhead")),
            "in-process async": _Timed(queued),
            "background process": _Timed(background),
        }
        for tracker in trackers.values():
            tracker.study_started(_settings(task, batch_size, epochs, repeats), None)
        study = optuna.create_study()
        for i in range(repeats):
            # Each mode takes each place in the order equally often: the place alone moves a
            # trial's time by several percent on a shared CPU.
            turn = i % len(modes)
            for name in modes[turn:] + modes[:turn]:
                if name == "none":
                    walls[name].append(trial_loop(task, batch_size, epochs)[1])
                    continue
                tracker = trackers[name]
                trial = study.ask()
                record = TrialRecord(
                    trial.number, "running", batch_size, task.lr, 1.0, "sqrt", 0, epochs, 0
                )
                # Everything the training thread waits for counts: the trial's run created,
                # each evaluation handed over, the run ended (before Optuna hears of it).
                start = time.perf_counter()
                tracker.trial_started(trial, record)
                on_eval = tracker.evaluated
                trial_loop(task, batch_size, epochs, lambda p, r=record, f=on_eval: f(r, p))
                tracker.trial_finished(record)
                walls[name].append(time.perf_counter() - start)
                study.tell(trial, 1.0)
        for name, tracker in trackers.items():
            hooks[name] = tracker.seconds / repeats
            tracker.study_interrupted("benchmark over")
        import mlflow

        mlflow.flush_async_logging()
    base = statistics.median(walls["none"])
    rows = [
        dict(
            tracker=name,
            wall=statistics.median(w),
            overhead=statistics.median(w) / base - 1,
            hook_ms=1000 * hooks.get(name, 0.0),
        )
        for name, w in walls.items()
    ]
    return dict(rows=rows, startup=startup)


def measure_study(repeats: int) -> dict[str, float]:
    """Whole ``tune`` calls without MLflow, logging in-process, and logging as ``tune`` does
    (its background process), in rotating order; pruning off, so each does the same work."""
    from autobatch import tune
    from autobatch.tracking import MlflowTracker

    task = blobs()
    options = dict(
        n_trials=6,
        max_epochs=2,
        candidates=[32, 64, 128, 256],
        objective="pareto",
        progress=False,
        seed=0,
    )
    walls: dict[str, list[float]] = {"none": [], "in-process": [], "background process": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/study.db"
        modes = list(walls)
        for i in range(repeats):
            for mode in modes[i % 3 :] + modes[: i % 3]:
                start = time.perf_counter()
                if mode == "in-process":  # what a user's own MlflowTracker observer costs
                    tracker = MlflowTracker(uri)
                    tune(
                        task, mlflow=False, observers=[tracker], study_name=f"{mode}-{i}", **options
                    )
                else:
                    tune(
                        task,
                        mlflow=mode != "none",
                        tracking_uri=uri,
                        study_name=f"{mode}-{i}",
                        **options,
                    )
                walls[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(w) for mode, w in walls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mlflow", action="store_true", help="also measure MLflow logging cost")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each, so the two loops compete on equal terms

    rows = measure_loop(args.repeats, args.epochs)
    print(
        f"{'workload':<10} {'batch':>6} {'plain samples/s':>16} {'trial samples/s':>16} "
        f"{'ratio':>7}"
    )
    for r in rows:
        print(
            f"{r['workload']:<10} {r['batch_size']:>6} {r['plain']:>16.0f} {r['trial']:>16.0f} "
            f"{r['ratio']:>7.3f}"
        )
    worst = min(r["ratio"] for r in rows)
    verdict = "MET" if worst >= 0.95 else "MISSED"
    print(f"loop throughput vs plain loop: worst {worst:.3f} (target >= 0.95): {verdict}")
    if args.mlflow:
        m = measure_mlflow(args.repeats, args.epochs)
        print(
            f"\nMLflow logging to SQLite, blobs batch 64, {args.epochs} epochs, "
            f"median of {args.repeats} trials each"
        )
        print(
            f"{'tracker':<20} {'trial wall s':>12} {'vs none':>8} {'in hooks ms/trial':>18} "
            f"{'share':>7}"
        )
        for r in m["rows"]:
            print(
                f"{r['tracker']:<20} {r['wall']:>12.3f} {r['overhead']:>+8.1%} "
                f"{r['hook_ms']:>18.2f} {r['hook_ms'] / 1000 / r['wall']:>7.2%}"
            )
        # The share of the trial the training thread spends in logging calls is the measure:
        # medians of trial wall time still move by a few percent between runs on a shared
        # CPU, as much as the effect, so they are shown, not judged.
        for name in ("in-process async", "background process"):
            row = next(r for r in m["rows"] if r["tracker"] == name)
            share = row["hook_ms"] / 1000 / row["wall"]
            verdict = "MET" if share <= 0.02 else "MISSED"
            print(f"{name}: {share:.2%} of the trial in logging calls (target <= 2%): {verdict}")
        print(
            f"the logging process's start took {m['startup']:.2f} s, once per study, during "
            "the probe and first trial"
        )
        s = measure_study(max(3, args.repeats // 3))
        print(
            "whole tune() (6 trials, no pruning), logging process start and final charts "
            "included:\n"
            + "\n".join(
                f"  {mode:<20} {wall:6.2f} s  {wall - s['none']:+6.2f} s"
                for mode, wall in s.items()
            )
        )


if __name__ == "__main__":
    main()
