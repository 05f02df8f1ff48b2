"""Distilling the fold teachers into one student network, and measuring the student out of fold.

Cost is bounded by a fixed set of views: every image is preprocessed once as served
(:func:`lab.data.build_eval_transform`) and seen in its 8 dihedral views (flips and right-angle
rotations, :func:`dihedral`), each teacher's logits for all 8 views are computed once and cached
(:func:`cache_teacher_logits`, resumable), and the student trains on a random one of those views
per image and epoch with colour jitter on top (:class:`DistillationDataset`), against the cached
logits of that view. The loss (:class:`DistillationLoss`) is the temperature-scaled KL divergence
to the teacher's softened distribution plus the class-weighted hard-label cross-entropy.

Soft labels come from one of two places (:func:`soft_labels`):

- ``out_of_fold``: each image's logits from the teacher that did not train on it. The out-of-fold
  check trains student ``k`` on every fold but ``k`` with these and scores it on fold ``k``, which
  it never saw, not even through its soft labels' own image. (The teachers of folds ``j != k``
  did train on fold ``k``, so their soft labels carry some of fold ``k``'s labels indirectly; the
  check measures the recipe, slightly optimistically.)
- ``ensemble``: the mean of all K teachers' logits, for the final student trained on every image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from handler.checkpoint import model_from_checkpoint, read_checkpoint
from handler.preprocessing import PreprocessConfig, normalize_batch
from lab.data import LabelledImage, LesionDataset, build_eval_transform
from lab.provenance import file_sha256
from lab.training import autocast, class_weights

VIEWS = 8
SOFT_LABELS = ("out_of_fold", "ensemble")


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of the dihedral group of square images ``(..., H, W)``.

    Views 0-3 rotate by 0, 90, 180 and 270 degrees; views 4-7 flip left-right first. View 0 is the image.
    """
    if not 0 <= view < VIEWS:
        raise ValueError(f"view must be 0..{VIEWS - 1}, got {view}")
    flipped = images.flip(-1) if view >= 4 else images
    return torch.rot90(flipped, view % 4, dims=(-2, -1))


@torch.no_grad()
def view_logits(model: nn.Module, batch: torch.Tensor, preprocess: PreprocessConfig, device: torch.device,
                amp: torch.dtype | None = None, views: int = VIEWS) -> torch.Tensor:
    """(N, views, C) float32 logits of the first ``views`` dihedral views of a ``uint8`` batch, in one forward pass."""
    inputs = normalize_batch(batch.to(device), preprocess)
    stacked = torch.cat([dihedral(inputs, view) for view in range(views)]).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(stacked).float()
    return logits.reshape(views, len(batch), -1).transpose(0, 1).cpu()


def image_set_digest(records: Sequence[LabelledImage]) -> str:
    """Names an ordered set of image files in a cache.

    The file counts, not only the image id: the same image id names a sharp ``ham10000-224`` copy
    in one run and a soft ``ham10000-200x150`` copy in another, and their teacher logits differ.
    """
    return hashlib.sha256("\n".join(f"{r.image_id}\t{r.path}" for r in records).encode()).hexdigest()


def cache_teacher_logits(teacher: str | os.PathLike, records: Sequence[LabelledImage], cache: str | os.PathLike,
                         device: torch.device, batch_size: int = 64, amp: torch.dtype | None = None, workers: int = 0,
                         save_every: int = 2048, views: int = VIEWS) -> torch.Tensor:
    """One teacher's (N, views, C) logits of every record's first ``views`` dihedral views, read from or written to ``cache``.

    The cache is named by the teacher file's SHA-256 and the ordered image files; a cache of another
    teacher or image set is recomputed. Written every ``save_every`` images, so an interrupted run
    continues where it stopped.

    Args:
        teacher: A release-format checkpoint (``fold_<k>/teacher.pt``).
        records: The images, with paths.
        cache: The cache file.
        device: Where the teacher runs.
        batch_size: Images per forward pass (times 8 views).
        amp: Autocast dtype, or None for fp32.
        workers: Data-loader worker processes.
        save_every: Images between partial saves.
        views: How many dihedral views (1: the image as served only, for a student that trains on
            its own augmentations against the unaugmented image's soft labels).
    """
    cache = Path(cache)
    key = {"teacher_sha256": file_sha256(teacher), "images_sha256": image_set_digest(records)}
    if views != VIEWS:
        key["views"] = views
    state = torch.load(cache, map_location="cpu", weights_only=True) if cache.exists() else None
    if state is None or any(state.get(name) != value for name, value in key.items()):
        state = {**key, "done": 0, "logits": torch.zeros(len(records), views, 0)}
    done = int(state["done"])
    if done >= len(records):
        return state["logits"]
    checkpoint = read_checkpoint(teacher)
    loaded = model_from_checkpoint(checkpoint, device, str(teacher))
    dataset = LesionDataset(list(records)[done:], build_eval_transform(checkpoint.meta.preprocessing))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    chunks = [state["logits"][:done]] if done else []
    since_save = 0
    for images, _ in loader:
        chunks.append(view_logits(loaded.model, images, checkpoint.meta.preprocessing, device, amp, views))
        done += len(images)
        since_save += len(images)
        if since_save >= save_every or done == len(records):
            since_save = 0
            state = {**key, "done": done, "logits": torch.cat(chunks)}
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_name(cache.name + ".tmp")
            torch.save(state, temporary)
            os.replace(temporary, cache)
    return state["logits"]


def soft_labels(teacher_logits: Sequence[torch.Tensor], folds: np.ndarray, source: str) -> torch.Tensor:
    """(N, 8, C) logits to distil, from the K teachers' (N, 8, C) cached logits.

    Args:
        teacher_logits: Teacher ``k``'s logits at index ``k``, all over the same images.
        folds: (N,) each image's fold.
        source: ``out_of_fold`` (the teacher that held the image out) or ``ensemble`` (the mean of all teachers' logits).
    """
    stacked = torch.stack(list(teacher_logits))
    if source == "ensemble":
        return stacked.mean(0)
    if source == "out_of_fold":
        return stacked[torch.as_tensor(folds), torch.arange(stacked.shape[1])]
    raise ValueError(f"unknown soft-label source {source!r}; choose one of {SOFT_LABELS}")


def pack_targets(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + C)`` float targets: the hard label in column 0, the teacher's logits after it.

    One tensor, so that :func:`lab.training.train_one_epoch` moves and counts it like labels.
    """
    return torch.cat([labels.float().reshape(-1, 1), teacher_logits.float()], dim=1)


class DistillationLoss(nn.Module):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * class-weighted CE(student, label)``.

    Args:
        weight: Per-class weights of the hard-label cross-entropy (:func:`lab.training.class_weights`).
        temperature: Softening of both distributions in the KL term; ``T^2`` keeps its gradient scale.
        alpha: Share of the KL term.
    """

    def __init__(self, weight: torch.Tensor, temperature: float = 2.0, alpha: float = 0.7) -> None:
        super().__init__()
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature} and {alpha}")
        self.register_buffer("weight", weight.float())
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = targets[:, 0].long(), targets[:, 1:]
        t = self.temperature
        kl = nn.functional.kl_div(torch.log_softmax(logits / t, 1), torch.log_softmax(teacher / t, 1),
                                  reduction="batchmean", log_target=True) * t * t
        ce = nn.functional.cross_entropy(logits, labels, weight=self.weight)
        return self.alpha * kl + (1.0 - self.alpha) * ce


def distillation_loss(counts: list[int], class_weight_power: float, temperature: float, alpha: float) -> DistillationLoss:
    """The loss with inverse-frequency class weights from the training class counts."""
    return DistillationLoss(class_weights(counts, class_weight_power), temperature, alpha)


class DistillationDataset(torch.utils.data.Dataset):
    """Served-geometry images in a random dihedral view, colour-jittered, with that view's teacher logits.

    Each item draws its view from torch's generator, so :func:`lab.training.seed_epoch` makes an
    epoch's views, like its jitter, depend only on the seed and the epoch (resuming stays exact).

    Args:
        records: The images, with paths.
        preprocess: The student's preprocessing (the teachers' logits were computed with the same).
        teacher_logits: (N, 8, C) logits to distil, row ``i`` for ``records[i]``.
        jitter: Colour jitter on top of the view (brightness, contrast, saturation 0.2, hue 0.03).
    """

    def __init__(self, records: Sequence[LabelledImage], preprocess: PreprocessConfig, teacher_logits: torch.Tensor,
                 jitter: bool = True) -> None:
        from torchvision.transforms import v2

        if teacher_logits.shape[:2] != (len(records), VIEWS):
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not cover {len(records)} images x {VIEWS} views")
        self.images = LesionDataset(records, build_eval_transform(preprocess))
        self.teacher_logits = teacher_logits.float()
        self.jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03) if jitter else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[index]
        view = int(torch.randint(VIEWS, ()))
        image = dihedral(image, view).contiguous()
        if self.jitter is not None:
            image = self.jitter(image)
        return image, pack_targets(torch.tensor([label]), self.teacher_logits[index, view][None])[0]


class SoftLabelledDataset(torch.utils.data.Dataset):
    """Training images under the student's own augmentations, each with the teacher's logits of the
    image as served (one view): offline distillation at the cost of one teacher pass per image.

    Args:
        images: The augmented training set (``lab.data.LesionDataset`` with a training transform).
        teacher_logits: (N, C) logits, row ``i`` for ``images``' item ``i``.
    """

    def __init__(self, images: LesionDataset, teacher_logits: torch.Tensor) -> None:
        if teacher_logits.ndim != 2 or len(teacher_logits) != len(images):
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not cover {len(images)} images")
        self.images = images
        self.teacher_logits = teacher_logits.float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[index]
        return image, pack_targets(torch.tensor([label]), self.teacher_logits[index][None])[0]


def distillation_loader(records: Sequence[LabelledImage], preprocess: PreprocessConfig, teacher_logits: torch.Tensor,
                        batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """Shuffled training batches of :class:`DistillationDataset` (non-persistent workers, as resuming needs)."""
    return torch.utils.data.DataLoader(DistillationDataset(records, preprocess, teacher_logits), batch_size=batch_size,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       pin_memory=device.type == "cuda")


def distillation_record(temperature: float, alpha: float, teachers: Sequence[str]) -> dict[str, Any]:
    """What a student's provenance records about its distillation."""
    return {"temperature": temperature, "alpha": alpha, "views": "8 dihedral views, colour jitter on top",
            "soft_labels": "check students: the teacher that held each image out; final student: the mean of all "
                           "teachers' logits",
            "teachers": list(teachers)}
