"""Test-time augmentation views and the post-hoc calibration that belongs to each.

A checkpoint stores one :class:`Calibration` per TTA mode in ``meta["calibration"]``
because averaging flipped views changes the logits' scale, so a temperature fitted for
one mode is wrong for another.

Calibration is temperature scaling plus one bias per class, fitted on the validation
split by minimizing negative log-likelihood (offline, by :func:`lab.calibration.fit_calibration`;
what serves only applies it). The bias is what makes the probabilities
honest for a model trained with class-weighted loss or a weighted sampler: such training
shifts the model's implicit class prior towards uniform, and a temperature alone cannot
move it back to the real prevalence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

_VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (lambda x: x,),
    "hflip": (lambda x: x, lambda x: x.flip(3)),
    "flip4": (lambda x: x, lambda x: x.flip(3), lambda x: x.flip(2), lambda x: x.flip(2).flip(3)),
}
TTA_MODES: tuple[str, ...] = tuple(_VIEWS)


def check_tta_mode(mode: str) -> str:
    """Return ``mode`` if it is a known TTA mode.

    Raises:
        ValueError: Otherwise.
    """
    if mode not in _VIEWS:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {list(TTA_MODES)}")
    return mode


def augmented_views(batch: torch.Tensor, mode: str) -> torch.Tensor:
    """Stack the TTA views of an (N, C, H, W) batch into one (V*N, C, H, W) batch.

    The first N rows are the unaugmented images, so Grad-CAM can use their features.
    """
    views = _VIEWS[check_tta_mode(mode)]
    if len(views) == 1:
        return batch
    return torch.cat([view(batch) for view in views]).contiguous(memory_format=torch.channels_last)


def merge_views(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Average the (V*N, K) logits of :func:`augmented_views` back to (N, K)."""
    count = len(_VIEWS[check_tta_mode(mode)])
    return logits.reshape(count, -1, logits.shape[-1]).mean(0)


@dataclass(frozen=True)
class Calibration:
    """``softmax(logits / temperature + class_bias)``; the identity is ``Calibration(1.0, None)``.

    ``class_prior`` is the class frequencies of the images it was fitted on: the prevalence
    its probabilities carry, which the balanced decision rule (:mod:`handler.decision`)
    divides out.
    """

    temperature: float = 1.0
    class_bias: tuple[float, ...] | None = None
    class_prior: tuple[float, ...] | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities from (N, K) logits."""
        scaled = logits.float() / self.temperature
        if self.class_bias is not None:
            scaled = scaled + torch.tensor(self.class_bias, dtype=scaled.dtype, device=scaled.device)
        return torch.softmax(scaled, dim=1)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for the checkpoint's ``meta``."""
        return {"temperature": self.temperature, "class_bias": list(self.class_bias) if self.class_bias is not None else None,
                "class_prior": list(self.class_prior) if self.class_prior is not None else None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_dict`."""
        bias, prior = values.get("class_bias"), values.get("class_prior")
        return cls(float(values["temperature"]), tuple(float(b) for b in bias) if bias is not None else None,
                   tuple(float(p) for p in prior) if prior is not None else None)
