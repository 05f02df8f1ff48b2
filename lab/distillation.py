"""Distilling the fold teachers into one student network, and measuring the student out of fold.

Cost is bounded by a fixed set of views: every image is preprocessed once as served
(:func:`lab.data.build_eval_transform`) and seen in its dihedral views (flips and right-angle
rotations, :func:`dihedral`): all 8 for a square input, the 4 that keep a rectangular (4:3) input's
shape otherwise (:func:`views_of`). Each teacher's logits for those views are computed once and cached
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

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from handler.architectures import architecture, build_model
from handler.checkpoint import Checkpoint, Meta, make_checkpoint, model_from_checkpoint, read_checkpoint
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig, normalize_batch
from handler.storage import pack_state_dict
from lab.calibration import fit_calibration
from lab.data import LabelledImage, LesionDataset, build_eval_transform, class_counts
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.folds import (FoldAssignment, FoldLayout, RunSettings, check_trained_on, fold_split, folds_data_record,
                       lesion_figures, load_epoch_weights, read_out_of_fold_csv, single_fold_figures)
from lab.provenance import file_sha256
from lab.training import Recipe, autocast, class_weights

VIEWS = 8
ALL_VIEWS = tuple(range(VIEWS))
# A right-angle rotation turns a 4:3 input into 3:4: a rectangular input keeps the identity, the half turn and the flips.
SHAPE_KEEPING_VIEWS = (0, 2, 4, 6)
SOFT_LABELS = ("out_of_fold", "ensemble")


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of the dihedral group of square images ``(..., H, W)``.

    Views 0-3 rotate by 0, 90, 180 and 270 degrees; views 4-7 flip left-right first. View 0 is the image.
    """
    if not 0 <= view < VIEWS:
        raise ValueError(f"view must be 0..{VIEWS - 1}, got {view}")
    flipped = images.flip(-1) if view >= 4 else images
    return torch.rot90(flipped, view % 4, dims=(-2, -1))


def views_of(preprocess: PreprocessConfig) -> tuple[int, ...]:
    """The dihedral views a model input of this preprocessing can take: all 8 if it is square, else the 4 that keep its shape."""
    return ALL_VIEWS if preprocess.input_height == preprocess.input_width else SHAPE_KEEPING_VIEWS


@torch.no_grad()
def view_logits(model: nn.Module, batch: torch.Tensor, preprocess: PreprocessConfig, device: torch.device,
                amp: torch.dtype | None = None, views: Sequence[int] = ALL_VIEWS) -> torch.Tensor:
    """(N, len(views), C) float32 logits of the dihedral ``views`` of a ``uint8`` batch, in one forward pass."""
    inputs = normalize_batch(batch.to(device), preprocess)
    stacked = torch.cat([dihedral(inputs, view) for view in views]).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(stacked).float()
    return logits.reshape(len(views), len(batch), -1).transpose(0, 1).cpu()


def image_set_digest(records: Sequence[LabelledImage]) -> str:
    """Names an ordered set of image files in a cache.

    The file counts, not only the image id: the same image id names a sharp ``ham10000-224`` copy
    in one run and a soft ``ham10000-200x150`` copy in another, and their teacher logits differ.
    """
    return hashlib.sha256("\n".join(f"{r.image_id}\t{r.path}" for r in records).encode()).hexdigest()


def cache_teacher_logits(teacher: str | os.PathLike, records: Sequence[LabelledImage], cache: str | os.PathLike,
                         device: torch.device, batch_size: int = 64, amp: torch.dtype | None = None, workers: int = 0,
                         save_every: int = 2048, views: Sequence[int] | None = None) -> torch.Tensor:
    """One teacher's (N, len(views), C) logits of every record's dihedral ``views``, read from or written to ``cache``.

    The cache is named by the teacher file's SHA-256 and the ordered image files; a cache of another
    teacher or image set is recomputed. Written every ``save_every`` images, so an interrupted run
    continues where it stopped.

    Args:
        teacher: A release-format checkpoint (``fold_<k>/teacher.pt``).
        records: The images, with paths.
        cache: The cache file.
        device: Where the teacher runs.
        batch_size: Images per forward pass (times the views).
        amp: Autocast dtype, or None for fp32.
        workers: Data-loader worker processes.
        save_every: Images between partial saves.
        views: Which dihedral views (``(0,)``: the image as served only, for a student that trains on
            its own augmentations against the unaugmented image's soft labels); None: every view the
            teacher's input shape can take (:func:`views_of`).
    """
    cache = Path(cache)
    checkpoint = read_checkpoint(teacher)
    views = tuple(views_of(checkpoint.meta.preprocessing) if views is None else views)
    key: dict[str, Any] = {"teacher_sha256": file_sha256(teacher), "images_sha256": image_set_digest(records)}
    if views != ALL_VIEWS:
        key["views"] = list(views)
    state = torch.load(cache, map_location="cpu", weights_only=True) if cache.exists() else None
    if state is None or any(state.get(name) != value for name, value in key.items()):
        state = {**key, "done": 0, "logits": torch.zeros(len(records), len(views), 0)}
    done = int(state["done"])
    if done >= len(records):
        return state["logits"]
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


def out_of_fold_teacher_logits(path: str | os.PathLike, records: Sequence[LabelledImage]) -> torch.Tensor:
    """(N, C) soft labels of ``records`` from a fold run's out-of-fold logits (``scripts/train_folds.py``'s CSV).

    Each image's logits come from the fold network that did not train on it, so they say how the
    teachers generalize to that image rather than how well they fit it. A teacher's logits of images
    it trained on describe its fit (see docs/EXPERIMENTS.md, "Second try").

    Raises:
        ValueError: A record is not in the file, or the file gives it another class.
    """
    rows = read_out_of_fold_csv(path)
    missing = [r.image_id for r in records if r.image_id not in rows]
    if missing:
        raise ValueError(f"{path} has no out-of-fold logits for {len(missing)} of the {len(records)} training images "
                         f"(e.g. {', '.join(missing[:3])}): the fold run must cover every training image")
    relabelled = [r.image_id for r in records if rows[r.image_id][0] != CLASS_CODES[r.label]]
    if relabelled:
        raise ValueError(f"{path} gives {len(relabelled)} images another class than the metadata "
                         f"(e.g. {', '.join(relabelled[:3])})")
    return torch.from_numpy(np.stack([rows[r.image_id][2] for r in records]))


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

    def soft_term(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(teacher_T || student_T)``, averaged over the batch."""
        t = self.temperature
        return nn.functional.kl_div(torch.log_softmax(logits / t, 1), torch.log_softmax(teacher / t, 1),
                                    reduction="batchmean", log_target=True) * t * t

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = targets[:, 0].long(), targets[:, 1:]
        ce = nn.functional.cross_entropy(logits, labels, weight=self.weight)
        return self.alpha * self.soft_term(logits, teacher) + (1.0 - self.alpha) * ce


def distillation_loss(counts: list[int], class_weight_power: float, temperature: float, alpha: float) -> DistillationLoss:
    """The loss with inverse-frequency class weights from the training class counts."""
    return DistillationLoss(class_weights(counts, class_weight_power), temperature, alpha)


class DistillationDataset(torch.utils.data.Dataset):
    """Served-geometry images in a random dihedral view (of those their shape can take, :func:`views_of`),
    colour-jittered, with that view's teacher logits.

    Each item draws its view from torch's generator, so :func:`lab.training.seed_epoch` makes an
    epoch's views, like its jitter, depend only on the seed and the epoch (resuming stays exact).

    Args:
        records: The images, with paths.
        preprocess: The student's preprocessing (the teachers' logits were computed with the same).
        teacher_logits: (N, V, C) logits to distil, row ``i`` for ``records[i]``, column ``j`` for view
            ``views_of(preprocess)[j]``.
        jitter: Colour jitter on top of the view (brightness, contrast, saturation 0.2, hue 0.03).
    """

    def __init__(self, records: Sequence[LabelledImage], preprocess: PreprocessConfig, teacher_logits: torch.Tensor,
                 jitter: bool = True) -> None:
        from torchvision.transforms import v2

        self.views = views_of(preprocess)
        if teacher_logits.shape[:2] != (len(records), len(self.views)):
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not cover {len(records)} images x "
                             f"{len(self.views)} views")
        self.images = LesionDataset(records, build_eval_transform(preprocess))
        self.teacher_logits = teacher_logits.float()
        self.jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03) if jitter else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[index]
        column = int(torch.randint(len(self.views), ()))
        image = dihedral(image, self.views[column]).contiguous()
        if self.jitter is not None:
            image = self.jitter(image)
        return image, pack_targets(torch.tensor([label]), self.teacher_logits[index, column][None])[0]


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


def distillation_record(temperature: float, alpha: float, teachers: Sequence[str],
                        views: Sequence[int] = ALL_VIEWS) -> dict[str, Any]:
    """What a student's provenance records about its distillation."""
    return {"temperature": temperature, "alpha": alpha,
            "views": f"dihedral views {list(views)} (lab.distillation.dihedral), colour jitter on top",
            "soft_labels": "check students: the teacher that held each image out; final student: the mean of all "
                           "teachers' logits",
            "teachers": list(teachers)}


# --- a whole distillation run (scripts/distill.py) ------------------------------------------------------------------

def load_teachers(teachers: FoldLayout, assignment: FoldAssignment) -> tuple[list[Path], PreprocessConfig]:
    """Every fold's ``teacher.pt`` of a fold run, checked against the fold file, and their one preprocessing.

    Raises:
        FileNotFoundError: A teacher is missing (the fold run has not finished).
        FoldMismatchError: A teacher was trained on other folds, or holds out another fold.
        ValueError: The teachers were trained with different preprocessing.
    """
    paths = [teachers.teacher_path(fold) for fold in range(assignment.k)]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"no teacher checkpoints {missing}: run scripts/train_folds.py (make train-folds) first")
    preprocess = None
    for fold, path in enumerate(paths):
        checkpoint = read_checkpoint(path)
        check_trained_on(checkpoint.meta.data, assignment, fold, str(path))
        if preprocess not in (None, checkpoint.meta.preprocessing):
            raise ValueError(f"{path} has other preprocessing than fold 0's teacher")
        preprocess = checkpoint.meta.preprocessing
    return paths, preprocess


def student_geometry(recipe: Recipe, teacher_preprocess: PreprocessConfig) -> tuple[Recipe, PreprocessConfig]:
    """The student sees the teachers' geometry (their logits are of those exact inputs), normalized for its own weights.

    Returns:
        The recipe (its ``image_size`` the teachers', said when it differed) and the student's preprocessing.
    """
    arch = architecture(recipe.arch)
    preprocess = dataclasses.replace(teacher_preprocess, mean=arch.mean, std=arch.std)
    if preprocess.image_size != recipe.image_size:
        print(f"student input {preprocess.input_height}x{preprocess.input_width} px, as the teachers' "
              f"(--image-size {recipe.image_size} ignored)", flush=True)
        recipe = dataclasses.replace(recipe, image_size=preprocess.image_size)
    return recipe, preprocess


def _figures_line(figures: dict[str, Any]) -> str:
    return (f"balanced accuracy {figures['balanced_accuracy']:.4f}, macro AUC {figures['macro_auc']:.4f}, "
            f"melanoma sensitivity {figures['melanoma_sensitivity']}")


@dataclasses.dataclass
class DistillationRun:
    """One distillation of a fold run's teachers: its out-of-fold check students and its final student.

    Attributes:
        recipe: The students' recipe (check student k's seed is ``recipe.seed + k``).
        preprocess: The students' preprocessing (:func:`student_geometry`).
        settings: How each student trains.
        assignment: The folds.
        folds_file: Where the fold assignment is.
        records: Every image of the run.
        layout: The run folder (``fold_<k>/`` the check students, ``student/`` the final one).
        teachers: Each fold's teacher checkpoint.
        temperature: Softening of the KL term.
        alpha: Share of the KL term (the rest is hard-label cross-entropy).
        target_sensitivity: Melanoma sensitivity the reported referral thresholds keep.
        cached: Each teacher's (N, 8, C) logits of every record (:meth:`cache_logits`).
        check_logits: Check student k's out-of-fold ``(rows, logits)``, by fold.
    """

    recipe: Recipe
    preprocess: PreprocessConfig
    settings: RunSettings
    assignment: FoldAssignment
    folds_file: Path
    records: list[LabelledImage]
    layout: FoldLayout
    teachers: list[Path]
    temperature: float = 2.0
    alpha: float = 0.7
    target_sensitivity: float = TARGET_MELANOMA_SENSITIVITY
    cached: list[torch.Tensor] = dataclasses.field(default_factory=list)
    check_logits: dict[int, tuple[list[int], np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def folds(self) -> np.ndarray:
        """Each record's fold."""
        fold_of = self.assignment.fold_of()
        return np.array([fold_of[r.image_id] for r in self.records])

    def cache_logits(self, batch_size: int = 64) -> None:
        """Every teacher's logits of every view of every image (:func:`views_of`), read from or written to ``teacher_logits/``."""
        print(f"{len(self.records)} images, {len(self.teachers)} teachers, folds digest {self.assignment.digest[:12]}; "
              f"device {self.settings.device}, autocast {self.settings.amp}; student {self.recipe.arch}", flush=True)
        started = time.perf_counter()
        self.cached = [cache_teacher_logits(path, self.records, self.layout.root / "teacher_logits" / f"fold_{fold}.pt",
                                            self.settings.device, batch_size, self.settings.amp, self.recipe.workers)
                       for fold, path in enumerate(self.teachers)]
        print(f"teacher logits of {len(self.records)} images x {len(views_of(self.preprocess))} views x "
              f"{len(self.teachers)} teachers ready "
              f"({time.perf_counter() - started:.0f} s this run)", flush=True)

    def summary(self, command: str, limit: int = 0) -> dict[str, Any]:
        """What every summary of this run starts with; ``self.teachers`` named by digest."""
        digests = [file_sha256(path) for path in self.teachers]
        return {"folds_file": self.folds_file.name, "folds_sha256": self.assignment.digest,
                "distillation": distillation_record(self.temperature, self.alpha, [
                    f"{path} (sha256 {digest[:12]})" for path, digest in zip(self.teachers, digests)], views_of(self.preprocess)),
                "recipe": dataclasses.asdict(self.recipe), "preprocessing": self.preprocess.to_dict(),
                "limit": limit, "command": command}

    def run_config(self, **extra: Any) -> dict[str, Any]:
        """A student's ``run.json``: the run settings, the distillation's and the teachers' digests."""
        return self.settings.run_config(self.assignment, self.recipe, self.preprocess, temperature=self.temperature,
                                        alpha=self.alpha, teachers_sha256=[file_sha256(p) for p in self.teachers],
                                        **extra)

    def check(self, fold: int) -> dict[str, Any] | None:
        """Check student ``fold``: trained on the other folds against out-of-fold soft labels, scored on ``fold``
        next to that fold's teacher by the same method. None while it paused."""
        row_of = {r.image_id: i for i, r in enumerate(self.records)}
        train, holdout = fold_split(self.records, self.assignment, fold)
        targets = soft_labels(self.cached, self.folds, "out_of_fold")[torch.tensor([row_of[r.image_id] for r in train])]
        loader = distillation_loader(train, self.preprocess, targets, self.recipe.batch_size, self.recipe.workers,
                                     self.settings.device)
        holdout_loader = torch.utils.data.DataLoader(
            LesionDataset(holdout, build_eval_transform(self.preprocess)), batch_size=self.recipe.batch_size * 2,
            shuffle=False, num_workers=self.recipe.workers, pin_memory=self.settings.device.type == "cuda")
        criterion = distillation_loss(class_counts(train), self.recipe.class_weight_power, self.temperature, self.alpha)
        if not self.settings.train(dataclasses.replace(self.recipe, seed=self.recipe.seed + fold), self.preprocess,
                                   criterion, loader, holdout_loader, holdout, self.layout.fold_dir(fold),
                                   self.run_config(student=f"check fold {fold}", soft_labels="out_of_fold"),
                                   keep_weights=False):
            return None
        student = torch.load(self.layout.logits_path(fold, self.recipe.epochs), weights_only=True)["logits"].numpy()
        rows = [row_of[r.image_id] for r in holdout]
        teacher = self.cached[fold][rows, 0].numpy()  # view 0 is the served input: teacher k out of fold
        self.check_logits[fold] = (rows, student)
        figures = {"student": single_fold_figures(student, holdout, target_sensitivity=self.target_sensitivity),
                   "teacher": single_fold_figures(teacher, holdout, target_sensitivity=self.target_sensitivity)}
        print(f"check fold {fold}: student " + _figures_line(figures["student"]) + " | teacher "
              + _figures_line(figures["teacher"]), flush=True)
        return figures

    def check_folds(self, folds: Sequence[int], bootstrap: int = 1000) -> dict[str, Any] | None:
        """The out-of-fold check of ``folds`` (summary keys ``check`` and, when every fold is checked,
        ``check_all_folds``); None while a student paused."""
        per_fold = {}
        for fold in folds:
            figures = self.check(fold)
            if figures is None:
                return None
            per_fold[str(fold)] = figures
        if not per_fold:
            return {}
        result: dict[str, Any] = {"check": {
            "method": "student k trained on the other folds with out-of-fold soft labels, scored on fold k after its "
                      f"{self.recipe.epochs} epochs; teacher k scored on the same fold; per lesion, calibrated by a "
                      "5-part lesion-grouped cross-fit within the fold",
            "per_fold": per_fold,
            "mean": {who: {key: float(np.mean([row[who][key] for row in per_fold.values()]))
                           for key in ("balanced_accuracy", "macro_auc", "ece")} for who in ("student", "teacher")}}}
        if sorted(folds) == list(range(self.assignment.k)):
            result["check_all_folds"] = self.all_folds_figures(bootstrap)
        return result

    def all_folds_figures(self, bootstrap: int = 1000) -> dict[str, Any]:
        """Students and teachers out of fold over every image, summarized as the fold run summarizes the teachers."""
        student = np.zeros((len(self.records), len(CLASS_CODES)), np.float32)
        for rows, logits in self.check_logits.values():
            student[rows] = logits
        folds = self.folds
        teacher = torch.stack(self.cached)[torch.as_tensor(folds), torch.arange(len(self.records)), 0].numpy()
        labels = np.array([r.label for r in self.records])
        lesions = [r.lesion_id for r in self.records]
        figures = {}
        for name, logits in (("student", student), ("teacher", teacher)):
            report = lesion_figures(logits, labels, lesions, folds, target_sensitivity=self.target_sensitivity,
                                    bootstrap=bootstrap)
            figures[name] = {key: report[key] for key in ("n_lesions", "balanced_accuracy", "macro_auc", "ece",
                                                          "melanoma_sensitivity", "melanoma_specificity",
                                                          "referral_threshold", "per_fold", "bootstrap")}
        return figures

    def train_student(self) -> bool:
        """The final student, on every image against the teachers' mean logits; False while it paused."""
        loader = distillation_loader(self.records, self.preprocess, soft_labels(self.cached, self.folds, "ensemble"),
                                     self.recipe.batch_size, self.recipe.workers, self.settings.device)
        criterion = distillation_loss(class_counts(self.records), self.recipe.class_weight_power, self.temperature,
                                      self.alpha)
        return self.settings.train(self.recipe, self.preprocess, criterion, loader, None, [], self.layout.root / "student",
                                   self.run_config(student="final", soft_labels="ensemble"))

    def export_student(self, summary: dict[str, Any], version: str, storage: str = "float16") -> Path:
        """The final student as a release-format checkpoint (``student.pt``), ``meta.data`` naming the folds it
        was distilled over, with a ``none`` calibration fitted on the check students' out-of-fold logits."""
        final_dir = self.layout.root / "student"
        model = load_epoch_weights(build_model(self.recipe.arch, dropout=self.recipe.dropout),
                                   final_dir / "weights" / f"epoch_{self.recipe.epochs:03d}.pt")
        calibration, calibration_source = {}, None
        if self.check_logits:
            labels = np.array([r.label for r in self.records])
            rows = np.concatenate([np.asarray(r) for r, _ in self.check_logits.values()])
            logits = np.concatenate([l for _, l in self.check_logits.values()])
            calibration = {"none": fit_calibration(torch.from_numpy(logits), torch.from_numpy(labels[rows]))}
            calibration_source = (f"fitted on the out-of-fold logits of the check students of folds "
                                  f"{sorted(self.check_logits)} ({len(rows)} images), same recipe; not on the final "
                                  "student's own training images")
        data = folds_data_record(self.assignment, self.folds_file, None, len(self.records), 0)
        data["train_class_counts"] = dict(zip(CLASS_CODES, class_counts(self.records)))
        meta = Meta(self.preprocess, version=version, calibration=calibration, data=data)
        done = json.loads((final_dir / "done.json").read_text())
        checkpoint = make_checkpoint(model, self.recipe.arch, self.preprocess, meta, self.recipe.dropout,
                                     trained_epochs=self.recipe.epochs, initialization=done["initialization"],
                                     distillation=summary["distillation"], calibration_source=calibration_source,
                                     out_of_fold_check=summary.get("check"), recipe=dataclasses.asdict(self.recipe),
                                     command=summary["command"], torch=str(torch.__version__),
                                     created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        checkpoint = Checkpoint(pack_state_dict(checkpoint.state_dict, storage), checkpoint.config, checkpoint.meta)
        path = checkpoint.save(self.layout.root / "student.pt")
        print(f"student written to {path}", flush=True)
        return path

