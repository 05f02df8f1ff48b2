"""Releases side by side on the validation lesions, in the presentations a 4:3 request can take.

A release is judged as it serves (decode, its own geometry, runtime, calibration, decision rule and
its own measured referral threshold, :func:`lab.evaluation.serve_files`), per *lesion*: the
``ham10000-200x150`` folder holds several images of many lesions, and a lesion counts once, with
the mean of its images' probabilities. Two presentations of the same validation lesions:

- ``stretched``: each lesion's ``ham10000-224`` copy (made from the 600x450 original, squashed to a
  square) stretched back to 4:3 at 299x224 — the sharpest 4:3 version of these lesions here, and
  how real photos arrive;
- ``200x150``: every ``ham10000-200x150`` image of the lesion (softer: JPEG quality about 75).

Intervals are 95 % bootstrap intervals, lesions resampled within each class
(:func:`lab.evaluation.bootstrap_intervals`). Each release after the first is also compared with
the first *paired* (:func:`paired_differences`): the same resampled lesions score both, so the
interval of the difference leaves out what both releases share (which lesions were drawn), and is
much narrower than the two releases' own intervals side by side.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from handler.checkpoint import load_checkpoint
from handler.decision import decide
from handler.inference import prepare_for_serving
from handler.settings import HandlerSettings
from lab.data import LabelledImage
from lab.evaluation import (bootstrap_intervals, class_resamples, classification_report, percentile_interval,
                            serve_files)

PRESENTATIONS: tuple[str, ...] = ("stretched", "200x150")
STRETCHED_SIZE = (299, 224)  # width, height: a 224x224 squashed copy back at 4:3
HEADLINE = ("balanced_accuracy", "macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity", "referral_rate")


def stretched_copies(records: Sequence[LabelledImage], folder: str | os.PathLike) -> list[LabelledImage]:
    """Each record's image stretched to :data:`STRETCHED_SIZE` as a lossless PNG in ``folder`` (made once)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for record in records:
        target = folder / f"{record.image_id}.png"
        if not target.exists():
            with Image.open(record.path) as image:
                image.convert("RGB").resize(STRETCHED_SIZE, Image.Resampling.BICUBIC).save(target)
        copies.append(dataclasses.replace(record, path=str(target)))
    return copies


def per_lesion(probabilities: np.ndarray, records: Sequence[LabelledImage]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean probabilities per lesion, with each lesion's label and id (in first-seen order)."""
    rows: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        rows[record.lesion_id].append(index)
    lesions = list(rows)
    labels = np.array([records[rows[lesion][0]].label for lesion in lesions])
    return np.stack([probabilities[rows[lesion]].mean(0) for lesion in lesions]), labels, lesions


@dataclasses.dataclass
class LesionCalls:
    """One release's answers on one presentation, a row per lesion (in the records' first-seen order)."""

    checkpoint: str
    version: str
    images: int
    lesions: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    calls: np.ndarray
    referral_threshold: float


def serve_lesions(checkpoint: str | os.PathLike, records: Sequence[LabelledImage], settings: HandlerSettings,
                  batch_size: int = 32) -> LesionCalls:
    """One release on one presentation as it serves, per lesion.

    The referral threshold is the release's own measured operating point (``meta.operating_point``),
    the decision rule and TTA mode the serving settings'.
    """
    loaded = load_checkpoint(checkpoint)
    settings = dataclasses.replace(settings, torch_threads=0, require_input_gate=False)
    prepare_for_serving(loaded, settings)
    point = loaded.meta.operating_point
    threshold = point.referral_threshold if point is not None else settings.referral_threshold
    served = serve_files(loaded, [r.path for r in records], settings.tta, batch_size, settings.decode_limits)
    probabilities, labels, lesions = per_lesion(served.probabilities.numpy(), records)
    calls = decide(torch.from_numpy(probabilities), settings.decision_rule,
                   loaded.calibration(settings.tta).class_prior).numpy()
    return LesionCalls(str(checkpoint), loaded.version, len(records), lesions, labels, probabilities, calls, threshold)


def lesion_report(answers: LesionCalls, bootstrap: int = 1000) -> dict[str, Any]:
    """The headline figures of :func:`serve_lesions`' answers, with bootstrap intervals."""
    report = classification_report(answers.probabilities, answers.labels, answers.referral_threshold, answers.calls)
    figures = {key: report[key] for key in HEADLINE}
    intervals = (bootstrap_intervals(answers.probabilities, answers.labels, answers.calls, answers.referral_threshold,
                                     bootstrap)["intervals"] if bootstrap else {})
    return {"checkpoint": answers.checkpoint, "version": answers.version, "images": answers.images,
            "lesions": len(answers.lesions), "referral_threshold": answers.referral_threshold, "figures": figures,
            "intervals": {key: value for key, value in intervals.items() if key in HEADLINE},
            "per_class_recall": {code: row["recall"] for code, row in report["per_class"].items()}}


def paired_differences(first: LesionCalls, other: LesionCalls, resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """``other`` minus ``first`` on each headline figure, with a paired bootstrap interval.

    Each resample draws lesions within each class (as :func:`lab.evaluation.bootstrap_intervals`
    does) and scores both releases on the same draw, so the interval measures how far apart the
    two releases are, not how uncertain each figure is alone.

    Returns:
        ``{figure: {"difference", "low", "high"}}`` for the figures both releases define.

    Raises:
        ValueError: The two were not measured on the same lesions in the same order.
    """
    if first.lesions != other.lesions or not np.array_equal(first.labels, other.labels):
        raise ValueError("paired differences need both releases measured on the same lesions")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")

    def figures(answers: LesionCalls, rows: np.ndarray) -> dict[str, Any]:
        return classification_report(answers.probabilities[rows], answers.labels[rows], answers.referral_threshold,
                                     answers.calls[rows])

    everything = np.arange(len(first.lesions))
    full_first, full_other = figures(first, everything), figures(other, everything)
    keys = [key for key in HEADLINE if full_first[key] is not None and full_other[key] is not None]
    draws = np.empty((resamples, len(keys)))
    for row, rows in enumerate(class_resamples(first.labels, resamples, seed)):
        one, two = figures(first, rows), figures(other, rows)
        draws[row] = [two[key] - one[key] for key in keys]
    low, high = percentile_interval(draws, confidence)
    return {key: {"difference": float(full_other[key] - full_first[key]), "low": float(a), "high": float(b)}
            for key, a, b in zip(keys, low, high)}


def format_comparison(reports: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per (presentation, release), the headline figures with their intervals."""
    lines = ["| presentation | release | lesions | balanced accuracy | macro AUC | ECE | melanoma sensitivity "
             "| melanoma specificity | referred |", "|---|---|---|---|---|---|---|---|---|"]
    for presentation, by_release in reports.items():
        for name, report in by_release.items():
            cells = []
            for key in HEADLINE:
                value = report["figures"][key]
                low_high = report["intervals"].get(key)
                cells.append(f"{value:.3f}" + (f" ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else ""))
            lines.append(f"| {presentation} | {name} ({report['version']}) | {report['lesions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_differences(differences: dict[str, dict[str, dict[str, dict[str, float]]]], first: str) -> str:
    """A markdown table of :func:`paired_differences`: one row per (presentation, release), minus ``first``."""
    lines = [f"| presentation | release minus {first} | " + " | ".join(key.replace("_", " ") for key in HEADLINE) + " |",
             "|---|---|" + "---|" * len(HEADLINE)]
    for presentation, by_release in differences.items():
        for name, figures in by_release.items():
            cells = [f"{row['difference']:+.3f} ({row['low']:+.3f} to {row['high']:+.3f})" if (row := figures.get(key))
                     else "-" for key in HEADLINE]
            lines.append(f"| {presentation} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
