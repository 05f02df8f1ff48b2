"""Hostile input: every case of the catalogue gets the right answer, alone and inside mixed batches."""

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from handler.inference import HandlerSettings, handle_batch
from handler.model import load_checkpoint
from tests.catalogue import build_catalogue
from tests.conftest import RELEASED_CHECKPOINT

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def lesion_jpeg(samples_dir):
    return (samples_dir / "ISIC_0025032.jpg").read_bytes()


@pytest.fixture(scope="module")
def catalogue(lesion_jpeg):
    return build_catalogue(lesion_jpeg)


@pytest.fixture(scope="module")
def released():
    return load_checkpoint(RELEASED_CHECKPOINT)


def row_for(body):
    return {"body": body}


def assert_answer(case, status, body):
    assert status == case.status, f"{case.name}: {status} {body}"
    if case.error_code:
        assert body["error"]["code"] == case.error_code, case.name
        assert body["error"]["status"] == case.status and len(body["error"]["message"]) > 10, case.name
    else:
        assert len(body["probabilities"]) == 7, case.name


def test_catalogue_in_one_batch_with_valid_images(catalogue, released, lesion_jpeg):
    sample_jpeg = lesion_jpeg
    rows, cases = [], []
    for case in catalogue:
        rows += [row_for(case.body), row_for(sample_jpeg)]
        cases += [case, None]
    responses = handle_batch(released, HandlerSettings(), rows, "1.0.0")
    clean = handle_batch(released, HandlerSettings(), [row_for(sample_jpeg)], "1.0.0")[0].body
    for case, response in zip(cases, responses):
        if case is None:
            # Neighbours are undisturbed: the same answer as alone, up to batch-size-dependent float rounding.
            assert response.status == 200
            assert {k: v for k, v in response.body.items() if k not in ("probabilities", "confidence", "malignant_probability")} == \
                {k: v for k, v in clean.items() if k not in ("probabilities", "confidence", "malignant_probability")}
            assert response.body["probabilities"] == pytest.approx(clean["probabilities"], abs=1e-5)
        else:
            assert_answer(case, response.status, response.body)


def test_malformed_but_decodable_input_predicts_like_its_clean_equivalent(catalogue, released):
    settings = HandlerSettings()
    for case in (c for c in catalogue if c.clean is not None):
        got, want = (handle_batch(released, settings, [row_for(b)], "1")[0].body for b in (case.body, case.clean))
        assert got["prediction"] == want["prediction"], case.name
        tolerance = 0.03 if case.name.startswith("EXIF") else 1e-4  # a rotated re-encode is not bit-exact
        for code, p in want["probabilities"].items():
            assert abs(got["probabilities"][code] - p) <= tolerance, (case.name, code)


def send(server, body):
    url = f"{server.url('inference')}/predictions/skin_lesion"
    headers = server.headers("inference")
    if isinstance(body, dict):
        return requests.post(url, json=body, headers=headers, timeout=60)
    return requests.post(url, data=body, headers={**headers, "Content-Type": "application/octet-stream"}, timeout=60)


def worker_pids(server):
    description = requests.get(f"{server.url('management')}/models/skin_lesion", headers=server.headers("management"),
                               timeout=10).json()[0]
    return [(w["pid"], w["status"]) for w in description["workers"]]


@pytest.mark.slow
def test_catalogue_through_the_real_server_mixed_with_valid_images(torchserve, catalogue, samples_dir):
    valid = [(samples_dir / n).read_bytes() for n in sorted(os.listdir(samples_dir)) if n.endswith(".jpg")][:8]
    before = worker_pids(torchserve)
    jobs = []
    for index, case in enumerate(catalogue):
        jobs += [(case, case.body), (None, valid[index % len(valid)])]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda job: send(torchserve, job[1]), jobs))
    for (case, _), response in zip(jobs, responses):
        assert response.headers["content-type"].startswith("application/json")
        if case is None:
            assert response.status_code == 200, response.text
        else:
            assert_answer(case, response.status_code, response.json())
    # The same workers, all READY: nothing crashed or was replaced.
    after = worker_pids(torchserve)
    assert sorted(pid for pid, _ in after) == sorted(pid for pid, _ in before)
    assert all(status == "READY" for _, status in after)


@pytest.mark.slow
def test_exif_rotated_jpeg_is_explained_upright(torchserve, catalogue):
    case = next(c for c in catalogue if c.name.startswith("EXIF"))
    response = requests.post(f"{torchserve.url('inference')}/explanations/skin_lesion", data=case.body,
                             headers=torchserve.headers("inference"), timeout=60)
    gradcam = response.json()["gradcam"]
    assert (gradcam["width"], gradcam["height"]) == (600, 450)  # stored 450x600, shown upright


@pytest.mark.slow
def test_oversized_bodies_are_refused(torchserve):
    handler_limit = 16 * 1024 * 1024
    frontend_limit = int(torchserve.properties["max_request_size"])
    assert handler_limit < frontend_limit
    response = send(torchserve, b"\xff\xd8" + bytes(handler_limit + 1024))
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    # Above TorchServe's own max_request_size the frontend refuses before any handler runs:
    # still a 413, but TorchServe sends no body (documented in config.properties).
    assert send(torchserve, bytes(frontend_limit + 1024)).status_code == 413
    assert send(torchserve, {"image": base64.b64encode(b"x").decode()}).status_code == 415
