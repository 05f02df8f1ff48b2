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


def lesion_calls(labels: np.ndarray, calls: np.ndarray, probabilities: np.ndarray):
    from lab.release_comparison import LesionCalls

    return LesionCalls("x.pt", "0", len(labels), [f"L{i}" for i in range(len(labels))], labels, probabilities,
                       calls, 0.1)


def test_paired_differences_see_one_lesion_that_side_by_side_intervals_cannot():
    from lab.release_comparison import paired_differences

    # 8 dermatofibromas among 7 classes at recall 0.6: the second release is right on one df the first misses.
    labels, calls, probabilities = noisy_calls(60, 0.6, seed=2)
    rare = np.flatnonzero(labels == class_index("df"))
    keep = np.concatenate([np.flatnonzero(labels != class_index("df")), rare[:8]])
    labels, calls, probabilities = labels[keep], calls[keep].copy(), probabilities[keep]
    missed = np.flatnonzero((labels == class_index("df")) & (calls != labels))[0]
    better = calls.copy()
    better[missed] = labels[missed]
    first, other = lesion_calls(labels, calls, probabilities), lesion_calls(labels, better, probabilities)

    paired = paired_differences(first, other, resamples=500)["balanced_accuracy"]
    assert paired["difference"] == pytest.approx(1 / 8 / K)
    # On every draw the second release is right on a superset of the first's lesions.
    assert 0 <= paired["low"] <= paired["difference"] <= paired["high"]
    alone = bootstrap_intervals(probabilities, labels, calls, resamples=500)["intervals"]["balanced_accuracy"]
    assert paired["high"] - paired["low"] < (alone[1] - alone[0]) / 2
    from lab.release_comparison import format_differences
    table = format_differences({"stretched": {"other": {"balanced_accuracy": paired}}}, "first")
    assert "| stretched | other | +0.018 (" in table and table.count("| - ") == 5
    same = paired_differences(first, first, resamples=50)
    assert all(row == {"difference": 0.0, "low": 0.0, "high": 0.0} for row in same.values())
    with pytest.raises(ValueError, match="same lesions"):
        paired_differences(first, lesion_calls(labels[1:], calls[1:], probabilities[1:]))
