"""Compare every combination of trained networks as a calibrated logit-average ensemble, out of fold.

Before building an ensemble (``scripts/ensemble.py``) and calibrating it (``scripts/calibrate.py``),
this answers "which members?" the way the model card's "Which members" tables do. Each network's
validation logits are computed once, through the serving decode and preprocessing, and cached.
Then each combination's averaged logits are calibrated and measured out of fold over several
fold partitions, at the referral threshold that keeps the target melanoma sensitivity. That is
``calibrate.py``'s own measurement, so the chosen combination reads the same after calibration.
An ensemble checkpoint, such as the released model, contributes its members as it stored them.

The best combination's own figure is optimistic: it won a contest judged on the same images. So
the script also measures the whole procedure, "pick the combination with the best out-of-fold
balanced accuracy, then calibrate it", by nested cross-validation (``--nested-repeats``): each
outer fold's images are called by the combination picked and calibrated on the other folds alone.

Example:
    python scripts/compare_members.py --members models/skin_lesion.pt runs/f/best.pt \
        --images ../shared/data/ham10000-224/images --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --cache-dir runs/logits --report runs/members.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from lab.crossfit import combinations_text, compare_combinations
from lab.data import read_labelled_images
from lab.ensembles import check_compatible_members, networks_in, renamed
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY, cached_logits


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", nargs="+", required=True,
                        help="network checkpoints; an ensemble checkpoint contributes each of its members")
    parser.add_argument("--names", nargs="+", help="a short name per network (default: from the file names)")
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--subset", required=True, help="the members' validation split: JSON with 'val_image_ids'")
    parser.add_argument("--cache-dir", help="keep each network's validation logits here, keyed by file digest")
    parser.add_argument("--min-size", type=int, default=1, help="smallest combination")
    parser.add_argument("--max-size", type=int, default=0, help="largest combination (0: all networks)")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_MELANOMA_SENSITIVITY, help="melanoma sensitivity the referral flag keeps")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="fold partitions (seeds --seed .. --seed+repeats-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nested-repeats", type=int, default=3,
                        help="outer fold partitions for the selection-aware figure (0: skip it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--report", help="JSON file for every combination's figures")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every combination and print them, best balanced accuracy first, then the nested figure.

    Returns:
        ``{"n_images", "combinations"}`` (best first), plus ``"selection_aware"`` unless
        ``--nested-repeats`` is 0.
    """
    networks = renamed(networks_in(args.members), args.names)
    if len(networks) > 1:  # one network alone is measured too
        check_compatible_members([network.checkpoint for network in networks])
    records = read_labelled_images(args.labels, args.images, args.subset)
    paths, image_ids = [r.path for r in records], [r.image_id for r in records]
    logits = {}
    for network in networks:
        logits[network.name] = cached_logits(network.checkpoint, network.key, paths, image_ids,
                                             Path(args.cache_dir) if args.cache_dir else None, args.batch_size)
        print(f"{network.name}: validation logits of {len(paths)} images", flush=True)
    report = compare_combinations(logits, np.array([r.label for r in records]), min_size=args.min_size,
                                  max_size=args.max_size, folds=args.folds, seed=args.seed, repeats=args.repeats,
                                  nested_repeats=args.nested_repeats, target_sensitivity=args.target_sensitivity)
    print(combinations_text(report, args.folds, args.repeats, args.target_sensitivity))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
