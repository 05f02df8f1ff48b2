"""Write Grad-CAM explanation panels: the original beside its overlay, with the top-3 classes.

Runs the same handler code as the server, in-process, with the served settings (the ``handler:``
block of ``--model-config``: decision rule, referral threshold, TTA, runtime, input gate), so a
panel names, explains and rates exactly what ``POST /explanations/skin_lesion`` would return.
Overlays are drawn as PNG (lossless) for the panels, whatever format the service sends. Unlike the
service, a checkpoint without an input gate is explained too (a candidate before ``make fit-gate``).

Example:
    python scripts/explain.py ../shared/data/samples-600x450/ISIC_0024354.jpg --out runs/explain
    python scripts/explain.py lesion.jpg --target-class mel --out runs/explain
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from handler.checkpoint import load_checkpoint
from handler.inference import prepare_for_serving
from handler.labels import CLASS_CODES
from handler.responses import Response
from handler.settings import load_handler_settings
from lab.explanations import explain_files, render_panel
from ops.paths import CHECKPOINT, MODEL_CONFIG


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="dermoscopic images")
    parser.add_argument("--out", required=True, help="folder for <image>_gradcam.png panels")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--model-config", default=str(MODEL_CONFIG),
                        help="serving config whose handler settings (decision rule, referral threshold, TTA) are used")
    parser.add_argument("--target-class", choices=CLASS_CODES, help="explain this class instead of the predicted one")
    parser.add_argument("--allow-out-of-distribution", action="store_true",
                        help="explain images the input gate refuses (their risk is then 'unknown')")
    parser.add_argument("--alpha", type=float, help="heatmap opacity; default: the serving config's")
    return parser


def main(args: argparse.Namespace) -> list[tuple[Path, Response, Path | None]]:
    """Explain each image and write its panel.

    Returns:
        Per image: its path, the service's response, and the panel written (None if refused).
    """
    served = load_handler_settings(args.model_config)
    # All cores, since this is one process; PNG overlays for lossless panels. The input gate is used
    # when the checkpoint has one (refusals included) but not required, so that candidates not yet
    # gated can be explained; the service refuses to load those.
    # --allow-out-of-distribution is the operator's own override here, whatever the served config allows clients.
    settings = dataclasses.replace(served, gradcam_format="png", torch_threads=0, require_input_gate=False,
                                   gradcam_alpha=served.gradcam_alpha if args.alpha is None else args.alpha,
                                   allow_gate_override=served.allow_gate_override or args.allow_out_of_distribution)
    loaded = load_checkpoint(args.checkpoint)
    prepare_for_serving(loaded, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    responses = explain_files(loaded, settings, args.images, args.target_class, args.allow_out_of_distribution)
    for path, response in zip(map(Path, args.images), responses):
        if not response.ok:
            print(f"{path}: {response.status} {response.body.code}: {response.body.message}", file=sys.stderr)
            results.append((path, response, None))
            continue
        body = response.body
        target = out / f"{path.stem}_gradcam.png"
        render_panel(path.read_bytes(), body).save(target)
        called = (f"{body.prediction} {body.confidence:.2f} ({body.decision_rule} rule)" if body.prediction is not None
                  else "no class (refused by the input gate, overridden)")
        print(f"{path}: {called}, risk {body.risk}, "
              f"Grad-CAM of {body.gradcam.class_code} -> {target}")
        results.append((path, response, target))
    return results


if __name__ == "__main__":
    sys.exit(0 if any(panel for _, _, panel in main(get_args_parser().parse_args())) else 1)
