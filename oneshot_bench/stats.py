"""Statistics: the 95% confidence interval used everywhere, paired differences, ROC AUC."""

from __future__ import annotations

import numpy as np

Z95 = 1.96


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width of per-episode values, (n,) float.

    half-width = 1.96 * std / sqrt(n), with the population std (ddof=0), the convention of
    the few-shot literature (e.g. ProtoNet, SimpleShot). This is the only CI formula in the
    package.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(Z95 * values.std(ddof=0) / np.sqrt(n))


def paired_differences(per_episode: dict[str, np.ndarray]) -> list[dict]:
    """For each pair of scorers evaluated on the same episodes: mean(a - b) and its CI."""
    names = list(per_episode)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            mean, ci = mean_ci95(per_episode[a] - per_episode[b])
            out.append({"a": a, "b": b, "mean_difference": mean, "ci95": ci, "significant": abs(mean) > ci})
    return out


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
