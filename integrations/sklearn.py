"""scikit-learn: a search estimator that tunes a skorch net's batch size, epochs and learning rate.

``AutoBatchSearch`` wraps a skorch ``NeuralNetClassifier`` or ``NeuralNetRegressor``, whose
``batch_size``, ``lr`` and ``max_epochs`` are autobatch's three answers. ``fit(X, y)`` builds an
autobatch ``Task`` from the net (its module with its ``module__*`` parameters, its criterion,
its optimizer with its ``optimizer__*`` parameters, its device), probes the largest batch size
that fits, runs ``tune``'s Optuna study on a held-out split of ``X, y`` and refits a clone of
the net on all of ``X, y`` with the recommendation, as ``GridSearchCV`` refits its best
candidate. It is an estimator like any other: clone it, put it in a pipeline, read
``best_params_``.

Example::

    from sklearn.datasets import load_digits
    from skorch import NeuralNetClassifier
    from torch import nn
    from autobatch.integrations.sklearn import AutoBatchSearch

    net = NeuralNetClassifier(
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
        criterion=nn.CrossEntropyLoss, lr=1e-3, batch_size=32, max_epochs=5, verbose=0,
    )
    X, y = load_digits(return_X_y=True)
    search = AutoBatchSearch(net, n_trials=6, memory_budget="64MiB").fit(X, y)
    search.best_params_  # {'batch_size': ..., 'lr': ..., 'max_epochs': ...}
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, MetaEstimatorMixin, clone, is_classifier
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import get_tags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
from torch import nn

try:
    from skorch import NeuralNet, NeuralNetBinaryClassifier
except ModuleNotFoundError as _missing:
    if not (_missing.name or "").startswith("skorch"):
        raise
    raise ImportError(
        "autobatch.integrations.sklearn needs skorch; install it with: "
        "pip install 'torch-autobatch[sklearn]'"
    ) from None

from autobatch import validation
from autobatch.errors import InvalidInputError
from autobatch.task import Task
from autobatch.tuning import tune

__all__ = ["AutoBatchSearch"]

log = logging.getLogger(__name__)

_PARAMETERS: dict[str, validation.Spec] = {
    "estimator": validation.Instance(
        (NeuralNet,), "a skorch net, e.g. NeuralNetClassifier(MyModule, criterion=...)"
    ),
    "n_trials": validation.Integer(1, example=20),
    "max_epochs": validation.Optional(validation.Real(0, low_open=True, example=10)),
    "memory_budget": validation.Optional(validation.ByteSize()),
    "headroom": validation.FRACTION,
    "validation_fraction": validation.Real(0, 1, low_open=True, high_open=True, example=0.2),
    "storage": validation.Optional(validation.Text("sqlite:///autobatch.db")),
    "study_name": validation.Optional(validation.Text("my-study")),
    "mlflow": validation.Flag(),
    "tracking_uri": validation.Optional(validation.Text("sqlite:///mlflow.db")),
    "seed": validation.Integer(example=0),
    "refit": validation.Flag(),
    "n_outputs_param": validation.Optional(validation.Text("module__n_classes")),
}


def _refit_has(name: str, classifier: bool = False) -> Callable[[AutoBatchSearch], bool]:
    """For ``available_if``: the method exists where the refit net (or, unfitted, the wrapped
    net) has it, and only with ``refit=True``, since without a refit there is no net to ask.
    ``classifier``: a classifier's method only (skorch gives regressors ``predict_proba`` too).
    """

    def check(self: AutoBatchSearch) -> bool:
        net = getattr(self, "best_estimator_", self.estimator)
        if classifier and not is_classifier(net):
            raise AttributeError(f"{name} is for classifiers; {type(net).__name__} is not one")
        if not self.refit:
            raise AttributeError(f"{name} needs refit=True: without it no net is trained on X, y")
        getattr(net, name)
        return True

    return check


class AutoBatchSearch(MetaEstimatorMixin, BaseEstimator):
    """Tune a skorch net's ``batch_size``, ``lr`` and ``max_epochs``, then refit it with them.

    - ``estimator``: the skorch net; its ``batch_size`` and ``lr`` are the baseline the study
      starts from (the learning rate is rescaled for other batch sizes) and its criterion,
      optimizer, module and device are what every trial trains.
    - ``n_trials``: Optuna trials; ``max_epochs``: the most epochs a trial trains (default the
      net's ``max_epochs``).
    - ``memory_budget`` (bytes or e.g. ``"2GiB"``), ``headroom``: the probe's memory; on the CPU
      the budget simulates an accelerator, and without one the probe is skipped and batch sizes
      go up to the training split's size.
    - ``validation_fraction``: the share of ``X, y`` held out to score trials (stratified for
      classifiers); the refit trains on all of ``X, y`` with the net's own ``train_split``.
    - ``storage``, ``study_name``, ``mlflow``, ``tracking_uri``, ``seed``: passed to
      ``autobatch.tune``; with ``storage`` a second ``fit`` continues the same study.
    - ``refit``: refit the net with the recommendation (``best_estimator_``), which
      ``predict``, ``predict_proba`` and ``score`` use.
    - ``n_outputs_param``: a net parameter (e.g. ``"module__n_classes"``) set at fit to the
      number of classes, or of target columns for a regressor, so one net suits any ``y``.

    Labels may be anything a scikit-learn classifier takes: the net trains on their indices
    into ``classes_`` (float 0/1 for ``NeuralNetBinaryClassifier``) and ``predict`` maps back.
    A regressor's 1-D ``y`` trains as one column and is predicted 1-D. Floating ``X`` is cast to
    float32, torch's parameter type; integer ``X`` (token ids) is kept.

    Fitted attributes: ``best_params_`` (``batch_size``, ``lr``, ``max_epochs``),
    ``best_estimator_``, ``max_batch_size_`` (the probed ceiling, or the training split's size
    when nothing was probed), ``study_`` (the Optuna study), ``tune_result_`` (autobatch's
    ``TuneResult``), ``classes_`` for classifiers, ``n_features_in_``.
    """

    def __init__(
        self,
        estimator: NeuralNet,
        *,
        n_trials: int = 20,
        max_epochs: float | None = None,
        memory_budget: str | int | None = None,
        headroom: float = 0.05,
        validation_fraction: float = 0.2,
        storage: str | None = None,
        study_name: str | None = None,
        mlflow: bool = False,
        tracking_uri: str | None = None,
        seed: int = 0,
        refit: bool = True,
        n_outputs_param: str | None = None,
    ) -> None:
        self.estimator = estimator
        self.n_trials = n_trials
        self.max_epochs = max_epochs
        self.memory_budget = memory_budget
        self.headroom = headroom
        self.validation_fraction = validation_fraction
        self.storage = storage
        self.study_name = study_name
        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.seed = seed
        self.refit = refit
        self.n_outputs_param = n_outputs_param

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        net = get_tags(self.estimator)
        tags.estimator_type = net.estimator_type
        tags.classifier_tags = net.classifier_tags
        tags.regressor_tags = net.regressor_tags
        tags.input_tags.sparse = False
        # A regressor's net may predict several columns (see n_outputs_param).
        tags.target_tags.multi_output = not is_classifier(self.estimator)
        tags.non_deterministic = True  # trials are timed; the fastest can differ between fits
        return tags

    # -- fit ---------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> AutoBatchSearch:
        """Probe, tune on a held-out split of ``X, y``, then refit the net on all of it."""
        validation.check(_PARAMETERS, self.get_params(deep=False), prefix="AutoBatchSearch: ")
        X, y = validate_data(self, X, y, multi_output=True, allow_nd=True, dtype="numeric")
        X = X.astype(np.float32) if np.issubdtype(X.dtype, np.floating) else X
        if X.shape[0] < 3:
            raise InvalidInputError(
                f"AutoBatchSearch: got {X.shape[0]} sample{'s' * (X.shape[0] != 1)}; tuning "
                "needs at least 3 (2 to train, 1 to validate)"
            )
        targets, n_outputs = self._targets(y)
        net = clone(self.estimator)
        if self.n_outputs_param is not None:
            net.set_params(**{self.n_outputs_param: n_outputs})
        task = self._task(net, X, targets)
        epochs = self.max_epochs if self.max_epochs is not None else net.max_epochs
        digest = _digest(X, targets)
        study_name = self.study_name or f"autobatch-{task.name}-{digest[:12]}"
        if self.storage is not None:
            _check_same_data(self.storage, study_name, digest)
        result = tune(
            task,
            n_trials=self.n_trials,
            max_epochs=epochs,
            memory_budget=self.memory_budget,
            headroom=self.headroom,
            storage=self.storage,
            study_name=study_name,
            mlflow=self.mlflow,
            tracking_uri=self.tracking_uri,
            seed=self.seed,
        )
        if self.storage is not None and DATA not in result.study.user_attrs:
            result.study.set_user_attr(DATA, digest)
        self.tune_result_ = result
        self.study_ = result.study
        self.max_batch_size_ = (
            result.probe.batch_size if result.probe is not None else result.settings.ceiling
        )
        self.best_params_ = {
            "batch_size": result.batch_size,
            "lr": result.lr,
            "max_epochs": result.epochs,
        }
        log.info("AutoBatchSearch: refit with %s", self.best_params_)
        if self.refit:
            net.set_params(**_net_params(net, self.best_params_))
            # Seeded, so two fits that get the same recommendation give the same net.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.best_estimator_ = net.fit(X, targets)
        elif hasattr(self, "best_estimator_"):
            del self.best_estimator_  # a previous fit's: not trained on this X, y
        return self

    def _targets(self, y: np.ndarray) -> tuple[np.ndarray, int]:
        """What the net trains on, and the output size it needs; sets ``classes_``."""
        if not is_classifier(self.estimator):
            self._flat_target = y.ndim == 1
            column = y.reshape(-1, 1) if y.ndim == 1 else y
            return column.astype(np.float32), column.shape[1]
        check_classification_targets(y)
        y = column_or_1d(y, warn=True)
        classes, indices = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InvalidInputError(
                f"AutoBatchSearch: y has 1 class ({classes[0]!r}); a classifier needs at least 2"
            )
        binary = isinstance(self.estimator, NeuralNetBinaryClassifier)
        if binary and len(classes) != 2:
            raise InvalidInputError(
                f"AutoBatchSearch: y has {len(classes)} classes; NeuralNetBinaryClassifier "
                "takes 2, use NeuralNetClassifier"
            )
        self.classes_ = classes
        if binary:
            return indices.astype(np.float32), 1
        return indices.astype(np.int64), len(classes)

    def _task(self, net: NeuralNet, X: np.ndarray, y: np.ndarray) -> Task:
        """The autobatch task that trains ``net``'s module as ``net.fit`` would."""
        classifier = is_classifier(net)
        train_x, val_x, train_y, val_y = train_test_split(
            X,
            y,
            test_size=max(1, math.ceil(len(X) * self.validation_fraction)),
            random_state=self.seed,
            stratify=y if classifier and _stratifiable(y, self.validation_fraction) else None,
        )
        loss_net = clone(net)
        loss_net._initialize_criterion()  # see _ModuleFactory
        return Task(
            model=_ModuleFactory(net),
            train_data=(torch.as_tensor(train_x), torch.as_tensor(train_y)),
            val_data=(torch.as_tensor(val_x), torch.as_tensor(val_y)),
            loss=_NetLoss(loss_net),
            optimizer=_optimizer_factory(net),
            lr=_base(net, "optimizer", "lr"),
            batch_size=_base_batch_size(net, len(train_x)),
            device=net.device or "cpu",
            metric=(
                "accuracy"
                if classifier and not isinstance(net, NeuralNetBinaryClassifier)
                else None
            ),
            name=f"skorch-{_module_name(net)}",
            seed=self.seed,
        )

    # -- what the refit net answers ----------------------------------------------------------

    @available_if(_refit_has("predict"))
    def predict(self, X: Any) -> np.ndarray:
        """The refit net's predictions, as labels from ``classes_`` for a classifier."""
        X = self._checked(X)
        predicted = self.best_estimator_.predict(X)
        if hasattr(self, "classes_"):
            return self.classes_[np.asarray(predicted).astype(np.int64).reshape(-1)]
        # float64, as scikit-learn's regressors answer; the net computes in float32.
        predicted = np.asarray(predicted, dtype=np.float64)
        return predicted.reshape(-1) if self._flat_target else predicted

    @available_if(_refit_has("predict_proba", classifier=True))
    def predict_proba(self, X: Any) -> np.ndarray:
        """The refit net's probabilities, one column per class of ``classes_``."""
        X = self._checked(X)
        return self.best_estimator_.predict_proba(X)

    @available_if(_refit_has("predict"))
    def score(self, X: Any, y: Any) -> float:
        """The score the net's own mixin gives (accuracy, or R²), on ``y`` as given to fit."""
        predicted = self.predict(X)
        if is_classifier(self):
            return float(accuracy_score(y, predicted))
        return float(r2_score(y, predicted))

    def _checked(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        return X.astype(np.float32) if np.issubdtype(X.dtype, np.floating) else X


# -- from a skorch net to a Task ---------------------------------------------------------------


class _ModuleFactory:
    """A fresh module per call, built as the net builds it: through ``_initialize_module``,
    the step of ``initialize()`` that calls ``initialize_module`` (so an override is honoured)
    in the context skorch requires, and moves the module to the net's device. A module given
    as an instance is copied by ``clone``."""

    def __init__(self, net: NeuralNet) -> None:
        self.net = net

    def __call__(self) -> nn.Module:
        net = clone(self.net)
        net._initialize_module()
        return net.module_


class _NetLoss:
    """The loss as the net computes it, through its ``get_loss`` (which, for instance, takes
    the log of the probabilities ``NeuralNetClassifier`` feeds to its default ``NLLLoss``)."""

    def __init__(self, net: NeuralNet) -> None:
        self.net = net

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.net.get_loss(outputs, targets, training=torch.is_grad_enabled())


def _optimizer_factory(net: NeuralNet) -> Callable[[Iterable[nn.Parameter], float], Any]:
    options = net.get_params_for("optimizer")
    if "param_groups" in options:
        raise InvalidInputError(
            "AutoBatchSearch: optimizer__param_groups is not supported (the trials' optimizer "
            "sees the parameters without their names); set per-group rates in the module or "
            "drop optimizer__param_groups"
        )
    options.pop("lr", None)
    optimizer = net.optimizer

    def make(params: Iterable[nn.Parameter], lr: float) -> Any:
        return optimizer(params, lr=lr, **options)

    return make


#: The study's user attribute naming the data it was tuned on (:func:`_digest`).
DATA = "autobatch_sklearn_data"


def _digest(X: np.ndarray, y: np.ndarray) -> str:
    """A digest of the data a study is fit on. The default study is named by it, so a second
    ``fit`` on the same data continues its study and one on other data (the next fold of a
    cross-validation) starts its own instead of reusing trials trained on another split."""
    digest = hashlib.sha256()
    for array in (X, y):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype}{contiguous.shape}".encode())
        digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()


def _check_same_data(storage: str, study_name: str, digest: str) -> None:
    """Refuse to continue a named study on other data than it was tuned on: its trials were
    trained on rows this fit may test on (a cross-validation's folds)."""
    import optuna

    from autobatch import sqlite_store
    from autobatch.tuning.storage import open_storage

    path = sqlite_store.path_of(storage)
    if path is not None and not path.exists():  # nothing tuned yet, and nothing to create
        return
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # not made yet
        return
    tuned_on = study.user_attrs.get(DATA)
    if tuned_on is not None and tuned_on != digest:
        raise InvalidInputError(
            f"AutoBatchSearch: study {study_name!r} was tuned on other data than this fit's, "
            "so its trials may have trained on rows this fit tests on; give another "
            "study_name, or none (each dataset then gets a study of its own)"
        )


def _base(net: NeuralNet, prefix: str, name: str) -> Any:
    """``net.<name>``, unless ``<prefix>__<name>`` overrides it as skorch lets it."""
    return net.get_params_for(prefix).get(name, getattr(net, name))


def _base_batch_size(net: NeuralNet, train_size: int) -> int:
    """The net's batch size, within the training split; skorch's -1 means the whole set."""
    size = _base(net, "iterator_train", "batch_size")
    return train_size if size is None or size < 1 else min(size, train_size)


def _net_params(net: NeuralNet, best: dict[str, Any]) -> dict[str, Any]:
    """``best`` as net parameters, including the prefixed ones that would override them."""
    params = dict(best)
    if "lr" in net.get_params_for("optimizer"):
        params["optimizer__lr"] = best["lr"]
    if "batch_size" in net.get_params_for("iterator_train"):
        params["iterator_train__batch_size"] = best["batch_size"]
    return params


def _stratifiable(y: np.ndarray, fraction: float) -> bool:
    """Whether a stratified split exists: two of each class, and a class per held-out row."""
    _, counts = np.unique(y, return_counts=True)
    n_val = max(1, math.ceil(len(y) * fraction))
    return counts.min() >= 2 and len(counts) <= min(n_val, len(y) - n_val)


def _module_name(net: NeuralNet) -> str:
    module = net.module
    return module.__name__ if isinstance(module, type) else type(module).__name__
