"""Custom Prometheus metrics published through TorchServe's metrics API.

Declared in ``config/metrics.yaml``; TorchServe exposes them on its metrics port next to
its own. Kept apart from the handler so the mapping from a batch to metric updates is a
plain function, testable with a recording stand-in for ``context.metrics``.
"""

from __future__ import annotations

from typing import Any, Sequence

from handler.inference import BatchTimings
from handler.responses import ErrorBody, Prediction, Response

REQUESTS = "skin_lesion_requests_total"
PREDICTIONS = "skin_lesion_predictions_total"
REFERRALS = "skin_lesion_referrals_total"
REFUSALS = "skin_lesion_refusals_total"
GATE_OVERRIDES = "skin_lesion_gate_overrides_total"
CONFIDENCE = "skin_lesion_top_confidence_tenths"
BATCH_SIZE = "skin_lesion_batch_size"
PREPROCESS_SECONDS = "skin_lesion_preprocess_seconds"
INFERENCE_SECONDS = "skin_lesion_inference_seconds"
GRADCAM_SECONDS = "skin_lesion_gradcam_seconds"


def batch_metric_updates(model_name: str, responses: Sequence[Response], explain: Sequence[bool],
                         timings: BatchTimings) -> list[tuple[str, str, float, list[str]]]:
    """The metric updates one batch produces.

    Args:
        model_name: The served model's name (the ``ModelName`` label).
        responses: The batch's responses, in request order (several images each, for some).
        explain: Per request, whether it came through ``/explanations``.
        timings: Where the batch spent its time.

    Returns:
        ``(metric name, type, value, dimension values)`` tuples; type is ``counter`` or
        ``histogram``.
    """
    # Per image: a KServe v1 or Open Inference Protocol request that carried several images
    # counts each (a request refused as a whole counts once, as its refusal).
    images = [(image, explained) for response, explained in zip(responses, explain) for image in response.images]
    updates: list[tuple[str, str, float, list[str]]] = [
        (BATCH_SIZE, "histogram", float(len(images)), [model_name]),  # images, not requests
        (PREPROCESS_SECONDS, "histogram", timings.preprocess, [model_name]),
    ]
    answered = [r.body for r, _ in images if isinstance(r.body, Prediction)]
    if answered:
        updates.append((INFERENCE_SECONDS, "histogram", timings.inference, [model_name]))
    if any(body.gradcam is not None for body in answered):
        updates.append((GRADCAM_SECONDS, "histogram", timings.gradcam, [model_name]))
    for response, explained in images:
        endpoint = "explain" if explained else "predict"
        body = response.body
        if isinstance(body, ErrorBody):
            updates.append((REQUESTS, "counter", 1.0, [model_name, endpoint, body.code]))
            # Refusals by reason: the input gate's, and every other refusal of a client's input
            # (a 5xx is not a refusal but a failure, counted in REQUESTS only).
            if body.status < 500:
                updates.append((REFUSALS, "counter", 1.0, [model_name, body.code]))
            continue
        if body.gate_overridden:
            # An image the gate refused, answered because the operator lets clients override it: not
            # an ok prediction (no class, no referral), counted by the refusal it bypassed.
            updates.append((REQUESTS, "counter", 1.0, [model_name, endpoint, "gate_overridden"]))
            updates.append((GATE_OVERRIDES, "counter", 1.0, [model_name, str(body.input_check.refusal)]))
            continue
        updates.append((REQUESTS, "counter", 1.0, [model_name, endpoint, "ok"]))
        updates.append((PREDICTIONS, "counter", 1.0, [model_name, body.prediction]))
        # The most probable class's probability, whichever class the decision rule named: its drift is the model's.
        updates.append((CONFIDENCE, "histogram", 10.0 * body.probabilities[body.most_probable], [model_name]))
        if body.referral.refer:
            updates.append((REFERRALS, "counter", 1.0, [model_name]))
    return updates


def publish(metrics: Any, updates: Sequence[tuple[str, str, float, list[str]]]) -> None:
    """Send updates to TorchServe's ``context.metrics`` (a MetricsCacheYamlImpl)."""
    from ts.metrics.metric_type_enum import MetricTypes

    types = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
    for name, kind, value, dimensions in updates:
        metrics.get_metric(name, types[kind]).add_or_update(value, dimension_values=dimensions)
