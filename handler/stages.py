"""A network's convolutional trunk as a list of stages, so that it can be run in two halves.

Both registered families are ``stem, stages 1..7, head conv`` (9 modules, applied in order,
giving :func:`handler.architectures.forward_features`); stage ``i`` of both leaves the image at
output stride 2, 2, 4, 8, 16, 16, 32, 32, 32 (stem first). Finer explanations need the map of an
earlier, higher-resolution stage (:mod:`handler.layercam`) or to perturb it (:mod:`lab.rise`):
:func:`run_until` computes the trunk up to a stage once, :func:`logits_from` finishes it, and
``logits_from(model, run_until(model, x, k), k)`` equals ``model(x)``. A logit-averaging ensemble
is run member by member; its members' maps have the same size, so they line up.
"""

from __future__ import annotations

import torch
import torchvision
from timm.models.efficientnet import EfficientNet as TimmEfficientNet
from torch import nn

from handler.architectures import LogitAverage, forward_head

# Index (into trunk_stages) just after the last stage at output stride 16 and after the first one:
# the finest maps whose channels already carry the classifier's kind of evidence.
AFTER_FIRST_STRIDE_16 = 5
AFTER_LAST_STRIDE_16 = 6


def trunk_stages(model: nn.Module) -> list[nn.Module]:
    """The 9 modules of a single network's trunk, applied in order: stem, stages 1..7, head conv.

    Raises:
        TypeError: A network of no registered family (or an ensemble: see :func:`members`).
    """
    if isinstance(model, TimmEfficientNet):
        return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
    if isinstance(model, torchvision.models.EfficientNet):
        return list(model.features)
    raise TypeError(f"no stage split for {type(model).__name__}")


def members(model: nn.Module) -> list[nn.Module]:
    """The networks whose logits the model averages: an ensemble's members, or the network itself."""
    return list(model.members) if isinstance(model, LogitAverage) else [model]


def run_until(model: nn.Module, inputs: torch.Tensor, stage: int) -> list[torch.Tensor]:
    """Each member's feature map after ``trunk_stages(member)[:stage]``."""
    outputs = []
    for member in members(model):
        hidden = inputs
        for module in trunk_stages(member)[:stage]:
            hidden = module(hidden)
        outputs.append(hidden)
    return outputs


def logits_from(model: nn.Module, partial: list[torch.Tensor], stage: int) -> torch.Tensor:
    """The model's logits from :func:`run_until` output (the members' logits averaged)."""
    logits = []
    for member, hidden in zip(members(model), partial):
        for module in trunk_stages(member)[stage:]:
            hidden = module(hidden)
        logits.append(forward_head(member, hidden))
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)
