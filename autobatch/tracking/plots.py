"""The charts a study leaves behind, drawn from plain records so each can be made on its own.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no
global figure state, no display needed, safe to call from the thread that runs the trials.
Legends sit below the plot area, outside it, so they never hide a point.

Example::

    figure = learning_curves_figure(result.trials, target=0.31, best_trial=result.best_trial)
    save_png(figure, "learning_curves.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullLocator,
)

from autobatch.records import (
    COMPLETE,
    FAILED,
    INFEASIBLE,
    MISSED,
    NO_BOUND,
    PRUNED,
    REACHED,
    ProbeResult,
    TrialRecord,
    trial_label,
)
from autobatch.records import outcome as ended_as

DPI = 120
# Viridis without its pale yellow end, which vanishes on a white background.
_CMAP = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.85, 256)), name="viridis_dark")
_GREY = "dimgray"
# How each trial state is drawn on the trade-off chart: marker, colour, legend text.
_STATE_STYLE = {
    COMPLETE: ("o", "tab:blue", "complete"),
    PRUNED: ("v", "tab:gray", "pruned (at its last evaluation)"),
    FAILED: ("X", "tab:orange", "failed"),
    INFEASIBLE: ("x", "tab:red", "infeasible (out of memory)"),
}
#: How a trial ended, as the search-space and history charts sort trials (the words of the
#: MLflow run names). Failed and infeasible trials are one group: neither has a measurement.
# Marker and legend text of the outcomes without a time to colour: drawn grey and hollow.
_OUTCOME_STYLE = {
    MISSED: ("o", "hollow circle: completed, missed the target"),
    PRUNED: ("v", "hollow triangle: pruned before the end"),
    FAILED: ("x", "grey x: failed or out of memory"),
}
_OUTCOME_ROW = {MISSED: "missed", PRUNED: "pruned", FAILED: "failed / OOM"}


def save_png(figure: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``figure`` as a PNG and return the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


# -- shared helpers ---


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _norm(values: Sequence[float]) -> Normalize:
    """Logarithmic when the values are positive and differ: batch sizes are powers of two, and
    times to target span decades."""
    low, high = min(values), max(values)
    if low == high:  # one value: a band around it, never below zero for a positive one
        pad = 0.1 * abs(low) or 1.0
        return Normalize(low - pad, high + pad)
    if low <= 0:
        return Normalize(low, high)
    return LogNorm(low, high)


def _number(value: float, _position: object = None) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _colorbar(
    figure: Figure, ax: Axes, mappable: ScalarMappable, label: str, ticks: Sequence[float]
) -> None:
    """A colorbar whose ticks are the values drawn (a log colorbar's decades say little)."""
    colorbar = figure.colorbar(mappable, ax=ax, pad=0.01)
    colorbar.set_label(label)
    if isinstance(mappable.norm, LogNorm):
        distinct = sorted(set(ticks))
        if len(distinct) > 6:  # a spread of the values themselves: round where they are
            step = math.ceil((len(distinct) - 1) / 5)
            distinct = distinct[::-step][::-1]
        colorbar.ax.yaxis.set_major_locator(FixedLocator(distinct))
        colorbar.ax.yaxis.set_minor_locator(NullLocator())
        colorbar.ax.yaxis.set_major_formatter(FuncFormatter(_number))


def _batch_axis(ax: Axes, sizes: Sequence[int]) -> None:
    """Log2 batch-size axis, ticked at the sizes tried."""
    ax.set_xscale("log", base=2)
    if sizes:
        ticks = sorted(set(sizes))
        # Labels closer than a factor of 1.6 would overlap: from the largest down, keep one.
        labelled, last = set(), math.inf
        for size in reversed(ticks):
            if last / size >= 1.6:
                labelled.add(size)
                last = size
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _p: _number(v) if round(v) in labelled else "")
        )
        ax.set_xlim(min(sizes) / 1.4, max(sizes) * 1.4)
    ax.set_xlabel("batch size (samples, log2 scale)")


def _legend_below(figure: Figure, handles: Sequence[Artist], ncols: int = 2) -> Legend | None:
    """The figure's legend, below the plots and outside them: it hides no point."""
    handles = [h for h in handles if not str(h.get_label()).startswith("_")]
    if not handles:
        return None
    ncols = max(1, min(ncols, len(handles)))
    return figure.legend(
        handles=handles, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False
    )


def _titles(figure: Figure, ax: Axes, title: str, subtitle: str) -> None:
    """A title, and one line below it saying how to read the chart."""
    figure.suptitle(title, fontsize=12)
    ax.set_title(subtitle, fontsize=9, color=_GREY)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _outcome(trial: TrialRecord) -> str:
    """REACHED, MISSED, PRUNED or FAILED (failed or infeasible): one marker each. A trial
    still running or interrupted has not reached the target: it counts as missed."""
    ended = ended_as(trial)
    if ended in (FAILED, INFEASIBLE):
        return FAILED
    return ended if ended in (PRUNED, REACHED) else MISSED


def _scatter_outcome(ax: Axes, xs: list[float], ys: list[float], outcome: str, **kwargs) -> None:
    """Trials without a time to target: grey, hollow (or an x)."""
    marker = _OUTCOME_STYLE[outcome][0]
    if outcome == FAILED:
        ax.scatter(xs, ys, marker=marker, color=_GREY, s=55, linewidths=1.6, **kwargs)
    else:
        ax.scatter(
            xs,
            ys,
            marker=marker,
            facecolors="none",
            edgecolors=_GREY,
            s=60,
            linewidths=1.4,
            **kwargs,
        )


def _outcome_handle(outcome: str) -> Line2D:
    marker, label = _OUTCOME_STYLE[outcome]
    return Line2D(
        [], [], ls="none", marker=marker, ms=8, mfc="none", mec=_GREY, mew=1.4, label=label
    )


def _winner(trials: Sequence[TrialRecord], best_trial: int | None) -> TrialRecord | None:
    return next((t for t in trials if t.number == best_trial), None)


# -- the probe ---


def _byte_unit(largest: float) -> tuple[str, float]:
    return ("GiB", 2.0**30) if largest >= 2 * 2**30 else ("MiB", 2.0**20)


def _ceiling_source(probe: ProbeResult, train_size: int | None) -> str | None:
    """What capped the batch size when memory did not, e.g. "the dataset's 1,438 samples"."""
    upper = probe.upper_bound
    if upper is None or probe.batch_size < upper:
        return None
    if train_size is None:
        return f"the upper bound of {upper:,} samples (the dataset size or max_batch_size)"
    if upper >= train_size:
        return f"the dataset's {train_size:,} samples"
    return f"max_batch_size={upper:,}"


def _probe_subtitle(probe: ProbeResult, source: str | None, zoomed: bool) -> str:
    budget = probe.budget_bytes
    unit, scale = _byte_unit(budget)
    if source is None:
        return (
            f"ceiling: memory, a budget of {budget / scale:.2f} {unit} "
            f"({probe.headroom:.0%} headroom of the free memory)"
        )
    text = f"ceiling: {source}, not memory"
    model = probe.memory_model
    if model is not None and model.largest_under(budget) < NO_BOUND:
        text += f"; memory would allow about {model.largest_under(budget):,}"
    peaks = _finite([a.peak_bytes for a in probe.attempts])
    if zoomed and peaks:
        text += (
            f"\nzoomed on the readings: the {budget / scale:.2f} {unit} budget is far above "
            f"(the largest peak is {max(peaks) / budget:.0%} of it)"
        )
    return text


def _probe_ylim(probe: ProbeResult, right: float) -> tuple[float, float]:
    """The readings (and the fitted line over the x range), padded: where the data is."""
    values = _finite([a.peak_bytes for a in probe.attempts])
    if probe.memory_model is not None:
        values += [probe.memory_model.predict(x) for x in (0, right)]
    low, high = min(values), max(values)
    pad = max(high - low, 0.05 * high) * 0.12
    return max(low - pad, 0.0), high + pad


def probe_memory_figure(probe: ProbeResult, train_size: int | None = None) -> Figure:
    """Peak memory of every probed batch size, the fitted line, the budget and the ceiling.

    When the ceiling came from the data (``probe.upper_bound``: the training set or
    ``max_batch_size``) and the peaks are far below the budget, the view zooms on the readings
    and the subtitle says where the ceiling came from; ``train_size`` tells the two sources
    apart.
    """
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    ax = figure.add_subplot()
    sizes = [a.batch_size for a in probe.attempts] or [probe.batch_size]
    right = max(sizes + [probe.batch_size]) * 1.1
    source = _ceiling_source(probe, train_size)
    peaks = _finite([a.peak_bytes for a in probe.attempts])
    zoomed = source is not None and bool(peaks) and max(peaks) < 0.5 * probe.budget_bytes
    unit, scale = _byte_unit(max(peaks) if zoomed else probe.capacity_bytes)

    groups = {
        "fits": [a for a in probe.attempts if a.fitted],
        "over budget": [a for a in probe.attempts if not a.fitted and not a.oom],
        "out of memory": [a for a in probe.attempts if a.oom],
    }
    styles = {"fits": ("o", "tab:green"), "over budget": ("^", "tab:orange")}
    styles["out of memory"] = ("x", "tab:red")
    for label, attempts in groups.items():
        if not attempts:
            continue
        marker, colour = styles[label]
        # An out-of-memory attempt may have no reading; it is drawn at the capacity.
        ys = [
            (a.peak_bytes if a.peak_bytes is not None else probe.capacity_bytes) / scale
            for a in attempts
        ]
        ax.scatter(
            [a.batch_size for a in attempts],
            ys,
            marker=marker,
            color=colour,
            s=60,
            zorder=3,
            label=f"{label} ({len(attempts)})",
        )
    model = probe.memory_model
    if model is not None:
        xs = [0.0, right]
        ax.plot(
            xs,
            [model.predict(x) / scale for x in xs],
            "--",
            color="tab:purple",
            lw=1.2,
            label=f"fitted: {model.fixed_bytes / scale:.2f} {unit} + "
            f"{model.bytes_per_sample / 2**20:.3f} MiB x batch",
        )
    if not zoomed:
        ax.axhline(
            probe.budget_bytes / scale,
            color="tab:red",
            ls="--",
            lw=1,
            label=f"budget ({probe.headroom:.0%} headroom of the free memory)",
        )
        ax.axhline(probe.capacity_bytes / scale, color="black", lw=1, label="capacity")
    ax.axvline(
        probe.batch_size,
        color="tab:green",
        ls=":",
        lw=1.5,
        label=f"largest that fits: {probe.batch_size:,}",
    )
    ax.set_xlim(-0.02 * right, right)  # batch size 1 clear of the axis
    if zoomed:
        low, high = _probe_ylim(probe, right)
        ax.set_ylim(low / scale, high / scale)
    else:
        ax.set_ylim(0, probe.capacity_bytes / scale * 1.08)
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel(f"peak memory ({unit})")
    _titles(
        figure,
        ax,
        f"Memory probe on {probe.device}: batch size {probe.batch_size:,} fits",
        _probe_subtitle(probe, source, zoomed),
    )
    ax.grid(alpha=0.3)
    _legend_below(figure, ax.get_legend_handles_labels()[0], ncols=3)
    return figure


# -- learning curves ---


def _loss_ylim(
    losses: Sequence[float], bests: Sequence[float], target: float | None
) -> tuple[float, float]:
    """The band that decides the target: a bit below the lowest point, up to a few times the
    distance between the target and the best loss above the target (or, without a target, the
    trials' median best), so the early losses, often ten times higher, do not flatten it."""
    low = min(losses)
    if len(bests) < 2:  # nothing to compare: the whole curve
        span = max(max(losses) - low, 1e-9)
        return low - 0.05 * span, max(losses) + 0.05 * span
    anchor = target if target is not None else float(np.median(bests))
    bottom, level = min(low, anchor), max(low, anchor)
    span = max(level - bottom, 0.02 * abs(level), 1e-9)
    # Up to where most trials ended, too: with one trial near the target, the others' best
    # losses are what the chart compares it with.
    top = max(level + 3 * span, float(np.median(bests)) + 0.5 * span if len(bests) else 0.0)
    top = min(top, max(max(losses), level) + 0.1 * span)
    return bottom - 0.15 * span, top


def _curve_label(trial: TrialRecord, best: bool) -> str:
    label = trial_label(trial)
    if trial.state != COMPLETE:
        label += f" {trial.state}"
    return f"best: {label}" if best else label


def learning_curves_figure(
    trials: Sequence[TrialRecord],
    target: float | None = None,
    best_trial: int | None = None,
) -> Figure:
    """Smoothed validation loss against training seconds, one line per trial.

    Colour encodes the batch size; pruned trials are dotted; ``best_trial`` is drawn thick;
    ``target`` (the loss a trial must reach, tolerance included) is the dashed line. The loss
    axis is zoomed on the target; the time axis turns logarithmic when the trials' times span
    more than a factor of 30. The legend names each trial as its MLflow run is named.
    """
    drawn = sorted((t for t in trials if len(t.curve) > 0), key=lambda t: t.number)
    ncols = 4 if len(drawn) > 9 else 3
    rows = math.ceil((len(drawn) + 1) / ncols)
    figure = Figure(figsize=(9.5, 5.5 + 0.17 * rows), layout="constrained")
    ax = figure.add_subplot()
    if not drawn:
        _empty(ax, "no trial recorded a learning curve")
        return figure
    sizes = sorted({t.batch_size for t in drawn})
    norm = _norm(sizes)
    mappable = ScalarMappable(norm=norm, cmap=_CMAP)
    losses: list[float] = []
    bests: list[float] = []
    times: list[float] = []
    handles: list[Artist] = []
    for trial in drawn:
        xs = [p.seconds for p in trial.curve]
        ys = [p.val_loss_smoothed for p in trial.curve]
        finite = _finite(ys)
        losses += finite
        bests += [min(finite)] if finite else []
        times += [x for x in xs if x > 0]
        best = trial.number == best_trial
        if best:
            # A dark halo under the winner keeps it readable whatever its colour.
            ax.plot(xs, ys, color="black", lw=5.5, zorder=4, solid_capstyle="round")
        (line,) = ax.plot(
            xs,
            ys,
            ls=(0, (1.5, 1.5)) if trial.state == PRUNED else "-",
            color=mappable.to_rgba(trial.batch_size),
            lw=3.2 if best else 1.6,
            zorder=5 if best else 2,
            alpha=1.0 if best else 0.9,
            # A dot at the end: where each trial stopped, and visible for one-point curves.
            marker="o",
            markevery=[len(xs) - 1],
            ms=6 if best else 4,
            label=_curve_label(trial, best),
        )
        handles.append(line)
        if trial.state in (FAILED, INFEASIBLE):
            ax.plot(xs[-1:], ys[-1:], "x", color="tab:red", ms=8, zorder=3)
    if target is not None and math.isfinite(target):
        handles.append(
            ax.axhline(
                target, color="tab:red", ls="--", lw=1.2, zorder=1, label=f"target {target:.4g}"
            )
        )
    else:
        target = None
    if losses:
        bottom, top = _loss_ylim(losses, bests, target)
        ax.set_ylim(bottom, top)
    if times and max(times) / min(times) > 30:
        # Small batches can train for minutes, large ones for seconds: a log axis shows both.
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_number))
    _colorbar(figure, ax, mappable, "batch size (samples)", sizes)
    ax.set_xlabel("training time (seconds, evaluation excluded)")
    ax.set_ylabel("validation loss (smoothed)")
    cut = losses and max(losses) > ax.get_ylim()[1]
    _titles(
        figure,
        ax,
        f"Learning curves of {len(drawn)} trials",
        "colour: batch size; dotted: pruned"
        + ("; zoomed on the target: higher losses are cut off" if cut else ""),
    )
    ax.grid(alpha=0.3)
    _legend_below(figure, handles, ncols=ncols)
    return figure


# -- batch size trade-off ---


def _state_style(state: str) -> tuple[str, str, str]:
    return _STATE_STYLE.get(state, ("o", "tab:gray", state))


def _state_handle(state: str) -> Line2D:
    marker, colour, label = _state_style(state)
    return Line2D([], [], ls="none", marker=marker, ms=8, color=colour, label=label)


def _dedupe(handles: Sequence[Artist]) -> list[Artist]:
    seen: set[str] = set()
    out = []
    for handle in handles:
        label = str(handle.get_label())
        if label not in seen:
            seen.add(label)
            out.append(handle)
    return out


def batch_size_tradeoff_figure(
    trials: Sequence[TrialRecord],
    best_trial: int | None = None,
    target: float | None = None,
) -> Figure:
    """Time to target (top) and best validation loss (bottom) against batch size.

    Trials that never reached the target are drawn at their whole training time, hollow;
    infeasible trials, which have no measurement, sit on the bottom edge of both panels.
    """
    figure = Figure(figsize=(8, 7.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    if not trials:
        top.text(0.5, 0.5, "no trials", ha="center", va="center", transform=top.transAxes)
    sizes = sorted({t.batch_size for t in trials})
    states = {t.state for t in trials}
    hollow = False
    for trial in trials:
        marker, colour, _ = _state_style(trial.state)
        kwargs = {"marker": marker, "color": colour, "s": 55, "zorder": 3}
        if trial.state == INFEASIBLE or (trial.best_val_loss is None and not trial.curve):
            # No measurement: marked on the bottom edge of both panels, and named.
            for ax in (top, bottom):
                edge = ax.get_xaxis_transform()
                ax.scatter([trial.batch_size], [0.03], transform=edge, clip_on=False, **kwargs)
                ax.annotate(
                    "OOM" if trial.state == INFEASIBLE else trial.state,
                    (trial.batch_size, 0.03),
                    xycoords=edge,
                    xytext=(0, 8),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    color=colour,
                )
            continue
        if trial.time_to_target is not None:
            top.scatter([trial.batch_size], [trial.time_to_target], **kwargs)
        elif trial.train_seconds:
            # Never reached the target: its whole training time is a lower bound.
            hollow = True
            top.scatter(
                [trial.batch_size],
                [trial.train_seconds],
                facecolors="none",
                edgecolors=colour,
                marker=marker,
                s=55,
                zorder=3,
            )
        if trial.best_val_loss is not None and math.isfinite(trial.best_val_loss):
            bottom.scatter([trial.batch_size], [trial.best_val_loss], **kwargs)
    winner = _winner(trials, best_trial)
    if winner is not None:
        star = {"marker": "*", "s": 320, "color": "gold", "edgecolors": "black", "zorder": 5}
        star["label"] = f"best: {trial_label(winner)}"
        if winner.time_to_target is not None:
            top.scatter([winner.batch_size], [winner.time_to_target], **star)
        if winner.best_val_loss is not None:
            bottom.scatter([winner.batch_size], [winner.best_val_loss], **star)
    if target is not None and math.isfinite(target):
        bottom.axhline(target, color="tab:red", ls="--", lw=1.2, label=f"target {target:.4g}")
    _batch_axis(bottom, sizes)
    top.set_ylabel("time to target (seconds)")
    top.set_title("Batch size trade-off: training time to the target loss, and the best loss")
    bottom.set_ylabel("best validation loss (smoothed)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    # The states as filled markers (the first drawn may be hollow), then the winner and target.
    order = [s for s in _STATE_STYLE if s in states] + sorted(states - _STATE_STYLE.keys())
    handles: list[Artist] = [_state_handle(state) for state in order]
    handles += _dedupe(top.get_legend_handles_labels()[0] + bottom.get_legend_handles_labels()[0])
    if hollow:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="o",
                ms=8,
                mfc="none",
                mec=_GREY,
                mew=1.4,
                label="hollow: target not reached, drawn at its whole training time",
            )
        )
    _legend_below(figure, handles, ncols=2)
    return figure


# -- the search: where it looked, and how it went ---


def search_space_figure(
    trials: Sequence[TrialRecord],
    best_trial: int | None = None,
    target: float | None = None,
) -> Figure:
    """Every trial at its batch size and learning rate, coloured by its seconds to target.

    Shows where the search looked and where the fast configurations are; the marker says how
    each trial ended. ``target`` (the loss level, tolerance included) only names the level in
    the subtitle.
    """
    figure = Figure(figsize=(8.5, 6.3), layout="constrained")
    ax = figure.add_subplot()
    if not trials:
        _empty(ax, "no trials")
        return figure
    handles: list[Artist] = []
    reached = [t for t in trials if _outcome(t) == REACHED]
    if reached:
        times = [float(t.time_to_target) for t in reached]
        norm = _norm(times)
        ax.scatter(
            [t.batch_size for t in reached],
            [t.lr for t in reached],
            c=times,
            cmap=_CMAP,
            norm=norm,
            s=75,
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        _colorbar(figure, ax, ScalarMappable(norm=norm, cmap=_CMAP), "seconds to target", times)
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="o",
                ms=8,
                color=_CMAP(0.5),
                mec="black",
                mew=0.5,
                label="filled circle: reached the target",
            )
        )
    for outcome in _OUTCOME_STYLE:
        group = [t for t in trials if _outcome(t) == outcome]
        if group:
            _scatter_outcome(
                ax, [t.batch_size for t in group], [t.lr for t in group], outcome, zorder=4
            )  # above the filled circles: a hollow marker or an x hides nothing
            handles.append(_outcome_handle(outcome))
    winner = _winner(trials, best_trial)
    if winner is not None:
        handles.append(_ring(ax, winner.batch_size, winner.lr, winner))
    _batch_axis(ax, [t.batch_size for t in trials])
    ax.set_yscale("log")
    ax.margins(y=0.12)
    ax.set_ylabel("learning rate (log scale)")
    level = "the target" if target is None else f"the target loss {target:.4g}"
    subtitle = (
        f"colour: training seconds until the smoothed validation loss reached {level}"
        if reached
        else f"no trial reached {level}: nothing to colour"
    )
    _titles(
        figure, ax, f"Search space: {len(trials)} trials by batch size and learning rate", subtitle
    )
    ax.grid(alpha=0.3)
    _legend_below(figure, handles, ncols=2)
    return figure


def _ring(ax: Axes, x: float, y: float, winner: TrialRecord) -> Line2D:
    """A black ring and "best" around the winner's point; returns its legend entry."""
    ax.scatter([x], [y], s=330, facecolors="none", edgecolors="black", linewidths=2, zorder=5)
    ax.annotate(
        "best",
        (x, y),
        xytext=(0, 11),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
        fontweight="bold",
        zorder=6,
    )
    label = f"ring: best, {trial_label(winner)}"
    if winner.time_to_target is not None:
        label += f" ({winner.time_to_target:.3g} s)"
    return Line2D([], [], ls="none", marker="o", ms=15, mfc="none", mec="black", mew=2, label=label)


def _best_so_far(trials: Sequence[TrialRecord]) -> tuple[list[int], list[float]]:
    """The lowest time to target after each trial, from the first trial that reached it."""
    xs: list[int] = []
    ys: list[float] = []
    best = math.inf
    for trial in trials:
        if _outcome(trial) == REACHED:
            best = min(best, float(trial.time_to_target))
        if best < math.inf:
            xs.append(trial.number)
            ys.append(best)
    return xs, ys


def _outcome_strip(strip: Axes, others: Sequence[TrialRecord]) -> dict[str, int]:
    """One row per outcome without a time to target; returns the rows."""
    outcomes = [o for o in _OUTCOME_STYLE if any(_outcome(t) == o for t in others)]
    rows = {outcome: i for i, outcome in enumerate(reversed(outcomes))}
    for outcome, row in rows.items():
        numbers = [t.number for t in others if _outcome(t) == outcome]
        _scatter_outcome(strip, numbers, [row] * len(numbers), outcome, zorder=3, clip_on=False)
    strip.set_yticks(list(rows.values()), [_OUTCOME_ROW[o] for o in rows], fontsize=8)
    strip.set_ylim(-0.7, len(rows) - 0.3)
    strip.grid(axis="x", alpha=0.3)
    strip.set_title("no time to target", fontsize=8, color=_GREY, loc="left")
    return rows


def optimization_history_figure(
    trials: Sequence[TrialRecord], best_trial: int | None = None
) -> Figure:
    """Seconds to reach the target, trial by trial, and the best so far (Optuna's optimization
    history, in seconds): was the search still improving when it stopped?

    A trial that missed the target is told a score above 1e9 internally; such scores would
    flatten the chart, so those trials sit in a strip above, one row per outcome.
    """
    ordered = sorted(trials, key=lambda t: t.number)
    others = [t for t in ordered if _outcome(t) != REACHED]
    reached = [t for t in ordered if _outcome(t) == REACHED]
    figure = Figure(figsize=(8.5, 6), layout="constrained")
    if others:
        strip, ax = figure.subplots(2, 1, sharex=True, height_ratios=(1, 4))
        rows = _outcome_strip(strip, others)
    else:
        strip, ax, rows = None, figure.add_subplot(), {}
    handles: list[Artist] = []
    if reached:
        times = [float(t.time_to_target) for t in reached]
        handles.append(
            ax.scatter(
                [t.number for t in reached],
                times,
                color="tab:blue",
                s=45,
                zorder=3,
                label="reached the target: its seconds",
            )
        )
        xs, ys = _best_so_far(ordered)
        handles += ax.step(xs, ys, where="post", color="tab:red", lw=1.5, label="best so far")
        if max(times) / max(min(times), 1e-12) > 30:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(times) * 1.15)
    else:
        ax.text(
            0.5,
            0.5,
            "no trial reached the target",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    handles += [_outcome_handle(o) for o in _OUTCOME_STYLE if o in rows]
    winner = _winner(ordered, best_trial)
    if winner is not None:
        outcome = _outcome(winner)
        if outcome == REACHED:
            handles.append(_ring(ax, winner.number, float(winner.time_to_target), winner))
        elif strip is not None:
            handles.append(_ring(strip, winner.number, rows[outcome], winner))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    numbers = [t.number for t in ordered]
    if numbers and min(numbers) == max(numbers):  # one trial: room for integer ticks
        ax.set_xlim(numbers[0] - 1, numbers[0] + 1)
    ax.set_xlabel("trial number")
    ax.set_ylabel("time to target (seconds)")
    ax.grid(alpha=0.3)
    figure.suptitle("Optimization history: training seconds to reach the target, per trial")
    _legend_below(figure, handles, ncols=2)
    return figure


# -- the prediction ---


def prediction_figure(explanation: Any, chosen: int) -> Figure:
    """Predicted against measured seconds to the target per batch size (``prior.explain``):
    where the gradient-noise-scale model expected the fastest batch size, and where the
    trials found it."""
    rows, noise = explanation.rows, explanation.noise
    figure = Figure(figsize=(8, 5.2), layout="constrained")
    ax = figure.add_subplot()
    predicted = [(r.batch_size, r.predicted_seconds) for r in rows if r.predicted_seconds]
    measured = [(r.batch_size, r.measured_seconds) for r in rows if r.measured_seconds]
    if not predicted and not measured:
        _empty(ax, "no trial reached the target: nothing to predict or compare")
        return figure
    handles: list[Artist] = []
    if predicted:
        (line,) = ax.plot(*zip(*predicted, strict=True), "--", color="tab:purple", marker=".")
        line.set_label("predicted: S_min (1 + B_noise / B) steps x step time")
        handles.append(line)
    if measured:
        points = ax.scatter(*zip(*measured, strict=True), color="tab:blue", s=45, zorder=3)
        points.set_label("measured: fastest trial at that size")
        handles.append(points)
    picked = next((r for r in rows if r.batch_size == chosen), None)
    if picked is not None and picked.measured_seconds:
        (ring,) = ax.plot(
            [chosen], [picked.measured_seconds], "o", ms=16, mfc="none", mec="black", mew=2
        )
        ring.set_label(f"recommended: batch size {chosen}")
        handles.append(ring)
    if noise is not None:
        rule = ax.axvline(noise, color=_GREY, lw=1, ls=":")
        rule.set_label(f"gradient noise scale: {noise:.0f} samples")
        handles.append(rule)
    _batch_axis(ax, [r.batch_size for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("training seconds to the target (log scale)")
    ax.grid(alpha=0.3)
    _titles(
        figure,
        ax,
        "Why this batch size: predicted against measured time to target",
        "below the noise scale a larger batch saves steps; above it, only step time grows",
    )
    _legend_below(figure, handles)
    return figure
