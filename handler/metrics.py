"""Custom Prometheus metrics published through TorchServe's metrics API.

Declared in ``config/metrics.yaml``; TorchServe exposes them on its metrics port next to
its own. Kept apart from the handler so the mapping from a batch to metric updates is a
plain function, testable with a recording stand-in for ``context.metrics``.
"""

from __future__ import annotations

from typing import Any, Sequence

from handler.inference import BatchTimings, Response

REQUESTS = "skin_lesion_requests_total"
PREDICTIONS = "skin_lesion_predictions_total"
REFERRALS = "skin_lesion_referrals_total"
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
        responses: The batch's responses, in request order.
        explain: Per request, whether it came through ``/explanations``.
        timings: Where the batch spent its time.

    Returns:
        ``(metric name, type, value, dimension values)`` tuples; type is ``counter`` or
        ``histogram``.
    """
    updates: list[tuple[str, str, float, list[str]]] = [
        (BATCH_SIZE, "histogram", float(len(responses)), [model_name]),
        (PREPROCESS_SECONDS, "histogram", timings.preprocess, [model_name]),
    ]
    ok = [r for r in responses if r.status == 200]
    if ok:
        updates.append((INFERENCE_SECONDS, "histogram", timings.inference, [model_name]))
    if any("gradcam" in r.body for r in ok):
        updates.append((GRADCAM_SECONDS, "histogram", timings.gradcam, [model_name]))
    for response, explained in zip(responses, explain):
        endpoint = "explain" if explained else "predict"
        outcome = "ok" if response.status == 200 else response.body["error"]["code"]
        updates.append((REQUESTS, "counter", 1.0, [model_name, endpoint, outcome]))
        if response.status != 200:
            continue
        updates.append((PREDICTIONS, "counter", 1.0, [model_name, response.body["prediction"]]))
        # The most probable class's probability, whichever class the decision rule named: its drift is the model's.
        top_probability = response.body["probabilities"][response.body["most_probable"]]
        updates.append((CONFIDENCE, "histogram", 10.0 * top_probability, [model_name]))
        if response.body["referral"]["refer"]:
            updates.append((REFERRALS, "counter", 1.0, [model_name]))
    return updates


def publish(metrics: Any, updates: Sequence[tuple[str, str, float, list[str]]]) -> None:
    """Send updates to TorchServe's ``context.metrics`` (a MetricsCacheYamlImpl)."""
    from ts.metrics.metric_type_enum import MetricTypes

    types = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
    for name, kind, value, dimensions in updates:
        metrics.get_metric(name, types[kind]).add_or_update(value, dimension_values=dimensions)
