"""Fit a checkpoint's calibrations and measure its referral operating point on the validation split.

For every test-time augmentation mode, runs the validation images through the serving
path (decode, preprocessing, forward pass), fits temperature scaling plus per-class
biases (:func:`handler.calibration.fit_calibration`), and reports the calibration error
both in-sample and out-of-fold (5-fold cross-fitting on the validation split, so the
figure is not flattered by fitting and scoring on the same images). The cross-fitting is
repeated over ``--repeats`` fold partitions and reported as mean and standard deviation:
with 8 dermatofibromas in a validation split, which fold an image falls in moves balanced
accuracy by about 0.01. It then picks the
highest referral threshold on ``malignant_probability`` that keeps melanoma sensitivity
at or above ``--target-sensitivity`` (out-of-fold probabilities) and reports the
specificity and referral rate that threshold costs. Balanced accuracy is reported for both
decision rules (:mod:`handler.decision`); each calibration records the class frequencies
it was fitted on, which the ``balanced`` rule divides out.

The calibrations go into ``meta["calibration"]`` of the output checkpoint and the
operating point into ``meta["operating_point"]``; the weights are untouched. Put the
threshold into ``config/model-config.yaml`` (``handler.referral_threshold``).

Example:
    python scripts/calibrate.py --checkpoint models/skin_lesion.pt \
        --images ../shared/data/ham10000-224/images --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --output models/skin_lesion.pt --report runs/calibration.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.calibration import TTA_MODES, Calibration, fit_calibration  # noqa: E402
from handler.data import read_labelled_images  # noqa: E402
from handler.decision import decide  # noqa: E402
from handler.evaluation import (bootstrap_intervals, classification_report, logits_for_files,  # noqa: E402
                                referral_threshold_for_sensitivity)
from handler.model import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--subset", required=True, help="JSON with 'val_image_ids' (train.py's split): fit on these only")
    parser.add_argument("--output", required=True, help="checkpoint to write (may be --checkpoint itself)")
    parser.add_argument("--report", help="JSON file for the per-mode figures")
    parser.add_argument("--tta-modes", nargs="+", choices=TTA_MODES, default=list(TTA_MODES))
    parser.add_argument("--serving-tta", choices=TTA_MODES, default="none", help="mode whose operating point is measured")
    parser.add_argument("--target-sensitivity", type=float, default=0.85, help="melanoma sensitivity the referral flag must keep")
    parser.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold figures")
    parser.add_argument("--repeats", type=int, default=10,
                        help="fold partitions for the repeated out-of-fold figures (seeds --seed .. --seed+repeats-1)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples for the 95%% confidence intervals of the out-of-fold figures")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser


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
        balanced accuracy and the threshold-free and melanoma figures.
    """
    keys = ("balanced_accuracy", "macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity", "referral_rate")
    rows = []
    for seed in seeds:
        probabilities, balanced_calls = out_of_fold_probabilities(logits, labels, folds, seed)
        report = classification_report(probabilities, labels, threshold, balanced_calls)
        rows.append([report[key] for key in keys])
    table = np.asarray(rows, dtype=np.float64)
    return {"repeats": len(seeds), "folds": folds, "mean": dict(zip(keys, table.mean(0).tolist())),
            "sd": dict(zip(keys, table.std(0).tolist()))}


def summarize(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None,
              balanced_calls: np.ndarray | None = None) -> dict[str, Any]:
    """Headline figures: those of the most-probable-class rule, plus the balanced rule's when its calls are given."""
    keys = ("balanced_accuracy", "accuracy", "macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity",
            "malignant_sensitivity", "referral_rate", "melanoma_threshold")
    report = classification_report(probabilities, labels, threshold)
    figures = {key: report[key] for key in keys}
    if balanced_calls is not None:
        balanced = classification_report(probabilities, labels, threshold, balanced_calls)
        figures |= {"balanced_rule": {key: balanced[key] for key in ("balanced_accuracy", "accuracy")}}
    return figures


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fit, measure, and write the recalibrated checkpoint."""
    records = read_labelled_images(args.labels, args.images, args.subset)
    labels = np.array([r.label for r in records])
    loaded = load_checkpoint(args.checkpoint)
    paths = [r.path for r in records]
    calibrations: dict[str, Calibration] = {}
    figures: dict[str, Any] = {}
    for tta in args.tta_modes:
        started = time.perf_counter()
        logits = logits_for_files(loaded, paths, tta, args.batch_size)
        calibrations[tta] = fit_calibration(logits, torch.as_tensor(labels))
        out_of_fold, out_of_fold_calls = out_of_fold_probabilities(logits, labels, args.folds, args.seed)
        threshold = referral_threshold_for_sensitivity(out_of_fold, labels, args.target_sensitivity)
        temperature_only = fit_calibration(logits, torch.as_tensor(labels), class_bias=False)
        in_sample = calibrations[tta].apply(logits)
        in_sample_calls = decide(in_sample, "balanced", calibrations[tta].class_prior).numpy()
        figures[tta] = {
            "calibration": calibrations[tta].to_dict(),
            "in_sample": summarize(in_sample.numpy(), labels, threshold, in_sample_calls),
            "out_of_fold": summarize(out_of_fold, labels, threshold, out_of_fold_calls),
            "out_of_fold_bootstrap": bootstrap_intervals(out_of_fold, labels, out_of_fold_calls, threshold,
                                                         args.bootstrap, seed=args.seed),
            "out_of_fold_repeated": repeated_out_of_fold(logits, labels, args.folds,
                                                         range(args.seed, args.seed + args.repeats), threshold),
            "temperature_only": summarize(temperature_only.apply(logits).numpy(), labels, None)
                                | {"temperature": temperature_only.temperature},
            "uncalibrated": summarize(torch.softmax(logits, 1).numpy(), labels, None),
            "referral_threshold": threshold,
            "seconds": time.perf_counter() - started,
        }
        print(f"TTA {tta}: {json.dumps(figures[tta])}", flush=True)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    serving = figures[args.serving_tta]
    checkpoint["meta"]["calibration"] = {tta: calibration.to_dict() for tta, calibration in calibrations.items()}
    checkpoint["meta"].pop("temperature", None)  # superseded by meta["calibration"]
    checkpoint["meta"]["operating_point"] = {
        "tta": args.serving_tta, "referral_threshold": serving["referral_threshold"],
        "target_melanoma_sensitivity": args.target_sensitivity, "validation_out_of_fold": serving["out_of_fold"],
    }
    checkpoint["meta"]["calibration_command"] = "python scripts/calibrate.py " + shlex.join(sys.argv[1:])
    torch.save(checkpoint, args.output)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(figures, indent=2))
    print(f"wrote {args.output}; serving TTA {args.serving_tta}: referral_threshold {serving['referral_threshold']}, "
          f"out-of-fold melanoma sensitivity {serving['out_of_fold']['melanoma_sensitivity']:.3f}, "
          f"specificity {serving['out_of_fold']['melanoma_specificity']:.3f}, ECE {serving['out_of_fold']['ece']:.4f}")
    repeated = serving["out_of_fold_repeated"]
    print(f"out of fold over {repeated['repeats']} partitions: " + ", ".join(
        f"{key} {repeated['mean'][key]:.4f} +- {repeated['sd'][key]:.4f}" for key in repeated["mean"]))
    print("95% intervals of the out-of-fold figures (images resampled within each class): " + ", ".join(
        f"{key} {low:.3f}-{high:.3f}" for key, (low, high) in serving["out_of_fold_bootstrap"]["intervals"].items()))
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
