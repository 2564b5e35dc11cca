"""The trainer without a broker: progressive validation order, resume without double learning."""

from __future__ import annotations

import random

from clickpulse.events.schemas import validation_errors
from clickpulse.models.trainer import Trainer


def examples(n, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = rng.random() < 0.3
        out.append({"task": "intent" if i % 3 else "churn", "x": {"a": rng.gauss(1.0 if y else -1.0, 1.0)},
                    "y": y})
    return out


def test_predict_before_learn_and_snapshot_schema():
    t = Trainer({"intent": "logreg", "churn": "logreg"}, {"intent": 0.5, "churn": 0.5})
    exs = examples(300)
    for off, ex in enumerate(exs):
        assert t.learn(ex, off)
    snaps = t.snapshots()
    assert [s["version"] for s in snaps] == [1, 1]
    for s in snaps:
        assert validation_errors("snapshot", s) == []
        assert s["metrics"]["n"] == s["examples"] and s["training_offset"] >= 0
    intent = next(s for s in snaps if s["task"] == "intent")
    assert intent["metrics"]["all"]["roc_auc"] > 0.7       # learnable signal, predicted before learned


def test_restart_resumes_without_double_learning():
    exs = examples(400)
    straight = Trainer({"intent": "logreg", "churn": "logreg"}, {})
    for off, ex in enumerate(exs):
        straight.learn(ex, off)

    first = Trainer({"intent": "logreg", "churn": "logreg"}, {})
    for off, ex in enumerate(exs[:250]):
        first.learn(ex, off)
    snaps = first.snapshots()
    for off, ex in enumerate(exs[250:300], start=250):   # learned but never snapshotted: lost in a crash
        first.learn(ex, off)

    second = Trainer({"intent": "logreg", "churn": "logreg"}, {})
    for s in snaps:
        second.resume(s)
    start = second.start_offset()
    assert start <= 250
    for off in range(start, len(exs)):                    # the group re-reads from the snapshot offset
        second.learn(exs[off], off)
    for off in range(0, len(exs)):                        # a replay of everything changes nothing
        assert not second.learn(exs[off], off)
    for task in ("intent", "churn"):
        assert second.models[task].examples == straight.models[task].examples
        x = {"a": 0.3}
        assert second.models[task].score(x) == straight.models[task].score(x)
        assert second.validation[task].n == straight.validation[task].n
    assert [s["version"] for s in second.snapshots()] == [2, 2]
