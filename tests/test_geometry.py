"""One geometry from training to serving: ``PreprocessConfig.resize_mode`` in serving, training, evaluation and Grad-CAM."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, load_checkpoint, make_checkpoint, read_checkpoint
from handler.inference import handle_batch
from handler.overlay import OverlayStyle, model_view_box, render_overlay
from handler.preprocessing import (
    CENTER_CROP, FULL_VIEW, PreprocessConfig, load_model_input, resize_for_augmentation, resize_full_view,
    resize_to_model_input)
from handler.settings import HandlerSettings
from lab.data import LabelledImage, LesionDataset, build_eval_transform, build_train_transform
from ops.paths import CHECKPOINT as RELEASED_CHECKPOINT

CROP = PreprocessConfig(image_size=64, resize_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FULL = dataclasses.replace(CROP, resize_mode=FULL_VIEW)


def four_by_three(width: int = 200, height: int = 150) -> Image.Image:
    """A 4:3 picture whose left and right edges (outside a centre crop) are pure red and blue strips."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[:, : width // 14] = (255, 0, 0)
    pixels[:, width - width // 14:] = (0, 0, 255)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("config", [CROP, FULL], ids=["center_crop", "full_view"])
def test_serving_and_eval_transform_give_identical_tensors(config, tmp_path):
    image = four_by_three()
    png = encoded(image, "PNG")
    served, _ = load_model_input(png, config)
    assert served.shape == (3, 64, 64) and served.dtype == torch.uint8
    assert torch.equal(build_eval_transform(config)(image), served)
    (tmp_path / "ISIC_1.png").write_bytes(png)
    tensor, _ = LesionDataset([LabelledImage("ISIC_1", 0, "L1", str(tmp_path / "ISIC_1.png"))], build_eval_transform(config))[0]
    assert torch.equal(tensor, served)
    # A real-sized 4:3 JPEG at the real input size: the served draft decode changes nothing.
    big = dataclasses.replace(config, image_size=224, resize_size=224)
    jpeg = encoded(image, "JPEG", quality=90)
    (tmp_path / "ISIC_2.jpg").write_bytes(jpeg)
    tensor, _ = LesionDataset([LabelledImage("ISIC_2", 0, "L2", str(tmp_path / "ISIC_2.jpg"))], build_eval_transform(big))[0]
    assert torch.equal(tensor, load_model_input(jpeg, big)[0])


def test_full_view_sees_the_whole_image_and_center_crop_does_not():
    image = four_by_three()
    full = load_model_input(encoded(image, "PNG"), FULL)[0]
    crop = load_model_input(encoded(image, "PNG"), CROP)[0]
    assert torch.equal(full, torch.from_numpy(np.array(image.resize((64, 64), Image.Resampling.BILINEAR))).permute(2, 0, 1))
    # The red and blue edge strips are in the full view (squeezed) and cut off by the centre crop.
    assert full[0, :, 0].min() > 200 and full[2, :, -1].min() > 200
    assert crop[0, :, 0].max() < 50 and crop[2, :, -1].max() < 50
    assert resize_to_model_input(image, CROP).size == resize_to_model_input(image, FULL).size == (64, 64)


def test_training_crops_are_cut_from_the_served_geometry():
    image = four_by_three()
    assert resize_for_augmentation(image, CROP).size == (85, 64)  # shorter side to resize_size, 4:3 kept
    assert np.array_equal(np.asarray(resize_for_augmentation(image, FULL)), np.asarray(resize_full_view(image, FULL)))
    torch.manual_seed(0)
    for config in (CROP, FULL):
        augmented = build_train_transform(config)(image)
        assert augmented.shape == (3, 64, 64) and augmented.dtype == torch.uint8


def test_overlay_box_follows_the_geometry():
    assert model_view_box((600, 450), default_preprocess_config("efficientnet_lite0")) == (75, 0, 525, 450)
    full = dataclasses.replace(default_preprocess_config("efficientnet_lite0"), resize_mode=FULL_VIEW)
    assert model_view_box((600, 450), full) == (0, 0, 600, 450)
    assert model_view_box((150, 200), full) == (0, 0, 150, 200)
    image = Image.new("RGB", (600, 450), (120, 60, 30))
    heat = np.ones((7, 7), np.float32)
    original = np.asarray(image)
    cropped = render_overlay(image, heat, default_preprocess_config("efficientnet_lite0"), OverlayStyle(alpha=0.5))
    whole = render_overlay(image, heat, full, OverlayStyle(alpha=0.5))
    assert np.array_equal(cropped[:, :75], original[:, :75])  # outside the crop: untouched
    assert not np.array_equal(whole[:, :75], original[:, :75]) and not np.array_equal(whole[:, 525:], original[:, 525:])


def test_served_gradcam_box_is_the_whole_image_under_full_view(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "full.pt"
    meta = Meta(FULL, version="0.0.1-full", calibration={"none": Calibration(1.0)})
    make_checkpoint(build_model("efficientnet_lite0").eval(), "efficientnet_lite0", FULL, meta).save(path)
    loaded = load_checkpoint(path)
    assert loaded.preprocess.resize_mode == FULL_VIEW
    jpeg = encoded(four_by_three(400, 300), "JPEG", quality=90)
    body = handle_batch(loaded, HandlerSettings(runtime="eager"), [{"body": jpeg}], "t", explain=[True])[0].to_json()
    assert body["gradcam"]["heatmap_box"] in ([0, 0, 400, 300], (0, 0, 400, 300))
    assert (body["gradcam"]["width"], body["gradcam"]["height"]) == (400, 300)


def test_resize_mode_is_stored_and_old_metadata_reads_as_center_crop(tmp_path):
    old = {"image_size": 224, "resize_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    assert PreprocessConfig.from_dict(old).resize_mode == CENTER_CROP
    assert Meta.from_dict({"preprocessing": old}).preprocessing == PreprocessConfig(224, 224, (0.5,) * 3, (0.5,) * 3)
    # A centre-crop config writes what it wrote before the key existed; full_view is recorded.
    assert PreprocessConfig.from_dict(old).to_dict() == old
    assert FULL.to_dict()["resize_mode"] == FULL_VIEW and PreprocessConfig.from_dict(FULL.to_dict()) == FULL
    path = make_checkpoint(torch.nn.Linear(2, 7), "efficientnet_lite0", FULL).save(tmp_path / "c.pt")
    assert read_checkpoint(path).meta.preprocessing == FULL
    assert torch.load(path, weights_only=True)["meta"]["preprocessing"]["resize_mode"] == FULL_VIEW


def test_released_checkpoint_serves_the_whole_view():
    """Release 1.6.1 serves 1.6.0's networks, trained on squashed 224x224 copies, with the whole 4:3 photo
    squashed the same way (full_view) instead of 1.6.0's centre crop, which cut an eighth off each side."""
    if not RELEASED_CHECKPOINT.exists():
        pytest.skip(f"no released checkpoint at {RELEASED_CHECKPOINT}")
    stored = torch.load(RELEASED_CHECKPOINT, map_location="cpu", weights_only=True)["meta"]["preprocessing"]
    assert stored["resize_mode"] == FULL_VIEW
    assert read_checkpoint(RELEASED_CHECKPOINT).meta.preprocessing.resize_mode == FULL_VIEW


def test_invalid_geometries_are_refused():
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessConfig(resize_mode="letterbox")
    with pytest.raises(ValueError, match="must equal"):
        PreprocessConfig(image_size=224, resize_size=256, resize_mode=FULL_VIEW)
