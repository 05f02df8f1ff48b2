"""Write Grad-CAM explanation panels: the original beside its overlay, with the top-3 classes.

Runs the same handler code as the server, in-process, so a panel shows exactly what
``POST /explanations/skin_lesion`` would return.

Example:
    python scripts/explain.py ../shared/data/samples-600x450/ISIC_0024354.jpg --out runs/explain
    python scripts/explain.py lesion.jpg --target-class mel --out runs/explain
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.inference import NOTICE, HandlerSettings, handle_batch  # noqa: E402
from handler.labels import CLASS_CODES, lesion_class  # noqa: E402
from handler.model import load_checkpoint  # noqa: E402
from handler.preprocessing import decode_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_BAND = 96


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="dermoscopic images")
    parser.add_argument("--out", required=True, help="folder for <image>_gradcam.png panels")
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--target-class", choices=CLASS_CODES, help="explain this class instead of the predicted one")
    parser.add_argument("--alpha", type=float, default=HandlerSettings.gradcam_alpha, help="heatmap opacity")
    return parser


def render_panel(image_bytes: bytes, response: dict[str, Any]) -> Image.Image:
    """The original image and its Grad-CAM overlay side by side, captioned with the top-3 classes.

    Args:
        image_bytes: The encoded original image.
        response: A prediction response with a ``gradcam`` object.

    Returns:
        An RGB panel image.
    """
    original = decode_image(image_bytes).image
    overlay = Image.open(io.BytesIO(base64.b64decode(response["gradcam"]["overlay"]))).convert("RGB")
    original = original.resize(overlay.size)
    width, height = overlay.size
    panel = Image.new("RGB", (2 * width, height + TEXT_BAND), "white")
    panel.paste(original, (0, 0))
    panel.paste(overlay, (width, 0))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=max(12, height // 28))
    top3 = sorted(response["probabilities"].items(), key=lambda item: item[1], reverse=True)[:3]
    lines = [
        "top 3: " + "   ".join(f"{code} {p:.2f} ({lesion_class(code).name})" for code, p in top3),
        f"Grad-CAM for '{response['gradcam']['class']}'   risk {response['risk']}   "
        f"malignant p {response['malignant_probability']:.2f}   model {response['model_version']}",
        NOTICE.split(".")[0] + ".",
    ]
    for row, text in enumerate(lines):
        draw.text((8, height + 6 + row * (TEXT_BAND // 3 - 2)), text, fill="black", font=font)
    return panel


def main(args: argparse.Namespace) -> list[Path]:
    """Explain each image and write its panel; returns the written paths."""
    loaded = load_checkpoint(args.checkpoint)
    settings = HandlerSettings(gradcam_format="png", gradcam_alpha=args.alpha)
    images = [Path(p).read_bytes() for p in args.images]
    rows = [{"body": {"image": base64.b64encode(data).decode(), "gradcam": True,
                      **({"target_class": args.target_class} if args.target_class else {})}} for data in images]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, data, response in zip(args.images, images, handle_batch(loaded, settings, rows, loaded.version)):
        if response.status != 200:
            print(f"{path}: {response.body['error']['message']}", file=sys.stderr)
            continue
        target = out / f"{Path(path).stem}_gradcam.png"
        render_panel(data, response.body).save(target)
        body = response.body
        print(f"{path}: {body['prediction']} {body['confidence']:.2f}, Grad-CAM of {body['gradcam']['class']} -> {target}")
        written.append(target)
    return written


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args()) else 1)
