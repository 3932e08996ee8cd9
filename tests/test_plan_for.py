"""probe(task, plan_for=...): the training step on fake tensors, no memory, in seconds."""

from __future__ import annotations

import json
import re
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch import BatchSizeOneDoesNotFit, InvalidInputError, Task, examples, probe
from autobatch.cli import main
from autobatch.memory.plan import PlanMeter, check_torch_version
from autobatch.records import ProbeResult

MiB = 1024**2


class Tagger(nn.Module):
    """Embeddings, a convolution, batch norm and a tied output layer: an unseen task."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 48)
        self.conv = nn.Conv1d(48, 48, 3, padding=1)
        self.norm = nn.BatchNorm1d(48)
        self.out = nn.Linear(48, 500)
        self.out.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.conv(self.embed(tokens).transpose(1, 2))).relu()
        return self.out(hidden.transpose(1, 2)).mean(1)


def tagger_task(samples: int = 6000) -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 500, (samples, 24), generator=generator)
    y = torch.randint(0, 500, (samples,), generator=generator)
    return Task(model=Tagger, train_data=(x, y), loss=F.cross_entropy, name="tagger")


@pytest.mark.parametrize(
    ("make", "budget"),
    [(tagger_task, "24MiB"), (tagger_task, "6MiB"), (examples.digits, "2MiB")],
)
def test_plan_agrees_with_the_simulated_accelerator(make, budget):
    task = make()
    real = probe(task, memory_budget=budget, cache=False, multiple_of=2)
    plan = probe(task, plan_for=budget, cache=False, multiple_of=2)
    assert abs(plan.batch_size - real.batch_size) <= 0.03 * real.batch_size
    assert plan.planned and not real.planned
    assert plan.device.startswith("plan:")
    # The budget follows what the readings say the step needs whatever the batch.
    assert plan.budget_bytes == pytest.approx(real.budget_bytes, rel=1e-3)
    for planned, ran in zip(plan.attempts, real.attempts, strict=False):
        if planned.batch_size == ran.batch_size:  # the same size read the same peak, or nearly
            assert planned.peak_bytes == pytest.approx(ran.peak_bytes, rel=1e-3)


def test_a_plan_round_trips_and_is_cached_apart_from_a_probe(tmp_path):
    task = tagger_task()
    plan = probe(task, plan_for="8MiB", cache_dir=tmp_path, multiple_of=2)
    again = probe(task, plan_for="8MiB", cache_dir=tmp_path, multiple_of=2)
    assert again.cached and again.planned and again.batch_size == plan.batch_size
    assert ProbeResult.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    real = probe(task, memory_budget="8MiB", cache_dir=tmp_path, multiple_of=2)
    assert not real.cached and not real.planned
    old = {k: v for k, v in real.to_dict().items() if k != "planned"}  # an older cache entry
    assert ProbeResult.from_dict(old).planned is False


def test_a_large_plan_uses_no_real_memory():
    """About 3 GiB of parameters, gradients and AdamW state for a 40 GiB card."""
    big = Task(
        model=lambda: nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 4)),
        train_data=(torch.randn(64, 8192), torch.randint(0, 4, (64,))),
        loss=F.cross_entropy,
        optimizer=torch.optim.AdamW,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = probe(big, plan_for="40GiB", cache=False)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert plan.batch_size == 64  # the whole training set would fit
    assert max(a.peak_bytes for a in plan.attempts) > 1024 * MiB  # a step of over a GiB ...
    assert grown_mib < 200  # ... planned in a few MiB


def test_plan_keeps_a_margin_for_a_cuda_card():
    task = tagger_task(samples=200_000)
    plan = probe(task, plan_for="2GiB", cache=False)
    card = plan.extra["cuda_card_batch_size"]
    assert card is not None and 0 < card < plan.batch_size
    assert plan.extra["cuda_reserve_bytes"] == 2**30
    assert (
        probe(tagger_task(), plan_for="512MiB", cache=False).extra["cuda_card_batch_size"] is None
    )


class Bag(nn.Module):
    """A sparse embedding: its gradient holds only the rows a batch used."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20_000, 32, sparse=True)
        self.out = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.bag(tokens))


def bag_task() -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20_000, (4000, 16), generator=generator)
    y = torch.randint(0, 4, (4000,), generator=generator)
    return Task(
        model=Bag, train_data=(x, y), loss=F.cross_entropy, optimizer=torch.optim.SGD, lr=0.1
    )


def test_a_sparse_gradient_is_probed_and_a_plan_of_it_refused(trains_fresh):
    task = bag_task()
    capacity = 4 * MiB
    result = probe(task, memory_budget=capacity, cache=False)
    assert 1 < result.batch_size < 4000
    # The answer trains within the budget on a fresh simulated device, its sparse gradient
    # (16 rows of 32 floats per sample) counted; twice as many samples do not fit.
    for batch_size, fits in ((result.batch_size, True), (2 * result.batch_size, False)):
        assert trains_fresh(task, batch_size, capacity, result.budget_bytes) == fits, batch_size
    # Fake tensors drop a sparse tensor's entries: a plan would leave the gradient out.
    with pytest.raises(InvalidInputError, match="sparse") as info:
        probe(task, plan_for=capacity, cache=False)
    assert "memory_budget" in str(info.value) and "\n" not in str(info.value)


def test_a_plan_refuses_lazy_modules_with_the_fix():
    task = Task(
        model=lambda: nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 4)),
        train_data=(torch.randn(64, 16), torch.randint(0, 4, (64,))),
        loss=F.cross_entropy,
    )
    with pytest.raises(InvalidInputError, match="lazy modules") as info:
        probe(task, plan_for="1GiB", cache=False)
    assert "nn.Linear(in, out)" in str(info.value)


class _Masked(nn.Module):
    """Keeps only the positive inputs: how much it keeps depends on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * (x > 0)).sum(0, keepdim=True).expand(x.shape[0], 4) + x[x > 0].sum()


def _orthogonal() -> nn.Module:
    """torch checks the weight it parametrizes is orthogonal: it reads values as it builds."""
    return nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(16, 16)), nn.Linear(16, 4))


def _by_value_step(model, batch):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    return loss * 2 if loss.item() > 1 else loss


@pytest.mark.parametrize(
    ("changes", "error", "expected"),
    [
        ({"precision": "fp16"}, InvalidInputError, "precision 'bf16'"),
        ({"model": _Masked}, InvalidInputError, "depends on tensor values (aten.nonzero"),
        ({"step": _by_value_step, "loss": None}, InvalidInputError, "depends on tensor values"),
        ({"model": _orthogonal}, InvalidInputError, "reads tensor values as it builds it"),
    ],
)
def test_what_fake_tensors_cannot_run_is_one_line_with_the_fix(changes, error, expected):
    fields = dict(
        model=lambda: nn.Linear(16, 4),
        train_data=(torch.randn(64, 16), torch.randint(0, 4, (64,))),
        loss=F.cross_entropy,
    )
    with pytest.raises(error, match=re.escape(expected)) as info:
        probe(Task(**{**fields, **changes}), plan_for="1GiB", cache=False)
    assert "memory_budget=" in str(info.value) and "\n" not in str(info.value)


def test_a_plan_smaller_than_the_model_is_refused_like_a_budget():
    with pytest.raises(BatchSizeOneDoesNotFit, match="the model itself does not fit"):
        probe(tagger_task(), plan_for="1KiB", cache=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"plan_for": "lots"},
        {"plan_for": 0},
        {"plan_for": "1GiB", "memory_budget": "1GiB"},
        {"plan_for": "1GiB", "meter": PlanMeter(MiB)},
    ],
)
def test_bad_plan_for_is_refused_up_front(kwargs):
    with pytest.raises(InvalidInputError, match="plan_for"):
        probe(tagger_task(), cache=False, **kwargs)


def test_an_unverified_torch_version_is_refused_with_the_fix():
    check_torch_version("2.13.0+cpu")
    with pytest.raises(InvalidInputError, match="verified on torch 2.13") as info:
        check_torch_version("2.4.1")
    assert "--device cuda" in str(info.value)
    assert PlanMeter(MiB).name == "plan:1.00MiB"


def test_cli_plan_for_says_it_is_a_prediction(capsys):
    assert main(["probe", "digits", "--plan-for", "2MiB", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "would fit" in out and "predicted, not run" in out and "plan:2.00MiB" in out
    rows = [line.split("  ")[0] for line in out.splitlines()]
    assert rows.count("steps") == 1 and "memory model" in rows
    assert "simulated training steps on fake tensors" in out


def test_cli_plan_for_and_memory_budget_together_is_one_line_exit_2(capsys):
    code = main(["probe", "digits", "--plan-for", "2MiB", "--memory-budget", "2MiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--plan-for" in err and "--memory-budget" in err
