"""How the learning rate moves with the batch size.

With a larger batch the gradient is averaged over more samples: less noise, fewer updates per
epoch. SGD-style optimizers keep the same progress per sample when the learning rate grows in
proportion (``linear``); Adam-style optimizers normalise the update size, and the square root
works better (``sqrt``). Both rules fail at very large batches, so the tuner multiplies the rule's
value by a tuned factor and lets the study correct it.
"""

from __future__ import annotations

import math

import torch

from autobatch.errors import InvalidInputError

RULES = ("linear", "sqrt", "none")
_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
)


def rule_for(optimizer: torch.optim.Optimizer) -> str:
    """``sqrt`` for adaptive optimizers (Adam family), ``linear`` for SGD and the rest."""
    return "sqrt" if isinstance(optimizer, _ADAPTIVE) else "linear"


def check_rule(rule: str) -> str:
    if rule not in (*RULES, "auto"):
        raise InvalidInputError(
            f"lr_rule={rule!r} is not one of auto, {', '.join(RULES)}; 'auto' picks sqrt for "
            "Adam-style optimizers and linear for SGD"
        )
    return rule


def scale_lr(base_lr: float, base_batch_size: int, batch_size: int, rule: str) -> float:
    """The rule's learning rate at ``batch_size``, from one known to work at ``base_batch_size``."""
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise InvalidInputError(f"unknown lr_rule {rule!r}")
