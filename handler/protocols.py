"""Which protocol a request speaks, told by its body's shape, and its answer in that protocol.

Three shapes reach the handler through any of TorchServe's inference paths (``/predictions``,
``/v1/models/{m}:predict``, ``/v2/models/{m}/infer`` and their explain forms):

* this project's own bodies (a raw image, multipart, ``{"image": "<base64>"}``): one image,
  answered with one :class:`handler.responses.Prediction`, unchanged;
* KServe v1, a JSON object with ``instances`` (:mod:`handler.kserve_v1`);
* the Open Inference Protocol, a JSON object with ``inputs`` (:mod:`handler.open_inference`).

A request is read into a :class:`ShapedRequest`: its images, each a work item of the batch's one
forward pass like a single-image request, and how to put their answers back together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from handler import kserve_v1, open_inference
from handler.errors import RequestError
from handler.requests import ParsedRequest, parse_image_body, read_body
from handler.responses import Response, error_response
from handler.settings import HandlerSettings

PLAIN, KSERVE_V1, OPEN_INFERENCE = "plain", "kserve_v1", "open_inference"


@dataclass(frozen=True)
class ShapedRequest:
    """One request's protocol and images.

    Attributes:
        protocol: :data:`PLAIN`, :data:`KSERVE_V1` or :data:`OPEN_INFERENCE`.
        images: Per image, what to serve, or that image's refusal already (a bad v1 instance).
        infer: The Open Inference Protocol request (its id and requested outputs).
    """

    protocol: str
    images: list[ParsedRequest | Response]
    infer: open_inference.InferRequest | None = None


def read_request(row: Mapping[str, Any], explain: bool, settings: HandlerSettings,
                 content_type: str | None = None) -> ShapedRequest | Response:
    """One request row's shape and images, or its refusal in its protocol's error form.

    Raises:
        RequestError: A plain request's problem (answered in this project's error form).
    """
    payload = read_body(row, settings.max_body_bytes, content_type)
    if isinstance(payload, Mapping) and "instances" in payload:
        try:
            images = kserve_v1.read_instances(payload, explain, settings.max_images_per_request, settings.max_body_bytes)
        except RequestError as error:
            return error_response(error, flat=True)
        return ShapedRequest(KSERVE_V1, images)
    if isinstance(payload, Mapping) and "inputs" in payload:
        try:
            infer = open_inference.read_inputs(payload, explain, settings.max_images_per_request, settings.max_body_bytes)
        except RequestError as error:
            return error_response(error, flat=True)
        return ShapedRequest(OPEN_INFERENCE, list(infer.images), infer)
    return ShapedRequest(PLAIN, [parse_image_body(payload, row, explain, settings.max_body_bytes)])


def respond(request: ShapedRequest, images: Sequence[Response], model_name: str, model_version: str) -> Response:
    """The request's one response from its images' responses (in order)."""
    if request.protocol == KSERVE_V1:
        return kserve_v1.answer(images)
    if request.protocol == OPEN_INFERENCE:
        return open_inference.answer(request.infer, images, model_name, model_version)
    return images[0]
