"""Built-in tasks that need no download: the embedded defaults of the CLI, docs and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autobatch.errors import InvalidInputError
from autobatch.task import Task


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _classification(
    name: str,
    model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    val_fraction: float = 0.1,
    lr: float = 1e-3,
) -> Task:
    """A classification task with AdamW at batch size 32, on a seeded train/validation split."""
    train, val = _split(x, y, val_fraction, seed)
    return Task(
        model=model,
        train_data=train,
        val_data=val,
        loss=nn.functional.cross_entropy,
        optimizer=torch.optim.AdamW,
        lr=lr,
        batch_size=32,
        metric="accuracy",
        name=name,
        seed=seed,
    )


def digits(seed: int = 0) -> Task:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) and a small MLP."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return _classification(
        "digits",
        lambda: nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        ),
        x,
        y,
        seed=seed,
        val_fraction=0.2,
    )


def blobs(seed: int = 0, samples: int = 20_000, features: int = 40, classes: int = 8) -> Task:
    """A larger generated classification task (scikit-learn's make_classification) and an MLP."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=samples,
        n_features=features,
        n_informative=24,
        n_redundant=8,
        n_classes=classes,
        n_clusters_per_class=2,
        class_sep=1.5,
        flip_y=0.02,
        random_state=seed,
    )
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return _classification(
        "blobs",
        lambda: nn.Sequential(
            nn.Linear(features, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, classes),
        ),
        x,
        torch.tensor(y, dtype=torch.long),
        seed=seed,
        val_fraction=0.2,
    )


class _SmallCnn(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class _TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 128, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def cnn(seed: int = 0, samples: int = 4096) -> Task:
    """Random 3x32x32 images and a small CNN with batch norm: a memory workload."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return _classification("cnn", _SmallCnn, x, y, seed=seed)


def transformer(seed: int = 0, samples: int = 4096, length: int = 64) -> Task:
    """Random token sequences and a 2-layer transformer encoder: a memory workload."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1000, (samples, length), generator=generator)
    y = torch.randint(0, 4, (samples,), generator=generator)
    return _classification("transformer", _TinyEncoder, x, y, seed=seed, lr=3e-4)


def mlp(seed: int = 0, samples: int = 50_000) -> Task:
    """Random 256-feature vectors and a wide MLP: a memory workload."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 256, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return _classification(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        ),
        x,
        y,
        seed=seed,
    )


EXAMPLES: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "blobs": blobs,
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
}


def example(name: str, seed: int = 0) -> Task:
    """The built-in task called ``name``."""
    try:
        return EXAMPLES[name](seed=seed)
    except KeyError:
        raise InvalidInputError(
            f"no built-in example {name!r}; choose one of {', '.join(EXAMPLES)}"
        ) from None
