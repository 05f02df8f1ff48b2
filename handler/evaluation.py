"""Classification metrics used by training (validation) and the evaluation CLI."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from handler.labels import CLASS_CODES, class_index


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def classification_report(probabilities: np.ndarray, labels: np.ndarray, referral_threshold: float | None = None) -> dict[str, Any]:
    """Compute the service's quality metrics.

    Args:
        probabilities: (N, 7) predicted probabilities in :data:`CLASS_CODES` order.
        labels: (N,) true class indices.
        referral_threshold: If given, melanoma sensitivity/specificity are measured for the
            flag ``p(mel) >= threshold``; otherwise for "melanoma is the top class".

    Returns:
        A JSON-ready dict: ``accuracy``, ``balanced_accuracy``, ``macro_auc``, ``ece``,
        ``per_class`` (recall, precision, auc, support), ``confusion_matrix`` (rows are
        true classes), ``melanoma_sensitivity``, ``melanoma_specificity``, ``n_images``.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    predictions = probabilities.argmax(axis=1)
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
    flagged = probabilities[:, mel] >= referral_threshold if referral_threshold is not None else predictions == mel
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
        "per_class": {
            code: {"recall": float(recall[i]), "precision": float(precision[i]), "auc": aucs[i], "support": int(support[i])}
            for i, code in enumerate(CLASS_CODES)
        },
        "confusion_matrix": matrix.tolist(),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Fit the softmax temperature that minimizes validation negative log-likelihood.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) true class indices.
        max_iter: L-BFGS iterations.

    Returns:
        The temperature T; calibrated probabilities are ``softmax(logits / T)``.
    """
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary table with the confusion matrix."""
    lines = [
        f"images {report['n_images']}  accuracy {report['accuracy']:.4f}  balanced accuracy {report['balanced_accuracy']:.4f}  "
        f"macro AUC {report['macro_auc'] if report['macro_auc'] is None else round(report['macro_auc'], 4)}  ECE {report['ece']:.4f}",
        f"{'class':<7}{'recall':>8}{'precision':>11}{'auc':>8}{'support':>9}",
    ]
    for code, row in report["per_class"].items():
        auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
        lines.append(f"{code:<7}{row['recall']:>8.3f}{row['precision']:>11.3f}{auc:>8}{row['support']:>9}")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    lines.append("       " + "".join(f"{code:>7}" for code in CLASS_CODES))
    for code, row in zip(CLASS_CODES, report["confusion_matrix"]):
        lines.append(f"{code:<7}" + "".join(f"{value:>7}" for value in row))
    return "\n".join(lines)
