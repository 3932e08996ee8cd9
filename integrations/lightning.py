"""Lightning: a drop-in for ``BatchSizeFinder`` that sizes the batch with autobatch's probe.

``AutoBatchFinder`` takes ``BatchSizeFinder``'s arguments, and at the start of ``fit`` runs the
module's own training step (its data, ``training_step``, backward, the optimizer that
``configure_optimizers`` gave this trainer) and its validation step at each size autobatch's
search tries. The size it keeps has run; it lands where Lightning's finder writes its own
(the module attribute, ``hparams`` or the datamodule) and fit goes on with it. Unlike
Lightning's finder it also sizes for validation, works under DDP (every rank probes, all take
the smallest), and restores parameters, optimizer state and random generators from host
memory rather than a checkpoint on disk.

Example::

    import lightning.pytorch as pl
    from autobatch.integrations.lightning import AutoBatchFinder

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1,
                         callbacks=[AutoBatchFinder(memory_budget="512MiB")])
    trainer.fit(model)  # model.batch_size is now the largest size that fits 512 MiB
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import CombinedLoader
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.parsing import (
        lightning_getattr,
        lightning_hasattr,
        lightning_setattr,
    )
except ModuleNotFoundError as _missing:
    if not (_missing.name or "").startswith("lightning"):
        raise
    raise ImportError(
        "autobatch.integrations.lightning needs Lightning; install it with: "
        "pip install 'torch-autobatch[lightning]'"
    ) from None

from autobatch import validation
from autobatch.errors import AutobatchError, InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.oom import is_oom_error
from autobatch.probing import DEFAULT_HEADROOM, StepReading, find_max_batch_size
from autobatch.records import ProbeResult
from autobatch.snapshot import RngState, TrainingState

__all__ = ["AutoBatchFinder"]

log = logging.getLogger(__name__)

_PARAMETERS: dict[str, validation.Spec] = {
    "mode": validation.Choice(("power", "binsearch")),
    "steps_per_trial": validation.Integer(1, example=2),
    "init_val": validation.Optional(validation.Integer(1, example=2)),
    "max_trials": validation.Integer(1, example=25),
    "batch_arg_name": validation.Text("batch_size"),
    "margin": validation.Optional(validation.FRACTION),
    "max_val": validation.Optional(validation.Integer(1, example=8192)),
    "memory_budget": validation.Optional(validation.ByteSize()),
    "headroom": validation.Optional(validation.FRACTION),
}


class AutoBatchFinder(Callback):
    """Find the largest batch size whose training and validation steps fit, then fit with it.

    Arguments named as in ``lightning.pytorch.callbacks.BatchSizeFinder`` mean the same:

    - ``batch_arg_name``: the attribute holding the batch size, looked up and written as
      Lightning's finder does (``model``, ``model.hparams``, the datamodule).
    - ``init_val``: the first size tried (default 1, or 2 for a model with batch norm).
    - ``max_val``: the largest size tried (default 8192, None for no bound); the training
      set's length bounds it too, since a larger batch cannot be formed.
    - ``steps_per_trial``: training steps run per size; at least two run, because the first
      creates the optimizer state that later steps carry.
    - ``max_trials``: the most sizes run; the best one that ran is kept.
    - ``margin``: the fraction of memory kept free. Lightning cuts the found size by it, which
      returns a size that never ran; here it is folded into the memory budget, so the size
      returned has run. Same as ``headroom`` (give one of them; default 0.05).
    - ``mode``: accepted for drop-in use and ignored: autobatch's search (two measured sizes fix
      a line of memory against batch size, its prediction is run, then refined) replaces both
      "power" and "binsearch".

    ``memory_budget`` (bytes or a string such as ``"2GiB"``) simulates an accelerator of that
    size on the CPU, where it is required, and caps the memory used on a GPU.

    Under DDP every rank probes with its own memory and all ranks take the smallest size.
    Calls to ``self.log`` during the probe are dropped. Python attributes the module's steps
    change (counters, caches) are not restored; tensors, optimizer state, the train/eval
    flags and the random generators are.
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 2,
        init_val: int | None = None,
        max_trials: int = 25,
        batch_arg_name: str = "batch_size",
        margin: float | None = None,
        max_val: int | None = 8192,
        *,
        memory_budget: str | int | None = None,
        headroom: float | None = None,
    ) -> None:
        if isinstance(mode, str):
            mode = mode.lower()
        validation.check(_PARAMETERS, locals(), prefix="AutoBatchFinder: ")
        if margin is not None and headroom is not None:
            raise InvalidInputError(
                f"AutoBatchFinder: margin={margin!r} and headroom={headroom!r} both set the "
                "fraction of memory kept free; give only one of them"
            )
        self.mode = mode
        self.steps_per_trial = max(steps_per_trial, 2)
        self.init_val = init_val
        self.max_trials = max_trials
        self.batch_arg_name = batch_arg_name
        self.max_val = max_val
        self.memory_budget = memory_budget
        self.headroom = next(h for h in (headroom, margin, DEFAULT_HEADROOM) if h is not None)
        self.optimal_batch_size: int | None = init_val
        self.result: ProbeResult | None = None  # this rank's probe, for inspection

    # -- Lightning hooks ---------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, before any work, what the probe cannot size."""
        if stage != "fit":
            return
        if not trainer.fit_loop._data_source.is_module():
            raise InvalidInputError(
                "AutoBatchFinder cannot resize dataloaders passed directly to fit(); return "
                "them from the LightningModule's or a LightningDataModule's train_dataloader(), "
                f"built with its {self.batch_arg_name!r} attribute"
            )
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise InvalidInputError(
                f"AutoBatchFinder: batch_arg_name={self.batch_arg_name!r} is neither an "
                "attribute of the model, nor in its hparams, nor on the datamodule; add it there "
                "and build the dataloaders with it, or pass the name it has"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scale_batch_size(trainer, pl_module)

    # -- the work ------------------------------------------------------------------------------

    def make_meter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MemoryMeter:
        """The meter of this rank's device; override to supply another (e.g. per rank)."""
        return meter_for(trainer.strategy.root_device, self.memory_budget)

    def scale_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """Probe, agree across ranks, write the size where Lightning reads it, reload data."""
        if trainer.fast_dev_run:
            log.warning("AutoBatchFinder skipped: fast_dev_run is enabled")
            return None
        original = lightning_getattr(pl_module, self.batch_arg_name)
        try:
            self.result = self._probe(trainer, pl_module)
        except BaseException:
            lightning_setattr(pl_module, self.batch_arg_name, original)
            _smallest_over_ranks(trainer, 0)  # tell the other ranks, so none waits forever
            raise
        size = _smallest_over_ranks(trainer, self.result.batch_size)
        if size == 0:
            lightning_setattr(pl_module, self.batch_arg_name, original)
            raise AutobatchError(
                f"AutoBatchFinder: the probe failed on another rank (its error is raised there); "
                f"{self.batch_arg_name} left at {original}"
            )
        if size < self.result.batch_size:
            log.info(
                "rank %d fits %d; all ranks take %d",
                trainer.global_rank,
                self.result.batch_size,
                size,
            )
        self.optimal_batch_size = size
        lightning_setattr(pl_module, self.batch_arg_name, size)
        _reload_dataloaders(trainer)
        log.info("AutoBatchFinder: fit continues with %s=%d", self.batch_arg_name, size)
        return size

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult:
        meter = self.make_meter(trainer, pl_module)
        optimizers = list(trainer.strategy.optimizers)
        bound = _dataset_length(trainer.fit_loop._data_source.dataloader())
        if self.max_val is not None:
            bound = self.max_val if bound is None else min(bound, self.max_val)
        smallest = self.init_val or (2 if _has_batch_norm(pl_module) else 1)
        if bound is not None and smallest > bound:
            raise InvalidInputError(
                f"AutoBatchFinder: init_val={smallest} is above the largest size allowed "
                f"({bound}: max_val and the training set's length); lower init_val"
            )
        if isinstance(meter, TrackedMeter):
            meter.track(_state_tensors(pl_module, optimizers))
        step = _ProbeStep(trainer, pl_module, optimizers, meter, self)
        try:
            with _logging_dropped(pl_module):
                return find_max_batch_size(
                    step,
                    meter=meter,
                    max_batch_size=bound,
                    headroom=self.headroom,
                    min_batch_size=smallest,
                    steps_per_call=self.steps_per_trial,
                    max_attempts=self.max_trials,
                )
        finally:
            step.restore()
            meter.release(full=True)


@dataclass
class _Readings:
    """Memory read between the phases of the last training step of an attempt."""

    base: int = 0
    after_forward: int = 0
    after_backward: int = 0


class _ProbeStep:
    """``step(batch_size)`` for the search: the module's real training and validation steps
    on a real batch of that size, with every tensor they change put back afterwards."""

    def __init__(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        optimizers: list[torch.optim.Optimizer],
        meter: MemoryMeter,
        finder: AutoBatchFinder,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.optimizers = optimizers
        self.meter = meter
        self.finder = finder
        # One snapshot holds the module; further optimizers (manual optimization) get their own.
        first = optimizers[0] if optimizers else None
        self.states = [TrainingState(module, first)]
        self.states += [TrainingState(nn.Module(), opt) for opt in optimizers[1:]]
        self.rng = RngState.capture()
        self.validates = _validates(trainer, module)

    def restore(self) -> None:
        for state in self.states:
            state.restore()
        self.rng.restore()

    def __call__(self, batch_size: int) -> StepReading | None:
        lightning_setattr(self.module, self.finder.batch_arg_name, batch_size)
        batches: list[Any] = []
        try:
            batches = self._batches()
            return self._run(batches[0], batches[1:])
        except BaseException as exc:
            if is_oom_error(exc):
                # Free what the failed step still holds before restoring, which allocates.
                traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            del batches
            self.restore()

    def _batches(self) -> list[Any]:
        """The first training batch, then the first batch of each validation dataloader."""
        fit_loop = self.trainer.fit_loop
        train = CombinedLoader(fit_loop._data_source.dataloader(), "max_size_cycle")
        batches = [self._to_device(next(iter(train))[0], 0)]
        if self.validates:
            source = fit_loop.epoch_loop.val_loop._data_source
            loaders = CombinedLoader(source.dataloader(), "sequential").flattened
            batches += [self._to_device(next(iter(dl)), i) for i, dl in enumerate(loaders)]
        return batches

    def _to_device(self, batch: Any, dataloader_idx: int) -> Any:
        batch = self.trainer.precision_plugin.convert_input(batch)
        batch = self.trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
        if isinstance(self.meter, TrackedMeter):  # made by dataloader workers, off the meter
            self.meter.track(_tensors(batch))
        return batch

    def _run(self, batch: Any, val_batches: list[Any]) -> StepReading | None:
        meter = self.meter
        for _ in range(self.steps_per_trial - 1):
            self._train(batch, None)
        overall = meter.peak()
        if overall is None:  # the device cannot tell peaks: the search goes by OOMs alone
            self._train(batch, None)
            self._validate(val_batches)
            return None
        readings = _Readings()
        meter.reset_peak()
        readings.base = meter.current()
        self._train(batch, readings)
        scaling = readings.after_backward
        activation = readings.after_forward - readings.base
        overall = max(overall, meter.peak() or 0)
        if val_batches:
            meter.reset_peak()
            before = meter.current()
            self._validate(val_batches)
            val_peak = meter.peak() or 0
            scaling = max(scaling, val_peak)
            activation = max(activation, val_peak - before)
            overall = max(overall, val_peak)
        return StepReading(scaling, readings.base, max(activation, 0), peak_bytes=overall)

    @property
    def steps_per_trial(self) -> int:
        return self.finder.steps_per_trial

    def _train(self, batch: Any, readings: _Readings | None) -> None:
        """One training step as Lightning runs it: the closure goes through the optimizer."""
        module, meter = self.module, self.meter
        module.train()
        if not module.automatic_optimization:
            with self.trainer.precision_plugin.train_step_context():
                module.training_step(batch, 0)
            self._zero_grad()
            return

        def closure() -> torch.Tensor | None:
            with self.trainer.precision_plugin.train_step_context():
                loss = _loss_of(module.training_step(batch, 0))
            if readings is not None:
                readings.after_forward = meter.current()
            if loss is None:
                return None
            module.backward(loss)
            if readings is not None:
                readings.after_backward = meter.peak() or 0
            return loss.detach()

        if self.optimizers:
            self.optimizers[0].step(closure)
        else:
            closure()
        self._zero_grad()

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _validate(self, batches: list[Any]) -> None:
        module = self.module
        module.eval()
        with self.trainer.precision_plugin.val_step_context():
            for index, batch in enumerate(batches):
                args = (batch, 0, index) if len(batches) > 1 else (batch, 0)
                module.validation_step(*args)
        module.train()


# -- small pieces ----------------------------------------------------------------------------


def _validates(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether fit will run validation steps, so their memory must fit too."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return (
        is_overridden("validation_step", module)
        and source.is_defined()
        and trainer.limit_val_batches != 0
    )


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in what ``training_step`` returned: a tensor, a mapping with "loss", or None."""
    if isinstance(output, Mapping):
        return output.get("loss")
    return output


def _dataset_length(loaders: Any) -> int | None:
    """The fewest samples among the training dataloaders' datasets; None where unsized."""
    lengths = []
    for loader in CombinedLoader(loaders).flattened:
        try:
            lengths.append(len(loader.dataset))
        except (AttributeError, TypeError, NotImplementedError):
            continue
    return min(lengths) if lengths else None


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return (t for t in flat if isinstance(t, torch.Tensor))


def _state_tensors(
    module: nn.Module, optimizers: list[torch.optim.Optimizer]
) -> list[torch.Tensor]:
    """What the device holds before the probe: parameters, buffers, gradients, optimizer state."""
    tensors = list(module.state_dict(keep_vars=True).values())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _drop(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _logging_dropped(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` needs the fit loop's result collection; the probe's values are not results."""
    originals: dict[str, Callable[..., Any]] = {}
    for name in ("log", "log_dict"):
        if name in vars(module):
            originals[name] = vars(module)[name]
        setattr(module, name, _drop)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            delattr(module, name)
            if name in originals:
                setattr(module, name, originals[name])


def _smallest_over_ranks(trainer: pl.Trainer, size: int) -> int:
    """The smallest of every rank's size (0 where a rank failed); this rank's alone if single."""
    if trainer.world_size == 1:
        return size
    value = torch.tensor(size, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(value, reduce_op="min").item())


def _reload_dataloaders(trainer: pl.Trainer) -> None:
    """Drop the train and val dataloaders, as Lightning's finder does, so the loops rebuild them
    with the new size. They rebuild them on their own (not here, unlike Lightning's finder): a
    dataloader's iterator draws random numbers, and fit must draw the ones it draws without us.
    """
    trainer.fit_loop._combined_loader = None
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
