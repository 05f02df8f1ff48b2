"""The served settings: the ``handler:`` block of ``model-config.yaml``, its schema and its one reader."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from handler.calibration import check_tta_mode
from handler.decision import check_decision_rule
from handler.overlay import OverlayStyle
from handler.decode_budget import DecodeBudget
from handler.preprocessing import DecodeLimits
from handler.runtime import check_runtime


@dataclass(frozen=True)
class HandlerSettings:
    """Serving settings, read from the ``handler:`` block of ``model-config.yaml``.

    Attributes:
        max_body_bytes: Largest accepted image, in bytes (after base64 decoding). TorchServe's
            own ``max_request_size`` sits above it and answers with an empty 413.
        max_images_per_request: Most images one KServe v1 (``instances``) or Open Inference
            Protocol v2 (``inputs``) request may carry; each counts toward the batch like a
            request of its own, and all of a request's decoded images together toward
            ``max_body_bytes``.
        max_pixels: Decompression-bomb guard: largest width x height decoded.
        min_side: Smallest accepted image side, in pixels.
        max_aspect_ratio: Largest accepted long side / short side, checked before any resize.
        max_decoded_bytes, max_jpeg_scans, max_segments, max_frames, max_pixels_per_byte,
        ratio_check_min_pixels: The decode budget, what one image may cost a worker
            (:class:`handler.decode_budget.DecodeBudget`, which documents each).
        referral_threshold: ``malignant_probability`` at or above which the response
            raises the referral flag and the risk becomes ``high``.
        decision_rule: Which class ``prediction`` names, one of
            :data:`handler.decision.DECISION_RULES`: ``most_probable``, or ``balanced``
            (highest probability relative to the class's prevalence).
        tta: Test-time augmentation, one of :data:`handler.calibration.TTA_MODES`
            (``none``, ``hflip``: 2 views, ``flip4``: 4 flipped views in one forward pass).
        runtime: ``eager``, ``torchscript`` (traced and frozen at worker start) or ``openvino``
            (converted and compiled at worker start; CPU, fp32).
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (for GPUs; slow on this CPU).
        torch_threads: Intra-op threads per worker; 0 keeps PyTorch's default (all cores).
        gradcam_alpha: Heatmap weight in the overlay blend.
        gradcam_colormap: Overlay colour map (see :data:`handler.overlay.COLORMAPS`).
        gradcam_format: Overlay encoding, ``png`` or ``jpeg``.
        gradcam_jpeg_quality: JPEG quality when ``gradcam_format`` is ``jpeg``.
        gradcam_max_side: Longer side above which overlays are scaled down.
        heatmap_decimals: Rounding of the raw heatmap values in the response.
        require_input_gate: Refuse to load a checkpoint without an out-of-distribution gate
            (``meta.input_gate``). The served config sets it; unit tests of tiny models do not.
        allow_gate_override: Whether a client may ask for an answer on an image the input gate
            refuses (``allow_out_of_distribution``). Off by default: the gate is the operator's,
            and a request asking for the override gets a 403 ``gate_override_not_allowed``. When
            on, the overridden answer carries probabilities but no class, risk ``unknown`` and
            ``referral.refer`` null, and is counted in ``skin_lesion_gate_overrides_total``.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 16
    max_pixels: int = 40_000_000
    min_side: int = 8
    max_aspect_ratio: float = 4.0
    max_decoded_bytes: int = DecodeBudget.max_decoded_bytes
    max_jpeg_scans: int = DecodeBudget.max_jpeg_scans
    max_segments: int = DecodeBudget.max_segments
    max_frames: int = DecodeBudget.max_frames
    max_pixels_per_byte: float = DecodeBudget.max_pixels_per_byte
    ratio_check_min_pixels: int = DecodeBudget.ratio_check_min_pixels
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
    require_input_gate: bool = False
    allow_gate_override: bool = False

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
        return cls(**{name: _coerce(getattr(cls, name), value, name) for name, value in values.items()})

    @property
    def decode_limits(self) -> DecodeLimits:
        """The decode limits these settings imply."""
        budget = DecodeBudget(self.max_decoded_bytes, self.max_jpeg_scans, self.max_segments, self.max_frames,
                              self.max_pixels_per_byte, self.ratio_check_min_pixels)
        return DecodeLimits(max_pixels=self.max_pixels, min_side=self.min_side, max_aspect_ratio=self.max_aspect_ratio,
                            budget=budget)

    @property
    def overlay_style(self) -> OverlayStyle:
        """The Grad-CAM overlay style these settings imply."""
        return OverlayStyle(self.gradcam_alpha, self.gradcam_colormap, self.gradcam_format,
                            self.gradcam_jpeg_quality, self.gradcam_max_side)


def _coerce(default: Any, value: Any, name: str) -> Any:
    # bool("false") is True: YAML gives real booleans, anything else is a mistake to report.
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"handler setting {name} must be true or false, got {value!r}")
    return type(default)(value)


def load_handler_settings(model_config: str | Path) -> HandlerSettings:
    """The ``handler:`` block of a ``model-config.yaml``, exactly as the served handler reads it."""
    import yaml

    return HandlerSettings.from_mapping((yaml.safe_load(Path(model_config).read_text()) or {}).get("handler"))
