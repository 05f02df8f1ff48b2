"""Build a versioned TorchServe archive (.mar) of the handler package, a checkpoint and its config.

Example:
    python scripts/package.py                      # model_store/skin_lesion.mar
    python scripts/package.py --version 1.1 --archive-name skin_lesion_v1.1   # make release VERSION=1.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ops.archive import ArchiveSpec, ReleaseCheckError, build_archive
from ops.paths import CHECKPOINT, MODEL_CONFIG, MODEL_NAME, MODEL_STORE


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--model-config", default=str(MODEL_CONFIG))
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--version", help="archive version; defaults to the checkpoint's meta.version")
    parser.add_argument("--archive-name", help="file name without .mar; defaults to the model name")
    parser.add_argument("--export-path", default=str(MODEL_STORE))
    parser.add_argument("--force-threshold", action="store_true",
                        help="pack a config whose referral threshold differs from the checkpoint's measured operating "
                             "point (recorded in the archive's config as a release note)")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Build the archive and return its path."""
    return build_archive(ArchiveSpec(Path(args.checkpoint), Path(args.model_config), Path(args.export_path),
                                     args.version, args.archive_name, args.model_name, args.force_threshold))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ReleaseCheckError as error:
        sys.exit(f"error: {error}")
