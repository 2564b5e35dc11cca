"""ROC and precision-recall curves and progressive metrics of a scored, labeled stream (numpy).

scikit-learn is not a dependency of clickpulse, and River's metrics give areas, not curves, so
the curves are computed here the way ``sklearn.metrics.roc_curve`` / ``precision_recall_curve``
do: one point per distinct score, thresholds from high to low (Fawcett, "An introduction to ROC
analysis", Pattern Recognition Letters 27, 2006, algorithm 2). The ROC AUC is the trapezoid
area (equal to the Mann-Whitney probability that a positive outscores a negative, ties counted
one half); the PR AUC is average precision (sum over recall steps of precision, as
scikit-learn's ``average_precision_score``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _points(y: Sequence[bool], p: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ya = np.asarray(y, dtype=bool)
    pa = np.asarray(p, dtype=float)
    if ya.shape != pa.shape or ya.ndim != 1:
        raise ValueError("y and p must be sequences of the same length")
    order = np.argsort(-pa, kind="mergesort")
    ys, ps = ya[order], pa[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), ys.size - 1]  # the last index of each distinct score
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return tp, fp, ps[last]


def roc_curve(y: Sequence[bool], p: Sequence[float]) -> dict[str, Any]:
    """``{"fpr", "tpr", "thresholds", "auc"}`` (lists, starting at (0, 0)).

    Raises
    ------
    ValueError
        Empty input, lengths differ, or only one class (the curve is undefined).
    """
    tp, fp, thr = _points(y, p)
    if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
        raise ValueError("ROC needs both classes")
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [math.inf, *thr.tolist()], "auc": auc}


def pr_curve(y: Sequence[bool], p: Sequence[float]) -> dict[str, Any]:
    """``{"recall", "precision", "thresholds", "auc"}`` (``auc`` = average precision; lists
    start at recall 0, precision 1 as scikit-learn's). Raises ``ValueError`` without positives."""
    tp, fp, thr = _points(y, p)
    if tp.size == 0 or tp[-1] == 0:
        raise ValueError("precision-recall needs a positive example")
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {"recall": [0.0, *recall.tolist()], "precision": [1.0, *precision.tolist()],
            "thresholds": [math.inf, *thr.tolist()], "auc": ap}


def progressive(y: Sequence[bool], p: Sequence[float], points: int = 100) -> dict[str, list[Any]]:
    """Metrics of the first n examples, at up to ``points`` values of n (progressive validation:
    each score was given before its example was learned): ``n``, ``roc_auc`` (``None`` while one
    class only), ``log_loss`` (mean, scores clipped to [1e-15, 1 - 1e-15]), ``positive_rate``."""
    ya = np.asarray(y, dtype=bool)
    pa = np.clip(np.asarray(p, dtype=float), 1e-15, 1 - 1e-15)
    n = ya.size
    if n == 0:
        return {"n": [], "roc_auc": [], "log_loss": [], "positive_rate": []}
    idx = sorted({max(1, round(n * (i + 1) / min(points, n))) for i in range(min(points, n))})
    ll = np.cumsum(-(ya * np.log(pa) + (~ya) * np.log(1 - pa)))
    pos = np.cumsum(ya)
    out: dict[str, list[Any]] = {"n": idx, "roc_auc": [], "log_loss": [], "positive_rate": []}
    for k in idx:
        try:
            out["roc_auc"].append(roc_curve(ya[:k], pa[:k])["auc"])
        except ValueError:
            out["roc_auc"].append(None)
        out["log_loss"].append(float(ll[k - 1] / k))
        out["positive_rate"].append(float(pos[k - 1] / k))
    return out
