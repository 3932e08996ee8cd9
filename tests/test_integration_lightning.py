"""AutoBatchFinder with the real Lightning: Trainer.fit on the CPU under simulated budgets."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from autobatch.integrations.lightning import AutoBatchFinder, LightningWorkload  # noqa: E402

from autobatch import probe  # noqa: E402
from autobatch.errors import InvalidInputError  # noqa: E402
from autobatch.memory import TrackedMeter  # noqa: E402
from autobatch.probing import budget_for, find_max_batch_size  # noqa: E402
from autobatch.units import parse_bytes  # noqa: E402

FEATURES, CLASSES, SAMPLES = 32, 4, 4096
BUDGET = "6MiB"
HEADROOM = 0.05


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
        warnings.filterwarnings("ignore", message=r".*(num_workers|LeafSpec|does not have many).*")
        yield


def make_data(samples: int = SAMPLES, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return TensorDataset(x, y)


def make_net(hidden: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


class MLP(pl.LightningModule):
    """Batch size as a plain attribute; its own dataloaders."""

    def __init__(self, batch_size: int = 2, validate: bool = False, fail_above: int = 0) -> None:
        super().__init__()
        self.net = make_net()
        self.batch_size = batch_size
        self.data = make_data()
        self.validate = validate
        self.fail_above = fail_above
        self.seen: set[int] = set()  # every size training_step ran at

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.add(len(x))
        if self.fail_above and len(x) > self.fail_above:
            raise ValueError("a bug in training_step")
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class HungryValidation(MLP):
    """Validation runs a much wider layer than training: its memory sets the limit."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(FEATURES, 4096)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.wide(x).relu().sum(dim=1).mean())

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class NoValidation(HungryValidation):
    """The same parameters (wide layer included), no validation step."""

    validation_step = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]


class Stateful(MLP):
    """Batch norm (buffers) and dropout (random numbers): what a probe could leave changed."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 128), nn.BatchNorm1d(128), nn.Dropout(0.5), nn.Linear(128, CLASSES)
        )


class Hyper(pl.LightningModule):
    """Batch size in hparams only (save_hyperparameters), as many templates do."""

    def __init__(self, batch_size: int = 4, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net()
        self.data = make_data()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.net(x), y)}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


class Plain(pl.LightningModule):
    """No batch size of its own: the datamodule holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.data = make_data()

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class BatchSizes(pl.Callback):
    """The sizes fit trains with, after the probe."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch[0]))


def trainer(*callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    settings.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **settings)


# -- an independent check: the same step in plain PyTorch under the same budget ------------------


def plain_step(data: TensorDataset, budget: int):
    """Two AdamW steps of make_net() at a size, as plain PyTorch; meter and step for the core."""
    meter = TrackedMeter(budget)
    net = make_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    meter.track(net.parameters())
    x_all, y_all = data.tensors

    def step(n: int) -> None:
        x, y = x_all[:n].clone(), y_all[:n].clone()
        for _ in range(2):
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()

    return meter, step


def plain_peak(data: TensorDataset, budget: int, n: int) -> int | None:
    """The peak of two plain steps at ``n``; None where they run out of memory."""
    meter, step = plain_step(data, budget)
    meter.reset_peak()
    try:
        with meter:
            step(n)
    except torch.OutOfMemoryError:
        return None
    return meter.peak()


def plain_fits(data: TensorDataset, budget: int, n: int) -> bool:
    """Whether two plain steps at ``n`` keep the headroom free of the memory above what they
    need whatever the batch (their peaks at sizes 1 and 2, taken to an empty batch)."""
    peak = plain_peak(data, budget, n)
    fixed = 2 * plain_peak(data, budget, 1) - plain_peak(data, budget, 2)
    return peak is not None and peak <= budget_for(budget, HEADROOM, fixed)


# -- the tests -----------------------------------------------------------------------------------


def test_size_fits_larger_does_not_and_fit_trains_with_it():
    module, sizes = MLP(), BatchSizes()
    finder = AutoBatchFinder(memory_budget=BUDGET)
    trainer(finder, sizes).fit(module)

    found = finder.optimal_batch_size
    budget = parse_bytes(BUDGET)
    assert module.batch_size == found
    assert sizes.sizes[0] == found  # fit's dataloader was rebuilt with it
    assert plain_fits(module.data, budget, found)
    assert not plain_fits(module.data, budget, math.ceil(found * 1.05))
    meter, step = plain_step(module.data, budget)
    core = find_max_batch_size(step, meter=meter, headroom=HEADROOM, max_batch_size=SAMPLES)
    assert abs(found - core.batch_size) <= 0.03 * core.batch_size
    assert found in [a.batch_size for a in finder.result.attempts if a.fitted]


class Bare(pl.LightningModule):
    """make_net() and its loss, no data of its own (built under the meter, it would count)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # no fit loop: the workload drops it
        return loss


def test_a_lightning_workload_goes_through_the_core_probe():
    """autobatch.probe takes a LightningWorkload as it takes a Task: fresh modules, the loss
    training_step returns. Its size is plain PyTorch's, within the search's tolerance."""
    workload = LightningWorkload(
        module_factory=Bare,
        optimizer_factory=lambda params, lr: torch.optim.AdamW(params, lr=lr),
        train_dataset=make_data(),
        val_dataset=None,
        lr=1e-3,
        batch_size=2,
        device=torch.device("cpu"),
        name="mlp",
    )
    result = probe(workload, memory_budget=BUDGET, headroom=HEADROOM, cache=False)
    data, budget = make_data(), parse_bytes(BUDGET)
    meter, step = plain_step(data, budget)
    plain = find_max_batch_size(step, meter=meter, headroom=HEADROOM, max_batch_size=SAMPLES)
    assert abs(result.batch_size - plain.batch_size) <= 0.03 * plain.batch_size
    assert plain_fits(data, budget, result.batch_size)


def test_datamodule_gets_the_size():
    module, data, sizes = Plain(), Data(batch_size=8), BatchSizes()
    finder = AutoBatchFinder(memory_budget=BUDGET)
    trainer(finder, sizes).fit(module, datamodule=data)

    assert data.batch_size == finder.optimal_batch_size > 8
    assert not hasattr(module, "batch_size")
    assert sizes.sizes[0] == data.batch_size


def test_hparams_get_the_size():
    module, sizes = Hyper(batch_size=4), BatchSizes()
    finder = AutoBatchFinder(memory_budget=BUDGET)
    trainer(finder, sizes).fit(module)

    assert module.hparams.batch_size == finder.optimal_batch_size > 4
    assert not hasattr(module, "batch_size")
    assert sizes.sizes[0] == module.hparams.batch_size


class StateCheck(pl.Callback):
    """Listed after the finder: compares, just before training, with what setup saw."""

    def setup(self, trainer, pl_module, stage):
        self.tensors = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.modes = {name: m.training for name, m in pl_module.named_modules()}
        self.rng = torch.get_rng_state()

    def on_fit_start(self, trainer, pl_module):
        after = pl_module.state_dict()
        self.same_tensors = all(torch.equal(after[k], v) for k, v in self.tensors.items())
        self.same_modes = self.modes == {n: m.training for n, m in pl_module.named_modules()}
        self.same_rng = torch.equal(torch.get_rng_state(), self.rng)
        self.optimizer_state = len(trainer.optimizers[0].state)
        self.grads = [p.grad for p in pl_module.parameters() if p.grad is not None]


def test_probe_leaves_state_as_it_was():
    module, check = Stateful(), StateCheck()
    module.net[2].eval()  # a mixed train/eval state must survive too
    finder = AutoBatchFinder(memory_budget=BUDGET)
    trainer(finder, check, max_steps=1).fit(module)

    assert finder.optimal_batch_size > 2
    assert check.same_tensors  # parameters and batch-norm buffers
    assert check.same_modes
    assert check.same_rng
    assert check.optimizer_state == 0
    assert check.grads == []


class Measured(MLP):
    """Updates torchmetrics metrics in training_step: their states are plain attributes, not
    parameters or buffers."""

    def __init__(self) -> None:
        super().__init__()
        torchmetrics = pytest.importorskip("torchmetrics")
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")
        self.outputs = torchmetrics.CatMetric()  # a list state

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.accuracy.update(logits, y)
        self.outputs.update(logits[:, 0])
        return nn.functional.cross_entropy(logits, y)


class MetricCheck(pl.Callback):
    """Listed after the finder: the metrics' states just before fit trains."""

    def on_fit_start(self, trainer, pl_module):
        self.states = metric_states(pl_module)


def metric_states(module: Measured) -> dict:
    states = {}
    for name in ("accuracy", "outputs"):
        metric = getattr(module, name)
        for attr in metric._defaults:
            value = getattr(metric, attr)
            states[name, attr] = (
                [v.clone() for v in value] if isinstance(value, list) else value.clone()
            )
        states[name, "count"] = metric._update_count
        states[name, "computed"] = metric._computed
    return states


def test_probe_puts_back_torchmetrics_states():
    module, check = Measured(), MetricCheck()
    x, y = module.data.tensors
    module.training_step((x[:5], y[:5]), 0)  # states from before fit: kept, not reset
    before = metric_states(module)
    trainer(AutoBatchFinder(memory_budget=BUDGET), check, max_steps=1).fit(module)
    assert before.keys() == check.states.keys()
    for key, value in before.items():
        after = check.states[key]
        if isinstance(value, list):
            assert len(after) == len(value) and all(map(torch.equal, after, value)), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(after, value), key
        else:
            assert after == value, key


def test_error_in_training_step_propagates_and_size_is_restored():
    module = MLP(batch_size=3, fail_above=16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="a bug in training_step"):
        trainer(AutoBatchFinder(memory_budget=BUDGET)).fit(module)
    assert module.batch_size == 3
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_validation_memory_is_counted():
    with_val, without_val = (
        AutoBatchFinder(memory_budget=BUDGET),
        AutoBatchFinder(memory_budget=BUDGET),
    )
    trainer(with_val).fit(HungryValidation())
    trainer(without_val).fit(NoValidation())

    # The wide validation activation (4096 floats per sample) binds far below training's.
    assert with_val.optimal_batch_size < without_val.optimal_batch_size / 4
    budget = int(parse_bytes(BUDGET) * (1 - HEADROOM))
    assert with_val.optimal_batch_size * 4096 * 4 < budget


def test_margin_and_max_val_bound_the_search_with_tested_sizes():
    loose, tight = (
        AutoBatchFinder(memory_budget=BUDGET),
        AutoBatchFinder(memory_budget=BUDGET, margin=0.3),
    )
    trainer(loose).fit(MLP())
    trainer(tight).fit(MLP())
    assert tight.optimal_batch_size < loose.optimal_batch_size
    assert tight.result.headroom == 0.3
    for finder in (loose, tight):
        assert finder.optimal_batch_size in [a.batch_size for a in finder.result.attempts]

    few, module = AutoBatchFinder(memory_budget=BUDGET, max_trials=2), MLP()
    trainer(few, max_steps=0).fit(module)
    assert len(module.seen) == 2 and few.optimal_batch_size == max(module.seen)

    capped = AutoBatchFinder(memory_budget=BUDGET, max_val=100)
    trainer(capped).fit(MLP())
    assert capped.optimal_batch_size == 100

    small = MLP()
    small.data = make_data(samples=50)
    whole = AutoBatchFinder(memory_budget=BUDGET)
    trainer(whole).fit(small)
    assert whole.optimal_batch_size == 50  # a larger batch cannot be formed


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "linear"}, "mode"),
        ({"steps_per_trial": 0}, "steps_per_trial"),
        ({"init_val": 0}, "init_val"),
        ({"max_trials": 0}, "max_trials"),
        ({"batch_arg_name": ""}, "batch_arg_name"),
        ({"margin": 1.5}, "margin"),
        ({"max_val": -1}, "max_val"),
        ({"memory_budget": "two gigs"}, "memory_budget"),
        ({"headroom": -0.1}, "headroom"),
        ({"margin": 0.1, "headroom": 0.1}, "headroom"),
        ({"tune": "yes"}, "tune"),
        ({"model_factory": nn.Linear(1, 1)}, "model_factory"),
        ({"n_trials": 0}, "n_trials"),
        ({"tune_max_epochs": 0}, "tune_max_epochs"),
        ({"mlflow": 1}, "mlflow"),
        ({"lr_attr_name": None}, "lr_attr_name"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(InvalidInputError, match=name):
        AutoBatchFinder(**kwargs)


def test_misuse_is_reported_before_probing():
    with pytest.raises(InvalidInputError, match="batch_arg_name='bs'"):
        trainer(AutoBatchFinder(batch_arg_name="bs", memory_budget=BUDGET)).fit(MLP())
    loader = DataLoader(make_data(), batch_size=8)
    with pytest.raises(InvalidInputError, match="passed directly to fit"):
        trainer(AutoBatchFinder(memory_budget=BUDGET)).fit(Plain(), train_dataloaders=loader)
    with pytest.raises(InvalidInputError, match="memory_budget"):
        trainer(AutoBatchFinder()).fit(MLP())  # the CPU has no limit of its own


# -- DDP: two processes with different memory ------------------------------------------------------


class RankBudgetFinder(AutoBatchFinder):
    """Each rank simulates a different card: rank 0 the larger, rank 1 the smaller."""

    BUDGETS = ("8MiB", "4MiB")

    def make_meter(self, trainer, pl_module):
        return TrackedMeter(parse_bytes(self.BUDGETS[trainer.global_rank]))


class RankReport(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        finder = next(c for c in trainer.callbacks if isinstance(c, AutoBatchFinder))
        report = {
            "own": finder.result.batch_size,
            "agreed": finder.optimal_batch_size,
            "module": pl_module.batch_size,
            "batch": len(batch[0]),
        }
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(report, handle)


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_smallest_size(tmp_path):
    fit = trainer(
        RankBudgetFinder(),
        RankReport(str(tmp_path)),
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
    )
    fit.fit(MLP())

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    smaller = reports[1]["own"]
    assert reports[0]["own"] > smaller  # the ranks did probe different memory
    for report in reports:
        assert report["agreed"] == report["module"] == report["batch"] == smaller


class HopelessRankFinder(RankBudgetFinder):
    BUDGETS = ("8MiB", "64KiB")  # rank 1 cannot fit a single sample


@pytest.mark.slow
def test_ddp_a_failing_rank_fails_every_rank_without_hanging():
    fit = trainer(HopelessRankFinder(), devices=2, strategy="ddp_spawn", max_steps=1)
    with pytest.raises(Exception, match="BatchSizeOneDoesNotFit|another rank"):
        fit.fit(MLP())


# -- tuning mode: trials with fresh modules, fit with the recommendation -------------------------


def make_learnable(samples: int, seed: int = 0) -> TensorDataset:
    """Classes a linear rule assigns, a third of them then redrawn: trials learn, and reach
    the noise floor in more or less time."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    rule = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(99))
    y = (x @ rule).argmax(dim=1)
    noisy = torch.rand(samples, generator=generator) < 1 / 3
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=generator)
    return TensorDataset(x, y)


class Tunable(pl.LightningModule):
    """Saves its hyperparameters, so trials can build fresh copies; validates on held-out data."""

    def __init__(self, batch_size: int = 8, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(hidden=64)
        self.train_data, self.val_data = make_learnable(1024), make_learnable(256, seed=1)
        self.seen_sizes: set[int] = set()  # every size training_step ran at

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_sizes.add(len(x))
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.hparams.batch_size)


class Unsaved(Tunable):
    """No saved hyperparameters; the rate in an attribute named as Lightning's LR finder allows."""

    def __init__(self, batch_size: int = 8, learning_rate: float = 3e-3) -> None:
        pl.LightningModule.__init__(self)
        self.batch_size, self.learning_rate = batch_size, learning_rate
        self.net = make_net(hidden=64)
        self.train_data, self.val_data = make_learnable(1024), make_learnable(256, seed=1)
        self.seen_sizes: set[int] = set()  # every size training_step ran at

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate)

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.batch_size)


class TrainingRate(pl.Callback):
    """The learning rate of the optimizer fit trains with."""

    def on_train_start(self, trainer, pl_module):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def tuner(**kwargs) -> AutoBatchFinder:
    """Three trials (the baseline, the ceiling, one between) of two epochs; a ceiling below the
    training set's 1024 samples."""
    settings = dict(tune=True, n_trials=3, tune_max_epochs=2, memory_budget="512KiB", mlflow=False)
    return AutoBatchFinder(**{**settings, **kwargs})


def test_tune_mode_fits_with_the_recommendation():
    module, finder, check = Tunable(), tuner(), StateCheck()
    rate, sizes = TrainingRate(), BatchSizes()
    run = trainer(finder, check, rate, sizes, max_steps=-1, max_epochs=5, limit_val_batches=None)
    run.fit(module)

    result = finder.tune_result
    assert result is not None and len(result.trials) == 3
    assert result.probe is not None and result.probe.batch_size == finder.result.batch_size
    assert result.settings.max_epochs == 2 and result.settings.base_lr == 3e-3
    assert result.settings.base_batch_size == 8
    assert finder.result.batch_size < 1024  # the memory budget, not the data, set the ceiling
    assert module.hparams.batch_size == finder.optimal_batch_size == result.batch_size
    assert module.hparams.lr == result.lr == rate.lr  # configure_optimizers ran again with it
    assert run.max_epochs == result.epochs == run.current_epoch  # fit ran that many epochs
    assert sizes.sizes[0] == result.batch_size
    # Trials trained fresh modules: the fitted one left the finder as it entered it.
    assert check.same_tensors and check.same_rng and check.optimizer_state == 0


def test_tune_mode_takes_the_rate_as_set_for_the_accumulated_batch_and_fits_without_it():
    """With accumulate_grad_batches=4 the module's rate was set for 4x its batch: that is the
    study's base batch size, trials train without accumulation, and so does fit."""
    module, finder = Tunable(), tuner()
    run = trainer(finder, max_steps=-1, max_epochs=5, accumulate_grad_batches=4)
    run.fit(module)
    result = finder.tune_result
    assert result.settings.base_batch_size == 4 * 8
    assert run.accumulate_grad_batches == 1 and module.hparams.batch_size == result.batch_size


@pytest.mark.parametrize(
    ("algorithm", "expected", "warned"), [(None, 0.5, False), ("value", None, True)]
)
def test_tune_mode_trials_clip_by_norm_as_fit_does(algorithm, expected, warned, caplog):
    """Trials clip at gradient_clip_val as fit will (the rate that works depends on it); by
    value they cannot, and say so."""
    module, finder = Tunable(), tuner(n_trials=1)
    caplog.set_level(logging.WARNING)
    clip = dict(gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    trainer(finder, max_steps=-1, max_epochs=1, **clip).fit(module)
    assert finder.tune_result.settings.max_grad_norm == expected
    said = [r.getMessage() for r in caplog.records if "gradient_clip_val=0.5" in r.getMessage()]
    assert bool(said) == warned


def test_tune_mode_without_hparams_needs_a_model_factory():
    with pytest.raises(InvalidInputError, match="saved no hyperparameters.*model_factory") as info:
        trainer(tuner(), max_steps=-1).fit(Unsaved())
    assert "\n" not in str(info.value)


class LateLayers(Tunable):
    """Builds its layers in configure_model(), as Lightning lets modules defer them."""

    def __init__(self, batch_size: int = 8, lr: float = 3e-3) -> None:
        super().__init__(batch_size, lr)
        self.net = None
        self.configured = 0

    def configure_model(self):
        self.configured += 1
        if self.net is None:
            self.net = make_net(hidden=64)


def test_tune_mode_trial_modules_get_configure_model_as_fit_calls_it():
    built: list[LateLayers] = []

    def factory() -> LateLayers:
        built.append(LateLayers())
        return built[-1]

    module, finder = LateLayers(), tuner(n_trials=2, model_factory=factory)
    trainer(finder, max_steps=-1, max_epochs=1).fit(module)
    assert finder.tune_result is not None and len(finder.tune_result.trials) == 2
    assert built and all(m.configured == 1 and m.net is not None for m in built)


class ByteInputs(Tunable):
    """Data as uint8, made float by the batch-transfer hooks, which record what ran and when."""

    def __init__(self, batch_size: int = 8, lr: float = 3e-3) -> None:
        super().__init__(batch_size, lr)
        self.train_data = self.as_bytes(self.train_data)
        self.val_data = self.as_bytes(self.val_data)
        self.calls: list[tuple[str, str | None]] = []

    @staticmethod
    def as_bytes(data: TensorDataset) -> TensorDataset:
        x, y = data.tensors
        return TensorDataset(((x.clamp(-3, 3) + 3) * 40).to(torch.uint8), y)

    def record(self, hook: str) -> None:
        stage = self.trainer.state.stage
        self.calls.append((hook, None if stage is None else stage.value))

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.record("before")
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.record("transfer")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.record("after")
        x, y = batch
        return (x.float() / 40 - 3), y


def test_tune_mode_trial_batches_go_through_the_transfer_hooks_as_fit_moves_them():
    module, finder = ByteInputs(), tuner(n_trials=2)
    trainer(finder, max_steps=-1, max_epochs=1).fit(module)
    assert finder.tune_result is not None and len(finder.tune_result.trials) == 2
    calls = module.calls
    assert len(calls) % 3 == 0
    for at in range(0, len(calls), 3):  # each batch: the three hooks in fit's order, one stage
        (hooks, stages) = zip(*calls[at : at + 3], strict=True)
        assert hooks == ("before", "transfer", "after") and len(set(stages)) == 1
    assert {stage for _, stage in calls} == {"train", "validate"}


def test_tune_mode_refuses_a_fit_that_resumes_from_a_checkpoint_before_probing(tmp_path):
    """Lightning restores the checkpoint's optimizer (its rate) and epoch after on_fit_start:
    the tuned rate and epochs would never reach fit."""
    first = trainer(max_steps=1)
    first.fit(Tunable())
    first.save_checkpoint(tmp_path / "resume.ckpt")
    module = Tunable()
    with pytest.raises(InvalidInputError, match=r"resumes from .*resume\.ckpt.*ckpt_path") as info:
        trainer(tuner(), max_steps=-1).fit(module, ckpt_path=tmp_path / "resume.ckpt")
    assert "\n" not in str(info.value)
    assert not module.seen_sizes  # refused before the probe ran a step


class GivenBackbone(Tunable):
    """Takes a module and leaves it out of its hyperparameters, as Lightning's warning advises."""

    def __init__(self, backbone: nn.Module, batch_size: int = 8, lr: float = 3e-3) -> None:
        super(Tunable, self).__init__()  # super(): save_hyperparameters reads __class__
        self.save_hyperparameters(ignore=["backbone"])
        self.net = nn.Sequential(backbone, nn.Linear(64, CLASSES))
        self.train_data, self.val_data = make_learnable(1024), make_learnable(256, seed=1)
        self.seen_sizes: set[int] = set()


def test_tune_mode_refuses_hparams_the_constructor_cannot_take_before_probing():
    module = GivenBackbone(nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU()))
    with pytest.raises(InvalidInputError, match=r"requires backbone.*model_factory") as info:
        trainer(tuner(), max_steps=-1).fit(module)
    assert "\n" not in str(info.value)
    assert not module.seen_sizes  # refused before the probe ran a step


@pytest.mark.slow
def test_tune_mode_with_a_model_factory_and_learning_rate(tmp_path):
    built: list[Unsaved] = []

    def factory() -> Unsaved:
        built.append(Unsaved())
        return built[-1]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    module, finder = Unsaved(), tuner(model_factory=factory, mlflow=True, tracking_uri=uri)
    trainer(finder, max_steps=-1, max_epochs=3).fit(module)

    result = finder.tune_result
    assert len(built) >= 3 and module not in built  # each trial its own module
    assert module.learning_rate == result.lr and module.batch_size == result.batch_size
    assert result.mlflow_run_id is not None  # the study is logged like tune()'s


class FixedRate(Tunable):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class NoRate(Unsaved):
    def __init__(self) -> None:
        super().__init__()
        del self.learning_rate

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class NoValidationData(Tunable):
    val_dataloader = None  # type: ignore[assignment]
    validation_step = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        (FixedRate, {}, r"built AdamW with lr=0.001, but lr=0.003"),
        (NoRate, {"model_factory": NoRate}, r"neither 'lr' nor 'learning_rate'"),
        (Tunable, {"lr_attr_name": "eta"}, r"lr_attr_name='eta' is neither"),
        (NoValidationData, {}, r"val_dataloader\(\)"),
    ],
)
def test_tune_mode_refuses_what_trials_cannot_run_before_probing(kind, kwargs, message):
    module = kind()
    with pytest.raises(InvalidInputError, match=message):
        trainer(tuner(**kwargs), max_steps=-1).fit(module)
    assert not module.seen_sizes  # refused before the probe ran a step


def test_tune_mode_under_one_epoch_fits_the_share_of_the_epoch_the_study_chose():
    """A budget of half an epoch: one whole epoch would train twice the budget, so fit takes
    the share of the epoch's batches where the study stopped."""
    module, finder = Tunable(), tuner(tune_max_epochs=0.5, n_trials=2)
    run = trainer(finder, max_steps=-1, max_epochs=5, limit_val_batches=None)
    run.fit(module)
    result = finder.tune_result
    best = next(t for t in result.trials if t.number == result.best_trial)
    assert result.epochs == 1 and result.steps <= best.iterations_per_epoch / 2
    assert run.limit_train_batches < 1.0
    assert run.global_step == result.steps  # the steps the study chose, not a whole epoch
