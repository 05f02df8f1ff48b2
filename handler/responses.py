"""What goes back for one request: typed response bodies and their JSON form.

Metrics, the demo and ``scripts/explain.py`` read these fields by attribute; the JSON the
service returns is :meth:`Prediction.to_json` / :meth:`ErrorBody.to_json`, and clients that
receive JSON turn it back with :meth:`Prediction.from_json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from handler.errors import RequestError
from handler.labels import CLASS_CODES, REFERRAL_CLASSES, Risk, class_index, lesion_class

NOTICE = ("Research and screening aid only, not a diagnosis. A dermatologist must assess any lesion of concern; "
          "a low-risk result does not rule out melanoma or skin cancer.")
# The answer on an image the input gate refused, given only because the operator allows clients to
# override the gate (handler.allow_gate_override): no class, no risk, no referral decision.
OVERRIDE_NOTICE = ("The input gate judged this image not to be a dermoscopic photo of a skin lesion; these "
                   "probabilities were returned only because the gate was overridden. They are not a screening "
                   "result: the model was never trained on such images.")


@dataclass(frozen=True)
class Referral:
    """Whether the malignant probability reached the referral threshold (None: no decision, the
    image was refused by the input gate and answered only because the gate was overridden)."""

    refer: bool | None
    threshold: float


@dataclass(frozen=True)
class InputCheck:
    """The out-of-distribution gate's verdict on one image (higher score = less like dermoscopy).

    Attributes:
        in_distribution: Whether the gate accepts the image.
        score: The distance to dermoscopic references; refused above ``threshold``.
        threshold: The distance threshold.
        method: The gate's method name.
        modality: The modality head's most probable class (``dermoscopy``, ``clinical``,
            ``other``), or from the distance alone for a gate without a head.
        modality_score: ``1 - p(dermoscopy)`` of the head; refused above ``modality_threshold``
            (both None without a head).
        refusal: The error code the gate refuses the image with (``not_dermoscopy`` or
            ``out_of_distribution``), None when it accepts it.
    """

    in_distribution: bool
    score: float
    threshold: float
    method: str
    modality: str | None = None
    modality_score: float | None = None
    modality_threshold: float | None = None
    refusal: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``input_check`` object (fields that do not apply are left out)."""
        return {name: value for name, value in dataclasses.asdict(self).items()
                if value is not None or name == "refusal"}


@dataclass(frozen=True)
class GradcamResult:
    """A Grad-CAM explanation: overlay on the full-resolution original, plus the raw map.

    Attributes:
        class_code: The explained class.
        overlay: The overlay image, base64-encoded.
        format: ``jpeg`` or ``png``.
        width: Overlay width in pixels.
        height: Overlay height in pixels.
        heatmap: The raw map over the model's input, rows of values in [0, 1].
        has_evidence: False when no region raises the class's score (an all-zero map).
        heatmap_box: ``(left, top, right, bottom)`` of the model's view in the overlay.
        method: The map's method (:data:`handler.explainers.METHOD_NAMES`): ``grad-cam`` for the
            fast explanation, ``layercam-s16-x-grad-cam-squared`` for the faithful one.
    """

    class_code: str
    overlay: str
    format: str
    width: int
    height: int
    heatmap: list[list[float]]
    has_evidence: bool
    heatmap_box: tuple[int, int, int, int]
    method: str = "grad-cam"

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_code, "overlay": self.overlay, "format": self.format, "width": self.width,
                "height": self.height, "heatmap": self.heatmap, "has_evidence": self.has_evidence,
                "heatmap_box": list(self.heatmap_box), "method": self.method}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> "GradcamResult":
        return cls(values["class"], values["overlay"], values["format"], int(values["width"]), int(values["height"]),
                   values["heatmap"], bool(values["has_evidence"]), tuple(values["heatmap_box"]),
                   str(values.get("method", "grad-cam")))


# The fields of a Prediction that name a class: absent from an overridden answer.
CLASS_FIELDS = ("prediction", "label", "confidence", "most_probable")


@dataclass(frozen=True)
class Prediction:
    """The answer for one image.

    Attributes:
        prediction: The class the decision rule names (None, and left out of the JSON with
            ``label``, ``confidence`` and ``most_probable``, for an image the input gate refused
            that is answered only because the gate was overridden).
        label: Its name.
        confidence: Its calibrated probability.
        most_probable: The most probable class (may differ under the ``balanced`` rule).
        decision_rule: The rule that named ``prediction``.
        probabilities: Calibrated probability per class code.
        malignant_probability: p(mel) + p(bcc) + p(akiec).
        risk: ``low``/``medium``/``high``, or ``unknown`` for an image the gate judged out of distribution.
        referral: The referral flag and its threshold.
        model_version: The served model's version.
        notice: What the answer is and is not.
        input_check: The input gate's verdict, or None when the model has no gate.
        gradcam: The explanation, when asked for.
    """

    prediction: str | None
    label: str | None
    confidence: float | None
    most_probable: str | None
    decision_rule: str
    probabilities: dict[str, float]
    malignant_probability: float
    risk: str
    referral: Referral
    model_version: str
    notice: str = NOTICE
    input_check: InputCheck | None = None
    gradcam: GradcamResult | None = None

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        body = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in ("referral", "input_check", "gradcam")
                and not (field.name in CLASS_FIELDS and getattr(self, field.name) is None)}
        body["referral"] = dataclasses.asdict(self.referral)
        if self.input_check is not None:
            body["input_check"] = self.input_check.to_json()
        if self.gradcam is not None:
            body["gradcam"] = self.gradcam.to_json()
        return body

    @property
    def gate_overridden(self) -> bool:
        """Whether this answers an image the input gate refused (the client overrode the gate)."""
        return self.input_check is not None and not self.input_check.in_distribution

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> "Prediction":
        """A response body turned back into a :class:`Prediction`."""
        plain = {field.name: values[field.name] for field in dataclasses.fields(cls)
                 if field.name not in ("referral", "input_check", "gradcam") and field.name in values}
        plain.update({name: values.get(name) for name in CLASS_FIELDS})
        return cls(**plain, referral=Referral(**values["referral"]),
                   input_check=InputCheck(**values["input_check"]) if values.get("input_check") else None,
                   gradcam=GradcamResult.from_json(values["gradcam"]) if values.get("gradcam") else None)


@dataclass(frozen=True)
class ErrorBody:
    """A refused request: ``{"error": {"code", "message", "status", ...details}}``."""

    code: str
    message: str
    status: int
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status, **self.details}}


@dataclass(frozen=True)
class ProtocolErrorBody(ErrorBody):
    """A refused KServe v1 or Open Inference Protocol request, in those protocols' own form ``{"error": "<message>"}``.

    Their clients read the error as a string: tritonclient's exception cannot even print a
    nested object. ``code``, ``status`` and ``details`` stay for metrics and the log.
    """

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message}


class ImagesBody:
    """The body of an answered request that carried several images (:mod:`handler.kserve_v1`,
    :mod:`handler.open_inference`): ``images`` are the per-image responses it was made from,
    which metrics count one by one."""

    images: list["Response"]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class Response:
    """What goes back for one request of a batch: a status code and a typed body."""

    status: int
    body: Prediction | ErrorBody | ImagesBody

    @property
    def ok(self) -> bool:
        return isinstance(self.body, (Prediction, ImagesBody))

    @property
    def images(self) -> list["Response"]:
        """The per-image responses: this one, or those an :class:`ImagesBody` was made from."""
        return self.body.images if isinstance(self.body, ImagesBody) else [self]

    def to_json(self) -> dict[str, Any]:
        return self.body.to_json()


def error_response(error: RequestError, flat: bool = False) -> Response:
    """The response for a request error: its status and code (the one mapping: :mod:`handler.errors`).

    ``flat``: in the KServe and Open Inference Protocol form (:class:`ProtocolErrorBody`).
    """
    status = int(error.status)
    return Response(status, (ProtocolErrorBody if flat else ErrorBody)(error.code, str(error), status, dict(error.details)))


def make_prediction(probabilities: Sequence[float], model_version: str, referral_threshold: float,
                    predicted: int | None = None, decision_rule: str = "most_probable",
                    input_check: InputCheck | None = None) -> Prediction:
    """The answer for one image from its calibrated probabilities.

    Args:
        probabilities: The 7 class probabilities in :data:`CLASS_CODES` order.
        model_version: Version of the served model.
        referral_threshold: Malignant probability that raises the referral flag.
        predicted: Index of the class the decision rule names; None names the most probable.
        decision_rule: The rule that chose ``predicted``.
        input_check: The input gate's verdict. An image it refused (answered only because the
            gate was overridden) gets probabilities but no class, risk ``unknown`` and no
            referral decision.
    """
    probs = {code: round(float(p), 6) for code, p in zip(CLASS_CODES, probabilities)}
    most_probable = max(probs, key=probs.get)
    top = most_probable if predicted is None else CLASS_CODES[predicted]
    malignant = float(sum(probabilities[class_index(code)] for code in REFERRAL_CLASSES))
    refer = malignant >= referral_threshold
    risk = Risk.HIGH if refer else lesion_class(top).risk
    if input_check is not None and not input_check.in_distribution:
        # No class, risk level or referral decision is honest for an image the gate does not
        # recognise as dermoscopy, even when the gate was overridden.
        return Prediction(None, None, None, None, decision_rule, probs, round(malignant, 6), "unknown",
                          Referral(None, referral_threshold), model_version, OVERRIDE_NOTICE, input_check)
    return Prediction(top, lesion_class(top).name, probs[top], most_probable, decision_rule, probs,
                      round(malignant, 6), risk.value, Referral(refer, referral_threshold), model_version,
                      input_check=input_check)
