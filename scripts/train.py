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

The pieces (data, loss, optimizer, EMA, epochs, resuming, the checkpoint) are :mod:`lab.training`.

Example:
    python scripts/train.py --metadata ../shared/data/ham10000-224/metadata.csv \
        --images ../shared/data/ham10000-224/images --output runs/lite0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from handler.architectures import architecture, build_model
from handler.checkpoint import read_checkpoint
from handler.labels import CLASS_CODES
from handler.preprocessing import RESIZE_MODES
from lab.data import class_counts
from lab.distillation import cache_teacher_logits, distillation_loss
from lab.evaluation import format_report
from lab.provenance import checkpoint_provenance, command_line
from lab.training import (
    AMP_MODES, Progress, Recipe, add_recipe_arguments, Trainer, autocast_dtype, data_record, fit_calibrations, freeze_early_layers,
    initialize, load_best_weights, make_criterion, make_ema, make_loaders, make_optimizer, release_checkpoint, resolve_device,
    resume, run_epochs, seed_everything, split_records, split_records_by_file, write_split)


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
    parser.add_argument("--teacher",
                        help="release-format checkpoint whose logits (of each training image as it serves it) are "
                             "distilled: loss = alpha * KL + (1 - alpha) * class-weighted CE; cached once in the run folder")
    parser.add_argument("--distill-alpha", type=float, default=0.7, help="share of the KL term with --teacher")
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="softening of the KL term with --teacher")
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
    """Train, validate each epoch, early-stop, and write ``best.pt`` with fitted calibrations.

    Returns:
        The validation report of the released (best) weights, calibrated, or None when
        the run paused early because of ``--epochs-this-run``.
    """
    recipe = Recipe.from_namespace(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(recipe.seed)
    split_seed = recipe.seed if args.split_seed is None else args.split_seed
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    if args.val_split:
        train, val = split_records_by_file(args.metadata, args.images, args.val_split, args.limit, split_seed)
    else:
        train, val = split_records(args.metadata, args.images, args.val_fraction, split_seed, args.limit)
    counts = class_counts(train)
    print(f"train {len(train)} images {dict(zip(CLASS_CODES, counts))}; val {len(val)} images "
          f"{dict(zip(CLASS_CODES, class_counts(val)))}; device {device}, autocast {amp}", flush=True)
    write_split(output / "split.json", val, split_seed, args.val_fraction)

    preprocess = architecture(recipe.arch).training_preprocess(recipe.image_size, args.resize_mode, args.image_width)
    model = build_model(recipe.arch, dropout=recipe.dropout)
    try:
        weights_source = initialize(model, recipe.arch, preprocess, args.init_checkpoint, args.pretrained, args.init_member)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from error
    print(f"initialized from {weights_source}", flush=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    frozen = freeze_early_layers(model, args.freeze_blocks)
    ema = make_ema(model, recipe.ema_decay)
    teacher_logits, criterion = None, make_criterion(recipe, counts)
    if args.teacher:
        started = time.perf_counter()
        teacher_logits = cache_teacher_logits(args.teacher, train, output / "teacher_logits.pt", device,
                                              batch_size=recipe.batch_size, workers=recipe.workers, views=1)[:, 0]
        print(f"teacher logits of {len(train)} images ready in {time.perf_counter() - started:.0f} s", flush=True)
        criterion = distillation_loss(counts, recipe.class_weight_power, args.distill_temperature, args.distill_alpha)
    train_loader, val_loader = make_loaders(recipe, train, val, preprocess, device, teacher_logits)
    optimizer, scheduler = make_optimizer(model, recipe, len(train_loader))
    trainer = Trainer(model, ema, optimizer, scheduler, criterion.to(device), preprocess, device, amp, frozen)
    progress = None if args.no_resume else resume(output / "last.pt", trainer)
    if progress is None:
        progress = Progress()
    else:
        print(f"resumed from {output / 'last.pt'} at epoch {progress.start_epoch}", flush=True)
    if not run_epochs(trainer, train_loader, val_loader, recipe, output, progress, args.epochs_this_run):
        return None

    best_epoch = load_best_weights(trainer, output)
    calibrations, report, validation = fit_calibrations(trainer, val_loader)
    checkpoint = release_checkpoint(
        trainer.eval_model, recipe, preprocess, args.model_version, calibrations,
        data_record(args.metadata, train, val, args.val_fraction, split_seed)
        | ({"split": f"every image of the lesions of {args.val_split}'s val_image_ids"} if args.val_split else {})
        | ({"distillation": {"teacher": checkpoint_provenance(args.teacher, read_checkpoint(args.teacher).meta),
                             "alpha": args.distill_alpha,
                             "temperature": args.distill_temperature, "views": "the image as the teacher serves it"}}
           if args.teacher else {}),
        trained_epochs=len(progress.history), best_epoch=best_epoch,
        initialization=weights_source, validation=validation, command=command_line("scripts/train.py"),
        torch=str(torch.__version__), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    checkpoint.save(output / "best.pt")
    (output / "val_report.json").write_text(json.dumps(report, indent=2))
    print(f"best epoch {best_epoch}\n{format_report(report)}", flush=True)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
