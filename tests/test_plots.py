"""The charts, drawn from constructed records: each renders to a PNG, and what a reviewer
needs is readable off the Figure (no legend over a point, axes zoomed where the data is)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from autobatch.records import (
    COMPLETE,
    FAILED,
    INFEASIBLE,
    PRUNED,
    EvalPoint,
    MemoryModel,
    ProbeAttempt,
    ProbeResult,
    TrialRecord,
)
from autobatch.tracking import plots
from autobatch.tuning import curves

MiB, GiB = 2**20, 2**30
TRAIN_SIZE = 1438
LEVEL = 0.32  # the loss a trial must reach, tolerance included
BEST = 2


def make_curve(batch_size: int, floor: float, points: int) -> tuple[EvalPoint, ...]:
    """A loss falling from about 2.3 towards ``floor``; large batches train faster per sample."""
    speed = 400.0 * math.sqrt(batch_size)
    out = []
    for i in range(1, points + 1):
        samples = i * TRAIN_SIZE // 2
        seconds = samples / speed
        loss = floor + 2.0 * math.exp(-0.9 * i)
        out.append(
            EvalPoint(
                samples, seconds, samples / TRAIN_SIZE, loss, loss, loss, None, speed, None, 0
            )
        )
    return tuple(out)


def make_trial(
    number: int, state: str, batch_size: int, lr: float, floor: float = 0.0, points: int = 0
) -> TrialRecord:
    curve = make_curve(batch_size, floor, points)
    smoothed = [p.val_loss_smoothed for p in curve]
    hit = curves.first_reaching(smoothed, LEVEL) if state == COMPLETE else None
    return TrialRecord(
        number, state, batch_size, lr, 1.0, "sqrt", 1, 8.0, 0,
        curve=curve,
        train_seconds=curve[-1].seconds if curve else 0.0,
        time_to_target=None if hit is None else curve[hit].seconds,
        best_val_loss=min(smoothed) if smoothed else None,
        # A miss is scored above 1e9: the history chart must never plot it.
        value=None if not curve else (curve[hit].seconds if hit is not None else 1e9 + 0.4),
    )  # fmt: skip


TRIALS = (
    make_trial(0, COMPLETE, 32, 1.0e-2, floor=0.25, points=10),
    make_trial(1, COMPLETE, 1024, 5.7e-2, floor=0.36, points=10),  # missed
    make_trial(BEST, COMPLETE, 256, 2.8e-2, floor=0.24, points=10),
    make_trial(3, PRUNED, 128, 8.0e-3, floor=0.40, points=3),
    make_trial(4, FAILED, 512, 9.0e-2, floor=0.9, points=2),
    make_trial(5, INFEASIBLE, 2048, 8.0e-2),
    make_trial(6, COMPLETE, 64, 3.0e-3, floor=0.28, points=10),
    make_trial(7, COMPLETE, 256, 6.0e-2, floor=0.30, points=10),
)


def make_probe(memory_bound: bool = True) -> ProbeResult:
    """A probe stopped by the memory budget, or one stopped by the dataset's size."""
    model = MemoryModel(fixed_bytes=300 * MiB, bytes_per_sample=3.5 * MiB)
    if memory_bound:
        sizes = [(1, True), (256, True), (1050, False), (1000, True)]
        best, upper = 1000, None
    else:
        model = MemoryModel(fixed_bytes=300 * MiB, bytes_per_sample=0.05 * MiB)
        sizes = [(1, True), (256, True), (TRAIN_SIZE, True)]
        best, upper = TRAIN_SIZE, TRAIN_SIZE
    attempts = tuple(
        ProbeAttempt(size, fits, False, int(model.predict(size)), 0.1, "measure")
        for size, fits in sizes
    )
    return ProbeResult(
        best, 4 * GiB, 0.05, int(4 * GiB * 0.95), model, attempts, 10, 0.5, "cuda:0", upper
    )


def reached(trials=TRIALS) -> list[TrialRecord]:
    return [t for t in trials if t.state == COMPLETE and t.time_to_target is not None]


def drawn(figure: Figure) -> Figure:
    figure.draw_without_rendering()
    return figure


def data_points(figure: Figure) -> np.ndarray:
    """Display coordinates of every visible point of every scatter and line."""
    points = []
    for ax in figure.axes:
        box = ax.get_window_extent().padded(2)
        for artist in ax.collections:
            if isinstance(artist, PathCollection) and len(artist.get_offsets()):
                xy = artist.get_offset_transform().transform(artist.get_offsets())
                points += [p for p in xy if not artist.get_clip_on() or box.contains(*p)]
        for line in ax.lines:
            xy = line.get_transform().transform(line.get_xydata())
            points += [p for p in xy if box.contains(*p)]
    return np.array([p for p in points if np.all(np.isfinite(p))])


def legends(figure: Figure) -> list:
    found = list(figure.legends) + [ax.get_legend() for ax in figure.axes]
    return [legend for legend in found if legend is not None]


def legend_texts(figure: Figure) -> list[str]:
    return [text.get_text() for legend in legends(figure) for text in legend.get_texts()]


def main_axes(figure: Figure, ylabel: str):
    return next(ax for ax in figure.axes if ylabel in ax.get_ylabel())


FIGURES = {
    "search_space": lambda: plots.search_space_figure(TRIALS, best_trial=BEST, target=LEVEL),
    "optimization_history": lambda: plots.optimization_history_figure(TRIALS, best_trial=BEST),
    "batch_size_tradeoff": lambda: plots.batch_size_tradeoff_figure(TRIALS, BEST, LEVEL),
    "probe_memory": lambda: plots.probe_memory_figure(make_probe()),
    "probe_memory_dataset": lambda: plots.probe_memory_figure(make_probe(False), TRAIN_SIZE),
    "learning_curves": lambda: plots.learning_curves_figure(TRIALS, LEVEL, BEST),
}


@pytest.mark.parametrize("name", FIGURES)
def test_renders_to_png_with_a_legend_that_hides_no_point(name: str, tmp_path: Path) -> None:
    figure = drawn(FIGURES[name]())
    points = data_points(figure)
    assert len(points) > 0
    assert legends(figure)
    for legend in legends(figure):
        box = legend.get_window_extent()
        hidden = [p for p in points if box.contains(*p)]
        assert not hidden, f"{name}: the legend hides {hidden}"
        # Outside every plot area, not merely between the points.
        for ax in figure.axes:
            assert not Bbox.intersection(box, ax.get_window_extent()), name
    path = plots.save_png(figure, tmp_path / f"{name}.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    "make",
    [
        lambda: plots.search_space_figure([]),
        lambda: plots.optimization_history_figure([]),
        lambda: plots.optimization_history_figure(TRIALS[3:6]),  # nothing reached the target
        lambda: plots.optimization_history_figure(reached()),  # everything did
        lambda: plots.search_space_figure(TRIALS[3:6], best_trial=4),
        lambda: plots.learning_curves_figure(TRIALS[:1]),
        lambda: plots.probe_memory_figure(replace(make_probe(False), memory_model=None)),
    ],
)
def test_sparse_inputs_render(make, tmp_path: Path) -> None:
    assert plots.save_png(make(), tmp_path / "chart.png").stat().st_size > 0


def test_search_space_colours_hits_and_hollows_the_rest() -> None:
    figure = drawn(FIGURES["search_space"]())
    ax = main_axes(figure, "learning rate")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any(ax.get_ylabel() == "seconds to target" for ax in figure.axes)  # the colorbar
    coloured = [c for c in ax.collections if c.get_array() is not None]
    assert len(coloured) == 1 and len(coloured[0].get_offsets()) == len(reached())
    assert sorted(coloured[0].get_array()) == sorted(t.time_to_target for t in reached())
    hollow = [c for c in ax.collections if len(c.get_facecolor()) == 0 and c.get_array() is None]
    hollow_points = {tuple(p) for c in hollow for p in c.get_offsets()}
    assert (1024, 5.7e-2) in hollow_points and (128, 8.0e-3) in hollow_points  # missed, pruned
    texts = " | ".join(legend_texts(figure))
    assert "hollow circle" in texts and "hollow triangle" in texts and "grey x" in texts
    assert "best, t02 bs=256 lr=2.8e-02" in texts
    assert "colour" in ax.get_title() and "seconds" in ax.get_title()
    assert any(t.get_text() == "best" for t in ax.texts)


def test_history_stays_in_seconds_and_steps_down_to_the_best() -> None:
    figure = drawn(FIGURES["optimization_history"]())
    ax = main_axes(figure, "seconds")
    fastest = min(t.time_to_target for t in reached())
    slowest = max(t.time_to_target for t in reached())
    low, high = ax.get_ylim()
    assert low <= fastest and slowest <= high < 1e3
    for axes in figure.axes:
        assert axes.get_ylim()[1] < 1e3
        for line in axes.lines:
            assert np.all(np.asarray(line.get_ydata(), dtype=float) < 1e3)
    (step,) = [line for line in ax.lines if line.get_label() == "best so far"]
    ys = list(step.get_ydata())
    assert ys == sorted(ys, reverse=True) and ys[-1] == fastest
    assert step.get_xdata()[-1] == TRIALS[-1].number  # drawn to the last trial
    strip = next(axes for axes in figure.axes if axes is not ax)
    rows = {t.get_text() for t in strip.get_yticklabels()}
    assert rows == {"missed", "pruned", "failed / OOM"}
    assert sum(len(c.get_offsets()) for c in strip.collections) == 4  # t1, t3, t4, t5
    texts = " | ".join(legend_texts(figure))
    assert "pruned" in texts and "missed" in texts and "failed" in texts
    assert "seconds" in figure.get_suptitle()


def test_tradeoff_legend_explains_hollow_markers() -> None:
    texts = legend_texts(drawn(FIGURES["batch_size_tradeoff"]()))
    assert any(text.startswith("hollow: target not reached") for text in texts)
    assert "best: t02 bs=256 lr=2.8e-02" in texts


def test_probe_draws_the_fitted_line_and_names_the_memory_ceiling() -> None:
    probe = make_probe()
    figure = drawn(plots.probe_memory_figure(probe))
    ax = figure.axes[0]
    assert [line for line in ax.lines if line.get_label().startswith("fitted")]
    assert ax.get_ylim()[1] >= probe.capacity_bytes / GiB  # budget and capacity in view
    assert "ceiling: memory" in ax.get_title()
    without = plots.probe_memory_figure(replace(probe, memory_model=None))
    assert not [line for line in without.axes[0].lines if line.get_label().startswith("fitted")]


def test_probe_zooms_on_the_data_when_the_dataset_is_the_ceiling() -> None:
    probe = make_probe(memory_bound=False)
    figure = drawn(plots.probe_memory_figure(probe, train_size=TRAIN_SIZE))
    ax = figure.axes[0]
    peaks = [a.peak_bytes / MiB for a in probe.attempts]
    low, high = ax.get_ylim()
    assert "MiB" in ax.get_ylabel()
    assert low <= min(peaks) and max(peaks) <= high < 2 * max(peaks)
    assert ax.get_xlim()[1] <= TRAIN_SIZE * 1.2
    assert "ceiling: the dataset's 1,438 samples, not memory" in ax.get_title()
    assert [line for line in ax.lines if line.get_label().startswith("fitted")]
    capped = plots.probe_memory_figure(replace(probe, upper_bound=TRAIN_SIZE), train_size=10_000)
    assert "max_batch_size=1,438" in capped.axes[0].get_title()


def test_learning_curves_zoom_on_the_target_and_name_each_trial() -> None:
    figure = drawn(FIGURES["learning_curves"]())
    ax = figure.axes[0]
    losses = [p.val_loss_smoothed for t in TRIALS for p in t.curve]
    low, high = ax.get_ylim()
    assert low < min(losses) and LEVEL < high < max(losses) / 2  # the initial spike is cut
    assert high <= LEVEL + 4 * (LEVEL - min(losses))
    texts = legend_texts(figure)
    assert "t06 bs=64 lr=3.0e-03" in texts and "t03 bs=128 lr=8.0e-03 pruned" in texts
    assert "best: t02 bs=256 lr=2.8e-02" in texts
    assert f"target {LEVEL:.4g}" in texts


def test_a_one_trial_study_shows_its_whole_curve_and_whole_trial_numbers() -> None:
    """With nothing to compare, the zoom on the target hid all but the curve's end, and the
    history's axis around one trial had ticks at -0.045 and 0.015."""
    (only,) = TRIALS[:1]
    curves = drawn(plots.learning_curves_figure([only], target=LEVEL))
    losses = [p.val_loss_smoothed for p in only.curve]
    low, high = curves.axes[0].get_ylim()
    assert low < min(losses) and high > max(losses)
    reached_one = [t for t in reached() if t.number == reached()[0].number]
    history = drawn(plots.optimization_history_figure(reached_one))
    ticks = [t for t in history.axes[0].get_xticks() if history.axes[0].get_xlim()[0] <= t]
    assert ticks and all(float(t).is_integer() for t in ticks)
