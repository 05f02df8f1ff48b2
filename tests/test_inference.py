import base64
import dataclasses
import json

import pytest
import torch

from handler.errors import EmptyBodyError, InvalidBase64Error, MalformedJSONError, MissingImageError
from handler.inference import handle_batch, predict_probabilities, prepare_for_serving
from handler.requests import parse_request
from handler.responses import make_prediction
from handler.settings import HandlerSettings
from handler.labels import CLASS_CODES
from handler.checkpoint import load_checkpoint
from handler.preprocessing import load_model_input


def test_raw_multipart_and_json_bodies(sample_jpeg):
    encoded = base64.b64encode(sample_jpeg).decode()
    assert parse_request({"body": bytearray(sample_jpeg)}).image == sample_jpeg
    assert parse_request({"data": sample_jpeg}).image == sample_jpeg
    assert parse_request({"body": {"image": encoded}}).image == sample_jpeg
    assert parse_request({"body": json.dumps({"image": encoded}).encode()}).image == sample_jpeg
    assert parse_request({"body": {"image": "data:image/jpeg;base64," + encoded}}).image == sample_jpeg


@pytest.mark.parametrize("row, error", [
    ({"body": b""}, EmptyBodyError),
    ({}, EmptyBodyError),
    ({"gradcam": b"true"}, EmptyBodyError),
    ({"file": b"\xff\xd8 a JPEG under another multipart name"}, MissingImageError),
    ({"body": b"{not json"}, MalformedJSONError),
    ({"body": {"picture": "abc"}}, MissingImageError),
    ({"body": {"image": "%%%not-base64%%%"}}, InvalidBase64Error),
    ({"body": [1, 2]}, MalformedJSONError),
])
def test_bad_bodies_raise_typed_errors(row, error):
    with pytest.raises(error):
        parse_request(row)


def test_misnamed_multipart_field_is_named_in_the_error():
    with pytest.raises(MissingImageError, match=r"\['file'\].*\"data\""):
        parse_request({"file": b"\xff\xd8", "gradcam": b"true"})


def test_format_prediction_contract():
    probs = [0.05, 0.10, 0.05, 0.0, 0.30, 0.45, 0.05]
    body = make_prediction(probs, "1.2.3", referral_threshold=0.4).to_json()
    assert body["prediction"] == "nv" and body["label"] == "Melanocytic nevus"
    assert body["confidence"] == pytest.approx(0.45)
    assert list(body["probabilities"]) == list(CLASS_CODES)
    assert body["malignant_probability"] == pytest.approx(0.45)  # akiec + bcc + mel
    assert body["referral"] == {"refer": True, "threshold": 0.4}
    assert body["risk"] == "high"  # escalated by the referral flag although nv is low risk
    assert body["model_version"] == "1.2.3" and "not a diagnosis" in body["notice"]
    assert make_prediction(probs, "1", referral_threshold=0.9).risk == "low"
    assert body["most_probable"] == "nv" and body["decision_rule"] == "most_probable"


def test_format_prediction_names_the_class_the_rule_chose():
    probs = [0.02, 0.01, 0.05, 0.04, 0.03, 0.83, 0.02]
    body = make_prediction(probs, "1", referral_threshold=0.5, predicted=3, decision_rule="balanced").to_json()
    assert (body["prediction"], body["label"], body["confidence"]) == ("df", "Dermatofibroma", pytest.approx(0.04))
    assert body["most_probable"] == "nv" and body["decision_rule"] == "balanced"
    assert body["risk"] == "low" and body["referral"]["refer"] is False


def test_balanced_rule_calls_and_explains_the_prior_corrected_class(tiny_checkpoint, samples_dir):
    from handler.decision import decide

    loaded = load_checkpoint(tiny_checkpoint)
    images = [(samples_dir / name).read_bytes() for name in sorted(p.name for p in samples_dir.glob("*.jpg"))[:8]]
    rows = [{"body": {"image": base64.b64encode(i).decode(), "gradcam": True}} for i in images]
    usual = handle_batch(loaded, HandlerSettings(), rows, "t")[0].to_json()["prediction"]
    # Make the random model's usual top class very common, so the prior correction has work to do.
    prior = [0.01] * 7
    prior[CLASS_CODES.index(usual)] = 0.94
    loaded.meta.calibration["none"] = dataclasses.replace(loaded.meta.calibration["none"], class_prior=tuple(prior))
    settings = HandlerSettings(decision_rule="balanced")
    prepare_for_serving(loaded, settings)
    bodies = [r.to_json() for r in handle_batch(loaded, settings, rows, "t")]
    probabilities = torch.tensor([list(b["probabilities"].values()) for b in bodies])
    assert [b["prediction"] for b in bodies] == [CLASS_CODES[i] for i in decide(probabilities, "balanced", prior)]
    assert all(b["decision_rule"] == "balanced" and b["gradcam"]["class"] == b["prediction"] for b in bodies)
    assert all(b["most_probable"] == max(b["probabilities"], key=b["probabilities"].get) for b in bodies)
    assert any(b["prediction"] != b["most_probable"] for b in bodies)  # the rule made a difference here


def test_balanced_rule_refuses_a_calibration_without_a_prior(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="no class prior"):
        prepare_for_serving(loaded, HandlerSettings(decision_rule="balanced", tta="flip4"))
    prepare_for_serving(loaded, HandlerSettings(decision_rule="most_probable", tta="flip4"))
    with pytest.raises(ValueError, match="unknown decision rule"):
        HandlerSettings.from_mapping({"decision_rule": "bayes"})


def test_settings_come_from_config_and_reject_typos():
    settings = HandlerSettings.from_mapping({"referral_threshold": "0.3", "max_pixels": 1000})
    assert settings.referral_threshold == 0.3 and settings.decode_limits.max_pixels == 1000
    with pytest.raises(ValueError, match="referal_threshold"):
        HandlerSettings.from_mapping({"referal_threshold": 0.3})


def test_batch_with_bad_requests_answers_each_and_runs_one_forward(tiny_checkpoint, sample_jpeg, monkeypatch):
    loaded = load_checkpoint(tiny_checkpoint)
    calls = []
    forward = loaded.model.forward_features
    monkeypatch.setattr(loaded.model, "forward_features", lambda x: calls.append(x.shape[0]) or forward(x))
    rows = [{"body": sample_jpeg}, {"body": b""}, {"body": b"not an image"}, {"data": sample_jpeg},
            {"body": {"image": "???"}}]
    responses = handle_batch(loaded, HandlerSettings(), rows, "0.0.1-test")
    assert [r.status for r in responses] == [200, 400, 415, 200, 400]
    assert calls == [2]
    assert responses[1].to_json()["error"]["code"] == "empty_body"
    assert responses[2].to_json()["error"]["code"] == "invalid_image"
    good = responses[0].to_json()
    assert sum(good["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert good["prediction"] == max(good["probabilities"], key=good["probabilities"].get)
    assert responses[3].to_json() == good


@pytest.mark.parametrize("tta", ["none", "hflip", "flip4"])
def test_probabilities_use_the_calibration_fitted_for_the_tta_mode(tiny_checkpoint, sample_jpeg, tta):
    from tests.conftest import TINY_CALIBRATION
    from handler.preprocessing import normalize_batch

    loaded = load_checkpoint(tiny_checkpoint)
    batch = load_model_input(sample_jpeg, loaded.preprocess)[0][None]
    probs = predict_probabilities(loaded, batch, tta)
    views = {"none": [batch], "hflip": [batch, batch.flip(3)],
             "flip4": [batch, batch.flip(3), batch.flip(2), batch.flip(2).flip(3)]}[tta]
    with torch.no_grad():
        logits = torch.stack([loaded.model(normalize_batch(v, loaded.preprocess)) for v in views]).mean(0)
    fitted = TINY_CALIBRATION[tta]
    expected = logits / fitted["temperature"] + torch.tensor(fitted["class_bias"] or [0.0] * 7)
    assert torch.allclose(probs, torch.softmax(expected, 1), atol=1e-5)


def test_tta_batch_serves_each_image_like_a_batch_of_one(tiny_checkpoint, samples_dir):
    loaded = load_checkpoint(tiny_checkpoint)
    images = [p.read_bytes() for p in sorted(samples_dir.glob("*.jpg"))[:3]]
    settings = HandlerSettings(tta="flip4")
    together = handle_batch(loaded, settings, [{"body": i} for i in images], "t", [True, False, True])
    for image, response, explain in zip(images, together, [True, False, True]):
        alone = handle_batch(loaded, settings, [{"body": image}], "t", [explain])[0]
        assert response.status == alone.status == 200
        assert response.to_json()["probabilities"] == pytest.approx(alone.to_json()["probabilities"], abs=1e-5)
        assert ("gradcam" in response.to_json()) is explain
        if explain:
            assert torch.allclose(torch.tensor(response.to_json()["gradcam"]["heatmap"]),
                                  torch.tensor(alone.to_json()["gradcam"]["heatmap"]), atol=2e-3)


def test_unknown_tta_mode_is_refused_at_load_time():
    with pytest.raises(ValueError, match="unknown TTA mode"):
        HandlerSettings.from_mapping({"tta": "rotate8"})


def test_byte_limit_applies_to_raw_and_base64_bodies():
    from handler.errors import PayloadTooLargeError

    with pytest.raises(PayloadTooLargeError):
        parse_request({"body": b"x" * 11}, max_bytes=10)
    with pytest.raises(PayloadTooLargeError):
        parse_request({"body": {"image": base64.b64encode(b"y" * 11).decode()}}, max_bytes=10)
    assert parse_request({"body": b"x" * 10}, max_bytes=10).image == b"x" * 10


def test_a_bug_in_one_request_is_that_request_s_500_with_an_id(tiny_checkpoint, sample_jpeg, monkeypatch, caplog):
    """Any exception while serving one request (not only RequestError) is that request's own error."""
    import handler.inference as inference

    loaded = load_checkpoint(tiny_checkpoint)
    real = inference.load_model_input
    poison = b"\xff\xd8 poison"

    def flaky(data, *args, **kwargs):
        if data.startswith(poison):
            raise ZeroDivisionError("a bug met by one image")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(inference, "load_model_input", flaky)
    rows = [{"body": sample_jpeg}, {"body": poison + b"x" * 100}, {"body": sample_jpeg}]
    responses = handle_batch(loaded, HandlerSettings(), rows, "t")
    assert [r.status for r in responses] == [200, 500, 200]
    error = responses[1].to_json()["error"]
    assert error["code"] == "internal_error" and error["request_id"] in error["message"]
    assert error["request_id"] in caplog.text  # the log names the same id, with the traceback


def test_a_forward_pass_that_fails_for_the_batch_is_retried_per_request(tiny_checkpoint, sample_jpeg, samples_dir,
                                                                        monkeypatch):
    loaded = load_checkpoint(tiny_checkpoint)
    other = sorted(samples_dir.glob("*.jpg"))[1].read_bytes()
    forward = loaded.model.forward_features

    def breaks_in_batches(inputs):
        if inputs.shape[0] > 1:
            raise RuntimeError("a kernel bug that only batches meet")
        return forward(inputs)

    monkeypatch.setattr(loaded.model, "forward_features", breaks_in_batches)
    responses = handle_batch(loaded, HandlerSettings(), [{"body": sample_jpeg}, {"body": other}], "t")
    assert [r.status for r in responses] == [200, 200]


def test_grad_cam_of_a_thin_image_renders(tiny_checkpoint):
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (9, 33), (120, 80, 60)).save(buffer, "PNG")  # aspect 3.7:1, inside the limit
    response = handle_batch(load_checkpoint(tiny_checkpoint), HandlerSettings(),
                            [{"body": {"image": base64.b64encode(buffer.getvalue()).decode(), "gradcam": True}}], "t")[0]
    assert response.status == 200
    left, top, right, bottom = response.to_json()["gradcam"]["heatmap_box"]
    assert right > left and bottom > top


def test_echoed_option_values_are_cut_short(sample_jpeg):
    from handler.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError) as refused:
        parse_request({"body": {"image": base64.b64encode(sample_jpeg).decode(), "target_class": "x" * 3_000_000}})
    assert len(str(refused.value)) < 300
