"""How far a saliency map can be trusted: localization on lesion masks, faithfulness by deletion.

Every method is scored by the same code (:func:`score_lesion`) on the validation lesions, at the
served geometry: each image goes through the served decoder and preprocessing
(:func:`handler.preprocessing.load_model_input`) and its lesion mask through the same resize (and
crop), so maps, masks and perturbations all live on the model's own view, whatever its shape.

- **Pointing game**: the map's hottest pixel (map upsampled bilinearly to the view) lies in the mask
  (strict), and, as reported alongside, within 15 px of it at HAM10000's original 600x450 pixels
  (the usual tolerance of Zhang et al. 2018, "Top-down neural attention by excitation backprop";
  the tolerant figure is never reported alone). Each row keeps the peak's distance to the mask.
- **Mass in lesion**: the share of the map's total inside the mask, against the mask's share of the
  view (a map blind to the lesion scores its area share; the ratio of the two means is reported).
- **Deletion / insertion** (Petsiuk et al. 2018): the view's pixels ranked by the map; the top
  0-50 % replaced by the blurred view (deletion) or, from the blurred view, restored (insertion);
  the explained class's calibrated probability at each step; AUC = mean probability over 0-50 %.
- **Top-20 % vs random-20 % drop**: the probability lost when the map's top 20 % is blurred,
  against a random smooth 20 % (uniform noise on the stride-32 grid, upsampled: blobs, not pixels).
- **Sanity** (Adebayo et al. 2018): the maps of a copy whose stride-32 stages, head conv and
  classifier are re-initialized at random; Spearman correlation with the trained model's maps
  (a map that barely changes shows the input, not what the model learned).
- **Cost**: the map's time over a one-image prediction's (normalize, forward, calibration), both
  timed one after the other in this process; the median of per-image ratios.

The explained class is the one the service names (the served decision rule).
"""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from handler.architectures import forward_features
from handler.checkpoint import LoadedModel
from handler.decision import decide
from handler.gradcam import gradcam_from_features, normalize_maps
from handler.labels import CLASS_CODES, class_index
from handler.layercam import layercam_fused
from handler.preprocessing import FULL_VIEW, load_model_input, normalize_batch, resize_to_model_input
from lab.rise import gaussian_blur, rise
from handler.stages import members, trunk_stages

MASK_THRESHOLD = 128
# HAM10000's dermatoscope images (height, width): the data folders are downscaled copies of them.
ORIGINAL_SIZE = (450, 600)
POINTING_TOLERANCE_PX = 15
TOP_FRACTION = 0.2
RANDOM_DRAWS = 2
# A map explains one image: (loaded model, normalized (1, 3, H, W) view, (1,) target) -> (h, w) map in [0, 1].
Method = Callable[[LoadedModel, torch.Tensor, torch.Tensor], torch.Tensor]


def served_gradcam(loaded: LoadedModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The served map: closed-form Grad-CAM of the last stage (stride 32)."""
    return normalize_maps(gradcam_from_features(loaded.model, forward_features(loaded.model, inputs), targets))[0]


def fused_layercam(loaded: LoadedModel, inputs: torch.Tensor, targets: torch.Tensor, coarse_power: float = 1.0
                   ) -> torch.Tensor:
    """LayerCAM at stride 16 times the stride-32 Grad-CAM to ``coarse_power`` (:mod:`handler.layercam`)."""
    return layercam_fused(loaded.model, inputs, targets, coarse_power=coarse_power)[0]


def feature_rise(loaded: LoadedModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RISE at stride 16 on calibrated probabilities, blur baseline (:mod:`lab.rise`)."""
    return rise(loaded.model, inputs, targets, loaded.calibration().apply)[0]


METHODS: dict[str, Method] = {
    "grad-cam": served_gradcam,
    "layercam-s16 x grad-cam": fused_layercam,
    "layercam-s16 x grad-cam^2": partial(fused_layercam, coarse_power=2.0),
    "layercam-s16 x grad-cam^3": partial(fused_layercam, coarse_power=3.0),
    "rise-s16": feature_rise,
}


@dataclass(frozen=True)
class Lesion:
    """One validation image with its lesion mask."""

    image_id: str
    dx: str
    image: Path
    mask: Path


def _with_masks(data_dir: Path, rows: Sequence[dict]) -> list[Lesion]:
    lesions = [Lesion(row["image_id"], row["dx"], data_dir / "images" / f"{row['image_id']}.jpg",
                      data_dir / "masks" / f"{row['image_id']}.png") for row in rows]
    return [lesion for lesion in lesions if lesion.image.exists() and lesion.mask.exists()]


def _metadata(data_dir: Path) -> list[dict]:
    with open(data_dir / "metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def validation_lesions(split_json: str | Path, data_dir: str | Path) -> list[Lesion]:
    """The split's image ids that have an image and a mask in ``data_dir`` (images/, masks/, metadata.csv)."""
    data_dir = Path(data_dir)
    ids = json.loads(Path(split_json).read_text())["val_image_ids"]
    by_id = {row["image_id"]: row for row in _metadata(data_dir)}
    return _with_masks(data_dir, [by_id[i] for i in ids if i in by_id])


def development_lesions(split_json: str | Path, data_dir: str | Path) -> list[Lesion]:
    """Training images with a mask, none of a lesion that also has a validation image: where a map's
    design may be tuned without touching the validation lesions that judge it."""
    data_dir = Path(data_dir)
    held_out = set(json.loads(Path(split_json).read_text())["val_image_ids"])
    rows = _metadata(data_dir)
    held_out_lesions = {row["lesion_id"] for row in rows if row["image_id"] in held_out}
    return _with_masks(data_dir, [row for row in rows if row["image_id"] not in held_out
                                  and row.get("lesion_id") not in held_out_lesions])


def stratified_subset(lesions: Sequence[Lesion], count: int | None, seed: int = 0) -> list[Lesion]:
    """``count`` lesions in the classes' proportions (at least 2 per class where it has them); all if None."""
    if count is None or count >= len(lesions):
        return list(lesions)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Lesion]] = {}
    for lesion in lesions:
        by_class.setdefault(lesion.dx, []).append(lesion)
    chosen = []
    for dx in sorted(by_class):
        pool = by_class[dx]
        take = min(len(pool), max(2, round(count * len(pool) / len(lesions))))
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
    return chosen


def model_view(lesion: Lesion, loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The served uint8 input (3, H, W) and the lesion mask (H, W, bool) on the same view."""
    view, _ = load_model_input(lesion.image.read_bytes(), loaded.preprocess)
    with Image.open(lesion.mask) as mask:
        mask_view = resize_to_model_input(mask.convert("L").convert("RGB"), loaded.preprocess)
    mask_array = torch.from_numpy(np.asarray(mask_view)[..., 0] >= MASK_THRESHOLD)
    if mask_array.shape != view.shape[1:]:
        raise ValueError(f"mask view {tuple(mask_array.shape)} differs from the image view {tuple(view.shape[1:])}")
    return view, mask_array


def original_pixel_size(preprocess, view_shape: tuple[int, int]) -> tuple[float, float]:
    """(rows, columns): how many of the original image's pixels one view pixel spans."""
    height, width = view_shape
    if preprocess.resize_mode == FULL_VIEW:
        return ORIGINAL_SIZE[0] / height, ORIGINAL_SIZE[1] / width
    scale = min(ORIGINAL_SIZE) / preprocess.resize_size  # shorter side resized, then cropped
    return scale, scale


def distance_to_mask(mask: torch.Tensor, pixel_size: tuple[float, float]) -> torch.Tensor:
    """Each view pixel's distance to the lesion mask, in original pixels (0 inside)."""
    from scipy.ndimage import distance_transform_edt

    if not bool(mask.any()):
        return torch.full(mask.shape, float("inf"))
    return torch.from_numpy(distance_transform_edt(~mask.numpy(), sampling=pixel_size)).float()


def upsample(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (h, w) map bilinearly resized to the view (H, W), as the overlay stretches it."""
    return F.interpolate(heatmap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def top_masks(heatmap: torch.Tensor, fractions: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """(F, H, W) masks of each fraction's highest-ranked pixels (ties broken at random)."""
    flat = heatmap.flatten().double()
    jitter = torch.rand(flat.shape, generator=generator, dtype=torch.float64) * 1e-9
    order = torch.argsort(flat + jitter, descending=True)
    masks = torch.zeros(len(fractions), flat.numel())
    for index, fraction in enumerate(fractions):
        masks[index, order[: round(fraction * flat.numel())]] = 1.0
    return masks.view(len(fractions), *heatmap.shape)


def random_map(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A random smooth map: uniform noise on the stride-32 grid, upsampled to the view."""
    grid = torch.rand(-(-size[0] // 32), -(-size[1] // 32), generator=generator)
    return upsample(grid, size)


def folded_copy(model: nn.Module, tolerance: float = 1e-4) -> nn.Module:
    """An eval copy of ``model`` with each batch norm folded into the convolution that feeds it.

    The perturbed views (deletion/insertion steps, random 20 %) are most of the benchmark's forward
    passes, and on a CPU the unfused batch norms are about a fifth of each. Both families register
    each convolution right before its norm (timm: ``conv_pw, bn1``; torchvision: ``Conv2dNormActivation``),
    which is the pairing used here; timm's norm-with-activation keeps its activation. The copy is
    checked against the model on a random batch.

    Raises:
        ValueError: The copy's logits differ from the model's by more than ``tolerance``.
    """
    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats \
                    and norm.affine:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                after = [module for module in (getattr(norm, "drop", None), getattr(norm, "act", None)) if module is not None]
                setattr(parent, norm_name, nn.Sequential(*after) if after else nn.Identity())
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        gap = float((folded(probe) - model(probe)).abs().max())
    if gap > tolerance:
        raise ValueError(f"batch-norm folding changed the logits by {gap:.2e} (> {tolerance:g})")
    return folded


def class_probability(loaded: LoadedModel, inputs: torch.Tensor, target: int, batch: int = 16,
                      model: nn.Module | None = None) -> torch.Tensor:
    """Calibrated probability of ``target`` for each image of a normalized batch (``model``: an
    equivalent network to run instead, e.g. :func:`folded_copy`)."""
    calibration = loaded.calibration()
    network = loaded.model if model is None else model
    out = [calibration.apply(network(inputs[start:start + batch]).float())[:, target]
           for start in range(0, len(inputs), batch)]
    return torch.cat(out)


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Mean of a curve over its fraction range (trapezoid rule, divided by the range)."""
    values, fractions = np.asarray(values, float), np.asarray(fractions, float)
    return float(((values[1:] + values[:-1]) / 2 * np.diff(fractions)).sum() / (fractions[-1] - fractions[0]))


def score_lesion(loaded: LoadedModel, lesion: Lesion, methods: dict[str, Method], fractions: Sequence[float],
                 decision_rule: str, seed: int, perturbed_model: nn.Module | None = None) -> dict:
    """Every method's scores on one lesion (see the module docstring).

    ``perturbed_model``: an equivalent network (:func:`folded_copy`) to run the perturbed views on;
    the prediction and the maps always use the served ``loaded.model``, so that costs are the service's.
    """
    generator = torch.Generator().manual_seed(seed)
    view, mask = model_view(lesion, loaded)
    size = tuple(view.shape[1:])
    inputs = normalize_batch(view[None], loaded.preprocess)
    started = time.perf_counter()
    probabilities = loaded.calibration().apply(loaded.model(inputs).float())
    predict_s = time.perf_counter() - started
    calibration = loaded.calibration()
    target = int(decide(probabilities, decision_rule, calibration.class_prior)[0])
    targets = torch.tensor([target])
    blurred = gaussian_blur(inputs)
    mask_f = mask.float()
    distance = distance_to_mask(mask, original_pixel_size(loaded.preprocess, size)).flatten()
    result = {"image_id": lesion.image_id, "dx": lesion.dx, "target": CLASS_CODES[target],
              "area_share": float(mask_f.mean()), "predict_s": predict_s, "methods": {}}

    # The unperturbed view's probability is the prediction's: only perturbed views are run again.
    batch, spans = [blurred], {}
    for draw in range(RANDOM_DRAWS):
        keep = 1.0 - top_masks(random_map(size, generator), [TOP_FRACTION], generator)
        batch.append(blurred + keep[:, None] * (inputs - blurred))
    spans["random"] = (1, 1 + RANDOM_DRAWS)
    maps = {}
    for name, method in methods.items():
        started = time.perf_counter()
        heatmap = method(loaded, normalize_batch(view[None], loaded.preprocess), targets)
        elapsed = time.perf_counter() - started
        maps[name] = heatmap
        dense = upsample(heatmap, size)
        peak = int(torch.argmax(dense + torch.rand(dense.shape, generator=generator) * 1e-9))
        total = float(dense.clamp(min=0).sum())
        result["methods"][name] = {
            "pointing": bool(mask.flatten()[peak]),
            "peak_distance_px": float(distance[peak]),
            "pointing_tolerant": bool(distance[peak] <= POINTING_TOLERANCE_PX),
            "mass_in_lesion": float((dense.clamp(min=0) * mask_f).sum() / total) if total > 0 else float("nan"),
            "cost_ratio": elapsed / predict_s, "map_shape": list(heatmap.shape)}
        removed = top_masks(dense, fractions, generator)[:, None]
        start = sum(len(views) for views in batch)  # in images: each entry of batch holds several
        batch.append(inputs + removed * (blurred - inputs))     # deletion: top pixels blurred
        batch.append(blurred + removed * (inputs - blurred))    # insertion: top pixels restored
        spans[name] = (start, start + 2 * len(fractions))
    probs = class_probability(loaded, torch.cat(batch).contiguous(memory_format=torch.channels_last), target,
                              model=perturbed_model)
    original, base = float(probabilities[0, target]), float(probs[0])
    random_drop = float(original - probs[spans["random"][0]:spans["random"][1]].mean())
    result.update(original=original, blurred=base, random_drop=random_drop)
    count = len(fractions)
    top_index = [round(f, 6) for f in fractions].index(TOP_FRACTION)
    for name in methods:
        start, _ = spans[name]
        deletion = [original] + probs[start:start + count].tolist()
        insertion = [base] + probs[start + count:start + 2 * count].tolist()
        axis = [0.0, *fractions]
        result["methods"][name].update(deletion=deletion, insertion=insertion, deletion_auc=auc(axis, deletion),
                                       insertion_auc=auc(axis, insertion),
                                       top_drop=original - deletion[1 + top_index])
    result["maps"] = maps
    return result


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy whose stride-32 stages, head conv and classifier are re-initialized (Adebayo's cascade, top)."""
    torch.manual_seed(seed)
    copied = copy.deepcopy(model)
    for member in members(copied):
        layers = [*trunk_stages(member)[6:], *(m for m in member.modules() if isinstance(m, nn.Linear))]
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
    return copied.eval()


def spearman(first: torch.Tensor, second: torch.Tensor) -> float:
    """Rank correlation of two maps of one shape (0 when either is constant)."""
    from scipy.stats import spearmanr

    a, b = first.detach().flatten().numpy(), second.detach().flatten().numpy()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def sanity_scores(loaded: LoadedModel, scored: Sequence[dict], lesions: dict[str, Lesion],
                  methods: dict[str, Method]) -> dict[str, list[float]]:
    """Per method, each lesion's Spearman correlation between trained and randomized maps."""
    shuffled = copy.copy(loaded)
    shuffled.model = randomized_copy(loaded.model)
    rho: dict[str, list[float]] = {name: [] for name in methods}
    for row in scored:
        view, _ = model_view(lesions[row["image_id"]], loaded)
        inputs = normalize_batch(view[None], loaded.preprocess)
        targets = torch.tensor([class_index(row["target"])])
        for name, method in methods.items():
            rho[name].append(spearman(row["maps"][name], method(shuffled, inputs, targets)))
    return rho


def bootstrap(values: Sequence[np.ndarray], statistic: Callable[..., float], resamples: int, seed: int = 0
              ) -> tuple[float, float, float]:
    """The statistic and its 95 % percentile interval, lesions resampled with replacement."""
    arrays = [np.asarray(v, dtype=float) for v in values]
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    draws = [statistic(*(a[idx] for a in arrays)) for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(statistic(*arrays)), float(low), float(high)


def summarize(scored: Sequence[dict], sanity: dict[str, list[float]], methods: Sequence[str], resamples: int) -> dict:
    """Per method: each figure with its 95 % interval, plus the mean curves."""
    area = np.array([row["area_share"] for row in scored])
    random_drop = np.array([row["random_drop"] for row in scored])
    summary = {}
    for name in methods:
        rows = [row["methods"][name] for row in scored]
        get = lambda key: np.array([r[key] for r in rows], dtype=float)  # noqa: E731
        top = get("top_drop")
        figures = {
            "pointing_game": bootstrap([get("pointing")], np.mean, resamples),
            "pointing_game_tolerant": bootstrap([get("pointing_tolerant")], np.mean, resamples),
            "mass_in_lesion": bootstrap([get("mass_in_lesion")], np.nanmean, resamples),
            "area_share": bootstrap([area], np.mean, resamples),
            "mass_over_area": bootstrap([get("mass_in_lesion"), area], lambda m, a: np.nanmean(m) / np.mean(a), resamples),
            "deletion_auc": bootstrap([get("deletion_auc")], np.mean, resamples),
            "insertion_auc": bootstrap([get("insertion_auc")], np.mean, resamples),
            "top20_drop_median": bootstrap([top], np.median, resamples),
            "random20_drop_median": bootstrap([random_drop], np.median, resamples),
            "top_over_random_ratio_of_medians": bootstrap(
                [top, random_drop], lambda t, r: np.median(t) / max(np.median(r), 1e-6), resamples),
            "top_over_random_median_ratio": bootstrap(
                [top, random_drop], lambda t, r: np.median(t / np.maximum(r, 0.01)), resamples),
            "cost_ratio_median": bootstrap([get("cost_ratio")], np.median, resamples),
        }
        if sanity.get(name):
            figures["sanity_spearman_median"] = bootstrap([np.array(sanity[name])], np.median, resamples)
        summary[name] = {
            "figures": figures,
            "mean_deletion": np.mean([r["deletion"] for r in rows], axis=0).tolist(),
            "mean_insertion": np.mean([r["insertion"] for r in rows], axis=0).tolist(),
            "map_shape": rows[0]["map_shape"],
        }
    return summary


COLUMNS = [("pointing_game", "pointing game"),
           ("pointing_game_tolerant", f"pointing game, {POINTING_TOLERANCE_PX} px tolerance at {ORIGINAL_SIZE[1]}x{ORIGINAL_SIZE[0]}"),
           ("mass_in_lesion", "mass in lesion"),
           ("mass_over_area", "mass / area share"), ("deletion_auc", "deletion AUC (lower better)"),
           ("insertion_auc", "insertion AUC"), ("top20_drop_median", "top-20 % drop (median)"),
           ("top_over_random_ratio_of_medians", "top / random 20 % (ratio of medians)"),
           ("top_over_random_median_ratio", "top / random (median of ratios)"),
           ("sanity_spearman_median", "sanity: Spearman vs randomized (median)"),
           ("cost_ratio_median", "cost / prediction")]


def markdown_table(summary: dict) -> str:
    """One row per method, each figure with its 95 % interval."""
    lines = ["| method | map | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for name, entry in summary.items():
        cells = []
        for key, _ in COLUMNS:
            if key not in entry["figures"]:
                cells.append("-")
                continue
            value, low, high = entry["figures"][key]
            cells.append(f"{value:.3f} ({low:.3f}-{high:.3f})")
        lines.append(f"| {name} | {'x'.join(map(str, entry['map_shape']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(summary: dict, fractions: Sequence[float], path: str | Path) -> None:
    """Mean deletion and insertion curves of every method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = [0.0, *fractions]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in summary.items():
        left.plot(axis, entry["mean_deletion"], marker="o", label=name)
        right.plot(axis, entry["mean_insertion"], marker="o", label=name)
    for ax, title in ((left, "deletion: top of the map blurred"), (right, "insertion: top of the map restored")):
        ax.set_xlabel("fraction of the model's view")
        ax.set_ylabel("calibrated probability of the explained class")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_benchmark(loaded: LoadedModel, lesions: Sequence[Lesion], methods: dict[str, Method], fractions: Sequence[float],
                  decision_rule: str, out: str | Path, sanity_count: int = 30, resamples: int = 1000,
                  log: Callable[[str], None] = print, lesion_set: str = "validation") -> dict:
    """Score every method on every lesion; write report.json, report.md and curves.png into ``out``.

    Returns:
        The report: settings, per-method figures with 95 % intervals, and per-lesion rows.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scored = []
    perturbed_model = folded_copy(loaded.model)
    with torch.inference_mode():
        for number, lesion in enumerate(lesions):
            scored.append(score_lesion(loaded, lesion, methods, fractions, decision_rule, seed=number,
                                       perturbed_model=perturbed_model))
            if (number + 1) % 10 == 0 or number + 1 == len(lesions):
                log(f"{number + 1}/{len(lesions)} lesions scored ({time.perf_counter() - started:.0f} s)")
    # Outside inference mode: a copy made inside it would hold inference tensors, which LayerCAM's
    # backward pass cannot use.
    by_id = {lesion.image_id: lesion for lesion in lesions}
    sanity = sanity_scores(loaded, scored[:sanity_count], by_id, methods) if sanity_count else {}
    summary = summarize(scored, sanity, list(methods), resamples)
    report = {
        "checkpoint_version": loaded.version,
        "model_input": list(normalize_batch(model_view(lesions[0], loaded)[0][None], loaded.preprocess).shape[-2:]),
        "lesion_set": lesion_set, "lesions": len(scored), "classes": {dx: sum(r["dx"] == dx for r in scored) for dx in sorted({r["dx"] for r in scored})},
        "fractions": [0.0, *fractions], "top_fraction": TOP_FRACTION, "sanity_lesions": min(sanity_count, len(scored)),
        "resamples": resamples, "seconds": round(time.perf_counter() - started, 1),
        "methods": summary,
        "rows": [{k: v for k, v in row.items() if k != "maps"} for row in scored],
    }
    table = markdown_table(summary)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(
        f"# Explanation benchmark: checkpoint {loaded.version}, {len(scored)} {lesion_set} lesions, model input "
        f"{report['model_input'][0]}x{report['model_input'][1]}\n\n95 % bootstrap intervals ({resamples} resamples of "
        f"the lesions). Mean lesion area share of the view: {np.mean([r['area_share'] for r in scored]):.3f}. "
        f"Deletion/insertion curves: {len(fractions)} steps of the view ({', '.join(f'{f:.0%}' for f in fractions)}) "
        f"after the unperturbed 0 %, AUC by the trapezoid rule over 0-{fractions[-1]:.0%}.\n\n"
        f"{table}\n\n![curves](curves.png)\n")
    plot_curves(summary, fractions, out / "curves.png")
    return report
