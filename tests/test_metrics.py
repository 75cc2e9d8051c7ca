"""transfer_learning.metrics' ROC AUC: macro one-vs-rest for 3+ classes, checked against
pair counting; binary runs unchanged (class index 1 positive)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning import metrics  # noqa: E402

# The three-class example of test_stages.test_classification_metrics_three_classes_by_hand.
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
