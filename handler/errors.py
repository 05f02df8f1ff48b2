"""Typed client errors and the single place where they become HTTP status codes."""

from __future__ import annotations

from http import HTTPStatus


class RequestError(Exception):
    """A problem with one request that the client can fix. Never kills a worker."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    code: str = "bad_request"


class EmptyBodyError(RequestError):
    """The request carried no bytes."""

    code = "empty_body"


class PayloadTooLargeError(RequestError):
    """The request body exceeds the handler's byte limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class MalformedJSONError(RequestError):
    """The body claims to be JSON but is not a valid JSON object."""

    code = "malformed_json"


class MissingImageError(RequestError):
    """A JSON body without an ``image`` field."""

    code = "missing_image"


class InvalidBase64Error(RequestError):
    """The ``image`` field is not valid base64."""

    code = "invalid_base64"


class InvalidImageError(RequestError):
    """The bytes are not a decodable image (not an image, truncated or corrupted)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "invalid_image"


class ImageDimensionError(RequestError):
    """The image is too small, has a zero dimension, or exceeds the pixel limit."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "bad_image_dimensions"


class ImageTooLargeError(ImageDimensionError):
    """More pixels than the configured limit: refused before the pixels are decoded."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "image_too_large"


class InvalidOptionError(RequestError):
    """A request option (such as ``target_class``) has an invalid value."""

    code = "invalid_option"


def error_response(error: RequestError) -> tuple[int, dict]:
    """Map a request error to its HTTP status and JSON body.

    Args:
        error: The error raised while handling one request.

    Returns:
        ``(status_code, body)`` where body is ``{"error": {"code", "message", "status"}}``.
    """
    status = int(error.status)
    return status, {"error": {"code": error.code, "message": str(error), "status": status}}
