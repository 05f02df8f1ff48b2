"""Release, roll out, roll back and inspect model versions (``make release``, ``rollout``, ``rollback``, ``status``).

``rollout`` registers the new version next to the running one, waits for its worker,
smoke-tests it on ``/predictions/skin_lesion/<version>`` against golden images, and only then
makes it the default; the previous version stays loaded so that ``rollback`` is instant, and
older ones are unloaded. Any failure leaves the previous default serving and exits non-zero.
The logic is :mod:`ops.rollout`.

Example:
    make release VERSION=1.1 && make rollout VERSION=1.1
    make rollback
    make status
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ops.archive import ArchiveSpec, ReleaseCheckError, build_archive
from ops.paths import CHECKPOINT, DATA, GOLDEN_SMOKE, MODEL_CONFIG, MODEL_STORE, RUN_DIR
from ops.rollout import RolloutError, archive_name, rollback, rollout, status
from ops.torchserve import Server


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("release", "rollout", "rollback", "status"))
    parser.add_argument("--version", help="model version, e.g. 1.1")
    parser.add_argument("--run-dir", default=str(RUN_DIR))
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="checkpoint to release")
    parser.add_argument("--model-config", default=str(MODEL_CONFIG), help="model config to pack into a release")
    parser.add_argument("--force-threshold", action="store_true",
                        help="release a config whose referral threshold differs from the checkpoint's measured one")
    parser.add_argument("--force", action="store_true",
                        help="release: replace an existing archive of the same version (recorded in the store's "
                             "releases.jsonl with the digest it replaced)")
    parser.add_argument("--model-store", help=f"where release writes archives (default {MODEL_STORE}); rollout reads "
                                              "them from the running server's own store unless this is given")
    parser.add_argument("--golden", default=str(GOLDEN_SMOKE))
    parser.add_argument("--golden-images", default=str(DATA), help="folder holding the golden images' folder")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the new version's worker")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one action; returns the exit code."""
    if args.action in ("release", "rollout") and not args.version:
        print(f"error: {args.action} needs --version (make {args.action} VERSION=x.y)", file=sys.stderr)
        return 2
    if args.action == "release":
        try:
            store = Path(args.model_store or MODEL_STORE)
            build_archive(ArchiveSpec(Path(args.checkpoint), Path(args.model_config), store, args.version,
                                      archive_name(args.version), force_threshold=args.force_threshold,
                                      overwrite=args.force, forced=args.force))
        except ReleaseCheckError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    server = Server(Path(args.run_dir).resolve())
    if not server.is_running():
        print(f"error: no TorchServe running from {server.run_dir}; run `make serve` first", file=sys.stderr)
        return 1
    try:
        if args.action == "rollout":
            previous = rollout(server, args.version, Path(args.golden), Path(args.golden_images), args.timeout,
                               Path(args.model_store) if args.model_store else None)
            print(f"rolled out {args.version}: it is the default now; {previous} stays loaded for `make rollback`")
        elif args.action == "rollback":
            print(f"rolled back: {rollback(server)} is the default again")
        else:
            print(json.dumps(status(server), indent=2))
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
