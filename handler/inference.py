"""Serve one batch: per-request parsing and errors, one forward pass, the input gate, Grad-CAM.

The request walk is ``handler.skin_lesion_handler -> handle_batch -> preprocessing / model ->
handler.responses``. ``handle_batch`` reads the requests, then serves their images in three named
stages, like TorchServe's preprocess / inference / postprocess: :func:`read_images` (decode),
:func:`forward_images` (one forward pass, the gate, the decision) and :func:`answer_images`
(refusals, explanations, answers), each timed in :class:`BatchTimings`. Every stage guards each request on its own: a request error becomes that
request's 4xx, a bug met while serving one request becomes that request's 500 with an id to
find it in the log, and neither ever fails the other requests of the batch.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from handler.calibration import augmented_views, merge_views
from handler.checkpoint import LoadedModel
from handler.decision import decide
from handler.errors import (GateOverrideNotAllowedError, InternalError, NotDermoscopyError, OutOfDistributionError,
                            RequestError)
from handler.explainers import FAST, METHOD_NAMES, explanation_maps
from handler.input_gate import CLINICAL, GateAssessment, InputGate
from handler.labels import CLASS_CODES
from handler.overlay import encode_image, model_view_box, render_overlay
from handler.preprocessing import decode_image, load_model_input, normalize_batch
from handler.protocols import ShapedRequest, read_request, respond
from handler.requests import ParsedRequest
from handler.responses import GradcamResult, InputCheck, Response, error_response, make_prediction
from handler.runtime import COMPILED_RUNTIMES, build_runner
from handler.settings import HandlerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class BatchTimings:
    """Where one batch spent its time, in seconds, for the latency metrics."""

    preprocess: float = 0.0
    inference: float = 0.0
    gradcam: float = 0.0


def guarded(index: int, total: int, step: str, work: Callable[[], T]) -> T | Response:
    """Run one request's ``step``; any exception becomes that request's own error response.

    A :class:`RequestError` is the client's problem (its own 4xx). Anything else is a bug: it is
    logged with its traceback and an id, and the client gets a 500 carrying the same id.
    """
    try:
        return work()
    except RequestError as error:
        logger.info("request %d of %d refused at %s: %s %s", index + 1, total, step, int(error.status), error)
        return error_response(error)
    except Exception:  # noqa: BLE001 - the guard's purpose: one request's bug never fails the batch
        request_id = uuid.uuid4().hex[:12]
        logger.exception("request %d of %d failed at %s (request id %s)", index + 1, total, step, request_id)
        return error_response(InternalError(f"internal error while {step}; request id {request_id}",
                                            request_id=request_id))


def run_model(loaded: LoadedModel, batch: torch.Tensor, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a ``uint8`` batch and, with ``tta``, its flipped views.

    Returns:
        ``(features, logits)``: the last feature map of the unaugmented images (N, C, h, w)
        and the view-averaged raw logits (N, 7), on the model's device.
    """
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        batch = batch.pin_memory()  # page-locked, so the copy below is a true asynchronous DMA
    inputs = normalize_batch(batch.to(device, non_blocking=True), loaded.preprocess)
    features, logits = loaded.features_and_logits(augmented_views(inputs, tta))
    return features[: len(batch)], merge_views(logits.float(), tta)


def prepare_for_serving(loaded: LoadedModel, settings: HandlerSettings) -> None:
    """Apply the runtime settings to a loaded model, once per worker.

    Sets the intra-op thread count, enables cuDNN autotuning on GPUs, builds the runtime
    (eager or frozen TorchScript, with autocast), builds the input gate from the checkpoint,
    and checks that what the settings need is there.

    Raises:
        ValueError: No calibration for ``settings.tta``, no class prior for the ``balanced``
            rule, or no input gate while ``settings.require_input_gate``.
    """
    calibration = loaded.calibration(settings.tta)
    if settings.decision_rule == "balanced" and calibration.class_prior is None:
        raise ValueError(f"checkpoint {loaded.version}'s {settings.tta!r} calibration has no class prior, which the "
                         "balanced decision rule needs; rerun scripts/calibrate.py")
    if settings.require_input_gate and loaded.meta.input_gate is None:
        raise ValueError(f"checkpoint {loaded.version} has no input gate (meta.input_gate) and the settings require "
                         "one; fit it with scripts/fit_input_gate.py")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loaded.runner = build_runner(loaded.model, settings.runtime, settings.precision,
                                 (loaded.preprocess.input_height, loaded.preprocess.input_width),
                                 settings.torch_threads)
    if loaded.meta.input_gate is not None:
        loaded.gate = InputGate.from_dict(loaded.meta.input_gate).to(device)
        if settings.runtime in COMPILED_RUNTIMES:
            loaded.gate.freeze(settings.runtime, settings.torch_threads)


@torch.inference_mode()
def predict_probabilities(loaded: LoadedModel, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Calibrated class probabilities for a ``uint8`` batch in one forward pass, (N, 7) on the CPU."""
    _, logits = run_model(loaded, batch, tta)
    return loaded.calibration(tta).apply(logits).cpu()


def format_gradcam(request: ParsedRequest, heatmap: torch.Tensor, target: int, loaded: LoadedModel,
                   settings: HandlerSettings, method: str = METHOD_NAMES[FAST]) -> GradcamResult:
    """The explanation of one request: overlay on the full-resolution original, plus the raw map."""
    # The image is decoded a second time, on purpose: the read stage decoded it straight to the
    # model's input size (JPEG draft, box reduction) and kept only that small tensor, while the
    # overlay is drawn on the original at up to gradcam_max_side. Keeping every request's larger
    # decode until the answer stage would hold that memory for the predictions too, which never
    # use it; decoding again costs one decode per explanation, small next to its maps.
    # Decoded no larger than the overlay needs (its longer side is cut to gradcam_max_side): a
    # 40 MP JPEG drafted, a huge PNG box-reduced, within the decode budget's memory.
    original = decode_image(request.image, settings.decode_limits, draft_size=settings.gradcam_max_side,
                            reduce_gap=1).image
    style = settings.overlay_style
    if request.overlay_format:
        style = replace(style, image_format=request.overlay_format)
    overlay = render_overlay(original, heatmap.numpy(), loaded.preprocess, style)
    return GradcamResult(
        class_code=CLASS_CODES[target],
        overlay=base64.b64encode(encode_image(overlay, style)).decode("ascii"),
        format=style.image_format,
        width=int(overlay.shape[1]),
        height=int(overlay.shape[0]),
        heatmap=[[round(float(v), settings.heatmap_decimals) for v in row] for row in heatmap.tolist()],
        # Grad-CAM is zero everywhere when no region raises the class's score (e.g. "mel" asked
        # of a clear nevus): say so rather than leave a blank overlay to interpretation.
        has_evidence=bool(heatmap.max() > 0),
        heatmap_box=model_view_box((overlay.shape[1], overlay.shape[0]), loaded.preprocess),
        method=method,
    )


def input_checks(gate: InputGate, assessment: GateAssessment) -> list[InputCheck]:
    """One :class:`InputCheck` per image of an assessed batch."""
    not_dermoscopy = assessment.not_dermoscopy
    checks = []
    for i in range(len(assessment.score)):
        reason = assessment.reason(i)
        checks.append(InputCheck(
            not bool(assessment.refused[i]), round(float(assessment.score[i]), 6), round(gate.threshold, 6), gate.method,
            assessment.modality(i), None if not_dermoscopy is None else round(float(not_dermoscopy[i]), 6),
            None if gate.head_threshold is None else round(gate.head_threshold, 6),
            None if reason is None else NotDermoscopyError.code if reason == CLINICAL else OutOfDistributionError.code))
    return checks


def gate_refusal(check: InputCheck) -> RequestError:
    """The 422 for an image the gate refused: ``not_dermoscopy`` (a clinical photo) or ``out_of_distribution``.

    It says what the image looks like and what to send instead; the gate's figures go along
    for the client's log. How to bypass the gate is the operator's business, not the client's.
    """
    figures = {"modality": check.modality if check.refusal == NotDermoscopyError.code else "other",
               "score": check.score, "threshold": check.threshold}
    if check.modality_score is not None:
        figures.update(modality_score=check.modality_score, modality_threshold=check.modality_threshold)
    if check.refusal == NotDermoscopyError.code:
        advice = "take the photo through a dermatoscope and send that image"
        return NotDermoscopyError(
            "this looks like a photo of the skin taken without a dermatoscope (a clinical photo); the model judges "
            f"only dermoscopic images, and on clinical photos its answers are close to chance: {advice}",
            advice=advice, **figures)
    advice = "send a dermoscopic photo (taken through a dermatoscope) of one skin lesion"
    return OutOfDistributionError(
        f"this does not look like a dermoscopic image of a skin lesion, so the model cannot judge it: {advice}",
        advice=advice, **figures)


def _forward(loaded: LoadedModel, inputs: list[torch.Tensor], settings: HandlerSettings
             ) -> tuple[torch.Tensor, torch.Tensor, list[InputCheck] | None]:
    """Features, calibrated probabilities and the gate's checks of a list of uint8 inputs, in one pass."""
    batch = torch.stack(inputs)
    features, logits = run_model(loaded, batch, settings.tta)
    probabilities = loaded.calibration(settings.tta).apply(logits).cpu()
    checks = None
    if loaded.gate is not None:
        checks = input_checks(loaded.gate, loaded.gate.assess(batch.to(features.device)))
    return features, probabilities, checks


@torch.inference_mode()
def handle_batch(loaded: LoadedModel, settings: HandlerSettings, rows: Sequence[Mapping[str, Any]], model_version: str,
                 explain: Sequence[bool] | None = None, timings: BatchTimings | None = None,
                 content_types: Sequence[str | None] | None = None, model_name: str = "skin_lesion") -> list[Response]:
    """Serve one TorchServe batch: per-request parsing and errors, one forward pass for the rest.

    Predictions and explanations can share a batch: Grad-CAM is decided per request. An image
    the input gate judges out of distribution gets a 422 unless its request allows it. A
    request may carry several images (KServe v1 ``instances``, Open Inference Protocol
    ``inputs``: :mod:`handler.protocols`): each is one item of the same forward pass, served
    like a single-image request, and the request's answer is put back together from them.

    Args:
        loaded: The served model (after :func:`prepare_for_serving`).
        settings: The handler settings.
        rows: TorchServe's request rows.
        model_version: Version reported in every response.
        explain: Per request, whether it came through the explanations API.
        timings: If given, filled with the time spent preprocessing, in the forward pass
            (gate included) and on Grad-CAM (maps and overlays).
        content_types: Per request, the body's Content-Type when known.
        model_name: Name reported in Open Inference Protocol responses.

    Returns:
        One :class:`Response` per row, in order.
    """
    timings = timings if timings is not None else BatchTimings()
    started = time.perf_counter()
    explain = explain or [False] * len(rows)
    content_types = content_types or [None] * len(rows)
    shaped = [guarded(index, len(rows), "reading the request",
                      lambda row=row, index=index: read_request(row, explain[index], settings, content_types[index]))
              for index, row in enumerate(rows)]
    items = [image for request in shaped if isinstance(request, ShapedRequest) for image in request.images]
    answers = iter(_serve_images(loaded, settings, items, model_version, timings, started))
    responses: list[Response] = []
    for index, request in enumerate(shaped):
        if isinstance(request, Response):
            responses.append(request)
            continue
        images = [next(answers) for _ in request.images]
        responses.append(guarded(index, len(rows), "writing the answer",
                                 lambda request=request, images=images: respond(request, images, model_name, model_version)))
    return responses


@dataclass
class Forwarded:
    """The forward stage's result: the images it ran, in batch order, with what the model said of them.

    Attributes:
        accepted: ``(item index, request)`` of each image that went through the model.
        inputs: Each image's uint8 model input (for the maps that perturb the image).
        features: Their last feature maps (N, C, h, w), on the model's device.
        probabilities: Their calibrated class probabilities (N, 7), on the CPU.
        checks: Their input-gate checks, or None without a gate.
        predicted: Their predicted class indices under the decision rule.
    """

    accepted: list[tuple[int, ParsedRequest]]
    inputs: list[torch.Tensor]
    features: torch.Tensor
    probabilities: torch.Tensor
    checks: list[InputCheck] | None
    predicted: torch.Tensor


def _serve_images(loaded: LoadedModel, settings: HandlerSettings, items: Sequence[ParsedRequest | Response],
                  model_version: str, timings: BatchTimings, started: float) -> list[Response]:
    """One response per image of the batch, in order, in three stages timed by ``timings``.

    Like TorchServe's preprocess / inference / postprocess: :func:`read_images` decodes
    (``timings.preprocess``, which includes reading the requests, from ``started``),
    :func:`forward_images` runs the one forward pass and the gate (``timings.inference``), and
    :func:`answer_images` refuses what the gate refused and writes the answers with their
    explanations (``timings.gradcam``, 0 when no image asked for one). Each stage sets the
    responses of the images it stops; an item that is a :class:`Response` already (an image
    refused while its request was read) is passed through.
    """
    responses: list[Response | None] = [item if isinstance(item, Response) else None for item in items]
    accepted, inputs = read_images(loaded, settings, items, responses)
    timings.preprocess = time.perf_counter() - started
    if not accepted:
        return responses  # type: ignore[return-value]

    started = time.perf_counter()
    forwarded = forward_images(loaded, settings, accepted, inputs, responses)
    timings.inference = time.perf_counter() - started
    if forwarded is None:
        return responses  # type: ignore[return-value]

    started = time.perf_counter()
    explained = answer_images(loaded, settings, forwarded, model_version, responses)
    timings.gradcam = time.perf_counter() - started if explained else 0.0
    return responses  # type: ignore[return-value]


def read_images(loaded: LoadedModel, settings: HandlerSettings, items: Sequence[ParsedRequest | Response],
                responses: list[Response | None]) -> tuple[list[tuple[int, ParsedRequest]], list[torch.Tensor]]:
    """The read stage: each image decoded to its uint8 model input; a refusal becomes its response.

    Returns:
        ``(accepted, inputs)``: ``(item index, request)`` and the model input of each image read.
    """
    accepted: list[tuple[int, ParsedRequest]] = []
    inputs: list[torch.Tensor] = []
    for index, item in enumerate(items):
        if isinstance(item, Response):
            continue

        def prepare(parsed: ParsedRequest = item) -> torch.Tensor:
            if parsed.allow_out_of_distribution and not settings.allow_gate_override:
                raise GateOverrideNotAllowedError(
                    "this service does not let clients override its input gate (\"allow_out_of_distribution\"); "
                    "send the request without it")
            tensor, _ = load_model_input(parsed.image, loaded.preprocess, settings.decode_limits)
            return tensor

        outcome = guarded(index, len(items), "reading the image", prepare)
        if isinstance(outcome, Response):
            responses[index] = outcome
            continue
        accepted.append((index, item))
        inputs.append(outcome)
    return accepted, inputs


def forward_images(loaded: LoadedModel, settings: HandlerSettings, accepted: list[tuple[int, ParsedRequest]],
                   inputs: list[torch.Tensor], responses: list[Response | None]) -> Forwarded | None:
    """The forward stage: one forward pass (and the gate) over every image read, and the decisions.

    If the batched pass fails, each image runs alone so that only the one that breaks it gets an
    error response. Returns None when no image came through.
    """
    total = len(responses)
    try:
        features, probabilities, checks = _forward(loaded, inputs, settings)
    except Exception:  # noqa: BLE001 - find the one input that breaks the batch: each runs alone
        logger.exception("batch forward pass failed; running its %d requests one by one", len(inputs))
        per_request = [guarded(index, total, "running the model", lambda t=tensor: _forward(loaded, [t], settings))
                       for (index, _), tensor in zip(accepted, inputs)]
        for (index, _), result in zip(accepted, per_request):
            if isinstance(result, Response):
                responses[index] = result
        kept = [(request, tensor, result) for request, tensor, result in zip(accepted, inputs, per_request)
                if not isinstance(result, Response)]
        if not kept:
            return None
        accepted = [request for request, _, _ in kept]
        inputs = [tensor for _, tensor, _ in kept]
        features = torch.cat([result[0] for _, _, result in kept])
        probabilities = torch.cat([result[1] for _, _, result in kept])
        checks = None if kept[0][2][2] is None else [check for _, _, result in kept for check in result[2]]
    predicted = decide(probabilities, settings.decision_rule, loaded.calibration(settings.tta).class_prior)
    return Forwarded(accepted, inputs, features, probabilities, checks, predicted)


def answer_images(loaded: LoadedModel, settings: HandlerSettings, forwarded: Forwarded, model_version: str,
                  responses: list[Response | None]) -> bool:
    """The answer stage: the gate's refusals, the explanation maps asked for, and each image's answer.

    Returns:
        Whether any image asked for an explanation.
    """
    total = len(responses)
    answered: list[tuple[int, int, ParsedRequest, InputCheck | None]] = []  # (position, index, request, check)
    for position, (index, parsed) in enumerate(forwarded.accepted):
        check = forwarded.checks[position] if forwarded.checks is not None else None
        if check is not None and not check.in_distribution:
            if not parsed.allow_out_of_distribution:  # (an override reaches here only where the operator allows it)
                responses[index] = error_response(gate_refusal(check))
                continue
            logger.warning("input gate overridden by the client for request %d of %d (%s: score %s, modality %s %s)",
                           index + 1, total, check.refusal, check.score, check.modality, check.modality_score)
        answered.append((position, index, parsed, check))

    explained = [(position, parsed) for position, _, parsed, _ in answered if parsed.gradcam]
    heatmaps: dict[int, tuple[torch.Tensor, int, str]] = {}
    if explained:
        targets = [parsed.target_class if parsed.target_class is not None else int(forwarded.predicted[position])
                   for position, parsed in explained]
        maps = explanation_maps(loaded, forwarded.features, forwarded.inputs, [position for position, _ in explained],
                                targets, [parsed.explanation for _, parsed in explained])
        heatmaps = {position: (maps[i], targets[i], METHOD_NAMES[parsed.explanation])
                    for i, (position, parsed) in enumerate(explained)}
    for position, index, parsed, check in answered:
        def answer(position: int = position, parsed: ParsedRequest = parsed, check: InputCheck | None = check) -> Response:
            prediction = make_prediction(forwarded.probabilities[position].tolist(), model_version,
                                         settings.referral_threshold, int(forwarded.predicted[position]),
                                         settings.decision_rule, check)
            if position in heatmaps:
                heatmap, target, method = heatmaps[position]
                prediction = replace(prediction, gradcam=format_gradcam(parsed, heatmap, target, loaded, settings,
                                                                        method))
            return Response(200, prediction)

        responses[index] = guarded(index, total, "writing the answer", answer)
    return bool(explained)
