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
    from sklearn.metrics import confusion_matrix, roc_auc_score

    predictions = probabilities.argmax(axis=1) if predictions is None else np.asarray(predictions)
    k = len(CLASS_CODES)
    matrix = confusion_matrix(labels, predictions, labels=list(range(k)))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(k), where=support > 0)
    precision = np.divide(np.diag(matrix), predicted, out=np.zeros(k), where=predicted > 0)
    present = support > 0
    aucs: list[float | None] = []
    for index in range(k):
        positives = labels == index
        aucs.append(float(roc_auc_score(positives, probabilities[:, index])) if 0 < positives.sum() < len(labels) else None)
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
