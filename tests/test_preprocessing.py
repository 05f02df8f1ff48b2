import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import ImageDimensionError, ImageTooLargeError, InvalidImageError
from handler.preprocessing import (
    DecodeLimits, PreprocessConfig, decode_image, load_model_input, normalize_batch, resize_center_crop)
from lab.data import build_eval_transform, build_train_transform

CONFIG = PreprocessConfig(image_size=224, resize_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient_image(width: int = 120, height: int = 80) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2))


def test_config_round_trips_through_plain_dict():
    assert PreprocessConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError):
        PreprocessConfig(interpolation="nearest-ish")


def test_exif_orientation_is_applied():
    image = gradient_image(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: rotate 270 degrees to display
    rotated = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert rotated.image.size == (80, 120)
    assert rotated.original_size == (80, 120)
    expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(rotated.image, dtype=float) - expected).mean() < 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(mode):
    image = gradient_image().convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(gradient_image().convert("L"), dtype=np.uint16) * 257)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    decoded = decode_image(encode(image, fmt))
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (120, 80)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert 100 < np.asarray(decoded.image).mean() < 160


def test_resize_then_center_crop_keeps_aspect():
    image = gradient_image(600, 450)
    out = resize_center_crop(image, CONFIG)
    assert out.size == (224, 224)
    reference = image.crop((75, 0, 525, 450)).resize((224, 224), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(reference, dtype=float)).mean() < 3


def test_jpeg_draft_decode_matches_full_decode(sample_jpeg):
    fast, decoded = load_model_input(sample_jpeg, CONFIG)
    full = np.asarray(resize_center_crop(Image.open(io.BytesIO(sample_jpeg)).convert("RGB"), CONFIG), dtype=float)
    assert fast.dtype == torch.uint8 and fast.shape == (3, 224, 224)
    assert decoded.original_size == (600, 450)
    assert np.abs(fast.permute(1, 2, 0).numpy().astype(float) - full).mean() < 4


# A 4:3 full-view input, as the 4:3 students use: 256 wide, 192 high.
WIDE_CONFIG = PreprocessConfig(image_size=192, resize_size=192, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                               resize_mode="full_view", image_width=256)


@pytest.mark.parametrize("stored, orientation, decoded_size", [
    ((600, 450), 1, (300, 225)),  # halved: 300x225 still holds 256x192
    ((500, 400), 1, (500, 400)),  # halved would be 250 wide, under the input's 256
    ((450, 600), 6, (300, 225)),  # stored on its side: the draft is asked in the stored orientation
    ((520, 400), 6, (400, 520)),  # upright 400x520: halved would be 200 wide, under 256
])
def test_jpeg_draft_keeps_every_side_of_a_rectangular_input(stored, orientation, decoded_size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(gradient_image(*stored), "JPEG", exif=exif.tobytes(), quality=95)
    tensor, decoded = load_model_input(data, WIDE_CONFIG)
    assert decoded.image.size == decoded_size
    assert decoded.image.width >= 256 and decoded.image.height >= 192
    assert tuple(tensor.shape) == (3, 192, 256)


def test_normalize_batch_uses_checkpoint_mean_and_std():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize_batch(batch, CONFIG)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.ones_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_train_and_eval_transforms_produce_serving_tensors():
    image = gradient_image(300, 225)
    train = build_train_transform(CONFIG)(image)
    evaluation = build_eval_transform(CONFIG)(image)
    assert train.dtype == evaluation.dtype == torch.uint8
    assert train.shape == evaluation.shape == (3, 224, 224)


def test_not_an_image_and_truncated_jpeg_are_rejected(sample_jpeg):
    with pytest.raises(InvalidImageError):
        decode_image(b"this is not an image")
    with pytest.raises(InvalidImageError):
        decode_image(sample_jpeg[: len(sample_jpeg) // 2])


def test_pixel_limits_are_checked_before_decoding():
    big = encode(Image.new("RGB", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(big, DecodeLimits(max_pixels=1_000_000))
    with pytest.raises(ImageDimensionError):
        decode_image(encode(Image.new("RGB", (1, 1))))
