"""The finer maps (LayerCAM at stride 16, RISE at stride 16) against independent references, the
``explanation`` option in-process and through real TorchServe, and the benchmark's scoring code."""

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from handler.architectures import forward_features
from handler.checkpoint import load_checkpoint
from handler.errors import InvalidOptionError
from handler.explainers import FAITHFUL_COARSE_POWER, METHOD_NAMES
from handler.gradcam import gradcam_from_features, normalize_maps
from handler.inference import handle_batch
from handler.layercam import layercam, layercam_fused
from handler.labels import class_index
from handler.preprocessing import load_model_input, normalize_batch
from handler.requests import parse_options
from lab.rise import gaussian_blur, random_masks, rise
from handler.settings import HandlerSettings
from handler.stages import AFTER_FIRST_STRIDE_16, logits_from, run_until
from lab import explanation_benchmark as bench
from ops.paths import MODEL_NAME
from tests.conftest import RELEASED_CHECKPOINT
from tests.gradcam_reference import autograd_layercam, hooked_rise, random_network

SOURCES = ["efficientnet_lite0", "efficientnet_b0", "ensemble"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("shape", [(96, 96), (96, 128)])
def test_two_halves_reproduce_the_model(source, shape):
    model, _ = random_network(source, 0)
    inputs = torch.randn(2, 3, *shape)
    with torch.no_grad():
        expected = model(inputs)
        for stage in (0, AFTER_FIRST_STRIDE_16, 6, 9):
            assert torch.allclose(logits_from(model, run_until(model, inputs, stage), stage), expected, atol=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_layercam_equals_the_hooked_autograd_reference(source):
    model, _ = random_network(source, 1)
    inputs = torch.randn(3, 3, 96, 128)
    targets = torch.tensor([0, 4, 6])
    ours = layercam(model, inputs, targets)
    reference = autograd_layercam(model, inputs, targets)
    assert ours.shape == reference.shape == (3, 6, 8)  # stride 16 of a 96x128 input
    assert (reference > 0).any()
    scale = reference.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    assert torch.allclose(ours / scale, reference / scale, atol=1e-4)
    with torch.inference_mode():  # the served path runs under inference mode
        assert torch.allclose(layercam(model, inputs, targets), ours, atol=1e-6)
    fused = layercam_fused(model, inputs, targets)
    assert fused.shape == ours.shape and float(fused.max()) == pytest.approx(1.0)
    # The Grad-CAM factor's power: the fine map times the stride-32 Grad-CAM (upsampled) squared.
    with torch.no_grad():
        coarse = normalize_maps(gradcam_from_features(model, forward_features(model, inputs), targets))
    coarse = torch.nn.functional.interpolate(coarse[:, None], size=ours.shape[-2:], mode="bilinear")[:, 0]
    expected = normalize_maps(normalize_maps(ours) * coarse.clamp(min=0) ** 2)
    assert torch.allclose(layercam_fused(model, inputs, targets, coarse_power=2.0), expected, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


# A randomly initialized torchvision EfficientNet-B0 maps every such input to the same stride-16 features
# (its outputs do not depend on the image), so RISE has nothing to find there: the timm families only.
@pytest.mark.parametrize("source", ["efficientnet_lite0", "ensemble"])
def test_rise_equals_the_brute_force_reference(source):
    model, _ = random_network(source, 2)
    image = torch.randn(3, 96, 128)
    with torch.no_grad():
        # Raw logits as the scores: a random network's probabilities barely move, and float noise would
        # then dominate the map scaled to its peak.
        ours = rise(model, image[None], torch.tensor([3]), lambda logits: logits, masks=40)[0]
    masks = random_masks(40, 6, 8)
    reference = torch.relu(hooked_rise(model, image, 3, masks, gaussian_blur(image[None])[0], lambda logits: logits))
    assert ours.shape == (6, 8) and reference.max() > 0
    assert torch.allclose(ours, reference / reference.max(), atol=1e-4)


def test_masks_and_blur():
    masks = random_masks(64, 10, 13)
    assert masks.shape == (64, 10, 13) and masks.min() >= 0 and masks.max() <= 1
    assert 0.35 < float(masks.mean()) < 0.65 and torch.equal(masks, random_masks(64, 10, 13))
    flat = torch.full((1, 3, 40, 50), 0.7)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    edge = torch.zeros(1, 1, 40, 50)
    edge[..., 25:] = 1.0
    blurred = gaussian_blur(edge)[0, 0, 20]
    assert blurred.shape == (50,) and 0.3 < float(blurred[25]) < 0.7 and blurred[0] < 0.05 and blurred[-1] > 0.95


def test_explanation_option_is_parsed():
    assert parse_options(b"x", {}).explanation == "fast"
    faithful = parse_options(b"x", {"explanation": "Faithful"})
    assert faithful.explanation == "faithful" and faithful.gradcam
    assert parse_options(b"x", {"explanation": b"fast"}).gradcam
    with pytest.raises(InvalidOptionError, match="explanation"):
        parse_options(b"x", {"explanation": "exact"})
    with pytest.raises(InvalidOptionError):
        parse_options(b"x", {"explanation": ["faithful"]})


@pytest.mark.data
def test_batch_serves_each_request_its_kind_of_map(tiny_checkpoint, sample_jpeg):
    loaded = load_checkpoint(tiny_checkpoint)
    encoded = base64.b64encode(sample_jpeg).decode()
    rows = [{"body": {"image": encoded}}, {"body": {"image": encoded, "explanation": "faithful"}},
            {"body": {"image": encoded, "explanation": "faithful", "target_class": "mel"}},
            {"body": {"image": encoded, "explanation": "slow"}}]
    settings = HandlerSettings(require_input_gate=False, heatmap_decimals=6)
    responses = handle_batch(loaded, settings, rows, "1", explain=[True, False, False, False])
    assert [r.status for r in responses] == [200, 200, 200, 400]
    fast, faithful, melanoma = (responses[i].to_json()["gradcam"] for i in range(3))
    assert fast["method"] == "grad-cam" and faithful["method"] == melanoma["method"] == METHOD_NAMES["faithful"]
    assert np.array(fast["heatmap"]).shape == (2, 2) and np.array(faithful["heatmap"]).shape == (4, 4)  # 64 px input
    assert melanoma["class"] == "mel"
    for gradcam in (fast, faithful):
        overlay = Image.open(io.BytesIO(base64.b64decode(gradcam["overlay"])))
        assert overlay.size == (600, 450) == (gradcam["width"], gradcam["height"])
    inputs = normalize_batch(load_model_input(sample_jpeg, loaded.preprocess)[0][None], loaded.preprocess)
    target = torch.tensor([class_index(faithful["class"])])
    expected = layercam_fused(loaded.model, inputs, target, coarse_power=FAITHFUL_COARSE_POWER)[0]
    assert np.allclose(faithful["heatmap"], expected.numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.data
def test_explanations_api_serves_fast_and_faithful_maps(torchserve, samples_dir):
    image = (samples_dir / "ISIC_0025032.jpg").read_bytes()
    url = f"{torchserve.url('inference')}/explanations/{MODEL_NAME}"
    bodies = {}
    for kind in ("fast", "faithful"):
        response = requests.post(url, json={"image": base64.b64encode(image).decode(), "explanation": kind},
                                 headers=torchserve.headers("inference"), timeout=120)
        assert response.status_code == 200, response.text
        bodies[kind] = response.json()
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    inputs = normalize_batch(load_model_input(image, loaded.preprocess)[0][None], loaded.preprocess)
    height, width = inputs.shape[-2:]
    for kind, stride in (("fast", 32), ("faithful", 16)):
        gradcam = bodies[kind]["gradcam"]
        assert gradcam["method"] == METHOD_NAMES[kind] and gradcam["class"] == bodies[kind]["prediction"]
        assert set(gradcam) == {"class", "overlay", "format", "width", "height", "heatmap", "has_evidence",
                                "heatmap_box", "method"}
        overlay = Image.open(io.BytesIO(base64.b64decode(gradcam["overlay"])))
        assert overlay.size == (600, 450) == (gradcam["width"], gradcam["height"])
        assert overlay.format.lower() == gradcam["format"]
        heat = np.array(gradcam["heatmap"])
        assert heat.shape == (-(-height // stride), -(-width // stride)) and heat.min() >= 0
        assert heat.max() == pytest.approx(1.0) and gradcam["has_evidence"]
    target = torch.tensor([class_index(bodies["faithful"]["gradcam"]["class"])])
    expected = layercam_fused(loaded.model, inputs, target, coarse_power=FAITHFUL_COARSE_POWER)[0]
    assert np.abs(np.array(bodies["faithful"]["gradcam"]["heatmap"]) - expected.numpy()).max() <= 2e-3  # 3 decimals served


def test_benchmark_scores_a_map_that_points_at_the_lesion(tiny_checkpoint, tmp_path):
    """The scoring code on a planted case: a map that is the mask itself must point inside it and put
    all its mass there; one that is its complement must do neither."""
    loaded = load_checkpoint(tiny_checkpoint)
    view = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 20:44] = True
    image_path, mask_path = tmp_path / "ISIC_0.jpg", tmp_path / "ISIC_0.png"
    Image.fromarray(view.permute(1, 2, 0).numpy()).save(image_path, quality=95)
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(mask_path)
    methods = {"mask": lambda loaded, inputs, targets: mask.float(),
               "outside": lambda loaded, inputs, targets: (~mask).float()}
    lesion = bench.Lesion("ISIC_0", "nv", image_path, mask_path)
    with torch.inference_mode():
        row = bench.score_lesion(loaded, lesion, methods, [0.1, 0.2, 0.3, 0.4, 0.5], "most_probable", seed=0)
    inside, outside = row["methods"]["mask"], row["methods"]["outside"]
    assert row["area_share"] == pytest.approx(24 * 24 / 64 / 64)
    assert inside["pointing"] and inside["mass_in_lesion"] == pytest.approx(1.0)
    assert not outside["pointing"] and outside["mass_in_lesion"] == pytest.approx(0.0, abs=1e-6)
    assert inside["peak_distance_px"] == 0.0 and inside["pointing_tolerant"] and outside["peak_distance_px"] > 0
    assert len(inside["deletion"]) == len(inside["insertion"]) == 6 and inside["deletion"][0] == row["original"]
    assert inside["insertion"][0] == pytest.approx(row["blurred"])
    assert bench.auc([0.0, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    # The same row with the perturbed views run on the folded copy (as run_benchmark does).
    with torch.inference_mode():
        folded_row = bench.score_lesion(loaded, lesion, methods, [0.1, 0.2, 0.3, 0.4, 0.5], "most_probable", seed=0,
                                        perturbed_model=bench.folded_copy(loaded.model))
    for name in methods:
        for curve in ("deletion", "insertion"):
            assert np.allclose(folded_row["methods"][name][curve], row["methods"][name][curve], rtol=0, atol=1e-5)
    assert folded_row["random_drop"] == pytest.approx(row["random_drop"], abs=1e-5)


def test_each_method_is_scored_on_its_own_perturbed_views(tiny_checkpoint, tmp_path):
    """A method's deletion and insertion curves are the same whether it is scored alone or after
    another method: every method's perturbed views share one batch, and each must read its own.
    (Maps without ties, so that the random tie-breaking cannot differ between the two runs.)"""
    loaded = load_checkpoint(tiny_checkpoint)
    view = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    image_path, mask_path = tmp_path / "ISIC_1.jpg", tmp_path / "ISIC_1.png"
    Image.fromarray(view.permute(1, 2, 0).numpy()).save(image_path, quality=95)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask_path)
    lesion = bench.Lesion("ISIC_1", "nv", image_path, mask_path)
    ramp = torch.arange(64 * 64, dtype=torch.float32).view(64, 64) / (64 * 64)
    first = {"rows first": lambda loaded, inputs, targets: 1 - ramp}
    second = {"columns first": lambda loaded, inputs, targets: 1 - ramp.T}
    fractions = [0.1, 0.2, 0.3, 0.4, 0.5]
    with torch.inference_mode():
        together = bench.score_lesion(loaded, lesion, {**first, **second}, fractions, "most_probable", seed=0)
        alone = bench.score_lesion(loaded, lesion, second, fractions, "most_probable", seed=0)
    for curve in ("deletion", "insertion"):
        assert np.allclose(together["methods"]["columns first"][curve], alone["methods"]["columns first"][curve],
                           rtol=0, atol=1e-6)
    assert together["methods"]["rows first"]["deletion"] != together["methods"]["columns first"]["deletion"]


@pytest.mark.parametrize("source", SOURCES)
def test_folded_copy_predicts_as_the_model(source):
    """The benchmark runs its perturbed views on a copy with the batch norms folded into the
    convolutions: every norm must be gone and the logits unchanged (random norm statistics)."""
    model, _ = random_network(source, seed=3)
    folded = bench.folded_copy(model)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    inputs = torch.randn(3, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model(inputs), folded(inputs.contiguous(memory_format=torch.channels_last))
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_pointing_tolerance_is_measured_in_original_pixels():
    """A full 4:3 view squeezed to 224x224 spans 600/224 original pixels per column, 450/224 per row."""
    from types import SimpleNamespace

    mask = torch.zeros(224, 224, dtype=torch.bool)
    mask[100:110, 100:110] = True
    spacing = bench.original_pixel_size(SimpleNamespace(resize_mode="full_view", resize_size=224), (224, 224))
    distance = bench.distance_to_mask(mask, spacing)
    assert distance[105, 105] == 0.0
    assert float(distance[105, 115]) == pytest.approx(6 * 600 / 224, rel=1e-5)
    assert float(distance[115, 105]) == pytest.approx(6 * 450 / 224, rel=1e-5)
    crop = bench.original_pixel_size(SimpleNamespace(resize_mode="shorter_side_center_crop", resize_size=256), (224, 224))
    assert crop == (450 / 256, 450 / 256)


def test_stratified_subset_keeps_every_class(tmp_path):
    lesions = [bench.Lesion(f"ISIC_{i}", dx, tmp_path, tmp_path)
               for i, dx in enumerate(["nv"] * 80 + ["mel"] * 15 + ["df"] * 3 + ["vasc"] * 2)]
    subset = bench.stratified_subset(lesions, 20, seed=1)
    counts = {dx: sum(lesion.dx == dx for lesion in subset) for dx in ("nv", "mel", "df", "vasc")}
    assert counts == {"nv": 16, "mel": 3, "df": 2, "vasc": 2}
    assert len({lesion.image_id for lesion in subset}) == len(subset)
    assert bench.stratified_subset(lesions, None) == lesions


def test_demo_names_each_method_and_asks_for_it():
    import app
    from demo.client import prediction_request

    assert app.method_title({"method": METHOD_NAMES["fast"]}) == "Grad-CAM"
    assert app.method_title({"method": METHOD_NAMES["faithful"]}).startswith("LayerCAM")
    assert app.method_title({}) == "Grad-CAM"  # a server from before the method field
    assert [value for _, value in app.EXPLANATION_CHOICES] == ["fast", "faithful"]
    assert prediction_request(b"x", None, "faithful")["explanation"] == "faithful"
    assert parse_options(b"x", prediction_request(b"x", "mel", "faithful")).explanation == "faithful"
