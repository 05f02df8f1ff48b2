"""Fit the input gate (distance and modality head), compare methods by measurement, and report.

The steps, the data rules and every choice are :func:`lab.gate_fitting.fit_gate`'s (pieces in
:mod:`lab.ood`, served side in :mod:`handler.input_gate`). Features are cached under
``--cache-dir``, keyed by the items, the storage, the sizes and the checkpoint's preprocessing:
a refit of another checkpoint of the same geometry extracts nothing.

Example (fits the gate for a new release and stores it in that checkpoint, atomically)::

    make fit-gate CHECKPOINT=runs/x.pt
    # = nice -n 10 .venv/bin/python -m scripts.fit_input_gate --checkpoint runs/x.pt --write-into runs/x.pt \
    #     --output runs/ood/input_gate.pt --report docs/ood_gate_report.json --histogram docs/ood_gate_histogram.png
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from lab import gate_fitting
from lab.ood import to_plain
from ops.paths import CHECKPOINT, DATA, ROOT, VAL_SPLIT


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT),
                        help="the release: its preprocessing makes the gate's input, its forward pass is the cost yardstick")
    parser.add_argument("--dermoscopy", default=str(DATA / "ham10000-200x150"),
                        help="folder with metadata.csv and images/ at the true 4:3 shape")
    parser.add_argument("--val-split", default=str(VAL_SPLIT))
    parser.add_argument("--samples", default=str(DATA / "samples-600x450"))
    parser.add_argument("--everyday", default=str(DATA / "ood-imagenet" / "images"))
    parser.add_argument("--dermoscopy-square", default=str(DATA / "ham10000-224"),
                        help="the same lesions as sharp square images (metadata.csv, images/): training lesions teach the "
                             "modality head that sharp dermoscopy is dermoscopy too, validation lesions are a second check")
    parser.add_argument("--clinical", default=str(DATA / "pad-ufes-20-clinical"),
                        help="clinical (non-dermoscopic) photos of skin lesions: metadata.csv with patient_id, images/")
    parser.add_argument("--clinical-folds", type=int, default=5, help="patient-grouped folds for the out-of-sample figures")
    parser.add_argument("--clinical-crops", type=int, default=0,
                        help="random 4:3 crop copies (other framing and JPEG quality) of each clinical photo fitted on")
    parser.add_argument("--head-c", type=float, nargs="+", default=[1.0, 10.0],
                        help="inverse regularization strengths of the modality head compared")
    parser.add_argument("--distance-shares", type=float, nargs="+", default=[0.2, 0.5],
                        help="shares of the false-refusal budget given to the distance (the rest to the modality head); "
                             "at least 0.2 with 1 %%, so that half the validation images can still set its threshold")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96],
                        help="gate input sizes compared (release 1.6.0 compared 96 128 160 224 and chose 128; 1.7.0's "
                             "single network halves the cost budget, so 96)")
    parser.add_argument("--network-blocks", type=int, default=5,
                        help="backbone stages the gate runs (0: all); the later ones cost most and are left out")
    parser.add_argument("--network-parts", nargs="+", default=["mean3", "std3", "mean4", "std4", "colour"],
                        help="pooled parts of the gate's features: mean<i>/std<i> of stage i, colour statistics, or "
                             "'final' alone (the full network's pooled features, the gate format of release 1.6.x)")
    parser.add_argument("--distance-parts", nargs="+", default=["mean4"], help="parts the kNN distance compares")
    parser.add_argument("--head-parts", nargs="+", default=["mean3", "std3", "mean4", "std4", "colour"],
                        help="parts the modality head reads")
    parser.add_argument("--reference-pool", type=int, default=2000, help="training lesions whose features are extracted")
    parser.add_argument("--reference-counts", type=int, nargs="+", default=[600, 1000, 2000])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--synthetic-count", type=int, default=300)
    parser.add_argument("--synthetic-seeds", type=int, nargs=2, default=[0, 1], metavar=("CHOOSE", "REPORT"))
    parser.add_argument("--max-false-refusal", type=float, default=0.01,
                        help="refuse at most this fraction of new dermoscopic images (conformal threshold)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="how much worse (refusal, partial AUROC) int8 weight storage may measure and still be chosen")
    parser.add_argument("--storage", default="int8", choices=["float16", "int8"],
                        help="weight storage used for the comparison")
    parser.add_argument("--storages", nargs="+", default=["int8"], choices=["float16", "int8"],
                        help="storages measured for the chosen distance (release 1.6.0 measured both and chose int8)")
    parser.add_argument("--crossfit-repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "ood" / "cache"))
    parser.add_argument("--output", default=str(ROOT / "runs" / "ood" / "input_gate.pt"), help="the gate dict (.pt)")
    parser.add_argument("--write-into", metavar="CHECKPOINT",
                        help="also store the gate in this checkpoint's meta.input_gate (written through "
                             "handler.checkpoint; may equal --checkpoint): a release carries its own gate")
    parser.add_argument("--model-version", help="with --write-into: the version the written checkpoint records")
    parser.add_argument("--report", default=str(ROOT / "runs" / "ood" / "report.json"))
    parser.add_argument("--histogram", default=str(ROOT / "runs" / "ood" / "histogram.png"))
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fit and measure the gate (:func:`lab.gate_fitting.fit_gate`), write it, its report and histogram, and
    with ``--write-into`` store it in that checkpoint (atomically); print the final figures."""
    command = "python -m scripts.fit_input_gate " + shlex.join(sys.argv[1:])
    fitted = gate_fitting.fit_gate(gate_fitting.GateFitOptions.from_namespace(args, command))
    gate_fitting.write_outputs(fitted, args.output, args.report, args.histogram)
    if args.write_into:
        gate_fitting.store_gate(args.checkpoint, args.write_into, fitted.gate_dict, command, args.model_version)
    print(json.dumps(to_plain(fitted.summary), indent=2))
    return fitted.report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
