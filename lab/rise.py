"""RISE at output stride 16 with a blur baseline: a map measured by perturbing the model's own view.

RISE (Petsiuk et al., BMVC 2018) keeps random smooth parts of the image, replaces the rest with a
baseline, and credits each location with how much the class probability rises when it is kept:
``S = sum_i (p_i - mean p) * m_i / sum_i m_i``. The map therefore answers, by construction, the
question the deletion test asks ("does removing this region lower the probability?"), with the
same baseline: the image under a strong Gaussian blur (:func:`gaussian_blur`), which removes
structure but keeps colour, so the model sees no sharp-edged holes it never met in training.

Here the masks are applied at output stride 16 rather than to pixels, to the feature maps of the
image and of its blurred copy (:mod:`handler.stages`): the stages before that (three quarters of a
forward pass on a CPU) run once for both, and each mask costs only the stages after it. The mixed
map equals the stride-16 map of an image blurred outside the mask up to the early stages' receptive
fields, which overlap the mask's soft edges; the benchmark (``make evaluate-explanations``) checks
the resulting maps against true pixel deletion.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from handler.gradcam import normalize_maps
from handler.stages import AFTER_FIRST_STRIDE_16, logits_from, run_until

BLUR_SIGMA_FRACTION = 1 / 20  # of the input's longer side: 11 px at 224, 10 px at 150x200
MASKS = 64
MASK_CELL = 3  # stride-16 cells per random-grid cell: 48 input pixels
KEEP_PROBABILITY = 0.5
MASK_SEED = 20180702  # fixed, so that the same image always gets the same map
MASK_BATCH = 32


def gaussian_blur(images: torch.Tensor, sigma_fraction: float = BLUR_SIGMA_FRACTION) -> torch.Tensor:
    """Each image of a float (N, C, H, W) batch under a Gaussian blur of ``sigma_fraction * max(H, W)``.

    Separable, reflect-padded, on the batch's device. Blur is linear with unit gain, so blurring
    normalized inputs equals normalizing blurred pixels.
    """
    height, width = images.shape[-2:]
    sigma = sigma_fraction * max(height, width)
    radius = max(1, min(math.ceil(3 * sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect").to(images.dtype)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


@functools.lru_cache(maxsize=8)
def random_masks(count: int, height: int, width: int, cell: int = MASK_CELL, keep: float = KEEP_PROBABILITY,
                 seed: int = MASK_SEED) -> torch.Tensor:
    """RISE's smooth random masks (count, height, width) in [0, 1]: a coarse random grid of kept
    cells, bilinearly upsampled and shifted by a random fraction of a cell."""
    generator = torch.Generator().manual_seed(seed)
    grid_h, grid_w = math.ceil(height / cell) + 1, math.ceil(width / cell) + 1
    grid = (torch.rand(count, 1, grid_h, grid_w, generator=generator) < keep).float()
    smooth = F.interpolate(grid, size=(grid_h * cell, grid_w * cell), mode="bilinear", align_corners=False)[:, 0]
    shifts = torch.randint(0, cell, (count, 2), generator=generator)
    return torch.stack([smooth[i, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(shifts.tolist())])


def rise(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
         to_probabilities: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits.softmax(dim=1),
         masks: int = MASKS, stage: int = AFTER_FIRST_STRIDE_16) -> torch.Tensor:
    """RISE maps (N, h, w) at the resolution of the trunk after ``stage``, scaled to peak 1 (zero
    where keeping no region raises the class's probability).

    Args:
        model: The classifier (a single network or a :class:`handler.architectures.LogitAverage`).
        inputs: Normalized (N, 3, H, W) batch.
        targets: (N,) class index to explain for each image.
        to_probabilities: Logits -> probabilities; the service passes its calibration.
        masks: Random masks per image, run in batches of :data:`MASK_BATCH`.
        stage: Index into :func:`handler.stages.trunk_stages` at which the masks mix image and blur.
    """
    maps = []
    with torch.no_grad():
        for image, target in zip(inputs, targets.tolist()):
            pair = torch.stack([image, gaussian_blur(image[None])[0]]).contiguous(memory_format=torch.channels_last)
            partial = run_until(model, pair, stage)
            height, width = partial[0].shape[-2:]
            kept = random_masks(masks, height, width).to(inputs.device)
            probabilities = []
            for start in range(0, masks, MASK_BATCH):
                chunk = kept[start:start + MASK_BATCH, None]
                mixed = [hidden[1:2] + chunk.to(hidden.dtype) * (hidden[0:1] - hidden[1:2]) for hidden in partial]
                probabilities.append(to_probabilities(logits_from(model, mixed, stage).float())[:, target])
            scores = torch.cat(probabilities)
            saliency = torch.einsum("n,nhw->hw", scores - scores.mean(), kept) / kept.sum(dim=0).clamp(min=1e-6)
            maps.append(torch.relu(saliency))
    return normalize_maps(torch.stack(maps))
