"""LayerCAM at output stride 16, fused with the last stage's Grad-CAM: a map twice as fine.

LayerCAM (Jiang et al., IEEE TIP 2021) weights each activation by its own positive gradient,
``ReLU(sum_k ReLU(dy_c/dA_k[i, j]) * A_k[i, j])``, which stays sharp at early stages where
Grad-CAM's spatially averaged weights blur. The gradient is exact and needs autograd only over the
stages after the map (:mod:`handler.stages`); the earlier stages run without a graph. Fused with
the stride-32 Grad-CAM by an elementwise product of both maps scaled to peak 1: where the class
evidence is (coarse) and which structures inside it carry it (fine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from handler.architectures import forward_features
from handler.gradcam import gradcam_from_features, normalize_maps
from handler.stages import AFTER_LAST_STRIDE_16, logits_from, run_until


def layercam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, stage: int = AFTER_LAST_STRIDE_16
             ) -> torch.Tensor:
    """Raw LayerCAM maps (N, h, w) of the trunk after ``stage``, summed over an ensemble's members.

    Args:
        model: The classifier (a single network or a :class:`handler.architectures.LogitAverage`).
        inputs: Normalized (N, 3, H, W) batch.
        targets: (N,) class index to explain for each image.
        stage: Index into :func:`handler.stages.trunk_stages` after which the map is taken.
    """
    # Works under torch.inference_mode too: the graph is built from fresh leaves outside it.
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            partial = [hidden.clone() for hidden in run_until(model, inputs.clone(), stage)]
        leaves = [hidden.requires_grad_(True) for hidden in partial]
        logits = logits_from(model, leaves, stage)
        score = logits.gather(1, targets.clone().view(-1, 1).to(logits.device)).sum()
        grads = torch.autograd.grad(score, leaves)
    maps = sum((torch.relu(grad) * leaf.detach()).sum(dim=1) for grad, leaf in zip(grads, leaves))
    return torch.relu(maps).detach()


def layercam_fused(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   features: torch.Tensor | None = None, coarse_power: float = 1.0) -> torch.Tensor:
    """LayerCAM at stride 16 times the stride-32 Grad-CAM upsampled to it (raised to ``coarse_power``), each scaled to peak 1 first.

    Args:
        model: The classifier.
        inputs: Normalized (N, 3, H, W) batch.
        targets: (N,) class index to explain for each image.
        features: The inputs' last feature maps when the caller already has them (the service does,
            from the forward pass that predicted), so that the Grad-CAM half costs no second forward pass.
        coarse_power: Exponent of the Grad-CAM factor. Above 1 it confines the fine map more tightly to
            the coarse map's peak region, where the class evidence is; LayerCAM alone also lights
            lesion borders and hair, which spreads mass outside the lesion.
    """
    fine = normalize_maps(layercam(model, inputs, targets))
    with torch.no_grad():
        if features is None:
            features = forward_features(model, inputs)
        coarse = normalize_maps(gradcam_from_features(model, features, targets.to(inputs.device)))
    coarse = F.interpolate(coarse[:, None], size=fine.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(fine * coarse.clamp(min=0) ** coarse_power)
