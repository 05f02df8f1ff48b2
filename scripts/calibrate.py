"""Fit a checkpoint's calibrations and measure its referral operating point on the validation split.

For every test-time augmentation mode, runs the validation images through the serving
path (decode, preprocessing, forward pass), fits temperature scaling plus per-class
biases (:func:`lab.calibration.fit_calibration`), and reports the calibration error
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

The fitting and cross-fitting are :mod:`lab.crossfit` (:func:`lab.crossfit.recalibrate`). The calibrations go into ``meta.calibration`` of the
output checkpoint and the operating point into ``meta.operating_point`` (:mod:`handler.checkpoint`);
the weights are untouched. Put the threshold into ``config/model-config.yaml``
(``handler.referral_threshold``).

Example:
    python scripts/calibrate.py --checkpoint models/skin_lesion.pt \
        --images ../shared/data/ham10000-224/images --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --output models/skin_lesion.pt --report runs/calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from handler.calibration import TTA_MODES
from handler.checkpoint import read_checkpoint
from handler.preprocessing import RESIZE_MODES
from lab.calibration import CLASS_BIAS_METHODS
from lab.crossfit import calibration_text, recalibrate
from lab.data import read_labelled_images
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.provenance import command_line
from ops.paths import CHECKPOINT


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--subset", required=True, help="JSON with 'val_image_ids' (train.py's split): fit on these only")
    parser.add_argument("--output", required=True, help="checkpoint to write (may be --checkpoint itself)")
    parser.add_argument("--report", help="JSON file for the per-mode figures")
    parser.add_argument("--tta-modes", nargs="+", choices=TTA_MODES, default=list(TTA_MODES))
    parser.add_argument("--serving-tta", choices=TTA_MODES, default="none", help="mode whose operating point is measured")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_MELANOMA_SENSITIVITY, help="melanoma sensitivity the referral flag must keep")
    parser.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold figures")
    parser.add_argument("--repeats", type=int, default=10,
                        help="fold partitions for the repeated out-of-fold figures (seeds --seed .. --seed+repeats-1)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples for the 95%% confidence intervals of the out-of-fold figures")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES,
                        help="serve the checkpoint in this geometry from now on: calibrated, measured and written with it")
    parser.add_argument("--model-version", help="version of the written checkpoint (default: the input's)")
    parser.add_argument("--class-bias", choices=CLASS_BIAS_METHODS, default="fitted",
                        help="per-class biases fitted freely, or the log class frequencies (prior_shift: for a network "
                             "trained class-balanced, whose own argmax the balanced rule then keeps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fit, measure, and write the recalibrated checkpoint."""
    records = read_labelled_images(args.labels, args.images, args.subset)
    checkpoint = read_checkpoint(args.checkpoint)
    if args.resize_mode:
        preprocessing = dataclasses.replace(checkpoint.meta.preprocessing, resize_mode=args.resize_mode)
        checkpoint.meta = dataclasses.replace(checkpoint.meta, preprocessing=preprocessing)
    if args.model_version:
        checkpoint.meta = dataclasses.replace(checkpoint.meta, version=args.model_version)
    figures = recalibrate(checkpoint, [r.path for r in records], np.array([r.label for r in records]), args.tta_modes,
                          args.serving_tta, name=args.checkpoint, batch_size=args.batch_size, folds=args.folds,
                          seed=args.seed, repeats=args.repeats, target_sensitivity=args.target_sensitivity,
                          bootstrap=args.bootstrap, command=command_line("scripts/calibrate.py"),
                          bias_method=args.class_bias)
    checkpoint.save(args.output)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(figures, indent=2))
    print(f"wrote {args.output}; " + calibration_text(figures, args.serving_tta))
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
