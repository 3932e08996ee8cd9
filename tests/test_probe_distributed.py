"""probe() under torch.distributed, started by torchrun: two CPU processes (gloo), each with
its own simulated budget. DDP's gradient buckets count, every rank ends with the smaller
rank's size, and a rank that cannot fit anything makes the others fail instead of hang."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autobatch import probe
from autobatch.examples import mlp

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from autobatch import probe
    from autobatch.examples import mlp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    budget = sys.argv[2].split(",")[rank]
    try:
        result = probe(mlp(samples=20000), memory_budget=budget, cache=False)
        answer = {"batch_size": result.batch_size, "own": result.extra["this_rank_batch_size"],
                  "ranks": result.extra["ranks"], "eval": result.eval_batch_size}
    except Exception as exc:
        answer = {"error": type(exc).__name__, "message": str(exc)}
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(answer, f)
    dist.destroy_process_group()
    """
)


def _torchrun(tmp_path: Path, budgets: str) -> list[dict]:
    script = tmp_path / "probe_ranks.py"
    script.write_text(SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--standalone", str(script), str(tmp_path), budgets,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_every_rank_takes_the_smaller_ranks_size_with_ddp_buckets_counted(tmp_path: Path):
    ranks = _torchrun(tmp_path, "64MiB,48MiB")
    assert [r["ranks"] for r in ranks] == [2, 2]
    assert ranks[0]["own"] > ranks[1]["own"]  # the larger budget fits more on its own
    assert ranks[0]["batch_size"] == ranks[1]["batch_size"] == ranks[1]["own"]
    # The buckets take memory a single process does not use.
    alone = probe(mlp(samples=20000), memory_budget="48MiB", cache=False)
    assert ranks[1]["own"] < alone.batch_size


@pytest.mark.slow
def test_a_rank_that_fits_nothing_fails_the_others_instead_of_hanging(tmp_path: Path):
    ranks = _torchrun(tmp_path, "64MiB,8MiB")
    assert ranks[1]["error"] == "BatchSizeOneDoesNotFit"
    assert ranks[0]["error"] == "AutobatchError" and "another rank" in ranks[0]["message"]
