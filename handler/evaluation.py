"""Classification metrics used by training (validation) and the evaluation CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from handler.labels import CLASS_CODES, REFERRAL_CLASSES, class_index


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Top-label confidence against accuracy in equal-width confidence bins.

    Returns:
        One dict per non-empty bin: ``low``, ``high``, ``count``, ``confidence`` (mean),
        ``accuracy``.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            rows.append({"low": float(low), "high": float(high), "count": int(in_bin.sum()),
                         "confidence": float(confidence[in_bin].mean()), "accuracy": float(correct[in_bin].mean())})
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins."""
    total = len(labels)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in reliability_bins(probabilities, labels, bins)))


def malignant_probability(probabilities: np.ndarray) -> np.ndarray:
    """p(mel) + p(bcc) + p(akiec) per row: the score the service's referral flag thresholds."""
    return probabilities[:, [class_index(code) for code in REFERRAL_CLASSES]].sum(axis=1)


def referral_threshold_for_sensitivity(probabilities: np.ndarray, labels: np.ndarray, sensitivity: float,
                                       step: float = 0.01) -> float:
    """The highest referral threshold (on a grid) that flags at least ``sensitivity`` of melanomas.

    Args:
        probabilities: (N, 7) calibrated probabilities.
        labels: (N,) true class indices; must include melanomas.
        sensitivity: Required fraction of melanomas with ``malignant_probability >= threshold``.
        step: Grid spacing; thresholds are multiples of it, so configs stay readable.

    Returns:
        The threshold.
    """
    scores = malignant_probability(probabilities)[labels == class_index("mel")]
    if len(scores) == 0:
        raise ValueError("no melanomas among the labels; cannot choose an operating point")
    candidates = np.round(np.arange(step, 1.0, step), 6)
    meeting = [t for t in candidates if (scores >= t).mean() >= sensitivity]
    return float(max(meeting)) if meeting else float(step)


def one_vs_rest_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positives`` against the rest.

    The Mann-Whitney rank statistic, ties counted as half, which equals
    ``sklearn.metrics.roc_auc_score``; without its input validation it is fast enough for
    :func:`bootstrap_intervals`' thousands of reports.
    """
    from scipy.stats import rankdata

    n_positive = int(positives.sum())
    n_negative = len(positives) - n_positive
    rank_sum = float(rankdata(scores)[positives].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def classification_report(probabilities: np.ndarray, labels: np.ndarray, referral_threshold: float | None = None,
                          predictions: np.ndarray | None = None) -> dict[str, Any]:
    """Compute the service's quality metrics.

    Args:
        probabilities: (N, 7) predicted probabilities in :data:`CLASS_CODES` order.
        labels: (N,) true class indices.
        predictions: (N,) the class each image is called (see :mod:`handler.decision`);
            None calls the most probable class. Accuracy, balanced accuracy, per-class
            recall/precision and the confusion matrix use these; AUC and ECE use the
            probabilities.
        referral_threshold: If given, melanoma sensitivity/specificity are measured for the
            service's referral flag ``malignant_probability >= threshold`` (see
            :func:`malignant_probability`); otherwise for "melanoma is the top class".

    Returns:
        A JSON-ready dict: ``accuracy``, ``balanced_accuracy``, ``macro_auc``, ``ece``,
        ``per_class`` (recall, precision, auc, support), ``confusion_matrix`` (rows are
        true classes), ``melanoma_sensitivity``, ``melanoma_specificity`` (melanoma against
        every other class), ``malignant_sensitivity`` (mel, bcc and akiec flagged),
        ``referral_rate`` (fraction of all images flagged), ``n_images``.
    """
    labels = np.asarray(labels)
    predictions = probabilities.argmax(axis=1) if predictions is None else np.asarray(predictions)
    k = len(CLASS_CODES)
    matrix = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(k), where=support > 0)
    precision = np.divide(np.diag(matrix), predicted, out=np.zeros(k), where=predicted > 0)
    present = support > 0
    aucs: list[float | None] = []
    for index in range(k):
        positives = labels == index
        aucs.append(one_vs_rest_auc(probabilities[:, index], positives) if 0 < positives.sum() < len(labels) else None)
    mel = class_index("mel")
    is_mel = labels == mel
    flagged = malignant_probability(probabilities) >= referral_threshold if referral_threshold is not None else predictions == mel
    is_malignant = np.isin(labels, [class_index(code) for code in REFERRAL_CLASSES])
    valid_aucs = [a for a in aucs if a is not None]
    return {
        "n_images": int(len(labels)),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_auc": float(np.mean(valid_aucs)) if valid_aucs else None,
        "ece": expected_calibration_error(probabilities, labels),
        "melanoma_sensitivity": float(flagged[is_mel].mean()) if is_mel.any() else None,
        "melanoma_specificity": float((~flagged[~is_mel]).mean()) if (~is_mel).any() else None,
        "melanoma_threshold": referral_threshold,
        "malignant_sensitivity": float(flagged[is_malignant].mean()) if is_malignant.any() else None,
        "referral_rate": float(flagged.mean()),
        "per_class": {
            code: {"recall": float(recall[i]), "precision": float(precision[i]), "auc": aucs[i], "support": int(support[i])}
            for i, code in enumerate(CLASS_CODES)
        },
        "confusion_matrix": matrix.tolist(),
    }


BOOTSTRAP_KEYS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "macro_auc", "ece",
                                   "melanoma_sensitivity", "melanoma_specificity")


def bootstrap_intervals(probabilities: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                        referral_threshold: float | None = None, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, Any]:
    """Percentile confidence intervals of the headline figures, by resampling images within each class.

    Resampling within each class keeps every class's support fixed, so the intervals show how
    much the figures move with *which* images of each class were drawn. That is the dominant
    uncertainty of balanced accuracy on HAM10000, where a validation split holds a handful of
    dermatofibromas and each one moves the figure by several points.

    Args:
        probabilities: (N, 7) predicted probabilities.
        labels: (N,) true class indices.
        predictions: (N,) the class each image is called.
        referral_threshold: As in :func:`classification_report`. A threshold chosen on the same
            images makes the melanoma intervals optimistic.
        resamples: Bootstrap resamples.
        confidence: Two-sided coverage of each interval.
        seed: Seed of the resampling.

    Returns:
        ``{"resamples", "confidence", "seed", "intervals": {key: [low, high]}}`` for each of
        :data:`BOOTSTRAP_KEYS` that the data defines (a key that is None in the full report,
        such as melanoma figures without melanomas, is left out).
    """
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    full = classification_report(probabilities, labels, referral_threshold, predictions)
    keys = [key for key in BOOTSTRAP_KEYS if full[key] is not None]
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == index) for index in np.unique(labels)]
    draws = np.empty((resamples, len(keys)))
    for row in range(resamples):
        rows = np.concatenate([rng.choice(members, size=len(members)) for members in by_class])
        report = classification_report(probabilities[rows], labels[rows], referral_threshold, predictions[rows])
        draws[row] = [report[key] for key in keys]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return {"resamples": resamples, "confidence": confidence, "seed": seed,
            "intervals": {key: [float(a), float(b)] for key, a, b in zip(keys, low, high)}}


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary table with the confusion matrix."""
    lines = [
        f"images {report['n_images']}  accuracy {report['accuracy']:.4f}  balanced accuracy {report['balanced_accuracy']:.4f}  "
        f"macro AUC {report['macro_auc'] if report['macro_auc'] is None else round(report['macro_auc'], 4)}  ECE {report['ece']:.4f}",
    ]
    if report["melanoma_sensitivity"] is not None:
        rule = (f"malignant_probability >= {report['melanoma_threshold']}" if report["melanoma_threshold"] is not None
                else "mel is the top class")
        lines.append(f"melanoma sensitivity {report['melanoma_sensitivity']:.4f}  specificity {report['melanoma_specificity']:.4f}  "
                     f"referral rate {report['referral_rate']:.4f}  ({rule})")
    bootstrap = report.get("bootstrap")
    if bootstrap:
        lines.append(f"{bootstrap['confidence']:.0%} intervals ({bootstrap['resamples']} resamples within each class): " + "  ".join(
            f"{key} {low:.3f}-{high:.3f}" for key, (low, high) in bootstrap["intervals"].items()))
    lines.append(f"{'class':<7}{'recall':>8}{'precision':>11}{'auc':>8}{'support':>9}")
    for code, row in report["per_class"].items():
        auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
        lines.append(f"{code:<7}{row['recall']:>8.3f}{row['precision']:>11.3f}{auc:>8}{row['support']:>9}")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    lines.append("       " + "".join(f"{code:>7}" for code in CLASS_CODES))
    for code, row in zip(CLASS_CODES, report["confusion_matrix"]):
        lines.append(f"{code:<7}" + "".join(f"{value:>7}" for value in row))
    return "\n".join(lines)


@torch.inference_mode()
def logits_for_files(loaded: Any, paths: Sequence[str | Path], tta: str = "none", batch_size: int = 32) -> torch.Tensor:
    """Raw (uncalibrated) logits for image files, through the serving decode, preprocessing and forward pass.

    Args:
        loaded: A :class:`handler.model.LoadedModel`.
        paths: Image files.
        tta: Test-time augmentation mode.
        batch_size: Images per forward pass.

    Returns:
        (N, 7) float32 logits on the CPU, in the order of ``paths``.
    """
    from handler.inference import run_model
    from handler.preprocessing import load_model_input

    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = [load_model_input(Path(path).read_bytes(), loaded.preprocess)[0] for path in paths[start:start + batch_size]]
        chunks.append(run_model(loaded, torch.stack(batch), tta)[1].cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, len(CLASS_CODES))
