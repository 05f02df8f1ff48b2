"""Render a Grad-CAM heatmap over the original image and encode it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from handler.preprocessing import FULL_VIEW, PreprocessConfig

# Perceptually uniform maps first; jet is offered only for people used to it.
COLORMAPS = {
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
}
FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays look and are encoded.

    Attributes:
        alpha: Weight of the heatmap colour in the blend, 0..1.
        colormap: One of :data:`COLORMAPS`.
        image_format: ``png`` or ``jpeg``.
        jpeg_quality: JPEG quality, 1..100.
        max_side: Overlays of larger images are scaled down to this longer side, which
            bounds the response size.
    """

    alpha: float = 0.45
    colormap: str = "inferno"
    image_format: str = "png"
    jpeg_quality: int = 90
    max_side: int = 2048

    def __post_init__(self) -> None:
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}")
        if self.image_format not in FORMATS:
            raise ValueError(f"image format must be one of {FORMATS}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be between 0 and 1")


def model_view_box(size: tuple[int, int], preprocess: PreprocessConfig) -> tuple[int, int, int, int]:
    """The region of an image of ``size`` (width, height) that the model saw after resize and centre crop.

    Under ``full_view`` preprocessing the model saw the whole image (squeezed to its square
    input), so the box is the whole image and the heatmap is stretched back over it.

    Returns:
        ``(left, top, right, bottom)`` in the image's pixel coordinates.
    """
    width, height = size
    if preprocess.resize_mode == FULL_VIEW:
        return 0, 0, width, height
    side = min(width, height) * preprocess.image_size / preprocess.resize_size
    left, top = (width - side) / 2, (height - side) / 2
    # Rounding each edge on its own (half to even) can give a thin image an empty box, which
    # the overlay cannot be resized into: keep at least one pixel, inside the image.
    box_left, box_top = min(round(left), width - 1), min(round(top), height - 1)
    return box_left, box_top, max(round(left + side), box_left + 1), max(round(top + side), box_top + 1)


def render_overlay(image: Image.Image, heatmap: np.ndarray, preprocess: PreprocessConfig, style: OverlayStyle) -> np.ndarray:
    """Blend a colour-mapped heatmap over the part of the image the model saw.

    Args:
        image: The original RGB image (EXIF orientation applied).
        heatmap: (h, w) map in [0, 1] over the model's input crop.
        preprocess: The model's preprocessing, to place the crop in the original image.
        style: Colour map, blend and size settings.

    Returns:
        (H, W, 3) uint8 RGB overlay at the original size (or scaled to ``style.max_side``).
    """
    if max(image.size) > style.max_side:
        scale = style.max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
    rgb = np.asarray(image, dtype=np.uint8)
    left, top, right, bottom = model_view_box(image.size, preprocess)
    # Quantize the small map first: a uint8 bicubic upsample is several times cheaper than a
    # float one, and saturating arithmetic clips the cubic overshoot at 0 and 255 for free.
    levels = np.rint(np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)
    levels = cv2.resize(levels, (right - left, bottom - top), interpolation=cv2.INTER_CUBIC)
    colored = cv2.applyColorMap(levels, _rgb_colormap(style.colormap))
    overlay = rgb.copy()
    region = overlay[top:bottom, left:right]
    overlay[top:bottom, left:right] = cv2.addWeighted(region, 1.0 - style.alpha, colored, style.alpha, 0.0)
    return overlay


@functools.lru_cache(maxsize=None)
def _rgb_colormap(name: str) -> np.ndarray:
    """OpenCV's colour map as a 256x1x3 RGB table, so applying it needs no BGR-to-RGB pass."""
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), COLORMAPS[name])
    return np.ascontiguousarray(table[:, :, ::-1])


def encode_image(rgb: np.ndarray, style: OverlayStyle) -> bytes:
    """Encode an RGB array as PNG or JPEG."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if style.image_format == "png":
        ok, buffer = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, style.jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} overlay as {style.image_format}")
    return buffer.tobytes()
