"""Fine-tuning pieces: data, loss, optimizer and schedule, weight EMA, epochs, resuming, the release checkpoint.

``scripts/train.py`` strings these together; each is reachable on its own. A run is resumable and
exact: every epoch reseeds every generator from ``(seed, epoch)`` (:func:`seed_epoch`) and writes
``last.pt`` (:func:`save_state`), so a rerun continues (:func:`resume`) with the same data order,
augmentations and dropout as an uninterrupted run. ``last.pt`` and ``best_weights.pt`` are
training state, not checkpoints; the release-format ``best.pt`` is written through
:mod:`handler.checkpoint` (:func:`release_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from handler.architectures import architecture, family_of
from handler.calibration import TTA_MODES, Calibration, augmented_views, merge_views
from handler.checkpoint import Checkpoint, Meta, make_checkpoint, read_checkpoint, split_members
from handler.decision import decide
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig, normalize_batch
from handler.storage import unpack_state_dict
from lab.data import (LabelledImage, LesionDataset, attach_paths, build_eval_transform, build_train_transform, class_counts,
                      lesion_grouped_split, read_labels)
from lab.calibration import fit_calibration
from lab.evaluation import classification_report
from lab.imagenet import imagenet_weights_path, load_imagenet_backbone
from lab.provenance import checkpoint_provenance

IMBALANCE_MODES = ("weighted_loss", "sampler", "focal", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Recipe:
    """The hyperparameters of a training run (``scripts/train.py``'s options of the same names).

    Attributes:
        arch: Architecture name (:data:`handler.architectures.ARCHITECTURES`).
        image_size: Side of the square model input.
        epochs: Length of the one-cycle schedule.
        batch_size: Training batch size (validation uses twice this).
        lr: Peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        warmup_fraction: Share of the schedule spent warming up.
        imbalance: ``weighted_loss``, ``sampler``, ``focal`` or ``none``.
        class_weight_power: Class weights are ``(1 / frequency) ** power``.
        focal_gamma: Focal loss exponent.
        label_smoothing: Label smoothing of the cross-entropy.
        dropout: Dropout before the head.
        min_crop_scale: Smallest random crop, as a share of the resized image.
        ema_decay: Decay of the weight EMA; 0 disables it.
        patience: Early stop after this many epochs without improvement.
        seed: Seed of initialization, data order, augmentations and dropout.
        workers: Data-loader worker processes.
    """

    arch: str = "efficientnet_lite0"
    image_size: int = architecture("efficientnet_lite0").image_size  # the input size is the architecture entry's
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.1
    imbalance: str = "weighted_loss"
    class_weight_power: float = 0.5
    focal_gamma: float = 2.0
    label_smoothing: float = 0.05
    dropout: float = 0.2
    min_crop_scale: float = 0.5
    ema_decay: float = 0.999
    patience: int = 8
    seed: int = 42
    workers: int = 0

    def __post_init__(self) -> None:
        if self.imbalance not in IMBALANCE_MODES:
            raise ValueError(f"unknown imbalance handling {self.imbalance!r}; choose one of {IMBALANCE_MODES}")

    @classmethod
    def from_namespace(cls, values: Any) -> "Recipe":
        """The recipe in a namespace (such as parsed arguments) holding attributes of the same names."""
        return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)})


def add_recipe_arguments(parser: Any, defaults: Recipe = Recipe()) -> None:
    """Add one option per :class:`Recipe` field to an ``argparse`` parser, named and defaulted as
    ``scripts/train.py`` names them, so that :meth:`Recipe.from_namespace` reads the parsed arguments.

    Args:
        parser: An ``argparse.ArgumentParser`` (or argument group).
        defaults: The recipe whose values are the defaults (a script may train longer by default, say).
    """
    from handler.architectures import ARCHITECTURES

    parser.add_argument("--arch", choices=ARCHITECTURES, default=defaults.arch)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    parser.add_argument("--imbalance", choices=IMBALANCE_MODES, default=defaults.imbalance, help="class-imbalance handling")
    parser.add_argument("--class-weight-power", type=float, default=defaults.class_weight_power,
                        help="class weights are (1/frequency)**power, for the loss, the sampler or focal alpha")
    parser.add_argument("--focal-gamma", type=float, default=defaults.focal_gamma)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--min-crop-scale", type=float, default=defaults.min_crop_scale)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="0 disables the weight EMA")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="early stop after this many epochs without improvement")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loader worker processes")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed every generator from (seed, epoch) at the start of an epoch.

    The shuffle order, the augmentations (drawn in fresh workers seeded from the global
    generator) and dropout then depend only on the epoch, so a resumed run continues exactly
    as an uninterrupted one would.
    """
    seed_everything(seed * 100_003 + epoch)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full fp32.

    ``auto`` is bf16 on CUDA with bf16 support, fp16 on other CUDA and fp32 on the CPU (bf16
    autocast made CPU training 12x slower on this machine's depthwise convolutions).
    """
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context, or a no-op when running in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- data ---------------------------------------------------------------------------------------------------------

def split_records(metadata: str | os.PathLike, images: Sequence[str | os.PathLike], val_fraction: float,
                  split_seed: int, limit: int = 0) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The labelled images, split into training and validation by lesion (:func:`lab.data.lesion_grouped_split`).

    Args:
        metadata: HAM10000 metadata CSV.
        images: Folders holding the images.
        val_fraction: Share of the data for validation.
        split_seed: Seed of the split (and of the ``limit`` sample).
        limit: Use only this many images, drawn at random (smoke runs); 0 uses all.

    Raises:
        RuntimeError: If a lesion ended up on both sides.
    """
    records = attach_paths(read_labels(metadata), images)
    if limit:
        records = random.Random(split_seed).sample(records, min(limit, len(records)))
    train, val = lesion_grouped_split(records, val_fraction, split_seed)
    if {r.lesion_id for r in train} & {r.lesion_id for r in val}:
        raise RuntimeError("lesion-grouped split leaked a lesion into both sides")
    return train, val


def lesions_of_split(records: Sequence[LabelledImage], split_file: str | os.PathLike, source: str = "the metadata") -> set[str]:
    """The lesions that a recorded validation split's ``val_image_ids`` show, among ``records``.

    Raises:
        ValueError: If none of the file's images is among the records.
    """
    named = set(json.loads(Path(split_file).read_text())["val_image_ids"])
    lesions = {r.lesion_id for r in records if r.image_id in named}
    if not lesions:
        raise ValueError(f"none of the validation images of {split_file} is in {source}")
    return lesions


def split_records_by_file(metadata: str | os.PathLike, images: Sequence[str | os.PathLike], split_file: str | os.PathLike,
                          limit: int = 0, seed: int = 0) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The labelled images, split by a recorded validation split: every image of a lesion that one of
    the file's ``val_image_ids`` shows is validation, the rest training.

    A split recorded on one image per lesion (``ham10000-224``) thus carries over to a folder with
    every image of each lesion (``ham10000-200x150``), and results stay comparable across both.

    Args:
        metadata: HAM10000 metadata CSV.
        images: Folders holding the images.
        split_file: JSON with ``val_image_ids`` (:func:`write_split`, ``models/provenance/val_split.json``).
        limit: Use only this many images, drawn at random (smoke runs); 0 uses all.
        seed: Seed of the ``limit`` sample.

    Raises:
        ValueError: If none of the file's images is in the metadata.
    """
    records = attach_paths(read_labels(metadata), images)
    val_lesions = lesions_of_split(records, split_file, str(metadata))
    if limit:
        records = random.Random(seed).sample(records, min(limit, len(records)))
    train = [r for r in records if r.lesion_id not in val_lesions]
    val = [r for r in records if r.lesion_id in val_lesions]
    return train, val


def write_split(path: str | os.PathLike, val: Sequence[LabelledImage], split_seed: int, val_fraction: float) -> None:
    """Write the validation image ids (``split.json``), which calibration and evaluation read as ``--subset``."""
    Path(path).write_text(json.dumps({"seed": split_seed, "val_fraction": val_fraction,
                                      "val_image_ids": sorted(r.image_id for r in val)}, indent=0))


def class_weights(counts: list[int], power: float) -> torch.Tensor:
    """Inverse-frequency weights to the given power, normalized to a mean of 1 over samples."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    weights = (counts_t.sum() / counts_t) ** power
    return weights / (weights * counts_t).sum() * counts_t.sum()


def make_loaders(recipe: Recipe, train: Sequence[LabelledImage], val: Sequence[LabelledImage],
                 preprocess: PreprocessConfig, device: torch.device, teacher_logits: torch.Tensor | None = None
                 ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training and validation data loaders; the ``sampler`` imbalance handling draws classes by weight.

    With ``teacher_logits`` ((N, C), one row per training image) the training batches carry them
    next to the labels (:class:`lab.distillation.SoftLabelledDataset`), for a distillation loss.
    """
    train_set = LesionDataset(train, build_train_transform(preprocess, recipe.min_crop_scale))
    if teacher_logits is not None:
        from lab.distillation import SoftLabelledDataset  # lab.distillation builds on this module

        train_set = SoftLabelledDataset(train_set, teacher_logits)
    val_set = LesionDataset(val, build_eval_transform(preprocess))
    common = dict(num_workers=recipe.workers, pin_memory=device.type == "cuda")
    sampler = None
    if recipe.imbalance == "sampler":
        per_class = class_weights(class_counts(train), recipe.class_weight_power)
        sample_weights = per_class[torch.tensor([r.label for r in train])]
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, num_samples=len(train), replacement=True)
    # Training workers are not persistent: fresh workers take their seeds from the generator
    # that seed_epoch resets, which is what makes resuming exact.
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=sampler is None,
                                               sampler=sampler, drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=recipe.batch_size * 2, shuffle=False,
                                             persistent_workers=recipe.workers > 0, **common)
    return train_loader, val_loader


# --- loss ---------------------------------------------------------------------------------------------------------

class FocalLoss(nn.Module):
    """Multi-class focal loss with per-class alpha weights."""

    def __init__(self, alpha: torch.Tensor, gamma: float, label_smoothing: float) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (self.alpha[target] * (1 - p_true) ** self.gamma * ce).mean()


def make_criterion(recipe: Recipe, counts: list[int]) -> nn.Module:
    """The loss for the recipe's imbalance handling, given the training class counts."""
    if recipe.imbalance == "weighted_loss":
        return nn.CrossEntropyLoss(weight=class_weights(counts, recipe.class_weight_power),
                                   label_smoothing=recipe.label_smoothing)
    if recipe.imbalance == "focal":
        return FocalLoss(class_weights(counts, recipe.class_weight_power), recipe.focal_gamma, recipe.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


# --- weights, optimizer, EMA --------------------------------------------------------------------------------------

def load_release_weights(model: nn.Module, arch: str, preprocess: PreprocessConfig, path: str | os.PathLike,
                         member: int | None = None) -> str:
    """Copy all weights (head included) from a release-format checkpoint, to continue training it.

    The geometry (input size, resize mode) may differ: warm-starting a network at a new geometry is
    how it is adapted to one. The normalization may not: the weights expect their own.

    Args:
        model: A network of architecture ``arch``.
        arch: Its architecture.
        preprocess: The preprocessing it will be trained with.
        path: The checkpoint.
        member: For an ensemble checkpoint, which member to start from.

    Returns:
        A provenance line naming the checkpoint (and member), its version and its SHA-256 prefix.

    Raises:
        ValueError: If the checkpoint (member) has another architecture or normalization, or an
            ensemble is given without ``member``.
    """
    checkpoint = read_checkpoint(path)
    source = checkpoint
    if checkpoint.is_ensemble:
        if member is None:
            raise ValueError(f"{path} is an ensemble; name the member to start from")
        source = split_members(checkpoint)[member]
    if source.arch != arch:
        raise ValueError(f"{path}{'' if member is None else f' member {member}'} is a {source.arch}, not {arch}")
    trained = checkpoint.meta.preprocessing
    if (trained.mean, trained.std) != (preprocess.mean, preprocess.std):
        raise ValueError(f"{path} was trained with another normalization: {trained.to_dict()}")
    model.load_state_dict(unpack_state_dict(source.state_dict))
    described = checkpoint_provenance(path, checkpoint.meta)
    if checkpoint.is_ensemble:  # a single network has no members: --init-member is then ignored
        described += f", member {member}"
    if trained != preprocess:
        described += f", trained with {trained.to_dict()}"
    return described


def initialize(model: nn.Module, arch: str, preprocess: PreprocessConfig, init_checkpoint: str | None = None,
               pretrained: str = "auto", init_member: int | None = None) -> str:
    """Load the starting weights: a release checkpoint, ImageNet weights, or none.

    Args:
        model: A freshly built network of architecture ``arch``.
        arch: Its architecture.
        preprocess: The preprocessing it will be trained with.
        init_checkpoint: A release-format checkpoint to continue from (takes precedence).
        init_member: For an ensemble ``init_checkpoint``, the member to continue from.
        pretrained: ``auto`` (ImageNet weights found on this machine), ``none``, or a state-dict path.

    Returns:
        Where the weights came from, for the checkpoint's ``initialization``.

    Raises:
        FileNotFoundError: ``auto`` with no ImageNet weights for ``arch`` on this machine.
    """
    if init_checkpoint:
        return load_release_weights(model, arch, preprocess, init_checkpoint, init_member)
    if pretrained == "none":
        return "random initialization"
    path = imagenet_weights_path(arch) if pretrained == "auto" else pretrained
    if path is None:
        raise FileNotFoundError(f"no local ImageNet weights for {arch}; pass --pretrained PATH or --pretrained none")
    copied = load_imagenet_backbone(model, arch, path)
    return f"ImageNet ({os.path.basename(path)}, {copied} tensors)"


def freeze_early_layers(model: nn.Module, blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first ``blocks`` stages, for cheaper fine-tuning of an adapted model.

    The early, high-resolution stages hold most of the compute but the most generic
    features; freezing them roughly triples training throughput on a CPU. Their batch-norm
    statistics must stay fixed as well, so the caller puts the returned modules back in
    eval mode after every ``model.train()`` (:func:`train_one_epoch` does).

    Args:
        model: A single network of a registered family (:func:`handler.architectures.family_of`).
        blocks: Number of stages after the stem to freeze (0 freezes nothing).

    Returns:
        The frozen modules.
    """
    if blocks <= 0:
        return []
    stages = family_of(model).early_stages(model, blocks)
    for module in stages:
        module.requires_grad_(False)
        module.eval()
    return stages


def make_optimizer(model: nn.Module, recipe: Recipe, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and a one-cycle cosine schedule over the whole run."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    total_steps = recipe.epochs * steps_per_epoch
    # OneCycleLR needs at least two warm-up steps; only tiny smoke runs come near that.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps,
                                                    pct_start=max(recipe.warmup_fraction, 2 / total_steps),
                                                    anneal_strategy="cos")
    return optimizer, scheduler


def warmup_ema_update(decay: float):
    """EMA update whose decay ramps up as ``(1 + n) / (10 + n)`` so early averages are not stuck at the initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        step = float(num_averaged)
        effective = min(decay, (1 + step) / (10 + step))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1 - effective)
            else:
                a.copy_(c)

    return update


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and buffers (:func:`warmup_ema_update`), or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmup_ema_update(decay), use_buffers=True)


# --- a run --------------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    """What one training run updates, and how it runs.

    Attributes:
        model: The network being trained (on ``device``, channels-last).
        ema: Its weight EMA, or None.
        optimizer: AdamW (:func:`make_optimizer`).
        scheduler: The one-cycle schedule, stepped per batch.
        criterion: The loss (:func:`make_criterion`).
        preprocess: The preprocessing the network is trained with.
        device: Where it runs.
        amp: The autocast dtype, or None for fp32.
        frozen: Modules kept in eval mode (:func:`freeze_early_layers`).
        batch_targets: Turns each normalized training batch and its labels into what the model trains on
            and what the criterion scores against, or None to use them as they are (function matching:
            :class:`lab.function_matching.MixedTeacherTargets`).
    """

    model: nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    preprocess: PreprocessConfig
    device: torch.device
    amp: torch.dtype | None = None
    frozen: list[nn.Module] = field(default_factory=list)
    batch_targets: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and released: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best validation score so far, and every epoch's row."""

    start_epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochStats:
    """One training epoch: mean loss, images seen and seconds spent."""

    loss: float
    seen: int
    seconds: float


def train_one_epoch(trainer: Trainer, loader: Iterable, description: str = "epoch") -> EpochStats:
    """One pass over the training loader: forward, loss, backward, optimizer, schedule and EMA steps per batch."""
    trainer.model.train()
    for module in trainer.frozen:
        module.eval()
    started = time.perf_counter()
    running_loss, seen = 0.0, 0
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True, mininterval=5)
    for images, labels in progress:
        inputs = normalize_batch(images.to(trainer.device, non_blocking=True), trainer.preprocess)
        labels = labels.to(trainer.device, non_blocking=True)
        if trainer.batch_targets is not None:
            inputs, labels = trainer.batch_targets(inputs, labels)
        with autocast(trainer.device, trainer.amp):
            loss = trainer.criterion(trainer.model(inputs).float(), labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update_parameters(trainer.model)
        running_loss += loss.item() * len(labels)
        seen += len(labels)
        progress.set_postfix(loss=f"{running_loss / seen:.4f}", lr=f"{trainer.scheduler.get_last_lr()[0]:.2e}")
    return EpochStats(running_loss / max(seen, 1), seen, time.perf_counter() - started)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, preprocess: PreprocessConfig, device: torch.device,
                   amp: torch.dtype | None, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (view-averaged under test-time augmentation ``tta``) and labels for a whole loader, in fp32."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        inputs = normalize_batch(images.to(device, non_blocking=True), preprocess)
        with autocast(device, amp):
            logits = model(augmented_views(inputs, tta))
        all_logits.append(merge_views(logits.float(), tta).cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def validate(trainer: Trainer, loader: Iterable) -> dict[str, float]:
    """The uncalibrated validation figures of :attr:`Trainer.eval_model`: loss, balanced accuracy, accuracy, macro AUC."""
    logits, labels = predict_logits(trainer.eval_model, loader, trainer.preprocess, trainer.device, trainer.amp)
    report = classification_report(torch.softmax(logits, 1).numpy(), labels.numpy())
    return {"val_loss": float(nn.functional.cross_entropy(logits, labels)),
            "val_balanced_accuracy": report["balanced_accuracy"], "val_accuracy": report["accuracy"],
            "val_macro_auc": report["macro_auc"]}


def save_state(path: Path, trainer: Trainer, progress: Progress, epoch: int) -> None:
    """Write ``last.pt`` (model, EMA, optimizer, schedule, progress) atomically, after epoch ``epoch`` (0-based)."""
    state = {"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
             "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(), "epoch": epoch,
             "best_score": progress.best_score, "best_epoch": progress.best_epoch, "history": progress.history}
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def resume(path: Path, trainer: Trainer) -> Progress | None:
    """Load ``last.pt`` into the trainer; returns where the run stands, or None when there is no such file."""
    if not path.exists():
        return None
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    trainer.model.load_state_dict(state["model"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    return Progress(state["epoch"] + 1, state["best_score"], state["best_epoch"], state["history"])


def run_epochs(trainer: Trainer, train_loader: Iterable, val_loader: Iterable, recipe: Recipe, output: Path,
               progress: Progress, epochs_this_run: int = 0) -> bool:
    """Train and validate epoch after epoch, keeping the best weights, until done, early-stopped or paused.

    Each epoch appends a row to ``metrics.jsonl`` and ``progress.history``, writes ``best_weights.pt``
    when validation balanced accuracy improves, and writes ``last.pt``.

    Args:
        trainer: The run.
        train_loader: Training batches.
        val_loader: Validation batches.
        recipe: Its hyperparameters (epochs, patience, seed).
        output: The run folder.
        progress: Where the run stands (updated in place).
        epochs_this_run: Pause after this many epochs (0: never).

    Returns:
        True when training is over (all epochs, or early stop); False when it paused.
    """
    for epoch in range(progress.start_epoch, recipe.epochs):
        seed_epoch(recipe.seed, epoch)
        started = time.perf_counter()
        stats = train_one_epoch(trainer, train_loader, f"epoch {epoch + 1}/{recipe.epochs}")
        figures = validate(trainer, val_loader)
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "val_loss": figures["val_loss"],
               "val_balanced_accuracy": figures["val_balanced_accuracy"], "val_accuracy": figures["val_accuracy"],
               "val_macro_auc": figures["val_macro_auc"], "lr": trainer.scheduler.get_last_lr()[0],
               "train_images_per_s": stats.seen / stats.seconds, "epoch_seconds": time.perf_counter() - started}
        progress.history.append(row)
        with open(output / "metrics.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        improved = row["val_balanced_accuracy"] > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch = row["val_balanced_accuracy"], epoch + 1
            torch.save({"state_dict": trainer.eval_model.state_dict(), "epoch": epoch + 1}, output / "best_weights.pt")
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
              + (" *best*" if improved else ""), flush=True)
        save_state(output / "last.pt", trainer, progress, epoch)
        if epoch + 1 - progress.best_epoch >= recipe.patience:
            print(f"early stop: no improvement in validation balanced accuracy for {recipe.patience} epochs", flush=True)
            return True
        if epochs_this_run and epoch + 1 - progress.start_epoch >= epochs_this_run and epoch + 1 < recipe.epochs:
            print(f"paused after epoch {epoch + 1}; rerun the same command to resume from {output / 'last.pt'}", flush=True)
            return False
    return True


def load_best_weights(trainer: Trainer, output: Path) -> int:
    """Put the best epoch's weights (``best_weights.pt``) into :attr:`Trainer.eval_model`; returns that epoch."""
    best = torch.load(output / "best_weights.pt", map_location=trainer.device, weights_only=True)
    trainer.eval_model.load_state_dict(best["state_dict"])
    return int(best["epoch"])


def fit_calibrations(trainer: Trainer, loader: Iterable) -> tuple[dict[str, Calibration], dict[str, Any], dict[str, Any]]:
    """Fit a calibration per test-time augmentation mode on the validation loader, for :attr:`Trainer.eval_model`.

    Returns:
        The calibrations; the calibrated ``none``-mode classification report; and the validation
        figures a checkpoint records (its headline figures, the uncalibrated ECE and the balanced
        rule's balanced accuracy).
    """
    calibrations, reports, uncalibrated_ece, balanced_rule_accuracy = {}, {}, {}, {}
    for tta in TTA_MODES:
        logits, labels = predict_logits(trainer.eval_model, loader, trainer.preprocess, trainer.device, trainer.amp, tta)
        calibrations[tta] = fit_calibration(logits, labels)
        probabilities = calibrations[tta].apply(logits)
        reports[tta] = classification_report(probabilities.numpy(), labels.numpy())
        calls = decide(probabilities, "balanced", calibrations[tta].class_prior).numpy()
        balanced_rule_accuracy[tta] = classification_report(probabilities.numpy(), labels.numpy(),
                                                            predictions=calls)["balanced_accuracy"]
        uncalibrated_ece[tta] = classification_report(torch.softmax(logits, 1).numpy(), labels.numpy())["ece"]
        print(f"TTA {tta}: {calibrations[tta]}, balanced accuracy {reports[tta]['balanced_accuracy']:.4f} "
              f"(balanced rule {balanced_rule_accuracy[tta]:.4f}), macro AUC {reports[tta]['macro_auc']:.4f}, "
              f"ECE {reports[tta]['ece']:.4f}", flush=True)
    report = reports["none"]
    validation = ({key: report[key] for key in ("balanced_accuracy", "accuracy", "macro_auc", "ece")}
                  | {"ece_uncalibrated": uncalibrated_ece["none"],
                     "balanced_rule_balanced_accuracy": balanced_rule_accuracy["none"]})
    return calibrations, report, validation


def release_checkpoint(model: nn.Module, recipe: Recipe, preprocess: PreprocessConfig, version: str,
                       calibrations: dict[str, Calibration], data: dict[str, Any], **provenance: Any) -> Checkpoint:
    """The release-format checkpoint of trained weights (:func:`handler.checkpoint.make_checkpoint`).

    Args:
        model: The trained network (the EMA's when there is one).
        recipe: Its recipe (architecture, dropout).
        preprocess: The preprocessing it was trained with.
        version: The version to record.
        calibrations: One per TTA mode (:func:`fit_calibrations`).
        data: The training data and split (``meta.data``, :func:`data_record`).
        provenance: Everything else (epochs, initialization, validation figures, command...), as given.
    """
    meta = Meta(preprocess, version=version, calibration=dict(calibrations), data=data, provenance=provenance)
    return make_checkpoint(model, recipe.arch, preprocess, meta, recipe.dropout)


def data_record(metadata: str | os.PathLike, train: Sequence[LabelledImage], val: Sequence[LabelledImage],
                val_fraction: float, split_seed: int) -> dict[str, Any]:
    """``meta.data``: the training data and the split (whose fields ensembles compare, :data:`handler.checkpoint.SPLIT_FIELDS`)."""
    return {"metadata": os.path.basename(metadata), "train_images": len(train), "val_images": len(val),
            "train_class_counts": dict(zip(CLASS_CODES, class_counts(train))),
            "split": f"StratifiedGroupKFold by lesion_id, val_fraction {val_fraction}, seed {split_seed}"}
