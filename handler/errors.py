"""Typed request errors: each class carries its HTTP status and error code, the one mapping.

:func:`handler.responses.error_response` turns any of them into a response.
"""

from __future__ import annotations

from http import HTTPStatus


class RequestError(Exception):
    """A problem with one request. Never kills a worker, never fails another request.

    Args:
        message: What is wrong, in words the client can act on.
        details: Extra fields for the error body (e.g. a score and its threshold).
    """

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    code: str = "bad_request"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class EmptyBodyError(RequestError):
    """The request carried no bytes."""

    code = "empty_body"


class PayloadTooLargeError(RequestError):
    """The request body exceeds the handler's byte limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class TooManyImagesError(PayloadTooLargeError):
    """A KServe v1 or Open Inference Protocol request carries more images than ``max_images_per_request``."""

    code = "too_many_images"


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


class DecodeBudgetError(RequestError):
    """Decoding would cost more than the decode budget allows (too many scans, segments or frames,
    or far more pixels than the bytes can hold for a photo); ``details.limit`` names the setting."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "decode_budget_exceeded"


class DecodeMemoryError(DecodeBudgetError):
    """The decoded image would take more memory than ``max_decoded_bytes``."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class InvalidOptionError(RequestError):
    """A request option (such as ``target_class``) has an invalid value."""

    code = "invalid_option"


class UnsupportedFormatError(InvalidImageError):
    """An image format the service does not accept (only JPEG, PNG, WebP, TIFF, BMP and GIF)."""

    code = "unsupported_format"


class OutOfDistributionError(RequestError):
    """The input gate judged the image not to be a dermoscopic photo of a skin lesion."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "out_of_distribution"


class NotDermoscopyError(OutOfDistributionError):
    """The input gate judged the image a photo of skin taken without a dermatoscope (``details.modality``
    ``clinical``): the right body part, the wrong instrument; ``details.advice`` says what to do."""

    code = "not_dermoscopy"


class GateOverrideNotAllowedError(RequestError):
    """The request asked to bypass the input gate (``allow_out_of_distribution``), which this deployment's
    operator has not allowed (``handler.allow_gate_override``)."""

    status = HTTPStatus.FORBIDDEN
    code = "gate_override_not_allowed"


class InternalError(RequestError):
    """A bug met while serving one request: a 500 for that request alone, with an id to find it in the log."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal_error"
