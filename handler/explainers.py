"""Which map each request's ``explanation`` option gets, and the method named in its response.

``fast`` (the default) is the closed-form Grad-CAM of the last stage (:mod:`handler.gradcam`),
free with the forward pass that also predicts. ``faithful`` is LayerCAM at stride 16 times that
Grad-CAM squared (:mod:`handler.layercam`): twice as fine, and the method that met the explanation
benchmark's targets (``make evaluate-explanations``: localization inside the lesion masks and
deletion against random regions), for about two more predictions' worth of compute. Squaring the
coarse factor was chosen on development lesions (training lesions, none reported): it keeps the
fine map inside the region where the class evidence is, which lifted the map's mass in the lesion
above three times the lesion's area share. RISE, the
perturbation method measured beside it, scored worst at about seven times that cost and stays in
the lab (:mod:`lab.rise`).
"""

from __future__ import annotations

import torch

from handler.checkpoint import LoadedModel
from handler.gradcam import gradcam_from_features, normalize_maps
from handler.layercam import layercam_fused
from handler.preprocessing import normalize_batch

FAST = "fast"
FAITHFUL = "faithful"
EXPLANATIONS = (FAST, FAITHFUL)
METHOD_NAMES = {FAST: "grad-cam", FAITHFUL: "layercam-s16-x-grad-cam-squared"}
# The faithful map's Grad-CAM exponent (handler.layercam.layercam_fused's coarse_power).
FAITHFUL_COARSE_POWER = 2.0


def explanation_maps(loaded: LoadedModel, features: torch.Tensor, inputs: list[torch.Tensor], rows: list[int],
                     targets: list[int], kinds: list[str]) -> list[torch.Tensor]:
    """Each requested map, scaled to peak 1, on the CPU.

    Args:
        loaded: The served model.
        features: The batch's last feature maps (from the forward pass that predicted).
        inputs: The batch's uint8 model inputs, in the order of ``features``.
        rows: For each map, its image's row in ``features`` and ``inputs``.
        targets: For each map, the class to explain.
        kinds: For each map, one of :data:`EXPLANATIONS`.
    """
    maps: list[torch.Tensor | None] = [None] * len(rows)
    fast = [i for i, kind in enumerate(kinds) if kind == FAST]
    if fast:
        at = torch.tensor([rows[i] for i in fast], device=features.device)
        cams = normalize_maps(gradcam_from_features(loaded.model, features[at],
                                                    torch.tensor([targets[i] for i in fast], device=features.device)))
        for i, cam in zip(fast, cams.cpu()):
            maps[i] = cam
    faithful = [i for i, kind in enumerate(kinds) if kind == FAITHFUL]
    if faithful:
        device = next(loaded.model.parameters()).device
        batch = normalize_batch(torch.stack([inputs[rows[i]] for i in faithful]).to(device), loaded.preprocess)
        at = torch.tensor([rows[i] for i in faithful], device=features.device)
        found = layercam_fused(loaded.model, batch, torch.tensor([targets[i] for i in faithful], device=device),
                               features[at].to(device), coarse_power=FAITHFUL_COARSE_POWER)
        for i, found_map in zip(faithful, found.cpu()):
            maps[i] = found_map
    return maps  # type: ignore[return-value]
