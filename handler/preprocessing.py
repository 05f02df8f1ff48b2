"""Image preprocessing shared by training, evaluation, the TorchServe handler and the demo.

Images are decoded and resized on the CPU as ``uint8``; the float conversion and
normalization happen once per batch (on the model's device), so no float work is
done at the original resolution.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from handler.decode_budget import DecodeBudget, has_alpha, reduce_to_rgb, reduction_factor, to_8bit_grey
from handler.errors import ImageDimensionError, ImageTooLargeError, InvalidImageError, UnsupportedFormatError

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# EXIF orientations that rotate the stored image by 90 or 270 degrees.
_ORIENTATIONS_ON_SIDE = frozenset({5, 6, 7, 8})
# The transpose that turns each EXIF orientation upright (as ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


# How an image becomes the square model input (``PreprocessConfig.resize_mode``).
# ``shorter_side_center_crop``: resize the shorter side to ``resize_size`` and centre-crop a square (a
# 4:3 photo loses a quarter of its width). ``full_view``: resize the whole image to the square input,
# aspect ratio not kept (what the squashed ``ham10000-224`` training set did to its 600x450 originals).
CENTER_CROP = "shorter_side_center_crop"
FULL_VIEW = "full_view"
RESIZE_MODES: tuple[str, ...] = (CENTER_CROP, FULL_VIEW)


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that travel with the weights in the checkpoint's metadata.

    Attributes:
        image_size: Side of the square model input, or its height when ``image_width`` is set.
        resize_size: The shorter side is resized to this before the centre crop. HAM10000's
            600x450 images become 224x224 by this resize-then-crop, which is how the
            ``ham10000-224`` training set was made. Under ``full_view`` it must equal
            ``image_size`` (there is no crop).
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel standard deviation on the 0..1 scale.
        interpolation: Resampling filter: ``bilinear``, ``bicubic`` or ``lanczos``.
        resize_mode: The geometry, one of :data:`RESIZE_MODES`: ``shorter_side_center_crop``
            (the default, and what every checkpoint without the key was served with) or
            ``full_view`` (the whole image resized to the square input). Training, evaluation,
            serving and the Grad-CAM overlay box all follow it. This default is the checkpoint
            format's reading of metadata without the key, not a training choice: new networks
            take theirs from their architecture entry (:meth:`handler.architectures.Architecture.training_preprocess`).
        image_width: Width of a rectangular model input (``full_view`` only), or None for a square
            one. A 4:3 photo resized whole to 150x200 keeps its shape, so a network trained on
            HAM10000's 4:3 images sees lesions as they are, at 60 % of a 224x224 input's pixels.
    """

    image_size: int = 224
    resize_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize_mode: str = CENTER_CROP
    image_width: int | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.resize_size < self.image_size:
            raise ValueError("resize_size must be at least image_size")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.resize_mode == FULL_VIEW and self.resize_size != self.image_size:
            raise ValueError(f"full_view resizes the whole image to image_size ({self.image_size}); "
                             f"resize_size ({self.resize_size}) must equal it")
        if self.image_width is not None and self.resize_mode != FULL_VIEW:
            raise ValueError("a rectangular model input (image_width) needs resize_mode full_view: a centre crop is square")

    @property
    def input_height(self) -> int:
        """Height of the model input in pixels."""
        return self.image_size

    @property
    def input_width(self) -> int:
        """Width of the model input in pixels (``image_size`` for a square input)."""
        return self.image_size if self.image_width is None else self.image_width

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form for a checkpoint's metadata.

        ``resize_mode`` is written only when it is not the default, so that the metadata (and
        every cache keyed on it) of a centre-crop model stays what it was before the key existed.
        """
        values = {**asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if self.resize_mode == CENTER_CROP:
            del values["resize_mode"]
        if self.image_width is None:
            del values["image_width"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PreprocessConfig":
        """Rebuild from :meth:`to_dict` output; a dict without ``resize_mode`` is a centre-crop model."""
        return cls(
            image_size=int(values["image_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            interpolation=str(values["interpolation"]),
            resize_mode=str(values.get("resize_mode", CENTER_CROP)),
            image_width=None if values.get("image_width") is None else int(values["image_width"]),
        )


# Formats accepted, by Pillow's name; every other format (ICO, ICNS, PSD, EPS, JPEG 2000, DDS...)
# is refused from its signature, before Pillow's plugin for it touches the data: several decode
# pixels inside Image.open, before any size check could run.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")


@dataclass(frozen=True)
class DecodeLimits:
    """Safety limits applied before an image's pixels are decoded.

    Attributes:
        max_pixels: Largest width x height accepted (decompression-bomb guard).
        min_side: Smallest width or height accepted.
        max_aspect_ratio: Largest long side / short side accepted. Dermoscopy is 4:3; a
            300000x8 strip would otherwise be resized to over a million pixels on its long
            side (the short side is scaled up to the model's input) and tie up a worker.
        budget: What decoding may cost (scans, segments, frames, memory, pixels per byte):
            :class:`handler.decode_budget.DecodeBudget`.
    """

    max_pixels: int = 40_000_000
    min_side: int = 8
    max_aspect_ratio: float = 4.0
    budget: DecodeBudget = DecodeBudget()

    def check(self, width: int, height: int) -> None:
        """Refuse a geometry from the header, before any pixel is decoded.

        Raises:
            ImageTooLargeError: More pixels than :attr:`max_pixels`.
            ImageDimensionError: A side below :attr:`min_side`, or an aspect ratio above
                :attr:`max_aspect_ratio`.
        """
        if width * height > self.max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {self.max_pixels}")
        if min(width, height) < self.min_side:
            raise ImageDimensionError(f"image is {width}x{height}; each side must be at least {self.min_side} pixels")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise ImageDimensionError(f"image is {width}x{height}, an aspect ratio of "
                                      f"{max(width, height) / min(width, height):.1f}:1; the limit is "
                                      f"{self.max_aspect_ratio:g}:1 (dermoscopic photos are about 4:3)")


@dataclass
class DecodedImage:
    """An RGB image, EXIF orientation applied, with the size it had when it arrived."""

    image: Image.Image
    original_size: tuple[int, int]


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: int | tuple[int, int] | None = None,
                 reduce_gap: int = 3) -> DecodedImage:
    """Decode image bytes safely into an upright RGB PIL image.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, TIFF, GIF, BMP...). Multi-frame
            images use their first frame.
        limits: Pixel limits checked from the header, before pixel decoding.
        draft_size: If given, the smallest upright ``(width, height)`` the caller needs (an int:
            a square). JPEGs are decoded with DCT scaling straight to the smallest size that
            holds it, which is much cheaper than a full decode followed by a resize; other
            formats are box-reduced right after decoding while their shorter side stays at
            least ``reduce_gap`` times the larger of the two needed sides.
        reduce_gap: See ``draft_size``; 3 keeps the later resize as fair as one from full size.

    Returns:
        The decoded image and its original (upright) size.

    Raises:
        InvalidImageError: The bytes are not a decodable image.
        ImageTooLargeError: More pixels than ``limits.max_pixels``.
        ImageDimensionError: A side smaller than ``limits.min_side``.
        DecodeBudgetError: Decoding would cost more than ``limits.budget`` (413 or 422).
    """
    # Counted from the bytes before any Pillow plugin parses them (Pillow reads markers and
    # chunks in Python, and decodes every scan of a progressive JPEG).
    limits.budget.check_structure(data)
    # Pillow's own bomb guard at the service's limit: an image it finds above twice this raises
    # before decoding (below that, DecodeLimits.check refuses it from the header).
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            # Between the limit and twice it Pillow only warns; DecodeLimits.check refuses those below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused before decoding: its header declares more than "
                                 f"{limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        refused = _other_format(data)
        if refused:
            raise UnsupportedFormatError(f"{refused} images are not accepted; send JPEG, PNG, WebP, TIFF, GIF or BMP") from exc
        raise InvalidImageError("body is not an image in a format we accept (JPEG, PNG, WebP, TIFF, GIF, BMP)") from exc
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError, TypeError) as exc:
        raise InvalidImageError(f"image header is invalid ({type(exc).__name__}: {str(exc)[:120]})") from exc
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidImageError(f"image header declares {width}x{height} pixels")
    limits.check(width, height)
    needed = (draft_size, draft_size) if isinstance(draft_size, int) else draft_size
    try:
        orientation = None
        if needed is not None and image.format == "JPEG":
            # A JPEG's EXIF sits in its header (read without decoding pixels), and the draft is
            # asked in the stored orientation: a photo stored on its side needs its sides swapped.
            orientation = _exif_orientation(image)
            image.draft("RGB", needed[::-1] if orientation in _ORIENTATIONS_ON_SIDE else needed)
        # Before EXIF is read for other formats: a PNG's getexif() decodes the pixels.
        limits.budget.check_raster(image, len(data), (width, height))
        if orientation is None:
            orientation = _exif_orientation(image)
        # Turned upright after the reduction and conversion, on the smaller RGB image.
        rgb = to_rgb(image, None if needed is None else max(needed), reduce_gap)
        if orientation != 1:
            rgb = rgb.transpose(_UPRIGHT[orientation])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused while decoding: more than {limits.max_pixels} pixels") from exc
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError, TypeError) as exc:
        # Pillow's plugins raise these for malformed data (struct.error from a 4-byte eXIf chunk,
        # for one); each means "this image is broken", never "the service is".
        raise InvalidImageError(f"image data is truncated or corrupted ({type(exc).__name__}: {str(exc)[:120]})") from exc
    upright_size = (height, width) if orientation in _ORIENTATIONS_ON_SIDE else (width, height)
    return DecodedImage(rgb, upright_size)


def _other_format(data: bytes) -> str | None:
    """The name of a format Pillow knows but the service refuses, from its signature alone (nothing is decoded)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        if name in ACCEPTED_FORMATS:
            continue
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's signature check failing only means "not this format"
            continue
    return None


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); an EXIF block too short to parse counts as upright.

    Only the EXIF parser's own failure (``struct.error`` on a truncated block, such as a PNG's
    4-byte eXIf chunk) is forgiven: reading EXIF also reads the file's later chunks, and a CRC
    error there means the image itself is corrupted, which the caller refuses.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except struct.error:
        return 1
    return orientation if orientation in range(1, 9) else 1


def to_rgb(image: Image.Image, reduce_to: int | None = None, reduce_gap: int = 3) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB and force the pixel decode.

    Transparent pixels are composited onto black, the background of dermoscopic images;
    16-bit and 32-bit greyscale are rescaled to 8 bits rather than clipped. Neither makes a
    full-size float64 or RGBA copy (:mod:`handler.decode_budget`).

    Args:
        image: An opened PIL image in any mode.
        reduce_to: If given, an image whose shorter side is at least ``reduce_gap`` times this
            is box-reduced by an integer factor while being converted.
        reduce_gap: See ``reduce_to``.

    Returns:
        A loaded RGB image.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = to_8bit_grey(image)
    factor = reduction_factor(image.size, reduce_to, reduce_gap)
    if factor > 1 or has_alpha(image):
        return reduce_to_rgb(image, factor)
    if image.mode == "RGB":
        image.load()  # decodes in place; convert() would add a full copy
        return image
    rgb = image.convert("RGB")
    rgb.load()
    return rgb


def resize_center_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize the shorter side to ``config.resize_size`` and centre-crop the model input.

    Args:
        image: An RGB image.
        config: The checkpoint's preprocessing parameters.

    Returns:
        A ``config.image_size`` square RGB image.
    """
    resized = resize_shorter_side(image, config)
    width, height = resized.size
    left = (width - config.image_size) // 2
    top = (height - config.image_size) // 2
    return resized.crop((left, top, left + config.image_size, top + config.image_size))


def resize_shorter_side(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize so that the shorter side equals ``config.resize_size``, keeping the aspect ratio."""
    width, height = image.size
    scale = config.resize_size / min(width, height)
    size = (max(config.resize_size, round(width * scale)), max(config.resize_size, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, _INTERPOLATIONS[config.interpolation])


def resize_full_view(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize the whole image to the model input (``full_view``), aspect ratio not kept: a square
    input squashes a 4:3 photo, a 4:3 input (``image_width``) keeps it."""
    size = (config.input_width, config.input_height)
    if image.size == size:
        return image
    return image.resize(size, _INTERPOLATIONS[config.interpolation])


def resize_to_model_input(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The square model input of an RGB image under ``config.resize_mode``: the one geometry of
    serving (:func:`load_model_input`), evaluation and validation (``lab.data.build_eval_transform``)."""
    if config.resize_mode == FULL_VIEW:
        return resize_full_view(image, config)
    return resize_center_crop(image, config)


def resize_for_augmentation(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The image that training's random crops are cut from, in the geometry of ``config.resize_mode``.

    ``shorter_side_center_crop``: the shorter side resized to ``resize_size`` (aspect ratio kept), so
    a full-scale crop is the served centre crop. ``full_view``: the whole image resized to the square
    input, so a full-scale crop is exactly the served input.
    """
    if config.resize_mode == FULL_VIEW:
        return resize_full_view(image, config)
    return resize_shorter_side(image, config)


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``uint8`` CHW tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_model_input(data: bytes, config: PreprocessConfig, limits: DecodeLimits = DecodeLimits()) -> tuple[torch.Tensor, DecodedImage]:
    """Decode bytes and produce the ``uint8`` model input, the serving and evaluation path.

    Args:
        data: Encoded image bytes.
        config: The checkpoint's preprocessing parameters.
        limits: Decode safety limits.

    Returns:
        ``(uint8 CHW tensor of config.image_size, decoded image)``.
    """
    decoded = decode_image(data, limits, draft_size=decode_size(config))
    return pil_to_uint8_tensor(resize_to_model_input(decoded.image, config)), decoded


def decode_size(config: PreprocessConfig) -> tuple[int, int]:
    """The smallest upright ``(width, height)`` that ``config``'s resize reads from without upscaling:
    the input itself under ``full_view`` (a 4:3 input needs its width, not only its height),
    ``resize_size`` on both sides for a centre crop (either side may be the shorter)."""
    if config.resize_mode == FULL_VIEW:
        return config.input_width, config.input_height
    return config.resize_size, config.resize_size


def normalize_batch(batch: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Turn a ``uint8`` NCHW batch into the normalized float input of the model.

    Runs on whatever device ``batch`` is on and returns a channels-last tensor.

    Args:
        batch: ``uint8`` tensor of shape (N, 3, H, W).
        config: The checkpoint's preprocessing parameters.

    Returns:
        ``float32`` tensor of the same shape, in channels-last memory format.
    """
    mean = torch.tensor(config.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    normalized = (batch.float() - mean) / std
    return normalized.contiguous(memory_format=torch.channels_last)
