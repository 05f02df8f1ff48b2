"""Figures written by the evaluation CLI: confusion matrix and reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from handler.labels import CLASS_CODES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], path: str | Path, title: str = "") -> None:
    """Save a confusion matrix (rows true, columns predicted) as a PNG, row-normalized colours and raw counts.

    Args:
        matrix: (7, 7) counts in :data:`CLASS_CODES` order.
        path: PNG file to write.
        title: Figure title.
    """
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            axes.text(column, row, f"{int(counts[row, column])}", ha="center", va="center",
                      color="white" if rates[row, column] > 0.5 else "black", fontsize=9)
    axes.set_xticks(range(len(CLASS_CODES)), CLASS_CODES)
    axes.set_yticks(range(len(CLASS_CODES)), CLASS_CODES)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or "Confusion matrix (colour: row-normalized recall)")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_reliability(bins: Sequence[dict[str, Any]], ece: float, path: str | Path, title: str = "") -> None:
    """Save a top-label reliability diagram (accuracy against confidence per bin) as a PNG.

    Args:
        bins: :func:`lab.evaluation.reliability_bins` output.
        ece: The expected calibration error, shown in the title.
        path: PNG file to write.
        title: Figure title prefix.
    """
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.4), dpi=120, height_ratios=[3, 1], sharex=True)
    centres = [(row["low"] + row["high"]) / 2 for row in bins]
    widths = [row["high"] - row["low"] for row in bins]
    top.bar(centres, [row["accuracy"] for row in bins], width=widths, edgecolor="black", color="#4c72b0", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.plot(centres, [row["confidence"] for row in bins], "o", color="#dd8452", label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"{title + ': ' if title else ''}reliability, ECE {ece:.3f}")
    bottom.bar(centres, [row["count"] for row in bins], width=widths, edgecolor="black", color="#999999")
    bottom.set_xlabel("top-class confidence")
    bottom.set_ylabel("images")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
