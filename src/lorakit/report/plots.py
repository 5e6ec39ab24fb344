"""A run's plots: loss and accuracy (or perplexity) curves, and the confusion matrix.

The curves are drawn at every logged step of ``metrics.jsonl`` (``train`` and ``eval`` events),
with the ends of epochs and the chosen checkpoint (summary.json's ``best_step``) marked.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure`, never pyplot,
so no window opens and no global figure state is touched.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runfiles import (
    METRICS_FILE,
    PLOTS_DIR,
    SUMMARY_FILE,
    ReportError,
    existing_dir,
    read_metrics,
    read_summary,
    write_atomically,
)

LOSS_ACCURACY_PNG = "loss_accuracy.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
TRAIN_COLOUR = "#1f6feb"
VALIDATION_COLOUR = "#e8590c"
TEST_COLOUR = "#2b8a3e"


def save_figure(figure: Figure, path: Path, dpi: int = 110) -> Path:
    """Render `figure` to PNG on the Agg canvas and write it atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_atomically(path, buffer.getvalue())


@dataclass
class Curves:
    """The series drawn in `loss_accuracy.png`, against optimizer steps."""

    x_label: str
    metric: str  # "accuracy", "perplexity" or "verdict_accuracy"
    train: list[tuple[float, float]] = field(default_factory=list)
    validation: list[tuple[float, float]] = field(default_factory=list)
    validation_metric: list[tuple[float, float]] = field(default_factory=list)
    test_metric: float | None = None
    epoch_ends: list[float] = field(default_factory=list)  # the steps at which epochs ended
    best_step: int | None = None  # the checkpoint the run kept


def metric_name(events: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    """ "verdict_accuracy" for an instruction run that scores verdicts, "perplexity" for another
    causal-LM run, else "accuracy"."""
    if any("verdict_accuracy" in e or "val_verdict_accuracy" in e for e in events):
        return "verdict_accuracy"
    if summary and summary.get("task") == "causal-lm":
        return "perplexity"
    if any("perplexity" in e or "val_perplexity" in e for e in events):
        return "perplexity"
    return "accuracy"


def _points(events: list[dict[str, Any]], x_key: str, y_key: str) -> list[tuple[float, float]]:
    return [
        (float(e[x_key]), float(e[y_key]))
        for e in events
        if e.get(x_key) is not None and e.get(y_key) is not None
    ]


def curves_from_events(
    events: list[dict[str, Any]], metric: str, best_step: int | None = None
) -> Curves:
    """Every logged step's training loss and every evaluation, against the step; a run that
    logged none has its epoch events' figures instead."""
    epochs = [e for e in events if e["event"] == "epoch"]
    trains = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval" and e.get("split", "validation") != "test"]
    curves = Curves(
        x_label="optimizer step",
        metric=metric,
        train=_points(trains, "step", "loss") or _points(epochs, "step", "train_loss"),
        validation=_points(evals, "step", "loss") or _points(epochs, "step", "val_loss"),
        validation_metric=(
            _points(evals, "step", metric) or _points(epochs, "step", f"val_{metric}")
        ),
        epoch_ends=[float(e["step"]) for e in epochs if e.get("step") is not None],
        best_step=best_step,
    )
    tests = [e for e in events if e["event"] == "test" and e.get(metric) is not None]
    if tests:
        curves.test_metric = float(tests[-1][metric])
    return curves


def _draw_series(axes: Any, points: list[tuple[float, float]], label: str, colour: str) -> None:
    if not points:
        return
    xs, ys = zip(*points, strict=True)
    marker = "o" if len(points) <= 30 else None
    axes.plot(xs, ys, label=label, color=colour, marker=marker, markersize=4, linewidth=1.8)


def _draw_marks(axes: Any, curves: Curves, metric_axes: bool) -> None:
    """Dotted lines where epochs ended; a dashed one at the chosen checkpoint, with a star on its
    validation figure."""
    for step in curves.epoch_ends[:-1]:  # the last epoch's end is the right edge
        axes.axvline(step, color="#adb5bd", linestyle=":", linewidth=0.9)
    if curves.best_step is None:
        return
    label = f"chosen: step {curves.best_step}"
    axes.axvline(curves.best_step, color="#495057", linestyle="--", linewidth=1.1, label=label)
    at_best = [y for x, y in curves.validation_metric if x == curves.best_step]
    if metric_axes and at_best:
        axes.plot([curves.best_step], at_best[-1:], marker="*", markersize=13,
                  color=VALIDATION_COLOUR, markeredgecolor="#1a1a1a", linestyle="none")  # fmt: skip


def _draw_nothing_yet(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#666")


def plot_loss_accuracy(run_dir: str | os.PathLike[str]) -> Path:
    """Write `plots/loss_accuracy.png`: loss (train, validation) and validation accuracy or
    perplexity at every logged step, epochs and the chosen checkpoint marked."""
    run_dir = existing_dir(run_dir)
    events = read_metrics(run_dir)
    summary = read_summary(run_dir)
    best_step = summary.get("best_step") if summary else None
    curves = curves_from_events(events, metric_name(events, summary), best_step)
    if not (curves.train or curves.validation or curves.validation_metric):
        raise ReportError(
            f"{run_dir / METRICS_FILE} has no train, eval or epoch events with a loss to plot yet"
        )

    figure = Figure(figsize=(11, 4.2))
    loss_axes, metric_axes = figure.subplots(1, 2)
    _draw_series(loss_axes, curves.train, "train", TRAIN_COLOUR)
    _draw_series(loss_axes, curves.validation, "validation", VALIDATION_COLOUR)
    _draw_marks(loss_axes, curves, metric_axes=False)
    loss_axes.set_title("Loss")
    loss_axes.set_ylabel("cross-entropy loss")
    loss_axes.legend(frameon=False)

    _draw_series(metric_axes, curves.validation_metric, "validation", VALIDATION_COLOUR)
    _draw_marks(metric_axes, curves, metric_axes=True)
    if curves.test_metric is not None:
        metric_axes.axhline(
            curves.test_metric, color=TEST_COLOUR, linestyle="--", linewidth=1.2, label="test"
        )
    if curves.validation_metric or curves.test_metric is not None:
        metric_axes.legend(frameon=False)
    else:
        _draw_nothing_yet(metric_axes, "no evaluation logged yet")
    metric_axes.set_title(f"Validation {curves.metric.replace('_', ' ')}")
    metric_axes.set_ylabel(curves.metric.replace("_", " "))

    for axes in (loss_axes, metric_axes):
        axes.set_xlabel(curves.x_label)
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, run_dir / PLOTS_DIR / LOSS_ACCURACY_PNG)


def confusion_from_summary(
    summary: dict[str, Any], source: Path
) -> tuple[list[str], list[list[int]]] | None:
    """The labels and count matrix of a classification summary, checked; None when absent."""
    labels, matrix = summary.get("labels"), summary.get("confusion_matrix")
    if labels is None or matrix is None:
        return None
    size = len(labels)
    if size == 0 or len(matrix) != size or any(len(row) != size for row in matrix):
        raise ReportError(
            f"{source}: confusion_matrix must be {size} rows of {size} counts, "
            f"one per label in `labels`"
        )
    return [str(label) for label in labels], [[int(c) for c in row] for row in matrix]


def plot_confusion_matrix(run_dir: str | os.PathLike[str]) -> Path | None:
    """Write `plots/confusion_matrix.png` (counts annotated, colour = share of the true class);
    None when the run has no confusion matrix (a causal-LM run, or no summary yet)."""
    run_dir = existing_dir(run_dir)
    summary = read_summary(run_dir)
    confusion = confusion_from_summary(summary, run_dir / SUMMARY_FILE) if summary else None
    if confusion is None:
        return None
    labels, counts = confusion
    size = len(labels)
    row_totals = [max(sum(row), 1) for row in counts]
    shares = [[c / total for c in row] for row, total in zip(counts, row_totals, strict=True)]

    side = min(2.6 + 0.75 * size, 14)
    figure = Figure(figsize=(side + 1.2, side))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(size):
        for column in range(size):
            dark = shares[row][column] > 0.55
            axes.text(
                column,
                row,
                str(counts[row][column]),
                ha="center",
                va="center",
                fontsize=10 if size <= 10 else 7,
                color="white" if dark else "#1a1a1a",
            )
    rotate = size > 3
    # a user's labels are plain text: "$$" (a price range) is not mathtext
    axes.set_xticks(
        range(size), labels, rotation=35 if rotate else 0, ha="right" if rotate else "center",
        parse_math=False,
    )  # fmt: skip
    axes.set_yticks(range(size), labels, parse_math=False)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    total = sum(sum(row) for row in counts)
    correct = sum(counts[i][i] for i in range(size))
    axes.set_title(f"Confusion matrix ({correct}/{total} correct)")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    return save_figure(figure, run_dir / PLOTS_DIR / CONFUSION_MATRIX_PNG)
