"""Bootstrap intervals of the evaluation figures, against the binomial standard error they must reproduce."""

import numpy as np
import pytest

from handler.labels import CLASS_CODES, class_index
from lab.evaluation import bootstrap_intervals, classification_report, one_vs_rest_auc

K = len(CLASS_CODES)


def noisy_calls(per_class: int, recall: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, calls right with probability ``recall`` (else another class), and probabilities peaked on the call."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), per_class)
    wrong = (labels + rng.integers(1, K, size=labels.size)) % K
    calls = np.where(rng.random(labels.size) < recall, labels, wrong)
    probabilities = np.full((labels.size, K), 0.3 / (K - 1))
    probabilities[np.arange(labels.size), calls] = 0.7
    return labels, calls, probabilities


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import confusion_matrix, roc_auc_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        positives = rng.random(300) < rng.uniform(0.02, 0.5)
        positives[:2] = [True, False]
        scores = np.round(rng.random(300) + positives * rng.uniform(0, 1), 1)  # rounding makes ties
        assert one_vs_rest_auc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    labels, calls, probabilities = noisy_calls(30, 0.5)
    report = classification_report(probabilities, labels, None, calls)
    assert report["confusion_matrix"] == confusion_matrix(labels, calls, labels=list(range(K))).tolist()


def test_balanced_accuracy_interval_has_the_binomial_width():
    # Mean of 7 independent recalls, each binomial(200, 0.7): standard error sqrt(0.21 / 200 / 7).
    labels, calls, probabilities = noisy_calls(200, 0.7)
    result = bootstrap_intervals(probabilities, labels, calls, resamples=1000)
    low, high = result["intervals"]["balanced_accuracy"]
    expected_width = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 200 / K)
    assert high - low == pytest.approx(expected_width, rel=0.2)
    point = classification_report(probabilities, labels, None, calls)
    for key, (low, high) in result["intervals"].items():
        assert low <= point[key] <= high, key


def test_class_support_is_kept_so_perfect_calls_have_no_spread():
    labels, calls, probabilities = noisy_calls(5, 1.0)
    intervals = bootstrap_intervals(probabilities, labels, calls, resamples=200)["intervals"]
    assert intervals["balanced_accuracy"] == [1.0, 1.0] and intervals["accuracy"] == [1.0, 1.0]


def test_rare_class_dominates_the_spread():
    # Six large perfect classes and one class of 8 images at half recall: BA = (6 + 0.5) / 7
    # and its interval is that one class's binomial spread divided by 7.
    labels, calls, probabilities = noisy_calls(300, 1.0)
    rare = np.flatnonzero(labels == class_index("df"))[:8]
    keep = np.concatenate([np.flatnonzero(labels != class_index("df")), rare])
    labels, calls, probabilities = labels[keep], calls[keep].copy(), probabilities[keep]
    calls[-4:] = class_index("nv")
    low, high = bootstrap_intervals(probabilities, labels, calls, resamples=2000)["intervals"]["balanced_accuracy"]
    assert low < (6 + 0.5) / K < high
    assert 0.07 < high - low < 0.13  # 2 * 1.96 * sqrt(0.25 / 8) / 7 = 0.099


def test_seeded_and_leaves_out_figures_the_data_cannot_define():
    labels, calls, probabilities = noisy_calls(20, 0.6)
    keep = labels != class_index("mel")
    first = bootstrap_intervals(probabilities[keep], labels[keep], calls[keep], resamples=100, seed=3)
    assert first == bootstrap_intervals(probabilities[keep], labels[keep], calls[keep], resamples=100, seed=3)
    assert first != bootstrap_intervals(probabilities[keep], labels[keep], calls[keep], resamples=100, seed=4)
    assert "melanoma_sensitivity" not in first["intervals"] and "macro_auc" in first["intervals"]
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals(probabilities, labels, calls, resamples=0)
