"""One request's image and options, parsed from a TorchServe request row.

Every problem becomes a :class:`handler.errors.RequestError` naming it, raised for that request
alone: the body of any shape (raw bytes, multipart, a JSON object, a JSON scalar or list that
TorchServe already parsed, JSON nested too deeply to parse) never raises anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Mapping

from handler.errors import (
    EmptyBodyError, InvalidBase64Error, InvalidOptionError, MalformedJSONError, MissingImageError, PayloadTooLargeError)
from handler.explainers import EXPLANATIONS, FAST
from handler.labels import CLASS_CODES, class_index
from handler.overlay import FORMATS

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}
OPTION_FIELDS = frozenset({"gradcam", "target_class", "overlay_format", "allow_out_of_distribution", "explanation"})
# Echoed values are cut to this many characters: a multi-megabyte option must not come back in
# the reply, nor go into the log on every request.
ECHO_LIMIT = 64


@dataclass(frozen=True)
class ParsedRequest:
    """One request's image and options.

    Attributes:
        image: The encoded image bytes.
        gradcam: Whether to add a Grad-CAM explanation.
        target_class: The class to explain (index), or None for the predicted class.
        overlay_format: The overlay encoding asked for, or None for the served default.
        allow_out_of_distribution: Answer even when the input gate judges the image out of
            distribution (the answer then says so and its risk is ``unknown``).
        explanation: Which map explains it (:data:`handler.explainers.EXPLANATIONS`): ``fast``
            (Grad-CAM, the default) or ``faithful`` (LayerCAM x Grad-CAM at stride 16, about two more predictions' cost).
    """

    image: bytes
    gradcam: bool = False
    target_class: int | None = None
    overlay_format: str | None = None
    allow_out_of_distribution: bool = False
    explanation: str = FAST


def echo(value: Any) -> str:
    """``repr(value)`` cut to :data:`ECHO_LIMIT` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


def parse_request(row: Mapping[str, Any], explain: bool = False, max_bytes: int | None = None,
                  content_type: str | None = None) -> ParsedRequest:
    """Get the image and options out of one TorchServe request row.

    Accepts a raw image body, a multipart ``data`` field (with optional option fields), or a
    JSON object ``{"image": "<base64>", "gradcam": true, "target_class": "mel",
    "overlay_format": "png", "allow_out_of_distribution": false}`` (the image may be a
    ``data:`` URL). Naming a ``target_class`` implies ``gradcam``. TorchServe hands over JSON
    bodies already parsed (a dict, list or scalar), or as raw bytes when its own parse failed.

    Args:
        row: One element of the batch TorchServe passes to ``handle``.
        explain: Whether this request came through the explanations API.
        max_bytes: Largest accepted body or decoded image, in bytes.
        content_type: The body's Content-Type, when known: a string that arrives with a JSON
            content type is a JSON string TorchServe parsed, never a text body.

    Raises:
        RequestError: If the body is empty, malformed JSON, lacks an image, holds invalid
            base64 or has invalid options.
    """
    return parse_image_body(read_body(row, max_bytes, content_type), row, explain, max_bytes)


def read_body(row: Mapping[str, Any], max_bytes: int | None = None,
              content_type: str | None = None) -> bytes | Mapping[str, Any]:
    """One request row's body: the raw image bytes (never empty) or a JSON object.

    The first step of :func:`parse_request`, apart so that :mod:`handler.protocols` can look at
    a JSON object's shape (``instances``, ``inputs``) before reading images out of it.

    Raises:
        RequestError: If the body is empty, too large, malformed JSON, or JSON but not an object.
    """
    field = "data" if row.get("data") is not None else "body" if "body" in row else "data" if "data" in row else None
    if field is None:
        _refuse_misnamed_fields(row)
    payload = row.get(field) if field else None
    if max_bytes is not None and isinstance(payload, (bytes, bytearray, str)) and len(payload) > max_bytes:
        raise PayloadTooLargeError(f"request body is {len(payload)} bytes; the limit is {max_bytes}")
    if isinstance(payload, str) and (content_type or "").lower().startswith("application/json"):
        raise MalformedJSONError("JSON body must be an object like {\"image\": \"<base64>\"}, not a string")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and _looks_like_json(payload):
        payload = _parse_json(payload)
    if isinstance(payload, Mapping):
        return payload
    if isinstance(payload, (bytes, bytearray)):
        if not payload:
            raise EmptyBodyError("request body is empty; send an image or {\"image\": \"<base64>\"}")
        return bytes(payload)
    if payload is None and field is not None and (content_type or "").lower().startswith("application/json"):
        raise MalformedJSONError("JSON body must be an object like {\"image\": \"<base64>\"}, not null")
    if payload is None:
        raise EmptyBodyError("request body is empty; send an image or {\"image\": \"<base64>\"}")
    # a JSON list, number, string, true/false or null that TorchServe parsed for us
    raise MalformedJSONError(f"JSON body must be an object like {{\"image\": \"<base64>\"}}, "
                             f"not a {_json_kind(payload)}")


def parse_image_body(payload: bytes | Mapping[str, Any], row: Mapping[str, Any], explain: bool = False,
                     max_bytes: int | None = None) -> ParsedRequest:
    """The image and options of a body :func:`read_body` returned: raw bytes (options in the
    multipart ``row``) or ``{"image": "<base64>", ...options}``."""
    if isinstance(payload, Mapping):
        image = decode_base64_image(payload.get("image"), "\"image\"")
        if max_bytes is not None and len(image) > max_bytes:
            raise PayloadTooLargeError(f"image is {len(image)} bytes; the limit is {max_bytes}")
        return parse_options(image, payload, explain)
    return parse_options(payload, row, explain)


def parse_options(image: bytes, options: Mapping[str, Any], explain: bool = False) -> ParsedRequest:
    """``image`` with the options named in ``options`` (:data:`OPTION_FIELDS`; other keys are ignored).

    Raises:
        InvalidOptionError: If an option has an invalid value.
    """
    target = _parse_target_class(options.get("target_class"))
    overlay_format = _parse_overlay_format(options.get("overlay_format"))
    explanation = _parse_explanation(options.get("explanation"))
    # Naming the class or the kind of explanation asks for one.
    gradcam = (explain or _parse_flag(options.get("gradcam"), "gradcam") or target is not None
               or options.get("explanation") is not None)
    allow = _parse_flag(options.get("allow_out_of_distribution"), "allow_out_of_distribution")
    return ParsedRequest(image, gradcam, target, overlay_format, allow, explanation or FAST)


def _looks_like_json(payload: bytes | bytearray) -> bool:
    # Images never start with these bytes (every accepted format has a binary signature).
    return payload.lstrip()[:1] in (b"{", b"[")


def _parse_json(payload: bytes | bytearray) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJSONError(f"body looks like JSON but does not parse: {exc}") from exc
    except RecursionError:
        raise MalformedJSONError("body is JSON nested too deeply to parse") from None


def _json_kind(value: Any) -> str:
    return {list: "list", bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), type(value).__name__)


def _refuse_misnamed_fields(row: Mapping[str, Any]) -> None:
    # A multipart upload under another field name (curl -F file=@x.jpg) used to read as an
    # empty body; naming the fields that did arrive tells the client what to rename.
    names = sorted(str(name)[:ECHO_LIMIT] for name in row if name not in OPTION_FIELDS)[:10]
    if names:
        raise MissingImageError(
            f"no image: multipart fields {names} arrived, but the image must be the field named \"data\" "
            "(curl -F data=@lesion.jpg) or the raw body (curl -T lesion.jpg)")


def decode_base64_image(encoded: Any, name: str) -> bytes:
    """The image bytes of a base64 string (a ``data:`` URL too); ``name`` says where it was, for errors.

    Raises:
        MissingImageError: If there is no string, or an empty one.
        InvalidBase64Error: If it is not valid base64.
    """
    if encoded is None:
        raise MissingImageError("JSON body has no \"image\" field; expected {\"image\": \"<base64>\"}")
    if not isinstance(encoded, str) or not encoded:
        raise MissingImageError(f"{name} must be a non-empty base64 string")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64Error(f"{name} is not valid base64: {exc}") from exc


def _as_text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _parse_flag(value: Any, name: str) -> bool:
    value = _as_text(value)
    if value is None or isinstance(value, bool):
        return bool(value)
    # Numbers count too ("gradcam": 1); containers never do.
    text = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidOptionError(f"\"{name}\" must be true or false, got {echo(value)}")


def _parse_target_class(value: Any) -> int | None:
    value = _as_text(value)
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in CLASS_CODES:
        return class_index(value.strip())
    raise InvalidOptionError(f"unknown target_class {echo(value)}; expected one of {list(CLASS_CODES)}")


def _parse_overlay_format(value: Any) -> str | None:
    value = _as_text(value)
    if value is None:
        return None
    normalized = {"jpg": "jpeg"}.get(str(value).strip().lower(), str(value).strip().lower()) if isinstance(value, str) else None
    if normalized not in FORMATS:
        raise InvalidOptionError(f"unknown overlay_format {echo(value)}; expected one of {list(FORMATS)}")
    return normalized


def _parse_explanation(value: Any) -> str | None:
    value = _as_text(value)
    if value is None:
        return None
    normalized = value.strip().lower() if isinstance(value, str) else None
    if normalized not in EXPLANATIONS:
        raise InvalidOptionError(f"unknown explanation {echo(value)}; expected one of {list(EXPLANATIONS)}")
    return normalized
