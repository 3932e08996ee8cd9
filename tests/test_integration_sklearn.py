"""AutoBatchSearch with the real skorch: tuning on scikit-learn's bundled data on the CPU."""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits, make_regression
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

skorch = pytest.importorskip("skorch")

from autobatch.integrations.sklearn import AutoBatchSearch  # noqa: E402

from autobatch.errors import InvalidInputError  # noqa: E402

BUDGET = "256KiB"  # small enough that the probe, not the data, sets the ceiling on digits


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(probe skipped|Lazy modules|not writable).*")
        yield


class MLP(nn.Module):
    """Any number of input features (LazyLinear) and ``n_outputs`` outputs, for the checks."""

    def __init__(self, n_outputs: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), -1).float())


def digits_net(**params) -> skorch.NeuralNetClassifier:
    """skorch's default criterion, NLLLoss, on a module that outputs probabilities."""
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=-1))
    return skorch.NeuralNetClassifier(
        module, lr=0.05, batch_size=32, max_epochs=2, verbose=0, **params
    )


def digits() -> tuple[np.ndarray, np.ndarray]:
    """600 of the 1,797 digits: enough for every class, few enough to train in a blink."""
    X, y = load_digits(return_X_y=True)
    return X[:600] / 16.0, y[:600]


# -- scikit-learn's estimator checks ---------------------------------------------------------------

# One trial (the net's own batch size and learning rate) of one epoch: the recommendation is then
# the same in every fit, so the checks that compare two fits can hold; batch size 8 and a high
# learning rate let one epoch reach the scores the checks demand.
CHECKED = [
    AutoBatchSearch(
        skorch.NeuralNetClassifier(
            MLP, criterion=nn.CrossEntropyLoss, lr=0.1, batch_size=8, max_epochs=1,
            train_split=None, verbose=0,
        ),
        n_trials=1,
        n_outputs_param="module__n_outputs",
    ),
    AutoBatchSearch(
        skorch.NeuralNetRegressor(
            MLP, optimizer=torch.optim.Adam, lr=0.03, batch_size=8, max_epochs=1,
            train_split=None, verbose=0,
        ),
        n_trials=1,
        n_outputs_param="module__n_outputs",
    ),
]  # fmt: skip


@parametrize_with_checks(CHECKED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -- the estimator ---------------------------------------------------------------------------------


def test_clone_gives_an_unfitted_copy_with_the_same_params():
    search = AutoBatchSearch(digits_net(), n_trials=3, memory_budget=BUDGET, seed=3)
    copy = clone(search)
    assert copy is not search and copy.estimator is not search.estimator
    assert copy.get_params(deep=False).keys() == search.get_params(deep=False).keys()
    assert copy.n_trials == 3 and copy.memory_budget == BUDGET and copy.seed == 3
    assert copy.estimator.get_params()["lr"] == 0.05
    assert not hasattr(copy, "best_params_") and not hasattr(copy, "best_estimator_")


@pytest.mark.parametrize(
    ("params", "shown"),
    [
        ({"n_trials": 0}, "n_trials=0"),
        ({"validation_fraction": 1.0}, "validation_fraction=1.0"),
        ({"memory_budget": "lots"}, "memory_budget='lots'"),
        ({"estimator": nn.Linear(2, 2)}, "estimator=Linear"),
    ],
)
def test_bad_params_are_refused_at_fit_naming_param_and_value(params, shown):
    search = AutoBatchSearch(digits_net(), n_trials=3).set_params(**params)  # no check here
    with pytest.raises(InvalidInputError, match=f"^AutoBatchSearch: {shown}.* must be"):
        search.fit(*digits())


def test_unsupported_optimizer_param_groups_are_refused():
    net = digits_net(optimizer__param_groups=[("0.*", {"lr": 0.1})])
    with pytest.raises(InvalidInputError, match="optimizer__param_groups"):
        AutoBatchSearch(net, n_trials=1, max_epochs=1).fit(*digits())


def test_classifier_probes_tunes_and_refits_with_the_recommendation():
    X, y = digits()
    search = AutoBatchSearch(digits_net(), n_trials=4, memory_budget=BUDGET).fit(X, y)

    result = search.tune_result_
    assert search.best_params_ == {
        "batch_size": result.batch_size,
        "lr": result.lr,
        "max_epochs": result.epochs,
    }
    params = search.best_estimator_.get_params()
    assert {k: params[k] for k in search.best_params_} == search.best_params_
    assert search.best_estimator_ is not search.estimator  # the given net stays unfitted
    assert not hasattr(search.estimator, "module_")

    train_size = len(X) - math.ceil(len(X) * 0.2)
    assert result.probe is not None
    assert search.max_batch_size_ == result.probe.batch_size < train_size
    assert search.best_params_["batch_size"] <= search.max_batch_size_

    assert isinstance(search.study_, optuna.Study) and search.study_ is result.study
    assert len(search.study_.trials) == 4
    # The trials trained with the loss the net trains with: NLLLoss on the log of the module's
    # probabilities (skorch's get_loss), which is positive; on the raw probabilities, negative.
    assert all(t.best_val_loss > 0 for t in result.trials if t.best_val_loss is not None)

    predicted = search.predict(X)
    assert predicted.shape == (len(X),) and set(predicted) <= set(range(10))
    assert search.predict_proba(X).shape == (len(X), 10)
    assert np.array_equal(search.classes_, np.arange(10))
    assert search.score(X, y) == pytest.approx(accuracy_score(y, predicted))


def test_regressor_without_budget_goes_up_to_the_training_split():
    X, y = make_regression(n_samples=300, n_features=8, noise=0.1, random_state=0)
    X, y = X.astype(np.float32), (y / y.std()).astype(np.float32)
    net = skorch.NeuralNetRegressor(
        MLP, module__n_outputs=1, optimizer=torch.optim.Adam, lr=0.01, batch_size=16,
        max_epochs=3, verbose=0,
    )  # fmt: skip
    search = AutoBatchSearch(net, n_trials=3, validation_fraction=0.25, seed=1).fit(X, y)

    assert search.tune_result_.probe is None  # the CPU has nothing to probe without a budget
    assert search.max_batch_size_ == 300 - 75
    assert len(search.study_.trials) == 3
    predicted = search.predict(X)
    assert predicted.shape == (300,) and predicted.dtype == np.float64
    assert search.score(X, y) == pytest.approx(r2_score(y, predicted))
    assert not hasattr(search, "predict_proba") and not hasattr(search, "classes_")


def test_without_refit_there_is_a_recommendation_and_nothing_to_predict_with():
    X, y = digits()
    search = AutoBatchSearch(digits_net(), n_trials=1, max_epochs=1, refit=False).fit(X, y)
    assert set(search.best_params_) == {"batch_size", "lr", "max_epochs"}
    assert not hasattr(search, "best_estimator_")
    assert not hasattr(search, "predict") and not hasattr(search, "score")


def test_labels_are_given_back_as_they_came():
    X, y = digits()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])  # fmt: skip
    search = AutoBatchSearch(digits_net(), n_trials=1, max_epochs=1).fit(X, names[y])
    assert set(search.predict(X[:50])) <= set(names)
    assert list(search.classes_) == sorted(names)


def test_a_stored_study_is_continued_on_the_same_data_and_not_on_other_data(tmp_path):
    """With storage, a second fit on the same data continues its study; a fit on other data
    (a cross-validation's next fold, of the same size) starts its own, where it took the
    first fold's trials, trained on rows the next fold tests on."""
    X, y = digits()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = AutoBatchSearch(digits_net(), n_trials=1, max_epochs=1, refit=False, storage=storage)
    half = len(X) // 2
    first = search.fit(X[:half], y[:half]).study_.study_name
    again = search.fit(X[:half], y[:half])
    assert again.study_.study_name == first and _finished(again.study_) == 1  # continued
    other = search.fit(X[half : 2 * half], y[half : 2 * half]).study_
    assert other.study_name != first and _finished(other) == 1
    # A study named by the user is refused on other data than it was tuned on.
    named = search.set_params(study_name="mine").fit(X[:half], y[:half])
    assert named.study_.study_name == "mine"
    with pytest.raises(InvalidInputError, match="'mine' was tuned on other data"):
        search.fit(X[half : 2 * half], y[half : 2 * half])


def _finished(study) -> int:
    return sum(t.state.is_finished() for t in study.trials)
