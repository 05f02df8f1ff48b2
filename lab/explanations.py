"""Grad-CAM explanations of image files through the served handler code, and panels that show them.

:func:`explain_files` answers each image as ``POST /explanations/skin_lesion`` would, given the
served settings (:func:`handler.settings.load_handler_settings`) and a model prepared with
:func:`handler.inference.prepare_for_serving`; :func:`render_panel` draws one answer.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from handler.checkpoint import LoadedModel
from handler.inference import handle_batch
from handler.labels import lesion_class
from handler.preprocessing import decode_image
from handler.responses import NOTICE, Prediction, Response
from handler.settings import HandlerSettings

TEXT_BAND = 96  # pixels of caption under a panel


def explain_files(loaded: LoadedModel, settings: HandlerSettings, paths: Sequence[str | os.PathLike],
                  target_class: str | None = None, allow_out_of_distribution: bool = False) -> list[Response]:
    """Answer each image file as the explanations API does, in one batch.

    Args:
        loaded: The model, after :func:`handler.inference.prepare_for_serving` with ``settings``.
        settings: The served handler settings.
        paths: Image files.
        target_class: Explain this class code instead of the one the decision rule names.
        allow_out_of_distribution: Answer images the input gate refuses (marked as such: no class,
            risk ``unknown``), whatever ``settings.allow_gate_override`` says.

    Returns:
        One response per file, in order: a :class:`Prediction` with its Grad-CAM, or the error
        the service would return.
    """
    options = {"target_class": target_class} if target_class else {}
    if allow_out_of_distribution:
        options["allow_out_of_distribution"] = True
        # Offline, whoever runs this is the operator: the override is theirs to allow.
        settings = dataclasses.replace(settings, allow_gate_override=True)
    rows = [{"body": {"image": base64.b64encode(Path(path).read_bytes()).decode(), **options}} for path in paths]
    return handle_batch(loaded, settings, rows, loaded.version, explain=[True] * len(rows))


def render_panel(image_bytes: bytes, prediction: Prediction) -> Image.Image:
    """The original image and its Grad-CAM overlay side by side, captioned with the top-3 classes and the answer.

    Args:
        image_bytes: The encoded original image.
        prediction: Its answer, with a Grad-CAM explanation.

    Returns:
        An RGB panel image.
    """
    if prediction.gradcam is None:
        raise ValueError("the prediction has no Grad-CAM explanation to draw")
    original = decode_image(image_bytes).image
    overlay = Image.open(io.BytesIO(base64.b64decode(prediction.gradcam.overlay))).convert("RGB")
    original = original.resize(overlay.size)
    width, height = overlay.size
    panel = Image.new("RGB", (2 * width, height + TEXT_BAND), "white")
    panel.paste(original, (0, 0))
    panel.paste(overlay, (width, 0))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=max(12, height // 28))
    top3 = sorted(prediction.probabilities.items(), key=lambda item: item[1], reverse=True)[:3]
    lines = [
        "top 3: " + "   ".join(f"{code} {p:.2f} ({lesion_class(code).name})" for code, p in top3),
        (f"prediction {prediction.prediction} ({prediction.decision_rule} rule)   " if prediction.prediction is not None
         else "no prediction (input gate overridden)   ")
        + f"Grad-CAM for '{prediction.gradcam.class_code}'   risk {prediction.risk}   "
        f"malignant p {prediction.malignant_probability:.2f}",
        NOTICE.split(".")[0] + f".   model {prediction.model_version}",
    ]
    for row, text in enumerate(lines):
        draw.text((8, height + 6 + row * (TEXT_BAND // 3 - 2)), text, fill="black", font=font)
    return panel
