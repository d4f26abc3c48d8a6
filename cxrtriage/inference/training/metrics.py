"""Evaluation metrics (numpy only) used by training, tests and bench/."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Sørensen-Dice coefficient of two binary masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as one half).

    Raises ``ValueError`` when only one class is present: the AUC is
    undefined there, and a silent 0.5 would hide a broken evaluation set.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative cases")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_interval(scores: np.ndarray, labels: np.ndarray, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`roc_auc`, positives and negatives resampled apart (each resample
    keeps the set's class counts). On 30-60 images an AUC moves by 0.1 or more between samples of the same
    population: the interval says how much of a difference between two sets is noise."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC AUC needs both positive and negative cases")
    rng = np.random.default_rng(seed)
    both = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    aucs = [roc_auc(np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]), both)
            for _ in range(resamples)]
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100.0 - tail))
