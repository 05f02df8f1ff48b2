"""One run of ``scripts/train.py``, in order: split the images, build the network (from ImageNet or a
release checkpoint, maybe partly frozen, maybe distilled from a teacher), train it with resuming and
early stopping, and release the best epoch as ``best.pt`` with calibrations fitted on the validation
split, beside ``val_report.json``.

The pieces (data, loss, optimizer, EMA, epochs, resuming, the checkpoint) are :mod:`lab.training`; the
device, threads and starting-weight settings are :class:`lab.folds.RunSettings`, shared with the
fold-training scripts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from handler.architectures import architecture, build_model
from handler.checkpoint import model_from_checkpoint, read_checkpoint
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig
from lab.data import LabelledImage, class_counts
from lab.distillation import cache_teacher_logits, distillation_loss, out_of_fold_teacher_logits
from lab.evaluation import format_report
from lab.folds import RunSettings
from lab.function_matching import FunctionMatchingLoss, MixedTeacherTargets
from lab.provenance import checkpoint_provenance, file_sha256
from lab.training import (
    Progress, Recipe, Trainer, class_weights, data_record, fit_calibrations, freeze_early_layers, initialize, load_best_weights,
    make_criterion, make_ema, make_loaders, make_optimizer, release_checkpoint, resume, run_epochs, seed_everything,
    split_records, split_records_by_file, write_split)


@dataclass(frozen=True)
class TrainingRunOptions:
    """What a run trains on, starts from and writes, beyond its :class:`lab.training.Recipe` and
    :class:`lab.folds.RunSettings` (``scripts/train.py``'s options of the same names, whose defaults are there).

    Attributes:
        metadata: HAM10000 metadata CSV.
        images: Image folders.
        output: Run folder (``last.pt``, ``best.pt``, ``metrics.jsonl``, ``split.json``, ``val_report.json``).
        val_fraction: Share of the lesions that validates (without ``val_split``).
        split_seed: Seed of the split; None takes the recipe's seed.
        val_split: A recorded validation split (JSON with ``val_image_ids``), instead of ``val_fraction``.
        init_checkpoint: Release checkpoint to start from instead of ImageNet weights.
        init_member: With an ensemble ``init_checkpoint``, the member to start from.
        image_width: Width of a rectangular input (the recipe's ``image_size`` is then its height).
        resize_mode: The geometry; None takes the architecture entry's.
        teacher: Release checkpoint whose logits are distilled, or None.
        teacher_out_of_fold: Instead of ``teacher``, a fold run's out-of-fold logits CSV to distil
            (:func:`lab.distillation.out_of_fold_teacher_logits`), or None.
        distill_alpha: Share of the KL term with a teacher.
        distill_temperature: Softening of the KL term with a teacher.
        function_matching: With ``teacher``, the mixup parameter of online function matching
            (:mod:`lab.function_matching`); 0 distils cached logits of the unaugmented images.
        model_version: Version written into ``best.pt``.
        no_resume: Start over even if ``last.pt`` exists.
    """

    metadata: str
    images: Sequence[str]
    output: str
    val_fraction: float
    split_seed: int | None
    val_split: str | None
    init_checkpoint: str | None
    init_member: int | None
    image_width: int | None
    resize_mode: str | None
    teacher: str | None
    teacher_out_of_fold: str | None
    distill_alpha: float
    distill_temperature: float
    function_matching: float
    model_version: str
    no_resume: bool

    @classmethod
    def from_namespace(cls, values: Any) -> "TrainingRunOptions":
        """The options in a namespace (such as parsed arguments) holding attributes of the same names."""
        return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)})


def split_images(options: TrainingRunOptions, split_seed: int, limit: int) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The training and validation images: by the recorded ``val_split`` when given, else by lesion at ``val_fraction``."""
    if options.val_split:
        return split_records_by_file(options.metadata, options.images, options.val_split, limit, split_seed)
    return split_records(options.metadata, options.images, options.val_fraction, split_seed, limit)


def starting_network(recipe: Recipe, preprocess: PreprocessConfig, options: TrainingRunOptions,
                     settings: RunSettings) -> tuple[nn.Module, list[nn.Module], Any, str]:
    """The network on its device with its starting weights, its frozen early layers and its weight EMA.

    Returns:
        The network, the frozen modules, the EMA (or None) and where the starting weights came from.

    Raises:
        SystemExit: The starting weights are not found (a message for the command line, not a traceback).
    """
    model = build_model(recipe.arch, dropout=recipe.dropout)
    try:
        source = initialize(model, recipe.arch, preprocess, options.init_checkpoint, settings.pretrained, options.init_member)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from error
    print(f"initialized from {source}", flush=True)
    model = model.to(settings.device).to(memory_format=torch.channels_last)
    frozen = freeze_early_layers(model, settings.freeze_blocks)
    return model, frozen, make_ema(model, recipe.ema_decay), source


def training_loss(recipe: Recipe, options: TrainingRunOptions, train: Sequence[LabelledImage], counts: list[int],
                  device: torch.device, output: Path) -> tuple[nn.Module, torch.Tensor | None]:
    """The loss, and the teacher's cached logits of the training images when distilling them (else None).

    The teacher's logits (of each image as the teacher serves it) are computed once into the run folder
    (``teacher_logits.pt``) and reused when the run resumes. Out-of-fold logits are read from their CSV.
    Function matching caches nothing: its teacher answers each batch (:func:`matching_targets`).
    """
    if not (options.teacher or options.teacher_out_of_fold):
        return make_criterion(recipe, counts), None
    loss = distillation_loss(counts, recipe.class_weight_power, options.distill_temperature, options.distill_alpha)
    if options.teacher_out_of_fold:
        return loss, out_of_fold_teacher_logits(options.teacher_out_of_fold, train)
    if options.function_matching:
        weight = class_weights(counts, recipe.class_weight_power)
        return FunctionMatchingLoss(weight, options.distill_temperature, options.distill_alpha), None
    started = time.perf_counter()
    teacher_logits = cache_teacher_logits(options.teacher, train, output / "teacher_logits.pt", device,
                                          batch_size=recipe.batch_size, workers=recipe.workers, views=(0,))[:, 0]
    print(f"teacher logits of {len(train)} images ready in {time.perf_counter() - started:.0f} s", flush=True)
    return loss, teacher_logits


def matching_targets(options: TrainingRunOptions, preprocess: PreprocessConfig,
                     device: torch.device) -> MixedTeacherTargets | None:
    """The batch hook of function matching (the teacher on its device, in eval mode), or None without it."""
    if not (options.teacher and options.function_matching):
        return None
    checkpoint = read_checkpoint(options.teacher)
    teacher = model_from_checkpoint(checkpoint, device, str(options.teacher)).model
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return MixedTeacherTargets(teacher, preprocess, checkpoint.meta.preprocessing, options.function_matching)


def run_data_record(options: TrainingRunOptions, train: Sequence[LabelledImage], val: Sequence[LabelledImage],
                    split_seed: int) -> dict[str, Any]:
    """``meta.data`` of the released checkpoint: the data and split, and the recorded split and teacher when used."""
    record = data_record(options.metadata, train, val, options.val_fraction, split_seed)
    if options.val_split:
        record["split"] = f"every image of the lesions of {options.val_split}'s val_image_ids"
    if options.teacher:
        record["distillation"] = {"teacher": checkpoint_provenance(options.teacher, read_checkpoint(options.teacher).meta),
                                  "alpha": options.distill_alpha, "temperature": options.distill_temperature,
                                  "views": (f"the student's own view, mixed up (Beta({options.function_matching:g}, "
                                            f"{options.function_matching:g})), online (function matching)"
                                            if options.function_matching else "the image as the teacher serves it")}
    if options.teacher_out_of_fold:
        record["distillation"] = {"teacher": "out-of-fold logits: each image's from the fold network that did not train on it",
                                  "logits": Path(options.teacher_out_of_fold).name,
                                  "logits_sha256": file_sha256(options.teacher_out_of_fold),
                                  "alpha": options.distill_alpha, "temperature": options.distill_temperature,
                                  "views": "the image as the fold network scored it"}
    return record


def train_and_release(recipe: Recipe, settings: RunSettings, options: TrainingRunOptions,
                      command: str) -> dict[str, Any] | None:
    """Train, validate each epoch, early-stop, and write ``best.pt`` with fitted calibrations and ``val_report.json``.

    Args:
        recipe: The hyperparameters.
        settings: Device, autocast, starting weights, frozen stages, the epochs of this run and the image limit.
        options: Data, split, initialization, teacher, version and output.
        command: The command line recorded in the checkpoint's provenance.

    Returns:
        The validation report of the released (best) weights, calibrated, or None when the run paused
        early because of ``settings.epochs_this_run``.
    """
    seed_everything(recipe.seed)
    split_seed = recipe.seed if options.split_seed is None else options.split_seed
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    train, val = split_images(options, split_seed, settings.limit)
    counts = class_counts(train)
    print(f"train {len(train)} images {dict(zip(CLASS_CODES, counts))}; val {len(val)} images "
          f"{dict(zip(CLASS_CODES, class_counts(val)))}; device {settings.device}, autocast {settings.amp}", flush=True)
    write_split(output / "split.json", val, split_seed, options.val_fraction)

    preprocess = architecture(recipe.arch).training_preprocess(recipe.image_size, options.resize_mode, options.image_width)
    model, frozen, ema, weights_source = starting_network(recipe, preprocess, options, settings)
    criterion, teacher_logits = training_loss(recipe, options, train, counts, settings.device, output)
    train_loader, val_loader = make_loaders(recipe, train, val, preprocess, settings.device, teacher_logits)
    optimizer, scheduler = make_optimizer(model, recipe, len(train_loader))
    trainer = Trainer(model, ema, optimizer, scheduler, criterion.to(settings.device), preprocess, settings.device,
                      settings.amp, frozen, matching_targets(options, preprocess, settings.device))
    progress = None if options.no_resume else resume(output / "last.pt", trainer)
    if progress is None:
        progress = Progress()
    else:
        print(f"resumed from {output / 'last.pt'} at epoch {progress.start_epoch}", flush=True)
    if not run_epochs(trainer, train_loader, val_loader, recipe, output, progress, settings.epochs_this_run):
        return None

    best_epoch = load_best_weights(trainer, output)
    calibrations, report, validation = fit_calibrations(trainer, val_loader)
    checkpoint = release_checkpoint(
        trainer.eval_model, recipe, preprocess, options.model_version, calibrations,
        run_data_record(options, train, val, split_seed), trained_epochs=len(progress.history), best_epoch=best_epoch,
        initialization=weights_source, validation=validation, command=command, torch=str(torch.__version__),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    checkpoint.save(output / "best.pt")
    (output / "val_report.json").write_text(json.dumps(report, indent=2))
    print(f"best epoch {best_epoch}\n{format_report(report)}", flush=True)
    return report
