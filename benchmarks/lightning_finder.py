"""Lightning's BatchSizeFinder against autobatch's AutoBatchFinder, on the same LightningModules.

Each workload (the built-in ``mlp``, ``cnn`` and ``transformer`` tasks, wrapped as one
LightningModule with a ``batch_size`` attribute and its own ``train_dataloader``) runs under the
same simulated accelerator: a ``TrackedMeter`` that counts live tensor bytes and raises
``torch.OutOfMemoryError`` ("CUDA out of memory. ...") before an allocation would pass its
capacity, as ``benchmarks/probe_vs_peers.py`` does. Lightning's finder runs inside the meter
(``Tuner.scale_batch_size``, modes "power" and "binsearch"); AutoBatchFinder is given a meter of
the same capacity and runs as a callback of ``Trainer.fit(max_steps=0)``, so both timings include
setting up the trainer and stop once the size is found.

Reported per method: the size found and its ratio to the true maximum (an exhaustive search,
doubling then bisecting to a gap of one, two steps per size, no headroom: probe_vs_peers'
``Exhaustive``), training steps run, wall time, OOMs hit, whether the returned size was ever
run (the module records the size of every batch its training_step sees), and wall time and
steps as a ratio to Lightning binsearch's in the same run.

Run::

    python benchmarks/lightning_finder.py
    python benchmarks/lightning_finder.py --workloads mlp --threads 2

Targets for AutoBatchFinder (exit status 1 when missed): found/true >= 0.93 and <= 1, the
returned size ran, and at most a quarter of Lightning binsearch's wall time where binsearch ran
sizes of at least 0.93 of the true max (where it stopped below, at max_val, it did less work).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import probe_vs_peers as peers  # noqa: E402

from autobatch.task import Task  # noqa: E402
from autobatch.units import format_bytes  # noqa: E402

MIN_RATIO = 0.93
#: The finders' own cap (``max_val``), the same default in Lightning's BatchSizeFinder.
MAX_VAL = 8192
MAX_TIME_FRACTION = 0.25  # of Lightning binsearch's wall time


@dataclass
class Row:
    method: str
    found: int | None
    steps: int
    seconds: float
    ooms: int
    ran: bool | None = None  # the returned size went through training_step
    ratio: float | None = None
    note: str = ""
    sizes: list[int] = field(default_factory=list)


@contextlib.contextmanager
def scratch_dir() -> Any:
    root = tempfile.mkdtemp(prefix="autobatch-bench-")
    try:
        yield root
    finally:
        with contextlib.suppress(OSError):
            for entry in os.listdir(root):
                os.remove(os.path.join(root, entry))
            os.rmdir(root)


def run_lightning(task: Task, capacity: int, mode: str) -> Row:
    from lightning.pytorch.tuner import Tuner

    meter = peers.CountingMeter(capacity)
    with scratch_dir() as root:
        start = time.perf_counter()
        with meter:
            module = peers.lightning_module(task)
            found = Tuner(peers.lightning_trainer(root, [])).scale_batch_size(module, mode=mode)
        seconds = time.perf_counter() - start
    row = Row(f"lightning {mode}", found, module.steps, seconds, meter.ooms)
    row.ran = found in module.sizes
    row.sizes = sorted(module.sizes)
    if not row.ran:
        row.note = f"never ran it; largest size run {max(module.sizes)}"
    return row


def run_autobatch(task: Task, capacity: int) -> Row:
    from autobatch.integrations.lightning import AutoBatchFinder

    meter = peers.CountingMeter(capacity)

    class Finder(AutoBatchFinder):
        def make_meter(self, trainer: Any, pl_module: Any) -> peers.CountingMeter:
            return meter

    finder = Finder()
    with scratch_dir() as root:
        start = time.perf_counter()
        module = peers.lightning_module(task)
        peers.lightning_trainer(root, [finder], max_steps=0).fit(module)
        seconds = time.perf_counter() - start
    found = finder.optimal_batch_size
    row = Row("autobatch finder", found, module.steps, seconds, meter.ooms)
    row.ran = found in module.sizes
    row.sizes = sorted(module.sizes)
    if module.batch_size != found:
        row.note = f"module.batch_size is {module.batch_size}, not the size found"
    return row


def print_table(rows: list[Row], binsearch: Row | None) -> None:
    header = (
        f"  {'method':<20} {'found':>6} {'found/true':>10} {'ran it':>6} {'steps':>6} "
        f"{'wall s':>7} {'OOMs':>5} {'wall/bin':>8} {'steps/bin':>9}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        ran = "-" if row.ran is None else ("yes" if row.ran else "NO")
        wall = steps = "-"
        if binsearch is not None and row.method.startswith(("lightning", "autobatch")):
            wall = f"{row.seconds / binsearch.seconds:.2f}"
            steps = f"{row.steps / binsearch.steps:.2f}"
        note = f"  ({row.note})" if row.note else ""
        print(
            f"  {row.method:<20} {row.found or '-':>6} {ratio:>10} {ran:>6} {row.steps:>6} "
            f"{row.seconds:>7.2f} {row.ooms:>5} {wall:>8} {steps:>9}{note}"
        )


def check_targets(name: str, auto: Row, binsearch: Row | None, true_size: int) -> list[str]:
    misses = []
    if auto.ratio is None or not MIN_RATIO <= auto.ratio <= 1:
        misses.append(f"{name}: found/true {auto.ratio} outside [{MIN_RATIO}, 1]")
    if not auto.ran:
        misses.append(f"{name}: the returned size {auto.found} never ran")
    # The time is compared where binsearch ran sizes near the answer; where it stopped far
    # below (max_val reached by doubling, its answer never run), it did less of the work.
    searched = binsearch is not None and max(binsearch.sizes, default=0) >= MIN_RATIO * true_size
    if binsearch is not None and not searched:
        print(
            f"  ({name}: binsearch ran sizes up to {max(binsearch.sizes, default=0)} only, "
            f"below {MIN_RATIO} of {true_size}: its time is not compared)",
            flush=True,
        )
    if searched and auto.seconds > MAX_TIME_FRACTION * binsearch.seconds:
        misses.append(
            f"{name}: wall {auto.seconds:.2f} s > {MAX_TIME_FRACTION} x Lightning binsearch "
            f"{binsearch.seconds:.2f} s"
        )
    return misses


def run_workload(workload: peers.Workload, skip_lightning: bool) -> tuple[list[Row], list[str]]:
    capacity = workload.capacity
    task, exhaustive = peers.true_max(workload, capacity)
    # Both finders stop at max_val (8192 by default, as Lightning's): beyond it, that is the
    # largest size either may return, and the ratios are against it.
    true_size = min(exhaustive.found, MAX_VAL)
    # Lightning's modes try sizes up to the next power of two above the true max: keep the data
    # longer than that, so memory (not the dataset) ends every search.
    needed = 2 * peers.next_power_of_two_above(true_size) + 1
    samples = len(task.train_data[0]) + len(task.val_data[0])
    while peers.train_samples(samples) < needed:
        samples *= 2
    task = peers.make_task(workload, samples)
    print(
        f"\n== {workload.name}: capacity {format_bytes(capacity)}, "
        f"{len(task.train_data[0])} training samples, true max {exhaustive.found}"
        + (f" (above max_val: ratios against {MAX_VAL})" if exhaustive.found > MAX_VAL else ""),
        flush=True,
    )
    rows = [
        Row(
            "exhaustive (true max)",
            true_size,
            exhaustive.steps,
            exhaustive.seconds,
            exhaustive.ooms,
            ratio=1.0,
        )
    ]
    if not skip_lightning:
        rows += [run_lightning(task, capacity, "power"), run_lightning(task, capacity, "binsearch")]
    auto = run_autobatch(task, capacity)
    rows.append(auto)
    for row in rows[1:]:
        if row.found is not None:
            row.ratio = row.found / true_size
        print(f"  .. {row.method}: {row.found} in {row.seconds:.1f} s", file=sys.stderr)
    binsearch = next((r for r in rows if r.method == "lightning binsearch"), None)
    print_table(rows, binsearch)
    gc.collect()
    return rows, check_targets(workload.name, auto, binsearch, true_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(peers.WORKLOADS),
        default=list(peers.WORKLOADS),
        help="workloads to run (default: all)",
    )
    parser.add_argument(
        "--skip-lightning",
        action="store_true",
        help="run only AutoBatchFinder (the wall-time target then goes unchecked)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers.quiet_lightning()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; targets for "
        f"AutoBatchFinder: found/true in [{MIN_RATIO}, 1], the size returned ran, wall <= "
        f"{MAX_TIME_FRACTION:g} x Lightning binsearch"
    )
    started = time.perf_counter()
    summary, misses = [], []
    for name in args.workloads:
        rows, missed = run_workload(peers.WORKLOADS[name], args.skip_lightning)
        summary.append((name, rows))
        misses += missed

    print("\n== summary (ratios against Lightning binsearch in the same run)")
    for name, rows in summary:
        by_method = {r.method: r for r in rows}
        auto, binsearch = by_method["autobatch finder"], by_method.get("lightning binsearch")
        line = (
            f"  {name:<12} true {rows[0].found:>5}  autobatch {auto.found:>5} "
            f"({auto.ratio:.3f}, ran: {'yes' if auto.ran else 'NO'}, {auto.steps} steps, "
            f"{auto.seconds:.2f} s)"
        )
        if binsearch is not None:
            line += (
                f"  binsearch {binsearch.found} ({binsearch.ratio:.3f}, {binsearch.steps} steps, "
                f"{binsearch.seconds:.2f} s)  wall x{auto.seconds / binsearch.seconds:.2f}"
            )
        print(line)
    print(f"  total benchmark time {time.perf_counter() - started:.1f} s")
    print("TARGETS MET" if not misses else "TARGETS MISSED: " + "; ".join(misses))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
