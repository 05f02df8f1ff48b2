"""Combine trained checkpoints into one logit-averaging ensemble checkpoint.

The members must share the classes and the preprocessing (they see one input tensor).
The ensemble is served, explained and evaluated like a single network
(:mod:`handler.ensemble`). Its probabilities need their own calibration, fitted on the
ensemble's logits, so the output has none until ``scripts/calibrate.py`` runs on it; the
service refuses an uncalibrated checkpoint. A member may also be an ensemble checkpoint,
such as the released model: its members join as it stored them, so a release can grow by
one network without the original member files.

Example:
    python scripts/ensemble.py --members runs/a/best.pt runs/b/best.pt --model-version 1.2.0 \
        --output runs/ensemble.pt
    python scripts/calibrate.py --checkpoint runs/ensemble.pt --output models/skin_lesion.pt ...
    python scripts/ensemble.py --members models/skin_lesion.pt runs/c/best.pt --storage-dtype int8 ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.ensemble import combine_checkpoints, split_members  # noqa: E402
from handler.model import ENSEMBLE_ARCH, checkpoint_provenance, load_checkpoint  # noqa: E402
from handler.storage import STORAGE_DTYPES  # noqa: E402

# What each member's metadata keeps in the ensemble's: enough to trace and reproduce it.
MEMBER_PROVENANCE_KEYS = ("version", "command", "calibration_command", "initialization", "data", "best_epoch", "trained_epochs",
                         "validation", "torch", "created")


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a member's metadata that the ensemble keeps (:data:`MEMBER_PROVENANCE_KEYS`)."""
    return {key: meta[key] for key in MEMBER_PROVENANCE_KEYS if key in meta}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", nargs="+", required=True,
                        help="member checkpoints (at least 2 networks); an ensemble checkpoint contributes its members")
    parser.add_argument("--output", required=True, help="where to write the ensemble checkpoint")
    parser.add_argument("--model-version", required=True, help="version written into the ensemble's meta")
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float16",
                        help="how the weights are stored: float16 halves the file, int8 (per-channel convolution "
                             "kernels) about quarters it; they run in fp32 either way. Calibrate the result, so its "
                             "figures measure the stored weights")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Write the ensemble checkpoint and check it loads and runs; return its path."""
    checkpoints, members = [], []
    for path in args.members:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        origin = checkpoint_provenance(path, checkpoint["meta"])
        if checkpoint["config"]["arch"] == ENSEMBLE_ARCH:
            # A released ensemble's members, as it stored them: it can grow without their original files.
            for index, member in enumerate(split_members(checkpoint)):
                checkpoints.append(member)
                members.append({"source": f"{member['meta'].get('source')}; taken as stored from member {index} of {origin}",
                                **provenance(member["meta"])})
        else:
            checkpoints.append(checkpoint)
            members.append({"source": origin, **provenance(checkpoint["meta"])})
    meta = {"version": args.model_version, "members": members,
            "command": "python scripts/ensemble.py " + shlex.join(
                ["--members", *args.members, "--output", args.output, "--model-version", args.model_version,
                 "--storage-dtype", args.storage_dtype])}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(combine_checkpoints(checkpoints, meta, args.storage_dtype), output)
    loaded = load_checkpoint(output)
    size = loaded.preprocess.image_size
    with torch.inference_mode():
        # Members whose feature maps differ in size cannot be concatenated: fail here, not in serving.
        _, logits = loaded.features_and_logits(torch.zeros(1, 3, size, size))
    print(f"wrote {output}: {len(members)} members, version {args.model_version}, logits {tuple(logits.shape)}; "
          "calibrate it next (scripts/calibrate.py)", flush=True)
    return output


if __name__ == "__main__":
    main(get_args_parser().parse_args())
