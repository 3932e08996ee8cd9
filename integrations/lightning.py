"""Lightning: a drop-in for ``BatchSizeFinder`` that sizes the batch with autobatch's probe.

``AutoBatchFinder`` takes ``BatchSizeFinder``'s arguments, and at the start of ``fit`` runs the
module's own training step (its data, ``training_step``, backward, the optimizer that
``configure_optimizers`` gave this trainer) and its validation step at each size autobatch's
search tries. The size it keeps has run; it lands where Lightning's finder writes its own
(the module attribute, ``hparams`` or the datamodule) and fit goes on with it. Unlike
Lightning's finder it also sizes for validation, works under DDP (every rank probes, all take
the smallest), and restores parameters, optimizer state and random generators from host
memory rather than a checkpoint on disk.

With ``tune=True`` the probed size is the ceiling of an autobatch study (``autobatch.tune``):
trials train fresh modules, and fit goes on with the recommended batch size, learning rate and
number of epochs.

Example::

    import lightning.pytorch as pl
    from autobatch.integrations.lightning import AutoBatchFinder

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1,
                         callbacks=[AutoBatchFinder(memory_budget="512MiB")])
    trainer.fit(model)  # model.batch_size is now the largest size that fits 512 MiB

    tuner = AutoBatchFinder(memory_budget="512MiB", tune=True, n_trials=12)
    pl.Trainer(accelerator="cpu", max_epochs=10, callbacks=[tuner]).fit(model)
    print(tuner.tune_result.recommendation())  # what fit trained with
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.states import RunningStage
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
from autobatch.data import BatchSource
from autobatch.errors import AutobatchError, InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.oom import release_if_oom
from autobatch.probing import DEFAULT_HEADROOM, StepReading, find_max_batch_size
from autobatch.records import ProbeResult, TuneResult
from autobatch.snapshot import RngState, TrainingState, state_tensors
from autobatch.task import ModelFactory, OptimizerFactory, Precision
from autobatch.training import has_batch_norm

__all__ = ["AutoBatchFinder", "LightningWorkload"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Factory:
    """A callable that builds a fresh module; a module itself is refused (it is callable too)."""

    def problem(self, value: Any) -> str | None:
        if callable(value) and not isinstance(value, nn.Module):
            return None
        return "must be a function that returns a fresh module, e.g. lambda: MyModule(hidden=64)"

    def invalid(self) -> list[Any]:
        return [3, nn.Linear(1, 1)]


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
    # tuning mode
    "tune": validation.Flag(),
    "model_factory": validation.Optional(_Factory()),
    "n_trials": validation.Integer(1, example=20),
    "tune_max_epochs": validation.Optional(validation.TUNE["max_epochs"]),
    "mlflow": validation.TUNE["mlflow"],
    "tracking_uri": validation.TUNE["tracking_uri"],
    "storage": validation.TUNE["storage"],
    "study_name": validation.TUNE["study_name"],
    "seed": validation.TUNE["seed"],
    "lr_attr_name": validation.Instance(
        (str,), "the learning rate's attribute, e.g. 'lr', or '' to find 'lr' or 'learning_rate'"
    ),
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
    change (counters, caches) are not restored; tensors, torchmetrics metrics' states,
    optimizer state, the train/eval flags and the random generators are.

    Tuning mode (``tune=True``, single process only): after the probe, ``n_trials`` trials of
    an autobatch study (:func:`autobatch.tune`, the probed size as its ceiling) each train a
    fresh module, built by ``model_factory()`` or, when the module saved its hyperparameters,
    ``type(module)(**module.hparams_initial)``, for up to ``tune_max_epochs`` epochs (default:
    the trainer's ``max_epochs``) on the datasets behind the train and validation dataloaders,
    with the loss ``training_step`` returns and the class and defaults of the optimizer
    ``configure_optimizers`` returned (its schedulers are not used in trials). Fit then goes
    on with the recommended batch size, learning rate (written to ``lr_attr_name``: ``lr`` or
    ``learning_rate`` on the module or its hparams, found as Lightning's LR finder finds it;
    ``configure_optimizers`` runs again to use it) and epochs (``trainer.fit_loop.max_epochs``).
    ``tune_result`` holds the :class:`TuneResult`. The study is logged to MLflow unless
    ``mlflow=False`` (at ``tracking_uri``, default ``sqlite:///mlflow.db``); ``storage``,
    ``study_name`` and ``seed`` mean what they mean for ``autobatch.tune``.
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
        tune: bool = False,
        model_factory: Callable[[], pl.LightningModule] | None = None,
        n_trials: int = 20,
        tune_max_epochs: float | None = None,
        mlflow: bool = True,
        tracking_uri: str | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        seed: int = 0,
        lr_attr_name: str = "",
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
        self.tune = tune
        self.model_factory = model_factory
        self.n_trials = n_trials
        self.tune_max_epochs = tune_max_epochs
        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.storage = storage
        self.study_name = study_name
        self.seed = seed
        self.lr_attr_name = lr_attr_name
        self.tune_result: TuneResult | None = None  # the study's recommendation, with tune=True

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
        # Everything trials need is read and checked before the probe, so a setup they cannot
        # run fails before any work.
        plan = _plan_trials(self, trainer, pl_module) if self.tune else None
        if self.scale_batch_size(trainer, pl_module) is not None and plan is not None:
            self._tune(trainer, pl_module, plan)

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

    def _tune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: _TrialPlan) -> None:
        """Run the study under the probed ceiling; fit goes on with its recommendation."""
        from autobatch.tuning.study import tune  # optuna and the tuner: only when tuning

        rng = RngState.capture()  # fit then draws the random numbers it would have drawn
        given = lightning_getattr(pl_module, self.batch_arg_name)
        try:
            with _offloaded(pl_module, trainer.strategy.root_device):
                result = tune(
                    plan.workload,
                    n_trials=self.n_trials,
                    max_epochs=plan.max_epochs,
                    probe_result=self.result,
                    seed=self.seed,
                    storage=self.storage,
                    study_name=self.study_name,
                    mlflow=self.mlflow,
                    tracking_uri=self.tracking_uri,
                )
        except BaseException:
            lightning_setattr(pl_module, self.batch_arg_name, given)
            raise
        finally:
            rng.restore()
        self.tune_result = result
        self.optimal_batch_size = result.batch_size
        lightning_setattr(pl_module, self.batch_arg_name, result.batch_size)
        lightning_setattr(pl_module, plan.lr_attr_name, result.lr)
        if trainer.accumulate_grad_batches != 1:
            log.warning(
                "AutoBatchFinder: fit goes on with accumulate_grad_batches=1 (it was %d): the "
                "recommended batch size is the batch of one optimizer step, as the trials "
                "trained it",
                trainer.accumulate_grad_batches,
            )
            trainer.accumulate_grad_batches = 1
        trainer.strategy.setup_optimizers(trainer)  # configure_optimizers, with the tuned rate
        trainer.fit_loop.max_epochs = result.epochs
        self._stop_inside_the_last_epoch(trainer, result)
        _reload_dataloaders(trainer)
        if trainer.max_steps != -1:
            log.warning(
                "AutoBatchFinder: max_steps=%d still ends fit, perhaps before the %d epochs "
                "recommended",
                trainer.max_steps,
                result.epochs,
            )
        log.info(
            "AutoBatchFinder: fit continues with %s=%d, %s=%.3g, max_epochs=%d",
            self.batch_arg_name,
            result.batch_size,
            plan.lr_attr_name,
            result.lr,
            result.epochs,
        )

    @staticmethod
    def _stop_inside_the_last_epoch(trainer: pl.Trainer, result: Any) -> None:
        """Where the study stopped inside a fractional budget's last, partial epoch, train that
        share of each epoch's batches (``limit_train_batches``: a share per process, so it
        holds on any number of devices), not the whole epochs above it."""
        partial = result.partial_steps()
        if partial is None:
            return
        steps, per_epoch = partial
        whole = result.epochs * per_epoch
        if trainer.limit_train_batches not in (None, 1.0):
            log.warning(
                "AutoBatchFinder: limit_train_batches=%s kept, though the study stopped %.3g "
                "epochs in (%d steps at batch size %d)",
                trainer.limit_train_batches,
                steps / per_epoch,
                steps,
                result.batch_size,
            )
            return
        # Half a batch over, so Lightning's rounding down lands on the steps themselves.
        trainer.limit_train_batches = min(1.0, (steps + 0.5) / whole)
        log.info(
            "AutoBatchFinder: limit_train_batches=%.4g: the study stopped %.3g epochs in",
            trainer.limit_train_batches,
            steps / per_epoch,
        )

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult:
        meter = self.make_meter(trainer, pl_module)
        optimizers = list(trainer.strategy.optimizers)
        bound = _dataset_length(trainer.fit_loop._data_source.dataloader())
        if self.max_val is not None:
            bound = self.max_val if bound is None else min(bound, self.max_val)
        smallest = self.init_val or (2 if has_batch_norm(pl_module) else 1)
        if bound is not None and smallest > bound:
            raise InvalidInputError(
                f"AutoBatchFinder: init_val={smallest} is above the largest size allowed "
                f"({bound}: max_val and the training set's length); lower init_val"
            )
        if isinstance(meter, TrackedMeter):
            meter.track(state_tensors(pl_module, optimizers))
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
            release_if_oom(exc)
            raise
        finally:
            del batches
            self.restore()

    def _batches(self) -> list[Any]:
        """The first training batch, then the first batch of each validation dataloader."""
        fit_loop = self.trainer.fit_loop
        train = CombinedLoader(fit_loop._data_source.dataloader(), "max_size_cycle")
        batches = [self._to_device(next(iter(train))[0], 0, RunningStage.TRAINING)]
        if self.validates:
            source = fit_loop.epoch_loop.val_loop._data_source
            loaders = CombinedLoader(source.dataloader(), "sequential").flattened
            batches += [
                self._to_device(next(iter(dl)), i, RunningStage.VALIDATING)
                for i, dl in enumerate(loaders)
            ]
        return batches

    def _to_device(self, batch: Any, dataloader_idx: int, stage: RunningStage) -> Any:
        batch = _moved(self.trainer, batch, dataloader_idx, stage)
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


# -- tuning mode ------------------------------------------------------------------------------

#: Trainer precisions a trial can reproduce, as ``Task.precision`` names them.
_PRECISIONS: dict[str, Precision] = {
    "32-true": "fp32",
    "32": "fp32",
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
}


@dataclass
class LightningWorkload:
    """A LightningModule's training as an :class:`autobatch.Workload`, for
    ``autobatch.probe``/``autobatch.tune`` (``AutoBatchFinder(tune=True)`` builds one).

    ``module_factory`` builds a fresh module (its ``self.log`` dropped: there is no fit loop
    to log to; its ``configure_model()`` called, as fit calls it);
    ``optimizer_factory(params, lr)`` its optimizer. A batch's loss is what ``training_step``
    returns, on validation batches too (``validation_step`` usually logs rather than
    returns). The datasets are map-style (those behind the module's dataloaders),
    each batched with its own ``collate_fn``, then moved to ``device`` by ``train_transfer``
    and ``val_transfer`` where given (``AutoBatchFinder`` gives fit's own path: the precision's
    ``convert_input`` and the batch-transfer hooks), else as they are.
    """

    module_factory: ModelFactory
    optimizer_factory: OptimizerFactory
    train_dataset: Any
    val_dataset: Any
    lr: float
    batch_size: int
    device: torch.device
    precision: Precision = "fp32"
    seed: int = 0
    name: str = "lightning"
    train_collate: Callable[[list[Any]], Any] | None = None
    val_collate: Callable[[list[Any]], Any] | None = None
    max_grad_norm: float | None = None  # the trainer's gradient_clip_val, clipping by norm
    train_transfer: Callable[[Any], Any] | None = None  # a collated batch to one on the device
    val_transfer: Callable[[Any], Any] | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_dataset)

    def model(self) -> nn.Module:
        fresh = self.module_factory()
        if isinstance(fresh, pl.LightningModule):
            fresh.log = _drop  # type: ignore[method-assign]
            fresh.log_dict = _drop  # type: ignore[method-assign]
            _configure(fresh)
        return fresh

    def optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return self.optimizer_factory(params, lr)

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return _training_loss(model, batch)

    def evaluate(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, None]:
        return self.batch_loss(model, batch), None

    def training_batches(self) -> BatchSource:
        return _batches(self.train_dataset, self.device, self.train_collate, self.train_transfer)

    def validation_batches(self) -> BatchSource | None:
        if self.val_dataset is None:
            return None
        return _batches(self.val_dataset, self.device, self.val_collate, self.val_transfer)


def _batches(
    data: Any,
    device: torch.device,
    collate: Callable[[list[Any]], Any] | None,
    transfer: Callable[[Any], Any] | None,
) -> BatchSource:
    if transfer is None:
        return BatchSource(data, device, collate)
    return _TransferredBatches(data, collate, transfer)


class _TransferredBatches(BatchSource):
    """Batches collated on the host, then handed to ``transfer``, which moves them to the
    device (fit's hooks may change them on the way: a uint8 image made float)."""

    def __init__(
        self,
        data: Any,
        collate: Callable[[list[Any]], Any] | None,
        transfer: Callable[[Any], Any],
    ) -> None:
        super().__init__(data, torch.device("cpu"), collate)
        self.transfer = transfer

    def first(self, n: int) -> Any:
        return self.transfer(super().first(n))

    def largest(self, n: int) -> Any:
        if not self.varies():
            return self.first(n)  # BatchSource.largest would go through first: moved once
        return self.transfer(super().largest(n))

    def epoch(
        self,
        batch_size: int,
        generator: torch.Generator,
        *,
        shuffle: bool = True,
        drop_single: bool = False,
    ) -> Iterator[Any]:
        batches = super().epoch(batch_size, generator, shuffle=shuffle, drop_single=drop_single)
        return (self.transfer(batch) for batch in batches)


@dataclass(frozen=True)
class _TrialPlan:
    """What the trials run, read from the trainer and module before the probe."""

    workload: LightningWorkload
    lr_attr_name: str
    max_epochs: float


def _plan_trials(
    finder: AutoBatchFinder, trainer: pl.Trainer, module: pl.LightningModule
) -> _TrialPlan:
    """The task the study trains, or one InvalidInputError saying what trials cannot run."""
    if trainer.world_size > 1:
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True runs its trials in one process, not under "
            f"{type(trainer.strategy).__name__} with {trainer.world_size} processes; tune with "
            "devices=1 and pass the recommended values to the distributed run"
        )
    if trainer.ckpt_path is not None:
        # Lightning restores the checkpoint's optimizer state (its learning rate) and loops
        # (its epoch) after on_fit_start, over what the study chose.
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True chooses the batch size, learning rate and epochs of a "
            f"training from its start, but fit resumes from {trainer.ckpt_path}, whose "
            "optimizer state and epoch would replace them; tune before the first fit, or drop "
            "ckpt_path"
        )
    if not module.automatic_optimization:
        raise InvalidInputError(
            "AutoBatchFinder: tune=True needs automatic optimization (trials run backward and "
            "the optimizer themselves); this module sets automatic_optimization = False"
        )
    optimizers = trainer.strategy.optimizers
    if len(optimizers) != 1:
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True trains trials with one optimizer; "
            f"configure_optimizers() returned {len(optimizers)}"
        )
    lr_attr = _lr_attr_name(module, finder.lr_attr_name)
    base_lr = lightning_getattr(module, lr_attr)
    if validation.TASK["lr"].problem(base_lr) is not None:
        raise InvalidInputError(
            f"AutoBatchFinder: {lr_attr}={base_lr!r} is not a learning rate; trials scale the "
            "rate the module trains with, so it must be a positive number, e.g. 1e-3"
        )
    optimizer = optimizers[0]
    built_lr = float(optimizer.defaults["lr"])
    if not math.isclose(built_lr, float(base_lr), rel_tol=1e-6):
        raise InvalidInputError(
            f"AutoBatchFinder: configure_optimizers() built {type(optimizer).__name__} with "
            f"lr={built_lr:g}, but {lr_attr}={base_lr:g}; build it with the {lr_attr!r} "
            "attribute, so the tuned rate reaches fit"
        )
    if trainer.strategy.lr_scheduler_configs:
        log.info(
            "AutoBatchFinder: trials train at a constant learning rate, without the "
            "schedulers of configure_optimizers(); fit uses them, at the tuned rate"
        )
    clip = trainer.gradient_clip_val or None
    if clip is not None and (trainer.gradient_clip_algorithm or "norm") != "norm":
        log.warning(
            "AutoBatchFinder: trials clip gradients by norm only, so they train without "
            "clipping; fit clips at gradient_clip_val=%g by value, at the tuned rate",
            clip,
        )
        clip = None
    if len(optimizer.param_groups) > 1:
        log.info(
            "AutoBatchFinder: trials put every parameter in one group with %s's defaults; "
            "fit keeps the module's %d groups",
            type(optimizer).__name__,
            len(optimizer.param_groups),
        )
    precision = _PRECISIONS.get(str(trainer.precision))
    if precision is None:
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True cannot train trials in precision={trainer.precision!r}; "
            f"use one of {', '.join(repr(p) for p in _PRECISIONS)}"
        )
    max_epochs = finder.tune_max_epochs or trainer.max_epochs
    if max_epochs is None or max_epochs <= 0:
        raise InvalidInputError(
            "AutoBatchFinder: tune=True needs the most epochs a trial trains: give "
            "tune_max_epochs (the trainer's max_epochs is unbounded)"
        )
    train, collate = _dataset_of(trainer.fit_loop._data_source, "train_dataloader")
    val_source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if not val_source.is_defined():
        raise InvalidInputError(
            "AutoBatchFinder: tune=True scores trials on validation loss; give the module or "
            "datamodule a val_dataloader()"
        )
    val, val_collate = _dataset_of(val_source, "val_dataloader")
    workload = LightningWorkload(
        module_factory=_model_factory(finder.model_factory, module),
        optimizer_factory=_optimizer_factory(optimizer),
        train_dataset=train,
        val_dataset=val,
        lr=float(base_lr),
        # The rate was set for the batch one optimizer step sees: with gradient accumulation,
        # the module's batch times accumulate_grad_batches. Trials train without accumulation,
        # and fit goes on without it (AutoBatchFinder._tune).
        batch_size=lightning_getattr(module, finder.batch_arg_name)
        * trainer.accumulate_grad_batches,
        device=trainer.strategy.root_device,
        precision=precision,
        seed=finder.seed,
        name=type(module).__name__,
        train_collate=collate,
        val_collate=val_collate,
        max_grad_norm=None if clip is None else float(clip),
        train_transfer=lambda batch: _moved(trainer, batch, 0, RunningStage.TRAINING),
        val_transfer=lambda batch: _moved(trainer, batch, 0, RunningStage.VALIDATING),
    )
    return _TrialPlan(workload, lr_attr, float(max_epochs))


def _lr_attr_name(module: pl.LightningModule, given: str) -> str:
    """The learning rate's attribute, found as ``lightning.pytorch.tuner.lr_finder`` finds it."""
    if given:
        if not lightning_hasattr(module, given):
            raise InvalidInputError(
                f"AutoBatchFinder: lr_attr_name={given!r} is neither an attribute of the model "
                "nor in its hparams; add it there, or pass the name it has"
            )
        return given
    for name in ("lr", "learning_rate"):
        if lightning_hasattr(module, name):
            return name
    raise InvalidInputError(
        "AutoBatchFinder: tune=True sets the learning rate, but the model has neither 'lr' nor "
        "'learning_rate' (as an attribute or in hparams); add one and build the optimizer with "
        "it, or pass lr_attr_name"
    )


def _model_factory(
    given: Callable[[], pl.LightningModule] | None, module: pl.LightningModule
) -> ModelFactory:
    """A factory of fresh modules: ``model_factory``, or the module's class on its saved
    hyperparameters."""
    hparams = module.hparams_initial
    if given is None and not hparams:
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True trains fresh modules, but {type(module).__name__} "
            "saved no hyperparameters; call self.save_hyperparameters() in __init__, or pass "
            "model_factory=lambda: MyModule(...)"
        )
    cls = type(module)
    if given is None and (problem := _unbound(cls, hparams)):
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True trains fresh modules as {cls.__name__}(**hparams), but "
            f"{problem}; pass model_factory=lambda: {cls.__name__}(...) that builds one"
        )

    def build() -> nn.Module:
        return given() if given is not None else cls(**copy.deepcopy(hparams))

    return build


def _unbound(cls: type, hparams: Mapping[str, Any]) -> str | None:
    """Why ``cls(**hparams)`` cannot be called, read from its signature; None where it can.
    ``save_hyperparameters(ignore=[...])`` leaves out arguments (a backbone module) that the
    constructor may require."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return None
    try:
        signature.bind(**hparams)
    except TypeError as exc:
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = signature.parameters
        missing = [
            name
            for name, p in params.items()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and not (p.kind in named and name in hparams)
        ]
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [
            key
            for key in hparams
            if not open_ended and not (key in params and params[key].kind in named)
        ]
        problems = []
        if missing:
            problems.append(
                f"{cls.__name__}.__init__ requires {', '.join(missing)}, which the saved "
                "hyperparameters lack (left out by save_hyperparameters(ignore=...)?)"
            )
        if unknown:
            problems.append(
                f"{cls.__name__}.__init__ takes no {', '.join(unknown)}, which the saved "
                "hyperparameters hold"
            )
        return " and ".join(problems) or f"{cls.__name__}(**hparams) fails: {exc}"
    return None


def _configure(module: pl.LightningModule) -> None:
    """Build the layers a module defers to ``configure_model`` (and the legacy
    ``configure_sharded_model``), as fit does before ``on_fit_start``: a fresh module has no
    parameters there yet. Lightning asks the hook to be idempotent, so a module's own call is
    harmless too. Built on the host; the trial moves the module to its device."""
    for hook in ("configure_sharded_model", "configure_model"):
        if is_overridden(hook, module):
            getattr(module, hook)()


def _optimizer_factory(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
    """``factory(params, lr)``: the optimizer's class with its defaults, at another rate."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    # Some defaults are set by the class, not taken (AdamW's decoupled_weight_decay).
    settings = {
        key: value
        for key, value in optimizer.defaults.items()
        if key != "lr" and (open_ended or key in accepted)
    }

    def build(params: Any, lr: float) -> torch.optim.Optimizer:
        return cls(params, lr=lr, **settings)

    return build


def _dataset_of(source: Any, hook: str) -> tuple[Any, Callable[[list[Any]], Any] | None]:
    """The map-style dataset behind the one dataloader ``hook`` returns, and its collate_fn."""
    loaders = CombinedLoader(source.dataloader()).flattened
    if len(loaders) != 1:
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True trains trials on one dataset; {hook}() returned "
            f"{len(loaders)} dataloaders"
        )
    dataset = getattr(loaders[0], "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise InvalidInputError(
            f"AutoBatchFinder: tune=True draws trial batches by index; the dataset behind "
            f"{hook}() is a {type(dataset).__name__}, not a map-style Dataset"
        )
    return dataset, getattr(loaders[0], "collate_fn", None)


def _training_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A trial's step: the loss ``training_step`` returns."""
    loss = _loss_of(model.training_step(batch, 0))
    if loss is None:
        raise InvalidInputError(
            "AutoBatchFinder: training_step returned no loss; tune=True needs it to return the "
            "loss (or a dict with 'loss')"
        )
    return loss


@contextmanager
def _offloaded(module: nn.Module, device: torch.device) -> Iterator[None]:
    """The fitted module on the host while trials use the accelerator, whose ceiling was
    probed with one model on it; parameters keep their identity (``Module.to`` moves data)."""
    if device.type == "cpu":
        yield
        return
    module.to("cpu")
    try:
        yield
    finally:
        module.to(device)


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


def _moved(trainer: pl.Trainer, batch: Any, dataloader_idx: int, stage: RunningStage) -> Any:
    """A batch from a dataloader moved as fit's loops move it: the precision's
    ``convert_input``, then ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer`` (the datamodule's where it overrides them, else the module's),
    with the trainer in the stage the loop would be in, for hooks that read
    ``self.trainer.training``."""
    saved = trainer.state.stage
    trainer.state.stage = stage
    try:
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
    finally:
        trainer.state.stage = saved


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return (t for t in flat if isinstance(t, torch.Tensor))


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
