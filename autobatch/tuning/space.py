"""The search space: candidate batch sizes, the seeded trials, and how the learning rate
moves with the batch size.

With a larger batch the gradient is averaged over more samples: less noise, fewer updates per
epoch. SGD-style optimizers keep the same progress per sample when the learning rate grows in
proportion (``linear``); Adam-style optimizers normalise the update size, and the square root
works better (``sqrt``). Both fail above the gradient noise scale ``B_noise``, where a larger
batch no longer averages away noise: ``saturating-linear`` (SGD, AdaScale's gain) and
``saturating-sqrt`` (Adam family) follow their rule below ``B_noise`` and level off above it,
once the reference trial has measured it (:mod:`autobatch.tuning.prior`); before that they are
the plain rules. The tuner multiplies the rule's value by a tuned factor and lets the study
correct it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autobatch.errors import InvalidInputError
from autobatch.records import (
    BASELINE,
    BEYOND,
    CEILING,
    INFEASIBLE,
    MIDDLE,
    RAISED,
    StudySettings,
    TrialRecord,
)
from autobatch.tuning import curves, prior, scoring

RULES = ("saturating-linear", "saturating-sqrt", "linear", "sqrt", "none")
_SATURATING = "saturating-"
_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Adafactor,
    torch.optim.SparseAdam,
)
#: What an adaptive optimizer from another library declares in its defaults: Adam's moment
#: averages (``betas``: LAMB, Lion, 8-bit and fused Adams) or Adafactor's (``beta2_decay``).
_ADAPTIVE_DEFAULTS = {"betas", "beta2_decay"}
#: Optimizers whose step size does not follow the gradient's scale: Rprop adapts each
#: parameter's step from the gradient's sign alone, L-BFGS takes quasi-Newton steps under its
#: own line search. Their rate means the same at every batch size.
_SCALE_FREE = (torch.optim.Rprop, torch.optim.LBFGS)


def rule_for(optimizer: torch.optim.Optimizer) -> str:
    """``saturating-sqrt`` for adaptive optimizers (Adam family, torch's or another
    library's with Adam's ``betas``), ``none`` for those whose step ignores the gradient's
    scale (Rprop, L-BFGS), ``saturating-linear`` for SGD and the rest."""
    if isinstance(optimizer, _SCALE_FREE):
        return "none"
    adaptive = isinstance(optimizer, _ADAPTIVE) or bool(
        _ADAPTIVE_DEFAULTS & set(getattr(optimizer, "defaults", {}))
    )
    return _SATURATING + ("sqrt" if adaptive else "linear")


def applied_rule(rule: str, noise: float | None) -> str:
    """The rule as it applies: a saturating rule is its plain one until the noise scale is
    known."""
    return rule if noise is not None else rule.removeprefix(_SATURATING)


def scale_lr(
    base_lr: float, base_batch_size: int, batch_size: int, rule: str, noise: float | None = None
) -> float:
    """The rule's learning rate at ``batch_size``, from one known to work at ``base_batch_size``
    (``noise``: the gradient noise scale, for the saturating rules)."""
    if rule not in RULES:
        raise InvalidInputError(f"unknown lr_rule {rule!r}; choose one of {', '.join(RULES)}")
    family = rule.removeprefix(_SATURATING)
    if family == "none":
        return base_lr
    if rule.startswith(_SATURATING) and noise is not None:
        ratio = prior.saturating_gain(batch_size, base_batch_size, noise)
    else:
        ratio = batch_size / base_batch_size
    return base_lr * (ratio if family == "linear" else math.sqrt(ratio))


@dataclass(frozen=True)
class AdamWScaling:
    """AdamW's ``beta2`` and weight decay for a batch size other than the one they were set
    for (opt-in, ``scale_adamw``).

    - ``beta2' = beta2 ** (B' / B)``: the second-moment average then spans the same number of
      samples, not of steps (Marek et al., 2025).
    - ``wd' = wd x (B' / B) x (lr / lr')``: the weight decay's timescale ``B / (lr x wd x N)``,
      in epochs, stays the same (Wang and Aitchison, 2024).

    Each parameter group keeps its own values, scaled alike: a group the user set without
    weight decay (biases, norms) stays without it.
    """

    ratio: float  # B' / B
    decay_factor: float  # (B' / B) x (lr / lr')
    beta2: float  # the scaled values of the first group with weight decay, as reported
    weight_decay: float

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale the freshly built ``optimizer``'s groups (built at the base values)."""
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            group["betas"] = (beta1, beta2**self.ratio)
            group["weight_decay"] = group["weight_decay"] * self.decay_factor


def adamw_scaling(
    groups: Sequence[Mapping[str, Any]],
    base_batch_size: int,
    batch_size: int,
    base_lr: float,
    lr: float,
) -> AdamWScaling | None:
    """The scaling of an optimizer's parameter ``groups`` (built at the base values) to
    ``batch_size`` and ``lr``, or None for an optimizer without ``betas`` and weight decay
    (only the AdamW family has both)."""
    if any("betas" not in g or "weight_decay" not in g for g in groups):
        return None
    shown = next((g for g in groups if g["weight_decay"]), groups[0])
    ratio = batch_size / base_batch_size
    factor = ratio * base_lr / lr
    return AdamWScaling(
        ratio=ratio,
        decay_factor=factor,
        beta2=shown["betas"][1] ** ratio,
        weight_decay=shown["weight_decay"] * factor,
    )


#: The smallest default candidate, unless the task's own batch size is smaller: below it an
#: accelerator idles between steps, each epoch takes several times longer, and the time to
#: a target loss only grows (the step time's fixed part dominates); those trials were also
#: the costliest of a study. Give ``candidates`` to search smaller sizes.
SMALLEST_DEFAULT = 8


def default_candidates(ceiling: int, base: int) -> list[int]:
    """Powers of two from :data:`SMALLEST_DEFAULT` (or the task's own batch size, or a quarter
    of a small ceiling, when smaller) up to the ceiling, the ceiling itself, and the task's
    own batch size."""
    floor = min(SMALLEST_DEFAULT, base, max(1, ceiling // 4))
    sizes = {2**k for k in range(int(math.log2(ceiling)) + 1) if 2**k >= floor} | {ceiling}
    if base <= ceiling:
        sizes.add(base)
    return sorted(sizes)


def check_candidates(
    candidates: Sequence[int] | None, ceiling: int, base: int, notes: list[str]
) -> list[int]:
    """The candidate batch sizes at or below ``ceiling``; what was dropped goes to ``notes``."""
    if candidates is None:
        return default_candidates(ceiling, base)
    values = list(candidates)  # checked at the boundary: positive integers
    too_big = sorted(c for c in values if c > ceiling)
    kept = sorted({c for c in values if c <= ceiling})
    if too_big:
        notes.append(
            f"dropped candidate batch sizes {too_big}: above the ceiling of {ceiling} "
            "(what fits in memory, or the training set size)"
        )
    if not kept:
        raise InvalidInputError(
            f"no candidate batch size is at or below the ceiling of {ceiling}; give smaller ones"
        )
    return kept


def seeds(candidates: Sequence[int], base_batch_size: int) -> list[tuple[str, int]]:
    """The seeded trials, in the order they run: (role, batch size), each at the rule's rate.

    The baseline (the candidate nearest the task's own batch size) runs first: its result fixes
    the target. The ceiling and the middle candidate then bracket the range.
    """
    sizes = sorted(candidates)
    base = min(sizes, key=lambda s: abs(s - base_batch_size))
    chosen: dict[int, str] = {}
    for role, size in ((BASELINE, base), (CEILING, sizes[-1]), (MIDDLE, sizes[len(sizes) // 2])):
        chosen.setdefault(size, role)
    return [(role, size) for size, role in chosen.items()]


#: A best trial within this factor of an end of the multiplier range sits at that end.
EDGE = 2.0
#: How near two multipliers count as the same configuration for a queued trial.
NEAR = 1.25


def _tried(
    records: Sequence[TrialRecord], taken: Sequence[tuple[int, float]], size: int, multiplier: float
) -> bool:
    """Whether a trial ran, runs or waits (``taken``) at ``size`` within :data:`NEAR` of
    ``multiplier``."""
    ran = [(r.batch_size, r.lr_multiplier) for r in records] + list(taken)
    return any(s == size and _near(m, multiplier) for s, m in ran)


def _near(multiplier: float, other: float) -> bool:
    """Whether two multipliers count as the same configuration (within :data:`NEAR`)."""
    return abs(math.log(multiplier / other)) < math.log(NEAR)


def pinned(multipliers: tuple[float, float]) -> bool:
    """Whether a multiplier range is narrower than ``EDGE**2``: it pins the rate on purpose,
    so the study neither searches past its ends nor moves it (the lr range test)."""
    low, high = multipliers
    return high / low < EDGE**2


def seeds_ended(records: Sequence[TrialRecord], settings: StudySettings) -> bool:
    """Whether every seeded trial has ended. The prediction waits for their step times; the
    search past the range's end for their losses (until then the best loss may be the
    baseline's alone, at the task's own rate, outside a range the lr range test moved)."""
    ended = sum(r.role in (BASELINE, CEILING, MIDDLE) for r in records)
    return ended >= len(seeds(settings.candidates, settings.base_batch_size))


def past_the_edge(
    records: Sequence[TrialRecord],
    settings: StudySettings,
    taken: Sequence[tuple[int, float]] = (),
) -> tuple[int, float] | None:
    """The next configuration past the multiplier range, or None: when the completed trial
    with the best loss has a multiplier within :data:`EDGE` of an end of the range, its batch
    size at twice (or half) its multiplier, unless a trial ran there already (``taken``: the
    queued and running trials' batch sizes and multipliers). A range narrower than
    ``EDGE**2`` is left as it is: it pins the rate.

    A best trial at the edge says the range, not the task, stopped the search: a task whose
    own learning rate is several times too low has its best loss there at every batch size.
    Going on past the best trial's rate, one doubling at a time, finds where the loss turns
    up again; a rate that diverges fails its trial and the best stays where it was.
    """
    best = scoring.best_trial(records)
    if best is None or not seeds_ended(records, settings):
        return None
    if pinned(settings.multiplier_range):
        return None
    low, high = settings.multiplier_range
    if best.lr_multiplier >= high / EDGE:
        step = 2.0
    elif best.lr_multiplier <= low * EDGE:
        step = 0.5
    else:
        return None
    return _step_from(best, step, records, taken)


def _step_from(
    best: TrialRecord,
    step: float,
    records: Sequence[TrialRecord],
    taken: Sequence[tuple[int, float]],
) -> tuple[int, float] | None:
    """``best``'s batch size at ``step`` times its multiplier: a step of the walk along the
    rate, or None where a trial ran or waits there, or that step already lost."""
    proposal = best.lr_multiplier * step
    if _tried(records, taken, best.batch_size, proposal) or _step_lost(records, proposal, step):
        return None
    return best.batch_size, proposal


def _step_lost(records: Sequence[TrialRecord], multiplier: float, step: float) -> bool:
    """Whether the walk's step to ``multiplier`` (from ``multiplier / step``; past the range's
    end, or raised) lost already, at some batch size: it diverged, went unstable
    (:func:`scoring.unstable`), or ended above the trial it stepped from. The multiplier is
    relative to the rule's rate at each size, so the walk does not take the same step again
    from a new best trial at another size (on blobs-SGD and the AdamW task of the quality
    benchmark, each such step lost again, at 1.2% and 4.4% of the grid's compute)."""
    for r in records:
        if r.role not in (BEYOND, RAISED) or not _near(r.lr_multiplier, multiplier):
            continue
        if r.state == INFEASIBLE:  # out of memory says nothing about the rate
            continue
        origins = [
            o.best_val_loss
            for o in records
            if o.batch_size == r.batch_size
            and scoring.completed(o)
            and _near(o.lr_multiplier * step, multiplier)
        ]
        if origins and (
            not scoring.completed(r) or scoring.unstable(r) or r.best_val_loss > min(origins)
        ):
            return True
    return False


def sampling_range(records: Sequence[TrialRecord], settings: StudySettings) -> tuple[float, float]:
    """The multipliers a sampled trial draws from: the study's range, or, once every seed has
    ended, when the completed trial with the best loss lies more than :data:`EDGE` times
    past an end of it, the range moved (same width) so that the best sits ``EDGE`` inside
    that end. A pinned range stays.

    The range test can centre the range on a rate several times off: on an AdamW task whose
    own rate was right, it suggested 15.6x, the best trials ran at 0.5-1x, and every sampled
    trial drew from 3.9-62x: all missed the target, and the studies spent a quarter of the
    exhaustive grid's compute to recommend the task's own configuration. The walk past the
    range's end finds where the best rate lies; this lets the search follow it. Read from the
    records, so every worker draws alike. Once the range has moved, Optuna's TPE samples the
    multiplier on its own (a changed distribution leaves its multivariate model)."""
    low, high = settings.multiplier_range
    best = scoring.best_trial(records)
    if best is None or pinned((low, high)) or not seeds_ended(records, settings):
        return low, high
    multiplier = best.lr_multiplier
    if multiplier < low / EDGE:
        shift = multiplier / EDGE / low
    elif multiplier > high * EDGE:
        shift = multiplier * EDGE / high
    else:
        return low, high
    return low * shift, high * shift


def carried_over(
    records: Sequence[TrialRecord],
    settings: StudySettings,
    fastest: int | None,
    taken: Sequence[tuple[int, float]] = (),
) -> tuple[int, float] | None:
    """The predicted fastest batch size ``fastest`` at the multiplier of the completed trial
    with the best loss, or None: while the search past the range's end goes on
    (:func:`past_the_edge` asks for a trial), when that multiplier is the predicted trial's (the
    range's centre)
    (within :data:`NEAR`), when the best trial already runs at ``fastest``, or when a trial
    ran or is queued there (``taken``) within :data:`NEAR` of it.

    The rule scales the task's rate with the batch size; a best multiplier away from 1 says the
    task's own rate was off by that factor, at every batch size. The size predicted fastest was
    tried at the rule's rate only (the predicted trial), so it is tried again with the factor,
    once the factor is known: not at each doubling on the way to it.
    """
    best = scoring.best_trial(records)
    if fastest is None or best is None or past_the_edge(records, settings) is not None:
        return None
    centre = settings.lr_centre
    if best.batch_size == fastest or _near(best.lr_multiplier, centre):
        return None
    if _tried(records, taken, fastest, best.lr_multiplier):
        return None
    return fastest, best.lr_multiplier


#: Sampled trials that end before the walk along the batch size starts (:func:`neighbour`).
SAMPLED_FIRST = 2


def raised_rate(
    records: Sequence[TrialRecord],
    settings: StudySettings,
    taken: Sequence[tuple[int, float]] = (),
) -> tuple[int, float] | None:
    """The batch size of the completed trial with the best loss at twice its multiplier, when
    the study would otherwise end settled (:func:`scoring.settled`) and that trial's loss was
    still falling as its budget ran out; None when a trial ran or is queued there
    (``taken``), when that step already lost (at any batch size), while the search past the
    range's end goes on (:func:`past_the_edge`), or for a pinned range.

    A best curve cut off by the budget, not levelled by its rate, says a higher rate may get
    further in the same epochs; the walk past the range's end only looks once the best sits
    at an end. (On a Friedman regression with SGD and Nesterov momentum, one study of three
    settled at 1.12x the grid's best loss with its best trial at 1.7x, every curve still
    falling: the other two had walked on to 8x.) The last thing a study asks before it ends:
    taken as soon as the sampler had had its say, from the baseline, the step won, lowered
    the target early, and held the blobs study at the task's own batch size, 3.2x slower to
    the grid's level.
    """
    best = scoring.best_trial(records)
    if best is None or pinned(settings.multiplier_range):
        return None
    epochs, losses = [p.epoch for p in best.curve], [p.val_loss_smoothed for p in best.curve]
    if not curves.still_falling(epochs, losses, settings.max_epochs):
        return None
    if scoring.settled(records, settings) is None or past_the_edge(records, settings) is not None:
        return None
    return _step_from(best, 2.0, records, taken)


def neighbour(
    records: Sequence[TrialRecord],
    settings: StudySettings,
    taken: Sequence[tuple[int, float]] = (),
) -> tuple[int, float] | None:
    """The fastest trial's multiplier at the next candidate batch size above its own (else the
    one below), or None: before :data:`SAMPLED_FIRST` sampled trials have ended (until the
    search has had a say on the rate, the fastest runs at the rule's own; walking from it
    after one, at a task's rate ten times too low, spent three trials of a digits study),
    while the search past the range's end goes on (:func:`past_the_edge`), when both
    neighbours ran out of memory, or when a trial ran or is queued (``taken``) at each within
    :data:`NEAR` of that multiplier.

    The multiplier is relative to the rule's rate at each size, so it carries to the next size
    as it is. The sampler spreads its trials over every size and rate; this walks from the
    best one along the batch size, one step at a time, and stops where the next step is no
    faster: a step that wins becomes the fastest and asks for the step after it.
    """
    sampled = sum(r.role is None for r in records)
    if sampled < SAMPLED_FIRST or past_the_edge(records, settings) is not None:
        return None
    fastest = scoring.fastest(scoring.rescore(records, settings))
    sizes = sorted(settings.candidates)
    if fastest is None or fastest.batch_size not in sizes:
        return None
    at = sizes.index(fastest.batch_size)
    infeasible = scoring.infeasible_sizes(records)
    for size in sizes[at + 1 : at + 2] + sizes[max(at - 1, 0) : at]:
        if size not in infeasible and not _tried(records, taken, size, fastest.lr_multiplier):
            return size, fastest.lr_multiplier
    return None
