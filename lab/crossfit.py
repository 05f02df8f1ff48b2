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
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold

from handler.calibration import Calibration
from handler.checkpoint import Checkpoint, OperatingPoint, model_from_checkpoint
from handler.decision import decide
from lab.calibration import fit_calibration
from lab.evaluation import (TARGET_MELANOMA_SENSITIVITY, bootstrap_intervals, classification_report, headline_figures,
                            logits_for_files, referral_threshold_for_sensitivity)

REPEATED_KEYS = ("balanced_accuracy", "macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity", "referral_rate")


def fold_partition(labels: np.ndarray, folds: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The seeded, class-stratified ``(fit_rows, score_rows)`` pairs of one fold partition."""
    return StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)


def calibrated_elsewhere(fit_logits: torch.Tensor, fit_labels: np.ndarray, score_logits: torch.Tensor,
                         bias_method: str = "fitted") -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and balanced-rule calls for images whose calibration was fitted on others.

    Returns:
        The calibrated (M, K) probabilities of ``score_logits`` and their (M,) balanced-rule
        calls, made with the class prior fitted on ``fit_labels``.
    """
    calibration = fit_calibration(fit_logits, torch.as_tensor(fit_labels), bias_method=bias_method)
    probabilities = calibration.apply(score_logits)
    return probabilities, decide(probabilities, "balanced", calibration.class_prior)


def out_of_fold_probabilities(logits: torch.Tensor, labels: np.ndarray, folds: int, seed: int,
                              bias_method: str = "fitted") -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities where each image's calibration was fitted without it.

    Returns:
        The (N, K) probabilities and the (N,) balanced-rule calls, each image's made with its
        fold's class prior.
    """
    probabilities = np.zeros(tuple(logits.shape), dtype=np.float32)
    balanced_calls = np.zeros(len(labels), dtype=np.int64)
    for fit_rows, score_rows in fold_partition(labels, folds, seed):
        fold_probabilities, fold_calls = calibrated_elsewhere(logits[fit_rows], labels[fit_rows], logits[score_rows],
                                                              bias_method)
        probabilities[score_rows] = fold_probabilities.numpy()
        balanced_calls[score_rows] = fold_calls.numpy()
    return probabilities, balanced_calls


def repeated_out_of_fold(logits: torch.Tensor, labels: np.ndarray, folds: int, seeds: range,
                         threshold: float, bias_method: str = "fitted") -> dict[str, Any]:
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
        probabilities, balanced_calls = out_of_fold_probabilities(logits, labels, folds, seed, bias_method)
        report = classification_report(probabilities, labels, threshold, balanced_calls)
        rows.append([report[key] for key in REPEATED_KEYS])
    table = np.asarray(rows, dtype=np.float64)
    return {"repeats": len(seeds), "folds": folds, "mean": dict(zip(REPEATED_KEYS, table.mean(0).tolist())),
            "sd": dict(zip(REPEATED_KEYS, table.std(0).tolist()))}


def measure_calibration(logits: torch.Tensor, labels: np.ndarray, *, folds: int = 5, seed: int = 0, repeats: int = 10,
                        target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY, bootstrap: int = 1000,
                        bias_method: str = "fitted") -> tuple[Calibration, dict[str, Any]]:
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
        bias_method: How the class biases are set (:data:`lab.calibration.CLASS_BIAS_METHODS`).

    Returns:
        The calibration fitted on all images, and its figures: ``calibration``, ``in_sample``,
        ``out_of_fold``, ``out_of_fold_bootstrap``, ``out_of_fold_repeated``, ``temperature_only``,
        ``uncalibrated`` and ``referral_threshold``.
    """
    calibration = fit_calibration(logits, torch.as_tensor(labels), bias_method=bias_method)
    out_of_fold, out_of_fold_calls = out_of_fold_probabilities(logits, labels, folds, seed, bias_method)
    threshold = referral_threshold_for_sensitivity(out_of_fold, labels, target_sensitivity)
    temperature_only = fit_calibration(logits, torch.as_tensor(labels), class_bias=False)
    in_sample = calibration.apply(logits)
    in_sample_calls = decide(in_sample, "balanced", calibration.class_prior).numpy()
    figures = {
        "calibration": calibration.to_dict(),
        "class_bias_method": bias_method,
        "in_sample": headline_figures(in_sample.numpy(), labels, threshold, in_sample_calls),
        "out_of_fold": headline_figures(out_of_fold, labels, threshold, out_of_fold_calls),
        "out_of_fold_bootstrap": bootstrap_intervals(out_of_fold, labels, out_of_fold_calls, threshold, bootstrap,
                                                     seed=seed),
        "out_of_fold_repeated": repeated_out_of_fold(logits, labels, folds, range(seed, seed + repeats), threshold,
                                                     bias_method),
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


# --- scripts/calibrate.py and scripts/compare_members.py -------------------------------------------------------------

def recalibrate(checkpoint: Checkpoint, paths: list[str], labels: np.ndarray, tta_modes: Sequence[str],
                serving_tta: str = "none", *, name: str = "checkpoint", batch_size: int = 32, folds: int = 5, seed: int = 0,
                repeats: int = 10, target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY, bootstrap: int = 1000,
                command: str = "", bias_method: str = "fitted") -> dict[str, Any]:
    """Refit ``checkpoint``'s calibration of each of ``tta_modes`` on labelled image files and its operating point.

    Each mode's logits come through the serving decode, preprocessing and forward pass
    (:func:`lab.evaluation.logits_for_files`) and are measured by :func:`measure_calibration`; the
    operating point is ``serving_tta``'s out-of-fold referral threshold. ``checkpoint.meta`` is
    updated in place (the weights are untouched): the refitted modes replace their calibrations, a
    mode not refitted keeps its own (which is only right where its geometry gives the calibration
    images the same pixels: square copies under ``full_view`` or the centre crop), and a legacy meta
    ``temperature`` is superseded.

    Returns:
        Each mode's figures (with the seconds it took).
    """
    loaded = model_from_checkpoint(checkpoint, name=name)
    calibrations: dict[str, Calibration] = {}
    figures: dict[str, Any] = {}
    for tta in tta_modes:
        started = time.perf_counter()
        logits = logits_for_files(loaded, paths, tta, batch_size)
        calibrations[tta], measured = measure_calibration(logits, labels, folds=folds, seed=seed, repeats=repeats,
                                                          target_sensitivity=target_sensitivity, bootstrap=bootstrap,
                                                          bias_method=bias_method)
        figures[tta] = {**measured, "seconds": time.perf_counter() - started}
        print(f"TTA {tta}: {json.dumps(figures[tta])}", flush=True)
    serving = figures[serving_tta]
    point = OperatingPoint(serving_tta, serving["referral_threshold"], target_sensitivity, serving["out_of_fold"])
    kept = sorted(set(checkpoint.meta.calibration) - set(calibrations))
    if kept:
        print(f"calibrations of {kept} kept as they were (not in --tta-modes)", flush=True)
    provenance = {key: value for key, value in checkpoint.meta.provenance.items() if key != "temperature"}
    checkpoint.meta = dataclasses.replace(checkpoint.meta, calibration={**checkpoint.meta.calibration, **calibrations},
                                          operating_point=point,
                                          provenance={**provenance, "calibration_command": command})
    return figures


def calibration_text(figures: dict[str, Any], serving_tta: str) -> str:
    """The serving mode's operating point, repeated out-of-fold figures and intervals, as printed lines."""
    serving = figures[serving_tta]
    repeated = serving["out_of_fold_repeated"]
    return "\n".join([
        f"serving TTA {serving_tta}: referral_threshold {serving['referral_threshold']}, out-of-fold melanoma "
        f"sensitivity {serving['out_of_fold']['melanoma_sensitivity']:.3f}, specificity "
        f"{serving['out_of_fold']['melanoma_specificity']:.3f}, ECE {serving['out_of_fold']['ece']:.4f}",
        f"out of fold over {repeated['repeats']} partitions: " + ", ".join(
            f"{key} {repeated['mean'][key]:.4f} +- {repeated['sd'][key]:.4f}" for key in repeated["mean"]),
        "95% intervals of the out-of-fold figures (images resampled within each class): " + ", ".join(
            f"{key} {low:.3f}-{high:.3f}" for key, (low, high) in serving["out_of_fold_bootstrap"]["intervals"].items())])


def compare_combinations(logits: dict[str, torch.Tensor], labels: np.ndarray, *, min_size: int = 1, max_size: int = 0,
                         folds: int = 5, seed: int = 0, repeats: int = 10, nested_repeats: int = 3,
                         target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY) -> dict[str, Any]:
    """Every combination of networks (``min_size`` to ``max_size`` members, 0: all) as a logit average,
    calibrated and measured out of fold (:func:`measure_combination`), best balanced accuracy first; with
    ``nested_repeats``, the pick-then-calibrate procedure itself (:func:`selection_aware_balanced_accuracy`).

    Returns:
        ``{"n_images", "combinations"}``, plus ``"selection_aware"`` unless ``nested_repeats`` is 0.
    """
    largest = max_size or len(logits)
    averaged = {combination: torch.stack([logits[name] for name in combination]).mean(0)
                for size in range(max(min_size, 1), largest + 1)
                for combination in itertools.combinations(logits, size)}
    rows = [{"members": list(combination), **measure_combination(
                combination_logits, labels, folds=folds, seed=seed, repeats=repeats,
                target_sensitivity=target_sensitivity)}
            for combination, combination_logits in averaged.items()]
    rows.sort(key=lambda row: -row["mean"]["balanced_accuracy"])
    report = {"n_images": int(len(labels)), "combinations": rows}
    if nested_repeats:
        report["selection_aware"] = selection_aware_balanced_accuracy(averaged, labels, folds,
                                                                      range(seed, seed + nested_repeats))
    return report


def combinations_text(report: dict[str, Any], folds: int, repeats: int, target_sensitivity: float) -> str:
    """:func:`compare_combinations`'s report as a table, then the nested figure."""
    rows = report["combinations"]
    width = max(len(" + ".join(row["members"])) for row in rows) + 2
    lines = [f"{len(rows)} combinations, {report['n_images']} images, out of fold over {repeats} partitions of "
             f"{folds} folds (mean ± sd); melanoma figures at the threshold keeping sensitivity {target_sensitivity}:",
             f"{'members':<{width}}{'balanced acc.':>18}{'macro AUC':>11}{'ECE':>8}{'threshold':>11}{'mel sens/spec':>16}"]
    for row in rows:
        mean, sd = row["mean"], row["sd"]
        lines.append(f"{' + '.join(row['members']):<{width}}{mean['balanced_accuracy']:>9.4f} ± {sd['balanced_accuracy']:.4f}"
                     f"{mean['macro_auc']:>11.4f}{mean['ece']:>8.4f}{row['referral_threshold']:>11.2f}"
                     f"{mean['melanoma_sensitivity']:>9.3f} / {mean['melanoma_specificity']:.3f}")
    nested = report.get("selection_aware")
    if nested:
        picked = ", ".join(f"{members} {count}x" for members, count in nested["picks"].items())
        lines.append(f"picking the best of these {len(rows)} on the other folds, then calibrating it (nested, "
                     f"{nested['repeats']} outer partitions): balanced accuracy {nested['mean']:.4f} ± {nested['sd']:.4f} "
                     f"on images the pick never saw, against the winner's own {rows[0]['mean']['balanced_accuracy']:.4f}; "
                     f"picked: {picked}")
    return "\n".join(lines)
