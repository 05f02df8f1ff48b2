"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST protocol) over JSON: ``inputs`` in, named tensors out.

Request (``POST /v2/models/skin_lesion/infer``)::

    {"id": "optional", "parameters": {"gradcam": true, "target_class": "mel", ...},
     "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": ["<base64 image file>", ...]}],
     "outputs": [{"name": "probabilities"}, ...]}

Each element of ``data`` is one image file in base64, as Triton and KServe clients send BYTES
in JSON (binary tensor data is refused with a message). ``parameters`` holds this project's
options for every image of the request. ``outputs``, when given, picks and orders the output
tensors. Response::

    {"model_name", "model_version", "id", "parameters": {"decision_rule", "referral_threshold", ...},
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [n, 7], "data": [...]}, ...]}

Tensors cannot hold nulls: an image the input gate refused but answered because the operator
allows clients to override the gate (``in_distribution`` false) has ``prediction`` and
``most_probable`` "", ``confidence`` 0 and ``referral`` false, where the plain answer has nulls.

Errors are the protocol's ``{"error": "<message>"}`` with the HTTP status of this project's
error. The images of a request are answered together or not at all: one image that cannot be
read, or that the input gate refuses, fails its request (``image 2 of 3: <message>``), never
other requests of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from handler.errors import InvalidOptionError, MalformedJSONError, PayloadTooLargeError, TooManyImagesError
from handler.labels import CLASS_CODES
from handler.requests import ParsedRequest, decode_base64_image, echo, parse_options
from handler.responses import ImagesBody, Prediction, ProtocolErrorBody, Response

INPUT = "image"
# (name, datatype, shape after the batch dimension): every output the service can send.
OUTPUTS = (
    ("probabilities", "FP32", (len(CLASS_CODES),)),
    ("class_names", "BYTES", ()),
    ("prediction", "BYTES", ()),
    ("most_probable", "BYTES", ()),
    ("confidence", "FP32", ()),
    ("malignant_probability", "FP32", ()),
    ("referral", "BOOL", ()),
    ("risk", "BYTES", ()),
    ("in_distribution", "BOOL", ()),
    ("out_of_distribution_score", "FP32", ()),
    ("gradcam_class", "BYTES", ()),
    ("gradcam_overlay", "BYTES", ()),
    ("gradcam_heatmap", "FP32", (-1, -1)),
)
OUTPUT_NAMES = tuple(name for name, _, _ in OUTPUTS)


@dataclass(frozen=True)
class InferRequest:
    """One inference request: its images (with the request's options), its id and the outputs asked for."""

    images: list[ParsedRequest]
    request_id: str | None = None
    outputs: tuple[str, ...] | None = None


class InferResponse(ImagesBody):
    """The named output tensors of a request whose every image was answered."""

    def __init__(self, images: list[Response], model_name: str, model_version: str, request_id: str | None,
                 outputs: tuple[str, ...] | None) -> None:
        self.images = images
        self.model_name, self.model_version, self.request_id, self.outputs = model_name, model_version, request_id, outputs

    def to_json(self) -> dict[str, Any]:
        predictions: list[Prediction] = [image.body for image in self.images]  # type: ignore[misc]
        tensors = _tensors(predictions)
        names = self.outputs or tuple(name for name in OUTPUT_NAMES if name in tensors)
        first = predictions[0]
        parameters: dict[str, Any] = {"decision_rule": first.decision_rule, "referral_threshold": first.referral.threshold,
                                      "notice": first.notice}
        if first.input_check is not None:
            parameters |= {"out_of_distribution_threshold": first.input_check.threshold,
                           "input_check_method": first.input_check.method}
        if first.gradcam is not None:
            parameters["gradcam_format"] = first.gradcam.format
        body: dict[str, Any] = {"model_name": self.model_name, "model_version": self.model_version}
        if self.request_id is not None:
            body["id"] = self.request_id
        body["parameters"] = parameters
        body["outputs"] = [tensors[name] for name in names if name in tensors]
        return body


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _tensors(predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    n = len(predictions)
    tensors = {
        "probabilities": _tensor("probabilities", "FP32", [n, len(CLASS_CODES)],
                                 [p.probabilities[code] for p in predictions for code in CLASS_CODES]),
        "class_names": _tensor("class_names", "BYTES", [len(CLASS_CODES)], list(CLASS_CODES)),
        "prediction": _tensor("prediction", "BYTES", [n], [p.prediction or "" for p in predictions]),
        "most_probable": _tensor("most_probable", "BYTES", [n], [p.most_probable or "" for p in predictions]),
        "confidence": _tensor("confidence", "FP32", [n], [p.confidence or 0.0 for p in predictions]),
        "malignant_probability": _tensor("malignant_probability", "FP32", [n],
                                         [p.malignant_probability for p in predictions]),
        "referral": _tensor("referral", "BOOL", [n], [bool(p.referral.refer) for p in predictions]),
        "risk": _tensor("risk", "BYTES", [n], [p.risk for p in predictions]),
    }
    checks = [p.input_check for p in predictions]
    if all(check is not None for check in checks):
        tensors["in_distribution"] = _tensor("in_distribution", "BOOL", [n], [c.in_distribution for c in checks])
        tensors["out_of_distribution_score"] = _tensor("out_of_distribution_score", "FP32", [n], [c.score for c in checks])
    explained = [p.gradcam for p in predictions]
    if all(gradcam is not None for gradcam in explained):
        tensors["gradcam_class"] = _tensor("gradcam_class", "BYTES", [n], [g.class_code for g in explained])
        tensors["gradcam_overlay"] = _tensor("gradcam_overlay", "BYTES", [n], [g.overlay for g in explained])
        height, width = len(explained[0].heatmap), len(explained[0].heatmap[0])
        tensors["gradcam_heatmap"] = _tensor("gradcam_heatmap", "FP32", [n, height, width],
                                             [v for g in explained for row in g.heatmap for v in row])
    return tensors


def read_inputs(payload: Mapping[str, Any], explain: bool, max_images: int, max_bytes: int | None) -> InferRequest:
    """The images, options, id and requested outputs of an inference request.

    Raises:
        RequestError: Anything wrong with the request, which the protocol refuses as a whole.
    """
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        raise MalformedJSONError(f"\"inputs\" must hold exactly one tensor, {{\"name\": \"{INPUT}\", \"datatype\": "
                                 "\"BYTES\", \"shape\": [n], \"data\": [\"<base64 image>\", ...]}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise MalformedJSONError(f"the input tensor must be named \"{INPUT}\", not {echo(tensor.get('name'))}")
    if tensor.get("datatype") != "BYTES":
        raise MalformedJSONError(f"input \"{INPUT}\" must have datatype BYTES (base64 image files), "
                                 f"not {echo(tensor.get('datatype'))}")
    if isinstance(tensor.get("parameters"), Mapping) and "binary_data_size" in tensor["parameters"]:
        raise MalformedJSONError("binary tensor data is not supported: send the images as base64 strings in JSON "
                                 "(tritonclient: set_data_from_numpy(..., binary_data=False))")
    data = tensor.get("data")
    if isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # shape [n, 1] written as nested rows
    shape = tensor.get("shape")
    if not isinstance(data, list) or not data:
        raise MalformedJSONError(f"input \"{INPUT}\" must have a non-empty \"data\" list of base64 images")
    if not isinstance(shape, list) or shape not in ([len(data)], [len(data), 1]):
        raise MalformedJSONError(f"input \"{INPUT}\" has shape {echo(shape)} for {len(data)} images; expected [{len(data)}]")
    if len(data) > max_images:
        raise TooManyImagesError(f"{len(data)} images in one request; the limit is {max_images}")
    options = payload.get("parameters") or {}
    if not isinstance(options, Mapping):
        raise InvalidOptionError(f"\"parameters\" must be an object, not {echo(options)}")
    images = [parse_options(decode_base64_image(encoded, f"image {index + 1} of {len(data)}"), options, explain)
              for index, encoded in enumerate(data)]
    total = sum(len(image.image) for image in images)
    if max_bytes is not None and total > max_bytes:
        raise PayloadTooLargeError(f"the images are {total} bytes together; the limit is {max_bytes}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise MalformedJSONError(f"\"id\" must be a string, not {echo(request_id)}")
    return InferRequest(images, request_id, _requested_outputs(payload.get("outputs")))


def _requested_outputs(outputs: Any) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) for o in outputs):
        raise MalformedJSONError(f"\"outputs\" must be a list of {{\"name\": ...}}, not {echo(outputs)}")
    names = tuple(o.get("name") for o in outputs)
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise MalformedJSONError(f"unknown outputs {echo(unknown)}; the model has {list(OUTPUT_NAMES)}")
    return names or None


def answer(request: InferRequest, images: Sequence[Response], model_name: str, model_version: str) -> Response:
    """The request's response: every image's answer as named tensors, or the first image's refusal."""
    for index, image in enumerate(images):
        if not image.ok:
            error = image.body
            return Response(error.status, ProtocolErrorBody(error.code, f"image {index + 1} of {len(images)}: {error.message}",
                                                            error.status, dict(error.details)))
    return Response(200, InferResponse(list(images), model_name, model_version, request.request_id, request.outputs))


def model_metadata(model_name: str, versions: Sequence[str] = ()) -> dict[str, Any]:
    """``GET /v2/models/{name}``'s answer: the input and every output the service can send.

    ``in_distribution``/``out_of_distribution_score`` come with a model that has an input gate,
    the ``gradcam_*`` outputs with ``"gradcam": true`` or ``/v2/models/{name}/explain``.
    """
    metadata: dict[str, Any] = {"name": model_name}
    if versions:
        metadata["versions"] = list(versions)
    metadata |= {"platform": "pytorch_torchserve",
                 "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                 "outputs": [{"name": name, "datatype": datatype,
                              "shape": [len(CLASS_CODES)] if name == "class_names" else [-1, *shape]}
                             for name, datatype, shape in OUTPUTS]}
    return metadata
