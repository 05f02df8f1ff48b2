"""Calibration fitting, TTA views and the referral operating point, on synthetic data with known answers."""

import numpy as np
import pytest
import torch

from handler.calibration import Calibration, augmented_views, merge_views
from handler.decision import decide
from handler.labels import class_index
from lab.calibration import fit_calibration
from lab.evaluation import expected_calibration_error, malignant_probability, referral_threshold_for_sensitivity


def test_fit_recovers_temperature_and_prior_shift():
    # Labels drawn from softmax(z / T + b): the fit must find T and b (up to a common shift).
    generator = torch.Generator().manual_seed(0)
    temperature, bias = 1.8, torch.tensor([0.5, -0.3, 0.2, -1.0, 0.4, 1.2, -1.0])
    logits = torch.randn(40_000, 7, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(logits / temperature + bias, 1), 1, generator=generator).squeeze(1)
    fitted = fit_calibration(logits, labels)
    assert fitted.temperature == pytest.approx(temperature, rel=0.05)
    assert torch.tensor(fitted.class_bias) == pytest.approx(bias - bias.mean(), abs=0.06)
    temperature_only = fit_calibration(logits, labels, class_bias=False)
    calibrated = fitted.apply(logits).numpy()
    assert expected_calibration_error(calibrated, labels.numpy()) < 0.01
    assert expected_calibration_error(temperature_only.apply(logits).numpy(), labels.numpy()) > \
        expected_calibration_error(calibrated, labels.numpy())


def test_prior_shift_fits_the_temperature_and_keeps_a_balanced_networks_own_calls():
    # A network trained class-balanced: in a world of equal class frequencies its softmax(z / T) is the
    # posterior. The served data keeps each class's images but has skewed frequencies (each class
    # subsampled to its share), so there the posterior is softmax(z / T + log prior). prior_shift
    # must find T, set the biases to the log class frequencies, be calibrated, and leave the
    # balanced rule with the network's own argmax.
    generator = torch.Generator().manual_seed(1)
    temperature = 1.5
    balanced_logits = torch.randn(210_000, 7, generator=generator) * 3
    balanced_labels = torch.multinomial(torch.softmax(balanced_logits / temperature, 1), 1,
                                        generator=generator).squeeze(1)
    prior = torch.tensor([0.03, 0.05, 0.10, 0.01, 0.11, 0.68, 0.02])
    kept = torch.cat([torch.nonzero(balanced_labels == k).squeeze(1)[:int(share * 40_000)]
                      for k, share in enumerate(prior.tolist())])
    logits, labels = balanced_logits[kept], balanced_labels[kept]
    shifted = fit_calibration(logits, labels, bias_method="prior_shift")
    assert shifted.temperature == pytest.approx(temperature, rel=0.05)
    frequencies = torch.bincount(labels, minlength=7).double() / len(labels)
    log_frequencies = frequencies.log().float()
    assert torch.tensor(shifted.class_bias) == pytest.approx(log_frequencies - log_frequencies.mean(), abs=1e-5)
    probabilities = shifted.apply(logits)
    assert expected_calibration_error(probabilities.numpy(), labels.numpy()) < 0.01
    assert torch.equal(decide(probabilities, "balanced", shifted.class_prior), logits.argmax(1))
    with pytest.raises(ValueError, match="prior_shift"):
        fit_calibration(logits, labels, bias_method="prior")


def test_calibration_round_trips_through_plain_dicts():
    calibration = Calibration(0.8, (0.1, -0.1, 0.0, 0.0, 0.2, -0.2, 0.0))
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    assert Calibration.from_dict({"temperature": 2.0, "class_bias": None}).apply(torch.tensor([[2.0, 0.0]])) == \
        pytest.approx(torch.softmax(torch.tensor([[1.0, 0.0]]), 1))


def test_tta_views_put_the_original_first_and_average_back():
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    views = augmented_views(batch, "flip4")
    assert views.shape == (8, 3, 4, 5)
    assert torch.equal(views[:2], batch) and torch.equal(views[2:4], batch.flip(3))
    assert torch.equal(views[4:6], batch.flip(2)) and torch.equal(views[6:], batch.flip(2).flip(3))
    logits = torch.arange(8 * 7, dtype=torch.float32).reshape(8, 7)
    assert torch.equal(merge_views(logits, "flip4"), torch.stack([logits[0::2].mean(0), logits[1::2].mean(0)]))
    assert augmented_views(batch, "none") is batch


def test_operating_point_is_the_highest_threshold_keeping_sensitivity():
    probabilities = np.full((10, 7), 0.0)
    labels = np.array([class_index("mel")] * 5 + [class_index("nv")] * 5)
    mel_scores = [0.9, 0.6, 0.4, 0.2, 0.05]
    for row, score in enumerate(mel_scores):
        probabilities[row, class_index("mel")] = score
        probabilities[row, class_index("nv")] = 1 - score
    probabilities[5:, class_index("nv")] = 1.0
    assert malignant_probability(probabilities)[:5] == pytest.approx(mel_scores)
    assert referral_threshold_for_sensitivity(probabilities, labels, 0.8) == pytest.approx(0.2)
    assert referral_threshold_for_sensitivity(probabilities, labels, 0.6) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no melanomas"):
        referral_threshold_for_sensitivity(probabilities[5:], labels[5:], 0.8)
