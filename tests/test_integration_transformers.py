"""probe_trainer / tune_trainer with the real transformers.Trainer: a tiny BERT built from a
config (nothing downloaded), generated token data, on the CPU under simulated budgets."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autobatch.integrations.transformers import (  # noqa: E402
    TrainerWorkload,
    probe_trainer,
    tune_trainer,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from autobatch import Workload, probe  # noqa: E402
from autobatch.errors import InvalidInputError  # noqa: E402
from autobatch.memory import TrackedMeter  # noqa: E402
from autobatch.probing import budget_for  # noqa: E402
from autobatch.units import parse_bytes  # noqa: E402

BUDGET = "8MiB"
HEADROOM = 0.05
VOCAB, LENGTH = 500, 32
CONFIG = BertConfig(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label is the parity of the first token (learnable)."""

    def __init__(self, samples: int, length: int = LENGTH, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (samples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % 2}


def model_init() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(CONFIG)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=8,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def make_trainer(tmp_path, cls=Trainer, train=256, evaluation=256, **overrides) -> Trainer:
    return cls(
        model_init=model_init,
        args=arguments(tmp_path, **overrides),
        train_dataset=Tokens(train),
        eval_dataset=Tokens(evaluation, seed=1) if evaluation else None,
    )


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One probe shared by the tests that only read it."""
    trainer = make_trainer(tmp_path_factory.mktemp("probe"))
    return trainer, probe_trainer(trainer, memory_budget=BUDGET, headroom=HEADROOM)


def peak(run, budget: str = BUDGET) -> int | None:
    """The peak of ``run(meter)`` on a fresh meter; None where it runs out of memory."""
    meter = TrackedMeter(parse_bytes(budget))
    try:
        run(meter)
    except torch.OutOfMemoryError:
        return None
    return meter.peak()


def fits(steps, tmp_path, size: int, budget: str = BUDGET) -> bool:
    """Whether ``steps(tmp_path, size)`` keeps the headroom free, read independently of the
    integration: a fresh meter, the Trainer's own public steps, and what they need whatever
    the batch read from their peaks at sizes 1 and 2, taken to an empty batch."""
    fixed = 2 * peak(steps(tmp_path, 1), budget) - peak(steps(tmp_path, 2), budget)
    top = peak(steps(tmp_path, size), budget)
    return top is not None and top <= budget_for(parse_bytes(budget), HEADROOM, fixed)


def reference(tmp_path):
    """A separate Trainer and model copy, stepped through Trainer.training_step."""
    ref = make_trainer(tmp_path)
    ref.current_gradient_accumulation_steps = 1  # set by train() before its first step
    model = copy.deepcopy(ref.model)
    ref.model = model
    return ref, model, ref.create_optimizer()


def train_steps(tmp_path, size: int):
    def run(meter: TrackedMeter) -> None:
        ref, model, optimizer = reference(tmp_path)
        meter.track(model.state_dict().values())
        collate = ref.data_collator
        with meter:
            batch = collate([ref.train_dataset[i] for i in range(size)])
            for _ in range(2):  # the second with the optimizer state live
                ref.training_step(model, batch)
                torch.nn.utils.clip_grad_norm_(model.parameters(), ref.args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return run


def eval_step(tmp_path, size: int):
    def run(meter: TrackedMeter) -> None:
        ref, model, optimizer = reference(tmp_path)
        meter.track(model.state_dict().values())
        collate = ref.data_collator
        with meter:
            ref.training_step(model, collate([ref.train_dataset[0]]))
            optimizer.step()  # evaluation during train() has the optimizer state resident
            optimizer.zero_grad(set_to_none=True)
            meter.reset_peak()
            batch = collate([ref.eval_dataset[i] for i in range(size)])
            model.eval()
            with torch.no_grad():
                ref.prediction_step(model, batch, prediction_loss_only=True)

    return run


def five_percent_more(size: int) -> int:
    return max(size + 1, math.ceil(size * 1.05))


# -- the probe -----------------------------------------------------------------------------------


def test_train_size_fits_and_five_percent_more_does_not(probed, tmp_path):
    _, plan = probed
    size = plan.train_probe.batch_size
    assert 4 < size < 256  # bound by memory, not by the data
    assert plan.updates["per_device_train_batch_size"] == size
    assert plan.updates["gradient_accumulation_steps"] == 1
    assert fits(train_steps, tmp_path, size)
    assert not fits(train_steps, tmp_path, five_percent_more(size))


def test_a_trainer_workload_goes_through_the_core_probe(probed, tmp_path):
    """autobatch.probe takes a TrainerWorkload as it takes a Task: model_init's fresh model,
    compute_loss on the collated dict batches. It lacks only the Trainer's gradient clipping,
    so it lands within a few percent of probe_trainer's size."""
    trainer, plan = probed
    workload = TrainerWorkload(trainer)
    assert isinstance(workload, Workload) and workload.batch_size == 8
    result = probe(workload, memory_budget=BUDGET, headroom=HEADROOM, cache=False)
    found = plan.train_probe.batch_size
    assert abs(result.batch_size - found) <= 0.05 * found
    assert result.eval_batch_size > result.batch_size  # no gradients, no optimizer step


def test_eval_size_is_larger_than_train_size_and_fits(probed, tmp_path):
    _, plan = probed
    size = plan.eval_probe.batch_size
    assert size > plan.train_probe.batch_size  # no gradients, no activations kept for backward
    assert plan.updates["per_device_eval_batch_size"] == size
    assert fits(eval_step, tmp_path, size)
    assert not fits(eval_step, tmp_path, five_percent_more(size))


def test_learning_rate_moves_with_the_batch_by_the_sqrt_rule_for_adamw(probed):
    trainer, plan = probed
    size = plan.train_probe.batch_size
    expected = trainer.args.learning_rate * math.sqrt(size / 8)
    assert plan.updates["learning_rate"] == pytest.approx(expected)
    assert plan.to_dict()["updates"] == plan.updates


def test_the_rule_is_that_of_the_optimizer_accelerate_wraps(tmp_path):
    """After train() the Trainer holds Accelerate's AcceleratedOptimizer: the rule is that of
    the optimizer inside it (RMSprop scales by the square root), not of the wrapper."""
    trainer = make_trainer(tmp_path, train=32, evaluation=0, optim="rmsprop")
    trainer.optimizer = trainer.accelerator.prepare_optimizer(trainer.create_optimizer())
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    plan = probe_trainer(trainer, memory_budget=BUDGET)
    size = plan.train_probe.batch_size
    assert size > 8
    expected = trainer.args.learning_rate * math.sqrt(size / 8)
    assert plan.updates["learning_rate"] == pytest.approx(expected)


@pytest.mark.parametrize(("per_device", "accumulation"), [(64, 1), (4, 6), (3, 3)])
def test_keep_effective_batch_size(tmp_path, per_device, accumulation):
    trainer = make_trainer(
        tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation
    )
    plan = probe_trainer(trainer, memory_budget=BUDGET, keep_effective_batch_size=True)
    updates, ceiling = plan.updates, plan.train_probe.batch_size
    size, steps = updates["per_device_train_batch_size"], updates["gradient_accumulation_steps"]
    assert size * steps == per_device * accumulation
    assert size <= ceiling
    # The largest divisor of the effective batch that fits: no larger divisor is under the ceiling.
    effective = per_device * accumulation
    assert not [d for d in range(size + 1, ceiling + 1) if effective % d == 0]
    assert updates["learning_rate"] == trainer.args.learning_rate


def test_updated_arguments_train_and_evaluate(probed, tmp_path):
    trainer, plan = probed
    args = trainer.args
    new = plan.apply_to(args)
    assert args.per_device_train_batch_size == 8  # not mutated
    assert new.per_device_train_batch_size == plan.train_probe.batch_size
    assert new.per_device_eval_batch_size == plan.eval_probe.batch_size
    assert new.learning_rate == plan.updates["learning_rate"]

    new = TrainingArguments(**{**new.to_dict(), "max_steps": 3, "output_dir": str(tmp_path)})
    sized = Trainer(
        model_init=model_init,
        args=new,
        train_dataset=trainer.train_dataset,
        eval_dataset=trainer.eval_dataset,
    )
    output = sized.train()
    assert output.global_step == 3
    first = next(iter(sized.get_train_dataloader()))
    assert len(first["input_ids"]) == plan.train_probe.batch_size
    assert math.isfinite(sized.evaluate()["eval_loss"])


def test_probe_leaves_model_optimizer_and_rng_as_they_were(tmp_path):
    model = model_init()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = Trainer(model=model, args=arguments(tmp_path)).data_collator(
        [Tokens(4)[i] for i in range(4)]
    )
    model(**batch).loss.backward()
    optimizer.step()  # optimizer state and gradients exist before the probe
    model.bert.encoder.layer[1].eval()  # a mixed train/eval state must survive too
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=Tokens(256),
        eval_dataset=Tokens(256, seed=1),
        optimizers=(optimizer, None),
    )
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()

    plan = probe_trainer(trainer, memory_budget=BUDGET)

    assert plan.train_probe.batch_size > 4
    assert trainer.optimizer is optimizer
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert all(torch.equal(s[k], v) for k, v in state[id(p)].items())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert torch.equal(torch.get_rng_state(), rng)


def test_bf16_is_probed_under_the_trainers_autocast(probed, tmp_path):
    _, plan = probed
    trainer = make_trainer(tmp_path, bf16=True, evaluation=0)
    mixed = probe_trainer(trainer, memory_budget=BUDGET)
    assert mixed.train_probe.batch_size > plan.train_probe.batch_size  # bf16 activations


def test_model_init_trainer_keeps_no_optimizer(probed):
    trainer, _ = probed
    assert trainer.optimizer is None
    assert all(p.grad is None for p in trainer.model.parameters())


class BuggyTrainer(Trainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[0] > 4:
            raise ValueError("a bug in compute_loss")
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_error_in_compute_loss_propagates_and_state_is_restored(tmp_path):
    trainer = make_trainer(tmp_path, cls=BuggyTrainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="a bug in compute_loss"):
        probe_trainer(trainer, memory_budget=BUDGET)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in before.items())
    assert trainer.optimizer is None


def test_without_eval_dataset_only_training_is_probed(tmp_path):
    plan = probe_trainer(make_trainer(tmp_path, evaluation=0), memory_budget=BUDGET)
    assert plan.eval_probe is None
    assert "per_device_eval_batch_size" not in plan.updates
    assert any("eval_dataset" in note for note in plan.notes)


def test_label_smoothing_is_probed_though_compute_loss_pops_the_labels(tmp_path):
    """With a label smoother, the Trainer's compute_loss takes the labels out of the dict it
    is given; the probe steps twice on each batch, so it hands over a copy."""
    trainer = make_trainer(tmp_path, evaluation=0, label_smoothing_factor=0.1)
    assert probe_trainer(trainer, memory_budget=BUDGET).train_probe.batch_size > 1


class BatchNormMLP(torch.nn.Module):
    """Batch norm: a training step needs two samples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 2)
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


class Features(torch.utils.data.Dataset):
    def __init__(self, samples: int, seed: int = 0) -> None:
        self.x = torch.randn(samples, 16, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": (self.x[i, 0] > 0).long()}


def test_batch_norm_model_with_an_eval_set_primes_the_optimizer_on_two_samples(tmp_path):
    """Before the evaluation search one training step creates the optimizer state; with batch
    norm it takes two samples, as the training search does."""
    trainer = Trainer(
        model_init=BatchNormMLP,
        args=arguments(tmp_path),
        train_dataset=Features(64),
        eval_dataset=Features(32, seed=1),
    )
    plan = probe_trainer(trainer, memory_budget="1MiB")
    assert plan.train_probe.batch_size > 2 and plan.eval_probe is not None


def test_an_empty_training_set_is_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="the training dataset is empty"):
        probe_trainer(make_trainer(tmp_path, train=0), memory_budget=BUDGET)


def test_search_is_bound_by_the_dataset_length(tmp_path):
    plan = probe_trainer(make_trainer(tmp_path, train=6, evaluation=5), memory_budget=BUDGET)
    assert plan.train_probe.batch_size == 6
    assert plan.eval_probe.batch_size == 5


# -- misuse --------------------------------------------------------------------------------------


def test_tune_trainer_without_model_init_is_one_line(tmp_path):
    trainer = Trainer(model=model_init(), args=arguments(tmp_path), train_dataset=Tokens(16))
    with pytest.raises(InvalidInputError, match="model_init") as info:
        tune_trainer(trainer, n_trials=2, max_epochs=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"headroom": 1.5}, "headroom"),
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"keep_effective_batch_size": "yes"}, "keep_effective_batch_size"),
        ({"lr_rule": "cubic"}, "lr_rule"),
    ],
)
def test_bad_arguments_name_the_argument(probed, kwargs, name):
    trainer, _ = probed
    with pytest.raises(InvalidInputError, match=f"probe_trainer: {name}="):
        probe_trainer(trainer, **{"memory_budget": BUDGET, **kwargs})


def test_misuse_is_reported_before_probing(tmp_path):
    with pytest.raises(InvalidInputError, match="transformers.Trainer"):
        probe_trainer(object(), memory_budget=BUDGET)
    with pytest.raises(InvalidInputError, match="memory_budget"):
        probe_trainer(make_trainer(tmp_path))  # the CPU has no limit of its own


# -- tuning --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tune_trainer_returns_the_recommendation(tmp_path):
    trainer = make_trainer(tmp_path, train=96, evaluation=32, learning_rate=1e-3)
    plan = tune_trainer(trainer, n_trials=3, max_epochs=1, memory_budget="4MiB")
    result = plan.tune
    assert result is not None and len(result.trials) == 3
    assert plan.updates == {
        "per_device_train_batch_size": result.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": result.lr,
        "num_train_epochs": result.epochs,
        "per_device_eval_batch_size": plan.eval_probe.batch_size,
    }
    assert result.batch_size <= plan.train_probe.batch_size  # the probe set the ceiling
    assert result.settings.base_lr == 1e-3 and result.settings.base_batch_size == 8
    assert result.settings.max_grad_norm == trainer.args.max_grad_norm == 1.0  # clipped as train()
    assert trainer.optimizer is None

    sized = Trainer(
        model_init=model_init,
        args=plan.apply_to(trainer.args),
        train_dataset=trainer.train_dataset,
        eval_dataset=trainer.eval_dataset,
    )
    assert sized.train().global_step > 0


@pytest.mark.slow
def test_tune_trainer_under_one_epoch_trains_the_fraction_the_study_chose(tmp_path):
    """A budget of half an epoch (a large dataset's usual case): whole epochs would train
    twice the budget, so the Trainer gets the fraction of an epoch where the study stopped."""
    trainer = make_trainer(tmp_path, train=96, evaluation=32, learning_rate=1e-3)
    plan = tune_trainer(trainer, n_trials=2, max_epochs=0.5, memory_budget="4MiB")
    result = plan.tune
    best = next(t for t in result.trials if t.number == result.best_trial)
    assert result.epochs == 1 and result.steps <= best.iterations_per_epoch / 2
    fraction = plan.updates["num_train_epochs"]
    assert fraction == result.steps / best.iterations_per_epoch <= 0.5
    assert any("num_train_epochs=" in note for note in plan.notes)
    sized = Trainer(
        model_init=model_init,
        args=plan.apply_to(trainer.args),
        train_dataset=trainer.train_dataset,
        eval_dataset=trainer.eval_dataset,
    )
    assert sized.train().global_step == result.steps
