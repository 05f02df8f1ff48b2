"""Which class a response names: the decision rule applied to the calibrated probabilities.

Calibrated probabilities carry the class prevalence of the data they were calibrated on
(nv is 72 % of HAM10000 lesions), so the most probable class is rarely a rare one: that
rule suits accuracy, not the seven classes counted equally. ``balanced`` names the class
whose probability is highest *relative to its prevalence*, ``argmax_k p_k / prior_k``: for
calibrated probabilities this is the Bayes decision under a uniform class prior, the rule
that maximizes expected balanced accuracy (mean per-class recall). It has no fitted
parameters beyond the class frequencies of the calibration set. The probabilities, the
malignant probability and the referral flag are the same under both rules.
"""

from __future__ import annotations

from typing import Sequence

import torch

DECISION_RULES: tuple[str, ...] = ("most_probable", "balanced")


def check_decision_rule(rule: str) -> str:
    """Return ``rule`` if it is one of :data:`DECISION_RULES`.

    Raises:
        ValueError: Naming the known rules.
    """
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; choose one of {list(DECISION_RULES)}")
    return rule


def decide(probabilities: torch.Tensor, rule: str, class_prior: Sequence[float] | None = None) -> torch.Tensor:
    """The class index each row names under ``rule``.

    Args:
        probabilities: (N, K) calibrated probabilities.
        rule: ``most_probable`` or ``balanced``.
        class_prior: (K,) class frequencies the probabilities were calibrated on; required
            for ``balanced``.

    Returns:
        (N,) int64 class indices.

    Raises:
        ValueError: On an unknown rule, or ``balanced`` without a prior of K positive values.
    """
    if check_decision_rule(rule) == "most_probable":
        return probabilities.argmax(dim=1)
    if class_prior is None or len(class_prior) != probabilities.shape[1] or min(class_prior) <= 0:
        raise ValueError(f"the balanced decision rule needs {probabilities.shape[1]} positive class frequencies, "
                         f"got {class_prior}")
    prior = torch.as_tensor(class_prior, dtype=probabilities.dtype, device=probabilities.device)
    return (probabilities / prior).argmax(dim=1)
