"""Transformers: the ``TrainingArguments`` batch sizes, accumulation, learning rate and epochs
that fit and train fastest, measured on the ``Trainer``'s own model, data and optimizer.

``probe_trainer`` runs the Trainer's real training step (its collator, ``compute_loss``,
backward, gradient clipping, the optimizer ``create_optimizer`` builds, mixed precision as the
arguments ask) at each size autobatch's search tries, and separately its evaluation step
(``prediction_step`` under ``no_grad``, with the optimizer state resident, as during
``train()``). ``tune_trainer`` adds an Optuna study over batch size and learning rate, as
``autobatch.tune`` runs it, on fresh models from ``model_init``. Both return a
:class:`TrainerPlan` whose ``apply_to(args)`` gives new ``TrainingArguments``.

Unlike ``auto_find_batch_size``, which halves the batch and restarts training after each OOM,
the probe finds the largest size before training starts, can keep the effective batch size by
raising ``gradient_accumulation_steps``, moves the learning rate with the batch, and sizes the
evaluation batch too.

Example::

    from autobatch.integrations.transformers import probe_trainer

    plan = probe_trainer(trainer, memory_budget="2GiB")  # on a GPU: leave it out
    trainer = Trainer(model_init=model_init, args=plan.apply_to(trainer.args), ...)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainingArguments
except ModuleNotFoundError as _missing:
    if not (_missing.name or "").startswith("transformers"):
        raise
    raise ImportError(
        "autobatch.integrations.transformers needs Transformers; install it with: "
        "pip install 'torch-autobatch[transformers]'"
    ) from None

from autobatch import validation
from autobatch.data import BatchSource, to_device
from autobatch.errors import InvalidInputError
from autobatch.memory import MemoryMeter, TrackedMeter, meter_for
from autobatch.oom import release_if_oom
from autobatch.probing import DEFAULT_HEADROOM, StepReading, find_max_batch_size
from autobatch.records import ProbeResult, TuneResult
from autobatch.snapshot import RngState, TrainingState, state_tensors
from autobatch.training import has_batch_norm
from autobatch.tuning.space import rule_for, scale_lr

__all__ = ["TrainerPlan", "TrainerWorkload", "probe_trainer", "tune_trainer"]

log = logging.getLogger(__name__)

_PROBE: dict[str, validation.Spec] = {
    "memory_budget": validation.Optional(validation.ByteSize()),
    "meter": validation.Optional(validation.METER),
    "headroom": validation.FRACTION,
    "max_batch_size": validation.Optional(validation.Integer(1, example=4096)),
    "keep_effective_batch_size": validation.Flag(),
    "lr_rule": validation.Choice(("auto", "linear", "sqrt", "none")),
}

_TUNE: dict[str, validation.Spec] = {
    "memory_budget": validation.Optional(validation.ByteSize()),
    "headroom": validation.FRACTION,
    "max_batch_size": validation.Optional(validation.Integer(1, example=4096)),
    "n_trials": validation.Optional(validation.Integer(1, example=20)),
    "max_epochs": validation.Real(0, low_open=True, example=3),
    "mlflow": validation.Flag(),
}


@dataclass(frozen=True)
class TrainerPlan:
    """What to change in ``TrainingArguments``, and the measurements behind it.

    ``updates`` maps ``TrainingArguments`` field names to their new values; ``train_probe`` and
    ``eval_probe`` are the searches for the training and evaluation batch (``eval_probe`` is
    None without an eval dataset, ``train_probe`` None where nothing was probed); ``tune``
    is the study's result for :func:`tune_trainer`. ``notes`` says what was left as it was.
    """

    updates: dict[str, Any]
    train_probe: ProbeResult | None
    eval_probe: ProbeResult | None = None
    tune: TuneResult | None = None
    notes: tuple[str, ...] = ()

    def apply_to(self, args: TrainingArguments) -> TrainingArguments:
        """New arguments with the updates; ``args`` is left as it was.

        Build a new ``Trainer`` with them: a Trainer reads the batch size and gradient
        accumulation when it is built, so assigning ``trainer.args`` would not change them.
        """
        return dataclasses.replace(args, **self.updates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "updates": dict(self.updates),
            "train_probe": None if self.train_probe is None else self.train_probe.to_dict(),
            "eval_probe": None if self.eval_probe is None else self.eval_probe.to_dict(),
            "tune": None if self.tune is None else self.tune.to_dict(),
            "notes": list(self.notes),
        }


def probe_trainer(
    trainer: Trainer,
    *,
    memory_budget: str | int | None = None,
    meter: MemoryMeter | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int | None = None,
    keep_effective_batch_size: bool = False,
    lr_rule: str = "auto",
) -> TrainerPlan:
    """The largest per-device training and evaluation batch sizes that fit on ``args.device``.

    Probes ``trainer.model`` in place (a second copy would take device memory the real run
    does not) and restores its parameters, gradients, train/eval flags, the optimizer's state
    and the random generators afterwards; nothing on the Trainer changes. On the CPU, give
    ``memory_budget`` (e.g. ``"2GiB"``) to plan for an accelerator of that size.

    With ``keep_effective_batch_size`` the per-device batch times ``gradient_accumulation_steps``
    stays what the arguments say: the per-device size is the largest divisor of it that fits
    and the learning rate stays. Otherwise the per-device size is the largest that fits, with
    no accumulation, and the learning rate moves with the batch by ``lr_rule`` ("auto": square
    root for Adam-style optimizers, linear for the rest; "none" keeps it).
    """
    validation.check(_PROBE, locals(), prefix="probe_trainer: ")
    _check_trainer(trainer, "probe_trainer")
    args = trainer.args
    meter = meter or meter_for(args.device, memory_budget)
    prober = _Prober(trainer, meter)
    try:
        train_probe = prober.search(
            prober.train_attempt, prober.train_samples, max_batch_size, headroom, steps=2
        )
        optimizer = prober.optimizer
        eval_probe = None
        if prober.eval_samples is not None:
            prober.prime_optimizer()
            eval_probe = prober.search(
                prober.eval_attempt, prober.eval_samples, max_batch_size, headroom, steps=1
            )
    finally:
        prober.close()
    train_size = _smallest_over_ranks(train_probe.batch_size)
    updates, notes = _batch_updates(args, train_size, keep_effective_batch_size, lr_rule, optimizer)
    if eval_probe is not None:
        updates["per_device_eval_batch_size"] = _smallest_over_ranks(eval_probe.batch_size)
    else:
        notes.append("per_device_eval_batch_size left as it was: the Trainer has no eval_dataset")
    for note in notes:
        log.info("probe_trainer: %s", note)
    return TrainerPlan(updates, train_probe, eval_probe, notes=tuple(notes))


def tune_trainer(
    trainer: Trainer,
    *,
    n_trials: int | None = 20,
    max_epochs: float = 3,
    memory_budget: str | int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int | None = None,
    mlflow: bool = False,
    **tune_options: Any,
) -> TrainerPlan:
    """Batch size, learning rate and epochs from an autobatch study on fresh ``model_init``
    models, with the evaluation batch size from a probe.

    The training step is the Trainer's ``compute_loss`` with the optimizer its arguments name
    (weight decay grouped as ``create_optimizer`` groups it); ``args.learning_rate`` is the
    rate known to work at ``per_device_train_batch_size * gradient_accumulation_steps``. The
    batch-size ceiling comes from :func:`probe_trainer` (skipped on the CPU without
    ``memory_budget``: the training set's size bounds it). Trials train with a constant
    learning rate, without the Trainer's schedule. ``tune_options`` go to ``autobatch.tune``
    (``timeout``, ``objective``, ``storage``, ``study_name``, ``tracking_uri``, ``seed``, ...).
    """
    validation.check(_TUNE, locals(), prefix="tune_trainer: ")
    workload = TrainerWorkload(trainer, caller="tune_trainer")
    if trainer.eval_dataset is None:
        raise InvalidInputError(
            "tune_trainer needs a Trainer with an eval_dataset: trials are scored on its loss"
        )
    from autobatch.tuning import tune

    args = trainer.args
    probed: TrainerPlan | None = None
    if memory_budget is not None or args.device.type != "cpu":
        probed = probe_trainer(
            trainer, memory_budget=memory_budget, headroom=headroom, max_batch_size=max_batch_size
        )
    with _off_device(trainer.model, args.device):  # trials build their own models
        result = tune(
            workload,
            n_trials=n_trials,
            max_epochs=max_epochs,
            probe_result=None if probed is None else probed.train_probe,
            max_batch_size=max_batch_size,
            mlflow=mlflow,
            **tune_options,
        )
    updates: dict[str, Any] = {
        "per_device_train_batch_size": result.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": result.lr,
        "num_train_epochs": result.epochs,
    }
    notes = list(result.warnings)
    partial = result.partial_steps()
    if partial is not None:
        # The stop lies in a fractional budget's last, partial epoch: the Trainer takes a
        # fraction of an epoch (and, unlike a step count, whatever number of devices).
        steps, per_epoch = partial
        updates["num_train_epochs"] = steps / per_epoch
        notes.append(
            f"num_train_epochs={updates['num_train_epochs']:.4g}: where the study stopped, "
            f"inside the last partial epoch of the {max_epochs:g}-epoch budget"
        )
    if args.max_steps > 0:
        updates["max_steps"] = -1
        notes.append(f"max_steps={args.max_steps} set to -1, so num_train_epochs decides")
    if probed is not None and "per_device_eval_batch_size" in probed.updates:
        updates["per_device_eval_batch_size"] = probed.updates["per_device_eval_batch_size"]
    else:
        notes.append("per_device_eval_batch_size left as it was: evaluation was not probed")
    for note in notes:
        log.info("tune_trainer: %s", note)
    return TrainerPlan(
        updates,
        None if probed is None else probed.train_probe,
        None if probed is None else probed.eval_probe,
        tune=result,
        notes=tuple(notes),
    )


# -- the probe -----------------------------------------------------------------------------------


class _Prober:
    """The Trainer's training and evaluation steps on ``trainer.model`` at a given batch size,
    with every tensor they change put back after each attempt."""

    def __init__(self, trainer: Trainer, meter: MemoryMeter) -> None:
        self.trainer = trainer
        self.meter = meter
        self.args = trainer.args
        self.model: nn.Module = trainer.model
        self.train_samples = _Samples(trainer, trainer.train_dataset, "training")
        self.eval_samples = (
            None
            if trainer.eval_dataset is None
            else _Samples(trainer, _single_eval_set(trainer.eval_dataset), "evaluation")
        )
        self._given = trainer.optimizer
        self.optimizer = trainer.optimizer or _create_optimizer(trainer)
        # Scale 1, as autobatch's own probe: a step an overflowing scale skips creates no
        # optimizer state, and the measured step would run without it.
        self.scaler = (
            torch.amp.GradScaler(self.args.device.type, init_scale=1.0) if self.args.fp16 else None
        )
        self.state = TrainingState(self.model, self.optimizer)
        self.rng = RngState.capture()
        # The fewest samples a training step takes: batch norm cannot train on one, and every
        # step here runs in training mode (``_train``), whatever mode the model is in now.
        self.smallest = 2 if has_batch_norm(self.model) else 1
        self.loss_only = trainer.compute_metrics is None or self.args.prediction_loss_only
        if isinstance(meter, TrackedMeter):
            meter.track(state_tensors(self.model, [self.optimizer]))

    def search(
        self,
        attempt: Callable[[int], StepReading | None],
        samples: _Samples,
        max_batch_size: int | None,
        headroom: float,
        *,
        steps: int,
    ) -> ProbeResult:
        bound = len(samples) if max_batch_size is None else min(len(samples), max_batch_size)
        return find_max_batch_size(
            attempt,
            meter=self.meter,
            max_batch_size=bound,
            headroom=headroom,
            min_batch_size=self.smallest,
            steps_per_call=steps,
        )

    def restore(self) -> None:
        self.state.restore()
        self.rng.restore()

    def close(self) -> None:
        self.restore()
        self.trainer.optimizer = self._given
        self.meter.release(full=True)

    def train_attempt(self, batch_size: int) -> StepReading | None:
        """Two training steps: the first creates the optimizer state, the second is read
        phase by phase with that state live."""
        meter = self.meter
        batch = None
        try:
            batch = self.train_samples.batch(batch_size)
            self._train(batch)
            first_peak = meter.peak()
            if first_peak is None:  # the device cannot tell peaks: the search goes by OOMs
                self._train(batch)
                return None
            meter.reset_peak()
            base = meter.current()
            readings: list[int] = []
            self._train(batch, readings)
            after_forward, scaling = readings
            return StepReading(scaling, base, max(after_forward - base, 0), peak_bytes=first_peak)
        except BaseException as exc:
            release_if_oom(exc)
            raise
        finally:
            del batch
            self.restore()

    def prime_optimizer(self) -> None:
        """One training step at the smallest size the training search tries (two samples for
        batch norm), kept: evaluation during ``train()`` runs with the optimizer state
        resident, so its probe must count it."""
        with self.meter:
            batch = self.train_samples.batch(self.smallest)
            self._train(batch)
            del batch
        self.meter.release()

    def eval_attempt(self, batch_size: int) -> None:
        """One evaluation step as ``evaluate()`` runs it: eval mode, ``no_grad``, the loss and,
        where ``compute_metrics`` wants them, the logits."""
        batch = outputs = None
        model = self.model
        try:
            batch = self.eval_samples.batch(batch_size)
            model.eval()
            with torch.no_grad(), self._autocast():
                outputs = self.trainer.prediction_step(
                    model, batch, prediction_loss_only=self.loss_only
                )
        except BaseException as exc:
            release_if_oom(exc)
            raise
        finally:
            del batch, outputs
            model.train()
            self.rng.restore()

    def _train(self, batch: dict[str, Any], readings: list[int] | None = None) -> None:
        """One optimizer update as the Trainer runs it, without accumulation."""
        trainer, meter, optimizer, scaler = self.trainer, self.meter, self.optimizer, self.scaler
        self.model.train()
        with self._autocast(), trainer.compute_loss_context_manager():
            # A copy: with label smoothing compute_loss pops the labels from the dict it gets,
            # and the probe steps twice on one batch.
            loss = trainer.compute_loss(self.model, dict(batch))
        if readings is not None:
            readings.append(meter.current())
        (loss if scaler is None else scaler.scale(loss)).backward()
        if readings is not None:
            readings.append(meter.peak() or 0)
        del loss
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision as ``train()`` applies it: through the Trainer's accelerator."""
        return self.trainer.accelerator.autocast()


class _Samples:
    """The first samples of one of the Trainer's datasets, collated as its dataloaders collate
    them (unused columns removed) and moved to its device."""

    def __init__(self, trainer: Trainer, dataset: Any, description: str) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise InvalidInputError(
                f"the {description} dataset is a {type(dataset).__name__} without __len__ and "
                "__getitem__; the probe needs a map-style dataset to form batches of each size"
            )
        if len(dataset) == 0:
            raise InvalidInputError(f"the {description} dataset is empty; give it samples")
        collate = trainer.data_collator
        if type(dataset).__module__.startswith("datasets") and hasattr(
            trainer, "_remove_unused_columns"
        ):
            dataset = trainer._remove_unused_columns(dataset, description=description)
        elif hasattr(trainer, "_get_collator_with_removed_columns"):
            collate = trainer._get_collator_with_removed_columns(collate, description=description)
        self.dataset = dataset
        self.collate = collate
        self.device = trainer.args.device

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, n: int) -> dict[str, Any]:
        return to_device(self.collate([self.dataset[i] for i in range(n)]), self.device)


# -- the workload --------------------------------------------------------------------------------


class TrainerWorkload:
    """A ``Trainer``'s training as an :class:`autobatch.Workload`, so ``autobatch.probe`` and
    ``autobatch.tune`` take it as they take a ``Task``.

    Fresh models come from ``model_init``; the optimizer is the one the arguments name, with
    weight decay grouped as ``create_optimizer`` groups it; a batch's loss is
    ``compute_loss``'s; the training and evaluation sets are collated as the Trainer's own
    dataloaders collate them (unused columns removed); gradients are clipped at
    ``args.max_grad_norm``. ``lr`` is ``args.learning_rate``, known to work at
    ``per_device_train_batch_size * gradient_accumulation_steps``.
    """

    def __init__(self, trainer: Trainer, *, caller: str = "TrainerWorkload") -> None:
        _check_trainer(trainer, caller)
        if trainer.model_init is None:
            raise InvalidInputError(
                f"{caller} needs a Trainer built with model_init=... (each trial trains a fresh "
                "model, as Trainer.hyperparameter_search requires), not with model=..."
            )
        args = trainer.args
        self.trainer = trainer
        self.name = type(trainer.model).__name__
        self.device = args.device
        self.precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        self.lr = float(args.learning_rate)
        self.batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.seed = args.seed
        # The Trainer clips at 1.0 unless told otherwise: trials clip as it does.
        clip = args.max_grad_norm
        self.max_grad_norm = float(clip) if clip is not None and clip > 0 else None
        self._train = _Samples(trainer, trainer.train_dataset, "training")
        self._val = (
            None
            if trainer.eval_dataset is None
            else _Samples(trainer, _single_eval_set(trainer.eval_dataset), "evaluation")
        )
        self._last: nn.Module | None = None  # the optimizer groups the last model's names

    @property
    def train_size(self) -> int:
        return len(self._train)

    def model(self) -> nn.Module:
        self._last = self.trainer.call_model_init()
        return self._last

    def optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        trainer, args = self.trainer, self.trainer.args
        params = [p for p in params if p.requires_grad]
        given = getattr(trainer, "optimizer_cls_and_kwargs", None)
        cls, kwargs = given or trainer.get_optimizer_cls_and_kwargs(args, self._last)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or any(
            key in kwargs for key in ("params", "model", "optimizer_dict")
        ):
            raise InvalidInputError(
                f"TrainerWorkload: optim={str(args.optim)!r} builds its optimizer from the model, "
                "which autobatch's trials cannot; use a torch optimizer such as 'adamw_torch'"
            )
        kwargs = {**kwargs, "lr": lr}
        names = {id(p): n for n, p in self._last.named_parameters()} if self._last else {}
        if all(id(p) in names for p in params):
            decay = set(trainer.get_decay_parameter_names(self._last))
            decayed = [p for p in params if names[id(p)] in decay]
            rest = [p for p in params if names[id(p)] not in decay]
            groups = [
                {"params": decayed, "weight_decay": args.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ]
            return cls([g for g in groups if g["params"]], **kwargs)
        return cls(params, weight_decay=args.weight_decay, **kwargs)

    def batch_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with self.trainer.compute_loss_context_manager():
            return self.trainer.compute_loss(model, dict(batch))  # it may pop the labels

    def evaluate(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        return self.batch_loss(model, batch), None

    def training_batches(self) -> BatchSource:
        return BatchSource(self._train.dataset, self.device, self._train.collate)

    def validation_batches(self) -> BatchSource | None:
        if self._val is None:
            return None
        return BatchSource(self._val.dataset, self.device, self._val.collate)


# -- small pieces --------------------------------------------------------------------------------


def _check_trainer(trainer: Any, caller: str) -> None:
    if not isinstance(trainer, Trainer):
        raise InvalidInputError(
            f"{caller} needs a transformers.Trainer; got {type(trainer).__name__}"
        )
    if trainer.train_dataset is None:
        raise InvalidInputError(
            f"{caller} needs a Trainer with a train_dataset: the probe trains on its samples"
        )


def _single_eval_set(dataset: Any) -> Any:
    """The evaluation set; of several (a dict), the one with the longest first sample stands
    for all, since they share the batch size."""
    if isinstance(dataset, dict):
        return max(dataset.values(), key=lambda d: _sample_size(d[0]))
    return dataset


def _sample_size(sample: Any) -> int:
    flat, _ = torch.utils._pytree.tree_flatten(sample)
    return sum(t.numel() for t in flat if isinstance(t, torch.Tensor))


def _create_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The optimizer ``train()`` would create, without leaving it on the Trainer."""
    try:
        return trainer.create_optimizer()
    finally:
        trainer.optimizer = None


def _batch_updates(
    args: TrainingArguments,
    fits: int,
    keep_effective: bool,
    lr_rule: str,
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Any], list[str]]:
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    notes: list[str] = []
    if keep_effective:
        size = max(d for d in range(1, min(effective, fits) + 1) if effective % d == 0)
        if size < min(effective, fits):
            notes.append(
                f"per-device batch {size}, not {min(effective, fits)}: the largest divisor of "
                f"the effective batch {effective} that fits"
            )
        return {
            "per_device_train_batch_size": size,
            "gradient_accumulation_steps": effective // size,
            "learning_rate": args.learning_rate,
        }, notes
    # After train() the Trainer holds Accelerate's AcceleratedOptimizer: the rule is that of
    # the optimizer it wraps. Without a measured gradient noise scale a saturating rule is its
    # plain one.
    inner = getattr(optimizer, "optimizer", optimizer)
    rule = (rule_for(inner) if lr_rule == "auto" else lr_rule).removeprefix("saturating-")
    lr = scale_lr(args.learning_rate, effective, fits, rule)
    if fits != effective:
        notes.append(
            f"learning_rate {args.learning_rate:g} -> {lr:g} for the batch {effective} -> {fits} "
            f"({rule} rule)"
        )
    return {
        "per_device_train_batch_size": fits,
        "gradient_accumulation_steps": 1,
        "learning_rate": lr,
    }, notes


def _smallest_over_ranks(size: int) -> int:
    """The smallest size over the ranks of a distributed run; this rank's alone otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return size
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor(size, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


@contextlib.contextmanager
def _off_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The Trainer's own model in host memory while trials build theirs on the device."""
    if device.type == "cpu":
        yield
        return
    model.to("cpu")
    try:
        yield
    finally:
        model.to(device)
