"""The seven HAM10000 diagnostic classes, in the fixed order the model's head uses."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Malignancy(str, Enum):
    """Biological behaviour of a lesion class."""

    MALIGNANT = "malignant"
    PRECANCEROUS = "pre-cancerous / in-situ carcinoma"
    BENIGN = "benign"


class Risk(str, Enum):
    """Screening risk attached to a lesion class, ordered low < medium < high."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """Position in the low < medium < high order."""
        return [Risk.LOW, Risk.MEDIUM, Risk.HIGH].index(self)


@dataclass(frozen=True)
class LesionClass:
    """One diagnostic class of the HAM10000 taxonomy."""

    code: str
    name: str
    malignancy: Malignancy
    risk: Risk


LESION_CLASSES: tuple[LesionClass, ...] = (
    LesionClass("akiec", "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
                Malignancy.PRECANCEROUS, Risk.MEDIUM),
    LesionClass("bcc", "Basal cell carcinoma", Malignancy.MALIGNANT, Risk.HIGH),
    LesionClass("bkl", "Benign keratosis-like lesion", Malignancy.BENIGN, Risk.LOW),
    LesionClass("df", "Dermatofibroma", Malignancy.BENIGN, Risk.LOW),
    LesionClass("mel", "Melanoma", Malignancy.MALIGNANT, Risk.HIGH),
    LesionClass("nv", "Melanocytic nevus", Malignancy.BENIGN, Risk.LOW),
    LesionClass("vasc", "Vascular lesion", Malignancy.BENIGN, Risk.LOW),
)

CLASS_CODES: tuple[str, ...] = tuple(c.code for c in LESION_CLASSES)
NUM_CLASSES: int = len(LESION_CLASSES)
# Classes whose probabilities add up to the "malignant probability" the service reports:
# the two cancers plus the pre-cancerous akiec, which is also referred for biopsy.
REFERRAL_CLASSES: tuple[str, ...] = ("akiec", "bcc", "mel")

_BY_CODE = {c.code: c for c in LESION_CLASSES}


def lesion_class(code: str) -> LesionClass:
    """Look up a class by its HAM10000 ``dx`` code.

    Args:
        code: One of :data:`CLASS_CODES`, case-insensitive.

    Returns:
        The matching :class:`LesionClass`.

    Raises:
        KeyError: If the code is not a HAM10000 class.
    """
    try:
        return _BY_CODE[code.lower()]
    except KeyError:
        raise KeyError(f"unknown lesion class {code!r}; expected one of {list(CLASS_CODES)}") from None


def class_index(code: str) -> int:
    """Index of a class code in the model's output vector."""
    return CLASS_CODES.index(lesion_class(code).code)
