"""Request parsing, batched inference and response formatting, testable without TorchServe."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from handler.errors import (
    EmptyBodyError, InvalidBase64Error, MalformedJSONError, MissingImageError, RequestError, error_response)
from handler.labels import CLASS_CODES, REFERRAL_CLASSES, Risk, class_index, lesion_class
from handler.model import LoadedModel
from handler.preprocessing import DecodeLimits, load_model_input, normalize_batch

logger = logging.getLogger(__name__)

NOTICE = ("Research and screening aid only, not a diagnosis. A dermatologist must assess any lesion of concern; "
          "a low-risk result does not rule out melanoma or skin cancer.")


@dataclass(frozen=True)
class HandlerSettings:
    """Serving settings, read from the ``handler:`` block of ``model-config.yaml``.

    Attributes:
        max_pixels: Decompression-bomb guard: largest width x height decoded.
        min_side: Smallest accepted image side, in pixels.
        referral_threshold: ``malignant_probability`` at or above which the response
            raises the referral flag and the risk becomes ``high``.
    """

    max_pixels: int = 40_000_000
    min_side: int = 8
    referral_threshold: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "HandlerSettings":
        """Build from a config mapping, rejecting unknown keys so typos do not pass silently."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{name: type(getattr(cls, name))(value) for name, value in values.items()})

    @property
    def decode_limits(self) -> DecodeLimits:
        """The decode limits these settings imply."""
        return DecodeLimits(max_pixels=self.max_pixels, min_side=self.min_side)


@dataclass
class Response:
    """What goes back for one request of a batch."""

    status: int
    body: dict[str, Any]


def extract_image_bytes(row: Mapping[str, Any]) -> bytes:
    """Get the image bytes out of one TorchServe request row.

    Accepts a raw image body, a multipart ``data`` field, or a JSON object
    ``{"image": "<base64>"}`` (optionally a ``data:`` URL). TorchServe hands over JSON
    bodies already parsed into a dict.

    Args:
        row: One element of the batch TorchServe passes to ``handle``.

    Returns:
        The encoded image bytes.

    Raises:
        RequestError: If the body is empty, malformed JSON, lacks an image or holds invalid base64.
    """
    payload = row.get("data")
    if payload is None:
        payload = row.get("body")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and payload.lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedJSONError(f"body looks like JSON but does not parse: {exc}") from exc
    if isinstance(payload, Mapping):
        return _decode_base64_image(payload)
    if isinstance(payload, list):
        raise MalformedJSONError("JSON body must be an object like {\"image\": \"<base64>\"}, not a list")
    if not payload:
        raise EmptyBodyError("request body is empty; send an image or {\"image\": \"<base64>\"}")
    return bytes(payload)


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


@torch.inference_mode()
def predict_probabilities(loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Calibrated class probabilities for a ``uint8`` batch in one forward pass.

    Args:
        loaded: The model and its preprocessing parameters.
        batch: ``uint8`` tensor (N, 3, H, W) from :func:`handler.preprocessing.load_model_input`.

    Returns:
        (N, 7) float32 probabilities on the CPU, ``softmax(logits / temperature)``.
    """
    device = next(loaded.model.parameters()).device
    inputs = normalize_batch(batch.to(device, non_blocking=True), loaded.preprocess)
    logits = loaded.model(inputs).float()
    return torch.softmax(logits / loaded.temperature, dim=1).cpu()


def format_prediction(probabilities: Sequence[float], model_version: str, referral_threshold: float) -> dict[str, Any]:
    """The JSON object returned for one image.

    Args:
        probabilities: The 7 class probabilities in :data:`CLASS_CODES` order.
        model_version: Version of the served model.
        referral_threshold: Malignant probability that raises the referral flag.

    Returns:
        ``prediction``, ``label``, ``confidence``, ``probabilities``, ``malignant_probability``,
        ``risk``, ``referral``, ``model_version`` and ``notice``.
    """
    probs = {code: round(float(p), 6) for code, p in zip(CLASS_CODES, probabilities)}
    top = max(probs, key=probs.get)
    malignant = float(sum(probabilities[class_index(code)] for code in REFERRAL_CLASSES))
    refer = malignant >= referral_threshold
    risk = Risk.HIGH if refer else lesion_class(top).risk
    return {
        "prediction": top,
        "label": lesion_class(top).name,
        "confidence": probs[top],
        "probabilities": probs,
        "malignant_probability": round(malignant, 6),
        "risk": risk.value,
        "referral": {"refer": refer, "threshold": referral_threshold},
        "model_version": model_version,
        "notice": NOTICE,
    }


def handle_batch(loaded: LoadedModel, settings: HandlerSettings, rows: Sequence[Mapping[str, Any]], model_version: str) -> list[Response]:
    """Serve one TorchServe batch: per-request parsing and errors, one forward pass for the rest.

    A bad request gets its own 4xx response and never affects the others in the batch.

    Args:
        loaded: The served model.
        settings: The handler settings.
        rows: TorchServe's request rows.
        model_version: Version reported in every response.

    Returns:
        One :class:`Response` per row, in order.
    """
    responses: list[Response | None] = [None] * len(rows)
    inputs: list[torch.Tensor] = []
    valid: list[int] = []
    for index, row in enumerate(rows):
        try:
            tensor, _ = load_model_input(extract_image_bytes(row), loaded.preprocess, settings.decode_limits)
        except RequestError as error:
            status, body = error_response(error)
            logger.info("request %d of %d rejected: %s %s", index + 1, len(rows), status, error)
            responses[index] = Response(status, body)
            continue
        inputs.append(tensor)
        valid.append(index)
    if inputs:
        probabilities = predict_probabilities(loaded, torch.stack(inputs))
        for index, probs in zip(valid, probabilities.tolist()):
            responses[index] = Response(200, format_prediction(probs, model_version, settings.referral_threshold))
    return responses  # type: ignore[return-value]
