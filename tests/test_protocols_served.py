"""KServe v1 and the Open Inference Protocol through real TorchServe, with clients nobody here wrote.

tritonclient (Triton's HTTP client, the Open Inference Protocol's reference client) calls
``/v2/models/skin_lesion/infer``, and plain ``requests`` sends KServe v1 ``instances`` to
``/v1/models/skin_lesion:predict``: TorchServe 0.12 routes both paths to the handler itself (no
envelope), which tells the protocol by the body. Answers must equal the plain endpoint's for the
golden images, under concurrent requests that share batches, and errors must reach the client
in the protocol's own form. Uses the shared session server (release archive, tokens on).
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from handler.labels import CLASS_CODES
from lab.synthetic_images import generate
from ops.paths import GOLDEN_SMOKE

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev requirement (requirements-dev.txt)")
from tritonclient.utils import InferenceServerException  # noqa: E402
from tests.conftest import post, same_answer

pytestmark = [pytest.mark.slow, pytest.mark.data]
MODEL = "skin_lesion"


@pytest.fixture(scope="module")
def golden(torchserve, samples_dir):
    """(name, image bytes, plain endpoint's answer) for every golden image."""
    cases = json.loads(GOLDEN_SMOKE.read_text())["cases"]
    images = [(case["image"], (samples_dir / case["image"]).read_bytes()) for case in cases]

    def plain(image: bytes) -> dict:
        response = post(torchserve, image, content_type="image/jpeg", timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(plain, [image for _, image in images]))
    return [(name, image, answer) for (name, image), answer in zip(images, answers)]


@pytest.fixture(scope="module")
def triton(torchserve):
    client = httpclient.InferenceServerClient(torchserve.url("inference").removeprefix("http://"), concurrency=16,
                                              network_timeout=300.0, connection_timeout=60.0)
    yield client
    client.close()


def image_input(images: list[bytes]) -> "httpclient.InferInput":
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(image) for image in images], dtype=np.object_),
                               binary_data=False)
    return tensor


def not_dermoscopy() -> bytes:
    return generate(count=1, seed=1)[0].data


def assert_tensors_equal_plain(result, answers: list[dict]) -> None:
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(answers), len(CLASS_CODES)) and probabilities.dtype == np.float32
    expected = np.array([[answer["probabilities"][code] for code in CLASS_CODES] for answer in answers], np.float32)
    assert np.allclose(probabilities, expected, atol=1e-4, rtol=0)  # batch-size digits: see same_answer
    assert [str(p) for p in result.as_numpy("prediction")] == [answer["prediction"] for answer in answers]
    assert result.as_numpy("malignant_probability").tolist() == pytest.approx(
        [answer["malignant_probability"] for answer in answers], abs=1e-4)  # same batch-size digits
    assert result.as_numpy("referral").tolist() == [answer["referral"]["refer"] for answer in answers]
    assert result.as_numpy("in_distribution").tolist() == [answer["input_check"]["in_distribution"] for answer in answers]
    assert [str(c) for c in result.as_numpy("class_names")] == list(CLASS_CODES)


def test_tritonclient_one_and_three_images_per_request_concurrently(triton, torchserve, golden, released_version):
    headers = torchserve.headers("inference")
    singles = [([image], [answer]) for _, image, answer in golden]
    triples = [([image for _, image, _ in golden[i:i + 3]], [answer for _, _, answer in golden[i:i + 3]])
               for i in range(0, len(golden) - 2, 3)]
    requests_ = singles + triples
    pending = [triton.async_infer(MODEL, [image_input(images)], request_id=f"r{i}", headers=headers)
               for i, (images, _) in enumerate(requests_)]
    for i, ((_, answers), handle) in enumerate(zip(requests_, pending)):
        result = handle.get_result()
        response = result.get_response()
        assert response["model_name"] == MODEL and response["model_version"] == released_version
        assert response["id"] == f"r{i}"
        assert_tensors_equal_plain(result, answers)


def test_tritonclient_prints_the_services_errors(triton, torchserve, golden):
    headers = torchserve.headers("inference")
    image = golden[0][1]
    with pytest.raises(InferenceServerException) as refused:
        triton.infer(MODEL, [image_input([image, not_dermoscopy()])], headers=headers)
    # Each image passes the gate on its own; the refusal names the image and the reason.
    assert refused.value.status() == "422"
    assert str(refused.value).startswith("[422] image 2 of 2: ") and "dermoscopic" in str(refused.value)
    with pytest.raises(InferenceServerException) as malformed:
        triton.infer(MODEL, [image_input([b"not an image"])], headers=headers)
    assert malformed.value.status() == "415" and "image 1 of 1" in str(malformed.value)
    with pytest.raises(InferenceServerException) as too_many:
        triton.infer(MODEL, [image_input([image] * 17)], headers=headers)
    assert too_many.value.status() == "413" and "the limit is 16" in str(too_many.value)


def test_v2_explain_path_returns_gradcam_tensors(torchserve, golden):
    _, image, answer = golden[0]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}],
            "outputs": [{"name": "prediction"}, {"name": "gradcam_class"}, {"name": "gradcam_overlay"}]}
    response = post(torchserve, body, path=f"/v2/models/{MODEL}/explain", timeout=300)
    assert response.status_code == 200, response.text[:300]
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    assert list(outputs) == ["prediction", "gradcam_class", "gradcam_overlay"]
    assert outputs["gradcam_class"] == [answer["prediction"]] and base64.b64decode(outputs["gradcam_overlay"][0])


def test_kserve_v1_instances_in_every_shape_concurrently(torchserve, golden):
    encoded = [(base64.b64encode(image).decode(), answer) for _, image, answer in golden]
    shapes = [lambda b: {"image": {"b64": b}}, lambda b: {"data": b}, lambda b: {"b64": b}, lambda b: b]
    bodies = [{"instances": [shapes[i % 4](b)]} for i, (b, _) in enumerate(encoded)]
    bodies.append({"instances": [shapes[i % 4](b) for i, (b, _) in enumerate(encoded[:5])]})

    def predict_v1(body: dict) -> requests.Response:
        return post(torchserve, body, path=f"/v1/models/{MODEL}:predict", timeout=300)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(predict_v1, bodies))
    for (_, answer), response in zip(encoded, responses):
        assert response.status_code == 200, response.text[:300]
        assert same_answer(response.json(), {"predictions": [answer]}), (response.json(), answer)
    assert same_answer(responses[-1].json(), {"predictions": [answer for _, answer in encoded[:5]]})
    # A bad instance gets its own error entry; the others of its request are answered.
    mixed = predict_v1({"instances": [encoded[0][0], base64.b64encode(not_dermoscopy()).decode()]})
    assert mixed.status_code == 200
    first, second = mixed.json()["predictions"]
    assert first == encoded[0][1] and second["error"]["code"] in ("out_of_distribution", "not_dermoscopy")
    # No instance answerable: the request's status, and KServe's {"error": "<message>"}.
    refused = predict_v1({"instances": [{"data": "%%%"}]})
    assert refused.status_code == 400 and refused.json()["error"].startswith("instance 1: ")
