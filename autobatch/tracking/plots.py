"""The charts a study leaves behind, drawn from plain records so each can be made on its own.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no
global figure state, no display needed, safe to call from the thread that runs the trials.

Example::

    figure = learning_curves_figure(result.trials, target=0.31, best_trial=result.best_trial)
    save_png(figure, "learning_curves.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from autobatch.records import COMPLETE, FAILED, INFEASIBLE, PRUNED, ProbeResult, TrialRecord

DPI = 120
# Viridis without its pale yellow end, which vanishes on a white background.
_CMAP = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.85, 256)), name="viridis_dark")
# How each trial state is drawn on the trade-off chart: marker, colour, legend text.
_STATE_STYLE = {
    COMPLETE: ("o", "tab:blue", "complete"),
    PRUNED: ("v", "tab:gray", "pruned (at its last evaluation)"),
    FAILED: ("X", "tab:orange", "failed"),
    INFEASIBLE: ("x", "tab:red", "infeasible (out of memory)"),
}


def save_png(figure: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``figure`` as a PNG and return the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _byte_unit(largest: float) -> tuple[str, float]:
    return ("GiB", 2.0**30) if largest >= 2 * 2**30 else ("MiB", 2.0**20)


def probe_memory_figure(probe: ProbeResult) -> Figure:
    """Peak memory of every probed batch size, the fitted line, the budget and the ceiling."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.add_subplot()
    unit, scale = _byte_unit(probe.capacity_bytes)
    sizes = [a.batch_size for a in probe.attempts] or [probe.batch_size]
    right = max(sizes + [probe.batch_size]) * 1.1

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
    ax.axhline(
        probe.budget_bytes / scale,
        color="tab:red",
        ls="--",
        lw=1,
        label=f"budget ({1 - probe.headroom:.0%} of capacity)",
    )
    ax.axhline(probe.capacity_bytes / scale, color="black", lw=1, label="capacity")
    ax.axvline(
        probe.batch_size,
        color="tab:green",
        ls=":",
        lw=1.5,
        label=f"largest that fits: {probe.batch_size}",
    )
    ax.set_xlim(0, right)
    ax.set_ylim(0, probe.capacity_bytes / scale * 1.08)
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_title(f"Memory probe on {probe.device}: batch size {probe.batch_size} fits")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _size_norm(sizes: Sequence[int]) -> Normalize:
    low, high = min(sizes), max(sizes)
    if low == high:
        return Normalize(low - 1, high + 1)
    return LogNorm(low, high)


def learning_curves_figure(
    trials: Sequence[TrialRecord],
    target: float | None = None,
    best_trial: int | None = None,
) -> Figure:
    """Smoothed validation loss against training seconds, one line per trial.

    Colour encodes the batch size; pruned trials are dotted; ``best_trial`` is drawn thick;
    ``target`` (the loss a trial must reach, tolerance included) is the dashed line. The time
    axis turns logarithmic when the trials' times span more than a factor of 30.
    """
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    ax = figure.add_subplot()
    drawn = [t for t in trials if len(t.curve) > 0]
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no trial recorded a learning curve",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return figure
    sizes = sorted({t.batch_size for t in drawn})
    norm = _size_norm(sizes)
    mappable = ScalarMappable(norm=norm, cmap=_CMAP)
    losses: list[float] = []
    times: list[float] = []
    for trial in sorted(drawn, key=lambda t: t.number == best_trial):
        xs = [p.seconds for p in trial.curve]
        ys = [p.val_loss_smoothed for p in trial.curve]
        losses += _finite(ys)
        best = trial.number == best_trial
        colour = mappable.to_rgba(trial.batch_size)
        style = (0, (1.5, 1.5)) if trial.state == PRUNED else "-"
        if best:
            # A dark halo under the winner keeps it readable whatever its colour.
            ax.plot(xs, ys, color="black", lw=5.5, zorder=4, solid_capstyle="round")
        ax.plot(
            xs,
            ys,
            ls=style,
            color=colour,
            lw=3.2 if best else 1.6,
            zorder=5 if best else 2,
            alpha=1.0 if best else 0.9,
            # A dot at the end: where each trial stopped, and visible for one-point curves.
            marker="o",
            markevery=[len(xs) - 1],
            ms=6 if best else 4,
        )
        times += [x for x in xs if x > 0]
        if trial.state in (FAILED, INFEASIBLE):
            ax.plot(xs[-1:], ys[-1:], "x", color="tab:red", ms=8, zorder=3)
    handles = [
        Line2D([], [], color="gray", lw=1.6, label="complete"),
        Line2D([], [], color="gray", lw=1.6, ls=(0, (1.5, 1.5)), label="pruned"),
    ]
    if best_trial is not None:
        winner = next((t for t in drawn if t.number == best_trial), None)
        if winner is not None:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="black",
                    lw=4,
                    label=f"best: trial {winner.number} (batch size {winner.batch_size})",
                )
            )
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="tab:red", ls="--", lw=1.2, zorder=1)
        handles.append(
            Line2D([], [], color="tab:red", ls="--", lw=1.2, label=f"target loss {target:.4g}")
        )
        losses.append(target)
    if times and max(times) / min(times) > 30:
        # Small batches can train for minutes, large ones for seconds: a log axis shows both.
        ax.set_xscale("log")
    positive = [v for v in losses if v > 0]
    if positive and len(positive) == len(losses) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    colorbar = figure.colorbar(mappable, ax=ax, pad=0.01)
    colorbar.set_label("batch size (samples)")
    if isinstance(norm, LogNorm):
        colorbar.ax.yaxis.set_major_locator(FixedLocator(sizes))
        colorbar.ax.yaxis.set_minor_locator(NullLocator())
        colorbar.ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("training time (seconds, evaluation excluded)")
    ax.set_ylabel("validation loss (smoothed)")
    ax.set_title(f"Learning curves of {len(drawn)} trials")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize=8)
    return figure


def batch_size_tradeoff_figure(
    trials: Sequence[TrialRecord],
    best_trial: int | None = None,
    target: float | None = None,
) -> Figure:
    """Time to target (top) and best validation loss (bottom) against batch size.

    Trials that never reached the target are drawn at their whole training time, hollow;
    infeasible trials, which have no measurement, sit on the bottom edge of both panels.
    """
    figure = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    if not trials:
        top.text(0.5, 0.5, "no trials", ha="center", va="center", transform=top.transAxes)
    sizes = sorted({t.batch_size for t in trials})
    seen: set[str] = set()
    for trial in trials:
        marker, colour, label = _STATE_STYLE.get(trial.state, ("o", "tab:gray", trial.state))
        show = label not in seen
        seen.add(label)
        kwargs = {"marker": marker, "color": colour, "s": 55, "zorder": 3}
        if trial.state == INFEASIBLE or (trial.best_val_loss is None and not trial.curve):
            # No measurement: marked on the bottom edge of both panels, and named.
            for ax in (top, bottom):
                edge = ax.get_xaxis_transform()
                ax.scatter(
                    [trial.batch_size],
                    [0.03],
                    transform=edge,
                    clip_on=False,
                    label=label if show and ax is top else None,
                    **kwargs,
                )
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
            top.scatter(
                [trial.batch_size], [trial.time_to_target], label=label if show else None, **kwargs
            )
        elif trial.train_seconds:
            # Never reached the target: its whole training time is a lower bound.
            top.scatter(
                [trial.batch_size],
                [trial.train_seconds],
                facecolors="none",
                edgecolors=colour,
                marker=marker,
                s=55,
                zorder=3,
                label=f"{label}, target not reached" if show else None,
            )
        if trial.best_val_loss is not None and math.isfinite(trial.best_val_loss):
            bottom.scatter([trial.batch_size], [trial.best_val_loss], **kwargs)
    winner = next((t for t in trials if t.number == best_trial), None)
    if winner is not None:
        star = {"marker": "*", "s": 320, "color": "gold", "edgecolors": "black", "zorder": 5}
        if winner.time_to_target is not None:
            top.scatter(
                [winner.batch_size],
                [winner.time_to_target],
                label=f"best: trial {winner.number}",
                **star,
            )
        if winner.best_val_loss is not None:
            bottom.scatter([winner.batch_size], [winner.best_val_loss], **star)
    if target is not None and math.isfinite(target):
        bottom.axhline(target, color="tab:red", ls="--", lw=1.2, label=f"target {target:.4g}")
    bottom.set_xscale("log", base=2)
    if sizes:
        bottom.xaxis.set_major_locator(FixedLocator(sizes))
        bottom.xaxis.set_minor_locator(NullLocator())
        bottom.xaxis.set_major_formatter(ScalarFormatter())
        bottom.set_xlim(sizes[0] / 1.4, sizes[-1] * 1.4)
    top.set_ylabel("time to target (seconds)")
    top.set_title("Batch size trade-off: training time to the target loss, and the best loss")
    bottom.set_ylabel("best validation loss (smoothed)")
    bottom.set_xlabel("batch size (samples, log2 scale)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return figure
