"""Classification metrics from probabilities, without a scikit-learn dependency."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def roc_auc(true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of a binary problem (Mann-Whitney U, ties counted half)."""
    positives, negatives = score[true == 1], score[true == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[true == 1].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(positives) * len(negatives)))


def macro_roc_auc(true: np.ndarray, probabilities: np.ndarray) -> float:
    """The ROC AUC that metrics.tsv reports, from class indices and an (n, classes) array.

    Two classes: the binary AUC of class index 1 as the positive class, scored by its
    probability (column 1). Three or more: the macro one-vs-rest AUC, the unweighted mean
    over classes k of the binary AUC of "class k" against "every other class", scored by
    the probability of class k. A class with no positives or no negatives in `true` (absent
    from the split, or the only class in it) has no AUC of its own; the mean is over the
    classes where it is defined, and NaN when it is defined for none (binary: NaN unless
    both classes are present).
    """
    true = np.asarray(true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) != len(true):
        raise ValueError(
            f"probabilities must be (n, classes) with n = {len(true)}, "
            f"got shape {probabilities.shape}"
        )
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return roc_auc(true, probabilities[:, 1])
    aucs = [roc_auc((true == k).astype(np.int64), probabilities[:, k]) for k in range(num_classes)]
    defined = [auc for auc in aucs if not math.isnan(auc)]
    return float(np.mean(defined)) if defined else float("nan")


def roc_curve(true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds, from (0, 0) to (1, 1)."""
    order = np.argsort(-score, kind="mergesort")
    true, score = true[order], score[order]
    distinct = np.r_[np.where(np.diff(score))[0], len(score) - 1]
    tps = np.cumsum(true)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0, tps / max(1, true.sum())]
    fpr = np.r_[0, fps / max(1, len(true) - true.sum())]
    return fpr, tpr


def log_loss(true: np.ndarray, probabilities: np.ndarray) -> float:
    picked = np.clip(probabilities[np.arange(len(true)), true], 1e-12, 1.0)
    return float(-np.log(picked).mean())


def classification_metrics(
    true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> dict:
    """Loss, accuracy, per-class precision/recall/F1, macro F1 and ROC AUC.

    `roc_auc` is `macro_roc_auc`: two classes, the AUC of class index 1 as positive; three
    or more, the macro one-vs-rest AUC, averaged over the classes that have both positives
    and negatives in `true`, NaN (written "nan") when no class does.
    """
    true = np.asarray(true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(true, predicted, len(classes))
    row = {
        "n": int(len(true)),
        "loss": log_loss(true, probabilities),
        "accuracy": float((predicted == true).mean()),
    }
    f1s = []
    for k, name in enumerate(classes):
        tp = matrix[k, k]
        precision = tp / matrix[:, k].sum() if matrix[:, k].sum() else 0.0
        recall = tp / matrix[k, :].sum() if matrix[k, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        row[f"precision_{name}"] = float(precision)
        row[f"recall_{name}"] = float(recall)
        row[f"f1_{name}"] = float(f1)
        f1s.append(f1)
    row["macro_f1"] = float(np.mean(f1s))
    row["roc_auc"] = macro_roc_auc(true, probabilities)
    return row
