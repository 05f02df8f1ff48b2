"""KServe's v1 protocol: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out, one entry per instance.

An instance is ``{"image": {"b64": "<base64>"}}`` (KServe's image examples), ``{"image": "<base64>"}``,
``{"data": "<base64>"}`` (TorchServe's KServe examples), ``{"b64": "<base64>"}`` or a bare base64
string; an object instance may carry this project's options (``gradcam``, ``target_class``,
``overlay_format``, ``allow_out_of_distribution``).

Errors: a request that is not a list of instances, has none, or more than
``max_images_per_request``, or whose decoded images together exceed ``max_body_bytes``, is
refused as a whole in KServe's form ``{"error": "<message>"}``. A bad instance (no image, bad
base64, undecodable, refused by the input gate) gets its own entry, this project's error object
``{"error": {"code", "message", "status"}}``, and the other instances are answered (HTTP 200);
only when no instance could be answered does the request get the first instance's status and
``{"error": "instance 1: <message>"}``. Never does an instance fail other requests of the batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from handler.errors import MalformedJSONError, MissingImageError, PayloadTooLargeError, RequestError, TooManyImagesError
from handler.requests import ParsedRequest, decode_base64_image, parse_options
from handler.responses import ImagesBody, ProtocolErrorBody, Response, error_response

IMAGE_FIELDS = ("image", "data", "b64")
SHAPES = "{\"image\": {\"b64\": \"<base64>\"}}, {\"data\": \"<base64>\"}, {\"b64\": \"<base64>\"} or a base64 string"


class Predictions(ImagesBody):
    """``{"predictions": [...]}``: each instance's answer or its own error object, in order."""

    def __init__(self, images: list[Response]) -> None:
        self.images = images

    def to_json(self) -> dict[str, Any]:
        return {"predictions": [image.to_json() for image in self.images]}


def read_instances(payload: Mapping[str, Any], explain: bool, max_images: int,
                   max_bytes: int | None) -> list[ParsedRequest | Response]:
    """Each instance's image and options, or that instance's own refusal, in order.

    Raises:
        RequestError: The request as a whole: not a non-empty list of instances, too many of
            them, or more decoded bytes than ``max_bytes``.
    """
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise MalformedJSONError(f"\"instances\" must be a non-empty list of {SHAPES}")
    if len(instances) > max_images:
        raise TooManyImagesError(f"{len(instances)} instances in one request; the limit is {max_images}")
    images: list[ParsedRequest | Response] = []
    for instance in instances:
        try:
            images.append(_read_instance(instance, explain))
        except RequestError as error:
            images.append(error_response(error))
    total = sum(len(image.image) for image in images if isinstance(image, ParsedRequest))
    if max_bytes is not None and total > max_bytes:
        raise PayloadTooLargeError(f"the instances' images are {total} bytes together; the limit is {max_bytes}")
    return images


def _read_instance(instance: Any, explain: bool) -> ParsedRequest:
    if isinstance(instance, str):
        return parse_options(decode_base64_image(instance, "the instance"), {}, explain)
    if not isinstance(instance, Mapping):
        raise MalformedJSONError(f"an instance must be {SHAPES}, not a {type(instance).__name__}")
    field = next((name for name in IMAGE_FIELDS if name in instance), None)
    if field is None:
        raise MissingImageError(f"the instance has no image; expected {SHAPES}")
    encoded, name = instance[field], f"\"{field}\""
    if field == "image" and isinstance(encoded, Mapping):
        encoded, name = encoded.get("b64"), "\"image\".\"b64\""
    if encoded is None:
        raise MissingImageError(f"{name} is missing or null; expected {SHAPES}")
    return parse_options(decode_base64_image(encoded, name), instance, explain)


def answer(images: Sequence[Response]) -> Response:
    """The request's response from its instances' responses."""
    if any(image.ok for image in images):
        return Response(200, Predictions(list(images)))
    first = images[0].body
    return Response(first.status, ProtocolErrorBody(first.code, f"instance 1: {first.message}", first.status,
                                                    dict(first.details)))
