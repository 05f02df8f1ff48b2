"""Write the KServe storage layout (``make kserve-bundle``): ``config/config.properties`` and ``model-store/skin_lesion.mar``.

Upload the folder to the storage the InferenceService's ``storageUri`` names
(deploy/kserve/inferenceservice.yaml), for example ``gsutil -m cp -r runs/kserve-bundle/* gs://BUCKET/skin-lesion/1.6.0/``
or ``aws s3 sync runs/kserve-bundle s3://BUCKET/skin-lesion/1.6.0/``. The logic is :mod:`ops.kserve`.

Example:
    make kserve-bundle
    make kserve-bundle ARCHIVE=model_store/skin_lesion_v1.6.mar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ops.kserve import BUNDLE_CONFIG, write_bundle
from ops.paths import MODEL_NAME, MODEL_STORE, ROOT
from ops.rollout import RolloutError


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default=str(MODEL_STORE / f"{MODEL_NAME}.mar"),
                        help="the release archive (make archive, or make release VERSION=...)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "kserve-bundle"), help="bundle folder (replaced)")
    parser.add_argument("--config", default=str(BUNDLE_CONFIG), help="the pod's config.properties")
    return parser


def main(args: argparse.Namespace) -> int:
    """Write the bundle; returns the exit code."""
    try:
        write_bundle(Path(args.archive), Path(args.out), Path(args.config))
    except (ValueError, RolloutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
