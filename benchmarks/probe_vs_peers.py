"""autobatch's probe against Lightning's BatchSizeFinder and Accelerate's batch-size finder.

Every method runs the same training step (forward, loss, backward, optimizer step) of the
built-in ``mlp``, ``cnn`` and ``transformer`` tasks, and of three flat-start workloads (a wide MLP
with Adam, an embedding-heavy model, a model with a large fixed workspace: a fixed phase sets the
peak at small sizes), under a simulated accelerator (``TrackedMeter``): the
meter counts the live tensor bytes made under it and raises ``torch.OutOfMemoryError`` ("CUDA out
of memory. ...") before an allocation that would pass its capacity, so OOMs are deterministic.

For each workload it reports, per method, the batch size found, its ratio to the true maximum,
the training steps run (started, including the ones that ran out of memory), the wall time and the
OOMs hit. The true maximum comes from an exhaustive search (doubling, then bisection to a gap of
one) with a fresh model and optimizer per size and no headroom.

Run::

    python benchmarks/probe_vs_peers.py
    python benchmarks/probe_vs_peers.py --workloads cnn --json /tmp/probe_vs_peers.json
    python benchmarks/probe_vs_peers.py --capacity mlp=128MiB

Targets checked for autobatch (exit status 1 when missed): found/true >= 0.93 and never above the
true maximum, at most 8 training steps, and at most a quarter of Lightning binsearch's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import autobatch
from autobatch import examples
from autobatch.memory import TrackedMeter
from autobatch.task import Task
from autobatch.training import TrainStep, build
from autobatch.units import format_bytes, parse_bytes

MIN_RATIO = 0.93
MAX_STEPS = 8
MAX_TIME_FRACTION = 0.25  # of Lightning binsearch's wall time


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    factory: Callable[..., Task]  # example(seed=, samples=)
    capacity: int
    samples: int


class _WideMlp(nn.Module):
    """Wide layers: with Adam, parameters, gradients and optimizer state (about 30 MiB) set the
    peak until the batch is large."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(256, 1536), nn.ReLU(), nn.Linear(1536, 1536), nn.ReLU(), nn.Linear(1536, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _EmbeddingBag(nn.Module):
    """A 50k x 128 embedding table (dense gradients, Adam state) over short token sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50_000, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


class _Workspace(nn.Module):
    """A small network whose forward pass takes a 96 MiB scratch buffer, as a library kernel's
    fixed workspace would, freed before the batch-sized work."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros(24 * 2**20, device=x.device)  # 96 MiB of float32
        bias = scratch[:1].sum()
        del scratch
        return self.body(x) + bias


def _flat_start(name: str, model: Callable[[], nn.Module], x: torch.Tensor, seed: int) -> Task:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (len(x),), generator=generator)
    task = examples._classification(name, model, x, y, seed=seed)
    return dataclasses.replace(task, optimizer=torch.optim.Adam)


def wide_mlp_adam(seed: int = 0, samples: int = 8192) -> Task:
    x = torch.randn(samples, 256, generator=torch.Generator().manual_seed(seed))
    return _flat_start("wide_mlp_adam", _WideMlp, x, seed)


def embedding_heavy(seed: int = 0, samples: int = 8192) -> Task:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50_000, (samples, 16), generator=generator)
    return _flat_start("embedding_heavy", _EmbeddingBag, x, seed)


def fixed_workspace(seed: int = 0, samples: int = 50_000) -> Task:
    x = torch.randn(samples, 256, generator=torch.Generator().manual_seed(seed))
    return _flat_start("fixed_workspace", _Workspace, x, seed)


# The capacities put every true maximum in the hundreds to low thousands, well below the data.
# mlp at 64 MiB keeps its maximum (~2.7k) under 4096: above that, Lightning's default
# max_val=8192 ends both of its modes at 8192 without trying it (try --capacity mlp=128MiB).
WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp", examples.mlp, 64 * 2**20, 50_000),
    "cnn": Workload("cnn", examples.cnn, 256 * 2**20, 4096),
    "transformer": Workload("transformer", examples.transformer, 256 * 2**20, 4096),
    # Flat starts: a fixed phase (Adam's state and update, a workspace) sets the peak at small
    # sizes, so peaks grow sub-linearly until the batch is large.
    "wide_mlp_adam": Workload("wide_mlp_adam", wide_mlp_adam, 80 * 2**20, 8192),
    "embedding_heavy": Workload("embedding_heavy", embedding_heavy, 160 * 2**20, 8192),
    "fixed_workspace": Workload("fixed_workspace", fixed_workspace, 160 * 2**20, 50_000),
}


def make_task(workload: Workload, samples: int) -> Task:
    return workload.factory(seed=0, samples=samples)


def train_samples(samples: int) -> int:
    """Training rows of an example with ``samples`` rows in all (10% go to validation)."""
    return samples - int(samples * 0.1)


class CountingMeter(TrackedMeter):
    """A TrackedMeter that counts the out-of-memory errors it raises."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.ooms = 0

    def _check_fits(self, nbytes: int) -> None:
        try:
            super()._check_fits(nbytes)
        except torch.OutOfMemoryError:
            self.ooms += 1
            raise


@dataclass
class Row:
    method: str
    found: int | None
    steps: int
    seconds: float
    ooms: int
    ratio: float | None = None
    note: str = ""
    tried: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def drop_exception(exc: BaseException) -> None:
    """Free the frames (and the activations in them) that a failed step left in its traceback."""
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


def next_power_of_two_above(n: int) -> int:
    return 1 << n.bit_length()  # strictly above n


# -- the true maximum ----------------------------------------------------------------------------


class Exhaustive:
    """Runs two real training steps at a size with a fresh model and optimizer; no headroom."""

    def __init__(self, task: Task, capacity: int) -> None:
        self.task = task
        self.meter = CountingMeter(capacity)
        self.steps = 0
        self.tried: list[tuple[int, bool]] = []

    def fits(self, batch_size: int) -> bool:
        meter = self.meter
        gc.collect()
        baseline = meter.current()
        model = optimizer = step = batch = None
        ok = True
        try:
            with meter:
                model, optimizer = build(self.task)
                step = TrainStep(self.task, model, optimizer)
                batch = tuple(t[:batch_size].clone() for t in self.task.train_data)
                for _ in range(2):
                    self.steps += 1
                    step(batch)
        except torch.OutOfMemoryError as exc:
            ok = False
            drop_exception(exc)
            del exc
        model = optimizer = step = batch = None
        gc.collect()
        if meter.current() != baseline:
            raise RuntimeError(
                f"exhaustive search at batch size {batch_size}: {meter.current()} bytes live after "
                f"the try, {baseline} before; a failed try leaked into the next"
            )
        self.tried.append((batch_size, ok))
        return ok

    def search(self) -> tuple[int, bool]:
        """Largest fitting size, and whether the data (not memory) bounded it."""
        n = len(self.task.train_data[0])
        size, lo, hi = 1, 0, None
        while hi is None:
            size = min(size, n)
            if self.fits(size):
                lo = size
                if size == n:
                    return n, True
                size *= 2
            else:
                hi = size
        if lo == 0:
            raise RuntimeError("batch size 1 does not fit; give the workload more capacity")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fits(mid):
                lo = mid
            else:
                hi = mid
        return lo, False


def true_max(workload: Workload, capacity: int) -> tuple[Task, Row]:
    samples = workload.samples
    for _ in range(4):
        task = make_task(workload, samples)
        exhaustive = Exhaustive(task, capacity)
        start = time.perf_counter()
        found, data_bound = exhaustive.search()
        seconds = time.perf_counter() - start
        if not data_bound:
            row = Row(
                "exhaustive (true max)",
                found,
                exhaustive.steps,
                seconds,
                exhaustive.meter.ooms,
                ratio=1.0,
                note=f"{len(exhaustive.tried)} sizes",
                tried=[b for b, _ in exhaustive.tried],
            )
            return task, row
        samples *= 4  # the whole dataset fitted: more data, so memory is what bounds
    raise RuntimeError(f"{workload.name}: the whole dataset fits at capacity {capacity}")


# -- autobatch ---------------------------------------------------------------------------------


def run_autobatch(task: Task, capacity: int) -> Row:
    meter = CountingMeter(capacity)
    start = time.perf_counter()
    result = autobatch.probe(task, meter=meter, cache=False)
    seconds = time.perf_counter() - start
    gc.collect()
    note = ""
    if result.ooms != meter.ooms:
        note = f"meter raised {meter.ooms} OOMs"
    if meter.current():
        note = (note + "; " if note else "") + f"{format_bytes(meter.current())} left live"
    return Row(
        "autobatch",
        result.batch_size,
        result.steps,
        seconds,
        result.ooms,
        note=note,
        tried=[a.batch_size for a in result.attempts],
        extra={
            "probe_seconds": result.seconds,
            "budget_bytes": result.budget_bytes,
            "attempts": [dataclasses.asdict(a) for a in result.attempts],
            "memory_model": None
            if result.memory_model is None
            else dataclasses.asdict(result.memory_model),
        },
    )


# -- Lightning -----------------------------------------------------------------------------------


def quiet_lightning() -> None:
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def lightning_module(task: Task) -> Any:
    """The task as a LightningModule: a batch-size attribute, its own dataloader, and what it
    ran (steps, every batch size, the first batch of each fit)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(task.seed)
                self.net = task.model()
            self.batch_size = 2
            self.steps = 0
            self.sizes: set[int] = set()
            self.trials: list[int] = []

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.net(*inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.steps += 1
            self.sizes.add(len(batch[0]))
            if batch_idx == 0:
                self.trials.append(len(batch[0]))
            return task.batch_loss(self.net, tuple(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return task.optimizer(self.parameters(), task.lr)

        def train_dataloader(self) -> DataLoader:
            dataset = TensorDataset(*task.train_data)
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    return Wrapped()


def lightning_trainer(root: str, callbacks: Sequence[Any] = (), max_steps: int = -1) -> Any:
    """A quiet one-epoch CPU Trainer writing under ``root``."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        max_steps=max_steps,
        default_root_dir=root,
        callbacks=list(callbacks),
    )


def run_lightning(task: Task, capacity: int, mode: str, max_val: int) -> Row:
    """Lightning's finder with ``max_val`` past the true max, so it solves the same problem
    (its default, 8192, stops it early on the workloads whose max lies above)."""
    from lightning.pytorch.tuner import Tuner

    meter = CountingMeter(capacity)
    root = tempfile.mkdtemp(prefix="autobatch-bench-")
    start = time.perf_counter()
    with meter:
        module = lightning_module(task)
        trainer = lightning_trainer(root)
        found = Tuner(trainer).scale_batch_size(module, mode=mode, max_val=max_val)
    seconds = time.perf_counter() - start
    steps, trials = module.steps, list(module.trials)
    del module, trainer
    gc.collect()
    with contextlib.suppress(OSError):
        for entry in os.listdir(root):
            os.remove(os.path.join(root, entry))
        os.rmdir(root)
    n = len(task.train_data[0])
    note = ""
    if found is not None and found >= n:
        note = f"capped at the dataset length {n}"
    elif found is not None and trials and found > max(trials):
        # Both modes stop once a success doubles to max_val and return a size never run.
        note = f"never ran it: largest size run {max(trials)}, stopped at max_val={max_val}"
    return Row(f"lightning {mode}", found, steps, seconds, meter.ooms, note=note, tried=trials)


# -- Accelerate ----------------------------------------------------------------------------------


def run_accelerate(task: Task, capacity: int, true_size: int) -> Row:
    from accelerate.utils import find_executable_batch_size
    from accelerate.utils.memory import should_reduce_batch_size

    meter = CountingMeter(capacity)
    message = None
    try:
        meter._check_fits(capacity + 1)
    except torch.OutOfMemoryError as exc:
        message = exc
    if not should_reduce_batch_size(message):
        raise RuntimeError("accelerate does not recognise the meter's out-of-memory message")
    meter.ooms = 0
    del message

    starting = 2 * next_power_of_two_above(true_size)
    steps = 0
    tried: list[int] = []
    leftovers: list[int] = []

    def train(batch_size: int) -> int:
        nonlocal steps
        tried.append(batch_size)
        leftovers.append(meter.current())  # what earlier, failed tries still hold
        model, optimizer = build(task)
        step = TrainStep(task, model, optimizer)
        batch = tuple(t[:batch_size].clone() for t in task.train_data)
        for _ in range(2):
            steps += 1
            step(batch)
        return batch_size

    start = time.perf_counter()
    with meter:
        found = find_executable_batch_size(train, starting_batch_size=starting)()
    seconds = time.perf_counter() - start
    note = f"start {starting}"
    if max(leftovers) > 0:
        note += f"; failed tries left up to {format_bytes(max(leftovers))} live"
    return Row(
        "accelerate",
        found,
        steps,
        seconds,
        meter.ooms,
        note=note,
        tried=tried,
        extra={"starting_batch_size": starting, "live_bytes_at_try_start": leftovers},
    )


# -- report ------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    header = (
        f"  {'method':<22} {'found':>6} {'found/true':>10} {'steps':>6} {'wall s':>7} {'OOMs':>5}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        found = "-" if row.found is None else str(row.found)
        over = "  OVER TRUE MAX" if row.ratio is not None and row.ratio > 1 else ""
        note = f"  ({row.note})" if row.note else ""
        print(
            f"  {row.method:<22} {found:>6} {ratio:>10} {row.steps:>6} {row.seconds:>7.2f} "
            f"{row.ooms:>5}{over}{note}"
        )


def check_targets(name: str, rows: dict[str, Row]) -> list[str]:
    auto = rows["autobatch"]
    misses = []
    if auto.ratio is None or auto.ratio < MIN_RATIO:
        misses.append(f"{name}: found/true {auto.ratio or 0:.3f} < {MIN_RATIO}")
    if auto.ratio is not None and auto.ratio > 1:
        misses.append(f"{name}: found {auto.found} is above the true max")
    if auto.steps > MAX_STEPS:
        misses.append(f"{name}: {auto.steps} steps > {MAX_STEPS}")
    binsearch = rows.get("lightning binsearch")
    if binsearch is not None and auto.seconds > MAX_TIME_FRACTION * binsearch.seconds:
        misses.append(
            f"{name}: wall {auto.seconds:.2f} s > {MAX_TIME_FRACTION} x Lightning binsearch "
            f"{binsearch.seconds:.2f} s"
        )
    return misses


def run_workload(workload: Workload, capacity: int, methods: list[str]) -> dict[str, Any]:
    task, exhaustive = true_max(workload, capacity)
    true_size = exhaustive.found
    # Peers try sizes up to twice the next power of two above the true max: keep the data longer.
    needed = 2 * next_power_of_two_above(true_size) + 1
    samples = len(task.train_data[0]) + len(task.val_data[0])
    while train_samples(samples) < needed:
        samples *= 2
    if samples != len(task.train_data[0]) + len(task.val_data[0]):
        task = make_task(workload, samples)
    n = len(task.train_data[0])
    print(
        f"\n== {workload.name}: capacity {format_bytes(capacity)}, {n} training samples, "
        f"true max {true_size}",
        flush=True,
    )
    rows: dict[str, Row] = {exhaustive.method: exhaustive}
    runners: dict[str, Callable[[], Row]] = {
        "autobatch": lambda: run_autobatch(task, capacity),
        "lightning power": lambda: run_lightning(task, capacity, "power", needed - 1),
        "lightning binsearch": lambda: run_lightning(task, capacity, "binsearch", needed - 1),
        "accelerate": lambda: run_accelerate(task, capacity, true_size),
    }
    for method in methods:
        row = runners[method]()
        print(f"  .. {method}: {row.found} in {row.seconds:.1f} s", file=sys.stderr, flush=True)
        if row.found is not None:
            row.ratio = row.found / true_size
        rows[method] = row
    print_table(list(rows.values()))
    auto = rows["autobatch"]
    # The true max uses the whole capacity; the probe keeps its default headroom of the memory free
    # before the step. The largest size under that budget is the search's own target.
    within, _ = Exhaustive(task, auto.extra["budget_bytes"]).search()
    parts = [
        f"{workload.name}: autobatch {auto.found}/{true_size} = {auto.ratio:.3f}",
        f"{auto.found}/{within} = {auto.found / within:.3f} of the largest under its headroom",
        f"{auto.steps} steps",
        f"{auto.seconds:.2f} s",
        f"{auto.ooms} OOMs",
    ]
    if "lightning binsearch" in rows:
        binsearch = rows["lightning binsearch"]
        parts.append(
            f"{auto.seconds / binsearch.seconds:.2f}x Lightning binsearch's time "
            f"({binsearch.found}, {binsearch.seconds:.2f} s)"
        )
    print(", ".join(parts), flush=True)
    return {
        "workload": workload.name,
        "capacity_bytes": capacity,
        "train_samples": n,
        "true_max": true_size,
        "max_under_headroom": within,
        "rows": {name: dataclasses.asdict(row) for name, row in rows.items()},
        "misses": check_targets(workload.name, rows),
    }


def parse_capacities(values: list[str]) -> dict[str, int]:
    capacities = {}
    for value in values:
        name, _, size = value.partition("=")
        if name not in WORKLOADS or not size:
            raise SystemExit(f"--capacity {value!r}: write it as WORKLOAD=SIZE, e.g. mlp=128MiB")
        capacities[name] = parse_bytes(size)
    return capacities


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        default=list(WORKLOADS),
        help="workloads to run (default: all)",
    )
    parser.add_argument(
        "--capacity",
        nargs="*",
        default=[],
        metavar="WORKLOAD=SIZE",
        help="override a workload's simulated capacity, e.g. mlp=128MiB",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["lightning", "accelerate"],
        help="leave out peers (the wall-time target then goes unchecked)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier wall times on a shared machine; every "
        "method runs under the same setting)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    capacities = parse_capacities(args.capacity)

    torch.set_num_threads(args.threads)
    quiet_lightning()
    methods = ["autobatch"]
    if "lightning" not in args.skip:
        methods += ["lightning power", "lightning binsearch"]
    if "accelerate" not in args.skip:
        methods.append("accelerate")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; targets for autobatch: "
        f"found/true >= {MIN_RATIO} and <= 1, steps <= {MAX_STEPS}, wall <= "
        f"{MAX_TIME_FRACTION:g} x Lightning binsearch"
    )
    started = time.perf_counter()
    results = []
    for name in args.workloads:
        workload = WORKLOADS[name]
        results.append(run_workload(workload, capacities.get(name, workload.capacity), methods))
    misses = [miss for result in results for miss in result["misses"]]

    print("\n== summary")
    for result in results:
        auto = result["rows"]["autobatch"]
        status = "met" if not result["misses"] else "MISSED"
        print(
            f"  {result['workload']:<12} true {result['true_max']:>5}  autobatch {auto['found']:>5}"
            f"  ratio {auto['ratio']:.3f}  steps {auto['steps']}  {auto['seconds']:.2f} s  "
            f"OOMs {auto['ooms']}  -> {status}"
        )
    total = time.perf_counter() - started
    print(f"  total benchmark time {total:.1f} s")
    print("TARGETS MET" if not misses else "TARGETS MISSED: " + "; ".join(misses))

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "targets": {
                        "min_ratio": MIN_RATIO,
                        "max_steps": MAX_STEPS,
                        "max_time_fraction_of_lightning_binsearch": MAX_TIME_FRACTION,
                    },
                    "workloads": results,
                    "misses": misses,
                    "total_seconds": total,
                },
                handle,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
