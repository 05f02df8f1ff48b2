"""Cross-fitted training: K lesion-grouped folds over the training lesions, one network per fold, out-of-fold predictions.

Builds (or checks) the fold assignment ``models/provenance/folds_k<K>.json`` over every image of
the metadata except the validation lesions of ``--exclude-split`` (default the release's
``models/provenance/val_split.json``, so that the fold networks, and any student distilled from
them, can be compared with a release on lesions none of them trained on), trains network k on
the other K-1 folds for a fixed schedule while scoring fold k after every epoch, and, once every
fold has run, chooses one epoch count for all folds from the out-of-fold curve, writes each fold's
weights at that epoch as ``fold_<k>/teacher.pt`` (for ``scripts/distill.py``) and a summary with
per-lesion figures and bootstrap intervals. Resumable: rerun the same command to continue (each
fold continues from its ``last.pt``; finished folds are skipped). ``--folds`` trains only some
folds (several processes can share a GPU, one fold each); a run without ``--folds`` that finds every
fold finished writes the summary and the teachers. The pieces are :mod:`lab.folds`.

Example (what ``make train-folds K=5`` runs):
    python scripts/train_folds.py --k 5 --metadata ../shared/data/ham10000-200x150/metadata.csv \
        --images ../shared/data/ham10000-200x150/images --output runs/folds_k5 \
        --provenance-dir models/provenance
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from handler.architectures import architecture
from handler.preprocessing import RESIZE_MODES
from lab.data import attach_paths
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.folds import (
    SELECT_KEYS, FoldLayout, RunSettings, copy_folds_provenance, ensure_folds, finish_folds, folds_description, limit_records,
    train_folds)
from lab.provenance import command_line
from lab.training import AMP_MODES, Recipe, add_recipe_arguments
from ops.paths import DATA, PROVENANCE, ROOT, VAL_SPLIT

DEFAULT_DATA = DATA / "ham10000-200x150"
# The fold recipe: a fixed 15-epoch schedule (no early stopping; the epoch is chosen out of fold).
FOLD_RECIPE = Recipe(epochs=15, patience=15, workers=min(8, os.cpu_count() or 1))


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the cross-fitted training script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metadata", default=str(DEFAULT_DATA / "metadata.csv"),
                        help="HAM10000 metadata CSV (lesion_id, image_id, dx)")
    parser.add_argument("--images", nargs="+", default=[str(DEFAULT_DATA / "images")], help="one or more image folders")
    parser.add_argument("--k", type=int, default=5, help="number of folds")
    parser.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--folds-file", help="the fold assignment (default: models/provenance/folds_k<K>.json); "
                                             "built if absent, checked against --metadata if present")
    parser.add_argument("--exclude-split", default=str(VAL_SPLIT),
                        help="a recorded validation split (JSON with val_image_ids): every image of its lesions is left "
                             "out of every fold (recorded in the fold file); 'none' leaves nothing out")
    parser.add_argument("--rebuild-folds", action="store_true", help="overwrite an existing fold file (starts over)")
    parser.add_argument("--folds-only", action="store_true", help="build (or check) the fold file, then stop")
    parser.add_argument("--folds", type=int, nargs="+", help="train only these folds (default: all)")
    parser.add_argument("--output", help="run folder for fold_<k>/ and summary.json (default: runs/folds_k<K>)")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES,
                        help="geometry of training and serving (meta.preprocessing.resize_mode; default: the --arch "
                             "entry's, handler.architectures)")
    parser.add_argument("--image-width", type=int,
                        help="width of a rectangular model input (--image-size is then its height; needs --resize-mode "
                             "full_view, the default): e.g. --image-size 192 --image-width 256 for the photo's 4:3 shape")
    parser.add_argument("--pretrained", default="auto",
                        help="'auto' (ImageNet weights found locally, error if none), 'none', or a state-dict path")
    parser.add_argument("--freeze-blocks", type=int, default=0,
                        help="freeze the stem and this many stages after it (about 2.7x faster on a CPU)")
    add_recipe_arguments(parser, FOLD_RECIPE)
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only this many images, drawn at random (smoke runs; never written to provenance)")
    parser.add_argument("--epochs-this-run", type=int, default=0,
                        help="stop each fold cleanly after this many epochs (time-boxed sessions); rerun to continue")
    parser.add_argument("--select-by", choices=SELECT_KEYS, default="lesion_balanced_accuracy",
                        help="out-of-fold figure that chooses the one epoch count for all folds")
    parser.add_argument("--epoch", type=int, help="use this epoch instead of choosing one from the out-of-fold curve")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_MELANOMA_SENSITIVITY,
                        help="melanoma sensitivity the summary's referral threshold keeps")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the summary's intervals")
    parser.add_argument("--teacher-storage", choices=("float32", "float16"), default="float16",
                        help="how teacher.pt stores its weights")
    parser.add_argument("--provenance-dir", help="also copy the fold assignment's summary, per-fold metrics and "
                                                 "out-of-fold logits into <dir>/folds_k<K>/ (refused with --limit)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train the folds (resuming), then summarize and export teachers once every fold has finished.

    Returns:
        The summary, or None while some fold has not finished.
    """
    recipe = Recipe.from_namespace(args)
    folds_file = Path(args.folds_file or PROVENANCE / f"folds_k{args.k}.json")
    if args.provenance_dir and args.limit:
        raise SystemExit("--limit is a smoke run: it does not write provenance (drop --provenance-dir)")
    settings = RunSettings.choose(args.device, args.amp, args.threads, pretrained=args.pretrained,
                                  freeze_blocks=args.freeze_blocks, epochs_this_run=args.epochs_this_run, limit=args.limit)
    exclude_split = None if args.exclude_split.lower() == "none" else args.exclude_split
    assignment, records = ensure_folds(folds_file, args.metadata, args.k, args.fold_seed, args.rebuild_folds, exclude_split)
    if args.folds_only:
        print(f"{folds_file}: {folds_description(assignment)}, checked", flush=True)
        return None
    records = limit_records(attach_paths(records, args.images), args.limit, args.fold_seed)
    preprocess = architecture(recipe.arch).training_preprocess(recipe.image_size, args.resize_mode, args.image_width)
    layout = FoldLayout(Path(args.output or ROOT / "runs" / f"folds_k{args.k}"))
    if not train_folds(recipe, preprocess, assignment, records, layout, settings, args.folds):
        return None
    summary = finish_folds(layout, assignment, folds_file, records, recipe, preprocess, args.select_by, args.epoch,
                           args.target_sensitivity, args.bootstrap, args.teacher_storage, args.limit,
                           command_line("scripts/train_folds.py"))
    if args.provenance_dir:
        copy_folds_provenance(layout, args.k, summary, Path(args.provenance_dir) / f"folds_k{args.k}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
