"""Combine trained checkpoints into one logit-averaging ensemble checkpoint.

The members must share the classes and the preprocessing (they see one input tensor).
The ensemble is served, explained and evaluated like a single network
(:mod:`handler.ensemble`). Its probabilities need their own calibration, fitted on the
ensemble's logits, so the output has none until ``scripts/calibrate.py`` runs on it; the
service refuses an uncalibrated checkpoint.

Example:
    python scripts/ensemble.py --members runs/a/best.pt runs/b/best.pt --model-version 1.2.0 \
        --output runs/ensemble.pt
    python scripts/calibrate.py --checkpoint runs/ensemble.pt --output models/skin_lesion.pt ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.ensemble import combine_checkpoints  # noqa: E402
from handler.model import checkpoint_provenance, load_checkpoint  # noqa: E402

# What each member's metadata keeps in the ensemble's: enough to trace and reproduce it.
MEMBER_PROVENANCE_KEYS = ("version", "command", "calibration_command", "initialization", "data", "best_epoch", "trained_epochs",
                         "validation", "torch", "created")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", nargs="+", required=True, help="member checkpoints (at least 2)")
    parser.add_argument("--output", required=True, help="where to write the ensemble checkpoint")
    parser.add_argument("--model-version", required=True, help="version written into the ensemble's meta")
    parser.add_argument("--storage-dtype", choices=("float16", "float32"), default="float16",
                        help="dtype of the stored weights: float16 halves the file (weights run in fp32 either way; "
                             "calibrate the result, so its figures measure the stored weights)")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Write the ensemble checkpoint and check it loads and runs; return its path."""
    checkpoints = [torch.load(path, map_location="cpu", weights_only=True) for path in args.members]
    members = [{"source": checkpoint_provenance(path, checkpoint["meta"]),
                **{key: checkpoint["meta"][key] for key in MEMBER_PROVENANCE_KEYS if key in checkpoint["meta"]}}
               for path, checkpoint in zip(args.members, checkpoints)]
    meta = {"version": args.model_version, "members": members,
            "command": "python scripts/ensemble.py " + shlex.join(
                ["--members", *args.members, "--output", args.output, "--model-version", args.model_version,
                 "--storage-dtype", args.storage_dtype])}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(combine_checkpoints(checkpoints, meta, getattr(torch, args.storage_dtype)), output)
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
