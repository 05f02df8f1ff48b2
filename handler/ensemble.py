"""An ensemble of classifiers that share one input, served as a single network.

Averaging the members' logits keeps the ensemble in the same family as its members:
each member ends in ``features -> global average pool -> linear``, so the average is
``concatenated features -> global average pool -> [W_1 ... W_M] / M``. Everything that
relies on that structure (the closed-form Grad-CAM, the one-pass features-and-logits
runtime, calibration on logits) therefore works on the ensemble unchanged and exactly.
Averaging logits or log-probabilities gives the same softmax: per image they differ by a
constant.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from handler.model import CHECKPOINT_FORMAT, ENSEMBLE_ARCH, forward_features, forward_head, head_weight
from handler.preprocessing import PreprocessConfig
from handler.storage import pack_state_dict, unpack_state_dict


class LogitAverage(nn.Module):
    """Members applied to the same input, their logits averaged.

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
        # find a single network's (handler.model.feature_layer).
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


def recorded_split(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``meta["data"]`` that define a training/validation split.

    Descriptive fields that later versions of ``train.py`` add (such as class counts) are
    left out, so members trained by different script versions on one split still match.
    """
    data = checkpoint["meta"].get("data") or {}
    return {key: data.get(key) for key in ("metadata", "train_images", "val_images", "split")}


def combine_checkpoints(checkpoints: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                        storage: str = "float32") -> dict[str, Any]:
    """One release-format checkpoint holding the members' weights, for :class:`LogitAverage`.

    Args:
        checkpoints: Member checkpoints (``{"state_dict", "config", "meta"}``), single networks
            with the same classes and the same preprocessing.
        meta: The ensemble's metadata (version, provenance); its calibration is fitted
            afterwards on the ensemble's own logits (``scripts/calibrate.py``).
        storage: How the weights are stored (:data:`handler.storage.STORAGE_DTYPES`):
            ``float16`` halves the file, ``int8`` quarters the convolutions. Loading rebuilds
            fp32 parameters, and a calibration fitted afterwards measures exactly those weights.

    Returns:
        A checkpoint that :func:`handler.model.load_checkpoint` rebuilds as a :class:`LogitAverage`.

    Raises:
        ValueError: Fewer than two members, a member that is itself an ensemble, or
            members that differ in classes, preprocessing or training/validation split.
    """
    if len(checkpoints) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(checkpoints)}")
    check_compatible_members(checkpoints)
    first = checkpoints[0]
    preprocess = PreprocessConfig.from_dict(first["meta"]["preprocessing"])
    state_dict: dict[str, torch.Tensor] = {}
    members = []
    for index, checkpoint in enumerate(checkpoints):
        config = checkpoint["config"]
        members.append({"arch": config["arch"], "dropout": config.get("dropout", 0.2)})
        state_dict.update({f"members.{index}.{name}": tensor
                           for name, tensor in pack_state_dict(checkpoint["state_dict"], storage).items()})
    config = {"format": CHECKPOINT_FORMAT, "arch": ENSEMBLE_ARCH, "members": members,
              "num_classes": first["config"]["num_classes"], "classes": list(first["config"]["classes"])}
    return {"state_dict": state_dict, "config": config, "meta": {**meta, "preprocessing": preprocess.to_dict()}}


def check_compatible_members(checkpoints: Sequence[Mapping[str, Any]]) -> None:
    """Check that single-network checkpoints can be averaged and measured together.

    Raises:
        ValueError: A member that is itself an ensemble, or members that differ in classes,
            preprocessing or training/validation split.
    """
    first = checkpoints[0]
    preprocess = PreprocessConfig.from_dict(first["meta"]["preprocessing"])
    for index, checkpoint in enumerate(checkpoints):
        config = checkpoint["config"]
        if config["arch"] == ENSEMBLE_ARCH:
            raise ValueError(f"member {index} is itself an ensemble; list its members instead")
        if list(config["classes"]) != list(first["config"]["classes"]):
            raise ValueError(f"member {index} has classes {config['classes']}, member 0 {first['config']['classes']}")
        if PreprocessConfig.from_dict(checkpoint["meta"]["preprocessing"]) != preprocess:
            raise ValueError(f"member {index} was trained with other preprocessing than member 0: every member "
                             "must see the same input tensor")
        # The ensemble is calibrated and measured on the members' validation split, which is
        # only honest if no member trained on any of those images.
        if "data" not in checkpoint["meta"] or recorded_split(checkpoint) != recorded_split(first):
            raise ValueError(f"member {index} records data {checkpoint['meta'].get('data')}, member 0 "
                             f"{first['meta'].get('data')}: members must share one training/validation split")


def split_members(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The single-network checkpoints an ensemble checkpoint holds: the inverse of :func:`combine_checkpoints`.

    This lets a released ensemble grow or shrink without its members' original files. The
    weights are those the ensemble stored (float16 or int8 rounding included), back in fp32.

    Args:
        checkpoint: A release-format checkpoint whose arch is :data:`ENSEMBLE_ARCH`.

    Returns:
        One ``{"state_dict", "config", "meta"}`` per member, in order. Each ``meta`` is the
        provenance the ensemble recorded for that member (``data`` included, so the split
        check still applies) plus the ensemble's preprocessing.

    Raises:
        ValueError: If ``checkpoint`` is not an ensemble.
    """
    config = checkpoint["config"]
    if config["arch"] != ENSEMBLE_ARCH:
        raise ValueError(f"checkpoint is a single {config['arch']}, not an ensemble")
    state_dict = unpack_state_dict(checkpoint["state_dict"])
    members = []
    for index, member in enumerate(config["members"]):
        prefix = f"members.{index}."
        members.append({
            "state_dict": {name[len(prefix):]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)},
            "config": {"format": CHECKPOINT_FORMAT, "arch": member["arch"], "num_classes": config["num_classes"],
                       "classes": list(config["classes"]), "dropout": member.get("dropout", 0.2)},
            "meta": {**checkpoint["meta"]["members"][index], "preprocessing": checkpoint["meta"]["preprocessing"]},
        })
    return members
