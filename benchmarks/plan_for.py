"""Plan-for against the simulated accelerator, and the memory a large plan takes.

For each workload, ``probe(task, memory_budget=SIZE)`` (real steps under the simulated
accelerator, ``TrackedMeter``) and ``probe(task, plan_for=SIZE)`` (the same steps on fake tensors,
no memory) at sizes that fit in RAM; the table shows both batch sizes, their ratio and wall times.
Then ``autobatch probe mlp --plan-for 40GiB`` runs in a child process and its maximum resident
memory is read with ``resource.getrusage``.

Targets (exit status 1 when missed): plan/probe within 3% on every workload; under 3 GB
resident for the 40 GiB plan.

Run::

    python benchmarks/plan_for.py
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import autobatch
from autobatch import examples
from autobatch.task import Task

sys.path.insert(0, str(Path(__file__).parent))
import probe_vs_peers as peers  # noqa: E402  (the flat-start workloads live there)

MAX_DISAGREEMENT = 0.03
MAX_RSS_BYTES = 3 * 10**9

WORKLOADS: dict[str, tuple[Callable[[], Task], str]] = {
    "mlp": (examples.mlp, "64MiB"),
    "cnn": (examples.cnn, "256MiB"),
    "transformer": (examples.transformer, "256MiB"),
    "digits": (examples.digits, "2MiB"),
    "wide_mlp_adam": (peers.wide_mlp_adam, "80MiB"),
    "embedding_heavy": (peers.embedding_heavy, "160MiB"),
    "fixed_workspace": (peers.fixed_workspace, "160MiB"),
}


def agreement(names: list[str]) -> list[str]:
    print(
        f"  {'workload':<16} {'budget':>7} {'probe':>6} {'plan':>6} {'plan/probe':>10} "
        f"{'probe s':>8} {'plan s':>7}"
    )
    misses = []
    for name in names:
        factory, size = WORKLOADS[name]
        task = factory()
        start = time.perf_counter()
        real = autobatch.probe(task, memory_budget=size, cache=False)
        real_seconds = time.perf_counter() - start
        start = time.perf_counter()
        plan = autobatch.probe(task, plan_for=size, cache=False)
        plan_seconds = time.perf_counter() - start
        ratio = plan.batch_size / real.batch_size
        print(
            f"  {name:<16} {size:>7} {real.batch_size:>6} {plan.batch_size:>6} {ratio:>10.3f} "
            f"{real_seconds:>8.2f} {plan_seconds:>7.2f}",
            flush=True,
        )
        if abs(ratio - 1) > MAX_DISAGREEMENT:
            misses.append(f"{name}: plan/probe {ratio:.3f}")
    return misses


def resident_memory(size: str) -> tuple[int, float, str]:
    """Max resident bytes and seconds of ``autobatch probe mlp --plan-for SIZE`` in a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    command = [sys.executable, "-m", "autobatch", "probe", "mlp", "--plan-for", size, "--no-cache"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("could not read the child's resident memory")
    line = next(x for x in done.stdout.splitlines() if "predicted" in x)
    return peak_kib * 1024, seconds, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--large", default="40GiB", help="the plan whose memory is measured")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; plan-for vs the simulated accelerator (--memory-budget)")
    misses = agreement(args.workloads)
    rss, seconds, line = resident_memory(args.large)
    print(
        f"\nautobatch probe mlp --plan-for {args.large}: max resident {rss / 2**20:.0f} MiB, "
        f"{seconds:.1f} s wall (with interpreter start)\n  {line}"
    )
    if rss > MAX_RSS_BYTES:
        misses.append(f"--plan-for {args.large}: {rss / 1e9:.2f} GB resident > 3 GB")
    print("TARGETS MET" if not misses else "TARGETS MISSED: " + "; ".join(misses))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
