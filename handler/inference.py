"""Request parsing, batched inference, Grad-CAM and response formatting, testable without TorchServe."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from handler.errors import (
    EmptyBodyError, InvalidBase64Error, InvalidOptionError, MalformedJSONError, MissingImageError, PayloadTooLargeError,
    RequestError, error_response)
from handler.calibration import augmented_views, check_tta_mode, merge_views
from handler.decision import check_decision_rule, decide
from handler.gradcam import gradcam_from_features, normalize_maps
from handler.labels import CLASS_CODES, REFERRAL_CLASSES, Risk, class_index, lesion_class
from handler.model import LoadedModel
from handler.overlay import FORMATS, OverlayStyle, encode_image, model_view_box, render_overlay
from handler.preprocessing import DecodeLimits, decode_image, load_model_input, normalize_batch
from handler.runtime import build_runner, check_runtime

logger = logging.getLogger(__name__)

NOTICE = ("Research and screening aid only, not a diagnosis. A dermatologist must assess any lesion of concern; "
          "a low-risk result does not rule out melanoma or skin cancer.")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}
_OPTION_FIELDS = frozenset({"gradcam", "target_class", "overlay_format"})


@dataclass(frozen=True)
class HandlerSettings:
    """Serving settings, read from the ``handler:`` block of ``model-config.yaml``.

    Attributes:
        max_body_bytes: Largest accepted image, in bytes (after base64 decoding). TorchServe's
            own ``max_request_size`` sits above it and answers with an empty 413.
        max_pixels: Decompression-bomb guard: largest width x height decoded.
        min_side: Smallest accepted image side, in pixels.
        referral_threshold: ``malignant_probability`` at or above which the response
            raises the referral flag and the risk becomes ``high``.
        decision_rule: Which class ``prediction`` names, one of
            :data:`handler.decision.DECISION_RULES`: ``most_probable``, or ``balanced``
            (highest probability relative to the class's prevalence).
        tta: Test-time augmentation, one of :data:`handler.calibration.TTA_MODES`
            (``none``, ``hflip``: 2 views, ``flip4``: 4 flipped views in one forward pass).
        runtime: ``eager`` or ``torchscript`` (traced and frozen at worker start).
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (for GPUs; slow on this CPU).
        torch_threads: Intra-op threads per worker; 0 keeps PyTorch's default (all cores).
        gradcam_alpha: Heatmap weight in the overlay blend.
        gradcam_colormap: Overlay colour map (see :data:`handler.overlay.COLORMAPS`).
        gradcam_format: Overlay encoding, ``png`` or ``jpeg``.
        gradcam_jpeg_quality: JPEG quality when ``gradcam_format`` is ``jpeg``.
        gradcam_max_side: Longer side above which overlays are scaled down.
        heatmap_decimals: Rounding of the raw heatmap values in the response.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 8
    referral_threshold: float = 0.5
    decision_rule: str = "most_probable"
    tta: str = "none"
    runtime: str = "eager"
    precision: str = "fp32"
    torch_threads: int = 0
    gradcam_alpha: float = 0.45
    gradcam_colormap: str = "inferno"
    gradcam_format: str = "jpeg"
    gradcam_jpeg_quality: int = 90
    gradcam_max_side: int = 1600
    heatmap_decimals: int = 3

    def __post_init__(self) -> None:
        check_tta_mode(self.tta)
        check_decision_rule(self.decision_rule)
        check_runtime(self.runtime, self.precision)
        self.overlay_style  # validates the Grad-CAM settings at load time

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "HandlerSettings":
        """Build from a config mapping, rejecting unknown keys so typos do not pass silently."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{name: type(getattr(cls, name))(value) for name, value in values.items()})

    @property
    def decode_limits(self) -> DecodeLimits:
        """The decode limits these settings imply."""
        return DecodeLimits(max_pixels=self.max_pixels, min_side=self.min_side)

    @property
    def overlay_style(self) -> OverlayStyle:
        """The Grad-CAM overlay style these settings imply."""
        return OverlayStyle(self.gradcam_alpha, self.gradcam_colormap, self.gradcam_format,
                            self.gradcam_jpeg_quality, self.gradcam_max_side)


def load_handler_settings(model_config: str | Path) -> HandlerSettings:
    """The ``handler:`` block of a ``model-config.yaml``, exactly as the served handler reads it."""
    import yaml

    return HandlerSettings.from_mapping((yaml.safe_load(Path(model_config).read_text()) or {}).get("handler"))


@dataclass(frozen=True)
class ParsedRequest:
    """One request's image and options."""

    image: bytes
    gradcam: bool = False
    target_class: int | None = None
    overlay_format: str | None = None


@dataclass
class Response:
    """What goes back for one request of a batch."""

    status: int
    body: dict[str, Any]


@dataclass
class BatchTimings:
    """Where one batch spent its time, in seconds, for the latency metrics."""

    preprocess: float = 0.0
    inference: float = 0.0
    gradcam: float = 0.0


def parse_request(row: Mapping[str, Any], explain: bool = False, max_bytes: int | None = None) -> ParsedRequest:
    """Get the image and options out of one TorchServe request row.

    Accepts a raw image body, a multipart ``data`` field (with optional ``gradcam``,
    ``target_class`` and ``overlay_format`` fields), or a JSON object ``{"image": "<base64>",
    "gradcam": true, "target_class": "mel", "overlay_format": "png"}`` (the image may be a
    ``data:`` URL). Naming a ``target_class`` implies ``gradcam``. TorchServe hands over JSON
    bodies already parsed into a dict.

    Args:
        row: One element of the batch TorchServe passes to ``handle``.
        explain: Whether this request came through the explanations API.
        max_bytes: Largest accepted body or decoded image, in bytes.

    Returns:
        The parsed request; ``gradcam`` is on if asked for or if ``explain``.

    Raises:
        RequestError: If the body is empty, malformed JSON, lacks an image, holds invalid
            base64 or has invalid options.
    """
    payload = row.get("data")
    if payload is None:
        payload = row.get("body")
    if payload is None:
        _refuse_misnamed_fields(row)
    if max_bytes is not None and isinstance(payload, (bytes, bytearray, str)) and len(payload) > max_bytes:
        raise PayloadTooLargeError(f"request body is {len(payload)} bytes; the limit is {max_bytes}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and payload.lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedJSONError(f"body looks like JSON but does not parse: {exc}") from exc
    options: Mapping[str, Any] = row
    if isinstance(payload, Mapping):
        options = payload
        image = _decode_base64_image(payload)
        if max_bytes is not None and len(image) > max_bytes:
            raise PayloadTooLargeError(f"image is {len(image)} bytes; the limit is {max_bytes}")
    elif isinstance(payload, list):
        raise MalformedJSONError("JSON body must be an object like {\"image\": \"<base64>\"}, not a list")
    elif not payload:
        raise EmptyBodyError("request body is empty; send an image or {\"image\": \"<base64>\"}")
    else:
        image = bytes(payload)
    target = _parse_target_class(options.get("target_class"))
    overlay_format = _parse_overlay_format(options.get("overlay_format"))
    gradcam = explain or _parse_flag(options.get("gradcam"), "gradcam") or target is not None
    return ParsedRequest(image, gradcam, target, overlay_format)


def _refuse_misnamed_fields(row: Mapping[str, Any]) -> None:
    # A multipart upload under another field name (curl -F file=@x.jpg) used to read as an
    # empty body; naming the fields that did arrive tells the client what to rename.
    fields = sorted(str(name) for name in row if name not in _OPTION_FIELDS)
    if fields:
        raise MissingImageError(
            f"no image: multipart fields {fields} arrived, but the image must be the field named \"data\" "
            "(curl -F data=@lesion.jpg) or the raw body (curl -T lesion.jpg)")


def _decode_base64_image(payload: Mapping[str, Any]) -> bytes:
    encoded = payload.get("image")
    if encoded is None:
        raise MissingImageError("JSON body has no \"image\" field; expected {\"image\": \"<base64>\"}")
    if not isinstance(encoded, str) or not encoded:
        raise MissingImageError("\"image\" must be a non-empty base64 string")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64Error(f"\"image\" is not valid base64: {exc}") from exc


def _as_text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _parse_flag(value: Any, name: str) -> bool:
    value = _as_text(value)
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).strip().lower() in _TRUE:
        return True
    if str(value).strip().lower() in _FALSE:
        return False
    raise InvalidOptionError(f"\"{name}\" must be true or false, got {value!r}")


def _parse_target_class(value: Any) -> int | None:
    value = _as_text(value)
    if value is None:
        return None
    try:
        return class_index(str(value).strip())
    except KeyError:
        raise InvalidOptionError(f"unknown target_class {value!r}; expected one of {list(CLASS_CODES)}") from None


def _parse_overlay_format(value: Any) -> str | None:
    value = _as_text(value)
    if value is None:
        return None
    normalized = {"jpg": "jpeg"}.get(str(value).strip().lower(), str(value).strip().lower())
    if normalized not in FORMATS:
        raise InvalidOptionError(f"unknown overlay_format {value!r}; expected one of {list(FORMATS)}")
    return normalized


def run_model(loaded: LoadedModel, batch: torch.Tensor, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a ``uint8`` batch and, with ``tta``, its flipped views.

    Args:
        loaded: The model and its preprocessing parameters.
        batch: ``uint8`` tensor (N, 3, H, W).
        tta: One of :data:`handler.calibration.TTA_MODES`; all views share one forward pass.

    Returns:
        ``(features, logits)``: the last convolutional feature map of the unaugmented
        images (N, C, h, w) and the view-averaged raw logits (N, 7), on the model's device.
    """
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        batch = batch.pin_memory()  # page-locked, so the copy below is a true asynchronous DMA
    inputs = normalize_batch(batch.to(device, non_blocking=True), loaded.preprocess)
    features, logits = loaded.features_and_logits(augmented_views(inputs, tta))
    return features[: len(batch)], merge_views(logits.float(), tta)


def prepare_for_serving(loaded: LoadedModel, settings: HandlerSettings) -> None:
    """Apply the runtime settings to a loaded model, once per worker.

    Sets the intra-op thread count, enables cuDNN autotuning on GPUs (every batch has the
    same image size, so the tuned kernels are reused), builds the runtime (eager or
    frozen TorchScript, with autocast) and checks a calibration exists for the TTA mode,
    with the class prior the decision rule needs.

    Raises:
        ValueError: If the checkpoint has no calibration for ``settings.tta``, or it lacks
            the class prior of the ``balanced`` decision rule.
    """
    calibration = loaded.calibration(settings.tta)
    if settings.decision_rule == "balanced" and calibration.class_prior is None:
        raise ValueError(f"checkpoint {loaded.version}'s {settings.tta!r} calibration has no class prior, which the "
                         "balanced decision rule needs; rerun scripts/calibrate.py")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loaded.runner = build_runner(loaded.model, settings.runtime, settings.precision, loaded.preprocess.image_size)


@torch.inference_mode()
def predict_probabilities(loaded: LoadedModel, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Calibrated class probabilities for a ``uint8`` batch in one forward pass.

    Args:
        loaded: The model and its preprocessing parameters.
        batch: ``uint8`` tensor (N, 3, H, W) from :func:`handler.preprocessing.load_model_input`.
        tta: Test-time augmentation mode; its own fitted calibration is applied.

    Returns:
        (N, 7) float32 probabilities on the CPU.
    """
    _, logits = run_model(loaded, batch, tta)
    return loaded.calibration(tta).apply(logits).cpu()


def format_prediction(probabilities: Sequence[float], model_version: str, referral_threshold: float,
                      predicted: int | None = None, decision_rule: str = "most_probable") -> dict[str, Any]:
    """The JSON object returned for one image.

    Args:
        probabilities: The 7 class probabilities in :data:`CLASS_CODES` order.
        model_version: Version of the served model.
        referral_threshold: Malignant probability that raises the referral flag.
        predicted: Index of the class the decision rule names; None names the most probable.
        decision_rule: The rule that chose ``predicted``, reported in the response.

    Returns:
        ``prediction``, ``label``, ``confidence`` (the calibrated probability of the named
        class), ``most_probable``, ``decision_rule``, ``probabilities``,
        ``malignant_probability``, ``risk``, ``referral``, ``model_version`` and ``notice``.
    """
    probs = {code: round(float(p), 6) for code, p in zip(CLASS_CODES, probabilities)}
    most_probable = max(probs, key=probs.get)
    top = most_probable if predicted is None else CLASS_CODES[predicted]
    malignant = float(sum(probabilities[class_index(code)] for code in REFERRAL_CLASSES))
    refer = malignant >= referral_threshold
    risk = Risk.HIGH if refer else lesion_class(top).risk
    return {
        "prediction": top,
        "label": lesion_class(top).name,
        "confidence": probs[top],
        "most_probable": most_probable,
        "decision_rule": decision_rule,
        "probabilities": probs,
        "malignant_probability": round(malignant, 6),
        "risk": risk.value,
        "referral": {"refer": refer, "threshold": referral_threshold},
        "model_version": model_version,
        "notice": NOTICE,
    }


def format_gradcam(request: ParsedRequest, heatmap: torch.Tensor, target: int, loaded: LoadedModel,
                   settings: HandlerSettings) -> dict[str, Any]:
    """The ``gradcam`` object of a response: overlay on the full-resolution original, plus the raw map.

    Args:
        request: The parsed request (its image is decoded again at full resolution for the overlay).
        heatmap: (h, w) map in [0, 1] over the model's input crop.
        target: The explained class index.
        loaded: The served model (for its preprocessing).
        settings: Overlay settings; the request may choose another encoding.
    """
    original = decode_image(request.image, settings.decode_limits).image
    style = settings.overlay_style
    if request.overlay_format:
        style = replace(style, image_format=request.overlay_format)
    overlay = render_overlay(original, heatmap.numpy(), loaded.preprocess, style)
    return {
        "class": CLASS_CODES[target],
        "overlay": base64.b64encode(encode_image(overlay, style)).decode("ascii"),
        "format": style.image_format,
        "width": int(overlay.shape[1]),
        "height": int(overlay.shape[0]),
        "heatmap": [[round(float(v), settings.heatmap_decimals) for v in row] for row in heatmap.tolist()],
        # Grad-CAM is zero everywhere when no region raises the class's score (e.g. "mel" asked
        # of a clear nevus): say so rather than leave a blank overlay to interpretation.
        "has_evidence": bool(heatmap.max() > 0),
        # Where the heatmap lies in the overlay: the centre crop the model saw.
        "heatmap_box": list(model_view_box((overlay.shape[1], overlay.shape[0]), loaded.preprocess)),
    }


@torch.inference_mode()
def handle_batch(loaded: LoadedModel, settings: HandlerSettings, rows: Sequence[Mapping[str, Any]], model_version: str,
                 explain: Sequence[bool] | None = None, timings: BatchTimings | None = None) -> list[Response]:
    """Serve one TorchServe batch: per-request parsing and errors, one forward pass for the rest.

    A bad request gets its own 4xx response and never affects the others in the batch.
    Predictions and explanations can share a batch: Grad-CAM is decided per request.

    Args:
        loaded: The served model.
        settings: The handler settings.
        rows: TorchServe's request rows.
        model_version: Version reported in every response.
        explain: Per request, whether it came through the explanations API.
        timings: If given, filled with the time spent preprocessing, in the forward pass
            and on Grad-CAM (maps and overlays).

    Returns:
        One :class:`Response` per row, in order.
    """
    timings = timings if timings is not None else BatchTimings()
    started = time.perf_counter()
    explain = explain or [False] * len(rows)
    responses: list[Response | None] = [None] * len(rows)
    requests: list[tuple[int, ParsedRequest]] = []
    inputs: list[torch.Tensor] = []
    for index, row in enumerate(rows):
        try:
            parsed = parse_request(row, explain[index], settings.max_body_bytes)
            tensor, _ = load_model_input(parsed.image, loaded.preprocess, settings.decode_limits)
        except RequestError as error:
            status, body = error_response(error)
            logger.info("request %d of %d rejected: %s %s", index + 1, len(rows), status, error)
            responses[index] = Response(status, body)
            continue
        requests.append((index, parsed))
        inputs.append(tensor)
    timings.preprocess = time.perf_counter() - started
    if not inputs:
        return responses  # type: ignore[return-value]
    started = time.perf_counter()
    features, logits = run_model(loaded, torch.stack(inputs), settings.tta)
    calibration = loaded.calibration(settings.tta)
    probabilities = calibration.apply(logits).cpu()
    predicted = decide(probabilities, settings.decision_rule, calibration.class_prior)
    timings.inference = time.perf_counter() - started
    started = time.perf_counter()
    explained = [position for position, (_, parsed) in enumerate(requests) if parsed.gradcam]
    heatmaps: dict[int, tuple[torch.Tensor, int]] = {}
    if explained:
        rows_at = torch.tensor(explained, device=features.device)
        targets = torch.tensor([requests[p][1].target_class if requests[p][1].target_class is not None
                                else int(predicted[p]) for p in explained], device=features.device)
        maps = normalize_maps(gradcam_from_features(loaded.model, features[rows_at], targets)).cpu()
        heatmaps = {p: (maps[i], int(targets[i])) for i, p in enumerate(explained)}
    for position, (index, parsed) in enumerate(requests):
        body = format_prediction(probabilities[position].tolist(), model_version, settings.referral_threshold,
                                 int(predicted[position]), settings.decision_rule)
        if position in heatmaps:
            heatmap, target = heatmaps[position]
            body["gradcam"] = format_gradcam(parsed, heatmap, target, loaded, settings)
        responses[index] = Response(200, body)
    timings.gradcam = time.perf_counter() - started if explained else 0.0
    return responses  # type: ignore[return-value]
