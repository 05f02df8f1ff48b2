"""Distil the fold teachers of ``scripts/train_folds.py`` into one student network, and check the recipe out of fold.

1. Checks the fold file against the metadata and every ``fold_<k>/teacher.pt`` against the fold
   file (the fold it held out, the folds' digest).
2. Caches every teacher's logits for the dihedral views of every image (resumable): all 8 of a square
   input, the 4 that keep a rectangular (4:3) input's shape.
3. Out-of-fold check: for each fold k of ``--check-folds``, student k is trained on the other
   folds against the soft labels of the teachers that held each image out, and scored on fold k,
   next to teacher k on the same fold by the same method. When every fold is checked, the
   students' out-of-fold logits are also summarized as the fold teachers are (per lesion, across
   folds, bootstrap intervals).
4. The final student is trained on every image against the fold ensemble (mean teacher logits)
   and written through :mod:`handler.checkpoint`, ``meta.data`` naming the folds, with a ``none``
   calibration fitted on the check students' out-of-fold logits when a check ran.

Resumable: rerun the same command to continue; finished students are skipped. The pieces are
:mod:`lab.distillation` and :mod:`lab.folds`.

Example (what ``make distill`` runs):
    python scripts/distill.py --k 5 --teachers runs/folds_k5 --output runs/distill_k5 --provenance-dir models/provenance
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from handler.storage import STORAGE_DTYPES
from lab.data import attach_paths
from lab.distillation import DistillationRun, load_teachers, student_geometry
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.folds import FoldLayout, RunSettings, copy_provenance, limit_records, load_folds
from lab.provenance import command_line, file_sha256
from lab.training import AMP_MODES, Recipe, add_recipe_arguments
from ops.paths import DATA, PROVENANCE, ROOT

DEFAULT_DATA = DATA / "ham10000-200x150"
STUDENT_RECIPE = Recipe(epochs=15, patience=15, workers=min(8, os.cpu_count() or 1))


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the distillation script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metadata", default=str(DEFAULT_DATA / "metadata.csv"), help="HAM10000 metadata CSV")
    parser.add_argument("--images", nargs="+", default=[str(DEFAULT_DATA / "images")], help="one or more image folders")
    parser.add_argument("--k", type=int, default=5, help="number of folds (of the fold file and the teachers)")
    parser.add_argument("--folds-file", help="the fold assignment (default: models/provenance/folds_k<K>.json)")
    parser.add_argument("--teachers", help="scripts/train_folds.py's run folder, holding fold_<k>/teacher.pt "
                                           "(default: runs/folds_k<K>)")
    parser.add_argument("--output", help="run folder (default: runs/distill_k<K>)")
    parser.add_argument("--check-folds", type=int, nargs="*", default=[0, 1, 2],
                        help="folds of the out-of-fold check (student k trained without fold k, scored on it); "
                             "none to skip the check")
    parser.add_argument("--no-final", action="store_true", help="run the check only, not the final student")
    add_recipe_arguments(parser, STUDENT_RECIPE)
    parser.add_argument("--temperature", type=float, default=2.0, help="softening of the KL term")
    parser.add_argument("--alpha", type=float, default=0.7, help="share of the KL term (the rest is hard-label CE)")
    parser.add_argument("--pretrained", default="auto",
                        help="'auto' (ImageNet weights found locally, error if none), 'none', or a state-dict path")
    parser.add_argument("--freeze-blocks", type=int, default=0, help="freeze the stem and this many stages after it")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--teacher-batch-size", type=int, default=64, help="images per teacher pass (x 8 views)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only this many images, drawn at random (smoke runs; never written to provenance)")
    parser.add_argument("--epochs-this-run", type=int, default=0,
                        help="stop each student cleanly after this many epochs; rerun to continue")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_MELANOMA_SENSITIVITY,
                        help="melanoma sensitivity the reported referral thresholds keep")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the all-folds check's intervals")
    parser.add_argument("--model-version", default="0.0.0-dev", help="version written into the student checkpoint")
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float16", help="how student.pt stores its weights")
    parser.add_argument("--provenance-dir", help="also copy the summary and the students' per-epoch metrics into "
                                                 "<dir>/distill_k<K>/ (refused with --limit)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Cache teacher logits, run the out-of-fold check and train the final student.

    Returns:
        The summary, or None when a student paused (``--epochs-this-run``).
    """
    if args.provenance_dir and args.limit:
        raise SystemExit("--limit is a smoke run: it does not write provenance (drop --provenance-dir)")
    settings = RunSettings.choose(args.device, args.amp, args.threads, pretrained=args.pretrained,
                                  freeze_blocks=args.freeze_blocks, epochs_this_run=args.epochs_this_run, limit=args.limit)
    folds_file = Path(args.folds_file or PROVENANCE / f"folds_k{args.k}.json")
    assignment, records = load_folds(folds_file, args.metadata)
    if assignment.k != args.k:
        raise SystemExit(f"{folds_file} holds {assignment.k} folds, not --k {args.k}")
    teachers, teacher_preprocess = load_teachers(FoldLayout(Path(args.teachers or ROOT / "runs" / f"folds_k{args.k}")),
                                                 assignment)
    recipe, preprocess = student_geometry(Recipe.from_namespace(args), teacher_preprocess)
    run = DistillationRun(recipe, preprocess, settings, assignment, folds_file,
                          limit_records(attach_paths(records, args.images), args.limit, assignment.seed),
                          FoldLayout(Path(args.output or ROOT / "runs" / f"distill_k{args.k}")), teachers,
                          args.temperature, args.alpha, args.target_sensitivity)
    run.cache_logits(args.teacher_batch_size)
    summary = run.summary(command_line("scripts/distill.py"), args.limit)
    check = run.check_folds(args.check_folds, args.bootstrap)
    if check is None or not (args.no_final or run.train_student()):
        return None
    summary |= check
    if not args.no_final:
        path = run.export_student(summary, args.model_version, args.storage_dtype)
        summary["student"] = {"checkpoint": str(path), "sha256": file_sha256(path)}
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run.layout.root.mkdir(parents=True, exist_ok=True)
    (run.layout.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.provenance_dir:
        metrics = {f"check_fold_{fold}": run.layout.fold_dir(fold) / "metrics.jsonl" for fold in args.check_folds}
        if not args.no_final:
            metrics["student"] = run.layout.root / "student" / "metrics.jsonl"
        copy_provenance(Path(args.provenance_dir) / f"distill_k{args.k}", summary, metrics)
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
