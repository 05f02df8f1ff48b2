"""The checkpoint format's one owner: every read or write of a checkpoint goes through here.

A checkpoint file is a plain dict ``{"state_dict", "config", "meta"}`` that loads with
``torch.load(..., weights_only=True)``:

- ``state_dict``: the weights, stored as :mod:`handler.storage` packed them (fp32, fp16 or int8).
- ``config``: how to build the network (:func:`handler.architectures.build_from_config`): one
  architecture, or a logit-averaging ensemble listing its members' architectures.
- ``meta``: :class:`Meta`: the version, the preprocessing the weights expect, one calibration per
  test-time augmentation mode, the referral operating point measured for these weights, the
  out-of-distribution input gate, the training data split, the members of an ensemble, and
  provenance (commands, metrics, dates) kept as it was written.

In memory the file is a :class:`Checkpoint`; :func:`load_checkpoint` rebuilds its network as a
:class:`LoadedModel` for serving and evaluation.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from handler.architectures import ENSEMBLE_ARCH, build_from_config, features_and_logits
from handler.calibration import Calibration, check_tta_mode
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig
from handler.storage import pack_state_dict, unpack_state_dict

CHECKPOINT_FORMAT = 1
# The fields of meta["data"] that define a training/validation split: descriptive fields that
# later training scripts add (class counts) are left out, so members trained by different
# script versions on one split still match.
SPLIT_FIELDS = ("metadata", "train_images", "val_images", "split")


@dataclass(frozen=True)
class OperatingPoint:
    """The referral threshold measured for these weights, and how it was measured.

    Attributes:
        tta: The test-time augmentation mode it was measured with.
        referral_threshold: Malignant probability at or above which a response refers.
        target_melanoma_sensitivity: The sensitivity the threshold was chosen to keep.
        validation_out_of_fold: The figures measured at that threshold.
    """

    tta: str
    referral_threshold: float
    target_melanoma_sensitivity: float | None = None
    validation_out_of_fold: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OperatingPoint":
        return cls(str(values["tta"]), float(values["referral_threshold"]), values.get("target_melanoma_sensitivity"),
                   values.get("validation_out_of_fold"))


@dataclass
class Meta:
    """A checkpoint's metadata, typed.

    Attributes:
        preprocessing: What the weights expect as input (travels with the weights).
        version: The release version, or None before release.
        calibration: One calibration per TTA mode, fitted on the validation split.
        operating_point: The referral threshold measured for these weights.
        input_gate: The out-of-distribution gate (:mod:`handler.input_gate`), a dict of tensors
            and plain values, or None for a checkpoint that has none (it cannot be released).
        data: The training data and split the weights were trained on.
        members: An ensemble's per-member provenance, in member order.
        provenance: Everything else (commands, metrics, dates, sources), kept as written.
    """

    preprocessing: PreprocessConfig
    version: str | None = None
    calibration: dict[str, Calibration] = field(default_factory=dict)
    operating_point: OperatingPoint | None = None
    input_gate: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    members: list[dict[str, Any]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("preprocessing", "version", "calibration", "operating_point", "input_gate", "data", "members")

    def to_dict(self) -> dict[str, Any]:
        """Plain types and tensors, as stored."""
        values: dict[str, Any] = dict(self.provenance)
        values["preprocessing"] = self.preprocessing.to_dict()
        if self.version is not None:
            values["version"] = self.version
        if self.calibration:
            values["calibration"] = {tta: calibration.to_dict() for tta, calibration in self.calibration.items()}
        if self.operating_point is not None:
            values["operating_point"] = self.operating_point.to_dict()
        for name in ("input_gate", "data", "members"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Meta":
        """The typed form of a stored ``meta`` dict."""
        version = values.get("version")
        operating_point = values.get("operating_point")
        return cls(
            preprocessing=PreprocessConfig.from_dict(values["preprocessing"]),
            version=None if version is None else str(version),
            calibration={tta: Calibration.from_dict(fitted) for tta, fitted in (values.get("calibration") or {}).items()},
            operating_point=None if operating_point is None else OperatingPoint.from_dict(operating_point),
            input_gate=values.get("input_gate"),
            data=values.get("data"),
            members=values.get("members"),
            provenance={key: value for key, value in values.items() if key not in cls._TYPED},
        )

    def split(self) -> dict[str, Any]:
        """The fields of :attr:`data` that define the training/validation split (:data:`SPLIT_FIELDS`)."""
        data = self.data or {}
        return {key: data.get(key) for key in SPLIT_FIELDS}


@dataclass
class Checkpoint:
    """A checkpoint in memory: weights as stored, the network's config, typed metadata."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    meta: Meta

    @property
    def arch(self) -> str:
        """``config["arch"]``: an architecture name, or :data:`ENSEMBLE_ARCH`."""
        return str(self.config["arch"])

    @property
    def is_ensemble(self) -> bool:
        return self.arch == ENSEMBLE_ARCH

    def to_dict(self) -> dict[str, Any]:
        """The stored form: ``{"state_dict", "config", "meta"}`` of tensors and plain types."""
        return {"state_dict": self.state_dict, "config": self.config, "meta": self.meta.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Checkpoint":
        return cls(dict(values["state_dict"]), dict(values["config"]), Meta.from_dict(values["meta"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint file (parents created) atomically; returns its path.

        ``make calibrate`` and ``make fit-gate`` rewrite the release checkpoint in place: the new
        one is written to a temporary file in the same folder, flushed to disk, and renamed over
        the old one, so a crash at any point leaves either the old or the new file, never half.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_atomically(self.to_dict(), path)


def save_atomically(value: Any, path: Path) -> Path:
    """``torch.save(value, path)`` through a temporary file beside ``path`` and ``os.replace``."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(staging, "wb") as handle:
            torch.save(value, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file safely (``weights_only=True``), without building its network."""
    return Checkpoint.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def make_checkpoint(model: nn.Module, arch: str, preprocess: PreprocessConfig, meta: Meta | None = None,
                    dropout: float = 0.2, **provenance: Any) -> Checkpoint:
    """A single network's checkpoint.

    Args:
        model: The trained network.
        arch: Its architecture name.
        preprocess: The preprocessing it was trained with (replaces ``meta.preprocessing``).
        meta: Metadata to start from; None starts empty.
        dropout: The head's dropout, needed to rebuild the same module.
        provenance: Extra provenance fields (command, metrics, dates...).
    """
    meta = dataclasses.replace(meta or Meta(preprocess), preprocessing=preprocess)
    meta.provenance = {**meta.provenance, **provenance}
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(state_dict, single_config(arch, dropout), meta)


def single_config(arch: str, dropout: float = 0.2) -> dict[str, Any]:
    """The ``config`` of one network of architecture ``arch``."""
    return {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": len(CLASS_CODES), "classes": list(CLASS_CODES),
            "dropout": dropout}


def combine_members(members: list[Checkpoint], meta: Meta, storage: str = "float32") -> Checkpoint:
    """One ensemble checkpoint holding single-network members' weights, for :class:`LogitAverage`.

    Args:
        members: Single-network checkpoints with the same classes and preprocessing
            (lab.ensembles checks they are compatible before calling this).
        meta: The ensemble's metadata; its preprocessing is the members'.
        storage: How the weights are stored (:data:`handler.storage.STORAGE_DTYPES`).

    Raises:
        ValueError: Fewer than two members, or a member that is itself an ensemble.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    if any(member.is_ensemble for member in members):
        raise ValueError("a member is itself an ensemble; list its members instead")
    state_dict: dict[str, torch.Tensor] = {}
    for index, member in enumerate(members):
        state_dict.update({f"members.{index}.{name}": tensor
                           for name, tensor in pack_state_dict(member.state_dict, storage).items()})
    first = members[0]
    config = {"format": CHECKPOINT_FORMAT, "arch": ENSEMBLE_ARCH,
              "members": [{"arch": m.arch, "dropout": m.config.get("dropout", 0.2)} for m in members],
              "num_classes": first.config["num_classes"], "classes": list(first.config["classes"])}
    return Checkpoint(state_dict, config, dataclasses.replace(meta, preprocessing=first.meta.preprocessing))


def split_members(checkpoint: Checkpoint) -> list[Checkpoint]:
    """The single-network checkpoints an ensemble holds: the inverse of :func:`combine_members`.

    The weights are those the ensemble stored (fp16 or int8 rounding included), back in fp32.
    Each member's meta is the provenance the ensemble recorded for it (``data`` included, so
    split checks still apply) plus the ensemble's preprocessing.

    Raises:
        ValueError: If ``checkpoint`` is not an ensemble.
    """
    if not checkpoint.is_ensemble:
        raise ValueError(f"checkpoint is a single {checkpoint.arch}, not an ensemble")
    state_dict = unpack_state_dict(checkpoint.state_dict)
    members = []
    for index, member in enumerate(checkpoint.config["members"]):
        prefix = f"members.{index}."
        recorded = {**(checkpoint.meta.members or [{}] * (index + 1))[index],
                    "preprocessing": checkpoint.meta.preprocessing.to_dict()}
        members.append(Checkpoint(
            {name[len(prefix):]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)},
            {**single_config(member["arch"], member.get("dropout", 0.2)), "num_classes": checkpoint.config["num_classes"],
             "classes": list(checkpoint.config["classes"])},
            Meta.from_dict(recorded)))
    return members


@dataclass
class LoadedModel:
    """A checkpoint's network rebuilt, in eval mode and channels-last, with its metadata."""

    model: nn.Module
    config: dict[str, Any]
    meta: Meta
    # Set by handler.runtime.build_runner for serving (TorchScript, autocast); None runs eager fp32.
    runner: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Set by handler.inference.prepare_for_serving from meta.input_gate.
    gate: Any = None

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.meta.preprocessing

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last feature map and the logits of a normalized batch, in one pass."""
        if self.runner is not None:
            return self.runner(inputs)
        return features_and_logits(self.model, inputs)

    def calibration(self, tta: str = "none") -> Calibration:
        """The calibration fitted for test-time augmentation ``tta``.

        Raises:
            ValueError: If the checkpoint has none for that mode: serving uncalibrated
                probabilities must be a visible choice, never a fallback.
        """
        if check_tta_mode(tta) not in self.meta.calibration:
            raise ValueError(f"checkpoint {self.version} has no calibration for TTA mode {tta!r} (it has "
                             f"{sorted(self.meta.calibration)}); run scripts/calibrate.py --tta {tta}")
        return self.meta.calibration[tta]

    @property
    def architecture(self) -> str:
        """The network's description, e.g. ``logit_average(efficientnet_lite0, efficientnet_lite2)``."""
        if self.config["arch"] == ENSEMBLE_ARCH:
            return f"{ENSEMBLE_ARCH}({', '.join(member['arch'] for member in self.config['members'])})"
        return str(self.config["arch"])

    @property
    def version(self) -> str:
        """The model version recorded at release time."""
        return self.meta.version or "unversioned"


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Read a checkpoint file safely and rebuild its network (see :func:`model_from_checkpoint`)."""
    return model_from_checkpoint(read_checkpoint(path), device, str(path))


def model_from_checkpoint(checkpoint: Checkpoint, device: torch.device | str = "cpu",
                          name: str = "checkpoint") -> LoadedModel:
    """Rebuild the network of a checkpoint already in memory.

    Raises:
        ValueError: If the checkpoint's classes are not this service's classes.
    """
    config = checkpoint.config
    if tuple(config["classes"]) != CLASS_CODES:
        raise ValueError(f"{name}: classes {config['classes']} differ from {list(CLASS_CODES)}")
    model = build_from_config(config)
    model.load_state_dict(unpack_state_dict(checkpoint.state_dict))
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return LoadedModel(model, config, checkpoint.meta)
