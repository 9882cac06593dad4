"""PNG plots of training curves and MoE expert load.

Figures are built with the object-oriented API on an Agg canvas rather than through pyplot:
that renders headless whatever backend the process has chosen, never changes it, and leaves
no figure registered with pyplot to leak.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moevlm.metrics import load_array

# Losses spanning more than this ratio (max / min) are drawn on a log axis, or the late,
# small values of a run would be a flat line at the bottom.
_LOG_Y_RATIO = 50.0
# Above this many experts (or layers) the heatmap cells are too small to carry numbers.
_MAX_ANNOTATED = 16


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def _ticks(count: int) -> np.ndarray:
    """Integer tick positions: every index, or nine spread out when they would overlap."""
    return np.arange(count) if count <= 32 else np.linspace(0, count - 1, 9, dtype=int)


def _series(history: dict[str, list[tuple[int, float]]],
            keep: Callable[[str], bool]) -> dict[str, list]:
    """Non-empty series whose last name part ("loss" in "train/loss") passes ``keep``."""
    return {name: points for name, points in history.items()
            if points and keep(name.rsplit("/", 1)[-1])}


def plot_loss_curves(history: dict[str, list[tuple[int, float]]], path: Path, best_step: int | None = None) -> Path:
    """Plot loss series against step, with the learning rate (if any) on a panel below; see ``loss_figure``."""
    return _save(loss_figure(history, best_step), path)


def loss_figure(history: dict[str, list[tuple[int, float]]], best_step: int | None = None) -> Figure:
    """The figure of ``plot_loss_curves``.

    Only series named ``*loss*`` and ``lr`` / ``learning_rate`` are drawn, so a trainer can
    pass its whole metric history (throughput, grad norm, accuracy) without drowning the
    losses in other units. Validation series (``val/...``) have a marker at each evaluation;
    ``best_step``, the selected checkpoint, is a vertical line labelled "best (step N)".
    """
    losses = _series(history, lambda part: "loss" in part)
    rates = _series(history, lambda part: part in ("lr", "learning_rate"))

    figure = _new_figure(8, 6 if rates else 4.5)
    if rates:
        loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        loss_ax, lr_ax = figure.subplots(), None

    for name, points in losses.items():
        steps, values = zip(*points)
        validation = name.startswith("val/")
        loss_ax.plot(steps, values, label=name, marker="o" if validation or len(points) == 1 else None,
                     markersize=4 if validation else None)
    if best_step is not None:
        for ax in (loss_ax, lr_ax):
            if ax is not None:
                ax.axvline(best_step, color="black", linestyle="--", linewidth=1,
                           label=f"best (step {best_step})" if ax is loss_ax else None)
    values = np.array([value for points in losses.values() for _, value in points], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > _LOG_Y_RATIO:
        loss_ax.set_yscale("log")
    if losses or best_step is not None:
        loss_ax.legend()
    else:
        loss_ax.text(0.5, 0.5, "no loss values yet", ha="center", va="center",
                     transform=loss_ax.transAxes)
    loss_ax.set_title("Training curves")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)

    if lr_ax is not None:
        for name, points in rates.items():
            steps, values = zip(*points)
            lr_ax.plot(steps, values)
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.grid(alpha=0.3)
    (lr_ax or loss_ax).set_xlabel("step")
    return figure


def plot_expert_load(load: Any, path: Path, title: str = "Expert load") -> Path:
    """Heatmaps of each MoE layer's token share per expert, image tokens | text tokens.

    ``load`` holds token counts of shape (layers, 2, experts). Each row is normalized to the
    fraction of that layer's tokens of that modality; layers that saw none stay blank.
    """
    counts = load_array(load)
    layers, _, experts = counts.shape
    totals = counts.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(totals > 0, counts / totals, np.nan)
    # One color scale for both panels so the same color means the same share.
    top = np.nanmax(fractions) if np.isfinite(fractions).any() else 1.0
    annotate = experts <= _MAX_ANNOTATED and layers <= _MAX_ANNOTATED

    figure = _new_figure(min(4 + 0.9 * experts, 16), min(2 + 0.45 * layers, 10))
    axes = figure.subplots(1, 2, sharey=True)
    for column, (ax, modality) in enumerate(zip(axes, ("image tokens", "text tokens"))):
        grid = fractions[:, column, :]
        image = ax.imshow(grid, vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_title(modality)
        ax.set_xlabel("expert")
        ax.set_xticks(_ticks(experts))
        ax.set_yticks(_ticks(layers))
        if annotate:
            for (row, col), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    # Dark text on the bright end of viridis, light text elsewhere.
                    color = "black" if value > 0.6 * top else "white"
                    ax.text(col, row, f"{value:.2f}", ha="center", va="center",
                            fontsize=8, color=color)
    axes[0].set_ylabel("MoE layer")
    figure.colorbar(image, ax=list(axes), label="fraction of the layer's tokens")
    figure.suptitle(title)
    return _save(figure, path)
