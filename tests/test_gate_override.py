"""The gate's refusal reasons and the operator's override setting, in-process (served path: test_gate_modality_served.py)."""

from __future__ import annotations

import base64
import dataclasses

import pytest
import torch

from handler.checkpoint import load_checkpoint
from handler.inference import BatchTimings, handle_batch, prepare_for_serving
from handler.input_gate import MODALITIES, build_gate_backbone, make_gate_dict
from handler.metrics import GATE_OVERRIDES, PREDICTIONS, REFUSALS, REQUESTS, batch_metric_updates
from handler.responses import InputCheck, Prediction, make_prediction
from handler.settings import HandlerSettings

PROBABILITIES = [0.05, 0.10, 0.05, 0.0, 0.30, 0.45, 0.05]


def refused_check(refusal: str = "not_dermoscopy") -> InputCheck:
    return InputCheck(False, 0.3, 0.48, "test", "clinical", 0.97, 0.6, refusal)


def test_an_overridden_answer_has_probabilities_but_no_class_risk_or_referral():
    body = make_prediction(PROBABILITIES, "1", 0.1, 5, "balanced", refused_check()).to_json()
    assert not {"prediction", "label", "confidence", "most_probable"} & set(body)
    assert body["risk"] == "unknown" and body["referral"] == {"refer": None, "threshold": 0.1}
    assert body["probabilities"]["nv"] == 0.45 and body["malignant_probability"] == pytest.approx(0.45)
    assert body["input_check"]["refusal"] == "not_dermoscopy" and "overridden" in body["notice"]
    again = Prediction.from_json(body)
    assert again.gate_overridden and again.prediction is None and again.referral.refer is None
    accepted = make_prediction(PROBABILITIES, "1", 0.1, 5, "balanced", InputCheck(True, 0.1, 0.48, "test", "dermoscopy",
                                                                                  0.01, 0.6, None)).to_json()
    assert accepted["prediction"] == "nv" and accepted["referral"]["refer"] is True and accepted["risk"] == "high"
    assert accepted["input_check"]["refusal"] is None and not Prediction.from_json(accepted).gate_overridden


def test_metrics_count_an_override_as_an_override_not_as_a_prediction():
    from handler.errors import NotDermoscopyError
    from handler.responses import Response, error_response

    overridden = Response(200, make_prediction(PROBABILITIES, "1", 0.1, 5, "balanced", refused_check("out_of_distribution")))
    ok = Response(200, make_prediction(PROBABILITIES, "1", 0.1, 5, "balanced"))
    refused = error_response(NotDermoscopyError("clinical photo", modality="clinical"))
    updates = batch_metric_updates("m", [overridden, ok, refused], [False] * 3, BatchTimings())
    counters = [(name, dims) for name, kind, _, dims in updates if kind == "counter"]
    assert (GATE_OVERRIDES, ["m", "out_of_distribution"]) in counters
    assert (REQUESTS, ["m", "predict", "gate_overridden"]) in counters and (REQUESTS, ["m", "predict", "ok"]) in counters
    assert (REFUSALS, ["m", "not_dermoscopy"]) in counters
    assert [dims for name, dims in counters if name == PREDICTIONS] == [["m", "nv"]]  # the ok answer only


@pytest.fixture(scope="module")
def gated(tiny_checkpoint):
    """The tiny checkpoint with a random gate whose head calls every image clinical (bias), distance never refusing."""
    torch.manual_seed(0)
    head = {"classes": list(MODALITIES), "weight": torch.zeros(3, 1280), "bias": torch.tensor([0.0, 6.0, 0.0]),
            "threshold": 0.5}
    gate = make_gate_dict(build_gate_backbone().state_dict(), method="test-head", input_size=32, scorer="cosine_knn",
                          threshold=2.0, k=1, reference=torch.randn(4, 1280), modality_head=head)
    loaded = load_checkpoint(tiny_checkpoint)
    loaded.meta.input_gate = gate
    return loaded


def serve(loaded, settings, rows):
    prepare_for_serving(loaded, settings)
    return handle_batch(loaded, settings, rows, "0.0.1-test")


def test_the_override_is_refused_unless_the_operator_allows_it(gated, sample_jpeg):
    encoded = base64.b64encode(sample_jpeg).decode()
    rows = [{"body": {"image": encoded, "allow_out_of_distribution": True}}, {"body": sample_jpeg},
            {"data": sample_jpeg, "allow_out_of_distribution": b"true"}]
    closed = serve(gated, HandlerSettings(), rows)
    assert [r.status for r in closed] == [403, 422, 403]
    assert closed[0].body.code == closed[2].body.code == "gate_override_not_allowed"
    refusal = closed[1].to_json()["error"]
    assert refusal["code"] == "not_dermoscopy" and refusal["modality"] == "clinical" and "dermatoscope" in refusal["advice"]
    assert "allow_out_of_distribution" not in refusal["message"]

    opened = serve(gated, dataclasses.replace(HandlerSettings(), allow_gate_override=True), rows)
    assert [r.status for r in opened] == [200, 422, 200]
    assert opened[0].body.gate_overridden and opened[0].body.prediction is None and opened[0].body.risk == "unknown"
    # A gate whose head accepts everything: the same request answered normally, in or out of an override.
    gated.meta.input_gate["modality_head"]["threshold"] = 1.0
    try:
        accepted = serve(gated, HandlerSettings(), rows[1:2])[0]
    finally:
        gated.meta.input_gate["modality_head"]["threshold"] = 0.5
    assert accepted.status == 200 and accepted.body.prediction is not None
    assert accepted.body.input_check.modality == "clinical" and accepted.body.input_check.refusal is None
