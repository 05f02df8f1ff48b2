"""Distil the fold teachers of ``scripts/train_folds.py`` into one student network, and check the recipe out of fold.

1. Checks the fold file against the metadata and every ``fold_<k>/teacher.pt`` against the fold
   file (the fold it held out, the folds' digest).
2. Caches every teacher's logits for the 8 dihedral views of every image (resumable).
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
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.architectures import architecture, build_model
from handler.checkpoint import Checkpoint, Meta, make_checkpoint, read_checkpoint
from handler.labels import CLASS_CODES
from handler.storage import STORAGE_DTYPES, pack_state_dict
from lab.calibration import fit_calibration
from lab.data import LesionDataset, attach_paths, build_eval_transform, class_counts
from lab.distillation import cache_teacher_logits, distillation_loader, distillation_loss, distillation_record, soft_labels
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.folds import (
    FoldLayout, check_trained_on, fold_split, folds_data_record, lesion_figures, limit_records, load_epoch_weights,
    load_folds, single_fold_figures, train_fold)
from lab.provenance import command_line, file_sha256
from lab.training import AMP_MODES, Recipe, add_recipe_arguments, autocast_dtype, resolve_device
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
    recipe = Recipe.from_namespace(args)
    if args.provenance_dir and args.limit:
        raise SystemExit("--limit is a smoke run: it does not write provenance (drop --provenance-dir)")
    if args.threads:
        torch.set_num_threads(args.threads)
    folds_file = Path(args.folds_file or PROVENANCE / f"folds_k{args.k}.json")
    assignment, records = load_folds(folds_file, args.metadata)
    if assignment.k != args.k:
        raise SystemExit(f"{folds_file} holds {assignment.k} folds, not --k {args.k}")
    records = limit_records(attach_paths(records, args.images), args.limit, assignment.seed)
    teachers_dir = FoldLayout(Path(args.teachers or ROOT / "runs" / f"folds_k{args.k}"))
    layout = FoldLayout(Path(args.output or ROOT / "runs" / f"distill_k{args.k}"))
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    teacher_paths = [teachers_dir.teacher_path(fold) for fold in range(args.k)]
    missing = [str(path) for path in teacher_paths if not path.exists()]
    if missing:
        raise SystemExit(f"no teacher checkpoints {missing}: run scripts/train_folds.py (make train-folds) first")
    teacher_preprocess = None
    for fold, path in enumerate(teacher_paths):
        checkpoint = read_checkpoint(path)
        check_trained_on(checkpoint.meta.data, assignment, fold, str(path))
        if teacher_preprocess not in (None, checkpoint.meta.preprocessing):
            raise SystemExit(f"{path} has other preprocessing than fold 0's teacher")
        teacher_preprocess = checkpoint.meta.preprocessing
    # The student sees the teachers' geometry (their logits are of those exact inputs), normalized for its own weights.
    student_arch = architecture(recipe.arch)
    preprocess = dataclasses.replace(teacher_preprocess, mean=student_arch.mean, std=student_arch.std)
    if preprocess.image_size != recipe.image_size:
        print(f"student input {preprocess.image_size} px, as the teachers' (--image-size {recipe.image_size} ignored)",
              flush=True)
        recipe = dataclasses.replace(recipe, image_size=preprocess.image_size)
    teacher_digests = [file_sha256(path) for path in teacher_paths]
    print(f"{len(records)} images, {args.k} teachers ({teachers_dir.root}), folds digest {assignment.digest[:12]}; "
          f"device {device}, autocast {amp}; student {recipe.arch}", flush=True)

    started = time.perf_counter()
    cached = [cache_teacher_logits(path, records, layout.root / "teacher_logits" / f"fold_{fold}.pt", device,
                                   args.teacher_batch_size, amp, recipe.workers)
              for fold, path in enumerate(teacher_paths)]
    print(f"teacher logits of {len(records)} images x 8 views x {args.k} teachers ready "
          f"({time.perf_counter() - started:.0f} s this run)", flush=True)
    fold_of = assignment.fold_of()
    folds = np.array([fold_of[r.image_id] for r in records])
    row_of = {r.image_id: i for i, r in enumerate(records)}

    run_config = {"folds_sha256": assignment.digest, "limit": args.limit, "recipe": dataclasses.asdict(recipe),
                  "preprocessing": preprocess.to_dict(), "pretrained": args.pretrained, "freeze_blocks": args.freeze_blocks,
                  "amp": str(amp), "temperature": args.temperature, "alpha": args.alpha, "teachers_sha256": teacher_digests}
    run_config["recipe"].pop("workers")
    summary: dict[str, Any] = {"folds_file": folds_file.name, "folds_sha256": assignment.digest,
                               "distillation": distillation_record(args.temperature, args.alpha, [
                                   f"{path} (sha256 {digest[:12]})" for path, digest in zip(teacher_paths, teacher_digests)]),
                               "recipe": dataclasses.asdict(recipe), "preprocessing": preprocess.to_dict(),
                               "limit": args.limit, "command": command_line("scripts/distill.py")}

    out_of_fold = soft_labels(cached, folds, "out_of_fold")
    check: dict[str, Any] = {}
    check_logits = {}
    for fold in args.check_folds:
        fold_recipe = dataclasses.replace(recipe, seed=recipe.seed + fold)
        train, holdout = fold_split(records, assignment, fold)
        rows = torch.tensor([row_of[r.image_id] for r in train])
        loader = distillation_loader(train, preprocess, out_of_fold[rows], recipe.batch_size, recipe.workers, device)
        holdout_loader = _eval_loader(holdout, preprocess, recipe, device)
        criterion = distillation_loss(class_counts(train), recipe.class_weight_power, args.temperature, args.alpha)
        if not train_fold(fold_recipe, preprocess, criterion, loader, holdout_loader, holdout, layout.fold_dir(fold), device,
                          amp, {**run_config, "student": f"check fold {fold}", "soft_labels": "out_of_fold"},
                          args.pretrained, args.freeze_blocks, args.epochs_this_run, keep_weights=False):
            return None
        student = torch.load(layout.logits_path(fold, recipe.epochs), weights_only=True)["logits"].numpy()
        holdout_rows = [row_of[r.image_id] for r in holdout]
        teacher = cached[fold][holdout_rows, 0].numpy()  # view 0 is the served input: teacher k out of fold
        check_logits[fold] = (holdout_rows, student)
        check[str(fold)] = {"student": single_fold_figures(student, holdout, target_sensitivity=args.target_sensitivity),
                            "teacher": single_fold_figures(teacher, holdout, target_sensitivity=args.target_sensitivity)}
        print(f"check fold {fold}: student " + _line(check[str(fold)]["student"]) + " | teacher "
              + _line(check[str(fold)]["teacher"]), flush=True)
    if check:
        summary["check"] = {"method": "student k trained on the other folds with out-of-fold soft labels, scored on fold k "
                                      f"after its {recipe.epochs} epochs; teacher k scored on the same fold; per lesion, "
                                      "calibrated by a 5-part lesion-grouped cross-fit within the fold",
                            "per_fold": check,
                            "mean": {who: {key: float(np.mean([row[who][key] for row in check.values()]))
                                           for key in ("balanced_accuracy", "macro_auc", "ece")}
                                     for who in ("student", "teacher")}}
    if sorted(args.check_folds) == list(range(args.k)):
        summary["check_all_folds"] = _all_folds(check_logits, cached, records, folds, args)

    if not args.no_final:
        targets = soft_labels(cached, folds, "ensemble")
        loader = distillation_loader(records, preprocess, targets, recipe.batch_size, recipe.workers, device)
        criterion = distillation_loss(class_counts(records), recipe.class_weight_power, args.temperature, args.alpha)
        final_dir = layout.root / "student"
        if not train_fold(recipe, preprocess, criterion, loader, None, [], final_dir, device, amp,
                          {**run_config, "student": "final", "soft_labels": "ensemble"}, args.pretrained,
                          args.freeze_blocks, args.epochs_this_run):
            return None
        path = _export_student(final_dir, recipe, preprocess, assignment, folds_file, records, check_logits, args, summary)
        summary["student"] = {"checkpoint": str(path), "sha256": file_sha256(path)}
        print(f"student written to {path}", flush=True)
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.provenance_dir:
        target = Path(args.provenance_dir) / f"distill_k{args.k}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        for fold in args.check_folds:
            (target / f"check_fold_{fold}_metrics.jsonl").write_text((layout.fold_dir(fold) / "metrics.jsonl").read_text())
        if not args.no_final:
            (target / "student_metrics.jsonl").write_text((layout.root / "student" / "metrics.jsonl").read_text())
        print(f"provenance written to {target}", flush=True)
    return summary


def _eval_loader(records, preprocess, recipe: Recipe, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(LesionDataset(records, build_eval_transform(preprocess)), batch_size=recipe.batch_size * 2,
                                       shuffle=False, num_workers=recipe.workers, pin_memory=device.type == "cuda")


def _line(figures: dict[str, Any]) -> str:
    return (f"balanced accuracy {figures['balanced_accuracy']:.4f}, macro AUC {figures['macro_auc']:.4f}, "
            f"melanoma sensitivity {figures['melanoma_sensitivity']}")


def _all_folds(check_logits, cached, records, folds: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Students and teachers out of fold over every image, summarized as scripts/train_folds.py summarizes the teachers."""
    student = np.zeros((len(records), len(CLASS_CODES)), np.float32)
    for rows, logits in check_logits.values():
        student[rows] = logits
    teacher = torch.stack(cached)[torch.as_tensor(folds), torch.arange(len(records)), 0].numpy()
    labels = np.array([r.label for r in records])
    lesions = [r.lesion_id for r in records]
    figures = {}
    for name, logits in (("student", student), ("teacher", teacher)):
        report = lesion_figures(logits, labels, lesions, folds, target_sensitivity=args.target_sensitivity,
                                bootstrap=args.bootstrap)
        figures[name] = {key: report[key] for key in ("n_lesions", "balanced_accuracy", "macro_auc", "ece",
                                                      "melanoma_sensitivity", "melanoma_specificity",
                                                      "referral_threshold", "per_fold", "bootstrap")}
    return figures


def _export_student(final_dir: Path, recipe: Recipe, preprocess, assignment, folds_file: Path, records, check_logits,
                    args: argparse.Namespace, summary: dict[str, Any]) -> Path:
    """The final student as a release-format checkpoint, ``meta.data`` naming the folds it was distilled over."""
    model = load_epoch_weights(build_model(recipe.arch, dropout=recipe.dropout),
                               final_dir / "weights" / f"epoch_{recipe.epochs:03d}.pt")
    calibration, calibration_source = {}, None
    if check_logits:
        labels = np.array([r.label for r in records])
        rows = np.concatenate([np.asarray(r) for r, _ in check_logits.values()])
        logits = np.concatenate([l for _, l in check_logits.values()])
        calibration = {"none": fit_calibration(torch.from_numpy(logits), torch.from_numpy(labels[rows]))}
        calibration_source = (f"fitted on the out-of-fold logits of the check students of folds "
                              f"{sorted(check_logits)} ({len(rows)} images), same recipe; not on the final student's own "
                              "training images")
    data = folds_data_record(assignment, folds_file, None, len(records), 0)
    data["train_class_counts"] = dict(zip(CLASS_CODES, class_counts(records)))
    meta = Meta(preprocess, version=args.model_version, calibration=calibration, data=data)
    done = json.loads((final_dir / "done.json").read_text())
    checkpoint = make_checkpoint(model, recipe.arch, preprocess, meta, recipe.dropout, trained_epochs=recipe.epochs,
                                 initialization=done["initialization"], distillation=summary["distillation"],
                                 calibration_source=calibration_source, out_of_fold_check=summary.get("check"),
                                 recipe=dataclasses.asdict(recipe), command=summary["command"], torch=str(torch.__version__),
                                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    checkpoint = Checkpoint(pack_state_dict(checkpoint.state_dict, args.storage_dtype), checkpoint.config, checkpoint.meta)
    return checkpoint.save(final_dir.parent / "student.pt")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
