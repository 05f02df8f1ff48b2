"""Building ensembles from trained networks: which networks files hold, which may be averaged, what each keeps.

The ensemble's format (config, weights layout, members' provenance) belongs to
:mod:`handler.checkpoint` (:func:`~handler.checkpoint.combine_members`,
:func:`~handler.checkpoint.split_members`); the network is :class:`handler.architectures.LogitAverage`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from handler.checkpoint import Checkpoint, read_checkpoint, split_members
from lab.provenance import checkpoint_provenance, file_sha256

RUN_FILE_STEMS = ("best", "last", "best_weights")  # train.py's file names say nothing; their folder does

# What each member's metadata keeps in the ensemble's: enough to trace and reproduce it.
MEMBER_PROVENANCE_KEYS = ("version", "command", "calibration_command", "initialization", "data", "best_epoch",
                          "trained_epochs", "validation", "torch", "created", "source")


def member_provenance(checkpoint: Checkpoint) -> dict[str, Any]:
    """The part of a member's metadata that the ensemble keeps (:data:`MEMBER_PROVENANCE_KEYS`)."""
    meta = checkpoint.meta.to_dict()
    return {key: meta[key] for key in MEMBER_PROVENANCE_KEYS if key in meta}


@dataclass(frozen=True)
class Network:
    """One single network that a checkpoint file holds, alone or as a member of an ensemble.

    Attributes:
        name: A short name: the file's stem (its run folder's name for ``train.py``'s files),
            with ``[index]`` for an ensemble's member.
        key: The file's SHA-256 prefix (with ``-index`` for a member), naming it in caches.
        source: Where it came from, for an ensemble's ``meta.members`` (:func:`checkpoint_provenance`;
            a member also names the source its ensemble recorded for it).
        checkpoint: Its single-network checkpoint.
    """

    name: str
    key: str
    source: str
    checkpoint: Checkpoint

    def member_record(self) -> dict[str, Any]:
        """What an ensemble built from this network records for it: ``source`` and :func:`member_provenance`."""
        return {"source": self.source,
                **{key: value for key, value in member_provenance(self.checkpoint).items() if key != "source"}}


def networks_in(paths: Sequence[str | os.PathLike]) -> list[Network]:
    """The single networks checkpoint files hold, in order; an ensemble contributes its members as it stored them."""
    networks = []
    for path in paths:
        digest = file_sha256(path)
        checkpoint = read_checkpoint(path)
        origin = checkpoint_provenance(path, checkpoint.meta, digest)
        stem = Path(path).parent.name if Path(path).stem in RUN_FILE_STEMS else Path(path).stem
        if checkpoint.is_ensemble:
            networks += [Network(f"{stem}[{index}]", f"{digest[:16]}-{index}",
                                 f"{member.meta.provenance.get('source')}; taken as stored from member {index} of {origin}",
                                 member)
                         for index, member in enumerate(split_members(checkpoint))]
        else:
            networks.append(Network(stem, digest[:16], origin, checkpoint))
    return networks


def renamed(networks: Sequence[Network], names: Sequence[str] | None) -> list[Network]:
    """``networks`` with the given names, one per network; None keeps their own.

    Raises:
        ValueError: If ``names`` does not name each network once.
    """
    if names is None:
        return list(networks)
    if len(names) != len(networks) or len(set(names)) != len(names):
        raise ValueError(f"need {len(networks)} distinct names, one per network "
                         f"({', '.join(network.name for network in networks)}), got {list(names)}")
    return [replace(network, name=name) for network, name in zip(networks, names)]


def check_compatible_members(checkpoints: Sequence[Checkpoint]) -> None:
    """Check that single-network checkpoints can be averaged and measured together.

    Raises:
        ValueError: Fewer than two, a member that is itself an ensemble, or members that differ in
            classes, preprocessing or training/validation split.
    """
    if len(checkpoints) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(checkpoints)}")
    first = checkpoints[0]
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint.is_ensemble:
            raise ValueError(f"member {index} is itself an ensemble; list its members instead")
        if list(checkpoint.config["classes"]) != list(first.config["classes"]):
            raise ValueError(f"member {index} has classes {checkpoint.config['classes']}, member 0 {first.config['classes']}")
        if checkpoint.meta.preprocessing != first.meta.preprocessing:
            raise ValueError(f"member {index} was trained with other preprocessing than member 0: every member "
                             "must see the same input tensor")
        # The ensemble is calibrated and measured on the members' validation split, which is
        # only honest if no member trained on any of those images.
        if checkpoint.meta.data is None or checkpoint.meta.split() != first.meta.split():
            raise ValueError(f"member {index} records data {checkpoint.meta.data}, member 0 "
                             f"{first.meta.data}: members must share one training/validation split")
