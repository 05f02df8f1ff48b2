"""Evaluate a checkpoint on a labelled image folder exactly as the service would answer.

Labels come as HAM10000 metadata (``image_id``, ``dx``) or ISIC 2018 Task 3 ground
truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). Images named in the labels but missing
from the folders are an error, never silently skipped.

The serving decode, preprocessing, runtime, test-time augmentation, calibration, decision
rule and referral threshold are used (:mod:`lab.evaluation_run`, through
:func:`lab.evaluation.serve_files`): they come from the ``handler:`` block of
``--model-config`` (TTA mode, decision rule and threshold can be overridden). Writes ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png`` and
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
from pathlib import Path
from typing import Any

from handler.calibration import TTA_MODES
from handler.decision import DECISION_RULES
from lab.data import read_labelled_images
from lab.evaluation import format_report
from lab.evaluation_run import evaluate_checkpoint, evaluation_settings, write_evaluation
from lab.gate_evaluation import GateSets, format_gate_report
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
    """Run the evaluation (:mod:`lab.evaluation_run`), write the metrics, predictions and figures, print a summary."""
    records = read_labelled_images(args.labels, args.images, args.subset)
    settings = evaluation_settings(args.model_config, args.tta, args.decision_rule, args.referral_threshold)
    gate_sets = GateSets(ood=args.ood or (), synthetic=args.synthetic, synthetic_seed=args.synthetic_seed,
                         clinical=args.clinical, samples=args.samples, batch_size=args.batch_size)
    evaluation = evaluate_checkpoint(args.checkpoint, records, settings, args.batch_size, args.bootstrap, gate_sets)
    out = Path(args.out)
    write_evaluation(evaluation, out)
    print(format_report(evaluation.report))
    if "input_gate" in evaluation.report:
        print(format_gate_report(evaluation.report))
    print(f"wrote {out / 'metrics.json'}, predictions.csv, confusion_matrix.png and reliability.png")
    return evaluation.report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
