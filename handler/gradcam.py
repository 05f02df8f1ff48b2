"""Batched Grad-CAM on the last convolutional stage, computed in closed form.

Both architectures end in ``features A (N, C, h, w) -> global average pool -> linear W``,
so the logit of class c is ``y_c = sum_k W[c, k] * mean_ij A[k, i, j] + b_c`` and its
gradient is ``dy_c / dA[k, i, j] = W[c, k] / (h * w)`` everywhere. Grad-CAM's channel
weights (the spatial mean of that gradient) are therefore ``W[c, k] / (h * w)``, and

    Grad-CAM_c = ReLU(sum_k W[c, k] / (h * w) * A[k])

exactly, with no backward pass, no hooks and no autograd state: the explanation of a
batch costs the one forward pass that also yields its predictions. The tests check this
against autograd and against the independent ``grad-cam`` package. A logit-averaging
ensemble (:class:`handler.architectures.LogitAverage`) has the same form over its concatenated features.
"""

from __future__ import annotations

import torch
from torch import nn

from handler.architectures import head_weight


def gradcam_from_features(model: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps for a batch, at the feature map's resolution.

    Args:
        model: The classifier whose last stage produced ``features``.
        features: (N, C, h, w) output of :func:`handler.architectures.forward_features`.
        targets: (N,) class index to explain for each image.

    Returns:
        (N, h, w) float32 maps, ReLU applied, not normalized (the raw Grad-CAM).
    """
    weight = head_weight(model)  # (K, C)
    channel_weights = weight[targets].float() / (features.shape[2] * features.shape[3])  # (N, C)
    cams = torch.einsum("nc,nchw->nhw", channel_weights, features.float())
    return torch.relu(cams)


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] by its maximum; an all-zero map stays zero."""
    peak = cams.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
    return cams / peak
