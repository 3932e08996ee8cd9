"""Check on a real CUDA device that the probed batch size trains within memory.

1. Probe a real model on the GPU (``autobatch.probe``), the device capped at ``--memory-budget``
   through ``CudaMeter(limit=...)``; by default the cap is also enforced on the caching
   allocator (``torch.cuda.set_per_process_memory_fraction``), so going over it is a real OOM.
2. Train one full epoch at the returned batch size with the real training step (``TrainStep``),
   recording ``torch.cuda.max_memory_allocated`` and any out-of-memory error.
3. Print the plan-for prediction (``probe(task, plan_for=budget)``: the same steps on fake tensors
   on the CPU) next to the size the real card gave, with and without the CUDA margin.
4. Compare the CPU simulation (``TrackedMeter``) of the same model at small sizes with the peak
   CUDA measures at the same sizes, to check that the simulation matches reality.
5. Time the study's clock (``autobatch.tuning.clock``: one step at each size, as a study's
   prepare does) and train up to 200 steps at each size with the trial loop: the training
   seconds counted on the clock against the wall clock's, on the real device.

Without CUDA it prints ``no CUDA device: gpu_check skipped`` and exits 0 (``--cpu-dry-run`` runs
the same flow on the CPU under a ``TrackedMeter``, to check the script itself). Exit status: 0
when the epoch stayed within memory, 1 when it ran out of memory or peaked above the capacity,
any other failure raises.

Run::

    python benchmarks/gpu_check.py                          # transformer, 8GiB cap
    python benchmarks/gpu_check.py --workload cnn --memory-budget 4GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import sys
import time
from typing import Any

import torch

import autobatch
from autobatch import examples
from autobatch.data import BatchSource, to_device
from autobatch.memory import CudaMeter, MemoryMeter, TrackedMeter
from autobatch.oom import drop_failed_attempt
from autobatch.task import Task
from autobatch.training import TrainStep, build
from autobatch.tuning import clock
from autobatch.tuning.loop import train as train_loop
from autobatch.tuning.prior import StepClock
from autobatch.units import format_bytes, parse_bytes

# Per workload: rows in all (10% go to validation), large enough that memory, not the data,
# bounds the batch size under an 8GiB budget.
DEFAULT_SAMPLES = {"transformer": 16_384, "cnn": 40_000, "mlp": 600_000}


def make_task(args: argparse.Namespace) -> Task:
    samples = args.samples or DEFAULT_SAMPLES[args.workload]
    if args.workload == "transformer":
        task = examples.transformer(samples=samples, length=args.length)
        if args.width != 128:
            if args.width % 4:
                raise SystemExit(f"--width {args.width} must be a multiple of 4 (4 heads)")
            task = dataclasses.replace(
                task, model=functools.partial(examples._TinyEncoder, width=args.width)
            )
    elif args.workload == "cnn":
        task = examples.cnn(samples=samples)
    else:
        task = examples.mlp(samples=samples)
    return dataclasses.replace(task, precision=args.precision)


def describe(task: Task, args: argparse.Namespace) -> str:
    model = task.model()
    params = sum(p.numel() for p in model.parameters())
    shape = tuple(task.train_data[0].shape[1:])
    extra = f", length {args.length}, width {args.width}" if args.workload == "transformer" else ""
    return (
        f"{args.workload}{extra}: {params / 1e6:.2f}M parameters, {task.train_size} training "
        f"samples of shape {shape}, {task.precision}"
    )


def cleanup(meter: MemoryMeter) -> None:
    gc.collect()
    meter.release()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of_steps(task: Task, meter: MemoryMeter, batch_size: int, steps: int = 2) -> int:
    """Peak bytes (above what was live before) of a fresh model and optimizer taking ``steps``
    training steps on the first ``batch_size`` samples, as ``meter`` reads it."""
    cleanup(meter)
    before = meter.current()
    meter.reset_peak()
    with meter:
        model, optimizer = build(task)
        step = TrainStep(task, model, optimizer)
        batch = BatchSource(task.train_data, task.device, task.collate_fn).first(batch_size)
        for _ in range(steps):
            step(batch)
        synchronize(task.device)
    peak = meter.peak()
    del model, optimizer, step, batch
    cleanup(meter)
    return int(peak) - before


def train_epoch(task: Task, meter: MemoryMeter, batch_size: int) -> dict[str, Any]:
    """One epoch at ``batch_size``: batches are copied from host memory like the probe's."""
    cleanup(meter)
    meter.reset_peak()
    before = meter.current()
    steps = 0
    oom: str | None = None
    start = time.perf_counter()
    model = optimizer = train_step = batch = None
    try:
        with meter:
            model, optimizer = build(task)
            train_step = TrainStep(task, model, optimizer)
            source = BatchSource(task.train_data, torch.device("cpu"), task.collate_fn)
            generator = torch.Generator().manual_seed(task.seed)
            loss = torch.zeros((), device=task.device)
            for cpu_batch in source.epoch(batch_size, generator, shuffle=True):
                batch = to_device(cpu_batch, task.device, copy=True)
                del cpu_batch
                loss += train_step(batch)
                batch = None
                steps += 1
            synchronize(task.device)
            mean_loss = float(loss) / max(steps, 1)
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:300]
        drop_failed_attempt(exc)
        mean_loss = float("nan")
    seconds = time.perf_counter() - start
    peak = meter.peak()
    model = optimizer = train_step = batch = None
    cleanup(meter)
    return {
        "steps": steps,
        "seconds": seconds,
        "peak": peak,
        "before": before,
        "oom": oom,
        "mean_loss": mean_loss,
    }


def print_attempts(result: autobatch.ProbeResult) -> None:
    print(f"  {'batch':>7} {'phase':<8} {'result':<12} {'peak':>12} {'seconds':>8}")
    for a in result.attempts:
        status = "fits" if a.fitted else ("OOM" if a.oom else "over budget")
        print(
            f"  {a.batch_size:>7} {a.phase:<8} {status:<12} {format_bytes(a.peak_bytes):>12} "
            f"{a.seconds:>8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["transformer", "cnn", "mlp"], default="transformer")
    parser.add_argument("--memory-budget", default="8GiB", help="device cap, e.g. 8GiB")
    parser.add_argument("--samples", type=int, help="rows in the example (10%% go to validation)")
    parser.add_argument("--length", type=int, default=256, help="transformer sequence length")
    parser.add_argument("--width", type=int, default=256, help="transformer width (4 heads)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument(
        "--compare-sizes",
        type=int,
        nargs="+",
        default=[1, 16],
        help="batch sizes at which the CPU simulation is compared with CUDA",
    )
    parser.add_argument(
        "--no-enforce",
        action="store_true",
        help="do not cap the caching allocator at the budget (the cap is then only the probe's)",
    )
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the whole flow on the CPU under a TrackedMeter (checks this script, not CUDA)",
    )
    args = parser.parse_args(argv)

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA device: gpu_check skipped")
        return 0

    budget = parse_bytes(args.memory_budget)
    cpu_task = make_task(args)
    if args.cpu_dry_run:
        device = torch.device("cpu")
        meter: MemoryMeter = TrackedMeter(budget)
        print(f"CPU dry run (TrackedMeter {format_bytes(budget)}), torch {torch.__version__}")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        print(
            f"{props.name}, {format_bytes(props.total_memory)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
        meter = CudaMeter(device, limit=budget)
        if not args.no_enforce and budget < props.total_memory:
            torch.cuda.set_per_process_memory_fraction(budget / props.total_memory, device)
            print(f"caching allocator capped at {format_bytes(budget)} (a real OOM above it)")
    task = dataclasses.replace(cpu_task, device=device)
    print(describe(cpu_task, args))

    # 1. probe
    print(f"\nprobe under {format_bytes(budget)}:")
    result = autobatch.probe(task, meter=meter, cache=False)
    print_attempts(result)
    found = result.batch_size
    predicted = result.memory_model.predict(found) if result.memory_model is not None else None
    probe_peak = max(
        (a.peak_bytes or 0 for a in result.attempts if a.batch_size == found), default=None
    )
    print(
        f"  -> batch size {found} in {result.steps} steps, {result.seconds:.2f} s, "
        f"{result.ooms} OOMs"
    )
    if found >= task.train_size:
        print(f"  note: the whole training set ({task.train_size}) fits; raise --samples")
    cleanup(meter)

    # 2. one epoch at the found size
    print(f"\none epoch at batch size {found}:")
    epoch = train_epoch(task, meter, found)
    capacity, budget_bytes = result.capacity_bytes, result.budget_bytes
    peak = epoch["peak"]
    within_capacity = epoch["oom"] is None and peak is not None and peak <= capacity
    within_budget = epoch["oom"] is None and peak is not None and peak <= budget_bytes
    print(
        f"  {epoch['steps']} steps in {epoch['seconds']:.2f} s, mean loss {epoch['mean_loss']:.4f}"
    )
    print(f"found batch size:          {found}")
    print(f"predicted peak:            {format_bytes(predicted)} (memory_model.predict)")
    print(f"probe's peak at that size: {format_bytes(probe_peak)}")
    print(
        f"measured peak during epoch: {format_bytes(peak)} "
        f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'TrackedMeter'}; "
        f"{format_bytes(epoch['before'])} live before)"
    )
    print(f"capacity:                  {format_bytes(capacity)}")
    print(
        f"budget:                    {format_bytes(budget_bytes)} (headroom {result.headroom:.0%})"
    )
    print(f"OOM during epoch:          {epoch['oom'] or 'none'}")
    print(f"within budget:             {'yes' if within_budget else 'no'}")
    print(f"STAYED WITHIN MEMORY: {'yes' if within_capacity else 'no'}")

    # 2b. the plan-for prediction (fake tensors on the CPU, no memory) next to the real answer
    print(f"\nplan-for prediction for {format_bytes(budget)} (CPU, fake tensors):")
    plan = autobatch.probe(cpu_task, plan_for=budget, cache=False)
    card = plan.extra.get("cuda_card_batch_size")
    print(
        f"  plan-for {plan.batch_size} (simulated accelerator semantics), with the CUDA margin "
        f"{card if card is not None else '-'}; real card {found} "
        f"(plan/real {plan.batch_size / found:.3f}, margin/real "
        f"{(card or 0) / found:.3f}); {plan.steps} simulated steps in {plan.seconds:.2f} s"
    )

    # 3. the simulation against the device, at small sizes
    print("\nsimulation (TrackedMeter on CPU) vs device, fresh model, 2 training steps:")
    print(f"  {'batch':>7} {'simulated':>12} {'measured':>12} {'sim/measured':>13}")
    for size in args.compare_sizes:
        simulated = peak_of_steps(cpu_task, TrackedMeter(1 << 40), size)
        measured = peak_of_steps(task, meter, size)
        ratio = simulated / measured if measured else float("nan")
        print(
            f"  {size:>7} {format_bytes(simulated):>12} {format_bytes(measured):>12} {ratio:>13.3f}"
        )

    # 4. the study's clock (step times timed once, as prepare does) against the wall clock
    compare_clock(task, sorted({*args.compare_sizes, found}))
    return 0 if within_capacity else 1


def compare_clock(task: Task, sizes: list[int], steps: int = 200) -> None:
    """Time the step at ``sizes`` as a study's prepare does, then train up to ``steps`` steps
    at each with the trial loop: its training seconds on that clock against the wall clock's."""
    sizes = [s for s in sizes if 1 <= s <= task.train_size]
    train = task.training_batches().to_device()
    val = task.validation_batches().to_device()
    timed = clock.measure(task, train, sizes, cache=False)
    table = StepClock(timed["seconds"])
    print(f"\nthe study's clock ({timed['cost']:.2f} s to time) vs the wall clock, trial loop:")
    columns = ("batch", 7), ("ms/step", 9), ("steps", 6), ("clock s", 9), ("wall s", 9)
    print("  " + " ".join(f"{name:>{width}}" for name, width in columns) + f" {'wall/clock':>11}")
    for size in sizes:
        run = train_loop(
            task, train, val, batch_size=size, lr=task.lr,
            max_epochs=min(1.0, steps * size / task.train_size),
            eval_batch_size=min(size, len(val)), on_eval=lambda point: None,
            clock=table.for_batch_size(size),
        )  # fmt: skip
        ratio = run.wall_seconds / run.train_seconds if run.train_seconds else float("nan")
        print(
            f"  {size:>7} {table(size) * 1e3:>9.3g} {math.ceil(run.samples / size):>6} "
            f"{run.train_seconds:>9.3f} {run.wall_seconds:>9.3f} {ratio:>11.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
