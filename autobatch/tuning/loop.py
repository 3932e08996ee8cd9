"""One trial's training: the workload's real step in a tight loop, evaluated at fixed sample counts.

No per-step host synchronisation: the training loss is summed on the device and read once per
evaluation, and the clock is read only there (after a device sync), so evaluation time is
excluded from training time. Given the study's clock (``prior.StepClock``), training
time is counted on it, step by step; the wall clock's is kept beside it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autobatch.data import BatchSource, batch_length, epoch_samples, non_finite, steps_per_epoch
from autobatch.memory import MemoryMeter
from autobatch.records import EvalPoint
from autobatch.training import TrainStep, autocast, build, needs_two_samples, seeded
from autobatch.tuning.curves import smooth
from autobatch.workload import Workload


class TrialFailed(Exception):
    """The trial cannot go on (a non-finite loss); the study records why and continues."""


class StopTrial(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an evaluation callback to end training early (pruned, or nothing to gain)."""


@dataclass
class TrialRun:
    """What one training run produced."""

    points: list[EvalPoint] = field(default_factory=list)
    train_seconds: float = 0.0  # on the study's clock, where one was given
    wall_seconds: float = 0.0
    samples: int = 0
    epoch_seconds: float | None = None
    iterations_per_epoch: int | None = None  # optimizer steps per epoch, as trained


def evaluation_interval(train_size: int) -> int:
    """Samples between evaluations: twice per epoch on small data, four times on large."""
    per_epoch = 2 if train_size < 10_000 else 4
    return max(1, math.ceil(train_size / per_epoch))


@torch.no_grad()
def evaluate(workload: Workload, model: torch.nn.Module, val: BatchSource, batch_size: int):
    """Mean validation loss, and accuracy where the workload measures it."""
    model.eval()
    total = torch.zeros((), device=workload.device)
    correct = torch.zeros((), device=workload.device)
    count = 0
    accuracy = True
    for batch in val.epoch(batch_size, torch.Generator(), shuffle=False):
        n = batch_length(batch)
        with autocast(workload):
            loss, right = workload.evaluate(model, batch)
        total += loss.float().reshape(()) * n  # one element, as TrainStep checks
        if right is None:
            accuracy = False
        else:
            correct += right
        count += n
    model.train()
    return (total / count).item(), ((correct / count).item() if accuracy else None)


def train(
    workload: Workload,
    train_data: BatchSource,
    val_data: BatchSource,
    *,
    batch_size: int,
    lr: float,
    max_epochs: float,
    eval_batch_size: int,
    on_eval: Callable[[EvalPoint], None],
    meter: MemoryMeter | None = None,
    noise: Callable[[torch.nn.Module, torch.optim.Optimizer], float | None] | None = None,
    configure: Callable[[torch.optim.Optimizer], None] | None = None,
    clock: Callable[[int], float] | None = None,
) -> TrialRun:
    """Train a fresh model for up to ``max_epochs``; ``on_eval`` sees every evaluation and may
    raise ``StopTrial``. A non-finite loss raises ``TrialFailed``. ``noise`` (a
    :class:`~autobatch.tuning.noise_probe.NoiseProbe`) reads the gradient noise scale at each
    evaluation, off the training clock. ``configure`` adjusts the optimizer before the first
    step (AdamW's scaled ``beta2`` and weight decay). ``clock`` gives the seconds a step of
    so many samples counts for (:meth:`~autobatch.tuning.prior.StepClock.for_batch_size`);
    without one, training time is the wall clock's.

    The run draws its random numbers (dropout, noise layers) from the global generators seeded
    with the workload's seed, and gives the caller's generator states back after: without it,
    a trial and its retrain at the same seed took different dropout masks (a model with
    dropout 0.3 ended 1.025x-1.037x the same loss in three retrains of one configuration).

    A model with batch norm in training mode cannot train on one sample: where an epoch's last
    batch would hold one (``len(train_data) % batch_size == 1``), it is left out, a different
    sample each epoch, and an epoch is the samples trained (:func:`~autobatch.data.epoch_samples`;
    ``TrialRun.iterations_per_epoch`` counts its steps). A batch size of 1 is refused.

    A non-finite training loss is traced to the first step that gave one; where that step's
    batch, drawn again, holds nan or inf, the failure names it."""
    with seeded(workload):
        model, optimizer = build(workload, lr)
        if configure is not None:
            configure(optimizer)
        step = TrainStep(workload, model, optimizer)
        model.train()
        generator = torch.Generator().manual_seed(workload.seed)
        drop = needs_two_samples(model)
        size = epoch_samples(len(train_data), batch_size, drop)
        max_samples = int(max_epochs * size)
        # Evaluated at every epoch's end, where training can stop (a recommendation is in whole
        # epochs), and at even steps within it.
        interval = evaluation_interval(size)
        run = TrialRun(iterations_per_epoch=steps_per_epoch(len(train_data), batch_size, drop))
        # Step losses stay on the device, unreduced: appending costs no kernel launch, and one
        # reduction per evaluation turns them into the mean.
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        loss_samples = 0
        val_losses: list[float] = []
        window_samples, window_seconds = 0, 0.0
        counted = 0.0  # the clock's seconds for the steps since the last evaluation
        sync = meter.synchronize if meter is not None else synchronizer(workload.device)
        if meter is not None:
            meter.reset_peak()
        try:
            while run.samples < max_samples:
                epoch_start = time.perf_counter()
                epoch_train = run.train_seconds
                in_epoch, next_eval, epoch_steps = 0, interval, 0
                epoch_order = generator.get_state()  # to draw a batch again (a nan loss)
                for batch in train_data.epoch(batch_size, generator, drop_single=drop):
                    n = batch_length(batch)
                    epoch_steps += 1
                    losses.append(step(batch))
                    if clock is not None:
                        counted += clock(n)
                    sizes.append(n)
                    loss_samples += n
                    run.samples += n
                    in_epoch += n
                    if in_epoch < min(next_eval, size) and run.samples < max_samples:
                        continue
                    sync()
                    now = time.perf_counter()
                    run.wall_seconds += now - epoch_start
                    run.train_seconds += now - epoch_start if clock is None else counted
                    counted = 0.0
                    window_seconds += now - epoch_start
                    window_samples += loss_samples
                    weights = torch.tensor(sizes, device=workload.device, dtype=torch.float32)
                    train_loss = (
                        (torch.stack(losses).float() * weights).sum() / loss_samples
                    ).item()
                    val_loss, accuracy = evaluate(workload, model, val_data, eval_batch_size)
                    if math.isfinite(train_loss) and not math.isfinite(val_loss):
                        raise TrialFailed(
                            f"the validation loss became {val_loss} after {run.samples} "
                            f"samples while the training loss was {train_loss:.4g}: the model "
                            "diverged, or val_data holds nan or inf values"
                        )
                    if not math.isfinite(train_loss):
                        # Evaluations are the only reads: the first step whose loss was not
                        # finite (none where only the sum overflowed), and its batch drawn again.
                        finite = torch.isfinite(torch.stack(losses).float()).tolist()
                        bad = finite.index(False) if False in finite else None
                        index = epoch_steps - len(finite) + (bad or 0)
                        found = bad is not None and _non_finite_batch(
                            train_data, batch_size, epoch_order, drop, index
                        )
                        if found:
                            first = run.samples - loss_samples + sum(sizes[:bad]) + 1
                            raise TrialFailed(
                                f"the training batch at samples {first}-{first + sizes[bad] - 1} "
                                f"(epoch {(first - 1) // size + 1}) contains {found}, so the loss "
                                f"became {train_loss}: remove or impute the nan and inf values in "
                                "train_data"
                            )
                    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                        raise TrialFailed(
                            f"loss became {'nan' if math.isnan(val_loss) else 'inf'} after "
                            f"{run.samples} samples (train loss {train_loss}, val loss {val_loss})"
                        )
                    val_losses.append(val_loss)
                    point = EvalPoint(
                        samples=run.samples,
                        seconds=run.train_seconds,
                        epoch=run.samples / size,
                        train_loss=train_loss,
                        val_loss=val_loss,
                        val_loss_smoothed=smooth(val_losses)[-1],
                        val_accuracy=accuracy,
                        samples_per_second=window_samples / max(window_seconds, 1e-9),
                        peak_memory_bytes=meter.peak() if meter is not None else None,
                        timestamp_ms=int(time.time() * 1000),
                        grad_noise_scale=noise(model, optimizer) if noise is not None else None,
                    )
                    run.points.append(point)
                    losses.clear()
                    sizes.clear()
                    loss_samples = 0
                    window_samples, window_seconds = 0, 0.0
                    next_eval = (in_epoch // interval + 1) * interval
                    on_eval(point)
                    if run.samples >= max_samples:
                        break
                    epoch_start = time.perf_counter()
                else:
                    sync()
                    elapsed = time.perf_counter() - epoch_start
                    run.wall_seconds += elapsed
                    run.train_seconds += elapsed if clock is None else counted
                    counted = 0.0
                if run.epoch_seconds is None and run.samples >= size:
                    run.epoch_seconds = run.train_seconds - epoch_train
        except StopTrial:
            pass
        finally:
            del model, optimizer, step
        return run


def _non_finite_batch(
    data: BatchSource, batch_size: int, order: torch.Tensor, drop: bool, index: int
) -> str | None:
    """``"nan"`` or ``"inf"`` where batch ``index`` of the epoch whose generator state was
    ``order`` holds one, drawn again (only after a non-finite loss: no step pays for it)."""
    generator = torch.Generator()
    generator.set_state(order)
    batches = data.epoch(batch_size, generator, drop_single=drop)
    batch = next(itertools.islice(batches, index, None), None)
    return None if batch is None else non_finite(batch)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None
