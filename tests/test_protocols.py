"""KServe v1 and Open Inference Protocol bodies through ``handle_batch`` (tiny model, no server).

The real clients (tritonclient, KServe v1 bodies over HTTP) through real TorchServe are in
tests/test_protocols_served.py.
"""

from __future__ import annotations

import base64

import pytest

from handler.checkpoint import load_checkpoint
from handler.inference import BatchTimings, handle_batch, prepare_for_serving
from handler.labels import CLASS_CODES
from handler.metrics import BATCH_SIZE, REQUESTS, batch_metric_updates
from handler.open_inference import OUTPUT_NAMES, model_metadata
from handler.settings import HandlerSettings
from tests.tiny_release import synthetic_jpeg

SETTINGS = HandlerSettings(runtime="eager", max_images_per_request=3)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    prepare_for_serving(model, SETTINGS)
    return model


@pytest.fixture(scope="module")
def jpegs():
    return [synthetic_jpeg(seed) for seed in range(3)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def serve(loaded, *bodies, settings=SETTINGS, explain=None):
    return handle_batch(loaded, settings, [{"body": body} for body in bodies], "1.0", explain)


def v2_body(images, **extra):
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": images}], **extra}


def test_v1_instances_share_the_batch_and_answer_like_plain_requests(loaded, jpegs):
    plain = [response.to_json() for response in serve(loaded, *jpegs)]
    shapes = [{"image": {"b64": b64(jpegs[0])}}, {"data": b64(jpegs[1])}, b64(jpegs[2])]
    responses = serve(loaded, {"instances": shapes}, jpegs[0], {"instances": [{"b64": b64(jpegs[1])}]})
    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[0].to_json() == {"predictions": plain}
    assert responses[1].to_json() == plain[0]
    assert responses[2].to_json() == {"predictions": [plain[1]]}
    # Metrics count images: 3 + 1 + 1 in this batch, each image its own "ok".
    updates = batch_metric_updates("skin_lesion", responses, [False] * 3, BatchTimings())
    assert (BATCH_SIZE, "histogram", 5.0, ["skin_lesion"]) in updates
    assert sum(1 for name, *_ in updates if name == REQUESTS) == 5


def test_a_bad_v1_instance_gets_its_own_entry_and_an_all_bad_request_a_4xx(loaded, jpegs):
    four = {"instances": [b64(jpegs[0]), "%%%", {"picture": 1}, b64(b"not an image")]}
    mixed, all_bad, neighbour = serve(loaded, four, {"instances": [{"data": "%%%"}]}, jpegs[1],
                                      settings=HandlerSettings(runtime="eager"))
    assert mixed.status == 200
    entries = mixed.to_json()["predictions"]
    assert entries[0]["prediction"] in CLASS_CODES
    assert [entry["error"]["code"] for entry in entries[1:]] == ["invalid_base64", "missing_image", "invalid_image"]
    assert all_bad.status == 400 and all_bad.to_json() == {"error": all_bad.body.message}
    assert all_bad.body.message.startswith("instance 1: \"data\" is not valid base64")
    assert neighbour.status == 200


@pytest.mark.parametrize("body, status, words", [
    ({"instances": []}, 400, "non-empty list"),
    ({"instances": "abc"}, 400, "non-empty list"),
    ({"instances": ["a"] * 4}, 413, "4 instances in one request; the limit is 3"),
])
def test_v1_requests_refused_as_a_whole_in_kserve_form(loaded, body, status, words):
    response = serve(loaded, body)[0]
    assert response.status == status and set(response.to_json()) == {"error"}
    assert words in response.to_json()["error"]


def test_v1_images_count_together_toward_max_body_bytes(loaded, jpegs):
    settings = HandlerSettings(runtime="eager", max_body_bytes=len(jpegs[0]) + len(jpegs[1]) - 1)
    response = serve(loaded, {"instances": [b64(jpegs[0]), b64(jpegs[1])]}, settings=settings)[0]
    assert response.status == 413 and "together" in response.to_json()["error"]


def test_v2_outputs_are_the_plain_answers_as_named_tensors(loaded, jpegs):
    plain = [response.to_json() for response in serve(loaded, *jpegs)]
    response = serve(loaded, v2_body([b64(j) for j in jpegs], id="req-7"))[0]
    assert response.status == 200
    body = response.to_json()
    assert body["model_name"] == "skin_lesion" and body["model_version"] == "1.0" and body["id"] == "req-7"
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 7] and outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["data"] == [p["probabilities"][c] for p in plain for c in CLASS_CODES]
    assert outputs["class_names"]["data"] == list(CLASS_CODES)
    assert outputs["prediction"] == {"name": "prediction", "datatype": "BYTES", "shape": [3],
                                     "data": [p["prediction"] for p in plain]}
    assert outputs["malignant_probability"]["data"] == [p["malignant_probability"] for p in plain]
    assert outputs["referral"]["datatype"] == "BOOL"
    assert outputs["referral"]["data"] == [p["referral"]["refer"] for p in plain]
    assert "in_distribution" not in outputs  # the tiny model has no gate
    assert body["parameters"]["decision_rule"] == plain[0]["decision_rule"]
    assert set(outputs) <= set(OUTPUT_NAMES)


def test_v2_parameters_ask_for_gradcam_and_outputs_pick_tensors(loaded, jpegs):
    body = v2_body([b64(jpegs[0]), b64(jpegs[1])], parameters={"target_class": "mel"},
                   outputs=[{"name": "gradcam_class"}, {"name": "prediction"}, {"name": "gradcam_heatmap"}])
    response = serve(loaded, body)[0].to_json()
    assert [output["name"] for output in response["outputs"]] == ["gradcam_class", "prediction", "gradcam_heatmap"]
    assert response["outputs"][0]["data"] == ["mel", "mel"]
    n, height, width = response["outputs"][2]["shape"]
    assert n == 2 and len(response["outputs"][2]["data"]) == n * height * width
    explained = serve(loaded, v2_body([b64(jpegs[0])]), explain=[True])[0].to_json()
    assert any(output["name"] == "gradcam_overlay" for output in explained["outputs"])


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": []}, 400, "exactly one tensor"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, 400, "named \"image\""),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "datatype BYTES"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, 400, "shape [2] for 1 images"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400, "image 1 of 1 is not valid"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4], "data": ["a"] * 4}]}, 413, "the limit is 3"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["a"],
                  "parameters": {"binary_data_size": 9}}]}, 400, "binary tensor data"),
    (v2_body(["aGk="], parameters={"target_class": "cat"}), 400, "unknown target_class"),
    (v2_body(["aGk="], outputs=[{"name": "logits"}]), 400, "unknown outputs"),
])
def test_v2_requests_refused_in_the_protocols_error_form(loaded, body, status, words):
    response = serve(loaded, body)[0]
    assert response.status == status and set(response.to_json()) == {"error"}
    assert isinstance(response.to_json()["error"], str) and words in response.to_json()["error"]


def test_one_bad_v2_image_fails_its_request_only(loaded, jpegs):
    bad, good = serve(loaded, v2_body([b64(jpegs[0]), b64(b"not an image")]), v2_body([b64(jpegs[1])]))
    assert bad.status == 415 and bad.to_json()["error"].startswith("image 2 of 2: ")
    assert good.status == 200


def test_v2_metadata_names_the_input_and_every_output():
    metadata = model_metadata("skin_lesion", ["1.6.0"])
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [output["name"] for output in metadata["outputs"]] == list(OUTPUT_NAMES)
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 7]} in metadata["outputs"]
