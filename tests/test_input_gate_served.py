"""The out-of-distribution gate through real TorchServe, serving the release archive.

Synthetic non-dermoscopic images and the held-out half of ``ood-imagenet`` get a 422
(``out_of_distribution``; an everyday photo may be named ``not_dermoscopy`` when the gate takes it
for a clinical photo of skin); real dermoscopy gets a 200 with ``input_check``; a batch mixing both
answers each request on its own; ``/explanations`` follows the same rule. Clinical photos and the
operator's override setting: ``test_gate_modality_served.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lab.ood import everyday_halves
from lab.synthetic_images import generate
from tests.conftest import post

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def held_out_everyday():
    from tests.conftest import DATA

    folder = DATA / "ood-imagenet" / "images"
    if not folder.is_dir():
        pytest.skip(f"everyday photos not found at {folder}")
    _, held_out = everyday_halves(folder)
    # Every 12th held-out photo: ~20 kinds of scene, a short test.
    return [(item.name, item.read()) for item in held_out[::12]]


@pytest.fixture(scope="module")
def synthetic():
    # The report seed (1), not the seed the gate was chosen on (0); two of every kind.
    images = generate(count=40, seed=1)
    return [(image.name, image.data) for image in images]


@pytest.fixture(scope="module")
def dermoscopy(samples_dir):
    return [(path.name, path.read_bytes()) for path in sorted(samples_dir.glob("*.jpg"))[::3]]


def assert_refused(response, name, codes=("out_of_distribution",)):
    assert response.status_code == 422, (name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] in codes, (name, error["code"])
    assert error["score"] > error["threshold"] or error["modality_score"] > error["modality_threshold"], name
    assert "dermatoscope" in error["message"] and error["advice"]
    assert "allow_out_of_distribution" not in error["message"], name


def assert_answered(response, name):
    assert response.status_code == 200, (name, response.status_code, response.text[:300])
    body = response.json()
    check = body["input_check"]
    assert check["in_distribution"] is True and check["score"] <= check["threshold"], name
    assert check["method"] and body["risk"] in ("low", "medium", "high")


def test_mixed_batches_answer_each_request_on_its_own(torchserve, dermoscopy, synthetic, held_out_everyday):
    jobs = [(name, data, "dermoscopy") for name, data in dermoscopy]
    jobs += [(name, data, "synthetic") for name, data in synthetic]
    jobs += [(name, data, "everyday") for name, data in held_out_everyday]
    jobs = sorted(jobs, key=lambda job: hash(job[0]))  # interleave kinds, so batches mix them
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: post(torchserve, job[1]), jobs))
    refused_dermoscopy = []
    for (name, _, kind), response in zip(jobs, responses):
        if kind == "dermoscopy":
            if response.status_code == 422:
                refused_dermoscopy.append(name)
            else:
                assert_answered(response, name)
        else:
            assert_refused(response, name, ("out_of_distribution",) if kind == "synthetic"
                           else ("out_of_distribution", "not_dermoscopy"))
    # The threshold refuses about 1 % of real dermoscopy by design; none of these samples is near it.
    assert not refused_dermoscopy


def test_explanations_follow_the_same_rule(torchserve, synthetic, dermoscopy):
    name, data = synthetic[1]
    assert_refused(post(torchserve, data, explain=True), name)
    name, lesion = dermoscopy[0]
    explained = post(torchserve, lesion, explain=True)
    assert_answered(explained, name)
    assert "gradcam" in explained.json()
