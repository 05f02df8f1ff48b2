"""Combine trained checkpoints into one logit-averaging ensemble checkpoint.

The members must share the classes and the preprocessing (they see one input tensor).
The ensemble is served, explained and evaluated like a single network
(:class:`handler.architectures.LogitAverage`; its checkpoint format is
:func:`handler.checkpoint.combine_members`). Its probabilities need their own calibration, fitted on the
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
from pathlib import Path

import torch

from handler.checkpoint import Meta, combine_members, load_checkpoint
from handler.storage import STORAGE_DTYPES
from lab.ensembles import check_compatible_members, networks_in
from lab.provenance import command_line


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
    # A released ensemble contributes its members as it stored them: it can grow without their original files.
    networks = networks_in(args.members)
    checkpoints = [network.checkpoint for network in networks]
    check_compatible_members(checkpoints)
    command = command_line("scripts/ensemble.py", ["--members", *args.members, "--output", args.output,
                                                   "--model-version", args.model_version,
                                                   "--storage-dtype", args.storage_dtype])
    meta = Meta(checkpoints[0].meta.preprocessing, version=args.model_version,
                members=[network.member_record() for network in networks], provenance={"command": command})
    output = combine_members(checkpoints, meta, args.storage_dtype).save(args.output)
    loaded = load_checkpoint(output)
    size = loaded.preprocess.image_size
    with torch.inference_mode():
        # Members whose feature maps differ in size cannot be concatenated: fail here, not in serving.
        _, logits = loaded.features_and_logits(torch.zeros(1, 3, size, size))
    print(f"wrote {output}: {len(networks)} members, version {args.model_version}, logits {tuple(logits.shape)}; "
          "calibrate it next (scripts/calibrate.py)", flush=True)
    return output


if __name__ == "__main__":
    main(get_args_parser().parse_args())
