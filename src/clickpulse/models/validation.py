"""Progressive validation (predict, then learn) metrics for a binary task.

Every example is scored *before* the model learns it (Blum, Kalai & Langford 1999,
"Beating the hold-out"; River's ``evaluate.progressive_val_score``), and the metrics below are
updated with that score. All metrics come from :mod:`river.metrics`:

* ROC AUC: ``RollingROCAUC`` (exact), over all time (a window of ``all_time_cap`` examples) and
  over the rolling window;
* PR AUC: ``RollingPRAUC`` over the window (all-time uses a window as long as ``all_time_cap``);
* log loss, and precision / recall / F1 of the positive class at ``threshold``.

Examples
--------
>>> v = ProgressiveValidation(threshold=0.5, window=100)
>>> for y, p in [(True, 0.9), (False, 0.2), (True, 0.6), (False, 0.7)]:
...     v.update(y, p)
>>> r = v.report()
>>> r["all"]["roc_auc"], r["all"]["precision"], r["all"]["recall"], r["n"]
(0.75, 0.6666666666666666, 1.0, 4)
"""

from __future__ import annotations

from typing import Any

from river import metrics


class ProgressiveValidation:
    """Metrics of one task's predictions, updated one (label, score) pair at a time.

    Parameters
    ----------
    threshold
        Score at or above which the positive class is predicted (the action threshold), in [0, 1].
    window
        Examples in the rolling window.
    n_thresholds
        Unused (kept for compatibility; the all-time ROC AUC is exact).
    all_time_cap
        Window length standing in for "all time" in PR AUC (memory grows with it).
    """

    def __init__(self, threshold: float = 0.5, window: int = 1000, n_thresholds: int = 1000,
                 all_time_cap: int = 100_000) -> None:
        self.threshold = threshold
        self.window = window
        self.n = 0
        self.positives = 0
        # exact all-time ROC AUC: RollingROCAUC over a window as long as all_time_cap (River's
        # discretised ROCAUC costs ~0.3 ms per update with 1000 thresholds, this ~0.2 µs)
        self._all = {"roc_auc": metrics.RollingROCAUC(window_size=all_time_cap),
                     "pr_auc": metrics.RollingPRAUC(window_size=all_time_cap),
                     "log_loss": metrics.LogLoss(), "precision": metrics.Precision(),
                     "recall": metrics.Recall(), "f1": metrics.F1(), "accuracy": metrics.Accuracy()}
        self._win = {"roc_auc": metrics.RollingROCAUC(window_size=window),
                     "pr_auc": metrics.RollingPRAUC(window_size=window)}

    def update(self, y: bool, p: float) -> None:
        y = bool(y)
        p = min(1.0, max(0.0, float(p)))
        pred = p >= self.threshold
        self.n += 1
        self.positives += int(y)
        for name, m in self._all.items():
            m.update(y, p if name in ("roc_auc", "pr_auc") else ({True: p, False: 1 - p} if name == "log_loss" else pred))
        for m in self._win.values():
            m.update(y, p)

    def report(self) -> dict[str, Any]:
        """``{"n", "positives", "threshold", "all": {...}, "window": {...}}`` with float metrics."""
        def val(m: Any) -> float:
            return float(m.get())
        return {"n": self.n, "positives": self.positives, "threshold": self.threshold,
                "all": {k: val(m) for k, m in self._all.items()},
                "window": {"size": self.window, **{k: val(m) for k, m in self._win.items()}}}
