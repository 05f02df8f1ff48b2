"""The decision rule that names a response's class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.calibration import fit_calibration
from handler.decision import decide
from tests.conftest import HAM10000_PRIOR


def test_most_probable_is_the_argmax_and_balanced_divides_out_the_prior():
    probabilities = torch.tensor([[0.02, 0.01, 0.05, 0.03, 0.09, 0.78, 0.02],
                                  [0.01, 0.01, 0.02, 0.00, 0.01, 0.95, 0.00]])
    assert decide(probabilities, "most_probable").tolist() == [5, 5]
    # Row 0: df is 3x its prevalence (0.03 / 0.010) while nv is about 1.1x: balanced names df.
    assert decide(probabilities, "balanced", HAM10000_PRIOR).tolist() == [3, 5]


def test_balanced_rule_needs_a_positive_prior_per_class():
    probabilities = torch.full((1, 7), 1 / 7)
    with pytest.raises(ValueError, match="positive class frequencies"):
        decide(probabilities, "balanced", None)
    with pytest.raises(ValueError, match="positive class frequencies"):
        decide(probabilities, "balanced", [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown decision rule"):
        decide(probabilities, "bayes")


def test_balanced_rule_raises_balanced_accuracy_on_calibrated_imbalanced_data():
    """Seven overlapping Gaussian classes with HAM10000's prevalence: the true posterior under the
    balanced rule beats its argmax on balanced accuracy, and loses on plain accuracy."""
    generator = np.random.default_rng(0)
    prior = np.array(HAM10000_PRIOR) / sum(HAM10000_PRIOR)
    labels = generator.choice(7, size=40_000, p=prior)
    means = np.eye(7) * 1.2
    points = means[labels] + generator.normal(size=(len(labels), 7))
    log_likelihood = -0.5 * ((points[:, None, :] - means[None]) ** 2).sum(-1)
    posterior = torch.softmax(torch.tensor(log_likelihood + np.log(prior)), dim=1)

    def balanced_accuracy(calls: torch.Tensor) -> float:
        return float(np.mean([(calls.numpy()[labels == k] == k).mean() for k in range(7)]))

    most_probable = decide(posterior, "most_probable")
    balanced = decide(posterior, "balanced", prior.tolist())
    assert balanced_accuracy(balanced) > balanced_accuracy(most_probable) + 0.15
    assert (balanced.numpy() == labels).mean() < (most_probable.numpy() == labels).mean()


def test_fitted_calibration_records_the_label_frequencies_as_its_prior():
    labels = torch.tensor([5] * 6 + [4] * 3 + [0])
    calibration = fit_calibration(torch.randn(len(labels), 7), labels)
    # Absent classes count as one image so that the prior stays positive.
    assert calibration.class_prior == pytest.approx([1 / 14, 1 / 14, 1 / 14, 1 / 14, 3 / 14, 6 / 14, 1 / 14], abs=1e-6)
    assert type(calibration).from_dict(calibration.to_dict()) == calibration
