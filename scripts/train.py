"""Fine-tune an EfficientNet on HAM10000-style data (metadata CSV + image folders).

Resumable: every epoch writes ``last.pt`` (model, EMA, optimizer, schedule, history);
rerunning the same command continues from it, drawing the same data order and
augmentations as an uninterrupted run (every generator is reseeded per epoch). The best epoch by validation balanced
accuracy is written as a release-format checkpoint ``best.pt`` with a calibration
(temperature and class biases) fitted on the validation split for every test-time
augmentation mode.

``--init-checkpoint`` continues from a release checkpoint instead of ImageNet weights, and
``--freeze-blocks N`` freezes the stem and the first N stages (weights and batch-norm
statistics): fine-tuning an already adapted model that way runs about 2.7x faster on a CPU.

The run is :mod:`lab.training_run`; its pieces (data, loss, optimizer, EMA, epochs, resuming, the checkpoint)
are :mod:`lab.training`.

Example:
    python scripts/train.py --metadata ../shared/data/ham10000-224/metadata.csv \
        --images ../shared/data/ham10000-224/images --output runs/lite0
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from handler.preprocessing import RESIZE_MODES
from lab.folds import RunSettings
from lab.provenance import command_line
from lab.training import AMP_MODES, Recipe, add_recipe_arguments
from lab.training_run import TrainingRunOptions, train_and_release


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the training script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metadata", required=True, help="HAM10000 metadata CSV (lesion_id, image_id, dx)")
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--output", required=True, help="run folder for last.pt, best.pt and metrics.jsonl")
    add_recipe_arguments(parser, Recipe(workers=min(8, os.cpu_count() or 1)))
    parser.add_argument("--pretrained", default="auto",
                        help="'auto' (ImageNet weights found locally, error if none), 'none', or a state-dict path")
    parser.add_argument("--init-checkpoint",
                        help="start from this release-format checkpoint (same --arch) instead of ImageNet weights")
    parser.add_argument("--init-member", type=int,
                        help="with an ensemble --init-checkpoint: the member to start from (its architecture is --arch)")
    parser.add_argument("--image-width", type=int,
                        help="width of a rectangular model input (--image-size is then its height; needs "
                             "--resize-mode full_view): 150x200 is HAM10000's own 4:3 shape")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES,
                        help="the geometry: centre crop of the shorter side, or the whole image resized to the input "
                             "(default: the --arch entry's, handler.architectures)")
    parser.add_argument("--val-split",
                        help="a recorded validation split (JSON with val_image_ids, e.g. models/provenance/val_split.json): "
                             "every image of those lesions validates, the rest trains (instead of --val-fraction)")
    teachers = parser.add_mutually_exclusive_group()
    teachers.add_argument("--teacher",
                          help="release-format checkpoint whose logits (of each training image as it serves it) are "
                               "distilled: loss = alpha * KL + (1 - alpha) * class-weighted CE; cached once in the run folder")
    teachers.add_argument("--teacher-out-of-fold", metavar="CSV",
                          help="distil out-of-fold logits instead: scripts/train_folds.py's CSV (its run folder's "
                               "out_of_fold_logits_epoch_<E>.csv, or the copy in models/provenance/folds_k<K>/), which "
                               "gives each training image the logits of the fold network that did not train on it")
    parser.add_argument("--distill-alpha", type=float, default=0.7, help="share of the KL term with a teacher")
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="softening of the KL term with a teacher")
    parser.add_argument("--function-matching", type=float, default=0.0, metavar="MIXUP",
                        help="with --teacher: run the teacher online on the student's own view of each batch, mixed up "
                             "with weights ~ Beta(MIXUP, MIXUP) (function matching, Beyer et al. 2022), instead of "
                             "caching its logits of the unaugmented images; 0 (default): cached logits")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--freeze-blocks", type=int, default=0,
                        help="freeze the stem and this many stages after it (weights and batch-norm statistics)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--split-seed", type=int,
                        help="seed of the train/validation split (default: --seed); give ensemble members "
                             "different --seed values and one --split-seed")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto",
                        help="autocast: auto = bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU "
                             "(bf16 autocast made CPU training 12x slower on this machine's depthwise convolutions)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="use only this many images (smoke tests)")
    parser.add_argument("--model-version", default="0.0.0-dev", help="version written into best.pt")
    parser.add_argument("--no-resume", action="store_true", help="start over even if last.pt exists")
    parser.add_argument("--epochs-this-run", type=int, default=0,
                        help="stop cleanly after this many epochs (time-boxed sessions); rerun to continue")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train, validate each epoch, early-stop, and write ``best.pt`` with fitted calibrations
    (:func:`lab.training_run.train_and_release`).

    Returns:
        The validation report of the released (best) weights, calibrated, or None when
        the run paused early because of ``--epochs-this-run``.
    """
    if args.function_matching and not args.teacher:
        raise SystemExit("--function-matching runs a teacher network online: it needs --teacher")
    recipe = Recipe.from_namespace(args)
    settings = RunSettings.choose(args.device, args.amp, args.threads, pretrained=args.pretrained,
                                  freeze_blocks=args.freeze_blocks, epochs_this_run=args.epochs_this_run, limit=args.limit)
    return train_and_release(recipe, settings, TrainingRunOptions.from_namespace(args), command_line("scripts/train.py"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
