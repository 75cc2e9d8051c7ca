"""transfer_learning.metrics: ROC AUC, macro one-vs-rest for 3+ classes, checked against
pair counting (binary runs unchanged, class index 1 positive); accuracy, loss, per-class
precision, recall and F1, the confusion matrix and the ROC curve."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning import metrics  # noqa: E402

# The three-class example of test_classification_metrics_three_classes_by_hand (below).
TRUE3 = np.array([0, 0, 1, 1, 2, 2])
PROBS3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
)


def _auc_by_pairs(positive, score):
    """Share of (positive, negative) pairs the positive wins, ties half; None if undefined."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _macro_by_pairs(true, probs):
    aucs = [_auc_by_pairs(true == k, probs[:, k]) for k in range(probs.shape[1])]
    defined = [a for a in aucs if a is not None]
    return sum(defined) / len(defined) if defined else math.nan


def test_three_classes_macro_auc_by_hand():
    # Class a vs rest, p_a: positives 0.7, 0.3 against 0.1, 0.2, 0.1, 0.5 -> 4 + 3 of 8.
    # Class b vs rest, p_b: positives 0.8, 0.5 against 0.2, 0.6, 0.1, 0.1 -> 4 + 3 of 8.
    # Class c vs rest, p_c: positives 0.8, 0.4 against 0.1, 0.1, 0.1, 0.3 -> 4 + 4 of 8.
    expected = (7 / 8 + 7 / 8 + 8 / 8) / 3
    assert expected == pytest.approx(11 / 12)
    assert _macro_by_pairs(TRUE3, PROBS3) == pytest.approx(expected)
    assert metrics.macro_roc_auc(TRUE3, PROBS3) == pytest.approx(expected, abs=1e-12)
    row = metrics.classification_metrics(TRUE3, PROBS3, ["a", "b", "c"])
    assert row["roc_auc"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("num_classes, seed", [(3, 0), (3, 1), (4, 2), (5, 3), (7, 4)])
def test_macro_auc_matches_pair_count_with_ties(num_classes, seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, 80)
    true[:num_classes] = np.arange(num_classes)
    logits = rng.normal(size=(80, num_classes)) + 1.5 * np.eye(num_classes)[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 1)  # many ties
    expected = _macro_by_pairs(true, probs)
    assert metrics.macro_roc_auc(true, probs) == pytest.approx(expected, abs=1e-12)
    names = [f"c{k}" for k in range(num_classes)]
    row = metrics.classification_metrics(true, probs, names)
    assert row["roc_auc"] == pytest.approx(expected, abs=1e-12)
    # Renaming (permuting) the classes changes nothing.
    perm = rng.permutation(num_classes)
    inverse = np.argsort(perm)
    assert metrics.macro_roc_auc(inverse[true], probs[:, perm]) == pytest.approx(
        expected, abs=1e-12
    )


def test_absent_class_is_left_out_of_the_mean():
    # Class c has no image in the split: its one-vs-rest AUC is undefined, so the mean is
    # over a and b only. Rows 0-3: a, p_a 0.7, 0.3 against 0.1, 0.2 -> 4 of 4; b, p_b
    # 0.8, 0.5 against 0.2, 0.6 -> 2 + 1 of 4.
    true, probs = TRUE3[:4], PROBS3[:4]
    a = _auc_by_pairs(true == 0, probs[:, 0])
    b = _auc_by_pairs(true == 1, probs[:, 1])
    assert _auc_by_pairs(true == 2, probs[:, 2]) is None
    assert (a, b) == (1.0, 0.75)
    assert metrics.macro_roc_auc(true, probs) == pytest.approx(0.875)
    row = metrics.classification_metrics(true, probs, ["a", "b", "c"])
    assert row["roc_auc"] == pytest.approx((a + b) / 2)
    assert not math.isnan(row["roc_auc"])


def test_single_class_or_empty_split_is_nan():
    assert math.isnan(metrics.macro_roc_auc(np.array([1, 1]), PROBS3[:2]))
    assert math.isnan(metrics.macro_roc_auc(np.zeros(0, int), np.zeros((0, 3))))
    row = metrics.classification_metrics(np.array([2, 2, 2]), PROBS3[3:], ["a", "b", "c"])
    assert math.isnan(row["roc_auc"])


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_unchanged(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, 60)
    true[:2] = [0, 1]
    p1 = np.round(rng.random(60) * 0.5 + true * 0.3, 1)
    # Columns that do not sum to one: only class index 1's column may count, as before.
    p0 = np.round(rng.random(60), 1)
    probs = np.stack([p0, p1], 1)
    before = metrics.roc_auc(true, probs[:, 1])  # what classification_metrics reported
    assert metrics.macro_roc_auc(true, probs) == before
    row = metrics.classification_metrics(true, probs, ["neg", "pos"])
    assert row["roc_auc"] == before
    assert before == pytest.approx(_auc_by_pairs(true == 1, p1), abs=1e-12)


def test_binary_with_one_class_is_nan_as_before():
    probs = np.array([[0.4, 0.6], [0.9, 0.1]])
    assert math.isnan(metrics.macro_roc_auc(np.array([1, 1]), probs))
    row = metrics.classification_metrics(np.array([0, 0]), probs, ["neg", "pos"])
    assert math.isnan(row["roc_auc"])


def test_macro_auc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics.macro_roc_auc(TRUE3, PROBS3[:5])
    with pytest.raises(ValueError, match="shape"):
        metrics.macro_roc_auc(TRUE3, PROBS3[:, 0])


# ---- accuracy, loss, per-class scores, confusion matrix, binary ROC AUC and curve ---------


def test_classification_metrics_three_classes_by_hand():
    true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # 0 -> 0
            [0.3, 0.6, 0.1],  # 0 -> 1
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.2, 0.5, 0.3],  # 1 -> 1
            [0.1, 0.1, 0.8],  # 2 -> 2
            [0.5, 0.1, 0.4],  # 2 -> 0
        ]
    )
    row = metrics.classification_metrics(true, probs, ["a", "b", "c"])
    assert row["n"] == 6
    assert row["accuracy"] == pytest.approx(4 / 6)
    assert row["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.4])))
    assert (row["precision_a"], row["recall_a"], row["f1_a"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (row["precision_b"], row["recall_b"], row["f1_b"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (row["precision_c"], row["recall_c"], row["f1_c"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert row["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert row["roc_auc"] == pytest.approx(11 / 12)  # macro one-vs-rest, by pair counts
    assert metrics.confusion_matrix(true, probs.argmax(1), 3).tolist() == [
        [1, 1, 0],
        [0, 2, 0],
        [1, 0, 1],
    ]


def test_class_never_predicted_has_zero_precision_not_nan():
    row = metrics.classification_metrics(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["x", "y"]
    )
    assert row["precision_y"] == 0.0 and row["recall_y"] == 0.0 and row["f1_y"] == 0.0
    assert row["precision_x"] == 0.5 and row["recall_x"] == 1.0


def _binary_auc_by_pairs(true, score):
    pos, neg = score[true == 1], score[true == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, 60)
    true[:2] = [0, 1]
    score = np.round(rng.random(60) * 0.5 + true * 0.3, 1)  # many ties
    assert metrics.roc_auc(true, score) == pytest.approx(
        _binary_auc_by_pairs(true, score), abs=1e-12
    )
    probs = np.stack([1 - score, score], 1)
    row = metrics.classification_metrics(true, probs, ["neg", "pos"])
    assert row["roc_auc"] == pytest.approx(_binary_auc_by_pairs(true, score), abs=1e-12)


def test_roc_auc_edge_cases_and_curve():
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.3, 0.4])))
    fpr, tpr = metrics.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
