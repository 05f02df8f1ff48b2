"""Classification metrics, and images run through the serving path, for training, calibration and evaluation.

The serving path for labelled image files is here once: :func:`serve_files` (calibrated
probabilities, as the service computes them) and :func:`logits_for_files` (raw logits, to fit
calibrations on), both through the serving decode, preprocessing, runtime and forward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from handler.checkpoint import Checkpoint, LoadedModel, model_from_checkpoint
from handler.inference import predict_probabilities, run_model
from handler.labels import CLASS_CODES, REFERRAL_CLASSES, class_index
from handler.preprocessing import DecodeLimits, load_model_input


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


# The melanoma sensitivity the referral flag must keep: every operating point is the highest
# threshold on malignant_probability that still flags this share of the validation melanomas.
TARGET_MELANOMA_SENSITIVITY = 0.85


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
    draws = np.empty((resamples, len(keys)))
    for row, rows in enumerate(class_resamples(labels, resamples, seed)):
        report = classification_report(probabilities[rows], labels[rows], referral_threshold, predictions[rows])
        draws[row] = [report[key] for key in keys]
    low, high = percentile_interval(draws, confidence)
    return {"resamples": resamples, "confidence": confidence, "seed": seed,
            "intervals": {key: [float(a), float(b)] for key, a, b in zip(keys, low, high)}}


def class_resamples(labels: np.ndarray, resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``resamples`` bootstrap draws, each class's rows drawn with replacement to its own size."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == index) for index in np.unique(labels)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(members, size=len(members)) for members in by_class])


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided percentile interval of each column of ``draws`` at ``confidence``."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return low, high


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


HEADLINE_KEYS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "macro_auc", "ece", "melanoma_sensitivity",
                                  "melanoma_specificity", "malignant_sensitivity", "referral_rate", "melanoma_threshold")


def headline_figures(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None,
                     balanced_calls: np.ndarray | None = None) -> dict[str, Any]:
    """The headline figures (:data:`HEADLINE_KEYS`) of the most-probable-class rule, plus the balanced rule's
    balanced and plain accuracy under ``"balanced_rule"`` when its calls are given."""
    report = classification_report(probabilities, labels, threshold)
    figures = {key: report[key] for key in HEADLINE_KEYS}
    if balanced_calls is not None:
        balanced = classification_report(probabilities, labels, threshold, balanced_calls)
        figures |= {"balanced_rule": {key: balanced[key] for key in ("balanced_accuracy", "accuracy")}}
    return figures


def input_batches(paths: Sequence[str | Path], loaded: LoadedModel, batch_size: int = 32,
                  limits: DecodeLimits = DecodeLimits()) -> Iterator[torch.Tensor]:
    """``uint8`` model-input batches of image files, decoded and preprocessed as the service does."""
    for start in range(0, len(paths), batch_size):
        yield torch.stack([load_model_input(Path(path).read_bytes(), loaded.preprocess, limits)[0]
                           for path in paths[start:start + batch_size]])


@dataclass
class ServedImages:
    """What the service computes for each image of a set, before it writes the answers.

    Attributes:
        probabilities: (N, 7) calibrated probabilities, in the order of the files.
        gate_scores: (N,) out-of-distribution scores of the model's input gate, or None
            when the checkpoint has no gate.
        gate_threshold: The gate's distance threshold (a score above it is refused), or None.
        gate_method: The gate's method name, or None.
        gate_refused: (N,) bool: the gate's verdict (distance or modality head), or None.
        gate_reasons: Per image, why the gate refuses it (``clinical``, ``other``) or None.
    """

    probabilities: torch.Tensor
    gate_scores: torch.Tensor | None = None
    gate_threshold: float | None = None
    gate_method: str | None = None
    gate_refused: torch.Tensor | None = None
    gate_reasons: list[str | None] | None = None

    @property
    def refused(self) -> torch.Tensor:
        """(N,) bool: which images the service's input gate would refuse (none without a gate)."""
        if self.gate_refused is not None:
            return self.gate_refused
        if self.gate_scores is None:
            return torch.zeros(len(self.probabilities), dtype=torch.bool)
        return self.gate_scores > self.gate_threshold


def serve_files(loaded: LoadedModel, paths: Sequence[str | Path], tta: str = "none", batch_size: int = 32,
                limits: DecodeLimits = DecodeLimits()) -> ServedImages:
    """Run image files through the per-image serving path: decode, preprocessing, runtime, calibration.

    The one place that evaluation serves images (:func:`handler.inference.predict_probabilities`,
    what :func:`handler.inference.handle_batch` computes for each request); what the service
    decides per image beyond the probabilities (such as the input gate's refusals) belongs here.

    Args:
        loaded: The model, after :func:`handler.inference.prepare_for_serving` to run it as served.
        paths: Image files.
        tta: Test-time augmentation mode (its calibration is applied).
        batch_size: Images per forward pass.
        limits: The served decode limits.
    """
    chunks, scores, refused, reasons = [], [], [], []
    for batch in input_batches(paths, loaded, batch_size, limits):
        chunks.append(predict_probabilities(loaded, batch, tta))
        if loaded.gate is not None:
            assessment = loaded.gate.assess(batch)
            scores.append(assessment.score.cpu())
            refused.append(assessment.refused.cpu())
            reasons += [assessment.reason(i) for i in range(len(batch))]
    probabilities = torch.cat(chunks) if chunks else torch.empty(0, len(CLASS_CODES))
    if loaded.gate is None:
        return ServedImages(probabilities)
    return ServedImages(probabilities, torch.cat(scores) if scores else torch.empty(0), float(loaded.gate.threshold),
                        loaded.gate.method, torch.cat(refused) if refused else torch.empty(0, dtype=torch.bool), reasons)


def gate_scores_of_files(loaded: LoadedModel, paths: Sequence[str | Path], batch_size: int = 32,
                         limits: DecodeLimits = DecodeLimits()) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str | None]]:
    """The input gate's verdicts on image files of any kind, as served; files the service refuses
    before the gate (undecodable, bad dimensions) are listed apart by name.

    Returns:
        ``(distance scores of the decodable files, names of the files refused before the gate,
        refused (bool) per decodable file, reason per decodable file: clinical, other or None)``.
    """
    from handler.errors import RequestError

    kept, refused_early = [], []
    for path in paths:
        try:
            kept.append(load_model_input(Path(path).read_bytes(), loaded.preprocess, limits)[0])
        except RequestError:
            refused_early.append(Path(path).name)
    scores, refused, reasons = [], [], []
    for start in range(0, len(kept), batch_size):
        assessment = loaded.gate.assess(torch.stack(kept[start:start + batch_size]))
        scores.append(assessment.score.cpu())
        refused.append(assessment.refused.cpu())
        reasons += [assessment.reason(i) for i in range(len(assessment.score))]
    return ((torch.cat(scores) if scores else torch.empty(0)), refused_early,
            (torch.cat(refused) if refused else torch.empty(0, dtype=torch.bool)), reasons)


@torch.inference_mode()
def logits_for_files(loaded: LoadedModel, paths: Sequence[str | Path], tta: str = "none", batch_size: int = 32) -> torch.Tensor:
    """Raw (uncalibrated) logits for image files, through the serving decode, preprocessing and forward pass.

    Args:
        loaded: A :class:`handler.checkpoint.LoadedModel`.
        paths: Image files.
        tta: Test-time augmentation mode.
        batch_size: Images per forward pass.

    Returns:
        (N, 7) float32 logits on the CPU, in the order of ``paths``.
    """
    chunks = [run_model(loaded, batch, tta)[1].cpu() for batch in input_batches(paths, loaded, batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, len(CLASS_CODES))


def cached_logits(checkpoint: Checkpoint, key: str, paths: Sequence[str | Path], image_ids: Sequence[str],
                  cache_dir: Path | None, batch_size: int = 32) -> torch.Tensor:
    """One network's (N, 7) raw logits of image files (:func:`logits_for_files`), read from or written to a cache.

    Args:
        checkpoint: The network.
        key: What names the network in the cache (e.g. its file digest).
        paths: Image files.
        image_ids: Their ids, which name the image set in the cache.
        cache_dir: The cache folder; None computes the logits every time.
        batch_size: Images per forward pass.
    """
    subset = hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:16]
    cached = cache_dir / f"{key}-{subset}.pt" if cache_dir is not None else None
    if cached is not None and cached.exists():
        return torch.load(cached, weights_only=True)["logits"]
    logits = logits_for_files(model_from_checkpoint(checkpoint), paths, "none", batch_size)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": logits, "image_ids": list(image_ids)}, cached)
    return logits
