"""Evaluate a checkpoint on a labelled image folder exactly as the service would answer.

Labels come as HAM10000 metadata (``image_id``, ``dx``) or ISIC 2018 Task 3 ground
truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). Images named in the labels but missing
from the folders are an error, never silently skipped.

The serving decode, preprocessing, runtime, test-time augmentation, calibration, decision
rule and referral threshold are used: they come from the ``handler:`` block of
``--model-config`` (TTA mode, decision rule and threshold can be overridden). Writes ``metrics.json``, ``predictions.csv``,
``confusion_matrix.png`` and ``reliability.png`` and prints a summary table. ``metrics.json``'s
``bootstrap`` holds 95% intervals of the headline figures (images resampled within each
class), since a few rare-class images move balanced accuracy by whole points.

Example:
    python scripts/evaluate.py --images ../shared/data/ham10000-224/images \
        --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --out runs/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.data import read_labelled_images  # noqa: E402
from handler.calibration import TTA_MODES  # noqa: E402
from handler.decision import DECISION_RULES, decide  # noqa: E402
from handler.evaluation import (bootstrap_intervals, classification_report, format_report, logits_for_files,  # noqa: E402
                                reliability_bins)
from handler.labels import CLASS_CODES  # noqa: E402
from handler.inference import load_handler_settings, prepare_for_serving  # noqa: E402
from handler.model import load_checkpoint  # noqa: E402
from handler.plots import plot_confusion_matrix, plot_reliability  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--subset", help="JSON file with 'val_image_ids' (as written by train.py) to evaluate only those")
    parser.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and the figures")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-config", default=str(ROOT / "config" / "model-config.yaml"),
                        help="serving config whose handler settings (tta, referral_threshold) are the defaults")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples for the 95%% confidence intervals in metrics.json (0: none)")
    parser.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation; default: the serving config's")
    parser.add_argument("--decision-rule", choices=DECISION_RULES,
                        help="which class an image is called (see handler/decision.py); default: the serving config's")
    parser.add_argument("--referral-threshold", type=float,
                        help="melanoma sensitivity/specificity are measured for the referral flag "
                             "malignant_probability >= this; default: the serving config's")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation, write the metrics, predictions and figures, print a summary."""
    records = read_labelled_images(args.labels, args.images, args.subset)
    settings = load_handler_settings(args.model_config)
    tta = args.tta or settings.tta
    rule = args.decision_rule or settings.decision_rule
    threshold = args.referral_threshold if args.referral_threshold is not None else settings.referral_threshold
    loaded = load_checkpoint(args.checkpoint)
    # The served runtime and precision; all cores, since evaluation is one process.
    prepare_for_serving(loaded, dataclasses.replace(settings, tta=tta, decision_rule=rule, torch_threads=0))
    calibration = loaded.calibration(tta)
    print(f"evaluating {len(records)} images with {args.checkpoint} (version {loaded.version}), TTA {tta}, "
          f"decision rule {rule}, "
          f"{settings.runtime} {settings.precision}, referral threshold {threshold}", flush=True)
    logits = logits_for_files(loaded, [r.path for r in records], tta, args.batch_size)
    probabilities = calibration.apply(logits)
    probs = probabilities.numpy()
    labels = np.array([r.label for r in records])
    called = {name: decide(probabilities, name, calibration.class_prior).numpy() for name in DECISION_RULES
              if name == "most_probable" or calibration.class_prior is not None}
    report = classification_report(probs, labels, threshold, called[rule])
    report.update(checkpoint=str(args.checkpoint), model_version=loaded.version, tta=tta, decision_rule=rule,
                  balanced_accuracy_by_rule={name: classification_report(probs, labels, threshold, calls)["balanced_accuracy"]
                                             for name, calls in called.items()},
                  calibration=calibration.to_dict(), reliability=reliability_bins(probs, labels))
    if args.bootstrap:
        report["bootstrap"] = bootstrap_intervals(probs, labels, called[rule], threshold, args.bootstrap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "predictions.csv", "w") as handle:
        handle.write("image_id,label,prediction," + ",".join(report["per_class"]) + "\n")
        for record, call, row in zip(records, called[rule], probs):
            handle.write(f"{record.image_id},{CLASS_CODES[record.label]},{CLASS_CODES[call]},"
                         + ",".join(f"{p:.6f}" for p in row) + "\n")
    plot_confusion_matrix(report["confusion_matrix"], out / "confusion_matrix.png",
                          f"{loaded.version}, {len(records)} images, balanced accuracy {report['balanced_accuracy']:.3f}")
    plot_reliability(report["reliability"], report["ece"], out / "reliability.png", f"{loaded.version}, TTA {tta}")
    print(format_report(report))
    print(f"wrote {out / 'metrics.json'}, predictions.csv, confusion_matrix.png and reliability.png")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
