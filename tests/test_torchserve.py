"""Integration tests against a real TorchServe serving the released archive on 127.0.0.1."""

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from handler.checkpoint import load_checkpoint
from handler.decision import decide
from handler.inference import predict_probabilities
from handler.labels import CLASS_CODES
from handler.preprocessing import load_model_input
from handler.settings import load_handler_settings
from ops import torchserve as serve
from ops.paths import MODEL_CONFIG
from tests.conftest import RELEASED_CHECKPOINT, held_port, post, ready_server

pytestmark = [pytest.mark.slow, pytest.mark.data]
MODEL = "skin_lesion"


def test_real_jpeg_returns_the_prediction_contract(torchserve, samples_dir, released_version):
    response = post(torchserve, (samples_dir / "ISIC_0024354.jpg").read_bytes())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"prediction", "label", "confidence", "probabilities", "malignant_probability", "risk",
                         "model_version", "referral", "notice"}
    probs = body["probabilities"]
    assert list(probs) == list(CLASS_CODES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert body["most_probable"] == max(probs, key=probs.get)
    settings = load_handler_settings(MODEL_CONFIG)
    calibration = load_checkpoint(RELEASED_CHECKPOINT).calibration(settings.tta)
    called = decide(torch.tensor([list(probs.values())]), settings.decision_rule, calibration.class_prior)
    assert body["decision_rule"] == settings.decision_rule and body["prediction"] == CLASS_CODES[int(called)]
    assert body["confidence"] == probs[body["prediction"]]
    assert body["malignant_probability"] == pytest.approx(probs["mel"] + probs["bcc"] + probs["akiec"], abs=1e-5)
    assert body["risk"] in {"low", "medium", "high"}
    assert body["model_version"] == released_version


def test_multipart_and_base64_json_match_raw_body(torchserve, samples_dir):
    image = (samples_dir / "ISIC_0024412.jpg").read_bytes()
    raw = post(torchserve, image).json()
    multipart = post(torchserve, image, upload="data").json()
    as_json = post(torchserve, None, content_type="application/json").status_code  # an empty JSON request is a client error
    encoded = post(torchserve, {"image": base64.b64encode(image).decode()}).json()
    misnamed = post(torchserve, image, upload="file")
    assert raw == multipart == encoded
    assert 400 <= as_json < 500
    assert misnamed.status_code == 400 and misnamed.json()["error"]["code"] == "missing_image"
    assert "['file']" in misnamed.json()["error"]["message"]


def test_served_probabilities_equal_in_process_handler_code(torchserve, samples_dir):
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    names = sorted(os.listdir(samples_dir))[:6]
    images = [(samples_dir / n).read_bytes() for n in names if n.endswith(".jpg")]
    expected = predict_probabilities(loaded, torch.stack([load_model_input(i, loaded.preprocess)[0] for i in images]))
    for image, row in zip(images, expected):
        served = post(torchserve, image).json()["probabilities"]
        assert torch.allclose(torch.tensor(list(served.values())), row, atol=1e-4)


def test_concurrent_mixed_batches_answer_each_request(torchserve, samples_dir):
    good = [(samples_dir / n).read_bytes() for n in sorted(os.listdir(samples_dir)) if n.endswith(".jpg")][:12]
    bad = [b"", b"not an image at all", good[0][: len(good[0]) // 3]]
    payloads = [(g, 200) for g in good] + [(b, None) for b in bad] * 2
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda p: post(torchserve, p[0]), payloads))
    for (payload, expected), response in zip(payloads, responses):
        if expected == 200:
            assert response.status_code == 200, response.text
            assert len(response.json()["probabilities"]) == 7
        else:
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["error"]["code"] in {"empty_body", "invalid_image"}
    description = requests.get(f"{torchserve.url('management')}/models/{MODEL}", headers=torchserve.headers("management"),
                               timeout=10).json()[0]
    configured = yaml.safe_load(MODEL_CONFIG.read_text())["minWorkers"]
    assert [w["status"] for w in description["workers"]] == ["READY"] * configured  # none crashed
    assert post(torchserve, good[0]).status_code == 200


def test_token_authorization_is_on_and_everything_is_on_loopback(torchserve, samples_dir):
    response = requests.post(f"{torchserve.url('inference')}/predictions/{MODEL}",
                             data=(samples_dir / "ISIC_0024354.jpg").read_bytes(), timeout=30)
    assert response.status_code in (400, 401) and "Token" in response.text
    for api in serve.ADDRESS_KEYS:
        assert torchserve.url(api).startswith("http://127.0.0.1:")
    assert torchserve.properties["metrics_mode"] == "prometheus"
    metrics = requests.get(f"{torchserve.url('metrics')}/metrics", timeout=10)
    assert metrics.ok and "ts_inference_requests_total" in metrics.text


def test_a_port_taken_before_the_bind_gets_a_new_start_and_stop_ends_the_server_by_its_own_pid(
        tmp_path, release_store, monkeypatch):
    # The first ports handed out include one that another process holds (as a free port picked a
    # moment earlier can be): TorchServe fails to bind it, and the start is repeated on new ports.
    picks = []
    original = serve.loopback_addresses
    with held_port() as port:
        taken = f"http://127.0.0.1:{port}"

        def first_pick_taken() -> dict[str, str]:
            picks.append(original() | ({"inference_address": taken} if not picks else {}))
            return picks[-1]

        monkeypatch.setattr(serve, "loopback_addresses", first_pick_taken)
        server = ready_server(tmp_path, release_store)
    assert len(picks) == 2 and server.url("inference") != taken
    assert serve.PORT_TAKEN_MARKER in (tmp_path / "logs" / "console.log").read_text()
    pid = server.launcher_pid
    inference = server.url("inference")
    assert serve.stop(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{inference}/ping", timeout=5)


def test_explanations_endpoint_returns_gradcam_matching_autograd(torchserve, samples_dir):
    from tests.gradcam_reference import autograd_gradcam
    from handler.gradcam import normalize_maps
    from handler.preprocessing import normalize_batch

    image = (samples_dir / "ISIC_0025032.jpg").read_bytes()
    response = post(torchserve, image, explain=True)
    assert response.status_code == 200, response.text
    body = response.json()
    gradcam = body["gradcam"]
    assert gradcam["class"] == body["prediction"] and gradcam["format"] == "jpeg"
    overlay = Image.open(io.BytesIO(base64.b64decode(gradcam["overlay"])))
    assert overlay.size == (600, 450) == (gradcam["width"], gradcam["height"])
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    inputs = normalize_batch(load_model_input(image, loaded.preprocess)[0][None], loaded.preprocess)
    target = torch.tensor([CLASS_CODES.index(gradcam["class"])])
    reference = normalize_maps(autograd_gradcam(loaded.model, inputs, target))[0]
    assert np.abs(np.array(gradcam["heatmap"]) - reference.numpy()).max() <= 1e-3


def test_mixed_predict_and_explain_traffic_shares_batches(torchserve, samples_dir):
    image = (samples_dir / "ISIC_0024412.jpg").read_bytes()
    encoded = base64.b64encode(image).decode()
    calls = [
        lambda: post(torchserve, image),
        lambda: post(torchserve, image, explain=True),
        lambda: post(torchserve, {"image": encoded, "gradcam": True, "target_class": "mel"}),
        lambda: post(torchserve, {"image": encoded, "target_class": "x"}),
    ] * 4
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda call: call(), calls))
    for position, response in enumerate(responses):
        kind = position % 4
        if kind == 3:
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_option"
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        assert ("gradcam" in body) == (kind != 0)
        if kind == 2:
            assert body["gradcam"]["class"] == "mel"
    assert len(responses[1].content) < int(torchserve.properties["max_response_size"])
