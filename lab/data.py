"""Labelled dermoscopy data sets: HAM10000/ISIC label files, image lookup and the lesion-grouped split.

Also the training augmentations and the validation transform, which produce the same ``uint8``
tensors as the serving preprocessing (:mod:`handler.preprocessing`) that they build on.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from handler.labels import CLASS_CODES, class_index
from handler.preprocessing import PreprocessConfig, decode_image, pil_to_uint8_tensor, resize_for_augmentation, resize_to_model_input

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# ISIC 2018 Task 3 ground truth: one row per image, one-hot columns in this header order.
_ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


@dataclass(frozen=True)
class LabelledImage:
    """One image with its diagnosis and the lesion it shows."""

    image_id: str
    label: int
    lesion_id: str
    path: str = ""


def read_labels(csv_path: str | os.PathLike) -> list[LabelledImage]:
    """Read a labels file in HAM10000 metadata or ISIC 2018 Task 3 ground-truth format.

    Args:
        csv_path: HAM10000 metadata (``image_id``, ``dx``, optional ``lesion_id``) or
            ISIC 2018 ground truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` one-hot).

    Returns:
        One record per row; ``lesion_id`` falls back to the image id when absent.

    Raises:
        ValueError: On an unknown format, an unknown class or a row that is not one-hot.
    """
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        records = []
        if {"image_id", "dx"} <= columns:
            for row in reader:
                records.append(LabelledImage(row["image_id"], class_index(row["dx"]), row.get("lesion_id") or row["image_id"]))
        elif {"image", *_ISIC_COLUMNS} <= columns:
            for line, row in enumerate(reader, start=2):
                hot = [code for code in _ISIC_COLUMNS if float(row[code]) >= 0.5]
                if len(hot) != 1:
                    raise ValueError(f"{csv_path}:{line}: expected exactly one positive class, got {hot}")
                records.append(LabelledImage(row["image"], class_index(hot[0]), row["image"]))
        else:
            raise ValueError(f"{csv_path}: unknown labels format; expected HAM10000 metadata (image_id, dx) "
                             f"or ISIC 2018 Task 3 ground truth (image,{','.join(_ISIC_COLUMNS)})")
    if not records:
        raise ValueError(f"{csv_path}: no labelled rows")
    return records


def attach_paths(records: Sequence[LabelledImage], image_dirs: Sequence[str | os.PathLike]) -> list[LabelledImage]:
    """Find each record's image in one or more folders (the Kaggle layout splits them in two).

    Raises:
        FileNotFoundError: Naming the images that are in the labels but in no folder.
    """
    index: dict[str, str] = {}
    for folder in image_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        for entry in os.scandir(folder):
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in _IMAGE_SUFFIXES:
                index.setdefault(stem, entry.path)
    missing = [r.image_id for r in records if r.image_id not in index]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled images are missing from {list(map(str, image_dirs))}, "
                                f"e.g. {missing[:5]}")
    return [LabelledImage(r.image_id, r.label, r.lesion_id, index[r.image_id]) for r in records]


def read_labelled_images(labels_csv: str | os.PathLike, image_dirs: Sequence[str | os.PathLike],
                         subset: str | os.PathLike | None = None) -> list[LabelledImage]:
    """Labelled images with their files, optionally only those a split file names.

    Args:
        labels_csv: HAM10000 metadata or ISIC 2018 Task 3 ground truth (:func:`read_labels`).
        image_dirs: Folders holding the images (:func:`attach_paths`).
        subset: A JSON file with ``val_image_ids``, as ``scripts/train.py`` writes its split.

    Raises:
        FileNotFoundError: Naming the images that are in the labels but in no folder.
    """
    records = read_labels(labels_csv)
    if subset is not None:
        wanted = set(json.loads(Path(subset).read_text())["val_image_ids"])
        records = [r for r in records if r.image_id in wanted]
    return attach_paths(records, image_dirs)


def lesion_grouped_split(records: Sequence[LabelledImage], val_fraction: float, seed: int) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split into train and validation, stratified by diagnosis and grouped by lesion.

    No lesion has images on both sides, so validation measures generalization to new
    lesions rather than recognition of other photos of a training lesion.

    Args:
        records: The labelled images.
        val_fraction: Share of the data for validation, e.g. 0.15.
        seed: Seed of the fold assignment.

    Returns:
        ``(train, validation)``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / val_fraction))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    labels = [r.label for r in records]
    groups = [r.lesion_id for r in records]
    train_idx, val_idx = next(folds.split(records, labels, groups))
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def class_counts(records: Sequence[LabelledImage]) -> list[int]:
    """Number of records per class, in :data:`CLASS_CODES` order."""
    counts = [0] * len(CLASS_CODES)
    for record in records:
        counts[record.label] += 1
    return counts


class LesionDataset(torch.utils.data.Dataset):
    """Images decoded with the serving decoder, then transformed to ``uint8`` tensors."""

    def __init__(self, records: Sequence[LabelledImage], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        with open(record.path, "rb") as handle:
            decoded = decode_image(handle.read())
        return self.transform(decoded.image), record.label


def build_train_transform(config: PreprocessConfig, min_scale: float = 0.5) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentations for dermoscopy, producing the same ``uint8`` tensors as serving.

    Dermoscopic lesions have no canonical orientation, so all flips and right-angle
    rotations are label-preserving; colour jitter covers differences between
    dermatoscopes and lighting; random resized crops cover zoom and framing. The crops are cut
    from the image in the geometry of ``config.resize_mode``
    (:func:`handler.preprocessing.resize_for_augmentation`): under ``full_view`` from the whole
    image squeezed to the square input, so that a full-scale crop is what serving feeds the model.

    Args:
        config: The preprocessing parameters of the model being trained.
        min_scale: Smallest crop area, as a fraction of the resized image.

    Returns:
        A callable from an RGB PIL image to a ``uint8`` CHW tensor.
    """
    from torchvision.transforms import v2

    size = (config.input_height, config.input_width)
    aspect = config.input_width / config.input_height
    # A rectangular input keeps its orientation: rotating it by 90 degrees would change its shape;
    # the two flips already give the 180-degree rotation.
    angles = (0, 90, 180, 270) if size[0] == size[1] else (0,)
    augment = v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4 * aspect, 4 / 3 * aspect), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in angles]),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
        v2.PILToTensor(),
    ])

    def transform(image: Image.Image) -> torch.Tensor:
        return augment(resize_for_augmentation(image, config))

    return transform


def build_eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic serving transform, for validation and evaluation datasets (``config.resize_mode``'s geometry)."""

    def transform(image: Image.Image) -> torch.Tensor:
        return pil_to_uint8_tensor(resize_to_model_input(image, config))

    return transform
