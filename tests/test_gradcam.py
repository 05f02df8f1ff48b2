"""Closed-form batched Grad-CAM against autograd and against the independent grad-cam package."""

import base64
import io
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from handler.gradcam import gradcam_from_features, normalize_maps
from handler.inference import handle_batch
from handler.settings import HandlerSettings
from handler.labels import class_index
from handler.architectures import default_preprocess_config, feature_layer, forward_features, forward_head
from handler.checkpoint import load_checkpoint
from handler.overlay import OverlayStyle, model_view_box, render_overlay
from handler.preprocessing import load_model_input, normalize_batch
from tests.conftest import RELEASED_CHECKPOINT
from tests.gradcam_reference import autograd_gradcam, random_network

ARCHS = ["efficientnet_lite0", "efficientnet_b0"]


def real_batch(samples_dir, preprocess, count=4):
    names = sorted(n for n in os.listdir(samples_dir) if n.endswith(".jpg"))[::17][:count]
    batch = torch.stack([load_model_input((samples_dir / n).read_bytes(), preprocess)[0] for n in names])
    return normalize_batch(batch, preprocess)


@pytest.mark.parametrize("arch", [*ARCHS, "ensemble"])
def test_feature_and_head_split_reproduces_the_model(arch):
    model, _ = random_network(arch, 0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(forward_head(model, forward_features(model, x)), model(x), atol=1e-5)


@pytest.mark.data
@pytest.mark.parametrize("arch,seed", [(a, s) for a in [*ARCHS, "ensemble"] for s in (0, 1)])
def test_closed_form_equals_autograd_on_real_images(arch, seed, samples_dir):
    model, preprocess = random_network(arch, seed)
    inputs = real_batch(samples_dir, preprocess)
    targets = torch.tensor([0, 4, 5, 6])
    with torch.no_grad():
        ours = gradcam_from_features(model, forward_features(model, inputs), targets)
    reference = autograd_gradcam(model, inputs, targets)
    scale = reference.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    assert torch.allclose(ours / scale, reference / scale, atol=1e-4)
    assert (reference > 0).any()


@pytest.mark.data
@pytest.mark.parametrize("model_source", ["released", *ARCHS, "ensemble"])
def test_matches_the_grad_cam_package(model_source, samples_dir):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if model_source == "released":
        loaded = load_checkpoint(RELEASED_CHECKPOINT)
        model, preprocess = loaded.model, loaded.preprocess
    else:
        model, preprocess = random_network(model_source, 3)
    inputs = real_batch(samples_dir, preprocess)
    targets = [class_index("mel"), class_index("nv"), class_index("bcc"), class_index("bkl")]
    with GradCAM(model=model, target_layers=[feature_layer(model)]) as cam:
        theirs = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in targets])
    with torch.no_grad():
        raw = gradcam_from_features(model, forward_features(model, inputs), torch.tensor(targets)).numpy()
    for ours, reference in zip(raw, theirs):
        # Same post-processing as the package: min-max scale, resize to the input size,
        # and min-max scale again when the layers are aggregated.
        ours = ours - ours.min()
        ours = cv2.resize(ours / (1e-7 + ours.max()), reference.shape[::-1])
        ours = ours - ours.min()
        ours = ours / (1e-7 + ours.max())
        assert np.abs(ours - reference).max() < 1e-3
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_overlay_covers_the_model_view_at_original_size():
    config = default_preprocess_config("efficientnet_lite0")
    image = Image.new("RGB", (600, 450), (120, 60, 30))
    assert model_view_box(image.size, config) == (75, 0, 525, 450)
    heat = np.zeros((7, 7), np.float32)
    heat[3, 3] = 1.0
    overlay = render_overlay(image, heat, config, OverlayStyle(alpha=0.5))
    assert overlay.shape == (450, 600, 3)
    original = np.asarray(image)
    assert np.array_equal(overlay[:, :75], original[:, :75]) and np.array_equal(overlay[:, 525:], original[:, 525:])
    assert not np.array_equal(overlay[225, 300], original[225, 300])
    assert np.array_equal(render_overlay(image, heat, config, OverlayStyle(alpha=0.0)), original)


@pytest.mark.data
def test_mixed_batch_explains_per_request_in_one_forward(samples_dir, monkeypatch):
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    calls = []
    forward = loaded.model.forward_features
    monkeypatch.setattr(loaded.model, "forward_features", lambda x: calls.append(len(x)) or forward(x))
    image = (samples_dir / "ISIC_0024354.jpg").read_bytes()
    encoded = base64.b64encode(image).decode()
    rows = [
        {"body": image},                                              # plain prediction
        {"body": {"image": encoded, "gradcam": True}},                # Grad-CAM of the top class
        {"body": image},                                              # came through /explanations
        {"body": {"image": encoded, "target_class": "mel"}},          # explain melanoma
        {"body": {"image": encoded, "target_class": "cancer"}},       # bad option: 400, others unaffected
        {"data": image, "gradcam": b"true", "target_class": b"bcc", "overlay_format": b"png"},  # multipart fields
    ]
    responses = handle_batch(loaded, HandlerSettings(), rows, "1.0.0", explain=[False, False, True, False, False, False])
    assert [r.status for r in responses] == [200, 200, 200, 200, 400, 200]
    assert calls == [5]
    assert "gradcam" not in responses[0].to_json()
    assert responses[4].to_json()["error"]["code"] == "invalid_option"
    top = responses[0].to_json()["prediction"]
    assert [responses[i].to_json()["gradcam"]["class"] for i in (1, 2, 3, 5)] == [top, top, "mel", "bcc"]
    for index in (1, 2, 3, 5):
        gradcam = responses[index].to_json()["gradcam"]
        decoded = Image.open(io.BytesIO(base64.b64decode(gradcam["overlay"])))
        assert decoded.format == ("PNG" if index == 5 else "JPEG") == gradcam["format"].upper()
        assert decoded.size == (600, 450) == (gradcam["width"], gradcam["height"])
        heat = np.array(gradcam["heatmap"])
        # A map is scaled to peak 1, or is zero everywhere when nothing supports the class
        # (release 1.3.0 found no melanoma evidence in this nevus).
        assert heat.shape == (7, 7) and heat.min() >= 0
        assert heat.max() == (pytest.approx(1.0) if gradcam["has_evidence"] else 0.0)
        assert responses[index].to_json()["probabilities"] == responses[0].to_json()["probabilities"]
    assert responses[1].to_json()["gradcam"]["has_evidence"]  # the named class has support somewhere


@pytest.mark.data
def test_explain_path_leaves_no_hooks_or_gradients(samples_dir):
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    image = (samples_dir / "ISIC_0024412.jpg").read_bytes()
    settings = HandlerSettings(gradcam_format="png")
    first = None
    for _ in range(30):
        response = handle_batch(loaded, settings, [{"body": image}] * 2, "1.0.0", explain=[True, True])[0]
        first = first or response.to_json()["gradcam"]["heatmap"]
        assert response.to_json()["gradcam"]["heatmap"] == first
    assert all(p.grad is None for p in loaded.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in loaded.model.modules())
    assert torch.is_grad_enabled()


@pytest.mark.data
def test_served_heatmap_equals_autograd_reference(samples_dir):
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    image = (samples_dir / "ISIC_0025032.jpg").read_bytes()
    body = handle_batch(loaded, HandlerSettings(heatmap_decimals=6), [{"body": {"image": base64.b64encode(image).decode(),
                                                                              "target_class": "mel"}}], "1")[0].to_json()
    inputs = normalize_batch(load_model_input(image, loaded.preprocess)[0][None], loaded.preprocess)
    reference = normalize_maps(autograd_gradcam(loaded.model, inputs, torch.tensor([class_index("mel")])))[0]
    assert np.allclose(np.array(body["gradcam"]["heatmap"]), reference.numpy(), atol=1e-5)
