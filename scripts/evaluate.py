"""Evaluate a checkpoint on a labelled image folder exactly as the service would answer.

Labels come as HAM10000 metadata (``image_id``, ``dx``) or ISIC 2018 Task 3 ground
truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). Images named in the labels but missing
from the folders are an error, never silently skipped.

The serving decode, preprocessing, runtime, test-time augmentation, calibration, decision
rule and referral threshold are used (:func:`lab.evaluation.serve_files`): they come from the
``handler:`` block of ``--model-config`` (TTA mode, decision rule and threshold can be
overridden). Writes ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png`` and
``reliability.png`` and prints a summary table. ``metrics.json``'s
``bootstrap`` holds 95% intervals of the headline figures (images resampled within each
class), since a few rare-class images move balanced accuracy by whole points.

With an input gate in the checkpoint, ``metrics.json`` also says how many labelled images the
gate refuses (``input_gate``) and gives the figures on the accepted images alone
(``accepted``); the headline figures stay those of all images. ``make evaluate-ood`` reports the
gate on every kind of input, each refusal rate with its 95 % Wilson interval: ``--ood DIR`` (folders
of non-dermoscopic images, with the AUROC of the distance against the labelled set), ``--synthetic
N`` (synthetic frames of :mod:`lab.synthetic_images`), ``--clinical DIR`` (clinical photos of lesions
in the PAD-UFES-20 layout: refusals by reason, and the classifier's answers if it were forced to
answer them, balanced accuracy over the five classes PAD-UFES-20 shares with HAM10000) and
``--samples DIR`` (full-size dermoscopy, falsely refused). The labelled set's refusals are the
dermoscopy false-refusal rate.

Example:
    python scripts/evaluate.py --images ../shared/data/ham10000-224/images \
        --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --out runs/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from handler.calibration import TTA_MODES
from handler.checkpoint import load_checkpoint
from handler.decision import DECISION_RULES, decide
from handler.inference import prepare_for_serving
from handler.labels import CLASS_CODES
from handler.settings import load_handler_settings
from lab.data import read_labelled_images
from lab.evaluation import bootstrap_intervals, classification_report, format_report, reliability_bins, serve_files
from lab.gate_evaluation import GateSets, gate_report
from lab.plots import plot_confusion_matrix, plot_reliability
from ops.paths import CHECKPOINT, MODEL_CONFIG


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--subset", help="JSON file with 'val_image_ids' (as written by train.py) to evaluate only those")
    parser.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and the figures")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-config", default=str(MODEL_CONFIG),
                        help="serving config whose handler settings (tta, referral_threshold) are the defaults")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples for the 95%% confidence intervals in metrics.json (0: none)")
    parser.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation; default: the serving config's")
    parser.add_argument("--decision-rule", choices=DECISION_RULES,
                        help="which class an image is called (see handler/decision.py); default: the serving config's")
    parser.add_argument("--ood", nargs="+", metavar="DIR",
                        help="folders of non-dermoscopic images: report the input gate's refusal rate on them and "
                             "its AUROC against the labelled images")
    parser.add_argument("--clinical", metavar="DIR",
                        help="clinical photos of lesions (metadata.csv with image and diagnostic, images/): the gate's "
                             "refusals by reason, and balanced accuracy of the forced answers over the shared classes")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="also measure N synthetic frames")
    parser.add_argument("--synthetic-seed", type=int, default=1,
                        help="seed of the synthetic frames (1: the gate's report seed, never fitted on)")
    parser.add_argument("--samples", metavar="DIR", help="full-size dermoscopy images: the gate's false refusals")
    parser.add_argument("--referral-threshold", type=float,
                        help="melanoma sensitivity/specificity are measured for the referral flag "
                             "malignant_probability >= this; default: the serving config's")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation, write the metrics, predictions and figures, print a summary."""
    records = read_labelled_images(args.labels, args.images, args.subset)
    served = load_handler_settings(args.model_config)
    threshold = args.referral_threshold if args.referral_threshold is not None else served.referral_threshold
    # The served runtime and precision; all cores, since evaluation is one process. A candidate is
    # evaluated before its input gate is fitted, so a gate is used when there is one, not required.
    settings = dataclasses.replace(served, tta=args.tta or served.tta, decision_rule=args.decision_rule or served.decision_rule,
                                   referral_threshold=threshold, torch_threads=0, require_input_gate=False)
    tta, rule = settings.tta, settings.decision_rule
    loaded = load_checkpoint(args.checkpoint)
    prepare_for_serving(loaded, settings)
    calibration = loaded.calibration(tta)
    print(f"evaluating {len(records)} images with {args.checkpoint} (version {loaded.version}), TTA {tta}, "
          f"decision rule {rule}, "
          f"{settings.runtime} {settings.precision}, referral threshold {threshold}", flush=True)
    served_images = serve_files(loaded, [r.path for r in records], tta, args.batch_size, settings.decode_limits)
    probabilities = served_images.probabilities
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
    if served_images.gate_scores is not None:
        report["input_gate"] = gate_report(served_images, records, loaded, settings, GateSets(
            ood=args.ood or (), synthetic=args.synthetic, synthetic_seed=args.synthetic_seed, clinical=args.clinical,
            samples=args.samples, batch_size=args.batch_size))
        accepted = ~served_images.refused.numpy()
        if accepted.any():
            report["accepted"] = {key: value for key, value in classification_report(
                probs[accepted], labels[accepted], threshold, called[rule][accepted]).items()
                if key not in ("per_class", "confusion_matrix")}
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
    if "input_gate" in report:
        gate = report["input_gate"]
        print(f"input gate {gate['method']} (threshold {gate['threshold']:.4f}): refuses {gate['refused']} of "
              f"{gate['images']} labelled images ({gate['refusal_rate']:.2%}); on the accepted images balanced accuracy "
              f"{report.get('accepted', {}).get('balanced_accuracy', float('nan')):.4f} (all images "
              f"{report['balanced_accuracy']:.4f})")
        low, high = gate["interval95"]
        print(f"  labelled dermoscopy falsely refused {gate['refusal_rate']:.2%} (95 % {low:.2%}-{high:.2%})")
        for folder in gate.get("ood", []):
            low, high = folder["interval95"]
            print(f"  {folder['folder']}: refuses {folder['refused']} of {folder['images']} ({folder['refusal_rate']:.2%}, "
                  f"95 % {low:.2%}-{high:.2%}; reasons {folder['reasons']}), {len(folder['refused_before_gate'])} refused "
                  f"before the gate; AUROC of the distance against the labelled images {folder['auroc']:.5f}")
        if "clinical" in gate:
            clinical = gate["clinical"]
            low, high = clinical["interval95"]
            forced = clinical["forced_answers"]
            print(f"  clinical photos {clinical['folder']}: refuses {clinical['refused']} of {clinical['images']} "
                  f"({clinical['refusal_rate']:.2%}, 95 % {low:.2%}-{high:.2%}; reasons {clinical['reasons']}); forced "
                  f"to answer, balanced accuracy over {forced['classes']} {forced['balanced_accuracy']:.3f} "
                  f"(95 % {forced['interval95'][0]:.3f}-{forced['interval95'][1]:.3f}, {forced['images']} photos)")
    print(f"wrote {out / 'metrics.json'}, predictions.csv, confusion_matrix.png and reliability.png")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
