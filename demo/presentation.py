"""What the demo page shows for one response: the probability chart, the summary and the Grad-CAM overlay,
or a readable refusal (a bad image, or an image that does not look like dermoscopy)."""

from __future__ import annotations

import csv
import html
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from handler.labels import CLASS_CODES, Risk, lesion_class
from handler.overlay import model_view_box, render_overlay
from handler.preprocessing import PreprocessConfig
from handler.responses import NOTICE
from handler.settings import HandlerSettings

# Colour plus the written level, so the risk never depends on colour vision alone.
RISK_COLOURS = {Risk.LOW.value: "#2e7d32", Risk.MEDIUM.value: "#ef6c00", Risk.HIGH.value: "#c62828"}
# An answer the server marks as not judged (an image outside what the model knows, sent anyway).
UNKNOWN_RISK_COLOUR = "#616161"


def class_choices() -> list[tuple[str, str]]:
    """Dropdown entries ``(shown text, value)``: the predicted class, then each of the 7 classes by name."""
    return [("Suggested class", "")] + [(f"{lesion_class(code).name} ({code})", code) for code in CLASS_CODES]


def example_images(samples_dir: Path, per_class: int = 1) -> list[tuple[Path, str]]:
    """A few example images from the HAM10000 samples folder, with a caption each, read in place.

    Args:
        samples_dir: ``../shared/data/samples-600x450`` (images plus ``metadata.csv``).
        per_class: How many images of each diagnosis to offer.

    Returns:
        ``(path, caption)`` pairs in class order; empty if the folder or its metadata is missing.
    """
    metadata = samples_dir / "metadata.csv"
    if not metadata.is_file():
        return []
    by_class: dict[str, list[str]] = {code: [] for code in CLASS_CODES}
    with open(metadata, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dx"] in by_class and (samples_dir / f"{row['image_id']}.jpg").is_file():
                by_class[row["dx"]].append(row["image_id"])
    examples = []
    for code, image_ids in by_class.items():
        for image_id in sorted(image_ids)[:per_class]:
            examples.append((samples_dir / f"{image_id}.jpg", f"{image_id} (labelled {code})"))
    return examples


def probability_figure(probabilities: dict[str, float]) -> Figure:
    """A horizontal bar chart of the 7 class probabilities, highest first, each bar labelled.

    Args:
        probabilities: Class code to probability, as in a response's ``probabilities``.
    """
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)
    names = [f"{lesion_class(code).name.split(' (')[0]} ({code})" for code, _ in ranked]
    values = [100.0 * p for _, p in ranked]
    colours = [RISK_COLOURS[lesion_class(code).risk.value] for code, _ in ranked]
    # pyplot is not used: a bare Figure holds no global state, so concurrent requests cannot mix plots.
    figure = Figure(figsize=(7.0, 3.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    bars = axes.barh(range(len(ranked)), values, color=colours)
    axes.set_yticks(range(len(ranked)), names)
    axes.invert_yaxis()
    axes.set_xlim(0, 112)
    axes.set_xlabel("probability (%)")
    axes.set_title("Highest first; bar colour is the class risk", fontsize=9)
    axes.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=9)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


def summary_html(body: dict[str, Any], source: str) -> str:
    """The suggested class, colour-coded risk, malignant probability against the referral threshold, and model version.

    Args:
        body: A prediction response.
        source: Where the prediction came from (TorchServe URL or in-process), shown with the version.
    """
    risk = body["risk"]
    colour = RISK_COLOURS.get(risk, UNKNOWN_RISK_COLOUR)
    malignant = 100.0 * body["malignant_probability"]
    threshold = 100.0 * body["referral"]["threshold"]
    most_probable = body.get("most_probable", body["prediction"])  # archives before 1.1.0 do not send it
    if most_probable != body["prediction"]:
        # The balanced rule can name a rare class that is not the most probable; say so plainly.
        rule_note = (f"<div id=\"decision-rule\" style=\"color:#555\">Suggested because its probability is high for a class "
                     f"this rare (balanced decision rule); the most probable class is "
                     f"{html.escape(lesion_class(most_probable).name)} ({100.0 * body['probabilities'][most_probable]:.1f}%).</div>")
    else:
        rule_note = ""
    gradcam = body.get("gradcam")
    evidence_note = ""
    if gradcam is not None and not gradcam.get("has_evidence", True):
        # A blank overlay would read as "looked nowhere"; it means no region supports the class.
        evidence_note = (f"<div id=\"no-evidence\" style=\"color:#555\">Grad-CAM: no region of this image raises the score "
                         f"of {html.escape(lesion_class(gradcam['class']).name)}, so the overlay shows the plain image.</div>")
    if body["referral"]["refer"]:
        verdict = f"at or above the referral threshold of {threshold:.0f}%: <b>refer to a dermatologist</b>"
    else:
        verdict = f"below the referral threshold of {threshold:.0f}%: no referral flag (this does not rule out cancer)"
    return f"""
<div id="summary" style="font-size:15px;line-height:1.5">
  <div>Suggested class: <b id="top-diagnosis" style="font-size:20px">{html.escape(body['label'])}</b>
       ({html.escape(body['prediction'])}), probability {100.0 * body['confidence']:.1f}%</div>{rule_note}{evidence_note}
  <div>Risk level: <span id="risk" style="background:{colour};color:white;font-weight:bold;padding:2px 10px;
       border-radius:4px">{html.escape(risk.upper())}</span></div>
  <div id="malignant">Malignant probability (melanoma + basal cell carcinoma + actinic keratosis):
       <b>{malignant:.1f}%</b>, {verdict}</div>
  <div style="position:relative;height:14px;background:#e0e0e0;border-radius:7px;margin:4px 0 8px 0"
       title="malignant probability; the black line is the referral threshold">
    <div style="width:{malignant:.1f}%;height:100%;background:{colour};border-radius:7px"></div>
    <div style="position:absolute;left:{threshold:.1f}%;top:-3px;width:3px;height:20px;background:black"></div>
  </div>
  <div id="model-version" style="color:#555">Model version <b>{html.escape(str(body['model_version']))}</b>
       &middot; {html.escape(source)}</div>
</div>"""


def notice_html() -> str:
    """The permanent banner saying this is a research and screening aid, not a diagnosis."""
    return f"""
<div id="notice" role="alert" style="border:2px solid #c62828;background:#fff3f3;color:#7f0000;padding:10px 14px;
     border-radius:6px;font-size:15px">
  <b>Not a diagnosis.</b> {html.escape(NOTICE)} This tool is not a medical device and has not been clinically validated.
</div>"""


def error_html(message: str) -> str:
    """A readable error box for the page."""
    return (f'<div id="error" role="alert" style="border:2px solid #b71c1c;background:#ffebee;color:#b71c1c;'
            f'padding:8px 12px;border-radius:6px"><b>Could not analyse the image.</b> {html.escape(message)}</div>')


def out_of_distribution_html(score: float | None, threshold: float | None, modality: str = "other",
                             advice: str | None = None) -> str:
    """The page's answer for an image the model's input gate refused: what it means and what to do, no probabilities.

    Args:
        score: The gate's out-of-distribution score (higher = less like dermoscopy), or None.
        threshold: The score above which the gate refuses, or None.
        modality: ``clinical`` for a photo of skin taken without a dermatoscope, else ``other``.
        advice: The server's advice, or None.
    """
    if modality == "clinical":
        import html

        todo = html.escape(advice or "take the photo through a dermatoscope and send that image")
        return (f'<div id="out-of-distribution" data-modality="clinical" role="alert" style="border:2px solid #616161;'
                f'background:#f5f5f5;color:#212121;padding:10px 14px;border-radius:6px;font-size:15px"><b>This looks '
                f'like a photo of the skin taken without a dermatoscope</b> (a clinical photo), so the model gives no '
                f'answer for it: it was trained on dermoscopic images only, and on clinical photos its answers are '
                f'close to chance. <b>What to do: {todo[:1].upper() + todo[1:]}.</b></div>')
    if score is not None and threshold is not None:
        measured = (f" Its out-of-distribution score is <b>{score:.3g}</b>, above the {threshold:.3g} that dermoscopic "
                    "images of skin lesions stay under.")
    elif score is not None:
        measured = f" Its out-of-distribution score is <b>{score:.3g}</b>."
    else:
        measured = ""
    return (f'<div id="out-of-distribution" role="alert" style="border:2px solid #616161;background:#f5f5f5;color:#212121;'
            f'padding:10px 14px;border-radius:6px;font-size:15px"><b>This does not look like a dermoscopic image of a '
            f'skin lesion</b>, so the model gives no answer for it: its classes and probabilities would mean nothing '
            f'for this picture.{measured} Upload a dermoscopic photograph (taken through a dermatoscope) of one skin '
            f'lesion.</div>')


@dataclass(frozen=True)
class OverlayRenderer:
    """Draws a response's raw Grad-CAM heatmap over the original at any opacity, as the server does.

    Attributes:
        preprocess: The served model's preprocessing, which places the heatmap in the image.
        settings: The served handler settings (colour map, size cap).
    """

    preprocess: PreprocessConfig
    settings: HandlerSettings

    def check_matches(self, gradcam: dict[str, Any]) -> bool:
        """Whether this preprocessing puts the heatmap where the server did (``heatmap_box``)."""
        expected = model_view_box((gradcam["width"], gradcam["height"]), self.preprocess)
        return list(expected) == list(gradcam["heatmap_box"])

    def render(self, original: Image.Image, heatmap: list[list[float]], alpha: float) -> np.ndarray:
        """The overlay as an (H, W, 3) uint8 array, using :func:`handler.overlay.render_overlay`."""
        style = replace(self.settings.overlay_style, alpha=float(alpha))
        return render_overlay(original, np.asarray(heatmap, dtype=np.float32), self.preprocess, style)
