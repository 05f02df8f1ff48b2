"""Cross-fitting on the validation split: calibrations scored only on images they were not fitted on.

A calibration fitted and scored on the same images flatters itself, so every out-of-fold figure
here calibrates on the other folds of a seeded, class-stratified partition (:func:`fold_partition`)
and scores the held-out fold (:func:`calibrated_elsewhere`). ``scripts/calibrate.py`` reports a
checkpoint's figures this way (:func:`measure_calibration`); ``scripts/compare_members.py``
measures each combination of networks the same way (:func:`measure_combination`) and the
member-picking procedure itself by nested cross-validation (:func:`selection_aware_balanced_accuracy`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold

from handler.calibration import Calibration
from handler.decision import decide
from lab.calibration import fit_calibration
from lab.evaluation import (TARGET_MELANOMA_SENSITIVITY, bootstrap_intervals, classification_report, headline_figures,
                            referral_threshold_for_sensitivity)

REPEATED_KEYS = ("balanced_accuracy", "macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity", "referral_rate")


def fold_partition(labels: np.ndarray, folds: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The seeded, class-stratified ``(fit_rows, score_rows)`` pairs of one fold partition."""
    return StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)


def calibrated_elsewhere(fit_logits: torch.Tensor, fit_labels: np.ndarray,
                         score_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and balanced-rule calls for images whose calibration was fitted on others.

    Returns:
        The calibrated (M, K) probabilities of ``score_logits`` and their (M,) balanced-rule
        calls, made with the class prior fitted on ``fit_labels``.
    """
    calibration = fit_calibration(fit_logits, torch.as_tensor(fit_labels))
    probabilities = calibration.apply(score_logits)
    return probabilities, decide(probabilities, "balanced", calibration.class_prior)


def out_of_fold_probabilities(logits: torch.Tensor, labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities where each image's calibration was fitted without it.

    Returns:
        The (N, K) probabilities and the (N,) balanced-rule calls, each image's made with its
        fold's class prior.
    """
    probabilities = np.zeros(tuple(logits.shape), dtype=np.float32)
    balanced_calls = np.zeros(len(labels), dtype=np.int64)
    for fit_rows, score_rows in fold_partition(labels, folds, seed):
        fold_probabilities, fold_calls = calibrated_elsewhere(logits[fit_rows], labels[fit_rows], logits[score_rows])
        probabilities[score_rows] = fold_probabilities.numpy()
        balanced_calls[score_rows] = fold_calls.numpy()
    return probabilities, balanced_calls


def repeated_out_of_fold(logits: torch.Tensor, labels: np.ndarray, folds: int, seeds: range,
                         threshold: float) -> dict[str, Any]:
    """Mean and standard deviation of the out-of-fold figures over several fold partitions.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) true class indices.
        folds: Folds per partition.
        seeds: One partition per seed.
        threshold: The referral threshold the melanoma figures are measured at.

    Returns:
        ``{"repeats", "folds", "mean", "sd"}``; ``mean``/``sd`` hold the balanced rule's
        balanced accuracy and the threshold-free and melanoma figures (:data:`REPEATED_KEYS`).
    """
    rows = []
    for seed in seeds:
        probabilities, balanced_calls = out_of_fold_probabilities(logits, labels, folds, seed)
        report = classification_report(probabilities, labels, threshold, balanced_calls)
        rows.append([report[key] for key in REPEATED_KEYS])
    table = np.asarray(rows, dtype=np.float64)
    return {"repeats": len(seeds), "folds": folds, "mean": dict(zip(REPEATED_KEYS, table.mean(0).tolist())),
            "sd": dict(zip(REPEATED_KEYS, table.std(0).tolist()))}


def measure_calibration(logits: torch.Tensor, labels: np.ndarray, *, folds: int = 5, seed: int = 0, repeats: int = 10,
                        target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY, bootstrap: int = 1000) -> tuple[Calibration, dict[str, Any]]:
    """Fit the calibration of one set of validation logits and measure it, in sample and out of fold.

    The referral threshold is the highest that keeps ``target_sensitivity`` of melanomas
    flagged on the out-of-fold probabilities (one partition, seed ``seed``).

    Args:
        logits: (N, K) raw validation logits (one TTA mode).
        labels: (N,) true class indices.
        folds: Folds per partition.
        seed: Seed of the first partition and of the bootstrap.
        repeats: Partitions for the repeated figures (seeds ``seed .. seed + repeats - 1``).
        target_sensitivity: The melanoma sensitivity the referral threshold must keep.
        bootstrap: Resamples for the 95% intervals of the out-of-fold figures.

    Returns:
        The calibration fitted on all images, and its figures: ``calibration``, ``in_sample``,
        ``out_of_fold``, ``out_of_fold_bootstrap``, ``out_of_fold_repeated``, ``temperature_only``,
        ``uncalibrated`` and ``referral_threshold``.
    """
    calibration = fit_calibration(logits, torch.as_tensor(labels))
    out_of_fold, out_of_fold_calls = out_of_fold_probabilities(logits, labels, folds, seed)
    threshold = referral_threshold_for_sensitivity(out_of_fold, labels, target_sensitivity)
    temperature_only = fit_calibration(logits, torch.as_tensor(labels), class_bias=False)
    in_sample = calibration.apply(logits)
    in_sample_calls = decide(in_sample, "balanced", calibration.class_prior).numpy()
    figures = {
        "calibration": calibration.to_dict(),
        "in_sample": headline_figures(in_sample.numpy(), labels, threshold, in_sample_calls),
        "out_of_fold": headline_figures(out_of_fold, labels, threshold, out_of_fold_calls),
        "out_of_fold_bootstrap": bootstrap_intervals(out_of_fold, labels, out_of_fold_calls, threshold, bootstrap,
                                                     seed=seed),
        "out_of_fold_repeated": repeated_out_of_fold(logits, labels, folds, range(seed, seed + repeats), threshold),
        "temperature_only": headline_figures(temperature_only.apply(logits).numpy(), labels, None)
                            | {"temperature": temperature_only.temperature},
        "uncalibrated": headline_figures(torch.softmax(logits, 1).numpy(), labels, None),
        "referral_threshold": threshold,
    }
    return calibration, figures


def measure_combination(logits: torch.Tensor, labels: np.ndarray, *, folds: int = 5, seed: int = 0, repeats: int = 10,
                        target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY) -> dict[str, Any]:
    """:func:`measure_calibration`'s referral threshold and repeated out-of-fold figures of one set of logits.

    Returns:
        ``{"referral_threshold", "repeats", "folds", "mean", "sd"}``.
    """
    probabilities, _ = out_of_fold_probabilities(logits, labels, folds, seed)
    threshold = referral_threshold_for_sensitivity(probabilities, labels, target_sensitivity)
    repeated = repeated_out_of_fold(logits, labels, folds, range(seed, seed + repeats), threshold)
    return {"referral_threshold": threshold, **repeated}


def selection_aware_balanced_accuracy(averaged: dict[tuple[str, ...], torch.Tensor], labels: np.ndarray,
                                      folds: int, seeds: range) -> dict[str, Any]:
    """Balanced accuracy of picking the best combination, on images the pick never saw.

    For each outer fold, every combination is ranked by its out-of-fold balanced accuracy on the
    other folds (inner cross-fitting, one partition), and the winner, calibrated on those folds,
    makes the balanced-rule calls for the outer fold.

    Args:
        averaged: Each combination's (N, K) averaged validation logits.
        labels: (N,) true class indices.
        folds: Folds of both the outer and the inner partitions.
        seeds: One outer partition per seed.

    Returns:
        ``{"repeats", "folds", "mean", "sd", "picks"}``: balanced accuracy over the outer
        partitions, and how often each combination was picked.
    """
    scores, picks = [], collections.Counter()
    for seed in seeds:
        calls = np.zeros(len(labels), dtype=np.int64)
        for fit_rows, score_rows in fold_partition(labels, folds, seed):
            inner = {combination: balanced_accuracy_score(
                         labels[fit_rows], out_of_fold_probabilities(logits[fit_rows], labels[fit_rows], folds, seed)[1])
                     for combination, logits in averaged.items()}
            picked = max(inner, key=inner.get)
            picks[" + ".join(picked)] += 1
            _, fold_calls = calibrated_elsewhere(averaged[picked][fit_rows], labels[fit_rows], averaged[picked][score_rows])
            calls[score_rows] = fold_calls.numpy()
        scores.append(balanced_accuracy_score(labels, calls))
    return {"repeats": len(seeds), "folds": folds, "mean": float(np.mean(scores)), "sd": float(np.std(scores)),
            "picks": dict(picks.most_common())}
