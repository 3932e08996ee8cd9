"""The gradient noise scale, measured on a model as it trains (see :mod:`.prior` for the
estimator and what it predicts).

The measurement runs at the reference trial's evaluations, off its training clock and without
touching what it trains: the gradients, batch-norm statistics and random generators are put
back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from autobatch.data import BatchSource
from autobatch.training import autocast, forked
from autobatch.tuning.prior import NoiseScale
from autobatch.workload import Workload

#: Small batches whose gradients are averaged into the big one.
CHUNKS = 8


def _preconditioner(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, float]:
    """Adam's scale for every parameter tensor that has one: ``sqrt(mean v_hat) + eps``.

    Adam divides each step by ``sqrt(v_hat) + eps``, so the noise that matters is that of the
    preconditioned gradient (AdaptDL's correction for adaptive optimizers). Per tensor rather
    than per coordinate: a coordinate whose gradient is almost always zero (an input pixel
    that is always blank) has a tiny ``v_hat``, and one reading's gradient there, divided by
    it, would swamp both norms."""
    scales = {}
    for group in optimizer.param_groups:
        _, beta2 = group.get("betas", (None, None))
        eps = group.get("eps", 1e-8)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if beta2 is None or "exp_avg_sq" not in state:
                continue
            step = float(state.get("step", 1))
            correction = 1 - beta2 ** max(step, 1.0)
            scales[p] = math.sqrt(state["exp_avg_sq"].float().mean().item() / correction) + eps
    return scales


class NoiseProbe:
    """Measures the gradient noise scale of a model as it trains, at each evaluation.

    ``batch_size`` samples make the small batch, :data:`CHUNKS` of them the big one (their
    gradients are averaged, so the big batch never needs more memory than the small one). On a
    dataset of fewer than ``CHUNKS`` small batches the chunks run on into the next pass;
    ``two_samples`` (a model with batch norm) keeps every small batch at two samples or more.
    """

    def __init__(
        self,
        workload: Workload,
        data: BatchSource,
        batch_size: int,
        seed: int = 0,
        *,
        two_samples: bool = False,
    ) -> None:
        self.workload = workload
        self.data = data
        smallest = min(2, len(data)) if two_samples else 1
        self.batch_size = max(smallest, min(batch_size, len(data) // CHUNKS))
        self.two_samples = two_samples
        self.chunks = CHUNKS
        self.estimate = NoiseScale(self.batch_size, self.batch_size * self.chunks)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float | None:
        """One reading at the model's current weights; the smoothed noise scale so far."""
        small, big = self.norms(model, optimizer)
        return self.estimate.update(small, big)

    def norms(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[float, float]:
        """Mean squared norm of the chunks' gradients, and squared norm of their mean."""
        params = [p for p in model.parameters() if p.requires_grad]
        scales = _preconditioner(optimizer)
        buffers = [b.detach().clone() for b in model.buffers()]
        total = [torch.zeros_like(p) for p in params]
        small_sum = 0.0
        with forked(self.workload):
            for batch in self._batches():
                for p in params:
                    p.grad = None
                with autocast(self.workload):
                    loss = self.workload.batch_loss(model, batch)
                loss.float().backward()
                norm_sq = torch.zeros((), device=self.workload.device)
                for p, acc in zip(params, total, strict=True):
                    if p.grad is None:
                        continue
                    grad = p.grad.float()
                    if p in scales:
                        grad = grad / scales[p]
                    acc.add_(grad)
                    norm_sq += grad.pow(2).sum()
                small_sum += norm_sq.item()
        for p in params:
            p.grad = None
        with torch.no_grad():
            for live, saved in zip(model.buffers(), buffers, strict=True):
                live.copy_(saved)
        big_sq = sum(acc.div_(self.chunks).pow(2).sum().item() for acc in total)
        return small_sum / self.chunks, big_sq

    def _batches(self) -> Iterator[object]:
        drawn = 0
        while True:
            for batch in self.data.epoch(
                self.batch_size, self.generator, drop_single=self.two_samples
            ):
                yield batch
                drawn += 1
                if drawn == self.chunks:
                    return
