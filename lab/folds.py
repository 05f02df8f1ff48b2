"""Cross-fitted training over the training lesions: K lesion-grouped, class-stratified folds, one network per fold.

The fold assignment (:class:`FoldAssignment`) partitions every image of a metadata CSV into K folds
so that all images of a lesion are in one fold and each fold has about the same share of every
diagnosis. It is saved once (``models/provenance/folds_k<K>.json``) with a digest of the records
it was built from (image, lesion and diagnosis of every row) and a digest of itself, and every tool
that uses it checks both (:func:`load_folds`): a fold file that was edited, or a metadata file
with other images, lesions or labels, is refused rather than silently re-split. An assignment can
leave out the lesions of a recorded validation split (:func:`ensure_folds`, ``exclude_split``): no
fold network and no student distilled from them then trains on those lesions, so both can be compared
with a release on them; the left-out lesions are listed in the file and covered by its digest.

Network ``k`` is trained on the other K-1 folds and scores fold ``k`` after every epoch
(:func:`run_fold_epochs`), so the out-of-fold predictions cover every image at every epoch. There
is no early stopping per fold: one epoch count for all folds is chosen from the out-of-fold curve
(:func:`out_of_fold_curve`, :func:`select_epoch`), and each fold's weights at that epoch become
its teacher checkpoint (:func:`export_teachers`). Figures are per lesion (a lesion's images'
calibrated probabilities averaged), calibrated across folds: fold ``k``'s images are calibrated
with the temperature and class biases fitted on the other folds' out-of-fold logits
(:func:`cross_fitted_probabilities`).

Layout of a run folder (:class:`FoldLayout`)::

    fold_<k>/run.json                       recipe, preprocessing, fold, folds digest (checked on resume)
    fold_<k>/last.pt                        training state after the last finished epoch (resumable)
    fold_<k>/metrics.jsonl                  one row per epoch: training loss, held-out fold figures
    fold_<k>/holdout_logits/epoch_<e>.pt    the held-out fold's logits after epoch e
    fold_<k>/weights/epoch_<e>.pt           the evaluated (EMA) weights after epoch e, float16
    fold_<k>/done.json                      written when the fold has run all its epochs
    fold_<k>/teacher.pt                     release-format checkpoint of the selected epoch
    out_of_fold_logits.pt                   (images, epochs, classes) logits, image and lesion ids, folds
    summary.json                            the out-of-fold curve, the selected epoch, its figures
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from handler.architectures import build_model
from handler.checkpoint import Checkpoint, Meta, make_checkpoint
from handler.decision import decide
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig
from handler.storage import pack_state_dict, unpack_state_dict
from lab.calibration import fit_calibration
from lab.data import LabelledImage, class_counts, read_labels
from lab.evaluation import (TARGET_MELANOMA_SENSITIVITY, bootstrap_intervals, classification_report,
                            referral_threshold_for_sensitivity)
from lab.provenance import file_sha256
from lab.training import (
    Progress, Recipe, Trainer, autocast_dtype, freeze_early_layers, initialize, make_criterion, make_ema, make_loaders,
    lesions_of_split, make_optimizer, predict_logits, resolve_device, resume, save_state, seed_epoch, seed_everything,
    train_one_epoch)

FOLDS_FORMAT = 1
FOLD_METHOD = "sklearn StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed): grouped by lesion_id, stratified by dx"
SELECT_KEYS = ("lesion_balanced_accuracy", "lesion_macro_auc", "image_log_loss")


class FoldMismatchError(ValueError):
    """A fold file that does not belong to this metadata, or that was changed after it was written."""


def records_digest(records: Sequence[LabelledImage]) -> str:
    """SHA-256 of every row's ``image_id,lesion_id,dx``, sorted: what a fold assignment depends on.

    Column order, extra columns (age, localization...) and row order do not change it; a changed,
    added or removed image, lesion or label does.
    """
    rows = sorted(f"{r.image_id},{r.lesion_id},{CLASS_CODES[r.label]}" for r in records)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@dataclass(frozen=True)
class FoldAssignment:
    """K folds of image ids over one metadata file.

    Attributes:
        k: Number of folds.
        seed: Seed of the partition.
        metadata: The metadata file it was built from (its name, for people).
        metadata_sha256: That file's SHA-256 when the folds were built (for people; the check is
            on :attr:`records_sha256`, so the same rows in the Kaggle layout's file also match).
        records_sha256: :func:`records_digest` of the rows it partitions.
        folds: Each fold's image ids, sorted.
        counts: Per fold: images, lesions and images per class (descriptive).
        excluded_lesions: Lesions of the metadata left out of every fold, sorted (a release's
            validation lesions, so that no fold network or student ever trains on them and both can
            be compared with releases on them). Part of the digest when there are any.
        excluded_because: Where they come from (descriptive).
    """

    k: int
    seed: int
    metadata: str
    metadata_sha256: str
    records_sha256: str
    folds: tuple[tuple[str, ...], ...]
    counts: tuple[dict[str, Any], ...] = ()
    excluded_lesions: tuple[str, ...] = ()
    excluded_because: str = ""

    @property
    def digest(self) -> str:
        """SHA-256 of what defines the assignment (k, seed, records digest, the folds, the lesions left out):
        names it in checkpoints. Without lesions left out it is what it was before they could be."""
        body: dict[str, Any] = {"k": self.k, "seed": self.seed, "records_sha256": self.records_sha256,
                                "folds": [list(fold) for fold in self.folds]}
        if self.excluded_lesions:
            body["excluded_lesions"] = list(self.excluded_lesions)
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def kept(self, records: Sequence[LabelledImage]) -> list[LabelledImage]:
        """The records the folds partition: those of lesions not left out, in their order."""
        excluded = set(self.excluded_lesions)
        return [r for r in records if r.lesion_id not in excluded]

    def fold_of(self) -> dict[str, int]:
        """Image id -> its fold."""
        return {image_id: index for index, fold in enumerate(self.folds) for image_id in fold}

    def to_dict(self) -> dict[str, Any]:
        excluded = ({"excluded_because": self.excluded_because, "excluded_lesions": list(self.excluded_lesions)}
                    if self.excluded_lesions else {})
        return {"format": FOLDS_FORMAT, "method": FOLD_METHOD, "k": self.k, "seed": self.seed, "metadata": self.metadata,
                "metadata_sha256": self.metadata_sha256, "records_sha256": self.records_sha256, "digest": self.digest,
                "counts": list(self.counts), **excluded, "folds": [list(fold) for fold in self.folds]}

    @classmethod
    def from_dict(cls, values: dict[str, Any], name: str = "fold file") -> "FoldAssignment":
        """Rebuild and verify a stored assignment.

        Raises:
            FoldMismatchError: Another format, or folds that no longer match the stored digest.
        """
        if values.get("format") != FOLDS_FORMAT:
            raise FoldMismatchError(f"{name}: fold file format {values.get('format')!r}, expected {FOLDS_FORMAT}")
        assignment = cls(int(values["k"]), int(values["seed"]), str(values["metadata"]), str(values["metadata_sha256"]),
                         str(values["records_sha256"]), tuple(tuple(fold) for fold in values["folds"]),
                         tuple(values.get("counts") or ()), tuple(values.get("excluded_lesions") or ()),
                         str(values.get("excluded_because") or ""))
        if assignment.digest != values.get("digest"):
            raise FoldMismatchError(f"{name}: its folds do not match its digest (the file was edited after it was "
                                    f"written); rebuild it with scripts/train_folds.py --rebuild-folds")
        if len(assignment.folds) != assignment.k:
            raise FoldMismatchError(f"{name}: {len(assignment.folds)} folds listed for k={assignment.k}")
        return assignment

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(temporary, path)
        return path


def lesion_grouped_folds(records: Sequence[LabelledImage], k: int, seed: int) -> list[list[int]]:
    """The record indices of ``k`` lesion-grouped, class-stratified folds (sklearn's ``StratifiedGroupKFold``).

    Raises:
        ValueError: Fewer than 2 folds, more folds than lesions, or a lesion with two diagnoses.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    diagnosis: dict[str, int] = {}
    for record in records:
        if diagnosis.setdefault(record.lesion_id, record.label) != record.label:
            raise ValueError(f"lesion {record.lesion_id} has images with different diagnoses")
    if len(diagnosis) < k:
        raise ValueError(f"{len(diagnosis)} lesions cannot fill {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    split = splitter.split(np.zeros(len(records)), [r.label for r in records], [r.lesion_id for r in records])
    return [sorted(int(i) for i in held_out) for _, held_out in split]


def make_folds(records: Sequence[LabelledImage], k: int, seed: int, metadata: str | os.PathLike,
               excluded_lesions: Iterable[str] = (), excluded_because: str = "") -> FoldAssignment:
    """Partition every record into ``k`` lesion-grouped, class-stratified folds (:func:`lesion_grouped_folds`).

    Args:
        records: Every labelled image of ``metadata`` (:func:`lab.data.read_labels`).
        k: Number of folds (at least 2).
        seed: Seed of the partition.
        metadata: The metadata file the records were read from.
        excluded_lesions: Lesions whose images are left out of every fold.
        excluded_because: Where those lesions come from (recorded in the fold file).
    """
    left_out = set(excluded_lesions)
    records = [r for r in records if r.lesion_id not in left_out]
    folds: list[tuple[str, ...]] = []
    counts = []
    for held_out in lesion_grouped_folds(records, k, seed):
        members = [records[i] for i in held_out]
        folds.append(tuple(sorted(r.image_id for r in members)))
        counts.append({"images": len(members), "lesions": len({r.lesion_id for r in members}),
                       "class_images": dict(zip(CLASS_CODES, class_counts(members)))})
    metadata = Path(metadata)
    return FoldAssignment(k, seed, f"{metadata.resolve().parent.name}/{metadata.name}", file_sha256(metadata),
                          records_digest(records), tuple(folds), tuple(counts), tuple(sorted(left_out)),
                          excluded_because if left_out else "")


def check_folds(assignment: FoldAssignment, records: Sequence[LabelledImage], name: str = "fold file") -> None:
    """Refuse an assignment that is not a lesion-grouped partition of exactly these records (less the
    lesions it leaves out).

    Raises:
        FoldMismatchError: Naming what differs.
    """
    records = assignment.kept(records)
    digest = records_digest(records)
    if digest != assignment.records_sha256:
        fold_of = assignment.fold_of()
        ids = {r.image_id for r in records}
        missing, extra = sorted(ids - set(fold_of)), sorted(set(fold_of) - ids)
        detail = (f"{len(missing)} images not in the folds (e.g. {missing[:3]}), {len(extra)} fold images not in the "
                  f"metadata (e.g. {extra[:3]})" if missing or extra else "the same images, but other lesions or labels")
        raise FoldMismatchError(f"{name} was built from other metadata ({assignment.metadata}, records digest "
                                f"{assignment.records_sha256[:12]}; this metadata's is {digest[:12]}): {detail}. Use the "
                                f"metadata it was built from, or another fold file")
    fold_of = assignment.fold_of()
    if sum(len(fold) for fold in assignment.folds) != len(fold_of) or set(fold_of) != {r.image_id for r in records}:
        raise FoldMismatchError(f"{name}: the folds are not a partition of the metadata's images")
    lesion_fold: dict[str, int] = {}
    for record in records:
        if lesion_fold.setdefault(record.lesion_id, fold_of[record.image_id]) != fold_of[record.image_id]:
            raise FoldMismatchError(f"{name}: lesion {record.lesion_id} has images in two folds")


def read_folds(path: str | os.PathLike) -> FoldAssignment:
    """A stored assignment, its own digest verified (:meth:`FoldAssignment.from_dict`)."""
    return FoldAssignment.from_dict(json.loads(Path(path).read_text()), str(path))


def load_folds(path: str | os.PathLike, metadata: str | os.PathLike) -> tuple[FoldAssignment, list[LabelledImage]]:
    """A stored assignment checked against a metadata file, and the records it partitions: that file's
    records less the lesions the assignment leaves out.

    Raises:
        FoldMismatchError: If either does not match (:func:`check_folds`).
    """
    records = read_labels(metadata)
    assignment = read_folds(path)
    check_folds(assignment, records, str(path))
    return assignment, assignment.kept(records)


def folds_description(assignment: FoldAssignment) -> str:
    """One line for people: how many folds of how many images, what was left out, the digest."""
    left_out = (f", {len(assignment.excluded_lesions)} lesions left out ({assignment.excluded_because})"
                if assignment.excluded_lesions else ", nothing left out")
    return (f"{assignment.k} folds of {[len(fold) for fold in assignment.folds]} images over {assignment.metadata}"
            f"{left_out}, digest {assignment.digest[:12]}")


def ensure_folds(path: str | os.PathLike, metadata: str | os.PathLike, k: int, seed: int, rebuild: bool = False,
                 exclude_split: str | os.PathLike | None = None) -> tuple[FoldAssignment, list[LabelledImage]]:
    """The assignment at ``path``, checked against ``metadata``; built and saved there if there is none.

    Args:
        exclude_split: A recorded validation split (JSON with ``val_image_ids``, e.g.
            ``models/provenance/val_split.json``): every image of the lesions it shows is left out of
            every fold (:func:`lab.training.lesions_of_split`). None leaves nothing out.

    Returns:
        The assignment and the records it partitions.

    Raises:
        FoldMismatchError: An existing file for other metadata, with another ``k`` or ``seed``, or
            leaving out other lesions (``rebuild`` overwrites it instead).
    """
    path = Path(path)
    records = read_labels(metadata)
    excluded: tuple[str, ...] = ()
    because = ""
    if exclude_split is not None:
        excluded = tuple(sorted(lesions_of_split(records, exclude_split, str(metadata))))
        because = (f"every image of the lesions shown by {Path(exclude_split).name}'s val_image_ids "
                   f"(sha256 {file_sha256(exclude_split)[:12]})")
    if path.exists() and not rebuild:
        assignment, kept = load_folds(path, metadata)
        if (assignment.k, assignment.seed) != (k, seed):
            raise FoldMismatchError(f"{path} holds k={assignment.k}, seed={assignment.seed}; asked for k={k}, seed={seed}")
        if assignment.excluded_lesions != excluded:
            asked = f"the {len(excluded)} lesions of {exclude_split}" if excluded else "none"
            raise FoldMismatchError(f"{path} leaves out {len(assignment.excluded_lesions)} lesions "
                                    f"({assignment.excluded_because or 'none'}); asked to leave out {asked}. Use the "
                                    f"split it was built with, another --folds-file, or --rebuild-folds")
        return assignment, kept
    assignment = make_folds(records, k, seed, metadata, excluded, because)
    assignment.save(path)
    print(f"wrote {path}: {folds_description(assignment)}", flush=True)
    return assignment, assignment.kept(records)


def fold_split(records: Sequence[LabelledImage], assignment: FoldAssignment,
               fold: int) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """``(training images: every other fold, held-out images: fold ``fold``)``, in the records' order."""
    if not 0 <= fold < assignment.k:
        raise ValueError(f"fold {fold} is not one of 0..{assignment.k - 1}")
    fold_of = assignment.fold_of()
    train = [r for r in records if fold_of[r.image_id] != fold]
    return train, [r for r in records if fold_of[r.image_id] == fold]


def limit_records(records: Sequence[LabelledImage], limit: int, seed: int) -> list[LabelledImage]:
    """A seeded sample of ``limit`` records in their original order (smoke runs); 0 keeps all."""
    if not limit or limit >= len(records):
        return list(records)
    keep = set(random.Random(seed).sample(range(len(records)), limit))
    return [r for i, r in enumerate(records) if i in keep]


def folds_data_record(assignment: FoldAssignment, folds_file: str | os.PathLike, fold: int | None,
                      train_images: int, val_images: int) -> dict[str, Any]:
    """``meta.data`` of a network trained on the folds: which fold file, which folds, how many images.

    ``fold`` is the held-out fold, or None for a network trained on every fold.
    """
    split = (f"fold {fold} of {assignment.k} held out ({Path(folds_file).name})" if fold is not None
             else f"all {assignment.k} folds ({Path(folds_file).name}), nothing held out")
    return {"metadata": assignment.metadata, "train_images": train_images, "val_images": val_images, "split": split,
            "folds_file": Path(folds_file).name, "folds_sha256": assignment.digest, "folds_k": assignment.k,
            "fold": fold, "records_sha256": assignment.records_sha256}


def check_trained_on(data: dict[str, Any] | None, assignment: FoldAssignment, fold: int | None, name: str) -> None:
    """Refuse a network whose ``meta.data`` names another fold assignment or another held-out fold.

    Raises:
        FoldMismatchError: Naming the difference.
    """
    data = data or {}
    if data.get("folds_sha256") != assignment.digest:
        raise FoldMismatchError(f"{name} was trained on folds {str(data.get('folds_sha256'))[:12]}, not on this fold file "
                                f"({assignment.digest[:12]})")
    if data.get("fold") != fold:
        raise FoldMismatchError(f"{name} holds out fold {data.get('fold')}, expected fold {fold}")


# --- one network per fold -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldLayout:
    """Where a cross-fitted run keeps its files (see the module docstring)."""

    root: Path

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    def logits_path(self, fold: int, epoch: int) -> Path:
        return self.fold_dir(fold) / "holdout_logits" / f"epoch_{epoch:03d}.pt"

    def weights_path(self, fold: int, epoch: int) -> Path:
        return self.fold_dir(fold) / "weights" / f"epoch_{epoch:03d}.pt"

    def teacher_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / "teacher.pt"

    def done_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / "done.json"


def _atomic_save(value: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


def _atomic_write_text(text: str, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def check_run_config(path: Path, config: dict[str, Any]) -> None:
    """Write a run's configuration, or refuse to resume a run that was started with another one.

    Raises:
        ValueError: Naming the settings that differ.
    """
    if path.exists():
        before = json.loads(path.read_text())
        differ = sorted(key for key in set(before) | set(config) if before.get(key) != config.get(key))
        if differ:
            raise ValueError(f"{path.parent} was started with other settings ({', '.join(differ)}: "
                             f"{[before.get(key) for key in differ]} vs {[config.get(key) for key in differ]}); "
                             f"rerun with the same settings to resume, or choose another --output")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(json.dumps(config, indent=1) + "\n", path)


def build_trainer(recipe: Recipe, preprocess: PreprocessConfig, criterion: nn.Module, steps_per_epoch: int,
                  device: torch.device, amp: torch.dtype | None, pretrained: str = "auto",
                  freeze_blocks: int = 0) -> tuple[Trainer, str]:
    """A fresh network of ``recipe.arch`` (ImageNet weights unless ``pretrained`` says otherwise) and what trains it.

    Returns:
        The trainer and where the starting weights came from.
    """
    seed_everything(recipe.seed)
    model = build_model(recipe.arch, dropout=recipe.dropout)
    source = initialize(model, recipe.arch, preprocess, None, pretrained)
    model = model.to(device).to(memory_format=torch.channels_last)
    frozen = freeze_early_layers(model, freeze_blocks)
    ema = make_ema(model, recipe.ema_decay)
    optimizer, scheduler = make_optimizer(model, recipe, steps_per_epoch)
    return Trainer(model, ema, optimizer, scheduler, criterion.to(device), preprocess, device, amp, frozen), source


def holdout_figures(logits: torch.Tensor, labels: torch.Tensor, lesion_ids: Sequence[str]) -> dict[str, float]:
    """Uncalibrated figures of one epoch on the held-out fold: per image, and per lesion (probabilities averaged)."""
    probabilities = torch.softmax(logits.float(), 1).numpy()
    image = classification_report(probabilities, labels.numpy())
    lesion_probabilities, lesion_labels, _ = lesion_average(probabilities, labels.numpy(), lesion_ids)
    lesion = classification_report(lesion_probabilities, lesion_labels)
    return {"holdout_loss": float(nn.functional.cross_entropy(logits.float(), labels)),
            "holdout_balanced_accuracy": image["balanced_accuracy"], "holdout_macro_auc": image["macro_auc"],
            "holdout_lesion_balanced_accuracy": lesion["balanced_accuracy"], "holdout_lesion_macro_auc": lesion["macro_auc"]}


def run_fold_epochs(trainer: Trainer, train_loader: Iterable, holdout_loader: Iterable | None,
                    holdout: Sequence[LabelledImage], recipe: Recipe, output: Path, progress: Progress,
                    epochs_this_run: int = 0, keep_weights: bool = True) -> bool:
    """Train a fixed schedule of ``recipe.epochs`` epochs, scoring the held-out images after each one.

    Each epoch writes the held-out logits (``holdout_logits/epoch_<e>.pt``), the evaluated weights
    in float16 (``weights/epoch_<e>.pt``, unless ``keep_weights`` is False), ``metrics.jsonl`` (all rows,
    rewritten from the run's history so that a crash never duplicates one) and ``last.pt``, in that
    order: an interrupted epoch is redone whole on the next run. No early stopping: the epoch to
    keep is chosen afterwards, for all folds at once, from the out-of-fold curve.

    Args:
        trainer: The run.
        train_loader: Training batches (``(uint8 images, targets)``, whatever ``trainer.criterion`` takes).
        holdout_loader: ``(uint8 images, labels)`` of ``holdout`` in order, or None (nothing held out).
        holdout: The held-out images (their ids and lesions name the logits).
        recipe: Epochs and seed.
        output: The fold's folder.
        progress: Where the run stands (updated in place).
        epochs_this_run: Pause after this many epochs (0: never).
        keep_weights: Save every epoch's weights (needed to export the selected epoch).

    Returns:
        True when all epochs have run; False when it paused.
    """
    output.mkdir(parents=True, exist_ok=True)
    image_ids = [r.image_id for r in holdout]
    lesion_ids = [r.lesion_id for r in holdout]
    for epoch in range(progress.start_epoch, recipe.epochs):
        number = epoch + 1
        seed_epoch(recipe.seed, epoch)
        started = time.perf_counter()
        stats = train_one_epoch(trainer, train_loader, f"{output.name} epoch {number}/{recipe.epochs}")
        row: dict[str, Any] = {"epoch": number, "train_loss": stats.loss, "lr": trainer.scheduler.get_last_lr()[0],
                               "train_images_per_s": stats.seen / max(stats.seconds, 1e-9)}
        if holdout_loader is not None:
            logits, labels = predict_logits(trainer.eval_model, holdout_loader, trainer.preprocess, trainer.device, trainer.amp)
            _atomic_save({"epoch": number, "image_ids": image_ids, "logits": logits, "labels": labels},
                         output / "holdout_logits" / f"epoch_{number:03d}.pt")
            row |= holdout_figures(logits, labels, lesion_ids)
        if keep_weights:
            state = {name: tensor.detach().cpu() for name, tensor in trainer.eval_model.state_dict().items()}
            _atomic_save({"epoch": number, "state_dict": pack_state_dict(state, "float16")},
                         output / "weights" / f"epoch_{number:03d}.pt")
        row["epoch_seconds"] = time.perf_counter() - started
        progress.history.append(row)
        _atomic_write_text("".join(json.dumps(r) + "\n" for r in progress.history), output / "metrics.jsonl")
        save_state(output / "last.pt", trainer, progress, epoch)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if epochs_this_run and number - progress.start_epoch >= epochs_this_run and number < recipe.epochs:
            print(f"paused after epoch {number}; rerun the same command to resume from {output / 'last.pt'}", flush=True)
            return False
    return True


def train_fold(recipe: Recipe, preprocess: PreprocessConfig, criterion: nn.Module, train_loader: Any,
               holdout_loader: Any, holdout: Sequence[LabelledImage], output: Path, device: torch.device,
               amp: torch.dtype | None, run_config: dict[str, Any], pretrained: str = "auto", freeze_blocks: int = 0,
               epochs_this_run: int = 0, keep_weights: bool = True) -> bool:
    """One network of a cross-fitted run, from scratch or resumed from ``output/last.pt``.

    ``run_config`` is written to ``output/run.json`` the first time and must match on every
    resume (:func:`check_run_config`); ``output/done.json`` marks a finished fold, which is then
    not rebuilt at all.

    Returns:
        True when the fold has run all its epochs; False when it paused.
    """
    if (output / "done.json").exists():
        return True
    check_run_config(output / "run.json", run_config)
    trainer, source = build_trainer(recipe, preprocess, criterion, len(train_loader), device, amp, pretrained, freeze_blocks)
    progress = resume(output / "last.pt", trainer)
    if progress is None:
        progress = Progress()
        print(f"{output.name}: initialized from {source}", flush=True)
    else:
        print(f"{output.name}: resumed from {output / 'last.pt'} at epoch {progress.start_epoch}", flush=True)
    if not run_fold_epochs(trainer, train_loader, holdout_loader, holdout, recipe, output, progress, epochs_this_run,
                           keep_weights):
        return False
    _atomic_write_text(json.dumps({"epochs": recipe.epochs, "initialization": source,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n",
                       output / "done.json")
    return True


def load_epoch_weights(model: nn.Module, path: Path) -> nn.Module:
    """Put one epoch's saved (float16) weights into ``model``; returns it."""
    model.load_state_dict(unpack_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"]))
    return model


# --- out-of-fold predictions --------------------------------------------------------------------------------------

@dataclass
class OutOfFold:
    """Every image's logits from the network that did not train on it, after every epoch.

    Attributes:
        image_ids: (N,) in the records' order.
        lesion_ids: (N,) their lesions.
        labels: (N,) true class indices.
        folds: (N,) each image's fold.
        epochs: The epoch numbers (1-based) of the second axis of ``logits``.
        logits: (N, E, C) float32.
    """

    image_ids: list[str]
    lesion_ids: list[str]
    labels: np.ndarray
    folds: np.ndarray
    epochs: list[int]
    logits: np.ndarray

    def at_epoch(self, epoch: int) -> np.ndarray:
        """(N, C) logits after epoch ``epoch``."""
        return self.logits[:, self.epochs.index(epoch)]

    def save(self, path: Path) -> None:
        _atomic_save({"image_ids": self.image_ids, "lesion_ids": self.lesion_ids, "labels": torch.from_numpy(self.labels),
                      "folds": torch.from_numpy(self.folds), "epochs": self.epochs, "logits": torch.from_numpy(self.logits)},
                     path)


def collect_out_of_fold(layout: FoldLayout, assignment: FoldAssignment, records: Sequence[LabelledImage],
                        epochs: int, folds: Sequence[int] | None = None) -> OutOfFold:
    """Gather the held-out logits of every fold and epoch, in the records' order.

    Args:
        layout: The run folder.
        assignment: The folds.
        records: The images that were trained on and scored (all, or a ``--limit`` sample).
        epochs: Epochs per fold.
        folds: The folds to gather (default all); records of other folds are left out.

    Raises:
        FileNotFoundError: A fold has not finished an epoch.
        FoldMismatchError: A fold's held-out logits name other images than the folds say.
    """
    folds = list(range(assignment.k)) if folds is None else list(folds)
    fold_of = assignment.fold_of()
    kept = [r for r in records if fold_of[r.image_id] in folds]
    row_of = {r.image_id: i for i, r in enumerate(kept)}
    logits = np.zeros((len(kept), epochs, len(CLASS_CODES)), np.float32)
    for fold in folds:
        expected = [r.image_id for r in kept if fold_of[r.image_id] == fold]
        rows = [row_of[image_id] for image_id in expected]
        for epoch in range(1, epochs + 1):
            path = layout.logits_path(fold, epoch)
            if not path.exists():
                raise FileNotFoundError(f"fold {fold} has not finished epoch {epoch} ({path} is missing)")
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if list(stored["image_ids"]) != expected:
                raise FoldMismatchError(f"{path} scores other images than fold {fold} of this fold file")
            logits[rows, epoch - 1] = stored["logits"].float().numpy()
    return OutOfFold([r.image_id for r in kept], [r.lesion_id for r in kept], np.array([r.label for r in kept]),
                     np.array([fold_of[r.image_id] for r in kept]), list(range(1, epochs + 1)), logits)


def lesion_average(probabilities: np.ndarray, labels: np.ndarray,
                   lesion_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One row per lesion: the mean of its images' probabilities, and its label.

    Returns:
        ``(lesion probabilities (L, C), lesion labels (L,), lesion ids)``, lesions in order of first appearance.

    Raises:
        ValueError: A lesion whose images carry different labels.
    """
    order: dict[str, int] = {}
    index = np.array([order.setdefault(lesion, len(order)) for lesion in lesion_ids], dtype=np.int64)
    sums = np.zeros((len(order), probabilities.shape[1]), np.float64)
    np.add.at(sums, index, probabilities)
    counts = np.bincount(index, minlength=len(order))
    lesion_labels = np.full(len(order), -1, np.int64)
    lesion_labels[index] = labels
    if not np.array_equal(lesion_labels[index], labels):
        raise ValueError("a lesion's images carry different labels")
    return (sums / counts[:, None]).astype(np.float32), lesion_labels, list(order)


def cross_fitted_probabilities(logits: np.ndarray, labels: np.ndarray,
                               folds: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[float, ...]]]:
    """Calibrated probabilities where each fold's images are calibrated on the other folds' out-of-fold logits.

    Returns:
        (N, C) probabilities, and each fold's class prior (for the balanced decision rule).
    """
    probabilities = np.zeros(logits.shape, np.float32)
    priors: dict[int, tuple[float, ...]] = {}
    tensor = torch.from_numpy(np.ascontiguousarray(logits))
    for fold in np.unique(folds):
        scored, fitted = folds == fold, folds != fold
        if not fitted.any():  # a single fold gathered: calibrate on itself (reported as such)
            fitted = scored
        calibration = fit_calibration(tensor[fitted], torch.from_numpy(labels[fitted]))
        probabilities[scored] = calibration.apply(tensor[scored]).numpy()
        priors[int(fold)] = tuple(calibration.class_prior)
    return probabilities, priors


def lesion_figures(logits: np.ndarray, labels: np.ndarray, lesion_ids: Sequence[str], folds: np.ndarray,
                   threshold: float | None = None, target_sensitivity: float | None = None,
                   bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """The per-lesion figures of out-of-fold logits, calibrated across folds, balanced decision rule.

    Args:
        logits: (N, C) out-of-fold logits of N images.
        labels: (N,) true classes.
        lesion_ids: (N,) each image's lesion.
        folds: (N,) each image's fold.
        threshold: The referral threshold to measure melanoma figures at; None chooses it as the
            highest that keeps ``target_sensitivity`` of melanoma lesions flagged (on these same
            lesions, so the melanoma figures are then optimistic).
        target_sensitivity: See ``threshold``; None with no threshold measures "mel is the called class".
        bootstrap: Resamples for the 95% intervals (:func:`lab.evaluation.bootstrap_intervals`); 0 skips them.
        seed: Seed of the bootstrap.

    Returns:
        ``classification_report``'s dict over lesions, plus ``n_lesions``, ``referral_threshold``,
        ``per_fold`` (balanced accuracy, macro AUC, melanoma sensitivity per fold) and ``bootstrap``.
    """
    probabilities, priors = cross_fitted_probabilities(logits, labels, folds)
    lesion_probabilities, lesion_labels, lesions = lesion_average(probabilities, labels, lesion_ids)
    first_row = {lesion: i for i, lesion in reversed(list(enumerate(lesion_ids)))}
    lesion_folds = np.array([folds[first_row[lesion]] for lesion in lesions])
    calls = np.zeros(len(lesions), np.int64)
    for fold, prior in priors.items():
        rows = lesion_folds == fold
        calls[rows] = decide(torch.from_numpy(lesion_probabilities[rows]), "balanced", prior).numpy()
    if threshold is None and target_sensitivity is not None and (lesion_labels == CLASS_CODES.index("mel")).any():
        threshold = referral_threshold_for_sensitivity(lesion_probabilities, lesion_labels, target_sensitivity)
    report = classification_report(lesion_probabilities, lesion_labels, threshold, calls)
    report["n_lesions"] = report.pop("n_images")
    report["referral_threshold"] = threshold
    per_fold = {}
    for fold in priors:
        rows = lesion_folds == fold
        fold_report = classification_report(lesion_probabilities[rows], lesion_labels[rows], threshold, calls[rows])
        per_fold[str(fold)] = {key: fold_report[key] for key in ("balanced_accuracy", "macro_auc", "melanoma_sensitivity",
                                                                 "melanoma_specificity", "ece")} | {"n_lesions": int(rows.sum())}
    report["per_fold"] = per_fold
    if bootstrap:
        report["bootstrap"] = bootstrap_intervals(lesion_probabilities, lesion_labels, calls, threshold, bootstrap, seed=seed)
    return report


def out_of_fold_curve(oof: OutOfFold) -> list[dict[str, Any]]:
    """Per epoch: the out-of-fold figures that choose the epoch count (:data:`SELECT_KEYS`) and a few more."""
    rows = []
    for column, epoch in enumerate(oof.epochs):
        logits = oof.logits[:, column]
        lesion = lesion_figures(logits, oof.labels, oof.lesion_ids, oof.folds)
        image_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(oof.labels)))
        rows.append({"epoch": epoch, "lesion_balanced_accuracy": lesion["balanced_accuracy"],
                     "lesion_macro_auc": lesion["macro_auc"], "lesion_ece": lesion["ece"], "image_log_loss": image_loss,
                     "per_fold_lesion_balanced_accuracy": {fold: row["balanced_accuracy"]
                                                           for fold, row in lesion["per_fold"].items()}})
    return rows


def select_epoch(curve: Sequence[dict[str, Any]], key: str = "lesion_balanced_accuracy") -> int:
    """The epoch with the best out-of-fold ``key`` (lowest for a loss, highest otherwise); the earliest on ties."""
    if key not in SELECT_KEYS:
        raise ValueError(f"unknown selection key {key!r}; choose one of {SELECT_KEYS}")
    sign = -1.0 if key.endswith("loss") else 1.0
    best = max(curve, key=lambda row: (sign * (row[key] if row[key] is not None else -np.inf), -row["epoch"]))
    return int(best["epoch"])


def summarize(oof: OutOfFold, key: str = "lesion_balanced_accuracy", epoch: int | None = None,
              target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The out-of-fold curve, the selected epoch and its per-lesion figures with bootstrap intervals."""
    curve = out_of_fold_curve(oof)
    selected = select_epoch(curve, key) if epoch is None else epoch
    logits = oof.at_epoch(selected)
    lesion = lesion_figures(logits, oof.labels, oof.lesion_ids, oof.folds, target_sensitivity=target_sensitivity,
                            bootstrap=bootstrap, seed=seed)
    probabilities, priors = cross_fitted_probabilities(logits, oof.labels, oof.folds)
    image_calls = np.zeros(len(oof.labels), np.int64)
    for fold, prior in priors.items():
        rows = oof.folds == fold
        image_calls[rows] = decide(torch.from_numpy(probabilities[rows]), "balanced", prior).numpy()
    image = classification_report(probabilities, oof.labels, lesion["referral_threshold"], image_calls)
    return {"selected_epoch": selected, "selected_by": key if epoch is None else "given", "folds": sorted(map(int, priors)),
            "n_images": len(oof.labels), "n_lesions": lesion["n_lesions"],
            "method": "out-of-fold logits; fold k calibrated (temperature + class biases) on the other folds' out-of-fold "
                      "logits; a lesion's images' probabilities averaged; balanced decision rule; referral threshold the "
                      f"highest keeping {target_sensitivity} of melanoma lesions flagged on these same lesions",
            "lesion": lesion, "image": image, "curve": curve}


def write_out_of_fold_csv(oof: OutOfFold, epoch: int, path: Path) -> None:
    """The selected epoch's out-of-fold logits, one row per image: what calibration and thresholds are fitted on."""
    logits = oof.at_epoch(epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "lesion_id", "dx", "fold", *[f"logit_{code}" for code in CLASS_CODES]])
        for i, image_id in enumerate(oof.image_ids):
            writer.writerow([image_id, oof.lesion_ids[i], CLASS_CODES[oof.labels[i]], int(oof.folds[i]),
                             *[f"{value:.5f}" for value in logits[i]]])


def read_out_of_fold_csv(path: str | os.PathLike) -> dict[str, tuple[str, int, np.ndarray]]:
    """The rows of :func:`write_out_of_fold_csv`: image id -> (true class code, fold, (C,) logits)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [f"logit_{code}" for code in CLASS_CODES]
        missing = {"image_id", "dx", "fold", *columns} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an out-of-fold logits file: no column {', '.join(sorted(missing))}")
        return {row["image_id"]: (row["dx"], int(row["fold"]), np.array([float(row[c]) for c in columns], np.float32))
                for row in reader}


def export_teachers(layout: FoldLayout, assignment: FoldAssignment, folds_file: str | os.PathLike, epoch: int,
                    recipe: Recipe, preprocess: PreprocessConfig, records: Sequence[LabelledImage],
                    storage: str = "float16", **provenance: Any) -> list[Path]:
    """Write each fold's weights after ``epoch`` as a release-format checkpoint (``fold_<k>/teacher.pt``).

    ``meta.data`` names the fold file (by digest) and the held-out fold (:func:`folds_data_record`),
    which :func:`check_trained_on` verifies wherever a teacher is used.
    """
    paths = []
    for fold in range(assignment.k):
        train, holdout = fold_split(records, assignment, fold)
        model = load_epoch_weights(build_model(recipe.arch, dropout=recipe.dropout), layout.weights_path(fold, epoch))
        done = json.loads(layout.done_path(fold).read_text())
        meta = Meta(preprocess, data=folds_data_record(assignment, folds_file, fold, len(train), len(holdout)))
        checkpoint = make_checkpoint(model, recipe.arch, preprocess, meta, recipe.dropout, epoch=epoch,
                                     trained_epochs=recipe.epochs, initialization=done["initialization"],
                                     recipe=dataclasses.asdict(recipe), **provenance)
        checkpoint = Checkpoint(pack_state_dict(checkpoint.state_dict, storage), checkpoint.config, checkpoint.meta)
        paths.append(checkpoint.save(layout.teacher_path(fold)))
    return paths


def single_fold_figures(logits: np.ndarray, holdout: Sequence[LabelledImage], inner_folds: int = 5, seed: int = 0,
                        target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY) -> dict[str, Any]:
    """Per-lesion figures of one network's logits on its held-out fold alone.

    The fold is split again into ``inner_folds`` lesion-grouped parts, each calibrated on the
    others (:func:`lesion_figures`), so that two networks scored on the same fold (a fold's teacher
    and its student) are compared by the same method.

    Args:
        logits: (N, C) logits of the held-out images.
        holdout: Those images, in the same order.
        inner_folds: Parts of the inner partition (fewer when the fold has fewer lesions).
        seed: Seed of the inner partition.
        target_sensitivity: Melanoma sensitivity the referral threshold keeps (chosen on these lesions).
    """
    lesion_label = {r.lesion_id: r.label for r in holdout}
    largest_class = max(np.bincount(list(lesion_label.values())))
    inner = np.zeros(len(holdout), np.int64)
    if largest_class >= 2:  # stratification needs a class with at least as many lesions as parts
        for part, rows in enumerate(lesion_grouped_folds(holdout, min(inner_folds, largest_class), seed)):
            inner[rows] = part
    else:  # a handful of lesions (smoke runs): alternate them
        order = {lesion: i % 2 for i, lesion in enumerate(lesion_label)}
        inner = np.array([order[r.lesion_id] for r in holdout])
    report = lesion_figures(logits, np.array([r.label for r in holdout]), [r.lesion_id for r in holdout], inner,
                            target_sensitivity=target_sensitivity)
    report.pop("per_fold")
    return {key: report[key] for key in ("n_lesions", "balanced_accuracy", "macro_auc", "ece", "melanoma_sensitivity",
                                         "melanoma_specificity", "referral_threshold")}


# --- a whole cross-fitted run (scripts/train_folds.py) --------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """How every network of a cross-fitted run (fold teachers, distilled students) trains, besides its recipe.

    Attributes:
        device: Where it trains.
        amp: The autocast dtype, or None for fp32.
        pretrained: ``auto`` (ImageNet weights found locally), ``none``, or a state-dict path.
        freeze_blocks: Freeze the stem and this many stages after it.
        epochs_this_run: Stop each network cleanly after this many epochs (0: run to the end).
        limit: Images drawn at random for a smoke run (0: every image).
    """

    device: torch.device
    amp: torch.dtype | None
    pretrained: str = "auto"
    freeze_blocks: int = 0
    epochs_this_run: int = 0
    limit: int = 0

    @classmethod
    def choose(cls, device: str = "auto", amp: str = "auto", threads: int = 0, **options: Any) -> "RunSettings":
        """Resolve ``device`` and ``amp`` (``auto``: :func:`lab.training.resolve_device`, :func:`lab.training.autocast_dtype`),
        set the CPU threads (0: torch's default) and turn on cuDNN autotuning on a GPU."""
        if threads:
            torch.set_num_threads(threads)
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return cls(resolved, autocast_dtype(amp, resolved), **options)

    def run_config(self, assignment: FoldAssignment, recipe: Recipe, preprocess: PreprocessConfig,
                   **extra: Any) -> dict[str, Any]:
        """What a network's ``run.json`` records and a resume must match (:func:`check_run_config`)."""
        config = {"folds_sha256": assignment.digest, "limit": self.limit, "recipe": dataclasses.asdict(recipe),
                  "preprocessing": preprocess.to_dict(), "pretrained": self.pretrained,
                  "freeze_blocks": self.freeze_blocks, "amp": str(self.amp), **extra}
        config["recipe"].pop("workers")  # how many loader processes does not change the run
        return config

    def train(self, recipe: Recipe, preprocess: PreprocessConfig, criterion: nn.Module, train_loader: Any,
              holdout_loader: Any, holdout: Sequence[LabelledImage], output: Path, run_config: dict[str, Any],
              keep_weights: bool = True) -> bool:
        """:func:`train_fold` with these settings."""
        return train_fold(recipe, preprocess, criterion, train_loader, holdout_loader, holdout, output, self.device,
                          self.amp, run_config, self.pretrained, self.freeze_blocks, self.epochs_this_run, keep_weights)


def train_folds(recipe: Recipe, preprocess: PreprocessConfig, assignment: FoldAssignment,
                records: Sequence[LabelledImage], layout: FoldLayout, settings: RunSettings,
                folds: Sequence[int] | None = None) -> bool:
    """Train (or resume) the network of each of ``folds`` (default: all), fold k's seed ``recipe.seed + k``.

    Returns:
        True when every fold of the assignment has finished and this run trained all of them (no
        ``folds`` given): the run can be summarized. False while a fold paused or has not run, or
        when only some folds were asked for (processes sharing a GPU, one fold each: one run
        without ``folds`` summarizes).
    """
    print(f"{len(records)} images, {assignment.k} folds (digest {assignment.digest[:12]}); device {settings.device}, "
          f"autocast {settings.amp}; {recipe.arch} at {recipe.image_size} px, {preprocess.resize_mode}", flush=True)
    run_config = settings.run_config(assignment, recipe, preprocess)
    for fold in folds if folds is not None else range(assignment.k):
        fold_recipe = dataclasses.replace(recipe, seed=recipe.seed + fold)
        train, holdout = fold_split(records, assignment, fold)
        print(f"fold {fold}: train {len(train)} images {dict(zip(CLASS_CODES, class_counts(train)))}; "
              f"held out {len(holdout)}", flush=True)
        if layout.done_path(fold).exists():
            print(f"fold {fold}: finished earlier", flush=True)
            continue
        train_loader, holdout_loader = make_loaders(fold_recipe, train, holdout, preprocess, settings.device)
        if not settings.train(fold_recipe, preprocess, make_criterion(fold_recipe, class_counts(train)), train_loader,
                              holdout_loader, holdout, layout.fold_dir(fold), {**run_config, "fold": fold}):
            return False
    unfinished = [fold for fold in range(assignment.k) if not layout.done_path(fold).exists()]
    if unfinished:
        print(f"folds {unfinished} have not finished; the summary is written once every fold has", flush=True)
        return False
    if folds is not None:
        print("every fold has finished; rerun without --folds to write the summary and the teachers", flush=True)
        return False
    return True


def finish_folds(layout: FoldLayout, assignment: FoldAssignment, folds_file: Path, records: Sequence[LabelledImage],
                 recipe: Recipe, preprocess: PreprocessConfig, select_by: str = "lesion_balanced_accuracy",
                 epoch: int | None = None, target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY, bootstrap: int = 1000,
                 teacher_storage: str = "float16", limit: int = 0, command: str = "") -> dict[str, Any]:
    """Once every fold has finished: the out-of-fold logits, the summary (one epoch for all folds) and the teachers.

    Writes ``out_of_fold_logits.pt``, ``summary.json``, the selected epoch's out-of-fold CSV and each
    ``fold_<k>/teacher.pt`` into the run folder.

    Returns:
        The summary.
    """
    oof = collect_out_of_fold(layout, assignment, records, recipe.epochs)
    oof.save(layout.root / "out_of_fold_logits.pt")
    summary = summarize(oof, select_by, epoch, target_sensitivity, bootstrap)
    epoch = summary["selected_epoch"]
    summary |= {"folds_file": folds_file.name, "folds_sha256": assignment.digest, "command": command,
                "recipe": dataclasses.asdict(recipe), "preprocessing": preprocess.to_dict(), "limit": limit,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    teachers = export_teachers(layout, assignment, folds_file, epoch, recipe, preprocess, records, teacher_storage,
                               command=command, torch=str(torch.__version__))
    summary["teachers"] = [str(path) for path in teachers]
    (layout.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_out_of_fold_csv(oof, epoch, layout.root / f"out_of_fold_logits_epoch_{epoch:03d}.csv")
    lesion = summary["lesion"]
    print(f"selected epoch {epoch} of {recipe.epochs} by out-of-fold {summary['selected_by']}; per lesion "
          f"({lesion['n_lesions']}): balanced accuracy {lesion['balanced_accuracy']:.4f}, macro AUC {lesion['macro_auc']:.4f}, "
          f"ECE {lesion['ece']:.4f}, melanoma sensitivity {lesion['melanoma_sensitivity']} at threshold "
          f"{lesion['referral_threshold']}", flush=True)
    return summary


def copy_provenance(target: Path, summary: dict[str, Any], metrics: dict[str, Path],
                    files: dict[str, Path] | None = None) -> None:
    """A run's summary, its networks' per-epoch metrics (``<name>_metrics.jsonl``) and other ``files`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, path in metrics.items():
        (target / f"{name}_metrics.jsonl").write_text(path.read_text())
    for name, path in (files or {}).items():
        (target / name).write_text(path.read_text())
    print(f"provenance written to {target}", flush=True)


def copy_folds_provenance(layout: FoldLayout, k: int, summary: dict[str, Any], target: Path) -> None:
    """The fold run's summary, its ``k`` folds' per-epoch metrics and the selected out-of-fold logits into ``target``."""
    epoch = summary["selected_epoch"]
    copy_provenance(target, summary, {f"fold_{fold}": layout.fold_dir(fold) / "metrics.jsonl" for fold in range(k)},
                    {"out_of_fold_logits.csv": layout.root / f"out_of_fold_logits_epoch_{epoch:03d}.csv"})

