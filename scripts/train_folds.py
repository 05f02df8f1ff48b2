"""Cross-fitted training: K lesion-grouped folds over every image, one network per fold, out-of-fold predictions.

Builds (or checks) the fold assignment ``models/provenance/folds_k<K>.json``, trains network k on
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
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from handler.architectures import default_preprocess_config
from handler.labels import CLASS_CODES
from handler.preprocessing import FULL_VIEW, RESIZE_MODES
from lab.data import attach_paths, class_counts
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.folds import (
    SELECT_KEYS, FoldLayout, collect_out_of_fold, ensure_folds, export_teachers, fold_split, limit_records, summarize,
    train_fold, write_out_of_fold_csv)
from lab.provenance import command_line
from lab.training import (
    AMP_MODES, Recipe, add_recipe_arguments, autocast_dtype, make_criterion, make_loaders, resolve_device)
from ops.paths import DATA, PROVENANCE, ROOT

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
    parser.add_argument("--rebuild-folds", action="store_true", help="overwrite an existing fold file (starts over)")
    parser.add_argument("--folds-only", action="store_true", help="build (or check) the fold file, then stop")
    parser.add_argument("--folds", type=int, nargs="+", help="train only these folds (default: all)")
    parser.add_argument("--output", help="run folder for fold_<k>/ and summary.json (default: runs/folds_k<K>)")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default=FULL_VIEW,
                        help="geometry of training and serving (meta.preprocessing.resize_mode)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    assignment, records = ensure_folds(folds_file, args.metadata, args.k, args.fold_seed, args.rebuild_folds)
    if args.folds_only:
        print(f"{folds_file}: {args.k} folds of {[len(fold) for fold in assignment.folds]} images over {assignment.metadata}, "
              f"checked (digest {assignment.digest[:12]})", flush=True)
        return None
    records = limit_records(attach_paths(records, args.images), args.limit, args.fold_seed)
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    preprocess = dataclasses.replace(default_preprocess_config(recipe.arch, recipe.image_size), resize_mode=args.resize_mode)
    layout = FoldLayout(Path(args.output or ROOT / "runs" / f"folds_k{args.k}"))
    print(f"{len(records)} images, {args.k} folds ({folds_file}, digest {assignment.digest[:12]}); device {device}, "
          f"autocast {amp}; {recipe.arch} at {recipe.image_size} px, {args.resize_mode}", flush=True)

    run_config = {"folds_sha256": assignment.digest, "limit": args.limit, "recipe": dataclasses.asdict(recipe),
                  "preprocessing": preprocess.to_dict(), "pretrained": args.pretrained, "freeze_blocks": args.freeze_blocks,
                  "amp": str(amp)}
    run_config["recipe"].pop("workers")  # how many loader processes does not change the run
    for fold in args.folds if args.folds is not None else range(args.k):
        fold_recipe = dataclasses.replace(recipe, seed=recipe.seed + fold)
        train, holdout = fold_split(records, assignment, fold)
        print(f"fold {fold}: train {len(train)} images {dict(zip(CLASS_CODES, class_counts(train)))}; "
              f"held out {len(holdout)}", flush=True)
        if layout.done_path(fold).exists():
            print(f"fold {fold}: finished earlier", flush=True)
            continue
        train_loader, holdout_loader = make_loaders(fold_recipe, train, holdout, preprocess, device)
        done = train_fold(fold_recipe, preprocess, make_criterion(fold_recipe, class_counts(train)), train_loader,
                          holdout_loader, holdout, layout.fold_dir(fold), device, amp, {**run_config, "fold": fold},
                          args.pretrained, args.freeze_blocks, args.epochs_this_run)
        if not done:
            return None

    unfinished = [fold for fold in range(args.k) if not layout.done_path(fold).exists()]
    if unfinished:
        print(f"folds {unfinished} have not finished; the summary is written once every fold has", flush=True)
        return None
    if args.folds is not None:  # processes sharing a GPU, one fold each: one run without --folds summarizes
        print("every fold has finished; rerun without --folds to write the summary and the teachers", flush=True)
        return None
    oof = collect_out_of_fold(layout, assignment, records, recipe.epochs)
    oof.save(layout.root / "out_of_fold_logits.pt")
    summary = summarize(oof, args.select_by, args.epoch, args.target_sensitivity, args.bootstrap)
    epoch = summary["selected_epoch"]
    command = command_line("scripts/train_folds.py")
    summary |= {"folds_file": folds_file.name, "folds_sha256": assignment.digest, "command": command,
                "recipe": dataclasses.asdict(recipe), "preprocessing": preprocess.to_dict(), "limit": args.limit,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    teachers = export_teachers(layout, assignment, folds_file, epoch, recipe, preprocess, records, args.teacher_storage,
                               command=command, torch=str(torch.__version__))
    summary["teachers"] = [str(path) for path in teachers]
    (layout.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_out_of_fold_csv(oof, epoch, layout.root / f"out_of_fold_logits_epoch_{epoch:03d}.csv")
    lesion = summary["lesion"]
    print(f"selected epoch {epoch} of {recipe.epochs} by out-of-fold {summary['selected_by']}; per lesion "
          f"({lesion['n_lesions']}): balanced accuracy {lesion['balanced_accuracy']:.4f}, macro AUC {lesion['macro_auc']:.4f}, "
          f"ECE {lesion['ece']:.4f}, melanoma sensitivity {lesion['melanoma_sensitivity']} at threshold "
          f"{lesion['referral_threshold']}", flush=True)
    if args.provenance_dir:
        target = Path(args.provenance_dir) / f"folds_k{args.k}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_out_of_fold_csv(oof, epoch, target / "out_of_fold_logits.csv")
        for fold in range(args.k):
            (target / f"fold_{fold}_metrics.jsonl").write_text((layout.fold_dir(fold) / "metrics.jsonl").read_text())
        print(f"provenance written to {target}", flush=True)
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
