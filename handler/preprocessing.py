"""Image preprocessing shared by training, evaluation, the TorchServe handler and the demo.

Images are decoded and resized on the CPU as ``uint8``; the float conversion and
normalization happen once per batch (on the model's device), so no float work is
done at the original resolution.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from handler.errors import ImageDimensionError, ImageTooLargeError, InvalidImageError

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# EXIF orientations that rotate the stored image by 90 or 270 degrees.
_ORIENTATIONS_ON_SIDE = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that travel with the weights in the checkpoint's metadata.

    Attributes:
        image_size: Side of the square model input.
        resize_size: The shorter side is resized to this before the centre crop. HAM10000's
            600x450 images become 224x224 by this resize-then-crop, which is how the
            ``ham10000-224`` training set was made.
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel standard deviation on the 0..1 scale.
        interpolation: Resampling filter: ``bilinear``, ``bicubic`` or ``lanczos``.
    """

    image_size: int = 224
    resize_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.resize_size < self.image_size:
            raise ValueError("resize_size must be at least image_size")

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form for a checkpoint's metadata."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PreprocessConfig":
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            image_size=int(values["image_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            interpolation=str(values["interpolation"]),
        )


@dataclass(frozen=True)
class DecodeLimits:
    """Safety limits applied before an image's pixels are decoded.

    Attributes:
        max_pixels: Largest width x height accepted (decompression-bomb guard).
        min_side: Smallest width or height accepted.
    """

    max_pixels: int = 40_000_000
    min_side: int = 8


@dataclass
class DecodedImage:
    """An RGB image, EXIF orientation applied, with the size it had when it arrived."""

    image: Image.Image
    original_size: tuple[int, int]


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes safely into an upright RGB PIL image.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, TIFF, GIF, BMP...). Multi-frame
            images use their first frame.
        limits: Pixel limits checked from the header, before pixel decoding.
        draft_size: If given, JPEGs are decoded with DCT scaling straight to the smallest
            size whose sides are all at least this many pixels, which is much cheaper
            than a full decode followed by a resize.

    Returns:
        The decoded image and its original (upright) size.

    Raises:
        InvalidImageError: The bytes are not a decodable image.
        ImageTooLargeError: More pixels than ``limits.max_pixels``.
        ImageDimensionError: A side smaller than ``limits.min_side``.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused before decoding: its header declares more than "
                                 f"{limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("body is not an image in a format we can read (JPEG, PNG, WebP, TIFF, GIF, BMP)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"image header is invalid ({exc})") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageDimensionError(f"image is {width}x{height}; each side must be at least {limits.min_side} pixels")
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        # exif_transpose copies the image even when there is nothing to turn; most images are upright.
        rgb = to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"image data is truncated or corrupted ({exc})") from exc
    upright_size = (height, width) if orientation in _ORIENTATIONS_ON_SIDE else (width, height)
    return DecodedImage(rgb, upright_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB and force the pixel decode.

    Transparent pixels are composited onto black, the background of dermoscopic images;
    16-bit and 32-bit greyscale are rescaled to 8 bits rather than clipped.

    Args:
        image: An opened PIL image in any mode.

    Returns:
        A loaded RGB image.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(np.rint(array / scale * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
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
    decoded = decode_image(data, limits, draft_size=config.resize_size)
    return pil_to_uint8_tensor(resize_center_crop(decoded.image, config)), decoded


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


def build_train_transform(config: PreprocessConfig, min_scale: float = 0.5) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentations for dermoscopy, producing the same ``uint8`` tensors as serving.

    Dermoscopic lesions have no canonical orientation, so all flips and right-angle
    rotations are label-preserving; colour jitter covers differences between
    dermatoscopes and lighting; random resized crops cover zoom and framing.

    Args:
        config: The preprocessing parameters of the model being trained.
        min_scale: Smallest crop area, as a fraction of the resized image.

    Returns:
        A callable from an RGB PIL image to a ``uint8`` CHW tensor.
    """
    from torchvision.transforms import v2

    augment = v2.Compose([
        v2.RandomResizedCrop(config.image_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
        v2.PILToTensor(),
    ])

    def transform(image: Image.Image) -> torch.Tensor:
        return augment(resize_shorter_side(image, config))

    return transform


def build_eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic serving transform, for validation and evaluation datasets."""

    def transform(image: Image.Image) -> torch.Tensor:
        return pil_to_uint8_tensor(resize_center_crop(image, config))

    return transform
