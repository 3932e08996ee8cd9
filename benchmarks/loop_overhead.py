"""How much a trial's training loop costs over a plain hand-written PyTorch loop.

Both loops train the same model from the same seed on the same in-memory data in the same
order; the trial loop also sums the loss on the device and evaluates twice or four times per
epoch (evaluation time is excluded from its training seconds, as the tuner does). The figure
is throughput (training samples per second) relative to the plain loop: target >= 0.95.

With ``--mlflow`` it also measures what MLflow logging adds to a trial's wall time (every
evaluation logged to a local SQLite store through autobatch's tracker): target <= 2%.

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
from autobatch.trial_loop import train


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
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            plain.append(plain_loop(task, batch_size, epochs))
            ours.append(trial_loop(task, batch_size, epochs)[0])
        p, o = statistics.median(plain), statistics.median(ours)
        rows.append(dict(workload=name, batch_size=batch_size, plain=p, trial=o, ratio=o / p))
    return rows


def measure_mlflow(repeats: int, epochs: int) -> dict:
    import optuna

    from autobatch.records import StudySettings, TrialRecord
    from autobatch.tracking import MlflowTracker

    task = blobs()
    batch_size = 64
    with tempfile.TemporaryDirectory() as tmp:
        tracker = MlflowTracker(f"sqlite:///{tmp}/mlflow.db", experiment="overhead")
        settings = StudySettings(
            study_name="overhead",
            storage="in-memory",
            objective="time",
            lr_rule="sqrt",
            lr_multiplier_range=(0.25, 4.0),
            candidates=(batch_size,),
            max_epochs=epochs,
            n_trials=repeats,
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
        tracker.study_started(settings, None)
        study = optuna.create_study()
        without, with_logging = [], []
        for i in range(repeats):
            without.append(trial_loop(task, batch_size, epochs)[1])
            trial = study.ask()
            record = TrialRecord(
                number=i,
                state="running",
                batch_size=batch_size,
                lr=task.lr,
                lr_multiplier=1.0,
                lr_rule="sqrt",
                iterations_per_epoch=0,
                max_epochs=epochs,
                seed=0,
            )
            # Everything the training thread waits for counts: creating the trial's run,
            # logging each evaluation, ending the run.
            start = time.perf_counter()
            tracker.trial_started(trial, record)
            trial_loop(task, batch_size, epochs, lambda p, r=record: tracker.evaluated(r, p))
            tracker.trial_finished(record)
            with_logging.append(time.perf_counter() - start)
    a, b = statistics.median(without), statistics.median(with_logging)
    return dict(without=a, with_logging=b, overhead=b / a - 1)


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
        verdict = "MET" if m["overhead"] <= 0.02 else "MISSED"
        print(
            f"MLflow logging: trial wall {m['without']:.2f} s without, {m['with_logging']:.2f} s "
            f"with; overhead {m['overhead']:+.2%} (target <= 2%): {verdict}"
        )


if __name__ == "__main__":
    main()
